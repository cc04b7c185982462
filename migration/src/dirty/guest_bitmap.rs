//! The bitmap vm-memory sets when the VMM writes guest memory (device emulation, virtio queues),
//! with a summary level so that harvesting it costs what was written, not the guest's size.
//!
//! vm-memory's own `AtomicBitmap` can only be harvested whole (`get_and_reset`: one atomic
//! read-modify-write per 64 pages, 2.4 ms for an idle 64 GiB guest, inside the switchover's
//! downtime). [`GuestPageBitmap`] marks a summary bit per group of
//! [`GROUP_WORDS`](super::GROUP_WORDS) words after setting a page's bit, and
//! [`GuestPageBitmap::harvest`] swaps out only marked groups. Ordering: a writer sets the page bit,
//! then the group bit; the harvester clears the group bit, then takes the words. A write racing a
//! harvest either lands in the words the harvester takes or leaves its group bit set for the next
//! harvest: never lost.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

use super::summary::{count_visits, GROUP_WORDS};

/// One bit per page of a guest memory region, plus one summary bit per group of words.
pub struct GuestPageBitmap {
    words: Vec<AtomicU64>,
    groups: Vec<AtomicU64>,
    pages: usize,
    page_size: NonZeroUsize,
}

impl std::fmt::Debug for GuestPageBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestPageBitmap")
            .field("pages", &self.pages)
            .field("page_size", &self.page_size)
            .finish()
    }
}

impl GuestPageBitmap {
    /// A clean bitmap for `byte_size` bytes at one bit per `page_size` bytes.
    pub fn new(byte_size: usize, page_size: NonZeroUsize) -> Self {
        let pages = byte_size.div_ceil(page_size.get());
        let words = pages.div_ceil(64);
        let groups = words.div_ceil(GROUP_WORDS).div_ceil(64);
        GuestPageBitmap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            groups: (0..groups).map(|_| AtomicU64::new(0)).collect(),
            pages,
            page_size,
        }
    }

    /// Pages tracked.
    pub fn len(&self) -> usize {
        self.pages
    }

    /// True when the bitmap tracks no page.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Is page `page`'s bit set?
    fn is_page_dirty(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Sets the bits of the pages `[offset, offset + len)` touches, a word at a time.
    fn set_range(&self, offset: usize, len: usize) {
        if len == 0 || self.pages == 0 {
            return;
        }
        let first = offset / self.page_size;
        let last = (offset.saturating_add(len - 1) / self.page_size).min(self.pages - 1);
        let mut p = first;
        while p <= last {
            let bit = p % 64;
            let n = (64 - bit).min(last + 1 - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let w = p / 64;
            // A write to an already dirty word (the common case for a busy queue) needs no
            // read-modify-write; the group bit was set after it.
            if self.words[w].load(Ordering::Relaxed) & mask != mask {
                self.words[w].fetch_or(mask, Ordering::Release);
            }
            let g = w / GROUP_WORDS;
            let gbit = 1u64 << (g % 64);
            if self.groups[g / 64].load(Ordering::Relaxed) & gbit == 0 {
                self.groups[g / 64].fetch_or(gbit, Ordering::Release);
            }
            p += n;
        }
    }

    /// Takes every set bit, clearing it, and hands each non-zero word to `take(word_index, bits)`
    /// (bit `i` of word `j` is page `64 * j + i`). Visits only groups marked since their last
    /// harvest.
    pub fn harvest(&self, mut take: impl FnMut(usize, u64)) {
        for (si, summary) in self.groups.iter().enumerate() {
            if summary.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut marked = summary.swap(0, Ordering::AcqRel);
            count_visits(u64::from(marked.count_ones()));
            while marked != 0 {
                let g = si * 64 + marked.trailing_zeros() as usize;
                marked &= marked - 1;
                let end = ((g + 1) * GROUP_WORDS).min(self.words.len());
                for w in g * GROUP_WORDS..end {
                    if self.words[w].load(Ordering::Relaxed) != 0 {
                        let bits = self.words[w].swap(0, Ordering::AcqRel);
                        if bits != 0 {
                            take(w, bits);
                        }
                    }
                }
            }
        }
    }

    /// Clears every bit (O(pages / 64): for the start of a migration, not its switchover).
    pub fn reset(&self) {
        for g in &self.groups {
            g.store(0, Ordering::Release);
        }
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }
}

impl<'a> WithBitmapSlice<'a> for GuestPageBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for GuestPageBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.set_range(offset, len)
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.is_page_dirty(offset / self.page_size)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        RefSlice::new(self, offset)
    }
}

/// 4 KiB: the granule every dirty source of tern reports in.
const DEFAULT_PAGE: NonZeroUsize = match NonZeroUsize::new(4096) {
    Some(n) => n,
    None => unreachable!(),
};

impl Default for GuestPageBitmap {
    fn default() -> Self {
        GuestPageBitmap::new(0, DEFAULT_PAGE)
    }
}

impl NewBitmap for GuestPageBitmap {
    fn with_len(len: usize) -> Self {
        GuestPageBitmap::new(len, DEFAULT_PAGE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::groups_visited;

    fn harvested(b: &GuestPageBitmap) -> Vec<usize> {
        let mut pages = Vec::new();
        b.harvest(|w, mut bits| {
            while bits != 0 {
                pages.push(w * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        });
        pages
    }

    #[test]
    fn marks_are_harvested_once_and_only_marked_groups_are_visited() {
        // 64 groups of 4096 pages.
        let b = GuestPageBitmap::with_len(64 * 4096 * 4096);
        b.mark_dirty(0, 1);
        b.mark_dirty(4096 * 4096 * 10 + 3 * 4096, 2 * 4096 + 1);
        assert!(b.dirty_at(0) && !b.dirty_at(4096));
        let before = groups_visited();
        let pages = harvested(&b);
        let visited = groups_visited() - before;
        let g10 = 4096 * 10;
        assert_eq!(pages, [0, g10 + 3, g10 + 4, g10 + 5]);
        // The two marked groups, not all 64 (the counter is this thread's).
        assert_eq!(visited, 2, "visited {visited} groups");
        assert!(harvested(&b).is_empty());
        assert!(!b.dirty_at(0));
    }

    #[test]
    fn ranges_round_outward_and_stop_at_the_end() {
        let b = GuestPageBitmap::with_len(10 * 4096);
        b.mark_dirty(4095, 2);
        b.mark_dirty(9 * 4096, 1 << 20);
        b.mark_dirty(1 << 30, 1);
        assert_eq!(harvested(&b), [0, 1, 9]);
        b.mark_dirty(0, 0);
        assert!(harvested(&b).is_empty());
    }

    #[test]
    fn a_racing_writer_is_never_lost() {
        let b = std::sync::Arc::new(GuestPageBitmap::with_len(4 * 4096 * 4096));
        let writer = {
            let b = b.clone();
            std::thread::spawn(move || {
                for i in 0..200_000usize {
                    b.mark_dirty((i * 7919 % (4 * 4096 * 4096 / 4096)) * 4096, 1);
                }
            })
        };
        let mut seen = std::collections::BTreeSet::new();
        while !writer.is_finished() {
            seen.extend(harvested(&b));
        }
        writer.join().expect("writer");
        seen.extend(harvested(&b));
        let want: std::collections::BTreeSet<usize> =
            (0..200_000usize).map(|i| i * 7919 % (4 * 4096)).collect();
        assert_eq!(seen, want);
    }
}
