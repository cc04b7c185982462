//! The fuzz targets' bodies, shared with the workspace's stable corpus replay tests.

#[path = "../harness/api.rs"]
pub mod api;
#[path = "../harness/input.rs"]
pub mod input;
#[path = "../harness/migration.rs"]
pub mod migration;
#[path = "../harness/state.rs"]
pub mod state;
