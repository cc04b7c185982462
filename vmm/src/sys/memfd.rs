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
