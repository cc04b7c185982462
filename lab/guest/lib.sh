# Shell helpers for the lab guest, sourced by /init and by the scenarios (/lab/lib.sh).

# Fixed mtty instance UUIDs, so scenarios and tests can name them: four mtty-2 (two ports each; a
# VM with two devices migrates to the other two) and one mtty-1 (one port: a device whose state
# layout differs from the others', for refused-state tests).
MTTY_UUIDS="83b8f4f2-509f-382f-3c1e-e6bfe0fa1001 83b8f4f2-509f-382f-3c1e-e6bfe0fa1002 83b8f4f2-509f-382f-3c1e-e6bfe0fa1003 83b8f4f2-509f-382f-3c1e-e6bfe0fa1004"
MTTY1_UUID="83b8f4f2-509f-382f-3c1e-e6bfe0fa1101"

lab_log() { echo "lab: $*"; }

# Prints the sysfs paths of QEMU's edu devices (1234:11e8), one per line, in bus order; fails if
# there is none.
edu_sysfs_all() {
    found=1
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ]; then
            echo "$d"
            found=0
        fi
    done
    return $found
}

# Prints the sysfs path of the first edu device, or nothing.
edu_sysfs() {
    all=$(edu_sysfs_all) || return 1
    echo "$all" | head -1
}

# Binds every edu to vfio-pci (driver_override + drivers_probe).
bind_edu_vfio() {
    all=$(edu_sysfs_all) || { lab_log "no edu device on the pci bus"; return 1; }
    for edu in $all; do
        bdf=$(basename "$edu")
        echo vfio-pci >"$edu/driver_override"
        echo "$bdf" >/sys/bus/pci/drivers_probe
        driver=$(basename "$(readlink "$edu/driver")")
        group=$(basename "$(readlink "$edu/iommu_group")")
        lab_log "edu $bdf driver=$driver iommu_group=$group"
        [ "$driver" = vfio-pci ] || return 1
    done
}

# Creates the mtty instances of MTTY_UUIDS (type mtty-2: two ports each) and MTTY1_UUID (mtty-1).
create_mtty() {
    types=/sys/class/mdev_bus/mtty/mdev_supported_types
    for u in $MTTY_UUIDS; do
        [ -e "/sys/bus/mdev/devices/$u" ] || echo "$u" >"$types/mtty-2/create" || return 1
    done
    [ -e "/sys/bus/mdev/devices/$MTTY1_UUID" ] || echo "$MTTY1_UUID" >"$types/mtty-1/create" || return 1
    lab_log "mtty instances: $(ls /sys/bus/mdev/devices | tr '\n' ' ')"
}

# Per-boot device preparation. Failures are reported, not fatal: the scenarios that need the device
# fail with their own message.
lab_setup() {
    case "$1" in
    vtd)
        bind_edu_vfio || lab_log "WARNING: binding edu to vfio-pci failed"
        ;;
    mock) ;;
    esac
    create_mtty || lab_log "WARNING: creating mtty instances failed"
    lab_log "kvm: $(ls /dev/kvm 2>&1) nested=$(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null)"
    lab_log "iommu: $(ls /dev/iommu 2>&1); vfio: $(ls /dev/vfio /dev/vfio/devices 2>/dev/null | tr '\n' ' ')"
}

# Usage: run_rust_tests BIN MIN_PASSED FILTER...
# Runs the ignored (lab-only) tests of a `cargo test` executable matching any FILTER, one thread,
# and succeeds only if the run passed and at least MIN_PASSED tests ran: a filter that matches
# nothing must not read as a pass.
run_rust_tests() {
    bin=$1
    min=$2
    shift 2
    out=/tmp/rust-tests.$$.log
    # RUST_TEST_SELECT=--include-ignored runs a whole test binary; the default runs only the
    # tests marked `#[ignore = "lab: ..."]`.
    "$bin" "${RUST_TEST_SELECT:---ignored}" --test-threads=1 "$@" 2>&1 | tee "$out"
    summary=$(grep '^test result:' "$out" | tail -1)
    passed=$(echo "$summary" | sed -n 's/.* \([0-9][0-9]*\) passed.*/\1/p')
    rm -f "$out"
    if ! echo "$summary" | grep -q '^test result: ok'; then
        lab_log "$bin: tests failed"
        return 1
    fi
    if [ "${passed:-0}" -lt "$min" ]; then
        lab_log "$bin: only ${passed:-0} tests ran, expected at least $min"
        return 1
    fi
}

# Usage: boot_linux_guest KERNEL LABEL
# Boots KERNEL with /lab/linux/initramfs.cpio.gz under tern and checks that the guest's init saw the
# marker on its command line and that tern exited 0.
boot_linux_guest() {
    kernel=$1
    label=$2
    marker="tern.marker=lab-$label-$$"
    out=/tmp/linux-boot-$label.log
    start=$(cut -d' ' -f1 /proc/uptime)
    timeout -s KILL 300 tern --kernel "$kernel" --initramfs /lab/linux/initramfs.cpio.gz \
        --cmdline "console=ttyS0 reboot=k panic=-1 quiet $marker" \
        --memory 512M --cpus 2 --serial stdout >"$out" 2>&1
    rc=$?
    took=$(awk -v a="$start" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN { printf "%.1f", b - a }')
    cat "$out"
    lab_log "linux guest ($label) took ${took}s, tern exit $rc"
    if ! grep 'TERN-LINUX-INIT-OK cmdline=' "$out" | grep -q "$marker"; then
        lab_log "no TERN-LINUX-INIT-OK line carrying $marker"
        return 1
    fi
    [ "$rc" -eq 0 ] || { lab_log "tern exited with $rc"; return 1; }
}

# --- tern processes and migrations (scenarios) ---------------------------------------------------

# Waits until the unix socket $1 exists (30 s).
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
