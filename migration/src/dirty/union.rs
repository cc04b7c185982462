//! Claim one chunk from every source into ONE bitmap: a page two sources report is one bit, so it
//! is read and sent once per iteration (Cloud Hypervisor concatenates the tables instead).

use super::bitmap::DirtyBitmap;
use super::source::{DirtySource, DirtySourceError, GpaRange};

/// Errors of [`claim_union`].
#[derive(Debug, thiserror::Error)]
pub enum ClaimUnionError {
    /// A source failed; the caller must not treat the chunk as clean.
    #[error("claim from a dirty source")]
    Source(#[source] DirtySourceError),
    /// The range does not form a valid bitmap.
    #[error("chunk bitmap")]
    Bitmap(#[source] super::DirtyBitmapError),
}

/// Claim `range` from every source, in slice order, OR-ing all bits into one bitmap over `range`.
/// `counted` is told how many pages each source reported (before the union). Callers order the
/// slice by [`super::SourceKind::claim_rank`] (see [`order_for_claims`]).
pub fn claim_union(
    sources: &mut [Box<dyn DirtySource>],
    range: GpaRange,
    mut counted: impl FnMut(&dyn DirtySource, u64),
) -> Result<DirtyBitmap, ClaimUnionError> {
    let mut union =
        DirtyBitmap::new(range.start, range.len_bytes).map_err(ClaimUnionError::Bitmap)?;
    let mut one = union.clone();
    for s in sources.iter_mut() {
        one.clear();
        s.claim(range, &mut one).map_err(ClaimUnionError::Source)?;
        counted(s.as_ref(), one.count());
        union.or_bitmap(&one).map_err(ClaimUnionError::Bitmap)?;
    }
    Ok(union)
}

/// Put `sources` in claim order (KVM, then DMA, then VMM writes; stable within a kind).
pub fn order_for_claims(sources: &mut [Box<dyn DirtySource>]) {
    sources.sort_by_key(|s| s.kind().claim_rank());
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dirty::{coalesce, SourceKind, PAGE_SIZE};
    use std::collections::BTreeSet;
    use vm_memory::GuestAddress;

    /// A source whose dirty pages (absolute GPAs) are set by the test.
    #[derive(Debug)]
    pub(crate) struct ScriptedSource {
        pub kind: SourceKind,
        pub dirty: BTreeSet<u64>,
        pub fail_claim: bool,
    }

    impl DirtySource for ScriptedSource {
        fn kind(&self) -> SourceKind {
            self.kind
        }
        fn label(&self) -> &str {
            self.kind.as_str()
        }
        fn start(&mut self) -> Result<(), DirtySourceError> {
            Ok(())
        }
        fn stop(&mut self) -> Result<(), DirtySourceError> {
            Ok(())
        }
        fn sync(&mut self) -> Result<(), DirtySourceError> {
            Ok(())
        }
        fn peek(&mut self, r: GpaRange, out: &mut DirtyBitmap) -> Result<bool, DirtySourceError> {
            for &g in self.dirty.range(r.start.0..r.end()) {
                out.mark_range(GuestAddress(g), 1).map_err(|source| {
                    DirtySourceError::OutputBitmap {
                        kind: self.kind,
                        range: r,
                        source,
                    }
                })?;
            }
            Ok(true)
        }
        fn claim(&mut self, r: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError> {
            if self.fail_claim {
                return Err(DirtySourceError::Claim {
                    kind: self.kind,
                    range: r,
                    source: "injected EIO".into(),
                });
            }
            self.peek(r, out)?;
            let taken: Vec<u64> = self.dirty.range(r.start.0..r.end()).copied().collect();
            for g in taken {
                self.dirty.remove(&g);
            }
            Ok(())
        }
    }

    fn scripted(kind: SourceKind, pages: &[u64]) -> Box<dyn DirtySource> {
        Box::new(ScriptedSource {
            kind,
            dirty: pages.iter().map(|p| p * PAGE_SIZE).collect(),
            fail_claim: false,
        })
    }

    #[test]
    fn claim_union_sends_a_page_reported_by_two_sources_once() {
        let mut srcs = vec![
            scripted(SourceKind::Kvm, &[1, 2, 3, 10]),
            scripted(SourceKind::Dma, &[3, 4, 10, 11]),
        ];
        let mut counts = Vec::new();
        let range = GpaRange::new(GuestAddress(0), 64 * PAGE_SIZE);
        let u = claim_union(&mut srcs, range, |s, n| counts.push((s.kind(), n))).expect("claims");
        assert_eq!(u.iter_pages().collect::<Vec<_>>(), vec![1, 2, 3, 4, 10, 11]);
        let pages_sent: u64 = coalesce(&u).runs().iter().map(|r| r.npages).sum();
        assert_eq!(pages_sent, 6, "8 reports, 6 distinct pages");
        assert_eq!(counts, vec![(SourceKind::Kvm, 4), (SourceKind::Dma, 4)]);
        // Claimed bits are gone at both sources.
        let again = claim_union(&mut srcs, range, |_, _| {}).expect("claims");
        assert!(again.is_clean());
    }

    #[test]
    fn claim_union_claims_only_the_chunk() {
        let mut srcs = vec![scripted(SourceKind::Kvm, &[1, 70])];
        let first = GpaRange::new(GuestAddress(0), 64 * PAGE_SIZE);
        let second = GpaRange::new(GuestAddress(64 * PAGE_SIZE), 64 * PAGE_SIZE);
        let a = claim_union(&mut srcs, first, |_, _| {}).expect("claims");
        assert_eq!(a.iter_pages().collect::<Vec<_>>(), vec![1]);
        let b = claim_union(&mut srcs, second, |_, _| {}).expect("claims");
        assert_eq!(b.iter_pages().collect::<Vec<_>>(), vec![6]);
    }

    #[test]
    fn claim_union_write_after_claim_is_reported_next_time() {
        use crate::dirty::GuestPageBitmap;
        use vm_memory::{Bytes, GuestMemoryMmap};
        let mem: GuestMemoryMmap<GuestPageBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * PAGE_SIZE as usize)])
                .expect("memory");
        let mut vmm = crate::dirty::VmmWriteSource::new(&mem).expect("4 KiB pages");
        vmm.start().expect("start");
        let mut srcs: Vec<Box<dyn DirtySource>> =
            vec![scripted(SourceKind::Kvm, &[5]), Box::new(vmm)];
        let range = GpaRange::new(GuestAddress(0), 64 * PAGE_SIZE);
        mem.write_slice(&[1], GuestAddress(5 * PAGE_SIZE))
            .expect("write");
        srcs[1].sync().expect("sync");
        let first = claim_union(&mut srcs, range, |_, _| {}).expect("claims");
        assert_eq!(first.iter_pages().collect::<Vec<_>>(), vec![5]);
        // Written again after its claim: the next claim reports it (through the VMM source).
        mem.write_slice(&[2], GuestAddress(5 * PAGE_SIZE))
            .expect("write");
        srcs[1].sync().expect("sync");
        let second = claim_union(&mut srcs, range, |_, _| {}).expect("claims");
        assert_eq!(second.iter_pages().collect::<Vec<_>>(), vec![5]);
        assert!(claim_union(&mut srcs, range, |_, _| {})
            .expect("claims")
            .is_clean());
    }

    #[test]
    fn claim_union_source_error_is_an_error_not_a_clean_chunk() {
        let mut srcs: Vec<Box<dyn DirtySource>> = vec![
            scripted(SourceKind::Kvm, &[1]),
            Box::new(ScriptedSource {
                kind: SourceKind::Dma,
                dirty: BTreeSet::new(),
                fail_claim: true,
            }),
        ];
        let range = GpaRange::new(GuestAddress(0), 64 * PAGE_SIZE);
        assert!(matches!(
            claim_union(&mut srcs, range, |_, _| {}),
            Err(ClaimUnionError::Source(DirtySourceError::Claim { .. }))
        ));
    }
}
