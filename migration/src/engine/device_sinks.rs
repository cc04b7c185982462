//! The destination's devices with state of their own: each source device's stream (device data
//! frames, in order, on whichever connection the source chose) is written into the local device
//! matched to its id, the switchover-ack goes back once a device has loaded its initial data, and
//! at the end every stream must be complete before the VM may start.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::protocol::{DeviceMark, Frame, FrameWriter};
use crate::transport::Connection;

use super::device::DeviceStateSink;
use super::error::MigrationError;
use super::host::HostError;
use super::stats::MigrationStats;

struct SinkRun {
    sink: Box<dyn DeviceStateSink>,
    bytes: u64,
    ended: bool,
}

/// The destination's device sinks, shared by the connection readers.
pub(crate) struct DeviceSinks {
    sinks: Mutex<BTreeMap<String, SinkRun>>,
    /// The control connection, for switchover-acks.
    control: Mutex<FrameWriter<Connection>>,
}

fn device_error(id: &str, source: HostError) -> MigrationError {
    MigrationError::Device {
        id: id.to_owned(),
        source,
    }
}

impl DeviceSinks {
    /// Puts every sink in RESUMING. On failure the ones already there are reset.
    pub(crate) fn begin(
        sinks: Vec<Box<dyn DeviceStateSink>>,
        control: Connection,
    ) -> Result<Self, MigrationError> {
        let this = DeviceSinks {
            sinks: Mutex::new(BTreeMap::new()),
            control: Mutex::new(FrameWriter::new(control)),
        };
        for mut sink in sinks {
            let id = sink.id().to_owned();
            if let Err(e) = sink.begin() {
                this.recover();
                return Err(device_error(&id, e));
            }
            let run = SinkRun {
                sink,
                bytes: 0,
                ended: false,
            };
            this.lock().insert(id, run);
        }
        Ok(this)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SinkRun>> {
        self.sinks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handles a device data or mark frame; returns false for any other frame.
    pub(crate) fn handle(
        &self,
        frame: &Frame<'_>,
        stats: &MigrationStats,
    ) -> Result<bool, MigrationError> {
        let (id, data, mark) = match *frame {
            Frame::DeviceData { id, bytes } => (id, Some(bytes), None),
            Frame::DeviceMark { id, mark } => (id, None, Some(mark)),
            _ => return Ok(false),
        };
        let mut sinks = self.lock();
        let run = sinks
            .get_mut(id)
            .ok_or_else(|| MigrationError::UnknownDevice {
                peer: "source",
                id: id.to_owned(),
            })?;
        if run.ended {
            return Err(MigrationError::Unexpected {
                frame: frame.tag().name(),
                during: "after the end of that device's stream",
            });
        }
        if let Some(bytes) = data {
            run.sink.write(bytes).map_err(|e| device_error(id, e))?;
            run.bytes += bytes.len() as u64;
            stats.add_transferred(bytes.len() as u64);
        }
        match mark {
            Some(DeviceMark::InitialSent) => {
                // Everything before the mark is loaded: the source may switch over.
                drop(sinks);
                self.control
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send(&Frame::DeviceLoaded { id })
                    .map_err(|source| MigrationError::Protocol {
                        during: "acknowledging a device's initial data",
                        source,
                    })?;
            }
            Some(DeviceMark::End) => {
                run.sink.end().map_err(|e| device_error(id, e))?;
                run.ended = true;
                log::info!("device {id}: {} bytes of state loaded", run.bytes);
            }
            None => {}
        }
        Ok(true)
    }

    /// Every device's stream arrived to its end.
    pub(crate) fn check_complete(&self) -> Result<(), MigrationError> {
        match self.lock().iter().find(|(_, r)| !r.ended) {
            Some((id, r)) => Err(MigrationError::DeviceStateMissing {
                id: id.clone(),
                detail: if r.bytes == 0 {
                    "no data"
                } else {
                    "no end of stream"
                },
            }),
            None => Ok(()),
        }
    }

    /// Starts the devices: RUNNING_P2P for all first when there are several, then RUNNING.
    pub(crate) fn run(&self) -> Result<(), MigrationError> {
        let mut sinks = self.lock();
        if sinks.len() > 1 {
            for (id, r) in sinks.iter_mut() {
                r.sink.run_p2p().map_err(|e| device_error(id, e))?;
            }
        }
        for (id, r) in sinks.iter_mut() {
            r.sink.run().map_err(|e| device_error(id, e))?;
        }
        Ok(())
    }

    /// After a failure: reset every device so nothing partial stays loaded.
    pub(crate) fn recover(&self) {
        for (id, r) in self.lock().iter_mut() {
            if let Err(e) = r.sink.recover() {
                log::error!(
                    "device {id}: cannot reset it after the failed migration: {}",
                    super::error::error_chain(&e)
                );
            }
        }
    }
}
