//! The KVM VM: memory slots, in-kernel irqchip and PIT, and their saveable state.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use tern_migration::engine::StepTimes;
use vm_memory::GuestMemoryBackend as _;

use super::memory::{GuestMemory, GuestRam};
use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

/// Errors creating or driving the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create a KVM VM")]
    Create(#[source] kvm_ioctls::Error),
    #[error("cannot {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register guest memory slot {slot} at {gpa:#x}")]
    MemorySlot {
        slot: u32,
        gpa: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot {what} VM state")]
    State {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Saved interrupt controllers, PIT and kvmclock, each KVM struct as one hex string of its bytes
/// ([`super::kvm_blob`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    #[serde(with = "super::kvm_blob")]
    pub pic_master: kvm_irqchip,
    #[serde(with = "super::kvm_blob")]
    pub pic_slave: kvm_irqchip,
    #[serde(with = "super::kvm_blob")]
    pub ioapic: kvm_irqchip,
    #[serde(with = "super::kvm_blob")]
    pub pit: kvm_pit_state2,
    #[serde(with = "super::kvm_blob")]
    pub clock: kvm_clock_data,
}

/// A KVM VM with its guest memory registered.
#[derive(Debug)]
pub struct Vm {
    // Field order matters: `fd` is closed (and its memory slots with it) before `memory`'s mappings
    // are dropped.
    fd: VmFd,
    memory: GuestMemory,
    slot_count: u32,
}

impl Vm {
    /// Creates the VM, its irqchip and PIT, and maps `ram` into it.
    pub fn new(kvm: &Kvm, ram: &GuestRam) -> Result<Self, VmError> {
        Self::with_fd(Self::create_fd(kvm)?, ram)
    }

    /// Creates a KVM VM with its TSS, in-kernel irqchip and PIT: what every tern VM has, whatever
    /// its config (a migration destination builds it before the source's config arrives).
    pub fn create_fd(kvm: &Kvm) -> Result<VmFd, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        let setup = |what| move |source| VmError::Setup { what, source };
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(setup("set the TSS address"))?;
        fd.create_irq_chip()
            .map_err(setup("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(setup("create the in-kernel PIT"))?;
        Ok(fd)
    }

    /// Maps `ram` into a VM from [`Vm::create_fd`] that has no memory slots yet.
    pub fn with_fd(fd: VmFd, ram: &GuestRam) -> Result<Self, VmError> {
        let mut vm = Self {
            fd,
            memory: ram.memory().clone(),
            slot_count: 0,
        };
        vm.set_dirty_logging(false)?;
        vm.slot_count = ram.memory().num_regions() as u32;
        Ok(vm)
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Number of RAM memory slots (slot i = RAM region i).
    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }

    /// Turns KVM dirty-page logging on or off for every RAM slot.
    pub fn set_dirty_logging(&self, enabled: bool) -> Result<(), VmError> {
        let flags = if enabled {
            crate::sys::kvm_memslot::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            #[allow(unsafe_code)]
            // SAFETY: `region` belongs to `self.memory`, which `self` owns and drops only after `fd`
            // (field order), so the mapping outlives the slot.
            unsafe { crate::sys::kvm_memslot::set_region(&self.fd, slot, region, flags) }.map_err(
                |source| VmError::MemorySlot {
                    slot,
                    gpa: vm_memory::GuestMemoryRegion::start_addr(region).0,
                    source,
                },
            )?;
        }
        Ok(())
    }

    fn irqchip(&self, chip_id: u32) -> Result<kvm_irqchip, VmError> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(|source| VmError::State {
                what: "read irqchip",
                source,
            })?;
        Ok(chip)
    }

    /// Reads the interrupt controllers, PIT and clock, each ioctl group timed into `steps`.
    /// vCPUs must be paused.
    pub fn save_state(&self, steps: &mut StepTimes) -> Result<VmState, VmError> {
        let err = |what| move |source| VmError::State { what, source };
        let pic_master = self.irqchip(KVM_IRQCHIP_PIC_MASTER)?;
        let pic_slave = self.irqchip(KVM_IRQCHIP_PIC_SLAVE)?;
        let ioapic = self.irqchip(KVM_IRQCHIP_IOAPIC)?;
        steps.lap("VM irqchips");
        let pit = self.fd.get_pit2().map_err(err("read PIT"))?;
        steps.lap("VM PIT");
        let clock = self.fd.get_clock().map_err(err("read kvmclock"))?;
        steps.lap("VM kvmclock");
        Ok(VmState {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
        })
    }

    /// Loads state saved by [`Vm::save_state`], each ioctl group timed into `steps`. vCPUs must
    /// not be running.
    pub fn restore_state(&self, state: &VmState, steps: &mut StepTimes) -> Result<(), VmError> {
        let err = |what| move |source| VmError::State { what, source };
        self.fd
            .set_irqchip(&state.pic_master)
            .map_err(err("restore PIC master"))?;
        self.fd
            .set_irqchip(&state.pic_slave)
            .map_err(err("restore PIC slave"))?;
        self.fd
            .set_irqchip(&state.ioapic)
            .map_err(err("restore IOAPIC"))?;
        steps.lap("VM irqchips");
        self.fd.set_pit2(&state.pit).map_err(err("restore PIT"))?;
        steps.lap("VM PIT");
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(err("restore kvmclock"))?;
        steps.lap("VM kvmclock");
        Ok(())
    }
}
