//! Destination: allocating guest memory ahead of its data.
//!
//! A fresh destination's guest memory is an empty memfd: every page the first pass brings is
//! allocated, zeroed and mapped by a page fault in the middle of the receiving thread's copy,
//! which made that fault, not the copy, most of a receive (0.65 ms per MiB here against
//! 0.06 ms for the copy into mapped pages). The source says up front which memory it will send
//! as data ([`Frame::Populated`](crate::protocol::Frame::Populated)); a helper thread faults it
//! in with `MADV_POPULATE_WRITE` from the *top* down, while the data arrives from the bottom up,
//! so the two work on different pages (populating from the bottom, the receiver caught up at
//! once and both slowed on the same pages) until they meet, and the receiver finds the upper
//! part mapped: 256 MiB took 88-92 ms against 167-186 ms with the receiver faulting alone.
//! Populating changes no byte, so it can never race the data that lands in the same page.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

use crate::dirty::GuestPageBitmap;
use crate::protocol::MemoryEntry;

/// Bytes populated per call: small enough that a stop request is seen within a millisecond.
const STEP: u64 = 2 << 20;

/// The helper thread, once the source's hint arrived.
#[derive(Debug, Default)]
pub struct Prefaulter {
    stop: Arc<AtomicBool>,
    done_bytes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Prefaulter {
    /// Starts populating `entries` of `mem`, highest address first. A second hint is ignored
    /// (the source sends one).
    pub fn start(&mut self, mem: &GuestMemoryMmap<GuestPageBitmap>, entries: Vec<MemoryEntry>) {
        if self.thread.is_some() {
            return;
        }
        let mem = mem.clone();
        let stop = self.stop.clone();
        let done = self.done_bytes.clone();
        let spawned = std::thread::Builder::new()
            .name("tern-mig-prefault".into())
            .spawn(move || populate_top_down(&mem, &entries, &stop, &done));
        match spawned {
            Ok(t) => self.thread = Some(t),
            // Only slower without it: each page is then faulted in as its data arrives.
            Err(e) => log::warn!("guest memory not populated ahead: no thread: {e}"),
        }
    }

    /// Waits for the thread to finish on its own (tests).
    pub fn wait(&mut self) -> u64 {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.populated_bytes()
    }

    /// Stops the thread (within one step) and returns the bytes it populated.
    pub fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.wait()
    }

    /// Bytes populated so far.
    pub fn populated_bytes(&self) -> u64 {
        self.done_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Prefaulter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn populate_top_down(
    mem: &GuestMemoryMmap<GuestPageBitmap>,
    entries: &[MemoryEntry],
    stop: &AtomicBool,
    done: &AtomicU64,
) {
    for e in entries.iter().rev() {
        let mut end = e.gpa.0.saturating_add(e.len_bytes());
        while end > e.gpa.0 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let start = end.saturating_sub(STEP).max(e.gpa.0);
            let len = end - start;
            let Ok(slice) = mem.get_slice(vm_memory::GuestAddress(start), len as usize) else {
                // Outside guest memory or across regions: a hint, not a promise; skip it.
                log::debug!("populated hint {:#x}+{len:#x} not in one region", start);
                break;
            };
            if let Err(e) = crate::guest_bytes::populate_write(&slice) {
                // EINVAL before Linux 5.14; nothing else will work better.
                log::info!("guest memory not populated ahead: {e}");
                return;
            }
            done.fetch_add(len, Ordering::Relaxed);
            end = start;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::PAGE_SIZE;
    use crate::protocol::PageEncoding;
    use std::io::{Read, Seek, SeekFrom};
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion, MemoryRegionAddress};

    const MIB: u64 = 1 << 20;

    /// 16 MiB at 0 and 4 MiB at 4 GiB, in one shared memory file (as the VMM's memfd).
    fn memory() -> GuestMemoryMmap<GuestPageBitmap> {
        let f = vmm_sys_util::tempfile::TempFile::new_in(std::path::Path::new("/dev/shm"))
            .or_else(|_| vmm_sys_util::tempfile::TempFile::new())
            .expect("temp file")
            .into_file();
        f.set_len(20 * MIB).expect("size");
        let f = Arc::new(f);
        GuestMemoryMmap::from_ranges_with_files(&[
            (
                GuestAddress(0),
                (16 * MIB) as usize,
                Some(FileOffset::from_arc(f.clone(), 0)),
            ),
            (
                GuestAddress(1 << 32),
                (4 * MIB) as usize,
                Some(FileOffset::from_arc(f, 16 * MIB)),
            ),
        ])
        .expect("memory")
    }

    /// Pages of `mem` present in this process's page tables (/proc/self/pagemap bit 63).
    fn present(mem: &GuestMemoryMmap<GuestPageBitmap>) -> Vec<u64> {
        let mut f = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
        let mut out = Vec::new();
        for r in mem.iter() {
            let host = r.get_host_address(MemoryRegionAddress(0)).expect("host") as u64;
            let mut buf = vec![0u8; (r.len() / PAGE_SIZE * 8) as usize];
            f.seek(SeekFrom::Start(host / PAGE_SIZE * 8)).expect("seek");
            f.read_exact(&mut buf).expect("read");
            for (i, e) in buf.chunks_exact(8).enumerate() {
                if u64::from_le_bytes(e.try_into().expect("8 bytes")) >> 63 == 1 {
                    out.push(r.start_addr().0 + i as u64 * PAGE_SIZE);
                }
            }
        }
        out
    }

    fn data(gpa: u64, npages: u32) -> MemoryEntry {
        MemoryEntry {
            gpa: GuestAddress(gpa),
            npages,
            encoding: PageEncoding::Data,
        }
    }

    #[test]
    fn populates_exactly_the_hinted_pages_and_no_others() {
        let mem = memory();
        assert!(present(&mem).is_empty(), "a fresh file maps nothing");
        let hint = vec![
            data(3 * MIB, 600),
            data(15 * MIB, 1),
            data((1 << 32) + MIB, 3),
            // Outside guest memory: skipped, not fatal.
            data(1 << 40, 1),
        ];
        let mut p = Prefaulter::default();
        p.start(&mem, hint);
        let done = p.wait();
        assert_eq!(done, (600 + 1 + 3) * PAGE_SIZE);
        let mut want: Vec<u64> = (0..600).map(|i| 3 * MIB + i * PAGE_SIZE).collect();
        want.push(15 * MIB);
        want.extend((0..3).map(|i| (1 << 32) + MIB + i * PAGE_SIZE));
        assert_eq!(present(&mem), want);
    }

    #[test]
    fn a_stopped_prefaulter_leaves_the_rest() {
        let mem = memory();
        let mut p = Prefaulter::default();
        p.stop.store(true, Ordering::Relaxed);
        p.start(&mem, vec![data(0, 4096)]);
        assert_eq!(p.stop(), 0);
        assert!(present(&mem).is_empty());
    }
}
