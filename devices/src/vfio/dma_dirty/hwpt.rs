//! IOMMU hardware dirty tracking on a HWPT (iommufd): the seed's HWDBM. `peek` reads with
//! `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`; `claim` reads and clears exactly the chunk about to be
//! sent. One source per HWPT, however many devices share it.

use std::sync::Arc;

use iommufd_ioctls::IommuFd;
use tern_migration::dirty::{DirtyBitmap, DirtySource, DirtySourceError, GpaRange, SourceKind};

use super::{
    mapped_parts, or_kernel_bits, start_failed, stop_failed, words_for, MappedRange,
    DIRTY_PAGE_SIZE,
};
use crate::sys::iommufd_hwpt_dirty::{get_dirty_bitmap, set_dirty_tracking, DirtyRead};
use crate::sys::iova::Iova;

/// Dirty bits of one HWPT over the guest RAM mapped in its IOAS.
pub struct HwptDirtySource {
    iommufd: Arc<IommuFd>,
    hwpt_id: u32,
    mapped: Vec<MappedRange>,
    label: String,
    enabled: bool,
    words: Vec<u64>,
}

impl std::fmt::Debug for HwptDirtySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HwptDirtySource")
            .field("hwpt_id", &self.hwpt_id)
            .field("label", &self.label)
            .field("enabled", &self.enabled)
            .finish()
    }
}

impl HwptDirtySource {
    /// A source for `hwpt_id` (allocated with dirty tracking) covering `mapped`; `devices` name
    /// the devices attached to it, for stats.
    pub fn new(
        iommufd: Arc<IommuFd>,
        hwpt_id: u32,
        mapped: Vec<MappedRange>,
        devices: &[&str],
    ) -> Self {
        HwptDirtySource {
            iommufd,
            hwpt_id,
            mapped,
            label: format!("hwpt {hwpt_id}: {}", devices.join(",")),
            enabled: false,
            words: Vec::new(),
        }
    }

    fn read(
        &mut self,
        range: GpaRange,
        out: &mut DirtyBitmap,
        mode: DirtyRead,
    ) -> Result<(), DirtySourceError> {
        if !self.enabled {
            return Err(DirtySourceError::NotStarted {
                kind: SourceKind::Dma,
            });
        }
        for part in mapped_parts(&self.mapped, range) {
            self.words.resize(words_for(part.len_bytes), 0);
            get_dirty_bitmap(
                &self.iommufd,
                self.hwpt_id,
                Iova(part.start.0),
                part.len_bytes,
                DIRTY_PAGE_SIZE,
                mode,
                &mut self.words,
            )
            .map_err(|e| {
                let err = Box::new(e);
                match mode {
                    DirtyRead::NoClear => DirtySourceError::Peek {
                        kind: SourceKind::Dma,
                        range,
                        source: err,
                    },
                    DirtyRead::ReadAndClear => DirtySourceError::Claim {
                        kind: SourceKind::Dma,
                        range,
                        source: err,
                    },
                }
            })?;
            or_kernel_bits(out, part, &self.words, range)?;
        }
        Ok(())
    }
}

impl DirtySource for HwptDirtySource {
    fn kind(&self) -> SourceKind {
        SourceKind::Dma
    }

    fn label(&self) -> &str {
        &self.label
    }

    fn start(&mut self) -> Result<(), DirtySourceError> {
        set_dirty_tracking(&self.iommufd, self.hwpt_id, true).map_err(start_failed)?;
        self.enabled = true;
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtySourceError> {
        if !self.enabled {
            return Ok(());
        }
        self.enabled = false;
        set_dirty_tracking(&self.iommufd, self.hwpt_id, false).map_err(stop_failed)
    }

    fn sync(&mut self) -> Result<(), DirtySourceError> {
        // The IOMMU's bits are live: peek and claim read them directly.
        Ok(())
    }

    fn peek(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<bool, DirtySourceError> {
        self.read(range, out, DirtyRead::NoClear)?;
        Ok(true)
    }

    fn claim(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError> {
        self.read(range, out, DirtyRead::ReadAndClear)
    }
}

impl Drop for HwptDirtySource {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("{}: {e}", self.label);
        }
    }
}
