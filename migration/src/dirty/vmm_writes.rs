//! [`DirtySource`] over the guest memory's [`GuestPageBitmap`]: writes the VMM makes to guest
//! memory through `GuestMemoryMmap<GuestPageBitmap>` (device emulation, virtio queues) set bits
//! there.
//!
//! Reading the live bitmap range by range would cost a load per page in every plan and claim, so
//! [`DirtySource::sync`] harvests it (only the groups written since the last harvest) into the
//! source's own pending bitmap, and peeks and claims walk that one's marked groups: the work at a
//! switchover follows what the VMM wrote, not the guest's size.
//!
//! The price: the VMM-write bit of a page is cleared at the sync that starts an iteration rather
//! than right before the page is read, so a page the VMM writes again between the sync and its
//! chunk's read is sent in this iteration and once more in the next. VMM-side writes are rare
//! (emulated devices); the vCPUs' and devices' dirty pages — KVM's log and the IOMMU's — keep
//! their clear-right-before-send claims. Nothing is lost: vm-memory marks a page after writing it,
//! so a harvested bit belongs to a write that completed before the page is read, and a write after
//! the harvest sets its bit again for the next sync; the switchover syncs with the VM paused.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use super::bitmap::{DirtyBitmap, PAGE_SIZE};
use super::guest_bitmap::GuestPageBitmap;
use super::source::{DirtySource, DirtySourceError, GpaRange, SourceKind};

/// Errors building a [`VmmWriteSource`].
#[derive(Debug, thiserror::Error)]
pub enum VmmWriteSourceError {
    /// The region's bitmap does not track 4 KiB pages (host page size differs).
    #[error("region at {base:#x}: bitmap has {bits} bits for {len_bytes:#x} bytes, expected 4 KiB pages")]
    PageSize {
        /// Region base GPA.
        base: u64,
        /// Region length.
        len_bytes: u64,
        /// Bits in its bitmap.
        bits: usize,
    },
    /// The region's pending bitmap cannot be built.
    #[error("region at {base:#x}: pending bitmap")]
    Bitmap {
        /// Region base GPA.
        base: u64,
        #[source]
        source: super::DirtyBitmapError,
    },
}

#[derive(Debug)]
struct TrackedRegion {
    base: GuestAddress,
    len_bytes: u64,
    mapping: Arc<MmapRegion<GuestPageBitmap>>,
    /// Bits harvested by the syncs and not claimed yet.
    pending: DirtyBitmap,
}

/// Dirty source for VMM-side writes to guest memory.
#[derive(Debug)]
pub struct VmmWriteSource {
    regions: Vec<TrackedRegion>,
    started: bool,
}

impl VmmWriteSource {
    /// Track every region of `mem`. The source keeps the mappings alive.
    pub fn new(mem: &GuestMemoryMmap<GuestPageBitmap>) -> Result<Self, VmmWriteSourceError> {
        let mut regions = Vec::new();
        for r in mem.iter() {
            let mapping = r.get_mmap();
            let bits = mapping.bitmap().len();
            let len_bytes = r.len();
            if bits as u64 != len_bytes.div_ceil(PAGE_SIZE) {
                return Err(VmmWriteSourceError::PageSize {
                    base: r.start_addr().0,
                    len_bytes,
                    bits,
                });
            }
            let pending = DirtyBitmap::new(r.start_addr(), len_bytes).map_err(|source| {
                VmmWriteSourceError::Bitmap {
                    base: r.start_addr().0,
                    source,
                }
            })?;
            regions.push(TrackedRegion {
                base: r.start_addr(),
                len_bytes,
                mapping,
                pending,
            });
        }
        Ok(VmmWriteSource {
            regions,
            started: false,
        })
    }

    /// OR the pending bits of `range` into `out`; `take` clears them.
    fn scan(
        &mut self,
        range: GpaRange,
        out: &mut DirtyBitmap,
        take: bool,
    ) -> Result<(), DirtySourceError> {
        if !self.started {
            return Err(DirtySourceError::NotStarted {
                kind: SourceKind::Vmm,
            });
        }
        let out_err = |source| DirtySourceError::OutputBitmap {
            kind: SourceKind::Vmm,
            range,
            source,
        };
        for r in &mut self.regions {
            let Some(part) = range.intersect(r.base.0, r.len_bytes) else {
                continue;
            };
            let first = (part.start.0 - r.base.0) / PAGE_SIZE;
            let out_first = out.page_of(part.start).map_err(out_err)?;
            let n = part.pages();
            if out_first + n > out.pages() {
                return Err(out_err(super::DirtyBitmapError::OutOfRange {
                    first_page: out_first,
                    end_page: out_first + n,
                    pages: out.pages(),
                }));
            }
            // Handed over before they are cleared: if `out` cannot take them, nothing is lost.
            out.or_range_from(out_first, &r.pending, first, n)
                .map_err(out_err)?;
            if take {
                r.pending.clear_range(first, n);
            }
        }
        Ok(())
    }
}

impl DirtySource for VmmWriteSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Vmm
    }

    fn label(&self) -> &str {
        "vmm"
    }

    fn start(&mut self) -> Result<(), DirtySourceError> {
        // Bits from before the migration are covered by iteration 0, which sends every page.
        for r in &mut self.regions {
            r.mapping.bitmap().reset();
            r.pending.clear();
        }
        self.started = true;
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtySourceError> {
        self.started = false;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), DirtySourceError> {
        if !self.started {
            return Err(DirtySourceError::NotStarted {
                kind: SourceKind::Vmm,
            });
        }
        for r in &mut self.regions {
            let pending = &mut r.pending;
            let mut failed = None;
            r.mapping.bitmap().harvest(|w, bits| {
                // Both bitmaps cover the region's pages, so a word always fits; a failure would
                // be a bug, reported rather than dropped.
                if let Err(e) = pending.or_words(w as u64 * 64, &[bits]) {
                    failed.get_or_insert(e);
                }
            });
            if let Some(e) = failed {
                return Err(DirtySourceError::Sync {
                    kind: SourceKind::Vmm,
                    source: Box::new(e),
                });
            }
        }
        Ok(())
    }

    fn peek(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<bool, DirtySourceError> {
        self.scan(range, out, false)?;
        Ok(true)
    }

    fn claim(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError> {
        self.scan(range, out, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap<GuestPageBitmap> {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 * 4096),
            (GuestAddress(0x100_0000), 64 * 4096),
        ])
        .expect("anonymous memory")
    }

    #[test]
    fn claim_reports_vm_memory_writes_and_clears_only_the_chunk() {
        let m = mem();
        let mut s = VmmWriteSource::new(&m).expect("4 KiB pages");
        s.start().expect("start");
        m.write_slice(&[1u8; 10], GuestAddress(3 * 4096 + 4090))
            .expect("write");
        m.write_slice(&[1u8], GuestAddress(0x100_0000 + 5 * 4096))
            .expect("write");
        let mut out = DirtyBitmap::new(GuestAddress(0), 64 * 4096).expect("valid");
        // Nothing is reported before a sync harvests vm-memory's bitmap.
        s.claim(GpaRange::new(GuestAddress(0), 64 * 4096), &mut out)
            .expect("claim");
        assert!(out.is_clean());
        s.sync().expect("sync");
        // Claim only pages 0..4: page 3 is claimed, page 4 stays dirty at the source.
        s.claim(GpaRange::new(GuestAddress(0), 4 * 4096), &mut out)
            .expect("claim");
        assert_eq!(out.iter_pages().collect::<Vec<_>>(), vec![3]);
        out.clear();
        s.claim(GpaRange::new(GuestAddress(0), 64 * 4096), &mut out)
            .expect("claim");
        assert_eq!(out.iter_pages().collect::<Vec<_>>(), vec![4]);
        out.clear();
        s.claim(GpaRange::new(GuestAddress(0), 64 * 4096), &mut out)
            .expect("claim");
        assert!(out.is_clean(), "claimed bits are cleared at the source");

        let mut hi = DirtyBitmap::new(GuestAddress(0x100_0000), 64 * 4096).expect("valid");
        assert!(s
            .peek(GpaRange::new(GuestAddress(0x100_0000), 64 * 4096), &mut hi)
            .expect("peek"));
        assert_eq!(hi.iter_pages().collect::<Vec<_>>(), vec![5]);
        hi.clear();
        s.claim(GpaRange::new(GuestAddress(0x100_0000), 64 * 4096), &mut hi)
            .expect("peek does not clear");
        assert_eq!(hi.iter_pages().collect::<Vec<_>>(), vec![5]);
    }

    #[test]
    fn write_after_a_sync_is_reported_after_the_next_sync() {
        let m = mem();
        let mut s = VmmWriteSource::new(&m).expect("4 KiB pages");
        s.start().expect("start");
        let chunk = GpaRange::new(GuestAddress(0), 64 * 4096);
        let mut out = DirtyBitmap::new(GuestAddress(0), 64 * 4096).expect("valid");
        m.write_slice(&[7u8], GuestAddress(9 * 4096))
            .expect("write");
        s.sync().expect("sync");
        // Written again after the harvest: kept in vm-memory's bitmap for the next sync.
        m.write_slice(&[8u8], GuestAddress(9 * 4096))
            .expect("write");
        s.claim(chunk, &mut out).expect("claim");
        assert!(out.test(9));
        out.clear();
        s.claim(chunk, &mut out).expect("claim");
        assert!(out.is_clean(), "claimed once");
        s.sync().expect("sync");
        s.claim(chunk, &mut out).expect("claim");
        assert!(out.test(9), "the write after the harvest is not lost");
    }

    #[test]
    fn claim_before_start_and_short_output_are_errors() {
        let m = mem();
        let mut s = VmmWriteSource::new(&m).expect("4 KiB pages");
        let chunk = GpaRange::new(GuestAddress(0), 64 * 4096);
        let mut out = DirtyBitmap::new(GuestAddress(0), 64 * 4096).expect("valid");
        assert!(matches!(
            s.claim(chunk, &mut out),
            Err(DirtySourceError::NotStarted { .. })
        ));
        s.start().expect("start");
        let mut short = DirtyBitmap::new(GuestAddress(0), 4096).expect("valid");
        assert!(matches!(
            s.claim(chunk, &mut short),
            Err(DirtySourceError::OutputBitmap { .. })
        ));
    }
}
