//! Stream preamble and frame codec: `[tag u8][flags u8][reserved u16][len u32][crc32 u32]` then
//! `len` payload bytes, all little endian. The CRC-32 (IEEE) covers the first 8 header bytes and the
//! payload, so a flipped tag or length is caught as surely as a flipped page byte.
//!
//! Two flags exist, only on memory frames, and both leave the page bytes outside the CRC so that
//! the sender writes them straight from guest memory and the receiver reads them straight into
//! guest memory (no copy on either side): [`FLAG_DATA_UNCHECKED`] (the CRC covers the header and the
//! entry table) and [`FLAG_PAGE_SUMS`] (a table of per-page sums follows the entry table, inside
//! the CRC; see [`super::page_sum`]). A memory frame without a flag has its data inside the CRC.

use std::io::{self, Read, Write};

use super::frame::{encode_memory_entries, Frame, FrameTag, MemoryEntry, PayloadError};

/// First bytes of every connection, in both directions.
pub const MAGIC: [u8; 8] = *b"TERNMIG\0";
/// The protocol version this build speaks.
pub const VERSION: u32 = 4;
/// Bytes of the preamble (magic + version).
pub const PREAMBLE_BYTES: usize = 12;
/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 12;
/// Largest payload accepted (state blobs larger than this must be split by the host).
pub const MAX_PAYLOAD_BYTES: usize = 64 << 20;
/// Memory frame flag: the CRC does not cover the data section.
pub const FLAG_DATA_UNCHECKED: u8 = 1;
/// Memory frame flag: a per-page sums table follows the entry table (inside the CRC); the data
/// section is outside the CRC and each page is checked against its sum.
pub const FLAG_PAGE_SUMS: u8 = 2;
/// Payload tails up to this size are copied into the header buffer to save a syscall.
const COALESCE_TAIL_BYTES: usize = 64 << 10;

/// Codec errors; each says which frame or stream part was affected.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Reading from the connection failed.
    #[error("read {what}")]
    Read {
        /// What was being read.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing to the connection failed.
    #[error("write {frame} frame")]
    Write {
        /// Frame being written.
        frame: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection cleanly between frames.
    #[error("peer closed the connection")]
    Closed,
    /// The stream ended inside a preamble, header or payload.
    #[error("stream truncated in {what}: got {got} of {want} bytes")]
    Truncated {
        /// Which part.
        what: &'static str,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The preamble does not start with [`MAGIC`].
    #[error("bad magic {found:02x?}: not a tern migration stream")]
    BadMagic {
        /// The bytes received.
        found: [u8; 8],
    },
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {found} (this side speaks {supported})")]
    UnsupportedVersion {
        /// The peer's version.
        found: u32,
        /// Ours.
        supported: u32,
    },
    /// The frame tag is not one this version knows.
    #[error("unknown frame type {tag}")]
    UnknownFrame {
        /// The tag byte.
        tag: u8,
    },
    /// Flags or reserved header bits are set.
    #[error("{frame} frame header has reserved bits set ({value:#x})")]
    Reserved {
        /// Frame type.
        frame: &'static str,
        /// The flags/reserved bits.
        value: u32,
    },
    /// The announced payload exceeds [`MAX_PAYLOAD_BYTES`].
    #[error("{frame} frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Frame type.
        frame: &'static str,
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Header+payload do not hash to the header's CRC.
    #[error("{frame} frame checksum mismatch: header says {expected:#010x}, content hashes to {actual:#010x}")]
    Checksum {
        /// Frame type.
        frame: &'static str,
        /// CRC in the header.
        expected: u32,
        /// CRC computed.
        actual: u32,
    },
    /// A page of a memory frame read whole ([`super::FrameReader::recv`]) does not match its
    /// sum. The frame was read to its end, so the stream is still in step; a page the guest
    /// rewrote while it was sent looks the same (the streaming receiver heals those).
    #[error("memory frame page at GPA {gpa:#x} does not match its checksum")]
    PageSum {
        /// The page's GPA.
        gpa: u64,
    },
    /// The payload does not parse.
    #[error("malformed {frame} frame")]
    Malformed {
        /// Frame type.
        frame: &'static str,
        /// What is wrong.
        #[source]
        source: PayloadError,
    },
}

/// Read exactly `buf.len()` bytes. Returns how many were read before EOF (short count on EOF).
pub(crate) fn read_full<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<usize, ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(ProtocolError::Read { what, source }),
        }
    }
    Ok(got)
}

/// The 12 preamble bytes for this version.
pub fn preamble() -> [u8; PREAMBLE_BYTES] {
    let mut p = [0u8; PREAMBLE_BYTES];
    p[..8].copy_from_slice(&MAGIC);
    p[8..].copy_from_slice(&VERSION.to_le_bytes());
    p
}

/// Send the preamble.
pub fn write_preamble<W: Write>(w: &mut W) -> Result<(), ProtocolError> {
    w.write_all(&preamble())
        .and_then(|()| w.flush())
        .map_err(|source| ProtocolError::Write {
            frame: "preamble",
            source,
        })
}

/// Read and check the peer's preamble.
pub fn read_preamble<R: Read>(r: &mut R) -> Result<(), ProtocolError> {
    let mut p = [0u8; PREAMBLE_BYTES];
    let got = read_full(r, &mut p, "preamble")?;
    if got == 0 {
        return Err(ProtocolError::Closed);
    }
    if got < PREAMBLE_BYTES {
        return Err(ProtocolError::Truncated {
            what: "preamble",
            got,
            want: PREAMBLE_BYTES,
        });
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&p[..8]);
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic { found: magic });
    }
    let version = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
    if version != VERSION {
        return Err(ProtocolError::UnsupportedVersion {
            found: version,
            supported: VERSION,
        });
    }
    Ok(())
}

/// Encode `frame` into `buf` (header + head of payload). Returns the borrowed payload tail that
/// must follow `buf` on the wire (empty when it was small enough to copy into `buf`).
pub fn encode_frame<'a>(frame: &Frame<'a>, buf: &mut Vec<u8>) -> Result<&'a [u8], ProtocolError> {
    let tag = frame.tag();
    if let Some(id) = frame.device_id() {
        if id.len() > usize::from(u16::MAX) {
            return Err(ProtocolError::Malformed {
                frame: tag.name(),
                source: PayloadError::Invalid {
                    field: "device id length",
                    value: id.len() as u64,
                },
            });
        }
    }
    buf.clear();
    buf.resize(HEADER_BYTES, 0);
    let mut tail = frame.encode_payload(buf);
    if tail.len() <= COALESCE_TAIL_BYTES {
        buf.extend_from_slice(tail);
        tail = &[];
    }
    let len = buf.len() - HEADER_BYTES + tail.len();
    if len > MAX_PAYLOAD_BYTES {
        return Err(ProtocolError::TooLarge {
            frame: tag.name(),
            len,
            max: MAX_PAYLOAD_BYTES,
        });
    }
    buf[0] = tag as u8;
    // len ≤ MAX_PAYLOAD_BYTES < 4 GiB.
    buf[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[..8]);
    h.update(&buf[HEADER_BYTES..]);
    h.update(tail);
    let crc = h.finalize();
    buf[8..12].copy_from_slice(&crc.to_le_bytes());
    Ok(tail)
}

/// Encode the header and entry table of a memory frame whose `data_len` data bytes the caller
/// writes next, straight from guest memory: unchecked when `sums` is empty, else with the sums
/// table (one per data page, in entry order) and [`FLAG_PAGE_SUMS`].
pub fn encode_memory_head(
    entries: &[MemoryEntry],
    sums: &[u64],
    data_len: usize,
    buf: &mut Vec<u8>,
) -> Result<(), ProtocolError> {
    buf.clear();
    buf.resize(HEADER_BYTES, 0);
    encode_memory_entries(entries, buf);
    super::page_sum::encode_sums(sums, buf);
    let len = buf.len() - HEADER_BYTES + data_len;
    if len > MAX_PAYLOAD_BYTES {
        return Err(ProtocolError::TooLarge {
            frame: FrameTag::Memory.name(),
            len,
            max: MAX_PAYLOAD_BYTES,
        });
    }
    buf[0] = FrameTag::Memory as u8;
    buf[1] = if sums.is_empty() {
        FLAG_DATA_UNCHECKED
    } else {
        FLAG_PAGE_SUMS
    };
    buf[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[..8]);
    h.update(&buf[HEADER_BYTES..]);
    let crc = h.finalize();
    buf[8..12].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Writes frames to a byte stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    /// Wrap a connection (the preamble is written separately).
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            buf: Vec::with_capacity(64 << 10),
        }
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Encode and send one frame; returns the bytes put on the wire.
    pub fn send(&mut self, frame: &Frame<'_>) -> Result<u64, ProtocolError> {
        let tail = encode_frame(frame, &mut self.buf)?;
        let name = frame.tag().name();
        let werr = |source| ProtocolError::Write {
            frame: name,
            source,
        };
        self.inner.write_all(&self.buf).map_err(werr)?;
        if !tail.is_empty() {
            self.inner.write_all(tail).map_err(werr)?;
        }
        self.inner.flush().map_err(werr)?;
        Ok((self.buf.len() + tail.len()) as u64)
    }

    /// Send the header, entry table and (if any) sums table of a memory frame whose data is
    /// outside the CRC; the caller must write the `data_len` data bytes next on
    /// [`FrameWriter::get_mut`]. Returns the bytes written.
    pub fn send_memory_head(
        &mut self,
        entries: &[MemoryEntry],
        sums: &[u64],
        data_len: usize,
    ) -> Result<u64, ProtocolError> {
        encode_memory_head(entries, sums, data_len, &mut self.buf)?;
        self.inner
            .write_all(&self.buf)
            .map_err(|source| ProtocolError::Write {
                frame: FrameTag::Memory.name(),
                source,
            })?;
        Ok(self.buf.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::{DeviceMark, Hello, MemoryFdInfo, PageEncoding};
    use super::super::reader::{FrameReader, Received};
    use super::*;
    use std::io::Read;
    use vm_memory::GuestAddress;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn encode(f: &Frame<'_>) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new());
        w.send(f).expect("encodes");
        w.inner
    }

    fn page(b: u8) -> Vec<u8> {
        vec![b; 4096]
    }

    /// Every frame type with a representative payload.
    fn samples(pg: &[u8]) -> Vec<Frame<'_>> {
        vec![
            Frame::Hello(Hello {
                session: 0x0102_0304_0506_0708,
                connection_index: 1,
                connections: 2,
                local: true,
            }),
            Frame::Config(b"{\"vcpus\":1}"),
            Frame::Memory {
                entries: vec![
                    MemoryEntry {
                        gpa: GuestAddress(0x1000),
                        npages: 1,
                        encoding: PageEncoding::Data,
                    },
                    MemoryEntry {
                        gpa: GuestAddress(0x10_0000),
                        npages: 3,
                        encoding: PageEncoding::Zero,
                    },
                ],
                data: pg,
            },
            Frame::MemoryFd(MemoryFdInfo {
                gpa: GuestAddress(0x1_0000_0000),
                len_bytes: 0x4000_0000,
                file_offset: 0x2000,
            }),
            Frame::VcpuState {
                id: 3,
                bytes: &[0xaa, 0xbb],
            },
            Frame::VmState(&[1, 2, 3]),
            Frame::DeviceState {
                id: "serial0",
                bytes: &[9; 4],
            },
            Frame::Complete,
            Frame::Ack,
            Frame::Error("destination: out of memory"),
            Frame::StreamEnd,
            Frame::DeviceData {
                id: "mtty0",
                bytes: &[7, 8, 9],
            },
            Frame::DeviceMark {
                id: "mtty0",
                mark: DeviceMark::InitialSent,
            },
            Frame::DeviceLoaded { id: "mtty0" },
            Frame::Populated(vec![
                MemoryEntry {
                    gpa: GuestAddress(0x20_0000),
                    npages: 512,
                    encoding: PageEncoding::Data,
                },
                MemoryEntry {
                    gpa: GuestAddress(0x1_0000_0000),
                    npages: 3,
                    encoding: PageEncoding::Data,
                },
            ]),
        ]
    }

    #[test]
    fn preamble_golden_bytes_and_checks() {
        assert_eq!(hex(&preamble()), "5445524e4d49470004000000");
        read_preamble(&mut &preamble()[..]).expect("own preamble");
        // Version 1 had no config ack; a v1 peer must be refused before any frame.
        let mut v1 = preamble();
        v1[8] = 1;
        assert!(matches!(
            read_preamble(&mut &v1[..]),
            Err(ProtocolError::UnsupportedVersion {
                found: 1,
                supported: 4
            })
        ));
        assert!(matches!(
            read_preamble(&mut &b"GET / HTTP/1.1\r\n"[..]),
            Err(ProtocolError::BadMagic { .. })
        ));
        assert!(matches!(
            read_preamble(&mut &preamble()[..5]),
            Err(ProtocolError::Truncated { got: 5, .. })
        ));
        assert!(matches!(
            read_preamble(&mut &[][..]),
            Err(ProtocolError::Closed)
        ));
    }

    /// 2^20 + 1 entries of u32::MAX data pages each need more than 2^64 bytes: refused as bad
    /// input, never summed past u64 (a panic in a debug build, a wrapped and wrong check in a
    /// release one).
    #[test]
    fn an_entry_table_needing_more_than_u64_bytes_is_refused() {
        let n: u32 = (1 << 20) + 1;
        let mut table = n.to_le_bytes().to_vec();
        for _ in 0..n {
            table.extend_from_slice(&0u64.to_le_bytes());
            table.extend_from_slice(&u32::MAX.to_le_bytes());
            table.extend_from_slice(&[0, 0, 0, 0]);
        }
        let wrapped = u64::from(n).wrapping_mul(u64::from(u32::MAX) << 12) as usize;
        for data_len in [0, wrapped] {
            assert!(matches!(
                super::super::frame::decode_memory_table(&table, data_len),
                Err(PayloadError::Invalid {
                    field: "entry data length",
                    ..
                })
            ));
        }
        assert!(matches!(
            Frame::decode(FrameTag::Populated, &table),
            Err(PayloadError::Invalid {
                field: "entry data length",
                ..
            })
        ));
    }

    /// Expected bytes computed independently (Python `struct` + `zlib.crc32`) from the layout in
    /// the module docs. A format change must bump VERSION and these together. (Version 2 changed
    /// the exchange, not the frame layout: the destination acks the config once its VM is built.
    /// Version 3 added the device data, mark and loaded frames; version 4 the populated frame.)
    #[test]
    fn golden_bytes_per_frame_type_version_4() {
        let pg = page(0x5a);
        let golden = [
            "01000000100000002233697f08070605040302010100020001000000",
            "020000000b000000bba9e5f97b227663707573223a317d",
            "", // memory: checked below
            "0400000018000000cee52769000000000100000000000040000000000020000000000000",
            "0500000006000000242bc9d603000000aabb",
            "06000000030000003d382718010203",
            "070000000d000000820ac02f070073657269616c3009090909",
            "0800000000000000dcc4c7b6",
            "090000000000000042c46d7a",
            "0a0000001a0000007f0024cd64657374696e6174696f6e3a206f7574206f66206d656d6f7279",
            "0b000000000000003fc34838",
            "0c0000000a0000002bf7253c05006d74747930070809",
            "0d000000080000006c49190405006d7474793001",
            "0e000000070000001e97804f05006d74747930",
            "12000000240000005397ae12020000000000200000000000000200000000000000000000010000000300000000000000",
        ];
        let frames = samples(&pg);
        assert_eq!(frames.len(), golden.len());
        for (f, g) in frames.iter().zip(golden) {
            if !g.is_empty() {
                assert_eq!(hex(&encode(f)), g, "{:?}", f.tag());
            }
        }
        // The memory frame: header, 2 entries, then the page bytes.
        let mem = encode(&frames[2]);
        assert_eq!(hex(&mem[..HEADER_BYTES]), "0300000024100000ac4d34dc");
        assert_eq!(
            hex(&mem[HEADER_BYTES..HEADER_BYTES + 36]),
            "02000000\
             00100000000000000100000000000000\
             00001000000000000300000001000000"
        );
        assert_eq!(mem.len(), HEADER_BYTES + 36 + 4096);
        assert_eq!(&mem[HEADER_BYTES + 36..], &pg[..]);
    }

    fn unchecked_frame(page: &[u8]) -> Vec<u8> {
        let e = [MemoryEntry {
            gpa: GuestAddress(0x3000),
            npages: 1,
            encoding: PageEncoding::Data,
        }];
        let mut w = FrameWriter::new(Vec::new());
        w.send_memory_head(&e, &[], page.len()).expect("head");
        w.get_mut().extend_from_slice(page);
        w.inner
    }

    #[test]
    fn unchecked_memory_frame_golden_bytes_and_both_read_paths() {
        let page = vec![0x11u8; 4096];
        let b = unchecked_frame(&page);
        // Independently computed (Python struct + zlib.crc32 over header[..8] + entry table).
        assert_eq!(
            hex(&b[..HEADER_BYTES + 20]),
            "0301000014100000a896579e0100000000300000000000000100000000000000"
        );
        let want = Frame::Memory {
            entries: vec![MemoryEntry {
                gpa: GuestAddress(0x3000),
                npages: 1,
                encoding: PageEncoding::Data,
            }],
            data: &page,
        };
        assert_eq!(FrameReader::new(&b[..]).recv().expect("buffered"), want);
        let mut r = FrameReader::new(&b[..]);
        let Received::MemoryStream(entries) = r.recv_streaming().expect("streaming") else {
            panic!("expected a memory stream");
        };
        assert_eq!(entries.len(), 1);
        let mut rest = Vec::new();
        r.get_mut().read_to_end(&mut rest).expect("data follows");
        assert_eq!(rest, page);
    }

    #[test]
    fn unchecked_memory_frame_still_checks_header_and_table() {
        let page = vec![0x22u8; 4096];
        let b = unchecked_frame(&page);
        for i in 0..HEADER_BYTES + 20 {
            let mut c = b.clone();
            c[i] ^= 0x04;
            assert!(FrameReader::new(&c[..]).recv().is_err(), "byte {i}");
            assert!(
                FrameReader::new(&c[..]).recv_streaming().is_err(),
                "byte {i}"
            );
        }
        // The flag is only valid on memory frames.
        let mut ack = encode(&Frame::Ack);
        ack[1] = FLAG_DATA_UNCHECKED;
        assert!(matches!(
            FrameReader::new(&ack[..]).recv(),
            Err(ProtocolError::Reserved { .. })
        ));
        // A table claiming more entries than the payload holds.
        let mut big = b.clone();
        big[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(FrameReader::new(&big[..]).recv_streaming().is_err());
        // Truncated data section.
        assert!(matches!(
            FrameReader::new(&b[..b.len() - 1]).recv(),
            Err(ProtocolError::Truncated { .. })
        ));
    }

    /// The live-update fd frame (local mode) carries its opaque bytes unchanged; a corrupted one is
    /// refused like any other. Not in the version-3 golden set: it adds a tag without changing
    /// the layout, so a tern without it refuses it as an unknown frame.
    #[test]
    fn handover_fd_frame_round_trips_and_is_checksummed() {
        let meta = br#"{"kind":"vector","id":"edu0","vector":0}"#;
        let f = Frame::HandoverFd(meta);
        let bytes = encode(&f);
        assert_eq!(bytes[0], 17);
        let mut r = FrameReader::new(&bytes[..]);
        assert_eq!(r.recv().expect("decodes"), f);
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(FrameReader::new(&bad[..]).recv().is_err());
    }

    #[test]
    fn every_frame_type_round_trips() {
        let pg = page(7);
        for f in samples(&pg) {
            let bytes = encode(&f);
            let mut r = FrameReader::new(&bytes[..]);
            assert_eq!(r.recv().expect("decodes"), f);
            assert!(matches!(r.recv(), Err(ProtocolError::Closed)));
        }
    }

    #[test]
    fn truncation_at_every_offset_is_a_clear_error() {
        let pg = page(1);
        for f in samples(&pg) {
            let bytes = encode(&f);
            for cut in 1..bytes.len() {
                let mut r = FrameReader::new(&bytes[..cut]);
                match r.recv() {
                    Err(ProtocolError::Truncated { .. }) => {}
                    other => panic!("{:?} cut at {cut}: {other:?}", f.tag()),
                }
            }
        }
    }

    #[test]
    fn any_single_bit_flip_is_rejected() {
        let pg = page(3);
        for f in samples(&pg) {
            let bytes = encode(&f);
            // Every bit of small frames; a stride through the page for the memory frame.
            let step = if bytes.len() > 256 { 61 } else { 1 };
            for i in (0..bytes.len()).step_by(step) {
                for bit in 0..8 {
                    let mut b = bytes.clone();
                    b[i] ^= 1 << bit;
                    let mut r = FrameReader::new(&b[..]);
                    assert!(r.recv().is_err(), "{:?} byte {i} bit {bit}", f.tag());
                }
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let n = (next() % 96) as usize;
            let mut b: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            // Often make the header plausible so decoding goes past the first checks.
            if n >= HEADER_BYTES && next() % 2 == 0 {
                b[0] = (next() % 12) as u8;
                b[1..4].fill(0);
                // Sometimes an unchecked memory frame (CRC over header + first bytes only).
                b[1] = u8::from(b[0] == 3 && next() % 2 == 0);
                let len = (n - HEADER_BYTES) as u32;
                b[4..8].copy_from_slice(&len.to_le_bytes());
                let mut h = crc32fast::Hasher::new();
                h.update(&b[..8]);
                h.update(&b[HEADER_BYTES..]);
                let crc = h.finalize();
                b[8..12].copy_from_slice(&crc.to_le_bytes());
            }
            let mut r = FrameReader::new(&b[..]);
            while r.recv().is_ok() {}
            let mut r = FrameReader::new(&b[..]);
            while r.recv_streaming().is_ok() {}
            let _ = read_preamble(&mut &b[..]);
        }
    }

    /// Build a frame with a valid checksum around an arbitrary payload.
    fn raw(tag: u8, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![tag, 0, 0, 0];
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&b);
        h.update(payload);
        b.extend_from_slice(&h.finalize().to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    fn recv_err(b: &[u8]) -> ProtocolError {
        match FrameReader::new(b).recv() {
            Err(e) => e,
            Ok(f) => panic!("accepted {f:?}"),
        }
    }

    #[test]
    fn malformed_payloads_get_typed_errors() {
        assert!(matches!(
            recv_err(&raw(99, &[])),
            ProtocolError::UnknownFrame { tag: 99 }
        ));
        let mut big = raw(2, &[]);
        big[4..8].copy_from_slice(&(MAX_PAYLOAD_BYTES as u32 + 1).to_le_bytes());
        assert!(matches!(recv_err(&big), ProtocolError::TooLarge { .. }));
        let mut resv = raw(8, &[]);
        resv[2] = 1;
        assert!(matches!(recv_err(&resv), ProtocolError::Reserved { .. }));
        // Memory: unaligned gpa, zero pages, bad kind, data length mismatch, absurd count.
        let entry = |gpa: u64, n: u32, kind: u8| {
            let mut p = 1u32.to_le_bytes().to_vec();
            p.extend_from_slice(&gpa.to_le_bytes());
            p.extend_from_slice(&n.to_le_bytes());
            p.extend_from_slice(&[kind, 0, 0, 0]);
            p
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (entry(0x1001, 1, 1), "gpa alignment"),
            (entry(0x1000, 0, 1), "entry pages"),
            (entry(0x1000, 1, 7), "entry kind"),
            (entry(0x1000, 1, 0), "data section"),
            (entry(u64::MAX - 0xfff, 2, 1), "gpa range end"),
            (u32::MAX.to_le_bytes().to_vec(), "memory entries"),
        ];
        for (payload, want) in cases {
            let e = recv_err(&raw(3, &payload));
            let ProtocolError::Malformed { source, .. } = &e else {
                panic!("{e:?}");
            };
            assert!(source.to_string().contains(want), "{source} !~ {want}");
        }
        assert!(matches!(
            recv_err(&raw(10, &[0xff, 0xfe])),
            ProtocolError::Malformed {
                source: PayloadError::Utf8 { .. },
                ..
            }
        ));
        assert!(matches!(
            recv_err(&raw(8, &[0])),
            ProtocolError::Malformed {
                source: PayloadError::Trailing { extra: 1 },
                ..
            }
        ));
        assert!(matches!(
            recv_err(&raw(1, &[0; 16])),
            ProtocolError::Malformed { .. }
        ));
    }
}
