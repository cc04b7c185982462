//! A VFIO device known only by its open file (a live update inherits it from the old process):
//! `VFIO_DEVICE_GET_INFO`, `_GET_REGION_INFO`, `_GET_IRQ_INFO` and `_SET_IRQS` on the fd, region
//! access with `pread`/`pwrite`. vfio-ioctls builds a `VfioDevice` from an fd only for an iommufd
//! cdev (`VfioDevice::new_from_bound_fd`) and its drop detaches the device; a type1 device fd
//! (from `VFIO_GROUP_GET_DEVICE_FD`) has no such entry point, so both backends use this.
//!
//! Nothing here opens, resets or closes anything but the file it is given: vfio-pci resets a
//! function on its first open and last close, and the point of inheriting is that neither happens.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_info, vfio_region_info, VFIO_BASE, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_TYPE,
};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ptr};
use vmm_sys_util::ioctl_io_nr;

use super::uapi_size::argsz;

ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);
ioctl_io_nr!(VFIO_DEVICE_GET_IRQ_INFO, VFIO_TYPE as u32, VFIO_BASE + 9);
ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);

/// Errors describing an inherited device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceFdError {
    #[error("VFIO_DEVICE_GET_INFO on the inherited device fd")]
    Info(#[source] errno::Error),
    #[error("VFIO_DEVICE_GET_REGION_INFO for region {index}")]
    Region {
        index: u32,
        #[source]
        source: errno::Error,
    },
    #[error("VFIO_DEVICE_GET_IRQ_INFO for interrupt index {index}")]
    Irq {
        index: u32,
        #[source]
        source: errno::Error,
    },
    #[error("VFIO_DEVICE_SET_IRQS for interrupt index {index} ({count} vectors)")]
    SetIrqs {
        index: u32,
        count: usize,
        #[source]
        source: errno::Error,
    },
}

/// One region as `VFIO_DEVICE_GET_REGION_INFO` reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionInfo {
    pub flags: u32,
    pub size: u64,
    /// Offset of the region in the device file.
    pub offset: u64,
}

/// An open VFIO device file with its regions and interrupt counts.
#[derive(Debug)]
pub struct DeviceFd {
    file: File,
    flags: u32,
    regions: Vec<RegionInfo>,
    irq_counts: Vec<u32>,
}

impl DeviceFd {
    /// Describes the device behind `file` (regions and interrupt indexes).
    pub fn new(file: File) -> Result<Self, DeviceFdError> {
        let mut info = vfio_device_info {
            argsz: argsz::<vfio_device_info>(),
            ..Default::default()
        };
        // SAFETY: the kernel writes at most `argsz` bytes into `info`, which lives for the call.
        if unsafe { ioctl_with_mut_ref(&file, VFIO_DEVICE_GET_INFO(), &mut info) } < 0 {
            return Err(DeviceFdError::Info(errno::Error::last()));
        }
        let mut regions = Vec::new();
        for index in 0..info.num_regions {
            let mut r = vfio_region_info {
                argsz: argsz::<vfio_region_info>(),
                index,
                ..Default::default()
            };
            // SAFETY: as above; capabilities are not asked for (argsz is the bare struct), so the
            // kernel writes no more than the struct.
            if unsafe { ioctl_with_mut_ref(&file, VFIO_DEVICE_GET_REGION_INFO(), &mut r) } < 0 {
                let source = errno::Error::last();
                // vfio-pci reports EINVAL for the indexes of regions a function lacks (VGA).
                if source.errno() == libc::EINVAL {
                    regions.push(RegionInfo::default());
                    continue;
                }
                return Err(DeviceFdError::Region { index, source });
            }
            regions.push(RegionInfo {
                flags: r.flags,
                size: r.size,
                offset: r.offset,
            });
        }
        let mut irq_counts = Vec::new();
        for index in 0..info.num_irqs {
            let mut i = vfio_irq_info {
                argsz: argsz::<vfio_irq_info>(),
                index,
                ..Default::default()
            };
            // SAFETY: the kernel writes at most `argsz` bytes into `i`, alive for the call.
            if unsafe { ioctl_with_mut_ref(&file, VFIO_DEVICE_GET_IRQ_INFO(), &mut i) } < 0 {
                let source = errno::Error::last();
                // vfio-pci reports EINVAL for the ERR and REQ indexes of a function without them.
                if source.errno() == libc::EINVAL {
                    irq_counts.push(0);
                    continue;
                }
                return Err(DeviceFdError::Irq { index, source });
            }
            irq_counts.push(i.count);
        }
        Ok(Self {
            file,
            flags: info.flags,
            regions,
            irq_counts,
        })
    }

    /// `VFIO_DEVICE_FLAGS_*` of the device.
    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// Region `index` (an absent one has size 0).
    pub fn region(&self, index: u32) -> RegionInfo {
        self.regions
            .get(index as usize)
            .copied()
            .unwrap_or_default()
    }

    /// Vectors of interrupt index `index` (0: none).
    pub fn irq_count(&self, index: u32) -> u32 {
        self.irq_counts.get(index as usize).copied().unwrap_or(0)
    }

    /// Reads at `offset` of region `index`; short or failed reads leave the rest of `buf` alone
    /// and are logged.
    pub fn read(&self, index: u32, buf: &mut [u8], offset: u64) {
        let r = self.region(index);
        if let Err(e) = self.file.read_exact_at(buf, r.offset + offset) {
            log::warn!("VFIO region {index} read at {offset:#x}: {e}");
        }
    }

    /// Writes at `offset` of region `index`; failures are logged.
    pub fn write(&self, index: u32, buf: &[u8], offset: u64) {
        let r = self.region(index);
        if let Err(e) = self.file.write_all_at(buf, r.offset + offset) {
            log::warn!("VFIO region {index} write at {offset:#x}: {e}");
        }
    }

    /// `VFIO_DEVICE_SET_IRQS`: trigger `fds` for vectors `0..fds.len()` of `index`, or (no fds)
    /// stop triggering for the whole index.
    pub fn set_irqs(&self, index: u32, fds: &[RawFd]) -> Result<(), DeviceFdError> {
        let flags = VFIO_IRQ_SET_ACTION_TRIGGER
            | if fds.is_empty() {
                VFIO_IRQ_SET_DATA_NONE
            } else {
                VFIO_IRQ_SET_DATA_EVENTFD
            };
        let count = u32::try_from(fds.len()).map_err(|_| DeviceFdError::SetIrqs {
            index,
            count: fds.len(),
            source: errno::Error::new(libc::EINVAL),
        })?;
        // struct vfio_irq_set is five u32 fields followed by the eventfds (s32 each).
        let mut buf: Vec<u32> = vec![0, flags, index, 0, count];
        buf.extend(fds.iter().map(|&fd| fd as u32));
        buf[0] = u32::try_from(buf.len() * 4).unwrap_or(u32::MAX);
        // SAFETY: `buf` holds a complete vfio_irq_set with `count` fds after it, argsz bytes
        // long; the kernel only reads it during the call.
        if unsafe { ioctl_with_ptr(&self.file, VFIO_DEVICE_SET_IRQS(), buf.as_ptr()) } < 0 {
            return Err(DeviceFdError::SetIrqs {
                index,
                count: fds.len(),
                source: errno::Error::last(),
            });
        }
        Ok(())
    }
}

impl AsRawFd for DeviceFd {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
