//! The API server thread and its handler threads (tokio's blocking pool, which inherits this filter).
//! Handlers start migrations — the threads they start are intersected with this filter — so the list
//! includes the migration list.

use super::ioctl::{IoctlAllow, SET_NONBLOCKING};
use super::migration;

/// The API allow list (with [`super::base`] and [`super::base::spawn_syscalls`]).
pub(super) fn syscalls() -> Vec<i64> {
    let mut v = vec![
        // Binding the API socket (on the main thread, under this filter, before the server thread
        // starts): bound under a temporary name, made private, linked into place.
        libc::SYS_chmod,
        libc::SYS_fchmod,
        libc::SYS_link,
        libc::SYS_linkat,
        libc::SYS_rename,
        // The Unix socket: accepted connections, HTTP requests and responses.
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_read,
        libc::SYS_write,
        // tokio's reactor (epoll) and its waker (eventfd), timers.
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        // Non-blocking sockets.
        libc::SYS_fcntl,
        libc::SYS_ioctl,
    ];
    v.extend(migration::syscalls());
    v
}

/// The API threads' ioctls: the listener handed to tokio non-blocking, and the migration list.
pub(super) fn ioctls() -> Vec<IoctlAllow> {
    let mut v = vec![SET_NONBLOCKING];
    v.extend(migration::ioctls());
    v
}
