# boot: mock
# needs: tern
# DMA behind KVM's back, end to end: the demo guest runs while tern's lab-only mock-dma device
# writes guest pages through the kernel (IOMMU_TEST_OP_ACCESS_RW, never through KVM) and marks them
# in the mock IOMMU's dirty bits. tern migrates the VM to a second tern; the destination reads every
# page the device wrote back and counts those not holding their last write. With the HWPT dirty
# source (dirty=auto) none may be lost and the guest's verifier stays clean; with the source
# switched off (dirty=none, the negative control) writes must be lost, or the check proves nothing.
. /lab/lib.sh
root=/tmp/hwdbm-mock
a= b=
trap 'kill $a $b 2>/dev/null' EXIT

# Usage: run_case DIRTY — migrates once; sets $lost and $intact from the destination's report.
run_case() {
    d=$root/$1
    rm -rf "$d"
    mkdir -p "$d"
    timeout -s KILL 300 tern --api-socket "$d/a.sock" --serial "file=$d/a.log" \
        --guest demo,mib=16,dirty-mib-per-s=8 --cpus 2 --memory 256M \
        --mock-dma "id=dmasim,gpa-mib=64,mib=32,pages-per-s=1000,dirty=$1" 2>"$d/a.err" &
    a=$!
    timeout -s KILL 300 tern --api-socket "$d/b.sock" --serial "file=$d/b.log" 2>"$d/b.err" &
    b=$!
    wait_socket "$d/a.sock" && wait_socket "$d/b.sock" || return 1
    wait_progress "$d/a.log" 1 || return 1
    ternctl --api-socket "$d/a.sock" info >"$d/info" || return 1
    grep -q '"mock-dma"' "$d/info" || { lab_log "vm.info does not list the mock-dma device"; cat "$d/info"; return 1; }
    migrate "$d/a.sock" "$d/b.sock" "unix:$d/ab.mig" --downtime-ms 300 >"$d/watch" 2>&1 ||
        { cat "$d/watch" "$d"/*.err; return 1; }
    cat "$d/watch"
    wait_tern a source "$d/a.err" || return 1
    before=$(passes "$d/b.log")
    wait_progress "$d/b.log" "$before" || return 1
    ternctl --api-socket "$d/b.sock" shutdown-vmm || { lab_log "shutdown-vmm failed"; return 1; }
    wait_tern b destination "$d/b.err" || return 1
    report=$(grep 'tern: mock-dma dmasim:' "$d/b.err")
    lab_log "dirty=$1: $report"
    intact=$(echo "$report" | sed -n 's/.*after migration \([0-9][0-9]*\) intact, \([0-9][0-9]*\) LOST$/\1/p')
    lost=$(echo "$report" | sed -n 's/.*after migration \([0-9][0-9]*\) intact, \([0-9][0-9]*\) LOST$/\2/p')
    [ -n "$intact" ] && [ -n "$lost" ] || { lab_log "no mock-dma verdict from the destination"; cat "$d/b.err"; return 1; }
    if grep -q 'CORRUPT\|FAULT' "$d/a.log" "$d/b.log"; then
        lab_log "the demo guest found corrupted memory"
        return 1
    fi
    grep -q 'DEMO: start' "$d/b.log" && { lab_log "the destination rebooted the guest"; return 1; }
    return 0
}

run_case auto || exit 1
auto_intact=$intact
if [ "$lost" -ne 0 ] || [ "$intact" -lt 100 ]; then
    lab_log "with HWPT dirty tracking: $lost DMA-written pages lost, $intact intact (want 0 lost, >= 100 intact)"
    exit 1
fi
grep -q 'dmasim' "$root/auto/watch" || { lab_log "migration status shows no DMA pages for dmasim"; exit 1; }
run_case none || exit 1
if [ "$lost" -eq 0 ]; then
    lab_log "negative control: with the DMA source off no write was lost, so the check cannot tell"
    exit 1
fi
lab_log "HWPT source on: 0 of $auto_intact DMA-written pages lost; off: $lost lost"
