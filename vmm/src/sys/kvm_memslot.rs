//! KVM_SET_USER_MEMORY_REGION for guest RAM regions that tern maps itself.

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
