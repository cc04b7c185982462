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

passes() { grep -c 'DEMO: pass' "$1" 2>/dev/null || echo 0; }

# Waits until log $1 has more than $2 pass lines.
wait_progress() {
    i=0
    while [ "$(passes "$1")" -le "$2" ]; do
        i=$((i + 1))
        [ "$i" -gt 600 ] && { lab_log "no guest progress in $1"; return 1; }
        sleep 0.1
    done
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
wait_socket "$dir/a.sock" && wait_socket "$dir/b.sock" || exit 1
wait_progress "$dir/a.log" 1 || exit 1

migrate "$dir/a.sock" "$dir/b.sock" "unix:$dir/ab.mig" || { cat "$dir"/*.err; exit 1; }
wait "$a"
rc=$?
[ "$rc" -eq 0 ] || { lab_log "source tern exited with $rc"; cat "$dir/a.err"; exit 1; }
before=$(passes "$dir/b.log")
wait_progress "$dir/b.log" "$before" || exit 1

# And back, handing the memory over as a file descriptor.
timeout -s KILL 300 tern --api-socket "$dir/c.sock" --serial "file=$dir/c.log" 2>"$dir/c.err" &
c=$!
wait_socket "$dir/c.sock" || exit 1
migrate "$dir/b.sock" "$dir/c.sock" "unix:$dir/bc.mig" --local || { cat "$dir"/*.err; exit 1; }
wait "$b"
before=$(passes "$dir/c.log")
wait_progress "$dir/c.log" "$before" || exit 1
ternctl --api-socket "$dir/c.sock" shutdown-vmm
wait "$c"

cat "$dir/a.log" "$dir/b.log" "$dir/c.log" | tail -n 6
if grep -q 'CORRUPT\|FAULT' "$dir/a.log" "$dir/b.log" "$dir/c.log"; then
    lab_log "the guest found corrupted memory after migration"
    exit 1
fi
grep -q 'DEMO: start' "$dir/b.log" "$dir/c.log" && { lab_log "a destination rebooted the guest"; exit 1; }
lab_log "demo guest migrated a->b (unix) and b->c (local) with its verifier clean"
