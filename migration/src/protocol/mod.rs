//! The tern migration wire protocol, version 4.
//!
//! Every connection opens with a 12-byte preamble in *both* directions (`b"TERNMIG\0"` + `u32`
//! version), so each side rejects a peer of another version before any frame. Then frames:
//! `[tag u8][flags u8 = 0][reserved u16 = 0][len u32][crc32 u32][payload; len]`, little endian,
//! CRC-32 over the first 8 header bytes and the payload, payload ≤ 64 MiB. Page data and state
//! blobs travel as raw bytes (no JSON-in-JSON, no base64). Zero pages travel as markers. Memory
//! frames may carry flag [`FLAG_DATA_UNCHECKED`]: the CRC then covers header and entry table only,
//! and page bytes move between guest memory and the socket without a copy.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source
//!     participant D as destination
//!     S->>D: preamble (magic, version)
//!     D->>S: preamble (magic, version)
//!     S->>D: Hello(session, index 0, connections N, local)
//!     opt connections > 1 (index 1..N, memory only)
//!         S->>D: preamble + Hello(session, index i)
//!     end
//!     opt local mode (Unix socket, same host)
//!         S->>D: MemoryFd(gpa, len, offset) + memfd via SCM_RIGHTS, per region
//!     end
//!     S->>D: Config(bytes): D builds the VM (on the memfds in local mode)
//!     D->>S: Ack (VM built: the source never pauses before this)
//!     opt the source knows which memory it has populated (not in local mode)
//!         S->>D: Populated(entries): D allocates those pages while they are on the way
//!     end
//!     loop pre-copy iterations (not in local mode)
//!         S->>D: Memory(entries: Data | Zero, page bytes), chunk i on connection i mod M
//!         S->>D: DeviceData(id, bytes)… of devices in PRE_COPY
//!         S->>D: DeviceMark(id, InitialSent) once a device's initial bytes are out
//!         D->>S: DeviceLoaded(id) once it loaded them (switchover-ack)
//!     end
//!     Note over S: pause vCPUs, devices (P2P, STOP_COPY), final claim of every source
//!     S->>D: Memory(last dirty pages)
//!     S->>D: DeviceData(id, bytes)… to the end of each device's stream, DeviceMark(id, End)
//!     S->>D: StreamEnd on each extra connection
//!     S->>D: VmState, VcpuState(id)…, DeviceState(id)…
//!     S->>D: Complete
//!     Note over D: join data connections, restore state (not running)
//!     D->>S: Ready (this side can run the VM, and will only on Commit)
//!     Note over S: the commit point: never resumes on its own from here
//!     S->>D: Commit
//!     Note over D: devices RUNNING, vCPUs start
//!     D->>S: Ack (guest running here)
//!     Note over S: report completed (the VMM exits)
//!     Note over S,D: link lost after Ready: a side that cannot know whether the other runs<br/>keeps its VM paused (in_doubt) until the operator resumes one side
//!     Note over S,D: at any point either side may send Error(reason) and close;<br/>the source then resumes its VM, the destination drops its VM
//! ```
//!
//! A page is always sent on the connection that owns its chunk (`chunk index mod M`), so a newer
//! copy of a page can never overtake an older one on another connection. With devices whose
//! state migrates and N > 1 connections, the last connection carries only their frames (in order,
//! one device stream never split across connections) and memory uses M = N - 1; otherwise M = N
//! and device frames follow memory on connection 0. Device data travels in pieces of at most
//! 1 MiB with no limit on a device's total.

mod codec;
mod frame;
pub mod page_sum;
mod reader;

pub use codec::{
    encode_frame, encode_memory_head, preamble, read_preamble, write_preamble, FrameWriter,
    ProtocolError, FLAG_DATA_UNCHECKED, FLAG_PAGE_SUMS, HEADER_BYTES, MAGIC, MAX_PAYLOAD_BYTES,
    PREAMBLE_BYTES, VERSION,
};
pub use frame::{
    decode_memory_table, encode_memory_entries, DeviceMark, Frame, FrameTag, Hello, MemoryEntry,
    MemoryFdInfo, PageEncoding, PayloadError, MAX_CONNECTIONS, MEMORY_ENTRY_BYTES,
};
pub use reader::{FrameReader, Received};
