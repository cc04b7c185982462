//! Pages re-sent with per-chunk read-and-clear of a DMA dirty source just before the chunk is sent
//! (what tern does) vs reading-and-clearing the whole DMA bitmap at the start of each pass (the
//! classic way), measured on the **real engine**: a 512 MiB guest migrates over a Unix socket to an
//! in-process destination while a fake passthrough device rewrites a 4 MiB hot set at 64 MiB/s.
//!
//! The device is a thread writing guest pages through its own mapping of the guest's memory file
//! (neither the KVM log nor the VMM's write bitmap sees those writes) and setting a bit per page in
//! its own "IOMMU dirty bitmap", which a DMA [`DirtySource`] exposes:
//! - `per-chunk` (a): `claim` reads-and-clears the chunk's bits when the engine claims the chunk,
//!   right before reading its pages; `peek` reads without clearing (the plan).
//! - `read-at-start` (b): [`ReadAtStart`] wraps the same source; at each pass's `sync` it
//!   reads-and-clears the WHOLE bitmap into a snapshot and serves the pass's peeks and chunk
//!   claims from that snapshot. A device write after the snapshot waits for the next pass even if
//!   its chunk had not been sent yet.
//!
//! The hot set is scattered over the whole guest (every 64 MiB chunk holds 128 hot pages) or
//! contiguous (one chunk). The link is capped at 4 Gbit/s, so the full pass takes about a second
//! and the device rewrites the hot set many times meanwhile. The guest has no vCPUs: the device is
//! the only writer. Every run ends by comparing the destination's memory with the source's, byte
//! for byte: the bench panics if the migration lost a write.
//!
//! Run: `cargo bench -p tern-migration --bench dma_clear_timing`

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::dma::{device_view, report_pages, DeviceView};
use common::{
    assert_same_memory, config_bytes, expected_state, shared_memory_of, sock_path, FakeFactory, Mem,
};
use tern_migration::dirty::GuestPageBitmap;
use tern_migration::dirty::{
    DirtyBitmap, DirtySource, DirtySourceError, GpaRange, SourceKind, PAGE_SIZE,
};
use tern_migration::engine::{
    error_chain, receive_on, start_send, HostError, MigrationHost, MigrationState, MigrationStats,
    MigrationStatus, PassKind, SendParams, TimeoutStrategy,
};
use tern_migration::transport::{MigrationListener, MigrationUrl};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GUEST_BYTES: u64 = 512 << 20;
const GUEST_PAGES: u64 = GUEST_BYTES / PAGE_SIZE;
const HOT_PAGES: u64 = (4 << 20) / PAGE_SIZE;
/// The device's write rate: 64 MiB/s of 4 KiB page writes.
const DEVICE_PAGES_PER_SEC: f64 = (64 << 20) as f64 / PAGE_SIZE as f64;
/// Link cap (4 Gbit/s = 500 MB/s): a full pass takes ~1.1 s.
const LINK_MBPS: u64 = 4000;
/// Downtime target: above one dirty pass's leftovers (~1–2 ms), below the whole hot set (~9 ms).
const DOWNTIME_MS: u64 = 6;
const RUNS: usize = 7;
const LABEL: &str = "bench-iommu: dev0";

/// The fake passthrough device: its own mapping of guest memory and an IOMMU-like dirty bitmap
/// (one bit per guest page, set after each write while tracking is on).
struct Device {
    view: DeviceView,
    dirty: Vec<AtomicU64>,
    tracking: AtomicBool,
    paused: AtomicBool,
    stop: AtomicBool,
    /// Held while the device writes; `pause` takes it once so no write is in flight afterwards.
    engine: Mutex<()>,
    writes: AtomicU64,
}

impl Device {
    fn new(mem: &Mem) -> Arc<Self> {
        Arc::new(Device {
            view: device_view(mem),
            dirty: (0..GUEST_PAGES.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            tracking: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            engine: Mutex::new(()),
            writes: AtomicU64::new(0),
        })
    }

    /// One DMA write: a stamp that changes the page's bytes, then the dirty bit.
    fn write_page(&self, page: u64, seq: u64) {
        let gpa = page * PAGE_SIZE;
        let stamp: Vec<u8> = [gpa, seq, !seq, 0xd0a_d0a]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        self.view
            .write_slice(&stamp, GuestAddress(gpa + (seq % 120) * 32))
            .expect("device write");
        if self.tracking.load(Ordering::SeqCst) {
            self.dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::SeqCst);
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Run the DMA engine: random pages of `hot` at [`DEVICE_PAGES_PER_SEC`], paced by the clock
    /// (bursts every 200 µs).
    fn start(self: &Arc<Self>, hot: Vec<u64>) -> JoinHandle<()> {
        let d = self.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut done = 0u64;
            let mut rng = 0x9e37_79b9_7f4a_7c15u64;
            while !d.stop.load(Ordering::SeqCst) {
                {
                    let _engine = d.engine.lock().expect("engine");
                    if !d.paused.load(Ordering::SeqCst) {
                        let due = (t0.elapsed().as_secs_f64() * DEVICE_PAGES_PER_SEC) as u64;
                        while done < due {
                            rng ^= rng << 13;
                            rng ^= rng >> 7;
                            rng ^= rng << 17;
                            done += 1;
                            d.write_page(hot[(rng % hot.len() as u64) as usize], done);
                        }
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    }

    fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        drop(self.engine.lock().expect("engine"));
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// OR the bits of `range` into `out`, clearing each bit it reports when `clear`.
    fn report(
        &self,
        range: GpaRange,
        out: &mut DirtyBitmap,
        clear: bool,
    ) -> Result<(), DirtySourceError> {
        let out_err = |source| DirtySourceError::OutputBitmap {
            kind: SourceKind::Dma,
            range,
            source,
        };
        let first = range.start.0 / PAGE_SIZE;
        let end = (first + range.pages()).min(GUEST_PAGES);
        if first >= end {
            return Ok(());
        }
        let out_first = out.page_of(range.start).map_err(out_err)?;
        for w in first / 64..=(end - 1) / 64 {
            let lo = (w * 64).max(first);
            let hi = (w * 64 + 64).min(end);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << (lo % 64)
            };
            let word = &self.dirty[w as usize];
            let mut bits = if clear {
                word.fetch_and(!mask, Ordering::SeqCst)
            } else {
                word.load(Ordering::SeqCst)
            } & mask;
            while bits != 0 {
                let page = w * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                out.set(out_first + page - first).map_err(out_err)?;
            }
        }
        Ok(())
    }
}

/// (a) The DMA source as tern drives it: `claim` reads-and-clears the chunk right before it is
/// sent, `peek` reads without clearing.
struct PerChunk(Arc<Device>);

impl DirtySource for PerChunk {
    fn kind(&self) -> SourceKind {
        SourceKind::Dma
    }
    fn label(&self) -> &str {
        LABEL
    }
    fn start(&mut self) -> Result<(), DirtySourceError> {
        self.0.tracking.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn stop(&mut self) -> Result<(), DirtySourceError> {
        self.0.tracking.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn sync(&mut self) -> Result<(), DirtySourceError> {
        Ok(())
    }
    fn peek(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<bool, DirtySourceError> {
        self.0.report(range, out, false)?;
        Ok(true)
    }
    fn claim(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError> {
        self.0.report(range, out, true)
    }
}

/// (b) Read-at-iteration-start, as a generic adapter: at each pass's `sync` (the engine calls it
/// once per pass, before planning) read-and-clear the inner source over every region into a
/// snapshot; the pass's peeks and claims see only that snapshot. Writes after the snapshot stay
/// at the inner source for the next pass, so nothing is lost: they are just sent later.
struct ReadAtStart {
    inner: Box<dyn DirtySource>,
    regions: Vec<GpaRange>,
    /// Dirty GPAs read at the start of the pass and not yet claimed.
    snapshot: BTreeSet<u64>,
}

impl ReadAtStart {
    fn report(
        &mut self,
        range: GpaRange,
        out: &mut DirtyBitmap,
        clear: bool,
    ) -> Result<(), DirtySourceError> {
        report_pages(&mut self.snapshot, range, out, clear)
    }
}

impl DirtySource for ReadAtStart {
    fn kind(&self) -> SourceKind {
        self.inner.kind()
    }
    fn label(&self) -> &str {
        self.inner.label()
    }
    fn start(&mut self) -> Result<(), DirtySourceError> {
        self.inner.start()
    }
    fn stop(&mut self) -> Result<(), DirtySourceError> {
        self.inner.stop()
    }
    fn sync(&mut self) -> Result<(), DirtySourceError> {
        self.inner.sync()?;
        for &r in &self.regions {
            let mut all = DirtyBitmap::new(r.start, r.len_bytes).map_err(|source| {
                DirtySourceError::OutputBitmap {
                    kind: SourceKind::Dma,
                    range: r,
                    source,
                }
            })?;
            self.inner.claim(r, &mut all)?;
            self.snapshot
                .extend(all.iter_pages().map(|p| r.start.0 + p * PAGE_SIZE));
        }
        Ok(())
    }
    fn peek(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<bool, DirtySourceError> {
        self.report(range, out, false)?;
        Ok(true)
    }
    fn claim(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError> {
        self.report(range, out, true)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    PerChunk,
    ReadAtStart,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::PerChunk => "(a) per-chunk",
            Variant::ReadAtStart => "(b) read-at-start",
        }
    }
}

/// The source VM: guest memory, the device, no vCPUs (the device is the only writer).
struct BenchHost {
    mem: Mem,
    dev: Arc<Device>,
    variant: Variant,
}

impl MigrationHost for BenchHost {
    fn guest_memory(&self) -> GuestMemoryMmap<GuestPageBitmap> {
        self.mem.clone()
    }
    fn config(&mut self) -> Result<Vec<u8>, HostError> {
        Ok(config_bytes(&self.mem, 1))
    }
    fn dirty_sources(&mut self) -> Result<Vec<Box<dyn DirtySource>>, HostError> {
        let a: Box<dyn DirtySource> = Box::new(PerChunk(self.dev.clone()));
        Ok(vec![match self.variant {
            Variant::PerChunk => a,
            Variant::ReadAtStart => Box::new(ReadAtStart {
                inner: a,
                regions: vec![GpaRange::new(GuestAddress(0), GUEST_BYTES)],
                snapshot: BTreeSet::new(),
            }),
        }])
    }
    fn populated(&mut self, _: GpaRange, _: &mut DirtyBitmap) -> Result<bool, HostError> {
        Ok(false)
    }
    fn pause(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    fn pause_devices(&mut self) -> Result<(), HostError> {
        self.dev.pause();
        Ok(())
    }
    fn resume(&mut self) -> Result<(), HostError> {
        self.dev.resume();
        Ok(())
    }
    fn save_state(&mut self) -> Result<MigrationState, HostError> {
        Ok(expected_state())
    }
    fn throttle(&mut self, _: u8) -> Result<(), HostError> {
        Ok(())
    }
}

/// The numbers of one migration.
#[derive(Debug, Clone, Copy, Default)]
struct Outcome {
    sent: u64,
    dirty_passes: u64,
    final_pages: u64,
    downtime_ms: u64,
    dma_claimed: u64,
    device_writes: u64,
    /// The engine's bandwidth estimate at the switchover decision, MB/s.
    bandwidth_mb: u64,
}

impl Outcome {
    fn resent(&self) -> u64 {
        self.sent - GUEST_PAGES
    }
}

fn hot_set(scattered: bool) -> Vec<u64> {
    (0..HOT_PAGES)
        .map(|k| {
            if scattered {
                k * (GUEST_PAGES / HOT_PAGES)
            } else {
                GUEST_PAGES / 2 + k
            }
        })
        .collect()
}

/// One migration of `mem` with the device writing `hot`; panics unless it completed and the
/// destination's memory equals the source's.
fn migrate(mem: &Mem, hot: &[u64], variant: Variant) -> Outcome {
    let dev = Device::new(mem);
    let engine = dev.start(hot.to_vec());
    // Let the device reach its rate before the migration starts.
    std::thread::sleep(Duration::from_millis(50));
    let listener = MigrationListener::bind(&MigrationUrl::Unix(sock_path())).expect("bind");
    let url = listener.url().clone();
    let dst = std::thread::spawn(move || {
        let mut f = FakeFactory::default();
        receive_on(&listener, &mut f, &MigrationStats::new())
    });
    let mut p = SendParams::new(url);
    p.max_bandwidth_mbps = LINK_MBPS;
    p.downtime_ms = DOWNTIME_MS;
    p.timeout = Duration::from_secs(20);
    p.timeout_strategy = TimeoutStrategy::Cancel;
    let stats = Arc::new(MigrationStats::new());
    let host = BenchHost {
        mem: mem.clone(),
        dev: dev.clone(),
        variant,
    };
    let out = start_send(Box::new(host), p, stats.clone())
        .expect("spawn")
        .join()
        .expect("source thread");
    dev.stop.store(true, Ordering::SeqCst);
    engine.join().expect("device thread");
    if let Err(e) = &out.result {
        panic!("{}: source failed: {}", variant.name(), error_chain(e));
    }
    let target = match dst.join().expect("destination thread") {
        Ok(t) => t,
        Err(e) => panic!(
            "{}: destination failed: {}",
            variant.name(),
            error_chain(&e)
        ),
    };
    // The device stayed paused since the switchover: the source's memory is final.
    assert_same_memory(mem, &target.guest_memory());
    let s = stats.snapshot();
    assert_eq!(s.status, MigrationStatus::Completed, "{s:?}");
    assert!(
        s.dirty_pages.dma > 0,
        "the device's writes were never claimed"
    );
    assert_eq!(s.history.first().map(|h| h.pass), Some(PassKind::Full));
    let last = s.history.last().expect("history");
    assert_eq!(last.pass, PassKind::Final);
    Outcome {
        sent: s.data_pages + s.zero_pages,
        dirty_passes: s
            .history
            .iter()
            .filter(|h| h.pass == PassKind::Dirty)
            .count() as u64,
        final_pages: last.pages_sent,
        downtime_ms: s.downtime_ms.unwrap_or(0),
        dma_claimed: s.dirty_pages.dma,
        device_writes: dev.writes.load(Ordering::Relaxed),
        bandwidth_mb: s.bandwidth_bytes_per_sec / 1_000_000,
    }
}

/// The median of `f` over the runs (robust to a run slowed down by other load on the host).
fn median(v: &[Outcome], f: impl Fn(&Outcome) -> u64) -> u64 {
    let mut x: Vec<u64> = v.iter().map(f).collect();
    x.sort_unstable();
    x.get(x.len() / 2).copied().unwrap_or(0)
}

fn range(v: &[Outcome], f: impl Fn(&Outcome) -> u64) -> String {
    let lo = v.iter().map(&f).min().unwrap_or(0);
    let hi = v.iter().map(&f).max().unwrap_or(0);
    format!("{lo}–{hi}")
}

fn main() {
    let t0 = Instant::now();
    let mem = shared_memory_of(&[(0, GUEST_BYTES as usize)]);
    // Every page holds data, so the full pass reads and sends all of it.
    for p in 0..GUEST_PAGES {
        mem.write_slice(&(p + 1).to_le_bytes(), GuestAddress(p * PAGE_SIZE))
            .expect("prefill");
    }
    println!(
        "real engine, unix socket capped at {} Mbit/s, 64 MiB chunks, {} ms downtime target: \
         {} MiB guest, a fake device rewrites a {} MiB hot set at {:.0} MiB/s through its own \
         mapping; {} runs per case, destination memory verified equal after each",
        LINK_MBPS,
        DOWNTIME_MS,
        GUEST_BYTES >> 20,
        (HOT_PAGES * PAGE_SIZE) >> 20,
        DEVICE_PAGES_PER_SEC * PAGE_SIZE as f64 / (1 << 20) as f64,
        RUNS
    );
    println!(
        "{:<10} {:<18} {:>4} {:>9} {:>7} {:>6} {:>6} {:>9} {:>8} {:>8}",
        "hot set",
        "variant",
        "run",
        "sent",
        "resent",
        "iters",
        "final",
        "downtime",
        "dma",
        "writes"
    );
    let mut summary = Vec::new();
    for scattered in [true, false] {
        let layout = if scattered { "scattered" } else { "contiguous" };
        let hot = hot_set(scattered);
        let mut results: [Vec<Outcome>; 2] = [Vec::new(), Vec::new()];
        for run in 0..RUNS {
            // Alternate the variants so drift (page cache, CPU frequency) hits both alike.
            for (i, v) in [Variant::PerChunk, Variant::ReadAtStart]
                .into_iter()
                .enumerate()
            {
                let o = migrate(&mem, &hot, v);
                println!(
                    "{:<10} {:<18} {:>4} {:>9} {:>7} {:>6} {:>6} {:>6} ms {:>8} {:>8} {:>8}",
                    layout,
                    v.name(),
                    run + 1,
                    o.sent,
                    o.resent(),
                    o.dirty_passes,
                    o.final_pages,
                    o.downtime_ms,
                    o.dma_claimed,
                    o.device_writes,
                    o.bandwidth_mb
                );
                results[i].push(o);
            }
        }
        summary.push((layout, results));
    }
    println!();
    println!("medians over {RUNS} runs (min–max); pages of 4 KiB; guest = {GUEST_PAGES} pages");
    println!(
        "{:<10} {:<18} {:>11} {:>16} {:>10} {:>16} {:>13}",
        "hot set", "variant", "pages sent", "re-sent", "iters", "final pass", "downtime ms"
    );
    for (layout, results) in &summary {
        for (i, v) in [Variant::PerChunk, Variant::ReadAtStart]
            .into_iter()
            .enumerate()
        {
            let r = &results[i];
            println!(
                "{:<10} {:<18} {:>11} {:>7} {:>8} {:>10} {:>7} {:>8} {:>13}",
                layout,
                v.name(),
                median(r, |o| o.sent),
                median(r, Outcome::resent),
                format!("({})", range(r, Outcome::resent)),
                median(r, |o| o.dirty_passes),
                median(r, |o| o.final_pages),
                format!("({})", range(r, |o| o.final_pages)),
                median(r, |o| o.downtime_ms),
            );
        }
        let ratio = |f: fn(&Outcome) -> u64| {
            median(&results[1], f) as f64 / median(&results[0], f).max(1) as f64
        };
        println!(
            "{:<10} {:<18} {:>11.3} {:>16.3} {:>10} {:>16.3}",
            layout,
            "ratio (b)/(a)",
            ratio(|o| o.sent),
            ratio(Outcome::resent),
            "",
            ratio(|o| o.final_pages),
        );
    }
    println!("total bench time {:.1} s", t0.elapsed().as_secs_f64());
}
