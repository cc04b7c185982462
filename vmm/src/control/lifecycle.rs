//! A VM's life through the API, as Cloud Hypervisor defines it: `vm.create` records a
//! configuration (state `Created`), `vm.boot` builds and starts it, `vm.shutdown` stops it but
//! keeps the configuration (`Shutdown`, bootable again), `vm.reboot` stops it and boots it anew
//! from the same configuration, `vm.delete` stops it and forgets it. The command line goes through
//! the same [`Controller::create_vm`] and [`Controller::boot_vm`].

use std::sync::Arc;

use tern_api::{error_chain, ApiError};

use super::{Controller, RunState};
use crate::config::VmConfig;
use crate::machine::Machine;

impl Controller {
    /// Records the VM to boot. Refused when the VMM already has one (created, running, received
    /// or held in doubt) or is receiving one.
    pub fn create_vm(&self, config: VmConfig) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if inner.config.is_some() || inner.machine.is_some() || inner.in_doubt.is_some() {
            return Err(ApiError::Conflict {
                reason: "this VMM already has a VM: vm.delete it first".into(),
            });
        }
        if Self::running_migration(&inner) {
            return Err(ApiError::MigrationRunning);
        }
        inner.config = Some(config);
        inner.run_state = RunState::Created;
        Ok(())
    }

    /// Builds the created VM and starts its vCPUs.
    pub fn boot_vm(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if Self::running_migration(&inner) {
            return Err(ApiError::MigrationRunning);
        }
        if inner.machine.is_some() {
            return Err(ApiError::InvalidState {
                operation: "boot",
                state: inner.run_state.name().into(),
            });
        }
        let config = inner.config.clone().ok_or(ApiError::NoVm)?;
        // Built under the lock: a second vm.boot waits and then finds the VM running.
        let machine = Machine::create(&self.kvm_path, config).map_err(|e| ApiError::Internal {
            reason: format!("booting the VM: {}", error_chain(&e)),
        })?;
        machine.resume();
        inner.machine = Some(Arc::new(machine));
        inner.run_state = RunState::Running;
        drop(inner);
        // The main loop starts watching the new VM's exit events.
        let _ = self.wake.write(1);
        Ok(())
    }

    /// Stops the running VM and boots it again from its configuration.
    pub(super) fn reboot_vm(&self) -> Result<(), ApiError> {
        {
            let mut inner = self.lock();
            if Self::running_migration(&inner) {
                return Err(ApiError::MigrationRunning);
            }
            let machine = inner.machine.take().ok_or_else(|| match inner.config {
                Some(_) => ApiError::InvalidState {
                    operation: "reboot",
                    state: inner.run_state.name().into(),
                },
                None => ApiError::NoVm,
            })?;
            machine.pause();
            inner.run_state = RunState::Shutdown;
            drop(inner);
            // The old VM's memory and devices are released before the new one is built.
            drop(machine);
        }
        self.boot_vm()
    }

    /// Stops the VM if it runs and forgets its configuration.
    pub(super) fn delete_vm(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if Self::running_migration(&inner) {
            return Err(ApiError::MigrationRunning);
        }
        if let Some(vm) = inner.in_doubt.take() {
            log::warn!("vm.delete drops the VM held in doubt: the operator chose the source");
            vm.abandon();
        }
        let machine = inner.machine.take();
        if let Some(m) = &machine {
            m.pause();
        }
        inner.config = None;
        inner.run_state = RunState::Shutdown;
        drop(inner);
        drop(machine);
        let _ = self.wake.write(1);
        Ok(())
    }
}
