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
use std::time::Duration;

use super::sockopt::set;

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
        super::super::sockopt::get(s, level, name).expect("getsockopt")
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
