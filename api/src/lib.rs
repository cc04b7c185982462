//! tern's REST API: the contract between tern and whatever drives it.
//!
//! What it does:
//! - defines the request and response bodies ([`types`]), with Cloud Hypervisor's endpoint and field
//!   names under `/api/v1/`, plus `GET vm.migration` (progress) and `PUT vm.migration-cancel`;
//! - defines [`ApiHandler`], the one trait the VMM implements (one method per endpoint), and
//!   [`ApiError`], whose [`ApiError::status_code`] is the only error → HTTP status mapping;
//! - serves HTTP/1.1 on a Unix socket created mode 0600 ([`ApiServer`], hyper underneath), routing
//!   `(method, path)` to the handler and refusing bad requests with Cloud Hypervisor's error body (a
//!   JSON array of the error chain's messages, outermost first);
//! - offers a blocking client ([`ApiClient`]) and the `ternctl` command line on top of it;
//! - keeps `api/openapi.yaml` honest: a test fails when it and the route table or types disagree.
//!
//! What it refuses to do:
//! - depend on any other tern crate: the VMM converts these types to its own, never the reverse;
//! - do work on the API thread: handler calls run on a small blocking pool with a deadline, and
//!   long operations (a migration) are started by the handler and reported through `vm.migration`;
//! - accept a request body it has not fully validated, or read a body larger than the limit;
//! - listen on TCP: the API is local and guarded by file permissions.

#![deny(unsafe_code)]

pub mod client;
pub mod error;
pub mod handler;
pub mod router;
pub mod server;
pub mod types;
pub mod url;
pub mod vm_config;
pub mod vm_create;
pub mod wire;

pub use client::{ApiClient, ApiClientError, RawResponse};
pub use error::{error_chain, ApiError};
pub use handler::ApiHandler;
pub use router::{Endpoint, HttpMethod, API_PREFIX};
pub use server::{ApiServer, ApiServerError, ServerOptions};
pub use types::{
    DeviceInfo, DeviceMapping, DeviceMigrationStatus, DirtyPagesBySource, DmaDirtyInfo, DmaDomain,
    IommuCapabilities, MigrationMode, MigrationState, MigrationStatus, ReceiveMigrationDataError,
    SendMigrationDataError, TimeoutStrategy, VmConfigInfo, VmInfo, VmReceiveMigrationData,
    VmSendMigrationData, VmState, VmmPingResponse,
};
pub use url::{MigrationUrl, MigrationUrlError};
