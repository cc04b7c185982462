//! Devices whose own state moves with the VM (VFIO migration v2), as the engine drives them. The
//! VMM hands the engine one [`DeviceStateSource`] per such device on the source and one
//! [`DeviceStateSink`] per device on the destination; the engine owns the order of their state
//! changes, streams their data as device frames, and brings them back after a failure.
//!
//! ```text
//!  source:      start (RUNNING → PRE_COPY) ─► read pre-copy data between memory passes ─►
//!               [pause vCPUs] ─► quiesce_p2p (all, when several devices) ─► stop_copy (all) ─►
//!               final DMA claim ─► read to end of stream ─► finish (STOP)
//!               failure anywhere: recover (RUNNING; reset when it cannot walk back)
//!  destination: begin (RESUMING) ─► write each piece ─► end (STOP: the kernel checks the state)
//!               ─► run_p2p (all, when several devices) ─► run (RUNNING) ─► vCPUs start
//!               failure anywhere: recover (reset), no VM runs
//! ```

use serde::{Deserialize, Serialize};

use super::host::HostError;

/// Bytes of device data one read may return and one frame carries (QEMU uses the same 1 MiB).
pub const DEVICE_CHUNK_BYTES: usize = 1 << 20;

/// What a device still has to move, as its driver reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePending {
    /// Pre-copy bytes the destination needs before it can switch over
    /// (`VFIO_MIG_GET_PRECOPY_INFO.initial_bytes`); 0 without pre-copy.
    pub initial_bytes: u64,
    /// Pre-copy bytes that changed since they were read (`dirty_bytes`).
    pub dirty_bytes: u64,
    /// What STOP_COPY would produce now (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`).
    pub stop_copy_bytes: u64,
}

/// How a read of device data ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceReadEnd {
    /// The chunk is full; the stream has more now.
    ChunkFull,
    /// Pre-copy has nothing more right now.
    NoDataNow,
    /// STOP_COPY reached the end of the stream: the whole state was read.
    EndOfStream,
}

/// One device on the source.
pub trait DeviceStateSource: Send {
    /// The device's id (the destination maps it to one of its devices).
    fn id(&self) -> &str;
    /// The device streams state during pre-copy (PRE_COPY).
    fn has_precopy(&self) -> bool;
    /// The device has the P2P states (RUNNING_P2P, PRE_COPY_P2P).
    fn has_p2p(&self) -> bool;
    /// Migration start: enter PRE_COPY (nothing without pre-copy).
    fn start(&mut self) -> Result<(), HostError>;
    /// What is left to move.
    fn pending(&mut self) -> Result<DevicePending, HostError>;
    /// Appends the data available now to `chunk`, up to [`DEVICE_CHUNK_BYTES`] in all.
    fn read_chunk(&mut self, chunk: &mut Vec<u8>) -> Result<DeviceReadEnd, HostError>;
    /// Switchover, first step when several devices migrate: stop initiating peer-to-peer DMA
    /// (RUNNING_P2P or PRE_COPY_P2P).
    fn quiesce_p2p(&mut self) -> Result<(), HostError>;
    /// Switchover: STOP_COPY (the device stops; its final state becomes readable).
    fn stop_copy(&mut self) -> Result<(), HostError>;
    /// After a failed or cancelled migration: back to RUNNING, by reset when it cannot walk back.
    /// Returns whether the device was reset.
    fn recover(&mut self) -> Result<bool, HostError>;
    /// After the destination took over: STOP.
    fn finish(&mut self) -> Result<(), HostError>;
}

/// One device on the destination, matched to a source device by id.
pub trait DeviceStateSink: Send {
    /// The id the source knows the device by.
    fn id(&self) -> &str;
    /// Enter RESUMING, ready for data.
    fn begin(&mut self) -> Result<(), HostError>;
    /// Load the next piece of the source device's stream.
    fn write(&mut self, data: &[u8]) -> Result<(), HostError>;
    /// The stream is complete: leave RESUMING (the driver validates the state here).
    fn end(&mut self) -> Result<(), HostError>;
    /// Start, first step when several devices migrate: RUNNING_P2P.
    fn run_p2p(&mut self) -> Result<(), HostError>;
    /// Start: RUNNING.
    fn run(&mut self) -> Result<(), HostError>;
    /// After a failure: reset the device (nothing partial stays loaded). Returns whether it was
    /// reset.
    fn recover(&mut self) -> Result<bool, HostError>;
}

/// Per-device migration figures for the stats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMigrationRecord {
    pub id: String,
    /// Bytes read during pre-copy.
    pub precopy_bytes: u64,
    /// Bytes read after STOP_COPY.
    pub stop_copy_bytes: u64,
    /// Time in the device's STOP_COPY arc and the reads of its final state, in microseconds (the
    /// final memory pass in between is not counted).
    pub stop_copy_us: u64,
    /// The destination acknowledged loading the initial pre-copy data (switchover-ack).
    pub initial_data_acked: bool,
    /// The switchover went through the P2P states.
    pub p2p: bool,
    /// The device had to be reset to get back to RUNNING after a failure.
    pub reset: bool,
    /// Local mode (live update): the device's descriptors went to the new process, which runs it
    /// as it was (no state read, no reset).
    #[serde(default)]
    pub handed_over: bool,
    /// What became of the device's DMA pinning accounting in a live update, if worth saying.
    #[serde(default)]
    pub handover_note: Option<String>,
}
