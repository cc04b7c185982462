//! The VMM's dirty-page sources for migration: KVM's dirty log (manual clear) and dirty ring.
//!
//! The migration glue asks for the KVM source with [`kvm_dirty_source`]; which one it gets follows
//! the machine's configuration (`--dirty-tracking log|ring`). KVM refuses to mix them: on a VM with
//! dirty rings, KVM_GET_DIRTY_LOG fails with ENXIO.

pub mod kvm_log;
pub mod kvm_ring;
mod snapshot;

use tern_migration::dirty::DirtySource;

use crate::config::DirtyTracking;
use crate::machine::Machine;

pub use kvm_log::{KvmDirtyLog, KvmLogError, LogMode};
pub use kvm_ring::{DirtyRings, KvmDirtyRing, KvmRingError};

/// Errors choosing or building the KVM dirty source.
#[derive(Debug, thiserror::Error)]
pub enum KvmDirtyError {
    /// The configuration asks for the ring but the machine has none (a tern bug: the machine
    /// builder maps rings whenever the configuration says ring).
    #[error("--dirty-tracking ring is configured but this VM was built without KVM dirty rings")]
    RingMissing,
}

/// The KVM dirty source for `machine`: the dirty log or the dirty ring, as configured
/// (`VmConfig::dirty_tracking`). The source is returned stopped; the engine starts it.
pub fn kvm_dirty_source(machine: &Machine) -> Result<Box<dyn DirtySource>, KvmDirtyError> {
    match machine.config().dirty_tracking {
        DirtyTracking::Log => Ok(Box::new(KvmDirtyLog::new(
            machine.vm_shared(),
            machine.ram(),
        ))),
        DirtyTracking::Ring => {
            let rings = machine.dirty_rings().ok_or(KvmDirtyError::RingMissing)?;
            Ok(Box::new(KvmDirtyRing::new(rings.clone())))
        }
    }
}
