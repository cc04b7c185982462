//! Local (same-host) mode: guest memory regions travel as file descriptors (memfd) in SCM_RIGHTS
//! ancillary data, so nothing is copied. vmm-sys-util's safe `recv_with_fd` receives one fd per
//! call; the kernel never merges two fd-carrying sends into one receive, so one frame = one fd.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::ReadVolatile;
use vm_memory::{VolatileMemoryError, VolatileSlice};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::conn::TransportError;
use crate::protocol::{encode_frame, Frame, ProtocolError};

/// Send one frame with `fd` attached to its first byte.
pub fn send_frame_with_fd(
    stream: &UnixStream,
    frame: &Frame<'_>,
    fd: &impl AsRawFd,
) -> Result<(), SendFdError> {
    let mut buf = Vec::new();
    let tail = encode_frame(frame, &mut buf)?;
    buf.extend_from_slice(tail);
    let sent =
        stream
            .send_with_fd(&buf[..], fd.as_raw_fd())
            .map_err(|e| TransportError::SendFd {
                source: io::Error::from_raw_os_error(e.errno()),
            })?;
    // The fd went with the first byte; the rest of a short send can follow as plain bytes.
    let mut w = stream;
    io::Write::write_all(&mut w, &buf[sent..])
        .map_err(|source| TransportError::SendFd { source })?;
    Ok(())
}

/// Errors of [`send_frame_with_fd`].
#[derive(Debug, thiserror::Error)]
pub enum SendFdError {
    /// The frame did not encode.
    #[error("encode fd frame")]
    Encode(#[source] ProtocolError),
    /// The socket refused it.
    #[error("send fd frame")]
    Transport(#[source] TransportError),
}

impl From<ProtocolError> for SendFdError {
    fn from(e: ProtocolError) -> Self {
        SendFdError::Encode(e)
    }
}

impl From<TransportError> for SendFdError {
    fn from(e: TransportError) -> Self {
        SendFdError::Transport(e)
    }
}

/// A reader over a Unix stream that keeps every fd that arrives, in order.
#[derive(Debug)]
pub struct FdReader {
    stream: UnixStream,
    fds: VecDeque<File>,
}

impl FdReader {
    /// Wrap a Unix stream.
    pub fn new(stream: UnixStream) -> Self {
        FdReader {
            stream,
            fds: VecDeque::new(),
        }
    }

    /// The oldest received fd not yet taken.
    pub fn take_fd(&mut self) -> Option<File> {
        self.fds.pop_front()
    }
}

// Memory data never carries fds, so it can be read with plain reads straight into guest memory.
impl ReadVolatile for FdReader {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        self.stream.read_volatile(buf)
    }
}

// Page data carries no descriptors: `readv` on the socket reads what `read_volatile` would.
impl super::vectored::PlainSocket for FdReader {
    fn plain_socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(&self.stream))
    }
}

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (n, fd) = self
            .stream
            .recv_with_fd(buf)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if let Some(f) = fd {
            self.fds.push_back(f);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FrameReader, MemoryFdInfo};
    use std::io::{Seek, SeekFrom, Write};
    use vm_memory::GuestAddress;

    #[test]
    fn fd_frame_delivers_the_same_file() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let mut file = vmm_sys_util::tempfile::TempFile::new()
            .expect("temp file")
            .into_file();
        file.write_all(b"guest ram").expect("write");
        let info = MemoryFdInfo {
            gpa: GuestAddress(0),
            len_bytes: 4096,
            file_offset: 0,
        };
        send_frame_with_fd(&a, &Frame::MemoryFd(info), &file).expect("send");
        send_frame_with_fd(&a, &Frame::MemoryFd(info), &file).expect("send");
        let mut r = FrameReader::new(FdReader::new(b));
        for _ in 0..2 {
            assert_eq!(r.recv().expect("frame"), Frame::MemoryFd(info));
            let mut got = r.get_mut().take_fd().expect("fd arrived with the frame");
            let mut s = String::new();
            got.seek(SeekFrom::Start(0)).expect("seek");
            got.read_to_string(&mut s).expect("read");
            assert_eq!(s, "guest ram");
        }
        assert!(r.get_mut().take_fd().is_none());
    }
}
