//! The assembled demo payload and the header tern reads from it.

/// The payload, linked to run at [`super::setup::PAYLOAD_GPA`].
pub static PAYLOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.bin"));

const MAGIC: &[u8; 8] = b"TERNDEMO";
const HEADER_VERSION: u64 = 4;

/// Entry points the payload publishes in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadHeader {
    /// Ring-0 entry of every vCPU.
    pub entry: u64,
    /// Address of a table of 32 exception-stub addresses (vectors 0..=31).
    pub exception_stubs: u64,
}

/// The payload does not carry the header tern expects (a build problem, not a user one).
#[derive(Debug, thiserror::Error)]
#[error("demo payload header is invalid: {0}")]
pub struct PayloadHeaderError(&'static str);

fn word(bytes: &[u8], index: usize) -> Option<u64> {
    let b = bytes.get(index * 8..index * 8 + 8)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// Parses the header at the start of `payload`.
pub fn parse_header(payload: &[u8]) -> Result<PayloadHeader, PayloadHeaderError> {
    if payload.get(..8) != Some(MAGIC.as_slice()) {
        return Err(PayloadHeaderError("bad magic"));
    }
    let field = |i| word(payload, i).ok_or(PayloadHeaderError("truncated"));
    if field(4)? != HEADER_VERSION {
        return Err(PayloadHeaderError("unsupported version"));
    }
    Ok(PayloadHeader {
        entry: field(1)?,
        exception_stubs: field(2)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::setup::PAYLOAD_GPA;

    #[test]
    fn built_payload_has_a_valid_header_inside_itself() {
        let h = parse_header(PAYLOAD).unwrap();
        let end = PAYLOAD_GPA + PAYLOAD.len() as u64;
        for addr in [h.entry, h.exception_stubs] {
            assert!(
                (PAYLOAD_GPA..end).contains(&addr),
                "{addr:#x} outside payload"
            );
        }
    }

    #[test]
    fn parse_header_rejects_garbage() {
        assert!(parse_header(b"nope").is_err());
        assert!(parse_header(b"TERNDEMO\0\0").is_err());
    }
}
