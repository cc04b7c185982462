# boot: any
# needs: tern
# A VM that owns VFIO devices migrates between two tern processes, the devices' own state moving
# through VFIO migration v2 (mtty: STOP_COPY | P2P | PRE_COPY). The demo guest programs each mtty's
# UART (LCR, IER, MCR, scratch) and leaves two bytes pending in its receive FIFO; on every pass it
# reads them back and must find exactly what it left (else it prints "MTTY: device N LOST"), then
# leaves the next ones. Cases:
#   one:     mtty0 -> another mtty instance (mapped by id): the guest's checks keep passing on the
#            destination, pre-copy bytes > 0 in the stats, memory verifier clean;
#   two:     two mtty in one VM: P2P states used, both devices' state arrives;
#   killed:  destination killed during pre-copy: the source's device back in RUNNING, guest and
#            UART go on;
#   refused: the destination's device is an mtty-1 (one port) that cannot load a two-port state:
#            the destination's reason reaches the source, which resumes with its UART intact;
#   unknown: the receive request maps an id the source does not have: refused, source unaffected.
. /lab/lib.sh
set -- $MTTY_UUIDS
[ "$#" -ge 4 ] || { lab_log "need four mtty-2 instances, have $#"; exit 1; }
m1=/sys/bus/mdev/devices/$1 m2=/sys/bus/mdev/devices/$2
m3=/sys/bus/mdev/devices/$3 m4=/sys/bus/mdev/devices/$4
mtty1=/sys/bus/mdev/devices/$MTTY1_UUID
root=/tmp/vfio-mtty-migrate
a= b=
trap 'kill $a $b 2>/dev/null' EXIT

# Usage: start_source CASE MTTYS DEVICE_ARGS... — a demo guest with the devices; waits until it
# programmed its MTTYS devices.
start_source() {
    d=$root/$1
    want_mttys=$2
    shift 2
    rm -rf "$d"
    mkdir -p "$d"
    timeout -s KILL 600 tern --api-socket "$d/a.sock" --serial "file=$d/a.log" --log-level info \
        --guest demo,mib=16,dirty-mib-per-s=8 --cpus 2 --memory 256M "$@" 2>"$d/a.err" &
    a=$!
    wait_socket "$d/a.sock" || return 1
    wait_progress "$d/a.log" 2 || return 1
    # (wait_progress sets n: the count here has a name of its own.)
    mk=0
    while [ "$mk" -lt "$want_mttys" ]; do
        grep -q "MTTY: device $mk at .* programmed" "$d/a.log" ||
            { lab_log "the guest did not program mtty device $mk"; cat "$d/a.log"; return 1; }
        mk=$((mk + 1))
    done
}

# Usage: start_destination — an empty tern waiting for a VM.
start_destination() {
    timeout -s KILL 600 tern --api-socket "$d/b.sock" --serial "file=$d/b.log" --log-level info \
        2>"$d/b.err" &
    b=$!
    wait_socket "$d/b.sock"
}

# Usage: wait_mtty_ok LOG N — waits (40 s at most) for an "ok" line of device N in LOG: the guest
# prints one every 16 checks (a check per pass, about a pass per second); a failed check prints
# LOST at once.
wait_mtty_ok() {
    i=0
    while ! grep -q "MTTY: device $2 ok seq" "$1"; do
        i=$((i + 1))
        [ "$i" -gt 400 ] && { lab_log "no 'MTTY: device $2 ok' in $1"; return 1; }
        sleep 0.1
    done
}

# Usage: wait_next_mtty_ok LOG CASE — waits (40 s at most) for one more "device 0 ok" line in LOG
# than it has now: a check that passed after whatever just happened.
wait_next_mtty_ok() {
    seen=$(grep -c 'MTTY: device 0 ok seq' "$1")
    i=0
    while [ "$(grep -c 'MTTY: device 0 ok seq' "$1")" -le "${seen:-0}" ]; do
        i=$((i + 1))
        [ "$i" -gt 400 ] && { lab_log "$2: no mtty check passed in $1 afterwards"; return 1; }
        sleep 0.1
    done
}

# Usage: clean LOG... — no lost device state, no memory corruption.
clean() {
    if grep -q 'LOST\|CORRUPT\|FAULT' "$@"; then
        lab_log "the guest found lost device state or corrupt memory:"
        grep 'LOST\|CORRUPT\|FAULT' "$@"
        return 1
    fi
}

# --- one device ----------------------------------------------------------------------------------
start_source one 1 --device "path=$m1,id=mtty0" || exit 1
start_destination || exit 1
ternctl --api-socket "$d/a.sock" info >"$d/info" || exit 1
grep -q 'STOP_COPY|P2P|PRE_COPY' "$d/info" || { lab_log "vm.info does not show mtty0's migration capabilities"; cat "$d/info"; exit 1; }
ternctl --api-socket "$d/b.sock" receive-migration "unix:$d/ab.mig" --device "mtty0=$m2" || exit 1
ternctl --api-socket "$d/a.sock" send-migration "unix:$d/ab.mig" >/dev/null || exit 1
ternctl --api-socket "$d/a.sock" migration-status --watch >"$d/watch" 2>&1 || { cat "$d/watch" "$d"/*.err; exit 1; }
cat "$d/watch"
wait_tern a source "$d/a.err" || exit 1
before=$(passes "$d/b.log")
wait_progress "$d/b.log" "$((before + 2))" || exit 1
wait_mtty_ok "$d/b.log" 0 || { cat "$d/b.log"; exit 1; }
clean "$d/a.log" "$d/b.log" || exit 1
grep -q 'DEMO: start' "$d/b.log" && { lab_log "the destination rebooted the guest"; exit 1; }
pre=$(sed -n 's/.*device mtty0: pre-copy \([0-9][0-9]*\) B.*/\1/p' "$d/watch" | head -1)
stop=$(sed -n 's/.*device mtty0: .*stop-copy \([0-9][0-9]*\) B.*/\1/p' "$d/watch" | head -1)
[ "${pre:-0}" -gt 0 ] || { lab_log "no pre-copy bytes for mtty0 in the stats"; exit 1; }
[ "${stop:-0}" -gt 0 ] || { lab_log "no stop-copy bytes for mtty0 in the stats"; exit 1; }
one_downtime=$(grep -o 'downtime: *[0-9]* ms' "$d/watch" | grep -o '[0-9][0-9]*')
one_total=$(grep -o 'total time: *[0-9]* ms' "$d/watch" | grep -o '[0-9][0-9]*')
ternctl --api-socket "$d/b.sock" shutdown-vmm || exit 1
wait_tern b destination "$d/b.err" || exit 1
lab_log "one: mtty0 state moved (pre-copy $pre B, stop-copy $stop B); guest's UART checks pass on the destination; downtime $one_downtime ms, total $one_total ms"

# The same VM without the device, for the numbers.
start_source nodev 0 || exit 1
start_destination || exit 1
migrate "$d/a.sock" "$d/b.sock" "unix:$d/ab.mig" >"$d/watch" 2>&1 || { cat "$d/watch" "$d"/*.err; exit 1; }
wait_tern a source "$d/a.err" || exit 1
nodev_downtime=$(grep -o 'downtime: *[0-9]* ms' "$d/watch" | grep -o '[0-9][0-9]*')
nodev_total=$(grep -o 'total time: *[0-9]* ms' "$d/watch" | grep -o '[0-9][0-9]*')
ternctl --api-socket "$d/b.sock" shutdown-vmm || exit 1
wait_tern b destination "$d/b.err" || exit 1
lab_log "numbers: with mtty0 downtime $one_downtime ms total $one_total ms; without the device downtime $nodev_downtime ms total $nodev_total ms"

# --- two devices: P2P ----------------------------------------------------------------------------
start_source two 2 --device "path=$m1,id=mtty0" --device "path=$m2,id=mtty1" || exit 1
start_destination || exit 1
ternctl --api-socket "$d/b.sock" receive-migration "unix:$d/ab.mig" \
    --device "mtty0=$m3" --device "mtty1=$m4" || exit 1
ternctl --api-socket "$d/a.sock" send-migration "unix:$d/ab.mig" --connections 2 >/dev/null || exit 1
ternctl --api-socket "$d/a.sock" migration-status --watch >"$d/watch" 2>&1 || { cat "$d/watch" "$d"/*.err; exit 1; }
cat "$d/watch"
wait_tern a source "$d/a.err" || exit 1
grep -q 'P2P' "$d/a.err" || { lab_log "two: the source did not log the P2P switchover"; cat "$d/a.err"; exit 1; }
for id in mtty0 mtty1; do
    grep -q "device $id: .*p2p" "$d/watch" || { lab_log "two: $id did not go through P2P"; exit 1; }
done
wait_mtty_ok "$d/b.log" 0 || exit 1
wait_mtty_ok "$d/b.log" 1 || exit 1
clean "$d/a.log" "$d/b.log" || exit 1
ternctl --api-socket "$d/b.sock" shutdown-vmm || exit 1
wait_tern b destination "$d/b.err" || exit 1
lab_log "two: both devices went through P2P and their state arrived (the guest's checks pass for both)"

# --- destination killed during pre-copy ----------------------------------------------------------
start_source killed 1 --device "path=$m1,id=mtty0" || exit 1
start_destination || exit 1
ternctl --api-socket "$d/b.sock" receive-migration "unix:$d/ab.mig" --device "mtty0=$m2" || exit 1
# 16 Mbit/s: the full pass alone takes seconds.
ternctl --api-socket "$d/a.sock" send-migration "unix:$d/ab.mig" --max-bandwidth-mbps 16 >/dev/null || exit 1
i=0
until ternctl --api-socket "$d/a.sock" migration-status 2>/dev/null | grep -q '"status": "active"'; do
    i=$((i + 1))
    [ "$i" -gt 300 ] && { lab_log "killed: the migration never became active"; exit 1; }
    sleep 0.1
done
sleep 1
kill -9 "$b"
wait "$b" 2>/dev/null
b=
ternctl --api-socket "$d/a.sock" migration-status --watch >"$d/watch" 2>&1
grep -q 'migration failed' "$d/watch" || { lab_log "killed: the source did not report the migration failed"; cat "$d/watch"; exit 1; }
grep -q 'device mtty0: .*reset' "$d/watch" && lab_log "killed: the source reset mtty0 to get it back"
wait_next_mtty_ok "$d/a.log" killed || exit 1
clean "$d/a.log" || exit 1
ternctl --api-socket "$d/a.sock" shutdown-vmm || exit 1
wait_tern a source "$d/a.err" || exit 1
lab_log "killed: the source resumed; its mtty checks keep passing"

# --- the destination's device cannot load the state ----------------------------------------------
start_source refused 1 --device "path=$m1,id=mtty0" || exit 1
start_destination || exit 1
ternctl --api-socket "$d/b.sock" receive-migration "unix:$d/ab.mig" --device "mtty0=$mtty1" || exit 1
ternctl --api-socket "$d/a.sock" send-migration "unix:$d/ab.mig" >/dev/null || exit 1
ternctl --api-socket "$d/a.sock" migration-status --watch >"$d/watch" 2>&1
cat "$d/watch"
grep -q 'migration failed' "$d/watch" || { lab_log "refused: the migration did not fail"; exit 1; }
grep -q 'destination reported: .*mtty0' "$d/watch" || { lab_log "refused: the destination's reason did not reach the source"; exit 1; }
# The destination drops the half-built VM and stays up for another attempt.
ternctl --api-socket "$d/b.sock" shutdown-vmm || { lab_log "refused: the destination is gone"; exit 1; }
wait_tern b destination "$d/b.err" || exit 1
wait_next_mtty_ok "$d/a.log" refused || exit 1
clean "$d/a.log" || exit 1
ternctl --api-socket "$d/a.sock" shutdown-vmm || exit 1
wait_tern a source "$d/a.err" || exit 1
lab_log "refused: $(grep -o 'error: .*' "$d/watch" | head -1)"

# --- the receive request names an id the source does not have ------------------------------------
start_source unknown 1 --device "path=$m1,id=mtty0" || exit 1
start_destination || exit 1
ternctl --api-socket "$d/b.sock" receive-migration "unix:$d/ab.mig" --device "nosuch=$m2" || exit 1
ternctl --api-socket "$d/a.sock" send-migration "unix:$d/ab.mig" >/dev/null || exit 1
ternctl --api-socket "$d/a.sock" migration-status --watch >"$d/watch" 2>&1
grep -q 'nosuch' "$d/watch" || { lab_log "unknown: the refusal does not name the id"; cat "$d/watch"; exit 1; }
ternctl --api-socket "$d/b.sock" shutdown-vmm || { lab_log "unknown: the destination is gone"; exit 1; }
wait_tern b destination "$d/b.err" || exit 1
before=$(passes "$d/a.log")
wait_progress "$d/a.log" "$((before + 1))" || exit 1
clean "$d/a.log" || exit 1
ternctl --api-socket "$d/a.sock" shutdown-vmm || exit 1
wait_tern a source "$d/a.err" || exit 1
lab_log "unknown: $(grep -o 'error: .*' "$d/watch" | head -1)"
