//! The destination side: build a machine from the source's config, fill its RAM, restore its state,
//! start it, and hand it to the VMM loop.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tern_devices::vfio::handover::InheritedDevices;
use tern_migration::dirty::GuestPageBitmap;
use tern_migration::engine::{
    DeviceStateSink, HandoverFd, HostError, LocalRegion, MigrationState, MigrationTarget,
    MigrationTargetFactory, StepTimes, TimedStep,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::device_map::{apply_mapping, check_local, LocalDevice};
use super::state_codec::decode_state;
use crate::config::{PciFunctionIds, SerialConfig, VmConfig};
use crate::machine::{Machine, MachineError};
use crate::vm_base::{MappedVm, VmBase};
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
    /// The KVM VM being built since the receive request ([`TernTargetFactory::prebuild`]), on a
    /// thread of its own while the source connects; taken by the first `create` (or
    /// `local_memory`), which builds one itself when there is none.
    pub base: Option<JoinHandle<Result<VmBase, MachineError>>>,
    /// `base` with the source's memory fd mapped in and registered as memory slots the moment
    /// that fd arrived (local mode), on the receiving thread before it reads the config: a
    /// thread of its own started 0.1-2 ms late on a busy host, more than the device and vCPU
    /// build it would have overlapped. `create` builds on it.
    pub mapped: Option<MappedVm>,
    /// The code prefault started with `base`.
    prefault: Option<JoinHandle<()>>,
    /// The steps of the last `create`, for the stats.
    steps: Vec<TimedStep>,
    /// What `base` took, once joined, for the stats.
    prebuilt: Vec<TimedStep>,
}

/// Waits for the VM being built ahead.
fn join_base(h: JoinHandle<Result<VmBase, MachineError>>) -> Result<VmBase, MachineError> {
    h.join().unwrap_or(Err(MachineError::PrebuildPanicked))
}

/// The VMM's build steps for the stats, each name after `prefix`.
fn timed_steps(prefix: &str, steps: &[TimedStep]) -> Vec<TimedStep> {
    steps
        .iter()
        .map(|s| TimedStep {
            name: format!("{prefix}{}", s.name),
            us: s.us,
        })
        .collect()
}

impl Drop for TernTargetFactory {
    fn drop(&mut self) {
        // A receive that ends before its config: the VM being mapped goes now, not whenever its
        // thread ends.
        if let Some(h) = self.base.take() {
            let _ = h.join();
        }
        if let Some(h) = self.prefault.take() {
            let _ = h.join();
        }
    }
}

impl TernTargetFactory {
    /// A factory for one receive; nothing built yet.
    pub fn new(
        kvm_path: PathBuf,
        serial: SerialConfig,
        received: Arc<ReceivedMachine>,
        devices: Vec<(String, PathBuf)>,
    ) -> Self {
        Self {
            kvm_path,
            serial,
            received,
            devices,
            inherited: None,
            base: None,
            mapped: None,
            prefault: None,
            steps: Vec::new(),
            prebuilt: Vec::new(),
        }
    }

    /// Starts building what does not depend on the source's config (the KVM VM, its irqchip and
    /// PIT, KVM's CPUID) and mapping this process's code, each on a thread of its own, so that
    /// neither delays the source's connection nor is waited for after its config. A thread that
    /// cannot start is only logged: `create` then does the work itself.
    pub fn prebuild(&mut self) {
        let kvm_path = self.kvm_path.clone();
        match std::thread::Builder::new()
            .name("tern-mig-prebuild".into())
            .spawn(move || VmBase::build(&kvm_path))
        {
            Ok(h) => self.base = Some(h),
            Err(e) => log::warn!("cannot build the KVM VM ahead of the migration: {e}"),
        }
        // The switchover (restore, start) runs code this process has never run.
        match std::thread::Builder::new()
            .name("tern-mig-prefault".into())
            .spawn(|| super::prefault_code("migration destination"))
        {
            Ok(h) => self.prefault = Some(h),
            Err(e) => log::warn!("cannot map the code ahead of the migration: {e}"),
        }
    }
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
    fn setup_steps(&mut self) -> Vec<TimedStep> {
        std::mem::take(&mut self.steps)
    }

    fn local_memory(&mut self, region: &LocalRegion) -> Result<(), HostError> {
        // All of tern's RAM regions live in one memfd: the first region's file is all it takes.
        if self.mapped.is_some() {
            return Ok(());
        }
        let Some(base) = self.base.take() else {
            return Ok(());
        };
        let mut steps = StepTimes::sequence();
        let base = join_base(base).map_err(|e| HostError::new("build the incoming VM", e))?;
        steps.lap("wait for the VM built alongside");
        self.prebuilt = timed_steps("alongside: ", base.steps());
        const MAP: &str = "map guest memory handed over";
        let file = region
            .file
            .try_clone()
            .map_err(|e| HostError::new(MAP, e))?;
        let len = file.metadata().map_err(|e| HostError::new(MAP, e))?.len();
        let ram = GuestRam::from_file(file, len).map_err(|e| HostError::new(MAP, e))?;
        steps.lap("map the memory fd");
        // The memory slots' registration waits for a grace period (milliseconds on a busy
        // host): it starts here, as early as it can, and the config waits in the socket.
        let mapped = base.map(ram).map_err(|e| HostError::new(MAP, e))?;
        steps.extend(mapped.steps());
        self.steps = steps.take();
        self.mapped = Some(mapped);
        Ok(())
    }

    fn prebuilt_steps(&mut self) -> Vec<TimedStep> {
        std::mem::take(&mut self.prebuilt)
    }

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
        if self.prefault.is_none() {
            // Not mapped ahead: the switchover (restore, start) runs code this process has never
            // run.
            super::prefault_code("migration destination");
        }
        let mut steps = StepTimes::sequence();
        let mut config: VmConfig =
            serde_json::from_slice(config).map_err(|e| HostError::new("decode VM config", e))?;
        config.serial = self.serial.clone();
        // Refused here, before the source pauses, with the reason.
        apply_mapping(&mut config.devices, &self.devices)
            .map_err(|e| HostError::new("map the source's passthrough devices", e))?;
        let mapped = match self.mapped.take() {
            // Local mode with a prebuilt VM: mapped as the memory fd arrived.
            Some(mapped) => {
                steps.lap("config");
                mapped
            }
            None => {
                let ram = match local.into_iter().next() {
                    // A copy needs memory of its own: refuse a VM this host cannot hold now, with
                    // the reason, rather than start a migration the kernel's OOM killer would end.
                    None => check_host_memory(config.memory_bytes, host_available_bytes())
                        .map_err(|e| HostError::new("reserve guest memory", e))
                        .and_then(|()| {
                            GuestRam::new(config.memory_bytes)
                                .map_err(|e| HostError::new("create guest memory", e))
                        })?,
                    // All of tern's RAM regions live in one memfd, at their file offsets; the
                    // first region's file is that memfd.
                    Some(first) => GuestRam::from_file(first.file, config.memory_bytes)
                        .map_err(|e| HostError::new("map guest memory handed over", e))?,
                };
                steps.lap("config and guest memory");
                let base = match self.base.take() {
                    Some(h) => {
                        let base =
                            join_base(h).map_err(|e| HostError::new("build the incoming VM", e))?;
                        steps.lap("wait for the VM built alongside");
                        self.prebuilt = timed_steps("alongside: ", base.steps());
                        base
                    }
                    None => {
                        let base = VmBase::build(&self.kvm_path)
                            .map_err(|e| HostError::new("build the incoming VM", e))?;
                        steps.extend(base.steps());
                        base
                    }
                };
                let mapped = base
                    .map(ram)
                    .map_err(|e| HostError::new("build the incoming VM", e))?;
                steps.extend(mapped.steps());
                mapped
            }
        };
        // Build the whole VM now, while the source is still iterating, so that the switchover
        // only has to load state.
        let handed = self.inherited.take();
        let live_update = handed.is_some();
        let machine = match handed {
            Some(mut inherited) => Machine::create_inheriting(mapped, config, &mut inherited),
            None => Machine::create_incoming(mapped, config),
        }
        .map_err(|e| HostError::new("build the incoming VM", e))?;
        steps.extend(machine.build_steps());
        steps.restart();
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
        steps.lap("check the devices");
        self.steps = steps.take();
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

    fn switchover_steps(&mut self) -> Vec<TimedStep> {
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
        let mut factory = TernTargetFactory::new(
            "/dev/kvm".into(),
            SerialConfig::Off,
            ReceivedMachine::new().expect("eventfd"),
            Vec::new(),
        );
        let bytes = serde_json::to_vec(&config).expect("config");
        let Err(e) = factory.create(&bytes, Vec::new()) else {
            panic!("a 16 TiB VM was accepted");
        };
        let text = tern_migration::engine::error_chain(&e);
        assert!(text.contains("16777216 MiB of memory"), "{text}");
    }
}
