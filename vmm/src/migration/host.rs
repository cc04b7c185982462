//! The running machine as the migration engine's source.

use std::sync::Arc;

use tern_migration::dirty::GuestPageBitmap;
use tern_migration::dirty::{DirtyBitmap, DirtySource, GpaRange, VmmWriteSource};
use tern_migration::engine::{
    DeviceStateSource, Handover, HandoverFd, HostError, MigrationHost, MigrationState, StepTimes,
    TimedStep,
};
use vm_memory::GuestMemoryMmap;

use super::device_map::stamp_pci_ids;
use super::state_codec::encode_state;
use super::throttle::Throttle;
use crate::config::PciFunctionIds;
use crate::machine::Machine;

/// A [`MigrationHost`] over a shared [`Machine`]; the VMM keeps its own reference for the API.
#[derive(Debug)]
pub struct MachineHost {
    machine: Arc<Machine>,
    throttle: Option<Throttle>,
    /// The switchover's steps on this side, from the pause on.
    steps: StepTimes,
}

impl MachineHost {
    /// Wraps `machine` for one outgoing migration.
    pub fn new(machine: Arc<Machine>) -> Self {
        Self {
            machine,
            throttle: None,
            steps: StepTimes::start(),
        }
    }

    fn stop_throttle(&mut self) {
        if let Some(mut t) = self.throttle.take() {
            t.stop();
        }
    }
}

impl MigrationHost for MachineHost {
    fn guest_memory(&self) -> GuestMemoryMmap<GuestPageBitmap> {
        self.machine.ram().memory().clone()
    }

    fn config(&mut self) -> Result<Vec<u8>, HostError> {
        // The destination checks its devices against the source's PCI IDs.
        let mut config = self.machine.config().clone();
        let opened: Vec<(String, PciFunctionIds)> = self
            .machine
            .devices()
            .passthrough_info()
            .into_iter()
            .map(|(d, _)| {
                let ids = PciFunctionIds {
                    vendor: d.vendor_id,
                    device: d.device_id,
                };
                (d.id, ids)
            })
            .collect();
        stamp_pci_ids(&mut config.devices, &opened);
        serde_json::to_vec(&config).map_err(|e| HostError::new("encode config", e))
    }

    fn dirty_sources(&mut self) -> Result<Vec<Box<dyn DirtySource>>, HostError> {
        let kvm = crate::dirty::kvm_dirty_source(&self.machine)
            .map_err(|e| HostError::new("create KVM dirty source", e))?;
        let vmm = VmmWriteSource::new(self.machine.ram().memory())
            .map_err(|e| HostError::new("create VMM-write dirty source", e))?;
        let mut sources = vec![kvm, Box::new(vmm) as Box<dyn DirtySource>];
        sources.extend(self.machine.devices().dma_dirty_sources());
        Ok(sources)
    }

    fn populated(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<bool, HostError> {
        let extents = self
            .machine
            .ram()
            .populated(range.start.0, range.len_bytes)
            .map_err(|e| HostError::new("find populated guest memory", e))?;
        for (gpa, len) in extents {
            out.mark_range(vm_memory::GuestAddress(gpa), len)
                .map_err(|e| HostError::new("mark populated guest memory", e))?;
        }
        Ok(true)
    }

    fn pause(&mut self) -> Result<(), HostError> {
        self.steps = StepTimes::start();
        if self.throttle.is_some() {
            self.stop_throttle();
            self.steps.lap("auto-converge throttle stopped");
        }
        let kicks = self.machine.pause_timed(&mut self.steps);
        if kicks > 0 {
            log::info!("switchover: the vCPUs needed {kicks} more kicks to pause");
        }
        Ok(())
    }

    fn pause_devices(&mut self) -> Result<(), HostError> {
        self.steps.restart();
        self.machine
            .devices()
            .pause_dma()
            .map_err(|e| HostError::new("stop device DMA", e))?;
        self.steps.lap("device DMA paused");
        Ok(())
    }

    fn resume(&mut self) -> Result<(), HostError> {
        self.stop_throttle();
        self.machine.resume();
        Ok(())
    }

    fn save_state(&mut self) -> Result<MigrationState, HostError> {
        self.steps.restart();
        let state = self
            .machine
            .save_state(&mut self.steps)
            .map_err(|e| HostError::new("save state", e))?;
        let encoded = encode_state(&state).map_err(|e| HostError::new("encode state", e))?;
        self.steps.lap("encode state");
        Ok(encoded)
    }

    fn device_states(&mut self) -> Result<Vec<Box<dyn DeviceStateSource>>, HostError> {
        self.machine
            .devices()
            .device_states()
            .map_err(|e| HostError::new("open the devices' migration state", e))
    }

    fn handover(&mut self) -> Result<Handover, HostError> {
        let c = self
            .machine
            .devices()
            .handover_collect()
            .map_err(|e| HostError::new("hand the devices to the new process", e))?;
        if !c.devices.is_empty() {
            log::info!("live update: handing over {}", c.devices.join(", "));
        }
        Ok(Handover {
            fds: c
                .fds
                .into_iter()
                .map(|(meta, fd)| HandoverFd { meta, fd })
                .collect(),
            devices: c.devices,
            notes: c.notes,
        })
    }

    fn handover_release(&mut self) -> Result<(), HostError> {
        self.steps.restart();
        self.machine
            .devices()
            .handover_release()
            .map_err(|e| HostError::new("release the devices for the new process", e))?;
        self.steps
            .lap("devices released (irqfds off, DMA addresses)");
        Ok(())
    }

    fn handover_reclaim(&mut self) -> Result<(), HostError> {
        self.machine
            .devices()
            .handover_reclaim()
            .map_err(|e| HostError::new("take the devices back", e))
    }

    fn prepare_switchover(&mut self) {
        // The pause is seconds or less away; the destination is building its VM meanwhile, so
        // this is not on the path the migration waits on (it was, before the config went out).
        super::prefault_code("migration source");
    }

    fn handover_done(&mut self) {
        self.machine.devices().handover_done();
    }

    fn switchover_steps(&mut self) -> Vec<TimedStep> {
        self.steps.take()
    }

    fn throttle(&mut self, percent: u8) -> Result<(), HostError> {
        if percent == 0 {
            self.stop_throttle();
            return Ok(());
        }
        if self.throttle.is_none() {
            self.throttle = Some(
                Throttle::new(self.machine.clone())
                    .map_err(|e| HostError::new("start vCPU throttle", e))?,
            );
        }
        if let Some(t) = &self.throttle {
            t.set(percent);
        }
        Ok(())
    }
}
