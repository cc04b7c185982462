//! The cdev + iommufd backend: one `/dev/iommu` and one IOAS per VM ([`IommufdSpace`], as QEMU
//! does), all guest RAM mapped into it once (IOVA = GPA, pinned once however many devices use
//! it). Each device cdev (`/dev/vfio/devices/vfioN`) is bound to that iommufd and attached to a
//! HWPT tern allocates itself, asking for dirty tracking when the IOMMU reports the capability; a
//! device first tries the HWPTs already there, so devices behind one compatible IOMMU share one
//! HWPT ([`Hwpt`]) — and one dirty bitmap, read once per chunk.
//!
//! ```text
//!  IommuFd::new ─► IOAS ─► IOMMU_IOAS_MAP each RAM range            (once per VM)
//!  per device: VfioDevice (cdev bound, not attached) ─► IOMMU_GET_HW_INFO(dev)
//!     ─► attach to an existing HWPT of the same dirty-tracking kind, or
//!        IOMMU_HWPT_ALLOC(dev, IOAS, [DIRTY_TRACKING]) ─► attach
//!  drop: device closes (detached) ─► last user of a HWPT destroys it ─► last HWPT/space user
//!        unmaps the ranges ─► IOAS destroyed with its Arc
//! ```
//!
//! Owning the HWPT is what hardware dirty tracking needs (IOMMU_HWPT_SET_DIRTY_TRACKING and
//! IOMMU_HWPT_GET_DIRTY_BITMAP act on a HWPT id, [`crate::sys::iommufd_hwpt_dirty`]).

use std::sync::{Arc, Mutex, Weak};

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
        source: Box<dyn std::error::Error + Send + Sync>,
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

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A VM's iommufd and IOAS, with guest RAM mapped, and the HWPTs its devices are attached to.
pub struct IommufdSpace {
    vfio: Arc<VfioIommufd>,
    mapped: Mutex<Vec<(Iova, usize)>>,
    hwpts: Mutex<Vec<Weak<Hwpt>>>,
}

impl std::fmt::Debug for IommufdSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommufdSpace")
            .field("ioas", &self.ioas_id())
            .field("mapped", &self.mapped())
            .finish()
    }
}

impl IommufdSpace {
    /// Opens `/dev/iommu` and allocates an IOAS (nothing mapped yet).
    pub fn open() -> Result<Arc<Self>, IommufdBackendError> {
        let iommufd = Arc::new(IommuFd::new().map_err(IommufdBackendError::Open)?);
        let vfio = VfioIommufd::new(iommufd, None, None).map_err(IommufdBackendError::Ioas)?;
        Ok(Arc::new(Self {
            vfio: Arc::new(vfio),
            mapped: Mutex::new(Vec::new()),
            hwpts: Mutex::new(Vec::new()),
        }))
    }

    /// The iommufd wrapper devices are opened against.
    pub fn ops(&self) -> &Arc<VfioIommufd> {
        &self.vfio
    }

    /// The iommufd.
    pub fn iommufd(&self) -> &Arc<IommuFd> {
        self.vfio.iommufd()
    }

    /// The IOAS's object id.
    pub fn ioas_id(&self) -> u32 {
        self.vfio.ioas().id()
    }

    /// Maps every range into the IOAS with IOVA = GPA, read and write.
    pub fn map(&self, ranges: &[GuestRamRange]) -> Result<(), IommufdBackendError> {
        let mut mapped = locked(&self.mapped);
        for r in ranges {
            let len = usize::try_from(r.len).map_err(|_| IommufdBackendError::RangeTooLarge {
                iova: r.iova,
                len: r.len,
            })?;
            // Guest RAM outlives the mapping: the VM's device manager, which owns the devices and
            // so this, is dropped (and the range unmapped) before its `GuestRam`.
            vfio_dma_map::map_guest_ram_ioas(&self.vfio, r.iova, len, r.host_addr).map_err(
                |source| IommufdBackendError::MapDma {
                    iova: r.iova,
                    len: r.len,
                    source,
                },
            )?;
            mapped.push((r.iova, len));
        }
        Ok(())
    }

    /// The ranges mapped now.
    pub fn mapped(&self) -> Vec<(Iova, usize)> {
        locked(&self.mapped).clone()
    }

    /// Whether the IOMMU behind iommufd device `dev_id` can track DMA writes
    /// (`IOMMU_GET_HW_INFO`'s `IOMMU_HW_CAP_DIRTY_TRACKING`).
    pub fn dirty_capable(&self, dev_id: u32) -> Result<bool, IommufdBackendError> {
        let mut info = iommu_hw_info {
            size: argsz::<iommu_hw_info>(),
            dev_id,
            ..Default::default()
        };
        self.iommufd()
            .get_hw_info(&mut info)
            .map_err(|source| IommufdBackendError::HwInfo { dev_id, source })?;
        Ok(
            info.out_capabilities & u64::from(iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING)
                != 0,
        )
    }

    /// Attaches iommufd device `dev_id` (named `label`) through `attach`: first to each live HWPT
    /// of this space with the same dirty tracking (the kernel refuses an incompatible one), else
    /// to a HWPT allocated for it.
    pub fn join(
        self: &Arc<Self>,
        dev_id: u32,
        label: &str,
        dirty_tracking: bool,
        mut attach: impl FnMut(u32) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
    ) -> Result<Arc<Hwpt>, IommufdBackendError> {
        let candidates: Vec<Arc<Hwpt>> = {
            let mut hwpts = locked(&self.hwpts);
            hwpts.retain(|w| w.strong_count() > 0);
            hwpts.iter().filter_map(Weak::upgrade).collect()
        };
        for hwpt in candidates
            .into_iter()
            .filter(|h| h.dirty_tracking == dirty_tracking)
        {
            match attach(hwpt.id) {
                Ok(()) => {
                    locked(&hwpt.devices).push(label.to_string());
                    return Ok(hwpt);
                }
                Err(e) => log::info!(
                    "iommufd: {label} cannot share HWPT {} ({e}); allocating its own",
                    hwpt.id
                ),
            }
        }
        let id = alloc_hwpt(self.iommufd(), dev_id, self.ioas_id(), dirty_tracking).map_err(
            |source| IommufdBackendError::HwptAlloc {
                dev_id,
                dirty_tracking,
                source,
            },
        )?;
        let hwpt = Arc::new(Hwpt {
            space: self.clone(),
            id,
            dirty_tracking,
            devices: Mutex::new(Vec::new()),
        });
        attach(id).map_err(|source| IommufdBackendError::Attach {
            hwpt_id: id,
            source,
        })?;
        locked(&hwpt.devices).push(label.to_string());
        locked(&self.hwpts).push(Arc::downgrade(&hwpt));
        Ok(hwpt)
    }

    /// Attaches a bound VFIO device, with dirty tracking when its IOMMU has it.
    pub fn attach_vfio(
        self: &Arc<Self>,
        device: &VfioDevice,
        label: &str,
    ) -> Result<Arc<Hwpt>, IommufdBackendError> {
        let dev_id = device
            .iommufd_dev_id()
            .ok_or(IommufdBackendError::NotBound)?;
        let dirty = self.dirty_capable(dev_id)?;
        self.join(dev_id, label, dirty, |hwpt| {
            device.attach_hwpt(hwpt).map_err(|e| Box::new(e) as _)
        })
    }

    fn unmap_all(&self) {
        for (iova, len) in locked(&self.mapped).drain(..) {
            if let Err(e) = self.vfio.vfio_dma_unmap(iova.raw(), len) {
                log::warn!("iommufd: cannot unmap DMA range {iova:#x}+{len:#x}: {e}");
            }
        }
    }
}

impl Drop for IommufdSpace {
    fn drop(&mut self) {
        // Every HWPT (each holds the space) is gone; the IOAS goes with `vfio` after this.
        self.unmap_all();
    }
}

/// A HWPT on a VM's IOAS and the devices attached to it; destroyed when its last device goes.
pub struct Hwpt {
    space: Arc<IommufdSpace>,
    id: u32,
    dirty_tracking: bool,
    devices: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Hwpt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hwpt")
            .field("id", &self.id)
            .field("dirty_tracking", &self.dirty_tracking)
            .field("devices", &self.devices())
            .finish()
    }
}

impl Hwpt {
    /// The HWPT's object id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`.
    pub fn dirty_tracking(&self) -> bool {
        self.dirty_tracking
    }

    /// The IOAS it translates.
    pub fn space(&self) -> &Arc<IommufdSpace> {
        &self.space
    }

    /// The devices attached now.
    pub fn devices(&self) -> Vec<String> {
        locked(&self.devices).clone()
    }

    /// Device `label` detached (closed).
    pub fn leave(&self, label: &str) {
        let mut devices = locked(&self.devices);
        if let Some(i) = devices.iter().position(|d| d == label) {
            devices.remove(i);
        }
    }
}

impl Drop for Hwpt {
    fn drop(&mut self) {
        // Its devices closed (detached) before their last reference went.
        if let Err(e) = self.space.iommufd().destroy_iommu_object(self.id) {
            log::warn!("iommufd: cannot destroy HWPT {}: {e}", self.id);
        }
    }
}
