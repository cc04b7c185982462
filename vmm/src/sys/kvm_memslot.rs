//! KVM_SET_USER_MEMORY_REGION for guest RAM regions that tern maps itself and for device mappings
//! (VFIO BARs) put straight into the guest.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

/// Dirty-page logging flag of a memory slot.
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;

/// Installs (or updates the flags of) memory slot `slot` backed by `region`.
///
/// # Safety
/// The host mapping behind `region` must stay mapped for as long as the slot exists in `vm`
/// (until the slot is deleted or `vm` is closed). tern upholds it by keeping a clone of the guest
/// memory (which shares the mapping through an `Arc`) inside the object that owns `vm`, dropped after it.
pub unsafe fn set_region<B: vm_memory::bitmap::Bitmap>(
    vm: &VmFd,
    slot: u32,
    region: &GuestRegionMmap<B>,
    flags: u32,
) -> Result<(), kvm_ioctls::Error> {
    let desc = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: region.start_addr().0,
        memory_size: region.len(),
        userspace_addr: region.as_ptr() as u64,
    };
    // SAFETY: `desc` describes exactly the live mapping of `region` (its pointer and length), and the
    // caller guarantees that mapping outlives the slot, so KVM never touches unmapped host memory.
    unsafe { vm.set_user_memory_region(desc) }
}

/// A memory slot backed by a device mapping (a VFIO BAR part) instead of guest RAM: guest accesses
/// reach the device without an exit. Deleted on drop, before the mapping it keeps alive is released.
#[derive(Debug)]
pub struct DeviceSlot {
    vm: std::sync::Arc<crate::vstate::vm::Vm>,
    slot: u32,
    gpa: u64,
    mapping: std::sync::Arc<tern_devices::sys::vfio_region_mmap::RegionMapping>,
}

impl DeviceSlot {
    /// Installs memory slot `slot` with all of `mapping` at guest address `gpa`.
    pub fn new(
        vm: std::sync::Arc<crate::vstate::vm::Vm>,
        slot: u32,
        gpa: u64,
        mapping: std::sync::Arc<tern_devices::sys::vfio_region_mmap::RegionMapping>,
    ) -> Result<Self, kvm_ioctls::Error> {
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: mapping.len(),
            userspace_addr: mapping.host_addr(),
        };
        // SAFETY: `desc` describes exactly the live mapping (its address and length), and the
        // returned value holds an `Arc` to that mapping until its drop has deleted the slot, so KVM
        // never maps host memory that is gone.
        unsafe { vm.fd().set_user_memory_region(desc) }?;
        Ok(Self {
            vm,
            slot,
            gpa,
            mapping,
        })
    }

    /// The slot number.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Guest address and length.
    pub fn range(&self) -> (u64, u64) {
        (self.gpa, self.mapping.len())
    }
}

impl Drop for DeviceSlot {
    fn drop(&mut self) {
        let desc = kvm_userspace_memory_region {
            slot: self.slot,
            memory_size: 0,
            ..Default::default()
        };
        // SAFETY: a zero-sized region deletes the slot; it installs no host memory.
        if let Err(e) = unsafe { self.vm.fd().set_user_memory_region(desc) } {
            // KVM may still map the pages: keep them mapped for good rather than free them.
            log::warn!("cannot delete memory slot {}: {e}", self.slot);
            std::mem::forget(self.mapping.clone());
        }
    }
}
