//! The part of a VM that no configuration changes: the `/dev/kvm` handle, a KVM VM with its TSS,
//! in-kernel irqchip and PIT, and KVM's supported CPUID. Every machine is built on one
//! ([`crate::machine::Machine`]); a migration destination builds it from the moment
//! `vm.receive-migration` is requested, while the source connects, so that the source's wait for
//! the destination's VM (and with it a local migration's total time) no longer includes it.
//!
//! It holds no guest memory and no vCPU: the dirty ring (`--dirty-tracking ring`) can still be
//! enabled on it, and any config the source sends fits it. [`VmBase::map`] then registers guest
//! memory in it ([`MappedVm`]); a local migration's destination does that as soon as the source's
//! memory fd arrives, before the config, on a thread of its own.

use std::path::Path;

use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VmFd};

use crate::arch::x86_64::cpuid;
use crate::machine::MachineError;
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu;
use crate::vstate::vm::Vm;
use tern_migration::engine::{StepTimes, TimedStep};

/// A KVM VM without memory, vCPUs or devices.
#[derive(Debug)]
pub struct VmBase {
    pub(crate) kvm: Kvm,
    pub(crate) vm: VmFd,
    pub(crate) cpuid: CpuId,
    /// How long each part took (µs), in order.
    pub(crate) steps: StepTimes,
}

fn open_kvm(path: &Path) -> Result<Kvm, MachineError> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        MachineError::OpenKvm {
            path: path.display().to_string(),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        }
    })?;
    Kvm::new_with_path(&c_path).map_err(|source| MachineError::OpenKvm {
        path: path.display().to_string(),
        source,
    })
}

impl VmBase {
    /// Opens `kvm_path` and creates the VM.
    pub fn build(kvm_path: &Path) -> Result<Self, MachineError> {
        let mut steps = StepTimes::sequence();
        let kvm = open_kvm(kvm_path)?;
        vcpu::register_kick_signal().map_err(|e| MachineError::SpawnVcpu {
            index: 0,
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        steps.lap("open KVM");
        let vm = Vm::create_fd(&kvm)?;
        steps.lap("KVM VM, irqchip, PIT");
        let cpuid = cpuid::supported(&kvm)?;
        steps.lap("supported CPUID");
        Ok(Self {
            kvm,
            vm,
            cpuid,
            steps,
        })
    }

    /// What building it took, step by step (µs).
    pub fn steps(&self) -> &[TimedStep] {
        self.steps.steps()
    }

    /// Registers `ram` as the VM's memory slots.
    pub fn map(self, ram: GuestRam) -> Result<MappedVm, MachineError> {
        let mut steps = StepTimes::sequence();
        let vm = Vm::with_fd(self.vm, &ram)?;
        steps.lap("memory slots");
        Ok(MappedVm {
            kvm: self.kvm,
            vm,
            ram,
            cpuid: self.cpuid,
            steps,
        })
    }
}

/// A [`VmBase`] with its guest memory registered: what [`crate::machine::Machine`] builds on.
#[derive(Debug)]
pub struct MappedVm {
    pub(crate) kvm: Kvm,
    pub(crate) vm: Vm,
    pub(crate) ram: GuestRam,
    pub(crate) cpuid: CpuId,
    /// How mapping the memory took, step by step (µs).
    pub(crate) steps: StepTimes,
}

impl MappedVm {
    /// What building it took, step by step (µs).
    pub fn steps(&self) -> &[TimedStep] {
        self.steps.steps()
    }

    /// The guest memory.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }
}
