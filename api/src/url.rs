//! Migration endpoint URLs: `tcp:HOST:PORT` or `unix:PATH` (Cloud Hypervisor's spelling).
//!
//! The API carries them as strings; they are parsed here once, at the boundary, so the VMM only ever
//! sees a [`MigrationUrl`].

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Why a migration URL was refused. Every message says what was wrong and what a valid URL looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrationUrlError {
    #[error("migration url {url:?} has no scheme: use tcp:HOST:PORT or unix:PATH")]
    MissingScheme { url: String },
    #[error("migration url {url:?} has unknown scheme {scheme:?}: use tcp:HOST:PORT or unix:PATH")]
    UnknownScheme { url: String, scheme: String },
    #[error("migration url {url:?} has no port: use tcp:HOST:PORT, e.g. tcp:127.0.0.1:6000")]
    MissingPort { url: String },
    #[error("migration url {url:?} has invalid port {port:?}: the port must be a number from 1 to 65535")]
    InvalidPort { url: String, port: String },
    #[error("migration url {url:?} has an empty host: use tcp:HOST:PORT, e.g. tcp:127.0.0.1:6000")]
    EmptyHost { url: String },
    #[error(
        "migration url {url:?} has an empty path: use unix:PATH, e.g. unix:/run/tern/migrate.sock"
    )]
    EmptyPath { url: String },
}

/// Where a migration stream goes to (source) or comes from (destination).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MigrationUrl {
    /// TCP: `host` is a name, an IPv4 address or an IPv6 address without brackets.
    Tcp { host: String, port: u16 },
    /// A Unix stream socket path.
    Unix { path: PathBuf },
}

impl MigrationUrl {
    /// True for `unix:` URLs, the only transport that can carry guest memory as file descriptors.
    pub fn is_unix(&self) -> bool {
        matches!(self, MigrationUrl::Unix { .. })
    }
}

impl FromStr for MigrationUrl {
    type Err = MigrationUrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let Some((scheme, rest)) = url.split_once(':') else {
            return Err(MigrationUrlError::MissingScheme {
                url: url.to_owned(),
            });
        };
        match scheme {
            "tcp" => parse_tcp(url, rest),
            "unix" => {
                if rest.is_empty() {
                    return Err(MigrationUrlError::EmptyPath {
                        url: url.to_owned(),
                    });
                }
                Ok(MigrationUrl::Unix {
                    path: PathBuf::from(rest),
                })
            }
            _ => Err(MigrationUrlError::UnknownScheme {
                url: url.to_owned(),
                scheme: scheme.to_owned(),
            }),
        }
    }
}

fn parse_tcp(url: &str, rest: &str) -> Result<MigrationUrl, MigrationUrlError> {
    // The port is after the last colon, so bracketed IPv6 hosts (`[::1]:6000`) keep their colons.
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(MigrationUrlError::MissingPort {
            url: url.to_owned(),
        });
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(MigrationUrlError::EmptyHost {
            url: url.to_owned(),
        });
    }
    if port.is_empty() {
        return Err(MigrationUrlError::MissingPort {
            url: url.to_owned(),
        });
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => {
            return Err(MigrationUrlError::InvalidPort {
                url: url.to_owned(),
                port: port.to_owned(),
            })
        }
    };
    Ok(MigrationUrl::Tcp {
        host: host.to_owned(),
        port,
    })
}

impl fmt::Display for MigrationUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUrl::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationUrl::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrationUrl::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

impl TryFrom<String> for MigrationUrl {
    type Error = MigrationUrlError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MigrationUrl> for String {
    fn from(url: MigrationUrl) -> String {
        url.to_string()
    }
}

impl serde::Serialize for MigrationUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MigrationUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_tcp_unix_and_ipv6() {
        assert_eq!(
            "tcp:127.0.0.1:6000".parse::<MigrationUrl>(),
            Ok(MigrationUrl::Tcp {
                host: "127.0.0.1".into(),
                port: 6000
            })
        );
        assert_eq!(
            "tcp:[::1]:7".parse::<MigrationUrl>(),
            Ok(MigrationUrl::Tcp {
                host: "::1".into(),
                port: 7
            })
        );
        assert_eq!(
            "unix:/tmp/m.sock".parse::<MigrationUrl>(),
            Ok(MigrationUrl::Unix {
                path: "/tmp/m.sock".into()
            })
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "tcp:localhost:1",
            "tcp:[::1]:65535",
            "unix:/a/b",
            "unix:rel.sock",
        ] {
            let url: MigrationUrl = s.parse().unwrap();
            assert_eq!(url.to_string(), s);
            assert_eq!(url.to_string().parse::<MigrationUrl>().unwrap(), url);
        }
    }

    #[test]
    fn parse_rejects_each_malformed_shape_with_its_variant() {
        type Check = fn(&MigrationUrlError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("127.0.0.1", |e| {
                matches!(e, MigrationUrlError::MissingScheme { .. })
            }),
            ("http://x:1", |e| {
                matches!(e, MigrationUrlError::UnknownScheme { .. })
            }),
            ("tcp:localhost", |e| {
                matches!(e, MigrationUrlError::MissingPort { .. })
            }),
            ("tcp:localhost:", |e| {
                matches!(e, MigrationUrlError::MissingPort { .. })
            }),
            ("tcp:localhost:0", |e| {
                matches!(e, MigrationUrlError::InvalidPort { .. })
            }),
            ("tcp:localhost:65536", |e| {
                matches!(e, MigrationUrlError::InvalidPort { .. })
            }),
            ("tcp:localhost:x1", |e| {
                matches!(e, MigrationUrlError::InvalidPort { .. })
            }),
            ("tcp::6000", |e| {
                matches!(e, MigrationUrlError::EmptyHost { .. })
            }),
            ("tcp:[]:6000", |e| {
                matches!(e, MigrationUrlError::EmptyHost { .. })
            }),
            ("unix:", |e| {
                matches!(e, MigrationUrlError::EmptyPath { .. })
            }),
        ];
        for (input, check) in cases {
            let err = input.parse::<MigrationUrl>().unwrap_err();
            assert!(check(&err), "{input}: unexpected {err:?}");
            assert!(
                err.to_string().contains(input),
                "{input}: message {err} lacks the url"
            );
        }
    }
}
