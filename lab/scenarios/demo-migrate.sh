# boot: any
# needs: tern
# tern live-migrates the running demo guest between two tern processes on nested KVM (over a Unix
# socket, then back over local memfd hand-over); the guest keeps verifying its memory on each side.
. /lab/lib.sh
dir=/tmp/demo-migrate
mkdir -p "$dir"

timeout -s KILL 300 tern --api-socket "$dir/a.sock" --serial "file=$dir/a.log" \
    --guest demo,mib=16,dirty-mib-per-s=32 --cpus 2 --memory 256M 2>"$dir/a.err" &
a=$!
timeout -s KILL 300 tern --api-socket "$dir/b.sock" --serial "file=$dir/b.log" 2>"$dir/b.err" &
b=$!
c=
# Whatever way the scenario ends, no tern of it outlives it (the next scenario shares the guest).
trap 'kill $a $b $c 2>/dev/null' EXIT
wait_socket "$dir/a.sock" && wait_socket "$dir/b.sock" || exit 1
wait_progress "$dir/a.log" 1 || exit 1

migrate "$dir/a.sock" "$dir/b.sock" "unix:$dir/ab.mig" || { cat "$dir"/*.err; exit 1; }
wait_tern a source "$dir/a.err" || exit 1
before=$(passes "$dir/b.log")
wait_progress "$dir/b.log" "$before" || exit 1

# And back, handing the memory over as a file descriptor.
timeout -s KILL 300 tern --api-socket "$dir/c.sock" --serial "file=$dir/c.log" 2>"$dir/c.err" &
c=$!
wait_socket "$dir/c.sock" || exit 1
migrate "$dir/b.sock" "$dir/c.sock" "unix:$dir/bc.mig" --local || { cat "$dir"/*.err; exit 1; }
# The destination's side of that switchover, step by step (the source's is printed above).
lab_log "local migration (no device), the destination's steps:"
ternctl --api-socket "$dir/c.sock" migration-status --watch | grep -a 'steps:'
wait_tern b "first destination" "$dir/b.err" || exit 1
before=$(passes "$dir/c.log")
wait_progress "$dir/c.log" "$before" || exit 1
ternctl --api-socket "$dir/c.sock" shutdown-vmm || { lab_log "shutdown-vmm of c failed"; exit 1; }
wait_tern c "second destination" "$dir/c.err" || exit 1

cat "$dir/a.log" "$dir/b.log" "$dir/c.log" | tail -n 6
if grep -q 'CORRUPT\|FAULT' "$dir/a.log" "$dir/b.log" "$dir/c.log"; then
    lab_log "the guest found corrupted memory after migration"
    exit 1
fi
grep -q 'DEMO: start' "$dir/b.log" "$dir/c.log" && { lab_log "a destination rebooted the guest"; exit 1; }
lab_log "demo guest migrated a->b (unix) and b->c (local) with its verifier clean"
