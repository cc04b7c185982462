//! Migration TLS with mutual authentication (rustls, TLS 1.3 only, `aws-lc-rs` provider).
//!
//! A `tls_dir` holds the files QEMU and Cloud Hypervisor use: `ca-cert.pem` (both sides),
//! `server-cert.pem` + `server-key.pem` (receiver), `client-cert.pem` + `client-key.pem` (sender).
//! The receiver accepts only clients whose certificate the CA signed; the sender checks the
//! receiver's certificate against the host of the URL (IP SAN or DNS name).
//!
//! Each connection does its own handshake; the receiver then sends one confirmation byte that the
//! sender waits for, so a client certificate the receiver refuses (TLS 1.3 judges it after the
//! client already finished) fails `connect` with the receiver's alert, not a later read.
//! The handshake runs through rustls's unbuffered API (`tls_handshake`); afterwards rustls keeps
//! only key updates, and the records are sealed and opened on the engine's own threads
//! (`tls_record`, `tls_stream`), each direction on its own, so the engine keeps a connection it
//! can `try_clone` and shut down like a socket.

use std::fmt;
use std::io;
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::UnbufferedServerConnection;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::tls_handshake;
use super::tls_stream::TlsStream;
use super::url::MigrationUrl;

/// CA that signs both sides' certificates.
pub const CA_CERT: &str = "ca-cert.pem";
/// Receiver's certificate chain.
pub const SERVER_CERT: &str = "server-cert.pem";
/// Receiver's private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// Sender's certificate chain.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// Sender's private key.
pub const CLIENT_KEY: &str = "client-key.pem";

/// The command-line flag that allows plain TCP to a non-loopback address.
pub const ALLOW_PLAIN_TCP_FLAG: &str = "--migration-allow-plain-tcp";

/// How long one handshake (and the confirmation byte) may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file of the tls_dir could not be read.
    #[error("tls_dir: cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file holds no usable PEM object.
    #[error("tls_dir: {path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the certificates or key.
    #[error("tls_dir {dir}: {what}")]
    Config {
        /// The directory.
        dir: PathBuf,
        /// What was being built.
        what: &'static str,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The URL's host is neither an IP address nor a DNS name.
    #[error("tls: {host:?} is not a valid server name")]
    ServerName {
        /// The host.
        host: String,
    },
    /// The handshake (or the receiver's confirmation) failed.
    #[error("tls handshake with {peer} failed")]
    Handshake {
        /// Peer address.
        peer: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Plain TCP to a non-loopback address without the operator's opt-in.
    #[error(
        "plain tcp migration to the non-loopback address {url} is refused: give tls_dir \
         (ca-cert.pem, server-cert.pem/server-key.pem or client-cert.pem/client-key.pem) to \
         encrypt and authenticate it, or start tern with {ALLOW_PLAIN_TCP_FLAG} to allow \
         unencrypted, unauthenticated migration"
    )]
    PlainTcpRefused {
        /// The URL.
        url: MigrationUrl,
    },
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn load_certs(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path = dir.join(name);
    let pem = read_file(&path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.clone(),
            what: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path,
            what: "no CERTIFICATE in the file".into(),
        });
    }
    Ok(certs)
}

fn load_key(dir: &Path, name: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let path = dir.join(name);
    let pem = read_file(&path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path,
        what: format!("no usable private key: {e}"),
    })
}

fn load_roots(dir: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(dir, CA_CERT)? {
        roots.add(c).map_err(|source| TlsError::Config {
            dir: dir.to_owned(),
            what: "ca-cert.pem is not a usable CA certificate",
            source,
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The sender's side: client certificate and the CA that must have signed the receiver's.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    dir: PathBuf,
}

impl TlsClient {
    /// Load `ca-cert.pem`, `client-cert.pem` and `client-key.pem` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, TlsError> {
        let roots = load_roots(dir)?;
        let certs = load_certs(dir, CLIENT_CERT)?;
        let key = load_key(dir, CLIENT_KEY)?;
        let cfg = |what| {
            let dir = dir.to_owned();
            move |source| TlsError::Config { dir, what, source }
        };
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg("protocol versions"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(cfg(
                "client-cert.pem and client-key.pem do not form a usable pair",
            ))?;
        // The records are ours after the handshake (see `tls_stream`).
        config.enable_secret_extraction = true;
        Ok(TlsClient {
            config: Arc::new(config),
            dir: dir.to_owned(),
        })
    }

    /// Handshake as the client of `tcp`, checking the receiver's certificate against `host`.
    pub(crate) fn connect(&self, tcp: TcpStream, host: &str) -> Result<TlsStream, TlsError> {
        let name = ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName {
            host: host.to_owned(),
        })?;
        let peer = peer_name(&tcp);
        let fail = |source| TlsError::Handshake {
            peer: peer.clone(),
            source,
        };
        let conn = UnbufferedClientConnection::new(self.config.clone(), name)
            .map_err(|e| fail(io::Error::other(e)))?;
        let mut tcp = tcp;
        set_timeouts(&tcp, Some(HANDSHAKE_TIMEOUT)).map_err(fail)?;
        let est = tls_handshake::client(conn, &mut tcp).map_err(fail)?;
        set_timeouts(&tcp, None).map_err(fail)?;
        TlsStream::new(tcp, peer.clone(), est).map_err(fail)
    }
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsClient({})", self.dir.display())
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
    }
}

impl Eq for TlsClient {}

/// The receiver's side: server certificate and the CA that must have signed each client's.
#[derive(Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
    dir: PathBuf,
}

impl TlsServer {
    /// Load `ca-cert.pem`, `server-cert.pem` and `server-key.pem` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, TlsError> {
        let roots = load_roots(dir)?;
        let certs = load_certs(dir, SERVER_CERT)?;
        let key = load_key(dir, SERVER_KEY)?;
        let cfg = |what| {
            let dir = dir.to_owned();
            move |source| TlsError::Config { dir, what, source }
        };
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Config {
                dir: dir.to_owned(),
                what: "client verifier from ca-cert.pem",
                source: rustls::Error::General(e.to_string()),
            })?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg("protocol versions"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(cfg(
                "server-cert.pem and server-key.pem do not form a usable pair",
            ))?;
        // Every connection is a fresh, fully authenticated handshake.
        config.send_tls13_tickets = 0;
        config.enable_secret_extraction = true;
        Ok(TlsServer {
            config: Arc::new(config),
            dir: dir.to_owned(),
        })
    }

    /// Handshake as the server of an accepted `tcp`; the client must present a CA-signed cert.
    pub(crate) fn accept(&self, tcp: TcpStream) -> Result<TlsStream, TlsError> {
        let peer = peer_name(&tcp);
        let fail = |source| TlsError::Handshake {
            peer: peer.clone(),
            source,
        };
        let conn = UnbufferedServerConnection::new(self.config.clone())
            .map_err(|e| fail(io::Error::other(e)))?;
        let mut tcp = tcp;
        set_timeouts(&tcp, Some(HANDSHAKE_TIMEOUT)).map_err(fail)?;
        let est = tls_handshake::server(conn, &mut tcp).map_err(fail)?;
        set_timeouts(&tcp, None).map_err(fail)?;
        TlsStream::new(tcp, peer.clone(), est).map_err(fail)
    }
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsServer({})", self.dir.display())
    }
}

fn peer_name(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map_or_else(|_| "unknown peer".into(), |a| a.to_string())
}

fn set_timeouts(tcp: &TcpStream, t: Option<Duration>) -> io::Result<()> {
    tcp.set_read_timeout(t)?;
    tcp.set_write_timeout(t)
}

/// Whether `host` is (or resolves only to) a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    match (host, 0u16).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// The plain-TCP policy: a `tcp:` URL without TLS must name a loopback address unless the
/// operator started tern with [`ALLOW_PLAIN_TCP_FLAG`]. `unix:` and TLS URLs always pass.
pub fn check_plain_tcp(url: &MigrationUrl, allow_plain_tcp: bool) -> Result<(), TlsError> {
    match url {
        MigrationUrl::Tcp { host, .. } if !allow_plain_tcp && !is_loopback_host(host) => {
            Err(TlsError::PlainTcpRefused { url: url.clone() })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback_host("127.0.0.1"));
        assert!(is_loopback_host("::1"));
        assert!(is_loopback_host("localhost"));
        assert!(!is_loopback_host("0.0.0.0"));
        assert!(!is_loopback_host("192.0.2.1"));
    }

    #[test]
    fn plain_tcp_policy() {
        let remote = MigrationUrl::parse("tcp:192.0.2.1:6000").expect("url");
        let e = check_plain_tcp(&remote, false).expect_err("refused without the opt-in");
        let msg = e.to_string();
        assert!(
            msg.contains(ALLOW_PLAIN_TCP_FLAG) && msg.contains("tls_dir"),
            "{msg}"
        );
        check_plain_tcp(&remote, true).expect("allowed with the opt-in");
        let local = MigrationUrl::parse("tcp:127.0.0.1:6000").expect("url");
        check_plain_tcp(&local, false).expect("loopback");
        let unix = MigrationUrl::parse("unix:/tmp/x").expect("url");
        check_plain_tcp(&unix, false).expect("unix");
    }
}
