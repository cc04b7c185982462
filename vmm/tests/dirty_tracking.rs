//! KVM dirty tracking on this host's real /dev/kvm, driven by the demo guest.
//!
//! The demo guest's vCPUs each rewrite their partition of the working set page after page; the
//! VMM reads each vCPU's write cursor and write counter from the guest's parameter block (layout in
//! guests/demo/demo.S: slot i at PARAMS_GPA + 0x100 + i * 0x80, S_WRITTEN at 0x10, S_FIRST 0x28,
//! S_COUNT 0x30, S_WCUR 0x48), so each test knows exactly which pages the guest wrote between two
//! pauses and checks the source against that.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use tern_migration::dirty::{DirtyBitmap, DirtySource, GpaRange, PAGE_SIZE};
use tern_vmm::config::{DirtyTracking, PayloadConfig, SerialConfig, VmConfig};
use tern_vmm::demo::setup::{layout, DemoLayout, PARAMS_GPA};
use tern_vmm::demo::DemoConfig;
use tern_vmm::dirty::kvm_ring::RING_ENTRIES;
use tern_vmm::dirty::{kvm_dirty_source, KvmDirtyLog, LogMode};
use tern_vmm::machine::Machine;
use vm_memory::{Bytes, GuestAddress};

const RAM_BYTES: u64 = 256 << 20;
const CPUS: u8 = 2;

fn machine(mib: u64, dirty_mib_per_s: u64, tracking: DirtyTracking) -> (Machine, DemoLayout) {
    let demo = DemoConfig {
        mib,
        dirty_mib_per_s,
        exit_after_s: None,
    };
    let config = VmConfig {
        cpus: CPUS,
        memory_bytes: RAM_BYTES,
        payload: PayloadConfig::Demo(demo.clone()),
        serial: SerialConfig::Off,
        dirty_tracking: tracking,
        devices: Vec::new(),
        mock_dma: Vec::new(),
    };
    let m = Machine::create(Path::new("/dev/kvm"), config).expect("create demo machine");
    let l = layout(&demo, m.ram().low_ram_end()).expect("demo layout");
    (m, l)
}

/// Per vCPU: (first global page, page count, write cursor, pages written so far).
fn cursors(m: &Machine) -> Vec<(u64, u64, u64, u64)> {
    (0..u64::from(CPUS))
        .map(|cpu| {
            let slot = PARAMS_GPA + 0x100 + cpu * 0x80;
            let r =
                |off: u64| -> u64 { m.ram().memory().read_obj(GuestAddress(slot + off)).unwrap() };
            (r(0x28), r(0x30), r(0x48), r(0x10))
        })
        .collect()
}

/// GPAs of the working-set pages written between two cursor readings.
fn written_between(
    l: &DemoLayout,
    before: &[(u64, u64, u64, u64)],
    after: &[(u64, u64, u64, u64)],
) -> BTreeSet<u64> {
    let mut pages = BTreeSet::new();
    for (b, a) in before.iter().zip(after) {
        let (first, count, wcur, written) = *b;
        let n = (a.3 - written).min(count);
        for k in 0..n {
            let p = first + (wcur + k) % count;
            pages.insert(l.working_set + p * PAGE_SIZE);
        }
    }
    pages
}

fn whole_ram(m: &Machine) -> Vec<GpaRange> {
    m.ram()
        .ranges()
        .iter()
        .map(|r| GpaRange::new(r.gpa, r.len))
        .collect()
}

/// A bitmap over twice the guest's RAM span, so bits outside RAM would show.
fn wide_bitmap(m: &Machine) -> DirtyBitmap {
    let end = m
        .ram()
        .ranges()
        .iter()
        .map(|r| r.gpa.0 + r.len)
        .max()
        .unwrap();
    DirtyBitmap::new(GuestAddress(0), end * 2).unwrap()
}

fn peek_all(m: &Machine, src: &mut dyn DirtySource) -> DirtyBitmap {
    let mut out = wide_bitmap(m);
    for r in whole_ram(m) {
        assert!(src.peek(r, &mut out).unwrap(), "KVM sources can peek");
    }
    out
}

fn claim_all(m: &Machine, src: &mut dyn DirtySource) -> DirtyBitmap {
    let mut out = wide_bitmap(m);
    for r in whole_ram(m) {
        src.claim(r, &mut out).unwrap();
    }
    out
}

fn dirty_gpas(b: &DirtyBitmap) -> BTreeSet<u64> {
    b.iter_pages().map(|p| b.base().0 + p * PAGE_SIZE).collect()
}

fn in_ram(m: &Machine, gpa: u64) -> bool {
    m.ram()
        .ranges()
        .iter()
        .any(|r| gpa >= r.gpa.0 && gpa < r.gpa.0 + r.len)
}

fn run_for(m: &Machine, d: Duration) {
    m.resume();
    std::thread::sleep(d);
    m.pause();
}

/// At most 8 GPAs of `set`, for failure messages.
fn some(set: &BTreeSet<u64>) -> String {
    let first: Vec<String> = set.iter().take(8).map(|g| format!("{g:#x}")).collect();
    format!("{} pages, first {}", set.len(), first.join(" "))
}

/// Runs the guest until every vCPU has completed `passes` verification passes over its
/// partition (S_PASSES at 0x08 of its parameter slot), or `limit` elapses; then pauses.
fn run_until_passes(m: &Machine, passes: u64, limit: Duration) {
    let t = std::time::Instant::now();
    m.resume();
    while t.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(20));
        let done = (0..u64::from(CPUS)).all(|cpu| {
            let at = GuestAddress(PARAMS_GPA + 0x100 + cpu * 0x80 + 0x08);
            m.ram().memory().read_obj::<u64>(at).unwrap_or(0) >= passes
        });
        if done {
            break;
        }
    }
    m.pause();
}

/// Runs the guest until every vCPU has written at least `pages` pages since `before`, or
/// `limit` elapses (slow hosts such as the nested lab); then pauses.
fn run_until_written(m: &Machine, before: &[(u64, u64, u64, u64)], pages: u64, limit: Duration) {
    let t = std::time::Instant::now();
    m.resume();
    std::thread::sleep(Duration::from_millis(500));
    while t.elapsed() < limit
        && cursors(m)
            .iter()
            .zip(before)
            .any(|(a, b)| a.3 - b.3 < pages)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    m.pause();
}

fn ws_pages(l: &DemoLayout, gpas: &BTreeSet<u64>) -> BTreeSet<u64> {
    gpas.range(l.working_set..l.end).copied().collect()
}

/// What a test runs against: the VM's configured source, or the dirty log forced into its
/// get-and-clear fallback (what hosts without manual protection get).
#[derive(Debug, Clone, Copy)]
enum Mode {
    Log,
    LogGetAndClear,
    Ring,
}

impl Mode {
    fn tracking(self) -> DirtyTracking {
        match self {
            Mode::Log | Mode::LogGetAndClear => DirtyTracking::Log,
            Mode::Ring => DirtyTracking::Ring,
        }
    }
}

fn source(m: &Machine, mode: Mode) -> Box<dyn DirtySource> {
    match mode {
        Mode::LogGetAndClear => Box::new(KvmDirtyLog::new_get_and_clear(m.vm_shared(), m.ram())),
        Mode::Log | Mode::Ring => kvm_dirty_source(m).expect("KVM dirty source"),
    }
}

/// Start the source and claim everything once (the engine's iteration 0), with the VM paused.
fn started(m: &Machine, mode: Mode) -> Box<dyn DirtySource> {
    let mut src = source(m, mode);
    src.start().expect("start dirty tracking");
    claim_all(m, src.as_mut());
    src.sync().unwrap();
    src
}

fn sync_covers_written_pages_and_stays_in_ram(mode: Mode) {
    let (m, l) = machine(1, 64, mode.tracking());
    let mut src = started(&m, mode);
    // The VM never ran and everything was claimed: nothing may be dirty.
    let before_run = dirty_gpas(&peek_all(&m, src.as_mut()));
    assert!(
        before_run.is_empty(),
        "{} pages dirty before the guest ran",
        before_run.len()
    );

    let c0 = cursors(&m);
    run_for(&m, Duration::from_millis(300));
    let c1 = cursors(&m);
    let written = written_between(&l, &c0, &c1);
    assert!(
        written.len() > 16,
        "guest wrote only {} pages",
        written.len()
    );
    src.sync().unwrap();
    let dirty = dirty_gpas(&peek_all(&m, src.as_mut()));
    let missing: Vec<_> = written.difference(&dirty).take(8).collect();
    assert!(missing.is_empty(), "written but not reported: {missing:x?}");
    let outside: Vec<_> = dirty.iter().filter(|&&g| !in_ram(&m, g)).take(8).collect();
    assert!(outside.is_empty(), "reported outside RAM: {outside:x?}");
    src.stop().unwrap();
}

fn write_after_claim_is_reported_again(mode: Mode) {
    // 1 MiB working set at 64 MiB/s: the guest rewrites every page many times per run.
    let (m, l) = machine(1, 64, mode.tracking());
    let mut src = started(&m, mode);
    run_for(&m, Duration::from_millis(200));
    src.sync().unwrap();
    let first = ws_pages(&l, &dirty_gpas(&claim_all(&m, src.as_mut())));
    assert!(!first.is_empty());
    // Claimed and the VM paused: nothing left, neither in the snapshot nor at the kernel.
    src.sync().unwrap();
    let after_claim = dirty_gpas(&peek_all(&m, src.as_mut()));
    assert!(
        ws_pages(&l, &after_claim).is_empty(),
        "claimed pages still reported: {}",
        after_claim.len()
    );

    let c0 = cursors(&m);
    run_for(&m, Duration::from_millis(200));
    let c1 = cursors(&m);
    let written = written_between(&l, &c0, &c1);
    let rewritten: BTreeSet<_> = written.intersection(&first).copied().collect();
    assert!(
        !rewritten.is_empty(),
        "the guest rewrote no page claimed before"
    );
    src.sync().unwrap();
    let dirty = dirty_gpas(&peek_all(&m, src.as_mut()));
    let missing: Vec<_> = rewritten.difference(&dirty).take(8).collect();
    assert!(
        missing.is_empty(),
        "rewritten after claim but not reported: {missing:x?}"
    );
    src.stop().unwrap();
}

fn claim_clears_only_requested_chunk(mode: Mode) {
    let (m, l) = machine(2, 256, mode.tracking());
    let mut src = started(&m, mode);
    run_for(&m, Duration::from_millis(300));
    src.sync().unwrap();
    let all = ws_pages(&l, &dirty_gpas(&peek_all(&m, src.as_mut())));
    assert!(all.len() > 256, "guest dirtied only {} pages", all.len());
    // A chunk that is not 64-page aligned at either end, to exercise the word masking.
    let chunk = GpaRange::new(GuestAddress(l.working_set + 3 * PAGE_SIZE), 300 * PAGE_SIZE);
    let in_chunk = |g: &u64| *g >= chunk.start.0 && *g < chunk.end();
    let mut out = DirtyBitmap::new(chunk.start, chunk.len_bytes).unwrap();
    src.claim(chunk, &mut out).unwrap();
    let claimed = dirty_gpas(&out);
    let expect_claimed: BTreeSet<_> = all.iter().copied().filter(in_chunk).collect();
    assert_eq!(
        claimed, expect_claimed,
        "claim hands over exactly the chunk's bits"
    );

    // Re-read the kernel's state (the VM is paused, so nothing new): the chunk is clean, every
    // other page is still reported.
    src.sync().unwrap();
    let now = ws_pages(&l, &dirty_gpas(&peek_all(&m, src.as_mut())));
    let expect_left: BTreeSet<_> = all.iter().copied().filter(|g| !in_chunk(g)).collect();
    assert!(
        now.iter().all(|g| !in_chunk(g)),
        "claimed chunk reported again without a write"
    );
    assert_eq!(
        now, expect_left,
        "pages outside the chunk must stay reported"
    );
    src.stop().unwrap();
}

fn idle_guest_reports_no_working_set_pages(mode: Mode) {
    let (m, l) = machine(4, 0, mode.tracking());
    // A real (non-PVM) KVM installs a writable mapping on a read fault and, with logging on,
    // marks the page dirty then: the guest's first ever read of a page counts as a write. Let the
    // verifier read every page once before tracking starts (it never writes: mib rate 0).
    run_until_passes(&m, 1, Duration::from_secs(30));
    let mut src = started(&m, mode);
    run_for(&m, Duration::from_millis(300));
    let c = cursors(&m);
    assert!(c.iter().all(|c| c.3 == 0), "idle guest wrote pages: {c:?}");
    src.sync().unwrap();
    let dirty = dirty_gpas(&claim_all(&m, src.as_mut()));
    assert!(
        ws_pages(&l, &dirty).is_empty(),
        "idle working set reported dirty: {}",
        some(&ws_pages(&l, &dirty))
    );
    // Parameter block and stacks are written on every loop; a handful of pages, not the guest.
    assert!(
        !dirty.is_empty(),
        "the guest's own bookkeeping pages must show up"
    );
    assert!(
        dirty.len() < 64,
        "{} pages dirty in an idle guest",
        dirty.len()
    );
    src.stop().unwrap();
}

#[test]
fn log_sync_covers_written_pages_and_stays_in_ram() {
    sync_covers_written_pages_and_stays_in_ram(Mode::Log);
}

#[test]
fn log_write_after_claim_is_reported_again() {
    write_after_claim_is_reported_again(Mode::Log);
}

#[test]
fn log_claim_clears_only_requested_chunk() {
    claim_clears_only_requested_chunk(Mode::Log);
}

#[test]
fn log_idle_guest_reports_no_working_set_pages() {
    idle_guest_reports_no_working_set_pages(Mode::Log);
}

#[test]
fn log_source_refuses_use_before_start() {
    let (m, _) = machine(1, 0, DirtyTracking::Log);
    let mut src = kvm_dirty_source(&m).unwrap();
    let mut out = wide_bitmap(&m);
    assert!(src.sync().is_err());
    assert!(src.claim(whole_ram(&m)[0], &mut out).is_err());
}

#[test]
fn ring_sync_covers_written_pages_and_stays_in_ram() {
    sync_covers_written_pages_and_stays_in_ram(Mode::Ring);
}

#[test]
fn ring_write_after_claim_is_reported_again() {
    write_after_claim_is_reported_again(Mode::Ring);
}

#[test]
fn ring_claim_clears_only_requested_chunk() {
    claim_clears_only_requested_chunk(Mode::Ring);
}

#[test]
fn ring_idle_guest_reports_no_working_set_pages() {
    idle_guest_reports_no_working_set_pages(Mode::Ring);
}

#[test]
fn ring_full_exits_are_harvested_and_the_guest_keeps_running() {
    // A ring entry is logged on the first write to a page after it was (re-)armed, so the working
    // set must hold more distinct pages per vCPU than a ring has entries: 1.25 rings' worth each,
    // rewritten at 1 GiB/s, and no sync from this thread, so only the vCPUs' own ring-full
    // harvests can keep them running.
    let mib = (RING_ENTRIES * u64::from(CPUS) * PAGE_SIZE * 5 / 4) >> 20;
    let (m, l) = machine(mib, 1024, DirtyTracking::Ring);
    let mode = Mode::Ring;
    let rings = m.dirty_rings().expect("ring mode maps rings").clone();
    let entries = u64::from(rings.entries_per_ring());
    assert!(entries <= RING_ENTRIES);
    let mut src = started(&m, mode);
    let c0 = cursors(&m);
    // Until every vCPU has rewritten its whole partition (more pages than its ring holds).
    let partition = c0.iter().map(|c| c.1).min().unwrap_or(0);
    run_until_written(&m, &c0, partition, Duration::from_secs(120));
    let c1 = cursors(&m);
    let (harvested, full_exits) = rings.counters();
    let written = written_between(&l, &c0, &c1);
    assert!(
        written.len() as u64 > entries * u64::from(CPUS),
        "guest wrote {} distinct pages, not enough to fill {entries}-entry rings",
        written.len()
    );
    assert!(
        full_exits > 0,
        "no ring-full exit after {} distinct page writes",
        written.len()
    );
    assert!(harvested >= entries, "harvested only {harvested} entries");
    src.sync().unwrap();
    let dirty = dirty_gpas(&peek_all(&m, src.as_mut()));
    let missing: Vec<_> = written.difference(&dirty).take(8).collect();
    assert!(missing.is_empty(), "written but not reported: {missing:x?}");
    src.stop().unwrap();
}

#[test]
fn ring_is_refused_before_start_and_log_has_no_rings() {
    let (m, _) = machine(1, 0, DirtyTracking::Ring);
    let mut src = kvm_dirty_source(&m).unwrap();
    assert!(src.sync().is_err());
    let (m, _) = machine(1, 0, DirtyTracking::Log);
    assert!(m.dirty_rings().is_none());
}

/// Ring mode in the nested lab (kernel 6.12 with a real, non-PVM KVM). Run there with
/// `cargo test -p tern-vmm --test dirty_tracking -- --ignored`.
#[test]
#[ignore = "lab: needs the lab kernel's KVM (nested SVM); run with -- --ignored in the lab VM"]
fn lab_ring_and_log_track_the_demo_guest() {
    for t in [Mode::Log, Mode::LogGetAndClear, Mode::Ring] {
        sync_covers_written_pages_and_stays_in_ram(t);
        write_after_claim_is_reported_again(t);
        claim_clears_only_requested_chunk(t);
        idle_guest_reports_no_working_set_pages(t);
    }
}

#[test]
fn get_and_clear_sync_covers_written_pages_and_stays_in_ram() {
    sync_covers_written_pages_and_stays_in_ram(Mode::LogGetAndClear);
}

#[test]
fn get_and_clear_write_after_claim_is_reported_again() {
    write_after_claim_is_reported_again(Mode::LogGetAndClear);
}

#[test]
fn get_and_clear_claim_clears_only_requested_chunk() {
    claim_clears_only_requested_chunk(Mode::LogGetAndClear);
}

#[test]
fn get_and_clear_idle_guest_reports_no_working_set_pages() {
    idle_guest_reports_no_working_set_pages(Mode::LogGetAndClear);
}

/// The engine's iteration 0 claims every chunk right after `start`, with no `sync` in between.
/// Under INITIALLY_SET that first claim must take (and clear at KVM) every RAM page, or
/// iteration 1 would resend the whole guest; without it, logging starts clean.
#[test]
fn log_first_claim_after_start_takes_initially_set_bits() {
    let (m, _) = machine(1, 0, DirtyTracking::Log);
    let mode = KvmDirtyLog::new(m.vm_shared(), m.ram()).mode();
    let mut src = kvm_dirty_source(&m).unwrap();
    src.start().unwrap();
    let first = claim_all(&m, src.as_mut());
    let ram_pages: u64 = m.ram().ranges().iter().map(|r| r.len / PAGE_SIZE).sum();
    match mode {
        LogMode::ManualProtect {
            initially_set: true,
        } => assert_eq!(first.count(), ram_pages, "{mode}"),
        _ => assert_eq!(first.count(), 0, "{mode}"),
    }
    src.sync().unwrap();
    assert_eq!(peek_all(&m, src.as_mut()).count(), 0, "the VM never ran");
    src.stop().unwrap();
}
