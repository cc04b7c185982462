//! The source's devices with state of their own (VFIO migration v2): PRE_COPY at the start, their
//! pre-copy data streamed between memory passes, switchover-ack (no switchover until every
//! device's initial data is loaded on the destination), P2P then STOP_COPY at the switchover,
//! their final data streamed to its end, and recovery to RUNNING after a failure.
//!
//! Device data goes on its own lane when there are several connections (memory then uses the
//! others), so the final device state never waits behind memory pages.

use super::*;
use crate::engine::device::{
    DeviceMigrationRecord, DeviceReadEnd, DeviceStateSource, DEVICE_CHUNK_BYTES,
};
use crate::engine::stats::MigrationStats;
use crate::engine::HostError;
use crate::protocol::DeviceMark;

/// One device in a migration.
pub(super) struct DeviceRun {
    dev: Box<dyn DeviceStateSource>,
    record: DeviceMigrationRecord,
    /// `start` succeeded: the device left RUNNING and must be recovered on failure.
    started: bool,
    /// The InitialSent mark went out.
    initial_sent: bool,
    /// The stream's End mark went out.
    ended: bool,
    /// Time spent in the device's STOP_COPY arc and its final reads.
    stop_copy_time: Duration,
}

impl DeviceRun {
    fn new(dev: Box<dyn DeviceStateSource>) -> Self {
        let record = DeviceMigrationRecord {
            id: dev.id().to_owned(),
            // A device without pre-copy has no initial data to wait for.
            initial_data_acked: !dev.has_precopy(),
            ..DeviceMigrationRecord::default()
        };
        DeviceRun {
            dev,
            record,
            started: false,
            initial_sent: false,
            ended: false,
            stop_copy_time: Duration::ZERO,
        }
    }
}

fn device_error(id: &str, source: HostError) -> MigrationError {
    MigrationError::Device {
        id: id.to_owned(),
        source,
    }
}

impl Source<'_> {
    /// Takes the VM's migratable devices and moves each into PRE_COPY (tracking is already on).
    pub(super) fn start_devices(&mut self) -> Result<(), MigrationError> {
        let devs = self.host.device_states().map_err(MigrationError::Host)?;
        self.devices = devs.into_iter().map(DeviceRun::new).collect();
        self.dedicated_device_lane = self.params.connections > 1 && !self.devices.is_empty();
        for d in &mut self.devices {
            d.dev.start().map_err(|e| device_error(&d.record.id, e))?;
            d.started = true;
            self.stats.set_device(&d.record);
        }
        Ok(())
    }

    /// The lane device data travels on: the last one when there are several, else lane 0.
    pub(super) fn device_lane(&self) -> usize {
        usize::from(self.params.connections.max(1)) - 1
    }

    /// Lanes that carry memory: all but the device lane when devices migrate over several
    /// connections.
    pub(super) fn memory_lanes(&self) -> usize {
        let n = usize::from(self.params.connections.max(1));
        if self.dedicated_device_lane {
            n - 1
        } else {
            n
        }
    }

    /// Device bytes the switchover would move: (pre-copy bytes not read yet, which further
    /// iterations can still move, and what STOP_COPY would produce now, which they cannot).
    pub(super) fn device_bytes_pending(&mut self) -> Result<(u64, u64), MigrationError> {
        let (mut precopy, mut stop_copy) = (0u64, 0u64);
        for d in &mut self.devices {
            let p = d.dev.pending().map_err(|e| device_error(&d.record.id, e))?;
            precopy = precopy
                .saturating_add(p.dirty_bytes)
                .saturating_add(p.initial_bytes);
            stop_copy = stop_copy.saturating_add(p.stop_copy_bytes);
        }
        Ok((precopy, stop_copy))
    }

    /// Every device's initial pre-copy data is loaded on the destination (or switchover-ack is
    /// off).
    pub(super) fn devices_acked(&self) -> bool {
        !self.params.switchover_ack || self.devices.iter().all(|d| d.record.initial_data_acked)
    }

    /// The destination loaded device `id`'s initial data.
    pub(super) fn device_loaded(&mut self, id: &str) -> Result<(), MigrationError> {
        if self.devices_out {
            // The switchover's device thread has them: note it for when they are back.
            self.deferred_loaded.push(id.to_owned());
            return Ok(());
        }
        let d = self
            .devices
            .iter_mut()
            .find(|d| d.record.id == id)
            .ok_or_else(|| MigrationError::UnknownDevice {
                peer: "destination",
                id: id.to_owned(),
            })?;
        d.record.initial_data_acked = true;
        self.stats.set_device(&d.record);
        log::info!("device {id}: the destination loaded its initial data");
        Ok(())
    }

    /// Streams what each device has now: pre-copy data between passes, or (`stopped`) the final
    /// state to its end. Sends InitialSent once a device's initial bytes are all out.
    pub(super) fn pump_devices(&mut self, stopped: bool) -> Result<(), MigrationError> {
        let lane = self.device_lane();
        let mut devices = std::mem::take(&mut self.devices);
        let stats = self.stats.clone();
        let result = match self.lanes() {
            Ok(lanes) => pump(&mut devices, stopped, &stats, &mut |f| {
                lanes.send_frame(lane, f)
            }),
            Err(e) => Err(e),
        };
        self.devices = devices;
        result
    }

    /// The switchover's device stream, overlapped with `memory` (the final memory pass) when the
    /// devices have a connection of their own: a thread reads the devices' final state onto it
    /// while this one queues memory on the others.
    pub(super) fn final_pass_and_devices(
        &mut self,
        memory: impl FnOnce(&mut Self) -> Result<(), MigrationError>,
    ) -> Result<(), MigrationError> {
        let sender = if self.dedicated_device_lane {
            let lane = self.device_lane();
            self.lanes()?.sender(lane)
        } else {
            None
        };
        let Some(sender) = sender else {
            memory(self)?;
            return self.pump_devices(true);
        };
        let mut devices = std::mem::take(&mut self.devices);
        let stats = self.stats.clone();
        self.devices_out = true;
        let (mem_result, dev_result) = std::thread::scope(|scope| {
            let h = scope.spawn(|| pump(&mut devices, true, &stats, &mut |f| sender.send_frame(f)));
            let m = memory(self);
            (m, h.join().unwrap_or(Err(MigrationError::Panicked)))
        });
        self.devices = devices;
        self.devices_out = false;
        for id in std::mem::take(&mut self.deferred_loaded) {
            self.device_loaded(&id)?;
        }
        mem_result.and(dev_result)
    }

    /// Switchover, with vCPUs paused: every device to its P2P state first when several devices
    /// migrate (none may DMA into a peer that already stopped), then each to STOP_COPY.
    pub(super) fn stop_devices(&mut self) -> Result<(), MigrationError> {
        let p2p = self.devices.len() > 1 && self.devices.iter().all(|d| d.dev.has_p2p());
        if p2p {
            for d in &mut self.devices {
                d.dev
                    .quiesce_p2p()
                    .map_err(|e| device_error(&d.record.id, e))?;
                d.record.p2p = true;
            }
            log::info!(
                "switchover: {} devices in their P2P states",
                self.devices.len()
            );
        }
        for d in &mut self.devices {
            let t = Instant::now();
            d.dev
                .stop_copy()
                .map_err(|e| device_error(&d.record.id, e))?;
            d.stop_copy_time += t.elapsed();
        }
        Ok(())
    }

    /// After the destination took over: STOP every device (failures only logged: the guest runs
    /// on the destination now).
    pub(super) fn finish_devices(&mut self) {
        for d in &mut self.devices {
            if let Err(e) = d.dev.finish() {
                log::warn!("device {}: {}", d.record.id, error_chain(&e));
            }
            self.stats.set_device(&d.record);
        }
    }

    /// After a failure: every started device back to RUNNING (reset when it cannot walk back).
    pub(super) fn recover_devices(&mut self) {
        for d in &mut self.devices {
            if !d.started {
                continue;
            }
            d.started = false;
            match d.dev.recover() {
                Ok(reset) => {
                    d.record.reset = reset;
                    if reset {
                        log::warn!("device {}: reset to get it back to RUNNING", d.record.id);
                    }
                }
                Err(e) => log::error!(
                    "device {}: cannot get it back to RUNNING: {}",
                    d.record.id,
                    error_chain(&e)
                ),
            }
            self.stats.set_device(&d.record);
        }
    }
}

/// Streams what each device has now (see [`Source::pump_devices`]) through `send`.
fn pump(
    devices: &mut [DeviceRun],
    stopped: bool,
    stats: &MigrationStats,
    send: &mut dyn FnMut(OwnedFrame) -> Result<(), MigrationError>,
) -> Result<(), MigrationError> {
    for d in devices.iter_mut() {
        if d.ended || !(stopped || d.dev.has_precopy()) {
            continue;
        }
        loop {
            let mut chunk = Vec::with_capacity(DEVICE_CHUNK_BYTES);
            let t = Instant::now();
            let end = d
                .dev
                .read_chunk(&mut chunk)
                .map_err(|e| device_error(&d.record.id, e))?;
            let n = chunk.len() as u64;
            if stopped {
                d.stop_copy_time += t.elapsed();
                d.record.stop_copy_bytes += n;
            } else {
                d.record.precopy_bytes += n;
            }
            if n > 0 {
                send(OwnedFrame::DeviceData(d.record.id.clone(), chunk))?;
            }
            match end {
                DeviceReadEnd::ChunkFull => continue,
                DeviceReadEnd::NoDataNow if stopped => {
                    // STOP_COPY data ends with the stream; "nothing now" would lose the rest.
                    return Err(device_error(
                        &d.record.id,
                        HostError::new(
                            "read STOP_COPY data",
                            "the device reported no data before the end of its stream",
                        ),
                    ));
                }
                DeviceReadEnd::NoDataNow => {
                    mark_initial_sent(d, send)?;
                    break;
                }
                DeviceReadEnd::EndOfStream => {
                    d.record.stop_copy_us = super::micros(d.stop_copy_time);
                    d.ended = true;
                    send(OwnedFrame::DeviceMark(d.record.id.clone(), DeviceMark::End))?;
                    break;
                }
            }
        }
        stats.set_device(&d.record);
    }
    Ok(())
}

/// Sends the device's InitialSent mark once the driver says its initial bytes are all read.
fn mark_initial_sent(
    d: &mut DeviceRun,
    send: &mut dyn FnMut(OwnedFrame) -> Result<(), MigrationError>,
) -> Result<(), MigrationError> {
    if d.initial_sent {
        return Ok(());
    }
    let pending = d.dev.pending().map_err(|e| device_error(&d.record.id, e))?;
    if pending.initial_bytes > 0 {
        return Ok(());
    }
    d.initial_sent = true;
    send(OwnedFrame::DeviceMark(
        d.record.id.clone(),
        DeviceMark::InitialSent,
    ))
}
