//! vCPU threads: run KVM_RUN and emulate the device accesses that exit to tern. The smallest list:
//! a vCPU thread opens nothing, connects nowhere and starts no thread.

use super::ioctl::{IoctlAllow, KVM, VFIO_IOMMUFD};

/// The vCPU allow list (with [`super::base`]).
pub(super) fn syscalls() -> Vec<i64> {
    vec![
        // KVM_RUN and the vCPU's state ioctls; on guest PCI programming also KVM memory slots (BAR
        // moves), irqfd/ioeventfd and VFIO's SET_IRQS/region ioctls: see [`ioctls`].
        libc::SYS_ioctl,
        // Eventfd signals (interrupts, exits), the serial console (stdout or a file), VFIO config
        // space and BAR access through the device fd.
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        // Serial console to a file: position and flushing.
        libc::SYS_lseek,
        libc::SYS_fsync,
    ]
}

/// The vCPU's ioctls: KVM's and VFIO's (a guest programming a passed-through device's BARs or MSI
/// vectors reaches VFIO from the vCPU thread). No socket or terminal requests.
pub(super) fn ioctls() -> Vec<IoctlAllow> {
    vec![KVM, VFIO_IOMMUFD]
}
