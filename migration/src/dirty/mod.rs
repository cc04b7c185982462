//! Dirty-page tracking: sources → one GPA bitmap per region → coalesced ranges.
//!
//! Every [`DirtySource`] (KVM dirty log, KVM dirty ring, VMM-side writes, device DMA) ORs its bits
//! into the same [`DirtyBitmap`]; [`DirtyRanges`] then turns the union into `(first_page, npages)`
//! runs, so a page reported by two sources is still sent once per iteration.

mod bitmap;
mod guest_bitmap;
mod ranges;
mod source;
mod summary;
mod union;
mod vmm_writes;

pub use bitmap::{extract_bits, DirtyBitmap, DirtyBitmapError, PAGE_SHIFT, PAGE_SIZE};
pub use guest_bitmap::GuestPageBitmap;
pub use ranges::{coalesce, DirtyRanges, PageRun};
pub use source::{DirtySource, DirtySourceError, GpaRange, SourceKind};
pub use summary::{groups_visited, GROUP_WORDS};
pub use union::{claim_union, order_for_claims, ClaimUnionError};
pub use vmm_writes::{VmmWriteSource, VmmWriteSourceError};
