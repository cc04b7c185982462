//! The VMM side of live migration: the running [`Machine`](crate::machine::Machine) as the engine's
//! `MigrationHost` (source), a factory that rebuilds it on the destination, the state encoding that
//! travels between them, and vCPU throttling for auto-converge.

pub mod device_map;
pub mod host;
pub mod state_codec;
pub mod target;
pub mod throttle;
