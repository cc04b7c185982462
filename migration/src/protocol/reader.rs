//! Frame reader: header checks, CRC verification, and for memory frames whose data is outside the
//! CRC (unchecked, or with per-page sums) a streaming mode that leaves the page bytes in the stream
//! for the caller to read into guest memory.

use std::io::Read;

use super::codec::{
    read_full, ProtocolError, FLAG_DATA_UNCHECKED, FLAG_PAGE_SUMS, HEADER_BYTES, MAX_PAYLOAD_BYTES,
};
use super::page_sum::{decode_sums, page_sum, PAGE_SUM_BYTES};

/// Bytes of one data page.
const PAGE_BYTES: usize = crate::dirty::PAGE_SIZE as usize;
use super::frame::{Frame, FrameTag, MemoryEntry, PageEncoding, PayloadError};

/// How far the payload buffer grows ahead of the bytes received.
const GROW_STEP_BYTES: usize = 1 << 20;

/// Reads frames from a byte stream into a reused buffer.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    /// Wrap a connection (the preamble is read separately).
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
        }
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    fn read_header(&mut self) -> Result<Header, ProtocolError> {
        let mut h = [0u8; HEADER_BYTES];
        let got = read_full(&mut self.inner, &mut h, "frame header")?;
        if got == 0 {
            return Err(ProtocolError::Closed);
        }
        if got < HEADER_BYTES {
            return Err(ProtocolError::Truncated {
                what: "frame header",
                got,
                want: HEADER_BYTES,
            });
        }
        let tag = FrameTag::from_u8(h[0]).ok_or(ProtocolError::UnknownFrame { tag: h[0] })?;
        let frame = tag.name();
        let data = match h[1] {
            FLAG_DATA_UNCHECKED if tag == FrameTag::Memory => DataCheck::Unchecked,
            FLAG_PAGE_SUMS if tag == FrameTag::Memory => DataCheck::PageSums,
            _ => DataCheck::Crc,
        };
        let flags = if data == DataCheck::Crc { h[1] } else { 0 };
        let reserved = u32::from(flags) | u32::from(u16::from_le_bytes([h[2], h[3]])) << 8;
        if reserved != 0 {
            return Err(ProtocolError::Reserved {
                frame,
                value: reserved,
            });
        }
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        if len > MAX_PAYLOAD_BYTES {
            return Err(ProtocolError::TooLarge {
                frame,
                len,
                max: MAX_PAYLOAD_BYTES,
            });
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h[..8]);
        Ok(Header {
            tag,
            data,
            len,
            expected: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
            crc,
        })
    }

    /// Read `n` payload bytes at `at` of the reused buffer.
    fn read_payload(&mut self, at: usize, n: usize, want: usize) -> Result<(), ProtocolError> {
        let end = at + n;
        let mut pos = at;
        while pos < end {
            // Grow only: re-zeroing megabytes per frame would cost as much as the copy itself.
            // And grow with the bytes that arrive, a step at a time: a header alone (12 bytes)
            // must not make the receiver allocate and zero the 64 MiB it may announce.
            let upto = if self.buf.len() >= end {
                end
            } else {
                end.min(pos.max(self.buf.len()) + GROW_STEP_BYTES)
            };
            if self.buf.len() < upto {
                self.buf.resize(upto, 0);
            }
            let got = read_full(&mut self.inner, &mut self.buf[pos..upto], "frame payload")?;
            pos += got;
            if pos < upto {
                return Err(ProtocolError::Truncated {
                    what: "frame payload",
                    got: pos,
                    want,
                });
            }
        }
        Ok(())
    }

    /// For a memory frame whose data is outside the CRC: read and verify the entry table and the
    /// sums table (if the frame has one); returns where they and the data lie.
    fn read_memory_table(&mut self, h: &Header) -> Result<MemoryLayout, ProtocolError> {
        let frame = h.tag.name();
        let malformed = |source| ProtocolError::Malformed { frame, source };
        if h.len < 4 {
            return Err(malformed(PayloadError::Truncated {
                field: "entry count",
                need: 4,
                offset: 0,
                len: h.len,
            }));
        }
        self.read_payload(0, 4, h.len)?;
        let n = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        let table = n
            .checked_mul(super::frame::MEMORY_ENTRY_BYTES)
            .and_then(|b| b.checked_add(4))
            .filter(|&t| t <= h.len)
            .ok_or_else(|| {
                malformed(PayloadError::Truncated {
                    field: "memory entries",
                    need: n.saturating_mul(super::frame::MEMORY_ENTRY_BYTES),
                    offset: 4,
                    len: h.len,
                })
            })?;
        self.read_payload(4, table - 4, h.len)?;
        // With sums: the rest is 8 bytes of sum and 4096 bytes of data per data page.
        let (head, data_len) = match h.data {
            DataCheck::PageSums => {
                let per_page = PAGE_SUM_BYTES + PAGE_BYTES;
                let rest = h.len - table;
                if !rest.is_multiple_of(per_page) {
                    return Err(malformed(PayloadError::DataLength {
                        need: (rest / per_page * per_page) as u64,
                        have: rest,
                    }));
                }
                let pages = rest / per_page;
                self.read_payload(table, pages * PAGE_SUM_BYTES, h.len)?;
                (table + pages * PAGE_SUM_BYTES, pages * PAGE_BYTES)
            }
            _ => (table, h.len - table),
        };
        h.check(&self.buf[..head])?;
        Ok(MemoryLayout {
            table,
            head,
            data_len,
        })
    }

    /// Decodes the checked entry table (and sums) of a streaming memory frame.
    fn memory_stream(
        &self,
        h: &Header,
        at: &MemoryLayout,
    ) -> Result<(Vec<MemoryEntry>, Vec<u64>), ProtocolError> {
        let entries = super::frame::decode_memory_table(&self.buf[..at.table], at.data_len)
            .map_err(|source| ProtocolError::Malformed {
                frame: h.tag.name(),
                source,
            })?;
        Ok((entries, decode_sums(&self.buf[at.table..at.head])))
    }

    /// Reads a whole payload that the frame CRC covers and checks it.
    fn read_checked_payload(&mut self, h: Header) -> Result<(), ProtocolError> {
        self.read_payload(0, h.len, h.len)?;
        h.check(&self.buf[..h.len])
    }

    /// Read, check and decode the next frame, with any memory data in the reader's buffer.
    /// [`ProtocolError::Closed`] means a clean end of stream between frames.
    pub fn recv(&mut self) -> Result<Frame<'_>, ProtocolError> {
        let h = self.read_header()?;
        let frame = h.tag.name();
        if h.data == DataCheck::PageSums {
            // Buffered: check every page here, then close the gap the sums leave so that the
            // frame decodes as entries + data.
            let at = self.read_memory_table(&h)?;
            self.read_payload(at.head, at.data_len, h.len)?;
            let (entries, sums) = self.memory_stream(&h, &at)?;
            let mut off = at.head;
            let mut sum = sums.iter();
            for e in entries.iter().filter(|e| e.encoding == PageEncoding::Data) {
                for p in 0..u64::from(e.npages) {
                    let page = &self.buf[off..off + PAGE_BYTES];
                    if sum.next() != Some(&page_sum(page)) {
                        return Err(ProtocolError::PageSum {
                            gpa: e.gpa.0 + p * PAGE_BYTES as u64,
                        });
                    }
                    off += PAGE_BYTES;
                }
            }
            self.buf
                .copy_within(at.head..at.head + at.data_len, at.table);
            return Frame::decode(h.tag, &self.buf[..at.table + at.data_len])
                .map_err(|source| ProtocolError::Malformed { frame, source });
        }
        let (tag, len) = (h.tag, h.len);
        if h.data == DataCheck::Unchecked {
            let at = self.read_memory_table(&h)?;
            self.read_payload(at.head, at.data_len, h.len)?;
        } else {
            self.read_checked_payload(h)?;
        }
        Frame::decode(tag, &self.buf[..len])
            .map_err(|source| ProtocolError::Malformed { frame, source })
    }

    /// Like [`FrameReader::recv`], but an unchecked memory frame is returned as
    /// [`Received::MemoryStream`] with its page data still in the stream: the caller must then
    /// read exactly the `Data` entries' bytes, in order, from [`FrameReader::get_mut`].
    pub fn recv_streaming(&mut self) -> Result<Received<'_>, ProtocolError> {
        let h = self.read_header()?;
        if h.data == DataCheck::Crc {
            let (frame, tag, len) = (h.tag.name(), h.tag, h.len);
            self.read_checked_payload(h)?;
            return Frame::decode(tag, &self.buf[..len])
                .map(Received::Frame)
                .map_err(|source| ProtocolError::Malformed { frame, source });
        }
        let at = self.read_memory_table(&h)?;
        let (entries, sums) = self.memory_stream(&h, &at)?;
        Ok(match h.data {
            DataCheck::PageSums => Received::MemoryStreamSummed(entries, sums),
            _ => Received::MemoryStream(entries),
        })
    }
}

/// What covers a frame's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataCheck {
    /// The frame CRC covers the whole payload.
    Crc,
    /// Memory frame: nothing covers the data.
    Unchecked,
    /// Memory frame: a per-page sums table (inside the CRC) covers each data page.
    PageSums,
}

#[derive(Debug)]
struct Header {
    tag: FrameTag,
    data: DataCheck,
    len: usize,
    expected: u32,
    crc: crc32fast::Hasher,
}

impl Header {
    /// Checks the CRC over the header and `covered`, the part of the payload it covers.
    fn check(&self, covered: &[u8]) -> Result<(), ProtocolError> {
        let mut crc = self.crc.clone();
        crc.update(covered);
        let actual = crc.finalize();
        if actual != self.expected {
            return Err(ProtocolError::Checksum {
                frame: self.tag.name(),
                expected: self.expected,
                actual,
            });
        }
        Ok(())
    }
}

/// Where the parts of a memory frame whose data is outside the CRC lie in its payload: the entry
/// table in `[0, table)`, the sums (if any) in `[table, head)`, then `data_len` data bytes.
struct MemoryLayout {
    table: usize,
    head: usize,
    data_len: usize,
}

/// What [`FrameReader::recv_streaming`] returns.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'a> {
    /// A fully read and checked frame.
    Frame(Frame<'a>),
    /// An unchecked memory frame's (checked) entry table; the `Data` entries' bytes follow in
    /// the stream.
    MemoryStream(Vec<MemoryEntry>),
    /// A memory frame's (checked) entry table and per-data-page sums, in entry order; the `Data`
    /// entries' bytes follow in the stream, each page to be checked against its sum.
    MemoryStreamSummed(Vec<MemoryEntry>, Vec<u64>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Frame, FrameWriter};

    /// Found by the migration_stream fuzz target: a 12-byte header announcing a 64 MiB payload
    /// made the reader allocate and zero 64 MiB before reading any of it. The buffer now grows
    /// with the bytes that arrive.
    #[test]
    fn a_header_alone_does_not_allocate_its_announced_length() {
        for tag in [2u8, 3] {
            let mut h = vec![tag, 0, 0, 0];
            h.extend_from_slice(&(MAX_PAYLOAD_BYTES as u32).to_le_bytes());
            h.extend_from_slice(&[0; 4]);
            h.extend_from_slice(&[0xab; 100]);
            let mut r = FrameReader::new(&h[..]);
            assert!(matches!(
                r.recv(),
                Err(ProtocolError::Truncated { got: 100, .. })
            ));
            assert!(r.buf.len() <= GROW_STEP_BYTES, "{}", r.buf.len());
            let mut r = FrameReader::new(&h[..]);
            assert!(r.recv_streaming().is_err());
            assert!(r.buf.len() <= GROW_STEP_BYTES, "{}", r.buf.len());
        }
    }

    #[test]
    fn payloads_larger_than_a_grow_step_still_arrive_whole() {
        let blob: Vec<u8> = (0..3 * GROW_STEP_BYTES + 7).map(|i| i as u8).collect();
        let mut w = FrameWriter::new(Vec::new());
        w.send(&Frame::VmState(&blob)).expect("encode");
        w.send(&Frame::Config(b"{}")).expect("encode");
        let bytes = w.get_mut().clone();
        let mut r = FrameReader::new(&bytes[..]);
        assert_eq!(r.recv().expect("big frame"), Frame::VmState(&blob));
        assert_eq!(r.recv().expect("small frame"), Frame::Config(b"{}"));
        // Cut inside the third step: the error counts the bytes that did arrive.
        let cut = HEADER_BYTES + 2 * GROW_STEP_BYTES + 5;
        let mut r = FrameReader::new(&bytes[..cut]);
        match r.recv() {
            Err(ProtocolError::Truncated { got, want, .. }) => {
                assert_eq!((got, want), (cut - HEADER_BYTES, blob.len()));
            }
            other => panic!("{other:?}"),
        }
    }
}
