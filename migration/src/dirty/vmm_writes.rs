//! [`DirtySource`] over vm-memory's `AtomicBitmap`: writes the VMM makes to guest memory through
//! `GuestMemoryMmap<AtomicBitmap>` (device emulation, virtio queues) set bits there.
//!
//! vm-memory 0.18's `AtomicBitmap` offers per-page test/reset and a whole-bitmap `get_and_reset`,
//! but no word access for a sub-range. A chunked claim therefore walks the chunk page by page
//! (one relaxed load per page, an atomic AND only for set bits). Test-then-reset loses nothing:
//! vm-memory marks a page *after* writing it, so a bit we reset was set by a write that has
//! completed before we read the page, and a write landing after the reset sets the bit again.

use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use super::bitmap::{DirtyBitmap, PAGE_SIZE};
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
}

#[derive(Debug)]
struct TrackedRegion {
    base: GuestAddress,
    len_bytes: u64,
    mapping: Arc<MmapRegion<AtomicBitmap>>,
}

/// Dirty source for VMM-side writes to guest memory.
#[derive(Debug)]
pub struct VmmWriteSource {
    regions: Vec<TrackedRegion>,
    started: bool,
}

impl VmmWriteSource {
    /// Track every region of `mem`. The source keeps the mappings alive.
    pub fn new(mem: &GuestMemoryMmap<AtomicBitmap>) -> Result<Self, VmmWriteSourceError> {
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
            regions.push(TrackedRegion {
                base: r.start_addr(),
                len_bytes,
                mapping,
            });
        }
        Ok(VmmWriteSource {
            regions,
            started: false,
        })
    }

    /// Visit each set bit in `range`; `reset` clears it at the source.
    fn scan(
        &self,
        range: GpaRange,
        out: &mut DirtyBitmap,
        reset: bool,
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
        for r in &self.regions {
            let Some(part) = range.intersect(r.base.0, r.len_bytes) else {
                continue;
            };
            let bm = r.mapping.bitmap();
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
            for i in 0..n {
                // Region page indices fit usize: the bitmap of that many bits exists.
                let idx = usize::try_from(first + i).unwrap_or(usize::MAX);
                if bm.is_bit_set(idx) {
                    if reset {
                        bm.reset_bit(idx);
                    }
                    out.set(out_first + i).map_err(out_err)?;
                }
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
        for r in &self.regions {
            r.mapping.bitmap().reset();
        }
        self.started = true;
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtySourceError> {
        self.started = false;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), DirtySourceError> {
        // The bitmap is live shared memory; there is nothing to fetch.
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

    fn mem() -> GuestMemoryMmap<AtomicBitmap> {
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
    fn write_after_claim_is_reported_by_the_next_claim() {
        let m = mem();
        let mut s = VmmWriteSource::new(&m).expect("4 KiB pages");
        s.start().expect("start");
        let chunk = GpaRange::new(GuestAddress(0), 64 * 4096);
        let mut out = DirtyBitmap::new(GuestAddress(0), 64 * 4096).expect("valid");
        m.write_slice(&[7u8], GuestAddress(9 * 4096))
            .expect("write");
        s.claim(chunk, &mut out).expect("claim");
        assert!(out.test(9));
        m.write_slice(&[8u8], GuestAddress(9 * 4096))
            .expect("write");
        out.clear();
        s.claim(chunk, &mut out).expect("claim");
        assert!(out.test(9));
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
