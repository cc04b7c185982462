//! The TLS 1.3 handshake, driven through rustls's unbuffered API so that, once both sides are
//! authenticated, the connection can leave rustls as a [`KernelConnection`] plus its traffic
//! secrets: the record layer (`tls_record`) then runs on the engine's own threads, one direction
//! independent of the other, the way kernel TLS would.
//!
//! The receiver's confirmation byte (see `tls`) is the first application record: the server
//! sends it only once the client's certificate passed, and the client returns only once it got
//! it, so a refused certificate fails the sender's `connect` with the receiver's alert.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::ops::DerefMut;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedConnectionCommon,
    UnbufferedStatus,
};
use rustls::ExtractedSecrets;

/// The byte the receiver sends once it accepted the sender's certificate.
const CONFIRM: u8 = 0x5a;

/// Handshake records are small; a bigger flight than this is refused (rustls itself caps
/// handshake messages at 64 KiB).
const MAX_INCOMING: usize = 128 << 10;

/// What rustls keeps after the handshake: key updates (and, on a client, session tickets).
pub(crate) enum Kernel {
    /// The sender's side.
    Client(KernelConnection<ClientConnectionData>),
    /// The receiver's side.
    Server(KernelConnection<ServerConnectionData>),
}

/// An authenticated connection, ready for the record layer.
pub(crate) struct Established {
    /// Traffic secrets and sequence numbers of both directions.
    pub secrets: ExtractedSecrets,
    /// Key updates from here on.
    pub kernel: Kernel,
    /// Ciphertext that arrived after the handshake (the peer's first records).
    pub leftover: Vec<u8>,
}

/// One side of an unbuffered connection (the client and server types share no trait for this).
trait Side: DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> {
    type Data;
    const SERVER: bool;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Side for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    const SERVER: bool = false;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    const SERVER: bool = true;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

/// Handshake as the client; returns once the receiver confirmed.
pub(crate) fn client(
    mut conn: UnbufferedClientConnection,
    tcp: &mut TcpStream,
) -> io::Result<Established> {
    let leftover = drive(&mut conn, tcp)?;
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls)?;
    Ok(Established {
        secrets,
        kernel: Kernel::Client(kernel),
        leftover,
    })
}

/// Handshake as the server; returns once the confirmation went out.
pub(crate) fn server(
    mut conn: UnbufferedServerConnection,
    tcp: &mut TcpStream,
) -> io::Result<Established> {
    let leftover = drive(&mut conn, tcp)?;
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls)?;
    Ok(Established {
        secrets,
        kernel: Kernel::Server(kernel),
        leftover,
    })
}

fn tls(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Incoming ciphertext not yet consumed, and outgoing records not yet sent.
struct Buffers {
    incoming: Vec<u8>,
    used: usize,
    outgoing: Vec<u8>,
    out_used: usize,
}

impl Buffers {
    /// Room for `n` more outgoing bytes.
    fn reserve_out(&mut self, n: usize) {
        if self.outgoing.len() < self.out_used + n {
            self.outgoing.resize(self.out_used + n, 0);
        }
    }

    fn discard(&mut self, n: usize) {
        self.incoming.copy_within(n..self.used, 0);
        self.used -= n;
    }

    fn send(&mut self, tcp: &mut TcpStream) -> io::Result<()> {
        tcp.write_all(&self.outgoing[..self.out_used])?;
        self.out_used = 0;
        Ok(())
    }

    fn receive(&mut self, tcp: &mut TcpStream) -> io::Result<()> {
        if self.used == self.incoming.len() {
            if self.used >= MAX_INCOMING {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "handshake flight too large",
                ));
            }
            self.incoming.resize(self.used * 2, 0);
        }
        match tcp.read(&mut self.incoming[self.used..])? {
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the connection during the handshake",
            )),
            n => {
                self.used += n;
                Ok(())
            }
        }
    }
}

/// Run the handshake and the confirmation; returns the unconsumed ciphertext.
fn drive<S: Side>(conn: &mut S, tcp: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut b = Buffers {
        incoming: vec![0; 16 << 10],
        used: 0,
        outgoing: vec![0; 16 << 10],
        out_used: 0,
    };
    let mut confirmed = false;
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut b.incoming[..b.used]);
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                b.discard(discard);
                // Tell the peer why (the alert rustls queued), best effort.
                send_alert(conn, &mut b, tcp);
                return Err(tls(e));
            }
        };
        let mut read = false;
        match state {
            ConnectionState::EncodeTlsData(mut s) => loop {
                match s.encode(&mut b.outgoing[b.out_used..]) {
                    Ok(n) => {
                        b.out_used += n;
                        break;
                    }
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        b.reserve_out(required_size)
                    }
                    Err(e) => return Err(io::Error::other(e)),
                }
            },
            ConnectionState::TransmitTlsData(s) => {
                b.send(tcp)?;
                s.done();
            }
            ConnectionState::BlockedHandshake => read = true,
            ConnectionState::ReadTraffic(mut s) => {
                // The only application data before we return is the receiver's confirmation.
                match s.next_record() {
                    Some(Ok(r)) if !S::SERVER && !confirmed && r.payload == [CONFIRM] => {
                        discard += r.discard;
                    }
                    Some(Err(e)) => return Err(tls(e)),
                    _ => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            if S::SERVER {
                                "the sender sent data before the handshake was confirmed"
                            } else {
                                "the receiver did not confirm the handshake"
                            },
                        ))
                    }
                }
                confirmed = true;
            }
            ConnectionState::WriteTraffic(mut w) => {
                // The server gets here only after the client's Finished: with a client
                // certificate demanded rustls sends no half-RTT data (checked below).
                if S::SERVER && !confirmed {
                    b.reserve_out(64);
                    let n = loop {
                        match w.encrypt(&[CONFIRM], &mut b.outgoing[b.out_used..]) {
                            Ok(n) => break n,
                            Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) => b.reserve_out(required_size),
                            Err(e) => return Err(io::Error::other(e)),
                        }
                    };
                    b.out_used += n;
                    b.send(tcp)?;
                    confirmed = true;
                }
                read = !confirmed;
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection during the handshake",
                ))
            }
            _ => {
                return Err(io::Error::other(
                    "unexpected tls state during the handshake",
                ))
            }
        }
        b.discard(discard);
        if confirmed {
            if conn.is_handshaking() {
                return Err(io::Error::other(
                    "application data before the handshake ended",
                ));
            }
            b.incoming.truncate(b.used);
            return Ok(b.incoming);
        }
        if read {
            b.receive(tcp)?;
        }
    }
}

/// Send the alert rustls queued for a failed handshake, best effort. rustls hands out queued
/// records before it looks at the input again, so one more call yields the alert; calling on
/// would re-process the bad input.
fn send_alert<S: Side>(conn: &mut S, b: &mut Buffers, tcp: &mut TcpStream) {
    let UnbufferedStatus { state, .. } = conn.process(&mut b.incoming[..b.used]);
    if let Ok(ConnectionState::EncodeTlsData(mut s)) = state {
        b.out_used = 0;
        b.reserve_out(256);
        if let Ok(n) = s.encode(&mut b.outgoing) {
            b.out_used = n;
            let _ = b.send(tcp);
        }
    }
}
