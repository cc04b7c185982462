//! The iommufd selftest interface (`IOMMU_TEST_CMD`, `CONFIG_IOMMUFD_TEST`): a mock IOMMU whose
//! devices and dirty bits user space controls. tern uses it only in the lab, to prove its
//! hardware-dirty-tracking path against the real iommufd core, since no emulated IOMMU offers dirty
//! tracking.
//!
//! Layout and numbers come from the kernel's `drivers/iommu/iommufd/iommufd_test.h` (6.12): the
//! command is `{size, op, id, __reserved, union (48 bytes, 8-aligned), last}` = 72 bytes. The mock
//! domain's IOVA aperture is `[MOCK_APERTURE_START, MOCK_APERTURE_LAST]` and its page is 2 KiB.

use std::mem::{offset_of, size_of};

use iommufd_bindings::iommufd::{IOMMUFD_CMD_BASE, IOMMUFD_TYPE};
use iommufd_ioctls::IommuFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

use super::iova::Iova;
use super::uapi_size::argsz;

ioctl_io_nr!(IOMMU_TEST_CMD, IOMMUFD_TYPE as u32, IOMMUFD_CMD_BASE + 32);

/// `IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE`.
const OP_MOCK_DOMAIN_REPLACE: u32 = 10;
/// `IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS`.
const OP_MOCK_DOMAIN_FLAGS: u32 = 12;
/// `IOMMU_TEST_OP_DIRTY`.
const OP_DIRTY: u32 = 13;

/// First IOVA a mock domain can map (`MOCK_APERTURE_START`).
pub const MOCK_APERTURE_START: u64 = 1 << 24;
/// Last IOVA a mock domain can map (`MOCK_APERTURE_LAST`).
pub const MOCK_APERTURE_LAST: u64 = (1 << 31) - 1;
/// The mock IOMMU's page size (`PAGE_SIZE / 2`): the granule of [`mark_dirty`]'s bitmap.
pub const MOCK_IO_PAGE_SIZE: u64 = 2048;
/// `MOCK_FLAGS_DEVICE_NO_DIRTY`: a mock device whose IOMMU has no dirty tracking.
pub const MOCK_FLAGS_DEVICE_NO_DIRTY: u32 = 1;

/// The objects one `IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS` creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockDomain {
    /// The selftest device object (destroy it to unplug the mock device).
    pub stdev_id: u32,
    /// The HWPT the device was attached to.
    pub hwpt_id: u32,
    /// The device's iommufd bind id (use it as `dev_id` in HWPT_ALLOC and GET_HW_INFO).
    pub idev_id: u32,
}

/// Errors of the iommufd selftest interface.
#[derive(Debug, thiserror::Error)]
pub enum IommufdTestError {
    /// `IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS` failed.
    #[error("creating a mock device with flags {dev_flags:#x} on pt {pt_id} failed")]
    MockDomain {
        /// The IOAS or HWPT the device was to attach to.
        pt_id: u32,
        /// The requested mock device flags.
        dev_flags: u32,
        /// The errno the kernel returned.
        #[source]
        source: errno::Error,
    },
    /// `IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE` failed.
    #[error("replacing the domain of mock device {stdev_id} with pt {pt_id} failed")]
    MockDomainReplace {
        /// The selftest device object.
        stdev_id: u32,
        /// The IOAS or HWPT to move to.
        pt_id: u32,
        /// The errno the kernel returned.
        #[source]
        source: errno::Error,
    },
    /// `IOMMU_TEST_OP_DIRTY` failed.
    #[error(
        "marking mock pages dirty in hwpt {hwpt_id}, iova {iova:#x}, {len_bytes:#x} bytes failed"
    )]
    MarkDirty {
        /// The HWPT whose mock IOPTEs are marked.
        hwpt_id: u32,
        /// First IOVA of the range.
        iova: Iova,
        /// Length of the range.
        len_bytes: u64,
        /// The errno the kernel returned.
        #[source]
        source: errno::Error,
    },
    /// The range is not a non-empty whole number of mock pages.
    #[error("range iova {iova:#x}, {len_bytes:#x} bytes is not a non-empty whole number of 2 KiB mock pages")]
    BadRange {
        /// First IOVA of the range.
        iova: Iova,
        /// Length of the range.
        len_bytes: u64,
    },
    /// The bitmap is too short for the range.
    #[error("bitmap of {words} words is shorter than the {needed} words the range needs")]
    BitmapSize {
        /// Words the caller passed.
        words: usize,
        /// Words the range needs.
        needed: usize,
    },
}

/// `struct iommu_test_cmd` with the union member `P` (each 48 bytes, 8-aligned).
#[repr(C)]
#[derive(Debug, Default)]
struct TestCmd<P> {
    size: u32,
    op: u32,
    id: u32,
    reserved: u32,
    payload: P,
    last: u32,
}

/// Union member `mock_domain_flags` (also covers `mock_domain_replace`, whose only field `pt_id`
/// sits at offset 0).
#[repr(C, align(8))]
#[derive(Debug, Default)]
struct MockDomainFlags {
    out_stdev_id: u32,
    out_hwpt_id: u32,
    out_idev_id: u32,
    dev_flags: u32,
    pad: [u64; 4],
}

/// Union member `dirty`.
#[repr(C)]
#[derive(Debug, Default)]
struct Dirty {
    flags: u32,
    pad: u32,
    iova: u64,
    length: u64,
    page_size: u64,
    uptr: u64,
    out_nr_dirty: u64,
}

const _: () = {
    assert!(size_of::<MockDomainFlags>() == 48);
    assert!(size_of::<Dirty>() == 48);
    assert!(size_of::<TestCmd<Dirty>>() == 72);
    assert!(size_of::<TestCmd<MockDomainFlags>>() == 72);
    assert!(offset_of!(TestCmd<Dirty>, payload) == 16);
    assert!(offset_of!(TestCmd<Dirty>, last) == 64);
    assert!(offset_of!(Dirty, iova) == 8);
    assert!(offset_of!(Dirty, out_nr_dirty) == 40);
};

fn test_cmd<P>(op: u32, id: u32, payload: P) -> TestCmd<P> {
    TestCmd {
        size: argsz::<TestCmd<P>>(),
        op,
        id,
        reserved: 0,
        payload,
        last: 0,
    }
}

/// Run one selftest command whose payload holds no user pointer.
fn run_plain<P>(iommufd: &IommuFd, cmd: &mut TestCmd<P>) -> Result<(), errno::Error> {
    // SAFETY: `iommufd` is an open `/dev/iommu` (the only fd an `IommuFd` holds), where
    // IOMMU_TEST_CMD is defined. `cmd` is a repr(C) `struct iommu_test_cmd` of `size` = 72 bytes
    // (layout asserted at compile time above); the kernel reads and writes back exactly that many
    // bytes through this live exclusive borrow. Callers pass only payloads without user pointers.
    let ret = unsafe { ioctl_with_mut_ref(iommufd, IOMMU_TEST_CMD(), cmd) };
    if ret < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

/// Plug a mock device into `pt_id` (an IOAS or a HWPT) and return the objects created.
pub fn mock_domain(
    iommufd: &IommuFd,
    pt_id: u32,
    dev_flags: u32,
) -> Result<MockDomain, IommufdTestError> {
    let mut cmd = test_cmd(
        OP_MOCK_DOMAIN_FLAGS,
        pt_id,
        MockDomainFlags {
            dev_flags,
            ..Default::default()
        },
    );
    run_plain(iommufd, &mut cmd).map_err(|source| IommufdTestError::MockDomain {
        pt_id,
        dev_flags,
        source,
    })?;
    Ok(MockDomain {
        stdev_id: cmd.payload.out_stdev_id,
        hwpt_id: cmd.payload.out_hwpt_id,
        idev_id: cmd.payload.out_idev_id,
    })
}

/// Move mock device `stdev_id` onto `pt_id` (an IOAS or a HWPT), as a VMM moves a device onto a
/// dirty-tracking HWPT at migration start.
pub fn mock_domain_replace(
    iommufd: &IommuFd,
    stdev_id: u32,
    pt_id: u32,
) -> Result<(), IommufdTestError> {
    // `mock_domain_replace.pt_id` is the union's first u32, i.e. `out_stdev_id`'s slot.
    let mut cmd = test_cmd(
        OP_MOCK_DOMAIN_REPLACE,
        stdev_id,
        MockDomainFlags {
            out_stdev_id: pt_id,
            ..Default::default()
        },
    );
    run_plain(iommufd, &mut cmd).map_err(|source| IommufdTestError::MockDomainReplace {
        stdev_id,
        pt_id,
        source,
    })
}

/// Simulate device DMA writes: set the IOPTE dirty bit of every mapped 2 KiB mock page of
/// `[iova, iova + len_bytes)` whose bit is set in `mock_pages` (bit `n` = page
/// `iova + n * MOCK_IO_PAGE_SIZE`). Returns how many pages the kernel marked (unmapped pages are
/// skipped). Dirty tracking must be enabled on `hwpt_id`.
pub fn mark_dirty(
    iommufd: &IommuFd,
    hwpt_id: u32,
    iova: Iova,
    len_bytes: u64,
    mock_pages: &[u64],
) -> Result<u64, IommufdTestError> {
    let needed = super::iova::range_bitmap_words(iova, len_bytes, MOCK_IO_PAGE_SIZE)
        .ok_or(IommufdTestError::BadRange { iova, len_bytes })?;
    if mock_pages.len() < needed {
        return Err(IommufdTestError::BitmapSize {
            words: mock_pages.len(),
            needed,
        });
    }
    let mut cmd = test_cmd(
        OP_DIRTY,
        hwpt_id,
        Dirty {
            iova: iova.0,
            length: len_bytes,
            page_size: MOCK_IO_PAGE_SIZE,
            uptr: mock_pages.as_ptr() as u64,
            ..Default::default()
        },
    );
    // SAFETY: `iommufd` is an open `/dev/iommu` (the only fd an `IommuFd` holds). `cmd` is the
    // 72-byte `struct iommu_test_cmd` (layout asserted above), read and written back through this
    // exclusive borrow. Through `uptr` the kernel only reads `ceil(len_bytes / 2048 / 8)` bytes,
    // which `mock_pages` (at least `needed` words, checked above) holds; it is borrowed for the
    // whole call and never written.
    let ret = unsafe { ioctl_with_mut_ref(iommufd, IOMMU_TEST_CMD(), &mut cmd) };
    if ret < 0 {
        return Err(IommufdTestError::MarkDirty {
            hwpt_id,
            iova,
            len_bytes,
            source: errno::Error::last(),
        });
    }
    Ok(cmd.payload.out_nr_dirty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_uapi() {
        // _IO(';', 0x80 + 32) from drivers/iommu/iommufd/iommufd_test.h.
        assert_eq!(IOMMU_TEST_CMD(), 0x3ba0);
    }

    #[test]
    fn command_size_field_is_the_struct_size() {
        assert_eq!(test_cmd(OP_DIRTY, 7, Dirty::default()).size, 72);
        assert_eq!(test_cmd(OP_DIRTY, 7, Dirty::default()).id, 7);
    }
}
