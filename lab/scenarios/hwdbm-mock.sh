# boot: mock
# needs: tern
# DMA behind KVM's back, end to end: the demo guest runs while tern's lab-only mock-dma device
# writes guest pages through the kernel (IOMMU_TEST_OP_ACCESS_RW, never through KVM) and marks them
# in the mock IOMMU's dirty bits. tern migrates the VM to a second tern; the destination reads every
# page the device wrote back and counts those not holding their last write. With the HWPT dirty
# source (dirty=auto) none may be lost and the guest's verifier stays clean; with the source
# switched off (dirty=none, the negative control) writes must be lost, or the check proves nothing.
# The control runs without page sums: with them, a device write that lands on a page while it is
# on the way tears it, and the destination fails the migration instead of losing the write (seen
# here: "1 received page(s) failed their checksum and were not resent"); writes after a page's
# last send would still be lost, but whether one tears first is timing.
# A third run has two mock devices: they share the VM's mock IOAS and one HWPT, so migration reads
# one dirty source naming both, and neither loses a write.
. /lab/lib.sh
root=/tmp/hwdbm-mock
a= b=
trap 'kill $a $b 2>/dev/null' EXIT

# Usage: verdict CASE ID — sets $lost and $intact from the destination's report on mock device ID.
verdict() {
    report=$(grep "tern: mock-dma $2:" "$root/$1/b.err")
    lab_log "$1: $report"
    intact=$(echo "$report" | sed -n 's/.*after migration \([0-9][0-9]*\) intact, \([0-9][0-9]*\) LOST$/\1/p')
    lost=$(echo "$report" | sed -n 's/.*after migration \([0-9][0-9]*\) intact, \([0-9][0-9]*\) LOST$/\2/p')
    [ -n "$intact" ] && [ -n "$lost" ] || { lab_log "$1: no verdict on mock-dma $2 from the destination"; cat "$root/$1/b.err"; return 1; }
}

# Usage: run_case CASE MOCK_SPEC... — migrates once with a --mock-dma device per MOCK_SPEC, with
# $send_flags added to send-migration.
send_flags=
run_case() {
    d=$root/$1
    shift
    rm -rf "$d"
    mkdir -p "$d"
    mocks=
    for m in "$@"; do mocks="$mocks --mock-dma $m"; done
    timeout -s KILL 300 tern --api-socket "$d/a.sock" --serial "file=$d/a.log" \
        --guest demo,mib=16,dirty-mib-per-s=8 --cpus 2 --memory 256M $mocks 2>"$d/a.err" &
    a=$!
    timeout -s KILL 300 tern --api-socket "$d/b.sock" --serial "file=$d/b.log" 2>"$d/b.err" &
    b=$!
    wait_socket "$d/a.sock" && wait_socket "$d/b.sock" || return 1
    wait_progress "$d/a.log" 1 || return 1
    ternctl --api-socket "$d/a.sock" info >"$d/info" || return 1
    grep -q '"mock-dma"' "$d/info" || { lab_log "vm.info does not list the mock-dma device"; cat "$d/info"; return 1; }
    # shellcheck disable=SC2086 # send_flags is a list of flags
    migrate "$d/a.sock" "$d/b.sock" "unix:$d/ab.mig" --downtime-ms 300 $send_flags >"$d/watch" 2>&1 ||
        { cat "$d/watch" "$d"/*.err; return 1; }
    cat "$d/watch"
    wait_tern a source "$d/a.err" || return 1
    before=$(passes "$d/b.log")
    wait_progress "$d/b.log" "$before" || return 1
    ternctl --api-socket "$d/b.sock" shutdown-vmm || { lab_log "shutdown-vmm failed"; return 1; }
    wait_tern b destination "$d/b.err" || return 1
    if grep -q 'CORRUPT\|FAULT' "$d/a.log" "$d/b.log"; then
        lab_log "the demo guest found corrupted memory"
        return 1
    fi
    grep -q 'DEMO: start' "$d/b.log" && { lab_log "the destination rebooted the guest"; return 1; }
    return 0
}

run_case auto "id=dmasim,gpa-mib=64,mib=32,pages-per-s=1000,dirty=auto" || exit 1
verdict auto dmasim || exit 1
auto_intact=$intact
if [ "$lost" -ne 0 ] || [ "$intact" -lt 100 ]; then
    lab_log "with HWPT dirty tracking: $lost DMA-written pages lost, $intact intact (want 0 lost, >= 100 intact)"
    exit 1
fi
grep -q 'dmasim' "$root/auto/watch" || { lab_log "migration status shows no DMA pages for dmasim"; exit 1; }
send_flags=--no-page-checksums
run_case none "id=dmasim,gpa-mib=64,mib=32,pages-per-s=1000,dirty=none" || exit 1
send_flags=
verdict none dmasim || exit 1
if [ "$lost" -eq 0 ]; then
    lab_log "negative control: with the DMA source off no write was lost, so the check cannot tell"
    exit 1
fi
lab_log "HWPT source on: 0 of $auto_intact DMA-written pages lost; off: $lost lost"
run_case shared "id=sim1,gpa-mib=64,mib=32,pages-per-s=500" "id=sim2,gpa-mib=128,mib=32,pages-per-s=500" || exit 1
for id in sim1 sim2; do
    verdict shared $id || exit 1
    if [ "$lost" -ne 0 ] || [ "$intact" -lt 50 ]; then
        lab_log "shared HWPT: $id lost $lost DMA-written pages, $intact intact (want 0 lost, >= 50 intact)"
        exit 1
    fi
done
hwpts=$(grep -o '"hwpt": [0-9]*' "$root/shared/info" | sort -u | wc -l)
[ "$hwpts" -eq 1 ] || { lab_log "the two mock devices are not on one HWPT ($hwpts distinct)"; cat "$root/shared/info"; exit 1; }
# The status names DMA sources as [LABEL]: exactly one, naming both devices.
labels=$(grep -o '\[hwpt [0-9]*: [^]]*\]' "$root/shared/watch" | sort -u)
echo "$labels" | grep -q '^\[hwpt [0-9]*: sim1,sim2\]$' && [ "$(echo "$labels" | wc -l)" -eq 1 ] ||
    { lab_log "migration status does not show exactly one DMA source for sim1 and sim2: $labels"; exit 1; }
lab_log "two mock devices on one HWPT: one dirty source $labels, 0 writes lost"
