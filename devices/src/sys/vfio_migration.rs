//! The parts of the VFIO migration v2 uAPI that vfio-ioctls does not expose the way tern needs
//! them:
//! - `VFIO_DEVICE_FEATURE` `SET | MIG_DEVICE_STATE`: vfio-ioctls stores the data fd the kernel
//!   returns inside its `VfioDevice` and only offers whole-buffer reads and writes on it; tern keeps
//!   the fd itself and streams it.
//! - `VFIO_MIG_GET_PRECOPY_INFO` on that data fd (vfio-ioctls asks its stored fd only).
//! - `VFIO_DEVICE_RESET` with its result: vfio-ioctls skips the ioctl unless the device sets
//!   `VFIO_DEVICE_FLAGS_RESET` (the mtty sample does not, yet implements it, and reset is how a
//!   device leaves the migration ERROR state) and ignores the return value.
//!
//! Reading the migration capabilities, the current state and the stop-copy size is left to
//! vfio-ioctls (`query_migration_support`, `get_migration_state`, `get_mig_data_size`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vfio_bindings::bindings::vfio::{
    vfio_device_feature_mig_state, vfio_precopy_info, VFIO_BASE,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_SET, VFIO_TYPE,
};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref};
use vmm_sys_util::ioctl_io_nr;

use super::uapi_size::argsz;

ioctl_io_nr!(VFIO_DEVICE_FEATURE, VFIO_TYPE as u32, VFIO_BASE + 17);
ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);
ioctl_io_nr!(VFIO_MIG_GET_PRECOPY_INFO, VFIO_TYPE as u32, VFIO_BASE + 21);

/// `struct vfio_device_feature` followed by its `vfio_device_feature_mig_state` payload, as one
/// fixed-size argument.
#[repr(C)]
#[derive(Debug, Default)]
struct FeatureMigState {
    argsz: u32,
    flags: u32,
    mig: vfio_device_feature_mig_state,
}

const _: () = assert!(std::mem::size_of::<FeatureMigState>() == 16);
const _: () = assert!(std::mem::offset_of!(FeatureMigState, mig) == 8);

/// Moves the device behind `device` (a VFIO device fd) to migration state `state` (a
/// `vfio_device_mig_state` value). Returns the data fd the kernel opened for a new save or resume
/// stream, or `None` when it returned none (`data_fd = -1`): the arc opens no stream, or it
/// continues one already open (PRE_COPY_P2P → STOP_COPY on mtty keeps the pre-copy fd).
///
/// The kernel walks multi-arc requests itself; tern asks for single arcs only (see
/// `vfio::migration::state`), so a failure names the arc that failed.
pub fn set_device_state(
    device: &impl AsRawFd,
    state: u32,
) -> Result<Option<OwnedFd>, errno::Error> {
    let mut arg = FeatureMigState {
        argsz: argsz::<FeatureMigState>(),
        flags: VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        mig: vfio_device_feature_mig_state {
            device_state: state,
            data_fd: -1,
        },
    };
    // SAFETY: `device` is an open VFIO device fd, on which VFIO_DEVICE_FEATURE is defined. `arg`
    // is a live exclusive borrow for the call; `argsz` gives its exact size, within which the
    // kernel reads the header and payload and writes back the payload (`data_fd`). It follows no
    // pointer.
    let ret = unsafe {
        ioctl_with_mut_ref(
            &BorrowedRaw(device.as_raw_fd()),
            VFIO_DEVICE_FEATURE(),
            &mut arg,
        )
    };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    let fd = arg.mig.data_fd;
    if fd < 0 {
        return Ok(None);
    }
    // SAFETY: on success with `data_fd >= 0` the kernel installed a new fd in this process's
    // table for the caller (vfio_ioct_mig_return_fd), which nothing else owns; taking ownership
    // here closes it exactly once.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// `VFIO_MIG_GET_PRECOPY_INFO` on a PRE_COPY data fd: `initial_bytes` and `dirty_bytes` still to
/// read. The kernel refuses it outside PRE_COPY and PRE_COPY_P2P (EINVAL).
pub fn precopy_info(data_fd: &impl AsRawFd) -> Result<vfio_precopy_info, errno::Error> {
    let mut info = vfio_precopy_info {
        argsz: argsz::<vfio_precopy_info>(),
        ..Default::default()
    };
    // SAFETY: `data_fd` is a migration data fd; drivers that do not implement the ioctl answer
    // ENOTTY. `info` is a live exclusive borrow for the call, `argsz` its size; the kernel reads
    // and writes within it and follows no pointer.
    let ret = unsafe {
        ioctl_with_mut_ref(
            &BorrowedRaw(data_fd.as_raw_fd()),
            VFIO_MIG_GET_PRECOPY_INFO(),
            &mut info,
        )
    };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(info)
}

/// `VFIO_DEVICE_RESET`: the device returns to its reset state, and its migration state to RUNNING
/// (the only way out of ERROR).
pub fn device_reset(device: &impl AsRawFd) -> Result<(), errno::Error> {
    // SAFETY: `device` is an open VFIO device fd; VFIO_DEVICE_RESET takes no argument and touches
    // no memory of this process.
    let ret = unsafe { ioctl(&BorrowedRaw(device.as_raw_fd()), VFIO_DEVICE_RESET()) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

/// A borrowed fd for the ioctl helpers.
struct BorrowedRaw(RawFd);

impl AsRawFd for BorrowedRaw {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_uapi() {
        // _IO(';', 100 + n) from include/uapi/linux/vfio.h.
        assert_eq!(VFIO_DEVICE_FEATURE(), 0x3b75);
        assert_eq!(VFIO_DEVICE_RESET(), 0x3b6f);
        assert_eq!(VFIO_MIG_GET_PRECOPY_INFO(), 0x3b79);
    }

    #[test]
    fn set_state_on_a_non_vfio_fd_is_refused() {
        let f = std::fs::File::open("/dev/null").expect("/dev/null");
        let err = set_device_state(&f, 2).expect_err("/dev/null has no VFIO_DEVICE_FEATURE");
        assert_eq!(err.errno(), libc::ENOTTY);
    }
}
