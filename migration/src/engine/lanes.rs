//! Source-side sending: one writer thread per connection ("lane") fed through a bounded queue.
//! The pass thread claims dirty pages and queues them as tentative batches; each lane's batches
//! have their pages read (zero check, sums: `MemoryBatch::resolve`) just before they are sent —
//! on a lane that copies page data, by its read-ahead helper while the lane sends the batch
//! before; otherwise, or when a batch comes alone, by the lane itself — so N connections read and
//! send in parallel and the pass thread never waits on guest memory.
//! Batches are recycled through a free list so no 4 MiB buffer is allocated per frame.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::dirty::GuestPageBitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, VolatileMemoryError,
    WriteVolatile,
};

use crate::protocol::{DeviceMark, Frame, FrameWriter, MemoryEntry, PageEncoding};
use crate::transport::vectored::{write_all_vectored, PlainSocket};
use crate::transport::{send_file_range, Connection, RateLimiter, SendFileError};

use super::error::MigrationError;
use super::pages::{BatchMode, MemoryBatch};
use super::read_ahead::ReadAhead;
use super::stats::MigrationStats;

/// Control frames the main thread queues behind memory on a lane.
#[derive(Debug)]
pub enum OwnedFrame {
    /// VM state.
    VmState(Vec<u8>),
    /// vCPU state.
    Vcpu(u32, Vec<u8>),
    /// Device state.
    Device(String, Vec<u8>),
    /// End of migration.
    Complete,
    /// The source stopped for good: the destination may run the VM.
    Commit,
    /// End of a data connection.
    StreamEnd,
    /// A piece of a device's data stream.
    DeviceData(String, Vec<u8>),
    /// A point in a device's data stream.
    DeviceMark(String, DeviceMark),
    /// The memory the first pass will send as data.
    Populated(Vec<MemoryEntry>),
}

impl OwnedFrame {
    fn as_frame(&self) -> Frame<'_> {
        match self {
            OwnedFrame::VmState(b) => Frame::VmState(b),
            OwnedFrame::Vcpu(id, b) => Frame::VcpuState { id: *id, bytes: b },
            OwnedFrame::Device(id, b) => Frame::DeviceState { id, bytes: b },
            OwnedFrame::Complete => Frame::Complete,
            OwnedFrame::Commit => Frame::Commit,
            OwnedFrame::StreamEnd => Frame::StreamEnd,
            OwnedFrame::DeviceData(id, b) => Frame::DeviceData { id, bytes: b },
            OwnedFrame::DeviceMark(id, mark) => Frame::DeviceMark { id, mark: *mark },
            OwnedFrame::Populated(entries) => Frame::Populated(entries.clone()),
        }
    }
}

#[derive(Debug)]
enum LaneItem {
    Memory(MemoryBatch),
    Frame(OwnedFrame),
    Flush(Sender<()>),
}

/// Shared by all lanes: set on failure so workers drop queued memory and lane 0 sends the reason.
#[derive(Debug, Default)]
struct Abort {
    flag: std::sync::atomic::AtomicBool,
    reason: std::sync::Mutex<Option<String>>,
}

impl Abort {
    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug, Default)]
struct LaneCounters {
    /// Last progress, in ms since the lanes' epoch.
    activity_ms: AtomicU64,
    bytes: AtomicU64,
    busy_ns: AtomicU64,
    /// Memory bytes queued on the lane and not written yet.
    queued: AtomicU64,
}

#[derive(Debug)]
struct Lane {
    tx: Option<SyncSender<LaneItem>>,
    handle: Option<JoinHandle<Result<(), MigrationError>>>,
    conn: Connection,
    counters: Arc<LaneCounters>,
    sample: RateSample,
}

/// The lane's write rate over its latest samples of [`RATE_SAMPLE_BYTES`]: (bytes, busy ns)
/// where the current sample began, and the rates of the last [`RATE_SAMPLES`] (0 = none yet).
#[derive(Debug, Default)]
struct RateSample {
    bytes: u64,
    ns: u64,
    rates: [u64; RATE_SAMPLES],
    next: usize,
}

/// Samples the rate is the least of: the switchover gets the rate the link gives it then, and
/// on a host whose cores the guest, the VMM and the destination share that swings by 2-3x from
/// one MiB to the next; a promise takes the low end of what was just seen.
const RATE_SAMPLES: usize = 4;

/// Least data a rate sample covers. The switchover sends scattered dirty pages, an entry (and,
/// without page checksums, a write) each; iteration 0's long runs go several times faster per
/// byte, so a rate averaged over the whole migration promised a switchover faster than it was
/// (a 256 MiB hot set, no cap: 7-12 ms against an estimate of 4). The latest samples come from
/// the pre-copy passes, which look like the switchover.
const RATE_SAMPLE_BYTES: u64 = 1 << 20;

/// The sending side of all connections.
#[derive(Debug)]
pub struct Lanes {
    lanes: Vec<Lane>,
    free_tx: Sender<MemoryBatch>,
    free_rx: Receiver<MemoryBatch>,
    stats: Arc<MigrationStats>,
    abort: Arc<Abort>,
    /// Batches of every lane carry their pages this way.
    batch_mode: BatchMode,
    /// Give up when no lane made progress for this long (the destination stopped reading
    /// without closing); the phase names it in the error.
    stall: Option<(Duration, &'static str)>,
    epoch: Instant,
}

/// Queues frames on one lane from another thread (the switchover's device stream, read while the
/// main thread queues the final memory pass on the other lanes).
#[derive(Debug)]
pub struct LaneSender {
    index: usize,
    tx: SyncSender<LaneItem>,
    counters: Arc<LaneCounters>,
    epoch: Instant,
    stall: Option<(Duration, &'static str)>,
}

impl LaneSender {
    /// Queues `f`, waiting while the lane is full; fails when the lane is gone or made no
    /// progress within the stall limit.
    pub fn send_frame(&self, f: OwnedFrame) -> Result<(), MigrationError> {
        let gone = |detail: String| MigrationError::Lane {
            index: self.index,
            source: Box::new(MigrationError::PeerGone {
                peer: "destination",
                during: self.stall.map_or("sending device state", |s| s.1),
                detail,
            }),
        };
        let mut item = LaneItem::Frame(f);
        loop {
            match self.tx.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Disconnected(_)) => return Err(gone("lane closed".into())),
                Err(TrySendError::Full(back)) => {
                    let last = self.counters.activity_ms.load(Ordering::Relaxed);
                    if let Some(e) = stalled(self.stall, self.epoch, last) {
                        return Err(MigrationError::Lane {
                            index: self.index,
                            source: Box::new(e),
                        });
                    }
                    item = back;
                    std::thread::sleep(POLL);
                }
            }
        }
    }
}

/// The stall error when the last progress (`last_ms` since `epoch`) is older than the stall limit.
fn stalled(
    stall: Option<(Duration, &'static str)>,
    epoch: Instant,
    last_ms: u64,
) -> Option<MigrationError> {
    let (limit, during) = stall?;
    let idle = ms_since(epoch).saturating_sub(last_ms);
    (u128::from(idle) >= limit.as_millis()).then(|| MigrationError::PeerGone {
        peer: "destination",
        during,
        detail: format!("it took no data for {} s", limit.as_secs()),
    })
}

/// Queue depth per lane: enough to keep the socket busy while the next batch is read.
const QUEUE_DEPTH: usize = 3;
const POLL: Duration = Duration::from_micros(200);

struct LaneCtx {
    index: usize,
    epoch: Instant,
    mem: GuestMemoryMmap<GuestPageBitmap>,
    free: Sender<MemoryBatch>,
    rate: Arc<RateLimiter>,
    counters: Arc<LaneCounters>,
    stats: Arc<MigrationStats>,
    abort: Arc<Abort>,
}

/// Sleep off a rate-limit debt in slices so an abort is noticed quickly.
fn pace(ctx: &LaneCtx, bytes: u64) {
    let mut left = ctx.rate.reserve(bytes);
    while !left.is_zero() && !ctx.abort.is_set() {
        let step = left.min(Duration::from_millis(20));
        std::thread::sleep(step);
        left -= step;
        // Waiting for the cap is progress, not a stall.
        ctx.touch();
    }
}

impl LaneCtx {
    fn touch(&self) {
        self.counters
            .activity_ms
            .store(ms_since(self.epoch), Ordering::Relaxed);
    }
}

/// The item after the one a lane is writing, taken off its queue early so the pages of a memory
/// batch are read (by [`ReadAhead`]) while the current batch is on the wire.
#[derive(Debug)]
enum Ahead {
    /// A memory batch the read-ahead helper holds; what the queue counted for it.
    Reading { queued: u64 },
    /// Anything else, kept in queue order.
    Item(LaneItem),
}

/// Takes the lane's next item off the queue if there is one already, handing a memory batch to
/// the read-ahead helper (the lane keeps it when there is no helper thread).
fn look_ahead(rx: &Receiver<LaneItem>, read_ahead: &mut ReadAhead) -> Option<Ahead> {
    Some(match rx.try_recv().ok()? {
        LaneItem::Memory(b) => {
            let queued = b.wire_bytes();
            match read_ahead.submit(b) {
                Ok(()) => Ahead::Reading { queued },
                Err(b) => Ahead::Item(LaneItem::Memory(b)),
            }
        }
        item => Ahead::Item(item),
    })
}

fn lane_main(
    mut w: FrameWriter<Connection>,
    rx: Receiver<LaneItem>,
    ctx: LaneCtx,
) -> Result<(), MigrationError> {
    let mut pages = PageData::new(w.get_mut(), &ctx.mem);
    let mut read_ahead = ReadAhead::new(ctx.index, ctx.mem.clone());
    let mut ahead = None;
    loop {
        if ctx.abort.is_set() {
            if ctx.index == 0 {
                let reason = ctx.abort.reason.lock().map(|r| r.clone()).unwrap_or(None);
                if let Some(text) = reason {
                    // Between frames by construction, so the Error frame is well formed.
                    let _ = w.send(&Frame::Error(&text));
                }
            }
            return Ok(());
        }
        let started = Instant::now();
        let (item, read_queued) = match ahead.take() {
            Some(Ahead::Reading { queued }) => (LaneItem::Memory(read_ahead.take()?), Some(queued)),
            Some(Ahead::Item(item)) => (item, None),
            None => match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(item) => (item, None),
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                // Closed with an abort pending: loop once more so lane 0 still sends the reason.
                Err(mpsc::RecvTimeoutError::Disconnected) if ctx.abort.is_set() => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            },
        };
        match item {
            LaneItem::Memory(mut b) => {
                // What the queue counted (an estimate for a stream batch until it is resolved).
                let queued = read_queued.unwrap_or_else(|| b.wire_bytes());
                // A batch the helper did not read, the lane reads itself (a no-op for one the
                // helper read). Waiting for the helper counts as the lane's busy time.
                let t = if read_queued.is_some() {
                    started
                } else {
                    Instant::now()
                };
                b.resolve(&ctx.mem)?;
                let wire = b.wire_bytes();
                let resolve_ns = t.elapsed().as_nanos();
                // Only a lane that copies page data has work to hand over: with `sendfile` its
                // thread barely touches the pages, and on a Unix socket (same host) a helper
                // would take CPU from the destination's copy, the bound there (unix, sums
                // on: 0.83-1.04 of raw with the helper, 0.96-1.31 without).
                if pages.copies() {
                    ahead = look_ahead(&rx, &mut read_ahead);
                }
                pace(&ctx, wire);
                if ctx.abort.is_set() {
                    continue;
                }
                let t = Instant::now();
                let n = send_batch(&mut w, &mut pages, &b, &ctx)?;
                let ns = u64::try_from(t.elapsed().as_nanos() + resolve_ns).unwrap_or(u64::MAX);
                ctx.counters.busy_ns.fetch_add(ns, Ordering::Relaxed);
                ctx.counters.bytes.fetch_add(n, Ordering::Relaxed);
                ctx.counters.queued.fetch_sub(queued, Ordering::Relaxed);
                ctx.touch();
                ctx.stats.add_transferred(n);
                ctx.stats.add_pages(b.data_pages(), b.zero_pages);
                if read_queued.is_some() {
                    ctx.stats.add_read_ahead(b.data_pages() + b.zero_pages);
                }
                b.clear();
                // The main thread may be gone (failure path); then the batch is just dropped.
                let _ = ctx.free.send(b);
            }
            LaneItem::Frame(f) => {
                let n = w
                    .send(&f.as_frame())
                    .map_err(|source| MigrationError::Protocol {
                        during: "sending state",
                        source,
                    })?;
                ctx.touch();
                ctx.stats.add_transferred(n);
            }
            LaneItem::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Entries shorter than this are written with their neighbours by one `writev` even where
/// `sendfile` could send them: a call per scattered page costs more than the copy it saves.
const SENDFILE_MIN_BYTES: u64 = 64 << 10;

/// How a lane sends page data: on a Unix socket long runs by the kernel from the guest memory
/// file (`sendfile`) while the file allows it, else (and scattered pages always) copied from the
/// mapping by `writev`.
///
/// Not on TCP: over loopback `sendfile` there cost more CPU than the copy it saves (0.57-0.64
/// against 0.34-0.41 CPU s/GB for both ends, 0.58-0.62 of a raw copy's rate against 0.84-0.9,
/// `cargo bench -p tern-migration --bench throughput`), and a NIC's case could not be measured
/// here; on Unix it halves the source's work (see `transport::sendfile`).
#[derive(Debug)]
struct PageData {
    from_file: bool,
}

impl PageData {
    fn new(conn: &Connection, mem: &GuestMemoryMmap<GuestPageBitmap>) -> Self {
        PageData {
            from_file: conn.as_unix().is_some() && mem.iter().all(|r| r.file_offset().is_some()),
        }
    }

    /// True when page data is copied from the mapping, not sent by the kernel.
    fn copies(&self) -> bool {
        !self.from_file
    }

    /// Has the kernel send `len` bytes of guest memory at `gpa` (inside one region) from the
    /// memory file; false when there is no file to send from, or `sendfile` refused it (then
    /// this lane copies from now on): the caller copies those bytes.
    fn send_from_file(
        &mut self,
        conn: &Connection,
        mem: &GuestMemoryMmap<GuestPageBitmap>,
        gpa: GuestAddress,
        len: u64,
    ) -> Result<bool, MigrationError> {
        let file = mem.find_region(gpa).and_then(|r| {
            let at = r.to_region_addr(gpa)?;
            r.file_offset().map(|f| (f.file(), f.start() + at.0))
        });
        let (Some((file, offset)), Some(sock)) = (file, conn.as_unix()) else {
            return Ok(false);
        };
        match send_file_range(sock.as_fd(), file, offset, len) {
            Ok(()) => Ok(true),
            Err(SendFileError::Unsupported(e)) => {
                log::info!("page data copied from now on: sendfile refused: {e}");
                self.from_file = false;
                Ok(false)
            }
            Err(SendFileError::Failed { sent, source }) => {
                log::debug!("sendfile failed after {sent} of {len} bytes");
                Err(MigrationError::PageData {
                    direction: "send",
                    gpa: gpa.0,
                    len_bytes: len,
                    source: VolatileMemoryError::IOError(source),
                })
            }
        }
    }

    /// Sends the `Data` entries' pages in order; returns the bytes the kernel sent from the
    /// file (`sendfile`, entries of [`SENDFILE_MIN_BYTES`] or more). The rest are copied: on a
    /// plain socket by one `writev` per
    /// [`MAX_IOVECS`](crate::transport::vectored::MAX_IOVECS) entries (see
    /// [`crate::transport::vectored`]), over TLS an entry at a time.
    fn send_entries<'e>(
        &mut self,
        conn: &mut Connection,
        mem: &GuestMemoryMmap<GuestPageBitmap>,
        entries: impl Iterator<Item = &'e MemoryEntry>,
    ) -> Result<u64, MigrationError> {
        let mut from_file = 0;
        let mut run = Vec::new();
        let mut run_gpa = 0;
        for e in entries {
            let len = e.len_bytes();
            if self.from_file && len >= SENDFILE_MIN_BYTES {
                write_run(conn, &mut run, run_gpa)?;
                if self.send_from_file(conn, mem, e.gpa, len)? {
                    from_file += len;
                    continue;
                }
            }
            if run.is_empty() {
                run_gpa = e.gpa.0;
            }
            run.push(mem.get_slice(e.gpa, len as usize).map_err(|source| {
                MigrationError::GuestMemory {
                    gpa: e.gpa.0,
                    len_bytes: len,
                    source,
                }
            })?);
        }
        write_run(conn, &mut run, run_gpa)?;
        Ok(from_file)
    }
}

/// Writes `run` (scattered guest memory, the first slice at `gpa`) and empties it: by
/// `writev` on a plain socket, slice by slice through TLS.
fn write_run<B: vm_memory::bitmap::BitmapSlice>(
    conn: &mut Connection,
    run: &mut Vec<vm_memory::VolatileSlice<'_, B>>,
    gpa: u64,
) -> Result<(), MigrationError> {
    let failed = |source| MigrationError::PageData {
        direction: "send",
        gpa,
        len_bytes: run.iter().map(|s| s.len() as u64).sum(),
        source,
    };
    let written = match conn.plain_socket() {
        Some(socket) => write_all_vectored(socket, run).map_err(VolatileMemoryError::IOError),
        None => run.iter().try_for_each(|s| conn.write_all_volatile(s)),
    };
    written.map_err(failed)?;
    run.clear();
    Ok(())
}

/// A resolved batch as a stream frame: header, entry table and sums (if any), then each `Data`
/// entry straight from guest memory to the socket.
fn send_batch(
    w: &mut FrameWriter<Connection>,
    pages: &mut PageData,
    b: &MemoryBatch,
    ctx: &LaneCtx,
) -> Result<u64, MigrationError> {
    let head = w
        .send_memory_head(&b.entries, &b.sums, b.data_len)
        .map_err(|source| MigrationError::Protocol {
            during: "sending memory",
            source,
        })?;
    let data = b
        .entries
        .iter()
        .filter(|e| e.encoding == PageEncoding::Data);
    let from_file = pages.send_entries(w.get_mut(), &ctx.mem, data)?;
    ctx.stats.add_sent_from_file(from_file);
    Ok(head + b.data_len as u64)
}

impl Lanes {
    /// Start one writer thread per connection (after the handshake).
    pub fn start(
        conns: Vec<Connection>,
        mem: &GuestMemoryMmap<GuestPageBitmap>,
        page_sums: bool,
        rate: Arc<RateLimiter>,
        stats: Arc<MigrationStats>,
    ) -> Result<Self, MigrationError> {
        let (free_tx, free_rx) = mpsc::channel();
        let abort = Arc::new(Abort::default());
        let epoch = Instant::now();
        let mut lanes = Vec::new();
        for (i, conn) in conns.into_iter().enumerate() {
            let writer = conn.try_clone().map_err(MigrationError::Transport)?;
            let (tx, rx) = mpsc::sync_channel(QUEUE_DEPTH);
            let counters = Arc::new(LaneCounters::default());
            let ctx = LaneCtx {
                index: i,
                epoch,
                mem: mem.clone(),
                free: free_tx.clone(),
                rate: rate.clone(),
                counters: counters.clone(),
                stats: stats.clone(),
                abort: abort.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("tern-mig-lane{i}"))
                .spawn(move || lane_main(FrameWriter::new(writer), rx, ctx))
                .map_err(|source| {
                    MigrationError::Transport(crate::transport::TransportError::Socket {
                        what: "spawn lane thread",
                        source,
                    })
                })?;
            lanes.push(Lane {
                tx: Some(tx),
                handle: Some(handle),
                conn,
                counters,
                sample: RateSample::default(),
            });
        }
        Ok(Lanes {
            lanes,
            free_tx,
            free_rx,
            stats,
            abort,
            batch_mode: if page_sums {
                BatchMode::StreamSummed
            } else {
                BatchMode::Stream
            },
            stall: None,
            epoch,
        })
    }

    /// Number of lanes.
    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// A cleared batch from the free list, or a new one.
    pub fn batch(&self) -> MemoryBatch {
        self.free_rx
            .try_recv()
            .unwrap_or_else(|_| MemoryBatch::with_mode(self.batch_mode))
    }

    /// Return an unused batch to the free list.
    pub fn recycle(&self, mut b: MemoryBatch) {
        b.clear();
        let _ = self.free_tx.send(b);
    }

    /// Aggregate link bandwidth: per lane, bytes over time spent writing (waits on the cap
    /// excluded), the least of its latest samples of at least [`RATE_SAMPLE_BYTES`] — until it
    /// has one, over everything it wrote.
    pub fn bandwidth_bytes_per_sec(&mut self) -> u64 {
        let rate = |bytes: u64, ns: u64| {
            if ns == 0 {
                0
            } else {
                u64::try_from(u128::from(bytes) * 1_000_000_000 / u128::from(ns))
                    .unwrap_or(u64::MAX)
            }
        };
        self.lanes
            .iter_mut()
            .map(|l| {
                let b = l.counters.bytes.load(Ordering::Relaxed);
                let ns = l.counters.busy_ns.load(Ordering::Relaxed);
                let s = &mut l.sample;
                let (db, dns) = (b.saturating_sub(s.bytes), ns.saturating_sub(s.ns));
                if db >= RATE_SAMPLE_BYTES && dns > 0 {
                    s.rates[s.next % RATE_SAMPLES] = rate(db, dns);
                    s.next += 1;
                    s.bytes = b;
                    s.ns = ns;
                }
                match s.rates.iter().filter(|&&r| r != 0).min() {
                    Some(&r) => r,
                    None => rate(b, ns),
                }
            })
            .sum()
    }

    /// The error a dead lane thread ended with.
    fn lane_error(&mut self, i: usize) -> MigrationError {
        let lane = &mut self.lanes[i];
        lane.tx = None;
        let err = match lane.handle.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => MigrationError::Panicked,
            _ => MigrationError::PeerGone {
                peer: "destination",
                during: "sending memory",
                detail: "lane closed".to_owned(),
            },
        };
        MigrationError::Lane {
            index: i,
            source: Box::new(err),
        }
    }

    /// Fail queue waits when no lane made progress (wrote a frame, or paced under the bandwidth
    /// cap) for `limit`: a destination that stops reading without closing would otherwise stall
    /// the source forever. `phase` names it in the error.
    pub fn set_stall_limit(&mut self, limit: Duration, phase: &'static str) {
        self.stall = Some((limit, phase));
        let now = ms_since(self.epoch);
        for l in &self.lanes {
            l.counters.activity_ms.store(now, Ordering::Relaxed);
        }
    }

    fn check_stall(&self) -> Result<(), MigrationError> {
        let last = self
            .lanes
            .iter()
            .map(|l| l.counters.activity_ms.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        stalled(self.stall, self.epoch, last).map_or(Ok(()), Err)
    }

    fn push(
        &mut self,
        i: usize,
        mut item: LaneItem,
        cancellable: bool,
    ) -> Result<(), MigrationError> {
        loop {
            let Some(tx) = self.lanes[i].tx.as_ref() else {
                return Err(self.lane_error(i));
            };
            match tx.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Disconnected(_)) => return Err(self.lane_error(i)),
                Err(TrySendError::Full(back)) => {
                    if cancellable && self.stats.cancel_requested() {
                        return Err(MigrationError::Cancelled);
                    }
                    self.check_stall()?;
                    item = back;
                    std::thread::sleep(POLL);
                }
            }
        }
    }

    /// Queue a memory batch on lane `i`.
    pub fn send_batch(&mut self, i: usize, b: MemoryBatch) -> Result<(), MigrationError> {
        let wire = b.wire_bytes();
        let counters = self.lanes[i].counters.clone();
        counters.queued.fetch_add(wire, Ordering::Relaxed);
        let r = self.push(i, LaneItem::Memory(b), true);
        if r.is_err() {
            counters.queued.fetch_sub(wire, Ordering::Relaxed);
        }
        r
    }

    /// A sender for lane `i` usable from another thread (`None` when the lane is gone).
    pub fn sender(&self, i: usize) -> Option<LaneSender> {
        let lane = self.lanes.get(i)?;
        Some(LaneSender {
            index: i,
            tx: lane.tx.clone()?,
            counters: lane.counters.clone(),
            epoch: self.epoch,
            stall: self.stall,
        })
    }

    /// Memory bytes queued on the lanes and not written yet: the switchover's data waits behind
    /// them, so they count in its downtime.
    pub fn queued_bytes(&self) -> u64 {
        self.lanes
            .iter()
            .map(|l| l.counters.queued.load(Ordering::Relaxed))
            .sum()
    }

    /// Queue a control frame on lane `i`.
    pub fn send_frame(&mut self, i: usize, f: OwnedFrame) -> Result<(), MigrationError> {
        self.push(i, LaneItem::Frame(f), false)
    }

    /// Wait until every lane has written everything queued so far.
    pub fn flush(&mut self, cancellable: bool) -> Result<(), MigrationError> {
        self.flush_until(cancellable, None).map(|_| ())
    }

    /// [`Lanes::flush`], giving up waiting at `deadline`; whether everything was written.
    pub fn flush_until(
        &mut self,
        cancellable: bool,
        deadline: Option<Instant>,
    ) -> Result<bool, MigrationError> {
        let mut waits = Vec::new();
        for i in 0..self.lanes.len() {
            let (tx, rx) = mpsc::channel();
            self.push(i, LaneItem::Flush(tx), cancellable)?;
            waits.push((i, rx));
        }
        for (i, rx) in waits {
            loop {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(()) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Err(self.lane_error(i)),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if cancellable && self.stats.cancel_requested() {
                            return Err(MigrationError::Cancelled);
                        }
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            return Ok(false);
                        }
                        self.check_stall()?;
                    }
                }
            }
        }
        Ok(true)
    }

    /// Close every lane. With `error`, queued memory is dropped and lane 0 sends the Error frame
    /// next; lanes get up to `grace` to finish, then the sockets are shut so no thread stays
    /// blocked, and all are joined.
    pub fn close(mut self, error: Option<String>, grace: Duration) {
        if let Some(text) = error {
            if let Ok(mut r) = self.abort.reason.lock() {
                *r = Some(text);
            }
            self.abort.flag.store(true, Ordering::SeqCst);
        }
        for l in &mut self.lanes {
            l.tx = None;
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline
            && self
                .lanes
                .iter()
                .any(|l| l.handle.as_ref().is_some_and(|h| !h.is_finished()))
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        for l in &mut self.lanes {
            l.conn.shutdown();
            if let Some(h) = l.handle.take() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::PAGE_SIZE;
    use std::io::Read;
    use vm_memory::Bytes;

    /// 1,200 scattered pages (every other page) leave in two `writev` calls (1,024 entries
    /// each at most), not a write per page, and in entry order.
    #[test]
    fn scattered_pages_leave_in_a_few_writes() {
        let mem: GuestMemoryMmap<GuestPageBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2400 * PAGE_SIZE as usize)])
                .expect("memory");
        let mut entries = Vec::new();
        let mut want = Vec::new();
        for i in 0..1200u64 {
            let gpa = GuestAddress(i * 2 * PAGE_SIZE);
            let page = [(i % 251) as u8 + 1; PAGE_SIZE as usize];
            mem.write_slice(&page, gpa).expect("fill");
            entries.push(MemoryEntry {
                gpa,
                npages: 1,
                encoding: PageEncoding::Data,
            });
            want.extend_from_slice(&page);
        }
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).expect("receive");
            got
        });
        let mut conn = Connection::Unix(a);
        // Anonymous memory has no file: every page is copied.
        let mut pages = PageData::new(&conn, &mem);
        let (_, writes) = crate::transport::vectored::thread_io_calls();
        let from_file = pages
            .send_entries(&mut conn, &mem, entries.iter())
            .expect("send");
        let writes = crate::transport::vectored::thread_io_calls().1 - writes;
        drop(conn);
        assert_eq!(from_file, 0);
        assert!(writes <= 4, "{writes} writes for 1,200 pages");
        assert!(reader.join().expect("reader") == want, "pages out of order");
    }
}
