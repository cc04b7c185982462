//! The main thread once the VM, its threads and the API server are up (installed after it started
//! them, so its children do not inherit it): waits for the guest, a shutdown request or a finished
//! migration, and tears the VM down.

use super::device;
use super::ioctl::{IoctlAllow, KVM, VFIO_IOMMUFD};

/// The main thread's allow list (with [`super::base`] and [`super::base::spawn_syscalls`]).
pub(super) fn syscalls() -> Vec<i64> {
    let mut v = vec![
        // Waiting for an exit: epoll over the machine's exit eventfds and the controller's wake fd.
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_read,
        libc::SYS_poll,
        libc::SYS_ppoll,
        // Epoll and eventfd descriptors are created close-on-exec.
        libc::SYS_fcntl,
        // Tearing the VM down: vCPU fds, KVM/VFIO/iommufd cleanup ioctls; a VFIO device's drop
        // finds its group again through sysfs (the iommu_group link) — vfio-ioctls panics if it
        // cannot.
        libc::SYS_ioctl,
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_getdents64,
        libc::SYS_lseek,
        libc::SYS_getcwd,
        // Removing the API socket file at shutdown.
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        // Flushing the serial file.
        libc::SYS_fsync,
        libc::SYS_shutdown,
    ];
    // A VM received or resumed after this filter is installed may start its mock-DMA thread here.
    v.extend(device::syscalls());
    v
}

/// The main thread's ioctls: KVM, VFIO and iommufd teardown (and the helper it may start).
pub(super) fn ioctls() -> Vec<IoctlAllow> {
    let mut v = vec![KVM, VFIO_IOMMUFD];
    v.extend(device::ioctls());
    v
}
