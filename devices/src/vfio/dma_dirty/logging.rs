//! Device DMA logging (`VFIO_DEVICE_FEATURE_DMA_LOGGING_START/REPORT/STOP`): the device's own
//! tracker over the IOVA ranges tern maps. REPORT clears what it reports, so this source cannot
//! peek; the device may choose a coarser granule than asked, which is widened to whole engine
//! pages (over-report, never under-report).

use std::sync::Arc;

use tern_migration::dirty::{DirtyBitmap, DirtySource, DirtySourceError, GpaRange, SourceKind};
use vfio_ioctls::{DmaLoggingRange, VfioDevice};
use vm_memory::GuestAddress;

use super::{
    claim_failed, mapped_parts, or_kernel_bits, start_failed, stop_failed, MappedRange,
    DIRTY_PAGE_SIZE,
};

/// One device's DMA log.
pub struct DmaLoggingSource {
    device: Arc<VfioDevice>,
    mapped: Vec<MappedRange>,
    label: String,
    /// The granule the device agreed to, once started.
    page_size: Option<u64>,
}

impl std::fmt::Debug for DmaLoggingSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaLoggingSource")
            .field("label", &self.label)
            .field("page_size", &self.page_size)
            .finish()
    }
}

impl DmaLoggingSource {
    /// A source for `device` (named `id`) over the ranges mapped for its DMA.
    pub fn new(device: Arc<VfioDevice>, mapped: Vec<MappedRange>, id: &str) -> Self {
        DmaLoggingSource {
            device,
            mapped,
            label: format!("dma-logging: {id}"),
            page_size: None,
        }
    }
}

impl DirtySource for DmaLoggingSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Dma
    }

    fn label(&self) -> &str {
        &self.label
    }

    fn start(&mut self) -> Result<(), DirtySourceError> {
        let ranges: Vec<DmaLoggingRange> = self
            .mapped
            .iter()
            .map(|m| DmaLoggingRange {
                iova: m.iova,
                length: m.len,
            })
            .collect();
        let page = self
            .device
            .start_dma_logging(DIRTY_PAGE_SIZE, &ranges)
            .map_err(start_failed)?;
        self.page_size = Some(page.max(1));
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtySourceError> {
        if self.page_size.take().is_none() {
            return Ok(());
        }
        self.device.stop_dma_logging().map_err(stop_failed)
    }

    fn sync(&mut self) -> Result<(), DirtySourceError> {
        Ok(())
    }

    fn peek(&mut self, _: GpaRange, _: &mut DirtyBitmap) -> Result<bool, DirtySourceError> {
        // REPORT clears: there is no look without taking.
        Ok(false)
    }

    fn claim(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError> {
        let page = self.page_size.ok_or(DirtySourceError::NotStarted {
            kind: SourceKind::Dma,
        })?;
        for part in mapped_parts(&self.mapped, range) {
            // Report whole device granules covering the part.
            let lo = part.start.0 / page * page;
            let hi = part.end().div_ceil(page) * page;
            let bits = self
                .device
                .report_dma_logging(
                    DmaLoggingRange {
                        iova: lo,
                        length: hi - lo,
                    },
                    page,
                )
                .map_err(|e| claim_failed(range, e))?;
            if page == DIRTY_PAGE_SIZE && lo == part.start.0 {
                or_kernel_bits(out, part, &bits, range)?;
                continue;
            }
            for (w, &word) in bits.iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let b = u64::from(word.trailing_zeros());
                    word &= word - 1;
                    let gpa = lo + (w as u64 * 64 + b) * page;
                    if let Some(hit) = part.intersect(gpa, page) {
                        out.mark_range(GuestAddress(hit.start.0), hit.len_bytes)
                            .map_err(|source| DirtySourceError::OutputBitmap {
                                kind: SourceKind::Dma,
                                range,
                                source,
                            })?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for DmaLoggingSource {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("{}: {e}", self.label);
        }
    }
}
