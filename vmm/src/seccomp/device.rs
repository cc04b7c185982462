//! Device and helper threads: the lab's mock-DMA simulator (writes guest pages through the iommufd
//! selftest), the auto-converge throttle (pauses and resumes the vCPUs). A helper thread opens and
//! connects nothing.

use super::ioctl::{IoctlAllow, VFIO_IOMMUFD};

/// The device/helper allow list (with [`super::base`]).
pub(super) fn syscalls() -> Vec<i64> {
    vec![
        // iommufd selftest DMA (IOMMU_TEST_OP_ACCESS_RW) and VFIO device ioctls.
        libc::SYS_ioctl,
        // Eventfds and device file access.
        libc::SYS_read,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
    ]
}

/// The helper's ioctls: the iommufd selftest's and VFIO's only.
pub(super) fn ioctls() -> Vec<IoctlAllow> {
    vec![VFIO_IOMMUFD]
}
