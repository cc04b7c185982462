//! type1 `VFIO_IOMMU_DIRTY_PAGES` on a container. The kernel reads (and clears) only whole DMA
//! mappings, so a claim reads every mapping the chunk touches and keeps the bits outside the chunk
//! for their own claims; tern maps guest RAM in chunk-sized mappings
//! ([`crate::vfio::container::DMA_MAP_CHUNK`]) so that a claim reads only its own chunk.
//! It cannot peek (every read clears), so the engine claims every chunk of every pass and
//! estimates from what the last pass sent.

use std::sync::Arc;

use tern_migration::dirty::{DirtyBitmap, DirtySource, DirtySourceError, GpaRange, SourceKind};
use vfio_ioctls::VfioContainer;

use super::{
    claim_failed, or_kernel_bits, start_failed, stop_failed, words_for, MappedRange,
    DIRTY_PAGE_SIZE,
};
use crate::sys::iova::Iova;
use crate::sys::vfio_type1_dirty::{get_dirty_bitmap, start_dirty_tracking, stop_dirty_tracking};

/// Dirty pages of one type1 container's DMA mappings.
pub struct Type1DirtySource {
    container: Arc<VfioContainer>,
    mappings: Vec<MappedRange>,
    /// Per mapping: bits read from the kernel and not yet claimed.
    stash: Vec<Vec<u64>>,
    label: String,
    enabled: bool,
    words: Vec<u64>,
}

impl std::fmt::Debug for Type1DirtySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Type1DirtySource")
            .field("label", &self.label)
            .field("mappings", &self.mappings.len())
            .field("enabled", &self.enabled)
            .finish()
    }
}

impl Type1DirtySource {
    /// A source over `container`, whose DMA mappings are exactly `mappings`.
    pub fn new(
        container: Arc<VfioContainer>,
        mappings: Vec<MappedRange>,
        devices: &[&str],
    ) -> Self {
        let stash = mappings.iter().map(|m| vec![0; words_for(m.len)]).collect();
        Type1DirtySource {
            container,
            mappings,
            stash,
            label: format!("type1: {}", devices.join(",")),
            enabled: false,
            words: Vec::new(),
        }
    }
}

impl DirtySource for Type1DirtySource {
    fn kind(&self) -> SourceKind {
        SourceKind::Dma
    }

    fn label(&self) -> &str {
        &self.label
    }

    fn start(&mut self) -> Result<(), DirtySourceError> {
        start_dirty_tracking(&self.container).map_err(start_failed)?;
        for s in &mut self.stash {
            s.fill(0);
        }
        self.enabled = true;
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtySourceError> {
        if !self.enabled {
            return Ok(());
        }
        self.enabled = false;
        stop_dirty_tracking(&self.container).map_err(stop_failed)
    }

    fn sync(&mut self) -> Result<(), DirtySourceError> {
        Ok(())
    }

    fn peek(&mut self, _: GpaRange, _: &mut DirtyBitmap) -> Result<bool, DirtySourceError> {
        // Every GET_BITMAP clears: there is no look without taking.
        Ok(false)
    }

    fn claim(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError> {
        if !self.enabled {
            return Err(DirtySourceError::NotStarted {
                kind: SourceKind::Dma,
            });
        }
        for (i, m) in self.mappings.iter().enumerate() {
            let Some(part) = range.intersect(m.iova, m.len) else {
                continue;
            };
            // Whole mapping: the kernel refuses a range that splits one.
            self.words.resize(words_for(m.len), 0);
            get_dirty_bitmap(
                &self.container,
                Iova(m.iova),
                m.len,
                DIRTY_PAGE_SIZE,
                &mut self.words,
            )
            .map_err(|e| claim_failed(range, e))?;
            let stash = &mut self.stash[i];
            for (s, w) in stash.iter_mut().zip(&self.words) {
                *s |= w;
            }
            // Hand over (and forget) the stashed bits of `part` only.
            let first = (part.start.0 - m.iova) / DIRTY_PAGE_SIZE;
            let n = part.len_bytes / DIRTY_PAGE_SIZE;
            let mut bits = vec![0u64; words_for(part.len_bytes)];
            for p in 0..n {
                let q = first + p;
                let (w, b) = ((q / 64) as usize, q % 64);
                if stash[w] >> b & 1 == 1 {
                    stash[w] &= !(1 << b);
                    bits[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
            or_kernel_bits(out, part, &bits, range)?;
        }
        Ok(())
    }
}

impl Drop for Type1DirtySource {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("{}: {e}", self.label);
        }
    }
}
