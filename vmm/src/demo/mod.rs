//! The built-in demo guest: tern's default workload and its migration oracle.
//!
//! The payload (guests/demo/demo.S, assembled at build time) dirties a working set at a chosen rate
//! with content that is a pure function of (page, generation) and keeps re-verifying it; any page a
//! migration loses shows up as `DEMO: CORRUPT` on the serial console. [`elf`] writes the same guest
//! out as a standalone PVH ELF for other VMMs (guests/demo/pvh.S).

pub mod config;
pub mod elf;
pub mod payload;
pub mod setup;

pub use config::DemoConfig;
