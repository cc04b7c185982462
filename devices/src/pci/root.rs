//! The host bridge at 00:00.0.
//!
//! It identifies as the Red Hat / QEMU PCIe host bridge (1b36:0008, class 06/00/00), an ID every
//! mainstream guest binds without a chipset driver. It has no BARs and no capabilities: its only guest
//! visible state is the command register, cache line size/latency scratch and the interrupt line.

use serde::{Deserialize, Serialize};

use super::bar::{BarRegion, BarSpec};
use super::config::{ConfigSpace, ConfigSpaceState, PciIds};
use super::{MoveBarError, PciDevice, PciDeviceState, PciStateError};

/// Vendor ID of the host bridge (Red Hat, Inc.).
pub const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
/// Device ID of the host bridge (QEMU PCIe host bridge).
pub const HOST_BRIDGE_DEVICE: u16 = 0x0008;

/// Saved host bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostBridgeState {
    pub config: ConfigSpaceState,
}

/// The host bridge.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    /// A host bridge fresh from reset.
    pub fn new() -> Self {
        Self {
            config: ConfigSpace::new(PciIds {
                vendor: HOST_BRIDGE_VENDOR,
                device: HOST_BRIDGE_DEVICE,
                revision: 0,
                class: 0x06,
                subclass: 0x00,
                prog_if: 0x00,
                subsystem_vendor: HOST_BRIDGE_VENDOR,
                subsystem: 0x1100,
            }),
        }
    }

    /// Rebuilds a host bridge from saved state.
    pub fn restore(state: &HostBridgeState) -> Result<Self, PciStateError> {
        Ok(Self {
            config: ConfigSpace::restore(&state.config).map_err(|source| {
                PciStateError::Config {
                    device: "host bridge".into(),
                    source,
                }
            })?,
        })
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn bar_specs(&self) -> Vec<BarSpec> {
        Vec::new()
    }

    fn decoded_bars(&self) -> Vec<BarRegion> {
        Vec::new()
    }

    fn move_bar(
        &mut self,
        index: u8,
        _from: Option<u64>,
        to: Option<u64>,
    ) -> Result<(), MoveBarError> {
        // The bus only moves BARs a device declares, and the bridge declares none.
        Err(MoveBarError {
            index,
            to,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })
    }

    fn bar_read(&mut self, _index: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _index: u8, _offset: u64, _data: &[u8]) {}

    fn save(&self) -> Result<PciDeviceState, PciStateError> {
        Ok(PciDeviceState::HostBridge(HostBridgeState {
            config: self.config.save(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{COMMAND_BUS_MASTER, COMMAND_MEMORY, REG_BAR0};
    use super::*;

    #[test]
    fn host_bridge_identifies_as_a_host_bridge() {
        let mut h = HostBridge::new();
        assert_eq!(h.config_read(0), 0x0008_1b36);
        assert_eq!(h.config_read(2) >> 8, 0x06_00_00);
        // Type-0 header, single function.
        assert_eq!((h.config_read(3) >> 16) & 0xff, 0);
    }

    #[test]
    fn host_bridge_bars_size_to_nothing() {
        let mut h = HostBridge::new();
        for i in 0..6 {
            h.config_write((REG_BAR0 + i) * 4, &[0xff; 4]);
            assert_eq!(h.config_read(REG_BAR0 + i), 0);
        }
        assert!(h.decoded_bars().is_empty());
    }

    #[test]
    fn host_bridge_state_round_trips() {
        let mut h = HostBridge::new();
        h.config_write(4, &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes());
        h.config_write(0x3c, &[11]);
        let PciDeviceState::HostBridge(state) = h.save().unwrap() else {
            panic!("the host bridge saved another function's state");
        };
        let json = serde_json::to_vec(&state).unwrap();
        let mut r = HostBridge::restore(&serde_json::from_slice(&json).unwrap()).unwrap();
        assert_eq!(r.config_read(1) & 0xffff, 0x6);
        assert_eq!(r.config_read(15) & 0xff, 11);
        let mut bad = state;
        bad.config.regs.truncate(10);
        assert!(matches!(
            HostBridge::restore(&bad),
            Err(PciStateError::Config { .. })
        ));
    }
}
