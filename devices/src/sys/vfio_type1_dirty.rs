//! `VFIO_IOMMU_DIRTY_PAGES` on a type1 container: start and stop dirty tracking, and read (and by
//! that clear) the dirty bitmap of one DMA-mapped IOVA range.
//!
//! Kernel fact (asserted by `devices/tests/lab_kernel_facts.rs` in the lab): for a vfio-pci device
//! that does not pin pages, type1 reports **every mapped page dirty on every read**. The source built
//! on this wrapper therefore over-reports; tern prefers iommufd hardware dirty tracking and uses type1
//! only when nothing better exists.
//!
//! The kernel requires `page_size` to be the container's smallest IOMMU page size (4 KiB on x86) and
//! the range to start and end on DMA-mapping boundaries.

use vfio_bindings::bindings::vfio::{
    vfio_bitmap, vfio_iommu_type1_dirty_bitmap, vfio_iommu_type1_dirty_bitmap_get, VFIO_BASE,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, VFIO_TYPE,
};
use vfio_ioctls::VfioContainer;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

use super::iova::{check_dirty_bitmap_arg, DirtyBitmapArgError, Iova};
use super::uapi_size::argsz;

ioctl_io_nr!(VFIO_IOMMU_DIRTY_PAGES, VFIO_TYPE as u32, VFIO_BASE + 17);

/// Errors of the type1 dirty-page uAPI.
#[derive(Debug, thiserror::Error)]
pub enum Type1DirtyError {
    /// `VFIO_IOMMU_DIRTY_PAGES_FLAG_START` failed.
    #[error("starting type1 dirty page tracking failed")]
    Start(#[source] errno::Error),
    /// `VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP` failed.
    #[error("stopping type1 dirty page tracking failed")]
    Stop(#[source] errno::Error),
    /// `VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP` failed.
    #[error("reading the type1 dirty bitmap of iova {iova:#x}, {len_bytes:#x} bytes failed")]
    GetBitmap {
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

/// Start dirty page tracking on every DMA mapping of `container`.
pub fn start_dirty_tracking(container: &VfioContainer) -> Result<(), Type1DirtyError> {
    dirty_pages_control(container, VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
        .map_err(Type1DirtyError::Start)
}

/// Stop dirty page tracking on `container`.
pub fn stop_dirty_tracking(container: &VfioContainer) -> Result<(), Type1DirtyError> {
    dirty_pages_control(container, VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP).map_err(Type1DirtyError::Stop)
}

fn dirty_pages_control(container: &VfioContainer, flag: u32) -> Result<(), errno::Error> {
    let mut arg = vfio_iommu_type1_dirty_bitmap {
        argsz: argsz::<vfio_iommu_type1_dirty_bitmap>(),
        flags: flag,
        ..Default::default()
    };
    // SAFETY: `container` is an open `/dev/vfio/vfio` container (a `VfioContainer` holds nothing
    // else), the one fd on which VFIO_IOMMU_DIRTY_PAGES is defined. For START/STOP the kernel reads
    // only `argsz` and `flags` (8 bytes, `argsz` says so) from `arg`, a live exclusive borrow that
    // outlives the call, and writes nothing back.
    let ret = unsafe { ioctl_with_mut_ref(container, VFIO_IOMMU_DIRTY_PAGES(), &mut arg) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

/// The GET_BITMAP argument: the variable-size header followed by its payload, as the kernel reads it.
#[repr(C)]
struct GetBitmapArg {
    header: vfio_iommu_type1_dirty_bitmap,
    range: vfio_iommu_type1_dirty_bitmap_get,
}

/// Read the dirty bitmap of `[iova, iova + len_bytes)` at `page_size` granularity into `bitmap`
/// (bit `n` = page `iova + n * page_size`, LSB first) and clear it in the kernel.
///
/// `bitmap` must have exactly `ceil(len_bytes / page_size / 64)` words; it is overwritten.
pub fn get_dirty_bitmap(
    container: &VfioContainer,
    iova: Iova,
    len_bytes: u64,
    page_size: u64,
    bitmap: &mut [u64],
) -> Result<(), Type1DirtyError> {
    check_dirty_bitmap_arg(iova, len_bytes, page_size, bitmap.len())?;
    bitmap.fill(0);
    let mut arg = GetBitmapArg {
        header: vfio_iommu_type1_dirty_bitmap {
            argsz: argsz::<GetBitmapArg>(),
            flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
            ..Default::default()
        },
        range: vfio_iommu_type1_dirty_bitmap_get {
            iova: iova.0,
            size: len_bytes,
            bitmap: vfio_bitmap {
                pgsize: page_size,
                size: std::mem::size_of_val(bitmap) as u64,
                data: bitmap.as_mut_ptr(),
            },
        },
    };
    // SAFETY: `container` is an open VFIO type1 container (the only fd a `VfioContainer` holds).
    // `arg` is a repr(C) header + `vfio_iommu_type1_dirty_bitmap_get`, exactly the `argsz` bytes the
    // kernel reads. The kernel writes at most `bitmap.size` bytes through `bitmap.data`: the size of
    // `bitmap`, which has the words the range needs (checked above) and is an exclusive borrow
    // that lives across the call, so the kernel's writes alias nothing else.
    let ret = unsafe { ioctl_with_mut_ref(container, VFIO_IOMMU_DIRTY_PAGES(), &mut arg) };
    if ret < 0 {
        return Err(Type1DirtyError::GetBitmap {
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
    fn ioctl_number_matches_uapi() {
        // _IO(';', 100 + 17) from include/uapi/linux/vfio.h.
        assert_eq!(VFIO_IOMMU_DIRTY_PAGES(), 0x3b75);
    }

    #[test]
    fn get_bitmap_arg_has_kernel_layout() {
        assert_eq!(size_of::<GetBitmapArg>(), 8 + 40);
        assert_eq!(std::mem::offset_of!(GetBitmapArg, range), 8);
    }
}
