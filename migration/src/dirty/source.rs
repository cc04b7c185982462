//! The seam every dirty-page producer implements: KVM dirty log, KVM dirty ring, VMM-side writes,
//! device DMA logging, IOMMU hardware dirty tracking.
//!
//! # Contract (what the engine relies on)
//! Before iteration 0 (which sends every page) and at the start of every later iteration the
//! engine calls [`DirtySource::sync`] once, may call
//! [`DirtySource::peek`] to build a plan and an estimate, and then walks guest memory chunk by chunk
//! (e.g. 64 MiB), calling [`DirtySource::claim`] on every source for the chunk *right before* it
//! reads that chunk's pages. All sources OR into the same [`DirtyBitmap`], so a page reported by two
//! sources is sent once.
//!
//! - `claim` clears at the source exactly the bits it ORs into `out` (plus nothing it has not
//!   reported): a page written after its claim stays dirty at the source and is claimed again in a
//!   later iteration; a page written before is not sent twice.
//! - Ranges are page aligned and lie inside one guest memory region; a source translates its own
//!   address space (IOVA, slot offsets) to GPA and rounds coarse granules outward.
//! - On `Err`, a source must not have cleared bits it did not OR into `out`. The engine fails the
//!   migration on any source error (the source VM keeps running), so no bit is ever dropped.
//! - The final claim of the switchover runs with every vCPU and device stopped.
//!
//! No method has a default body: a source that cannot peek says so by returning `Ok(false)`.

use super::bitmap::{DirtyBitmap, DirtyBitmapError, PAGE_SIZE};
use vm_memory::GuestAddress;

/// Which kind of producer a source is; stats count dirty pages per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// KVM dirty log or dirty ring: writes by the vCPUs.
    Kvm,
    /// Writes by the VMM itself (device emulation) through vm-memory.
    Vmm,
    /// Writes by passthrough devices (IOMMU dirty tracking, VFIO DMA logging).
    Dma,
}

impl SourceKind {
    /// Claim order within one chunk: KVM's clear first, then device DMA, then VMM writes. A
    /// chunk's KVM bits are cleared before its DMA bits are read, and both before its pages are
    /// read, so any write after a source's claim stays dirty there for a later pass.
    pub fn claim_rank(self) -> u8 {
        match self {
            SourceKind::Kvm => 0,
            SourceKind::Dma => 1,
            SourceKind::Vmm => 2,
        }
    }

    /// Lowercase name used in stats and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Kvm => "kvm",
            SourceKind::Vmm => "vmm",
            SourceKind::Dma => "dma",
        }
    }
}

/// A page-aligned range of guest-physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpaRange {
    /// First GPA (page aligned).
    pub start: GuestAddress,
    /// Length in bytes (a multiple of the page size).
    pub len_bytes: u64,
}

impl GpaRange {
    /// A range of `len_bytes` from `start`.
    pub fn new(start: GuestAddress, len_bytes: u64) -> Self {
        GpaRange { start, len_bytes }
    }

    /// One past the last GPA (saturating).
    pub fn end(&self) -> u64 {
        self.start.0.saturating_add(self.len_bytes)
    }

    /// Pages covered, rounding a partial last page up.
    pub fn pages(&self) -> u64 {
        self.len_bytes.div_ceil(PAGE_SIZE)
    }

    /// The overlap with `[start, start + len)`, if any.
    pub fn intersect(&self, start: u64, len_bytes: u64) -> Option<GpaRange> {
        let lo = self.start.0.max(start);
        let hi = self.end().min(start.saturating_add(len_bytes));
        (lo < hi).then(|| GpaRange::new(GuestAddress(lo), hi - lo))
    }
}

/// Boxed cause from an implementation (ioctl errno, device error, …).
pub type SourceCause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of dirty sources; each names the operation, the source kind and the range.
#[derive(Debug, thiserror::Error)]
pub enum DirtySourceError {
    /// Enabling dirty tracking failed.
    #[error("{} source: start dirty tracking", kind.as_str())]
    Start {
        /// The source.
        kind: SourceKind,
        /// Why.
        #[source]
        source: SourceCause,
    },
    /// Disabling dirty tracking failed.
    #[error("{} source: stop dirty tracking", kind.as_str())]
    Stop {
        /// The source.
        kind: SourceKind,
        /// Why.
        #[source]
        source: SourceCause,
    },
    /// Fetching the source's dirty state failed.
    #[error("{} source: sync dirty state", kind.as_str())]
    Sync {
        /// The source.
        kind: SourceKind,
        /// Why.
        #[source]
        source: SourceCause,
    },
    /// Reading bits without clearing failed.
    #[error("{} source: peek {:#x}+{:#x}", kind.as_str(), range.start.0, range.len_bytes)]
    Peek {
        /// The source.
        kind: SourceKind,
        /// The requested range.
        range: GpaRange,
        /// Why.
        #[source]
        source: SourceCause,
    },
    /// Reading-and-clearing bits failed.
    #[error("{} source: claim {:#x}+{:#x}", kind.as_str(), range.start.0, range.len_bytes)]
    Claim {
        /// The source.
        kind: SourceKind,
        /// The requested range.
        range: GpaRange,
        /// Why.
        #[source]
        source: SourceCause,
    },
    /// `peek`/`claim` was called while tracking is off.
    #[error("{} source: not started", kind.as_str())]
    NotStarted {
        /// The source.
        kind: SourceKind,
    },
    /// The output bitmap does not cover the requested range.
    #[error("{} source: output bitmap does not cover {:#x}+{:#x}", kind.as_str(), range.start.0, range.len_bytes)]
    OutputBitmap {
        /// The source.
        kind: SourceKind,
        /// The requested range.
        range: GpaRange,
        /// The bitmap's complaint.
        #[source]
        source: DirtyBitmapError,
    },
}

/// One producer of dirty-page information for guest-physical memory. See the module docs for the
/// contract.
pub trait DirtySource: Send {
    /// What produces the bits (for per-source stats).
    fn kind(&self) -> SourceKind;
    /// Who produces them, for per-source stats and logs: e.g. `kvm-log`, `vmm`, or for DMA the
    /// tracking domain and its devices (`hwpt 3: edu0`), so an operator sees which device dirties
    /// memory.
    fn label(&self) -> &str;
    /// Start tracking; every write after this returns is reported.
    fn start(&mut self) -> Result<(), DirtySourceError>;
    /// Stop tracking (migration finished or failed).
    fn stop(&mut self) -> Result<(), DirtySourceError>;
    /// Fetch the current dirty state for the iteration that begins (e.g. KVM_GET_DIRTY_LOG without
    /// clearing under manual protect, or harvesting the dirty ring). Clears nothing the engine has
    /// not claimed.
    fn sync(&mut self) -> Result<(), DirtySourceError>;
    /// OR the bits known dirty in `range` into `out` without clearing. Returns `Ok(false)` when the
    /// source cannot peek (then the engine must claim every chunk).
    fn peek(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<bool, DirtySourceError>;
    /// OR the dirty bits of `range` into `out` and clear them at the source, right before the pages
    /// of `range` are read for sending.
    fn claim(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError>;
}

impl std::fmt::Debug for dyn DirtySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DirtySource({})", self.kind().as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpa_range_intersect_and_pages() {
        let r = GpaRange::new(GuestAddress(0x1000), 0x3000);
        assert_eq!(r.end(), 0x4000);
        assert_eq!(r.pages(), 3);
        assert_eq!(
            r.intersect(0x2000, 0x10_0000),
            Some(GpaRange::new(GuestAddress(0x2000), 0x2000))
        );
        assert_eq!(r.intersect(0x4000, 0x1000), None);
        assert_eq!(r.intersect(0, 0x1000), None);
    }

    #[test]
    fn source_errors_name_operation_and_range() {
        let e = DirtySourceError::Claim {
            kind: SourceKind::Dma,
            range: GpaRange::new(GuestAddress(0x4000_0000), 0x400_0000),
            source: "EIO".into(),
        };
        assert_eq!(e.to_string(), "dma source: claim 0x40000000+0x4000000");
    }
}
