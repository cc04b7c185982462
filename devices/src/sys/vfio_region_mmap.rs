//! mmap of a VFIO device region (a BAR's `VFIO_REGION_INFO_FLAG_MMAP` part): the host mapping KVM
//! turns into a guest memory slot, so guest accesses reach the device without an exit.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// A shared read/write mapping of part of a VFIO device region, unmapped on drop.
#[derive(Debug)]
pub struct RegionMapping {
    addr: NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: the mapping is plain device memory addressed by its host address only; tern never
// creates Rust references into it (KVM and the guest access it), so sharing the address across
// threads is sound.
unsafe impl Send for RegionMapping {}
// SAFETY: as for `Send`: `&RegionMapping` only hands out the address and length.
unsafe impl Sync for RegionMapping {}

impl RegionMapping {
    /// Maps `len` bytes of `device` at file offset `offset` (the region's offset plus the offset
    /// inside it), read and write, shared with the device.
    pub fn new(device: &impl AsRawFd, offset: u64, len: u64) -> std::io::Result<Self> {
        let bad = || std::io::Error::from_raw_os_error(libc::EINVAL);
        let len = usize::try_from(len).map_err(|_| bad())?;
        let off = libc::off_t::try_from(offset).map_err(|_| bad())?;
        if len == 0 {
            return Err(bad());
        }
        // SAFETY: a fresh mapping at an address the kernel picks (no hint, no MAP_FIXED), so no
        // existing memory is replaced; `device` is borrowed, so its fd is open during the call
        // (the mapping then holds its own reference to the file); the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let addr = NonNull::new(p).ok_or_else(bad)?;
        Ok(Self { addr, len })
    }

    /// An anonymous mapping of `len` bytes, standing in for device memory in unit tests.
    pub fn anonymous(len: u64) -> std::io::Result<Self> {
        let len =
            usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh private anonymous mapping at a kernel-chosen address; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let addr =
            NonNull::new(p).ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(Self { addr, len })
    }

    /// Host address of the first byte.
    pub fn host_addr(&self) -> u64 {
        self.addr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Always false: empty mappings are refused at creation.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for RegionMapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly the mapping this value created and owns; nothing else
        // unmaps it, and whoever hands it to KVM keeps an `Arc` to it until the slot is deleted.
        unsafe { libc::munmap(self.addr.as_ptr(), self.len) };
    }
}

/// The host page size (mappings and memory slots are in whole pages).
pub fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the running kernel; no memory is involved.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|p| *p > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_mapping_is_usable_and_page_size_is_sane() {
        let m = RegionMapping::anonymous(8192).unwrap();
        assert_eq!(m.len(), 8192);
        assert!(!m.is_empty());
        assert_eq!(m.host_addr() % page_size(), 0);
        assert!(page_size().is_power_of_two() && page_size() >= 4096);
    }

    #[test]
    fn mapping_a_bad_fd_or_empty_range_is_an_error() {
        let f = std::fs::File::open("/dev/null").unwrap();
        // A read-only fd cannot back a shared writable mapping.
        assert!(RegionMapping::new(&f, 0, 4096).is_err());
        assert!(RegionMapping::new(&f, 0, 0).is_err());
    }
}
