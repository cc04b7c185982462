# boot: vtd
# needs: tern probe_edu
# Live update with a passthrough device attached (issue 12): a VM with QEMU's edu (type1, then
# iommufd) runs the edu probe's loop (a DMA RAM -> edu -> RAM round with its completion MSI, and
# the liveness register it set once read back, one line per round); `ternctl live-update` starts a
# new tern and hands it the VM with the device's fds (no device state read, no reset). The guest's
# rounds must go on in the new tern, every one of them clean, the old tern must exit 0, and the
# stats must name the device handed over. Before that a destination that dies during the handover
# (TERN_TEST_LIVE_UPDATE_EXIT) must leave the source owning a working device. The downtime is
# printed next to the same VM size without a device. A VM with an mtty mdev is refused, naming why.
. /lab/lib.sh
edu=$(edu_sysfs) || { lab_log "no edu device on the pci bus"; exit 1; }
dir=/tmp/vfio-live-update
rm -rf "$dir"
mkdir -p "$dir"
tern_bin=$(command -v tern)
pids=
trap 'for p in $pids; do kill -9 $p 2>/dev/null; done' EXIT

# Prints the clean rounds in serial log $1 (0 when none).
clean_rounds() {
    n=$(grep -c 'EDU: round [0-9a-f]* dma ok msi ok live ok$' "$1" 2>/dev/null)
    echo "${n:-0}"
}

# Fails (printing them) if log $1 has a round that was not clean.
no_bad_rounds() {
    bad=$(grep 'EDU: round' "$1" | grep -v 'dma ok msi ok live ok$' | grep ' live ')
    [ -z "$bad" ] && return 0
    lab_log "$2: rounds that were not clean:"
    echo "$bad"
    return 1
}

# Waits until log $1 has more than $2 clean rounds (90 s).
wait_rounds() {
    i=0
    while [ "$(clean_rounds "$1")" -le "$2" ]; do
        i=$((i + 1))
        [ "$i" -gt 900 ] && { lab_log "no clean edu round in $1 beyond $2"; tail -n 5 "$1"; return 1; }
        sleep 0.1
    done
}

# Prints the time the guest stood still in live-update output $1 (pause -> resume stamps).
stood_still() {
    sed -n 's/.*stopped -> running in the new tern: \([0-9]*\) us.*/\1/p' "$1"
}

# Waits until process $1 is gone (30 s).
wait_gone() {
    i=0
    while kill -0 "$1" 2>/dev/null; do
        i=$((i + 1))
        [ "$i" -gt 300 ] && return 1
        sleep 0.1
    done
}

# Usage: live_update LABEL BACKEND(off|on)
live_update() {
    label=$1
    d=$dir/$label
    mkdir -p "$d"
    timeout -s KILL 600 tern --api-socket "$d/a.sock" --serial "file=$d/a.log" \
        --kernel /lab/probe/probe_edu.elf --cmdline loop --memory 256M \
        --device "path=$edu,id=edu0,iommufd=$2" 2>"$d/a.err" &
    a=$!
    pids="$pids $a"
    wait_socket "$d/a.sock" || { cat "$d/a.err"; return 1; }
    wait_rounds "$d/a.log" 2 || { cat "$d/a.err"; return 1; }

    # 1. The destination dies during the handover, once after taking the fds and once after it
    # set its own DMA addresses (type1) / right before it says ready: the source takes the
    # device back and the guest goes on with clean rounds.
    for step in inherit take-over restore; do
        before=$(clean_rounds "$d/a.log")
        TERN_TEST_LIVE_UPDATE_EXIT=$step ternctl --api-socket "$d/a.sock" live-update \
            --binary "$tern_bin" --new-api-socket "$d/dead-$step.sock" --new-log "$d/dead-$step.err" \
            -- --serial "file=$d/dead-$step.log" >"$d/dead-$step.out" 2>&1
        rc=$?
        lab_log "$label: destination killed at '$step': ternctl exit $rc: $(tr '\n' ' ' <"$d/dead-$step.out"); new tern: $(tr '\n' ' ' <"$d/dead-$step.err")"
        [ "$rc" -ne 0 ] || { lab_log "$label: the live update succeeded although the destination died"; return 1; }
        grep -q "TERN_TEST_LIVE_UPDATE_EXIT=$step: exiting now" "$d/dead-$step.err" ||
            { lab_log "$label: the destination failed before it reached '$step'"; return 1; }
        ternctl --api-socket "$d/a.sock" ping >/dev/null || { lab_log "$label: the source died"; cat "$d/a.err"; return 1; }
        ternctl --api-socket "$d/a.sock" migration-status >"$d/dead-$step.status" 2>&1
        grep -q '"status": "failed"' "$d/dead-$step.status" || { lab_log "$label: the source's migration is not 'failed'"; cat "$d/dead-$step.status"; return 1; }
        wait_rounds "$d/a.log" $((before + 2)) || { lab_log "$label: the guest stopped after the destination died at '$step'"; cat "$d/a.err"; return 1; }
        no_bad_rounds "$d/a.log" "$label after the destination died at '$step'" || return 1
        lab_log "$label: source owns a working device after the destination died at '$step': $(grep 'EDU: round' "$d/a.log" | tail -n 1)"
    done

    # 2. The live update itself.
    before=$(clean_rounds "$d/a.log")
    ternctl --api-socket "$d/a.sock" live-update --binary "$tern_bin" --new-api-socket "$d/b.sock" \
        --new-log "$d/b.err" -- --serial "file=$d/b.log" >"$d/lu.out" 2>"$d/lu.err"
    rc=$?
    cat "$d/lu.out" "$d/lu.err" "$d/b.err"
    [ "$rc" -eq 0 ] || { lab_log "$label: live-update failed ($rc)"; cat "$d/a.err"; return 1; }
    grep -q 'devices handed over: edu0' "$d/lu.out" || { lab_log "$label: the stats do not name edu0 as handed over"; return 1; }
    wait "$a"
    arc=$?
    [ "$arc" -eq 0 ] || { lab_log "$label: the old tern exited with $arc"; cat "$d/a.err"; return 1; }
    b=$(sed -n 's/.*new tern pid \([0-9]*\).*/\1/p' "$d/lu.out")
    pids="$pids $b"
    wait_rounds "$d/b.log" 3 || { cat "$d/a.err"; return 1; }
    no_bad_rounds "$d/a.log" "$label old tern" || return 1
    no_bad_rounds "$d/b.log" "$label new tern" || return 1
    grep -q 'EDU: loop' "$d/b.log" && { lab_log "$label: the guest restarted in the new tern"; return 1; }
    downtime=$(sed -n 's/.*downtime \([0-9]*\) ms (\([0-9]*\) us.*/\2/p' "$d/lu.out")
    stood=$(stood_still "$d/lu.out")
    lab_log "$label: old tern exit 0 after $before clean rounds; new tern: $(clean_rounds "$d/b.log") clean rounds, last: $(grep 'EDU: round' "$d/b.log" | tail -n 1)"
    lab_log "$label: downtime with edu: ${downtime} us (vCPUs stopped -> running: ${stood} us)"
    echo "$downtime us (stopped -> running $stood us)" >"$d/downtime"

    # 3. And on again from the new tern (its device is an inherited one).
    ternctl --api-socket "$d/b.sock" live-update --binary "$tern_bin" --new-api-socket "$d/c.sock" \
        --new-log "$d/c.err" -- --serial "file=$d/c.log" >"$d/lu2.out" 2>&1
    rc=$?
    cat "$d/lu2.out"
    [ "$rc" -eq 0 ] || { lab_log "$label: second live-update failed ($rc)"; return 1; }
    wait_gone "$b" || { lab_log "$label: the second tern did not exit"; return 1; }
    c=$(sed -n 's/.*new tern pid \([0-9]*\).*/\1/p' "$d/lu2.out")
    pids="$pids $c"
    wait_rounds "$d/c.log" 3 || return 1
    no_bad_rounds "$d/c.log" "$label third tern" || return 1
    lab_log "$label: second live update: $(grep downtime "$d/lu2.out"); third tern: $(grep 'EDU: round' "$d/c.log" | tail -n 1)"
    ternctl --api-socket "$d/c.sock" shutdown-vmm || { lab_log "$label: shutdown-vmm failed"; return 1; }
    wait_gone "$c" || { lab_log "$label: the last tern did not exit"; return 1; }
}

live_update type1 off || exit 1
live_update iommufd on || exit 1

# The same VM size without a device, for comparison (the demo guest: the edu probe powers off
# without edu).
d=$dir/nodev
mkdir -p "$d"
timeout -s KILL 300 tern --api-socket "$d/a.sock" --serial "file=$d/a.log" \
    --guest demo,mib=8 --memory 256M 2>"$d/a.err" &
a=$!
pids="$pids $a"
wait_socket "$d/a.sock" && wait_progress "$d/a.log" 1 || exit 1
ternctl --api-socket "$d/a.sock" live-update --binary "$tern_bin" --new-api-socket "$d/b.sock" \
    -- --serial "file=$d/b.log" >"$d/lu.out" 2>&1 || { cat "$d/lu.out" "$d/a.err"; exit 1; }
cat "$d/lu.out"
wait "$a" || { lab_log "no-device old tern failed"; exit 1; }
b=$(sed -n 's/.*new tern pid \([0-9]*\).*/\1/p' "$d/lu.out")
pids="$pids $b"
before=$(passes "$d/b.log")
wait_progress "$d/b.log" "$before" || exit 1
nodev="$(sed -n 's/.*downtime \([0-9]*\) ms (\([0-9]*\) us.*/\2/p' "$d/lu.out") us (stopped -> running $(stood_still "$d/lu.out") us)"
ternctl --api-socket "$d/b.sock" shutdown-vmm
wait_gone "$b"
lab_log "downtime (256 MiB VM): with edu type1 $(cat "$dir/type1/downtime"), with edu iommufd $(cat "$dir/iommufd/downtime"), without a device ${nodev}"

# An mtty mdev cannot go: type1's update-vaddr excludes mdevs. Refused before anything pauses,
# naming the device and the reason; the VM runs on.
uuid=${MTTY_UUIDS%% *}
d=$dir/mtty
mkdir -p "$d"
timeout -s KILL 120 tern --api-socket "$d/a.sock" --serial "file=$d/a.log" \
    --guest demo,mib=8 --memory 128M --device "path=/sys/bus/mdev/devices/$uuid,id=mtty0" 2>"$d/a.err" &
a=$!
pids="$pids $a"
wait_socket "$d/a.sock" && wait_progress "$d/a.log" 1 || { cat "$d/a.err"; exit 1; }
ternctl --api-socket "$d/a.sock" live-update --binary "$tern_bin" --new-api-socket "$d/b.sock" \
    >"$d/lu.out" 2>&1
rc=$?
lab_log "mtty: live-update exit $rc: $(cat "$d/lu.out")"
if [ "$rc" -eq 0 ] || ! grep -q 'mtty0 is an mdev' "$d/lu.out" || ! grep -q 'VFIO_UPDATE_VADDR' "$d/lu.out"; then
    lab_log "mtty: the live update was not refused naming mtty0, the mdev and VFIO_UPDATE_VADDR"
    exit 1
fi
before=$(passes "$d/a.log")
wait_progress "$d/a.log" "$before" || { lab_log "mtty: the guest stopped after the refusal"; exit 1; }
ternctl --api-socket "$d/a.sock" shutdown-vmm || exit 1
wait "$a" || { lab_log "mtty tern exited non-zero"; exit 1; }
lab_log "live update: edu handed over without a reset (type1 and iommufd, twice each), destination deaths survived, mtty refused with the reason"
