//! Integer socket options, the one place the transports call `setsockopt`/`getsockopt`, and the
//! send buffer of a Unix migration socket.
//!
//! A Unix stream socket queues a writer's data on the reader's side but charges it to the
//! writer's send buffer, 208 KiB by default (`net.core.wmem_default`): a writer pushing a 4 MiB
//! memory frame fills it twenty times over and sleeps until the reader drains it, so the two
//! threads hand the CPU back and forth instead of both running (the reader also pauses between
//! reads to check page sums). One frame's worth of buffer lets them overlap: measured on one
//! connection over loopback, 512 MiB, page sums on, 0.57-0.77 of a raw socket copy with the
//! default, 0.84-0.98 with 1-4 MiB (`cargo bench -p tern-migration --bench throughput`, where the
//! raw copy gets the same buffer). TCP is left to the kernel's send-buffer autotuning, which a
//! fixed `SO_SNDBUF` would switch off.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// Send buffer asked for on a Unix migration socket: one full memory frame. The kernel caps it
/// at `net.core.wmem_max` (an unprivileged process cannot go beyond).
pub const UNIX_SEND_BUFFER: usize = 4 << 20;

/// Sets an integer socket option.
pub(crate) fn set(
    s: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: u32,
) -> io::Result<()> {
    let value = libc::c_int::try_from(value)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket option out of range"))?;
    // SAFETY: `s` owns an open socket for the duration of the call; the option value is a c_int
    // on the stack whose size is passed with it, and the kernel only reads it.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads an integer socket option.
pub(crate) fn get(
    s: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `s` owns an open socket for the duration of the call; the kernel writes at most
    // `len` bytes (one c_int) into `v` and updates `len`.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            name,
            std::ptr::from_mut(&mut v).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Gives the writing end of a Unix migration socket [`UNIX_SEND_BUFFER`] (as far as
/// `net.core.wmem_max` allows); returns the buffer the kernel granted, in bytes (it counts its
/// bookkeeping too and reports double the payload room).
pub fn enlarge_unix_send_buffer(s: &UnixStream) -> io::Result<usize> {
    // UNIX_SEND_BUFFER fits a c_int.
    set(
        s,
        libc::SOL_SOCKET,
        libc::SO_SNDBUF,
        UNIX_SEND_BUFFER as u32,
    )?;
    let granted = get(s, libc::SOL_SOCKET, libc::SO_SNDBUF)?;
    Ok(usize::try_from(granted).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_cap() -> usize {
        std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .expect("wmem_max")
            .trim()
            .parse()
            .expect("number")
    }

    fn send_buffer(s: &UnixStream) -> usize {
        get(s, libc::SOL_SOCKET, libc::SO_SNDBUF).expect("get") as usize
    }

    #[test]
    fn unix_send_buffer_grows_up_to_the_host_cap() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let granted = enlarge_unix_send_buffer(&a).expect("enlarge");
        // The kernel doubles what it grants (payload plus bookkeeping), capped at wmem_max.
        assert_eq!(granted, 2 * UNIX_SEND_BUFFER.min(host_cap()));
        assert_eq!(send_buffer(&a), granted);
    }

    #[test]
    fn a_unix_migration_connection_has_the_enlarged_send_buffer() {
        use crate::transport::{Connection, MigrationListener, MigrationUrl};
        let path = std::env::temp_dir().join(format!("tern-sockopt-{}.sock", std::process::id()));
        let l = MigrationListener::bind(&MigrationUrl::Unix(path)).expect("bind");
        let c = Connection::connect(l.url()).expect("connect");
        let Connection::Unix(s) = &c else {
            panic!("a unix url gives a unix connection")
        };
        assert_eq!(send_buffer(s), 2 * UNIX_SEND_BUFFER.min(host_cap()));
    }
}
