//! A stand-in for Cloud Hypervisor's client library, byte for byte on the request and rule for
//! rule on the response, so tests see tern exactly as `ch-remote` does. Written from reading
//! CH's `api_client/src/lib.rs` (`simple_api_full_command_with_fds_and_response`,
//! `parse_http_response`, `get_header`, `get_status_code`, `StatusCode`); no CH code is used.
//!
//! What CH's client does, and this module does the same way:
//! - one request per connection it opened, written in up to four writes (as CH does) as
//!   `{METHOD} /api/v1/{command} HTTP/1.1\r\n`,
//!   `Host: localhost\r\n`, `Accept: */*\r\n`, then `Content-Length: {n}\r\n` only when there is a
//!   body, then `\r\n` and the body. No `Content-Type`, no `Connection: close`.
//! - it reads 256 bytes at a time and appends each read to a `String` through
//!   `str::from_utf8(..).unwrap()` (CH panics on a read that is not whole UTF-8; here that is
//!   [`ChError::NotUtf8`]);
//! - once `\r\n\r\n` has arrived it looks for the text `Content-Length: ` anywhere in what it read
//!   (case-sensitive), takes the value up to the next `\r`, trims and parses it; without it, it
//!   stops reading and there is no body; with it, it reads until the head plus that many bytes
//!   have arrived (or the peer closes);
//! - the status is the text from `HTTP/1.1 ` to the first `\r`, trimmed and parsed as an integer
//!   (so `200 OK` is a parse error); 200, 204 and 100 are success, any other code is an error
//!   carrying the body text, which CH prints as it is.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How CH's client fails (its `api_client::Error`), plus the panic it would hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChError {
    /// `Error::Socket`.
    Socket(String),
    /// `Error::StatusCodeParsing`: the status text that did not parse.
    StatusCodeParsing(String),
    /// `Error::MissingProtocol`.
    MissingProtocol,
    /// `Error::ContentLengthParsing`.
    ContentLengthParsing(String),
    /// A read that is not whole UTF-8: CH's client panics here.
    NotUtf8,
    /// `Error::ServerResponse(status, body)`: any status but 100, 200 and 204.
    ServerResponse(u16, Option<String>),
}

/// The pieces CH's client writes for `method` `command` with `body`, one write each: the request
/// line with `Host` and `Accept` (its `send_with_fds`), `Content-Length` when there is a body, the
/// blank line, the body. The server must put the head together across reads.
pub fn request_pieces(method: &str, command: &str, body: Option<&str>) -> Vec<Vec<u8>> {
    let mut pieces =
        vec![
            format!("{method} /api/v1/{command} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n")
                .into_bytes(),
        ];
    if let Some(body) = body {
        pieces.push(format!("Content-Length: {}\r\n", body.len()).into_bytes());
    }
    pieces.push(b"\r\n".to_vec());
    if let Some(body) = body {
        pieces.push(body.as_bytes().to_vec());
    }
    pieces
}

/// The request bytes CH's client writes for `method` `command` with `body`.
pub fn request_bytes(method: &str, command: &str, body: Option<&str>) -> Vec<u8> {
    request_pieces(method, command, body).concat()
}

/// Sends one command the way CH's client does; `Ok(Some(body))` when the answer had a body.
pub fn call(
    socket: &Path,
    method: &str,
    command: &str,
    body: Option<&str>,
) -> Result<Option<String>, ChError> {
    let io = |e: std::io::Error| ChError::Socket(e.to_string());
    let mut stream = UnixStream::connect(socket).map_err(io)?;
    // CH sets no timeout; a test must not hang forever on a server that never answers.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    for piece in request_pieces(method, command, body) {
        stream.write_all(&piece).map_err(io)?;
    }
    stream.flush().map_err(io)?;
    parse_response(&mut stream)
}

/// `call` for a command with a JSON body.
pub fn call_json(
    socket: &Path,
    method: &str,
    command: &str,
    body: &serde_json::Value,
) -> Result<Option<String>, ChError> {
    call(socket, method, command, Some(&body.to_string()))
}

/// CH's `parse_http_response`.
pub fn parse_response(socket: &mut impl Read) -> Result<Option<String>, ChError> {
    let mut res = String::new();
    let mut body_offset = None;
    let mut content_length: Option<usize> = None;
    loop {
        let mut bytes = [0u8; 256];
        let count = socket
            .read(&mut bytes)
            .map_err(|e| ChError::Socket(e.to_string()))?;
        if count == 0 {
            break;
        }
        res.push_str(std::str::from_utf8(&bytes[..count]).map_err(|_| ChError::NotUtf8)?);
        if let Some(o) = res.find("\r\n\r\n") {
            body_offset = Some(o + 4);
            content_length = match header(&res, "Content-Length") {
                Some(v) => Some(
                    v.trim()
                        .parse()
                        .map_err(|_| ChError::ContentLengthParsing(v.to_owned()))?,
                ),
                None => None,
            };
            if content_length.is_none() {
                break;
            }
        }
        if let (Some(o), Some(len)) = (body_offset, content_length) {
            if res.len() >= len + o {
                break;
            }
        }
    }
    // CH takes everything after the head as the body, whatever Content-Length said.
    let body = content_length.and(body_offset.map(|o| res[o..].to_owned()));
    let code = status_code(&res)?;
    if matches!(code, 100 | 200 | 204) {
        Ok(body)
    } else {
        Err(ChError::ServerResponse(code, body))
    }
}

/// CH's `get_header`: the text after the first `NAME: ` up to the next `\r`.
fn header<'a>(res: &'a str, name: &str) -> Option<&'a str> {
    let needle = format!("{name}: ");
    let o = res.find(&needle)?;
    let end = o + res[o..].find('\r')?;
    res.get(o + needle.len()..end)
}

/// CH's `get_status_code`: `HTTP/1.1 ` up to the first `\r`, trimmed, as an integer.
fn status_code(res: &str) -> Result<u16, ChError> {
    let o = res.find("HTTP/1.1").ok_or(ChError::MissingProtocol)?;
    let end = o + res[o..].find('\r').ok_or(ChError::MissingProtocol)?;
    let text = res.get(o + "HTTP/1.1 ".len()..end).unwrap_or_default();
    text.trim()
        .parse()
        .map_err(|_| ChError::StatusCodeParsing(text.to_owned()))
}

/// The messages of an error body (CH's JSON array, outermost first), or a panic saying what the
/// body was instead.
pub fn error_messages(err: &ChError) -> (u16, Vec<String>) {
    match err {
        ChError::ServerResponse(code, Some(body)) => match serde_json::from_str(body) {
            Ok(messages) => (*code, messages),
            Err(e) => panic!("HTTP {code}: error body is not an array of strings ({e}): {body}"),
        },
        other => panic!("expected an error answer, got {other:?}"),
    }
}
