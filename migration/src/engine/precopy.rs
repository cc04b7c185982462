//! The source side: handshake, pre-copy iterations (plan → per-chunk claim of every source into
//! one bitmap → coalesce → send), convergence, switchover, and unwinding on any failure so the
//! source VM keeps running.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::dirty::GuestPageBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::dirty::{
    claim_union, order_for_claims, ClaimUnionError, DirtyBitmap, DirtyRanges, DirtySource,
    GpaRange, SourceKind, PAGE_SIZE,
};
use crate::protocol::{
    read_preamble, write_preamble, Frame, FrameReader, FrameWriter, Hello, MemoryFdInfo,
    ProtocolError,
};
use crate::transport::{send_frame_with_fd, Connection, RateLimiter};

use super::dirty_rate::DirtyRate;
use super::error::{error_chain, MigrationError};
use super::host::{Handover, MigrationHost};
use super::lanes::{Lanes, OwnedFrame};
use super::params::SendParams;
use super::policy::{decide, memory_rate, switchover_ms, AutoConverge, Decision, SwitchoverLoad};
use super::stats::{
    DirtyPagesBySource, IterationRecord, MigrationStats, MigrationStatus, PassKind,
    SwitchoverBreakdown,
};
use super::steps::StepTimes;

mod devices;
mod finish;
mod populated;

use devices::DeviceRun;

/// Allowance for vCPU/VM/device state in the downtime estimate (saved only once paused).
pub const STATE_ESTIMATE_BYTES: u64 = 256 << 10;

/// What the migration thread hands back: the host (resumed on failure) and the result.
#[derive(Debug)]
pub struct MigrationOutcome {
    /// The source VM handle.
    pub host: Box<dyn MigrationHost>,
    /// `Ok` once the destination acknowledged; the source VM stays paused and should exit.
    pub result: Result<(), MigrationError>,
}

impl std::fmt::Debug for dyn MigrationHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationHost")
    }
}

/// Start an outgoing migration on its own thread. Progress is published in `stats`; cancel with
/// [`MigrationStats::cancel`].
pub fn start_send(
    mut host: Box<dyn MigrationHost>,
    params: SendParams,
    stats: Arc<MigrationStats>,
) -> std::io::Result<JoinHandle<MigrationOutcome>> {
    std::thread::Builder::new()
        .name("tern-migrate-src".into())
        .spawn(move || {
            let result = send(host.as_mut(), params, stats);
            MigrationOutcome { host, result }
        })
}

/// Run an outgoing migration on the calling thread.
pub fn send(
    host: &mut dyn MigrationHost,
    params: SendParams,
    stats: Arc<MigrationStats>,
) -> Result<(), MigrationError> {
    let mem = host.guest_memory();
    let regions: Vec<(GuestAddress, u64)> = mem.iter().map(|r| (r.start_addr(), r.len())).collect();
    stats.begin(regions.iter().map(|r| r.1).sum());
    stats.set_downtime_target(params.downtime_ms);
    let mut s = Source {
        host,
        rate: Arc::new(RateLimiter::new(params.max_bandwidth_bytes_per_sec())),
        params,
        stats,
        mem,
        regions,
        sources: Vec::new(),
        sources_started: 0,
        paused: false,
        ac: AutoConverge::default(),
        control: None,
        lanes: None,
        peer: None,
        watcher: None,
        ranges: DirtyRanges::default(),
        last_claims: (0, Duration::ZERO),
        precopy_deadline: None,
        dirty_rate: DirtyRate::default(),
        session: new_session_id(),
        plan: Vec::new(),
        destination_ready: false,
        devices: Vec::new(),
        dedicated_device_lane: false,
        devices_out: false,
        deferred_loaded: Vec::new(),
        handover: Handover::default(),
        handover_released: false,
        setup: StepTimes::sequence(),
    };
    let result = s.migrate();
    let result = s.unwind(result);
    match &result {
        Ok(()) => s.stats.finish(MigrationStatus::Completed, None),
        Err(MigrationError::Cancelled) => s.stats.finish(
            MigrationStatus::Cancelled,
            Some("migration cancelled".into()),
        ),
        Err(e @ MigrationError::InDoubt { .. }) => {
            log::error!("{}", error_chain(e));
            s.stats
                .finish(MigrationStatus::InDoubt, Some(error_chain(e)))
        }
        Err(e) => {
            log::error!("migration failed: {}", error_chain(e));
            s.stats
                .finish(MigrationStatus::Failed, Some(error_chain(e)))
        }
    }
    result
}

/// Unique enough to tie the parallel connections of one migration together.
fn new_session_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 40) ^ 0x7465_726e_6d69_6721
}

/// What the control-connection reader saw from the destination.
#[derive(Debug)]
enum PeerEvent {
    Ack,
    /// The destination restored everything and will run the VM on Commit.
    Ready,
    /// The destination loaded this device's initial pre-copy data (switchover-ack).
    DeviceLoaded(String),
    Error(String),
    Gone(String),
}

fn spawn_watcher(conn: Connection) -> std::io::Result<(Receiver<PeerEvent>, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::Builder::new()
        .name("tern-mig-peer".into())
        .spawn(move || {
            let mut r = FrameReader::new(conn);
            loop {
                let ev = match r.recv() {
                    Ok(Frame::Ack) => PeerEvent::Ack,
                    Ok(Frame::Ready) => PeerEvent::Ready,
                    Ok(Frame::DeviceLoaded { id }) => PeerEvent::DeviceLoaded(id.to_owned()),
                    Ok(Frame::Error(t)) => PeerEvent::Error(t.to_owned()),
                    Ok(f) => {
                        PeerEvent::Gone(format!("sent an unexpected {} frame", f.tag().name()))
                    }
                    Err(ProtocolError::Closed) => PeerEvent::Gone("connection closed".into()),
                    Err(e) => PeerEvent::Gone(error_chain(&e)),
                };
                let last = !matches!(
                    ev,
                    PeerEvent::Ack | PeerEvent::Ready | PeerEvent::DeviceLoaded(_)
                );
                if tx.send(ev).is_err() || last {
                    return;
                }
            }
        })?;
    Ok((rx, h))
}

/// What one pass over guest memory does ([`Source::pass`]).
#[derive(Debug, Clone, Copy)]
struct PassPlan {
    kind: PassKind,
    iteration: u64,
    /// Skip chunks the plan found clean (every source could peek).
    skip_unplanned: bool,
    expected_downtime_ms: u64,
    bandwidth: u64,
}

impl PassPlan {
    fn full() -> Self {
        PassPlan {
            kind: PassKind::Full,
            iteration: 0,
            skip_unplanned: false,
            expected_downtime_ms: 0,
            bandwidth: 0,
        }
    }
}

/// Dirty pages claimed during one pass, per kind and per DMA source.
#[derive(Debug, Default)]
struct PassTally {
    by_kind: DirtyPagesBySource,
    dma: BTreeMap<String, u64>,
    /// Chunks claimed and the time their claims took (the switchover reports both).
    claims: u64,
    claim_time: Duration,
}

impl PassTally {
    fn add(&mut self, kind: SourceKind, label: &str, pages: u64) {
        match kind {
            SourceKind::Kvm => self.by_kind.kvm += pages,
            SourceKind::Vmm => self.by_kind.vmm += pages,
            SourceKind::Dma => {
                self.by_kind.dma += pages;
                *self.dma.entry(label.to_owned()).or_insert(0) += pages;
            }
        }
    }
}

struct Source<'h> {
    host: &'h mut dyn MigrationHost,
    params: SendParams,
    stats: Arc<MigrationStats>,
    rate: Arc<RateLimiter>,
    mem: GuestMemoryMmap<GuestPageBitmap>,
    regions: Vec<(GuestAddress, u64)>,
    sources: Vec<Box<dyn DirtySource>>,
    /// How many of `sources` (a prefix) were started: those are stopped when it ends.
    sources_started: usize,
    paused: bool,
    ac: AutoConverge,
    control: Option<Connection>,
    lanes: Option<Lanes>,
    peer: Option<Receiver<PeerEvent>>,
    watcher: Option<JoinHandle<()>>,
    ranges: DirtyRanges,
    session: u64,
    /// Per region: the bits peeked at the start of the iteration.
    plan: Vec<DirtyBitmap>,
    /// The destination acknowledged the config: its VM is built and waiting for state.
    destination_ready: bool,
    /// Devices whose own state migrates.
    devices: Vec<DeviceRun>,
    /// The last connection carries only device data (devices and several connections).
    dedicated_device_lane: bool,
    /// `devices` are with the switchover's device thread.
    devices_out: bool,
    /// Switchover-acks that arrived meanwhile.
    deferred_loaded: Vec<String>,
    /// The last pass's chunk claims and their time.
    last_claims: (u64, Duration),
    /// The guest's dirty rate, per chunk from its claims (not from pass durations).
    dirty_rate: DirtyRate,
    /// When `--timeout-s` runs out: a pre-copy pass stops there rather than at its end.
    precopy_deadline: Option<Instant>,
    /// Local mode: what goes to the destination with the VM's devices (live update).
    handover: Handover,
    /// The handed devices were released ([`MigrationHost::handover_release`]): a failure must
    /// take them back before the VM resumes.
    handover_released: bool,
    /// The setup's steps until the destination's first ack (published as they happen).
    setup: StepTimes,
}

/// A duration in µs, as the stats record them.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn proto(during: &'static str) -> impl FnOnce(ProtocolError) -> MigrationError {
    move |source| MigrationError::Protocol { during, source }
}

impl Source<'_> {
    fn migrate(&mut self) -> Result<(), MigrationError> {
        self.params.validate()?;
        if self.params.local {
            // Refused here, before anything connects or pauses, with the reason.
            self.handover = self.host.handover().map_err(MigrationError::Host)?;
            self.setup_lap("collect what is handed over");
        }
        self.connect()?;
        self.setup_lap("connect, preamble and hello sent");
        if self.params.local {
            self.send_local_memory()?;
            self.setup_lap("memory fds sent");
        }
        self.send_config()?;
        self.setup_lap("config sent");
        self.check_destination()?;
        self.setup_lap("destination's preamble");
        let conns = self.connect_data()?;
        self.lanes = Some(Lanes::start(
            conns,
            &self.mem,
            self.params.page_checksums,
            self.rate.clone(),
            self.stats.clone(),
        )?);
        self.setup_lap("lanes started");
        if !self.params.local {
            self.send_populated()?;
            self.setup_lap("populated memory queued");
        }
        self.host.prepare_switchover();
        self.setup_lap("prepare the switchover");
        if !self.params.local {
            self.sources = self.host.dirty_sources().map_err(MigrationError::Host)?;
            order_for_claims(&mut self.sources);
            if self.sources.is_empty() {
                return Err(MigrationError::InvalidParams {
                    reason: "the VM reported no dirty sources; pre-copy would lose writes".into(),
                });
            }
            // Every source tracks before iteration 0's full pass reads its first page.
            for i in 0..self.sources.len() {
                self.sources[i]
                    .start()
                    .map_err(MigrationError::DirtySource)?;
                self.sources_started = i + 1;
            }
            self.plan = self
                .regions
                .iter()
                .map(|&(b, l)| DirtyBitmap::new(b, l))
                .collect::<Result<_, _>>()
                .map_err(MigrationError::Bitmap)?;
            self.start_devices()?;
            self.stats.set_status(MigrationStatus::Active);
            self.precopy()?;
        } else if self.handover.devices.is_empty() {
            self.start_devices()?;
        }
        self.switchover()
    }

    /// Open connection 0 and send the preamble and Hello without waiting for the destination's
    /// preamble: the setup frames follow at once and [`Source::check_destination`] reads it
    /// afterwards, so the destination finds everything when it first wakes (one round trip less
    /// before it can build the VM). Nothing here waits on the destination or changes the VM.
    fn connect(&mut self) -> Result<(), MigrationError> {
        let mut c =
            Connection::connect(&self.params.destination).map_err(MigrationError::Transport)?;
        write_preamble(&mut c).map_err(proto("sending the preamble"))?;
        self.send_hello(&mut c, 0)?;
        self.control = Some(c);
        Ok(())
    }

    /// Reads the destination's preamble on connection 0 and starts the peer watcher. A
    /// destination that refused this side's preamble still sent its own first; its Error frame
    /// then reaches the watcher.
    fn check_destination(&mut self) -> Result<(), MigrationError> {
        let c = self.control()?;
        read_preamble(c).map_err(proto("reading the destination's preamble"))?;
        let watch = c.try_clone().map_err(MigrationError::Transport)?;
        let (rx, h) = spawn_watcher(watch).map_err(|source| {
            MigrationError::Transport(crate::transport::TransportError::Socket {
                what: "spawn peer watcher",
                source,
            })
        })?;
        self.peer = Some(rx);
        self.watcher = Some(h);
        Ok(())
    }

    /// A data connection's greeting: preambles exchanged, then Hello.
    fn handshake(&self, c: &mut Connection, index: u16) -> Result<(), MigrationError> {
        write_preamble(c).map_err(proto("sending the preamble"))?;
        read_preamble(c).map_err(proto("reading the destination's preamble"))?;
        self.send_hello(c, index)
    }

    fn send_hello(&self, c: &mut Connection, index: u16) -> Result<(), MigrationError> {
        FrameWriter::new(c)
            .send(&Frame::Hello(Hello {
                session: self.session(),
                connection_index: index,
                connections: self.params.connections,
                local: self.params.local,
            }))
            .map_err(proto("sending hello"))?;
        Ok(())
    }

    fn session(&self) -> u64 {
        self.session
    }

    /// Times a setup step and publishes the steps so far.
    pub(super) fn setup_lap(&mut self, name: &str) {
        self.setup.lap(name);
        self.stats.set_setup_steps(self.setup.steps());
    }

    fn connect_data(&mut self) -> Result<Vec<Connection>, MigrationError> {
        let control = self.control.as_ref().ok_or(MigrationError::PeerGone {
            peer: "destination",
            during: "connecting",
            detail: "no control connection".into(),
        })?;
        let mut conns = vec![control.try_clone().map_err(MigrationError::Transport)?];
        for i in 1..self.params.connections {
            let mut c =
                Connection::connect(&self.params.destination).map_err(MigrationError::Transport)?;
            self.handshake(&mut c, i)?;
            conns.push(c);
        }
        Ok(conns)
    }

    fn control(&mut self) -> Result<&mut Connection, MigrationError> {
        self.control.as_mut().ok_or(MigrationError::PeerGone {
            peer: "destination",
            during: "sending",
            detail: "no control connection".into(),
        })
    }

    fn send_config(&mut self) -> Result<(), MigrationError> {
        let cfg = self.host.config().map_err(MigrationError::Host)?;
        let n = FrameWriter::new(self.control()?)
            .send(&Frame::Config(&cfg))
            .map_err(proto("sending config"))?;
        self.stats.add_transferred(n);
        Ok(())
    }

    fn send_local_memory(&mut self) -> Result<(), MigrationError> {
        let mem = self.mem.clone();
        let unix = self
            .control()?
            .as_unix()
            .ok_or_else(|| MigrationError::InvalidParams {
                reason: "local migration needs a unix: destination_url".into(),
            })?
            .try_clone()
            .map_err(|source| {
                MigrationError::Transport(crate::transport::TransportError::Socket {
                    what: "duplicate",
                    source,
                })
            })?;
        for r in mem.iter() {
            let fo = r.file_offset().ok_or(MigrationError::AnonymousMemory {
                gpa: r.start_addr().0,
            })?;
            let info = MemoryFdInfo {
                gpa: r.start_addr(),
                len_bytes: r.len(),
                file_offset: fo.start(),
            };
            send_frame_with_fd(&unix, &Frame::MemoryFd(info), fo.file())
                .map_err(MigrationError::SendFd)?;
        }
        for h in &self.handover.fds {
            send_frame_with_fd(&unix, &Frame::HandoverFd(&h.meta), &h.fd)
                .map_err(MigrationError::SendFd)?;
        }
        Ok(())
    }

    fn check_abort(&mut self, cancellable: bool) -> Result<(), MigrationError> {
        self.poll_peer(cancellable, None)
    }

    /// Handles every event the destination sent so far, waiting up to `wait` for the first one:
    /// its errors end the migration, its acks are recorded.
    fn poll_peer(
        &mut self,
        cancellable: bool,
        wait: Option<Duration>,
    ) -> Result<(), MigrationError> {
        if cancellable && self.stats.cancel_requested() {
            return Err(MigrationError::Cancelled);
        }
        let mut wait = wait;
        loop {
            let ev = match (self.peer.as_ref(), wait.take()) {
                (None, _) => return Ok(()),
                (Some(p), Some(w)) => p.recv_timeout(w).ok(),
                (Some(p), None) => p.try_recv().ok(),
            };
            match ev {
                None => return Ok(()),
                Some(PeerEvent::Error(reason)) => {
                    return Err(MigrationError::PeerError {
                        peer: "destination",
                        reason,
                    })
                }
                Some(PeerEvent::Gone(detail)) => {
                    return Err(MigrationError::PeerGone {
                        peer: "destination",
                        during: "sending memory",
                        detail,
                    })
                }
                Some(PeerEvent::Ack) if !self.destination_ready => self.destination_ready = true,
                Some(PeerEvent::Ack) => {
                    return Err(MigrationError::Unexpected {
                        frame: "ack",
                        during: "sending memory",
                    })
                }
                Some(PeerEvent::Ready) => {
                    return Err(MigrationError::Unexpected {
                        frame: "ready",
                        during: "sending memory",
                    })
                }
                Some(PeerEvent::DeviceLoaded(id)) => self.device_loaded(&id)?,
            }
        }
    }

    fn lanes(&mut self) -> Result<&mut Lanes, MigrationError> {
        self.lanes.as_mut().ok_or(MigrationError::PeerGone {
            peer: "destination",
            during: "sending",
            detail: "connections closed".into(),
        })
    }

    /// Every chunk of guest memory, in GPA order, with the lane that owns it.
    fn chunks(&self) -> Vec<(GpaRange, usize)> {
        let n = self.memory_lanes();
        let cb = self.params.chunk_bytes;
        let mut v = Vec::new();
        for &(base, len) in &self.regions {
            let mut off = 0;
            while off < len {
                let l = cb.min(len - off);
                let start = base.0 + off;
                // Fixed chunk → lane mapping: a page always travels on the same connection, so a
                // newer copy can never overtake an older one.
                let lane = usize::try_from((start / cb) % n as u64).unwrap_or(0);
                v.push((GpaRange::new(GuestAddress(start), l), lane));
                off += l;
            }
        }
        v
    }

    /// Claim `range` from every source (in claim order) into one bitmap, counting per source
    /// into `tally` when `count` is set.
    fn claim(
        &mut self,
        range: GpaRange,
        count: bool,
        tally: &mut PassTally,
    ) -> Result<DirtyBitmap, MigrationError> {
        let stats = &self.stats;
        claim_union(&mut self.sources, range, |source, n| {
            if count && n > 0 {
                stats.add_dirty(source.kind(), source.label(), n);
                tally.add(source.kind(), source.label(), n);
            }
        })
        .map_err(|e| match e {
            ClaimUnionError::Source(e) => MigrationError::DirtySource(e),
            ClaimUnionError::Bitmap(e) => MigrationError::Bitmap(e),
        })
    }

    /// Read and queue the pages of `bitmap` (or all of `range` when `bitmap` is None) on `lane`.
    fn send_pages(
        &mut self,
        range: GpaRange,
        bitmap: Option<&DirtyBitmap>,
        lane: usize,
        cancellable: bool,
    ) -> Result<u64, MigrationError> {
        // (gpa, pages, read): unread runs are known never written and go as zero markers.
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        match bitmap {
            Some(b) => {
                self.ranges.fill_from(b);
                runs.extend(
                    self.ranges
                        .runs()
                        .iter()
                        .map(|r| (range.start.0 + r.first_page * PAGE_SIZE, r.npages, true)),
                );
            }
            None => {
                let mut hint = DirtyBitmap::new(range.start, range.len_bytes)
                    .map_err(MigrationError::Bitmap)?;
                // Asked after the chunk's claim: a page first written between the two is
                // populated by then and read (its claimed bit is dropped by this pass).
                if self
                    .host
                    .populated(range, &mut hint)
                    .map_err(MigrationError::Host)?
                {
                    self.ranges.fill_from(&hint);
                    let mut next = 0;
                    for r in self.ranges.runs() {
                        if r.first_page > next {
                            let gpa = range.start.0 + next * PAGE_SIZE;
                            runs.push((gpa, r.first_page - next, false));
                        }
                        runs.push((range.start.0 + r.first_page * PAGE_SIZE, r.npages, true));
                        next = r.first_page + r.npages;
                    }
                    if next < range.pages() {
                        runs.push((
                            range.start.0 + next * PAGE_SIZE,
                            range.pages() - next,
                            false,
                        ));
                    }
                } else {
                    runs.push((range.start.0, range.pages(), true));
                }
            }
        }
        let mem = self.mem.clone();
        let mut pages = 0;
        let lanes = self.lanes()?;
        let mut batch = lanes.batch();
        for (gpa, npages, read) in runs {
            let mut done = 0;
            while done < npages {
                let at = GuestAddress(gpa + done * PAGE_SIZE);
                let n = if read {
                    match batch.push_pages(&mem, at, npages - done) {
                        Ok(n) => n,
                        Err(e) => {
                            lanes.recycle(batch);
                            return Err(e);
                        }
                    }
                } else {
                    batch.push_zero_run(at, npages - done)
                };
                done += n;
                if batch.is_full() || n == 0 {
                    let full = std::mem::replace(&mut batch, lanes.batch());
                    lanes.send_batch(lane, full)?;
                }
            }
            pages += npages;
        }
        if batch.is_empty() {
            lanes.recycle(batch);
        } else {
            lanes.send_batch(lane, batch)?;
        }
        self.stats.mark_setup_done();
        if cancellable && self.stats.cancel_requested() {
            return Err(MigrationError::Cancelled);
        }
        Ok(pages)
    }

    /// `sync` every source: the start of a pass.
    fn sync_sources(&mut self) -> Result<(), MigrationError> {
        for s in &mut self.sources {
            s.sync().map_err(MigrationError::DirtySource)?;
        }
        Ok(())
    }

    /// One pass over guest memory — the one path of iteration 0, the pre-copy iterations and the
    /// switchover: for each chunk, every source's claim (KVM clear, then DMA read-and-clear, then
    /// VMM writes) right before the chunk's pages are read and queued. The full pass reads every
    /// page and drops the claimed bits (they cover pages it reads anyway: KVM's INITIALLY_SET
    /// bits, writes since tracking began); the others send exactly the claimed union. With
    /// `skip_unplanned`, chunks the plan found clean are not claimed.
    fn pass(&mut self, plan: PassPlan) -> Result<u64, MigrationError> {
        let started = Instant::now();
        let bytes_before = self.stats.transferred_bytes();
        let mut tally = PassTally::default();
        let mut pages = 0;
        let full = plan.kind == PassKind::Full;
        // Paused, nothing dirties memory: the final pass says nothing about the guest's rate.
        let measure = plan.kind != PassKind::Final;
        let chunks = self.chunks();
        if full {
            self.dirty_rate = DirtyRate::new(chunks.len());
        }
        let mut left: u64 = self.regions.iter().map(|r| r.1).sum();
        for (i, (range, lane)) in chunks.into_iter().enumerate() {
            if plan.skip_unplanned && !self.planned(range) {
                if measure {
                    self.dirty_rate.clean(i, Instant::now());
                }
                continue;
            }
            // Out of time: the pass stops here and the loop's decision applies the timeout
            // strategy at once. What it leaves unsent stays dirty at the sources (not claimed), so
            // a switchover still sends it. The full pass always finishes: it has no dirty bits
            // for the pages it has not read yet.
            if plan.kind == PassKind::Dirty
                && self.precopy_deadline.is_some_and(|d| Instant::now() >= d)
            {
                log::info!(
                    "pre-copy iteration {} cut short by the timeout",
                    plan.iteration
                );
                break;
            }
            self.check_abort(true)?;
            if full {
                self.full_pass_progress(left)?;
            }
            let claim_started = Instant::now();
            let bits = self.claim(range, !full, &mut tally)?;
            tally.claims += 1;
            tally.claim_time += claim_started.elapsed();
            if measure {
                // The full pass's claim only starts the chunk's clock (its bits predate it).
                let n = if full { 0 } else { bits.count() };
                self.dirty_rate.claimed(i, n, Instant::now());
            }
            pages += self.send_pages(range, (!full).then_some(&bits), lane, true)?;
            left = left.saturating_sub(range.len_bytes);
        }
        self.last_claims = (tally.claims, tally.claim_time);
        self.stats.push_history(IterationRecord {
            iteration: plan.iteration,
            pass: plan.kind,
            pages_sent: pages,
            bytes_sent: self.stats.transferred_bytes() - bytes_before,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            dirty_pages: tally.by_kind,
            dma_pages_by_source: tally.dma,
            expected_downtime_ms: plan.expected_downtime_ms,
            bandwidth_bytes_per_sec: plan.bandwidth,
            throttle_percent: self.stats.throttle_percent(),
        });
        if measure {
            self.stats.set_dirty_rate(self.dirty_rate.pages_per_sec());
        }
        Ok(pages)
    }

    /// Progress of iteration 0, before each chunk: the memory it has still to go over plus what
    /// is queued is what remains, and a switchover now would have to send all of it.
    fn full_pass_progress(&mut self, left: u64) -> Result<(), MigrationError> {
        let remaining = left.saturating_add(self.lanes()?.queued_bytes());
        let (link, cap) = (self.lanes()?.bandwidth_bytes_per_sec(), self.rate.rate());
        self.stats.set_remaining(remaining);
        self.stats.set_bandwidth(memory_rate(link, cap));
        self.stats.set_expected_downtime(switchover_ms(
            SwitchoverLoad {
                memory_bytes: remaining,
                state_bytes: STATE_ESTIMATE_BYTES,
                burst_bytes: self.rate.available(),
            },
            link,
            cap,
        ));
        Ok(())
    }

    fn precopy(&mut self) -> Result<(), MigrationError> {
        let started = Instant::now();
        self.precopy_deadline = started.checked_add(self.params.timeout);
        let stall = self.params.ack_timeout;
        self.lanes()?.set_stall_limit(stall, "pre-copy");
        self.stats.set_iteration(0);
        self.sync_sources()?;
        self.pass(PassPlan::full())?;
        self.pump_devices(false)?;
        let mut sent_before = self.stats.transferred_bytes();
        let mut last_iter_bytes = sent_before;
        let mut iteration = 0u64;
        loop {
            self.check_abort(true)?;
            // What the last pass queued goes out before the next plan, with the guest running: a
            // plan made behind that backlog would claim pages long before they could be sent,
            // and a switchover decided on it would send the backlog with the guest paused. The
            // timeout does not wait for it (the decision then applies the strategy).
            if self.lanes()?.queued_bytes() > 0 {
                let deadline = self.precopy_deadline;
                self.lanes()?.flush_until(true, deadline)?;
            }
            let plan_started = Instant::now();
            self.sync_sources()?;
            let (planned, can_peek) = self.plan()?;
            // Device bytes count: unread pre-copy bytes as remaining (iterating moves them), the
            // STOP_COPY size as state the switchover moves with the VM paused.
            let (device_precopy, device_stop_copy) = self.device_bytes_pending()?;
            // Memory still queued on the lanes goes out before the switchover's data does: it
            // counts as remaining, and it drains while the loop goes on.
            let queued = self.lanes()?.queued_bytes();
            let remaining = planned * PAGE_SIZE + device_precopy + queued;
            self.stats.set_remaining(remaining);
            let (link, cap) = (self.lanes()?.bandwidth_bytes_per_sec(), self.rate.rate());
            let bw = memory_rate(link, cap);
            self.stats.set_bandwidth(bw);
            // What the switchover would send if decided now, on the wire: every planned page
            // with its entry, plus the pages the guest dirties between this plan's sync and the
            // pause, which are not in the plan (the pause follows the decision at once, so that
            // is the time from the sync to here).
            let page_wire = PAGE_SIZE + crate::protocol::MEMORY_ENTRY_BYTES as u64;
            let late = self
                .dirty_rate
                .pages_per_sec()
                .saturating_mul(u64::try_from(plan_started.elapsed().as_micros()).unwrap_or(0))
                / 1_000_000;
            let memory = if can_peek {
                planned.saturating_add(late).saturating_mul(page_wire)
            } else {
                // A source that cannot peek (type1, DMA logging) reports only when claimed: the
                // last iteration's volume is the honest estimate of what the switchover sends.
                planned.saturating_mul(page_wire).max(last_iter_bytes)
            };
            let expected = switchover_ms(
                SwitchoverLoad {
                    memory_bytes: memory.saturating_add(queued),
                    // Device data and state go as control frames, not paced by the cap.
                    state_bytes: STATE_ESTIMATE_BYTES
                        .saturating_add(device_stop_copy)
                        .saturating_add(device_precopy),
                    burst_bytes: self.rate.available(),
                },
                link,
                cap,
            );
            self.stats.set_expected_downtime(expected);
            // A source that cannot peek leaves the remaining volume unknown: not zero.
            let known_remaining = if can_peek { remaining } else { u64::MAX };
            match decide(
                known_remaining,
                expected,
                self.params.downtime_ms,
                started.elapsed(),
                self.params.timeout,
                self.params.timeout_strategy,
            ) {
                // Switchover-ack: not before every device's initial data is loaded on the
                // destination; past the timeout the strategy decides (Ignore switches anyway).
                Decision::Switchover
                    if !self.devices_acked() && started.elapsed() < self.params.timeout =>
                {
                    if remaining == 0 {
                        self.poll_peer(true, Some(Duration::from_millis(20)))?;
                    }
                }
                Decision::Switchover => return Ok(()),
                Decision::TimedOut => {
                    return Err(MigrationError::Timeout {
                        elapsed_s: started.elapsed().as_secs(),
                        expected_downtime_ms: expected,
                        downtime_ms: self.params.downtime_ms,
                    })
                }
                Decision::Iterate if planned == 0 && device_precopy == 0 => {
                    // Only the queue is left: let it drain instead of spinning on empty passes.
                    self.poll_peer(true, Some(Duration::from_millis(2)))?;
                }
                Decision::Iterate => {}
            }
            if self.params.auto_converge {
                if let Some(p) = self.ac.update(remaining, last_iter_bytes) {
                    log::info!("auto-converge: throttling vCPUs to {p} %");
                    self.host.throttle(p).map_err(MigrationError::Host)?;
                    self.stats.set_throttle(p);
                }
            }
            iteration += 1;
            self.stats.set_iteration(iteration);
            self.pass(PassPlan {
                kind: PassKind::Dirty,
                iteration,
                skip_unplanned: can_peek,
                expected_downtime_ms: expected,
                bandwidth: bw,
            })?;
            self.pump_devices(false)?;
            let now = self.stats.transferred_bytes();
            last_iter_bytes = now - sent_before;
            sent_before = now;
        }
    }

    /// Peek every source into the per-region plan. Returns (planned pages, all sources peeked).
    fn plan(&mut self) -> Result<(u64, bool), MigrationError> {
        let mut all = true;
        let mut planned = 0;
        for (i, &(base, len)) in self.regions.iter().enumerate() {
            let plan = &mut self.plan[i];
            plan.clear();
            for s in &mut self.sources {
                let ok = s
                    .peek(GpaRange::new(base, len), plan)
                    .map_err(MigrationError::DirtySource)?;
                all &= ok;
            }
            planned += plan.count();
        }
        Ok((planned, all))
    }

    fn planned(&self, range: GpaRange) -> bool {
        self.plan.iter().any(|p| {
            p.page_of(range.start)
                .map(|first| p.count_range(first, range.pages()) > 0)
                .unwrap_or(false)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::{DirtySourceError, SourceKind};
    use crate::engine::host::{
        LocalRegion, MigrationState, MigrationTarget, MigrationTargetFactory,
    };
    use crate::engine::receive::receive_on;
    use crate::engine::HostError;
    use crate::transport::{MigrationListener, MigrationUrl};
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    const PAGES: u64 = 1024;

    /// Reports `pages` once, at the second sync (the first after iteration 0, as if written
    /// during it); logs every claim and whether the VM was paused then.
    struct OnceSource {
        kind: SourceKind,
        pages: Vec<u64>,
        dirty: BTreeSet<u64>,
        syncs: u32,
        paused: Arc<AtomicBool>,
        claims: Arc<Mutex<Vec<(SourceKind, GpaRange, bool)>>>,
        /// Report `pages` at every sync instead of once.
        every_sync: bool,
    }

    impl DirtySource for OnceSource {
        fn kind(&self) -> SourceKind {
            self.kind
        }
        fn label(&self) -> &str {
            self.kind.as_str()
        }
        fn start(&mut self) -> Result<(), DirtySourceError> {
            Ok(())
        }
        fn stop(&mut self) -> Result<(), DirtySourceError> {
            Ok(())
        }
        fn sync(&mut self) -> Result<(), DirtySourceError> {
            self.syncs += 1;
            if self.syncs == 2 || (self.every_sync && self.syncs > 1) {
                self.dirty.extend(self.pages.iter().copied());
            }
            Ok(())
        }
        fn peek(&mut self, r: GpaRange, out: &mut DirtyBitmap) -> Result<bool, DirtySourceError> {
            for &p in &self.dirty {
                if r.intersect(p * PAGE_SIZE, PAGE_SIZE).is_some() {
                    let gpa = GuestAddress(p * PAGE_SIZE);
                    out.mark_range(gpa, 1)
                        .map_err(|source| DirtySourceError::OutputBitmap {
                            kind: self.kind,
                            range: r,
                            source,
                        })?;
                }
            }
            Ok(true)
        }
        fn claim(&mut self, r: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError> {
            self.claims.lock().expect("log").push((
                self.kind,
                r,
                self.paused.load(Ordering::SeqCst),
            ));
            self.peek(r, out)?;
            self.dirty
                .retain(|&p| r.intersect(p * PAGE_SIZE, PAGE_SIZE).is_none());
            Ok(())
        }
    }

    struct Host {
        mem: GuestMemoryMmap<GuestPageBitmap>,
        paused: Arc<AtomicBool>,
        claims: Arc<Mutex<Vec<(SourceKind, GpaRange, bool)>>>,
        /// Pages a guest rewrites all the time: reported dirty at every sync (a steady hot set)
        /// instead of the once-only reports.
        hot: Option<Vec<u64>>,
    }

    impl MigrationHost for Host {
        fn guest_memory(&self) -> GuestMemoryMmap<GuestPageBitmap> {
            self.mem.clone()
        }
        fn config(&mut self) -> Result<Vec<u8>, HostError> {
            Ok(Vec::new())
        }
        fn dirty_sources(&mut self) -> Result<Vec<Box<dyn DirtySource>>, HostError> {
            let hot = self.hot.is_some();
            let mk = |kind, pages: &[u64]| -> Box<dyn DirtySource> {
                Box::new(OnceSource {
                    kind,
                    pages: pages.to_vec(),
                    dirty: BTreeSet::new(),
                    syncs: 0,
                    paused: self.paused.clone(),
                    claims: self.claims.clone(),
                    every_sync: hot,
                })
            };
            if let Some(pages) = &self.hot {
                return Ok(vec![mk(SourceKind::Kvm, pages)]);
            }
            // Page 3 is reported by both: 5 reports, 4 distinct pages. DMA is listed first: the
            // engine, not the host, orders the claims.
            Ok(vec![
                mk(SourceKind::Dma, &[3, 700]),
                mk(SourceKind::Kvm, &[1, 2, 3]),
            ])
        }
        fn populated(&mut self, _: GpaRange, _: &mut DirtyBitmap) -> Result<bool, HostError> {
            Ok(false)
        }
        fn pause(&mut self) -> Result<(), HostError> {
            self.paused.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn pause_devices(&mut self) -> Result<(), HostError> {
            Ok(())
        }
        fn resume(&mut self) -> Result<(), HostError> {
            self.paused.store(false, Ordering::SeqCst);
            Ok(())
        }
        fn save_state(&mut self) -> Result<MigrationState, HostError> {
            Ok(MigrationState::default())
        }
        fn throttle(&mut self, _: u8) -> Result<(), HostError> {
            Ok(())
        }
    }

    struct Target(GuestMemoryMmap<GuestPageBitmap>);
    impl MigrationTarget for Target {
        fn guest_memory(&self) -> GuestMemoryMmap<GuestPageBitmap> {
            self.0.clone()
        }
        fn restore_state(&mut self, _: MigrationState) -> Result<(), HostError> {
            Ok(())
        }
        fn start(&mut self) -> Result<(), HostError> {
            Ok(())
        }
    }
    /// Builds destinations of `pages` pages.
    struct Factory(u64);
    impl MigrationTargetFactory for Factory {
        fn create(
            &mut self,
            _: &[u8],
            _: Vec<LocalRegion>,
        ) -> Result<Box<dyn MigrationTarget>, HostError> {
            let m =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (self.0 * PAGE_SIZE) as usize)])
                    .map_err(|e| HostError::new("allocate", e))?;
            Ok(Box::new(Target(m)))
        }
    }

    /// The claims logged while migrating a `pages`-page fake guest (1 MiB chunks) over a unix
    /// socket to a fake destination, with its sources (`hot`: see [`Host`]).
    fn migrate_fake(
        tag: &str,
        pages: u64,
        hot: Option<Vec<u64>>,
        downtime_ms: u64,
    ) -> (Arc<MigrationStats>, Vec<(SourceKind, GpaRange, bool)>) {
        let path = std::env::temp_dir().join(format!(
            "tern-precopy-{tag}-{}-{pages}.sock",
            std::process::id()
        ));
        let l = MigrationListener::bind(&MigrationUrl::Unix(path)).expect("bind");
        let mut params = SendParams::new(l.url().clone());
        params.chunk_bytes = 1 << 20;
        params.downtime_ms = downtime_ms;
        let dst = std::thread::spawn(move || {
            receive_on(&l, &mut Factory(pages), &MigrationStats::new()).map(|_| ())
        });
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (pages * PAGE_SIZE) as usize)])
            .expect("memory");
        let claims = Arc::new(Mutex::new(Vec::new()));
        let mut host = Host {
            mem,
            paused: Arc::new(AtomicBool::new(false)),
            claims: claims.clone(),
            hot,
        };
        let stats = Arc::new(MigrationStats::new());
        send(&mut host, params, stats.clone()).expect("migration");
        dst.join().expect("thread").expect("destination");
        let log = claims.lock().expect("log").clone();
        (stats, log)
    }

    #[test]
    fn send_unions_sources_and_makes_final_claim_while_paused() {
        let (stats, log) = migrate_fake("union", PAGES, None, 300);
        let s = stats.snapshot();
        // Iteration 0 sends every page once; the 5 reports of 4 distinct pages add 4, not 5.
        assert_eq!(s.data_pages + s.zero_pages, PAGES + 4, "{s:?}");
        assert_eq!(s.dirty_pages.kvm, 3);
        assert_eq!(s.dirty_pages.dma, 2);
        // The switchover (VM paused) claims only chunks holding a reported page — whether the
        // reports were still pending then or an iteration had taken them: every source could
        // peek, so clean chunks are not claimed.
        let reported = [1u64, 2, 3, 700];
        for (kind, range, paused) in log.iter() {
            if *paused {
                assert!(
                    reported
                        .iter()
                        .any(|&p| range.intersect(p * PAGE_SIZE, PAGE_SIZE).is_some()),
                    "{kind:?} claimed the clean chunk {range:?} while paused: {log:?}"
                );
            }
        }
        // Every chunk, in every pass: KVM's claim (clear) first, then DMA's read-and-clear.
        for pair in log.chunks(2) {
            assert_eq!(pair[0].0, SourceKind::Kvm, "{log:?}");
            assert_eq!(pair[1].0, SourceKind::Dma, "{log:?}");
            assert_eq!(pair[0].1, pair[1].1, "both claims cover the same chunk");
        }
    }

    /// Paused claims of a migration of `pages` pages (1 MiB chunks) whose guest keeps rewriting
    /// pages 5 and 300 (two chunks) until it is paused.
    fn switchover_claims(pages: u64) -> Vec<GpaRange> {
        let (stats, log) = migrate_fake("size", pages, Some(vec![5, 300]), 1000);
        let breakdown = stats
            .snapshot()
            .switchover
            .expect("a completed switchover's breakdown");
        let paused: Vec<GpaRange> = log.iter().filter(|c| c.2).map(|c| c.1).collect();
        assert_eq!(breakdown.final_claimed_chunks, paused.len() as u64);
        paused
    }

    /// The switchover claims what was dirtied since the last claim, not the guest: the same hot
    /// set in a guest 16 times larger makes the same claims while paused.
    #[test]
    fn switchover_claims_do_not_grow_with_the_guest() {
        let small = switchover_claims(1024);
        let large = switchover_claims(16 * 1024);
        assert_eq!(small.len(), 2, "{small:?}");
        assert_eq!(small, large);
    }

    /// `--timeout-s` cuts a pre-copy pass short instead of waiting for its end: 8 MiB of guest,
    /// the first 4 MiB (1024 pages, 16 chunks of 256 KiB) rewritten all the time, a 2 MB/s cap,
    /// so a pass takes about two seconds: iteration 0 and its drain end near 2 s, the timeout
    /// (cancel) runs out at 3 s, during the first pre-copy pass.
    #[test]
    fn the_timeout_cuts_a_precopy_pass_short() {
        const PAGES_8M: u64 = 2048;
        const HOT: u64 = 1024;
        let path =
            std::env::temp_dir().join(format!("tern-precopy-timeout-{}.sock", std::process::id()));
        let l = MigrationListener::bind(&MigrationUrl::Unix(path)).expect("bind");
        let mut params = SendParams::new(l.url().clone());
        params.chunk_bytes = 256 << 10;
        params.downtime_ms = 1;
        params.max_bandwidth_mbps = 16;
        params.timeout = Duration::from_secs(3);
        let dst = std::thread::spawn(move || {
            receive_on(&l, &mut Factory(PAGES_8M), &MigrationStats::new()).map(|_| ())
        });
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (PAGES_8M * PAGE_SIZE) as usize)])
                .expect("memory");
        // Data, not zero markers, so the cap paces the hot set.
        for p in 0..HOT {
            vm_memory::Bytes::write_slice(&mem, &[0xa5; 64], GuestAddress(p * PAGE_SIZE))
                .expect("fill");
        }
        let mut host = Host {
            mem,
            paused: Arc::new(AtomicBool::new(false)),
            claims: Arc::new(Mutex::new(Vec::new())),
            hot: Some((0..HOT).collect()),
        };
        let stats = Arc::new(MigrationStats::new());
        let err = send(&mut host, params, stats.clone()).expect_err("the timeout (cancel)");
        assert!(matches!(err, MigrationError::Timeout { .. }), "{err}");
        let _ = dst.join();
        let s = stats.snapshot();
        let dirty: Vec<u64> = s
            .history
            .iter()
            .filter(|r| r.pass == PassKind::Dirty)
            .map(|r| r.pages_sent)
            .collect();
        assert!(
            dirty.last().is_some_and(|&sent| sent < HOT),
            "no pre-copy pass was cut short (pages sent per pass: {dirty:?})"
        );
    }
}
