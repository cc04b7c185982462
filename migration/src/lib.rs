//! tern's live-migration engine.
//!
//! What it does: tracks dirty guest pages from several producers (KVM, VMM writes, device DMA) as
//! one union bitmap, encodes a versioned, checksummed wire protocol, moves frames over TCP, Unix
//! sockets or (same host) memfds passed with SCM_RIGHTS, and runs the pre-copy loop with
//! convergence, timeout, bandwidth cap, auto-converge and cancel, publishing stats atomically.
//!
//! What it refuses to do: know anything about the VMM. A VM is seen only through the traits in
//! [`engine`] (`MigrationHost`, `MigrationTarget`) and [`dirty::DirtySource`]; vCPU, VM and device
//! state are opaque bytes. Its `unsafe` is three small layers, each allowed where it is: socket
//! options (`transport::sockopt`), `sendfile` (`transport::sendfile`) and guest memory lent as
//! byte slices (`guest_bytes`).
#![deny(unsafe_code)]

pub mod dirty;
pub mod engine;
mod guest_bytes;
pub mod protocol;
pub mod transport;
