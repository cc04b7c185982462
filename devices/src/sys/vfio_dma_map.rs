//! Mapping guest RAM for device DMA: VFIO_IOMMU_MAP_DMA into a type1 container and IOMMU_IOAS_MAP
//! into an iommufd IOAS. vfio-ioctls marks both calls `unsafe` because the device may write the
//! memory at any time.

use vfio_ioctls::{VfioContainer, VfioError, VfioIommufd};

use super::iova::Iova;

/// Maps `len` bytes of guest RAM at host address `host_addr` for device DMA at `iova` in a type1
/// container, read and write.
///
/// The caller promises that `host_addr..host_addr + len` is guest RAM: a shared mapping the guest
/// may already write at any time, that tern only touches through vm-memory's volatile accessors,
/// and that stays mapped until the range is unmapped from the container.
pub fn map_guest_ram(
    container: &VfioContainer,
    iova: Iova,
    len: usize,
    host_addr: usize,
) -> Result<(), VfioError> {
    // SAFETY: the caller's promise above is what `vfio_dma_map` requires: no Rust reference to
    // the range is live or will be created (guest RAM is accessed volatilely only), and the range
    // outlives the mapping.
    unsafe { container.vfio_dma_map(iova.raw(), len, host_addr as *mut u8) }
}

/// Like [`map_guest_ram`], into the IOAS of an iommufd (IOMMU_IOAS_MAP with a fixed IOVA), under
/// the same promise.
pub fn map_guest_ram_ioas(
    iommufd: &VfioIommufd,
    iova: Iova,
    len: usize,
    host_addr: usize,
) -> Result<(), VfioError> {
    // SAFETY: as in `map_guest_ram`: the range is guest RAM, only accessed volatilely, and it
    // outlives the mapping.
    unsafe { iommufd.vfio_dma_map(iova.raw(), len, host_addr as *mut u8) }
}
