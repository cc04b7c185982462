//! A small blocking client for the API socket, used by `ternctl` and by other crates' tests.
//!
//! One connection per call (`Connection: close`), so a call never sees a previous call's leftovers.
//! The request is written by hand (it is one line of headers); the response head is parsed with
//! httparse, hyper's own HTTP/1 parser.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::router::{Endpoint, HttpMethod};
use crate::types::{
    MigrationStatus, VmInfo, VmReceiveMigrationData, VmSendMigrationData, VmmPingResponse,
};

/// Largest response head the client reads.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest response body the client reads (API answers are small JSON objects).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// A failed API call. [`ApiClientError::Api`] carries the server's own status and error text.
#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    #[error("cannot connect to the api socket {path:?} (is tern running with --api-socket?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot send the request to {path:?}")]
    Send {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the response from {path:?}")]
    Receive {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("malformed response from the api server: {reason}")]
    MalformedResponse { reason: String },
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("cannot encode the {endpoint} request body")]
    Encode {
        endpoint: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot decode the {endpoint} response body")]
    Decode {
        endpoint: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl ApiClientError {
    /// The HTTP status when the server answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A response as received, for tests that send hand-made requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    /// Headers in order, names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first header called `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The text of an error body: Cloud Hypervisor's array of messages (outermost first, what
    /// tern sends) joined by `": "`, the `{"error": "..."}` object older tern servers sent, or
    /// the body as it is.
    pub fn error_text(&self) -> String {
        let parsed = serde_json::from_slice::<serde_json::Value>(&self.body).ok();
        let text = match &parsed {
            Some(serde_json::Value::Array(messages)) => messages
                .iter()
                .map(|m| m.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .map(|m| m.join(": ")),
            Some(v) => v.get("error").and_then(|e| e.as_str()).map(str::to_owned),
            None => None,
        };
        text.unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

/// Client for one API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    path: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client for the socket at `path`; nothing is connected until the first call.
    pub fn new(path: impl AsRef<Path>) -> Self {
        ApiClient {
            path: path.as_ref().to_owned(),
            timeout: Duration::from_secs(60),
        }
    }

    /// Sets the read/write timeout of each call (default 60 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn vmm_ping(&self) -> Result<VmmPingResponse, ApiClientError> {
        self.call_json(Endpoint::VmmPing)
    }

    pub fn vmm_shutdown(&self) -> Result<(), ApiClientError> {
        self.call_empty(Endpoint::VmmShutdown, None)
    }

    /// `vm.create` with a VmConfig as JSON text (as `ch-remote create` sends a config file): the
    /// server's parser is the one that checks it.
    pub fn vm_create_json(&self, config: &str) -> Result<(), ApiClientError> {
        self.call_empty(Endpoint::VmCreate, Some(config.as_bytes()))
    }

    pub fn vm_boot(&self) -> Result<(), ApiClientError> {
        self.call_empty(Endpoint::VmBoot, None)
    }

    pub fn vm_delete(&self) -> Result<(), ApiClientError> {
        self.call_empty(Endpoint::VmDelete, None)
    }

    pub fn vm_reboot(&self) -> Result<(), ApiClientError> {
        self.call_empty(Endpoint::VmReboot, None)
    }

    pub fn vm_info(&self) -> Result<VmInfo, ApiClientError> {
        self.call_json(Endpoint::VmInfo)
    }

    pub fn vm_pause(&self) -> Result<(), ApiClientError> {
        self.call_empty(Endpoint::VmPause, None)
    }

    pub fn vm_resume(&self) -> Result<(), ApiClientError> {
        self.call_empty(Endpoint::VmResume, None)
    }

    pub fn vm_shutdown(&self) -> Result<(), ApiClientError> {
        self.call_empty(Endpoint::VmShutdown, None)
    }

    pub fn vm_send_migration(&self, data: &VmSendMigrationData) -> Result<(), ApiClientError> {
        let body = encode(Endpoint::VmSendMigration, data)?;
        self.call_empty(Endpoint::VmSendMigration, Some(&body))
    }

    pub fn vm_receive_migration(
        &self,
        data: &VmReceiveMigrationData,
    ) -> Result<(), ApiClientError> {
        let body = encode(Endpoint::VmReceiveMigration, data)?;
        self.call_empty(Endpoint::VmReceiveMigration, Some(&body))
    }

    pub fn vm_migration_status(&self) -> Result<MigrationStatus, ApiClientError> {
        self.call_json(Endpoint::VmMigration)
    }

    pub fn vm_migration_cancel(&self) -> Result<(), ApiClientError> {
        self.call_empty(Endpoint::VmMigrationCancel, None)
    }

    /// Sends any method, path and body and returns the response as received, whatever its status.
    pub fn send_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<RawResponse, ApiClientError> {
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| ApiClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let send_err = |source| ApiClientError::Send {
            path: self.path.clone(),
            source,
        };
        stream
            .set_write_timeout(Some(self.timeout))
            .and_then(|()| stream.set_read_timeout(Some(self.timeout)))
            .map_err(send_err)?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Accept: application/json\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(send_err)?;
        // The server may answer (e.g. 413) and close before reading the whole body; its answer is
        // what matters, so a failed body write is not an error by itself.
        let body_written = stream.write_all(body);
        match read_response(&mut stream) {
            Ok(resp) => Ok(resp),
            Err(ReadError::Io(source)) => Err(match body_written {
                Err(write_err) => send_err(write_err),
                Ok(()) => ApiClientError::Receive {
                    path: self.path.clone(),
                    source,
                },
            }),
            Err(ReadError::Malformed(reason)) => Err(ApiClientError::MalformedResponse { reason }),
        }
    }

    fn call(&self, endpoint: Endpoint, body: Option<&[u8]>) -> Result<RawResponse, ApiClientError> {
        let resp = self.send_raw(endpoint.method().as_str(), &endpoint.path(), body)?;
        if (200..300).contains(&resp.status) {
            Ok(resp)
        } else {
            Err(ApiClientError::Api {
                status: resp.status,
                message: resp.error_text(),
            })
        }
    }

    fn call_empty(&self, endpoint: Endpoint, body: Option<&[u8]>) -> Result<(), ApiClientError> {
        debug_assert_eq!(endpoint.method(), HttpMethod::Put);
        self.call(endpoint, body).map(|_| ())
    }

    fn call_json<T: DeserializeOwned>(&self, endpoint: Endpoint) -> Result<T, ApiClientError> {
        let resp = self.call(endpoint, None)?;
        serde_json::from_slice(&resp.body).map_err(|source| ApiClientError::Decode {
            endpoint: endpoint.name(),
            source,
        })
    }
}

fn encode<T: serde::Serialize>(endpoint: Endpoint, value: &T) -> Result<Vec<u8>, ApiClientError> {
    serde_json::to_vec(value).map_err(|source| ApiClientError::Encode {
        endpoint: endpoint.name(),
        source,
    })
}

enum ReadError {
    Io(io::Error),
    Malformed(String),
}

fn read_response(stream: &mut impl Read) -> Result<RawResponse, ReadError> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let (status, headers, head_len) = loop {
        let n = stream.read(&mut chunk).map_err(ReadError::Io)?;
        if n == 0 {
            return Err(ReadError::Malformed(
                "connection closed before a complete response head".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut header_slots = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut header_slots);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code.unwrap_or(0);
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                break (status, headers, len);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => {}
            Ok(httparse::Status::Partial) => {
                return Err(ReadError::Malformed(format!(
                    "response head longer than {MAX_HEAD_BYTES} bytes"
                )))
            }
            Err(e) => return Err(ReadError::Malformed(format!("bad response head: {e}"))),
        }
    };
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    if find("transfer-encoding").is_some() {
        return Err(ReadError::Malformed(
            "chunked responses are not supported: the api server sends Content-Length".into(),
        ));
    }
    let mut body = buf.split_off(head_len);
    match find("content-length") {
        Some(len) => {
            let len: usize = len
                .trim()
                .parse()
                .map_err(|_| ReadError::Malformed(format!("bad content-length {len:?}")))?;
            if len > MAX_BODY_BYTES {
                return Err(ReadError::Malformed(format!(
                    "response body of {len} bytes exceeds {MAX_BODY_BYTES}"
                )));
            }
            if body.len() < len {
                let missing = (len - body.len()) as u64;
                stream
                    .take(missing)
                    .read_to_end(&mut body)
                    .map_err(ReadError::Io)?;
            }
            if body.len() < len {
                return Err(ReadError::Malformed(format!(
                    "response body ended after {} of {len} bytes",
                    body.len()
                )));
            }
            body.truncate(len);
        }
        None => {
            stream
                .take((MAX_BODY_BYTES + 1 - body.len().min(MAX_BODY_BYTES)) as u64)
                .read_to_end(&mut body)
                .map_err(ReadError::Io)?;
            if body.len() > MAX_BODY_BYTES {
                return Err(ReadError::Malformed(format!(
                    "response body exceeds {MAX_BODY_BYTES} bytes"
                )));
            }
        }
    }
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_response_parses_content_length_body() {
        // An older tern server: reason phrase, lower-case header, `{"error": ...}` body.
        let raw = b"HTTP/1.1 409 Conflict\r\ncontent-length: 13\r\n\r\n{\"error\":\"x\"}";
        let resp = read_response(&mut &raw[..]).ok().unwrap();
        assert_eq!(resp.status, 409);
        assert_eq!(resp.error_text(), "x");
        assert_eq!(resp.header("content-length"), Some("13"));
    }

    #[test]
    fn read_response_parses_cloud_hypervisor_style_errors() {
        // What tern (and CH) send: empty reason phrase, title-case header, array of messages.
        let raw = b"HTTP/1.1 400 \r\nContent-Length: 17\r\n\r\n[\"outer\",\"inner\"]x";
        let resp = read_response(&mut &raw[..]).ok().unwrap();
        assert_eq!(resp.status, 400);
        assert_eq!(resp.error_text(), "outer: inner");
        assert_eq!(resp.header("content-length"), Some("17"));
    }

    #[test]
    fn read_response_rejects_truncated_body_and_head() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc";
        assert!(matches!(
            read_response(&mut &raw[..]),
            Err(ReadError::Malformed(m)) if m.contains("3 of 10")
        ));
        let raw = b"HTTP/1.1 200 OK\r\ncontent-le";
        assert!(matches!(
            read_response(&mut &raw[..]),
            Err(ReadError::Malformed(_))
        ));
        let raw = b"SMTP ready\r\n\r\n";
        assert!(matches!(
            read_response(&mut &raw[..]),
            Err(ReadError::Malformed(_))
        ));
    }

    #[test]
    fn read_response_without_length_reads_to_eof() {
        let raw = b"HTTP/1.1 204 No Content\r\n\r\n";
        let resp = read_response(&mut &raw[..]).ok().unwrap();
        assert_eq!(resp.status, 204);
        assert!(resp.body.is_empty());
    }
}
