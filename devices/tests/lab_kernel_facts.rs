//! Kernel facts tern's dirty-tracking backend selection depends on, asserted through tern's own
//! `sys` wrappers against the real kernel inside the nested lab (`scripts/lab run kernel-facts-vtd
//! kernel-facts-mock`). They need `/dev/vfio` and `/dev/iommu`, so plain `cargo test` skips them;
//! the lab runs this binary with `--ignored --test-threads=1` and a name filter per boot:
//! - `vtd_*`: VT-d boot (`intel_iommu=on`), QEMU's edu device bound to vfio-pci;
//! - `mock_*`: `intel_iommu=off` boot, where the iommufd selftest mock IOMMU can probe;
//! - `mtty_*`: either boot, with at least one mtty mdev created.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use iommufd_bindings::iommufd::{
    iommu_hw_info,
    iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING as IOMMU_HW_CAP_DIRTY_TRACKING,
};
use iommufd_ioctls::{IommuFd, IommufdError};
use tern_devices::sys::dma_buffer::DmaBuffer;
use tern_devices::sys::iommufd_hwpt_dirty::{self, DirtyRead};
use tern_devices::sys::iommufd_test::{
    self, MOCK_APERTURE_START, MOCK_FLAGS_DEVICE_NO_DIRTY, MOCK_IO_PAGE_SIZE,
};
use tern_devices::sys::iova::Iova;
use tern_devices::sys::uapi_size::argsz;
use tern_devices::sys::vfio_type1_dirty;
use tern_devices::vfio::iommufd::alloc_hwpt;
use vfio_bindings::bindings::vfio::{
    VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd, VfioOps};

mod lab_common;
use lab_common::{edu_sysfs_path, ioas_alloc};

const PAGE: u64 = 4096;

/// The sysfs directory of the first mdev; the lab creates mtty instances before the tests run.
fn mtty_sysfs_path() -> Result<PathBuf> {
    let mut devices: Vec<PathBuf> = fs::read_dir("/sys/bus/mdev/devices")
        .context("listing mdev devices (is CONFIG_VFIO_MDEV on?)")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    devices.sort();
    devices
        .into_iter()
        .next()
        .context("no mdev device: the lab creates mtty instances before running the tests")
}

fn type1_device(container: &Arc<VfioContainer>, path: &Path) -> Result<VfioDevice> {
    let ops: Arc<dyn VfioOps> = container.clone();
    VfioDevice::new(path, ops, false)
        .with_context(|| format!("opening {} through a type1 container", path.display()))
}

fn count_bits(bitmap: &[u64]) -> u32 {
    bitmap.iter().map(|w| w.count_ones()).sum()
}

fn bit(bitmap: &[u64], n: u64) -> bool {
    let (word, shift) = ((n / 64) as usize, n % 64);
    bitmap.get(word).is_some_and(|w| w >> shift & 1 == 1)
}

fn set_bit(bitmap: &mut [u64], n: u64) {
    bitmap[(n / 64) as usize] |= 1 << (n % 64);
}

fn hw_capabilities(iommufd: &IommuFd, dev_id: u32) -> Result<u64> {
    let mut info = iommu_hw_info {
        size: argsz::<iommu_hw_info>(),
        dev_id,
        ..Default::default()
    };
    iommufd
        .get_hw_info(&mut info)
        .with_context(|| format!("IOMMU_GET_HW_INFO for dev {dev_id}"))?;
    Ok(info.out_capabilities)
}

fn hwpt_alloc_errno(result: std::result::Result<u32, IommufdError>) -> Option<i32> {
    match result {
        Err(IommufdError::IommuHwptAlloc(e)) => Some(e.errno()),
        _ => None,
    }
}

#[test]
#[ignore = "lab: needs /dev/vfio and edu bound to vfio-pci behind VT-d"]
fn vtd_type1_dirty_pages_reports_every_mapped_page_dirty() -> Result<()> {
    let container = Arc::new(VfioContainer::new(None).context("opening /dev/vfio/vfio")?);
    let _edu = type1_device(&container, &edu_sysfs_path()?)?;
    let buf = DmaBuffer::new(1 << 20)?;
    let mapping = buf.map_type1(&container, Iova(0x10_0000))?;
    let pages = mapping.len_bytes() / PAGE;
    let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];

    let before_start = vfio_type1_dirty::get_dirty_bitmap(
        &container,
        mapping.iova(),
        mapping.len_bytes(),
        PAGE,
        &mut bitmap,
    );
    assert!(
        before_start.is_err(),
        "GET_BITMAP before START must be refused"
    );

    vfio_type1_dirty::start_dirty_tracking(&container)?;
    // The device never ran a DMA: every page is still reported, on every read (reads clear).
    for read in 1..=2 {
        vfio_type1_dirty::get_dirty_bitmap(
            &container,
            mapping.iova(),
            mapping.len_bytes(),
            PAGE,
            &mut bitmap,
        )?;
        assert_eq!(
            u64::from(count_bits(&bitmap)),
            pages,
            "read {read}: type1 must report all {pages} mapped pages dirty for vfio-pci"
        );
    }
    vfio_type1_dirty::stop_dirty_tracking(&container)?;
    Ok(())
}

#[test]
#[ignore = "lab: needs /dev/iommu and edu bound to vfio-pci behind VT-d"]
fn vtd_iommufd_reports_no_dirty_tracking() -> Result<()> {
    let iommufd = Arc::new(IommuFd::new().context("opening /dev/iommu")?);
    let vfio =
        Arc::new(VfioIommufd::new(iommufd.clone(), None, None).context("allocating an ioas")?);
    let ops: Arc<dyn VfioOps> = vfio.clone();
    let edu = VfioDevice::new(&edu_sysfs_path()?, ops, false)
        .context("binding the edu cdev to iommufd")?;
    let dev_id = edu
        .iommufd_dev_id()
        .context("edu has no iommufd device id")?;
    let ioas_id = vfio.ioas().id();

    let caps = hw_capabilities(&iommufd, dev_id)?;
    assert_eq!(
        caps & u64::from(IOMMU_HW_CAP_DIRTY_TRACKING),
        0,
        "emulated VT-d must not advertise dirty tracking (capabilities {caps:#x})"
    );
    let dirty = alloc_hwpt(&iommufd, dev_id, ioas_id, true);
    assert_eq!(
        hwpt_alloc_errno(dirty),
        Some(libc::EOPNOTSUPP),
        "HWPT_ALLOC(DIRTY_TRACKING) on emulated VT-d must fail with EOPNOTSUPP"
    );
    // Control: the same device and IOAS take a plain HWPT, so the refusal is about dirty tracking.
    let plain = alloc_hwpt(&iommufd, dev_id, ioas_id, false).context("plain HWPT_ALLOC")?;
    iommufd.destroy_iommu_object(plain)?;
    Ok(())
}

#[test]
#[ignore = "lab: needs /dev/iommu with the iommufd selftest (intel_iommu=off)"]
fn mock_hw_info_reports_dirty_tracking_only_for_capable_devices() -> Result<()> {
    let iommufd = IommuFd::new().context("opening /dev/iommu")?;
    let ioas = ioas_alloc(&iommufd)?;
    let capable = iommufd_test::mock_domain(&iommufd, ioas, 0)?;
    let caps = hw_capabilities(&iommufd, capable.idev_id)?;
    assert_ne!(
        caps & u64::from(IOMMU_HW_CAP_DIRTY_TRACKING),
        0,
        "the mock IOMMU must advertise dirty tracking (capabilities {caps:#x})"
    );
    let hwpt = alloc_hwpt(&iommufd, capable.idev_id, ioas, true)
        .context("HWPT_ALLOC(DIRTY_TRACKING) for a capable mock device")?;
    iommufd.destroy_iommu_object(hwpt)?;

    let incapable = iommufd_test::mock_domain(&iommufd, ioas, MOCK_FLAGS_DEVICE_NO_DIRTY)?;
    let caps = hw_capabilities(&iommufd, incapable.idev_id)?;
    assert_eq!(caps & u64::from(IOMMU_HW_CAP_DIRTY_TRACKING), 0);
    let refused = alloc_hwpt(&iommufd, incapable.idev_id, ioas, true);
    assert_eq!(hwpt_alloc_errno(refused), Some(libc::EOPNOTSUPP));
    Ok(())
}

/// The 4 KiB pages the bitmap test dirties: a sparse pattern plus the last page.
fn pattern_page(page: u64, pages: u64) -> bool {
    page.is_multiple_of(7) || page == pages - 1
}

#[test]
#[ignore = "lab: needs /dev/iommu with the iommufd selftest (intel_iommu=off)"]
fn mock_get_dirty_bitmap_returns_exactly_the_marked_bits() -> Result<()> {
    const LEN: u64 = 4 << 20;
    let iommufd = IommuFd::new().context("opening /dev/iommu")?;
    let ioas = ioas_alloc(&iommufd)?;
    let dom = iommufd_test::mock_domain(&iommufd, ioas, 0)?;
    let buf = DmaBuffer::new(usize::try_from(LEN)?)?;
    let mapping = buf.map_ioas(&iommufd, ioas, Iova(MOCK_APERTURE_START))?;
    let iova = mapping.iova();
    let hwpt =
        alloc_hwpt(&iommufd, dom.idev_id, ioas, true).context("HWPT_ALLOC(DIRTY_TRACKING)")?;
    iommufd_test::mock_domain_replace(&iommufd, dom.stdev_id, hwpt)?;
    iommufd_hwpt_dirty::set_dirty_tracking(&iommufd, hwpt, true)?;

    let pages = LEN / PAGE;
    let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
    let read = |mode, bitmap: &mut [u64]| {
        iommufd_hwpt_dirty::get_dirty_bitmap(&iommufd, hwpt, iova, LEN, PAGE, mode, bitmap)
    };

    // The kernel only ORs bits in: the wrapper must zero a dirty buffer before the call.
    bitmap.fill(u64::MAX);
    read(DirtyRead::NoClear, &mut bitmap)?;
    assert_eq!(count_bits(&bitmap), 0, "a clean range must read clean");

    // Simulated DMA: one 2 KiB half of each pattern page.
    let mut mock_pages = vec![0u64; (LEN / MOCK_IO_PAGE_SIZE).div_ceil(64) as usize];
    let expected: Vec<u64> = (0..pages).filter(|&p| pattern_page(p, pages)).collect();
    for &p in &expected {
        set_bit(&mut mock_pages, 2 * p + (p & 1));
    }
    let marked = iommufd_test::mark_dirty(&iommufd, hwpt, iova, LEN, &mock_pages)?;
    assert_eq!(
        marked,
        expected.len() as u64,
        "IOMMU_TEST_OP_DIRTY marked count"
    );

    let check = |bitmap: &[u64], what: &str| {
        for p in 0..pages {
            assert_eq!(bit(bitmap, p), pattern_page(p, pages), "{what}: page {p}");
        }
    };
    for round in 1..=2 {
        read(DirtyRead::NoClear, &mut bitmap)?;
        check(&bitmap, &format!("NO_CLEAR read {round}"));
    }
    read(DirtyRead::ReadAndClear, &mut bitmap)?;
    check(&bitmap, "clearing read");
    read(DirtyRead::ReadAndClear, &mut bitmap)?;
    assert_eq!(
        count_bits(&bitmap),
        0,
        "a clearing read must leave the range clean"
    );

    // Chunked claim: read-and-clear 2 MiB at +1 MiB clears that chunk only.
    mock_pages.fill(u64::MAX);
    iommufd_test::mark_dirty(&iommufd, hwpt, iova, LEN, &mock_pages)?;
    let chunk = Iova(iova.0 + (1 << 20));
    let mut chunk_bitmap = vec![0u64; (2 << 20) / 4096 / 64];
    iommufd_hwpt_dirty::get_dirty_bitmap(
        &iommufd,
        hwpt,
        chunk,
        2 << 20,
        PAGE,
        DirtyRead::ReadAndClear,
        &mut chunk_bitmap,
    )?;
    assert_eq!(
        count_bits(&chunk_bitmap),
        512,
        "every page of the chunk is dirty"
    );
    read(DirtyRead::ReadAndClear, &mut bitmap)?;
    for p in 0..pages {
        let in_chunk = (256..768).contains(&p);
        assert_eq!(
            bit(&bitmap, p),
            !in_chunk,
            "after the chunk claim: page {p}"
        );
    }

    iommufd_hwpt_dirty::set_dirty_tracking(&iommufd, hwpt, false)?;
    Ok(())
}

#[test]
#[ignore = "lab: needs /dev/vfio and an mtty mdev"]
fn mtty_advertises_stop_copy_p2p_pre_copy() -> Result<()> {
    let container = Arc::new(VfioContainer::new(None).context("opening /dev/vfio/vfio")?);
    let mtty = type1_device(&container, &mtty_sysfs_path()?)?;
    let flags = mtty
        .query_migration_support()
        .context("VFIO_DEVICE_FEATURE_MIGRATION")?
        .context("mtty reports no migration support")?;
    let wanted = u64::from(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY);
    assert_eq!(flags & wanted, wanted, "mtty migration flags {flags:#x}");
    Ok(())
}

#[test]
#[ignore = "lab: needs /dev/vfio and an mtty mdev"]
fn mtty_type1_dirty_pages_reports_nothing_for_an_mdev_only_container() -> Result<()> {
    // Control for the vfio-pci fact above: with only an mdev (which pins what it DMAs) in the
    // container, type1 reports pinned pages only, i.e. none here.
    let container = Arc::new(VfioContainer::new(None).context("opening /dev/vfio/vfio")?);
    let _mtty = type1_device(&container, &mtty_sysfs_path()?)?;
    let buf = DmaBuffer::new(1 << 20)?;
    let mapping = buf.map_type1(&container, Iova(0x10_0000))?;
    let mut bitmap = vec![0u64; (mapping.len_bytes() / PAGE).div_ceil(64) as usize];
    vfio_type1_dirty::start_dirty_tracking(&container)?;
    vfio_type1_dirty::get_dirty_bitmap(
        &container,
        mapping.iova(),
        mapping.len_bytes(),
        PAGE,
        &mut bitmap,
    )?;
    assert_eq!(
        count_bits(&bitmap),
        0,
        "an mdev-only container must report no dirty page"
    );
    vfio_type1_dirty::stop_dirty_tracking(&container)?;
    Ok(())
}
