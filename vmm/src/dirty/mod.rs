//! The VMM's dirty-page sources for migration: KVM's dirty log (manual clear) and dirty ring.
//!
//! The migration glue asks for the KVM source with [`kvm_dirty_source`]; which one it gets follows
//! the machine's configuration (`--dirty-tracking log|ring`).

pub mod kvm_log;
mod snapshot;

use tern_migration::dirty::DirtySource;

use crate::machine::Machine;

pub use kvm_log::{KvmDirtyLog, KvmLogError, LogMode};

/// Errors choosing or building the KVM dirty source.
#[derive(Debug, thiserror::Error)]
pub enum KvmDirtyError {}

/// The KVM dirty source for `machine`: the dirty log or the dirty ring, as configured.
pub fn kvm_dirty_source(machine: &Machine) -> Result<Box<dyn DirtySource>, KvmDirtyError> {
    Ok(Box::new(KvmDirtyLog::new(
        machine.vm_shared(),
        machine.ram(),
    )))
}
