//! `IOMMU_IOAS_CHANGE_PROCESS` (Linux 6.13): moves the pinned-page accounting of every mapping in
//! an iommufd to the calling process, for a live update that inherited the iommufd. The kernel
//! takes it only for maps made with `IOMMU_IOAS_MAP_FILE` (EINVAL otherwise, nothing changed);
//! before 6.13 the command does not exist (ENOTTY). Without it the pages stay charged to the
//! process (mm and user) that mapped them, and stay pinned, until the mapping goes.

use std::os::fd::AsRawFd;

use iommufd_bindings::iommufd::{
    iommu_ioas_change_process, IOMMUFD_CMD_IOAS_CHANGE_PROCESS, IOMMUFD_TYPE,
};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_io_nr;

use super::uapi_size::argsz;

ioctl_io_nr!(
    IOMMU_IOAS_CHANGE_PROCESS,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_IOAS_CHANGE_PROCESS
);

/// What became of the pinned-page accounting after a live update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountingMove {
    /// The kernel moved it to this process.
    Moved,
    /// This kernel has no `IOMMU_IOAS_CHANGE_PROCESS` (before 6.13).
    NotInKernel,
    /// The kernel refused it (e.g. EINVAL: the maps were not made with `IOMMU_IOAS_MAP_FILE`).
    Refused(errno::Error),
}

impl std::fmt::Display for AccountingMove {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountingMove::Moved => write!(f, "pinned pages now charged to this process"),
            AccountingMove::NotInKernel => write!(
                f,
                "IOMMU_IOAS_CHANGE_PROCESS is not in this kernel (< 6.13): the pinned pages stay \
                 charged to the old process's mm and user until they are unmapped"
            ),
            AccountingMove::Refused(e) => write!(
                f,
                "IOMMU_IOAS_CHANGE_PROCESS refused ({e}): the pinned pages stay charged to the old \
                 process's mm and user until they are unmapped"
            ),
        }
    }
}

/// Asks the kernel to charge every mapping of `iommufd` to this process.
pub fn change_process(iommufd: &impl AsRawFd) -> AccountingMove {
    let arg = iommu_ioas_change_process {
        size: argsz::<iommu_ioas_change_process>(),
        __reserved: 0,
    };
    // SAFETY: the kernel reads the 8-byte struct, alive for the call; it changes no memory of ours.
    let r = unsafe { ioctl_with_ref(iommufd, IOMMU_IOAS_CHANGE_PROCESS(), &arg) };
    if r >= 0 {
        return AccountingMove::Moved;
    }
    let e = errno::Error::last();
    if e.errno() == libc::ENOTTY {
        AccountingMove::NotInKernel
    } else {
        AccountingMove::Refused(e)
    }
}
