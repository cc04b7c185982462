//! Parameters of an outgoing migration (the `vm.send-migration` body, converted by the VMM).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::transport::MigrationUrl;

use super::error::MigrationError;

/// What to do when the timeout expires before the estimate fits the downtime limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutStrategy {
    /// Fail the migration; the source keeps running.
    Cancel,
    /// Switch over anyway, accepting a longer downtime.
    Ignore,
}

/// Knobs of one outgoing migration.
#[derive(Debug, Clone)]
pub struct SendParams {
    /// Where the destination listens.
    pub destination: MigrationUrl,
    /// Same host: hand guest memory over as fds (needs a `unix:` URL and memfd-backed memory).
    pub local: bool,
    /// Switch over once the expected downtime is at most this.
    pub downtime_ms: u64,
    /// Give up (or force switchover, see `timeout_strategy`) after this long.
    pub timeout: Duration,
    /// See [`TimeoutStrategy`].
    pub timeout_strategy: TimeoutStrategy,
    /// Aggregate send cap in megabits per second (1 Mbit = 125 000 bytes); 0 = unlimited.
    pub max_bandwidth_mbps: u64,
    /// Parallel connections for memory (≥ 1; the first also carries control frames).
    pub connections: u16,
    /// Throttle the vCPUs step by step when dirtying outruns the link.
    pub auto_converge: bool,
    /// GPA chunk claimed and sent as a unit (multiple of 4 KiB).
    pub chunk_bytes: u64,
    /// How long the destination may take no data (it stopped reading but kept the connection)
    /// or take to acknowledge Complete before the migration fails.
    pub ack_timeout: Duration,
    /// Check every page end to end: memory frames carry a sum per data page
    /// (`FLAG_PAGE_SUMS`, see `protocol::page_sum`); pages still move without a copy. Off:
    /// `FLAG_DATA_UNCHECKED` (the CRC covers header and entry table only).
    pub page_checksums: bool,
    /// Switch over only once the destination has loaded every device's initial pre-copy data
    /// (QEMU's `switchover-ack` capability). On by default.
    pub switchover_ack: bool,
}

impl SendParams {
    /// Defaults from the API: 300 ms downtime, 1 h timeout, cancel, unlimited, 1 connection.
    pub fn new(destination: MigrationUrl) -> Self {
        SendParams {
            destination,
            local: false,
            downtime_ms: 300,
            timeout: Duration::from_secs(3600),
            timeout_strategy: TimeoutStrategy::Cancel,
            max_bandwidth_mbps: 0,
            connections: 1,
            auto_converge: false,
            chunk_bytes: 64 << 20,
            ack_timeout: Duration::from_secs(60),
            page_checksums: true,
            switchover_ack: true,
        }
    }

    /// The cap in bytes per second (0 = unlimited).
    pub fn max_bandwidth_bytes_per_sec(&self) -> u64 {
        self.max_bandwidth_mbps.saturating_mul(125_000)
    }

    /// Reject inconsistent combinations before touching the VM.
    pub fn validate(&self) -> Result<(), MigrationError> {
        let bad = |reason: &str| {
            Err(MigrationError::InvalidParams {
                reason: reason.to_owned(),
            })
        };
        if self.connections == 0 {
            return bad("connections must be at least 1");
        }
        if self.connections > crate::protocol::MAX_CONNECTIONS {
            return bad("connections must be at most 128 (the protocol's limit)");
        }
        if self.local && !matches!(self.destination, MigrationUrl::Unix(_)) {
            return bad("local migration needs a unix: destination_url");
        }
        if self.local && self.connections != 1 {
            return bad("local migration uses exactly 1 connection");
        }
        if self.chunk_bytes == 0 || !self.chunk_bytes.is_multiple_of(crate::dirty::PAGE_SIZE) {
            return bad("chunk size must be a non-zero multiple of 4096");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix() -> MigrationUrl {
        MigrationUrl::Unix("/tmp/x".into())
    }

    #[test]
    fn validate_rejects_inconsistent_params() {
        let tcp = MigrationUrl::Tcp {
            host: "h".into(),
            port: 1,
        };
        let mut p = SendParams::new(tcp);
        p.validate().expect("defaults are valid");
        p.local = true;
        assert!(p.validate().is_err(), "local over tcp");
        let mut p = SendParams::new(unix());
        p.local = true;
        p.connections = 2;
        assert!(p.validate().is_err(), "local with 2 connections");
        let mut p = SendParams::new(unix());
        p.connections = 0;
        assert!(p.validate().is_err());
        let mut p = SendParams::new(unix());
        p.chunk_bytes = 1000;
        assert!(p.validate().is_err());
    }

    #[test]
    fn bandwidth_cap_is_megabits() {
        let mut p = SendParams::new(unix());
        p.max_bandwidth_mbps = 8;
        assert_eq!(p.max_bandwidth_bytes_per_sec(), 1_000_000);
    }
}
