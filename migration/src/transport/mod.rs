//! Byte transports for the protocol: `tcp:HOST:PORT`, `unix:PATH`, and local mode (guest memory as
//! memfds passed with SCM_RIGHTS over the Unix socket), plus a shared token-bucket bandwidth cap.

mod conn;
mod local;
mod rate;
mod url;

pub use conn::{Connection, MigrationListener, TransportError};
pub use local::{send_frame_with_fd, FdReader, SendFdError};
pub use rate::RateLimiter;
pub use url::{MigrationUrl, UrlError};
