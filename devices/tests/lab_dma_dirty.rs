//! tern's DMA dirty sources (`devices/src/vfio/dma_dirty`) driven against the real kernel inside
//! the nested lab (`scripts/lab run dma-dirty-vtd`): the same start/claim/stop the migration engine
//! issues, through [`Type1Dma`] mappings made the way the VMM maps guest RAM. They need `/dev/vfio`,
//! so plain `cargo test` skips them; the lab runs this binary with `--ignored --test-threads=1`:
//! - `vtd_*`: VT-d boot (`intel_iommu=on`), QEMU's edu device bound to vfio-pci;
//! - `mtty_*`: any boot with the lab's mtty mdevs created.
//!
//! Each test opens and drops its own devices, and tears down in the VMM's order (sources, DMA
//! unmap, device, container), so the group is free for the next test.

use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tern_devices::sys::iova::Iova;
use tern_devices::sys::vfio_dma_logging_probe::supports_dma_logging;
use tern_devices::vfio::container::{GuestRamRange, Type1Dma};
use tern_devices::vfio::dma_dirty::logging::DmaLoggingSource;
use tern_devices::vfio::dma_dirty::type1::Type1DirtySource;
use tern_devices::vfio::dma_dirty::MappedRange;
use tern_migration::dirty::{DirtyBitmap, DirtySource, DirtySourceError, GpaRange, PAGE_SIZE};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};
use vm_memory::GuestAddress;

mod lab_common;
use lab_common::edu_sysfs_path;

/// The lab's mtty instances (MTTY_UUIDS in lab/guest/lib.sh); the first is used.
const MTTY_UUID: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
/// Where the "guest RAM" is mapped for DMA (IOVA = GPA) and how much.
const RAM_IOVA: u64 = 0x10_0000;
const RAM_LEN: u64 = 8 << 20;

/// The sysfs directory of the lab's first mtty mdev.
fn mtty_sysfs_path() -> Result<PathBuf> {
    let path = Path::new("/sys/bus/mdev/devices").join(MTTY_UUID);
    if !path.exists() {
        bail!(
            "no mdev {} (the lab creates the MTTY_UUIDS instances before the tests run)",
            path.display()
        );
    }
    Ok(path)
}

/// Anonymous memory standing in for guest RAM; it is only ever handed to the kernel, never read
/// or written through a Rust reference.
struct Ram {
    addr: NonNull<libc::c_void>,
    len: usize,
}

impl Ram {
    fn new(len: u64) -> Result<Self> {
        let len = usize::try_from(len)?;
        // SAFETY: a fresh anonymous private mapping at an address the kernel picks; nothing
        // existing is affected and the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            bail!(
                "mmap of {len:#x} bytes: {}",
                std::io::Error::last_os_error()
            );
        }
        let addr = NonNull::new(addr).context("mmap returned null")?;
        Ok(Ram { addr, len })
    }

    fn range(&self, iova: u64) -> GuestRamRange {
        GuestRamRange {
            iova: Iova(iova),
            host_addr: self.addr.as_ptr() as usize,
            len: self.len as u64,
        }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `new` made; every test unmaps its DMA before dropping this.
        unsafe { libc::munmap(self.addr.as_ptr(), self.len) };
    }
}

/// A device in its own type1 container with `RAM_LEN` of RAM mapped at `RAM_IOVA`, as the VMM sets
/// it up. Fields drop in declaration order: device, then the DMA mappings and container, then RAM.
struct Passthrough {
    device: Arc<VfioDevice>,
    dma: Arc<Type1Dma>,
    _ram: Ram,
}

impl Passthrough {
    fn open(sysfs: &Path) -> Result<Self> {
        let ram = Ram::new(RAM_LEN)?;
        let dma = Type1Dma::open().context("opening /dev/vfio/vfio")?;
        let ops: Arc<dyn VfioOps> = dma.container().clone();
        let device = VfioDevice::new(sysfs, ops, false)
            .with_context(|| format!("opening {} through a type1 container", sysfs.display()))?;
        dma.map(&[ram.range(RAM_IOVA)])
            .context("mapping the RAM for DMA")?;
        Ok(Passthrough {
            device: Arc::new(device),
            dma,
            _ram: ram,
        })
    }

    fn container(&self) -> Arc<VfioContainer> {
        self.dma.container().clone()
    }

    fn mapped(&self) -> Vec<MappedRange> {
        MappedRange::from_mappings(&self.dma.mapped())
    }

    /// Unmaps the DMA while the group still holds the container's IOMMU, then drops the device
    /// (releasing the group) before the container.
    fn close(self) {
        self.dma.unmap_all();
    }
}

fn bitmap(start: u64, len: u64) -> Result<DirtyBitmap> {
    DirtyBitmap::new(GuestAddress(start), len).context("DirtyBitmap::new")
}

/// Claims `[start, start + len)` from `source` into a fresh bitmap.
fn claim(source: &mut dyn DirtySource, start: u64, len: u64) -> Result<DirtyBitmap> {
    let mut out = bitmap(start, len)?;
    source
        .claim(GpaRange::new(GuestAddress(start), len), &mut out)
        .with_context(|| format!("{}: claim {start:#x}+{len:#x}", source.label()))?;
    Ok(out)
}

fn assert_not_started(source: &mut dyn DirtySource, what: &str) -> Result<()> {
    let mut out = bitmap(RAM_IOVA, RAM_LEN)?;
    let r = source.claim(GpaRange::new(GuestAddress(RAM_IOVA), RAM_LEN), &mut out);
    assert!(
        matches!(r, Err(DirtySourceError::NotStarted { .. })),
        "{what}: claim must be refused with NotStarted, got {r:?}"
    );
    Ok(())
}

#[test]
#[ignore = "lab: needs /dev/vfio and edu bound to vfio-pci behind VT-d"]
fn vtd_type1_source_reports_every_mapped_page_of_edu_on_every_claim() -> Result<()> {
    let edu = Passthrough::open(&edu_sysfs_path()?)?;
    assert!(
        !supports_dma_logging(&*edu.device),
        "plain vfio-pci (edu) must not offer DMA logging"
    );
    let mut source = Type1DirtySource::new(edu.container(), edu.mapped(), &["edu"]);
    assert_not_started(&mut source, "before start")?;
    source.start()?;

    let half = RAM_LEN / 2;
    let half_pages = half / PAGE_SIZE;
    for round in 1..=2 {
        for start in [RAM_IOVA, RAM_IOVA + half] {
            let out = claim(&mut source, start, half)?;
            assert_eq!(
                out.count(),
                half_pages,
                "claim {round} of {start:#x}+{half:#x}: type1 must report every mapped page of a \
                 vfio-pci device dirty"
            );
            assert!((0..half_pages).all(|p| out.test(p)));
        }
    }
    let mut out = bitmap(RAM_IOVA, RAM_LEN)?;
    assert!(
        !source.peek(GpaRange::new(GuestAddress(RAM_IOVA), RAM_LEN), &mut out)?,
        "type1 cannot peek"
    );
    assert!(out.is_clean(), "a refused peek must write nothing");

    source.stop()?;
    assert_not_started(&mut source, "after stop")?;
    drop(source);
    edu.close();
    Ok(())
}

#[test]
#[ignore = "lab: needs /dev/vfio and an mtty mdev"]
fn mtty_type1_source_reports_nothing_for_an_mdev_that_pins_nothing() -> Result<()> {
    let mtty = Passthrough::open(&mtty_sysfs_path()?)?;
    let mut source = Type1DirtySource::new(mtty.container(), mtty.mapped(), &["mtty0"]);
    source.start()?;
    let out = claim(&mut source, RAM_IOVA, RAM_LEN)?;
    assert_eq!(
        out.count(),
        0,
        "an mdev that pins nothing must have no dirty page"
    );
    source.stop()?;
    assert_not_started(&mut source, "after stop")?;
    drop(source);
    mtty.close();
    Ok(())
}

#[test]
#[ignore = "lab: needs /dev/vfio and an mtty mdev"]
fn mtty_dma_logging_source_starts_reports_nothing_and_stops() -> Result<()> {
    let mtty = Passthrough::open(&mtty_sysfs_path()?)?;
    assert!(
        supports_dma_logging(&*mtty.device),
        "mtty (6.12) must offer DMA logging"
    );
    let mut source = DmaLoggingSource::new(mtty.device.clone(), mtty.mapped(), "mtty0");
    assert_not_started(&mut source, "before start")?;
    source.start()?;
    let out = claim(&mut source, RAM_IOVA, RAM_LEN)?;
    assert_eq!(out.count(), 0, "mtty never DMAs: its log must be empty");
    source.stop()?;
    assert_not_started(&mut source, "after stop")?;
    drop(source);
    mtty.close();
    Ok(())
}
