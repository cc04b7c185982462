//! The legacy VFIO backend: one type1 container (`/dev/vfio/vfio`) per passthrough device, its group
//! (`/dev/vfio/N`) attached, and all guest RAM mapped for DMA with IOVA = GPA.
//!
//! ```text
//!  VfioContainer::new ─► VfioDevice::new(sysfs, container) (opens + attaches the group, sets type1)
//!     ─► VFIO_IOMMU_MAP_DMA for every RAM range (IOVA = GPA) ─► ... ─► unmap every range on drop
//! ```
//!
//! The group is attached by vfio-ioctls when the device is opened, and the type1 IOMMU is selected
//! then; mappings can only be made after that, so [`Type1Dma::map`] runs after the open.

use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioError};

use crate::sys::iova::Iova;
use crate::sys::vfio_dma_map;

/// Guest RAM is DMA-mapped in pieces of at most this size: type1 reads dirty bits only for whole
/// mappings, so a 64 MiB migration chunk then reads just its own mapping (64 GiB of RAM is 1024
/// mappings, far below type1's default limit of 65535).
pub const DMA_MAP_CHUNK: u64 = 64 << 20;

/// One range of guest RAM as the host sees it: where the guest has it (the IOVA, since tern maps
/// IOVA = GPA) and where tern's process has it mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRamRange {
    /// IOVA the device uses (equal to the range's GPA).
    pub iova: Iova,
    /// Host virtual address of the range's first byte in tern's mapping of guest RAM.
    pub host_addr: usize,
    pub len: u64,
}

/// Errors of the type1 backend.
#[derive(Debug, thiserror::Error)]
pub enum Type1Error {
    #[error("cannot open the VFIO container /dev/vfio/vfio")]
    Container(#[source] VfioError),
    #[error("cannot map guest RAM {iova:#x}+{len:#x} for device DMA (VFIO_IOMMU_MAP_DMA)")]
    MapDma {
        iova: Iova,
        len: u64,
        #[source]
        source: VfioError,
    },
    #[error("guest RAM range {iova:#x}+{len:#x} does not fit this host's address size")]
    RangeTooLarge { iova: Iova, len: u64 },
}

/// A type1 container and the guest RAM ranges mapped in it.
pub struct Type1Dma {
    container: Arc<VfioContainer>,
    mapped: Vec<(Iova, usize)>,
}

impl std::fmt::Debug for Type1Dma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Type1Dma")
            .field("mapped", &self.mapped)
            .finish()
    }
}

impl Type1Dma {
    /// Opens a new container. Nothing is mapped until a group is attached (by opening a device in
    /// it) and [`Type1Dma::map`] runs.
    pub fn open() -> Result<Self, Type1Error> {
        let container = VfioContainer::new(None).map_err(Type1Error::Container)?;
        Ok(Self {
            container: Arc::new(container),
            mapped: Vec::new(),
        })
    }

    /// The container, to open devices in.
    pub fn container(&self) -> &Arc<VfioContainer> {
        &self.container
    }

    /// Maps every range with IOVA = GPA, read and write. On error the ranges mapped so far stay
    /// recorded and are unmapped by [`Type1Dma::unmap_all`] or on drop.
    pub fn map(&mut self, ranges: &[GuestRamRange]) -> Result<(), Type1Error> {
        for r in ranges {
            let mut off = 0;
            while off < r.len {
                let piece = (r.len - off).min(DMA_MAP_CHUNK);
                let iova = Iova(r.iova.0 + off);
                let len = usize::try_from(piece)
                    .map_err(|_| Type1Error::RangeTooLarge { iova, len: piece })?;
                let host = usize::try_from(off)
                    .ok()
                    .and_then(|o| r.host_addr.checked_add(o))
                    .ok_or(Type1Error::RangeTooLarge { iova, len: piece })?;
                // Guest RAM outlives the mapping: the VM's device manager, which owns this, is
                // dropped (and the range unmapped) before its `GuestRam`.
                vfio_dma_map::map_guest_ram(&self.container, iova, len, host).map_err(
                    |source| Type1Error::MapDma {
                        iova,
                        len: piece,
                        source,
                    },
                )?;
                self.mapped.push((iova, len));
                off += piece;
            }
        }
        Ok(())
    }

    /// The ranges mapped now.
    pub fn mapped(&self) -> &[(Iova, usize)] {
        &self.mapped
    }

    /// Unmaps every mapped range; failures are logged (teardown goes on regardless).
    pub fn unmap_all(&mut self) {
        for (iova, len) in self.mapped.drain(..) {
            if let Err(e) = self.container.vfio_dma_unmap(iova.raw(), len) {
                log::warn!("VFIO: cannot unmap DMA range {iova:#x}+{len:#x}: {e}");
            }
        }
    }
}

impl Drop for Type1Dma {
    fn drop(&mut self) {
        self.unmap_all();
    }
}
