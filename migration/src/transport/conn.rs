//! Connections and listeners for `tcp:` and `unix:` URLs.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, WriteVolatile};
use vm_memory::{VolatileMemoryError, VolatileSlice};

use super::tls::{TlsError, TlsServer};
use super::tls_stream::TlsStream;
use super::url::MigrationUrl;
use super::vectored::PlainSocket;

/// Transport errors; each names the URL or operation.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Connecting to the destination failed.
    #[error("connect to {url}")]
    Connect {
        /// Destination.
        url: MigrationUrl,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Listening failed.
    #[error("listen on {url}")]
    Bind {
        /// Listen address.
        url: MigrationUrl,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Accepting a connection failed.
    #[error("accept on {url}")]
    Accept {
        /// Listen address.
        url: MigrationUrl,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Configuring or duplicating a socket failed.
    #[error("configure socket ({what})")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Sending a file descriptor failed.
    #[error("send fd over unix socket")]
    SendFd {
        /// Why.
        #[source]
        source: io::Error,
    },
    /// TLS setup or handshake failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Local mode needs a Unix socket.
    #[error("local migration needs a unix: url, got {url}")]
    LocalNeedsUnix {
        /// The URL given.
        url: MigrationUrl,
    },
}

/// One established migration connection.
#[derive(Debug)]
pub enum Connection {
    /// TCP, plain or with TLS; never carries fds.
    Tcp(TcpLink),
    /// Unix stream socket (can carry fds).
    Unix(UnixStream),
}

/// A TCP connection: plain, or TLS (see `tls_stream`).
#[derive(Debug)]
pub enum TcpLink {
    /// Plain TCP.
    Plain(TcpStream),
    /// Mutually authenticated TLS, encrypted on the thread that reads or writes.
    Tls(TlsStream),
}

impl From<TcpStream> for TcpLink {
    fn from(s: TcpStream) -> Self {
        TcpLink::Plain(s)
    }
}

macro_rules! on_conn {
    ($conn:expr, $s:ident => $e:expr) => {
        match $conn {
            Connection::Tcp(TcpLink::Plain($s)) => $e,
            Connection::Tcp(TcpLink::Tls($s)) => $e,
            Connection::Unix($s) => $e,
        }
    };
}

fn connect_tcp(url: &MigrationUrl, host: &str, port: u16) -> Result<TcpStream, TransportError> {
    let err = |source| TransportError::Connect {
        url: url.clone(),
        source,
    };
    let addrs = (host, port).to_socket_addrs().map_err(err)?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host resolves to no address");
    for a in addrs {
        match TcpStream::connect(a) {
            Ok(s) => {
                tune_tcp(&s)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(err(last))
}

impl Connection {
    /// Connect to `url`.
    pub fn connect(url: &MigrationUrl) -> Result<Self, TransportError> {
        let err = |source| TransportError::Connect {
            url: url.clone(),
            source,
        };
        match url {
            MigrationUrl::Tcp { host, port } => Ok(Connection::Tcp(TcpLink::Plain(connect_tcp(
                url, host, *port,
            )?))),
            MigrationUrl::TcpTls { host, port, tls } => {
                let s = connect_tcp(url, host, *port)?;
                Ok(Connection::Tcp(TcpLink::Tls(tls.connect(s, host)?)))
            }
            MigrationUrl::Unix(p) => {
                let s = UnixStream::connect(p).map_err(err)?;
                // Only the sender connects and writes bulk data; a host cap below the ask
                // still works, only slower (see `sockopt`).
                match super::sockopt::enlarge_unix_send_buffer(&s) {
                    Ok(granted) => log::debug!("unix migration socket: send buffer {granted} B"),
                    Err(e) => log::warn!("unix migration socket: send buffer not enlarged: {e}"),
                }
                Ok(Connection::Unix(s))
            }
        }
    }

    /// A second handle on the same socket (one thread reads while another writes).
    pub fn try_clone(&self) -> Result<Self, TransportError> {
        let err = |source| TransportError::Socket {
            what: "duplicate",
            source,
        };
        Ok(match self {
            Connection::Tcp(l) => Connection::Tcp(match l {
                TcpLink::Plain(s) => TcpLink::Plain(s.try_clone().map_err(err)?),
                TcpLink::Tls(s) => TcpLink::Tls(s.try_clone().map_err(err)?),
            }),
            Connection::Unix(s) => Connection::Unix(s.try_clone().map_err(err)?),
        })
    }

    /// Shut both directions down; a blocked reader on a clone wakes with EOF.
    pub fn shutdown(&self) {
        // Already-closed sockets return ENOTCONN, which is the state we want.
        let _ = on_conn!(self, s => s.shutdown(Shutdown::Both));
    }

    /// Shut the read side down: a blocked reader wakes with EOF, writes still work.
    pub fn shutdown_read(&self) {
        let _ = on_conn!(self, s => s.shutdown(Shutdown::Read));
    }

    /// Bound blocking reads (None = forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), TransportError> {
        on_conn!(self, s => s.set_read_timeout(t)).map_err(|source| TransportError::Socket {
            what: "set read timeout",
            source,
        })
    }

    /// The Unix socket, if this is one.
    pub fn as_unix(&self) -> Option<&UnixStream> {
        match self {
            Connection::Unix(s) => Some(s),
            Connection::Tcp(_) => None,
        }
    }

    /// Whether this connection is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Connection::Tcp(TcpLink::Tls(_)))
    }
}

impl PlainSocket for Connection {
    fn plain_socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match self {
            Connection::Tcp(TcpLink::Plain(s)) => Some(s.as_fd()),
            Connection::Unix(s) => Some(s.as_fd()),
            Connection::Tcp(TcpLink::Tls(_)) => None,
        }
    }
}

// Page data moves between guest memory and the socket without a bounce buffer.
impl ReadVolatile for Connection {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        on_conn!(self, s => s.read_volatile(buf))
    }
}

impl WriteVolatile for Connection {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        on_conn!(self, s => s.write_volatile(buf))
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        on_conn!(self, s => s.read(buf))
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        on_conn!(self, s => s.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A bound listener for the destination.
#[derive(Debug)]
pub enum MigrationListener {
    /// TCP.
    Tcp(TcpListener, MigrationUrl),
    /// TCP with mutual TLS: each accepted connection must complete a handshake with a client
    /// certificate the CA signed.
    Tls(TcpListener, MigrationUrl, TlsServer),
    /// Unix; the socket file is removed on drop.
    Unix(UnixListener, MigrationUrl, PathBuf),
}

/// A TCP listener on `host:port` and the `tcp:` URL it bound (port 0 becomes the chosen port).
fn bind_tcp(host: &str, port: u16) -> io::Result<(TcpListener, MigrationUrl)> {
    let l = TcpListener::bind((host, port))?;
    let port = l.local_addr()?.port();
    let bound = MigrationUrl::Tcp {
        host: host.to_owned(),
        port,
    };
    Ok((l, bound))
}

impl MigrationListener {
    /// Listen on `url`. A stale Unix socket file at the path is replaced; any other file is not.
    pub fn bind(url: &MigrationUrl) -> Result<Self, TransportError> {
        let err = |source| TransportError::Bind {
            url: url.clone(),
            source,
        };
        match url {
            MigrationUrl::Tcp { host, port } | MigrationUrl::TcpTls { host, port, .. } => {
                let (l, bound) = bind_tcp(host, *port).map_err(err)?;
                Ok(MigrationListener::Tcp(l, bound))
            }
            MigrationUrl::Unix(p) => {
                if let Ok(md) = std::fs::symlink_metadata(p) {
                    if md.file_type().is_socket() {
                        std::fs::remove_file(p).map_err(err)?;
                    }
                }
                let l = UnixListener::bind(p).map_err(err)?;
                Ok(MigrationListener::Unix(l, url.clone(), p.clone()))
            }
        }
    }

    /// Listen on the `tcp:` `url` with TLS; every accepted connection handshakes with `tls`.
    pub fn bind_tls(url: &MigrationUrl, tls: TlsServer) -> Result<Self, TransportError> {
        let err = |source| TransportError::Bind {
            url: url.clone(),
            source,
        };
        match url {
            MigrationUrl::Tcp { host, port } | MigrationUrl::TcpTls { host, port, .. } => {
                let (l, bound) = bind_tcp(host, *port).map_err(err)?;
                Ok(MigrationListener::Tls(l, bound, tls))
            }
            MigrationUrl::Unix(_) => Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "tls_dir needs a tcp: url",
            ))),
        }
    }

    /// The URL actually bound (a `tcp:` port 0 becomes the chosen port). For a TLS listener this
    /// is the plain `tcp:` URL (connecting to it without TLS fails the handshake).
    pub fn url(&self) -> &MigrationUrl {
        match self {
            MigrationListener::Tcp(_, u)
            | MigrationListener::Tls(_, u, _)
            | MigrationListener::Unix(_, u, _) => u,
        }
    }

    /// Wait for a connection, polling `stop` every millisecond. Returns `Ok(None)` when `stop` says
    /// so (cancel, deadline); the listener is left blocking again either way.
    pub fn accept_until(
        &self,
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<Connection>, TransportError> {
        let sock = |what, source| TransportError::Socket { what, source };
        self.set_nonblocking(true)
            .map_err(|e| sock("make listener non-blocking", e))?;
        let result = loop {
            match self.accept_socket() {
                Ok(c) => break Ok(Some(c)),
                Err(TransportError::Accept { source, .. })
                    if source.kind() == io::ErrorKind::WouldBlock =>
                {
                    if stop() {
                        break Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => break Err(e),
            }
        };
        self.set_nonblocking(false)
            .map_err(|e| sock("make listener blocking", e))?;
        // Accepted sockets must block regardless of what they inherited.
        match result? {
            Some(c) => {
                on_conn!(&c, s => s.set_nonblocking(false))
                    .map_err(|e| sock("make connection blocking", e))?;
                self.secure(c).map(Some)
            }
            None => Ok(None),
        }
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            MigrationListener::Tcp(l, _) | MigrationListener::Tls(l, _, _) => l.set_nonblocking(on),
            MigrationListener::Unix(l, _, _) => l.set_nonblocking(on),
        }
    }

    /// Wait for the next connection. On a TLS listener a failed handshake (a client without a
    /// certificate the CA signed, or not speaking TLS) is an error naming the peer.
    pub fn accept(&self) -> Result<Connection, TransportError> {
        let c = self.accept_socket()?;
        self.secure(c)
    }

    /// TLS listener: handshake on the accepted TCP socket.
    fn secure(&self, c: Connection) -> Result<Connection, TransportError> {
        match (self, c) {
            (MigrationListener::Tls(_, _, tls), Connection::Tcp(TcpLink::Plain(s))) => {
                Ok(Connection::Tcp(TcpLink::Tls(tls.accept(s)?)))
            }
            (_, c) => Ok(c),
        }
    }

    fn accept_socket(&self) -> Result<Connection, TransportError> {
        let err = |source| TransportError::Accept {
            url: self.url().clone(),
            source,
        };
        match self {
            MigrationListener::Tcp(l, _) | MigrationListener::Tls(l, _, _) => {
                let (s, _) = l.accept().map_err(err)?;
                tune_tcp(&s)?;
                Ok(Connection::Tcp(TcpLink::Plain(s)))
            }
            MigrationListener::Unix(l, _, _) => Ok(Connection::Unix(l.accept().map_err(err)?.0)),
        }
    }
}

impl Drop for MigrationListener {
    fn drop(&mut self) {
        if let MigrationListener::Unix(_, _, p) = self {
            // Best effort: the path may already be gone.
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Both ends of every migration TCP connection: no Nagle delay on frames, and keepalive — a
/// receiver only reads, so keepalive is how it learns that a silent peer is gone.
fn tune_tcp(s: &TcpStream) -> Result<(), TransportError> {
    s.set_nodelay(true)
        .map_err(|source| TransportError::Socket {
            what: "set TCP_NODELAY",
            source,
        })?;
    super::keepalive::enable(s).map_err(|source| TransportError::Socket {
        what: "enable TCP keepalive",
        source,
    })
}
