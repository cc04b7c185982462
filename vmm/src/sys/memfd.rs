//! `memfd_create(2)`: guest RAM is a memfd so it can be DMA-mapped for VFIO and handed to another
//! process (same-host migration) as a file descriptor.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

/// Creates an anonymous, close-on-exec memory file named `name` (visible in /proc/PID/fd).
pub fn create(name: &str) -> std::io::Result<File> {
    let name =
        CString::new(name).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; the flags are a
    // constant; the kernel does not retain the pointer.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, is valid, and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The byte ranges of `[start, start + len)` in `file` that hold data, found with
/// `lseek(SEEK_DATA/SEEK_HOLE)`: pages of a memfd that were never written are holes and read as
/// zeroes, and reading them through a mapping would allocate them. Swapped-out pages count as data.
pub fn data_ranges(file: &File, start: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let end = start.saturating_add(len);
    let seek = |offset: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek only reads the descriptor, which `file` keeps open for the call; it does
        // not touch memory.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        // ENXIO: no data (or hole) at or after `offset` before the end of the file.
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let mut ranges = Vec::new();
    let mut pos = start;
    while pos < end {
        let Some(data) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        ranges.push((data, hole - data));
        pos = hole;
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn data_ranges_finds_written_pages_only() {
        let f = create("test").unwrap();
        f.set_len(64 << 20).unwrap();
        assert!(data_ranges(&f, 0, 64 << 20).unwrap().is_empty());
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        f.write_all_at(&[1u8; 8192], 40 << 20).unwrap();
        let r = data_ranges(&f, 0, 64 << 20).unwrap();
        let covered = |off: u64| r.iter().any(|(s, l)| (*s..s + l).contains(&off));
        assert!(covered(8 << 20) && covered((40 << 20) + 4096));
        assert!(!covered(0) && !covered(20 << 20) && !covered(63 << 20));
        // A window inside a hole, and one that starts inside data.
        assert!(data_ranges(&f, 16 << 20, 8 << 20).unwrap().is_empty());
        let inner = data_ranges(&f, (40 << 20) + 4096, 4096).unwrap();
        assert_eq!(inner, vec![((40 << 20) + 4096, 4096)]);
    }
}
