//! One bit per 4 KiB guest page over one guest-physical range, stored as `u64` words in the same
//! layout the kernel uses for KVM_GET_DIRTY_LOG / IOMMU_HWPT_GET_DIRTY_BITMAP: bit `i` of word `j`
//! is page `64 * j + i`. Keeping the kernel layout makes harvesting a word-wise OR, not a bit loop.
//! A [`WordSummary`] over the words lets every read, copy and clear walk only the groups that may
//! hold dirty bits, so their cost follows the dirty set, not the range covered.

use vm_memory::GuestAddress;

use super::summary::WordSummary;

/// log2 of the tracking granule.
pub const PAGE_SHIFT: u32 = 12;
/// The tracking granule: one bit covers this many bytes of guest memory.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Errors of [`DirtyBitmap`] operations; each names the pages involved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirtyBitmapError {
    /// The base address of a bitmap must be page aligned.
    #[error("bitmap base {base:#x} is not aligned to {PAGE_SIZE:#x}")]
    UnalignedBase {
        /// The rejected base GPA.
        base: u64,
    },
    /// The range would wrap the 64-bit guest-physical space.
    #[error("range at {start:#x} with {len_bytes:#x} bytes wraps the address space")]
    Overflow {
        /// Start GPA.
        start: u64,
        /// Length in bytes.
        len_bytes: u64,
    },
    /// A page index or address range falls outside the bitmap.
    #[error("pages {first_page}..{end_page} are outside the bitmap's {pages} pages")]
    OutOfRange {
        /// First offending page (relative to the bitmap base).
        first_page: u64,
        /// One past the last offending page.
        end_page: u64,
        /// Pages covered by the bitmap.
        pages: u64,
    },
    /// An address lies below the bitmap base.
    #[error("address {gpa:#x} is below the bitmap base {base:#x}")]
    BelowBase {
        /// The offending GPA.
        gpa: u64,
        /// The bitmap base GPA.
        base: u64,
    },
}

/// A dirty bitmap over `[base, base + pages * PAGE_SIZE)`.
#[derive(Clone)]
pub struct DirtyBitmap {
    base: GuestAddress,
    pages: u64,
    words: Vec<u64>,
    /// Which groups of `words` may hold set bits; every write marks it.
    summary: WordSummary,
}

impl PartialEq for DirtyBitmap {
    fn eq(&self, other: &Self) -> bool {
        // The summary over-approximates; equal bits make equal bitmaps.
        self.base == other.base && self.pages == other.pages && self.words == other.words
    }
}

impl Eq for DirtyBitmap {}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The words can be megabytes; print the shape and the population only.
        f.debug_struct("DirtyBitmap")
            .field("base", &format_args!("{:#x}", self.base.0))
            .field("pages", &self.pages)
            .field("dirty", &self.count())
            .finish()
    }
}

/// Number of `u64` words needed for `pages` bits.
fn words_for(pages: u64) -> usize {
    usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX)
}

/// `n` bits of `words` (bit `i` of word `w` is bit `64 * w + i`) from bit `first`, shifted down
/// so that `first` is bit 0 of the first word; bits past the end of `words` read as 0. The form
/// [`DirtyBitmap::or_words`] takes.
pub fn extract_bits(words: &[u64], first: u64, n: u64) -> Vec<u64> {
    let shift = (first % 64) as u32;
    let w0 = (first / 64) as usize;
    let get = |i: usize| words.get(i).copied().unwrap_or(0);
    (0..n.div_ceil(64) as usize)
        .map(|j| {
            let lo = get(w0 + j) >> shift;
            let hi = match shift {
                0 => 0,
                s => get(w0 + j + 1) << (64 - s),
            };
            let left = n - j as u64 * 64;
            let mask = if left >= 64 {
                u64::MAX
            } else {
                (1u64 << left) - 1
            };
            (lo | hi) & mask
        })
        .collect()
}

impl DirtyBitmap {
    /// An all-clean bitmap covering `len_bytes` from `base`, rounded up to whole pages.
    pub fn new(base: GuestAddress, len_bytes: u64) -> Result<Self, DirtyBitmapError> {
        if !base.0.is_multiple_of(PAGE_SIZE) {
            return Err(DirtyBitmapError::UnalignedBase { base: base.0 });
        }
        let pages = len_bytes.div_ceil(PAGE_SIZE);
        base.0
            .checked_add(pages * PAGE_SIZE)
            .ok_or(DirtyBitmapError::Overflow {
                start: base.0,
                len_bytes,
            })?;
        let words = words_for(pages);
        Ok(DirtyBitmap {
            base,
            pages,
            words: vec![0; words],
            summary: WordSummary::new(words),
        })
    }

    /// An all-clean bitmap of `pages` pages from GPA 0: for bits kept relative to something else
    /// (a KVM memory slot), which cannot fail. `pages` is clipped to the 64-bit address space.
    pub fn with_pages(pages: u64) -> Self {
        let pages = pages.min(u64::MAX >> PAGE_SHIFT);
        let words = words_for(pages);
        DirtyBitmap {
            base: GuestAddress(0),
            pages,
            words: vec![0; words],
            summary: WordSummary::new(words),
        }
    }

    /// Clears the bits of `masks` in the words from word `first_word` on (`masks[j]` applies to
    /// word `first_word + j`; words past the end are ignored).
    pub fn clear_words(&mut self, first_word: usize, masks: &[u64]) {
        let end = first_word.saturating_add(masks.len()).min(self.words.len());
        if first_word >= end {
            return;
        }
        for (d, m) in self.words[first_word..end].iter_mut().zip(masks) {
            *d &= !*m;
        }
    }

    /// First GPA covered.
    pub fn base(&self) -> GuestAddress {
        self.base
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Bytes covered (`pages * PAGE_SIZE`).
    pub fn len_bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// The raw words in kernel layout; bits past `pages()` are always zero.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Page index (relative to the base) of `gpa`, if `gpa` lies inside the bitmap.
    pub fn page_of(&self, gpa: GuestAddress) -> Result<u64, DirtyBitmapError> {
        let off = gpa
            .0
            .checked_sub(self.base.0)
            .ok_or(DirtyBitmapError::BelowBase {
                gpa: gpa.0,
                base: self.base.0,
            })?;
        let page = off >> PAGE_SHIFT;
        if page >= self.pages {
            return Err(DirtyBitmapError::OutOfRange {
                first_page: page,
                end_page: page + 1,
                pages: self.pages,
            });
        }
        Ok(page)
    }

    fn check_pages(&self, first_page: u64, npages: u64) -> Result<(), DirtyBitmapError> {
        match first_page.checked_add(npages) {
            Some(end) if end <= self.pages => Ok(()),
            end => Err(DirtyBitmapError::OutOfRange {
                first_page,
                end_page: end.unwrap_or(u64::MAX),
                pages: self.pages,
            }),
        }
    }

    /// Mark page `page` dirty.
    pub fn set(&mut self, page: u64) -> Result<(), DirtyBitmapError> {
        self.check_pages(page, 1)?;
        // page < pages, so the index fits the word vector.
        let w = (page / 64) as usize;
        self.words[w] |= 1 << (page % 64);
        self.summary.mark(w);
        Ok(())
    }

    /// Is page `page` dirty? Pages outside the bitmap are reported clean.
    pub fn test(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Mark `npages` pages from `first_page` dirty, a word at a time.
    pub fn set_pages(&mut self, first_page: u64, npages: u64) -> Result<(), DirtyBitmapError> {
        self.check_pages(first_page, npages)?;
        let (mut p, end) = (first_page, first_page + npages);
        while p < end {
            let bit = p % 64;
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let w = (p / 64) as usize;
            self.words[w] |= mask;
            self.summary.mark(w);
            p += n;
        }
        Ok(())
    }

    /// Mark every page touched by `[gpa, gpa + len_bytes)` dirty: partial pages at both ends count
    /// (round outward: over-report, never under-report).
    pub fn mark_range(
        &mut self,
        gpa: GuestAddress,
        len_bytes: u64,
    ) -> Result<(), DirtyBitmapError> {
        if len_bytes == 0 {
            return Ok(());
        }
        let last = gpa
            .0
            .checked_add(len_bytes - 1)
            .ok_or(DirtyBitmapError::Overflow {
                start: gpa.0,
                len_bytes,
            })?;
        let first_page = self.page_of(gpa)?;
        let last_page = self.page_of(GuestAddress(last))?;
        self.set_pages(first_page, last_page - first_page + 1)
    }

    /// OR a kernel-format bitmap into this one: bit `i` of `src[j]` is page `first_page + 64*j + i`.
    ///
    /// `src` may run past the end of the bitmap (kernel bitmaps are rounded up to whole words), but
    /// a *set* bit past the end is an error: dropping it would lose a dirty page.
    pub fn or_words(&mut self, first_page: u64, src: &[u64]) -> Result<(), DirtyBitmapError> {
        if src.is_empty() {
            return Ok(());
        }
        if first_page > self.pages {
            return Err(DirtyBitmapError::OutOfRange {
                first_page,
                end_page: first_page.saturating_add(src.len() as u64 * 64),
                pages: self.pages,
            });
        }
        // Validate before touching anything so an error leaves the bitmap unchanged.
        let room = self.pages - first_page;
        for (j, &w) in src.iter().enumerate() {
            let start = j as u64 * 64;
            if w == 0 || start + 64 <= room {
                continue;
            }
            let valid = room.saturating_sub(start);
            let excess = if valid >= 64 { 0 } else { w >> valid };
            if excess != 0 {
                let bad = start + valid + u64::from(excess.trailing_zeros());
                return Err(DirtyBitmapError::OutOfRange {
                    first_page: first_page + bad,
                    end_page: first_page + bad + 1,
                    pages: self.pages,
                });
            }
        }
        let shift = (first_page % 64) as u32;
        let w0 = (first_page / 64) as usize;
        let last_word = self.words.len();
        if shift == 0 {
            // The common (aligned) case: a straight word OR the compiler vectorises.
            let n = src.len().min(last_word - w0.min(last_word));
            for (d, s) in self.words[w0..w0 + n].iter_mut().zip(&src[..n]) {
                *d |= *s;
            }
            self.summary.mark_nonzero(w0, &src[..n]);
        } else {
            for (j, &w) in src.iter().enumerate() {
                if w == 0 {
                    continue;
                }
                let lo = w0 + j;
                if lo < last_word {
                    self.words[lo] |= w << shift;
                    self.summary.mark(lo);
                }
                if lo + 1 < last_word {
                    self.words[lo + 1] |= w >> (64 - shift);
                    self.summary.mark(lo + 1);
                }
            }
        }
        Ok(())
    }

    /// OR another bitmap covering a sub-range (or the same range) of this one into it.
    pub fn or_bitmap(&mut self, other: &DirtyBitmap) -> Result<(), DirtyBitmapError> {
        if other.pages == 0 {
            return Ok(());
        }
        let first = self.page_of(other.base)?;
        self.or_range_from(first, other, 0, other.pages)
    }

    /// OR pages `[src_first, src_first + npages)` of `src` into this bitmap's pages from
    /// `at_page`. Walks only `src`'s marked groups: O(dirty groups), not O(npages / 64).
    pub fn or_range_from(
        &mut self,
        at_page: u64,
        src: &DirtyBitmap,
        src_first: u64,
        npages: u64,
    ) -> Result<(), DirtyBitmapError> {
        let src_end = src_first.saturating_add(npages).min(src.pages);
        if src_first >= src_end {
            return Ok(());
        }
        self.check_pages(at_page, src_end - src_first)?;
        let (w0, w1) = ((src_first / 64) as usize, src_end.div_ceil(64) as usize);
        for (a, b) in src.summary.spans(w0, w1) {
            let p0 = (a as u64 * 64).max(src_first);
            let p1 = (b as u64 * 64).min(src_end);
            if src.words[a..b].iter().all(|&w| w == 0) {
                continue;
            }
            let bits = src.extract(p0, p1 - p0);
            self.or_words(at_page + (p0 - src_first), &bits)?;
        }
        Ok(())
    }

    /// The word spans of marked groups within pages `[first_page, first_page + npages)`.
    fn marked_spans(
        &self,
        first_page: u64,
        npages: u64,
    ) -> impl Iterator<Item = (usize, usize)> + '_ {
        let end = first_page.saturating_add(npages).min(self.pages);
        let (w0, w1) = if first_page < end {
            ((first_page / 64) as usize, end.div_ceil(64) as usize)
        } else {
            (0, 0)
        };
        self.summary.spans(w0, w1)
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.count_range(0, self.pages)
    }

    /// Number of dirty pages in `[first_page, first_page + npages)`.
    pub fn count_range(&self, first_page: u64, npages: u64) -> u64 {
        let mut n = 0;
        for (a, b) in self.marked_spans(first_page, npages) {
            let (p0, p1) = span_pages(a, b, first_page, npages);
            n += word_masks(self.pages, p0, p1 - p0)
                .map(|(w, mask)| u64::from((self.words[w] & mask).count_ones()))
                .sum::<u64>();
        }
        n
    }

    /// The bits of pages `[first_page, first_page + npages)` (clipped to the bitmap) as words
    /// whose bit 0 is `first_page`: the form [`DirtyBitmap::or_words`] takes. O(npages / 64).
    pub fn extract(&self, first_page: u64, npages: u64) -> Vec<u64> {
        let end = first_page.saturating_add(npages).min(self.pages);
        extract_bits(&self.words, first_page, end.saturating_sub(first_page))
    }

    /// Clears pages `[first_page, first_page + npages)` (clipped to the bitmap), a word at a time,
    /// visiting only marked groups.
    pub fn clear_range(&mut self, first_page: u64, npages: u64) {
        let spans: Vec<(usize, usize)> = self.marked_spans(first_page, npages).collect();
        for (a, b) in spans {
            let (p0, p1) = span_pages(a, b, first_page, npages);
            for (w, mask) in word_masks(self.pages, p0, p1 - p0) {
                self.words[w] &= !mask;
            }
            let group = a / super::summary::GROUP_WORDS;
            let g0 = group * super::summary::GROUP_WORDS;
            let g1 = (g0 + super::summary::GROUP_WORDS).min(self.words.len());
            if self.words[g0..g1].iter().all(|&w| w == 0) {
                self.summary.unmark(group);
            }
        }
    }

    /// True when no page is dirty.
    pub fn is_clean(&self) -> bool {
        self.summary
            .spans(0, self.words.len())
            .all(|(a, b)| self.words[a..b].iter().all(|&w| w == 0))
    }

    /// Clear every bit (visiting only marked groups).
    pub fn clear(&mut self) {
        let words = &mut self.words;
        for (a, b) in self.summary.spans(0, words.len()) {
            words[a..b].fill(0);
        }
        self.summary.clear();
    }

    /// Iterate the dirty page indices (relative to the base) in ascending order.
    pub fn iter_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.summary
            .spans(0, self.words.len())
            .flat_map(move |(a, b)| (a..b).map(move |j| (j, self.words[j])))
            .flat_map(|(j, w)| {
                let mut rest = w;
                std::iter::from_fn(move || {
                    if rest == 0 {
                        return None;
                    }
                    let bit = rest.trailing_zeros();
                    rest &= rest - 1;
                    Some(j as u64 * 64 + u64::from(bit))
                })
            })
    }
}

/// Pages `[p0, p1)` where word span `[a, b)` meets `[first_page, first_page + npages)`.
fn span_pages(a: usize, b: usize, first_page: u64, npages: u64) -> (u64, u64) {
    let p0 = (a as u64 * 64).max(first_page);
    let p1 = (b as u64 * 64).min(first_page.saturating_add(npages));
    (p0, p1.max(p0))
}

/// The words covering pages `[first_page, first_page + npages)` of a `pages`-page bitmap (clipped
/// to it), each with the mask of its bits inside the range.
fn word_masks(pages: u64, first_page: u64, npages: u64) -> impl Iterator<Item = (usize, u64)> {
    let end = first_page.saturating_add(npages).min(pages);
    let mut p = first_page;
    std::iter::from_fn(move || {
        if p >= end {
            return None;
        }
        let bit = p % 64;
        let k = (64 - bit).min(end - p);
        let mask = if k == 64 {
            u64::MAX
        } else {
            ((1u64 << k) - 1) << bit
        };
        let w = (p / 64) as usize;
        p += k;
        Some((w, mask))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_bits_shifts_and_masks() {
        let words = [0x8000_0000_0000_0001u64, 0x3];
        assert_eq!(extract_bits(&words, 0, 128), vec![words[0], words[1]]);
        assert_eq!(extract_bits(&words, 63, 3), vec![0b111]);
        assert_eq!(extract_bits(&words, 1, 62), vec![0]);
        assert_eq!(extract_bits(&words, 64, 1), vec![1]);
    }

    fn bm(pages: u64) -> DirtyBitmap {
        DirtyBitmap::new(GuestAddress(0x10_0000), pages * PAGE_SIZE).expect("valid bitmap")
    }

    #[test]
    fn new_rejects_unaligned_base_and_wrap() {
        assert_eq!(
            DirtyBitmap::new(GuestAddress(0x1001), 4096),
            Err(DirtyBitmapError::UnalignedBase { base: 0x1001 })
        );
        assert!(matches!(
            DirtyBitmap::new(GuestAddress(u64::MAX - 0xfff), 0x2000),
            Err(DirtyBitmapError::Overflow { .. })
        ));
    }

    #[test]
    fn new_rounds_length_up_to_pages() {
        let b = DirtyBitmap::new(GuestAddress(0), 4097).expect("valid");
        assert_eq!(b.pages(), 2);
        assert_eq!(b.words().len(), 1);
    }

    #[test]
    fn set_test_count_clear_every_page() {
        for pages in [1u64, 63, 64, 65, 130] {
            let mut b = bm(pages);
            for p in 0..pages {
                assert!(!b.test(p));
                b.set(p).expect("in range");
                assert!(b.test(p));
                assert_eq!(b.count(), p + 1);
            }
            assert!(b.set(pages).is_err());
            assert!(!b.test(pages));
            b.clear();
            assert!(b.is_clean());
        }
    }

    #[test]
    fn set_pages_matches_single_bit_sets_exhaustively() {
        let pages = 200;
        for first in 0..pages {
            for n in 0..=(pages - first).min(140) {
                let mut a = bm(pages);
                let mut b = bm(pages);
                a.set_pages(first, n).expect("in range");
                for p in first..first + n {
                    b.set(p).expect("in range");
                }
                assert_eq!(a, b, "first {first} n {n}");
                assert_eq!(a.count_range(first, n), n);
                assert_eq!(a.count_range(0, pages), n);
            }
        }
    }

    #[test]
    fn mark_range_rounds_outward() {
        let mut b = bm(8);
        b.mark_range(GuestAddress(0x10_0000 + 4095), 2)
            .expect("in range");
        assert_eq!(b.iter_pages().collect::<Vec<_>>(), vec![0, 1]);
        b.clear();
        b.mark_range(GuestAddress(0x10_0000 + 3 * 4096 + 5), 1)
            .expect("in range");
        assert_eq!(b.iter_pages().collect::<Vec<_>>(), vec![3]);
        assert!(b
            .mark_range(GuestAddress(0x10_0000 + 7 * 4096), 4097)
            .is_err());
        assert!(b.mark_range(GuestAddress(0x1000), 1).is_err());
        b.mark_range(GuestAddress(0), 0).expect("empty is a no-op");
    }

    #[test]
    fn or_words_every_alignment_equals_bitwise_reference() {
        let pages = 300u64;
        // A pattern with bits in every word position, including bit 63.
        let src: Vec<u64> = vec![0x8000_0000_0000_0001, 0xdead_beef_0123_4567, u64::MAX, 0x10];
        for first in 0..(pages - 256) {
            let mut fast = bm(pages);
            fast.or_words(first, &src).expect("in range");
            let mut slow = bm(pages);
            for (j, w) in src.iter().enumerate() {
                for i in 0..64 {
                    if w & (1 << i) != 0 {
                        slow.set(first + j as u64 * 64 + i).expect("in range");
                    }
                }
            }
            assert_eq!(fast, slow, "first_page {first}");
        }
    }

    #[test]
    fn or_words_rejects_set_bits_past_end_without_side_effects() {
        let mut b = bm(70);
        // Word 1 covers pages 64..128; only 64..70 exist.
        assert_eq!(
            b.or_words(0, &[1, 1 << 6]),
            Err(DirtyBitmapError::OutOfRange {
                first_page: 70,
                end_page: 71,
                pages: 70
            })
        );
        assert!(b.is_clean(), "a rejected OR must not apply partially");
        // Clear bits past the end are fine (kernel bitmaps are word-rounded).
        b.or_words(0, &[1, 1 << 5]).expect("in range");
        assert_eq!(b.iter_pages().collect::<Vec<_>>(), vec![0, 69]);
        // Unaligned start with bits shifted past the end.
        let mut c = bm(70);
        assert!(c.or_words(10, &[1 << 60]).is_err());
        c.or_words(10, &[1 << 59]).expect("page 69");
        assert!(c.test(69));
        assert!(bm(10).or_words(11, &[1]).is_err());
    }

    #[test]
    fn or_bitmap_places_sub_bitmap_at_its_gpa() {
        let mut big = bm(256);
        let mut small =
            DirtyBitmap::new(GuestAddress(0x10_0000 + 100 * 4096), 20 * 4096).expect("valid");
        small.set(0).expect("in range");
        small.set(19).expect("in range");
        big.or_bitmap(&small).expect("inside");
        assert_eq!(big.iter_pages().collect::<Vec<_>>(), vec![100, 119]);
        let outside =
            DirtyBitmap::new(GuestAddress(0x10_0000 + 250 * 4096), 20 * 4096).expect("valid");
        assert!(big.or_bitmap(&outside).is_err());
    }

    #[test]
    fn iter_pages_lists_exactly_the_set_bits() {
        let mut b = bm(1000);
        let want: Vec<u64> = (0..1000).filter(|p| p % 7 == 0 || p % 64 == 63).collect();
        for &p in &want {
            b.set(p).expect("in range");
        }
        assert_eq!(b.iter_pages().collect::<Vec<_>>(), want);
        assert_eq!(b.count(), want.len() as u64);
    }

    #[test]
    fn page_of_checks_bounds() {
        let b = bm(4);
        assert_eq!(b.page_of(GuestAddress(0x10_0000 + 3 * 4096 + 7)), Ok(3));
        assert!(b.page_of(GuestAddress(0x10_0000 + 4 * 4096)).is_err());
        assert!(matches!(
            b.page_of(GuestAddress(0)),
            Err(DirtyBitmapError::BelowBase { .. })
        ));
    }

    #[test]
    fn extract_and_clear_range_match_a_page_by_page_walk() {
        let mut b = DirtyBitmap::new(GuestAddress(0), 300 * PAGE_SIZE).expect("valid");
        let pages = [0u64, 1, 62, 63, 64, 65, 127, 128, 200, 255, 256, 299];
        for p in pages {
            b.set(p).expect("in range");
        }
        for (first, n) in [
            (0, 300),
            (1, 64),
            (63, 2),
            (60, 140),
            (129, 171),
            (250, 100),
            (299, 1),
        ] {
            let words = b.extract(first, n);
            let end = (first + n).min(300);
            let want: Vec<u64> = pages
                .iter()
                .copied()
                .filter(|p| (first..end).contains(p))
                .collect();
            let got: Vec<u64> = (0..(end - first))
                .filter(|i| words[(i / 64) as usize] & (1 << (i % 64)) != 0)
                .map(|i| first + i)
                .collect();
            assert_eq!(got, want, "extract({first}, {n})");
            // Round trip through or_words.
            let mut c = DirtyBitmap::new(GuestAddress(0), 300 * PAGE_SIZE).expect("valid");
            c.or_words(first, &words).expect("fits");
            assert_eq!(c.iter_pages().collect::<Vec<_>>(), want);
            let mut d = b.clone();
            d.clear_range(first, n);
            let left: Vec<u64> = pages
                .iter()
                .copied()
                .filter(|p| !(first..end).contains(p))
                .collect();
            assert_eq!(
                d.iter_pages().collect::<Vec<_>>(),
                left,
                "clear_range({first}, {n})"
            );
        }
    }

    /// Random operations on a bitmap spanning several summary groups against a `Vec<bool>` model:
    /// whatever the summary skips must hold no bit.
    #[test]
    fn summary_walks_agree_with_a_page_model() {
        const PAGES: u64 = 64 * 64 * 5 + 77;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        let mut b = DirtyBitmap::new(GuestAddress(0), PAGES * PAGE_SIZE).expect("valid");
        let mut other = DirtyBitmap::new(GuestAddress(0), PAGES * PAGE_SIZE).expect("valid");
        let mut model = vec![false; PAGES as usize];
        for step in 0..3000 {
            let first = next(PAGES);
            let n = next(PAGES - first).min(next(9000) + 1);
            match next(6) {
                0 => {
                    b.set(first).expect("in range");
                    model[first as usize] = true;
                }
                1 => {
                    b.set_pages(first, n).expect("in range");
                    model[first as usize..(first + n) as usize].fill(true);
                }
                2 => {
                    b.clear_range(first, n);
                    model[first as usize..(first + n) as usize].fill(false);
                }
                3 => {
                    // Copy a random range of another sparse bitmap to a random place.
                    other.clear();
                    for _ in 0..4 {
                        other.set(next(PAGES)).expect("in range");
                    }
                    let at = next(PAGES - n + 1);
                    b.or_range_from(at, &other, first, n).expect("fits");
                    for p in other
                        .iter_pages()
                        .filter(|p| (first..first + n).contains(p))
                    {
                        model[(at + p - first) as usize] = true;
                    }
                }
                4 => {
                    let words: Vec<u64> = (0..n.div_ceil(64)).map(|_| 1u64 << next(64)).collect();
                    let at = next(PAGES - n.div_ceil(64) * 64 + 1);
                    b.or_words(at, &words).expect("fits");
                    for (j, w) in words.iter().enumerate() {
                        model[(at + j as u64 * 64 + u64::from(w.trailing_zeros())) as usize] = true;
                    }
                }
                _ => {
                    if next(20) == 0 {
                        b.clear();
                        model.fill(false);
                    }
                }
            }
            let want = model[first as usize..(first + n) as usize]
                .iter()
                .filter(|&&d| d)
                .count();
            assert_eq!(b.count_range(first, n), want as u64, "step {step}");
        }
        let want: Vec<u64> = (0..PAGES).filter(|&p| model[p as usize]).collect();
        assert_eq!(b.iter_pages().collect::<Vec<_>>(), want);
        assert_eq!(b.count(), want.len() as u64);
        assert_eq!(b.is_clean(), want.is_empty());
    }
}
