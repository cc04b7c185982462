//! Migration progress, updated by the engine with atomics and read by the API thread at any time
//! without waiting for the migration thread. Also carries the cancel request.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::device::DeviceMigrationRecord;
use super::steps::TimedStep;
use crate::dirty::SourceKind;

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationStatus {
    /// Nothing started.
    None,
    /// Connecting, exchanging config.
    Setup,
    /// Pre-copy iterations.
    Active,
    /// VM paused, final copy and state.
    Completing,
    /// Done; the destination runs the guest.
    Completed,
    /// Failed; see `error`. The source VM runs.
    Failed,
    /// Cancelled by the user. The source VM runs.
    Cancelled,
    /// The link died at the one point of the switchover that cannot be decided (between the
    /// destination's Ready and the source's Commit reaching it, or the Commit's ack): this side
    /// cannot know whether the other runs the VM, so its VM stays paused until the operator
    /// resumes it on one side.
    InDoubt,
}

impl MigrationStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => MigrationStatus::Setup,
            2 => MigrationStatus::Active,
            3 => MigrationStatus::Completing,
            4 => MigrationStatus::Completed,
            5 => MigrationStatus::Failed,
            6 => MigrationStatus::Cancelled,
            7 => MigrationStatus::InDoubt,
            _ => MigrationStatus::None,
        }
    }

    /// True for completed, failed, cancelled and in doubt: the migration thread has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed
                | MigrationStatus::Failed
                | MigrationStatus::Cancelled
                | MigrationStatus::InDoubt
        )
    }
}

/// Dirty pages reported per source kind (cumulative; a page reported by two kinds counts twice
/// here but is sent once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyPagesBySource {
    /// KVM dirty log / ring.
    pub kvm: u64,
    /// VMM-side writes.
    pub vmm: u64,
    /// Device DMA.
    pub dma: u64,
}

/// Which pass over guest memory an [`IterationRecord`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PassKind {
    /// Iteration 0: every page (never-written memory as zero markers).
    Full,
    /// A pre-copy iteration: the pages dirtied since their last claim.
    Dirty,
    /// The switchover pass, with vCPUs and devices stopped.
    Final,
}

/// One pass over guest memory, as the history in `GET vm.migration` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IterationRecord {
    /// Iteration number (0 = the full pass).
    pub iteration: u64,
    /// Which pass.
    pub pass: PassKind,
    /// Pages sent (data and zero markers), each once however many sources reported it.
    pub pages_sent: u64,
    /// Bytes put on the wire during the pass.
    pub bytes_sent: u64,
    /// Wall time of the pass in ms.
    pub duration_ms: u64,
    /// Dirty pages claimed per source kind during the pass (a page two kinds reported counts for
    /// both).
    pub dirty_pages: DirtyPagesBySource,
    /// DMA dirty pages claimed per tracking domain (its label names the devices).
    pub dma_pages_by_source: BTreeMap<String, u64>,
    /// Expected downtime estimated before the pass, in ms: 0 for the full pass; for the final
    /// pass, the estimate that decided the switchover.
    pub expected_downtime_ms: u64,
    /// Bandwidth the estimate used, bytes/s.
    pub bandwidth_bytes_per_sec: u64,
    /// Auto-converge vCPU throttle in force at the end of the pass, in percent.
    pub throttle_percent: u64,
}

/// Where the switchover's time went, source side, in µs from the pause to the destination's
/// ack (the downtime). The steps follow each other, so they add up to about the downtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverBreakdown {
    /// vCPUs paused, device DMA stopped, devices to STOP_COPY.
    pub pause_us: u64,
    /// The dirty sources' final sync (e.g. KVM_GET_DIRTY_LOG).
    pub final_sync_us: u64,
    /// The final pass's claims (KVM clear, DMA read-and-clear, VMM writes), summed.
    pub final_claim_us: u64,
    /// Chunks the final pass claimed: every chunk when a source cannot peek, else the dirty ones.
    pub final_claimed_chunks: u64,
    /// The final pass and the devices' final state, claims included.
    pub final_pass_us: u64,
    /// vCPU, VM and device state saved.
    pub state_save_us: u64,
    /// State frames queued and every lane drained to the destination.
    pub send_us: u64,
    /// Complete → Ready: the destination restored memory, state and devices.
    pub destination_restore_us: u64,
    /// Commit → Ack: the destination started the VM.
    pub destination_start_us: u64,
    /// Pre-copy data still queued on the lanes when the vCPUs paused (it would go out with the
    /// guest stopped): the source lets it drain before it pauses, so this is 0.
    pub queued_at_pause_bytes: u64,
}

/// Most passes kept in the history (the oldest are dropped beyond this).
pub const HISTORY_LIMIT: usize = 1024;

/// A plain copy of the stats at one instant (what `GET vm.migration` returns).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatsSnapshot {
    /// Status.
    pub status: MigrationStatus,
    /// Pre-copy iteration (0 = full copy).
    pub iteration: u64,
    /// Guest memory size in bytes.
    pub total_bytes: u64,
    /// Bytes put on the wire so far (frames, headers included).
    pub transferred_bytes: u64,
    /// Dirty bytes still to send, as of the last plan.
    pub remaining_bytes: u64,
    /// Measured link bandwidth in bytes per second.
    pub bandwidth_bytes_per_sec: u64,
    /// Pages dirtied per second in the last iteration.
    pub dirty_pages_per_sec: u64,
    /// Dirty pages per source kind.
    pub dirty_pages: DirtyPagesBySource,
    /// DMA dirty pages per tracking domain (cumulative; the label names the devices).
    pub dma_pages_by_source: BTreeMap<String, u64>,
    /// One record per finished pass over guest memory.
    pub history: Vec<IterationRecord>,
    /// Pages sent as data.
    pub data_pages: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Page data the kernel sent straight from the guest memory file (`sendfile`, no copy on
    /// the source), in bytes; the rest of the data pages were copied from the mapping.
    pub sent_from_file_bytes: u64,
    /// Pages (data and zero markers) of the memory batches a lane's read-ahead thread prepared
    /// (zero check, sums) while the lane was sending the batch before; lanes prepared the rest.
    pub read_ahead_pages: u64,
    /// Destination: the guest memory the source said it has populated and will send as data
    /// (its [`Frame::Populated`](crate::protocol::Frame::Populated) hint), in bytes.
    pub populated_hint_bytes: u64,
    /// Destination: of that, the bytes a helper faulted in ahead of their data
    /// (`engine::prefault`); the receiver faulted in the rest as the data arrived.
    pub prefaulted_bytes: u64,
    /// Expected downtime if switching over now, in ms.
    pub expected_downtime_ms: u64,
    /// The downtime limit the source switches over under (source side only).
    pub downtime_target_ms: Option<u64>,
    /// Current auto-converge throttle in percent.
    pub throttle_percent: u64,
    /// Measured downtime (pause → destination ack), once completed.
    pub downtime_ms: Option<u64>,
    /// Source: when its vCPUs were paused for the switchover, µs since the Unix epoch (wall
    /// clock, so that another process on the host, or another VMM, can be compared with it).
    pub paused_at_unix_us: Option<u64>,
    /// Destination: when its vCPUs started running the guest, µs since the Unix epoch.
    pub resumed_at_unix_us: Option<u64>,
    /// Time since start (running) or start → end (finished), in ms.
    pub total_time_ms: u64,
    /// Time from start to the first memory frame, in ms.
    pub setup_time_ms: Option<u64>,
    /// Error chain of a failed migration.
    pub error: Option<String>,
    /// Devices whose own state migrated (VFIO migration v2).
    pub devices: Vec<DeviceMigrationRecord>,
    /// Where the switchover's time went (source side, once completed).
    pub switchover: Option<SwitchoverBreakdown>,
    /// Where the setup went, step by step, once the destination acknowledged the config: on the
    /// source from the send request to that ack (what it waits for before it may pause), on the
    /// destination from the receive's start to its ack (waiting for the source, config, each part
    /// of the VM build); steps named "alongside: ..." ran on another thread meanwhile.
    pub setup_steps: Vec<TimedStep>,
    /// The switchover step by step, once completed: on the source the VMM's steps inside
    /// `switchover`'s pause and state save; on the destination everything from the source's
    /// Complete to this side's Ack (engine and VMM steps, in order, adding up to that time).
    pub switchover_steps: Vec<TimedStep>,
}

const UNSET: u64 = u64::MAX;

/// Live, lock-free migration statistics plus the cancel flag. Share it as `Arc<MigrationStats>`.
#[derive(Debug)]
pub struct MigrationStats {
    status: AtomicU8,
    cancel: AtomicBool,
    iteration: AtomicU64,
    total_bytes: AtomicU64,
    transferred_bytes: AtomicU64,
    remaining_bytes: AtomicU64,
    bandwidth: AtomicU64,
    dirty_rate: AtomicU64,
    dirty_kvm: AtomicU64,
    dirty_vmm: AtomicU64,
    dirty_dma: AtomicU64,
    data_pages: AtomicU64,
    zero_pages: AtomicU64,
    sent_from_file_bytes: AtomicU64,
    read_ahead_pages: AtomicU64,
    populated_hint_bytes: AtomicU64,
    prefaulted_bytes: AtomicU64,
    expected_downtime_ms: AtomicU64,
    downtime_target_ms: AtomicU64,
    throttle_percent: AtomicU64,
    downtime_ms: AtomicU64,
    start_unix_ms: AtomicU64,
    /// When it ended, in µs since `started` (UNSET while it runs).
    end_us: AtomicU64,
    setup_time_ms: AtomicU64,
    paused_at_unix_us: AtomicU64,
    resumed_at_unix_us: AtomicU64,
    // Written once when a migration fails; readers take the lock only to clone the text.
    error: Mutex<Option<String>>,
    started: Mutex<Option<Instant>>,
    // DMA pages by source label; touched once per DMA claim, read by snapshots.
    dma_by_source: Mutex<BTreeMap<String, u64>>,
    history: Mutex<Vec<IterationRecord>>,
    devices: Mutex<Vec<DeviceMigrationRecord>>,
    switchover: Mutex<Option<SwitchoverBreakdown>>,
    setup_steps: Mutex<Vec<TimedStep>>,
    switchover_steps: Mutex<Vec<TimedStep>>,
}

impl Default for MigrationStats {
    fn default() -> Self {
        Self::new()
    }
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn opt(v: u64) -> Option<u64> {
    (v != UNSET).then_some(v)
}

impl MigrationStats {
    /// Fresh stats, status `none`.
    pub fn new() -> Self {
        MigrationStats {
            status: AtomicU8::new(0),
            cancel: AtomicBool::new(false),
            iteration: AtomicU64::new(0),
            total_bytes: AtomicU64::new(0),
            transferred_bytes: AtomicU64::new(0),
            remaining_bytes: AtomicU64::new(0),
            bandwidth: AtomicU64::new(0),
            dirty_rate: AtomicU64::new(0),
            dirty_kvm: AtomicU64::new(0),
            dirty_vmm: AtomicU64::new(0),
            dirty_dma: AtomicU64::new(0),
            data_pages: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            sent_from_file_bytes: AtomicU64::new(0),
            read_ahead_pages: AtomicU64::new(0),
            populated_hint_bytes: AtomicU64::new(0),
            prefaulted_bytes: AtomicU64::new(0),
            expected_downtime_ms: AtomicU64::new(0),
            downtime_target_ms: AtomicU64::new(UNSET),
            throttle_percent: AtomicU64::new(0),
            downtime_ms: AtomicU64::new(UNSET),
            start_unix_ms: AtomicU64::new(0),
            end_us: AtomicU64::new(UNSET),
            setup_time_ms: AtomicU64::new(UNSET),
            paused_at_unix_us: AtomicU64::new(UNSET),
            resumed_at_unix_us: AtomicU64::new(UNSET),
            error: Mutex::new(None),
            started: Mutex::new(None),
            dma_by_source: Mutex::new(BTreeMap::new()),
            history: Mutex::new(Vec::new()),
            devices: Mutex::new(Vec::new()),
            switchover: Mutex::new(None),
            setup_steps: Mutex::new(Vec::new()),
            switchover_steps: Mutex::new(Vec::new()),
        }
    }

    /// Ask the running migration to stop; the source VM keeps running. Has no effect once the
    /// source has sent Complete.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Was cancel requested?
    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Current status.
    pub fn status(&self) -> MigrationStatus {
        MigrationStatus::from_u8(self.status.load(Ordering::SeqCst))
    }

    /// Stats for a migration the API has just accepted: `setup` from the start. The engine's
    /// thread calls `begin` a moment later; until then a status query must not read `none`, which
    /// says no migration has run (`ternctl migration-status --watch` right after
    /// `send-migration` failed on it, about one hop in 20 of `scripts/soak`).
    pub fn starting() -> Self {
        let s = Self::new();
        s.set_status(MigrationStatus::Setup);
        s
    }

    pub(crate) fn begin(&self, total_bytes: u64) {
        self.cancel.store(false, Ordering::SeqCst);
        for a in [
            &self.iteration,
            &self.transferred_bytes,
            &self.remaining_bytes,
            &self.bandwidth,
            &self.dirty_rate,
            &self.dirty_kvm,
            &self.dirty_vmm,
            &self.dirty_dma,
            &self.data_pages,
            &self.zero_pages,
            &self.sent_from_file_bytes,
            &self.read_ahead_pages,
            &self.populated_hint_bytes,
            &self.prefaulted_bytes,
            &self.expected_downtime_ms,
            &self.throttle_percent,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        self.downtime_ms.store(UNSET, Ordering::Relaxed);
        self.downtime_target_ms.store(UNSET, Ordering::Relaxed);
        self.end_us.store(UNSET, Ordering::Relaxed);
        self.setup_time_ms.store(UNSET, Ordering::Relaxed);
        self.paused_at_unix_us.store(UNSET, Ordering::Relaxed);
        self.resumed_at_unix_us.store(UNSET, Ordering::Relaxed);
        self.total_bytes.store(total_bytes, Ordering::Relaxed);
        self.start_unix_ms.store(unix_ms(), Ordering::Relaxed);
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        *self.switchover.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.setup_steps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.switchover_steps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.dma_by_source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.set_status(MigrationStatus::Setup);
    }

    pub(crate) fn set_status(&self, s: MigrationStatus) {
        self.status.store(s as u8, Ordering::SeqCst);
    }

    pub(crate) fn set_total_bytes(&self, v: u64) {
        self.total_bytes.store(v, Ordering::Relaxed);
    }

    fn elapsed_ms(&self) -> u64 {
        let started = *self.started.lock().unwrap_or_else(|p| p.into_inner());
        started
            .map(|s| u64::try_from(s.elapsed().as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    pub(crate) fn mark_setup_done(&self) {
        if self.setup_time_ms.load(Ordering::Relaxed) == UNSET {
            self.setup_time_ms
                .store(self.elapsed_ms(), Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot_iteration(&self) -> u64 {
        self.iteration.load(Ordering::Relaxed)
    }

    /// The latest downtime estimate and the bandwidth it used (bytes/s).
    pub(crate) fn latest_estimate(&self) -> (u64, u64) {
        (
            self.expected_downtime_ms.load(Ordering::Relaxed),
            self.bandwidth.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn set_iteration(&self, v: u64) {
        self.iteration.store(v, Ordering::Relaxed);
    }

    pub(crate) fn add_transferred(&self, bytes: u64) {
        self.transferred_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes put on the wire so far (cheap: no snapshot).
    pub fn transferred_bytes(&self) -> u64 {
        self.transferred_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn set_populated_hint(&self, bytes: u64) {
        self.populated_hint_bytes.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn set_prefaulted(&self, bytes: u64) {
        self.prefaulted_bytes.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add_read_ahead(&self, pages: u64) {
        self.read_ahead_pages.fetch_add(pages, Ordering::Relaxed);
    }

    pub(crate) fn add_sent_from_file(&self, bytes: u64) {
        self.sent_from_file_bytes
            .fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add_pages(&self, data: u64, zero: u64) {
        self.data_pages.fetch_add(data, Ordering::Relaxed);
        self.zero_pages.fetch_add(zero, Ordering::Relaxed);
    }

    pub(crate) fn set_remaining(&self, bytes: u64) {
        self.remaining_bytes.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn set_bandwidth(&self, bytes_per_sec: u64) {
        self.bandwidth.store(bytes_per_sec, Ordering::Relaxed);
    }

    pub(crate) fn set_dirty_rate(&self, pages_per_sec: u64) {
        self.dirty_rate.store(pages_per_sec, Ordering::Relaxed);
    }

    pub(crate) fn add_dirty(&self, kind: SourceKind, label: &str, pages: u64) {
        let a = match kind {
            SourceKind::Kvm => &self.dirty_kvm,
            SourceKind::Vmm => &self.dirty_vmm,
            SourceKind::Dma => &self.dirty_dma,
        };
        a.fetch_add(pages, Ordering::Relaxed);
        if kind == SourceKind::Dma {
            *self
                .dma_by_source
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(label.to_owned())
                .or_insert(0) += pages;
        }
    }

    pub(crate) fn push_history(&self, record: IterationRecord) {
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if h.len() >= HISTORY_LIMIT {
            h.remove(0);
        }
        h.push(record);
    }

    /// Records (or replaces) one device's figures.
    pub(crate) fn set_device(&self, record: &DeviceMigrationRecord) {
        let mut d = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        match d.iter_mut().find(|r| r.id == record.id) {
            Some(r) => *r = record.clone(),
            None => d.push(record.clone()),
        }
    }

    pub(crate) fn set_expected_downtime(&self, ms: u64) {
        self.expected_downtime_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn set_downtime_target(&self, ms: u64) {
        self.downtime_target_ms.store(ms, Ordering::Relaxed);
    }

    /// The auto-converge throttle now, in percent.
    pub(crate) fn throttle_percent(&self) -> u64 {
        self.throttle_percent.load(Ordering::Relaxed)
    }

    pub(crate) fn set_throttle(&self, percent: u8) {
        self.throttle_percent
            .store(u64::from(percent), Ordering::Relaxed);
    }

    pub(crate) fn set_switchover(&self, b: SwitchoverBreakdown) {
        *self.switchover.lock().unwrap_or_else(|p| p.into_inner()) = Some(b);
    }

    pub(crate) fn set_switchover_steps(&self, steps: Vec<TimedStep>) {
        *self
            .switchover_steps
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = steps;
    }

    pub(crate) fn set_setup_steps(&self, steps: &[TimedStep]) {
        *self.setup_steps.lock().unwrap_or_else(|p| p.into_inner()) = steps.to_vec();
    }

    pub(crate) fn set_downtime(&self, ms: u64) {
        self.downtime_ms.store(ms, Ordering::Relaxed);
    }

    /// The source's vCPUs have just been paused for the switchover.
    pub(crate) fn mark_paused(&self) {
        self.paused_at_unix_us.store(unix_us(), Ordering::Relaxed);
    }

    /// The destination's vCPUs have just started running the guest.
    pub(crate) fn mark_resumed(&self) {
        self.resumed_at_unix_us.store(unix_us(), Ordering::Relaxed);
    }

    /// The migration is over from here on (the source has the destination's final ack): what
    /// follows (closing connections, joining threads) is not part of its total time, as in QEMU.
    /// Only the first call counts; [`MigrationStats::finish`] makes it if nothing did.
    pub(crate) fn mark_end(&self) {
        let started = *self.started.lock().unwrap_or_else(|p| p.into_inner());
        let us = started.map_or(0, |s| {
            u64::try_from(s.elapsed().as_micros()).unwrap_or(u64::MAX - 1)
        });
        let _ = self
            .end_us
            .compare_exchange(UNSET, us, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Record the end of a migration: final status and, on failure, the error text.
    pub(crate) fn finish(&self, status: MigrationStatus, error: Option<String>) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = error;
        self.mark_end();
        self.set_status(status);
    }

    /// A consistent-enough copy for display; never blocks on the migration thread.
    pub fn snapshot(&self) -> MigrationStatsSnapshot {
        let start = self.start_unix_ms.load(Ordering::Relaxed);
        let total_time_ms = match opt(self.end_us.load(Ordering::Relaxed)) {
            Some(end_us) => end_us / 1000,
            None if start == 0 => 0,
            None => self.elapsed_ms(),
        };
        MigrationStatsSnapshot {
            status: self.status(),
            iteration: self.iteration.load(Ordering::Relaxed),
            total_bytes: self.total_bytes.load(Ordering::Relaxed),
            transferred_bytes: self.transferred_bytes.load(Ordering::Relaxed),
            remaining_bytes: self.remaining_bytes.load(Ordering::Relaxed),
            bandwidth_bytes_per_sec: self.bandwidth.load(Ordering::Relaxed),
            dirty_pages_per_sec: self.dirty_rate.load(Ordering::Relaxed),
            dirty_pages: DirtyPagesBySource {
                kvm: self.dirty_kvm.load(Ordering::Relaxed),
                vmm: self.dirty_vmm.load(Ordering::Relaxed),
                dma: self.dirty_dma.load(Ordering::Relaxed),
            },
            dma_pages_by_source: self
                .dma_by_source
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            history: self
                .history
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            data_pages: self.data_pages.load(Ordering::Relaxed),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
            sent_from_file_bytes: self.sent_from_file_bytes.load(Ordering::Relaxed),
            read_ahead_pages: self.read_ahead_pages.load(Ordering::Relaxed),
            populated_hint_bytes: self.populated_hint_bytes.load(Ordering::Relaxed),
            prefaulted_bytes: self.prefaulted_bytes.load(Ordering::Relaxed),
            expected_downtime_ms: self.expected_downtime_ms.load(Ordering::Relaxed),
            downtime_target_ms: opt(self.downtime_target_ms.load(Ordering::Relaxed)),
            throttle_percent: self.throttle_percent.load(Ordering::Relaxed),
            downtime_ms: opt(self.downtime_ms.load(Ordering::Relaxed)),
            paused_at_unix_us: opt(self.paused_at_unix_us.load(Ordering::Relaxed)),
            resumed_at_unix_us: opt(self.resumed_at_unix_us.load(Ordering::Relaxed)),
            total_time_ms,
            setup_time_ms: opt(self.setup_time_ms.load(Ordering::Relaxed)),
            error: self.error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            devices: self
                .devices
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            switchover: *self.switchover.lock().unwrap_or_else(|p| p.into_inner()),
            setup_steps: self
                .setup_steps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            switchover_steps: self
                .switchover_steps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starting_stats_read_setup_not_none() {
        assert_eq!(MigrationStats::starting().status(), MigrationStatus::Setup);
        assert_eq!(MigrationStats::new().status(), MigrationStatus::None);
    }

    #[test]
    fn snapshot_reflects_updates_and_serializes_snake_case() {
        let s = MigrationStats::new();
        assert_eq!(s.snapshot().status, MigrationStatus::None);
        s.begin(1 << 30);
        s.add_dirty(SourceKind::Dma, "hwpt 3: edu0", 5);
        s.add_dirty(SourceKind::Kvm, "kvm-log", 7);
        s.add_transferred(100);
        s.add_transferred(23);
        s.set_status(MigrationStatus::Active);
        let snap = s.snapshot();
        assert_eq!(snap.status, MigrationStatus::Active);
        assert_eq!(snap.transferred_bytes, 123);
        assert_eq!(
            snap.dirty_pages,
            DirtyPagesBySource {
                kvm: 7,
                vmm: 0,
                dma: 5
            }
        );
        assert_eq!(snap.dma_pages_by_source.get("hwpt 3: edu0"), Some(&5));
        assert_eq!(
            snap.dma_pages_by_source.len(),
            1,
            "only DMA sources are listed"
        );
        assert_eq!(snap.downtime_ms, None);
        let json = serde_json::to_value(&snap).expect("serializes");
        assert_eq!(json["status"], "active");
        assert_eq!(json["dirty_pages"]["dma"], 5);
        s.finish(
            MigrationStatus::Failed,
            Some("destination reported: boom".into()),
        );
        let snap = s.snapshot();
        assert!(snap.status.is_final());
        assert_eq!(snap.error.as_deref(), Some("destination reported: boom"));
    }

    #[test]
    fn begin_resets_previous_run_and_cancel() {
        let s = MigrationStats::new();
        s.begin(10);
        s.add_transferred(5);
        s.cancel();
        s.set_downtime(3);
        s.finish(
            MigrationStatus::Cancelled,
            Some("migration cancelled".into()),
        );
        s.begin(20);
        let snap = s.snapshot();
        assert!(!s.cancel_requested());
        assert_eq!(snap.transferred_bytes, 0);
        assert_eq!(snap.downtime_ms, None);
        assert_eq!(snap.error, None);
        assert_eq!(snap.status, MigrationStatus::Setup);
    }
}
