//! Coalesce the set bits of a [`DirtyBitmap`] into runs of consecutive pages, a word at a time:
//! zero words cost one compare, all-ones words extend the open run in one step, and mixed words
//! are walked run by run with `trailing_zeros` / `trailing_ones`, never bit by bit.

use super::bitmap::DirtyBitmap;

/// `npages` consecutive dirty pages from `first_page` (relative to the bitmap base).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// First page of the run.
    pub first_page: u64,
    /// Number of pages, at least 1.
    pub npages: u64,
}

/// The coalesced runs of one bitmap, ascending and non-adjacent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyRanges {
    runs: Vec<PageRun>,
    pages: u64,
}

impl DirtyRanges {
    /// The runs, ascending; two runs never touch.
    pub fn runs(&self) -> &[PageRun] {
        &self.runs
    }

    /// Total pages over all runs.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// True when there is no run.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Reuse the allocation for another bitmap.
    pub fn clear(&mut self) {
        self.runs.clear();
        self.pages = 0;
    }

    /// Replace the contents with the runs of `bitmap`, reusing the allocation.
    pub fn fill_from(&mut self, bitmap: &DirtyBitmap) {
        self.clear();
        // `open` is the start of a run that reached the end of the previous word.
        let mut open: Option<u64> = None;
        for (j, &word) in bitmap.words().iter().enumerate() {
            let base = j as u64 * 64;
            if word == 0 {
                if let Some(start) = open.take() {
                    self.push(start, base);
                }
                continue;
            }
            if word == u64::MAX {
                open.get_or_insert(base);
                continue;
            }
            let mut w = word;
            let mut bit = 0u32;
            // A run continued from the previous word must start at bit 0 of this one.
            if let Some(start) = open.take() {
                if w & 1 == 0 {
                    self.push(start, base);
                } else {
                    let ones = w.trailing_ones();
                    bit = ones;
                    w = w.checked_shr(ones).unwrap_or(0);
                    if bit == 64 {
                        open = Some(start);
                        continue;
                    }
                    self.push(start, base + u64::from(bit));
                }
            }
            while w != 0 {
                let zeros = w.trailing_zeros();
                bit += zeros;
                w >>= zeros;
                let ones = w.trailing_ones();
                let start = base + u64::from(bit);
                bit += ones;
                if bit >= 64 {
                    open = Some(start);
                    break;
                }
                w >>= ones;
                self.push(start, base + u64::from(bit));
            }
        }
        if let Some(start) = open {
            // Bits past `pages()` are always zero, so the run ends inside the bitmap.
            self.push(start, bitmap.pages().min(bitmap.words().len() as u64 * 64));
        }
    }

    fn push(&mut self, start: u64, end: u64) {
        self.runs.push(PageRun {
            first_page: start,
            npages: end - start,
        });
        self.pages += end - start;
    }
}

/// The runs of `bitmap` (allocating; use [`DirtyRanges::fill_from`] in loops).
pub fn coalesce(bitmap: &DirtyBitmap) -> DirtyRanges {
    let mut r = DirtyRanges::default();
    r.fill_from(bitmap);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    /// The obvious bit-by-bit reference.
    fn reference(b: &DirtyBitmap) -> Vec<PageRun> {
        let mut runs: Vec<PageRun> = Vec::new();
        for p in 0..b.pages() {
            if !b.test(p) {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.first_page + r.npages == p => r.npages += 1,
                _ => runs.push(PageRun {
                    first_page: p,
                    npages: 1,
                }),
            }
        }
        runs
    }

    fn bitmap_from_words(pages: u64, words: &[u64]) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(GuestAddress(0), pages * 4096).expect("valid");
        b.or_words(0, words).expect("in range");
        b
    }

    #[test]
    fn coalesce_every_16_bit_pattern_matches_reference() {
        // Exhaustive over 16 pages, placed at a word boundary to exercise carries.
        for pat in 0u64..(1 << 16) {
            let words = [pat << 56, pat >> 8];
            let b = bitmap_from_words(128, &words);
            let got = coalesce(&b);
            let want = reference(&b);
            assert_eq!(got.runs(), want.as_slice(), "pattern {pat:#x}");
            assert_eq!(got.pages(), b.count());
        }
    }

    #[test]
    fn coalesce_full_words_and_runs_across_many_words() {
        let words = [
            u64::MAX,
            u64::MAX,
            1,
            0,
            1 << 63,
            u64::MAX,
            0x7fff_ffff_ffff_ffff,
        ];
        let b = bitmap_from_words(7 * 64, &words);
        assert_eq!(coalesce(&b).runs(), reference(&b).as_slice());
        assert_eq!(
            coalesce(&b).runs()[0],
            PageRun {
                first_page: 0,
                npages: 129
            }
        );
    }

    #[test]
    fn coalesce_run_to_partial_last_word_ends_at_pages() {
        let mut b = DirtyBitmap::new(GuestAddress(0), 70 * 4096).expect("valid");
        b.set_pages(0, 70).expect("in range");
        assert_eq!(
            coalesce(&b).runs(),
            &[PageRun {
                first_page: 0,
                npages: 70
            }]
        );
    }

    #[test]
    fn coalesce_pseudo_random_bitmaps_match_reference() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for density in [1u32, 8, 32, 56, 63] {
            let words: Vec<u64> = (0..64)
                .map(|_| {
                    // xorshift; AND/OR of several draws skews the density.
                    let mut w = 0;
                    for _ in 0..2 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        w |= if x.count_ones() > density { x } else { 0 };
                    }
                    w
                })
                .collect();
            let b = bitmap_from_words(64 * 64, &words);
            let got = coalesce(&b);
            assert_eq!(got.runs(), reference(&b).as_slice(), "density {density}");
            assert_eq!(got.pages(), b.count());
        }
    }

    #[test]
    fn coalesce_empty_bitmap_is_empty() {
        let b = DirtyBitmap::new(GuestAddress(0), 0).expect("valid");
        assert!(coalesce(&b).is_empty());
        let b = DirtyBitmap::new(GuestAddress(0), 1 << 20).expect("valid");
        assert!(coalesce(&b).is_empty());
    }
}
