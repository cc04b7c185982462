# boot: any
# needs: tern
# The demo guest with an mtty mdev passed through (no migration): at boot vCPU 0 finds the mtty on
# PCI bus 0 and programs its first UART (LCR, IER, MCR, scratch = sequence, two bytes left pending in
# the RX FIFO), then on every pass reads all of it back and advances the sequence. The device keeps
# its state here, so the guest must print 'programmed', an 'ok' line every 16 passes and never 'LOST'
# — the device-state oracle a VM-level migration test relies on.
. /lab/lib.sh
uuid=${MTTY_UUIDS%% *}
dev=/sys/bus/mdev/devices/$uuid
[ -e "$dev" ] || { lab_log "no mtty instance $uuid"; exit 1; }
dir=/tmp/demo-mtty
rm -rf "$dir"
mkdir -p "$dir"
log=$dir/a.log

timeout -s KILL 300 tern --api-socket "$dir/a.sock" --serial "file=$log" \
    --guest demo,mib=8 --memory 128M --device "path=$dev,id=mtty0" 2>"$dir/a.err" &
a=$!
# Whatever way the scenario ends, its tern does not outlive it (the next scenario shares the guest).
trap 'kill $a 2>/dev/null' EXIT
wait_socket "$dir/a.sock" || { cat "$dir/a.err"; exit 1; }
# 40 passes (one a second), waited for in steps: each wait_progress gives up after about a minute.
for n in 10 20 30 40; do
    wait_progress "$log" "$n" || { cat "$log" "$dir/a.err"; exit 1; }
done
ternctl --api-socket "$dir/a.sock" shutdown-vmm || { lab_log "shutdown-vmm failed"; exit 1; }
wait_tern a demo "$dir/a.err" || exit 1

grep '^MTTY' "$log"
tail -n 2 "$log"
fail=0
if [ "$(grep -c '^MTTY: device 0 at 00:[0-9a-f][0-9a-f]\.0 port [0-9a-f]\{4\} programmed$' "$log")" -ne 1 ]; then
    lab_log "expected exactly one 'MTTY: device 0 at 00:SS.0 port XXXX programmed' line"
    fail=1
fi
if grep -q '^MTTY: device 1 ' "$log"; then
    lab_log "the guest found a second mtty, but only one was passed through"
    fail=1
fi
oks=$(grep -c '^MTTY: device 0 ok seq [0-9]*$' "$log")
if [ "${oks:-0}" -lt 2 ] || ! grep -q '^MTTY: device 0 ok seq 32$' "$log"; then
    lab_log "expected 'ok' lines at least for seq 16 and 32, got ${oks:-0}"
    fail=1
fi
if grep -q 'LOST' "$log"; then
    lab_log "the guest says the mtty lost its state without any migration"
    fail=1
fi
if grep -q 'CORRUPT\|FAULT' "$log"; then
    lab_log "the demo guest reported CORRUPT or FAULT"
    fail=1
fi
[ "$fail" -eq 0 ] || exit 1
lab_log "demo guest checked the passed-through mtty on $(passes "$log") passes: programmed once, $oks ok lines, no LOST; tern exit 0"
