//! A second level over a word bitmap: one bit per group of [`GROUP_WORDS`] words (4096 pages,
//! 16 MiB of guest memory). A clear summary bit promises that the group's words are all zero; a
//! set one only says they may not be. Walking the summary instead of the words is what keeps the
//! switchover's bitmap work proportional to what was dirtied, not to the guest: a 64 GiB guest
//! has 256 Ki words of dirty bits but 64 summary words.
//!
//! Every walk over marked groups is counted ([`groups_visited`], per thread) so that tests can
//! show the work does not grow with the guest without timing anything.

use std::cell::Cell;

/// Words of dirty bits one summary bit covers.
pub const GROUP_WORDS: usize = 64;

thread_local! {
    static GROUPS_VISITED: Cell<u64> = const { Cell::new(0) };
}

/// How many bitmap groups this thread has walked so far. Tests compare two readings taken on the
/// thread doing the work (the migration engine's, for a switchover): a receiver in the same
/// process walking its own bitmaps does not count.
pub fn groups_visited() -> u64 {
    GROUPS_VISITED.with(Cell::get)
}

/// Counts `n` visited groups (for the atomic guest bitmap's walks too).
pub(crate) fn count_visits(n: u64) {
    GROUPS_VISITED.with(|c| c.set(c.get() + n));
}

/// The summary bits of a plain (single-owner) word bitmap.
#[derive(Clone, Default)]
pub struct WordSummary {
    bits: Vec<u64>,
}

impl WordSummary {
    /// A clear summary for a bitmap of `words` words.
    pub fn new(words: usize) -> Self {
        WordSummary {
            bits: vec![0; words.div_ceil(GROUP_WORDS).div_ceil(64)],
        }
    }

    /// Marks the group holding word `word`.
    #[inline]
    pub fn mark(&mut self, word: usize) {
        let g = word / GROUP_WORDS;
        if let Some(b) = self.bits.get_mut(g / 64) {
            *b |= 1 << (g % 64);
        }
    }

    /// Marks every group holding a non-zero word of `src`, whose first word is word `w0`.
    pub fn mark_nonzero(&mut self, w0: usize, src: &[u64]) {
        let mut j = 0;
        while j < src.len() {
            // Up to the end of the group word `w0 + j` is in.
            let n = (GROUP_WORDS - (w0 + j) % GROUP_WORDS).min(src.len() - j);
            if src[j..j + n].iter().any(|&w| w != 0) {
                self.mark(w0 + j);
            }
            j += n;
        }
    }

    /// Unmarks group `group` (its words must be zero).
    pub fn unmark(&mut self, group: usize) {
        if let Some(b) = self.bits.get_mut(group / 64) {
            *b &= !(1 << (group % 64));
        }
    }

    /// Unmarks every group.
    pub fn clear(&mut self) {
        self.bits.fill(0);
    }

    /// The word spans `[start, end)` of the marked groups that intersect words `[w0, w1)`, clipped
    /// to it, in ascending order.
    pub fn spans(&self, w0: usize, w1: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let g0 = w0 / GROUP_WORDS;
        let g1 = w1.div_ceil(GROUP_WORDS);
        let mut g = g0;
        std::iter::from_fn(move || {
            while g < g1 {
                let word = self.bits.get(g / 64).copied().unwrap_or(0) >> (g % 64);
                if word == 0 {
                    // Nothing marked in the rest of this summary word.
                    g = (g / 64 + 1) * 64;
                    continue;
                }
                g += word.trailing_zeros() as usize;
                if g >= g1 {
                    break;
                }
                let span = ((g * GROUP_WORDS).max(w0), ((g + 1) * GROUP_WORDS).min(w1));
                g += 1;
                count_visits(1);
                return Some(span);
            }
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_list_exactly_the_marked_groups_clipped() {
        let mut s = WordSummary::new(GROUP_WORDS * 200);
        for w in [
            5,
            GROUP_WORDS * 3 + 1,
            GROUP_WORDS * 64,
            GROUP_WORDS * 199 + 63,
        ] {
            s.mark(w);
        }
        let all: Vec<_> = s.spans(0, GROUP_WORDS * 200).collect();
        assert_eq!(
            all,
            [
                (0, GROUP_WORDS),
                (GROUP_WORDS * 3, GROUP_WORDS * 4),
                (GROUP_WORDS * 64, GROUP_WORDS * 65),
                (GROUP_WORDS * 199, GROUP_WORDS * 200),
            ]
        );
        let clipped: Vec<_> = s.spans(10, GROUP_WORDS * 64 + 3).collect();
        assert_eq!(
            clipped,
            [
                (10, GROUP_WORDS),
                (GROUP_WORDS * 3, GROUP_WORDS * 4),
                (GROUP_WORDS * 64, GROUP_WORDS * 64 + 3)
            ]
        );
        s.unmark(3);
        assert_eq!(s.spans(GROUP_WORDS, GROUP_WORDS * 60).count(), 0);
        s.clear();
        assert_eq!(s.spans(0, GROUP_WORDS * 200).count(), 0);
    }

    #[test]
    fn mark_nonzero_marks_only_groups_with_bits() {
        let mut s = WordSummary::new(GROUP_WORDS * 4);
        let mut src = vec![0u64; GROUP_WORDS * 2];
        src[GROUP_WORDS + 7] = 1;
        // Starting mid-group: src word j is word 32 + j.
        s.mark_nonzero(32, &src);
        let spans: Vec<_> = s.spans(0, GROUP_WORDS * 4).collect();
        assert_eq!(spans, [(GROUP_WORDS, GROUP_WORDS * 2)]);
    }
}
