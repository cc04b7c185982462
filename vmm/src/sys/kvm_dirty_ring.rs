//! The KVM dirty ring (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`), which kvm-ioctls lacks: enabling it,
//! mapping each vCPU's ring, harvesting entries and `KVM_RESET_DIRTY_RINGS`.
//!
//! Each vCPU has a ring of `kvm_dirty_gfn { flags, slot, offset }` entries in memory shared with
//! the kernel. Protocol (Documentation/virt/kvm/api.rst, "KVM_CAP_DIRTY_LOG_RING"):
//!
//! ```text
//! kernel:    writes slot/offset, then flags = DIRTY          (release)
//! userspace: sees flags & DIRTY (acquire) → reads slot/offset → flags = RESET (release), next entry
//! userspace: KVM_RESET_DIRTY_RINGS → the kernel re-protects every RESET page and recycles the entries
//! ```
//! When a ring reaches its soft limit the vCPU exits with `KVM_EXIT_DIRTY_RING_FULL` and cannot
//! re-enter the guest until its ring has been harvested and reset.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVMIO, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;

vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// Entry flag: the kernel published this entry.
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// Entry flag: userspace collected this entry; KVM_RESET_DIRTY_RINGS may recycle it.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;
/// Bytes per ring entry.
pub const ENTRY_BYTES: u64 = std::mem::size_of::<kvm_dirty_gfn>() as u64;

/// Errors of the dirty-ring uAPI.
#[derive(Debug, thiserror::Error)]
pub enum KvmDirtyRingError {
    /// This host's KVM has no dirty ring.
    #[error(
        "dirty ring mode needs KVM_CAP_DIRTY_LOG_RING (or _ACQ_REL), which this host's KVM does \
         not offer; use --dirty-tracking log"
    )]
    Unsupported,
    /// KVM_ENABLE_CAP failed.
    #[error("cannot enable the KVM dirty ring ({bytes} bytes per vCPU, capability {cap})")]
    Enable {
        /// Capability number used.
        cap: u32,
        /// Ring size asked for.
        bytes: u64,
        /// errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// mmap of a vCPU's ring failed.
    #[error("cannot map the dirty ring of vCPU {vcpu} ({bytes} bytes)")]
    Map {
        /// vCPU index.
        vcpu: u8,
        /// Ring size.
        bytes: u64,
        /// errno.
        #[source]
        source: std::io::Error,
    },
    /// KVM_RESET_DIRTY_RINGS failed.
    #[error("KVM_RESET_DIRTY_RINGS")]
    Reset(#[source] kvm_ioctls::Error),
}

/// Which capability and how many bytes per vCPU ring this host allows, if any. The ACQ_REL flavour
/// is preferred (it is the one that also exists on weakly ordered hosts; on x86 both behave alike).
pub fn supported(vm: &VmFd) -> Option<(u32, u64)> {
    [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .into_iter()
        .find_map(|cap| {
            let max = vm.check_extension_raw(libc::c_ulong::from(cap));
            u64::try_from(max).ok().filter(|&m| m > 0).map(|m| (cap, m))
        })
}

/// Enables the dirty ring with about `wanted_entries` entries per vCPU (rounded down to a power
/// of two, clamped to what the host allows and to at least one page). Must run before any vCPU
/// is created. Returns the ring size in bytes.
pub fn enable(vm: &VmFd, wanted_entries: u64) -> Result<u64, KvmDirtyRingError> {
    let (cap, max_bytes) = supported(vm).ok_or(KvmDirtyRingError::Unsupported)?;
    let page = host_page_size();
    let wanted = wanted_entries.saturating_mul(ENTRY_BYTES).max(page);
    let mut bytes = 1u64 << (63 - wanted.leading_zeros());
    if bytes > max_bytes {
        bytes = 1u64 << (63 - max_bytes.leading_zeros());
    }
    let enable = kvm_enable_cap {
        cap,
        args: [bytes, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&enable)
        .map_err(|source| KvmDirtyRingError::Enable { cap, bytes, source })?;
    Ok(bytes)
}

/// Re-arms every page whose entry was marked RESET, on all vCPUs' rings; returns how many entries
/// the kernel recycled.
pub fn reset_dirty_rings(vm: &VmFd) -> Result<u32, KvmDirtyRingError> {
    // SAFETY: `vm` is a KVM VM fd (the type says so), the fd KVM_RESET_DIRTY_RINGS is defined on;
    // the ioctl takes no argument, so no user memory is read or written by it.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    u32::try_from(ret).map_err(|_| KvmDirtyRingError::Reset(kvm_ioctls::Error::last()))
}

fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory effects; _SC_PAGESIZE is always valid.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096)
}

/// One vCPU's dirty ring, mapped; unmapped on drop.
#[derive(Debug)]
pub struct DirtyRingMapping {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    bytes: usize,
    /// Next entry to look at (free-running; the slot is `fetch % entries`).
    fetch: u32,
}

// SAFETY: the mapping is plain shared memory owned by this value (no thread-local state); all
// access to the entries goes through `&mut self` (harvest), and the kernel's concurrent writes are
// synchronised by the flags protocol with atomics, so moving the owner to another thread is sound.
unsafe impl Send for DirtyRingMapping {}

impl DirtyRingMapping {
    /// Maps the ring of `vcpu` (index `index`, for errors), `bytes` long as passed to [`enable`].
    pub fn map(vcpu: &VcpuFd, index: u8, bytes: u64) -> Result<Self, KvmDirtyRingError> {
        let map_err = |source| KvmDirtyRingError::Map {
            vcpu: index,
            bytes,
            source,
        };
        let len = usize::try_from(bytes)
            .map_err(|_| map_err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        let entries = u32::try_from(bytes / ENTRY_BYTES)
            .ok()
            .filter(|e| e.is_power_of_two())
            .ok_or_else(|| map_err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        let offset = libc::off_t::try_from(u64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * host_page_size())
            .map_err(|_| map_err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: a fresh shared mapping chosen by the kernel (addr = NULL), so it cannot alias any
        // Rust object. `vcpu` is a KVM vCPU fd whose ring lives at page KVM_DIRTY_LOG_PAGE_OFFSET,
        // and `len` is the ring size given to KVM_ENABLE_CAP, so the whole range is backed. The
        // mapping keeps its own reference to the vCPU file, so it stays valid even if the fd is
        // closed before this value is dropped.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<kvm_dirty_gfn>())
            .ok_or_else(|| map_err(std::io::Error::from_raw_os_error(libc::EFAULT)))?;
        Ok(Self {
            base,
            entries,
            bytes: len,
            fetch: 0,
        })
    }

    /// Entries in the ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Collects every published entry in order, calling `f(slot, offset)` for each and marking it
    /// RESET; returns how many were collected. The pages are re-armed only by
    /// [`reset_dirty_rings`] afterwards.
    pub fn harvest(&mut self, mut f: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        while n < self.entries {
            let index = (self.fetch % self.entries) as usize;
            // SAFETY: `index < entries`, and `entries * ENTRY_BYTES == bytes` is the mapped length,
            // so the entry lies inside the live mapping owned by `self`.
            let entry = unsafe { self.base.as_ptr().add(index) };
            // SAFETY: `flags` is the first u32 of a 16-byte aligned kvm_dirty_gfn inside the
            // mapping; AtomicU32 has the layout of u32, and the kernel only ever accesses this word
            // atomically too (smp_load_acquire/smp_store_release), so an atomic view is sound.
            let flags = unsafe { &*std::ptr::addr_of!((*entry).flags).cast::<AtomicU32>() };
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: inside the mapping (see above); the acquire load of DIRTY orders these reads
            // after the kernel's writes of slot and offset, and the kernel does not touch the entry
            // again until we set RESET and call KVM_RESET_DIRTY_RINGS.
            let (slot, offset) = unsafe {
                (
                    std::ptr::addr_of!((*entry).slot).read_volatile(),
                    std::ptr::addr_of!((*entry).offset).read_volatile(),
                )
            };
            f(slot, offset);
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for DirtyRingMapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`bytes` are exactly the mapping created in `map`, owned by `self` and
        // unmapped only here; no reference into it outlives `&mut self` borrows.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmFd {
        let kvm = kvm_ioctls::Kvm::new().expect("these tests need /dev/kvm");
        kvm.create_vm().expect("create VM")
    }

    #[test]
    fn ring_is_refused_once_a_vcpu_exists() {
        let vm = vm();
        let _vcpu = vm.create_vcpu(0).expect("create vCPU");
        match (supported(&vm), enable(&vm, 4096)) {
            (None, Err(KvmDirtyRingError::Unsupported)) => {}
            (Some((cap, _)), Err(KvmDirtyRingError::Enable { cap: c, source, .. })) => {
                assert_eq!(c, cap);
                assert_eq!(source.errno(), libc::EINVAL);
            }
            (s, r) => panic!("support {s:?}: enabling after vCPU creation gave {r:?}"),
        }
    }

    #[test]
    fn fresh_ring_maps_and_harvests_nothing() {
        let vm = vm();
        let Some((_, max)) = supported(&vm) else {
            assert!(matches!(
                enable(&vm, 4096),
                Err(KvmDirtyRingError::Unsupported)
            ));
            return;
        };
        let bytes = enable(&vm, 4096).expect("enable dirty ring");
        assert!(bytes.is_power_of_two() && bytes <= max && bytes >= host_page_size());
        let vcpu = vm.create_vcpu(0).expect("create vCPU");
        let mut ring = DirtyRingMapping::map(&vcpu, 0, bytes).expect("map ring");
        assert_eq!(u64::from(ring.entries()) * ENTRY_BYTES, bytes);
        let mut seen = 0;
        assert_eq!(ring.harvest(|_, _| seen += 1), 0);
        assert_eq!(seen, 0);
        assert_eq!(reset_dirty_rings(&vm).expect("reset"), 0);
        // A second enable is refused: the ring size is fixed for the VM's life.
        assert!(matches!(
            enable(&vm, 4096),
            Err(KvmDirtyRingError::Enable { .. })
        ));
    }
}
