//! TCP keepalive on every migration connection, so that a receiver learns that its peer is gone.
//!
//! During pre-copy a receiver only reads. If the link dies and the sender gives up meanwhile (its
//! stall limit closes the connection), no FIN or RST ever reaches the receiver: without keepalive
//! it waits on the half-open connection for ever, holding its listener and its half-built VM
//! (`scripts/netfaults` scenario a measured exactly that). With it, after `IDLE` without a byte
//! the kernel probes the peer every `INTERVAL`; `PROBES` unanswered probes fail the blocked read
//! with `ETIMEDOUT` (a probe that reaches a peer whose socket is gone gets an RST at once), so the
//! receive fails and cleans up by itself. A live peer's kernel answers the probes however long its
//! application is quiet, so a slow protocol phase is never taken for a dead peer.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Quiet time before the first probe.
pub const IDLE: Duration = Duration::from_secs(10);
/// Time between unanswered probes.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes after which the connection fails.
pub const PROBES: u32 = 4;

/// The longest a receiver waits on a dead peer: `IDLE + PROBES * INTERVAL`.
pub fn dead_peer_bound() -> Duration {
    IDLE + INTERVAL * PROBES
}

fn set(s: &TcpStream, level: libc::c_int, name: libc::c_int, value: u32) -> io::Result<()> {
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

/// Turns keepalive on with tern's timings.
pub(crate) fn enable(s: &TcpStream) -> io::Result<()> {
    let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    set(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(IDLE))?;
    set(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(INTERVAL))?;
    set(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, PROBES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(s: &TcpStream, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: as in `set`, with the kernel writing at most `len` bytes into `v`.
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
        assert_eq!(r, 0, "getsockopt: {}", io::Error::last_os_error());
        v
    }

    #[test]
    fn enable_sets_keepalive_and_its_timings() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        assert_eq!(
            get(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
            0,
            "off by default"
        );
        enable(&s).expect("enable");
        assert_eq!(get(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(&s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 10);
        assert_eq!(get(&s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 5);
        assert_eq!(get(&s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 4);
        assert_eq!(dead_peer_bound(), Duration::from_secs(30));
    }
}
