//! PCI configuration mechanism #1: the CONFIG_ADDRESS register at port 0xCF8 and the CONFIG_DATA
//! window at 0xCFC..0xCFF.
//!
//! ```text
//!  CONFIG_ADDRESS  31 enable | 30:24 reserved | 23:16 bus | 15:11 device | 10:8 function | 7:2 register | 1:0 0
//! ```
//! Only dword accesses reach CONFIG_ADDRESS (narrower ones belong to other legacy devices on real
//! chipsets; here they read all-ones and are dropped). A data access of `n` bytes at 0xCFC + `k` reaches
//! byte `register * 4 + k` of the selected function, so byte and word accesses to 0xCFD..0xCFF work as
//! guests expect. With the enable bit clear, or for a bus, device or function that does not exist, reads
//! return all-ones (a master abort) and writes are dropped.

use std::sync::{Arc, Mutex};

use super::bus::PciBus;
use crate::bus::BusDevice;

/// First port of the mechanism.
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
/// Ports it occupies (address and data).
pub const PCI_CONFIG_IO_LEN: u64 = 8;

const ENABLE: u32 = 1 << 31;
/// Bits of CONFIG_ADDRESS that hold state (reserved bits read as zero).
const ADDRESS_MASK: u32 = ENABLE | 0x00ff_fffc;

/// The configuration mechanism as a port I/O device.
#[derive(Debug)]
pub struct PciConfigIo {
    bus: Arc<Mutex<PciBus>>,
    address: u32,
}

impl PciConfigIo {
    /// The mechanism in front of `bus`.
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        Self { bus, address: 0 }
    }

    /// The slot and byte offset a data access at `data_offset` (0..4) of `len` bytes targets, or None
    /// when it reaches no function.
    fn target(&self, data_offset: u64, len: usize) -> Option<(u8, usize)> {
        let a = self.address;
        let bus = (a >> 16) & 0xff;
        let function = (a >> 8) & 0x7;
        if a & ENABLE == 0 || bus != 0 || function != 0 {
            return None;
        }
        let k = usize::try_from(data_offset).ok()?;
        if k + len > 4 {
            return None;
        }
        let slot = ((a >> 11) & 0x1f) as u8;
        Some((slot, (a & 0xfc) as usize + k))
    }

    fn bus(&self) -> std::sync::MutexGuard<'_, PciBus> {
        self.bus.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => {
                if let Some((slot, off)) = self.target(offset - 4, data.len()) {
                    self.bus().config_read(slot, off, data);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(v) = <[u8; 4]>::try_from(data) {
                    self.address = u32::from_le_bytes(v) & ADDRESS_MASK;
                }
            }
            4..=7 => {
                if let Some((slot, off)) = self.target(offset - 4, data.len()) {
                    for refused in self.bus().config_write(slot, off, data) {
                        // The guest asked for an impossible placement; hardware would decode
                        // garbage, tern leaves the BAR unmapped and says why.
                        log::warn!("PCI: guest BAR placement refused: {refused}");
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::bar::{BarKind, BarSpec};
    use super::super::bus::tests::{windows, TestDevice, MEM_BASE};
    use super::super::config::COMMAND_MEMORY;
    use super::*;

    fn setup() -> (PciConfigIo, Arc<Mutex<TestDevice>>) {
        let mut bus = PciBus::new(windows());
        let spec = BarSpec {
            index: 0,
            kind: BarKind::Memory32 {
                prefetchable: false,
            },
            size: 0x1000,
        };
        let d = Arc::new(Mutex::new(TestDevice::new(&[(spec, MEM_BASE)])));
        bus.add_device(Some(2), d.clone()).unwrap();
        (PciConfigIo::new(Arc::new(Mutex::new(bus))), d)
    }

    fn select(io: &mut PciConfigIo, slot: u32, function: u32, reg_byte: u32) {
        io.write(
            0,
            &(ENABLE | (slot << 11) | (function << 8) | reg_byte).to_le_bytes(),
        );
    }

    fn read(io: &mut PciConfigIo, port_offset: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        io.read(port_offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn config_io_reads_ids_at_every_width() {
        let (mut io, _) = setup();
        select(&mut io, 2, 0, 0);
        assert_eq!(read(&mut io, 4, 4), 0x0011_1234);
        assert_eq!(read(&mut io, 4, 2), 0x1234);
        assert_eq!(read(&mut io, 6, 2), 0x0011);
        assert_eq!(read(&mut io, 5, 1), 0x12);
        assert_eq!(read(&mut io, 7, 1), 0x00);
        select(&mut io, 2, 0, 8);
        assert_eq!(read(&mut io, 7, 1), 0xff); // class byte of register 2
    }

    #[test]
    fn config_io_address_register_holds_only_defined_bits() {
        let (mut io, _) = setup();
        io.write(0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read(&mut io, 0, 4), 0x80ff_fffc);
        // Narrow accesses do not reach CONFIG_ADDRESS.
        io.write(0, &[0]);
        assert_eq!(read(&mut io, 0, 4), 0x80ff_fffc);
        assert_eq!(read(&mut io, 0, 1), 0xff);
        assert_eq!(read(&mut io, 2, 2), 0xffff);
    }

    #[test]
    fn config_io_without_enable_or_for_missing_functions_reads_all_ones() {
        let (mut io, _) = setup();
        io.write(0, &(2u32 << 11).to_le_bytes()); // enable clear
        assert_eq!(read(&mut io, 4, 4), 0xffff_ffff);
        select(&mut io, 3, 0, 0); // empty slot
        assert_eq!(read(&mut io, 4, 4), 0xffff_ffff);
        select(&mut io, 2, 1, 0); // function 1
        assert_eq!(read(&mut io, 4, 2), 0xffff);
        io.write(0, &(ENABLE | (1 << 16) | (2 << 11)).to_le_bytes()); // bus 1
        assert_eq!(read(&mut io, 4, 4), 0xffff_ffff);
        // A word at 0xCFF would cross the data window.
        select(&mut io, 2, 0, 0);
        assert_eq!(read(&mut io, 7, 2), 0xffff);
    }

    #[test]
    fn config_io_writes_reach_the_function_at_byte_granularity() {
        let (mut io, d) = setup();
        select(&mut io, 2, 0, 4);
        // Byte write at 0xCFC (command low byte) enables memory decode.
        io.write(4, &[COMMAND_MEMORY as u8]);
        assert_eq!(d.lock().unwrap().config.command(), COMMAND_MEMORY);
        // Size the BAR through the data port.
        select(&mut io, 2, 0, 0x10);
        io.write(4, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read(&mut io, 4, 4), 0xffff_f000);
        // Word write to the upper half of BAR0 through 0xCFE.
        io.write(6, &0xc010u16.to_le_bytes());
        assert_eq!(read(&mut io, 4, 4), 0xc010_f000);
        // Writes with enable clear are dropped.
        io.write(0, &(2u32 << 11 | 0x10).to_le_bytes());
        io.write(4, &0u32.to_le_bytes());
        select(&mut io, 2, 0, 0x10);
        assert_eq!(read(&mut io, 4, 4), 0xc010_f000);
    }
}
