//! Typed frames and their payload encoding (version 4). Frames borrow their byte payloads from the
//! codec's buffer, so page data and state blobs are never copied between the socket and the guest.

use vm_memory::GuestAddress;

use crate::dirty::PAGE_SIZE;

/// Frame type tags on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameTag {
    /// [`Frame::Hello`].
    Hello = 1,
    /// [`Frame::Config`].
    Config = 2,
    /// [`Frame::Memory`].
    Memory = 3,
    /// [`Frame::MemoryFd`].
    MemoryFd = 4,
    /// [`Frame::VcpuState`].
    VcpuState = 5,
    /// [`Frame::VmState`].
    VmState = 6,
    /// [`Frame::DeviceState`].
    DeviceState = 7,
    /// [`Frame::Complete`].
    Complete = 8,
    /// [`Frame::Ack`].
    Ack = 9,
    /// [`Frame::Error`].
    Error = 10,
    /// [`Frame::StreamEnd`].
    StreamEnd = 11,
    /// [`Frame::DeviceData`].
    DeviceData = 12,
    /// [`Frame::DeviceMark`].
    DeviceMark = 13,
    /// [`Frame::DeviceLoaded`].
    DeviceLoaded = 14,
    /// [`Frame::Ready`].
    Ready = 15,
    /// [`Frame::Commit`].
    Commit = 16,
    /// [`Frame::HandoverFd`].
    HandoverFd = 17,
    /// [`Frame::Populated`].
    Populated = 18,
}

impl FrameTag {
    /// The tag for a wire byte, if known.
    pub fn from_u8(b: u8) -> Option<FrameTag> {
        use FrameTag::*;
        Some(match b {
            1 => Hello,
            2 => Config,
            3 => Memory,
            4 => MemoryFd,
            5 => VcpuState,
            6 => VmState,
            7 => DeviceState,
            8 => Complete,
            9 => Ack,
            10 => Error,
            11 => StreamEnd,
            12 => DeviceData,
            13 => DeviceMark,
            14 => DeviceLoaded,
            15 => Ready,
            16 => Commit,
            17 => HandoverFd,
            18 => Populated,
            _ => return None,
        })
    }

    /// Lowercase name for errors and logs.
    pub fn name(self) -> &'static str {
        use FrameTag::*;
        match self {
            Hello => "hello",
            Config => "config",
            Memory => "memory",
            MemoryFd => "memory-fd",
            VcpuState => "vcpu-state",
            VmState => "vm-state",
            DeviceState => "device-state",
            Complete => "complete",
            Ack => "ack",
            Error => "error",
            StreamEnd => "stream-end",
            DeviceData => "device-data",
            DeviceMark => "device-mark",
            DeviceLoaded => "device-loaded",
            Ready => "ready",
            Commit => "commit",
            HandoverFd => "handover-fd",
            Populated => "populated",
        }
    }
}

/// How a memory entry's pages travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageEncoding {
    /// `npages * 4096` bytes follow in the frame's data section.
    Data,
    /// The pages are all zero (or were never populated); no bytes follow.
    Zero,
}

/// `npages` pages from `gpa`, as data or as a zero marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEntry {
    /// First GPA (page aligned).
    pub gpa: GuestAddress,
    /// Number of pages (≥ 1).
    pub npages: u32,
    /// Data or zero marker.
    pub encoding: PageEncoding,
}

impl MemoryEntry {
    /// Bytes of guest memory the entry covers.
    pub fn len_bytes(&self) -> u64 {
        u64::from(self.npages) * PAGE_SIZE
    }

    /// Bytes the entry contributes to the data section.
    pub fn data_bytes(&self) -> u64 {
        match self.encoding {
            PageEncoding::Data => self.len_bytes(),
            PageEncoding::Zero => 0,
        }
    }
}

/// Most connections one migration may use: Cloud Hypervisor's limit (`connections` of its
/// `vm.send-migration` is 1 to 128), which the API accepts too. A receiver must not wait for (and
/// hold a slot per) tens of thousands a hello announces.
pub const MAX_CONNECTIONS: u16 = 128;

/// Per-connection greeting from the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Random id tying the parallel connections of one migration together.
    pub session: u64,
    /// This connection's index; 0 is the control connection.
    pub connection_index: u16,
    /// Total connections of the session.
    pub connections: u16,
    /// Guest memory is handed over as file descriptors (same host).
    pub local: bool,
}

/// One guest memory region handed over as a file descriptor (local mode). The fd itself travels
/// as SCM_RIGHTS ancillary data on the same message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFdInfo {
    /// Region base GPA.
    pub gpa: GuestAddress,
    /// Region length in bytes.
    pub len_bytes: u64,
    /// Offset of the region in the file.
    pub file_offset: u64,
}

/// A point in one device's data stream ([`Frame::DeviceMark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DeviceMark {
    /// Every byte of the device's initial pre-copy data is before this mark: once it has loaded
    /// them the destination answers [`Frame::DeviceLoaded`] (QEMU's switchover-ack).
    InitialSent = 1,
    /// The device's stream is complete (its STOP_COPY data ended).
    End = 2,
}

/// A protocol frame. Byte payloads borrow from the reader's buffer or the sender's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Opens every connection.
    Hello(Hello),
    /// Opaque VM configuration from the host; the receiver builds its VM from it.
    Config(&'a [u8]),
    /// Guest pages: entries in order, `data` holds the `Data` entries' bytes back to back.
    Memory {
        /// The ranges.
        entries: Vec<MemoryEntry>,
        /// Page bytes of the `Data` entries, in entry order.
        data: &'a [u8],
    },
    /// Local mode: a memory region as an fd (SCM_RIGHTS).
    MemoryFd(MemoryFdInfo),
    /// Source to destination, before the first pass: the guest memory the source has populated
    /// (`Data` entries), which that pass will send as data; the destination may allocate it
    /// while the data is on the way. A hint: the pages still come in memory frames.
    Populated(Vec<MemoryEntry>),
    /// One vCPU's opaque state.
    VcpuState {
        /// vCPU index.
        id: u32,
        /// Opaque state.
        bytes: &'a [u8],
    },
    /// VM-wide opaque state.
    VmState(&'a [u8]),
    /// One device's opaque state.
    DeviceState {
        /// Device id.
        id: &'a str,
        /// Opaque state.
        bytes: &'a [u8],
    },
    /// The source has sent everything.
    Complete,
    /// Destination to source: everything arrived and is restored; this side can run the VM and
    /// will, on [`Frame::Commit`] (and only then).
    Ready,
    /// Source to destination: the source stopped for good; run the VM.
    Commit,
    /// The destination built its VM (after Config) or started it (after Commit).
    Ack,
    /// Either side gives up; the text says why.
    Error(&'a str),
    /// A data connection has no more frames.
    StreamEnd,
    /// The next piece of a device's migration data stream (VFIO migration v2), in order.
    DeviceData {
        /// Device id.
        id: &'a str,
        /// Stream bytes.
        bytes: &'a [u8],
    },
    /// A point in a device's data stream.
    DeviceMark {
        /// Device id.
        id: &'a str,
        /// Which point.
        mark: DeviceMark,
    },
    /// Destination to source: the device loaded its initial pre-copy data.
    DeviceLoaded {
        /// Device id.
        id: &'a str,
    },
    /// Local mode (live update): one file descriptor the source hands over with its device
    /// (SCM_RIGHTS); the opaque VMM bytes say what it is.
    HandoverFd(&'a [u8]),
}

impl<'a> Frame<'a> {
    /// The device id a device frame names.
    pub fn device_id(&self) -> Option<&'a str> {
        match *self {
            Frame::DeviceState { id, .. }
            | Frame::DeviceData { id, .. }
            | Frame::DeviceMark { id, .. }
            | Frame::DeviceLoaded { id } => Some(id),
            _ => None,
        }
    }
}

fn encode_id(id: &str, head: &mut Vec<u8>) {
    // Ids are short names; the codec rejects longer ones before encoding.
    let n = u16::try_from(id.len()).unwrap_or(u16::MAX);
    head.extend_from_slice(&n.to_le_bytes());
    head.extend_from_slice(&id.as_bytes()[..usize::from(n)]);
}

fn decode_id<'a>(c: &mut Cursor<'a>) -> Result<&'a str, PayloadError> {
    let n = usize::from(c.u16("device id length")?);
    std::str::from_utf8(c.take(n, "device id")?)
        .map_err(|_| PayloadError::Utf8 { field: "device id" })
}

/// Payload-level problems; the codec wraps them with the frame tag.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    /// The payload ends before a field.
    #[error("payload truncated: {field} needs {need} bytes at offset {offset}, payload has {len}")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Where.
        offset: usize,
        /// Payload length.
        len: usize,
    },
    /// Bytes left over after the last field.
    #[error("payload has {extra} trailing bytes")]
    Trailing {
        /// How many.
        extra: usize,
    },
    /// A field value is invalid.
    #[error("invalid {field}: {value:#x}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A text field is not UTF-8.
    #[error("{field} is not valid utf-8")]
    Utf8 {
        /// The field.
        field: &'static str,
    },
    /// Entry sizes and the data section disagree.
    #[error("memory data section has {have} bytes, entries need {need}")]
    DataLength {
        /// Bytes the entries need.
        need: u64,
        /// Bytes present.
        have: usize,
    },
    /// A payload exceeds the frame size limit.
    #[error("payload of {len} bytes exceeds the {max}-byte frame limit")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Limit.
        max: usize,
    },
}

/// Little-endian cursor over a payload; every read is bounds-checked.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], PayloadError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(PayloadError::Truncated {
            field,
            need: n,
            offset: self.pos,
            len: self.buf.len(),
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], PayloadError> {
        let s = self.take(N, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self, f: &'static str) -> Result<u8, PayloadError> {
        Ok(self.array::<1>(f)?[0])
    }
    fn u16(&mut self, f: &'static str) -> Result<u16, PayloadError> {
        Ok(u16::from_le_bytes(self.array(f)?))
    }
    fn u32(&mut self, f: &'static str) -> Result<u32, PayloadError> {
        Ok(u32::from_le_bytes(self.array(f)?))
    }
    fn u64(&mut self, f: &'static str) -> Result<u64, PayloadError> {
        Ok(u64::from_le_bytes(self.array(f)?))
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
    fn finish(&self) -> Result<(), PayloadError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            extra => Err(PayloadError::Trailing { extra }),
        }
    }
}

/// Bytes of one encoded memory entry.
pub const MEMORY_ENTRY_BYTES: usize = 16;

fn check_aligned_gpa(gpa: u64, len: u64) -> Result<(), PayloadError> {
    if !gpa.is_multiple_of(PAGE_SIZE) {
        return Err(PayloadError::Invalid {
            field: "gpa alignment",
            value: gpa,
        });
    }
    if gpa.checked_add(len).is_none() {
        return Err(PayloadError::Invalid {
            field: "gpa range end",
            value: gpa,
        });
    }
    Ok(())
}

/// Append the encoded entry table of a memory frame (`u32` count, then 16 bytes per entry).
pub fn encode_memory_entries(entries: &[MemoryEntry], out: &mut Vec<u8>) {
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.gpa.0.to_le_bytes());
        out.extend_from_slice(&e.npages.to_le_bytes());
        out.push(match e.encoding {
            PageEncoding::Data => 0,
            PageEncoding::Zero => 1,
        });
        out.extend_from_slice(&[0; 3]);
    }
}

/// Parse a memory frame's entry table; returns the entries and the data bytes they need.
fn decode_entries(c: &mut Cursor<'_>) -> Result<(Vec<MemoryEntry>, u64), PayloadError> {
    let n = c.u32("entry count")? as usize;
    // Bound the allocation by what the payload can hold before trusting `n`.
    if n > (c.buf.len() - c.pos) / MEMORY_ENTRY_BYTES {
        return Err(PayloadError::Truncated {
            field: "memory entries",
            need: n.saturating_mul(MEMORY_ENTRY_BYTES),
            offset: c.pos,
            len: c.buf.len(),
        });
    }
    let mut entries = Vec::with_capacity(n);
    let mut need: u64 = 0;
    for _ in 0..n {
        let gpa = c.u64("entry gpa")?;
        let npages = c.u32("entry pages")?;
        let kind = c.u8("entry kind")?;
        let pad = c.array::<3>("entry padding")?;
        if npages == 0 {
            return Err(PayloadError::Invalid {
                field: "entry pages",
                value: 0,
            });
        }
        if pad != [0; 3] {
            return Err(PayloadError::Invalid {
                field: "entry padding",
                value: u64::from(u32::from_le_bytes([pad[0], pad[1], pad[2], 0])),
            });
        }
        let encoding = match kind {
            0 => PageEncoding::Data,
            1 => PageEncoding::Zero,
            k => {
                return Err(PayloadError::Invalid {
                    field: "entry kind",
                    value: u64::from(k),
                })
            }
        };
        let e = MemoryEntry {
            gpa: GuestAddress(gpa),
            npages,
            encoding,
        };
        check_aligned_gpa(gpa, e.len_bytes())?;
        // Up to 2^22 entries of 2^44 bytes each can pass u64: refuse, never wrap.
        need = need
            .checked_add(e.data_bytes())
            .ok_or(PayloadError::Invalid {
                field: "entry data length",
                value: need,
            })?;
        entries.push(e);
    }
    Ok((entries, need))
}

/// Parse the entry table of a memory frame whose data section (`data_len` bytes, not in `table`)
/// follows unchecked in the stream.
pub fn decode_memory_table(
    table: &[u8],
    data_len: usize,
) -> Result<Vec<MemoryEntry>, PayloadError> {
    let mut c = Cursor { buf: table, pos: 0 };
    let (entries, need) = decode_entries(&mut c)?;
    c.finish()?;
    if need != data_len as u64 {
        return Err(PayloadError::DataLength {
            need,
            have: data_len,
        });
    }
    Ok(entries)
}

impl<'a> Frame<'a> {
    /// The wire tag.
    pub fn tag(&self) -> FrameTag {
        match self {
            Frame::Hello(_) => FrameTag::Hello,
            Frame::Config(_) => FrameTag::Config,
            Frame::Memory { .. } => FrameTag::Memory,
            Frame::MemoryFd(_) => FrameTag::MemoryFd,
            Frame::Populated(_) => FrameTag::Populated,
            Frame::VcpuState { .. } => FrameTag::VcpuState,
            Frame::VmState(_) => FrameTag::VmState,
            Frame::DeviceState { .. } => FrameTag::DeviceState,
            Frame::Complete => FrameTag::Complete,
            Frame::Ready => FrameTag::Ready,
            Frame::Commit => FrameTag::Commit,
            Frame::HandoverFd(_) => FrameTag::HandoverFd,
            Frame::Ack => FrameTag::Ack,
            Frame::Error(_) => FrameTag::Error,
            Frame::StreamEnd => FrameTag::StreamEnd,
            Frame::DeviceData { .. } => FrameTag::DeviceData,
            Frame::DeviceMark { .. } => FrameTag::DeviceMark,
            Frame::DeviceLoaded { .. } => FrameTag::DeviceLoaded,
        }
    }

    /// Encode the payload into `head`; a trailing borrowed blob that should be written without
    /// copying is returned separately (page data, state bytes).
    pub fn encode_payload(&self, head: &mut Vec<u8>) -> &'a [u8] {
        match *self {
            Frame::Hello(h) => {
                head.extend_from_slice(&h.session.to_le_bytes());
                head.extend_from_slice(&h.connection_index.to_le_bytes());
                head.extend_from_slice(&h.connections.to_le_bytes());
                head.extend_from_slice(&u32::from(h.local).to_le_bytes());
                &[]
            }
            Frame::Config(b) | Frame::VmState(b) | Frame::HandoverFd(b) => b,
            Frame::Memory { ref entries, data } => {
                encode_memory_entries(entries, head);
                data
            }
            Frame::Populated(ref entries) => {
                encode_memory_entries(entries, head);
                &[]
            }
            Frame::MemoryFd(m) => {
                head.extend_from_slice(&m.gpa.0.to_le_bytes());
                head.extend_from_slice(&m.len_bytes.to_le_bytes());
                head.extend_from_slice(&m.file_offset.to_le_bytes());
                &[]
            }
            Frame::VcpuState { id, bytes } => {
                head.extend_from_slice(&id.to_le_bytes());
                bytes
            }
            Frame::DeviceState { id, bytes } | Frame::DeviceData { id, bytes } => {
                encode_id(id, head);
                bytes
            }
            Frame::DeviceMark { id, mark } => {
                encode_id(id, head);
                head.push(mark as u8);
                &[]
            }
            Frame::DeviceLoaded { id } => {
                encode_id(id, head);
                &[]
            }
            Frame::Error(text) => text.as_bytes(),
            Frame::Complete | Frame::Ack | Frame::StreamEnd | Frame::Ready | Frame::Commit => &[],
        }
    }

    /// Decode a payload of type `tag`.
    pub fn decode(tag: FrameTag, payload: &'a [u8]) -> Result<Frame<'a>, PayloadError> {
        let mut c = Cursor {
            buf: payload,
            pos: 0,
        };
        let frame = match tag {
            FrameTag::Hello => {
                let session = c.u64("session")?;
                let connection_index = c.u16("connection index")?;
                let connections = c.u16("connections")?;
                let flags = c.u32("flags")?;
                if flags > 1 {
                    return Err(PayloadError::Invalid {
                        field: "hello flags",
                        value: u64::from(flags),
                    });
                }
                if connections == 0 || connections > MAX_CONNECTIONS {
                    return Err(PayloadError::Invalid {
                        field: "connections",
                        value: u64::from(connections),
                    });
                }
                if connection_index >= connections {
                    return Err(PayloadError::Invalid {
                        field: "connection index",
                        value: u64::from(connection_index),
                    });
                }
                Frame::Hello(Hello {
                    session,
                    connection_index,
                    connections,
                    local: flags == 1,
                })
            }
            FrameTag::Config => Frame::Config(c.rest()),
            FrameTag::VmState => Frame::VmState(c.rest()),
            FrameTag::Memory => {
                let (entries, need) = decode_entries(&mut c)?;
                let data = c.rest();
                if need != data.len() as u64 {
                    return Err(PayloadError::DataLength {
                        need,
                        have: data.len(),
                    });
                }
                Frame::Memory { entries, data }
            }
            FrameTag::Populated => {
                let (entries, _) = decode_entries(&mut c)?;
                if entries.iter().any(|e| e.encoding != PageEncoding::Data) {
                    return Err(PayloadError::Invalid {
                        field: "populated entry kind",
                        value: 1,
                    });
                }
                Frame::Populated(entries)
            }
            FrameTag::MemoryFd => {
                let gpa = c.u64("region gpa")?;
                let len_bytes = c.u64("region length")?;
                let file_offset = c.u64("file offset")?;
                check_aligned_gpa(gpa, len_bytes)?;
                if len_bytes == 0 {
                    return Err(PayloadError::Invalid {
                        field: "region length",
                        value: 0,
                    });
                }
                Frame::MemoryFd(MemoryFdInfo {
                    gpa: GuestAddress(gpa),
                    len_bytes,
                    file_offset,
                })
            }
            FrameTag::VcpuState => {
                let id = c.u32("vcpu id")?;
                Frame::VcpuState {
                    id,
                    bytes: c.rest(),
                }
            }
            FrameTag::DeviceState => Frame::DeviceState {
                id: decode_id(&mut c)?,
                bytes: c.rest(),
            },
            FrameTag::DeviceData => Frame::DeviceData {
                id: decode_id(&mut c)?,
                bytes: c.rest(),
            },
            FrameTag::DeviceMark => {
                let id = decode_id(&mut c)?;
                let mark = match c.u8("device mark")? {
                    1 => DeviceMark::InitialSent,
                    2 => DeviceMark::End,
                    m => {
                        return Err(PayloadError::Invalid {
                            field: "device mark",
                            value: u64::from(m),
                        })
                    }
                };
                Frame::DeviceMark { id, mark }
            }
            FrameTag::DeviceLoaded => Frame::DeviceLoaded {
                id: decode_id(&mut c)?,
            },
            FrameTag::Error => {
                Frame::Error(
                    std::str::from_utf8(c.rest()).map_err(|_| PayloadError::Utf8 {
                        field: "error text",
                    })?,
                )
            }
            FrameTag::Complete => Frame::Complete,
            FrameTag::Ready => Frame::Ready,
            FrameTag::Commit => Frame::Commit,
            FrameTag::HandoverFd => Frame::HandoverFd(c.rest()),
            FrameTag::Ack => Frame::Ack,
            FrameTag::StreamEnd => Frame::StreamEnd,
        };
        c.finish()?;
        Ok(frame)
    }
}
