# boot: vtd
# needs: tern probe_mtty
# tern passes an mtty mdev (the kernel's sample virtual UART, /sys/bus/mdev/devices/UUID) through
# VFIO (its mdev group in a type1 container) to the mtty probe kernel (guests/probe/probe_mtty.S),
# which finds it on PCI bus 0 and exchanges bytes with each of its UARTs through their I/O BARs
# (mtty loops transmitted bytes back into the receive FIFO).
. /lab/lib.sh
uuid=${MTTY_UUIDS%% *}
dev=/sys/bus/mdev/devices/$uuid
[ -e "$dev" ] || { lab_log "no mtty instance $uuid"; exit 1; }
out=/tmp/vfio-mtty.log
timeout -s KILL 120 tern --kernel /lab/probe/probe_mtty.elf --device "path=$dev,id=mtty0" \
    --memory 128M --serial stdout >"$out" 2>&1
rc=$?
cat "$out"
if ! grep -q 'MTTY: uart ok' "$out"; then
    lab_log "the probe printed no 'MTTY: uart ok'"
    exit 1
fi
if [ "$(grep -c '^MTTY: port .* received 0a "tern-mtty[01]"' "$out")" -ne 2 ]; then
    lab_log "expected both UARTs of the mtty-2 instance to echo their 10 bytes"
    exit 1
fi
if [ "$rc" -ne 0 ]; then
    lab_log "tern exited with $rc"
    exit 1
fi
lab_log "mtty mdev passed through: the guest exchanged bytes with both UARTs, tern exit 0"
