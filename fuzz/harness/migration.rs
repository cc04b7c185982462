//! Migration stream decoder targets: arbitrary bytes after a valid preamble (`stream`), and valid
//! frame sequences built by the codec, then corrupted with their checksums repaired (`frames`).
//! Invariant: every input ends in a frame or a typed error; no panic, no allocation beyond what
//! the stream actually carried (plus one grow step), and a decoded frame re-encodes to itself.

use std::io::Read;

use tern_migration::protocol::page_sum::page_sum;
use tern_migration::protocol::{
    encode_frame, encode_memory_head, preamble, read_preamble, DeviceMark, Frame, FrameReader,
    Hello, MemoryEntry, MemoryFdInfo, PageEncoding, ProtocolError, Received, HEADER_BYTES,
    MAX_CONNECTIONS, MAX_PAYLOAD_BYTES,
};
use vm_memory::GuestAddress;

use super::input::{Input, Rng};

const PAGE: usize = 4096;

/// A decoded frame must encode back to a frame that decodes equal (the codec is a bijection on
/// what it accepts).
fn check_round_trip(f: &Frame<'_>) {
    let mut buf = Vec::new();
    let tail = encode_frame(f, &mut buf).expect("an accepted frame re-encodes");
    buf.extend_from_slice(tail);
    let mut r = FrameReader::new(&buf[..]);
    assert_eq!(&r.recv().expect("a re-encoded frame decodes"), f);
}

fn check_error(e: &ProtocolError) {
    // Every error renders (with its sources) to a non-empty message.
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&s.to_string());
        src = s.source();
    }
    assert!(!msg.is_empty());
}

/// Reads frames as the buffered receiver does; returns the decoded frames' debug forms.
fn read_buffered(stream: &[u8]) -> Vec<String> {
    let mut r = FrameReader::new(stream);
    let mut seen = Vec::new();
    loop {
        match r.recv() {
            Ok(f) => {
                assert!(f.tag() as u8 >= 1);
                check_round_trip(&f);
                seen.push(format!("{f:?}"));
            }
            Err(e) => {
                check_error(&e);
                return seen;
            }
        }
    }
}

/// Reads frames as the streaming receiver does: an unchecked memory frame's page bytes are read
/// from the stream by the caller, entry by entry.
fn read_streaming(stream: &[u8]) -> usize {
    let mut r = FrameReader::new(stream);
    let mut n = 0;
    loop {
        match r.recv_streaming() {
            Ok(Received::Frame(f)) => check_round_trip(&f),
            Ok(Received::MemoryStream(entries)) | Ok(Received::MemoryStreamSummed(entries, _)) => {
                let need: u64 = entries.iter().map(MemoryEntry::data_bytes).sum();
                assert!(need <= MAX_PAYLOAD_BYTES as u64);
                let mut sink = [0u8; PAGE];
                for e in &entries {
                    assert!(e.npages > 0 && e.gpa.0 % PAGE as u64 == 0);
                    for _ in 0..e.data_bytes() / PAGE as u64 {
                        let mut got = 0;
                        while got < PAGE {
                            match r.get_mut().read(&mut sink[got..]) {
                                Ok(0) | Err(_) => return n,
                                Ok(k) => got += k,
                            }
                        }
                    }
                }
            }
            Err(e) => {
                check_error(&e);
                return n;
            }
        }
        n += 1;
    }
}

/// Target `migration_stream`: the bytes after a valid preamble, read both ways.
pub fn stream(data: &[u8]) {
    let mut bytes = preamble().to_vec();
    bytes.extend_from_slice(data);
    let mut r = &bytes[..];
    read_preamble(&mut r).expect("own preamble");
    read_buffered(r);
    read_streaming(r);
    // The preamble check itself on the raw bytes.
    if let Err(e) = read_preamble(&mut &data[..]) {
        check_error(&e);
    }
}

const IDS: [&str; 5] = ["mtty0", "serial0", "0000:00:04.0", "", "mock-dma/a"];

/// One frame of a recipe, owning what the frame borrows.
struct Owned {
    tag: u8,
    a: u64,
    b: u64,
    c: u64,
    id: String,
    bytes: Vec<u8>,
    entries: Vec<MemoryEntry>,
}

impl Owned {
    fn frame(&self) -> Frame<'_> {
        match self.tag {
            1 => Frame::Hello(Hello {
                session: self.a,
                connections: 1 + (self.b as u16) % MAX_CONNECTIONS,
                connection_index: (self.c as u16) % (1 + (self.b as u16) % MAX_CONNECTIONS),
                local: self.a & 1 == 1,
            }),
            2 => Frame::Config(&self.bytes),
            3 => Frame::Memory {
                entries: self.entries.clone(),
                data: &self.bytes,
            },
            4 => Frame::MemoryFd(MemoryFdInfo {
                gpa: GuestAddress(self.a & !0xfff & 0xffff_ffff_ffff),
                len_bytes: (self.b & 0xffff_ffff_ffff).max(1),
                file_offset: self.c,
            }),
            5 => Frame::VcpuState {
                id: self.a as u32,
                bytes: &self.bytes,
            },
            6 => Frame::VmState(&self.bytes),
            7 => Frame::DeviceState {
                id: &self.id,
                bytes: &self.bytes,
            },
            8 => Frame::Complete,
            9 => Frame::Ack,
            10 => Frame::Error(&self.id),
            11 => Frame::StreamEnd,
            12 => Frame::DeviceData {
                id: &self.id,
                bytes: &self.bytes,
            },
            13 => Frame::DeviceMark {
                id: &self.id,
                mark: if self.a & 1 == 0 {
                    DeviceMark::InitialSent
                } else {
                    DeviceMark::End
                },
            },
            14 => Frame::DeviceLoaded { id: &self.id },
            // 15 is the streamed memory frame, built in `build`.
            16 => Frame::HandoverFd(&self.bytes),
            17 => Frame::Ready,
            19 => Frame::Populated(self.entries.clone()),
            _ => Frame::Commit,
        }
    }
}

fn entries(inp: &mut Input<'_>) -> (Vec<MemoryEntry>, usize) {
    let n = inp.below(4);
    let mut out = Vec::new();
    let mut pages = 0;
    for _ in 0..n {
        let zero = inp.bool();
        let npages = if zero {
            1 + inp.u32() % 0x10_0000
        } else {
            1 + inp.below(2) as u32
        };
        if !zero {
            pages += npages as usize;
        }
        out.push(MemoryEntry {
            gpa: GuestAddress(u64::from(inp.u32()) << 12),
            npages,
            encoding: if zero {
                PageEncoding::Zero
            } else {
                PageEncoding::Data
            },
        });
    }
    (out, pages * PAGE)
}

/// A valid frame sequence from the recipe; returns the stream and each frame's byte range.
fn build(inp: &mut Input<'_>) -> (Vec<u8>, Vec<(usize, usize, bool)>) {
    let mut out = Vec::new();
    let mut spans = Vec::new();
    let mut buf = Vec::new();
    for _ in 0..1 + inp.below(8) {
        let start = out.len();
        let tag = 1 + inp.below(19) as u8;
        if tag == 15 {
            // A memory frame with its data outside the CRC (unchecked, or with a sum per page):
            // header and tables, then the page bytes.
            let (e, data_len) = entries(inp);
            let fill = inp.u8();
            let sums = if inp.below(2) == 1 {
                vec![page_sum(&[fill; PAGE]); data_len / PAGE]
            } else {
                Vec::new()
            };
            encode_memory_head(&e, &sums, data_len, &mut buf).expect("small head");
            out.extend_from_slice(&buf);
            out.resize(out.len() + data_len, fill);
            spans.push((start, out.len(), true));
            continue;
        }
        let id = IDS[inp.below(IDS.len())].to_string();
        let mut o = Owned {
            tag,
            a: inp.u64(),
            b: inp.u64(),
            c: inp.u64(),
            id,
            bytes: inp.bytes(64).to_vec(),
            entries: Vec::new(),
        };
        if tag == 3 {
            let (e, data_len) = entries(inp);
            let fill = inp.u8();
            o.entries = e;
            o.bytes = vec![fill; data_len];
        }
        if tag == 19 {
            o.entries = entries(inp).0;
            for e in &mut o.entries {
                e.encoding = PageEncoding::Data;
            }
        }
        let tail = encode_frame(&o.frame(), &mut buf).expect("valid frame encodes");
        out.extend_from_slice(&buf);
        out.extend_from_slice(tail);
        spans.push((start, out.len(), false));
    }
    (out, spans)
}

/// Rewrites a frame's CRC after its bytes changed, so the corruption reaches the payload decoder.
fn fix_crc(stream: &mut [u8], start: usize, end: usize, unchecked: bool) {
    if end < start + HEADER_BYTES || end > stream.len() {
        return;
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&stream[start..start + 8]);
    let body = &stream[start + HEADER_BYTES..end];
    if unchecked {
        // The table: a u32 count then 16 bytes per entry, as far as it is present.
        let n = body
            .get(..4)
            .map_or(0, |c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize);
        let table = n.saturating_mul(16).saturating_add(4).min(body.len());
        h.update(&body[..table]);
    } else {
        h.update(body);
    }
    let crc = h.finalize().to_le_bytes();
    stream[start + 8..start + 12].copy_from_slice(&crc);
}

/// Target `migration_frames`: a valid sequence from the recipe, then up to 4 corruptions chosen by
/// the recipe (most with the CRC repaired). Without corruption every frame must come back equal.
pub fn frames(data: &[u8]) {
    let mut inp = Input::new(data);
    let (mut s, spans) = build(&mut inp);
    let clean = s.clone();
    let mut first_touched = s.len();
    for _ in 0..inp.below(5) {
        let (start, end, unchecked) = spans[inp.below(spans.len())];
        if start + HEADER_BYTES > s.len() {
            continue;
        }
        let at = match inp.below(6) {
            0 => {
                // Any byte, checksum left stale.
                let i = inp.below(s.len());
                s[i] ^= inp.u8() | 1;
                i
            }
            1 => {
                // A payload byte, checksum repaired.
                let i = start + HEADER_BYTES + inp.below(end - start - HEADER_BYTES + 1);
                if let Some(b) = s.get_mut(i) {
                    *b ^= inp.u8() | 1;
                }
                fix_crc(&mut s, start, end, unchecked);
                i.min(start)
            }
            2 => {
                // The announced length, checksum repaired.
                let v = [0u32, 1, 4, 0x0400_0000, 0x0400_0001, u32::MAX, inp.u32()][inp.below(7)];
                s[start + 4..start + 8].copy_from_slice(&v.to_le_bytes());
                fix_crc(&mut s, start, end, unchecked);
                start
            }
            3 => {
                // Tag or flags, checksum repaired.
                s[start + inp.below(2)] = inp.u8();
                fix_crc(&mut s, start, end, unchecked);
                start
            }
            4 => {
                // A 4-byte field inside the payload set to an interesting value (counts, id
                // lengths), checksum repaired.
                let i = start + HEADER_BYTES + inp.below(end - start - HEADER_BYTES + 1);
                let v = [u32::MAX, 0x8000_0000, 0xffff, 0][inp.below(4)].to_le_bytes();
                for (k, b) in v.iter().enumerate() {
                    if let Some(slot) = s.get_mut(i + k).filter(|_| i + k < end) {
                        *slot = *b;
                    }
                }
                fix_crc(&mut s, start, end, unchecked);
                start
            }
            _ => {
                let cut = inp.below(s.len() + 1);
                s.truncate(cut);
                cut
            }
        };
        first_touched = first_touched.min(at);
        if s.is_empty() {
            break;
        }
    }
    let got = read_buffered(&s);
    let streamed = read_streaming(&s);
    // Frames wholly before the first corruption decode exactly as sent.
    let intact = spans.iter().filter(|(_, e, _)| *e <= first_touched).count();
    let want = read_buffered(&clean);
    assert_eq!(want.len(), spans.len(), "a valid sequence failed to decode");
    if intact > 0 {
        assert!(got.len() >= intact, "lost an intact frame: {got:?}");
        assert_eq!(got[..intact], want[..intact]);
        assert!(streamed >= intact);
    }
    if s == clean {
        assert_eq!(got, want);
        assert_eq!(streamed, spans.len());
    }
}

/// Seeds: valid streams for `migration_stream`, recipes for `migration_frames`.
pub fn stream_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rng = Rng::new(3);
    for _ in 0..24 {
        let recipe: Vec<u8> = (0..160).map(|_| rng.next() as u8).collect();
        out.push(build(&mut Input::new(&recipe)).0);
    }
    // One of each frame type, in protocol order, as a source sends them.
    let mut one_each = Vec::new();
    for tag in 1..=19u8 {
        let mut recipe = vec![0u8; 4];
        recipe.extend_from_slice(&u32::from(tag - 1).to_le_bytes());
        recipe.extend(std::iter::repeat_n(tag, 60));
        one_each.extend(build(&mut Input::new(&recipe)).0);
    }
    out.push(one_each);
    out
}

pub fn frame_seeds() -> Vec<Vec<u8>> {
    let mut rng = Rng::new(5);
    (0..24)
        .map(|i| (0..40 + 8 * i).map(|_| rng.next() as u8).collect())
        .collect()
}
