//! One device's side of a VFIO migration: a handle that tracks the device's migration state,
//! moves it arc by arc, owns the data fd the kernel opens for a save or resume stream, streams
//! that fd into a [`Write`] (saving) or from a [`Read`] (RESUMING) through one fixed chunk buffer,
//! and brings a failed device back to RUNNING.
//!
//! ```text
//!  source:       RUNNING ─► PRE_COPY ─► read_data (initial bytes, then dirty bytes) ... ─►
//!                (─► PRE_COPY_P2P) ─► STOP_COPY ─► read_data to end of stream ─► STOP ─► ...
//!  destination:  RUNNING ─► ... ─► RESUMING ─► write_data / write_chunk ─► STOP ─► ... ─► RUNNING
//!  fault:        a failed arc re-reads the device's state; recover(): RUNNING by arcs, or
//!                VFIO_DEVICE_RESET from ERROR or RESUMING (a partial or corrupt stream is never
//!                loaded) or when walking fails
//! ```
//!
//! The kernel returns a data fd when a stream starts (RUNNING → PRE_COPY, STOP → STOP_COPY,
//! STOP → RESUMING). Arcs within one saving session may return none: mtty answers `data_fd = -1`
//! for PRE_COPY_P2P → STOP_COPY and the pre-copy fd carries the rest. The handle keeps the fd
//! while the device stays in a data state and closes it when it leaves them.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm_sys_util::errno;

use super::caps::MigrationCaps;
use super::ops::{MigrationOps, PrecopyInfo};
use super::state::{check_arc, path, MigState, StateError};

/// Bytes moved per read or write of the data fd (QEMU uses the same 1 MiB for mlx5). The whole
/// state is never held: each chunk goes on before the next is read.
pub const CHUNK: usize = 1 << 20;

/// How a [`DeviceMigration::read_data`] call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ReadEnd {
    /// STOP_COPY reached the end of the stream: the whole device state was read.
    EndOfStream,
    /// PRE_COPY has nothing more right now (read returned 0 or ENOMSG); more may come later.
    NoDataNow,
    /// The caller's byte budget is spent; the stream has more.
    Budget,
}

/// What one [`DeviceMigration::read_data`] call moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DataRead {
    pub bytes: u64,
    pub end: ReadEnd,
}

/// How [`DeviceMigration::recover`] brought the device back to RUNNING.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Recovery {
    AlreadyRunning,
    /// Walked these arcs.
    Walked(Vec<MigState>),
    /// VFIO_DEVICE_RESET.
    Reset,
}

/// Per-device numbers of one migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeviceMigrationStats {
    /// Read in PRE_COPY / PRE_COPY_P2P.
    pub precopy_bytes: u64,
    /// Read in STOP_COPY.
    pub stop_copy_bytes: u64,
    /// Written in RESUMING.
    pub resumed_bytes: u64,
    /// Time spent in STOP_COPY, including the current stay.
    pub stop_copy_us: u64,
    /// VFIO_DEVICE_RESETs issued through this handle.
    pub resets: u32,
}

/// A state as read back from the kernel after a failure, or unknown when that read failed too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported(pub Option<MigState>);

impl fmt::Display for Reported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => write!(f, "{s}"),
            None => f.write_str("an unknown state (reading it failed)"),
        }
    }
}

/// Errors of a device's migration, each naming the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceMigrationError {
    #[error("device {id}: VFIO_DEVICE_FEATURE_MIGRATION failed")]
    Probe {
        id: String,
        #[source]
        source: errno::Error,
    },
    #[error("device {id} does not implement VFIO migration v2 with STOP_COPY (flags {flags:?})")]
    NotMigratable { id: String, flags: Option<u64> },
    #[error("device {id}: reading its migration state failed")]
    GetState {
        id: String,
        #[source]
        source: errno::Error,
    },
    #[error("device {id}: the kernel reports migration state {raw}, which tern does not know")]
    UnknownState { id: String, raw: u32 },
    #[error("device {id}: refusing {from} -> {to}")]
    Path {
        id: String,
        from: MigState,
        to: MigState,
        #[source]
        source: StateError,
    },
    #[error("device {id}: migration arc {from} -> {to} (on the way to {target}) failed; the device is now in {now}")]
    Arc {
        id: String,
        from: MigState,
        to: MigState,
        target: MigState,
        now: Reported,
        #[source]
        source: errno::Error,
    },
    #[error("device {id}: the kernel opened no data stream for {from} -> {to}")]
    NoDataFd {
        id: String,
        from: MigState,
        to: MigState,
    },
    #[error("device {id}: no data stream is open in {state}")]
    NoStream { id: String, state: MigState },
    #[error("device {id}: {op} needs {needed}, but the device is in {state}")]
    WrongState {
        id: String,
        op: &'static str,
        needed: &'static str,
        state: MigState,
    },
    #[error("device {id}: reading device data in {state} failed after {bytes} bytes")]
    DataRead {
        id: String,
        state: MigState,
        bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error("device {id}: the receiver of device data read in {state} failed after {bytes} bytes")]
    Sink {
        id: String,
        state: MigState,
        bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "device {id}: the device refused data written in {state} after accepting {bytes} bytes"
    )]
    DataWrite {
        id: String,
        state: MigState,
        bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error("device {id}: the source of device data for {state} failed after {bytes} bytes")]
    Source {
        id: String,
        state: MigState,
        bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error("device {id}: {op} failed in {state}")]
    Kernel {
        id: String,
        op: &'static str,
        state: MigState,
        #[source]
        source: errno::Error,
    },
    #[error("device {id}: VFIO_DEVICE_RESET failed (the device was in {state})")]
    Reset {
        id: String,
        state: MigState,
        #[source]
        source: errno::Error,
    },
    #[error("device {id}: after VFIO_DEVICE_RESET the device is in {now}, not RUNNING")]
    ResetNotRunning { id: String, now: MigState },
}

impl DeviceMigrationError {
    /// The OS error behind a kernel, data-fd or peer failure, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Probe { source, .. }
            | Self::GetState { source, .. }
            | Self::Arc { source, .. }
            | Self::Kernel { source, .. }
            | Self::Reset { source, .. } => Some(source.errno()),
            Self::DataRead { source, .. }
            | Self::Sink { source, .. }
            | Self::DataWrite { source, .. }
            | Self::Source { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// The migration handle of one device.
pub struct DeviceMigration<D: MigrationOps> {
    id: String,
    device: D,
    caps: MigrationCaps,
    state: MigState,
    data: Option<File>,
    buf: Vec<u8>,
    stats: DeviceMigrationStats,
    stop_copy_since: Option<Instant>,
    stop_copy_time: Duration,
}

impl<D: MigrationOps> fmt::Debug for DeviceMigration<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceMigration")
            .field("id", &self.id)
            .field("caps", &self.caps)
            .field("state", &self.state)
            .field("data", &self.data)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Which side of a copy failed.
#[derive(Debug)]
enum PumpError {
    Read { bytes: u64, source: io::Error },
    Write { bytes: u64, source: io::Error },
}

/// Copies `src` into `dst` through `buf` until `src` has nothing more or `budget` bytes moved.
/// In pre-copy a read of 0 or ENOMSG means "nothing right now", otherwise 0 is the end.
fn pump<R: Read + ?Sized, W: Write + ?Sized>(
    src: &mut R,
    dst: &mut W,
    buf: &mut [u8],
    precopy: bool,
    budget: Option<u64>,
) -> Result<DataRead, PumpError> {
    let quiet = if precopy {
        ReadEnd::NoDataNow
    } else {
        ReadEnd::EndOfStream
    };
    let mut bytes = 0u64;
    loop {
        let want = match budget {
            Some(b) if bytes >= b => {
                return Ok(DataRead {
                    bytes,
                    end: ReadEnd::Budget,
                })
            }
            Some(b) => buf
                .len()
                .min(usize::try_from(b - bytes).unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        let n = match src.read(&mut buf[..want]) {
            Ok(0) => return Ok(DataRead { bytes, end: quiet }),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if precopy && e.raw_os_error() == Some(libc::ENOMSG) => {
                return Ok(DataRead {
                    bytes,
                    end: ReadEnd::NoDataNow,
                })
            }
            Err(source) => return Err(PumpError::Read { bytes, source }),
        };
        dst.write_all(&buf[..n])
            .map_err(|source| PumpError::Write { bytes, source })?;
        bytes += n as u64;
    }
}

/// Writes all of `chunk` to `dst`, counting into `accepted` exactly what `dst` took.
fn write_counted<W: Write + ?Sized>(
    dst: &mut W,
    mut chunk: &[u8],
    accepted: &mut u64,
) -> io::Result<()> {
    while !chunk.is_empty() {
        match dst.write(chunk) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                chunk = &chunk[n..];
                *accepted += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl<D: MigrationOps> DeviceMigration<D> {
    /// Probes `device`'s migration capabilities and reads its current state. `id` is the name
    /// every error and log line carries (the `--device id=`).
    pub fn new(id: impl Into<String>, device: D) -> Result<Self, DeviceMigrationError> {
        let id = id.into();
        let flags = device
            .migration_flags()
            .map_err(|source| DeviceMigrationError::Probe {
                id: id.clone(),
                source,
            })?;
        let caps = flags
            .map(MigrationCaps::from_flags)
            .filter(|c| c.stop_copy)
            .ok_or_else(|| DeviceMigrationError::NotMigratable {
                id: id.clone(),
                flags,
            })?;
        let mut handle = Self {
            id,
            device,
            caps,
            state: MigState::Running,
            data: None,
            // Allocated now, not on the first read: that may be in STOP_COPY, inside the
            // downtime. Zeroed allocation maps pages lazily; writing 1 MiB of zeros took ~30 ms
            // under the lab's TCG.
            buf: vec![0; CHUNK],
            stats: DeviceMigrationStats::default(),
            stop_copy_since: None,
            stop_copy_time: Duration::ZERO,
        };
        handle.refresh_state()?;
        Ok(handle)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn caps(&self) -> MigrationCaps {
        self.caps
    }

    /// The state tern last set or read back.
    pub fn state(&self) -> MigState {
        self.state
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// Whether a data stream is open.
    pub fn has_data_fd(&self) -> bool {
        self.data.is_some()
    }

    pub fn stats(&self) -> DeviceMigrationStats {
        let ongoing = self.stop_copy_since.map_or(Duration::ZERO, |t| t.elapsed());
        DeviceMigrationStats {
            stop_copy_us: u64::try_from((self.stop_copy_time + ongoing).as_micros())
                .unwrap_or(u64::MAX),
            ..self.stats
        }
    }

    /// Whether this handle ever reset the device.
    pub fn was_reset(&self) -> bool {
        self.stats.resets > 0
    }

    /// Records that the device is now in `state`: STOP_COPY time and the data fd follow.
    fn entered(&mut self, state: MigState) {
        match (self.stop_copy_since, state == MigState::StopCopy) {
            (None, true) => self.stop_copy_since = Some(Instant::now()),
            (Some(t), false) => {
                self.stop_copy_time += t.elapsed();
                self.stop_copy_since = None;
            }
            _ => {}
        }
        if !state.has_data_stream() {
            self.data = None;
        }
        self.state = state;
    }

    /// Asks the kernel for the device's state and records it.
    pub fn refresh_state(&mut self) -> Result<MigState, DeviceMigrationError> {
        let raw = self
            .device
            .device_state()
            .map_err(|source| DeviceMigrationError::GetState {
                id: self.id.clone(),
                source,
            })?;
        let state = MigState::from_raw(raw).ok_or_else(|| DeviceMigrationError::UnknownState {
            id: self.id.clone(),
            raw,
        })?;
        self.entered(state);
        Ok(state)
    }

    /// Moves the device to `target` one kernel arc at a time, along [`path`]; returns the states
    /// entered. On a failed arc the device's state is read back (the error says where it is).
    pub fn transition_to(
        &mut self,
        target: MigState,
    ) -> Result<Vec<MigState>, DeviceMigrationError> {
        let states =
            path(self.state, target, self.caps).map_err(|source| DeviceMigrationError::Path {
                id: self.id.clone(),
                from: self.state,
                to: target,
                source,
            })?;
        for &next in &states {
            self.arc(next, target)?;
        }
        Ok(states)
    }

    fn arc(&mut self, next: MigState, target: MigState) -> Result<(), DeviceMigrationError> {
        let from = self.state;
        check_arc(from, next, self.caps).map_err(|source| DeviceMigrationError::Path {
            id: self.id.clone(),
            from,
            to: next,
            source,
        })?;
        match self.device.set_device_state(next) {
            Ok(fd) => {
                self.entered(next);
                match fd {
                    Some(f) if next.has_data_stream() => self.data = Some(f),
                    // A stream for a state without one would be a driver bug; close it.
                    Some(_) => {}
                    None if next.has_data_stream() && self.data.is_none() => {
                        return Err(DeviceMigrationError::NoDataFd {
                            id: self.id.clone(),
                            from,
                            to: next,
                        })
                    }
                    None => {}
                }
                log::debug!("vfio device {}: migration arc {from} -> {next}", self.id);
                Ok(())
            }
            Err(source) => {
                let now = self.refresh_state().ok();
                log::warn!(
                    "vfio device {}: migration arc {from} -> {next} failed ({source}); now in {}",
                    self.id,
                    Reported(now)
                );
                Err(DeviceMigrationError::Arc {
                    id: self.id.clone(),
                    from,
                    to: next,
                    target,
                    now: Reported(now),
                    source,
                })
            }
        }
    }

    fn require(
        &self,
        ok: bool,
        op: &'static str,
        needed: &'static str,
    ) -> Result<(), DeviceMigrationError> {
        if ok {
            Ok(())
        } else {
            Err(DeviceMigrationError::WrongState {
                id: self.id.clone(),
                op,
                needed,
                state: self.state,
            })
        }
    }

    /// `VFIO_MIG_GET_PRECOPY_INFO`: initial and dirty bytes not read yet (PRE_COPY states only).
    pub fn precopy_info(&self) -> Result<PrecopyInfo, DeviceMigrationError> {
        const OP: &str = "VFIO_MIG_GET_PRECOPY_INFO";
        self.require(self.state.is_precopy(), OP, "PRE_COPY or PRE_COPY_P2P")?;
        let data = self.data.as_ref().ok_or(DeviceMigrationError::NoStream {
            id: self.id.clone(),
            state: self.state,
        })?;
        self.device
            .precopy_info(data)
            .map_err(|source| DeviceMigrationError::Kernel {
                id: self.id.clone(),
                op: OP,
                state: self.state,
                source,
            })
    }

    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: the driver's estimate of the STOP_COPY stream.
    pub fn stop_copy_size(&self) -> Result<u64, DeviceMigrationError> {
        self.device
            .stop_copy_size()
            .map_err(|source| DeviceMigrationError::Kernel {
                id: self.id.clone(),
                op: "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE",
                state: self.state,
                source,
            })
    }

    /// Streams device data into `out` until the stream's end (STOP_COPY) or until there is
    /// nothing more for now (PRE_COPY states).
    pub fn read_data<W: Write + ?Sized>(
        &mut self,
        out: &mut W,
    ) -> Result<DataRead, DeviceMigrationError> {
        self.read_data_budget(out, None)
    }

    /// [`Self::read_data`] that stops once `budget` bytes moved, if given (to interleave several
    /// devices, or a device that keeps dirtying its state in PRE_COPY, with other traffic).
    pub fn read_data_budget<W: Write + ?Sized>(
        &mut self,
        out: &mut W,
        budget: Option<u64>,
    ) -> Result<DataRead, DeviceMigrationError> {
        self.require(
            self.state.is_saving(),
            "reading device data",
            "PRE_COPY, PRE_COPY_P2P or STOP_COPY",
        )?;
        let state = self.state;
        let Some(data) = self.data.as_mut() else {
            return Err(DeviceMigrationError::NoStream {
                id: self.id.clone(),
                state,
            });
        };
        let result = pump(data, out, &mut self.buf, state.is_precopy(), budget);
        let moved = match &result {
            Ok(r) => r.bytes,
            Err(PumpError::Read { bytes, .. } | PumpError::Write { bytes, .. }) => *bytes,
        };
        if state.is_precopy() {
            self.stats.precopy_bytes += moved;
        } else {
            self.stats.stop_copy_bytes += moved;
        }
        let id = || self.id.clone();
        result.map_err(|e| match e {
            PumpError::Read { bytes, source } => DeviceMigrationError::DataRead {
                id: id(),
                state,
                bytes,
                source,
            },
            PumpError::Write { bytes, source } => DeviceMigrationError::Sink {
                id: id(),
                state,
                bytes,
                source,
            },
        })
    }

    /// Streams everything `input` yields into the device (RESUMING); returns the bytes written.
    pub fn write_data<R: Read + ?Sized>(
        &mut self,
        input: &mut R,
    ) -> Result<u64, DeviceMigrationError> {
        self.require_resuming()?;
        // Errors count the whole stream's accepted bytes, this call's and earlier chunks'.
        let before = self.stats.resumed_bytes;
        let mut accepted = before;
        let result = loop {
            let n = match input.read(&mut self.buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    break Err(DeviceMigrationError::Source {
                        id: self.id.clone(),
                        state: self.state,
                        bytes: accepted,
                        source,
                    })
                }
            };
            let Some(data) = self.data.as_mut() else {
                break Err(DeviceMigrationError::NoStream {
                    id: self.id.clone(),
                    state: self.state,
                });
            };
            if let Err(source) = write_counted(data, &self.buf[..n], &mut accepted) {
                break Err(DeviceMigrationError::DataWrite {
                    id: self.id.clone(),
                    state: self.state,
                    bytes: accepted,
                    source,
                });
            }
        };
        self.stats.resumed_bytes = accepted;
        result.map(|()| accepted - before)
    }

    /// Writes one chunk of device data (RESUMING), e.g. a frame's payload as it arrives.
    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), DeviceMigrationError> {
        self.require_resuming()?;
        let state = self.state;
        let Some(data) = self.data.as_mut() else {
            return Err(DeviceMigrationError::NoStream {
                id: self.id.clone(),
                state,
            });
        };
        let mut accepted = self.stats.resumed_bytes;
        let result = write_counted(data, chunk, &mut accepted);
        self.stats.resumed_bytes = accepted;
        result.map_err(|source| DeviceMigrationError::DataWrite {
            id: self.id.clone(),
            state,
            bytes: self.stats.resumed_bytes,
            source,
        })
    }

    fn require_resuming(&self) -> Result<(), DeviceMigrationError> {
        self.require(
            self.state == MigState::Resuming,
            "writing device data",
            "RESUMING",
        )
    }

    /// `VFIO_DEVICE_RESET`: closes the data stream, resets the device and checks that it is back
    /// in RUNNING. Counted in [`DeviceMigrationStats::resets`].
    pub fn reset(&mut self) -> Result<(), DeviceMigrationError> {
        let before = self.state;
        self.data = None;
        self.device
            .reset()
            .map_err(|source| DeviceMigrationError::Reset {
                id: self.id.clone(),
                state: before,
                source,
            })?;
        self.stats.resets += 1;
        let now = self.refresh_state()?;
        if now != MigState::Running {
            return Err(DeviceMigrationError::ResetNotRunning {
                id: self.id.clone(),
                now,
            });
        }
        log::warn!(
            "vfio device {}: reset from {before}, back in RUNNING",
            self.id
        );
        Ok(())
    }

    /// Brings the device back to RUNNING after a failure, whatever the handle last knew: reads
    /// the state, then resets from ERROR, from RESUMING (a partial or corrupt stream must not be
    /// loaded) or when the state cannot be read; otherwise walks the arcs to RUNNING and resets
    /// if one fails.
    pub fn recover(&mut self) -> Result<Recovery, DeviceMigrationError> {
        match self.refresh_state() {
            Ok(MigState::Running) => Ok(Recovery::AlreadyRunning),
            Ok(MigState::Error | MigState::Resuming) => self.reset().map(|()| Recovery::Reset),
            Ok(_) => match self.transition_to(MigState::Running) {
                Ok(states) => Ok(Recovery::Walked(states)),
                Err(e) => {
                    log::warn!(
                        "vfio device {}: cannot walk back to RUNNING ({e}); resetting",
                        self.id
                    );
                    self.reset().map(|()| Recovery::Reset)
                }
            },
            Err(e) => {
                log::warn!("vfio device {}: {e}; resetting", self.id);
                self.reset().map(|()| Recovery::Reset)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Seek;

    use super::super::fake::{Failure, Fake};
    use super::MigState::*;
    use super::*;

    fn mtty_like() -> DeviceMigration<Fake> {
        let fake = Fake::new(vec![0xa5; 24], (0..72u8).collect());
        DeviceMigration::new("mtty0", fake).expect("migratable")
    }

    #[test]
    fn precopy_then_stop_copy_walks_single_arcs_and_keeps_the_precopy_fd() {
        let mut dev = mtty_like();
        assert_eq!(dev.caps(), MigrationCaps::ALL);
        assert_eq!(dev.stop_copy_size().unwrap(), 96);
        assert_eq!(dev.transition_to(PreCopy).unwrap(), [PreCopy]);
        assert_eq!(dev.precopy_info().unwrap().initial_bytes, 24);
        let mut wire = Vec::new();
        let r = dev.read_data(&mut wire).unwrap();
        assert_eq!((r.bytes, r.end), (24, ReadEnd::NoDataNow));
        assert_eq!(dev.precopy_info().unwrap().initial_bytes, 0);

        assert_eq!(dev.transition_to(StopCopy).unwrap(), [PreCopyP2p, StopCopy]);
        assert!(dev.has_data_fd(), "the pre-copy fd carries the rest");
        let r = dev.read_data(&mut wire).unwrap();
        assert_eq!((r.bytes, r.end), (72, ReadEnd::EndOfStream));
        assert_eq!(wire.len(), 96);
        assert_eq!(&wire[24..], (0..72u8).collect::<Vec<_>>());

        assert_eq!(
            dev.transition_to(Running).unwrap(),
            [Stop, RunningP2p, Running]
        );
        assert!(!dev.has_data_fd());
        assert_eq!(
            dev.device().st().arcs,
            [
                (Running, PreCopy),
                (PreCopy, PreCopyP2p),
                (PreCopyP2p, StopCopy),
                (StopCopy, Stop),
                (Stop, RunningP2p),
                (RunningP2p, Running)
            ]
        );
        let stats = dev.stats();
        assert_eq!((stats.precopy_bytes, stats.stop_copy_bytes), (24, 72));
        assert_eq!(stats.resets, 0);
    }

    #[test]
    fn a_state_far_larger_than_the_chunk_streams_both_ways() {
        let body: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i * 7 % 251) as u8).collect();
        let mut src = DeviceMigration::new("big", Fake::new(Vec::new(), body.clone())).unwrap();
        src.transition_to(StopCopy).unwrap();
        let mut wire = Vec::new();
        let r = src.read_data(&mut wire).unwrap();
        assert_eq!(r.bytes, body.len() as u64);
        assert_eq!(wire, body);

        let mut dst = DeviceMigration::new("big-dst", Fake::new(Vec::new(), Vec::new())).unwrap();
        assert_eq!(
            dst.transition_to(Resuming).unwrap(),
            [RunningP2p, Stop, Resuming]
        );
        assert_eq!(
            dst.write_data(&mut wire.as_slice()).unwrap(),
            body.len() as u64
        );
        dst.write_chunk(b"tail").unwrap();
        assert_eq!(dst.stats().resumed_bytes, body.len() as u64 + 4);
        dst.transition_to(Running).unwrap();
        assert_eq!(dst.device().resumed(), [body.as_slice(), b"tail"].concat());
    }

    #[test]
    fn a_failed_arc_names_both_states_and_error_is_left_by_reset() {
        let mut dev = mtty_like();
        dev.device().st().fail = Some(Failure {
            arc: (PreCopyP2p, StopCopy),
            errno: libc::EIO,
            then: Error,
        });
        dev.transition_to(PreCopy).unwrap();
        let err = dev.transition_to(StopCopy).expect_err("scripted failure");
        let msg = err.to_string();
        assert!(msg.contains("device mtty0"), "{msg}");
        assert!(msg.contains("PRE_COPY_P2P -> STOP_COPY"), "{msg}");
        assert!(msg.contains("now in ERROR"), "{msg}");
        assert_eq!(err.errno(), Some(libc::EIO));
        assert_eq!(dev.state(), Error);

        let err = dev.transition_to(Running).expect_err("ERROR has no arcs");
        assert!(
            format!("{:?}", anyhow::Error::from(err)).contains("VFIO_DEVICE_RESET"),
            "the chain names the way out"
        );
        assert!(!dev.was_reset());
        assert_eq!(dev.recover().unwrap(), Recovery::Reset);
        assert_eq!(dev.state(), Running);
        assert!(dev.was_reset());
        assert_eq!(dev.stats().resets, 1);
        assert_eq!(dev.device().st().resets, 1);
        assert!(!dev.has_data_fd());
    }

    #[test]
    fn recover_walks_a_healthy_device_back_and_resets_resuming() {
        let mut dev = mtty_like();
        dev.transition_to(StopCopy).unwrap();
        assert_eq!(
            dev.recover().unwrap(),
            Recovery::Walked(vec![Stop, RunningP2p, Running])
        );
        assert_eq!(dev.recover().unwrap(), Recovery::AlreadyRunning);
        assert!(!dev.was_reset());

        dev.transition_to(Resuming).unwrap();
        assert_eq!(dev.recover().unwrap(), Recovery::Reset);
        assert_eq!(
            dev.device().st().arcs.last(),
            Some(&(Stop, Resuming)),
            "nothing was loaded"
        );
    }

    #[test]
    fn recover_resets_when_walking_fails_and_reset_must_reach_running() {
        let mut dev = mtty_like();
        dev.transition_to(Stop).unwrap();
        dev.device().st().fail = Some(Failure {
            arc: (Stop, RunningP2p),
            errno: libc::EBUSY,
            then: Stop,
        });
        assert_eq!(dev.recover().unwrap(), Recovery::Reset);

        dev.transition_to(Stop).unwrap();
        dev.device().st().reset_to = Stop;
        let err = dev.reset().expect_err("reset left the device stopped");
        assert!(matches!(
            err,
            DeviceMigrationError::ResetNotRunning { now: Stop, .. }
        ));
    }

    #[test]
    fn operations_in_the_wrong_state_are_refused_with_context() {
        let mut dev = mtty_like();
        let err = dev.read_data(&mut Vec::new()).expect_err("RUNNING");
        assert!(
            err.to_string().contains("the device is in RUNNING"),
            "{err}"
        );
        let err = dev.write_chunk(b"x").expect_err("RUNNING");
        assert!(err.to_string().contains("needs RESUMING"), "{err}");
        dev.transition_to(StopCopy).unwrap();
        let err = dev.precopy_info().expect_err("STOP_COPY");
        assert!(err.to_string().contains("mtty0"), "{err}");
        let err = dev.transition_to(PreCopy).expect_err("blocked");
        assert!(err.to_string().contains("STOP_COPY -> PRE_COPY"), "{err}");
    }

    #[test]
    fn devices_without_migration_or_stop_copy_are_refused() {
        for flags in [None, Some(0x2), Some(0x6)] {
            let mut fake = Fake::new(Vec::new(), Vec::new());
            fake.flags = flags;
            let err = DeviceMigration::new("edu", fake).expect_err("not migratable");
            assert!(
                err.to_string().contains("device edu does not implement"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_stream_state_without_a_data_fd_is_an_error() {
        let mut dev = mtty_like();
        dev.device().st().no_fd = true;
        let err = dev.transition_to(StopCopy).expect_err("no fd");
        assert!(
            err.to_string()
                .contains("no data stream for STOP -> STOP_COPY"),
            "{err}"
        );
    }

    #[test]
    fn a_refused_write_reports_the_accepted_bytes() {
        let mut dev = mtty_like();
        dev.device().st().resume_read_only = true;
        dev.transition_to(Resuming).unwrap();
        let err = dev.write_data(&mut &b"junk"[..]).expect_err("read-only fd");
        assert_eq!(err.errno(), Some(libc::EBADF));
        let msg = err.to_string();
        assert!(msg.contains("mtty0") && msg.contains("RESUMING"), "{msg}");
        assert!(msg.contains("after accepting 0 bytes"), "{msg}");
    }

    /// Reads scripted results.
    struct Script(Vec<io::Result<Vec<u8>>>);

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Ok(0);
            }
            let bytes = self.0.remove(0)?;
            buf[..bytes.len()].copy_from_slice(&bytes);
            Ok(bytes.len())
        }
    }

    fn enomsg() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOMSG)
    }

    #[test]
    fn pump_treats_enomsg_as_no_data_now_only_in_precopy() {
        let mut buf = [0u8; 8];
        let mut out = Vec::new();
        let mut src = Script(vec![
            Ok(b"abc".to_vec()),
            Err(io::Error::from(io::ErrorKind::Interrupted)),
            Ok(b"de".to_vec()),
            Err(enomsg()),
            Ok(b"never".to_vec()),
        ]);
        let r = pump(&mut src, &mut out, &mut buf, true, None).unwrap();
        assert_eq!((r.bytes, r.end), (5, ReadEnd::NoDataNow));
        assert_eq!(out, b"abcde");

        let mut src = Script(vec![Ok(b"ab".to_vec()), Err(enomsg())]);
        match pump(&mut src, &mut out, &mut buf, false, None) {
            Err(PumpError::Read { bytes: 2, source }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOMSG))
            }
            other => panic!("ENOMSG in STOP_COPY must fail: {other:?}"),
        }
    }

    #[test]
    fn pump_honours_the_budget_and_reports_a_failing_sink() {
        let mut buf = [0u8; 4];
        let mut src = io::Cursor::new(vec![1u8; 10]);
        let mut out = Vec::new();
        let r = pump(&mut src, &mut out, &mut buf, false, Some(6)).unwrap();
        assert_eq!((r.bytes, r.end), (6, ReadEnd::Budget));
        let r = pump(&mut src, &mut out, &mut buf, false, None).unwrap();
        assert_eq!((r.bytes, r.end), (4, ReadEnd::EndOfStream));

        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::EPIPE))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut src = io::Cursor::new(vec![1u8; 10]);
        match pump(&mut src, &mut Broken, &mut buf, false, None) {
            Err(PumpError::Write { bytes: 0, .. }) => {}
            other => panic!("the sink failed: {other:?}"),
        }
    }

    #[test]
    fn a_failing_sink_is_not_blamed_on_the_device() {
        let mut dev = mtty_like();
        dev.transition_to(StopCopy).unwrap();
        let mut full = io::Cursor::new([0u8; 10]);
        let err = dev.read_data(&mut full).expect_err("sink too small");
        assert!(
            matches!(err, DeviceMigrationError::Sink { bytes: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("receiver of device data"), "{err}");
        // The seek position shows that the device's bytes were consumed, not lost silently.
        let mut f = dev.data.as_ref().expect("fd");
        assert_eq!(f.stream_position().unwrap(), 96);
    }
}
