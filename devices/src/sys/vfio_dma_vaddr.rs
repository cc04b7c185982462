//! The type1 "update vaddr" interface (`VFIO_UPDATE_VADDR`, Linux 5.12): a live update moves the
//! process address of every DMA mapping to the new process without unmapping — the IOMMU keeps
//! translating and the pages stay pinned. The old process invalidates its addresses
//! (`VFIO_IOMMU_UNMAP_DMA` with `VFIO_DMA_UNMAP_FLAG_VADDR`), the new one supplies its own
//! (`VFIO_IOMMU_MAP_DMA` with `VFIO_DMA_MAP_FLAG_VADDR`, same IOVA and size per mapping; since 6.2
//! the kernel then moves the mapping's locked-memory accounting to the new process). The kernel
//! offers the extension only while no emulated IOMMU user (an mdev such as mtty) is in the
//! container: such a driver pins pages by process address and could not while they are invalid.

use std::os::fd::AsRawFd;

use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, VFIO_BASE, VFIO_DMA_MAP_FLAG_VADDR,
    VFIO_DMA_UNMAP_FLAG_ALL, VFIO_DMA_UNMAP_FLAG_VADDR, VFIO_TYPE, VFIO_UPDATE_VADDR,
};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_io_nr;

use super::iova::Iova;
use super::uapi_size::argsz;

ioctl_io_nr!(VFIO_CHECK_EXTENSION, VFIO_TYPE as u32, VFIO_BASE + 1);
ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);
ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 14);

/// Errors of the update-vaddr calls.
#[derive(Debug, thiserror::Error)]
pub enum VaddrError {
    #[error("VFIO_IOMMU_UNMAP_DMA with VFIO_DMA_UNMAP_FLAG_VADDR (invalidate the mappings' process addresses)")]
    Invalidate(#[source] errno::Error),
    #[error("VFIO_IOMMU_MAP_DMA with VFIO_DMA_MAP_FLAG_VADDR for {iova:#x}+{len:#x} at host address {host_addr:#x}")]
    Update {
        iova: Iova,
        len: usize,
        host_addr: usize,
        #[source]
        source: errno::Error,
    },
}

/// Whether the type1 container offers `VFIO_UPDATE_VADDR` now (never with an mdev in it).
pub fn supports_update_vaddr(container: &impl AsRawFd) -> bool {
    // SAFETY: VFIO_CHECK_EXTENSION takes an integer argument and touches no memory of ours.
    let r = unsafe {
        ioctl_with_val(
            container,
            VFIO_CHECK_EXTENSION(),
            libc::c_ulong::from(VFIO_UPDATE_VADDR),
        )
    };
    r > 0
}

/// Invalidates the process address of every DMA mapping of `container` (`range` `None`), or of
/// the mappings inside `range` (IOVA, bytes). The IOVAs stay mapped and the device keeps DMAing;
/// new pins block until addresses are supplied again.
pub fn invalidate(
    container: &impl AsRawFd,
    range: Option<(Iova, usize)>,
) -> Result<(), VaddrError> {
    let (flags, iova, size) = match range {
        None => (VFIO_DMA_UNMAP_FLAG_VADDR | VFIO_DMA_UNMAP_FLAG_ALL, 0, 0),
        Some((iova, len)) => (VFIO_DMA_UNMAP_FLAG_VADDR, iova.raw(), len as u64),
    };
    let unmap = vfio_iommu_type1_dma_unmap {
        argsz: argsz::<vfio_iommu_type1_dma_unmap>(),
        flags,
        iova,
        size,
        ..Default::default()
    };
    // SAFETY: the kernel reads `unmap` (sized by argsz) and writes back its size field; the
    // reference is valid for the call. No memory is unmapped from the process.
    let r = unsafe { ioctl_with_ref(container, VFIO_IOMMU_UNMAP_DMA(), &unmap) };
    if r < 0 {
        return Err(VaddrError::Invalidate(errno::Error::last()));
    }
    Ok(())
}

/// Supplies `host_addr` as the new process address of the mapping at `iova` (exactly `len`
/// bytes, as it was mapped), whose address was invalidated.
///
/// The caller promises what `VFIO_IOMMU_MAP_DMA` needs of guest RAM: `host_addr..+len` is a
/// shared mapping of the same pages the IOVA range was mapped from (the guest memfd), accessed
/// only volatilely, and it stays mapped until the range is unmapped or handed on.
pub fn update_vaddr(
    container: &impl AsRawFd,
    iova: Iova,
    len: usize,
    host_addr: usize,
) -> Result<(), VaddrError> {
    let map = vfio_iommu_type1_dma_map {
        argsz: argsz::<vfio_iommu_type1_dma_map>(),
        flags: VFIO_DMA_MAP_FLAG_VADDR,
        vaddr: host_addr as u64,
        iova: iova.raw(),
        size: len as u64,
    };
    // SAFETY: the kernel only reads `map`; the caller's promise above covers the address range
    // it records (no Rust reference into guest RAM exists, and it outlives the mapping).
    let r = unsafe { ioctl_with_ref(container, VFIO_IOMMU_MAP_DMA(), &map) };
    if r < 0 {
        return Err(VaddrError::Update {
            iova,
            len,
            host_addr,
            source: errno::Error::last(),
        });
    }
    Ok(())
}

impl VaddrError {
    /// The kernel's errno.
    pub fn errno(&self) -> i32 {
        match self {
            VaddrError::Invalidate(e) | VaddrError::Update { source: e, .. } => e.errno(),
        }
    }
}
