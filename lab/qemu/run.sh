#!/usr/bin/env bash
# Usage: run.sh vtd|mock KERNEL INITRD EXTRA_CMDLINE
# Boots the lab guest under QEMU TCG: q35 with split irqchip, emulated VT-d (interrupt remapping,
# caching mode) and two QEMU edu devices (one VM with two passthrough devices shares one DMA space),
# 4 GiB, one vCPU, serial console on stdio, no reboot.
#   vtd:  intel_iommu=on iommu=pt  (KVM, edu through vfio-pci, mtty)
#   mock: intel_iommu=off          (the iommufd selftest mock can only probe without another IOMMU
#                                   driver registered; KVM and mtty still work)
# Do not add x-scalable-mode=on to intel-iommu: edu DMA is then lost silently (QEMU 7.2).
set -euo pipefail
boot=$1
kernel=$2
initrd=$3
extra=${4:-}
case "$boot" in
vtd) iommu_args="intel_iommu=on iommu=pt" ;;
mock) iommu_args="intel_iommu=off" ;;
*)
    echo "run.sh: unknown boot '$boot' (vtd|mock)" >&2
    exit 2
    ;;
esac
# The watchdog (watch.py) reads the vCPU's registers through this monitor when the guest freezes.
monitor=()
[ -n "${TERN_LAB_MONITOR:-}" ] && monitor=(-monitor "unix:$TERN_LAB_MONITOR,server=on,wait=off")
exec qemu-system-x86_64 -accel tcg -machine q35,kernel-irqchip=split -cpu max -m 4096 -smp 1 \
    -device intel-iommu,intremap=on,caching-mode=on -device edu -device edu \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 quiet $iommu_args no_timer_check kvm_amd.nested=1 tern.lab.boot=$boot $extra" \
    -nographic -no-reboot "${monitor[@]}"
