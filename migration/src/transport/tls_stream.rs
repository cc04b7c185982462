//! A TLS connection the engine can split like a socket: every handle ([`TlsStream::try_clone`])
//! shares the TCP socket, and the two directions have their own keys and locks (the kernel-TLS
//! model), so one thread reads while another writes and each does its own crypto — no pump
//! thread, no extra copy through a socket pair.
//!
//! Reads block in `recv` holding only the read lock, writes block in `send` holding only the
//! write lock: `shutdown` and read timeouts act on the TCP socket directly and wake them.
//! The end of the stream is authenticated: a reader gets EOF only after the peer's close_notify
//! (or after shutting its own read side); a TCP EOF before it is an error (truncation). This
//! side sends close_notify when its write side is shut or the last handle is dropped.
//!
//! Cost (`benches/tls_throughput.rs` has the numbers): per byte, one AES-GCM pass on each side
//! beyond plain TCP and no user-space copy. The writer seals guest memory straight into a reused
//! record buffer (`Sealer::seal_from`, out of place) and sends a batch of records with one
//! `send`; the reader opens a record straight into the caller's memory (guest memory too) when
//! the whole record fits there (`Opener::open_to`), else in place in its receive buffer and
//! copies the plaintext out. The AEAD is aws-lc's (VAES, AVX-512). Kernel TLS (absent from this
//! host's kernel: no `tls` ULP) would take the same secrets (`tls_handshake` already ends in
//! rustls's `KernelConnection`) and decrypt from the socket buffers into the reader's memory,
//! saving the reader's socket copy; it would not save the AEAD. NIC TLS offload would.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::{AlertDescription, ContentType};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::tls_handshake::{Established, Kernel};
use super::tls_record::{
    inner_len, payload_len, post_handshake, Opener, PostHandshake, Sealer, Suite, HEADER,
    MAX_CIPHER, MAX_PLAIN, OVERHEAD,
};
use crate::guest_bytes::{guest_bytes, guest_view};

/// Ciphertext read per `recv` at most: large enough for few system calls, small enough to stay
/// in cache while the records are opened (1-2 MiB measured no better, some worse).
const RX_BUF: usize = 256 << 10;
/// Plaintext sealed per `send` at most: 16 records (the same trade-off).
const TX_BATCH: usize = 16 * MAX_PLAIN;

/// The engine's handle on a TLS connection.
pub struct TlsStream {
    inner: Arc<Inner>,
}

struct Inner {
    tcp: TcpStream,
    peer: String,
    suite: Suite,
    rx: Mutex<Rx>,
    tx: Mutex<Tx>,
    /// Derives the next keys of either direction.
    kernel: Mutex<Kernel>,
    /// The peer asked for a key update: the writer sends one before its next record.
    rekey_requested: AtomicBool,
    /// This side shut its read side: reads return EOF.
    read_shut: AtomicBool,
}

struct Rx {
    opener: Opener,
    /// Ciphertext in `buf[start..end]`; decrypted data not yet delivered in `plain`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    plain: (usize, usize),
    /// The peer sent close_notify.
    closed: bool,
    /// The connection failed: every later read fails the same way.
    failed: Option<(io::ErrorKind, String)>,
}

struct Tx {
    sealer: Sealer,
    /// close_notify went out (or the write side is shut): no more records.
    closed: bool,
    /// A send failed part way: the stream can't continue.
    broken: bool,
    /// The records of one send, sealed in place: reused, so no allocation per record.
    out: Vec<u8>,
}

impl TlsStream {
    /// Wrap an established connection; `tcp` must be blocking.
    pub(crate) fn new(tcp: TcpStream, peer: String, est: Established) -> io::Result<Self> {
        let invalid = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let suite = match &est.kernel {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        }
        .tls13()
        .map(Suite)
        .ok_or_else(|| io::Error::other("not a tls 1.3 connection"))?;
        let (tx_seq, tx_secrets) = est.secrets.tx;
        let (rx_seq, rx_secrets) = est.secrets.rx;
        let mut buf = est.leftover;
        let end = buf.len();
        buf.resize(RX_BUF.max(end), 0);
        Ok(TlsStream {
            inner: Arc::new(Inner {
                tcp,
                peer,
                suite,
                rx: Mutex::new(Rx {
                    opener: suite.opener(rx_seq, rx_secrets).map_err(invalid)?,
                    buf,
                    start: 0,
                    end,
                    plain: (0, 0),
                    closed: false,
                    failed: None,
                }),
                tx: Mutex::new(Tx {
                    sealer: suite.sealer(tx_seq, tx_secrets).map_err(invalid)?,
                    closed: false,
                    broken: false,
                    out: Vec::new(),
                }),
                kernel: Mutex::new(est.kernel),
                rekey_requested: AtomicBool::new(false),
                read_shut: AtomicBool::new(false),
            }),
        })
    }

    /// A second handle on the same connection.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(TlsStream {
            inner: self.inner.clone(),
        })
    }

    /// Shut down like a socket: `Read` makes reads (also blocked ones) return EOF; `Write` and
    /// `Both` send close_notify first unless a writer is mid-record (an abort: the peer then
    /// sees a truncated stream, an error).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            self.inner.read_shut.store(true, Ordering::SeqCst);
        }
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            if let Ok(mut tx) = self.inner.tx.try_lock() {
                close_notify(&self.inner.tcp, &mut tx);
            }
        }
        self.inner.tcp.shutdown(how)
    }

    /// Bound blocking reads.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.inner.tcp.set_read_timeout(t)
    }

    /// Blocking or not (writes need a blocking socket: a short send fails the stream).
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.inner.tcp.set_nonblocking(on)
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.inner.peer
    }

    /// Update the sending keys every `records` records (tests: key updates without terabytes).
    #[doc(hidden)]
    pub fn rekey_every(&self, records: u64) {
        lock(&self.inner.tx).sealer.rekey_every(records);
    }
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsStream({})", self.inner.peer)
    }
}

/// A poisoned lock means a thread panicked mid-operation; the state is still consistent enough
/// to fail cleanly (`broken`/`failed` flags), so carry on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Inner {
    /// Deliver up to `want` bytes of plaintext into `sink`; blocks only while nothing was
    /// delivered. Ok(0): end of stream.
    fn read_with(&self, want: usize, sink: &mut (impl Sink + ?Sized)) -> io::Result<usize> {
        if want == 0 {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        let mut done = 0;
        loop {
            if self.read_shut.load(Ordering::SeqCst) {
                return Ok(done);
            }
            if let Some((kind, msg)) = &rx.failed {
                return if done > 0 {
                    Ok(done)
                } else {
                    Err(io::Error::new(*kind, msg.clone()))
                };
            }
            let (p0, p1) = rx.plain;
            if p0 < p1 {
                let n = (p1 - p0).min(want - done);
                sink.put(done, &rx.buf[p0..p0 + n]);
                rx.plain.0 += n;
                done += n;
                if done == want {
                    return Ok(done);
                }
                continue;
            }
            if rx.closed {
                return Ok(done);
            }
            match self.next_record(&mut rx, sink, done, want) {
                Ok(Next::Delivered(n)) => {
                    done += n;
                    if done == want {
                        return Ok(done);
                    }
                    continue;
                }
                Ok(Next::Opened) => continue,
                Ok(Next::NeedMore) if done > 0 => return Ok(done),
                Ok(Next::NeedMore) => {}
                Err(e) => {
                    rx.failed = Some((e.kind(), e.to_string()));
                    continue;
                }
            }
            if let Err(e) = self.fill(&mut rx) {
                if self.read_shut.load(Ordering::SeqCst) {
                    // Shut down meanwhile (EOF, or EAGAIN while close_notify went out).
                    continue;
                }
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) {
                    // Nothing lost: the partial record stays buffered.
                    return Err(e);
                }
                rx.failed = Some((e.kind(), e.to_string()));
            }
        }
    }

    /// Open the next buffered record if it is whole. Application data goes straight into
    /// `sink` at `done` when the sink lends memory for the whole inner plaintext within `want`
    /// (decrypting there saves the copy); otherwise the record is opened in place in the buffer.
    fn next_record(
        &self,
        rx: &mut Rx,
        sink: &mut (impl Sink + ?Sized),
        done: usize,
        want: usize,
    ) -> io::Result<Next> {
        let avail = rx.end - rx.start;
        if avail < HEADER {
            return Ok(Next::NeedMore);
        }
        let len = payload_len(&rx.buf[rx.start..rx.start + HEADER]).map_err(invalid)?;
        if avail < HEADER + len {
            return Ok(Next::NeedMore);
        }
        let at = rx.start;
        let rec = at..at + HEADER + len;
        rx.start += HEADER + len;
        let inner = inner_len(len);
        if want - done >= inner {
            if let Some(out) = sink.direct(done, inner) {
                let (typ, n) = rx.opener.open_to(&rx.buf[rec], out).map_err(invalid)?;
                if typ == ContentType::ApplicationData {
                    return Ok(Next::Delivered(n));
                }
                // A control record (rare, short): out of the sink, which it must not fill.
                let body = out[..n].to_vec();
                rx.closed |= self.control(&mut rx.opener, typ, &body)?;
                return Ok(Next::Opened);
            }
        }
        let Rx { opener, buf, .. } = rx;
        let (typ, n) = opener.open(&mut buf[rec]).map_err(invalid)?;
        let body = at + HEADER..at + HEADER + n;
        if typ == ContentType::ApplicationData {
            rx.plain = (body.start, body.end);
        } else {
            rx.closed |= self.control(opener, typ, &buf[body])?;
        }
        Ok(Next::Opened)
    }

    /// Act on an opened record other than application data. Ok(true): the peer closed.
    fn control(&self, opener: &mut Opener, typ: ContentType, body: &[u8]) -> io::Result<bool> {
        match typ {
            ContentType::Alert => match body {
                [_, 0] => Ok(true),
                [_, d] => Err(invalid(format!(
                    "peer sent alert {:?}",
                    AlertDescription::from(*d)
                ))),
                _ => Err(invalid("malformed alert")),
            },
            ContentType::Handshake => {
                for m in post_handshake(body).map_err(invalid)? {
                    self.post_handshake(opener, m)?;
                }
                Ok(false)
            }
            t => Err(invalid(format!("unexpected record content {t:?}"))),
        }
    }

    fn post_handshake(&self, opener: &mut Opener, m: PostHandshake<'_>) -> io::Result<()> {
        let mut kernel = lock(&self.kernel);
        match (m, &mut *kernel) {
            (PostHandshake::KeyUpdate(request), k) => {
                let (seq, s) = match k {
                    Kernel::Client(k) => k.update_rx_secret(),
                    Kernel::Server(k) => k.update_rx_secret(),
                }
                .map_err(invalid)?;
                opener.rekey(self.suite, seq, s).map_err(invalid)?;
                if request {
                    self.rekey_requested.store(true, Ordering::SeqCst);
                }
            }
            (PostHandshake::NewSessionTicket(t), Kernel::Client(k)) => {
                k.handle_new_session_ticket(t).map_err(invalid)?
            }
            (PostHandshake::NewSessionTicket(_), Kernel::Server(_)) => {
                return Err(invalid("client sent a session ticket"))
            }
        }
        Ok(())
    }

    /// Read more ciphertext (blocking); a TCP EOF here is a truncation.
    fn fill(&self, rx: &mut Rx) -> io::Result<()> {
        if rx.buf.len() - rx.end < HEADER + MAX_CIPHER {
            // Move the partial record to the front; it is short.
            let (s, e) = (rx.start, rx.end);
            rx.buf.copy_within(s..e, 0);
            rx.start = 0;
            rx.end = e - s;
        }
        let end = rx.end;
        match (&self.tcp).read(&mut rx.buf[end..])? {
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "tls connection with {} ended without close_notify (truncated)",
                    self.peer
                ),
            )),
            n => {
                rx.end += n;
                Ok(())
            }
        }
    }

    /// Seal `len` bytes of plaintext (at most [`TX_BATCH`] are taken) and send them;
    /// `plain(at, n)` lends the `n` bytes from offset `at`. An error leaves the stream broken.
    fn write_with<'p>(
        &self,
        tx: &mut Tx,
        len: usize,
        plain: impl Fn(usize, usize) -> io::Result<&'p [u8]>,
    ) -> io::Result<usize> {
        if tx.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tls connection failed earlier",
            ));
        }
        if tx.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tls write side is shut down",
            ));
        }
        let len = len.min(TX_BATCH);
        // Records are numbered as they are sealed: any failure from here leaves a gap.
        let sent = self.seal_and_send(tx, len, plain);
        if sent.is_err() {
            tx.broken = true;
        }
        sent.map(|()| len)
    }

    /// Full records, sealed one after another from the plaintext into `tx.out`, then one `send`
    /// for all of them.
    fn seal_and_send<'p>(
        &self,
        tx: &mut Tx,
        len: usize,
        plain: impl Fn(usize, usize) -> io::Result<&'p [u8]>,
    ) -> io::Result<()> {
        let mut used = 0;
        let mut off = 0;
        while off < len {
            if tx.sealer.must_rekey() || self.rekey_requested.swap(false, Ordering::SeqCst) {
                let rec = self.rekey(tx)?;
                grow(&mut tx.out, used + rec.len());
                tx.out[used..used + rec.len()].copy_from_slice(&rec);
                used += rec.len();
            }
            let n = (len - off).min(MAX_PLAIN);
            let src = plain(off, n)?;
            grow(&mut tx.out, used + n + OVERHEAD);
            used += tx
                .sealer
                .seal_from(ContentType::ApplicationData, src, &mut tx.out[used..])
                .map_err(invalid)?;
            off += n;
        }
        (&self.tcp).write_all(&tx.out[..used])
    }

    /// A KeyUpdate under the current keys, to send before anything sealed after the switch to
    /// the next ones.
    fn rekey(&self, tx: &mut Tx) -> io::Result<Vec<u8>> {
        let rec = tx.sealer.key_update(false).map_err(invalid)?;
        let (seq, s) = match &mut *lock(&self.kernel) {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
        .map_err(invalid)?;
        tx.sealer.rekey(self.suite, seq, s).map_err(invalid)?;
        Ok(rec)
    }
}

/// Make `buf` at least `len` long (it only ever grows: the next send reuses it).
fn grow(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}

/// Send close_notify once, without blocking (a full socket just misses it: the peer then
/// reports truncation, which is what an abort is). Only syscalls the migration threads' seccomp
/// filter allows; on a thread whose filter refuses them (EPERM) it is skipped the same way.
fn close_notify(tcp: &TcpStream, tx: &mut Tx) {
    if tx.closed || tx.broken {
        tx.closed = true;
        return;
    }
    tx.closed = true;
    if let Ok(rec) = tx.sealer.close_notify() {
        // Never block here: a peer that stopped reading must not hang a shutdown or a drop.
        if tcp.set_nonblocking(true).is_ok() {
            let _ = (&*tcp).write(&rec);
            let _ = tcp.set_nonblocking(false);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: end the stream cleanly.
        let tx = self.tx.get_mut().unwrap_or_else(|e| e.into_inner());
        close_notify(&self.tcp, tx);
    }
}

/// What [`Inner::next_record`] did.
enum Next {
    /// Needs more ciphertext.
    NeedMore,
    /// Opened a record (its plaintext, if any, is buffered).
    Opened,
    /// Opened a record straight into the sink: this much plaintext.
    Delivered(usize),
}

/// Where a read's plaintext goes.
trait Sink {
    /// Copy `b` to offset `at`.
    fn put(&mut self, at: usize, b: &[u8]);
    /// `len` bytes at offset `at` to decrypt a record into directly, if the sink can lend them
    /// as plain memory.
    fn direct(&mut self, at: usize, len: usize) -> Option<&mut [u8]>;
}

impl Sink for [u8] {
    fn put(&mut self, at: usize, b: &[u8]) {
        self[at..at + b.len()].copy_from_slice(b);
    }
    fn direct(&mut self, at: usize, len: usize) -> Option<&mut [u8]> {
        self.get_mut(at..at + len)
    }
}

/// Guest memory; remembers the first failed access.
struct GuestSink<'a, 'm, B: BitmapSlice> {
    mem: &'a mut VolatileSlice<'m, B>,
    bad: Option<VolatileMemoryError>,
}

impl<B: BitmapSlice> Sink for GuestSink<'_, '_, B> {
    fn put(&mut self, at: usize, b: &[u8]) {
        match self.mem.subslice(at, b.len()) {
            Ok(s) => s.copy_from(b),
            Err(e) => self.bad = self.bad.take().or(Some(e)),
        }
    }
    fn direct(&mut self, at: usize, len: usize) -> Option<&mut [u8]> {
        guest_bytes(self.mem, at, len)
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read_with(buf.len(), buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut tx = lock(&self.inner.tx);
        self.inner
            .write_with(&mut tx, buf.len(), |at, n| Ok(&buf[at..at + n]))
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
        let want = buf.len();
        let mut sink = GuestSink {
            mem: buf,
            bad: None,
        };
        let n = self
            .inner
            .read_with(want, &mut sink)
            .map_err(VolatileMemoryError::IOError)?;
        match sink.bad {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }
}

impl WriteVolatile for TlsStream {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut tx = lock(&self.inner.tx);
        // The AEAD reads guest memory itself: no copy before it.
        self.inner
            .write_with(&mut tx, buf.len(), |at, n| {
                guest_view(buf, at, n).map_err(io::Error::other)
            })
            .map_err(VolatileMemoryError::IOError)
    }
}
