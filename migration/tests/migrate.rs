//! End-to-end migrations between two threads over real sockets, with a guest thread dirtying
//! memory throughout; the destination's memory must equal the source's at the end.

mod common;

#[cfg(test)]
mod tests {
    use super::common::*;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use tern_migration::dirty::{DirtyBitmap, GpaRange, PAGE_SIZE};
    use tern_migration::engine::{MigrationStatus, SendParams};
    use tern_migration::transport::MigrationUrl;
    use vm_memory::{Bytes, GuestAddress};

    fn check_success(r: &Run, src_mem: &Mem) {
        if let Err(e) = &r.src {
            panic!("source failed: {}", tern_migration::engine::error_chain(e));
        }
        let target = match &r.dst {
            Ok(t) => t,
            Err(e) => panic!(
                "destination failed: {}",
                tern_migration::engine::error_chain(e)
            ),
        };
        assert_same_memory(src_mem, &target.guest_memory());
        assert_eq!(
            r.factory.restored.lock().expect("lock").clone(),
            Some(expected_state())
        );
        assert!(r.factory.started.load(Ordering::SeqCst));
        let s = r.src_stats.snapshot();
        assert_eq!(s.status, MigrationStatus::Completed);
        let downtime_ms = s.downtime_ms.expect("a completed migration's downtime");
        // The switchover's steps follow each other within the downtime.
        let t = s
            .switchover
            .expect("a completed migration's switchover breakdown");
        let steps_us = t.pause_us
            + t.final_pass_us
            + t.state_save_us
            + t.send_us
            + t.destination_restore_us
            + t.destination_start_us;
        assert!(
            steps_us / 1000 <= downtime_ms && downtime_ms <= steps_us / 1000 + 1,
            "steps {steps_us} µs against a downtime of {downtime_ms} ms: {t:?}"
        );
        assert!(t.final_claim_us <= t.final_pass_us, "{t:?}");
        assert_eq!(r.dst_stats.snapshot().status, MigrationStatus::Completed);
    }

    /// Migrates `host` over a Unix socket to a default destination with `tweak`ed parameters and
    /// checks that it completed with equal memory.
    fn migrate_over_unix(host: FakeHost, tweak: impl FnOnce(&mut SendParams)) -> Run {
        let mem = host.mem.clone();
        let r = run(
            MigrationUrl::Unix(sock_path()),
            host,
            FakeFactory::default(),
            tweak,
        );
        check_success(&r, &mem);
        r
    }

    #[test]
    fn migrate_over_unix_with_dirtying_guest_matches_memory() {
        let host = FakeHost::new(anon_memory(), 256, 20);
        let mem = host.mem.clone();
        let guest = host.guest.ctl.clone();
        let path = sock_path();
        let r = run(
            MigrationUrl::Unix(path),
            host,
            FakeFactory::default(),
            |_| {},
        );
        check_success(&r, &mem);
        let s = r.src_stats.snapshot();
        assert!(
            guest.writes.load(Ordering::Relaxed) > 0,
            "the guest ran during the migration"
        );
        assert!(s.dirty_pages.kvm > 0 && s.dirty_pages.vmm > 0, "{s:?}");
        // Never-written pages travel as markers (the idle test checks the volume).
        assert!(s.zero_pages > 0, "{s:?}");
        assert_eq!(
            s.sent_from_file_bytes, 0,
            "anonymous memory has no file to send from"
        );
    }

    #[test]
    fn migrate_over_unix_sends_file_backed_pages_from_the_file() {
        // Guest memory in a shared file, as the VMM has it: the kernel sends page data from the
        // file (sendfile, by reference) while the guest keeps writing. A page rewritten after
        // its send may arrive newer than its sum; the destination must still end up equal.
        let host = FakeHost::new(shared_memory(), 256, 20);
        let mem = host.mem.clone();
        let guest = host.guest.ctl.clone();
        let r = migrate_over_unix(host, |p| p.page_checksums = true);
        let s = r.src_stats.snapshot();
        assert!(guest.writes.load(Ordering::Relaxed) > 0, "the guest ran");
        assert!(s.data_pages > 0, "{s:?}");
        // Runs of 64 KiB and more go from the file; scattered pages are written together by
        // one writev, which costs less than a sendfile call each.
        assert!(
            s.sent_from_file_bytes > 0 && s.sent_from_file_bytes < s.data_pages * 4096,
            "long runs from the file, scattered pages copied: {s:?}"
        );
        // The kernel sends the pages: the lane's thread has no page reads to hand over.
        assert_eq!(s.read_ahead_pages, 0, "{s:?}");
        // The destination heard what the source has populated and faulted in only that: never
        // a page the source does not have.
        let d = r.dst_stats.snapshot();
        assert!(d.populated_hint_bytes > 0, "{d:?}");
        assert!(d.prefaulted_bytes <= d.populated_hint_bytes, "{d:?}");
        let target = r.dst.as_ref().expect("destination");
        for &(base, len) in &REGIONS {
            let range = GpaRange::new(GuestAddress(base), len as u64);
            let populated = |m: &Mem| {
                let mut b = DirtyBitmap::new(GuestAddress(base), len as u64).expect("bitmap");
                pagemap_populated(m, range, &mut b).expect("pagemap");
                b
            };
            let (src, dst) = (populated(&mem), populated(&target.guest_memory()));
            for (i, (s, d)) in src.words().iter().zip(dst.words()).enumerate() {
                assert_eq!(d & !s, 0, "word {i} of {base:#x}: destination-only pages");
            }
            assert!(dst.count() > 0);
        }
    }

    #[test]
    fn migrate_over_unix_copies_pages_from_a_file_that_cannot_be_spliced() {
        // Guest memory in a file the kernel refuses to `sendfile` from: the first send is
        // refused before any byte moved, and that lane copies from the mapping from then on.
        let host = FakeHost::hot_set(secret_memory_of(&[(0, 4 << 20)]), 256, 20);
        let r = migrate_over_unix(host, |p| p.page_checksums = true);
        let s = r.src_stats.snapshot();
        assert!(s.data_pages > 0, "{s:?}");
        assert_eq!(s.sent_from_file_bytes, 0, "{s:?}");
    }

    #[test]
    fn migrate_with_page_checksums_matches_memory() {
        let mut host = FakeHost::new(anon_memory(), 256, 20);
        // Also the path without a populated hint: every page is read in iteration 0.
        host.use_populated_hint = false;
        migrate_over_unix(host, |p| {
            p.page_checksums = true;
            p.connections = 2;
        });
    }

    #[test]
    fn migrate_over_tcp_with_three_connections_matches_memory() {
        let host = FakeHost::new(anon_memory(), 512, 10);
        let mem = host.mem.clone();
        let url = MigrationUrl::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        };
        let r = run(url, host, FakeFactory::default(), |p| p.connections = 3);
        check_success(&r, &mem);
        assert!(r.src_stats.snapshot().transferred_bytes > 0);
    }

    #[test]
    fn migrate_over_tcp_reads_pages_ahead_of_the_sending_lane() {
        // 32 MiB of data pages, one connection, page sums on: the lane's helper reads (zero
        // check, sums) each queued batch while the lane sends the one before, and every page
        // still arrives equal, the hot ones included.
        let mem = anon_memory_of(&[(0, 32 << 20)]);
        for p in 0..(32 << 20) / PAGE_SIZE {
            mem.write_slice(&p.to_le_bytes(), GuestAddress(p * PAGE_SIZE))
                .expect("fill");
        }
        let host = FakeHost::hot_set(mem.clone(), 64, 50);
        let url = MigrationUrl::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        };
        let r = run(url, host, FakeFactory::default(), |p| {
            p.page_checksums = true;
            p.connections = 1;
        });
        check_success(&r, &mem);
        let s = r.src_stats.snapshot();
        assert!(s.data_pages >= (32 << 20) / PAGE_SIZE, "{s:?}");
        assert!(s.read_ahead_pages > 0, "no batch was read ahead: {s:?}");
        assert!(s.read_ahead_pages <= s.data_pages + s.zero_pages, "{s:?}");
    }

    #[test]
    fn migrate_idle_guest_sends_populated_pages_only() {
        let host = FakeHost::new(anon_memory(), 1, 1_000_000);
        let mem = host.mem.clone();
        let url = MigrationUrl::Tcp {
            host: "127.0.0.1".into(),
            port: 0,
        };
        let r = run(url, host, FakeFactory::default(), |_| {});
        check_success(&r, &mem);
        let s = r.src_stats.snapshot();
        // A third of the pages were prefilled; the rest are zero markers.
        let pages = s.total_bytes / 4096;
        assert!(
            s.data_pages >= pages / 3 && s.data_pages <= pages / 3 + 16,
            "{s:?}"
        );
        assert!(s.zero_pages >= pages - pages / 3 - 16, "{s:?}");
    }

    #[test]
    fn migrate_local_hands_over_memory_without_copy() {
        let host = FakeHost::new(shared_memory(), 64, 50);
        let mem = host.mem.clone();
        let r = migrate_over_unix(host, |p| p.local = true);
        assert_eq!(r.factory.got_local_regions, 2);
        let s = r.src_stats.snapshot();
        assert_eq!(
            s.data_pages + s.zero_pages,
            0,
            "local mode sends no pages: {s:?}"
        );
        // Same pages, not a copy: a write on one side is visible on the other.
        let target = r.dst.as_ref().expect("destination");
        mem.write_slice(b"shared!", GuestAddress((1 << 32) + 123))
            .expect("write");
        let mut got = [0u8; 7];
        target
            .guest_memory()
            .read_slice(&mut got, GuestAddress((1 << 32) + 123))
            .expect("read");
        assert_eq!(&got, b"shared!");
    }

    #[test]
    fn migrate_with_cap_and_auto_converge_throttles_then_completes() {
        // ~32 000 pages/s into a 1 MiB hot set against a 5 MB/s (1220 pages/s) link: only a
        // throttle of about 97 % or more lets the dirty set shrink below the downtime limit.
        let host = FakeHost::new(anon_memory(), 256, 1000);
        let log = host.log.clone();
        let r = migrate_over_unix(host, |p| {
            p.auto_converge = true;
            p.downtime_ms = 150;
            p.max_bandwidth_mbps = 40;
            p.timeout = Duration::from_secs(60);
        });
        let ev = log.events();
        assert!(ev.iter().any(|e| e == "throttle 20"), "{ev:?}");
        assert_eq!(
            ev.last().map(String::as_str),
            Some("throttle 0"),
            "throttle removed at the end: {ev:?}"
        );
        let s = r.src_stats.snapshot();
        assert!(s.bandwidth_bytes_per_sec <= 5_000_000, "{s:?}");
    }
}
