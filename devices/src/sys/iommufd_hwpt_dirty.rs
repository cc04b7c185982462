//! iommufd hardware dirty tracking: `IOMMU_HWPT_SET_DIRTY_TRACKING` and
//! `IOMMU_HWPT_GET_DIRTY_BITMAP` on a HWPT allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`.
//!
//! Two kernel quirks shape this wrapper (both asserted in the lab):
//! - GET_DIRTY_BITMAP only ORs bits into the user buffer, so the wrapper zeroes it before every call;
//! - GET_DIRTY_BITMAP returns success even when tracking is off (6.12 drops the driver's error), so
//!   callers must keep their own enable state; this wrapper does not pretend to know it.

use iommufd_bindings::iommufd::{
    iommu_hwpt_get_dirty_bitmap, iommu_hwpt_set_dirty_tracking,
    iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
    iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
    IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING, IOMMUFD_TYPE,
};
use iommufd_ioctls::IommuFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

use super::iova::{check_dirty_bitmap_arg, DirtyBitmapArgError, Iova};
use super::uapi_size::argsz;

ioctl_io_nr!(
    IOMMU_HWPT_SET_DIRTY_TRACKING,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING
);
ioctl_io_nr!(
    IOMMU_HWPT_GET_DIRTY_BITMAP,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP
);

/// Whether a bitmap read also clears the dirty bits it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyRead {
    /// Report and clear (the default uAPI behaviour): the "claim" of the migration flow.
    ReadAndClear,
    /// Report only (`IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`): the "peek" of the migration flow.
    NoClear,
}

/// Errors of the iommufd HWPT dirty-tracking uAPI.
#[derive(Debug, thiserror::Error)]
pub enum HwptDirtyError {
    /// `IOMMU_HWPT_SET_DIRTY_TRACKING` failed.
    #[error("setting dirty tracking to {enable} on hwpt {hwpt_id} failed")]
    SetDirtyTracking {
        /// The HWPT object id.
        hwpt_id: u32,
        /// The requested state.
        enable: bool,
        /// The errno the kernel returned.
        #[source]
        source: errno::Error,
    },
    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` failed.
    #[error(
        "reading the dirty bitmap of hwpt {hwpt_id}, iova {iova:#x}, {len_bytes:#x} bytes failed"
    )]
    GetDirtyBitmap {
        /// The HWPT object id.
        hwpt_id: u32,
        /// First IOVA of the range.
        iova: Iova,
        /// Length of the range.
        len_bytes: u64,
        /// The errno the kernel returned.
        #[source]
        source: errno::Error,
    },
    /// The range or the bitmap does not fit the uAPI.
    #[error(transparent)]
    Arg(#[from] DirtyBitmapArgError),
}

/// Enable or disable dirty tracking on `hwpt_id`.
pub fn set_dirty_tracking(
    iommufd: &IommuFd,
    hwpt_id: u32,
    enable: bool,
) -> Result<(), HwptDirtyError> {
    let mut arg = iommu_hwpt_set_dirty_tracking {
        size: argsz::<iommu_hwpt_set_dirty_tracking>(),
        flags: if enable {
            iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE
        } else {
            0
        },
        hwpt_id,
        __reserved: 0,
    };
    // SAFETY: `iommufd` is an open `/dev/iommu` (an `IommuFd` holds nothing else), where this ioctl
    // is defined. The kernel copies `size` (= sizeof the struct, 16 bytes) bytes from `arg`, a live
    // exclusive borrow for the duration of the call, and dereferences no pointer inside it.
    let ret = unsafe { ioctl_with_mut_ref(iommufd, IOMMU_HWPT_SET_DIRTY_TRACKING(), &mut arg) };
    if ret < 0 {
        return Err(HwptDirtyError::SetDirtyTracking {
            hwpt_id,
            enable,
            source: errno::Error::last(),
        });
    }
    Ok(())
}

/// Read the dirty bits of `[iova, iova + len_bytes)` of `hwpt_id` at `page_size` granularity into
/// `bitmap` (bit `n` = page `iova + n * page_size`, LSB first), clearing them in the IOMMU unless
/// `mode` is [`DirtyRead::NoClear`].
///
/// `bitmap` must have exactly `ceil(len_bytes / page_size / 64)` words. It is zeroed first: the
/// kernel only sets bits, so stale bits would otherwise read as dirty.
pub fn get_dirty_bitmap(
    iommufd: &IommuFd,
    hwpt_id: u32,
    iova: Iova,
    len_bytes: u64,
    page_size: u64,
    mode: DirtyRead,
    bitmap: &mut [u64],
) -> Result<(), HwptDirtyError> {
    check_dirty_bitmap_arg(iova, len_bytes, page_size, bitmap.len())?;
    bitmap.fill(0);
    let mut arg = iommu_hwpt_get_dirty_bitmap {
        size: argsz::<iommu_hwpt_get_dirty_bitmap>(),
        hwpt_id,
        flags: match mode {
            DirtyRead::ReadAndClear => 0,
            DirtyRead::NoClear => {
                iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
            }
        },
        __reserved: 0,
        iova: iova.0,
        length: len_bytes,
        page_size,
        data: bitmap.as_mut_ptr() as u64,
    };
    // SAFETY: `iommufd` is an open `/dev/iommu` (the only fd an `IommuFd` holds). The kernel reads
    // the 48-byte `arg` and writes dirty bits through `data` for the pages of
    // `[iova, iova + length)` only: `length / page_size` bits, which fit in `bitmap` (its length
    // checked above). `bitmap` is an exclusive borrow alive across the call, so the
    // kernel's writes through the pointer alias nothing else.
    let ret = unsafe { ioctl_with_mut_ref(iommufd, IOMMU_HWPT_GET_DIRTY_BITMAP(), &mut arg) };
    if ret < 0 {
        return Err(HwptDirtyError::GetDirtyBitmap {
            hwpt_id,
            iova,
            len_bytes,
            source: errno::Error::last(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_uapi() {
        // _IO(';', 0x80 + 11) and _IO(';', 0x80 + 12) from include/uapi/linux/iommufd.h.
        assert_eq!(IOMMU_HWPT_SET_DIRTY_TRACKING(), 0x3b8b);
        assert_eq!(IOMMU_HWPT_GET_DIRTY_BITMAP(), 0x3b8c);
    }
}
