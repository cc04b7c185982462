//! A passthrough device as the migration engine drives it: [`VfioStateSource`] (source side) and
//! [`VfioStateSink`] (destination side) put the engine's [`DeviceStateSource`] and
//! [`DeviceStateSink`] contract on one [`DeviceMigration`] handle each.
//!
//! ```text
//!  source:  start ─► PRE_COPY (devices without PRE_COPY stay in RUNNING)
//!           pending ─► VFIO_MIG_GET_PRECOPY_INFO (in PRE_COPY*) + VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
//!           read_chunk ─► the data fd into the engine's chunk, at most DEVICE_CHUNK_BYTES in all
//!           quiesce_p2p ─► PRE_COPY_P2P or RUNNING_P2P (nothing without P2P)
//!           stop_copy ─► STOP_COPY      finish ─► STOP      recover ─► RUNNING (walk, or reset)
//!  sink:    begin ─► RESUMING   write ─► the data fd   end ─► STOP (the driver checks the state)
//!           run_p2p ─► RUNNING_P2P (nothing without P2P)   run ─► RUNNING   recover ─► reset
//! ```
//!
//! Every error is a [`HostError`] naming the operation, whose cause names the device.

use std::sync::Arc;

use tern_migration::engine::{
    DevicePending, DeviceReadEnd, DeviceStateSink, DeviceStateSource, HostError, DEVICE_CHUNK_BYTES,
};
use vfio_ioctls::VfioDevice;

use super::device_state::{
    DeviceMigration, DeviceMigrationError, DeviceMigrationStats, ReadEnd, Recovery,
};
use super::ops::MigrationOps;
use super::state::MigState;

/// The P2P state that matches `state` on the way to STOP_COPY, or why there is none.
fn p2p_of(mig: &DeviceMigration<impl MigrationOps>) -> Result<MigState, DeviceMigrationError> {
    match mig.state() {
        MigState::PreCopy | MigState::PreCopyP2p => Ok(MigState::PreCopyP2p),
        MigState::Running | MigState::RunningP2p => Ok(MigState::RunningP2p),
        state => Err(DeviceMigrationError::WrongState {
            id: mig.id().to_string(),
            op: "quiescing peer-to-peer DMA",
            needed: "RUNNING, RUNNING_P2P, PRE_COPY or PRE_COPY_P2P",
            state,
        }),
    }
}

// The engine moves the adapters to its own thread.
const _: () = {
    const fn send<T: Send>() {}
    send::<VfioStateSource>();
    send::<VfioStateSink>();
};

/// The constructor and accessors both adapters share: each wraps one [`DeviceMigration`].
macro_rules! adapter_common {
    ($adapter:ident) => {
        impl<D: MigrationOps> $adapter<D> {
            /// Probes `device` (the source's `id` for it names it everywhere) and reads its
            /// migration state.
            pub fn new(id: impl Into<String>, device: D) -> Result<Self, DeviceMigrationError> {
                Ok(Self {
                    mig: DeviceMigration::new(id, device)?,
                })
            }

            /// The handle underneath (state, capabilities).
            pub fn handle(&self) -> &DeviceMigration<D> {
                &self.mig
            }

            /// Bytes moved, STOP_COPY time and resets so far.
            pub fn stats(&self) -> DeviceMigrationStats {
                self.mig.stats()
            }
        }
    };
}

/// One source device: saves its state for the engine.
#[derive(Debug)]
pub struct VfioStateSource<D: MigrationOps = Arc<VfioDevice>> {
    mig: DeviceMigration<D>,
}

adapter_common!(VfioStateSource);

impl<D: MigrationOps + Send> DeviceStateSource for VfioStateSource<D> {
    fn id(&self) -> &str {
        self.mig.id()
    }

    fn has_precopy(&self) -> bool {
        self.mig.caps().pre_copy
    }

    fn has_p2p(&self) -> bool {
        self.mig.caps().p2p
    }

    fn start(&mut self) -> Result<(), HostError> {
        if !self.mig.caps().pre_copy {
            return Ok(());
        }
        self.mig
            .transition_to(MigState::PreCopy)
            .map(drop)
            .map_err(|e| HostError::new("enter PRE_COPY", e))
    }

    fn pending(&mut self) -> Result<DevicePending, HostError> {
        let (initial_bytes, dirty_bytes) = if self.mig.state().is_precopy() {
            let info = self
                .mig
                .precopy_info()
                .map_err(|e| HostError::new("read pre-copy info", e))?;
            (info.initial_bytes, info.dirty_bytes)
        } else {
            (0, 0)
        };
        let stop_copy_bytes = self
            .mig
            .stop_copy_size()
            .map_err(|e| HostError::new("read stop-copy size", e))?;
        Ok(DevicePending {
            initial_bytes,
            dirty_bytes,
            stop_copy_bytes,
        })
    }

    fn read_chunk(&mut self, chunk: &mut Vec<u8>) -> Result<DeviceReadEnd, HostError> {
        let room = DEVICE_CHUNK_BYTES.saturating_sub(chunk.len());
        if room == 0 {
            return Ok(DeviceReadEnd::ChunkFull);
        }
        let read = self
            .mig
            .read_data_budget(chunk, Some(room as u64))
            .map_err(|e| HostError::new("read device data", e))?;
        Ok(match read.end {
            ReadEnd::Budget => DeviceReadEnd::ChunkFull,
            ReadEnd::NoDataNow => DeviceReadEnd::NoDataNow,
            ReadEnd::EndOfStream => DeviceReadEnd::EndOfStream,
        })
    }

    fn quiesce_p2p(&mut self) -> Result<(), HostError> {
        if !self.mig.caps().p2p {
            return Ok(());
        }
        let op = "quiesce peer-to-peer DMA";
        let target = p2p_of(&self.mig).map_err(|e| HostError::new(op, e))?;
        self.mig
            .transition_to(target)
            .map(drop)
            .map_err(|e| HostError::new(op, e))
    }

    fn stop_copy(&mut self) -> Result<(), HostError> {
        self.mig
            .transition_to(MigState::StopCopy)
            .map(drop)
            .map_err(|e| HostError::new("enter STOP_COPY", e))
    }

    fn recover(&mut self) -> Result<bool, HostError> {
        self.mig
            .recover()
            .map(|r| r == Recovery::Reset)
            .map_err(|e| HostError::new("bring the device back to RUNNING", e))
    }

    fn finish(&mut self) -> Result<(), HostError> {
        self.mig
            .transition_to(MigState::Stop)
            .map(drop)
            .map_err(|e| HostError::new("stop the migrated device", e))
    }
}

/// One destination device: loads the source device's state.
#[derive(Debug)]
pub struct VfioStateSink<D: MigrationOps = Arc<VfioDevice>> {
    mig: DeviceMigration<D>,
}

adapter_common!(VfioStateSink);

impl<D: MigrationOps + Send> DeviceStateSink for VfioStateSink<D> {
    fn id(&self) -> &str {
        self.mig.id()
    }

    fn begin(&mut self) -> Result<(), HostError> {
        self.mig
            .transition_to(MigState::Resuming)
            .map(drop)
            .map_err(|e| HostError::new("enter RESUMING", e))
    }

    fn write(&mut self, data: &[u8]) -> Result<(), HostError> {
        self.mig
            .write_chunk(data)
            .map_err(|e| HostError::new("load device data", e))
    }

    fn end(&mut self) -> Result<(), HostError> {
        self.mig
            .transition_to(MigState::Stop)
            .map(drop)
            .map_err(|e| HostError::new("load the device state (RESUMING -> STOP)", e))
    }

    fn run_p2p(&mut self) -> Result<(), HostError> {
        if !self.mig.caps().p2p {
            return Ok(());
        }
        self.mig
            .transition_to(MigState::RunningP2p)
            .map(drop)
            .map_err(|e| HostError::new("enter RUNNING_P2P", e))
    }

    fn run(&mut self) -> Result<(), HostError> {
        self.mig
            .transition_to(MigState::Running)
            .map(drop)
            .map_err(|e| HostError::new("start the device", e))
    }

    fn recover(&mut self) -> Result<bool, HostError> {
        self.mig
            .reset()
            .map(|()| true)
            .map_err(|e| HostError::new("reset the device", e))
    }
}

#[cfg(test)]
mod tests {
    use tern_migration::engine::error_chain;

    use super::super::device_state::CHUNK;
    use super::super::fake::{Failure, Fake};
    use super::MigState::*;
    use super::*;

    fn mtty_like() -> Fake {
        Fake::new(vec![0xa5; 24], (0..72u8).collect())
    }

    fn arcs(h: &DeviceMigration<Arc<Fake>>) -> Vec<(MigState, MigState)> {
        h.device().st().arcs.clone()
    }

    /// A source over a fake shared with the test (Arc<Fake> is a MigrationOps through Arc<T>).
    fn source(fake: Fake) -> VfioStateSource<Arc<Fake>> {
        VfioStateSource::new("mtty0", Arc::new(fake)).expect("migratable")
    }

    fn sink(fake: Fake) -> VfioStateSink<Arc<Fake>> {
        VfioStateSink::new("mtty0", Arc::new(fake)).expect("migratable")
    }

    #[test]
    fn source_streams_precopy_then_stop_copy_through_p2p() {
        let mut src = source(mtty_like());
        assert!(src.has_precopy() && src.has_p2p());
        assert_eq!(src.id(), "mtty0");
        src.start().unwrap();
        assert_eq!(
            src.pending().unwrap(),
            DevicePending {
                initial_bytes: 24,
                dirty_bytes: 0,
                stop_copy_bytes: 96
            }
        );
        let mut chunk = Vec::new();
        assert_eq!(
            src.read_chunk(&mut chunk).unwrap(),
            DeviceReadEnd::NoDataNow
        );
        assert_eq!(chunk, vec![0xa5; 24]);
        assert_eq!(src.pending().unwrap().initial_bytes, 0);

        src.quiesce_p2p().unwrap();
        assert_eq!(src.handle().state(), PreCopyP2p);
        src.quiesce_p2p().unwrap();
        src.stop_copy().unwrap();
        let mut chunk = Vec::new();
        assert_eq!(
            src.read_chunk(&mut chunk).unwrap(),
            DeviceReadEnd::EndOfStream
        );
        assert_eq!(chunk, (0..72u8).collect::<Vec<_>>());
        assert_eq!(src.pending().unwrap().initial_bytes, 0, "not in pre-copy");
        src.finish().unwrap();
        assert_eq!(
            arcs(src.handle()),
            [
                (Running, PreCopy),
                (PreCopy, PreCopyP2p),
                (PreCopyP2p, StopCopy),
                (StopCopy, Stop)
            ]
        );
        let stats = src.stats();
        assert_eq!((stats.precopy_bytes, stats.stop_copy_bytes), (24, 72));
    }

    #[test]
    fn a_chunk_never_grows_past_the_engine_limit() {
        assert_eq!(
            CHUNK, DEVICE_CHUNK_BYTES,
            "one read fills at most one frame"
        );
        let body: Vec<u8> = (0..2 * DEVICE_CHUNK_BYTES + 17)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut src = source(Fake::new(Vec::new(), body.clone()));
        src.start().unwrap();
        // Pre-copy has nothing: the header is empty.
        let mut chunk = Vec::new();
        assert_eq!(
            src.read_chunk(&mut chunk).unwrap(),
            DeviceReadEnd::NoDataNow
        );
        assert!(chunk.is_empty());
        src.stop_copy().unwrap();

        // A chunk that already holds bytes only takes what fits.
        let mut chunk = vec![0xee; 10];
        assert_eq!(
            src.read_chunk(&mut chunk).unwrap(),
            DeviceReadEnd::ChunkFull
        );
        assert_eq!(chunk.len(), DEVICE_CHUNK_BYTES);
        assert_eq!(
            src.read_chunk(&mut chunk).unwrap(),
            DeviceReadEnd::ChunkFull
        );
        assert_eq!(
            chunk.len(),
            DEVICE_CHUNK_BYTES,
            "a full chunk reads nothing"
        );
        let mut wire = chunk.split_off(10);
        loop {
            let mut chunk = Vec::new();
            let end = src.read_chunk(&mut chunk).unwrap();
            assert!(chunk.len() <= DEVICE_CHUNK_BYTES);
            wire.extend_from_slice(&chunk);
            if end == DeviceReadEnd::EndOfStream {
                break;
            }
            assert_eq!(end, DeviceReadEnd::ChunkFull);
        }
        assert_eq!(wire, body);
    }

    #[test]
    fn a_device_without_precopy_or_p2p_goes_straight_to_stop_copy() {
        let mut fake = mtty_like();
        fake.flags = Some(0x1);
        let mut src = source(fake);
        assert!(!src.has_precopy() && !src.has_p2p());
        src.start().unwrap();
        src.quiesce_p2p().unwrap();
        assert_eq!(src.handle().state(), Running);
        assert_eq!(src.pending().unwrap().stop_copy_bytes, 96);
        src.stop_copy().unwrap();
        let mut chunk = Vec::new();
        assert_eq!(
            src.read_chunk(&mut chunk).unwrap(),
            DeviceReadEnd::EndOfStream
        );
        assert_eq!(chunk.len(), 96);
        assert_eq!(
            arcs(src.handle()),
            [(Running, Stop), (Stop, StopCopy)],
            "start and quiesce_p2p asked nothing of the device"
        );
    }

    #[test]
    fn quiesce_without_precopy_uses_running_p2p() {
        let mut fake = mtty_like();
        fake.flags = Some(0x3);
        let mut src = source(fake);
        src.start().unwrap();
        src.quiesce_p2p().unwrap();
        assert_eq!(src.handle().state(), RunningP2p);
        src.stop_copy().unwrap();
        assert_eq!(
            arcs(src.handle()),
            [(Running, RunningP2p), (RunningP2p, Stop), (Stop, StopCopy)]
        );
        let err = src.quiesce_p2p().expect_err("already stopped");
        assert!(error_chain(&err).contains("mtty0"), "{}", error_chain(&err));
    }

    #[test]
    fn source_recover_walks_back_or_resets_and_says_which() {
        let mut src = source(mtty_like());
        src.start().unwrap();
        src.quiesce_p2p().unwrap();
        src.stop_copy().unwrap();
        assert!(!src.recover().unwrap(), "walked back");
        assert_eq!(src.handle().state(), Running);

        src.handle().device().st().fail = Some(Failure {
            arc: (PreCopyP2p, StopCopy),
            errno: libc::EIO,
            then: Error,
        });
        src.start().unwrap();
        src.quiesce_p2p().unwrap();
        let err = src.stop_copy().expect_err("scripted failure");
        assert_eq!(err.operation, "enter STOP_COPY");
        let chain = error_chain(&err);
        assert!(
            chain.contains("device mtty0") && chain.contains("now in ERROR"),
            "{chain}"
        );
        assert!(src.recover().unwrap(), "ERROR is left by reset");
        assert_eq!(src.handle().state(), Running);
        assert_eq!(src.stats().resets, 1);
    }

    #[test]
    fn sink_resumes_then_runs_through_p2p() {
        let mut src = source(mtty_like());
        src.start().unwrap();
        let mut wire = Vec::new();
        src.read_chunk(&mut wire).unwrap();
        src.stop_copy().unwrap();
        src.read_chunk(&mut wire).unwrap();

        let mut dst = sink(Fake::new(Vec::new(), Vec::new()));
        assert_eq!(dst.id(), "mtty0");
        dst.begin().unwrap();
        for piece in wire.chunks(40) {
            dst.write(piece).unwrap();
        }
        dst.end().unwrap();
        dst.run_p2p().unwrap();
        dst.run().unwrap();
        assert_eq!(dst.handle().device().resumed(), wire);
        assert_eq!(dst.stats().resumed_bytes, 96);
        assert_eq!(
            arcs(dst.handle()),
            [
                (Running, RunningP2p),
                (RunningP2p, Stop),
                (Stop, Resuming),
                (Resuming, Stop),
                (Stop, RunningP2p),
                (RunningP2p, Running)
            ]
        );
    }

    #[test]
    fn sink_without_p2p_skips_running_p2p() {
        let mut fake = Fake::new(Vec::new(), Vec::new());
        fake.flags = Some(0x1);
        let mut dst = sink(fake);
        dst.begin().unwrap();
        dst.write(b"state").unwrap();
        dst.end().unwrap();
        dst.run_p2p().unwrap();
        assert_eq!(dst.handle().state(), Stop);
        dst.run().unwrap();
        assert_eq!(
            arcs(dst.handle()),
            [
                (Running, Stop),
                (Stop, Resuming),
                (Resuming, Stop),
                (Stop, Running)
            ]
        );
    }

    #[test]
    fn sink_refusing_the_stream_is_reset() {
        let fake = Fake::new(Vec::new(), Vec::new());
        fake.st().resume_read_only = true;
        let mut dst = sink(fake);
        dst.begin().unwrap();
        let err = dst.write(b"junk").expect_err("the device refuses");
        assert_eq!(err.operation, "load device data");
        let chain = error_chain(&err);
        assert!(
            chain.contains("mtty0") && chain.contains("RESUMING"),
            "{chain}"
        );
        assert!(dst.recover().unwrap());
        assert_eq!(dst.handle().state(), Running);
        assert_eq!(dst.handle().device().st().resets, 1);
        let err = dst.write(b"more").expect_err("not resuming any more");
        assert!(error_chain(&err).contains("needs RESUMING"));
    }

    #[test]
    fn adapters_are_engine_trait_objects() {
        let boxed: Box<dyn DeviceStateSource> = Box::new(source(mtty_like()));
        assert_eq!(boxed.id(), "mtty0");
        let boxed: Box<dyn DeviceStateSink> = Box::new(sink(mtty_like()));
        assert_eq!(boxed.id(), "mtty0");
    }
}
