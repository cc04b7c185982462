//! The cdev + iommufd backend: tern opens `/dev/iommu`, allocates an IOAS, maps all guest RAM into
//! it (IOVA = GPA), binds the device cdev (`/dev/vfio/devices/vfioN`) and attaches it to a HWPT it
//! allocates itself, asking for dirty tracking when the IOMMU reports the capability.
//!
//! ```text
//!  IommuFd::new ─► IOAS ─► IOMMU_IOAS_MAP each RAM range ─► VfioDevice (cdev bound, not attached)
//!     ─► IOMMU_GET_HW_INFO(dev) ─► IOMMU_HWPT_ALLOC(dev, IOAS, [DIRTY_TRACKING]) ─► attach
//!  drop: unmap ranges ─► (device closes: detached) ─► destroy HWPT ─► IOAS destroyed with its Arc
//! ```
//!
//! Owning the HWPT is what hardware dirty tracking needs later (IOMMU_HWPT_SET_DIRTY_TRACKING and
//! IOMMU_HWPT_GET_DIRTY_BITMAP act on a HWPT id, [`crate::sys::iommufd_hwpt_dirty`]).

use std::sync::Arc;

use iommufd_bindings::iommufd::{
    iommu_hw_info, iommu_hwpt_alloc, iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
};
use iommufd_ioctls::{IommuFd, IommufdError};
use vfio_ioctls::{VfioDevice, VfioError, VfioIommufd};

use super::container::GuestRamRange;
use crate::sys::iova::Iova;
use crate::sys::uapi_size::argsz;
use crate::sys::vfio_dma_map;

/// Errors of the iommufd backend.
#[derive(Debug, thiserror::Error)]
pub enum IommufdBackendError {
    #[error("cannot open /dev/iommu")]
    Open(#[source] IommufdError),
    #[error("cannot allocate an IOAS")]
    Ioas(#[source] VfioError),
    #[error("cannot map guest RAM {iova:#x}+{len:#x} into the IOAS (IOMMU_IOAS_MAP)")]
    MapDma {
        iova: Iova,
        len: u64,
        #[source]
        source: VfioError,
    },
    #[error("guest RAM range {iova:#x}+{len:#x} does not fit this host's address size")]
    RangeTooLarge { iova: Iova, len: u64 },
    #[error("the device cdev was not bound to the iommufd")]
    NotBound,
    #[error("IOMMU_GET_HW_INFO for iommufd device {dev_id}")]
    HwInfo {
        dev_id: u32,
        #[source]
        source: IommufdError,
    },
    #[error("IOMMU_HWPT_ALLOC for iommufd device {dev_id} (dirty tracking {dirty_tracking})")]
    HwptAlloc {
        dev_id: u32,
        dirty_tracking: bool,
        #[source]
        source: IommufdError,
    },
    #[error("cannot attach the device to HWPT {hwpt_id}")]
    Attach {
        hwpt_id: u32,
        #[source]
        source: VfioError,
    },
}

/// `IOMMU_HWPT_ALLOC` of a HWPT for device `dev_id` on `pt_id` (an IOAS), with
/// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` when `dirty_tracking`; returns the HWPT id.
pub fn alloc_hwpt(
    iommufd: &IommuFd,
    dev_id: u32,
    pt_id: u32,
    dirty_tracking: bool,
) -> Result<u32, IommufdError> {
    let mut alloc = iommu_hwpt_alloc {
        size: argsz::<iommu_hwpt_alloc>(),
        flags: if dirty_tracking {
            iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING
        } else {
            0
        },
        dev_id,
        pt_id,
        ..Default::default()
    };
    iommufd.alloc_iommu_hwpt(&mut alloc)?;
    Ok(alloc.out_hwpt_id)
}

/// An iommufd, its IOAS with guest RAM mapped, and the HWPT tern allocated for the device.
pub struct IommufdDma {
    vfio: Arc<VfioIommufd>,
    hwpt: Option<u32>,
    dirty_tracking: bool,
    mapped: Vec<(Iova, usize)>,
}

impl std::fmt::Debug for IommufdDma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommufdDma")
            .field("hwpt", &self.hwpt)
            .field("dirty_tracking", &self.dirty_tracking)
            .field("mapped", &self.mapped)
            .finish()
    }
}

impl IommufdDma {
    /// Opens `/dev/iommu` and allocates an IOAS.
    pub fn open() -> Result<Self, IommufdBackendError> {
        let iommufd = Arc::new(IommuFd::new().map_err(IommufdBackendError::Open)?);
        let vfio = VfioIommufd::new(iommufd, None, None).map_err(IommufdBackendError::Ioas)?;
        Ok(Self {
            vfio: Arc::new(vfio),
            hwpt: None,
            dirty_tracking: false,
            mapped: Vec::new(),
        })
    }

    /// The iommufd wrapper devices are opened against.
    pub fn ops(&self) -> &Arc<VfioIommufd> {
        &self.vfio
    }

    /// Maps every range into the IOAS with IOVA = GPA, read and write.
    pub fn map(&mut self, ranges: &[GuestRamRange]) -> Result<(), IommufdBackendError> {
        for r in ranges {
            let len = usize::try_from(r.len).map_err(|_| IommufdBackendError::RangeTooLarge {
                iova: r.iova,
                len: r.len,
            })?;
            // Guest RAM outlives the mapping: the VM's device manager, which owns this, is dropped
            // (and the range unmapped) before its `GuestRam`.
            vfio_dma_map::map_guest_ram_ioas(&self.vfio, r.iova, len, r.host_addr).map_err(
                |source| IommufdBackendError::MapDma {
                    iova: r.iova,
                    len: r.len,
                    source,
                },
            )?;
            self.mapped.push((r.iova, len));
        }
        Ok(())
    }

    /// Allocates the device's HWPT on the IOAS, with dirty tracking when the IOMMU reports it,
    /// and attaches the device to it.
    pub fn attach(&mut self, device: &VfioDevice) -> Result<(), IommufdBackendError> {
        let dev_id = device
            .iommufd_dev_id()
            .ok_or(IommufdBackendError::NotBound)?;
        let iommufd = self.vfio.iommufd();
        let mut info = iommu_hw_info {
            size: argsz::<iommu_hw_info>(),
            dev_id,
            ..Default::default()
        };
        iommufd
            .get_hw_info(&mut info)
            .map_err(|source| IommufdBackendError::HwInfo { dev_id, source })?;
        let dirty_tracking = info.out_capabilities
            & u64::from(iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING)
            != 0;
        let hwpt_id = alloc_hwpt(iommufd, dev_id, self.vfio.ioas().id(), dirty_tracking).map_err(
            |source| IommufdBackendError::HwptAlloc {
                dev_id,
                dirty_tracking,
                source,
            },
        )?;
        self.hwpt = Some(hwpt_id);
        self.dirty_tracking = dirty_tracking;
        device
            .attach_hwpt(hwpt_id)
            .map_err(|source| IommufdBackendError::Attach { hwpt_id, source })
    }

    /// The HWPT tern allocated, once attached.
    pub fn hwpt(&self) -> Option<u32> {
        self.hwpt
    }

    /// Whether the HWPT was allocated with dirty tracking.
    pub fn dirty_tracking(&self) -> bool {
        self.dirty_tracking
    }

    /// The ranges mapped now.
    pub fn mapped(&self) -> &[(Iova, usize)] {
        &self.mapped
    }

    /// Unmaps every mapped range; failures are logged (teardown goes on regardless).
    pub fn unmap_all(&mut self) {
        for (iova, len) in self.mapped.drain(..) {
            if let Err(e) = self.vfio.vfio_dma_unmap(iova.raw(), len) {
                log::warn!("iommufd: cannot unmap DMA range {iova:#x}+{len:#x}: {e}");
            }
        }
    }
}

impl Drop for IommufdDma {
    fn drop(&mut self) {
        self.unmap_all();
        // The device was dropped first (it detaches on close), so the HWPT is free to go.
        if let Some(id) = self.hwpt.take() {
            if let Err(e) = self.vfio.iommufd().destroy_iommu_object(id) {
                log::warn!("iommufd: cannot destroy HWPT {id}: {e}");
            }
        }
    }
}
