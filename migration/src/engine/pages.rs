//! Guest pages ⇄ memory frames. The source claims dirty pages into a reusable batch; the lane
//! that sends it reads each page once in place, turning all-zero pages into markers (and summing
//! data pages), then writes the data straight from guest memory. The destination writes data
//! pages and zeroes only pages it has populated before, so memory the guest never touched is
//! never touched here either.

use crate::dirty::GuestPageBitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, ReadVolatile,
};

use crate::dirty::{DirtyBitmap, PAGE_SIZE};
use crate::protocol::{MemoryEntry, PageEncoding};
use crate::transport::vectored::{read_exact_vectored, PlainSocket};

use super::error::MigrationError;

/// Data pages per memory frame (4 MiB of payload).
pub const BATCH_DATA_PAGES: usize = 1024;
/// Entries per memory frame.
pub const BATCH_MAX_ENTRIES: usize = 4096;
const PAGE: usize = PAGE_SIZE as usize;

/// Data bytes per memory frame.
const BATCH_DATA_BYTES: usize = BATCH_DATA_PAGES * PAGE;

/// How a batch's data pages travel: both write them straight from guest memory (the protocol's
/// stream frames); the buffered `Memory` frame, page bytes inside the frame CRC, is only
/// received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchMode {
    /// Outside any check.
    Stream,
    /// Each page with its sum ([`crate::protocol::page_sum`]).
    StreamSummed,
}

/// One memory frame being assembled.
///
/// Adding a page reads nothing: its `Data` entry is tentative until the lane that sends the
/// batch calls [`MemoryBatch::resolve`], which reads each page once in place (the zero check, the
/// sum) right before the lane writes the `Data` entries straight from guest memory. So every
/// lane reads its own pages, in parallel, on the thread that then sends them, and the thread
/// that plans the pass only claims and queues. A page changing after its claim is harmless
/// wherever it is read: its dirty bit was set again, so it is resent.
#[derive(Debug)]
pub struct MemoryBatch {
    /// Entry table.
    pub entries: Vec<MemoryEntry>,
    /// Data bytes the entries cover.
    pub data_len: usize,
    /// Pages sent as zero markers in this batch.
    pub zero_pages: u64,
    /// One sum per data page, in entry order ([`BatchMode::StreamSummed`]).
    pub sums: Vec<u64>,
    mode: BatchMode,
    /// False while the entries are tentative (until [`MemoryBatch::resolve`]).
    resolved: bool,
    /// The tentative entries while resolving (kept for reuse).
    tentative: Vec<MemoryEntry>,
}

/// True when every byte of `page` is zero. OR-folding 256-byte blocks vectorises well and exits
/// early on the first non-zero block (most non-zero pages differ in their first bytes).
pub fn is_zero_page(page: &[u8]) -> bool {
    page.chunks(256)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

impl MemoryBatch {
    /// An empty batch with room for [`BATCH_DATA_PAGES`] pages, carrying them as `mode` says.
    pub fn with_mode(mode: BatchMode) -> Self {
        MemoryBatch {
            entries: Vec::with_capacity(BATCH_MAX_ENTRIES),
            data_len: 0,
            zero_pages: 0,
            sums: if mode == BatchMode::StreamSummed {
                Vec::with_capacity(BATCH_DATA_PAGES)
            } else {
                Vec::new()
            },
            mode,
            resolved: false,
            tentative: Vec::new(),
        }
    }

    /// Empty it for reuse.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.data_len = 0;
        self.zero_pages = 0;
        self.sums.clear();
        self.resolved = false;
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when no further page fits.
    pub fn is_full(&self) -> bool {
        self.data_len + PAGE > BATCH_DATA_BYTES || self.entries.len() >= BATCH_MAX_ENTRIES
    }

    /// Bytes the batch puts on the wire: page data, entry table and sums; before
    /// [`MemoryBatch::resolve`] an estimate that takes every tentative page for data.
    pub fn wire_bytes(&self) -> u64 {
        let sums = if self.mode == BatchMode::StreamSummed {
            self.data_len / PAGE
        } else {
            0
        };
        (self.data_len
            + self.entries.len() * crate::protocol::MEMORY_ENTRY_BYTES
            + sums * crate::protocol::page_sum::PAGE_SUM_BYTES) as u64
    }

    /// Data pages in the batch.
    pub fn data_pages(&self) -> u64 {
        (self.data_len / PAGE) as u64
    }

    /// Add `npages` pages from `gpa` as zero markers without reading them (known never written);
    /// returns how many fit (all of them, or none when the entry table is full and they do not
    /// extend its last entry).
    pub fn push_zero_run(&mut self, gpa: GuestAddress, npages: u64) -> u64 {
        let extends = self.entries.last().is_some_and(|last| {
            last.encoding == PageEncoding::Zero && last.gpa.0 + last.len_bytes() == gpa.0
        });
        if !extends && self.entries.len() >= BATCH_MAX_ENTRIES {
            return 0;
        }
        push_run(&mut self.entries, gpa.0, npages, PageEncoding::Zero);
        self.zero_pages += npages;
        npages
    }

    /// Takes up to `npages` pages from `gpa` (inside one region) as tentative data, without
    /// reading them, for [`MemoryBatch::resolve`]; returns how many fit before the batch filled.
    pub fn push_pages(
        &mut self,
        mem: &GuestMemoryMmap<GuestPageBitmap>,
        gpa: GuestAddress,
        npages: u64,
    ) -> Result<u64, MigrationError> {
        if self.entries.len() >= BATCH_MAX_ENTRIES {
            return Ok(0);
        }
        let room = ((BATCH_DATA_BYTES - self.data_len) / PAGE) as u64;
        let n = npages.min(room);
        if n == 0 {
            return Ok(0);
        }
        // Outside guest memory is the planner's error, reported here rather than on a lane.
        if mem.get_slice(gpa, (n * PAGE_SIZE) as usize).is_err() {
            return Err(MigrationError::GuestMemory {
                gpa: gpa.0,
                len_bytes: n * PAGE_SIZE,
                source: vm_memory::GuestMemoryError::InvalidGuestAddress(gpa),
            });
        }
        push_run(&mut self.entries, gpa.0, n, PageEncoding::Data);
        self.data_len += n as usize * PAGE;
        Ok(n)
    }

    /// On the sending lane: reads each tentative data page once where it is — an all-zero page
    /// becomes a marker, a data page gets its sum — so the entries say what the frame carries.
    /// Called once per batch; a second call is a no-op.
    pub fn resolve(
        &mut self,
        mem: &GuestMemoryMmap<GuestPageBitmap>,
    ) -> Result<(), MigrationError> {
        if self.resolved {
            return Ok(());
        }
        self.resolved = true;
        let mut tentative =
            std::mem::replace(&mut self.entries, std::mem::take(&mut self.tentative));
        self.data_len = 0;
        self.sums.clear();
        let summed = self.mode == BatchMode::StreamSummed;
        for e in &tentative {
            if e.encoding == PageEncoding::Zero {
                push_run(
                    &mut self.entries,
                    e.gpa.0,
                    u64::from(e.npages),
                    PageEncoding::Zero,
                );
                continue;
            }
            let len = e.len_bytes();
            let slice = mem.get_slice(e.gpa, len as usize).map_err(|source| {
                MigrationError::GuestMemory {
                    gpa: e.gpa.0,
                    len_bytes: len,
                    source,
                }
            })?;
            for p in 0..u64::from(e.npages) {
                let at = e.gpa.0 + p * PAGE_SIZE;
                // Read where it is: the bytes that go on the wire come from guest memory too,
                // so a copy would not make them agree.
                let page = crate::guest_bytes::guest_view(&slice, (p * PAGE_SIZE) as usize, PAGE)
                    .map_err(|source| MigrationError::GuestMemory {
                    gpa: at,
                    len_bytes: PAGE_SIZE,
                    source: source.into(),
                })?;
                if is_zero_page(page) {
                    self.zero_pages += 1;
                    push_run(&mut self.entries, at, 1, PageEncoding::Zero);
                } else {
                    if summed {
                        self.sums.push(crate::protocol::page_sum::page_sum(page));
                    }
                    self.data_len += PAGE;
                    push_run(&mut self.entries, at, 1, PageEncoding::Data);
                }
            }
        }
        tentative.clear();
        self.tentative = tentative;
        Ok(())
    }
}

/// Appends `npages` pages from `gpa` as one entry, or extends the last entry when it has the
/// same encoding and ends at `gpa`.
fn push_run(entries: &mut Vec<MemoryEntry>, gpa: u64, npages: u64, encoding: PageEncoding) {
    let mut gpa = gpa;
    let mut left = npages;
    if let Some(last) = entries.last_mut() {
        if last.encoding == encoding && last.gpa.0 + last.len_bytes() == gpa {
            let k = left.min(u64::from(u32::MAX - last.npages));
            // k ≤ u32::MAX - npages.
            last.npages += k as u32;
            gpa += k * PAGE_SIZE;
            left -= k;
        }
    }
    entries.extend(entry_run(gpa, left, encoding));
}

/// `npages` pages from `gpa` as entries of at most `u32::MAX` pages each.
pub(crate) fn entry_run(
    gpa: u64,
    npages: u64,
    encoding: PageEncoding,
) -> impl Iterator<Item = MemoryEntry> {
    let max = u64::from(u32::MAX);
    (0..npages.div_ceil(max)).map(move |i| MemoryEntry {
        gpa: GuestAddress(gpa + i * max * PAGE_SIZE),
        // At most u32::MAX.
        npages: (npages - i * max).min(max) as u32,
        encoding,
    })
}

/// Bytes read before their sums are checked: small enough to stay in a core's L2 cache.
const CHECK_GROUP_BYTES: usize = 256 << 10;

/// Pages of one region, read as one slice.
#[derive(Debug, Clone, Copy)]
struct PageRun {
    idx: usize,
    first: u64,
    npages: u64,
    gpa: u64,
}

/// Consecutive page runs of a frame, read from the stream together.
#[derive(Default)]
struct ReadGroup<'m> {
    runs: Vec<PageRun>,
    slices: Vec<vm_memory::VolatileSlice<'m, vm_memory::bitmap::BS<'m, GuestPageBitmap>>>,
    bytes: usize,
}

impl<'m> ReadGroup<'m> {
    fn push(
        &mut self,
        run: PageRun,
        slice: vm_memory::VolatileSlice<'m, vm_memory::bitmap::BS<'m, GuestPageBitmap>>,
    ) {
        self.bytes += slice.len();
        self.runs.push(run);
        self.slices.push(slice);
    }

    fn clear(&mut self) {
        self.runs.clear();
        self.slices.clear();
        self.bytes = 0;
    }

    /// Fills every slice from `src`: one `readv` per call on a plain socket, else slice by slice.
    fn read<S: ReadVolatile + PlainSocket>(&mut self, src: &mut S) -> Result<(), MigrationError> {
        let failed = |source| MigrationError::PageData {
            direction: "receive",
            gpa: self.runs.first().map_or(0, |r| r.gpa),
            len_bytes: self.bytes as u64,
            source,
        };
        if let Some(socket) = src.plain_socket() {
            return read_exact_vectored(socket, &self.slices)
                .map_err(|e| failed(vm_memory::VolatileMemoryError::IOError(e)));
        }
        for (run, slice) in self.runs.iter().zip(self.slices.iter_mut()) {
            read_pages(src, slice, run.gpa)?;
        }
        Ok(())
    }
}

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
    ///
    /// Consecutive `Data` entries are read together, by one `readv` on a plain socket (see
    /// [`crate::transport::vectored`]): the pages a pass sends are mostly scattered, an entry
    /// each. With sums a group holds at most [`CHECK_GROUP_BYTES`], so its pages are checked
    /// while they are still in this core's cache (a whole 4 MiB run would have left it).
    pub fn apply_stream<S: ReadVolatile + PlainSocket>(
        &mut self,
        entries: &[MemoryEntry],
        sums: &[u64],
        src: &mut S,
    ) -> Result<(), MigrationError> {
        let mem = self.mem.clone();
        let checked = !sums.is_empty();
        let mut sums = sums.iter();
        let mut group = ReadGroup::default();
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
                    self.data_pages += u64::from(e.npages);
                    // With sums, in pieces a group can hold; without, the entry whole.
                    let piece_pages = if checked {
                        (CHECK_GROUP_BYTES / PAGE) as u64
                    } else {
                        u64::from(e.npages)
                    };
                    let mut at = 0u64;
                    while at < u64::from(e.npages) {
                        let n = piece_pages.min(u64::from(e.npages) - at);
                        let run = PageRun {
                            idx,
                            first: first + at,
                            npages: n,
                            gpa: e.gpa.0 + at * PAGE_SIZE,
                        };
                        let slice = mem
                            .get_slice(GuestAddress(run.gpa), (n * PAGE_SIZE) as usize)
                            .map_err(|source| MigrationError::GuestMemory {
                                gpa: run.gpa,
                                len_bytes: n * PAGE_SIZE,
                                source,
                            })?;
                        if checked && group.bytes + slice.len() > CHECK_GROUP_BYTES {
                            self.land(&mut group, src, &mut sums, checked)?;
                        }
                        group.push(run, slice);
                        at += n;
                    }
                }
                PageEncoding::Zero => {
                    self.land(&mut group, src, &mut sums, checked)?;
                    self.zero_pages_in(idx, first, e.npages)?;
                    self.mend(idx, first, u64::from(e.npages));
                }
            }
        }
        self.land(&mut group, src, &mut sums, checked)
    }

    /// Reads the group's pages from `src` and empties it; when `checked`, checks each page
    /// against the next of `sums`, else marks the runs intact.
    fn land<S: ReadVolatile + PlainSocket>(
        &mut self,
        group: &mut ReadGroup<'_>,
        src: &mut S,
        sums: &mut std::slice::Iter<'_, u64>,
        checked: bool,
    ) -> Result<(), MigrationError> {
        if group.runs.is_empty() {
            return Ok(());
        }
        group.read(src)?;
        for (run, slice) in group.runs.iter().zip(&group.slices) {
            if !checked {
                self.mend(run.idx, run.first, run.npages);
                continue;
            }
            let torn = &mut self.torn[run.idx];
            for p in 0..run.npages {
                let page_gpa = run.gpa + p * PAGE_SIZE;
                let page = crate::guest_bytes::guest_view(slice, (p * PAGE_SIZE) as usize, PAGE)
                    .map_err(|err| MigrationError::GuestMemory {
                        gpa: page_gpa,
                        len_bytes: PAGE_SIZE,
                        source: err.into(),
                    })?;
                let want = sums.next().ok_or(MigrationError::Unexpected {
                    frame: "memory",
                    during: "checking pages: fewer sums than data pages",
                })?;
                if crate::protocol::page_sum::page_sum(page) == *want {
                    torn.clear_range(run.first + p, 1);
                } else {
                    torn.set(run.first + p).map_err(MigrationError::Bitmap)?;
                }
            }
        }
        group.clear();
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

    /// 8 pages at 1 MiB; page 2's last byte and page 3's first byte are `a` and `b`.
    fn pages_2_and_3_written(a: u8, b: u8) -> GuestMemoryMmap<GuestPageBitmap> {
        let m = mem(8);
        m.write_slice(&[a], GuestAddress(0x10_0000 + 2 * 4096 + 4095))
            .expect("write");
        m.write_slice(&[b], GuestAddress(0x10_0000 + 3 * 4096))
            .expect("write");
        m
    }

    /// The bytes a lane writes after a resolved batch's header: its `Data` entries, read from
    /// guest memory in order.
    fn data_of(m: &GuestMemoryMmap<GuestPageBitmap>, b: &MemoryBatch) -> Vec<u8> {
        let mut data = Vec::new();
        for e in b
            .entries
            .iter()
            .filter(|e| e.encoding == PageEncoding::Data)
        {
            let mut bytes = vec![0u8; e.len_bytes() as usize];
            m.read_slice(&mut bytes, e.gpa).expect("read");
            data.extend(bytes);
        }
        assert_eq!(data.len(), b.data_len);
        data
    }

    fn e(gpa: u64, npages: u32, encoding: PageEncoding) -> MemoryEntry {
        MemoryEntry {
            gpa: GuestAddress(gpa),
            npages,
            encoding,
        }
    }

    /// 1,200 one-page `Data` entries, every other page of `m` (2,400 pages), each page filled
    /// with its own byte; returns the entries and the bytes a lane sends for them.
    fn scattered_frame(m: &GuestMemoryMmap<GuestPageBitmap>) -> (Vec<MemoryEntry>, Vec<u8>) {
        let mut entries = Vec::new();
        let mut data = Vec::new();
        for i in 0..1200u64 {
            let gpa = 0x10_0000 + i * 2 * PAGE_SIZE;
            let page = [(i % 251) as u8 + 1; PAGE];
            m.write_slice(&page, GuestAddress(gpa)).expect("fill");
            entries.push(e(gpa, 1, PageEncoding::Data));
            data.extend_from_slice(&page);
        }
        (entries, data)
    }

    /// A frame of scattered pages is read with a few `readv` calls, not a read per page (the
    /// switchover's pages are mostly scattered), and lands where its entries say, with and
    /// without sums.
    #[test]
    fn scattered_pages_of_a_frame_arrive_in_a_few_reads() {
        for summed in [false, true] {
            let src = mem(2400);
            let (entries, data) = scattered_frame(&src);
            let sums: Vec<u64> = if summed {
                data.chunks(PAGE)
                    .map(crate::protocol::page_sum::page_sum)
                    .collect()
            } else {
                Vec::new()
            };
            let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
            let writer = std::thread::spawn(move || {
                std::io::Write::write_all(&mut &a, &data).expect("send")
            });
            let mut conn = crate::transport::Connection::Unix(b);
            let dst = mem(2400);
            let mut w = PageWriter::new(dst.clone()).expect("writer");
            let (reads, _) = crate::transport::vectored::thread_io_calls();
            w.apply_stream(&entries, &sums, &mut conn).expect("apply");
            let reads = crate::transport::vectored::thread_io_calls().0 - reads;
            writer.join().expect("writer");
            // A read returns what the socket holds (~200 KiB here) and, with sums, at most a
            // 256 KiB group: tens of calls for 4.7 MiB, against 1,200 with a read per entry.
            assert!(
                reads < 300,
                "summed {summed}: {reads} reads for 1,200 pages"
            );
            for e in &entries {
                let (mut got, mut want) = ([0u8; PAGE], [0u8; PAGE]);
                dst.read_slice(&mut got, e.gpa).expect("read");
                src.read_slice(&mut want, e.gpa).expect("read");
                assert_eq!(got, want, "page {:#x}", e.gpa.0);
            }
            w.check_torn().expect("every page intact");
            assert_eq!(w.data_pages, 1200);
        }
    }

    #[test]
    fn a_stream_batch_reads_nothing_until_resolved_then_marks_zero_pages_and_sums_data() {
        let m = pages_2_and_3_written(1, 7);
        let mut b = MemoryBatch::with_mode(BatchMode::StreamSummed);
        assert_eq!(b.push_zero_run(GuestAddress(0x20_0000), 4), 4);
        assert_eq!(
            b.push_pages(&m, GuestAddress(0x10_0000), 8).expect("take"),
            8
        );
        // Tentative: every taken page counts as data, nothing read yet.
        assert_eq!(b.data_pages(), 8);
        assert!(b.sums.is_empty());
        let estimate = b.wire_bytes();
        // A write after the take is what the lane reads (its dirty bit was set again anyway).
        m.write_slice(&[9], GuestAddress(0x10_0000 + 7 * 4096))
            .expect("write");
        b.resolve(&m).expect("resolve");
        assert_eq!(
            b.entries,
            vec![
                e(0x20_0000, 4, PageEncoding::Zero),
                e(0x10_0000, 2, PageEncoding::Zero),
                e(0x10_2000, 2, PageEncoding::Data),
                e(0x10_4000, 3, PageEncoding::Zero),
                e(0x10_7000, 1, PageEncoding::Data),
            ]
        );
        assert_eq!(b.data_pages(), 3);
        assert_eq!(b.zero_pages, 4 + 5);
        let page = |i: u64| {
            let mut p = vec![0u8; PAGE];
            m.read_slice(&mut p, GuestAddress(0x10_0000 + i * 4096))
                .expect("read");
            crate::protocol::page_sum::page_sum(&p)
        };
        assert_eq!(b.sums, vec![page(2), page(3), page(7)]);
        assert!(b.wire_bytes() <= estimate, "the estimate bounds the frame");
        // Resolving twice changes nothing; clearing makes the batch tentative again.
        let resolved = b.entries.clone();
        b.resolve(&m).expect("again");
        assert_eq!(b.entries, resolved);
        b.clear();
        assert_eq!(
            b.push_pages(&m, GuestAddress(0x10_0000), 1).expect("take"),
            1
        );
        b.resolve(&m).expect("resolve");
        assert_eq!(b.entries, vec![e(0x10_0000, 1, PageEncoding::Zero)]);
    }

    #[test]
    fn a_run_longer_than_an_entry_splits_in_order() {
        let max = u32::MAX;
        let run: Vec<_> = entry_run(0x1000, 2 * u64::from(max) + 1, PageEncoding::Zero).collect();
        let at = |pages: u64| 0x1000 + pages * PAGE_SIZE;
        assert_eq!(
            run,
            vec![
                e(at(0), max, PageEncoding::Zero),
                e(at(u64::from(max)), max, PageEncoding::Zero),
                e(at(2 * u64::from(max)), 1, PageEncoding::Zero),
            ]
        );
        assert_eq!(entry_run(0x1000, 0, PageEncoding::Data).count(), 0);
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
        let mut b = MemoryBatch::with_mode(BatchMode::Stream);
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
        let mut b = MemoryBatch::with_mode(BatchMode::Stream);
        b.push_pages(&src, GuestAddress(0x10_0000), 8)
            .expect("read");
        b.resolve(&src).expect("resolve");
        let mut w = PageWriter::new(dst.clone()).expect("writer");
        w.apply(&b.entries, &data_of(&src, &b)).expect("apply");
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
        b.resolve(&src).expect("resolve");
        assert_eq!(b.data_len, 0);
        w.apply(&b.entries, &data_of(&src, &b)).expect("apply");
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
