//! The bytes of a response as Cloud Hypervisor's client library reads them.
//!
//! CH's `api_client` (`api_client/src/lib.rs`, used by `ch-remote`) does not use an HTTP parser:
//! - the status is the text between `HTTP/1.1 ` and the first `\r`, trimmed and parsed as an
//!   integer, so `200 OK` fails to parse; CH's own server writes an empty reason phrase
//!   (`HTTP/1.1 200 \r\n`), and so does tern ([`reason_phrase`]);
//! - the body is found only through a header spelled exactly `Content-Length: ` (hyper writes
//!   names in lower case unless told to title-case them, which the server does);
//! - it reads 256 bytes at a time and turns each read into a `str` with `from_utf8(..).unwrap()`,
//!   so a multi-byte UTF-8 character split across two reads panics it: JSON bodies are written
//!   ASCII-only ([`to_ascii_json`]), non-ASCII characters escaped as `\uXXXX`.

use std::io;

use hyper::ext::ReasonPhrase;

/// The empty reason phrase: the status line becomes `HTTP/1.1 <code> \r\n`, as CH's server writes it.
pub fn reason_phrase() -> ReasonPhrase {
    ReasonPhrase::from_static(b"")
}

/// `value` as compact JSON with every non-ASCII character escaped, so the body is plain ASCII and
/// means the same to any JSON reader.
pub fn to_ascii_json(value: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, AsciiFormatter);
    // Serializing a Value into a Vec cannot fail: its map keys are strings and writes to a Vec
    // do not fail.
    if serde::Serialize::serialize(value, &mut ser).is_err() {
        out.clear();
    }
    out
}

/// serde_json's compact format, with non-ASCII characters in strings written as `\u` escapes.
struct AsciiFormatter;

impl serde_json::ser::Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_ascii_and_means_the_same() {
        let value = serde_json::json!(["a — b", {"k→": "é𝄞\"\\"}, 1, null]);
        let bytes = to_ascii_json(&value);
        assert!(bytes.is_ascii(), "{}", String::from_utf8_lossy(&bytes));
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.contains(r"\u2014") && text.contains(r"\ud834\udd1e"),
            "{text}"
        );
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn ascii_json_matches_compact_json_for_ascii() {
        let value = serde_json::json!({"state": "Running", "n": [1, 2], "s": "q\"\n"});
        assert_eq!(to_ascii_json(&value), serde_json::to_vec(&value).unwrap());
    }
}
