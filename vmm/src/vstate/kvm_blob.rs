//! KVM state structs in a saved VM state as one hex string each (`#[serde(with = ...)]`).
//!
//! kvm-bindings serialises its structs as their raw bytes, which serde_json writes as an array
//! of numbers: a vCPU's xsave area alone is 4096 of them, and a destination parses every one
//! through serde's sequence visitor inside the downtime. A hex string is one token that decodes
//! with a table walk. Decoding still takes the array form too, so a tern that wrote it (before
//! this encoding) can hand its VM to this one (live update). Like kvm-bindings, a blob shorter
//! or longer than the struct is zero-padded or truncated (a newer kernel may grow a struct at its
//! end).

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serializer};
use zerocopy::{FromBytes, Immutable, IntoBytes};

const HEX: &[u8; 16] = b"0123456789abcdef";

fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn from_hex<E: de::Error>(s: &str) -> Result<Vec<u8>, E> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return Err(E::custom(format!(
            "a hex blob of odd length {} (two digits per byte)",
            s.len()
        )));
    }
    s.chunks_exact(2)
        .enumerate()
        .map(|(i, pair)| match (nibble(pair[0]), nibble(pair[1])) {
            (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
            _ => Err(E::custom(format!("a non-hex digit in byte {i} of a blob"))),
        })
        .collect()
}

/// The blob's bytes: a hex string, or the array of byte values earlier terns wrote.
struct BlobVisitor;

impl<'de> Visitor<'de> for BlobVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a hex string or an array of bytes")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        from_hex(s)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(v)
    }
}

/// `bytes` as a `T`: zero-padded when short, truncated when long.
fn fill<T: FromBytes + IntoBytes>(bytes: &[u8]) -> T {
    let mut v = T::new_zeroed();
    let dst = v.as_mut_bytes();
    let n = dst.len().min(bytes.len());
    dst[..n].copy_from_slice(&bytes[..n]);
    v
}

/// Writes `v` as one hex string of its bytes.
pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&to_hex(v.as_bytes()))
}

/// Reads a `T` from a hex string or from kvm-bindings' own array of bytes.
pub fn deserialize<'de, T: FromBytes + IntoBytes, D: Deserializer<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(fill(&d.deserialize_any(BlobVisitor)?))
}

/// A list of KVM structs (e.g. MSR entries) as one hex string of all their bytes.
pub mod list {
    use super::*;

    /// Writes the entries' bytes, back to back, as one hex string.
    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
        v: &[T],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(v.as_bytes()))
    }

    /// The entries of a hex string (a whole number of entries), or of the array of per-entry
    /// byte arrays earlier terns wrote.
    pub fn deserialize<'de, T, D>(d: D) -> Result<Vec<T>, D::Error>
    where
        T: FromBytes + IntoBytes + Deserialize<'de>,
        D: Deserializer<'de>,
    {
        d.deserialize_any(ListVisitor(std::marker::PhantomData))
    }

    struct ListVisitor<T>(std::marker::PhantomData<T>);

    impl<'de, T: FromBytes + IntoBytes + Deserialize<'de>> Visitor<'de> for ListVisitor<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a hex string or an array of byte arrays")
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            let bytes = from_hex::<E>(s)?;
            let size = std::mem::size_of::<T>().max(1);
            if !bytes.len().is_multiple_of(size) {
                return Err(E::custom(format!(
                    "a list blob of {} bytes is not a whole number of {size}-byte entries",
                    bytes.len()
                )));
            }
            Ok(bytes.chunks_exact(size).map(fill).collect())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 12));
            while let Some(e) = seq.next_element::<T>()? {
                v.push(e);
            }
            Ok(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_msr_entry, kvm_xsave};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    struct Hex {
        #[serde(with = "super")]
        xsave: kvm_xsave,
        #[serde(with = "super::list")]
        msrs: Vec<kvm_msr_entry>,
    }

    /// The same fields as kvm-bindings writes them (the encoding of terns before this one).
    #[derive(Serialize, Deserialize)]
    struct Plain {
        xsave: kvm_xsave,
        msrs: Vec<kvm_msr_entry>,
    }

    fn sample() -> (kvm_xsave, Vec<kvm_msr_entry>) {
        let mut xsave = kvm_xsave::default();
        for (i, w) in xsave.region.iter_mut().enumerate() {
            *w = (i as u32).wrapping_mul(0x9e37_79b9);
        }
        let msrs = (0..5)
            .map(|i| kvm_msr_entry {
                index: 0xc000_0080 + i,
                data: u64::MAX - u64::from(i),
                ..Default::default()
            })
            .collect();
        (xsave, msrs)
    }

    #[test]
    fn blobs_round_trip_as_one_string_each() {
        let (xsave, msrs) = sample();
        let region = xsave.region;
        let json = serde_json::to_value(Hex {
            xsave,
            msrs: msrs.clone(),
        })
        .unwrap();
        assert_eq!(json["xsave"].as_str().map(str::len), Some(2 * 4096));
        assert_eq!(json["msrs"].as_str().map(str::len), Some(2 * 16 * 5));
        let back: Hex = serde_json::from_value(json).unwrap();
        assert_eq!(back.xsave.region, region);
        assert_eq!(back.msrs, msrs);
    }

    #[test]
    fn the_array_form_of_earlier_terns_still_decodes() {
        let (xsave, msrs) = sample();
        let region = xsave.region;
        let old = serde_json::to_vec(&Plain {
            xsave,
            msrs: msrs.clone(),
        })
        .unwrap();
        assert_eq!(old.first(), Some(&b'{'));
        let back: Hex = serde_json::from_slice(&old).unwrap();
        assert_eq!(back.xsave.region, region);
        assert_eq!(back.msrs, msrs);
    }

    #[test]
    fn bad_blobs_are_refused_with_the_reason() {
        let e = serde_json::from_str::<Hex>(r#"{"xsave": "abc", "msrs": ""}"#)
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("odd length 3")),
            "{e:?}"
        );
        let e = serde_json::from_str::<Hex>(r#"{"xsave": "zz", "msrs": ""}"#)
            .err()
            .map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("non-hex")), "{e:?}");
        let e = serde_json::from_str::<Hex>(r#"{"xsave": "00", "msrs": "0011"}"#)
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("whole number")),
            "{e:?}"
        );
        // Short: zero-padded (a struct a newer kernel grew at its end).
        let short: Hex = serde_json::from_str(r#"{"xsave": "ff", "msrs": ""}"#).unwrap();
        assert_eq!(short.xsave.region[0], 0xff);
        assert!(short.xsave.region[1..].iter().all(|w| *w == 0));
    }
}
