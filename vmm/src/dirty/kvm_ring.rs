//! [`KvmDirtyRing`]: the per-vCPU KVM dirty rings as a [`DirtySource`].
//!
//! ```text
//! machine build : KVM_ENABLE_CAP(DIRTY_LOG_RING[_ACQ_REL], bytes) → create vCPUs → map each ring
//! start         : harvest leftovers, slots get KVM_MEM_LOG_DIRTY_PAGES (KVM write-protects RAM)
//! sync          : harvest every ring (DIRTY → collect → RESET) into per-slot snapshots,
//!                 KVM_RESET_DIRTY_RINGS re-arms the collected pages
//! peek / claim  : snapshot ∩ range → out (claim also removes the bits from the snapshot)
//! ring full     : the vCPU thread that got KVM_EXIT_DIRTY_RING_FULL harvests and resets itself
//!                 (same lock as sync), then re-enters the guest
//! ```
//!
//! Re-protection happens at harvest time, not at claim time: a page written after its entry was
//! collected and reset produces a new entry, which the next harvest adds to the snapshot. A page
//! whose bit the engine claims was collected before the claim, so its content at send time includes
//! every write that produced a collected entry. Entries collected between `sync` and a chunk's claim
//! are claimed with the chunk (or in a later iteration when the engine's plan skips the chunk).
//!
//! The vCPU never waits for another thread on a full ring: it harvests under the rings' mutex,
//! which is held only for the harvest itself, so pausing cannot deadlock against it.

use std::sync::{Arc, Mutex, MutexGuard};

use tern_migration::dirty::{DirtyBitmap, DirtySource, DirtySourceError, GpaRange, SourceKind};

use super::snapshot::SlotSnapshot;
use crate::sys::kvm_dirty_ring::{reset_dirty_rings, DirtyRingMapping, KvmDirtyRingError};
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::DirtyRingFullHandler;
use crate::vstate::vm::{Vm, VmError};

/// Entries tern asks for per vCPU ring (QEMU's default is 4096); clamped to what the host allows.
pub const RING_ENTRIES: u64 = 16384;

/// Errors of the dirty-ring source.
#[derive(Debug, thiserror::Error)]
pub enum KvmRingError {
    /// The ring uAPI failed.
    #[error(transparent)]
    Ring(#[from] KvmDirtyRingError),
    /// Turning KVM_MEM_LOG_DIRTY_PAGES on or off failed.
    #[error("cannot turn dirty logging {}", if *enabled { "on" } else { "off" })]
    Logging {
        /// The wanted state.
        enabled: bool,
        /// Why.
        #[source]
        source: VmError,
    },
    /// The kernel published entries that name no RAM slot or lie past one: the pages they stand
    /// for cannot be placed, so the migration must not trust the ring.
    #[error("{count} dirty-ring entries name an unknown slot or offset (first: slot {slot:#x} offset {offset:#x})")]
    BadEntries {
        /// How many.
        count: u64,
        /// First bad entry's slot field.
        slot: u32,
        /// First bad entry's offset.
        offset: u64,
    },
}

#[derive(Debug)]
struct RingState {
    rings: Vec<DirtyRingMapping>,
    slots: Vec<SlotSnapshot>,
    bad: Option<(u64, u32, u64)>,
    harvested: u64,
    full_exits: u64,
}

/// Every vCPU's mapped dirty ring plus the pages harvested from them and not yet claimed; shared
/// between the vCPU threads (ring-full exits) and the migration's [`KvmDirtyRing`].
#[derive(Debug)]
pub struct DirtyRings {
    vm: Arc<Vm>,
    entries: u32,
    state: Mutex<RingState>,
}

impl DirtyRings {
    /// Wraps the mapped rings (one per vCPU, in vCPU order) of `vm`, whose RAM is `ram`.
    pub fn new(vm: Arc<Vm>, ram: &GuestRam, rings: Vec<DirtyRingMapping>) -> Self {
        let slots = super::snapshot::slots_for(ram);
        Self {
            vm,
            entries: rings.first().map_or(0, DirtyRingMapping::entries),
            state: Mutex::new(RingState {
                rings,
                slots,
                bad: None,
                harvested: 0,
                full_exits: 0,
            }),
        }
    }

    /// Entries per vCPU ring.
    pub fn entries_per_ring(&self) -> u32 {
        self.entries
    }

    /// (entries harvested, ring-full exits) since the machine was built.
    pub fn counters(&self) -> (u64, u64) {
        let s = self.lock();
        (s.harvested, s.full_exits)
    }

    fn lock(&self) -> MutexGuard<'_, RingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Collects every ring into the snapshots and re-arms the collected pages.
    fn harvest_locked(&self, s: &mut RingState) -> Result<(), KvmRingError> {
        let RingState {
            rings,
            slots,
            bad,
            harvested,
            ..
        } = s;
        let mut total = 0u64;
        for ring in rings.iter_mut() {
            total += u64::from(ring.harvest(|slot, offset| {
                // Address space in the upper 16 bits; tern has only address space 0 (no SMM).
                // Slot i is RAM range i (see `DirtyRings::new`).
                let placed = slot >> 16 == 0
                    && slots
                        .get_mut(slot as usize)
                        .is_some_and(|s| s.set_page(offset));
                if !placed {
                    let b = bad.get_or_insert((0, slot, offset));
                    b.0 += 1;
                }
            }));
        }
        *harvested += total;
        if total > 0 {
            reset_dirty_rings(self.vm.fd())?;
        }
        if let Some((count, slot, offset)) = *bad {
            return Err(KvmRingError::BadEntries {
                count,
                slot,
                offset,
            });
        }
        Ok(())
    }

    /// Harvests all rings now.
    pub fn harvest(&self) -> Result<(), KvmRingError> {
        let mut s = self.lock();
        self.harvest_locked(&mut s)
    }
}

impl DirtyRingFullHandler for DirtyRings {
    fn dirty_ring_full(&self, _vcpu: u8) -> Result<(), String> {
        let mut s = self.lock();
        s.full_exits += 1;
        self.harvest_locked(&mut s).map_err(|e| {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                msg.push_str(": ");
                msg.push_str(&c.to_string());
                src = c.source();
            }
            msg
        })
    }
}

/// The KVM dirty rings of every vCPU as one dirty source.
#[derive(Debug)]
pub struct KvmDirtyRing {
    rings: Arc<DirtyRings>,
    started: bool,
}

impl KvmDirtyRing {
    /// A source over `rings` (from [`crate::machine::Machine::dirty_rings`]).
    pub fn new(rings: Arc<DirtyRings>) -> Self {
        Self {
            rings,
            started: false,
        }
    }

    fn check_started(&self) -> Result<(), DirtySourceError> {
        if self.started {
            Ok(())
        } else {
            Err(DirtySourceError::NotStarted {
                kind: SourceKind::Kvm,
            })
        }
    }
}

impl DirtySource for KvmDirtyRing {
    fn kind(&self) -> SourceKind {
        SourceKind::Kvm
    }

    fn label(&self) -> &str {
        "kvm-ring"
    }

    fn start(&mut self) -> Result<(), DirtySourceError> {
        let err = |e: KvmRingError| DirtySourceError::Start {
            kind: SourceKind::Kvm,
            source: Box::new(e),
        };
        {
            let mut s = self.rings.lock();
            // Entries left from an earlier migration describe writes that migration handled.
            s.bad = None;
            self.rings.harvest_locked(&mut s).map_err(err)?;
            s.slots.iter_mut().for_each(SlotSnapshot::clear);
        }
        self.rings.vm.set_dirty_logging(true).map_err(|source| {
            err(KvmRingError::Logging {
                enabled: true,
                source,
            })
        })?;
        self.started = true;
        log::info!(
            "KVM dirty ring: {} entries per vCPU",
            self.rings.entries_per_ring()
        );
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtySourceError> {
        self.started = false;
        let err = |e: KvmRingError| DirtySourceError::Stop {
            kind: SourceKind::Kvm,
            source: Box::new(e),
        };
        self.rings.vm.set_dirty_logging(false).map_err(|source| {
            err(KvmRingError::Logging {
                enabled: false,
                source,
            })
        })?;
        let mut s = self.rings.lock();
        let r = self.rings.harvest_locked(&mut s);
        s.slots.iter_mut().for_each(SlotSnapshot::clear);
        r.map_err(err)
    }

    fn sync(&mut self) -> Result<(), DirtySourceError> {
        self.check_started()?;
        self.rings.harvest().map_err(|e| DirtySourceError::Sync {
            kind: SourceKind::Kvm,
            source: Box::new(e),
        })
    }

    fn peek(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<bool, DirtySourceError> {
        self.check_started()?;
        super::snapshot::peek_slots(&self.rings.lock().slots, range, out)?;
        Ok(true)
    }

    fn claim(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError> {
        self.check_started()?;
        let mut s = self.rings.lock();
        for slot in &mut s.slots {
            let Some((first, end)) = slot.page_span(range) else {
                continue;
            };
            let taken = slot.take_span(first, end);
            if taken.is_empty() {
                continue;
            }
            slot.or_taken_into(&taken, first, end, out)
                .map_err(|source| DirtySourceError::OutputBitmap {
                    kind: SourceKind::Kvm,
                    range,
                    source,
                })?;
            slot.remove(&taken);
        }
        Ok(())
    }
}
