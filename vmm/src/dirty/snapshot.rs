//! The dirty bits a KVM source has fetched for one memory slot but not yet handed to the engine.
//!
//! Both KVM sources keep one per RAM slot: the dirty log fills it at `sync` with
//! `KVM_GET_DIRTY_LOG`, the dirty ring with harvested `(slot, offset)` entries. `peek` copies bits of
//! a GPA range out of it; `claim` takes them (and, for the dirty log, tells KVM which bits to clear).
//! Words use the kernel's layout: bit `i` of word `j` is page `64 * j + i` of the slot. They are
//! kept in a [`DirtyBitmap`] relative to the slot, whose summary lets a peek or a plan walk only
//! the groups that hold bits (the dirty ring fills it a page at a time: then nothing at all is
//! O(slot size)).

use tern_migration::dirty::{extract_bits, DirtyBitmap, DirtyBitmapError, GpaRange, PAGE_SIZE};
use vm_memory::GuestAddress;

/// One slot's fetched-but-unclaimed dirty bits.
#[derive(Debug, Clone)]
pub struct SlotSnapshot {
    slot: u32,
    gpa: u64,
    pages: u64,
    /// Bit `p` is slot page `p` (the bitmap's GPA 0 is the slot's first page).
    bits: DirtyBitmap,
}

/// Bits taken out of a snapshot for one range, aligned to whole words of the slot (the unit
/// `KVM_CLEAR_DIRTY_LOG` wants).
#[derive(Debug)]
pub struct TakenBits {
    /// First page (relative to the slot) of `words[0]`; a multiple of 64.
    pub first_page: u64,
    /// Pages the words cover: a multiple of 64 unless it ends at the slot's end.
    pub num_pages: u64,
    /// The taken bits; bits outside the requested range are zero.
    pub words: Vec<u64>,
}

impl TakenBits {
    /// True when no bit was taken.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }
}

/// Mask of bits `[lo, hi)` within one word (`lo < hi <= 64`).
fn word_mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl SlotSnapshot {
    /// An empty snapshot of slot `slot` covering `pages` pages from `gpa`.
    pub fn new(slot: u32, gpa: u64, pages: u64) -> Self {
        Self {
            slot,
            gpa,
            pages,
            bits: DirtyBitmap::with_pages(pages),
        }
    }

    /// KVM slot number.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Pages in the slot.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Length of the slot in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// Dirty pages held.
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.bits.count()
    }

    /// Forget every bit.
    pub fn clear(&mut self) {
        self.bits.clear();
    }

    /// Replace the bits with a kernel bitmap of this slot (KVM_GET_DIRTY_LOG under manual protect,
    /// where the kernel still holds every bit not yet cleared, so its bitmap is a superset).
    /// Bits past the slot's end are dropped: KVM never sets them.
    pub fn replace(&mut self, kernel: Vec<u64>) {
        self.bits.clear();
        self.or_kernel(&kernel);
    }

    /// OR a kernel bitmap of this slot into the bits (KVM_GET_DIRTY_LOG without manual protect,
    /// which cleared the kernel's copy: bits not claimed yet must survive here).
    pub fn or_kernel(&mut self, kernel: &[u64]) {
        let full = (self.pages / 64) as usize;
        let head = &kernel[..full.min(kernel.len())];
        // The full words cannot run past the end; the partial last word is masked first.
        let mut result = self.bits.or_words(0, head);
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(&last) = kernel.get(full) {
                result = result.and(
                    self.bits
                        .or_words(full as u64 * 64, &[last & ((1u64 << tail) - 1)]),
                );
            }
        }
        debug_assert!(result.is_ok(), "slot-sized words always fit: {result:?}");
    }

    /// Mark page `offset` of the slot dirty (a dirty-ring entry). Returns false (and marks
    /// nothing) when the offset lies past the slot.
    pub fn set_page(&mut self, offset: u64) -> bool {
        if offset >= self.pages {
            return false;
        }
        self.bits.set(offset).is_ok()
    }

    /// The slot pages `[first, end)` that `range` covers, rounded outward to whole pages.
    pub fn page_span(&self, range: GpaRange) -> Option<(u64, u64)> {
        let r = range.intersect(self.gpa, self.len_bytes())?;
        let first = (r.start.0 - self.gpa) / PAGE_SIZE;
        let end = (r.end() - self.gpa).div_ceil(PAGE_SIZE).min(self.pages);
        (first < end).then_some((first, end))
    }

    /// OR the bits of slot pages `[first, end)` into `out` (which must cover those GPAs).
    pub fn or_into(
        &self,
        first: u64,
        end: u64,
        out: &mut DirtyBitmap,
    ) -> Result<(), DirtyBitmapError> {
        if self.bits.count_range(first, end - first) == 0 {
            return Ok(());
        }
        let at = out.page_of(GuestAddress(self.gpa + first * PAGE_SIZE))?;
        out.or_range_from(at, &self.bits, first, end - first)
    }

    fn or_bits_into(
        &self,
        first: u64,
        bits: &[u64],
        out: &mut DirtyBitmap,
    ) -> Result<(), DirtyBitmapError> {
        if bits.iter().all(|&w| w == 0) {
            return Ok(());
        }
        let at = out.page_of(GuestAddress(self.gpa + first * PAGE_SIZE))?;
        out.or_words(at, bits)
    }

    /// The bits of slot pages `[first, end)`, word aligned, without removing them yet (the caller
    /// removes them with [`SlotSnapshot::remove`] once the kernel side is done).
    pub fn take_span(&self, first: u64, end: u64) -> TakenBits {
        let w0 = first / 64;
        let w1 = end.div_ceil(64);
        let words = (w0..w1)
            .map(|w| {
                let lo = first.max(w * 64) - w * 64;
                let hi = end.min(w * 64 + 64) - w * 64;
                self.bits.words()[w as usize] & word_mask(lo, hi)
            })
            .collect();
        TakenBits {
            first_page: w0 * 64,
            num_pages: (w1 * 64).min(self.pages) - w0 * 64,
            words,
        }
    }

    /// OR the bits of `taken` (slot pages `[first, end)`) into `out`.
    pub fn or_taken_into(
        &self,
        taken: &TakenBits,
        first: u64,
        end: u64,
        out: &mut DirtyBitmap,
    ) -> Result<(), DirtyBitmapError> {
        let bits = extract_bits(&taken.words, first - taken.first_page, end - first);
        self.or_bits_into(first, &bits, out)
    }

    /// Remove the bits of `taken` from the snapshot.
    pub fn remove(&mut self, taken: &TakenBits) {
        self.bits
            .clear_words((taken.first_page / 64) as usize, &taken.words);
    }
}

/// One empty snapshot per RAM memory slot of `ram` (slot i = RAM range i).
pub fn slots_for(ram: &crate::vstate::memory::GuestRam) -> Vec<SlotSnapshot> {
    ram.ranges()
        .iter()
        .enumerate()
        .map(|(i, r)| SlotSnapshot::new(i as u32, r.gpa.0, r.len / PAGE_SIZE))
        .collect()
}

/// ORs the snapshot bits of every slot that overlaps `range` into `out` without clearing them:
/// `DirtySource::peek` for both KVM sources.
pub fn peek_slots(
    slots: &[SlotSnapshot],
    range: GpaRange,
    out: &mut DirtyBitmap,
) -> Result<(), tern_migration::dirty::DirtySourceError> {
    for slot in slots {
        if let Some((first, end)) = slot.page_span(range) {
            slot.or_into(first, end, out).map_err(|source| {
                tern_migration::dirty::DirtySourceError::OutputBitmap {
                    kind: tern_migration::dirty::SourceKind::Kvm,
                    range,
                    source,
                }
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(gpa: u64, pages: u64) -> GpaRange {
        GpaRange::new(GuestAddress(gpa), pages * PAGE_SIZE)
    }

    #[test]
    fn take_span_is_word_aligned_and_limited_to_the_span() {
        let mut s = SlotSnapshot::new(0, 0x10_0000, 200);
        for p in [0, 63, 64, 100, 130, 199] {
            assert!(s.set_page(p));
        }
        assert!(!s.set_page(200));
        let t = s.take_span(63, 131);
        assert_eq!(t.first_page, 0);
        assert_eq!(t.num_pages, 192);
        assert_eq!(
            t.words,
            vec![1 << 63, (1 << 0) | (1 << 36), 1 << 2],
            "pages 63, 64, 100, 130"
        );
        s.remove(&t);
        let left: Vec<u64> = (0..200).filter(|&p| s.bits.test(p)).collect();
        assert_eq!(left, vec![0, 199]);
        // A span ending at the slot end may be a partial word.
        let t = s.take_span(128, 200);
        assert_eq!((t.first_page, t.num_pages), (128, 72));
    }

    #[test]
    fn or_into_places_bits_at_their_gpa() {
        let mut s = SlotSnapshot::new(1, 0x1_0000_0000, 1024);
        s.set_page(5);
        s.set_page(700);
        let (first, end) = s
            .page_span(range(0x1_0000_0000 + 4 * PAGE_SIZE, 800))
            .unwrap();
        assert_eq!((first, end), (4, 804));
        let mut out =
            DirtyBitmap::new(GuestAddress(0x1_0000_0000 + 4 * PAGE_SIZE), 800 * PAGE_SIZE).unwrap();
        s.or_into(first, end, &mut out).unwrap();
        assert_eq!(out.iter_pages().collect::<Vec<_>>(), vec![1, 696]);
        let t = s.take_span(first, end);
        let mut out2 = DirtyBitmap::new(GuestAddress(0x1_0000_0000), 1024 * PAGE_SIZE).unwrap();
        s.or_taken_into(&t, first, end, &mut out2).unwrap();
        assert_eq!(out2.iter_pages().collect::<Vec<_>>(), vec![5, 700]);
        // An output that does not cover the bits is an error, not a silent drop.
        let mut small =
            DirtyBitmap::new(GuestAddress(0x1_0000_0000 + 600 * PAGE_SIZE), PAGE_SIZE).unwrap();
        assert!(s.or_into(first, end, &mut small).is_err());
    }

    #[test]
    fn page_span_outside_the_slot_is_none() {
        let s = SlotSnapshot::new(0, 0x10_0000, 16);
        assert_eq!(s.page_span(range(0, 256)), None);
        assert_eq!(s.page_span(range(0x10_0000 + 16 * PAGE_SIZE, 1)), None);
        assert_eq!(s.page_span(range(0x10_0000 - PAGE_SIZE, 2)), Some((0, 1)));
    }

    #[test]
    fn replace_and_or_kernel_drop_bits_past_the_end() {
        let mut s = SlotSnapshot::new(0, 0, 70);
        s.replace(vec![u64::MAX, u64::MAX]);
        assert_eq!(s.count(), 70);
        s.clear();
        s.or_kernel(&[1, u64::MAX]);
        assert_eq!(s.count(), 7);
    }
}
