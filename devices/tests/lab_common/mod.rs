//! Helpers the lab-only test binaries (`devices/tests/lab_*.rs`) share: finding the lab's
//! devices and allocating iommufd objects.
#![allow(dead_code)]

use std::fs;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use iommufd_bindings::iommufd::iommu_ioas_alloc;
use iommufd_ioctls::IommuFd;
use tern_devices::sys::uapi_size::argsz;

pub const EDU_VENDOR: &str = "0x1234";
pub const EDU_DEVICE: &str = "0x11e8";

/// The sysfs directory of QEMU's edu device; the lab binds it to vfio-pci before the tests run.
pub fn edu_sysfs_path() -> Result<PathBuf> {
    for entry in fs::read_dir("/sys/bus/pci/devices").context("listing pci devices")? {
        let path = entry?.path();
        let id = |f: &str| fs::read_to_string(path.join(f)).unwrap_or_default();
        if id("vendor").trim() == EDU_VENDOR && id("device").trim() == EDU_DEVICE {
            let driver = fs::read_link(path.join("driver")).unwrap_or_default();
            if !driver.ends_with("vfio-pci") {
                bail!(
                    "edu at {} is bound to {:?}, not vfio-pci",
                    path.display(),
                    driver
                );
            }
            return Ok(path);
        }
    }
    bail!("no edu device (1234:11e8) on the pci bus: is QEMU started with -device edu?")
}

pub fn ioas_alloc(iommufd: &IommuFd) -> Result<u32> {
    let mut alloc = iommu_ioas_alloc {
        size: argsz::<iommu_ioas_alloc>(),
        ..Default::default()
    };
    iommufd
        .alloc_iommu_ioas(&mut alloc)
        .context("IOMMU_IOAS_ALLOC")?;
    Ok(alloc.out_ioas_id)
}
