//! Engine errors and the one place that renders an error chain as text (stats, Error frames).

use crate::dirty::{DirtyBitmapError, DirtySourceError};
use crate::protocol::ProtocolError;
use crate::transport::{SendFdError, TransportError};

use super::host::HostError;

/// Why a migration failed. Messages name the operation and the phase.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Parameters are inconsistent.
    #[error("invalid migration parameters: {reason}")]
    InvalidParams {
        /// What is wrong.
        reason: String,
    },
    /// Connecting, listening or socket setup failed.
    #[error("transport")]
    Transport(#[source] TransportError),
    /// Passing a memory fd failed.
    #[error("send memory fd")]
    SendFd(#[source] SendFdError),
    /// A frame could not be sent or received.
    #[error("protocol error while {during}")]
    Protocol {
        /// Phase.
        during: &'static str,
        /// Why.
        #[source]
        source: ProtocolError,
    },
    /// A VMM callback failed (its message names the operation).
    #[error(transparent)]
    Host(HostError),
    /// A dirty source failed; the migration stops so no dirty bit is lost.
    #[error("dirty tracking")]
    DirtySource(#[source] DirtySourceError),
    /// Internal bitmap bookkeeping failed.
    #[error("dirty bitmap")]
    Bitmap(#[source] DirtyBitmapError),
    /// Reading or writing guest memory failed.
    #[error("guest memory access at {gpa:#x}+{len_bytes:#x}")]
    GuestMemory {
        /// GPA.
        gpa: u64,
        /// Length.
        len_bytes: u64,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Streaming page bytes between guest memory and the connection failed (unchecked memory
    /// frames: the peer died, the stream ended early, or the write failed).
    #[error("{direction} page data for {gpa:#x}+{len_bytes:#x}")]
    PageData {
        /// "send" or "receive".
        direction: &'static str,
        /// GPA.
        gpa: u64,
        /// Length.
        len_bytes: u64,
        /// Why.
        #[source]
        source: vm_memory::VolatileMemoryError,
    },
    /// Pages whose last copy did not match its sum and that were never sent again: damaged on
    /// the way (a page the guest rewrote while it was sent is sent again and heals).
    #[error("{pages} received page(s) failed their checksum and were not resent (first at GPA {first_gpa:#x}): page data was damaged in transit")]
    PageSums {
        /// Pages still torn.
        pages: u64,
        /// GPA of the first one.
        first_gpa: u64,
    },
    /// The peer sent an Error frame.
    #[error("{peer} reported: {reason}")]
    PeerError {
        /// "destination" or "source".
        peer: &'static str,
        /// Its reason text.
        reason: String,
    },
    /// The peer closed the connection or stopped answering.
    #[error("{peer} went away while {during}: {detail}")]
    PeerGone {
        /// "destination" or "source".
        peer: &'static str,
        /// Phase.
        during: &'static str,
        /// What was observed.
        detail: String,
    },
    /// A device whose own state migrates failed.
    #[error("device {id}")]
    Device {
        /// The device's id.
        id: String,
        /// What failed.
        #[source]
        source: super::host::HostError,
    },
    /// A peer named a device this migration does not have.
    #[error("the {peer} named device {id:?}, which this migration does not have")]
    UnknownDevice {
        /// "source" or "destination".
        peer: &'static str,
        /// The id it sent.
        id: String,
    },
    /// A device's state did not arrive in full.
    #[error("device {id}: its state stream did not arrive in full ({detail})")]
    DeviceStateMissing {
        /// The device's id.
        id: String,
        /// What is missing.
        detail: &'static str,
    },
    /// The link died at the switchover's undecidable point: this side cannot know whether the
    /// other runs the VM, so its VM stays paused until the operator resumes it on one side.
    #[error("in doubt after the switchover ({detail}): the VM stays paused here until the operator resumes it on one side")]
    InDoubt {
        /// What was lost, and when.
        detail: String,
        /// On the destination: the received VM, held paused for the operator's decision.
        held: Option<Box<super::in_doubt::InDoubtVm>>,
    },
    /// A frame arrived that this phase does not allow.
    #[error("unexpected {frame} frame while {during}")]
    Unexpected {
        /// Frame type.
        frame: &'static str,
        /// Phase.
        during: &'static str,
    },
    /// Cancelled by the user.
    #[error("migration cancelled")]
    Cancelled,
    /// The timeout expired with the `cancel` strategy.
    #[error("migration timed out after {elapsed_s} s (expected downtime {expected_downtime_ms} ms > limit {downtime_ms} ms)")]
    Timeout {
        /// Seconds elapsed.
        elapsed_s: u64,
        /// Last estimate.
        expected_downtime_ms: u64,
        /// Limit.
        downtime_ms: u64,
    },
    /// Local mode needs file-backed guest memory.
    #[error(
        "local migration needs file-backed (memfd) guest memory; region at {gpa:#x} is anonymous"
    )]
    AnonymousMemory {
        /// Region base.
        gpa: u64,
    },
    /// A connection belongs to another session or has a bad index.
    #[error("connection {index} has session {got:#x}, expected {expected:#x}")]
    Session {
        /// Connection index.
        index: u16,
        /// Session id received.
        got: u64,
        /// Session id of connection 0.
        expected: u64,
    },
    /// A data connection failed.
    #[error("data connection {index}")]
    Lane {
        /// Connection index.
        index: usize,
        /// Why.
        #[source]
        source: Box<MigrationError>,
    },
    /// An engine thread panicked (a bug).
    #[error("migration thread panicked")]
    Panicked,
}

/// `e: cause: cause…` on one line, for stats, logs and Error frames.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_joins_sources() {
        let e = MigrationError::Protocol {
            during: "receiving memory",
            source: ProtocolError::Truncated {
                what: "frame payload",
                got: 3,
                want: 9,
            },
        };
        assert_eq!(
            error_chain(&e),
            "protocol error while receiving memory: stream truncated in frame payload: got 3 of 9 bytes"
        );
    }
}
