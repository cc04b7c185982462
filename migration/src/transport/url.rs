//! Parse `tcp:HOST:PORT` and `unix:PATH` migration URLs.

use std::path::PathBuf;

use super::tls::TlsClient;

/// Where to connect or listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUrl {
    /// `tcp:HOST:PORT` (HOST may be a name, an IPv4 address or a bracketed IPv6 address).
    Tcp {
        /// Host part.
        host: String,
        /// Port.
        port: u16,
    },
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `tcp:HOST:PORT` with mutual TLS: the sender's credentials from a `tls_dir` (see
    /// [`MigrationUrl::with_tls`]). The receiver's certificate must name HOST.
    TcpTls {
        /// Host part; the receiver's certificate must match it.
        host: String,
        /// Port.
        port: u16,
        /// The sender's certificate, key and CA.
        tls: TlsClient,
    },
}

/// Why a URL was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    /// No known scheme.
    #[error("migration url {url:?} must start with tcp: or unix:")]
    Scheme {
        /// The URL.
        url: String,
    },
    /// `tcp:` without `HOST:PORT`.
    #[error("migration url {url:?}: expected tcp:HOST:PORT")]
    TcpForm {
        /// The URL.
        url: String,
    },
    /// The port is not a number in 1..=65535 (0 allowed for listeners only via bind).
    #[error("migration url {url:?}: invalid port {port:?}")]
    Port {
        /// The URL.
        url: String,
        /// The port text.
        port: String,
    },
    /// `unix:` with an empty path.
    #[error("migration url {url:?}: empty socket path")]
    EmptyPath {
        /// The URL.
        url: String,
    },
}

impl MigrationUrl {
    /// Parse a URL.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        if let Some(rest) = url.strip_prefix("tcp:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| UrlError::TcpForm {
                url: url.to_owned(),
            })?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.is_empty() {
                return Err(UrlError::TcpForm {
                    url: url.to_owned(),
                });
            }
            let port: u16 = port.parse().map_err(|_| UrlError::Port {
                url: url.to_owned(),
                port: port.to_owned(),
            })?;
            Ok(MigrationUrl::Tcp {
                host: host.to_owned(),
                port,
            })
        } else if let Some(path) = url.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(UrlError::EmptyPath {
                    url: url.to_owned(),
                });
            }
            Ok(MigrationUrl::Unix(PathBuf::from(path)))
        } else {
            Err(UrlError::Scheme {
                url: url.to_owned(),
            })
        }
    }
}

/// TLS was asked for a `unix:` URL.
#[derive(Debug, thiserror::Error)]
#[error("tls_dir needs a tcp: url, got {url}")]
pub struct TlsNeedsTcp {
    /// The URL.
    pub url: MigrationUrl,
}

impl MigrationUrl {
    /// This `tcp:` URL with mutual TLS (connections made to it handshake with `tls`).
    pub fn with_tls(self, tls: TlsClient) -> Result<Self, TlsNeedsTcp> {
        match self {
            MigrationUrl::Tcp { host, port } | MigrationUrl::TcpTls { host, port, .. } => {
                Ok(MigrationUrl::TcpTls { host, port, tls })
            }
            url @ MigrationUrl::Unix(_) => Err(TlsNeedsTcp { url }),
        }
    }

    /// The TLS credentials, if connections to this URL use TLS.
    pub fn tls(&self) -> Option<&TlsClient> {
        match self {
            MigrationUrl::TcpTls { tls, .. } => Some(tls),
            _ => None,
        }
    }
}

impl std::fmt::Display for MigrationUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationUrl::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationUrl::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrationUrl::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationUrl::TcpTls { host, port, .. } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port} (tls)")
            }
            MigrationUrl::TcpTls { host, port, .. } => write!(f, "tcp:{host}:{port} (tls)"),
        }
    }
}

impl std::str::FromStr for MigrationUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, UrlError> {
        MigrationUrl::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_tcp_unix_and_ipv6() {
        assert_eq!(
            MigrationUrl::parse("tcp:127.0.0.1:6000"),
            Ok(MigrationUrl::Tcp {
                host: "127.0.0.1".into(),
                port: 6000
            })
        );
        assert_eq!(
            MigrationUrl::parse("tcp:[::1]:7"),
            Ok(MigrationUrl::Tcp {
                host: "::1".into(),
                port: 7
            })
        );
        assert_eq!(
            MigrationUrl::parse("unix:/tmp/m.sock"),
            Ok(MigrationUrl::Unix("/tmp/m.sock".into()))
        );
        let u = MigrationUrl::parse("tcp:[::1]:7").expect("valid");
        assert_eq!(u.to_string(), "tcp:[::1]:7");
    }

    #[test]
    fn parse_rejects_bad_urls_with_reason() {
        assert!(matches!(
            MigrationUrl::parse("http://x"),
            Err(UrlError::Scheme { .. })
        ));
        assert!(matches!(
            MigrationUrl::parse("tcp:host"),
            Err(UrlError::TcpForm { .. })
        ));
        assert!(matches!(
            MigrationUrl::parse("tcp::80"),
            Err(UrlError::TcpForm { .. })
        ));
        assert!(matches!(
            MigrationUrl::parse("tcp:h:70000"),
            Err(UrlError::Port { .. })
        ));
        assert!(matches!(
            MigrationUrl::parse("unix:"),
            Err(UrlError::EmptyPath { .. })
        ));
    }
}
