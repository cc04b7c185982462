# boot: any
# needs: tern
# tern live-migrates the running demo guest between two tern processes on nested KVM (over a Unix
# socket, then back over local memfd hand-over); the guest keeps verifying its memory on each side.
. /lab/lib.sh
dir=/tmp/demo-migrate
mkdir -p "$dir"

wait_socket() {
    i=0
    while [ ! -S "$1" ]; do
        i=$((i + 1))
        [ "$i" -gt 300 ] && { lab_log "$1 never appeared"; return 1; }
        sleep 0.1
    done
}

# Prints exactly one number: the pass lines in log $1 (0 if it has none or does not exist yet).
# Not `grep -c ... || echo 0`: with no match grep -c prints 0 *and* fails, which printed "0 0".
passes() {
    n=$(grep -c 'DEMO: pass' "$1" 2>/dev/null)
    echo "${n:-0}"
}

# Waits until log $1 has more than $2 pass lines. Fails closed: a count that is not a number never
# counts as progress.
wait_progress() {
    i=0
    while :; do
        n=$(passes "$1")
        [ "$n" -gt "$2" ] 2>/dev/null && return 0
        i=$((i + 1))
        [ "$i" -gt 600 ] && { lab_log "no guest progress in $1 (pass lines: $n, needed > $2)"; return 1; }
        sleep 0.1
    done
}

# Waits for the tern whose pid is in variable $1 (named $2, stderr in $3), empties the variable
# (the EXIT trap must not signal a reaped pid) and fails unless it exited 0.
wait_tern() {
    eval "wait \"\$$1\""
    rc=$?
    eval "$1="
    [ "$rc" -eq 0 ] && return 0
    lab_log "$2 tern exited with $rc"
    cat "$3"
    return 1
}

# Migrates from API socket $1 to API socket $2 over $3 (extra ternctl flags follow); fails unless
# the source reports completed.
migrate() {
    src=$1 dst=$2 url=$3
    shift 3
    ternctl --api-socket "$dst" receive-migration "$url" || return 1
    ternctl --api-socket "$src" send-migration "$url" "$@" || return 1
    ternctl --api-socket "$src" migration-status --watch
}

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
