//! A running VM: guest RAM, the KVM VM, vCPU threads and platform devices, built from a
//! [`VmConfig`], paused/resumed/saved as one.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tern_devices::vfio::handover::InheritedDevices;
use tern_migration::engine::{StepTimes, TimedStep};

use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::regs::{self, BootEntry};
use crate::arch::x86_64::{cpuid, linux, mptable, msr};
use crate::config::{DirtyTracking, PayloadConfig, VmConfig};
use crate::demo;
use crate::device_manager::{DeviceError, DeviceManager, DeviceStates, PlatformEvents};
use crate::dirty::kvm_ring::{DirtyRings, RING_ENTRIES};
use crate::sys::kvm_dirty_ring::{self, DirtyRingMapping, KvmDirtyRingError};
use crate::vm_base::{MappedVm, VmBase};
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::vcpu::{DirtyRingFullHandler, VcpuHandle, VcpuRunner, VcpuStop, VcpuStopSink};
use crate::vstate::vcpu_state::{VcpuState, VcpuStateError};
use crate::vstate::vm::{Vm, VmError, VmState};

/// Errors building or driving a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("cannot open {path}: is KVM available and may this user use it?")]
    OpenKvm {
        path: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("--cpus {asked} is more than this host's KVM allows ({max})")]
    TooManyCpus { asked: u8, max: usize },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error("cannot create vCPU {index}")]
    CreateVcpu {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot configure vCPU {index}: {what}")]
    ConfigureVcpu { index: u8, what: String },
    #[error("cannot start vCPU thread {index}")]
    SpawnVcpu {
        index: u8,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the TSC frequency from KVM (needed by the demo guest)")]
    TscFrequency(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    #[error(transparent)]
    Msr(#[from] msr::MsrError),
    #[error(transparent)]
    Boot(#[from] linux::LinuxBootError),
    #[error(transparent)]
    Demo(#[from] demo::setup::DemoSetupError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error("vCPU {index} state")]
    VcpuState {
        index: u8,
        #[source]
        source: VcpuStateError,
    },
    #[error("saved state has {saved} vCPUs but the VM has {configured}")]
    VcpuCountMismatch { saved: usize, configured: usize },
    #[error("the thread building the VM ahead of the migration panicked")]
    PrebuildPanicked,
    #[error("cannot wait for VM events")]
    Epoll(#[source] std::io::Error),
    #[error("cannot set up the KVM dirty ring (--dirty-tracking ring)")]
    DirtyRing(#[source] KvmDirtyRingError),
}

/// How a machine ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineExit {
    /// ACPI power-off.
    PowerOff,
    /// i8042 reset, triple fault or KVM shutdown event: tern does not reboot, it exits.
    GuestReset(String),
    /// KVM could not run a vCPU.
    Failed(String),
}

/// The state of a whole VM (not its memory).
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: DeviceStates,
}

/// Collects vCPU stops and wakes the event loop.
#[derive(Debug)]
struct StopSignal {
    event: EventFd,
    stops: Mutex<Vec<VcpuStop>>,
}

impl VcpuStopSink for StopSignal {
    fn vcpu_stopped(&self, stop: VcpuStop) {
        self.stops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(stop);
        let _ = self.event.write(1);
    }
}

/// A built VM.
#[derive(Debug)]
pub struct Machine {
    config: VmConfig,
    // Drop order: vCPUs first (they use the VM and buses), then devices, VM, then RAM.
    vcpus: Vec<VcpuHandle>,
    // Dirty-ring hook: the mapped per-vCPU rings (`--dirty-tracking ring` only).
    dirty_rings: Option<Arc<DirtyRings>>,
    devices: DeviceManager,
    events: PlatformEvents,
    stop: Arc<StopSignal>,
    msr_indices: Vec<u32>,
    vm: Arc<Vm>,
    ram: GuestRam,
    /// How building it on its [`MappedVm`] went, step by step.
    build_steps: StepTimes,
}

/// The largest vCPU count tern accepts on this host.
pub fn max_vcpus(kvm: &Kvm) -> usize {
    kvm.get_max_vcpus()
        .min(usize::from(demo::setup::MAX_DEMO_VCPUS))
}

impl Machine {
    /// Builds a VM from `config` and loads its payload; vCPUs are created but not started.
    pub fn create(kvm_path: &Path, config: VmConfig) -> Result<Self, MachineError> {
        let ram = GuestRam::new(config.memory_bytes)?;
        Self::build(VmBase::build(kvm_path)?.map(ram)?, config, true, None)
    }

    /// Rebuilds a VM from `config`, existing guest RAM and a saved state; vCPUs are created,
    /// restored, and not started.
    pub fn restore(
        kvm_path: &Path,
        config: VmConfig,
        ram: GuestRam,
        state: &MachineState,
    ) -> Result<Self, MachineError> {
        let machine = Self::create_incoming(VmBase::build(kvm_path)?.map(ram)?, config)?;
        machine.restore_state(state, &mut StepTimes::start())?;
        Ok(machine)
    }

    /// Builds a VM that will receive its state later (a migration destination, built on `base`
    /// when the source's config arrives so that the switchover only loads state): no payload,
    /// vCPUs created and not started.
    pub fn create_incoming(base: MappedVm, config: VmConfig) -> Result<Self, MachineError> {
        Self::build(base, config, false, None)
    }

    /// Like [`Machine::create_incoming`] for a live update: the passthrough devices are the ones
    /// the old process handed over (`inherited`), not opened again.
    pub fn create_inheriting(
        base: MappedVm,
        config: VmConfig,
        inherited: &mut InheritedDevices,
    ) -> Result<Self, MachineError> {
        Self::build(base, config, false, Some(inherited))
    }

    /// Loads a saved state into this VM, timing its steps into `steps`. Its vCPUs must be paused
    /// (or never started).
    pub fn restore_state(
        &self,
        state: &MachineState,
        steps: &mut StepTimes,
    ) -> Result<(), MachineError> {
        if state.vcpus.len() != self.vcpus.len() {
            return Err(MachineError::VcpuCountMismatch {
                saved: state.vcpus.len(),
                configured: self.vcpus.len(),
            });
        }
        self.vm.restore_state(&state.vm, steps)?;
        for (handle, s) in self.vcpus.iter().zip(&state.vcpus) {
            handle
                .with_fd(|fd| s.restore(fd, steps))
                .map_err(|source| MachineError::VcpuState {
                    index: handle.index(),
                    source,
                })?;
        }
        self.devices
            .restore(&state.devices, &self.config.serial, steps)?;
        Ok(())
    }

    fn build(
        base: MappedVm,
        config: VmConfig,
        boot: bool,
        inherited: Option<&mut InheritedDevices>,
    ) -> Result<Self, MachineError> {
        let MappedVm {
            kvm,
            vm,
            ram,
            cpuid: base_cpuid,
            steps: _,
        } = base;
        if ram.size_bytes() != config.memory_bytes {
            return Err(MachineError::Memory(MemoryError::FileSizeMismatch {
                expected: config.memory_bytes,
                actual: ram.size_bytes(),
            }));
        }
        let mut steps = StepTimes::sequence();
        let max = max_vcpus(&kvm);
        if usize::from(config.cpus) > max || config.cpus == 0 {
            return Err(MachineError::TooManyCpus {
                asked: config.cpus,
                max,
            });
        }
        let vm = Arc::new(vm);
        // Dirty-ring hook: KVM accepts the ring capability only before the first vCPU exists.
        let ring_bytes = match config.dirty_tracking {
            DirtyTracking::Ring => Some(
                kvm_dirty_ring::enable(vm.fd(), RING_ENTRIES).map_err(MachineError::DirtyRing)?,
            ),
            DirtyTracking::Log => None,
        };
        let mut ring_maps = Vec::new();
        let (mut devices, events) = DeviceManager::new(&vm, config.memory_bytes, &config.serial)?;
        steps.lap("platform devices");
        match inherited {
            Some(inherited) => devices.add_inherited(&ram, &config.devices, inherited)?,
            None => devices.add_passthrough(&ram, &config.devices)?,
        }
        for spec in &config.mock_dma {
            devices.add_mock_dma(&ram, spec)?;
        }
        if !config.devices.is_empty() || !config.mock_dma.is_empty() {
            steps.lap("passthrough devices");
        }
        let mut fds = Vec::with_capacity(usize::from(config.cpus));
        for index in 0..config.cpus {
            let fd = vm
                .fd()
                .create_vcpu(u64::from(index))
                .map_err(|source| MachineError::CreateVcpu { index, source })?;
            if let Some(bytes) = ring_bytes {
                ring_maps.push(
                    DirtyRingMapping::map(&fd, index, bytes).map_err(MachineError::DirtyRing)?,
                );
            }
            fd.set_cpuid2(&cpuid::for_vcpu(&base_cpuid, index, config.cpus))
                .map_err(|e| MachineError::ConfigureVcpu {
                    index,
                    what: format!("CPUID: {e}"),
                })?;
            fds.push(fd);
        }
        let dirty_rings =
            ring_bytes.map(|_| Arc::new(DirtyRings::new(vm.clone(), &ram, ring_maps)));
        steps.lap("vCPUs and CPUID");
        let msr_indices = match fds.first() {
            Some(fd) => msr::saveable_msr_indices(&kvm, fd)?,
            None => Vec::new(),
        };
        steps.lap("saveable MSRs");

        if boot {
            let entries = load_payload(&config, &ram, &fds)?;
            for (fd, entry) in fds.iter().zip(&entries) {
                regs::setup_vcpu(fd, entry)?;
                msr::write(fd, &msr::boot_msrs())?;
            }
        }

        let stop = Arc::new(StopSignal {
            event: EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::Epoll)?,
            stops: Mutex::new(Vec::new()),
        });
        let mut vcpus = Vec::with_capacity(fds.len());
        for (index, fd) in fds.into_iter().enumerate() {
            let index = index as u8;
            let runner = VcpuRunner {
                index,
                fd,
                pio: devices.pio(),
                mmio: devices.mmio(),
                stop_sink: stop.clone(),
                dirty_ring: dirty_rings
                    .clone()
                    .map(|r| r as Arc<dyn DirtyRingFullHandler>),
            };
            // New VMs start paused too; `start` lets them run once everything is in place.
            let handle = VcpuHandle::spawn(runner, true)
                .map_err(|source| MachineError::SpawnVcpu { index, source })?;
            vcpus.push(handle);
        }
        steps.lap("vCPU threads");
        Ok(Self {
            config,
            vcpus,
            dirty_rings,
            devices,
            events,
            stop,
            msr_indices,
            vm,
            ram,
            build_steps: steps,
        })
    }

    /// Lets every device's DMA and then every vCPU run.
    pub fn resume(&self) {
        if let Err(e) = self.devices.resume_dma() {
            eprintln!("tern: warning: {e}");
        }
        for v in &self.vcpus {
            v.resume();
        }
    }

    /// Stops every vCPU and waits until none is inside KVM_RUN.
    pub fn pause(&self) {
        self.pause_timed(&mut StepTimes::start());
    }

    /// [`Machine::pause`], timing the kicks and the wait into `steps`; returns how many times a
    /// vCPU had to be kicked again.
    pub fn pause_timed(&self, steps: &mut StepTimes) -> u32 {
        for v in &self.vcpus {
            v.request_pause();
        }
        steps.lap("vCPUs kicked");
        let kicks = self.vcpus.iter().map(|v| v.wait_paused()).sum();
        steps.lap("vCPUs out of KVM_RUN");
        kicks
    }

    /// Saves vCPU, VM and device state, timing its steps into `steps`. The machine must be
    /// paused.
    pub fn save_state(&self, steps: &mut StepTimes) -> Result<MachineState, MachineError> {
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| {
                v.with_fd(|fd| VcpuState::save(fd, &self.msr_indices, steps))
                    .map_err(|source| MachineError::VcpuState {
                        index: v.index(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vm = self.vm.save_state(steps)?;
        let devices = self.devices.save()?;
        steps.lap("devices");
        Ok(MachineState { vcpus, vm, devices })
    }

    /// How building this machine on its [`MappedVm`] went, step by step (µs).
    pub fn build_steps(&self) -> &[TimedStep] {
        self.build_steps.steps()
    }

    /// The VM's configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The VM's devices.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The KVM VM, shared (dirty-log sources keep it while a migration runs).
    pub fn vm_shared(&self) -> Arc<Vm> {
        self.vm.clone()
    }

    /// The KVM dirty rings, when the VM was built with `--dirty-tracking ring`.
    pub fn dirty_rings(&self) -> Option<&Arc<DirtyRings>> {
        self.dirty_rings.as_ref()
    }

    /// The vCPU threads.
    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// File descriptors that become readable when the machine needs attention (guest power-off,
    /// reset, vCPU stop). [`Machine::check_exit`] says what happened.
    pub fn exit_fds(&self) -> [i32; 3] {
        [
            self.events.power_off.as_raw_fd(),
            self.events.reset.as_raw_fd(),
            self.stop.event.as_raw_fd(),
        ]
    }

    /// Whether the guest has ended, consuming the pending events.
    pub fn check_exit(&self) -> Option<MachineExit> {
        if self.events.power_off.read().is_ok() {
            return Some(MachineExit::PowerOff);
        }
        if self.events.reset.read().is_ok() {
            return Some(MachineExit::GuestReset("i8042 reset".into()));
        }
        if self.stop.event.read().is_ok() {
            let stops = self.stop.stops.lock().unwrap_or_else(|p| p.into_inner());
            return stops.first().map(|s| match s {
                VcpuStop::GuestShutdown { vcpu, reason } => {
                    MachineExit::GuestReset(format!("vCPU {vcpu}: {reason}"))
                }
                VcpuStop::Failed { vcpu, reason } => {
                    MachineExit::Failed(format!("vCPU {vcpu}: {reason}"))
                }
            });
        }
        None
    }
}

/// Loads the configured payload and returns each vCPU's entry.
fn load_payload(
    config: &VmConfig,
    ram: &GuestRam,
    fds: &[kvm_ioctls::VcpuFd],
) -> Result<Vec<BootEntry>, MachineError> {
    let mem = ram.memory();
    mptable::write(mem, config.cpus)?;
    match &config.payload {
        PayloadConfig::Demo(demo_config) => {
            let tsc_khz = fds
                .first()
                .map(|fd| fd.get_tsc_khz())
                .transpose()
                .map_err(MachineError::TscFrequency)?
                .unwrap_or(0);
            let entries =
                demo::setup::load(mem, demo_config, config.cpus, ram.low_ram_end(), tsc_khz)?;
            let entries: Vec<_> = entries.into_iter().map(BootEntry::Demo).collect();
            if let Some(first) = entries.first() {
                regs::write_boot_tables(mem, first)?;
            }
            Ok(entries)
        }
        PayloadConfig::Kernel { .. } => {
            let boot = config
                .payload
                .kernel_boot()
                .expect("kernel payload has a kernel boot");
            let entry = linux::load(mem, ram.ranges(), &boot)?;
            regs::write_boot_tables(mem, &entry)?;
            // Only the boot vCPU starts at the kernel entry; the others wait for INIT/SIPI, which
            // KVM's in-kernel LAPIC handles (their mp_state is UNINITIALIZED).
            Ok(std::iter::once(entry)
                .chain(std::iter::repeat_n(
                    BootEntry::Ap,
                    fds.len().saturating_sub(1),
                ))
                .collect())
        }
    }
}
