//! Byte transports for the protocol: `tcp:HOST:PORT`, `unix:PATH`, and local mode (guest memory as
//! memfds passed with SCM_RIGHTS over the Unix socket), mutual TLS over `tcp:` (`tls`: config and
//! policy; `tls_handshake`: rustls handshake; `tls_record`: record protection; `tls_stream`: the
//! splittable connection, and what TLS costs), plus a shared token-bucket bandwidth cap.

mod conn;
pub mod keepalive;
mod local;
mod rate;
mod sendfile;
pub mod sockopt;
mod tls;
mod tls_handshake;
mod tls_record;
mod tls_stream;
mod url;
pub mod vectored;

pub use conn::{Connection, MigrationListener, TcpLink, TransportError};
pub use local::{send_frame_with_fd, FdReader, SendFdError};
pub use rate::RateLimiter;
pub use sendfile::{send_file_range, SendFileError};
pub use tls::{
    check_plain_tcp, is_loopback_host, TlsClient, TlsError, TlsServer, ALLOW_PLAIN_TCP_FLAG,
    CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY,
};
pub use tls_stream::TlsStream;
pub use url::{MigrationUrl, TlsNeedsTcp, UrlError};
