//! A fake passthrough device: a thread that writes guest pages through its own mapping of the
//! guest's memory file (as an IOMMU-translated DMA would: neither the vCPU dirty log nor the
//! VMM's write bitmap sees it), and the DMA dirty source that reports those pages, like IOMMU
//! dirty tracking does. `tracked: false` is the negative control: the same writes, unreported.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tern_migration::dirty::{DirtyBitmap, DirtySource, DirtySourceError, GpaRange, SourceKind};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::{Mem, PAGE_SIZE};

/// Marks in `out` every page of `set` (dirty page GPAs) inside `range`, as a DMA source reports;
/// with `clear` those pages leave the set.
pub fn report_pages(
    set: &mut BTreeSet<u64>,
    range: GpaRange,
    out: &mut DirtyBitmap,
    clear: bool,
) -> Result<(), DirtySourceError> {
    let pages: Vec<u64> = set.range(range.start.0..range.end()).copied().collect();
    for &g in &pages {
        out.mark_range(GuestAddress(g), PAGE_SIZE)
            .map_err(|source| DirtySourceError::OutputBitmap {
                kind: SourceKind::Dma,
                range,
                source,
            })?;
        if clear {
            set.remove(&g);
        }
    }
    Ok(())
}

/// The device's view of guest memory: the same file, mapped again, with no dirty bitmap.
pub type DeviceView = GuestMemoryMmap<()>;

pub fn device_view(mem: &Mem) -> DeviceView {
    let v: Vec<(GuestAddress, usize, Option<FileOffset>)> = mem
        .iter()
        .map(|r| {
            let fo = r.file_offset().expect("file-backed guest memory");
            (
                r.start_addr(),
                r.len() as usize,
                Some(FileOffset::from_arc(fo.arc().clone(), fo.start())),
            )
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&v).expect("device mapping")
}

/// Shared state of the fake device and its dirty source.
#[derive(Debug)]
pub struct FakeDma {
    view: DeviceView,
    /// Pages (GPA) written since their last claim: the "IOMMU dirty bits".
    dirty: Mutex<BTreeSet<u64>>,
    /// Report writes (false: the negative control, an untracked device).
    tracked: bool,
    tracking: AtomicBool,
    paused: AtomicBool,
    stop: AtomicBool,
    /// Held for each write; pausing takes it once so no write is in flight afterwards.
    engine: Mutex<()>,
    pub writes: AtomicU64,
    /// (paused, range) of every claim, in order.
    pub claims: Mutex<Vec<(bool, GpaRange)>>,
    /// The page the engine wrote last (its write at the stop repeats it).
    last_gpa: AtomicU64,
}

impl FakeDma {
    pub fn new(mem: &Mem, tracked: bool) -> Arc<Self> {
        Arc::new(FakeDma {
            view: device_view(mem),
            dirty: Mutex::new(BTreeSet::new()),
            tracked,
            tracking: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            engine: Mutex::new(()),
            writes: AtomicU64::new(0),
            claims: Mutex::new(Vec::new()),
            last_gpa: AtomicU64::new(u64::MAX),
        })
    }

    /// One DMA write of a stamp into page `gpa` (reported if tracked and tracking).
    pub fn write_page(&self, gpa: u64, seq: u64) {
        let stamp: Vec<u8> = [gpa, seq, 0xd0a_d0a]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        self.view
            .write_slice(&stamp, GuestAddress(gpa + (seq % 100) * 32))
            .expect("device write");
        if self.tracked && self.tracking.load(Ordering::SeqCst) {
            self.dirty.lock().expect("dirty").insert(gpa);
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.last_gpa.store(gpa, Ordering::Relaxed);
    }

    /// Start the device's DMA engine: `pages` pages from `base`, one write every `pause_us`.
    pub fn start(self: &Arc<Self>, base: u64, pages: u64, pause_us: u64) -> JoinHandle<()> {
        let d = self.clone();
        std::thread::spawn(move || {
            let mut seq = 0u64;
            while !d.stop.load(Ordering::SeqCst) {
                {
                    let _engine = d.engine.lock().expect("engine");
                    if !d.paused.load(Ordering::SeqCst) {
                        seq += 1;
                        let gpa = base + (seq.wrapping_mul(40_503) % pages) * PAGE_SIZE;
                        d.write_page(gpa, seq);
                    }
                }
                std::thread::sleep(Duration::from_micros(pause_us));
            }
        })
    }

    pub fn pause(&self) {
        let engine = self.engine.lock().expect("engine");
        // The device's last DMA lands just before it stops, so the switchover always has a DMA
        // page to claim (it claims only dirty chunks) and its ordering is checked every run.
        let last = self.last_gpa.load(Ordering::Relaxed);
        if last != u64::MAX {
            self.write_page(last, u64::MAX / 2);
        }
        self.paused.store(true, Ordering::SeqCst);
        drop(engine);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn source(self: &Arc<Self>) -> Box<dyn DirtySource> {
        Box::new(FakeDmaSource {
            dev: self.clone(),
            label: "fake-iommu: dev0".into(),
        })
    }
}

struct FakeDmaSource {
    dev: Arc<FakeDma>,
    label: String,
}

impl FakeDmaSource {
    fn report(
        &self,
        range: GpaRange,
        out: &mut DirtyBitmap,
        clear: bool,
    ) -> Result<(), DirtySourceError> {
        report_pages(
            &mut self.dev.dirty.lock().expect("dirty"),
            range,
            out,
            clear,
        )
    }
}

impl DirtySource for FakeDmaSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Dma
    }
    fn label(&self) -> &str {
        &self.label
    }
    fn start(&mut self) -> Result<(), DirtySourceError> {
        self.dev.tracking.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn stop(&mut self) -> Result<(), DirtySourceError> {
        self.dev.tracking.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn sync(&mut self) -> Result<(), DirtySourceError> {
        Ok(())
    }
    fn peek(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<bool, DirtySourceError> {
        self.report(range, out, false)?;
        Ok(true)
    }
    fn claim(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError> {
        self.dev
            .claims
            .lock()
            .expect("claims")
            .push((self.dev.is_paused(), range));
        self.report(range, out, true)
    }
}
