//! Device DMA as migration dirty sources: one [`tern_migration::dirty::DirtySource`] per tracking
//! domain (a HWPT, a device's DMA logger, a type1 container), reading the kernel's bits for the
//! guest RAM mapped there (IOVA = GPA) into the engine's union bitmap. [`method`] chooses which
//! interface a device uses.
//!
//! Every source keeps its own enable state: the kernel answers `IOMMU_HWPT_GET_DIRTY_BITMAP` with
//! success even when tracking is off (6.12), so a read outside start/stop is refused here.

pub mod domain;
pub mod hwpt;
pub mod logging;
pub mod method;
pub mod type1;

use tern_migration::dirty::{DirtyBitmap, DirtySourceError, GpaRange, SourceKind, PAGE_SIZE};

/// The granule every DMA source reads at: the engine's page.
pub const DIRTY_PAGE_SIZE: u64 = PAGE_SIZE;

/// One DMA-mapped range: IOVA = GPA, `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedRange {
    pub iova: u64,
    pub len: u64,
}

impl MappedRange {
    /// The ranges of a backend's DMA mappings (`Type1Dma::mapped`, `IommufdSpace::mapped`).
    pub fn from_mappings(mappings: &[(crate::sys::iova::Iova, usize)]) -> Vec<MappedRange> {
        mappings
            .iter()
            .map(|&(iova, len)| MappedRange {
                iova: iova.raw(),
                len: len as u64,
            })
            .collect()
    }
}

/// The parts of `range` that lie in mapped DMA ranges, page aligned (IOVA = GPA).
pub fn mapped_parts(mapped: &[MappedRange], range: GpaRange) -> Vec<GpaRange> {
    mapped
        .iter()
        .filter_map(|m| range.intersect(m.iova, m.len))
        .collect()
}

/// OR a kernel bitmap whose bit 0 is page `part.start` into `out`.
pub fn or_kernel_bits(
    out: &mut DirtyBitmap,
    part: GpaRange,
    words: &[u64],
    range: GpaRange,
) -> Result<(), DirtySourceError> {
    let bad = |source| DirtySourceError::OutputBitmap {
        kind: SourceKind::Dma,
        range,
        source,
    };
    let first = out.page_of(part.start).map_err(bad)?;
    out.or_words(first, words).map_err(bad)
}

/// A DMA source's start failed.
pub fn start_failed(e: impl std::error::Error + Send + Sync + 'static) -> DirtySourceError {
    DirtySourceError::Start {
        kind: SourceKind::Dma,
        source: Box::new(e),
    }
}

/// A DMA source's stop failed.
pub fn stop_failed(e: impl std::error::Error + Send + Sync + 'static) -> DirtySourceError {
    DirtySourceError::Stop {
        kind: SourceKind::Dma,
        source: Box::new(e),
    }
}

/// A DMA source's claim of `range` failed.
pub fn claim_failed(
    range: GpaRange,
    e: impl std::error::Error + Send + Sync + 'static,
) -> DirtySourceError {
    DirtySourceError::Claim {
        kind: SourceKind::Dma,
        range,
        source: Box::new(e),
    }
}

/// Words needed for one bit per page of `len` bytes.
pub fn words_for(len: u64) -> usize {
    usize::try_from(len.div_ceil(DIRTY_PAGE_SIZE).div_ceil(64)).unwrap_or(usize::MAX)
}
