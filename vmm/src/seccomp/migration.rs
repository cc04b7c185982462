//! Migration threads: the source engine thread (and the lane writer threads, peer watcher and
//! device-state thread it starts, which inherit this filter), the destination receiver (and its
//! data-lane and cancel-watch threads). The receiver builds the destination VM, so this list also
//! holds what building a VM needs; and both ends start vCPU/helper threads, whose own filters are
//! intersected with this one, so it includes their lists.

use super::ioctl::{IoctlAllow, SET_NONBLOCKING};
use super::{device, vcpu};

/// The migration allow list (with [`super::base`] and [`super::base::spawn_syscalls`]).
pub(super) fn syscalls() -> Vec<i64> {
    let mut v = vec![
        // Connections: unix and tcp, listen/accept on the destination, connect on the source,
        // socket options (TCP_NODELAY, buffer sizes), per-connection shutdown to wake blocked peers.
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_shutdown,
        // The stream itself: frames and page data; SCM_RIGHTS passes the memfd for local migration.
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        // Page data from the guest memory file straight to a unix socket (no copy).
        libc::SYS_sendfile,
        // Waiting on sockets and eventfds with a timeout.
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        // Descriptors: duplicating connections, close-on-exec/non-blocking flags.
        libc::SYS_fcntl,
        libc::SYS_dup,
        libc::SYS_dup3,
        // Guest memory: the memfd behind the RAM (created on the destination, mapped on both),
        // SEEK_DATA/SEEK_HOLE to skip never-touched ranges, punching holes.
        libc::SYS_memfd_create,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_lseek,
        // Opening /dev/kvm, VFIO/iommufd devices and sysfs paths for the destination VM and
        // /proc/self/pagemap; metadata of what was opened; unix socket files removed on cleanup.
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_getdents64,
        libc::SYS_getcwd,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        // Installing the vCPU kick signal handler when the destination VM is built.
        libc::SYS_rt_sigaction,
        // KVM (dirty log/ring, VM and vCPU state), VFIO migration (device feature/state), iommufd
        // dirty tracking, non-blocking sockets: see [`ioctls`].
        libc::SYS_ioctl,
        // Pinning down guest memory writes before they are sent (msync of the shared mapping).
        libc::SYS_msync,
        libc::SYS_fsync,
    ];
    v.extend(vcpu::syscalls());
    v.extend(device::syscalls());
    v
}

/// The migration threads' ioctls: the vCPU's and helper's (which they start), and switching
/// connections to non-blocking.
pub(super) fn ioctls() -> Vec<IoctlAllow> {
    let mut v = vec![SET_NONBLOCKING];
    v.extend(vcpu::ioctls());
    v.extend(device::ioctls());
    v
}
