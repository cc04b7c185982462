//! Fakes for end-to-end engine tests: a "guest" thread dirtying real guest memory, a KVM-like
//! dirty log with manual-clear semantics, a host and a destination factory. The fakes decide
//! ordering only; memory, sockets, frames and vm-memory's dirty bitmap are the real ones.
#![allow(dead_code)]

pub mod device;
pub mod dma;
pub mod proxy;
mod run;

#[allow(unused_imports)]
pub use run::{run, Run};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tern_migration::dirty::GuestPageBitmap;
use tern_migration::dirty::{
    DirtyBitmap, DirtySource, DirtySourceError, GpaRange, SourceKind, VmmWriteSource, PAGE_SIZE,
};
use tern_migration::engine::{
    DeviceStateSink, DeviceStateSource, HostError, LocalRegion, MigrationHost, MigrationState,
    MigrationTarget, MigrationTargetFactory,
};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

pub type Mem = GuestMemoryMmap<GuestPageBitmap>;

/// Two regions: 16 MiB at 0 and 4 MiB at 4 GiB.
pub const REGIONS: [(u64, usize); 2] = [(0, 16 << 20), (1 << 32, 4 << 20)];

pub fn anon_memory() -> Mem {
    anon_memory_of(&REGIONS)
}

pub fn anon_memory_of(regions: &[(u64, usize)]) -> Mem {
    let r: Vec<(GuestAddress, usize)> =
        regions.iter().map(|&(g, l)| (GuestAddress(g), l)).collect();
    GuestMemoryMmap::from_ranges(&r).expect("anonymous guest memory")
}

/// Guest memory backed by one shared file in /dev/shm (memfd stand-in for local mode).
pub fn shared_memory() -> Mem {
    shared_memory_of(&REGIONS)
}

pub fn shared_memory_of(regions: &[(u64, usize)]) -> Mem {
    let total: usize = regions.iter().map(|r| r.1).sum();
    let f = vmm_sys_util::tempfile::TempFile::new_in(std::path::Path::new("/dev/shm"))
        .or_else(|_| vmm_sys_util::tempfile::TempFile::new())
        .expect("temp file")
        .into_file();
    f.set_len(total as u64).expect("size the file");
    map_regions(f, regions).expect("file-backed guest memory")
}

/// `regions` laid out back to back in `file`, mapped shared.
fn map_regions(
    file: std::fs::File,
    regions: &[(u64, usize)],
) -> Result<Mem, vm_memory::mmap::FromRangesError> {
    let f = Arc::new(file);
    let mut off = 0u64;
    let mut v = Vec::new();
    for &(g, l) in regions {
        v.push((
            GuestAddress(g),
            l,
            Some(FileOffset::from_arc(f.clone(), off)),
        ));
        off += l as u64;
    }
    GuestMemoryMmap::from_ranges_with_files(&v)
}

/// Guest memory in one `memfd_secret` file: mappable like a memfd, but the kernel cannot splice
/// from it (no `splice_read`; its pages are not even in the kernel's direct map), so `sendfile`
/// from it is refused. Panics, naming the cause, where the kernel lacks it (CONFIG_SECRETMEM)
/// or RLIMIT_MEMLOCK is below `regions`' total (secret memory is locked memory).
pub fn secret_memory_of(regions: &[(u64, usize)]) -> Mem {
    use std::os::fd::FromRawFd;
    let total: usize = regions.iter().map(|r| r.1).sum();
    // SAFETY: memfd_secret takes a flags word and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_secret, 0) };
    assert!(
        fd >= 0,
        "memfd_secret: {} (this test needs CONFIG_SECRETMEM)",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` was just returned to us and is owned by nothing else.
    let f = unsafe { std::fs::File::from_raw_fd(fd as i32) };
    f.set_len(total as u64)
        .expect("size the secret memory file");
    map_regions(f, regions)
        .unwrap_or_else(|e| panic!("map {total} bytes of secret memory (RLIMIT_MEMLOCK?): {e}"))
}

/// KVM-like dirty log: the guest sets bits after writing; `sync` snapshots without clearing
/// (manual protect); `claim` clears exactly the snapshot bits of the range (KVM_CLEAR_DIRTY_LOG).
#[derive(Debug)]
pub struct FakeKvmLog {
    regions: Vec<(u64, u64, Vec<AtomicU64>)>,
}

impl FakeKvmLog {
    pub fn new(mem: &Mem) -> Arc<Self> {
        Arc::new(FakeKvmLog {
            regions: mem
                .iter()
                .map(|r| {
                    let pages = r.len() / PAGE_SIZE;
                    (
                        r.start_addr().0,
                        r.len(),
                        (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
                    )
                })
                .collect(),
        })
    }

    pub fn mark(&self, gpa: u64) {
        for (base, len, words) in &self.regions {
            if gpa >= *base && gpa < base + len {
                let p = (gpa - base) / PAGE_SIZE;
                words[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::SeqCst);
            }
        }
    }
}

pub struct FakeKvmSource {
    log: Arc<FakeKvmLog>,
    snapshot: Vec<DirtyBitmap>,
    pub fail_claim_after: Option<u64>,
    /// Fail claims made while the guest is paused (the final claim).
    pub fail_when_paused: Option<Arc<GuestCtl>>,
    claims: u64,
}

impl FakeKvmSource {
    pub fn new(log: Arc<FakeKvmLog>) -> Self {
        let snapshot = log
            .regions
            .iter()
            .map(|(b, l, _)| DirtyBitmap::new(GuestAddress(*b), *l).expect("bitmap"))
            .collect();
        FakeKvmSource {
            log,
            snapshot,
            fail_claim_after: None,
            fail_when_paused: None,
            claims: 0,
        }
    }

    fn or_range(
        &mut self,
        range: GpaRange,
        out: &mut DirtyBitmap,
        clear: bool,
    ) -> Result<(), DirtySourceError> {
        for (i, (base, len, words)) in self.log.regions.iter().enumerate() {
            let Some(part) = range.intersect(*base, *len) else {
                continue;
            };
            let snap = &mut self.snapshot[i];
            let first = (part.start.0 - base) / PAGE_SIZE;
            let out_first =
                out.page_of(part.start)
                    .map_err(|source| DirtySourceError::OutputBitmap {
                        kind: SourceKind::Kvm,
                        range,
                        source,
                    })?;
            // Through the snapshot's marked groups, as the real KVM source does: the engine's
            // costs, not the fake's, are what the benches measure.
            let n = part.pages();
            out.or_range_from(out_first, snap, first, n)
                .map_err(|source| DirtySourceError::OutputBitmap {
                    kind: SourceKind::Kvm,
                    range,
                    source,
                })?;
            if clear {
                // KVM_CLEAR_DIRTY_LOG of the claimed bits: out of the live log and the snapshot.
                let taken: Vec<u64> = snap
                    .iter_pages()
                    .filter(|p| (first..first + n).contains(p))
                    .collect();
                for p in taken {
                    words[(p / 64) as usize].fetch_and(!(1 << (p % 64)), Ordering::SeqCst);
                }
                snap.clear_range(first, n);
            }
        }
        Ok(())
    }
}

impl DirtySource for FakeKvmSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Kvm
    }
    fn label(&self) -> &str {
        "fake-kvm"
    }
    fn start(&mut self) -> Result<(), DirtySourceError> {
        Ok(())
    }
    fn stop(&mut self) -> Result<(), DirtySourceError> {
        Ok(())
    }
    fn sync(&mut self) -> Result<(), DirtySourceError> {
        for (i, (_, _, words)) in self.log.regions.iter().enumerate() {
            let w: Vec<u64> = words.iter().map(|a| a.load(Ordering::SeqCst)).collect();
            self.snapshot[i]
                .or_words(0, &w)
                .map_err(|source| DirtySourceError::OutputBitmap {
                    kind: SourceKind::Kvm,
                    range: GpaRange::new(self.snapshot[i].base(), self.snapshot[i].len_bytes()),
                    source,
                })?;
        }
        Ok(())
    }
    fn peek(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<bool, DirtySourceError> {
        self.or_range(range, out, false)?;
        Ok(true)
    }
    fn claim(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError> {
        self.claims += 1;
        let paused = self
            .fail_when_paused
            .as_ref()
            .is_some_and(|c| c.paused.load(Ordering::SeqCst));
        if paused || self.fail_claim_after.is_some_and(|n| self.claims > n) {
            return Err(DirtySourceError::Claim {
                kind: SourceKind::Kvm,
                range,
                source: "injected: KVM_CLEAR_DIRTY_LOG failed (EIO)".into(),
            });
        }
        self.or_range(range, out, true)
    }
}

/// vCPU stand-in: writes `(page index, sequence)` stamps to guest pages.
#[derive(Debug, Default)]
pub struct GuestCtl {
    paused: AtomicBool,
    stop: AtomicBool,
    throttle: AtomicU8,
    pub writes: AtomicU64,
    // Held for each write; pause takes it once so no write is in flight after pause returns.
    cpu: Mutex<()>,
}

pub struct Guest {
    pub ctl: Arc<GuestCtl>,
    handle: Option<JoinHandle<()>>,
}

impl Guest {
    /// Writes to a hot set of `hot_pages` pages in region 0, plus a slow sweep over all memory.
    /// `pause_us` is slept every 32 writes (dirty rate knob).
    pub fn start(
        mem: Mem,
        log: Arc<FakeKvmLog>,
        hot_pages: u64,
        pause_us: u64,
        with_sweep: bool,
    ) -> Self {
        let ctl = Arc::new(GuestCtl::default());
        let c = ctl.clone();
        let all: Vec<(u64, u64)> = mem
            .iter()
            .map(|r| (r.start_addr().0, r.len() / PAGE_SIZE))
            .collect();
        let handle = std::thread::spawn(move || {
            let mut seq: u64 = 0;
            let mut sweep: u64 = 0;
            while !c.stop.load(Ordering::SeqCst) {
                {
                    let _cpu = c.cpu.lock().expect("cpu lock");
                    // hot_pages == 0: an idle guest that never writes.
                    if hot_pages > 0 && !c.paused.load(Ordering::SeqCst) {
                        for _ in 0..32 {
                            seq += 1;
                            let gpa = if with_sweep && seq.is_multiple_of(16) {
                                // Sweep: every page of every region over time.
                                sweep += 1;
                                let mut k = sweep;
                                let mut g = 0;
                                let total: u64 = all.iter().map(|r| r.1).sum();
                                k %= total;
                                for &(b, n) in &all {
                                    if k < n {
                                        g = b + k * PAGE_SIZE;
                                        break;
                                    }
                                    k -= n;
                                }
                                g
                            } else {
                                (seq.wrapping_mul(2_654_435_761) % hot_pages) * PAGE_SIZE
                            };
                            let stamp = [gpa, seq, !seq, gpa ^ seq];
                            let bytes: Vec<u8> =
                                stamp.iter().flat_map(|w| w.to_le_bytes()).collect();
                            let off = (seq % 120) * 32;
                            mem.write_slice(&bytes, GuestAddress(gpa + off))
                                .expect("guest write");
                            log.mark(gpa);
                        }
                        c.writes.fetch_add(32, Ordering::Relaxed);
                    }
                }
                // Throttle p % leaves the guest (100 - p) % of its run time.
                let t = u64::from(c.throttle.load(Ordering::Relaxed)).min(99);
                let us = pause_us * 100 / (100 - t);
                std::thread::sleep(Duration::from_micros(us.max(1)));
            }
        });
        Guest {
            ctl,
            handle: Some(handle),
        }
    }

    pub fn pause(&self) {
        self.ctl.paused.store(true, Ordering::SeqCst);
        drop(self.ctl.cpu.lock().expect("cpu lock"));
    }

    pub fn resume(&self) {
        self.ctl.paused.store(false, Ordering::SeqCst);
    }

    pub fn is_paused(&self) -> bool {
        self.ctl.paused.load(Ordering::SeqCst)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What the host saw, for assertions.
#[derive(Debug, Default)]
pub struct HostLog {
    pub events: Mutex<Vec<String>>,
}

impl HostLog {
    pub fn push(&self, e: impl Into<String>) {
        self.events.lock().expect("log").push(e.into());
    }
    pub fn events(&self) -> Vec<String> {
        self.events.lock().expect("log").clone()
    }
}

pub struct FakeHost {
    pub mem: Mem,
    pub guest: Guest,
    pub log: Arc<HostLog>,
    pub kvm: Arc<FakeKvmLog>,
    pub kvm_fail_claim_after: Option<u64>,
    pub kvm_fail_when_paused: bool,
    /// Answer `populated` from /proc/self/pagemap (else "unknown").
    pub use_populated_hint: bool,
    /// A passthrough device whose DMA the host stops at `pause_devices`.
    pub dma: Option<Arc<dma::FakeDma>>,
    /// More sources handed to the engine as they are (taken by the first `dirty_sources`).
    pub extra_sources: Vec<Box<dyn DirtySource>>,
    /// Devices with state of their own (taken by the first `device_states`).
    pub devices: Vec<Box<dyn DeviceStateSource>>,
    /// `groups_visited()` read at `pause` and at `save_state`: the bitmap work of a switchover.
    pub groups_visited_at: Arc<Mutex<Vec<(&'static str, u64)>>>,
}

impl FakeHost {
    pub fn new(mem: Mem, hot_pages: u64, pause_us: u64) -> Self {
        // Some initial content everywhere so iteration 0 carries data and zero pages.
        for (i, &(g, l)) in REGIONS.iter().enumerate() {
            for p in (0..l as u64 / PAGE_SIZE).step_by(3) {
                mem.write_slice(
                    &[i as u8 + 1, p as u8, 0xee],
                    GuestAddress(g + p * PAGE_SIZE),
                )
                .expect("prefill");
            }
        }
        Self::build(mem, hot_pages, pause_us, true)
    }

    /// No prefill, no sweep: only the first `hot_pages` pages are ever written.
    pub fn hot_set(mem: Mem, hot_pages: u64, pause_us: u64) -> Self {
        Self::build(mem, hot_pages, pause_us, false)
    }

    fn build(mem: Mem, hot_pages: u64, pause_us: u64, with_sweep: bool) -> Self {
        let kvm = FakeKvmLog::new(&mem);
        let guest = Guest::start(mem.clone(), kvm.clone(), hot_pages, pause_us, with_sweep);
        FakeHost {
            mem,
            guest,
            log: Arc::new(HostLog::default()),
            kvm,
            kvm_fail_claim_after: None,
            kvm_fail_when_paused: false,
            use_populated_hint: true,
            dma: None,
            extra_sources: Vec::new(),
            devices: Vec::new(),
            groups_visited_at: Arc::default(),
        }
    }
}

pub fn config_bytes(mem: &Mem, vcpus: u32) -> Vec<u8> {
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    serde_json::to_vec(&(regions, vcpus)).expect("json")
}

impl MigrationHost for FakeHost {
    fn guest_memory(&self) -> Mem {
        self.mem.clone()
    }
    fn config(&mut self) -> Result<Vec<u8>, HostError> {
        Ok(config_bytes(&self.mem, 2))
    }
    fn dirty_sources(&mut self) -> Result<Vec<Box<dyn DirtySource>>, HostError> {
        let mut kvm = FakeKvmSource::new(self.kvm.clone());
        kvm.fail_claim_after = self.kvm_fail_claim_after;
        if self.kvm_fail_when_paused {
            kvm.fail_when_paused = Some(self.guest.ctl.clone());
        }
        let vmm = VmmWriteSource::new(&self.mem).map_err(|e| HostError::new("dirty sources", e))?;
        let mut sources: Vec<Box<dyn DirtySource>> = Vec::new();
        // Listed first on purpose: the engine, not the host, puts KVM's claim before DMA's.
        if let Some(d) = &self.dma {
            sources.push(d.source());
        }
        sources.append(&mut self.extra_sources);
        sources.push(Box::new(kvm));
        sources.push(Box::new(vmm));
        Ok(sources)
    }
    fn populated(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<bool, HostError> {
        if !self.use_populated_hint {
            return Ok(false);
        }
        pagemap_populated(&self.mem, range, out).map_err(|e| HostError::new("read pagemap", e))?;
        Ok(true)
    }
    fn pause(&mut self) -> Result<(), HostError> {
        self.guest.pause();
        self.groups_visited_at
            .lock()
            .expect("lock")
            .push(("pause", tern_migration::dirty::groups_visited()));
        if self.kvm_fail_when_paused {
            // A last guest write just before the vCPUs stopped, so the switchover has a KVM
            // claim to make (it claims only dirty chunks) and the injected failure is reached.
            self.kvm.mark(0);
        }
        self.log.push("pause");
        Ok(())
    }
    fn pause_devices(&mut self) -> Result<(), HostError> {
        if let Some(d) = &self.dma {
            d.pause();
        }
        self.log.push("pause_devices");
        Ok(())
    }
    fn resume(&mut self) -> Result<(), HostError> {
        if let Some(d) = &self.dma {
            d.resume();
        }
        self.guest.resume();
        self.log.push("resume");
        Ok(())
    }
    fn save_state(&mut self) -> Result<MigrationState, HostError> {
        self.groups_visited_at
            .lock()
            .expect("lock")
            .push(("save_state", tern_migration::dirty::groups_visited()));
        self.log.push("save_state");
        Ok(expected_state())
    }
    fn throttle(&mut self, percent: u8) -> Result<(), HostError> {
        self.guest.ctl.throttle.store(percent, Ordering::Relaxed);
        self.log.push(format!("throttle {percent}"));
        Ok(())
    }
    fn device_states(&mut self) -> Result<Vec<Box<dyn DeviceStateSource>>, HostError> {
        Ok(std::mem::take(&mut self.devices))
    }
}

pub fn expected_state() -> MigrationState {
    MigrationState {
        vm: b"vm: irqchip+clock".to_vec(),
        vcpus: vec![(0, vec![0xc0; 700]), (1, vec![0xc1; 700])],
        devices: vec![
            ("serial0".into(), b"\x00\x01raw".to_vec()),
            ("vfio-0000:01:00.0".into(), vec![7; 5000]),
        ],
    }
}

pub struct FakeTarget {
    pub mem: Mem,
    pub restored: Arc<Mutex<Option<MigrationState>>>,
    pub started: Arc<AtomicBool>,
    fail_start: bool,
    sinks: Vec<Box<dyn DeviceStateSink>>,
}

impl MigrationTarget for FakeTarget {
    fn guest_memory(&self) -> Mem {
        self.mem.clone()
    }
    fn restore_state(&mut self, state: MigrationState) -> Result<(), HostError> {
        *self.restored.lock().expect("lock") = Some(state);
        Ok(())
    }
    fn start(&mut self) -> Result<(), HostError> {
        if self.fail_start {
            return Err(HostError::new("start", "injected: vCPU creation failed"));
        }
        self.started.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn device_sinks(&mut self) -> Result<Vec<Box<dyn DeviceStateSink>>, HostError> {
        Ok(std::mem::take(&mut self.sinks))
    }
}

#[derive(Default)]
pub struct FakeFactory {
    pub fail_create: bool,
    pub fail_start: bool,
    pub got_local_regions: usize,
    /// Shared with the target it builds.
    pub restored: Arc<Mutex<Option<MigrationState>>>,
    pub started: Arc<AtomicBool>,
    /// Handed to the (first) target it builds.
    pub sinks: Vec<Box<dyn DeviceStateSink>>,
}

impl MigrationTargetFactory for FakeFactory {
    fn create(
        &mut self,
        config: &[u8],
        local: Vec<LocalRegion>,
    ) -> Result<Box<dyn MigrationTarget>, HostError> {
        if self.fail_create {
            return Err(HostError::new(
                "build from config",
                "injected: not enough memory",
            ));
        }
        let (regions, _vcpus): (Vec<(u64, u64)>, u32) =
            serde_json::from_slice(config).map_err(|e| HostError::new("parse config", e))?;
        self.got_local_regions = local.len();
        let mem = if local.is_empty() {
            let r: Vec<(GuestAddress, usize)> = regions
                .iter()
                .map(|&(g, l)| (GuestAddress(g), l as usize))
                .collect();
            GuestMemoryMmap::from_ranges(&r).map_err(|e| HostError::new("allocate memory", e))?
        } else {
            let files: BTreeMap<u64, LocalRegion> =
                local.into_iter().map(|l| (l.gpa.0, l)).collect();
            let v: Vec<(GuestAddress, usize, Option<FileOffset>)> = files
                .into_values()
                .map(|l| {
                    (
                        l.gpa,
                        l.len_bytes as usize,
                        Some(FileOffset::new(l.file, l.file_offset)),
                    )
                })
                .collect();
            GuestMemoryMmap::from_ranges_with_files(&v)
                .map_err(|e| HostError::new("map memfds", e))?
        };
        Ok(Box::new(FakeTarget {
            mem,
            restored: self.restored.clone(),
            started: self.started.clone(),
            fail_start: self.fail_start,
            sinks: std::mem::take(&mut self.sinks),
        }))
    }
}

/// Assert two guest memories are byte-identical, naming the first differing page.
pub fn assert_same_memory(a: &Mem, b: &Mem) {
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    for r in a.iter() {
        let mut off = 0;
        while off < r.len() {
            let n = (r.len() - off).min(x.len() as u64) as usize;
            let g = GuestAddress(r.start_addr().0 + off);
            a.read_slice(&mut x[..n], g).expect("read source");
            b.read_slice(&mut y[..n], g).expect("read destination");
            if x[..n] != y[..n] {
                let i = x[..n]
                    .iter()
                    .zip(&y[..n])
                    .position(|(p, q)| p != q)
                    .unwrap_or(0);
                panic!("memory differs at gpa {:#x}", g.0 + i as u64);
            }
            off += n as u64;
        }
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A fresh unix socket path.
pub fn sock_path() -> std::path::PathBuf {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("tern-mig-test-{}-{n}.sock", std::process::id()))
}

/// A handle to check the fake guest's run state after the host moved into the engine.
pub struct FakeGuestView(Arc<GuestCtl>);

impl FakeGuestView {
    pub fn of(h: &FakeHost) -> Arc<Self> {
        Arc::new(FakeGuestView(h.guest.ctl.clone()))
    }
    pub fn is_paused(&self) -> bool {
        self.0.paused.load(Ordering::SeqCst)
    }
}

/// Mark pages of `range` that are present or swapped, from /proc/self/pagemap (64-bit entry per
/// page: bit 63 present, bit 62 swapped). Safe: a file read at the mapping's virtual address.
pub fn pagemap_populated(mem: &Mem, range: GpaRange, out: &mut DirtyBitmap) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    use vm_memory::MemoryRegionAddress;
    let mut f = std::fs::File::open("/proc/self/pagemap")?;
    for r in mem.iter() {
        let Some(part) = range.intersect(r.start_addr().0, r.len()) else {
            continue;
        };
        let off = part.start.0 - r.start_addr().0;
        let host = r
            .get_host_address(MemoryRegionAddress(off))
            .map_err(|e| std::io::Error::other(e.to_string()))? as usize as u64;
        let n = part.pages() as usize;
        let mut buf = vec![0u8; n * 8];
        f.seek(SeekFrom::Start(host / PAGE_SIZE * 8))?;
        f.read_exact(&mut buf)?;
        for (i, e) in buf.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            if v & (3 << 62) != 0 {
                out.mark_range(GuestAddress(part.start.0 + i as u64 * PAGE_SIZE), 1)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            }
        }
    }
    Ok(())
}
