//! A test-only function that composes the pieces the way an emulated or VFIO device does — a BAR
//! with the MSI-X table and PBA in it, an MSI capability, configuration writes routed through the
//! capability emulation — and drives it end to end through the 0xCF8/0xCFC ports and the MMIO window,
//! as a guest would.

use std::sync::Arc;

use super::bar::{BarKind, BarRegion, BarSpec};
use super::config::{ConfigSpace, PciIds};
use super::msi::{MsiCap, MsiRouteSink};
use super::msix::Msix;
use super::{MoveBarError, PciDevice, PciDeviceState, PciStateError};

/// Where the table and PBA sit in BAR 0.
const TABLE_OFFSET: u64 = 0;
const PBA_OFFSET: u64 = 0x800;

pub(crate) struct MsixTestDevice {
    config: ConfigSpace,
    bar: BarSpec,
    msi: MsiCap,
    msix: Msix,
    sink: Arc<dyn MsiRouteSink>,
    /// Route errors the guest's writes caused (a device would log them).
    pub route_errors: usize,
}

impl MsixTestDevice {
    pub(crate) fn new(bar_addr: u64, sink: Arc<dyn MsiRouteSink>) -> Self {
        let mut config = ConfigSpace::new(PciIds {
            vendor: 0x1234,
            device: 0xabcd,
            revision: 1,
            class: 0x02,
            subclass: 0x00,
            prog_if: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let bar = BarSpec {
            index: 0,
            kind: BarKind::Memory64 {
                prefetchable: false,
            },
            size: 0x1000,
        };
        bar.install(&mut config, bar_addr).unwrap();
        let msi = MsiCap::add(&mut config, 1, true).unwrap();
        let msix = Msix::add(
            &mut config,
            4,
            (0, TABLE_OFFSET as u32),
            (0, PBA_OFFSET as u32),
        )
        .unwrap();
        Self {
            config,
            bar,
            msi,
            msix,
            sink,
            route_errors: 0,
        }
    }
}

impl PciDevice for MsixTestDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let r = if self.msi.covers(offset, data.len()) {
            self.msi
                .config_write(&mut self.config, offset, data, self.sink.as_ref())
        } else if self.msix.covers(offset, data.len()) {
            self.msix
                .config_write(&mut self.config, offset, data, self.sink.as_ref())
        } else {
            self.config.write(offset, data);
            Ok(())
        };
        self.route_errors += usize::from(r.is_err());
    }

    fn bar_specs(&self) -> Vec<BarSpec> {
        vec![self.bar]
    }

    fn decoded_bars(&self) -> Vec<BarRegion> {
        self.bar.decoded(&self.config).into_iter().collect()
    }

    fn move_bar(&mut self, _: u8, _: Option<u64>, _: Option<u64>) -> Result<(), MoveBarError> {
        Ok(())
    }

    fn bar_read(&mut self, _index: u8, offset: u64, data: &mut [u8]) {
        if offset >= PBA_OFFSET {
            self.msix.pba_read(offset - PBA_OFFSET, data);
        } else {
            self.msix.table_read(offset - TABLE_OFFSET, data);
        }
    }

    fn bar_write(&mut self, _index: u8, offset: u64, data: &[u8]) {
        // The PBA is read-only.
        if offset < PBA_OFFSET {
            let r = self
                .msix
                .table_write(&self.config, offset, data, self.sink.as_ref());
            self.route_errors += usize::from(r.is_err());
        }
    }

    fn save(&self) -> Result<PciDeviceState, PciStateError> {
        Err(PciStateError::NotMigratable {
            device: "MSI-X test device".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::bus::tests::windows;
    use super::super::bus::{PciBus, PciSpace, PciWindow};
    use super::super::config_io::PciConfigIo;
    use super::super::msi::{MsiMessage, RecordingSink};
    use super::*;
    use crate::bus::{Bus, SharedDevice};

    const BAR: u64 = 0xc010_0000;

    struct Guest {
        pio: Bus,
        mmio: Bus,
    }

    impl Guest {
        fn cfg_write(&self, slot: u32, offset: u32, data: &[u8]) {
            self.pio.write(
                0xcf8,
                &(0x8000_0000 | (slot << 11) | (offset & 0xfc)).to_le_bytes(),
            );
            self.pio.write(0xcfc + u64::from(offset & 3), data);
        }
        fn cfg_read32(&self, slot: u32, offset: u32) -> u32 {
            self.pio
                .write(0xcf8, &(0x8000_0000 | (slot << 11) | offset).to_le_bytes());
            let mut b = [0u8; 4];
            self.pio.read(0xcfc, &mut b);
            u32::from_le_bytes(b)
        }
    }

    fn setup() -> (Guest, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        let bus = Arc::new(Mutex::new(PciBus::new(windows())));
        let dev = MsixTestDevice::new(BAR, sink.clone());
        bus.lock()
            .unwrap()
            .add_device(Some(4), Arc::new(Mutex::new(dev)))
            .unwrap();
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let cfg: SharedDevice = Arc::new(Mutex::new(PciConfigIo::new(bus.clone())));
        pio.insert(cfg, 0xcf8, 8).unwrap();
        let w = windows()[0];
        let win: SharedDevice = Arc::new(Mutex::new(PciWindow::new(bus, PciSpace::Memory, w.base)));
        mmio.insert(win, w.base, w.len).unwrap();
        (Guest { pio, mmio }, sink)
    }

    #[test]
    fn guest_walks_capabilities_and_programs_msix_through_the_bar() {
        let (g, sink) = setup();
        // Walk the capability list as a guest: status bit, pointer at 0x34, next pointers.
        assert_ne!(g.cfg_read32(4, 4) & (1 << 20), 0);
        let mut caps = Vec::new();
        let mut ptr = g.cfg_read32(4, 0x34) & 0xfc;
        while ptr != 0 {
            let v = g.cfg_read32(4, ptr);
            caps.push((v & 0xff, ptr));
            ptr = (v >> 8) & 0xfc;
        }
        assert_eq!(caps, vec![(0x05, 0x40), (0x11, 0x58)]);
        // MSI-X table in BAR 0 at offset 0, PBA at 0x800.
        assert_eq!(g.cfg_read32(4, 0x58 + 4), 0);
        assert_eq!(g.cfg_read32(4, 0x58 + 8), 0x800);

        // Enable memory decode, program vector 2, enable MSI-X, unmask vector 2.
        g.cfg_write(4, 4, &[0x02]);
        g.mmio.write(BAR + 32, &0xfee0_0000u64.to_le_bytes());
        g.mmio.write(BAR + 40, &0x45u32.to_le_bytes());
        g.cfg_write(4, 0x58 + 2, &0x8000u16.to_le_bytes());
        assert!(sink.take().is_empty(), "vector still masked");
        g.mmio.write(BAR + 44, &0u32.to_le_bytes());
        assert_eq!(
            sink.take(),
            vec![(
                2,
                Some(MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x45
                })
            )]
        );
        // The guest reads back what it wrote, and an all-ones PBA write does not stick.
        let mut q = [0u8; 8];
        g.mmio.read(BAR + 32, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
        g.mmio.write(BAR + 0x800, &u64::MAX.to_le_bytes());
        g.mmio.read(BAR + 0x800, &mut q);
        assert_eq!(q, [0; 8]);
        // Decode off: the BAR disappears from the window and the MSI-X state stays.
        g.cfg_write(4, 4, &[0x00]);
        g.mmio.read(BAR + 32, &mut q);
        assert_eq!(q, [0xff; 8]);
        // Moving the 64-bit BAR: the table follows.
        g.cfg_write(4, 0x10, &0xc020_0004u32.to_le_bytes());
        g.cfg_write(4, 0x14, &0u32.to_le_bytes());
        g.cfg_write(4, 4, &[0x02]);
        g.mmio.read(0xc020_0000 + 40, &mut q[..4]);
        assert_eq!(u32::from_le_bytes([q[0], q[1], q[2], q[3]]), 0x45);
        // Disabling MSI-X removes the route.
        g.cfg_write(4, 0x58 + 2, &0u16.to_le_bytes());
        assert_eq!(sink.take(), vec![(2, None)]);
    }

    #[test]
    fn guest_enables_msi_through_byte_and_word_writes() {
        let (g, sink) = setup();
        g.cfg_write(4, 0x44, &0xfee0_1000u32.to_le_bytes());
        g.cfg_write(4, 0x4c, &0x0031u16.to_le_bytes());
        g.cfg_write(4, 0x42, &[0x01]);
        assert_eq!(
            sink.take(),
            vec![(
                0,
                Some(MsiMessage {
                    address: 0xfee0_1000,
                    data: 0x31
                })
            )]
        );
        // Per-vector mask through a byte write at 0xCFC.
        g.cfg_write(4, 0x50, &[0x01]);
        assert_eq!(sink.take(), vec![(0, None)]);
    }
}
