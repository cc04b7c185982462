//! The I/O virtual address type shared by the DMA-mapping and dirty-tracking wrappers.
//!
//! An IOVA is what a device puts on the bus; tern maps guest RAM with IOVA = GPA, but the two stay
//! distinct types so a translation can never be skipped silently.

use std::fmt;

/// An I/O virtual address: the address a device uses for DMA, translated by the IOMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iova(pub u64);

impl Iova {
    /// The raw address value.
    pub fn raw(self) -> u64 {
        self.0
    }
}

impl fmt::LowerHex for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// Number of `u64` words a bitmap needs to hold one bit per `page_size` page of
/// `[iova, iova + len_bytes)`.
///
/// Returns `None` unless the range is non-empty, `page_size` is a power of two and both ends of the
/// range are `page_size`-aligned: the dirty-bitmap uAPIs reject anything else.
pub fn range_bitmap_words(iova: Iova, len_bytes: u64, page_size: u64) -> Option<usize> {
    if len_bytes == 0
        || !page_size.is_power_of_two()
        || !len_bytes.is_multiple_of(page_size)
        || !iova.0.is_multiple_of(page_size)
        || iova.0.checked_add(len_bytes).is_none()
    {
        return None;
    }
    usize::try_from((len_bytes / page_size).div_ceil(64)).ok()
}

/// A range and a caller's bitmap that a dirty-bitmap uAPI would refuse.
#[derive(Debug, thiserror::Error)]
pub enum DirtyBitmapArgError {
    /// The range is empty, or not a whole number of pages, or the page size is not a power of two.
    #[error("range iova {iova:#x}, {len_bytes:#x} bytes is not a non-empty whole number of {page_size:#x}-byte pages")]
    BadRange {
        /// First IOVA of the range.
        iova: Iova,
        /// Length of the range.
        len_bytes: u64,
        /// Bitmap granularity.
        page_size: u64,
    },
    /// The caller's bitmap does not have exactly one bit per page of the range.
    #[error("bitmap of {words} words does not match the {needed} words the range needs")]
    BitmapSize {
        /// Words the caller passed.
        words: usize,
        /// Words the range needs.
        needed: usize,
    },
}

/// Checks that `bitmap_words` words are exactly what [`range_bitmap_words`] says the range needs.
pub fn check_dirty_bitmap_arg(
    iova: Iova,
    len_bytes: u64,
    page_size: u64,
    bitmap_words: usize,
) -> Result<(), DirtyBitmapArgError> {
    let needed =
        range_bitmap_words(iova, len_bytes, page_size).ok_or(DirtyBitmapArgError::BadRange {
            iova,
            len_bytes,
            page_size,
        })?;
    if bitmap_words != needed {
        return Err(DirtyBitmapArgError::BitmapSize {
            words: bitmap_words,
            needed,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_bitmap_words_rounds_up_to_whole_words() {
        assert_eq!(range_bitmap_words(Iova(0), 4096, 4096), Some(1));
        assert_eq!(range_bitmap_words(Iova(0x1000), 64 * 4096, 4096), Some(1));
        assert_eq!(range_bitmap_words(Iova(0), 65 * 4096, 4096), Some(2));
        assert_eq!(range_bitmap_words(Iova(1 << 24), 1 << 20, 2048), Some(8));
    }

    #[test]
    fn a_dirty_bitmap_arg_needs_a_good_range_and_exactly_its_words() {
        assert!(check_dirty_bitmap_arg(Iova(0), 65 * 4096, 4096, 2).is_ok());
        assert!(matches!(
            check_dirty_bitmap_arg(Iova(0x800), 4096, 4096, 1),
            Err(DirtyBitmapArgError::BadRange {
                page_size: 4096,
                ..
            })
        ));
        for words in [1, 3] {
            assert!(matches!(
                check_dirty_bitmap_arg(Iova(0), 65 * 4096, 4096, words),
                Err(DirtyBitmapArgError::BitmapSize { needed: 2, .. })
            ));
        }
    }

    #[test]
    fn range_bitmap_words_rejects_bad_ranges() {
        assert_eq!(range_bitmap_words(Iova(0), 0, 4096), None);
        assert_eq!(range_bitmap_words(Iova(0), 4096, 0), None);
        assert_eq!(range_bitmap_words(Iova(0), 3 * 4096, 3 * 4096), None);
        assert_eq!(range_bitmap_words(Iova(0x800), 4096, 4096), None);
        assert_eq!(range_bitmap_words(Iova(0), 4096 + 2048, 4096), None);
        assert_eq!(range_bitmap_words(Iova(u64::MAX - 4095), 8192, 4096), None);
    }

    #[test]
    fn iova_formats_as_hex() {
        assert_eq!(format!("{:#x}", Iova(0x100_0000)), "0x1000000");
    }
}
