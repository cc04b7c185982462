//! A lab-only DMA device on the iommufd selftest (`CONFIG_IOMMUFD_TEST`): the migration oracle for
//! device DMA. It attaches a mock IOMMU domain with dirty tracking to an IOAS holding the VM's RAM
//! (IOVA = GPA, inside the mock aperture [16 MiB, 2 GiB)), and a simulator thread writes guest
//! pages of a window *through the kernel* (`IOMMU_TEST_OP_ACCESS_RW`; KVM never sees these
//! writes) and marks them in the IOMMU's dirty bits (`IOMMU_TEST_OP_DIRTY`), as a device's DMA
//! through a dirty-tracking IOMMU would. tern stops it at switchover where it stops a VFIO device.
//!
//! Its migrated state is its log (the last write sequence of every page); the destination's
//! device reads the window back through its own IOAS and reports any page whose bytes are not the
//! last write's — a lost DMA write.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iommufd_ioctls::IommuFd;
use serde::{Deserialize, Serialize};

use super::container::GuestRamRange;
use super::dma_dirty::domain::DirtyDomain;
use super::dma_dirty::method::{
    select, DirtyChoice, DmaDirtyCaps, DmaDirtySelection, MethodUnavailable,
};
use super::iommufd::{Hwpt, IommufdBackendError, IommufdSpace};
use crate::sys::iommufd_test::{
    mark_dirty, mock_domain, mock_domain_replace, IommufdTestError, MockAccess, MockDomain,
    MOCK_APERTURE_LAST, MOCK_APERTURE_START,
};
use crate::sys::iova::Iova;

const PAGE: u64 = 4096;

/// Run first on each simulator thread; the VMM sets it to install its device seccomp filter.
static THREAD_INIT: OnceLock<fn()> = OnceLock::new();

/// Sets what each simulator thread runs first (once per process; later calls are ignored).
pub fn set_thread_init(init: fn()) {
    let _ = THREAD_INIT.set(init);
}

/// What the operator asked for (`--mock-dma`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MockDmaSpec {
    /// Name in stats and logs.
    pub id: String,
    /// First GPA of the window the device writes (page aligned, inside the mock aperture).
    pub gpa: u64,
    /// Window length in bytes.
    pub len: u64,
    /// Page writes per second.
    pub pages_per_sec: u32,
    /// `auto` (the HWPT's dirty tracking) or `none` (untracked: the negative control).
    pub dirty: DirtyChoice,
}

/// A bad `--mock-dma` argument.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MockDmaSpecError {
    #[error("--mock-dma: {item:?} is not key=value (keys: id, gpa-mib, mib, pages-per-s, dirty)")]
    NotKeyValue { item: String },
    #[error("--mock-dma: unknown key {key:?} (keys: id, gpa-mib, mib, pages-per-s, dirty)")]
    UnknownKey { key: String },
    #[error("--mock-dma: {key}={value:?} is not a number")]
    NotANumber { key: String, value: String },
    // The choice's own message, not a source: the error chain would print it twice.
    #[error("--mock-dma: {0}")]
    Dirty(super::dma_dirty::method::BadDirtyChoice),
}

impl std::str::FromStr for MockDmaSpec {
    type Err = MockDmaSpecError;

    /// `id=ID,gpa-mib=N,mib=N,pages-per-s=N,dirty=auto|none` (defaults: mock-dma, 64, 32, 2000,
    /// auto).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut spec = MockDmaSpec {
            id: "mock-dma".into(),
            gpa: 64 << 20,
            len: 32 << 20,
            pages_per_sec: 2000,
            dirty: DirtyChoice::Auto,
        };
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| MockDmaSpecError::NotKeyValue { item: item.into() })?;
            let num = || {
                value
                    .parse::<u64>()
                    .map_err(|_| MockDmaSpecError::NotANumber {
                        key: key.into(),
                        value: value.into(),
                    })
            };
            match key {
                "id" => spec.id = value.into(),
                "gpa-mib" => spec.gpa = num()?.saturating_mul(1 << 20),
                "mib" => spec.len = num()?.saturating_mul(1 << 20),
                "pages-per-s" => spec.pages_per_sec = u32::try_from(num()?).unwrap_or(u32::MAX),
                "dirty" => spec.dirty = value.parse().map_err(MockDmaSpecError::Dirty)?,
                _ => return Err(MockDmaSpecError::UnknownKey { key: key.into() }),
            }
        }
        Ok(spec)
    }
}

/// Errors creating or running the mock device.
#[derive(Debug, thiserror::Error)]
pub enum MockDmaError {
    #[error("mock-dma {id}: window {gpa:#x}+{len:#x} must be page aligned, a power-of-two number of pages, and inside both the mock IOMMU aperture [16 MiB, 2 GiB) and guest RAM")]
    Window { id: String, gpa: u64, len: u64 },
    #[error(
        "mock-dma {id}: the mock IOMMU has HWPT dirty tracking only (dirty=auto, iommufd or none)"
    )]
    Dirty {
        id: String,
        #[source]
        source: MethodUnavailable,
    },
    #[error("mock-dma {id}: iommufd (is this a kernel with CONFIG_IOMMUFD_TEST?)")]
    Iommufd {
        id: String,
        #[source]
        source: IommufdBackendError,
    },
    #[error("mock-dma {id}: iommufd selftest")]
    Selftest {
        id: String,
        #[source]
        source: IommufdTestError,
    },
    #[error("mock-dma {id}: the saved log covers {got} pages, the window {want}")]
    StateSize { id: String, got: usize, want: usize },
    #[error("mock-dma {id}: cannot start the simulator thread")]
    Thread {
        id: String,
        #[source]
        source: std::io::Error,
    },
}

/// The device's migrated state: its write log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MockDmaState {
    /// DMA writes so far.
    pub writes: u64,
    /// Per page of the window: the sequence number of its last write (0: never written).
    pub seqs: Vec<u32>,
}

/// What the destination found when it read the window back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockDmaVerdict {
    /// Pages the log says were written.
    pub written_pages: u64,
    /// Of those, pages whose bytes are not their last write.
    pub lost_pages: u64,
}

/// The bytes of page `gpa` after write `seq`.
fn page_pattern(gpa: u64, seq: u32, buf: &mut [u8]) {
    for (k, w) in buf.chunks_exact_mut(8).enumerate() {
        let v = gpa ^ (u64::from(seq) << 32) ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        w.copy_from_slice(&v.to_le_bytes());
    }
}

struct Sim {
    id: String,
    iommufd: Arc<IommuFd>,
    hwpt_id: u32,
    access: MockAccess,
    gpa: u64,
    period: Duration,
    log: Mutex<MockDmaState>,
    paused: AtomicBool,
    stop: AtomicBool,
    /// Held across each write; pausing takes it once so no write is in flight afterwards.
    engine: Mutex<()>,
    errors: AtomicU64,
}

impl Sim {
    fn lock_log(&self) -> std::sync::MutexGuard<'_, MockDmaState> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        let mut buf = vec![0u8; PAGE as usize];
        let pages = self.lock_log().seqs.len() as u64;
        let mut next = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            {
                let _engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
                if !self.paused.load(Ordering::SeqCst) {
                    let mut log = self.lock_log();
                    let writes = log.writes + 1;
                    // An odd multiplier walks every page of a power-of-two window.
                    let idx = writes.wrapping_mul(40_503) % pages;
                    let seq = u32::try_from(writes).unwrap_or(u32::MAX);
                    let gpa = self.gpa + idx * PAGE;
                    page_pattern(gpa, seq, &mut buf);
                    match self.access.write(&self.iommufd, Iova(gpa), &buf) {
                        Ok(()) => {
                            log.seqs[idx as usize] = seq;
                            log.writes = writes;
                            // What the IOMMU does on a DMA write: set the IOPTE dirty bits (two
                            // 2 KiB mock pages). Refused while tracking is off, as hardware
                            // records nothing then.
                            let _ = mark_dirty(&self.iommufd, self.hwpt_id, Iova(gpa), PAGE, &[3]);
                        }
                        Err(e) => {
                            if self.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                                log::error!("mock-dma {}: DMA write failed: {e}", self.id);
                            }
                        }
                    }
                }
            }
            next += self.period;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
    }
}

/// The mock DMA device.
pub struct MockDmaDevice {
    spec: MockDmaSpec,
    dma_dirty: DmaDirtySelection,
    // Declared first: the simulator thread stops (and the access closes) before the IOAS goes.
    sim: Arc<Sim>,
    thread: Option<JoinHandle<()>>,
    mock: MockDomain,
    // Shared by the mock devices of the VM; destroyed by the last one out.
    hwpt: Arc<Hwpt>,
}

impl std::fmt::Debug for MockDmaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockDmaDevice")
            .field("spec", &self.spec)
            .field("hwpt", &self.sim.hwpt_id)
            .finish()
    }
}

impl MockDmaDevice {
    /// Builds the mock device in `space`, the IOAS the VM's mock devices share (opened by the
    /// first one, after its spec checks out): the first one maps `ram` there (IOVA = GPA where it fits the mock aperture); every one joins the shared
    /// dirty-tracking HWPT. The simulator starts with the first [`MockDmaDevice::resume`].
    pub fn open(
        spec: &MockDmaSpec,
        ram: &[GuestRamRange],
        space: &mut Option<Arc<IommufdSpace>>,
    ) -> Result<Self, MockDmaError> {
        let id = spec.id.clone();
        let in_ram = ram
            .iter()
            .any(|r| spec.gpa >= r.iova.0 && spec.gpa + spec.len <= r.iova.0 + r.len);
        if spec.len == 0
            || !spec.gpa.is_multiple_of(PAGE)
            || !spec.len.is_multiple_of(PAGE)
            || !(spec.len / PAGE).is_power_of_two()
            || spec.gpa < MOCK_APERTURE_START
            || spec.gpa + spec.len > MOCK_APERTURE_LAST + 1
            || !in_ram
        {
            return Err(MockDmaError::Window {
                id,
                gpa: spec.gpa,
                len: spec.len,
            });
        }
        // The same choice as for a VFIO device, on what the mock offers: a dirty-tracking HWPT.
        let mock_caps = DmaDirtyCaps {
            hwpt_dirty: true,
            ..DmaDirtyCaps::default()
        };
        let dma_dirty = select(spec.dirty, mock_caps).map_err(|source| MockDmaError::Dirty {
            id: id.clone(),
            source,
        })?;
        let iommufd_err = |source| MockDmaError::Iommufd {
            id: id.clone(),
            source,
        };
        let selftest = |source| MockDmaError::Selftest {
            id: id.clone(),
            source,
        };
        let space = match space {
            Some(s) => s.clone(),
            None => space
                .insert(IommufdSpace::open().map_err(iommufd_err)?)
                .clone(),
        };
        let iommufd = space.iommufd().clone();
        let ioas = space.ioas_id();
        let first = space.mapped().is_empty();
        // The first mock device joins the IOAS before anything is mapped, so the IOAS enforces
        // the mock aperture on what is mapped next.
        let mock = mock_domain(&iommufd, ioas, 0).map_err(selftest)?;
        let joined = space.join(mock.idev_id, &id, true, |hwpt| {
            mock_domain_replace(&iommufd, mock.stdev_id, hwpt).map_err(|e| Box::new(e) as _)
        });
        let hwpt = match joined {
            Ok(h) => h,
            Err(e) => {
                let _ = iommufd.destroy_iommu_object(mock.stdev_id);
                return Err(iommufd_err(e));
            }
        };
        let hwpt_id = hwpt.id();
        let clipped: Vec<GuestRamRange> = ram
            .iter()
            .filter_map(|r| {
                let lo = r.iova.0.max(MOCK_APERTURE_START);
                let hi = (r.iova.0 + r.len).min(MOCK_APERTURE_LAST + 1);
                (lo < hi).then(|| GuestRamRange {
                    iova: Iova(lo),
                    host_addr: r.host_addr + (lo - r.iova.0) as usize,
                    len: hi - lo,
                })
            })
            .collect();
        if first {
            space.map(&clipped).map_err(iommufd_err)?;
        }
        let access = MockAccess::create(&iommufd, ioas).map_err(selftest)?;
        let pages = (spec.len / PAGE) as usize;
        let sim = Arc::new(Sim {
            id: id.clone(),
            iommufd,
            hwpt_id,
            access,
            gpa: spec.gpa,
            period: Duration::from_secs(1) / spec.pages_per_sec.max(1),
            log: Mutex::new(MockDmaState {
                writes: 0,
                seqs: vec![0; pages],
            }),
            paused: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            engine: Mutex::new(()),
            errors: AtomicU64::new(0),
        });
        log::info!(
            "mock-dma {id}: HWPT {hwpt_id} with dirty tracking, window {:#x}+{:#x}",
            spec.gpa,
            spec.len
        );
        Ok(MockDmaDevice {
            spec: spec.clone(),
            dma_dirty,
            sim,
            thread: None,
            mock,
            hwpt,
        })
    }

    /// The device's name.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// How migration tracks the device's DMA, and why.
    pub fn dma_dirty(&self) -> &DmaDirtySelection {
        &self.dma_dirty
    }

    /// Where its DMA writes are recorded (the shared HWPT), or `None` with `dirty=none`.
    pub fn dirty_domain(&self) -> Option<DirtyDomain> {
        self.dma_dirty.method?;
        Some(DirtyDomain::Hwpt(self.hwpt.clone()))
    }

    /// The HWPT it is attached to.
    pub fn hwpt(&self) -> &Arc<Hwpt> {
        &self.hwpt
    }

    /// Stops DMA: no write is in flight when this returns.
    pub fn pause(&self) {
        self.sim.paused.store(true, Ordering::SeqCst);
        drop(self.sim.engine.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Lets DMA run (starting the simulator the first time).
    pub fn resume(&mut self) -> Result<(), MockDmaError> {
        if self.thread.is_none() {
            let sim = self.sim.clone();
            let t = std::thread::Builder::new()
                .name(format!("tern-mockdma-{}", self.spec.id))
                .spawn(move || {
                    if let Some(init) = THREAD_INIT.get() {
                        init();
                    }
                    sim.run()
                })
                .map_err(|source| MockDmaError::Thread {
                    id: self.spec.id.clone(),
                    source,
                })?;
            self.thread = Some(t);
        }
        self.sim.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// The write log (call with DMA paused for a consistent copy).
    pub fn save(&self) -> MockDmaState {
        self.sim.lock_log().clone()
    }

    /// Loads the source's log and reads every page it says was written back through this
    /// device's IOAS: a page whose bytes are not its last write was lost in migration.
    pub fn restore(&self, state: &MockDmaState) -> Result<MockDmaVerdict, MockDmaError> {
        let want = (self.spec.len / PAGE) as usize;
        if state.seqs.len() != want {
            return Err(MockDmaError::StateSize {
                id: self.spec.id.clone(),
                got: state.seqs.len(),
                want,
            });
        }
        let mut expect = vec![0u8; PAGE as usize];
        let mut got = vec![0u8; PAGE as usize];
        let mut verdict = MockDmaVerdict {
            written_pages: 0,
            lost_pages: 0,
        };
        for (i, &seq) in state.seqs.iter().enumerate() {
            if seq == 0 {
                continue;
            }
            let gpa = self.spec.gpa + i as u64 * PAGE;
            page_pattern(gpa, seq, &mut expect);
            self.sim
                .access
                .read(&self.sim.iommufd, Iova(gpa), &mut got)
                .map_err(|source| MockDmaError::Selftest {
                    id: self.spec.id.clone(),
                    source,
                })?;
            verdict.written_pages += 1;
            verdict.lost_pages += u64::from(got != expect);
        }
        *self.sim.lock_log() = state.clone();
        Ok(verdict)
    }
}

impl Drop for MockDmaDevice {
    fn drop(&mut self) {
        self.sim.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The mock device detaches before its HWPT's last user destroys it and before the
        // space's last user unmaps.
        if let Err(e) = self.sim.iommufd.destroy_iommu_object(self.mock.stdev_id) {
            log::warn!("mock-dma {}: destroying the mock device: {e}", self.spec.id);
        }
        self.hwpt.leave(&self.spec.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_with_defaults_and_names_bad_keys() {
        let s: MockDmaSpec = "id=sim,gpa-mib=128,mib=16,pages-per-s=500,dirty=none"
            .parse()
            .unwrap();
        assert_eq!(
            (s.id.as_str(), s.gpa, s.len, s.pages_per_sec, s.dirty),
            ("sim", 128 << 20, 16 << 20, 500, DirtyChoice::Untracked)
        );
        assert_eq!("".parse::<MockDmaSpec>().unwrap().gpa, 64 << 20);
        assert!(matches!(
            "speed=3".parse::<MockDmaSpec>(),
            Err(MockDmaSpecError::UnknownKey { .. })
        ));
        assert!(matches!(
            "mib=x".parse::<MockDmaSpec>(),
            Err(MockDmaSpecError::NotANumber { .. })
        ));
    }

    #[test]
    fn page_pattern_depends_on_page_and_sequence() {
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        page_pattern(0x100_0000, 1, &mut a);
        page_pattern(0x100_0000, 2, &mut b);
        assert_ne!(a, b);
        page_pattern(0x100_1000, 1, &mut b);
        assert_ne!(a, b);
        page_pattern(0x100_0000, 1, &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn window_outside_aperture_or_ram_is_refused_before_any_ioctl() {
        let ram = [GuestRamRange {
            iova: Iova(0),
            host_addr: 0x7f00_0000_0000,
            len: 256 << 20,
        }];
        let spec = |gpa, len| MockDmaSpec {
            id: "dmasim".into(),
            gpa,
            len,
            pages_per_sec: 100,
            dirty: DirtyChoice::Auto,
        };
        for (gpa, len) in [
            (0, 1 << 20),
            (128 << 20, 256 << 20),
            (16 << 20, 3 << 12),
            (16 << 20, 0),
        ] {
            assert!(
                matches!(
                    MockDmaDevice::open(&spec(gpa, len), &ram, &mut None),
                    Err(MockDmaError::Window { .. })
                ),
                "{gpa:#x}+{len:#x}"
            );
        }
        let mut s = spec(16 << 20, 1 << 20);
        s.dirty = DirtyChoice::Force(super::super::dma_dirty::method::DmaDirtyMethod::Type1);
        assert!(matches!(
            MockDmaDevice::open(&s, &ram, &mut None),
            Err(MockDmaError::Dirty { .. })
        ));
    }
}
