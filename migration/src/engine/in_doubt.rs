//! A received VM the destination holds paused because the link died between its Ready and the
//! source's Commit: the source may have committed (and then only this side may run the VM) or
//! not (and then it may have resumed). The operator, who can see both sides, decides.

use super::device_sinks::DeviceSinks;
use super::error::MigrationError;
use super::host::MigrationTarget;

/// The destination's VM, restored, devices loaded, not started.
pub struct InDoubtVm {
    target: Box<dyn MigrationTarget>,
    devices: DeviceSinks,
}

impl std::fmt::Debug for InDoubtVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InDoubtVm")
    }
}

impl InDoubtVm {
    pub(crate) fn new(target: Box<dyn MigrationTarget>, devices: DeviceSinks) -> Self {
        InDoubtVm { target, devices }
    }

    /// The operator decided this side runs the VM: devices to RUNNING, then the vCPUs.
    pub fn run(mut self) -> Result<Box<dyn MigrationTarget>, MigrationError> {
        self.devices.run()?;
        self.target.start().map_err(MigrationError::Host)?;
        Ok(self.target)
    }

    /// The operator decided the source runs the VM: the devices are reset and the VM dropped.
    pub fn abandon(self) {
        self.devices.recover();
    }
}
