//! The only thing the VMM implements for the API: one method per endpoint.

use crate::error::ApiError;
use crate::types::{
    MigrationStatus, VmInfo, VmReceiveMigrationData, VmSendMigrationData, VmmPingResponse,
};
use crate::vm_create::VmCreateConfig;

/// Serves the API's endpoints. The server calls these from a small pool of blocking threads, possibly
/// several at once, so implementations forward to the VMM (e.g. over a channel) and return quickly.
/// A call that takes longer than the server's deadline (30 s by default) is answered 503 for the
/// client while the call itself runs to its end.
///
/// Request bodies arrive already validated (see [`crate::types`]). There are no default bodies: a new
/// endpoint is a compile error for every implementation until it is handled.
pub trait ApiHandler: Send + Sync {
    /// `GET /api/v1/vmm.ping`.
    fn vmm_ping(&self) -> Result<VmmPingResponse, ApiError>;
    /// `PUT /api/v1/vmm.shutdown`: stop the VM (if any) and exit the VMM process. Answer first, exit
    /// after; the caller sees 204.
    fn vmm_shutdown(&self) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.create`: record the VM's configuration (Cloud Hypervisor's `VmConfig`);
    /// nothing runs until `vm.boot`. [`ApiError::Conflict`] if the VMM already has a VM.
    fn vm_create(&self, config: VmCreateConfig) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.boot`: build and start the created VM (again, after `vm.shutdown`).
    fn vm_boot(&self) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.delete`: stop the VM if it runs and forget its configuration.
    fn vm_delete(&self) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.reboot`: stop the running VM and boot it again from its configuration.
    fn vm_reboot(&self) -> Result<(), ApiError>;
    /// `GET /api/v1/vm.info`; [`ApiError::NoVm`] when there is no VM.
    fn vm_info(&self) -> Result<VmInfo, ApiError>;
    /// `PUT /api/v1/vm.pause`.
    fn vm_pause(&self) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.resume`.
    fn vm_resume(&self) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.shutdown`: stop the guest; the VMM stays up.
    fn vm_shutdown(&self) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.send-migration`: start a migration in the background and return at once;
    /// [`ApiError::MigrationRunning`] if one is in flight.
    fn vm_send_migration(&self, data: VmSendMigrationData) -> Result<(), ApiError>;
    /// `PUT /api/v1/vm.receive-migration`: listen on `receiver_url` and return once listening; the
    /// incoming migration runs in the background and reports through [`ApiHandler::vm_migration_status`].
    fn vm_receive_migration(&self, data: VmReceiveMigrationData) -> Result<(), ApiError>;
    /// `GET /api/v1/vm.migration`: a snapshot of the current or last migration (`status: none` if no
    /// migration has run). Must not wait for the migration thread.
    fn vm_migration_status(&self) -> Result<MigrationStatus, ApiError>;
    /// `PUT /api/v1/vm.migration-cancel`: ask the running migration to stop; the source VM keeps
    /// running. [`ApiError::NoMigrationRunning`] if none is in flight.
    fn vm_migration_cancel(&self) -> Result<(), ApiError>;
}
