//! Guest pages ⇄ memory frames. The source copies dirty pages into a reusable batch, turning
//! all-zero pages into markers; the destination writes data pages and zeroes only pages it has
//! populated before, so memory the guest never touched is never touched here either.

use crate::dirty::GuestPageBitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, ReadVolatile,
};

use crate::dirty::{DirtyBitmap, PAGE_SIZE};
use crate::protocol::{MemoryEntry, PageEncoding};

use super::error::MigrationError;

/// Data pages per memory frame (4 MiB of payload).
pub const BATCH_DATA_PAGES: usize = 1024;
/// Entries per memory frame.
pub const BATCH_MAX_ENTRIES: usize = 4096;
const PAGE: usize = PAGE_SIZE as usize;

/// Data bytes per memory frame.
const BATCH_DATA_BYTES: usize = BATCH_DATA_PAGES * PAGE;

/// How a batch carries its page bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchMode {
    /// Snapshotted into the batch, sent inside the frame CRC (a buffered frame).
    Snapshot,
    /// Written by the sender straight from guest memory, outside any check.
    Stream,
    /// Written straight from guest memory, each page with its sum taken from the copy the zero
    /// check makes ([`crate::protocol::page_sum`]).
    StreamSummed,
}

/// One memory frame being assembled.
///
/// In [`BatchMode::Snapshot`] the page bytes are copied into `data`; in the stream modes each
/// page is only read in place (the zero check and the sum) and the sender later writes the
/// `Data` entries straight from guest memory. A page changing in between is harmless: its dirty
/// bit was set again after the claim, so it is resent.
#[derive(Debug)]
pub struct MemoryBatch {
    /// Entry table.
    pub entries: Vec<MemoryEntry>,
    /// Page bytes (copy mode); only `..data_len` is meaningful. Allocated once, never re-zeroed.
    pub data: Vec<u8>,
    /// Data bytes the entries cover.
    pub data_len: usize,
    /// Pages sent as zero markers in this batch.
    pub zero_pages: u64,
    /// One sum per data page, in entry order ([`BatchMode::StreamSummed`]).
    pub sums: Vec<u64>,
    mode: BatchMode,
}

impl Default for MemoryBatch {
    fn default() -> Self {
        Self::new()
    }
}

/// True when every byte of `page` is zero. OR-folding 256-byte blocks vectorises well and exits
/// early on the first non-zero block (most non-zero pages differ in their first bytes).
pub fn is_zero_page(page: &[u8]) -> bool {
    page.chunks(256)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

impl MemoryBatch {
    /// An empty batch with room for [`BATCH_DATA_PAGES`] pages, copying page data.
    pub fn new() -> Self {
        Self::with_mode(BatchMode::Snapshot)
    }

    /// An empty batch carrying its pages as `mode` says.
    pub fn with_mode(mode: BatchMode) -> Self {
        let snapshot = mode == BatchMode::Snapshot;
        MemoryBatch {
            entries: Vec::with_capacity(BATCH_MAX_ENTRIES),
            data: if snapshot {
                vec![0; BATCH_DATA_BYTES]
            } else {
                Vec::new()
            },
            data_len: 0,
            zero_pages: 0,
            sums: if mode == BatchMode::StreamSummed {
                Vec::with_capacity(BATCH_DATA_PAGES)
            } else {
                Vec::new()
            },
            mode,
        }
    }

    /// Does the batch hold the page bytes?
    pub fn copies_data(&self) -> bool {
        self.mode == BatchMode::Snapshot
    }

    /// Empty it for reuse.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.data_len = 0;
        self.zero_pages = 0;
        self.sums.clear();
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when no further page fits.
    pub fn is_full(&self) -> bool {
        self.data_len + PAGE > BATCH_DATA_BYTES || self.entries.len() >= BATCH_MAX_ENTRIES
    }

    /// Bytes the batch puts on the wire: page data and entry table.
    pub fn wire_bytes(&self) -> u64 {
        (self.data_len
            + self.entries.len() * crate::protocol::MEMORY_ENTRY_BYTES
            + self.sums.len() * crate::protocol::page_sum::PAGE_SUM_BYTES) as u64
    }

    /// Data pages in the batch.
    pub fn data_pages(&self) -> u64 {
        (self.data_len / PAGE) as u64
    }

    fn push_entry(&mut self, gpa: u64, encoding: PageEncoding) {
        if let Some(last) = self.entries.last_mut() {
            if last.encoding == encoding
                && last.gpa.0 + last.len_bytes() == gpa
                && last.npages < u32::MAX
            {
                last.npages += 1;
                return;
            }
        }
        self.entries.push(MemoryEntry {
            gpa: GuestAddress(gpa),
            npages: 1,
            encoding,
        });
    }

    /// Add `npages` pages from `gpa` as zero markers without reading them (known never written);
    /// returns how many fit.
    pub fn push_zero_run(&mut self, gpa: GuestAddress, npages: u64) -> u64 {
        let mut done = 0;
        while done < npages {
            let at = gpa.0 + done * PAGE_SIZE;
            let n = (npages - done).min(u64::from(u32::MAX));
            if let Some(last) = self.entries.last_mut() {
                let room = u64::from(u32::MAX - last.npages);
                if last.encoding == PageEncoding::Zero
                    && last.gpa.0 + last.len_bytes() == at
                    && room > 0
                {
                    let k = n.min(room);
                    // k ≤ room ≤ u32::MAX.
                    last.npages += k as u32;
                    self.zero_pages += k;
                    done += k;
                    continue;
                }
            }
            if self.entries.len() >= BATCH_MAX_ENTRIES {
                break;
            }
            self.entries.push(MemoryEntry {
                gpa: GuestAddress(at),
                npages: n as u32,
                encoding: PageEncoding::Zero,
            });
            self.zero_pages += n;
            done += n;
        }
        done
    }

    /// Copy up to `npages` pages from `gpa` (inside one region) into the batch; returns how many
    /// pages were taken before the batch filled up.
    pub fn push_pages(
        &mut self,
        mem: &GuestMemoryMmap<GuestPageBitmap>,
        gpa: GuestAddress,
        npages: u64,
    ) -> Result<u64, MigrationError> {
        let gm_err = |source, len_bytes| MigrationError::GuestMemory {
            gpa: gpa.0,
            len_bytes,
            source,
        };
        let mut done = 0;
        while done < npages && !self.is_full() {
            // Take as many pages as fit in one slice lookup.
            let room = ((BATCH_DATA_BYTES - self.data_len) / PAGE) as u64;
            let n = (npages - done).min(room);
            let at = gpa.0 + done * PAGE_SIZE;
            let len = n * PAGE_SIZE;
            let slice = mem
                .get_slice(GuestAddress(at), len as usize)
                .map_err(|e| gm_err(e, len))?;
            let mut taken = 0;
            while taken < n && self.entries.len() < BATCH_MAX_ENTRIES {
                let page_gpa = at + taken * PAGE_SIZE;
                let off = taken as usize * PAGE;
                let data = if self.mode == BatchMode::Snapshot {
                    let dst = &mut self.data[self.data_len..self.data_len + PAGE];
                    slice
                        .subslice(off, PAGE)
                        .map_err(|e| gm_err(e.into(), PAGE_SIZE))?
                        .copy_to(dst);
                    !is_zero_page(dst)
                } else {
                    // The zero check and the sum read the page where it is: the bytes that go
                    // on the wire come from guest memory too, so a copy would not make them
                    // agree, and a page rewritten meanwhile is dirty again and resent.
                    let page = crate::guest_bytes::guest_view(&slice, off, PAGE)
                        .map_err(|e| gm_err(e.into(), PAGE_SIZE))?;
                    let data = !is_zero_page(page);
                    if data && self.mode == BatchMode::StreamSummed {
                        self.sums.push(crate::protocol::page_sum::page_sum(page));
                    }
                    data
                };
                if data {
                    self.data_len += PAGE;
                    self.push_entry(page_gpa, PageEncoding::Data);
                } else {
                    self.zero_pages += 1;
                    self.push_entry(page_gpa, PageEncoding::Zero);
                }
                taken += 1;
            }
            done += taken;
            if taken < n {
                break;
            }
        }
        Ok(done)
    }
}

/// Pages read before their sums are checked: small enough to stay in a core's L2 cache.
const CHECK_PIECE_PAGES: usize = 64;

/// Reads `slice.len()` bytes of page data for `gpa` from `src` into guest memory.
fn read_pages<S: ReadVolatile, B: vm_memory::bitmap::BitmapSlice>(
    src: &mut S,
    slice: &mut vm_memory::VolatileSlice<'_, B>,
    gpa: u64,
) -> Result<(), MigrationError> {
    src.read_exact_volatile(slice)
        .map_err(|source| MigrationError::PageData {
            direction: "receive",
            gpa,
            len_bytes: slice.len() as u64,
            source,
        })
}

/// Applies memory frames to the destination's guest memory.
#[derive(Debug)]
pub struct PageWriter {
    mem: GuestMemoryMmap<GuestPageBitmap>,
    /// Per region: pages this writer has written data to (only those need zeroing later).
    populated: Vec<DirtyBitmap>,
    /// Per region: pages whose last copy failed its sum and has not been replaced since.
    torn: Vec<DirtyBitmap>,
    zero: Vec<u8>,
    /// Data pages written.
    pub data_pages: u64,
    /// Zero markers received.
    pub zero_pages: u64,
}

impl PageWriter {
    /// The guest memory it writes.
    pub fn memory(&self) -> &GuestMemoryMmap<GuestPageBitmap> {
        &self.mem
    }

    /// A writer over `mem`, which must be zero-filled.
    pub fn new(mem: GuestMemoryMmap<GuestPageBitmap>) -> Result<Self, MigrationError> {
        let mut populated = Vec::new();
        for r in mem.iter() {
            populated
                .push(DirtyBitmap::new(r.start_addr(), r.len()).map_err(MigrationError::Bitmap)?);
        }
        let torn = populated.clone();
        Ok(PageWriter {
            mem,
            populated,
            torn,
            zero: vec![0; PAGE],
            data_pages: 0,
            zero_pages: 0,
        })
    }

    fn region_index(&self, gpa: GuestAddress, len_bytes: u64) -> Option<usize> {
        self.populated.iter().position(|b| {
            gpa.0 >= b.base().0
                && gpa
                    .0
                    .checked_add(len_bytes)
                    .is_some_and(|end| end <= b.base().0 + b.len_bytes())
        })
    }

    fn zero_pages_in(&mut self, idx: usize, first: u64, npages: u32) -> Result<(), MigrationError> {
        let bm = &self.populated[idx];
        let to_zero: Vec<u64> = (first..first + u64::from(npages))
            .filter(|&p| bm.test(p))
            .collect();
        let base = bm.base().0;
        for p in to_zero {
            let gpa = GuestAddress(base + p * PAGE_SIZE);
            self.mem
                .get_slice(gpa, PAGE)
                .map_err(|source| MigrationError::GuestMemory {
                    gpa: gpa.0,
                    len_bytes: PAGE_SIZE,
                    source,
                })?
                .copy_from(&self.zero[..]);
        }
        self.zero_pages += u64::from(npages);
        Ok(())
    }

    /// A run of pages arrived intact (checked data or zero markers): none of them is torn now.
    /// The torn bitmaps walk only marked groups, so with nothing torn this costs next to nothing.
    fn mend(&mut self, idx: usize, first: u64, npages: u64) {
        self.torn[idx].clear_range(first, npages);
    }

    /// Pages whose last copy failed its sum and that were not sent again: damaged in transit.
    /// Checked when the stream that carried them ends.
    pub fn check_torn(&self) -> Result<(), MigrationError> {
        let pages: u64 = self.torn.iter().map(DirtyBitmap::count).sum();
        if pages == 0 {
            return Ok(());
        }
        let first = self
            .torn
            .iter()
            .find_map(|b| b.iter_pages().next().map(|p| b.base().0 + p * PAGE_SIZE))
            .unwrap_or(0);
        Err(MigrationError::PageSums {
            pages,
            first_gpa: first,
        })
    }

    /// Apply a streamed memory frame: `Data` entries are read from `src` straight into guest
    /// memory, in entry order. With `sums` (one per data page, in order) each page is checked
    /// right after its read: a mismatch marks it torn (see [`crate::protocol::page_sum`]).
    pub fn apply_stream<S: ReadVolatile>(
        &mut self,
        entries: &[MemoryEntry],
        sums: &[u64],
        src: &mut S,
    ) -> Result<(), MigrationError> {
        let mut sum = sums.iter();
        for e in entries {
            let len = e.len_bytes();
            let idx = self
                .region_index(e.gpa, len)
                .ok_or(MigrationError::GuestMemory {
                    gpa: e.gpa.0,
                    len_bytes: len,
                    source: vm_memory::GuestMemoryError::InvalidGuestAddress(e.gpa),
                })?;
            let first = (e.gpa.0 - self.populated[idx].base().0) / PAGE_SIZE;
            match e.encoding {
                PageEncoding::Data => {
                    self.populated[idx]
                        .set_pages(first, u64::from(e.npages))
                        .map_err(MigrationError::Bitmap)?;
                    let mut slice = self.mem.get_slice(e.gpa, len as usize).map_err(|source| {
                        MigrationError::GuestMemory {
                            gpa: e.gpa.0,
                            len_bytes: len,
                            source,
                        }
                    })?;
                    self.data_pages += u64::from(e.npages);
                    if sums.is_empty() {
                        read_pages(src, &mut slice, e.gpa.0)?;
                        self.mend(idx, first, u64::from(e.npages));
                        continue;
                    }
                    // Check each piece right after its read, while it is still in this core's
                    // cache (a whole 4 MiB run would have left it).
                    let torn = &mut self.torn[idx];
                    for at in (0..e.npages as usize).step_by(CHECK_PIECE_PAGES) {
                        let n = CHECK_PIECE_PAGES.min(e.npages as usize - at);
                        let piece_gpa = e.gpa.0 + (at * PAGE) as u64;
                        let mut piece = slice.subslice(at * PAGE, n * PAGE).map_err(|err| {
                            MigrationError::GuestMemory {
                                gpa: piece_gpa,
                                len_bytes: (n * PAGE) as u64,
                                source: err.into(),
                            }
                        })?;
                        read_pages(src, &mut piece, piece_gpa)?;
                        for p in 0..n {
                            let page_gpa = piece_gpa + (p * PAGE) as u64;
                            let page = crate::guest_bytes::guest_view(&piece, p * PAGE, PAGE)
                                .map_err(|err| MigrationError::GuestMemory {
                                    gpa: page_gpa,
                                    len_bytes: PAGE_SIZE,
                                    source: err.into(),
                                })?;
                            let want = sum.next().ok_or(MigrationError::Unexpected {
                                frame: "memory",
                                during: "checking pages: fewer sums than data pages",
                            })?;
                            let page_index = first + (at + p) as u64;
                            if crate::protocol::page_sum::page_sum(page) == *want {
                                torn.clear_range(page_index, 1);
                            } else {
                                torn.set(page_index).map_err(MigrationError::Bitmap)?;
                            }
                        }
                    }
                }
                PageEncoding::Zero => {
                    self.zero_pages_in(idx, first, e.npages)?;
                    self.mend(idx, first, u64::from(e.npages));
                }
            }
        }
        Ok(())
    }

    /// Write one memory frame's pages.
    pub fn apply(&mut self, entries: &[MemoryEntry], data: &[u8]) -> Result<(), MigrationError> {
        let mut off = 0usize;
        for e in entries {
            let len = e.len_bytes();
            let outside = || MigrationError::GuestMemory {
                gpa: e.gpa.0,
                len_bytes: len,
                source: vm_memory::GuestMemoryError::InvalidGuestAddress(e.gpa),
            };
            let idx = self.region_index(e.gpa, len).ok_or_else(outside)?;
            let bm = &mut self.populated[idx];
            let first = (e.gpa.0 - bm.base().0) / PAGE_SIZE;
            match e.encoding {
                PageEncoding::Data => {
                    bm.set_pages(first, u64::from(e.npages))
                        .map_err(MigrationError::Bitmap)?;
                    // The codec checks the data section against the entries; a direct caller may not.
                    let src =
                        data.get(off..off + len as usize)
                            .ok_or(MigrationError::Unexpected {
                                frame: "memory",
                                during: "applying pages: data shorter than the entries",
                            })?;
                    off += len as usize;
                    self.mem
                        .get_slice(e.gpa, len as usize)
                        .map_err(|source| MigrationError::GuestMemory {
                            gpa: e.gpa.0,
                            len_bytes: len,
                            source,
                        })?
                        .copy_from(src);
                    self.data_pages += u64::from(e.npages);
                    self.mend(idx, first, u64::from(e.npages));
                }
                PageEncoding::Zero => {
                    self.zero_pages_in(idx, first, e.npages)?;
                    self.mend(idx, first, u64::from(e.npages));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem(pages: usize) -> GuestMemoryMmap<GuestPageBitmap> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), pages * PAGE)]).expect("memory")
    }

    #[test]
    fn zero_pages_become_markers_and_runs_merge() {
        let m = mem(8);
        m.write_slice(&[1], GuestAddress(0x10_0000 + 2 * 4096 + 4095))
            .expect("write");
        m.write_slice(&[1], GuestAddress(0x10_0000 + 3 * 4096))
            .expect("write");
        let mut b = MemoryBatch::new();
        assert_eq!(
            b.push_pages(&m, GuestAddress(0x10_0000), 8).expect("read"),
            8
        );
        let e = |gpa: u64, n, encoding| MemoryEntry {
            gpa: GuestAddress(gpa),
            npages: n,
            encoding,
        };
        assert_eq!(
            b.entries,
            vec![
                e(0x10_0000, 2, PageEncoding::Zero),
                e(0x10_2000, 2, PageEncoding::Data),
                e(0x10_4000, 4, PageEncoding::Zero),
            ]
        );
        assert_eq!(b.data_len, 2 * PAGE);
        assert_eq!(b.zero_pages, 6);
        assert_eq!(b.data[4095], 1);
        assert_eq!(b.data[4096], 1);
    }

    #[test]
    fn push_zero_run_merges_without_reading_and_respects_entry_limit() {
        let mut b = MemoryBatch::with_mode(BatchMode::Stream);
        assert_eq!(b.push_zero_run(GuestAddress(0), 10), 10);
        assert_eq!(b.push_zero_run(GuestAddress(10 * 4096), 5), 5);
        assert_eq!(b.entries.len(), 1, "contiguous zero runs merge");
        assert_eq!(b.entries[0].npages, 15);
        assert_eq!(b.zero_pages, 15);
        assert_eq!(b.data_len, 0);
        // Non-contiguous runs take an entry each until the table is full.
        let mut gpa = 1 << 30;
        let mut taken = 0;
        while b.push_zero_run(GuestAddress(gpa), 1) == 1 {
            taken += 1;
            gpa += 2 * 4096;
        }
        assert_eq!(taken, BATCH_MAX_ENTRIES - 1);
        assert!(b.is_full());
    }

    #[test]
    fn push_pages_stops_when_full_and_resumes() {
        let m = mem(BATCH_DATA_PAGES + 10);
        for p in 0..BATCH_DATA_PAGES + 10 {
            m.write_slice(&[7], GuestAddress(0x10_0000 + (p * PAGE) as u64))
                .expect("write");
        }
        let mut b = MemoryBatch::new();
        let total = (BATCH_DATA_PAGES + 10) as u64;
        let n = b
            .push_pages(&m, GuestAddress(0x10_0000), total)
            .expect("read");
        assert_eq!(n, BATCH_DATA_PAGES as u64);
        assert!(b.is_full());
        b.clear();
        let rest = GuestAddress(0x10_0000 + n * PAGE_SIZE);
        assert_eq!(b.push_pages(&m, rest, total - n).expect("read"), 10);
    }

    #[test]
    fn page_writer_round_trips_and_rezeroes_only_populated_pages() {
        let src = mem(8);
        let dst = mem(8);
        src.write_slice(&[9; 4096], GuestAddress(0x10_1000))
            .expect("write");
        let mut b = MemoryBatch::new();
        b.push_pages(&src, GuestAddress(0x10_0000), 8)
            .expect("read");
        let mut w = PageWriter::new(dst.clone()).expect("writer");
        w.apply(&b.entries, &b.data[..b.data_len]).expect("apply");
        let mut got = [0u8; 4096];
        dst.read_slice(&mut got, GuestAddress(0x10_1000))
            .expect("read");
        assert_eq!(got, [9; 4096]);
        // The page becomes zero at the source: the marker must clear it at the destination.
        src.write_slice(&[0; 4096], GuestAddress(0x10_1000))
            .expect("write");
        b.clear();
        b.push_pages(&src, GuestAddress(0x10_0000), 8)
            .expect("read");
        w.apply(&b.entries, &b.data[..b.data_len]).expect("apply");
        dst.read_slice(&mut got, GuestAddress(0x10_1000))
            .expect("read");
        assert_eq!(got, [0; 4096]);
        assert_eq!(w.data_pages, 1);
        assert_eq!(w.zero_pages, 15);
    }

    #[test]
    fn page_writer_rejects_pages_outside_memory() {
        let mut w = PageWriter::new(mem(2)).expect("writer");
        let e = MemoryEntry {
            gpa: GuestAddress(0x10_1000),
            npages: 2,
            encoding: PageEncoding::Zero,
        };
        assert!(matches!(
            w.apply(&[e], &[]),
            Err(MigrationError::GuestMemory { gpa: 0x10_1000, .. })
        ));
    }

    #[test]
    fn is_zero_page_detects_any_nonzero_byte() {
        let mut p = vec![0u8; PAGE];
        assert!(is_zero_page(&p));
        for i in [0, 255, 256, 4095] {
            p[i] = 1;
            assert!(!is_zero_page(&p), "byte {i}");
            p[i] = 0;
        }
    }
}
