//! Switchover (pause, final claim, state, Complete, wait for the ack) and unwinding after a
//! failure so the source VM keeps running.

use super::*;
use crate::engine::device::DeviceMigrationRecord;

/// Consecutive steps of the switchover: each lap is the time since the previous one.
struct Step(Instant);

impl Step {
    fn lap(&mut self) -> u64 {
        let now = Instant::now();
        let us = micros(now - self.0);
        self.0 = now;
        us
    }
}

impl Source<'_> {
    pub(super) fn switchover(&mut self) -> Result<(), MigrationError> {
        // Never pause before the destination has built its VM: that build must not count as
        // downtime (in local mode the switchover follows the config at once).
        if !self.destination_ready {
            self.wait_ack("waiting for the destination to build its VM")?;
            self.destination_ready = true;
            self.setup_lap("wait for the destination's VM");
        }
        self.stats.set_status(MigrationStatus::Completing);
        let paused_at = Instant::now();
        let mut times = SwitchoverBreakdown::default();
        let mut step = Step(paused_at);
        self.host.pause().map_err(MigrationError::Host)?;
        self.stats.mark_paused();
        self.paused = true;
        times.queued_at_pause_bytes = self.lanes()?.queued_bytes();
        // Devices after vCPUs (a vCPU could restart a device's DMA) and before the final DMA
        // read: a device write after that read would be lost. Their stop counts as downtime.
        self.host.pause_devices().map_err(MigrationError::Host)?;
        self.stop_devices()?;
        if self.params.local && !self.handover.fds.is_empty() {
            // Live update: the devices go as they are; this side lets go of them (a failure from
            // here on takes them back before the VM resumes).
            self.handover_released = true;
            self.host.handover_release().map_err(MigrationError::Host)?;
        }
        times.pause_us = step.lap();
        // The VM is paused: a destination that stops reading must not stall it for long.
        let stall = self.params.ack_timeout;
        self.lanes()?.set_stall_limit(stall, "switchover");
        // The final memory pass and the devices' final state, each device to the end of its
        // stream; overlapped when the devices have a connection of their own.
        self.final_pass_and_devices(|this| {
            if this.params.local {
                return Ok(());
            }
            // With every vCPU and device stopped nothing can dirty a page after its claim now.
            let synced = Instant::now();
            this.sync_sources()?;
            times.final_sync_us = micros(synced.elapsed());
            // Claim only the chunks the sources report dirty when every source can say so without
            // claiming: the switchover's work then follows what was dirtied since the last claim,
            // not the guest's size. A source that reports only when claimed (type1, device DMA
            // logging) makes it claim every chunk.
            let (_, can_peek) = this.plan()?;
            let iteration = this.stats.snapshot_iteration() + 1;
            // The record shows the estimate that decided the switchover beside what it sent.
            let (expected_downtime_ms, bandwidth) = this.stats.latest_estimate();
            let pages = this.pass(PassPlan {
                kind: PassKind::Final,
                iteration,
                skip_unplanned: can_peek,
                expected_downtime_ms,
                bandwidth,
            })?;
            (times.final_claimed_chunks, times.final_claim_us) =
                (this.last_claims.0, micros(this.last_claims.1));
            this.stats.set_remaining(0);
            log::info!("switchover: {pages} pages after pause");
            Ok(())
        })?;
        times.final_pass_us = step.lap();
        let state = self.host.save_state().map_err(MigrationError::Host)?;
        times.state_save_us = step.lap();
        self.check_abort(true)?;
        let lanes = self.lanes()?;
        for i in 1..lanes.len() {
            lanes.send_frame(i, OwnedFrame::StreamEnd)?;
        }
        lanes.send_frame(0, OwnedFrame::VmState(state.vm))?;
        for (id, b) in state.vcpus {
            lanes.send_frame(0, OwnedFrame::Vcpu(id, b))?;
        }
        for (id, b) in state.devices {
            lanes.send_frame(0, OwnedFrame::Device(id, b))?;
        }
        lanes.send_frame(0, OwnedFrame::Complete)?;
        lanes.flush(false)?;
        times.send_us = step.lap();
        // Phase one: the destination restores everything and says it can run the VM. It runs it
        // only on Commit, so until Commit goes out any failure resumes the VM here.
        self.wait_peer(
            PeerEvent::Ready,
            "waiting for the destination to be ready to run",
        )?;
        times.destination_restore_us = step.lap();
        // The commit point: from here on this side never resumes the VM on its own.
        let in_doubt = |e: MigrationError| MigrationError::InDoubt {
            detail: format!("the source committed, then: {}", error_chain(&e)),
            held: None,
        };
        let lanes = self.lanes()?;
        lanes
            .send_frame(0, OwnedFrame::Commit)
            .and_then(|()| lanes.flush(false))
            .map_err(in_doubt)?;
        match self.wait_peer(PeerEvent::Ack, "waiting for the destination to run the VM") {
            Ok(()) => {}
            // The destination says it will not run the VM: resuming here is safe.
            Err(e @ MigrationError::PeerError { .. }) => return Err(e),
            Err(e) => return Err(in_doubt(e)),
        }
        times.destination_start_us = step.lap();
        // The VM runs at the destination and this side knows it: the migration is complete.
        self.stats.mark_end();
        let downtime = u64::try_from(paused_at.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.stats.set_downtime(downtime);
        self.stats.set_switchover(times);
        self.stats
            .set_switchover_steps(self.host.switchover_steps());
        self.finish_devices();
        if self.handover_released {
            self.handover_released = false;
            self.host.handover_done();
            for id in &self.handover.devices {
                let note = self
                    .handover
                    .notes
                    .iter()
                    .find(|(d, _)| d == id)
                    .map(|(_, n)| n.clone());
                self.stats.set_device(&DeviceMigrationRecord {
                    id: id.clone(),
                    handed_over: true,
                    handover_note: note,
                    ..DeviceMigrationRecord::default()
                });
            }
        }
        Ok(())
    }

    fn wait_ack(&mut self, during: &'static str) -> Result<(), MigrationError> {
        self.wait_peer(PeerEvent::Ack, during)
    }

    /// Waits for `want` (Ack or Ready) from the destination; its Error, a closed link or the ack
    /// timeout end the wait with an error.
    fn wait_peer(&mut self, want: PeerEvent, during: &'static str) -> Result<(), MigrationError> {
        let gone = |detail: String| MigrationError::PeerGone {
            peer: "destination",
            during,
            detail,
        };
        let deadline = Instant::now() + self.params.ack_timeout;
        loop {
            let peer = self
                .peer
                .as_ref()
                .ok_or_else(|| gone("no control connection".into()))?;
            let left = deadline.saturating_duration_since(Instant::now());
            match peer.recv_timeout(left) {
                // A switchover-ack that arrives late (the timeout strategy switched over).
                Ok(PeerEvent::DeviceLoaded(id)) => self.device_loaded(&id)?,
                Ok(PeerEvent::Ack) if matches!(want, PeerEvent::Ack) => return Ok(()),
                Ok(PeerEvent::Ready) if matches!(want, PeerEvent::Ready) => return Ok(()),
                other => return self.ack_or_error(other, during),
            }
        }
    }

    fn ack_or_error(
        &self,
        event: Result<PeerEvent, RecvTimeoutError>,
        during: &'static str,
    ) -> Result<(), MigrationError> {
        let gone = |detail: String| MigrationError::PeerGone {
            peer: "destination",
            during,
            detail,
        };
        match event {
            Ok(PeerEvent::Ack) => Err(MigrationError::Unexpected {
                frame: "ack",
                during,
            }),
            Ok(PeerEvent::Ready) => Err(MigrationError::Unexpected {
                frame: "ready",
                during,
            }),
            Ok(PeerEvent::DeviceLoaded(_)) => Err(MigrationError::Unexpected {
                frame: "device-loaded",
                during,
            }),
            Ok(PeerEvent::Error(reason)) => Err(MigrationError::PeerError {
                peer: "destination",
                reason,
            }),
            Ok(PeerEvent::Gone(d)) => Err(gone(d)),
            Err(RecvTimeoutError::Timeout) => Err(gone(format!(
                "no ack within {} s",
                self.params.ack_timeout.as_secs()
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(gone("reader stopped".into())),
        }
    }

    /// A send failure usually means the destination gave up; prefer its stated reason.
    fn refine(&self, e: MigrationError) -> MigrationError {
        let wrote = matches!(
            e,
            MigrationError::Lane { .. } | MigrationError::Protocol { .. }
        );
        if !wrote {
            return e;
        }
        match self
            .peer
            .as_ref()
            .map(|p| p.recv_timeout(Duration::from_millis(500)))
        {
            Some(Ok(PeerEvent::Error(reason))) => MigrationError::PeerError {
                peer: "destination",
                reason,
            },
            _ => e,
        }
    }

    /// Tear down: on failure tell the destination why and give the VM back, running.
    pub(super) fn unwind(
        &mut self,
        result: Result<(), MigrationError>,
    ) -> Result<(), MigrationError> {
        let result = result.map_err(|e| self.refine(e));
        let in_doubt = matches!(result, Err(MigrationError::InDoubt { .. }));
        // In doubt the destination may be running the VM: no Error frame that could stop it.
        let reason = result
            .as_ref()
            .err()
            .filter(|_| !in_doubt)
            .map(|e| format!("source: {}", error_chain(e)));
        match self.lanes.take() {
            Some(l) => l.close(reason, Duration::from_secs(2)),
            None => {
                if let (Some(text), Some(c)) = (&reason, self.control.as_mut()) {
                    let _ = FrameWriter::new(c).send(&Frame::Error(text));
                }
            }
        }
        if let Some(c) = self.control.take() {
            c.shutdown();
        }
        if let Some(h) = self.watcher.take() {
            let _ = h.join();
        }
        if self.sources_started > 0 {
            let started = self.sources_started;
            self.sources_started = 0;
            for s in &mut self.sources[..started] {
                if let Err(e) = s.stop() {
                    log::warn!("stopping dirty tracking: {}", error_chain(&e));
                }
            }
        }
        if self.ac.percent() > 0 {
            if let Err(e) = self.host.throttle(0) {
                log::warn!("removing the vCPU throttle: {}", error_chain(&e));
            }
            self.stats.set_throttle(0);
        }
        if in_doubt && self.handover_released {
            // The destination may run the VM with the handed devices: nothing here may tear them
            // down (a shutdown of this side); resuming this side takes them back first.
            self.host.handover_done();
        }
        if in_doubt {
            // Committed: the VM stays paused, its devices stopped, until the operator decides.
            return result;
        }
        if result.is_err() && self.handover_released {
            // The destination never took the devices over: they are this VM's again.
            self.handover_released = false;
            match self.host.handover_reclaim() {
                Ok(()) => log::info!("live update failed: the devices are back with this VM"),
                Err(e) => log::error!("taking the handed devices back: {}", error_chain(&e)),
            }
        }
        if result.is_err() {
            // Devices back in RUNNING before the vCPUs run again.
            self.recover_devices();
        }
        if result.is_err() && self.paused {
            if let Err(e) = self.host.resume() {
                // The migration error stays the primary one; the resume failure is logged.
                log::error!("resuming the source VM: {}", error_chain(&e));
            } else {
                self.paused = false;
            }
        }
        result
    }
}
