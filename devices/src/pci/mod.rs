//! A conventional PCI bus 0 with one function per slot: configuration space, BARs, MSI and MSI-X
//! emulation, the host bridge, and the 0xCF8/0xCFC configuration mechanism.
//!
//! ```text
//!  port 0xCF8..0xCFF ─► PciConfigIo ─┐
//!                                    ├─► PciBus ── slot 0: HostBridge
//!  MMIO/PIO windows ─► PciWindow ────┘            slot n: dyn PciDevice (emulated, VFIO)
//!                          (BAR dispatch map, kept in step with the guest's BAR writes)
//! ```
//!
//! Devices know nothing of KVM: a device reports vector changes through [`msi::MsiRouteSink`], which
//! the VMM implements with GSI routing and irqfds. What this module refuses: functions other than 0,
//! buses other than 0, bridges, ECAM (the 0xCF8 mechanism reaches all 256 bytes of the conventional
//! space, which is all these devices have).

pub mod bar;
pub mod bus;
pub mod config;
pub mod config_io;
pub mod msi;
pub mod msix;
pub mod root;
#[cfg(test)]
mod test_device;

use serde::{Deserialize, Serialize};

use bar::{BarRegion, BarSpec};

/// A PCI function on the bus (function 0 of its slot).
///
/// Configuration accesses arrive as whole-register reads and sub-register writes so that write masks
/// and RW1C bits act per byte. BAR accesses arrive as offsets inside the BAR.
pub trait PciDevice: Send {
    /// Reads configuration dword register `reg` (0..64).
    fn config_read(&mut self, reg: usize) -> u32;
    /// Guest write of 1, 2 or 4 bytes at byte `offset` (0..256), never crossing a dword.
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// The BARs the function has.
    fn bar_specs(&self) -> Vec<BarSpec>;
    /// The regions the function decodes now (address assigned and space enabled in the command
    /// register). The bus maps exactly these.
    fn decoded_bars(&self) -> Vec<BarRegion>;
    /// The bus moved BAR `index` from `from` to `to` (`None`: not mapped) after a guest write. A VFIO
    /// device moves its KVM memslot here. An error leaves the BAR unmapped and is logged: the guest
    /// caused it and sees a BAR that reads all-ones, as on hardware with a bad assignment.
    fn move_bar(
        &mut self,
        index: u8,
        from: Option<u64>,
        to: Option<u64>,
    ) -> Result<(), MoveBarError>;
    /// Guest read of `data.len()` bytes at `offset` inside BAR `index`.
    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` inside BAR `index`.
    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]);
    /// The function's state for migration. No default body: a device without state does not compile.
    fn save(&self) -> Result<PciDeviceState, PciStateError>;
}

/// A device's refusal to move a BAR.
#[derive(Debug, thiserror::Error)]
#[error("BAR {index} cannot move to {to:#x?}")]
pub struct MoveBarError {
    pub index: u8,
    pub to: Option<u64>,
    #[source]
    pub source: std::io::Error,
}

/// Saved state of one PCI function: a closed set, one variant per device model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PciDeviceState {
    HostBridge(root::HostBridgeState),
    /// A passthrough function's emulated configuration (its device state moves separately, through
    /// VFIO migration v2).
    Vfio(crate::vfio::device::VfioPciState),
}

/// Errors saving or restoring a PCI function.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciStateError {
    /// The device cannot be migrated (e.g. a passthrough function without migration support).
    #[error("PCI device {device} cannot be migrated")]
    NotMigratable { device: String },
    /// Saved configuration space is malformed.
    #[error("saved configuration space of {device}")]
    Config {
        device: String,
        #[source]
        source: config::ConfigSpaceError,
    },
    /// The saved function is not this one (another id, other IDs, BARs or capabilities).
    #[error("saved state of {device} does not fit this function: {reason}")]
    Mismatch { device: String, reason: String },
    /// The restored interrupt vectors could not be programmed.
    #[error("{device}: cannot re-enable its interrupts: {reason}")]
    Interrupts { device: String, reason: String },
}
