//! BARs mapped straight into the guest: the mmap-able parts of a passthrough function's memory
//! BARs become KVM memory slots at the BAR's guest address, so guest accesses reach the device
//! without an exit. The MSI-X table and PBA pages, and whatever VFIO does not let tern mmap
//! (no `VFIO_REGION_INFO_FLAG_MMAP`, or outside the sparse-mmap areas), stay out of the slots and
//! are trapped through the PCI bus as before (KVM only exits for addresses no slot covers).
//!
//! ```text
//!  open:      region mmap areas ─► minus MSI-X table/PBA pages ─► whole pages ─► one mmap each
//!  move_bar:  old slots deleted ─► (decoded at a new address) one slot per area at BAR + offset
//!  drop:      slots deleted ─► mappings unmapped
//! ```

use std::sync::Arc;

use super::device::ResourceError;
use crate::sys::vfio_region_mmap::RegionMapping;

/// The VMM's memory slots for device mappings.
pub trait BarMemory: Send + Sync {
    /// Maps all of `mapping` into the guest at `gpa`; returns the slot holding it. The VMM keeps
    /// `mapping` alive while the slot exists.
    fn map(&self, gpa: u64, mapping: &Arc<RegionMapping>) -> Result<u32, ResourceError>;
    /// Deletes `slot` (a slot [`BarMemory::map`] returned).
    fn unmap(&self, slot: u32);
}

/// Removes `holes` from `areas` (both `(offset, len)` lists); returns what is left, in order.
fn subtract(areas: &[(u64, u64)], holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = areas.iter().copied().filter(|a| a.1 > 0).collect();
    for &(h, hl) in holes.iter().filter(|h| h.1 > 0) {
        let he = h.saturating_add(hl);
        out = out
            .into_iter()
            .flat_map(|(a, al)| {
                let ae = a.saturating_add(al);
                if he <= a || h >= ae {
                    return vec![(a, al)];
                }
                let mut parts = Vec::new();
                if h > a {
                    parts.push((a, h - a));
                }
                if he < ae {
                    parts.push((he, ae - he));
                }
                parts
            })
            .collect();
    }
    out
}

/// The parts of a BAR of `size` bytes to map into the guest: the region's mmap-able `areas`
/// (clipped to the BAR), minus the pages touching any of `trapped` (the MSI-X table and PBA),
/// shrunk to whole `page`s.
pub fn direct_areas(
    size: u64,
    areas: &[(u64, u64)],
    trapped: &[(u64, u64)],
    page: u64,
) -> Vec<(u64, u64)> {
    let clipped: Vec<_> = areas
        .iter()
        .filter(|a| a.0 < size)
        .map(|&(o, l)| (o, l.min(size - o)))
        .collect();
    let holes: Vec<_> = trapped
        .iter()
        .filter(|t| t.1 > 0)
        .map(|&(o, l)| {
            let start = o / page * page;
            let end = o.saturating_add(l).next_multiple_of(page);
            (start, end - start)
        })
        .collect();
    subtract(&clipped, &holes)
        .into_iter()
        .filter_map(|(o, l)| {
            let start = o.next_multiple_of(page);
            let end = (o + l) / page * page;
            (end > start).then(|| (start, end - start))
        })
        .collect()
}

/// One mmap'ed part of a BAR.
#[derive(Debug)]
struct Area {
    index: u8,
    offset: u64,
    mapping: Arc<RegionMapping>,
}

/// The device's mapped BAR parts and the slots they sit in now.
pub struct DirectBars {
    memory: Option<Arc<dyn BarMemory>>,
    areas: Vec<Area>,
    // (BAR index, slot, guest address).
    slots: Vec<(u8, u32, u64)>,
}

impl std::fmt::Debug for DirectBars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectBars")
            .field("areas", &self.areas)
            .field("slots", &self.slots)
            .finish()
    }
}

impl DirectBars {
    /// Nothing mapped: every access trapped.
    pub fn none() -> Self {
        Self {
            memory: None,
            areas: Vec::new(),
            slots: Vec::new(),
        }
    }

    /// Mappings given to `memory` whenever their BAR is decoded.
    pub fn new(memory: Arc<dyn BarMemory>) -> Self {
        Self {
            memory: Some(memory),
            areas: Vec::new(),
            slots: Vec::new(),
        }
    }

    /// Adds `mapping`, which holds `offset..` of BAR `index`.
    pub fn add(&mut self, index: u8, offset: u64, mapping: RegionMapping) {
        self.areas.push(Area {
            index,
            offset,
            mapping: Arc::new(mapping),
        });
    }

    /// Whether BAR `index` has mapped parts.
    pub fn has(&self, index: u8) -> bool {
        self.areas.iter().any(|a| a.index == index)
    }

    /// The slots in use now: (BAR index, slot, guest address).
    pub fn slots(&self) -> Vec<(u8, u32, u64)> {
        self.slots.clone()
    }

    /// BAR `index` now decodes at `to` (or nothing): its slots follow. A slot the VMM refuses
    /// leaves that part trapped, which is slower but correct; the error is returned for the log.
    pub fn move_bar(&mut self, index: u8, to: Option<u64>) -> Result<(), ResourceError> {
        let Some(memory) = self.memory.clone() else {
            return Ok(());
        };
        self.slots.retain(|&(i, slot, _)| {
            if i == index {
                memory.unmap(slot);
            }
            i != index
        });
        let Some(base) = to else {
            return Ok(());
        };
        let mut first_err = None;
        for a in self.areas.iter().filter(|a| a.index == index) {
            let gpa = base + a.offset;
            match memory.map(gpa, &a.mapping) {
                Ok(slot) => self.slots.push((index, slot, gpa)),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Deletes every slot (the mappings stay until drop).
    pub fn clear(&mut self) {
        if let Some(memory) = &self.memory {
            for (_, slot, _) in self.slots.drain(..) {
                memory.unmap(slot);
            }
        }
    }
}

impl Drop for DirectBars {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const P: u64 = 4096;

    #[test]
    fn whole_mmap_region_without_msix_is_one_area() {
        assert_eq!(
            direct_areas(1 << 20, &[(0, 1 << 20)], &[], P),
            vec![(0, 1 << 20)]
        );
    }

    #[test]
    fn msix_table_and_pba_pages_are_cut_out() {
        // 64 KiB BAR, table at 0x2000 (16 vectors = 256 bytes), PBA at 0x3008 (8 bytes).
        let a = direct_areas(0x10000, &[(0, 0x10000)], &[(0x2000, 0x100), (0x3008, 8)], P);
        assert_eq!(a, vec![(0, 0x2000), (0x4000, 0xc000)]);
        // Table and PBA sharing one page leave one hole.
        let b = direct_areas(0x10000, &[(0, 0x10000)], &[(0x0, 0x100), (0x800, 8)], P);
        assert_eq!(b, vec![(0x1000, 0xf000)]);
        // A table spanning pages takes all of them.
        let c = direct_areas(0x10000, &[(0, 0x10000)], &[(0xff0, 0x20)], P);
        assert_eq!(c, vec![(0x2000, 0xe000)]);
    }

    #[test]
    fn sparse_areas_are_honoured_and_shrunk_to_pages() {
        // VFIO's sparse areas: two windows, one not page aligned, one running past the BAR.
        let a = direct_areas(0x8000, &[(0x800, 0x2000), (0x6000, 0x4000)], &[], P);
        assert_eq!(a, vec![(0x1000, 0x1000), (0x6000, 0x2000)]);
        // Nothing mmap-able: nothing mapped.
        assert!(direct_areas(0x8000, &[], &[], P).is_empty());
        // A BAR smaller than a page cannot be a slot.
        assert!(direct_areas(0x100, &[(0, 0x100)], &[], P).is_empty());
    }

    /// Records slots as (slot, gpa, len); refuses gpas in `refuse`.
    #[derive(Default)]
    struct FakeMemory {
        live: Mutex<Vec<(u32, u64, u64)>>,
        next: Mutex<u32>,
        refuse: Option<u64>,
    }

    impl BarMemory for FakeMemory {
        fn map(&self, gpa: u64, m: &Arc<RegionMapping>) -> Result<u32, ResourceError> {
            if self.refuse == Some(gpa) {
                return Err("refused".into());
            }
            let mut n = self.next.lock().unwrap();
            *n += 1;
            self.live.lock().unwrap().push((*n, gpa, m.len()));
            Ok(*n)
        }
        fn unmap(&self, slot: u32) {
            let mut live = self.live.lock().unwrap();
            let before = live.len();
            live.retain(|s| s.0 != slot);
            assert_eq!(
                live.len() + 1,
                before,
                "slot {slot} unmapped twice or never mapped"
            );
        }
    }

    #[test]
    fn slots_follow_the_bar_and_go_on_drop() {
        let mem = Arc::new(FakeMemory::default());
        let mut d = DirectBars::new(mem.clone());
        d.add(0, 0, RegionMapping::anonymous(0x2000).unwrap());
        d.add(0, 0x4000, RegionMapping::anonymous(0x1000).unwrap());
        d.add(2, 0, RegionMapping::anonymous(0x1000).unwrap());
        assert!(d.has(0) && d.has(2) && !d.has(1));
        d.move_bar(0, Some(0xc000_0000)).unwrap();
        let gpas = |m: &FakeMemory| {
            let mut v: Vec<_> = m.live.lock().unwrap().iter().map(|s| (s.1, s.2)).collect();
            v.sort();
            v
        };
        assert_eq!(
            gpas(&mem),
            vec![(0xc000_0000, 0x2000), (0xc000_4000, 0x1000)]
        );
        // Moved: old slots gone, new ones at the new base; BAR 2 untouched.
        d.move_bar(0, Some(0xd000_0000)).unwrap();
        assert_eq!(
            gpas(&mem),
            vec![(0xd000_0000, 0x2000), (0xd000_4000, 0x1000)]
        );
        d.move_bar(2, Some(0xe000_0000)).unwrap();
        assert_eq!(d.slots().len(), 3);
        // Decode off: BAR 0's slots deleted.
        d.move_bar(0, None).unwrap();
        assert_eq!(gpas(&mem), vec![(0xe000_0000, 0x1000)]);
        drop(d);
        assert!(mem.live.lock().unwrap().is_empty());
    }

    #[test]
    fn a_refused_slot_is_reported_and_the_rest_still_map() {
        let mem = Arc::new(FakeMemory {
            refuse: Some(0xc000_0000),
            ..Default::default()
        });
        let mut d = DirectBars::new(mem.clone());
        d.add(0, 0, RegionMapping::anonymous(0x1000).unwrap());
        d.add(0, 0x1000, RegionMapping::anonymous(0x1000).unwrap());
        assert!(d.move_bar(0, Some(0xc000_0000)).is_err());
        assert_eq!(d.slots(), vec![(0, 1, 0xc000_1000)]);
        // Without a VMM memory nothing is ever mapped.
        let mut none = DirectBars::none();
        none.move_bar(0, Some(0xc000_0000)).unwrap();
        assert!(none.slots().is_empty());
    }
}
