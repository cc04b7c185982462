# boot: any
# needs: tern
# tern boots its demo guest on nested KVM, the guest verifies its memory and tern exits cleanly.
. /lab/lib.sh
out=/tmp/demo-boot.log
timeout -s KILL 300 tern --guest demo,mib=16,exit-after=5 --cpus 2 --memory 256M --serial stdout \
    >"$out" 2>&1
rc=$?
cat "$out"
passes=$(grep -c 'DEMO: pass' "$out")
if grep -q 'DEMO: CORRUPT' "$out"; then
    lab_log "demo guest reported CORRUPT"
    exit 1
fi
if [ "$passes" -eq 0 ]; then
    lab_log "demo guest printed no 'DEMO: pass' line"
    exit 1
fi
if [ "$rc" -ne 0 ]; then
    lab_log "tern exited with $rc"
    exit 1
fi
lab_log "demo guest: $passes verified passes, tern exit 0"
