//! The destination side: build a machine from the source's config, fill its RAM, restore its state,
//! start it, and hand it to the VMM loop.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tern_devices::vfio::handover::InheritedDevices;
use tern_migration::dirty::GuestPageBitmap;
use tern_migration::engine::{
    DeviceStateSink, HandoverFd, HostError, LocalRegion, MigrationState, MigrationTarget,
    MigrationTargetFactory, StepTimes, SwitchoverStep,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::device_map::{apply_mapping, check_local, LocalDevice};
use super::state_codec::decode_state;
use crate::config::{PciFunctionIds, SerialConfig, VmConfig};
use crate::machine::Machine;
use crate::vstate::memory::GuestRam;

/// Where a started destination machine is handed to the VMM loop.
#[derive(Debug)]
pub struct ReceivedMachine {
    slot: Mutex<Option<Arc<Machine>>>,
    ready: EventFd,
}

impl ReceivedMachine {
    /// An empty slot; `ready` is signalled when a machine arrives.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            slot: Mutex::new(None),
            ready: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }

    /// The eventfd signalled on arrival.
    pub fn ready_fd(&self) -> &EventFd {
        &self.ready
    }

    /// Takes the machine, if one arrived.
    pub fn take(&self) -> Option<Arc<Machine>> {
        let _ = self.ready.read();
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn put(&self, machine: Arc<Machine>) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(machine);
        let _ = self.ready.write(1);
    }
}

/// The source's VM needs more memory than this host has.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the source's VM has {asked_mib} MiB of memory; this host has {available_mib} MiB available \
     (MemAvailable + SwapFree)"
)]
pub struct HostMemoryError {
    pub asked_mib: u64,
    pub available_mib: u64,
}

/// Memory this host can give a new VM now: `MemAvailable` plus `SwapFree` from `/proc/meminfo`.
/// `None` when that cannot be read (then nothing is refused).
pub fn host_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(key))?;
        line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((kib("MemAvailable:")? + kib("SwapFree:").unwrap_or(0)) * 1024)
}

/// Refuses a guest of `memory_bytes` on a host with `available` bytes to give.
pub fn check_host_memory(memory_bytes: u64, available: Option<u64>) -> Result<(), HostMemoryError> {
    match available {
        Some(available) if memory_bytes > available => Err(HostMemoryError {
            asked_mib: memory_bytes >> 20,
            available_mib: available >> 20,
        }),
        _ => Ok(()),
    }
}

/// Builds destination machines for the engine.
#[derive(Debug)]
pub struct TernTargetFactory {
    pub kvm_path: PathBuf,
    /// The destination's own console setting (not the source's).
    pub serial: SerialConfig,
    pub received: Arc<ReceivedMachine>,
    /// This host's device for source passthrough devices, by the source's id (the receive
    /// request's `devices`); the others are opened at the source's path.
    pub devices: Vec<(String, PathBuf)>,
    /// A live update's devices, handed over by the old process before its config arrived.
    pub inherited: Option<InheritedDevices>,
}

/// Test hook (lab): `TERN_TEST_LIVE_UPDATE_EXIT=inherit|take-over|restore` makes a live update's
/// destination exit at once (status 70, no cleanup, as if killed) right after it took the
/// handed descriptors, after it set the DMA addresses, or after the state restore (before Ready).
pub fn test_exit_point(step: &str) {
    if std::env::var("TERN_TEST_LIVE_UPDATE_EXIT").is_ok_and(|s| s == step) {
        eprintln!("tern: TERN_TEST_LIVE_UPDATE_EXIT={step}: exiting now");
        std::process::exit(70);
    }
}

impl MigrationTargetFactory for TernTargetFactory {
    fn inherit(&mut self, fds: Vec<HandoverFd>) -> Result<(), HostError> {
        if fds.is_empty() {
            self.inherited = None;
            return Ok(());
        }
        let set = InheritedDevices::from_fds(fds.into_iter().map(|h| (h.meta, h.fd)).collect())
            .map_err(|e| HostError::new("take the devices handed over", e))?;
        test_exit_point("inherit");
        self.inherited = Some(set);
        Ok(())
    }

    fn create(
        &mut self,
        config: &[u8],
        local: Vec<LocalRegion>,
    ) -> Result<Box<dyn MigrationTarget>, HostError> {
        // The switchover (restore, start) runs code this process has never run.
        super::prefault_code("migration destination");
        let mut config: VmConfig =
            serde_json::from_slice(config).map_err(|e| HostError::new("decode VM config", e))?;
        config.serial = self.serial.clone();
        // Refused here, before the source pauses, with the reason.
        apply_mapping(&mut config.devices, &self.devices)
            .map_err(|e| HostError::new("map the source's passthrough devices", e))?;
        let ram = match local.into_iter().next() {
            // A copy needs memory of its own: refuse a VM this host cannot hold now, with the
            // reason, rather than start a migration the kernel's OOM killer would end.
            None => check_host_memory(config.memory_bytes, host_available_bytes())
                .map_err(|e| HostError::new("reserve guest memory", e))
                .and_then(|()| {
                    GuestRam::new(config.memory_bytes)
                        .map_err(|e| HostError::new("create guest memory", e))
                })?,
            // All of tern's RAM regions live in one memfd, at their file offsets; the first
            // region's file is that memfd.
            Some(first) => GuestRam::from_file(first.file, config.memory_bytes)
                .map_err(|e| HostError::new("map guest memory handed over", e))?,
        };
        // Build the whole VM now, while the source is still iterating, so that the switchover
        // only has to load state.
        let handed = self.inherited.take();
        let live_update = handed.is_some();
        let machine = match handed {
            Some(mut inherited) => {
                Machine::create_inheriting(&self.kvm_path, config, ram, &mut inherited)
            }
            None => Machine::create_incoming(&self.kvm_path, config, ram),
        }
        .map_err(|e| HostError::new("build the incoming VM", e))?;
        let local: Vec<LocalDevice> = machine
            .devices()
            .passthrough_info()
            .into_iter()
            .map(|(d, _)| LocalDevice {
                id: d.id,
                migration: d.migration,
                ids: PciFunctionIds {
                    vendor: d.vendor_id,
                    device: d.device_id,
                },
            })
            .collect();
        if live_update {
            machine.devices().hold_irqfds();
        }
        if !live_update {
            check_local(&machine.config().devices, &local)
                .map_err(|e| HostError::new("check the local passthrough devices", e))?;
        }
        Ok(Box::new(TernTarget {
            machine: Some(Arc::new(machine)),
            received: self.received.clone(),
            live_update,
            steps: StepTimes::start(),
        }))
    }
}

/// One incoming VM, built and waiting for its memory and state.
#[derive(Debug)]
struct TernTarget {
    machine: Option<Arc<Machine>>,
    received: Arc<ReceivedMachine>,
    /// The passthrough devices were handed over by the old process.
    live_update: bool,
    /// The steps of the last restore or start.
    steps: StepTimes,
}

impl TernTarget {
    fn machine(&self, operation: &'static str) -> Result<&Arc<Machine>, HostError> {
        self.machine
            .as_ref()
            .ok_or_else(|| HostError::new(operation, "the incoming VM was already started"))
    }
}

impl MigrationTarget for TernTarget {
    fn guest_memory(&self) -> GuestMemoryMmap<GuestPageBitmap> {
        match &self.machine {
            Some(m) => m.ram().memory().clone(),
            // Only after start(), when the engine no longer writes memory.
            None => GuestMemoryMmap::default(),
        }
    }

    fn restore_state(&mut self, state: MigrationState) -> Result<(), HostError> {
        let mut steps = StepTimes::start();
        let state = decode_state(&state).map_err(|e| HostError::new("decode state", e))?;
        steps.lap("decode state");
        let machine = self.machine("restore state")?;
        if self.live_update {
            // The old process has let go (it is paused): the DMA mappings become ours.
            let moves = machine
                .devices()
                .take_over()
                .map_err(|e| HostError::new("take the handed devices over", e))?;
            steps.lap("take the devices' DMA over");
            for m in moves {
                eprintln!("tern: live update: iommufd: {m}");
            }
            test_exit_point("take-over");
            steps.restart();
        }
        machine
            .restore_state(&state, &mut steps)
            .map_err(|e| HostError::new("restore state", e))?;
        self.steps = steps;
        if self.live_update {
            test_exit_point("restore");
        }
        Ok(())
    }

    fn device_sinks(&mut self) -> Result<Vec<Box<dyn DeviceStateSink>>, HostError> {
        if self.live_update {
            // The devices came as they are: no device state travels.
            return Ok(Vec::new());
        }
        self.machine("open the devices' migration state")?
            .devices()
            .device_sinks()
            .map_err(|e| HostError::new("open the devices' migration state", e))
    }

    fn start(&mut self) -> Result<(), HostError> {
        self.steps = StepTimes::start();
        let machine = self
            .machine
            .take()
            .ok_or_else(|| HostError::new("start", "the incoming VM was already started"))?;
        if self.live_update {
            machine.devices().take_ownership();
            self.steps.lap("irqfds on");
        }
        machine.resume();
        self.steps.lap("vCPUs resumed");
        self.received.put(machine);
        self.steps.lap("VM handed to the VMM loop");
        Ok(())
    }

    fn switchover_steps(&mut self) -> Vec<SwitchoverStep> {
        self.steps.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PayloadConfig;
    use crate::demo::DemoConfig;

    #[test]
    fn a_vm_larger_than_the_host_can_give_is_refused_with_both_sizes() {
        assert_eq!(check_host_memory(1 << 30, Some(2 << 30)), Ok(()));
        assert_eq!(check_host_memory(1 << 30, None), Ok(()));
        let e = check_host_memory(64 << 30, Some(3 << 30)).unwrap_err();
        assert_eq!(
            e,
            HostMemoryError {
                asked_mib: 64 << 10,
                available_mib: 3 << 10
            }
        );
        assert!(e.to_string().contains("65536 MiB"), "{e}");
        assert!(host_available_bytes().is_some_and(|b| b > 0));
    }

    /// A source announcing 16 TiB is refused when its config arrives, before any memory is made.
    #[test]
    fn the_factory_refuses_a_config_announcing_more_memory_than_the_host_has() {
        let config = VmConfig {
            cpus: 1,
            memory_bytes: 16 << 40,
            payload: PayloadConfig::Demo(DemoConfig {
                mib: 8,
                dirty_mib_per_s: 64,
                exit_after_s: None,
            }),
            serial: SerialConfig::Off,
            dirty_tracking: Default::default(),
            devices: Vec::new(),
            mock_dma: Vec::new(),
        };
        let mut factory = TernTargetFactory {
            kvm_path: "/dev/kvm".into(),
            serial: SerialConfig::Off,
            received: ReceivedMachine::new().expect("eventfd"),
            devices: Vec::new(),
            inherited: None,
        };
        let bytes = serde_json::to_vec(&config).expect("config");
        let Err(e) = factory.create(&bytes, Vec::new()) else {
            panic!("a 16 TiB VM was accepted");
        };
        let text = tern_migration::engine::error_chain(&e);
        assert!(text.contains("16777216 MiB of memory"), "{text}");
    }
}
