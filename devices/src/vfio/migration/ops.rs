//! The kernel interface of one migratable device, as [`super::DeviceMigration`] drives it:
//! vfio-ioctls' [`VfioDevice`] in tern (through vfio-ioctls where it fits and
//! [`crate::sys::vfio_migration`] where it does not), a scripted fake in the unit tests.

use std::fs::File;
use std::sync::Arc;

use vfio_ioctls::{VfioDevice, VfioError};
use vmm_sys_util::errno;

use super::state::MigState;
use crate::sys::vfio_migration;

/// What the kernel tells about a PRE_COPY stream (`VFIO_MIG_GET_PRECOPY_INFO`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrecopyInfo {
    /// Bytes of the initial state not read yet; the destination needs them before switchover.
    pub initial_bytes: u64,
    /// Bytes the device changed since, not read yet (an estimate; may grow while it runs).
    pub dirty_bytes: u64,
}

/// The migration ioctls of one device. Every error is the kernel's errno.
pub trait MigrationOps {
    /// `VFIO_DEVICE_FEATURE_MIGRATION`: the capability flags, `None` without migration v2.
    fn migration_flags(&self) -> Result<Option<u64>, errno::Error>;
    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` (GET): the current state's uAPI value.
    fn device_state(&self) -> Result<u32, errno::Error>;
    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` (SET) for one arc: the data fd of a new stream, if
    /// the kernel opened one.
    fn set_device_state(&self, state: MigState) -> Result<Option<File>, errno::Error>;
    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: the driver's estimate of the STOP_COPY stream length.
    fn stop_copy_size(&self) -> Result<u64, errno::Error>;
    /// `VFIO_MIG_GET_PRECOPY_INFO` on `data`, the PRE_COPY data fd.
    fn precopy_info(&self, data: &File) -> Result<PrecopyInfo, errno::Error>;
    /// `VFIO_DEVICE_RESET`.
    fn reset(&self) -> Result<(), errno::Error>;
}

/// vfio-ioctls wraps the feature ioctl's errno in [`VfioError::VfioDeviceFeature`]; that is
/// the only error its migration getters return.
fn feature_errno(e: VfioError) -> errno::Error {
    match e {
        VfioError::VfioDeviceFeature(e) => e,
        other => {
            log::warn!("unexpected vfio-ioctls error from a migration feature ioctl: {other}");
            errno::Error::new(libc::EIO)
        }
    }
}

impl MigrationOps for VfioDevice {
    fn migration_flags(&self) -> Result<Option<u64>, errno::Error> {
        self.query_migration_support().map_err(feature_errno)
    }
    fn device_state(&self) -> Result<u32, errno::Error> {
        self.get_migration_state().map_err(feature_errno)
    }
    fn set_device_state(&self, state: MigState) -> Result<Option<File>, errno::Error> {
        Ok(vfio_migration::set_device_state(self, state.raw())?.map(File::from))
    }
    fn stop_copy_size(&self) -> Result<u64, errno::Error> {
        self.get_mig_data_size().map_err(feature_errno)
    }
    fn precopy_info(&self, data: &File) -> Result<PrecopyInfo, errno::Error> {
        let info = vfio_migration::precopy_info(data)?;
        Ok(PrecopyInfo {
            initial_bytes: info.initial_bytes,
            dirty_bytes: info.dirty_bytes,
        })
    }
    fn reset(&self) -> Result<(), errno::Error> {
        vfio_migration::device_reset(self)
    }
}

impl<T: MigrationOps + ?Sized> MigrationOps for Arc<T> {
    fn migration_flags(&self) -> Result<Option<u64>, errno::Error> {
        (**self).migration_flags()
    }
    fn device_state(&self) -> Result<u32, errno::Error> {
        (**self).device_state()
    }
    fn set_device_state(&self, state: MigState) -> Result<Option<File>, errno::Error> {
        (**self).set_device_state(state)
    }
    fn stop_copy_size(&self) -> Result<u64, errno::Error> {
        (**self).stop_copy_size()
    }
    fn precopy_info(&self, data: &File) -> Result<PrecopyInfo, errno::Error> {
        (**self).precopy_info(data)
    }
    fn reset(&self) -> Result<(), errno::Error> {
        (**self).reset()
    }
}
