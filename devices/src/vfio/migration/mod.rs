//! VFIO migration v2 device state: the states and the one function that decides their arcs
//! ([`state`]), a device's capabilities ([`caps`]), the kernel calls behind them ([`ops`]), and
//! the per-device handle that walks arcs, streams the data fd and recovers a failed device
//! ([`device_state`]), and that handle as the engine's device-state source and sink ([`engine`]).
//!
//! The migration engine drives one [`DeviceMigration`] per passthrough device: on the source
//! RUNNING → PRE_COPY (pre-copy data interleaved with memory) → with several devices all
//! `*_P2P` first → STOP_COPY → data to end of stream; on the destination RESUMING → data →
//! STOP → RUNNING_P2P → RUNNING. Any failure: [`DeviceMigration::recover`].

pub mod caps;
pub mod device_state;
pub mod engine;
#[cfg(test)]
mod fake;
pub mod ops;
pub mod state;

pub use caps::MigrationCaps;
pub use device_state::{
    DataRead, DeviceMigration, DeviceMigrationError, DeviceMigrationStats, ReadEnd, Recovery,
};
pub use engine::{VfioStateSink, VfioStateSource};
pub use ops::{MigrationOps, PrecopyInfo};
pub use state::{check_arc, next_arc, path, MigState, StateError};
