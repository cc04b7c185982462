//! The iommufd selftest interface (`IOMMU_TEST_CMD`, `CONFIG_IOMMUFD_TEST`): a mock IOMMU whose
//! devices and dirty bits user space controls. tern uses it only in the lab, to prove its
//! hardware-dirty-tracking path against the real iommufd core, since no emulated IOMMU offers dirty
//! tracking.
//!
//! Layout and numbers come from the kernel's `drivers/iommu/iommufd/iommufd_test.h` (6.12): the
//! command is `{size, op, id, __reserved, union (48 bytes, 8-aligned), last}` = 72 bytes. The mock
//! domain's IOVA aperture is `[MOCK_APERTURE_START, MOCK_APERTURE_LAST]` and its page is 2 KiB.
//!
//! Besides mock devices and their dirty bits, the selftest offers "access" objects
//! ([`MockAccess`]): the kernel itself reads and writes whatever an IOAS maps at an IOVA, as a
//! device's DMA would, behind KVM's back.

use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use iommufd_bindings::iommufd::{IOMMUFD_CMD_BASE, IOMMUFD_TYPE};
use iommufd_ioctls::IommuFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

use super::iova::Iova;
use super::uapi_size::argsz;

ioctl_io_nr!(IOMMU_TEST_CMD, IOMMUFD_TYPE as u32, IOMMUFD_CMD_BASE + 32);

/// `IOMMU_TEST_OP_CREATE_ACCESS`.
const OP_CREATE_ACCESS: u32 = 5;
/// `IOMMU_TEST_OP_ACCESS_RW`.
const OP_ACCESS_RW: u32 = 8;
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
/// `MOCK_ACCESS_RW_WRITE`: an `IOMMU_TEST_OP_ACCESS_RW` that writes the IOAS (else it reads).
const MOCK_ACCESS_RW_WRITE: u32 = 1;
/// The largest single `IOMMU_TEST_OP_ACCESS_RW` the kernel takes: it bounces the bytes through a
/// `kvzalloc` of the length and refuses more than 16 MiB with ENOMEM. [`MockAccess`] splits larger
/// transfers.
const ACCESS_RW_MAX_BYTES: usize = 16 << 20;

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
    /// `IOMMU_TEST_OP_CREATE_ACCESS` failed.
    #[error("creating a selftest access on ioas {ioas_id} failed")]
    CreateAccess {
        /// The IOAS the access was to read and write.
        ioas_id: u32,
        /// The errno the kernel returned.
        #[source]
        source: errno::Error,
    },
    /// `IOMMU_TEST_OP_CREATE_ACCESS` returned a descriptor number that is not a valid fd.
    #[error("creating a selftest access on ioas {ioas_id} returned the invalid fd {fd}")]
    AccessFd {
        /// The IOAS the access reads and writes.
        ioas_id: u32,
        /// The `out_access_fd` the kernel returned.
        fd: u32,
    },
    /// `IOMMU_TEST_OP_ACCESS_RW` failed.
    #[error(
        "selftest access {access_fd} {} iova {iova:#x}, {len_bytes:#x} bytes failed",
        if *write { "writing" } else { "reading" }
    )]
    AccessRw {
        /// The access object's fd.
        access_fd: i32,
        /// Whether the transfer wrote the IOAS (else it read it).
        write: bool,
        /// First IOVA of the failed transfer.
        iova: Iova,
        /// Length of the failed transfer.
        len_bytes: u64,
        /// The errno the kernel returned.
        #[source]
        source: errno::Error,
    },
    /// The transfer would run past the end of the IOVA space.
    #[error(
        "access range iova {iova:#x}, {len_bytes:#x} bytes wraps past the end of the iova space"
    )]
    AccessRange {
        /// First IOVA of the range.
        iova: Iova,
        /// Length of the range.
        len_bytes: u64,
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

/// Union member `create_access`.
#[repr(C, align(8))]
#[derive(Debug, Default)]
struct CreateAccess {
    out_access_fd: u32,
    flags: u32,
    pad: [u64; 5],
}

/// Union member `access_rw`.
#[repr(C)]
#[derive(Debug, Default)]
struct AccessRw {
    iova: u64,
    length: u64,
    uptr: u64,
    flags: u32,
    pad0: u32,
    pad: [u64; 2],
}

const _: () = {
    assert!(size_of::<CreateAccess>() == 48);
    assert!(size_of::<AccessRw>() == 48);
    assert!(size_of::<TestCmd<CreateAccess>>() == 72);
    assert!(size_of::<TestCmd<AccessRw>>() == 72);
    assert!(offset_of!(CreateAccess, out_access_fd) == 0);
    assert!(offset_of!(CreateAccess, flags) == 4);
    assert!(offset_of!(AccessRw, iova) == 0);
    assert!(offset_of!(AccessRw, length) == 8);
    assert!(offset_of!(AccessRw, uptr) == 16);
    assert!(offset_of!(AccessRw, flags) == 24);
    assert!(offset_of!(TestCmd<AccessRw>, payload) == 16);
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

/// A selftest access object on an IOAS: the kernel reads/writes whatever the IOAS maps at an IOVA,
/// as a device's DMA would — KVM never sees these writes.
///
/// The object lives as long as its fd (`IOMMU_TEST_OP_CREATE_ACCESS` returns a descriptor, not an
/// object id); dropping a `MockAccess` closes it, which destroys the access. The pages an access
/// touches must be mapped (and, for [`MockAccess::write`], writeable) in the IOAS.
#[derive(Debug)]
pub struct MockAccess {
    fd: OwnedFd,
}

impl MockAccess {
    /// Create an access object on IOAS `ioas_id` (`IOMMU_TEST_OP_CREATE_ACCESS`, no flags).
    pub fn create(iommufd: &IommuFd, ioas_id: u32) -> Result<MockAccess, IommufdTestError> {
        let mut cmd = test_cmd(OP_CREATE_ACCESS, ioas_id, CreateAccess::default());
        run_plain(iommufd, &mut cmd)
            .map_err(|source| IommufdTestError::CreateAccess { ioas_id, source })?;
        let raw = cmd.payload.out_access_fd;
        let fd = i32::try_from(raw)
            .ok()
            .filter(|fd| *fd >= 0)
            .ok_or(IommufdTestError::AccessFd { ioas_id, fd: raw })?;
        // SAFETY: on success the kernel installed a fresh descriptor for the new access object
        // into this process's fd table (`get_unused_fd_flags` + `fd_install`) and handed its number
        // to us alone; nothing else in the process knows or owns it, so taking ownership here is
        // the only owner, and `OwnedFd` closes it exactly once.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(MockAccess { fd })
    }

    /// `IOMMU_TEST_OP_ACCESS_RW` with `MOCK_ACCESS_RW_WRITE`: copy `data` into the IOAS at `iova`.
    ///
    /// Transfers above the kernel's 16 MiB limit are split; an empty `data` is a no-op.
    pub fn write(
        &self,
        iommufd: &IommuFd,
        iova: Iova,
        data: &[u8],
    ) -> Result<(), IommufdTestError> {
        for (offset, len) in access_pieces(iova, data.len())? {
            let piece = &data[offset..offset + len];
            let piece_iova = Iova(iova.0 + offset as u64);
            let mut cmd = self.rw_cmd(piece_iova, piece.as_ptr() as u64, len, true);
            // SAFETY: `iommufd` is an open `/dev/iommu` (the only fd an `IommuFd` holds) and
            // `cmd.id` is this access's live fd. `cmd` is the 72-byte `struct iommu_test_cmd`
            // (layout asserted above), read and written back through this exclusive borrow.
            // With MOCK_ACCESS_RW_WRITE the kernel only reads `length` bytes from `uptr`, which
            // `piece` (exactly `len` bytes, borrowed for the whole call) holds.
            let ret = unsafe { ioctl_with_mut_ref(iommufd, IOMMU_TEST_CMD(), &mut cmd) };
            if ret < 0 {
                return Err(self.rw_error(piece_iova, len, true));
            }
        }
        Ok(())
    }

    /// `IOMMU_TEST_OP_ACCESS_RW` read: copy from the IOAS at `iova` into `data`.
    ///
    /// Transfers above the kernel's 16 MiB limit are split; an empty `data` is a no-op.
    pub fn read(
        &self,
        iommufd: &IommuFd,
        iova: Iova,
        data: &mut [u8],
    ) -> Result<(), IommufdTestError> {
        for (offset, len) in access_pieces(iova, data.len())? {
            let piece = &mut data[offset..offset + len];
            let piece_iova = Iova(iova.0 + offset as u64);
            let mut cmd = self.rw_cmd(piece_iova, piece.as_mut_ptr() as u64, len, false);
            // SAFETY: `iommufd` is an open `/dev/iommu` (the only fd an `IommuFd` holds) and
            // `cmd.id` is this access's live fd. `cmd` is the 72-byte `struct iommu_test_cmd`
            // (layout asserted above), read and written back through this exclusive borrow.
            // Without MOCK_ACCESS_RW_WRITE the kernel writes at most `length` bytes to `uptr`:
            // `piece` is exactly `len` bytes, exclusively borrowed for the whole call, so the
            // writes alias nothing else and any byte pattern is a valid `u8`.
            let ret = unsafe { ioctl_with_mut_ref(iommufd, IOMMU_TEST_CMD(), &mut cmd) };
            if ret < 0 {
                return Err(self.rw_error(piece_iova, len, false));
            }
        }
        Ok(())
    }

    fn rw_cmd(&self, iova: Iova, uptr: u64, len: usize, write: bool) -> TestCmd<AccessRw> {
        test_cmd(
            OP_ACCESS_RW,
            // A valid fd is non-negative (checked in `create`), so this is its exact number.
            self.fd.as_raw_fd().unsigned_abs(),
            AccessRw {
                iova: iova.0,
                length: len as u64,
                uptr,
                flags: if write { MOCK_ACCESS_RW_WRITE } else { 0 },
                ..Default::default()
            },
        )
    }

    fn rw_error(&self, iova: Iova, len: usize, write: bool) -> IommufdTestError {
        IommufdTestError::AccessRw {
            access_fd: self.fd.as_raw_fd(),
            write,
            iova,
            len_bytes: len as u64,
            source: errno::Error::last(),
        }
    }
}

/// Splits a transfer of `len` bytes at `iova` into `(offset, length)` pieces the kernel accepts
/// (at most [`ACCESS_RW_MAX_BYTES`] each), after checking that the range does not wrap.
fn access_pieces(
    iova: Iova,
    len: usize,
) -> Result<impl Iterator<Item = (usize, usize)>, IommufdTestError> {
    let len_bytes = len as u64;
    if len_bytes > 0 && iova.0.checked_add(len_bytes - 1).is_none() {
        return Err(IommufdTestError::AccessRange { iova, len_bytes });
    }
    Ok((0..len)
        .step_by(ACCESS_RW_MAX_BYTES)
        .map(move |offset| (offset, (len - offset).min(ACCESS_RW_MAX_BYTES))))
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
    fn op_numbers_match_the_header_enum() {
        // enum { IOMMU_TEST_OP_ADD_RESERVED = 1, MOCK_DOMAIN, MD_CHECK_MAP, MD_CHECK_REFS,
        // CREATE_ACCESS, DESTROY_ACCESS_PAGES, ACCESS_PAGES, ACCESS_RW, SET_TEMP_MEMORY_LIMIT,
        // MOCK_DOMAIN_REPLACE, ACCESS_REPLACE_IOAS, MOCK_DOMAIN_FLAGS, DIRTY, ... }
        assert_eq!(OP_CREATE_ACCESS, 5);
        assert_eq!(OP_ACCESS_RW, 8);
        assert_eq!(OP_MOCK_DOMAIN_REPLACE, 10);
        assert_eq!(OP_MOCK_DOMAIN_FLAGS, 12);
        assert_eq!(OP_DIRTY, 13);
        assert_eq!(MOCK_ACCESS_RW_WRITE, 1);
    }

    #[test]
    fn payload_layouts_match_the_header() {
        // The union is 48 bytes (its largest member, `dirty`), 8-aligned, at offset 16.
        for (size, payload, last) in [
            (
                size_of::<TestCmd<CreateAccess>>(),
                offset_of!(TestCmd<CreateAccess>, payload),
                offset_of!(TestCmd<CreateAccess>, last),
            ),
            (
                size_of::<TestCmd<AccessRw>>(),
                offset_of!(TestCmd<AccessRw>, payload),
                offset_of!(TestCmd<AccessRw>, last),
            ),
            (
                size_of::<TestCmd<Dirty>>(),
                offset_of!(TestCmd<Dirty>, payload),
                offset_of!(TestCmd<Dirty>, last),
            ),
            (
                size_of::<TestCmd<MockDomainFlags>>(),
                offset_of!(TestCmd<MockDomainFlags>, payload),
                offset_of!(TestCmd<MockDomainFlags>, last),
            ),
        ] {
            assert_eq!((size, payload, last), (72, 16, 64));
        }
        // create_access { __u32 out_access_fd; __u32 flags; }
        assert_eq!(offset_of!(CreateAccess, out_access_fd), 0);
        assert_eq!(offset_of!(CreateAccess, flags), 4);
        // access_rw { __aligned_u64 iova, length, uptr; __u32 flags; }
        assert_eq!(offset_of!(AccessRw, iova), 0);
        assert_eq!(offset_of!(AccessRw, length), 8);
        assert_eq!(offset_of!(AccessRw, uptr), 16);
        assert_eq!(offset_of!(AccessRw, flags), 24);
        // dirty { __u32 flags; __aligned_u64 iova, length, page_size, uptr, out_nr_dirty; }
        assert_eq!(offset_of!(Dirty, iova), 8);
        assert_eq!(offset_of!(Dirty, length), 16);
        assert_eq!(offset_of!(Dirty, page_size), 24);
        assert_eq!(offset_of!(Dirty, uptr), 32);
        assert_eq!(offset_of!(Dirty, out_nr_dirty), 40);
        // mock_domain_flags { __u32 out_stdev_id, out_hwpt_id, out_idev_id, dev_flags; }
        assert_eq!(offset_of!(MockDomainFlags, out_hwpt_id), 4);
        assert_eq!(offset_of!(MockDomainFlags, out_idev_id), 8);
        assert_eq!(offset_of!(MockDomainFlags, dev_flags), 12);
    }

    #[test]
    fn access_rw_command_carries_fd_range_and_direction() {
        let cmd = test_cmd(
            OP_ACCESS_RW,
            9,
            AccessRw {
                iova: 1 << 24,
                length: 100,
                uptr: 0x1000,
                flags: MOCK_ACCESS_RW_WRITE,
                ..Default::default()
            },
        );
        assert_eq!((cmd.size, cmd.op, cmd.id), (72, 8, 9));
        assert_eq!(
            (cmd.payload.iova, cmd.payload.length, cmd.payload.flags),
            (1 << 24, 100, 1)
        );
    }

    #[test]
    fn access_pieces_split_at_the_kernel_limit() {
        let pieces = |iova, len| access_pieces(Iova(iova), len).map(|p| p.collect::<Vec<_>>());
        assert_eq!(pieces(1 << 24, 0).ok(), Some(vec![]));
        assert_eq!(pieces(1 << 24, 100).ok(), Some(vec![(0, 100)]));
        assert_eq!(
            pieces(1 << 24, ACCESS_RW_MAX_BYTES).ok(),
            Some(vec![(0, ACCESS_RW_MAX_BYTES)])
        );
        assert_eq!(
            pieces(1 << 24, 2 * ACCESS_RW_MAX_BYTES + 1).ok(),
            Some(vec![
                (0, ACCESS_RW_MAX_BYTES),
                (ACCESS_RW_MAX_BYTES, ACCESS_RW_MAX_BYTES),
                (2 * ACCESS_RW_MAX_BYTES, 1)
            ])
        );
        // The last byte may be the last IOVA; one more wraps.
        assert_eq!(pieces(u64::MAX, 1).ok(), Some(vec![(0, 1)]));
        assert!(matches!(
            pieces(u64::MAX, 2),
            Err(IommufdTestError::AccessRange {
                iova: Iova(u64::MAX),
                len_bytes: 2
            })
        ));
    }

    #[test]
    fn command_size_field_is_the_struct_size() {
        assert_eq!(test_cmd(OP_DIRTY, 7, Dirty::default()).size, 72);
        assert_eq!(test_cmd(OP_DIRTY, 7, Dirty::default()).id, 7);
    }
}
