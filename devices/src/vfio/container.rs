//! The legacy VFIO backend: one type1 container (`/dev/vfio/vfio`) for all of a VM's passthrough
//! devices (each device's group joins it), and all guest RAM mapped for DMA with IOVA = GPA once.
//!
//! ```text
//!  Type1Dma::open ─► VfioDevice::new(sysfs, container) (opens + attaches the group; the first
//!     group sets type1) ─► join: first device maps every RAM range (VFIO_IOMMU_MAP_DMA, IOVA = GPA)
//!     ─► ... ─► leave: the last device out unmaps every range before its group goes
//! ```
//!
//! The group is attached by vfio-ioctls when the device is opened, and the type1 IOMMU is selected
//! then; mappings can only be made after that, so [`Type1Dma::join`] runs after the open.

use std::sync::{Arc, Mutex};

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

/// A type1 container shared by the VM's devices, and the guest RAM ranges mapped in it (once,
/// however many groups join: the kernel replays a container's mappings into each new group's
/// IOMMU domain, and pins each page once per container).
pub struct Type1Dma {
    container: Arc<VfioContainer>,
    mapped: Mutex<Vec<(Iova, usize)>>,
    members: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Type1Dma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Type1Dma")
            .field("mapped", &self.mapped())
            .field("members", &self.members())
            .finish()
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Type1Dma {
    /// Opens a new container. Nothing is mapped until a group is attached (by opening a device in
    /// it) and [`Type1Dma::join`] or [`Type1Dma::map`] runs.
    pub fn open() -> Result<Arc<Self>, Type1Error> {
        let container = VfioContainer::new(None).map_err(Type1Error::Container)?;
        Ok(Arc::new(Self {
            container: Arc::new(container),
            mapped: Mutex::new(Vec::new()),
            members: Mutex::new(Vec::new()),
        }))
    }

    /// The container, to open devices in.
    pub fn container(&self) -> &Arc<VfioContainer> {
        &self.container
    }

    /// Records device `id` (whose group is now in the container) and, for the first device,
    /// maps `ram`. On a mapping error nothing stays mapped and `id` is not recorded.
    pub fn join(&self, id: &str, ram: &[GuestRamRange]) -> Result<(), Type1Error> {
        let mut members = locked(&self.members);
        if members.is_empty() {
            if let Err(e) = self.map(ram) {
                self.unmap_all();
                return Err(e);
            }
        }
        members.push(id.to_string());
        Ok(())
    }

    /// Device `id` leaves; the last one out unmaps guest RAM while its group still holds the
    /// container's IOMMU (call before the device closes).
    pub fn leave(&self, id: &str) {
        let mut members = locked(&self.members);
        if let Some(i) = members.iter().position(|m| m == id) {
            members.remove(i);
        }
        if members.is_empty() {
            self.unmap_all();
        }
    }

    /// The devices in the container now.
    pub fn members(&self) -> Vec<String> {
        locked(&self.members).clone()
    }

    /// Maps every range with IOVA = GPA, read and write, in pieces of at most
    /// [`DMA_MAP_CHUNK`]. On error the ranges mapped so far stay recorded and are unmapped by
    /// [`Type1Dma::unmap_all`].
    pub fn map(&self, ranges: &[GuestRamRange]) -> Result<(), Type1Error> {
        let mut mapped = locked(&self.mapped);
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
                // Guest RAM outlives the mapping: the VM's device manager, which owns the
                // devices and so this, is dropped (and the range unmapped) before its `GuestRam`.
                vfio_dma_map::map_guest_ram(&self.container, iova, len, host).map_err(
                    |source| Type1Error::MapDma {
                        iova,
                        len: piece,
                        source,
                    },
                )?;
                mapped.push((iova, len));
                off += piece;
            }
        }
        Ok(())
    }

    /// The ranges mapped now.
    pub fn mapped(&self) -> Vec<(Iova, usize)> {
        locked(&self.mapped).clone()
    }

    /// Unmaps every mapped range; failures are logged (teardown goes on regardless).
    pub fn unmap_all(&self) {
        for (iova, len) in locked(&self.mapped).drain(..) {
            if let Err(e) = self.container.vfio_dma_unmap(iova.raw(), len) {
                log::warn!("VFIO: cannot unmap DMA range {iova:#x}+{len:#x}: {e}");
            }
        }
    }
}
