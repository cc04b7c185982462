# boot: vtd
# needs: tern probe_edu
# tern passes QEMU's edu (bound to vfio-pci behind emulated VT-d) through the legacy group + type1
# container to the edu probe kernel (guests/probe/probe_edu.S), which finds it on PCI bus 0, checks
# its ID register, has it DMA a pattern RAM -> edu -> RAM through the IOMMU (IOVA = GPA) and receives
# the completion MSI (VFIO_DEVICE_SET_IRQS eventfd -> KVM irqfd -> guest LAPIC). Then bad
# --device input (a path that does not exist, a device not bound to vfio-pci, no permission on the
# group node) must give one clear error line and a non-zero exit, no panic.
. /lab/lib.sh
edu=$(edu_sysfs) || { lab_log "no edu device on the pci bus"; exit 1; }
out=/tmp/vfio-edu-type1.log
timeout -s KILL 120 tern --kernel /lab/probe/probe_edu.elf --device "path=$edu" --memory 256M \
    --serial stdout >"$out" 2>&1
rc=$?
cat "$out"
if ! grep -q 'EDU: dma ok' "$out"; then
    lab_log "the probe printed no 'EDU: dma ok'"
    exit 1
fi
if ! grep -q 'EDU: msi ok' "$out"; then
    lab_log "the probe received no MSI from edu"
    exit 1
fi
if [ "$rc" -ne 0 ]; then
    lab_log "tern exited with $rc"
    exit 1
fi
# BAR0 (1 MiB, mmap-able through vfio-pci, no MSI-X) must be a KVM memory slot, not trapped.
if ! grep -q 'VFIO .*: BAR memory 0x[0-9a-f]*+0x100000 mapped into the guest as KVM memory slot' "$out"; then
    lab_log "edu BAR0 was not mapped into the guest as a KVM memory slot"
    exit 1
fi
lab_log "edu BAR0 mapped into the guest as a KVM memory slot: $(grep -o 'BAR memory .*' "$out" | head -1)"
lab_log "edu DMA through VFIO type1 and its completion MSI verified by the guest, tern exit 0"

# Usage: bad_device LABEL EXPECTED-TEXT DEVICE-ARG [USER]
bad_device() {
    cmd="timeout -s KILL 60 $(command -v tern) --kernel /lab/probe/probe_edu.elf --device $3 --memory 64M --serial stdout"
    if [ -n "${4:-}" ]; then
        su -s /bin/sh -c "$cmd" "$4" >/tmp/bad.out 2>/tmp/bad.err
    else
        $cmd >/tmp/bad.out 2>/tmp/bad.err
    fi
    brc=$?
    lab_log "$1: exit $brc, stderr: $(cat /tmp/bad.err)"
    if [ "$brc" -eq 0 ] || [ "$brc" -ge 124 ]; then
        lab_log "$1: expected a plain failure exit, got $brc"
        return 1
    fi
    if grep -qi 'panick' /tmp/bad.err; then
        lab_log "$1: tern panicked"
        return 1
    fi
    if [ "$(wc -l </tmp/bad.err)" -ne 1 ] || ! grep -q "$2" /tmp/bad.err; then
        lab_log "$1: expected one error line containing '$2'"
        return 1
    fi
    if grep -q 'EDU:' /tmp/bad.out; then
        lab_log "$1: the guest ran although the device was refused"
        return 1
    fi
}
bad_device "missing path" "does not exist" path=/sys/bus/pci/devices/0000:00:1f.7 || exit 1
bad_device "not vfio-pci" "vfio-pci" path=/sys/bus/pci/devices/0000:00:00.0 || exit 1
# No permission on /dev/vfio/N: tern as an unprivileged user, with /dev/kvm opened up for it so
# that the VFIO node is what it trips on.
mkdir -p /etc
grep -q '^nobody:' /etc/passwd 2>/dev/null || echo 'nobody:x:65534:65534:nobody:/:/bin/sh' >>/etc/passwd
grep -q '^nogroup:' /etc/group 2>/dev/null || echo 'nogroup:x:65534:' >>/etc/group
# The initramfs root comes from a private temporary directory: let the user reach the binaries.
chmod a+rx / && chmod -R a+rX /bin /lab /lib /lib64 /usr 2>/dev/null
kvm_mode=$(stat -c %a /dev/kvm)
chmod 666 /dev/kvm
bad_device "no permission" "no permission to open /dev/vfio/" "path=$edu" nobody
perm=$?
chmod "$kvm_mode" /dev/kvm
[ "$perm" -eq 0 ] || exit 1
lab_log "bad --device input refused with one clear line each"

# vm.info lists the device and its (absent) VFIO migration capabilities; vm.send-migration is
# refused (edu has no VFIO migration v2, and type1 does not track its DMA) and the VM keeps running.
dir=/tmp/vfio-edu-mig
mkdir -p "$dir"
timeout -s KILL 120 tern --api-socket "$dir/a.sock" --serial "file=$dir/a.log" \
    --guest demo,mib=8 --memory 128M --device "path=$edu,id=edu0" 2>"$dir/a.err" &
a=$!
# An early exit must not leave tern holding the device for the next scenario.
trap 'kill $a 2>/dev/null' EXIT
wait_socket "$dir/a.sock" || { cat "$dir/a.err"; exit 1; }
ternctl --api-socket "$dir/a.sock" info >"$dir/info" 2>&1
cat "$dir/info"
if ! grep -q 'edu0' "$dir/info" || ! grep -q 'vfio-pci' "$dir/info" || ! grep -q 'vfio-type1' "$dir/info"; then
    lab_log "vm.info does not list edu0 as a vfio-pci device with its type1 IOMMU"
    exit 1
fi
# edu on type1 has no IOMMU dirty tracking and no DMA logging, and type1 would report every page:
# vm.info says so, and vm.send-migration is refused before anything pauses, naming the device and
# the opt-in.
grep -q '"method": *"none"' "$dir/info" || { lab_log "vm.info does not show edu0's DMA dirty method as none"; exit 1; }
grep -q '"vfio_migration_caps": *"none"' "$dir/info" || { lab_log "vm.info does not show edu0 without VFIO migration capabilities"; exit 1; }
before=$(passes "$dir/a.log")
ternctl --api-socket "$dir/a.sock" send-migration "unix:$dir/x.mig" >"$dir/send.out" 2>&1
src=$?
lab_log "send-migration: exit $src: $(cat "$dir/send.out")"
if [ "$src" -eq 0 ] || ! grep -q 'device edu0: no VFIO migration support' "$dir/send.out" ||
    ! grep -q 'dirty=type1' "$dir/send.out"; then
    lab_log "send-migration of a VM with edu was not refused naming edu0, its missing VFIO migration support and the dirty=type1 opt-in"
    exit 1
fi
wait_progress "$dir/a.log" "$before" || { lab_log "the guest stopped after the refusal"; exit 1; }
ternctl --api-socket "$dir/a.sock" ping >/dev/null || { lab_log "tern died after the refusal"; exit 1; }
ternctl --api-socket "$dir/a.sock" shutdown-vmm || { lab_log "shutdown-vmm failed"; exit 1; }
wait "$a"
rc=$?
a=
[ "$rc" -eq 0 ] || { lab_log "tern exited with $rc after shutdown-vmm"; cat "$dir/a.err"; exit 1; }
lab_log "vm.info lists the device, send-migration refused, VM kept running"
