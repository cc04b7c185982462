//! KVM dirty log with manual protection: `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` and
//! `KVM_CLEAR_DIRTY_LOG`, which kvm-ioctls lacks.
//!
//! Under manual protection `KVM_GET_DIRTY_LOG` only *reads* a slot's bitmap; the bits stay set (and
//! the pages writable) until userspace clears them with `KVM_CLEAR_DIRTY_LOG`, which also
//! write-protects exactly the cleared pages again. That lets the migration engine clear a chunk's
//! bits right before it reads the chunk's pages instead of clearing the whole guest at sync time.

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap, KVMIO,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;

vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// `KVM_CLEAR_DIRTY_LOG` works in units of 64 pages (one bitmap word): `first_page` must be a
/// multiple of this, and so must `num_pages` unless the range ends at the end of the slot.
pub const CLEAR_ALIGN_PAGES: u64 = 64;

/// Errors of the manual-protect dirty log.
#[derive(Debug, thiserror::Error)]
pub enum KvmDirtyLogError {
    /// The host rejected enabling manual protection with these flags.
    #[error("cannot enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with flags {flags:#x}")]
    EnableManualProtect {
        /// Flags asked for.
        flags: u64,
        /// errno from KVM_ENABLE_CAP.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A clear request that breaks the kernel's 64-page alignment rule (a tern bug, refused before
    /// the ioctl so the error names it instead of a bare EINVAL).
    #[error(
        "KVM_CLEAR_DIRTY_LOG slot {slot} pages {first_page}+{num_pages}: first page must be a \
         multiple of 64 and the count a multiple of 64 unless it ends at the slot end ({slot_pages} pages)"
    )]
    Unaligned {
        /// Memory slot.
        slot: u32,
        /// First page of the request (relative to the slot).
        first_page: u64,
        /// Pages in the request.
        num_pages: u64,
        /// Pages in the slot.
        slot_pages: u64,
    },
    /// The bitmap passed is shorter than `num_pages` bits.
    #[error(
        "KVM_CLEAR_DIRTY_LOG slot {slot} pages {first_page}+{num_pages}: bitmap has only {words} words"
    )]
    BitmapTooShort {
        /// Memory slot.
        slot: u32,
        /// First page of the request.
        first_page: u64,
        /// Pages in the request.
        num_pages: u64,
        /// Words given.
        words: usize,
    },
    /// The kernel refused the clear.
    #[error("KVM_CLEAR_DIRTY_LOG slot {slot} pages {first_page}+{num_pages}")]
    Clear {
        /// Memory slot.
        slot: u32,
        /// First page of the request (relative to the slot).
        first_page: u64,
        /// Pages in the request.
        num_pages: u64,
        /// errno from the ioctl.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The manual-protect flags this host supports (`KVM_CHECK_EXTENSION` returns them as a mask);
/// 0 when it has no manual protection at all.
pub fn supported_manual_protect_flags(vm: &VmFd) -> u64 {
    let raw = vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    u64::try_from(raw).unwrap_or(0)
}

/// The flags tern wants: manual protection, and with it "initially set" when offered (logging then
/// starts with every bit set instead of write-protecting the whole guest at once; the cost moves
/// to the first clear of each chunk, which happens anyway).
pub fn wanted_manual_protect_flags(supported: u64) -> u64 {
    let enable = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
    let init_set = u64::from(KVM_DIRTY_LOG_INITIALLY_SET);
    if supported & enable == 0 {
        0
    } else {
        enable | (supported & init_set)
    }
}

/// Enables manual dirty-log protection on `vm` with `flags` (from [`wanted_manual_protect_flags`]).
pub fn enable_manual_protect(vm: &VmFd, flags: u64) -> Result<(), KvmDirtyLogError> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [flags, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|source| KvmDirtyLogError::EnableManualProtect { flags, source })
}

/// Clears (and write-protects again) the pages of `slot` whose bits are set in `bitmap`, where bit
/// `i` of `bitmap[j]` is page `first_page + 64 * j + i` of the slot. Bits that are clear in `bitmap`
/// are left alone at the kernel, so only pages the caller has taken over are re-armed.
///
/// `slot_pages` is the slot's size in pages (for the alignment rule).
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    slot_pages: u64,
    first_page: u64,
    num_pages: u64,
    bitmap: &[u64],
) -> Result<(), KvmDirtyLogError> {
    let ends_at_slot_end = first_page.checked_add(num_pages) == Some(slot_pages);
    let aligned = first_page.is_multiple_of(CLEAR_ALIGN_PAGES)
        && (num_pages.is_multiple_of(CLEAR_ALIGN_PAGES) || ends_at_slot_end)
        && first_page.saturating_add(num_pages) <= slot_pages;
    let (Ok(num), true) = (u32::try_from(num_pages), aligned) else {
        return Err(KvmDirtyLogError::Unaligned {
            slot,
            first_page,
            num_pages,
            slot_pages,
        });
    };
    // The kernel copies ALIGN(num_pages, 64) / 8 bytes from the bitmap.
    let words_needed = num_pages.div_ceil(64);
    if (bitmap.len() as u64) < words_needed {
        return Err(KvmDirtyLogError::BitmapTooShort {
            slot,
            first_page,
            num_pages,
            words: bitmap.len(),
        });
    }
    let request = kvm_clear_dirty_log {
        slot,
        num_pages: num,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_ptr() as *mut libc::c_void,
        },
    };
    // SAFETY: `vm` is a KVM VM fd (the type says so), the only kind that accepts
    // KVM_CLEAR_DIRTY_LOG. The kernel reads `request` (a live, correctly sized kvm_clear_dirty_log
    // from kvm-bindings) and then `ALIGN(num_pages, 64) / 8` bytes from `dirty_bitmap`; we checked
    // above that `bitmap` holds at least `num_pages.div_ceil(64)` u64 words, and `bitmap` is
    // borrowed for the whole call, so the memory is valid and not mutated concurrently. The kernel
    // only reads the bitmap (the `*mut` is the uAPI's type, not a write) and keeps no pointer.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &request) };
    if ret < 0 {
        return Err(KvmDirtyLogError::Clear {
            slot,
            first_page,
            num_pages,
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_flags_follow_support() {
        assert_eq!(wanted_manual_protect_flags(0), 0);
        assert_eq!(wanted_manual_protect_flags(1), 1);
        assert_eq!(wanted_manual_protect_flags(3), 3);
        // INITIALLY_SET alone is meaningless without manual protection.
        assert_eq!(wanted_manual_protect_flags(2), 0);
    }

    #[test]
    fn clear_refuses_unaligned_requests_before_the_ioctl() {
        let kvm = kvm_ioctls::Kvm::new().expect("these tests need /dev/kvm");
        let vm = kvm.create_vm().expect("create VM");
        let bitmap = [u64::MAX; 4];
        for (first, num) in [(1, 64), (64, 63), (0, 256 + 64)] {
            let e = clear_dirty_log(&vm, 0, 256, first, num, &bitmap).unwrap_err();
            assert!(
                matches!(e, KvmDirtyLogError::Unaligned { first_page, num_pages, .. }
                    if first_page == first && num_pages == num),
                "{first}+{num}: {e}"
            );
        }
        let e = clear_dirty_log(&vm, 0, 1 << 20, 0, 1024, &bitmap).unwrap_err();
        assert!(
            matches!(e, KvmDirtyLogError::BitmapTooShort { words: 4, .. }),
            "{e}"
        );
        // Aligned, ending at the slot end with a partial word: reaches the kernel, which has no
        // slot 0 in this VM and says so.
        let e = clear_dirty_log(&vm, 0, 100, 64, 36, &bitmap).unwrap_err();
        assert!(matches!(e, KvmDirtyLogError::Clear { slot: 0, .. }), "{e}");
    }
}
