//! Guest memory lent to code that wants byte slices (the TLS record layer's AEAD, the page sum),
//! so that it works on guest memory in place instead of on a copy. With `transport::sockopt` and
//! `transport::sendfile`, the crate's only `unsafe`.

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{VolatileMemoryError, VolatileSlice};

/// `len` bytes of `mem` from `at` as a byte slice to decrypt into, marked dirty like a copy
/// into them would be.
#[allow(unsafe_code)]
pub(crate) fn guest_bytes<'a, B: BitmapSlice>(
    mem: &'a mut VolatileSlice<'_, B>,
    at: usize,
    len: usize,
) -> Option<&'a mut [u8]> {
    let s = mem.subslice(at, len).ok()?;
    s.bitmap().mark_dirty(0, len);
    let ptr = s.ptr_guard_mut().as_ptr();
    // SAFETY: a VolatileSlice covers `len` mapped, writable bytes from `ptr` for as long as
    // `mem` is borrowed, which bounds the returned slice; `read_volatile` got `mem` mutably, so
    // this stream is the one writer of these bytes while it reads into them, and any byte value
    // is a valid u8. A racing reader of guest memory sees partial data, as with any copy.
    Some(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// `len` bytes of `mem` from `at` as a byte slice to read once: for the AEAD to encrypt from,
/// or to hash a page the destination has just received (its VM does not run yet, and the
/// receiving connection is the one writer of that page).
#[allow(unsafe_code)]
pub(crate) fn guest_view<'a, B: BitmapSlice>(
    mem: &'a VolatileSlice<'_, B>,
    at: usize,
    len: usize,
) -> Result<&'a [u8], VolatileMemoryError> {
    let s = mem.subslice(at, len)?;
    let ptr = s.ptr_guard().as_ptr();
    // SAFETY: a VolatileSlice covers `len` mapped, readable bytes from `ptr` for as long as
    // `mem` is borrowed, which bounds the returned slice, and any byte value is a valid u8. The
    // callers read through it once: the AEAD's machine code (a guest vCPU writing meanwhile
    // changes what is sent — that page is dirty and goes again, as with a copy or a plain
    // `send` — not what Rust code sees), or the destination's page check, where nothing else
    // writes the page.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Faults in every page of `mem` writable (`MADV_POPULATE_WRITE`): allocates what is not yet
/// there without changing any byte, as a write fault would. Fails with `EINVAL` on kernels
/// before 5.14.
#[allow(unsafe_code)]
pub(crate) fn populate_write<B: BitmapSlice>(mem: &VolatileSlice<'_, B>) -> std::io::Result<()> {
    let ptr = mem.ptr_guard_mut().as_ptr();
    // SAFETY: a VolatileSlice covers `len` mapped bytes from `ptr` for as long as `mem` is
    // borrowed; populating changes no byte of them (the kernel only allocates and maps pages),
    // so no reader or writer of the memory can observe it.
    let r = unsafe { libc::madvise(ptr.cast(), mem.len(), libc::MADV_POPULATE_WRITE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
