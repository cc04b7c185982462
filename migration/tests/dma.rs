//! Device DMA behind the vCPUs' back: a fake device writes guest pages through its own mapping
//! (invisible to the KVM log and the VMM bitmap) while the guest dirties memory. Its dirty source
//! must bring every write to the destination; the same run with the device's writes unreported
//! must lose some (the negative control, which shows the test can fail).

mod common;

#[cfg(test)]
mod tests {
    use super::common::dma::FakeDma;
    use super::common::*;
    use tern_migration::dirty::{
        DirtyBitmap, DirtySource, DirtySourceError, GpaRange, SourceKind, PAGE_SIZE,
    };
    use tern_migration::engine::{error_chain, MigrationStatus, PassKind};
    use tern_migration::transport::MigrationUrl;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    /// The DMA window: 2 MiB in the middle of region 0, spanning a chunk boundary.
    const DMA_BASE: u64 = 7 << 20;
    const DMA_PAGES: u64 = 512;

    /// Pages whose bytes differ between the two memories.
    fn differing_pages(a: &Mem, b: &Mem) -> u64 {
        let mut x = vec![0u8; PAGE_SIZE as usize];
        let mut y = vec![0u8; PAGE_SIZE as usize];
        let mut n = 0;
        for r in a.iter() {
            for p in 0..r.len() / PAGE_SIZE {
                let g = GuestAddress(r.start_addr().0 + p * PAGE_SIZE);
                vm_memory::Bytes::read_slice(a, &mut x, g).expect("read source");
                vm_memory::Bytes::read_slice(b, &mut y, g).expect("read destination");
                n += u64::from(x != y);
            }
        }
        n
    }

    /// Migrates a guest whose fake device DMAs into [`DMA_BASE`] during pre-copy; returns
    /// (pages that differ at the end, the run, the device).
    fn migrate_with_dma(tracked: bool) -> (u64, Run, std::sync::Arc<FakeDma>) {
        let mem = shared_memory();
        let mut host = FakeHost::hot_set(mem.clone(), 64, 50);
        // The pagemap hint sees only pages mapped in the source's own mapping, not those the
        // device wrote through its mapping before tracking began (tern asks the memfd with
        // SEEK_DATA, which sees both): read every page in the full pass.
        host.use_populated_hint = false;
        let dev = FakeDma::new(&mem, tracked);
        let engine = dev.start(DMA_BASE, DMA_PAGES, 30);
        host.dma = Some(dev.clone());
        let r = run(
            MigrationUrl::Unix(sock_path()),
            host,
            FakeFactory::default(),
            |p| {
                p.chunk_bytes = 1 << 20;
                p.downtime_ms = 1;
                p.timeout = std::time::Duration::from_millis(600);
                p.timeout_strategy = tern_migration::engine::TimeoutStrategy::Ignore;
                // Untracked, a page the device writes while it is being sent fails its sum and is
                // never resent, so the receiver fails the migration (page sums catching the
                // missing tracking: ~200 of the 512 pages in one run here); how many tear is
                // timing. The control wants the writes lost silently, which only checks can see.
                p.page_checksums = tracked;
            },
        );
        dev.stop();
        engine.join().expect("device thread");
        if let Err(e) = &r.src {
            panic!("source failed: {}", error_chain(e));
        }
        let target = match &r.dst {
            Ok(t) => t.guest_memory(),
            Err(e) => panic!("destination failed: {}", error_chain(e)),
        };
        (differing_pages(&mem, &target), r, dev)
    }

    #[test]
    fn dma_writes_during_precopy_all_reach_the_destination() {
        let (differ, r, dev) = migrate_with_dma(true);
        let s = r.src_stats.snapshot();
        assert_eq!(differ, 0, "pages lost");
        assert_eq!(s.status, MigrationStatus::Completed);
        assert!(dev.writes.load(std::sync::atomic::Ordering::Relaxed) > 100);
        assert!(s.dirty_pages.dma > 0, "{s:?}");
        assert_eq!(
            s.dma_pages_by_source.get("fake-iommu: dev0"),
            Some(&s.dirty_pages.dma)
        );
        // Per pass history: a full pass, dirty passes that carried DMA pages, one final pass.
        assert_eq!(s.history.first().map(|h| h.pass), Some(PassKind::Full));
        assert_eq!(s.history.last().map(|h| h.pass), Some(PassKind::Final));
        assert!(
            s.history
                .iter()
                .any(|h| h.pass == PassKind::Dirty && h.dirty_pages.dma > 0),
            "{:?}",
            s.history
        );
        // The device was stopped before the final pass claimed anything: every claim of the
        // final pass ran with the device paused, and no earlier one did.
        let claims = dev.claims.lock().expect("claims");
        let paused: Vec<bool> = claims.iter().map(|c| c.0).collect();
        let first_paused = paused.iter().position(|&p| p).expect("a final claim");
        assert!(paused[first_paused..].iter().all(|&p| p), "{paused:?}");
        assert!(r.factory.started.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn untracked_dma_loses_writes_negative_control() {
        let (differ, _r, dev) = migrate_with_dma(false);
        assert!(dev.writes.load(std::sync::atomic::Ordering::Relaxed) > 100);
        assert!(
            differ > 0,
            "an untracked device's writes must be lost, or this test proves nothing"
        );
    }

    /// A DMA source that, when chunk 1 is claimed, writes a page of chunk 0 — already claimed and
    /// read in the same pass — as a device write landing between two chunk claims would.
    struct BetweenChunks {
        dev: std::sync::Arc<FakeDma>,
        inner: Box<dyn DirtySource>,
        page: u64,
        trigger: u64,
        fired: bool,
    }

    impl DirtySource for BetweenChunks {
        fn kind(&self) -> SourceKind {
            SourceKind::Dma
        }
        fn label(&self) -> &str {
            "between-chunks"
        }
        fn start(&mut self) -> Result<(), DirtySourceError> {
            self.inner.start()
        }
        fn stop(&mut self) -> Result<(), DirtySourceError> {
            self.inner.stop()
        }
        fn sync(&mut self) -> Result<(), DirtySourceError> {
            self.inner.sync()
        }
        fn peek(&mut self, r: GpaRange, out: &mut DirtyBitmap) -> Result<bool, DirtySourceError> {
            self.inner.peek(r, out)
        }
        fn claim(&mut self, r: GpaRange, out: &mut DirtyBitmap) -> Result<(), DirtySourceError> {
            if !self.fired && r.start.0 == self.trigger {
                self.fired = true;
                self.dev.write_page(self.page, 0xfeed);
            }
            self.inner.claim(r, out)
        }
    }

    #[test]
    fn dma_write_between_two_chunk_claims_is_sent_in_a_later_pass() {
        for tracked in [true, false] {
            let mem = shared_memory();
            let dev = FakeDma::new(&mem, tracked);
            // An idle guest: only the device writes, once, during the full pass.
            let mut host = FakeHost::hot_set(mem.clone(), 0, 1000);
            let source = BetweenChunks {
                dev: dev.clone(),
                inner: dev.source(),
                page: 0x1000,
                trigger: 1 << 20,
                fired: false,
            };
            host.extra_sources.push(Box::new(source));
            let r = run(
                MigrationUrl::Unix(sock_path()),
                host,
                FakeFactory::default(),
                |p| p.chunk_bytes = 1 << 20,
            );
            if let Err(e) = &r.src {
                panic!("source failed: {}", error_chain(e));
            }
            let target = r.dst.as_ref().map(|t| t.guest_memory()).expect("target");
            let differ = differing_pages(&mem, &target);
            if tracked {
                assert_eq!(differ, 0, "the write after chunk 0's claim was lost");
                assert_eq!(r.src_stats.snapshot().dirty_pages.dma, 1);
            } else {
                assert_eq!(differ, 1, "negative control: the unreported write is lost");
            }
        }
    }
}
