# boot: vtd
# needs: tern probe_edu
# tern passes QEMU's edu through its VFIO cdev (/dev/vfio/devices/vfioN) bound to an iommufd in
# which tern allocates the IOAS (all guest RAM mapped, IOVA = GPA) and the device's HWPT itself
# (dirty tracking requested only when IOMMU_GET_HW_INFO reports it; emulated VT-d does not). The
# edu probe kernel DMAs a pattern RAM -> edu -> RAM and receives the completion MSI; vm.info shows
# the iommufd backend and its capabilities.
. /lab/lib.sh
edu=$(edu_sysfs) || { lab_log "no edu device on the pci bus"; exit 1; }
out=/tmp/vfio-edu-iommufd.log
timeout -s KILL 120 tern --kernel /lab/probe/probe_edu.elf --device "path=$edu,iommufd=on" \
    --memory 256M --serial stdout >"$out" 2>&1
rc=$?
cat "$out"
for want in 'EDU: dma ok' 'EDU: msi ok'; do
    if ! grep -q "$want" "$out"; then
        lab_log "the probe did not print '$want'"
        exit 1
    fi
done
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
lab_log "edu DMA and MSI through the VFIO cdev + iommufd verified by the guest, tern exit 0"

dir=/tmp/vfio-edu-iommufd
mkdir -p "$dir"
timeout -s KILL 120 tern --api-socket "$dir/a.sock" --serial "file=$dir/a.log" \
    --guest demo,mib=8 --memory 128M --device "path=$edu,id=edu0,iommufd=on" 2>"$dir/a.err" &
a=$!
# An early exit must not leave tern holding the device for the next scenario.
trap 'kill $a 2>/dev/null' EXIT
wait_socket "$dir/a.sock" || { cat "$dir/a.err"; exit 1; }
ternctl --api-socket "$dir/a.sock" info >"$dir/info" 2>&1
cat "$dir/info"
ternctl --api-socket "$dir/a.sock" shutdown-vmm || { lab_log "shutdown-vmm failed"; exit 1; }
wait "$a"
rc=$?
a=
[ "$rc" -eq 0 ] || { lab_log "tern exited with $rc after shutdown-vmm"; cat "$dir/a.err"; exit 1; }
if ! grep -q '"backend": "iommufd"' "$dir/info" || ! grep -q '"hw_dirty_tracking": false' "$dir/info"; then
    lab_log "vm.info does not show edu0 on iommufd without hardware dirty tracking (emulated VT-d has none)"
    exit 1
fi
lab_log "vm.info: edu0 on iommufd, hw_dirty_tracking false as IOMMU_GET_HW_INFO reports"
