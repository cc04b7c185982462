//! Scattered guest pages in one system call: `writev` and `readv` over guest memory.
//!
//! Pre-copy's later passes and the switchover send the pages the guest dirtied, mostly one 4 KiB
//! entry each. A `write` per entry on the source and a `read` per entry on the destination
//! made both ends trade the CPU page by page (the reader drained each page as it came and slept
//! again): a switchover of 1,500 scattered pages took 8–11 ms over a Unix socket where its
//! estimate, made at the rate of iteration 0's long runs, said 2. One call now moves up to
//! [`MAX_IOVECS`] entries. TLS streams keep a write or read per entry: their bytes go through
//! the record layer, not the socket.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// A stream whose bytes may come straight from a socket, so that they can be read with `readv`.
pub trait PlainSocket {
    /// The socket when the stream's bytes are its own (plain TCP, Unix); `None` when they pass
    /// a record layer (TLS) or are not a socket's.
    fn plain_socket(&self) -> Option<BorrowedFd<'_>>;
}

/// Most buffers one call takes (Linux's `IOV_MAX`).
pub const MAX_IOVECS: usize = 1024;

/// Where a partly done vectored transfer stands: the buffer it is in and the bytes of it done.
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    index: usize,
    offset: usize,
}

impl Cursor {
    /// Moves past `n` bytes of `lens`; returns each buffer's newly done range as
    /// (buffer, start, len) through `done`.
    fn advance(&mut self, lens: &[usize], mut n: usize, mut done: impl FnMut(usize, usize, usize)) {
        while n > 0 && self.index < lens.len() {
            let left = lens[self.index] - self.offset;
            let k = left.min(n);
            done(self.index, self.offset, k);
            n -= k;
            self.offset += k;
            if self.offset == lens[self.index] {
                self.index += 1;
                self.offset = 0;
            }
        }
        // Skip empty buffers so a finished transfer has index == lens.len().
        while self.index < lens.len() && lens[self.index] == 0 {
            self.index += 1;
        }
    }
}

/// The iovecs from `at` on (at most [`MAX_IOVECS`]).
fn iovecs<B: BitmapSlice>(bufs: &[VolatileSlice<'_, B>], at: Cursor) -> Vec<libc::iovec> {
    bufs[at.index..]
        .iter()
        .take(MAX_IOVECS)
        .enumerate()
        .map(|(i, b)| {
            let skip = if i == 0 { at.offset } else { 0 };
            libc::iovec {
                // SAFETY (of the later use): `skip` ≤ the buffer's length, so the pointer stays
                // inside (or one past) the mapped range the VolatileSlice covers.
                iov_base: b.ptr_guard().as_ptr().wrapping_add(skip).cast_mut().cast(),
                iov_len: b.len() - skip,
            }
        })
        .collect()
}

/// Calls `call` (a `writev` or `readv`) over what is left of `bufs` until every byte moved,
/// retrying when interrupted; `moved` sees each buffer's newly moved range (buffer, start,
/// length). A call that moves nothing ends it with `stalled`.
fn move_all<B: BitmapSlice>(
    bufs: &[VolatileSlice<'_, B>],
    stalled: io::ErrorKind,
    call: impl Fn(&[libc::iovec]) -> isize,
    mut moved: impl FnMut(usize, usize, usize),
) -> io::Result<()> {
    let lens: Vec<usize> = bufs.iter().map(|b| b.len()).collect();
    let mut at = Cursor::default();
    at.advance(&lens, 0, |_, _, _| {});
    while at.index < bufs.len() {
        match call(&iovecs(bufs, at)) {
            // n > 0 here.
            n if n > 0 => at.advance(&lens, n as usize, &mut moved),
            0 => return Err(stalled.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Writes every byte of `bufs`, in order, to the socket `fd`.
pub fn write_all_vectored<B: BitmapSlice>(
    fd: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_, B>],
) -> io::Result<()> {
    let writev = |iov: &[libc::iovec]| {
        // SAFETY: each iovec covers mapped guest memory the borrowed VolatileSlices keep alive
        // for this call (see `iovecs`); writev only reads it. The count fits an int (≤ IOV_MAX).
        #[allow(unsafe_code)]
        unsafe {
            libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int)
        }
    };
    move_all(bufs, io::ErrorKind::WriteZero, writev, |_, _, _| {})
}

/// Fills every byte of `bufs`, in order, from the socket `fd`, marking what it wrote dirty in
/// the slices' bitmaps (as vm-memory's own reads do).
pub fn read_exact_vectored<B: BitmapSlice>(
    fd: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_, B>],
) -> io::Result<()> {
    let readv = |iov: &[libc::iovec]| {
        // SAFETY: each iovec covers mapped guest memory the borrowed VolatileSlices keep alive
        // for this call (see `iovecs`), and any byte value is valid there. The count fits an
        // int (≤ IOV_MAX).
        #[allow(unsafe_code)]
        unsafe {
            libc::readv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int)
        }
    };
    move_all(
        bufs,
        io::ErrorKind::UnexpectedEof,
        readv,
        |i, start, len| bufs[i].bitmap().mark_dirty(start, len),
    )
}

/// This thread's read and write system calls so far (`syscr`, `syscw` of
/// `/proc/thread-self/io`): what the tests of the callers count.
#[cfg(test)]
pub(crate) fn thread_io_calls() -> (u64, u64) {
    let io = std::fs::read_to_string("/proc/thread-self/io")
        .expect("/proc/thread-self/io (task I/O accounting)");
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/thread-self/io: {io}"))
    };
    (field("syscr:"), field("syscw:"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    type Mem = GuestMemoryMmap<()>;

    const MEM: usize = 16 << 20;

    fn memory() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory")
    }

    /// One-page slices of `m` at `pages`, with an empty slice among them.
    fn slices<'a>(m: &'a Mem, pages: &[u64]) -> Vec<VolatileSlice<'a, ()>> {
        let mut v: Vec<_> = pages
            .iter()
            .map(|&g| m.get_slice(GuestAddress(g), 4096).expect("slice"))
            .collect();
        v.insert(3, m.get_slice(GuestAddress(0), 0).expect("empty slice"));
        v
    }

    /// 1,500 one-page buffers (more than one call's IOV_MAX), every other page, plus an empty
    /// buffer: written in one go they arrive in order, and read back scattered they land where
    /// they belong and nowhere else.
    #[test]
    fn scattered_pages_cross_a_socket_in_order_beyond_iov_max() {
        let src = memory();
        let dst = memory();
        let pages: Vec<u64> = (0..1500u64).map(|i| i * 2 * 4096).collect();
        for (i, &gpa) in pages.iter().enumerate() {
            src.write_slice(&[i as u8 ^ 0x5a; 4096], GuestAddress(gpa))
                .expect("fill");
        }
        let (a, b) = UnixStream::pair().expect("pair");
        let writer = {
            let (src, pages) = (src.clone(), pages.clone());
            std::thread::spawn(move || {
                write_all_vectored(a.as_fd(), &slices(&src, &pages)).expect("writev")
            })
        };
        read_exact_vectored(b.as_fd(), &slices(&dst, &pages)).expect("readv");
        writer.join().expect("writer");
        for (i, &gpa) in pages.iter().enumerate() {
            let mut got = [0u8; 4096];
            dst.read_slice(&mut got, GuestAddress(gpa)).expect("read");
            assert_eq!(got, [i as u8 ^ 0x5a; 4096], "page {i} at {gpa:#x}");
            dst.read_slice(&mut got, GuestAddress(gpa + 4096))
                .expect("read");
            assert_eq!(got, [0u8; 4096], "the page after {gpa:#x}");
        }
    }

    /// The stream ending before the buffers are full is an error, not a short read.
    #[test]
    fn early_end_of_stream_is_unexpected_eof() {
        let dst = memory();
        let (mut a, b) = UnixStream::pair().expect("pair");
        a.write_all(&[7u8; 6000]).expect("write");
        drop(a);
        let v = [
            dst.get_slice(GuestAddress(0), 4096).expect("slice"),
            dst.get_slice(GuestAddress(8192), 4096).expect("slice"),
        ];
        let e = read_exact_vectored(b.as_fd(), &v).expect_err("short stream");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
