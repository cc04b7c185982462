//! A TLS connection the engine can split: one pump thread per connection owns the TCP socket and
//! the rustls state and moves bytes between it and one end of a `UnixStream::pair()`; the engine
//! holds the other end ([`TlsStream`]), which it can `try_clone`, shut down and time out like any
//! socket. (Kernel TLS would keep the TCP fd itself splittable, but this host's kernel has no
//! `tls` ULP.)
//!
//! Lifetime: the pump ends when both directions are finished — the engine closed or shut down
//! its end (the pump then sends close_notify and shuts the TCP socket down) and the peer's data
//! ended — or at once on a TCP or TLS error (the engine's end then reads EOF and fails writes).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Bytes moved per read from either socket.
const BUF: usize = 256 << 10;
/// rustls takes ciphertext in pieces of at most this (it reads 4 KiB at a time).
const FEED: usize = 16 << 10;

/// The engine's end of a TLS connection.
#[derive(Debug)]
pub struct TlsStream {
    end: UnixStream,
    peer: String,
}

impl TlsStream {
    /// Start the pump for an established connection; `tcp` is made non-blocking.
    pub(crate) fn spawn(
        conn: rustls::Connection,
        tcp: TcpStream,
        peer: String,
    ) -> io::Result<Self> {
        let (end, pump_end) = UnixStream::pair()?;
        tcp.set_nonblocking(true)?;
        pump_end.set_nonblocking(true)?;
        let name = peer.clone();
        let mut p = Pump::new(conn, tcp, pump_end)?;
        std::thread::Builder::new()
            .name("tern-tls-pump".into())
            .spawn(move || {
                if let Err(e) = p.run() {
                    if p.out_done {
                        // Only close_notify was left to send; the peer may already be gone.
                        log::debug!("migration tls connection with {name}: {e}");
                    } else {
                        log::warn!("migration tls connection with {name}: {e}");
                    }
                    let _ = p.unix.shutdown(Shutdown::Both);
                    let _ = p.tcp.shutdown(Shutdown::Both);
                }
            })?;
        Ok(TlsStream { end, peer })
    }

    /// A second handle on the engine's end.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(TlsStream {
            end: self.end.try_clone()?,
            peer: self.peer.clone(),
        })
    }

    /// Shut the engine's end down (`Both` ends the connection: the pump sends close_notify).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.end.shutdown(how)
    }

    /// Bound blocking reads.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.end.set_read_timeout(t)
    }

    /// Blocking or not.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.end.set_nonblocking(on)
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.end.read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.end.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ReadVolatile for TlsStream {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        self.end.read_volatile(buf)
    }
}

impl WriteVolatile for TlsStream {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        self.end.write_volatile(buf)
    }
}

struct Pump {
    conn: rustls::Connection,
    tcp: TcpStream,
    unix: UnixStream,
    /// Ciphertext read from TCP, not yet given to rustls.
    cipher: Vec<u8>,
    cipher_pos: usize,
    cipher_len: usize,
    /// Plaintext from the peer, not yet written to the engine.
    plain_in: Vec<u8>,
    plain_in_pos: usize,
    /// Plaintext from the engine.
    out_buf: Vec<u8>,
    /// Peer → engine finished: the peer's stream ended and the engine's end got EOF.
    in_done: bool,
    /// The peer ended its stream (close_notify or TCP EOF).
    peer_eof: bool,
    /// The engine takes no more data (it shut its read side or closed): drop what arrives.
    discard: bool,
    /// The engine closed every handle (or shut both directions): nobody waits for anything.
    engine_gone: bool,
    /// Engine → peer finished: close_notify queued.
    out_done: bool,
    epoll: Interest,
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl Pump {
    fn new(conn: rustls::Connection, tcp: TcpStream, unix: UnixStream) -> io::Result<Self> {
        Ok(Pump {
            conn,
            tcp,
            unix,
            cipher: vec![0; BUF],
            cipher_pos: 0,
            cipher_len: 0,
            plain_in: Vec::with_capacity(BUF),
            plain_in_pos: 0,
            out_buf: vec![0; BUF],
            in_done: false,
            peer_eof: false,
            discard: false,
            engine_gone: false,
            out_done: false,
            epoll: Interest::new()?,
        })
    }

    fn run(&mut self) -> io::Result<()> {
        // Backpressure is ours: the engine's end is read only once every record went out.
        self.conn.set_buffer_limit(None);
        // The handshake may have read records past its end (the peer's first data).
        self.decrypt()?;
        loop {
            let mut progress = self.flush_tls()?;
            progress |= self.engine_to_tls()?;
            progress |= self.flush_tls()?;
            progress |= self.tls_to_engine()?;
            if self.out_done && !self.conn.wants_write() && (self.in_done || self.engine_gone) {
                return Ok(());
            }
            if !progress {
                self.wait()?;
            }
        }
    }

    /// Write pending TLS records to TCP.
    fn flush_tls(&mut self) -> io::Result<bool> {
        let mut progress = false;
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => progress = true,
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        if progress && self.out_done && !self.conn.wants_write() {
            // close_notify is out; the peer reads EOF.
            let _ = self.tcp.shutdown(Shutdown::Write);
        }
        Ok(progress)
    }

    /// Engine's plaintext → TLS records, once the previous records went out.
    fn engine_to_tls(&mut self) -> io::Result<bool> {
        if self.out_done || self.conn.wants_write() {
            return Ok(false);
        }
        match self.unix.read(&mut self.out_buf) {
            Ok(n) if n > 0 => {
                self.conn.writer().write_all(&self.out_buf[..n])?;
                Ok(true)
            }
            Err(e) if would_block(&e) => Ok(false),
            // EOF or error: the engine sends nothing more.
            _ => {
                self.out_done = true;
                self.conn.send_close_notify();
                Ok(true)
            }
        }
    }

    /// TCP → rustls → plaintext → engine.
    fn tls_to_engine(&mut self) -> io::Result<bool> {
        let mut progress = false;
        loop {
            if self.in_done {
                return Ok(progress);
            }
            // Deliver what is decrypted first.
            if self.plain_in_pos < self.plain_in.len() && !self.discard {
                match self.unix.write(&self.plain_in[self.plain_in_pos..]) {
                    Ok(n) => {
                        self.plain_in_pos += n;
                        progress = true;
                        continue;
                    }
                    Err(e) if would_block(&e) => return Ok(progress),
                    // The engine stopped reading (shutdown_read or closed): drop the rest.
                    Err(_) => self.discard = true,
                }
            }
            self.plain_in.clear();
            self.plain_in_pos = 0;
            if self.peer_eof {
                self.in_done = true;
                let _ = self.unix.shutdown(Shutdown::Write);
                return Ok(true);
            }
            // Give buffered ciphertext to rustls, collecting the plaintext.
            if self.cipher_pos < self.cipher_len {
                while self.cipher_pos < self.cipher_len && self.plain_in.len() < BUF {
                    let end = self.cipher_len.min(self.cipher_pos + FEED);
                    let mut slice = &self.cipher[self.cipher_pos..end];
                    let n = self.conn.read_tls(&mut slice)?;
                    self.cipher_pos += n;
                    self.decrypt()?;
                    if n == 0 || self.peer_eof {
                        break;
                    }
                }
                if self.peer_eof {
                    self.cipher_pos = self.cipher_len;
                }
                progress = true;
                continue;
            }
            match self.tcp.read(&mut self.cipher) {
                Ok(0) => self.peer_eof = true,
                Ok(n) => {
                    self.cipher_pos = 0;
                    self.cipher_len = n;
                }
                Err(e) if would_block(&e) => return Ok(progress),
                Err(e) => return Err(e),
            }
            progress = true;
        }
    }

    fn decrypt(&mut self) -> io::Result<()> {
        let state = self
            .conn
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let avail = state.plaintext_bytes_to_read();
        if avail > 0 {
            let start = self.plain_in.len();
            self.plain_in.resize(start + avail, 0);
            self.conn.reader().read_exact(&mut self.plain_in[start..])?;
        }
        if state.peer_has_closed() {
            self.peer_eof = true;
        }
        Ok(())
    }

    /// Sleep until a socket can make progress.
    fn wait(&mut self) -> io::Result<()> {
        let mut tcp_ev = EventSet::empty();
        let mut unix_ev = EventSet::empty();
        if self.conn.wants_write() {
            tcp_ev |= EventSet::OUT;
        }
        if !self.in_done && !self.peer_eof && self.plain_in_pos >= self.plain_in.len() {
            tcp_ev |= EventSet::IN;
        }
        if !self.out_done && !self.conn.wants_write() {
            unix_ev |= EventSet::IN;
        }
        if !self.in_done && self.plain_in_pos < self.plain_in.len() {
            unix_ev |= EventSet::OUT;
        }
        // A socket with nothing to wait for stays out: its EPOLLHUP would spin the loop. The
        // engine's end stays in until its hang-up was seen.
        let tcp_fd = self.tcp.as_raw_fd();
        let unix_fd = self.unix.as_raw_fd();
        let want_unix = !unix_ev.is_empty() || !self.engine_gone;
        if tcp_ev.is_empty() && !want_unix {
            return Err(io::Error::other("tls pump has nothing to wait for"));
        }
        self.epoll
            .set(0, tcp_fd, (!tcp_ev.is_empty()).then_some(tcp_ev))?;
        self.epoll.set(1, unix_fd, want_unix.then_some(unix_ev))?;
        let mut events = [EpollEvent::default(); 2];
        let n = match self.epoll.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if would_block(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        for e in &events[..n] {
            if e.data() == 1 && e.event_set().contains(EventSet::HANG_UP) {
                // Both directions of the engine's end are shut: it neither reads nor writes again.
                self.engine_gone = true;
                self.discard = true;
            }
        }
        Ok(())
    }
}

/// The pump's epoll set, changed only when the interest changes.
struct Interest {
    epoll: Epoll,
    registered: [Option<EventSet>; 2],
}

impl Interest {
    fn new() -> io::Result<Self> {
        Ok(Interest {
            epoll: Epoll::new()?,
            registered: [None, None],
        })
    }

    fn set(&mut self, slot: usize, fd: i32, want: Option<EventSet>) -> io::Result<()> {
        if self.registered[slot] == want {
            return Ok(());
        }
        let ev = EpollEvent::new(want.unwrap_or(EventSet::empty()), slot as u64);
        let op = match (self.registered[slot], want) {
            (None, Some(_)) => ControlOperation::Add,
            (Some(_), Some(_)) => ControlOperation::Modify,
            (Some(_), None) => ControlOperation::Delete,
            (None, None) => return Ok(()),
        };
        self.epoll.ctl(op, fd, ev)?;
        self.registered[slot] = want;
        Ok(())
    }
}
