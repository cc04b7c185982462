//! PCI bus 0: 32 slots of function 0, configuration dispatch, and the BAR dispatch map.
//!
//! The map is the bus's record of which guest addresses each function decodes. It is recomputed for a
//! function after every configuration write to it, so that a guest that reprograms a BAR or toggles
//! decode in the command register is followed at once; the function is told through
//! [`PciDevice::move_bar`]. A region outside the bus's windows or overlapping another function's
//! region is refused (left unmapped), never shadowed. The windows themselves sit on the VMM's MMIO and
//! PIO buses as [`PciWindow`]s, so the VMM's buses never change while the guest moves BARs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::bar::{BarKind, BarRegion};
use super::config::CONFIG_SPACE_BYTES;
use super::PciDevice;
use crate::bus::BusDevice;

/// Slots on bus 0.
pub const PCI_SLOTS: u8 = 32;

/// A function as stored on the bus.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Address space of a window or BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PciSpace {
    Memory,
    Io,
}

impl PciSpace {
    fn of(kind: BarKind) -> Self {
        if kind.is_io() {
            PciSpace::Io
        } else {
            PciSpace::Memory
        }
    }
}

/// A range of guest addresses the bus may hand to BARs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciWindowRange {
    pub space: PciSpace,
    pub base: u64,
    pub len: u64,
}

impl PciWindowRange {
    fn contains(&self, r: &BarRegion) -> bool {
        self.space == PciSpace::of(r.kind)
            && r.addr >= self.base
            && r.end() <= self.base.saturating_add(self.len)
    }
}

/// Errors placing devices and regions on the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciBusError {
    #[error("PCI slot {slot} is already taken")]
    SlotTaken { slot: u8 },
    #[error("PCI slot {slot} does not exist (bus 0 has {PCI_SLOTS})")]
    BadSlot { slot: u8 },
    #[error("no free PCI slot left on bus 0")]
    NoFreeSlot,
    #[error("BAR {index} of slot {slot} at {addr:#x}+{size:#x} lies outside every PCI window")]
    OutsideWindow {
        slot: u8,
        index: u8,
        addr: u64,
        size: u64,
    },
    #[error("BAR {index} of slot {slot} at {addr:#x}+{size:#x} overlaps BAR {other_index} of slot {other_slot}")]
    Overlap {
        slot: u8,
        index: u8,
        addr: u64,
        size: u64,
        other_slot: u8,
        other_index: u8,
    },
}

#[derive(Debug, Clone, Copy)]
struct Mapped {
    slot: u8,
    region: BarRegion,
}

/// Bus 0.
pub struct PciBus {
    slots: Vec<Option<SharedPciDevice>>,
    windows: Vec<PciWindowRange>,
    /// (space, base) → region, for dispatch and overlap checks.
    map: BTreeMap<(PciSpace, u64), Mapped>,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slots: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s].is_some())
            .collect();
        f.debug_struct("PciBus")
            .field("slots", &slots)
            .field("windows", &self.windows)
            .field("mapped", &self.map.len())
            .finish()
    }
}

fn lock(d: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    // A device that panicked on another vCPU must not take the bus down with a second panic.
    d.lock().unwrap_or_else(|p| p.into_inner())
}

impl PciBus {
    /// An empty bus whose BARs may live in `windows`.
    pub fn new(windows: Vec<PciWindowRange>) -> Self {
        Self {
            slots: vec![None; usize::from(PCI_SLOTS)],
            windows,
            map: BTreeMap::new(),
        }
    }

    /// Places `device` in `slot` (or the first free one) and maps the regions it already decodes.
    /// Fails without side effects if a region is outside the windows or overlaps.
    pub fn add_device(
        &mut self,
        slot: Option<u8>,
        device: SharedPciDevice,
    ) -> Result<u8, PciBusError> {
        let slot = match slot {
            Some(s) if s >= PCI_SLOTS => return Err(PciBusError::BadSlot { slot: s }),
            Some(s) if self.slots[usize::from(s)].is_some() => {
                return Err(PciBusError::SlotTaken { slot: s })
            }
            Some(s) => s,
            None => (0..PCI_SLOTS)
                .find(|&s| self.slots[usize::from(s)].is_none())
                .ok_or(PciBusError::NoFreeSlot)?,
        };
        let regions = lock(&device).decoded_bars();
        for (i, r) in regions.iter().enumerate() {
            self.check(slot, r)?;
            // Regions of the same device must not overlap each other either.
            if let Some(o) = regions[..i].iter().find(|o| o.overlaps(r)) {
                return Err(overlap(slot, r, slot, o.index));
            }
        }
        for r in regions {
            self.map
                .insert((PciSpace::of(r.kind), r.addr), Mapped { slot, region: r });
        }
        self.slots[usize::from(slot)] = Some(device);
        Ok(slot)
    }

    /// The device in `slot`.
    pub fn device(&self, slot: u8) -> Option<&SharedPciDevice> {
        self.slots.get(usize::from(slot))?.as_ref()
    }

    /// Occupied slots.
    pub fn slots(&self) -> impl Iterator<Item = (u8, &SharedPciDevice)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(s, d)| Some((s as u8, d.as_ref()?)))
    }

    /// Whether `r` may be mapped for `slot`: inside a window, overlapping no other mapped region.
    fn check(&self, slot: u8, r: &BarRegion) -> Result<(), PciBusError> {
        if !self.windows.iter().any(|w| w.contains(r)) {
            return Err(PciBusError::OutsideWindow {
                slot,
                index: r.index,
                addr: r.addr,
                size: r.size,
            });
        }
        let space = PciSpace::of(r.kind);
        // Only the last region starting before our end can reach into us.
        if let Some((_, m)) = self
            .map
            .range((space, 0)..(space, r.end()))
            .next_back()
            .filter(|(_, m)| m.region.overlaps(r) && !(m.slot == slot && m.region.index == r.index))
        {
            return Err(overlap(slot, r, m.slot, m.region.index));
        }
        Ok(())
    }

    /// Guest configuration read of `data.len()` bytes at `offset` of `slot`'s function 0. Empty
    /// slots and bad accesses read all-ones, as a master abort does.
    pub fn config_read(&self, slot: u8, offset: usize, data: &mut [u8]) {
        data.fill(0xff);
        let Some(device) = self.device(slot) else {
            return;
        };
        let Some((reg, shift, _)) = super::config::lane(offset, data.len()) else {
            return;
        };
        let v = (lock(device).config_read(reg) >> shift).to_le_bytes();
        data.copy_from_slice(&v[..data.len()]);
    }

    /// Guest configuration write, then the BAR map follows whatever the write changed. Returns the
    /// regions the bus refused to map (the guest's problem: logged by the caller).
    pub fn config_write(&mut self, slot: u8, offset: usize, data: &[u8]) -> Vec<PciBusError> {
        let Some(device) = self.device(slot).cloned() else {
            return Vec::new();
        };
        if super::config::lane(offset, data.len()).is_none() || offset >= CONFIG_SPACE_BYTES {
            return Vec::new();
        }
        let mut dev = lock(&device);
        dev.config_write(offset, data);
        self.follow(slot, &mut *dev)
    }

    /// The BAR map follows `slot`'s function after its configuration changed outside a guest write
    /// (a migration destination loading saved state). Returns the regions the bus refused to map.
    pub fn refresh(&mut self, slot: u8) -> Vec<PciBusError> {
        let Some(device) = self.device(slot).cloned() else {
            return Vec::new();
        };
        let mut dev = lock(&device);
        self.follow(slot, &mut *dev)
    }

    /// Brings the map entries of `slot` in line with what `dev` decodes now, telling it each move.
    fn follow(&mut self, slot: u8, dev: &mut dyn PciDevice) -> Vec<PciBusError> {
        let now = dev.decoded_bars();
        let mut refused = Vec::new();
        for spec in dev.bar_specs() {
            let index = spec.index;
            let before = self
                .map
                .iter()
                .find(|(_, m)| m.slot == slot && m.region.index == index)
                .map(|(k, m)| (*k, m.region));
            let after = now.iter().find(|r| r.index == index).copied();
            if before.map(|(_, r)| r) == after {
                continue;
            }
            if let Some((key, _)) = before {
                self.map.remove(&key);
            }
            let placed = match after {
                Some(r) => match self.check(slot, &r) {
                    Ok(()) => {
                        self.map
                            .insert((PciSpace::of(r.kind), r.addr), Mapped { slot, region: r });
                        Some(r.addr)
                    }
                    Err(e) => {
                        refused.push(e);
                        None
                    }
                },
                None => None,
            };
            let from = before.map(|(_, r)| r.addr);
            if from != placed {
                if let Err(e) = dev.move_bar(index, from, placed) {
                    // The device could not follow: take the region off the map so the bus and the
                    // device agree that it is unmapped.
                    log::warn!("PCI slot {slot}: {e}");
                    if let Some(addr) = placed {
                        self.map.remove(&(PciSpace::of(spec.kind), addr));
                    }
                }
            }
        }
        refused
    }

    /// The function and BAR that decode `addr` in `space`, and the offset inside the BAR.
    pub fn resolve(&self, space: PciSpace, addr: u64) -> Option<(SharedPciDevice, u8, u64)> {
        let (_, m) = self.map.range((space, 0)..=(space, addr)).next_back()?;
        let offset = addr - m.region.addr;
        (offset < m.region.size).then(|| {
            let device = self.slots[usize::from(m.slot)]
                .clone()
                .expect("a mapped region belongs to a device on the bus");
            (device, m.region.index, offset)
        })
    }

    /// Every mapped region, for diagnostics and tests.
    pub fn mapped_regions(&self) -> Vec<(u8, BarRegion)> {
        self.map.values().map(|m| (m.slot, m.region)).collect()
    }
}

fn overlap(slot: u8, r: &BarRegion, other_slot: u8, other_index: u8) -> PciBusError {
    PciBusError::Overlap {
        slot,
        index: r.index,
        addr: r.addr,
        size: r.size,
        other_slot,
        other_index,
    }
}

/// One of the bus's windows as a device on the VMM's MMIO or PIO bus: accesses are dispatched to the
/// BAR that decodes them; unclaimed addresses read all-ones.
#[derive(Debug)]
pub struct PciWindow {
    bus: Arc<Mutex<PciBus>>,
    space: PciSpace,
    base: u64,
}

impl PciWindow {
    /// A window starting at `base` in `space`.
    pub fn new(bus: Arc<Mutex<PciBus>>, space: PciSpace, base: u64) -> Self {
        Self { bus, space, base }
    }

    fn target(&self, offset: u64) -> Option<(SharedPciDevice, u8, u64)> {
        let addr = self.base.checked_add(offset)?;
        // Resolve under the bus lock, then release it so a slow BAR access does not hold the bus.
        let bus = self.bus.lock().unwrap_or_else(|p| p.into_inner());
        bus.resolve(self.space, addr)
    }
}

impl BusDevice for PciWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.target(offset) {
            Some((device, index, off)) => lock(&device).bar_read(index, off, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((device, index, off)) = self.target(offset) {
            lock(&device).bar_write(index, off, data);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::bar::BarSpec;
    use super::super::config::{ConfigSpace, PciIds, COMMAND_IO, COMMAND_MEMORY, REG_BAR0};
    use super::super::{MoveBarError, PciDeviceState, PciStateError};
    use super::*;

    /// A test function with BARs backed by plain memory; records moves.
    pub(crate) struct TestDevice {
        pub config: ConfigSpace,
        pub specs: Vec<BarSpec>,
        pub mem: Vec<Vec<u8>>,
        pub moves: Vec<(u8, Option<u64>, Option<u64>)>,
        pub refuse_moves: bool,
    }

    impl TestDevice {
        pub(crate) fn new(bars: &[(BarSpec, u64)]) -> Self {
            let mut config = ConfigSpace::new(PciIds {
                vendor: 0x1234,
                device: 0x11,
                revision: 0,
                class: 0xff,
                subclass: 0,
                prog_if: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            });
            for (s, addr) in bars {
                s.install(&mut config, *addr).unwrap();
            }
            Self {
                config,
                specs: bars.iter().map(|(s, _)| *s).collect(),
                mem: bars.iter().map(|(s, _)| vec![0; s.size as usize]).collect(),
                moves: Vec::new(),
                refuse_moves: false,
            }
        }

        pub(crate) fn enabled(mut self) -> Self {
            self.config
                .write(4, &(COMMAND_MEMORY | COMMAND_IO).to_le_bytes());
            self
        }
    }

    impl PciDevice for TestDevice {
        fn config_read(&mut self, reg: usize) -> u32 {
            self.config.read_reg(reg)
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data)
        }
        fn bar_specs(&self) -> Vec<BarSpec> {
            self.specs.clone()
        }
        fn decoded_bars(&self) -> Vec<BarRegion> {
            self.specs
                .iter()
                .filter_map(|s| s.decoded(&self.config))
                .collect()
        }
        fn move_bar(
            &mut self,
            index: u8,
            from: Option<u64>,
            to: Option<u64>,
        ) -> Result<(), MoveBarError> {
            self.moves.push((index, from, to));
            if self.refuse_moves {
                return Err(MoveBarError {
                    index,
                    to,
                    source: std::io::Error::from_raw_os_error(libc::EBUSY),
                });
            }
            Ok(())
        }
        fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]) {
            let pos = self.specs.iter().position(|s| s.index == index).unwrap();
            let o = offset as usize;
            data.copy_from_slice(&self.mem[pos][o..o + data.len()]);
        }
        fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]) {
            let pos = self.specs.iter().position(|s| s.index == index).unwrap();
            let o = offset as usize;
            self.mem[pos][o..o + data.len()].copy_from_slice(data);
        }
        fn save(&self) -> Result<PciDeviceState, PciStateError> {
            Err(PciStateError::NotMigratable {
                device: "test device".into(),
            })
        }
    }

    pub(crate) const MEM_BASE: u64 = 0xc000_0000;
    pub(crate) const IO_BASE: u64 = 0x1000;

    pub(crate) fn windows() -> Vec<PciWindowRange> {
        vec![
            PciWindowRange {
                space: PciSpace::Memory,
                base: MEM_BASE,
                len: 0x1000_0000,
            },
            PciWindowRange {
                space: PciSpace::Io,
                base: IO_BASE,
                len: 0x1000,
            },
        ]
    }

    fn mem32(index: u8, size: u64) -> BarSpec {
        BarSpec {
            index,
            kind: BarKind::Memory32 {
                prefetchable: false,
            },
            size,
        }
    }

    fn shared(d: TestDevice) -> Arc<Mutex<TestDevice>> {
        Arc::new(Mutex::new(d))
    }

    fn write32(bus: &mut PciBus, slot: u8, offset: usize, v: u32) -> Vec<PciBusError> {
        bus.config_write(slot, offset, &v.to_le_bytes())
    }

    #[test]
    fn bus_slots_fill_in_order_and_refuse_bad_ones() {
        let mut bus = PciBus::new(windows());
        assert_eq!(bus.add_device(None, shared(TestDevice::new(&[]))), Ok(0));
        assert_eq!(bus.add_device(Some(5), shared(TestDevice::new(&[]))), Ok(5));
        assert_eq!(bus.add_device(None, shared(TestDevice::new(&[]))), Ok(1));
        assert_eq!(
            bus.add_device(Some(5), shared(TestDevice::new(&[]))),
            Err(PciBusError::SlotTaken { slot: 5 })
        );
        assert_eq!(
            bus.add_device(Some(32), shared(TestDevice::new(&[]))),
            Err(PciBusError::BadSlot { slot: 32 })
        );
        for _ in 3..32 {
            bus.add_device(None, shared(TestDevice::new(&[]))).unwrap();
        }
        assert_eq!(
            bus.add_device(None, shared(TestDevice::new(&[]))),
            Err(PciBusError::NoFreeSlot)
        );
    }

    #[test]
    fn bus_refresh_follows_state_loaded_behind_its_back() {
        let mut bus = PciBus::new(windows());
        let d = shared(TestDevice::new(&[(mem32(0, 0x1000), MEM_BASE)]));
        bus.add_device(Some(2), d.clone()).unwrap();
        assert!(bus.mapped_regions().is_empty());
        // A migration destination loads the guest's BAR address and decode into the function.
        {
            let mut dev = d.lock().unwrap();
            mem32(0, 0x1000)
                .install(&mut dev.config, MEM_BASE + 0x4000)
                .unwrap();
            dev.config.write(4, &COMMAND_MEMORY.to_le_bytes());
        }
        assert!(bus.refresh(2).is_empty());
        assert_eq!(
            d.lock().unwrap().moves,
            [(0, None, Some(MEM_BASE + 0x4000))]
        );
        assert!(bus.resolve(PciSpace::Memory, MEM_BASE + 0x4008).is_some());
        assert!(bus.resolve(PciSpace::Memory, MEM_BASE).is_none());
        // Nothing changed: nothing moves; an empty slot is nothing to do.
        assert!(bus.refresh(2).is_empty());
        assert_eq!(d.lock().unwrap().moves.len(), 1);
        assert!(bus.refresh(7).is_empty());
    }

    #[test]
    fn bus_empty_slots_read_all_ones() {
        let bus = PciBus::new(windows());
        let mut b = [0u8; 4];
        bus.config_read(3, 0, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn bus_overlapping_bars_are_refused_at_add() {
        let mut bus = PciBus::new(windows());
        let a = TestDevice::new(&[(mem32(0, 0x2000), MEM_BASE)]).enabled();
        bus.add_device(None, shared(a)).unwrap();
        let b = TestDevice::new(&[(mem32(1, 0x1000), MEM_BASE + 0x1000)]).enabled();
        assert_eq!(
            bus.add_device(None, shared(b)),
            Err(PciBusError::Overlap {
                slot: 1,
                index: 1,
                addr: MEM_BASE + 0x1000,
                size: 0x1000,
                other_slot: 0,
                other_index: 0
            })
        );
        // Nothing of the refused device stayed behind.
        assert!(bus.device(1).is_none());
        assert_eq!(bus.mapped_regions().len(), 1);
        // Same addresses in the I/O space do not clash with memory.
        let io = TestDevice::new(&[(
            BarSpec {
                index: 0,
                kind: BarKind::Io,
                size: 0x10,
            },
            IO_BASE,
        )])
        .enabled();
        bus.add_device(None, shared(io)).unwrap();
        // Two BARs of one device overlapping each other.
        let twin = TestDevice::new(&[
            (mem32(0, 0x1000), MEM_BASE + 0x10000),
            (mem32(1, 0x1000), MEM_BASE + 0x10000),
        ])
        .enabled();
        assert!(matches!(
            bus.add_device(None, shared(twin)),
            Err(PciBusError::Overlap { .. })
        ));
    }

    #[test]
    fn bus_bars_outside_windows_are_refused() {
        let mut bus = PciBus::new(windows());
        let d = TestDevice::new(&[(mem32(0, 0x1000), 0x8000_0000)]).enabled();
        assert!(matches!(
            bus.add_device(None, shared(d)),
            Err(PciBusError::OutsideWindow { .. })
        ));
        // A disabled device is not mapped, so its (bad) address does not matter yet.
        let d = TestDevice::new(&[(mem32(0, 0x1000), 0x8000_0000)]);
        assert_eq!(bus.add_device(None, shared(d)), Ok(0));
    }

    #[test]
    fn bus_dispatches_bar_accesses_by_current_address() {
        let bus = Arc::new(Mutex::new(PciBus::new(windows())));
        let d = shared(TestDevice::new(&[(mem32(2, 0x1000), MEM_BASE + 0x4000)]).enabled());
        bus.lock().unwrap().add_device(Some(3), d.clone()).unwrap();
        let mut w = PciWindow::new(bus.clone(), PciSpace::Memory, MEM_BASE);
        w.write(0x4010, &[1, 2, 3, 4]);
        assert_eq!(&d.lock().unwrap().mem[0][0x10..0x14], &[1, 2, 3, 4]);
        let mut b = [0u8; 2];
        w.read(0x4012, &mut b);
        assert_eq!(b, [3, 4]);
        // Outside any BAR: all-ones, writes dropped.
        w.read(0x5000, &mut b);
        assert_eq!(b, [0xff; 2]);
        w.read(0x3fff, &mut b[..1]);
        assert_eq!(b[0], 0xff);

        // The guest moves the BAR: the old address stops decoding, the new one starts.
        let off = (REG_BAR0 + 2) * 4;
        let refused = write32(&mut bus.lock().unwrap(), 3, off, (MEM_BASE + 0x8000) as u32);
        assert!(refused.is_empty());
        w.read(0x4010, &mut b);
        assert_eq!(b, [0xff; 2]);
        w.read(0x8010, &mut b);
        assert_eq!(b, [1, 2]);
        assert_eq!(
            d.lock().unwrap().moves,
            vec![(2, Some(MEM_BASE + 0x4000), Some(MEM_BASE + 0x8000))]
        );
    }

    #[test]
    fn bus_follows_decode_enable_and_size_probing() {
        let mut bus = PciBus::new(windows());
        let d = shared(TestDevice::new(&[(mem32(0, 0x1000), MEM_BASE)]).enabled());
        bus.add_device(None, d.clone()).unwrap();
        // Linux: decode off, probe with all-ones, restore, decode on.
        write32(&mut bus, 0, 4, 0);
        assert!(bus.mapped_regions().is_empty());
        write32(&mut bus, 0, 0x10, 0xffff_ffff);
        let mut b = [0u8; 4];
        bus.config_read(0, 0x10, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xffff_f000);
        assert!(bus.mapped_regions().is_empty());
        write32(&mut bus, 0, 0x10, MEM_BASE as u32);
        write32(&mut bus, 0, 4, u32::from(COMMAND_MEMORY));
        assert_eq!(bus.mapped_regions().len(), 1);
        assert_eq!(
            d.lock().unwrap().moves,
            vec![(0, Some(MEM_BASE), None), (0, None, Some(MEM_BASE))]
        );
    }

    #[test]
    fn bus_guest_move_onto_another_bar_is_refused_and_unmapped() {
        let mut bus = PciBus::new(windows());
        let a = shared(TestDevice::new(&[(mem32(0, 0x1000), MEM_BASE)]).enabled());
        let b = shared(TestDevice::new(&[(mem32(0, 0x1000), MEM_BASE + 0x1000)]).enabled());
        bus.add_device(None, a).unwrap();
        bus.add_device(None, b.clone()).unwrap();
        let refused = write32(&mut bus, 1, 0x10, MEM_BASE as u32);
        assert!(matches!(
            refused.as_slice(),
            [PciBusError::Overlap {
                slot: 1,
                other_slot: 0,
                ..
            }]
        ));
        // The first device still decodes its page; the mover decodes nothing.
        let regions = bus.mapped_regions();
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].0, 0);
        assert_eq!(
            b.lock().unwrap().moves,
            vec![(0, Some(MEM_BASE + 0x1000), None)]
        );
        // Moving it somewhere free maps it again.
        assert!(write32(&mut bus, 1, 0x10, (MEM_BASE + 0x2000) as u32).is_empty());
        assert_eq!(bus.mapped_regions().len(), 2);
        // Out of the window: refused.
        let refused = write32(&mut bus, 1, 0x10, 0x1000_0000);
        assert!(matches!(
            refused.as_slice(),
            [PciBusError::OutsideWindow { .. }]
        ));
    }

    #[test]
    fn bus_device_refusing_a_move_ends_unmapped() {
        let mut bus = PciBus::new(windows());
        let d = shared(TestDevice::new(&[(mem32(0, 0x1000), MEM_BASE)]).enabled());
        bus.add_device(None, d.clone()).unwrap();
        d.lock().unwrap().refuse_moves = true;
        write32(&mut bus, 0, 0x10, (MEM_BASE + 0x1000) as u32);
        assert!(bus.mapped_regions().is_empty());
        assert!(bus.resolve(PciSpace::Memory, MEM_BASE + 0x1000).is_none());
    }

    #[test]
    fn bus_64bit_bar_moves_once_both_halves_are_written() {
        let mut bus = PciBus::new(vec![PciWindowRange {
            space: PciSpace::Memory,
            base: 1 << 40,
            len: 1 << 36,
        }]);
        let spec = BarSpec {
            index: 0,
            kind: BarKind::Memory64 { prefetchable: true },
            size: 1 << 20,
        };
        let d = shared(TestDevice::new(&[(spec, 1 << 40)]).enabled());
        bus.add_device(None, d.clone()).unwrap();
        write32(&mut bus, 0, 4, 0);
        write32(&mut bus, 0, 0x10, 0x0010_0000);
        write32(&mut bus, 0, 0x14, 0x100);
        write32(&mut bus, 0, 4, u32::from(COMMAND_MEMORY));
        assert!(bus
            .resolve(PciSpace::Memory, (1 << 40) + 0x10_0000)
            .is_some());
        assert!(bus.resolve(PciSpace::Memory, 1 << 40).is_none());
        assert_eq!(
            d.lock().unwrap().moves.last(),
            Some(&(0, None, Some((1 << 40) + 0x10_0000)))
        );
    }
}
