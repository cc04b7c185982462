//! `VFIO_DEVICE_FEATURE` with `PROBE | SET | DMA_LOGGING_START`: does the device offer DMA dirty
//! logging? vfio-ioctls starts, reports and stops logging but has no probe, and starting logging
//! just to find out would be a side effect. The kernel answers 0 when the device has log ops and
//! ENOTTY when it has none.

use std::os::fd::AsRawFd;

use vfio_bindings::bindings::vfio::{
    vfio_device_feature, VFIO_BASE, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET, VFIO_TYPE,
};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

use super::uapi_size::argsz;

ioctl_io_nr!(VFIO_DEVICE_FEATURE, VFIO_TYPE as u32, VFIO_BASE + 17);

/// True when the VFIO device behind `device` (a device fd) supports DMA logging.
pub fn supports_dma_logging(device: &impl AsRawFd) -> bool {
    let mut arg = vfio_device_feature {
        argsz: argsz::<vfio_device_feature>(),
        flags: VFIO_DEVICE_FEATURE_PROBE
            | VFIO_DEVICE_FEATURE_SET
            | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        ..Default::default()
    };
    // SAFETY: `device` is an open VFIO device fd, on which VFIO_DEVICE_FEATURE is defined. With
    // PROBE the kernel reads only the 8-byte header (`argsz` says so) from `arg`, a live exclusive
    // borrow for the call, follows no pointer and writes nothing back.
    let ret = unsafe {
        ioctl_with_mut_ref(
            &RawDevice(device.as_raw_fd()),
            VFIO_DEVICE_FEATURE(),
            &mut arg,
        )
    };
    ret == 0
}

/// A borrowed fd for the ioctl helper.
struct RawDevice(std::os::fd::RawFd);

impl AsRawFd for RawDevice {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_uapi() {
        // _IO(';', 100 + 17) from include/uapi/linux/vfio.h.
        assert_eq!(VFIO_DEVICE_FEATURE(), 0x3b75);
    }
}
