//! Failure paths: cancel, timeout, a destination that dies or rejects, a failing dirty source,
//! and a receiver fed truncated, corrupted or foreign streams. In every case the source VM must
//! end up running and both sides must say why.

mod common;

#[cfg(test)]
mod tests {
    use super::common::*;
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tern_migration::dirty::PAGE_SIZE;
    use tern_migration::engine::{
        error_chain, receive_on, start_send, MigrationError, MigrationOutcome, MigrationStats,
        MigrationStatsSnapshot, MigrationStatus, SendParams, TimeoutStrategy,
    };
    use tern_migration::protocol::{
        preamble, read_preamble, Frame, FrameReader, FrameWriter, Hello, MemoryEntry, PageEncoding,
        ProtocolError,
    };
    use tern_migration::transport::{Connection, MigrationListener, MigrationUrl};
    use vm_memory::{Bytes, GuestAddress};

    fn listener() -> MigrationListener {
        MigrationListener::bind(&MigrationUrl::Unix(sock_path())).expect("bind")
    }

    fn spawn_receiver(
        l: MigrationListener,
        factory: FakeFactory,
    ) -> std::thread::JoinHandle<Result<(), MigrationError>> {
        std::thread::spawn(move || {
            let mut f = factory;
            let stats = MigrationStats::new();
            let r = receive_on(&l, &mut f, &stats).map(|_| ());
            if r.is_err() {
                assert_eq!(stats.snapshot().status, MigrationStatus::Failed);
                assert!(stats.snapshot().error.is_some());
            }
            r
        })
    }

    fn params(url: &MigrationUrl) -> SendParams {
        let mut p = SendParams::new(url.clone());
        p.chunk_bytes = 1 << 20;
        p.downtime_ms = 20;
        p
    }

    fn source_err(out: &MigrationOutcome) -> String {
        match &out.result {
            Err(e) => error_chain(e),
            Ok(()) => panic!("migration unexpectedly succeeded"),
        }
    }

    /// The host ends running: never paused, or paused and then resumed.
    fn assert_source_running(log: &HostLog, guest: &Arc<GuestCtlView>) {
        let ev = log.events();
        let pauses = ev.iter().filter(|e| *e == "pause").count();
        let resumes = ev.iter().filter(|e| *e == "resume").count();
        assert_eq!(pauses, resumes, "{ev:?}");
        assert!(!guest.is_paused(), "guest still paused: {ev:?}");
    }

    type GuestCtlView = FakeGuestView;

    #[test]
    fn cancel_mid_migration_resumes_source_and_tells_destination() {
        let l = listener();
        let url = l.url().clone();
        let dst = spawn_receiver(l, FakeFactory::default());
        let host = FakeHost::new(anon_memory(), 2048, 1);
        let (log, view) = (host.log.clone(), FakeGuestView::of(&host));
        let stats = Arc::new(MigrationStats::new());
        let mut p = params(&url);
        p.max_bandwidth_mbps = 8; // 1 MB/s: far too slow to finish before the cancel
        let h = start_send(Box::new(host), p, stats.clone()).expect("spawn");
        let t = Instant::now();
        while stats.snapshot().transferred_bytes < 100_000 && t.elapsed() < Duration::from_secs(20)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(stats.snapshot().status, MigrationStatus::Active);
        stats.cancel();
        let out = h.join().expect("source thread");
        assert!(matches!(out.result, Err(MigrationError::Cancelled)));
        let snap = stats.snapshot();
        assert_eq!(snap.status, MigrationStatus::Cancelled);
        assert_eq!(snap.error.as_deref(), Some("migration cancelled"));
        assert_source_running(&log, &view);
        let d = dst.join().expect("destination thread");
        let e = error_chain(&d.expect_err("destination must fail"));
        assert!(
            e.contains("source reported: source: migration cancelled"),
            "{e}"
        );
    }

    #[test]
    fn receiver_cancel_while_waiting_for_a_source() {
        let l = listener();
        let stats = Arc::new(MigrationStats::new());
        let s2 = stats.clone();
        let dst = std::thread::spawn(move || {
            let mut f = FakeFactory::default();
            receive_on(&l, &mut f, &s2).map(|_| ())
        });
        std::thread::sleep(Duration::from_millis(100));
        stats.cancel();
        let r = dst.join().expect("receiver thread");
        assert!(matches!(r, Err(MigrationError::Cancelled)), "{r:?}");
        assert_eq!(stats.snapshot().status, MigrationStatus::Cancelled);
    }

    #[test]
    fn receiver_cancel_mid_migration_tells_source_which_resumes() {
        let l = listener();
        let url = l.url().clone();
        let dst_stats = Arc::new(MigrationStats::new());
        let ds = dst_stats.clone();
        let dst = std::thread::spawn(move || {
            let mut f = FakeFactory::default();
            receive_on(&l, &mut f, &ds).map(|_| ())
        });
        let host = FakeHost::new(anon_memory(), 2048, 1);
        let (log, view) = (host.log.clone(), FakeGuestView::of(&host));
        let mut p = params(&url);
        p.max_bandwidth_mbps = 8;
        let src = start_send(Box::new(host), p, Arc::new(MigrationStats::new())).expect("spawn");
        let t = Instant::now();
        while dst_stats.snapshot().transferred_bytes < 100_000
            && t.elapsed() < Duration::from_secs(20)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        dst_stats.cancel();
        let r = dst.join().expect("receiver thread");
        assert!(matches!(r, Err(MigrationError::Cancelled)), "{r:?}");
        assert_eq!(dst_stats.snapshot().status, MigrationStatus::Cancelled);
        let out = src.join().expect("source thread");
        let e = source_err(&out);
        assert!(
            e.contains("destination reported: destination: migration cancelled"),
            "{e}"
        );
        assert_source_running(&log, &view);
    }

    #[test]
    fn timeout_with_cancel_strategy_fails_and_keeps_source_running() {
        let l = listener();
        let url = l.url().clone();
        let dst = spawn_receiver(l, FakeFactory::default());
        let host = FakeHost::new(anon_memory(), 2048, 1);
        let (log, view) = (host.log.clone(), FakeGuestView::of(&host));
        let stats = Arc::new(MigrationStats::new());
        let mut p = params(&url);
        p.max_bandwidth_mbps = 80;
        p.downtime_ms = 1;
        p.timeout = Duration::from_millis(500);
        p.timeout_strategy = TimeoutStrategy::Cancel;
        let out = start_send(Box::new(host), p, stats.clone())
            .expect("spawn")
            .join()
            .expect("source thread");
        assert!(
            matches!(out.result, Err(MigrationError::Timeout { .. })),
            "{}",
            source_err(&out)
        );
        assert_eq!(stats.snapshot().status, MigrationStatus::Failed);
        assert!(stats
            .snapshot()
            .error
            .unwrap_or_default()
            .contains("timed out"));
        assert_source_running(&log, &view);
        assert!(dst.join().expect("destination thread").is_err());
    }

    #[test]
    fn timeout_with_ignore_strategy_switches_over_and_matches() {
        let l = listener();
        let url = l.url().clone();
        let factory = FakeFactory::default();
        let (restored, started) = (factory.restored.clone(), factory.started.clone());
        let dst = std::thread::spawn(move || {
            let mut f = factory;
            receive_on(&l, &mut f, &MigrationStats::new())
        });
        let host = FakeHost::new(anon_memory(), 2048, 1);
        let mem = host.mem.clone();
        let mut p = params(&url);
        p.downtime_ms = 0;
        p.max_bandwidth_mbps = 400;
        p.timeout = Duration::from_millis(300);
        p.timeout_strategy = TimeoutStrategy::Ignore;
        let stats = Arc::new(MigrationStats::new());
        let out = start_send(Box::new(host), p, stats.clone())
            .expect("spawn")
            .join()
            .expect("source thread");
        out.result.expect("switchover forced by the timeout");
        let target = dst
            .join()
            .expect("destination thread")
            .expect("destination");
        assert_same_memory(&mem, &target.guest_memory());
        assert!(restored.lock().expect("lock").is_some());
        assert!(started.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// A destination that reads `limit` bytes and then vanishes.
    fn dying_destination(l: MigrationListener, limit: usize) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut c = l.accept().expect("accept");
            c.write_all(&preamble()).expect("preamble");
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0;
            while got < limit {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            drop(c);
            drop(l);
        })
    }

    #[test]
    fn destination_dies_mid_stream_source_keeps_running() {
        let l = listener();
        let url = l.url().clone();
        let dst = dying_destination(l, 3 << 20);
        let host = FakeHost::new(anon_memory(), 256, 20);
        let (log, view) = (host.log.clone(), FakeGuestView::of(&host));
        let stats = Arc::new(MigrationStats::new());
        let out = start_send(Box::new(host), params(&url), stats.clone())
            .expect("spawn")
            .join()
            .expect("source thread");
        let e = source_err(&out);
        assert!(
            e.contains("destination") || e.contains("pipe") || e.contains("reset"),
            "{e}"
        );
        assert_eq!(stats.snapshot().status, MigrationStatus::Failed);
        assert_source_running(&log, &view);
        dst.join().expect("destination thread");
    }

    /// Runs a migration of `mem` to a destination that handshakes, then never reads again and
    /// never closes; returns the source's stats once it failed (by the 2 s deadline).
    fn migrate_to_a_destination_that_stops_reading(mem: Mem) -> MigrationStatsSnapshot {
        let l = listener();
        let url = l.url().clone();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let dst = std::thread::spawn(move || {
            let mut c = l.accept().expect("accept");
            c.write_all(&preamble()).expect("preamble");
            read_preamble(&mut c).expect("source preamble");
            let _ = stop_rx.recv();
            drop(c);
        });
        let host = FakeHost::new(mem, 64, 50);
        let (log, view) = (host.log.clone(), FakeGuestView::of(&host));
        let mut p = params(&url);
        p.ack_timeout = Duration::from_secs(2);
        let stats = Arc::new(MigrationStats::new());
        let t = Instant::now();
        let out = start_send(Box::new(host), p, stats.clone())
            .expect("spawn")
            .join()
            .expect("source thread");
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
        let e = source_err(&out);
        assert!(e.contains("it took no data for 2 s"), "{e}");
        assert_source_running(&log, &view);
        let _ = stop_tx.send(());
        dst.join().expect("destination thread");
        stats.snapshot()
    }

    /// Puts data in every page of `mem` (laid out as `REGIONS`), so that the migration has more
    /// to send than a socket holds; returns the bytes.
    fn fill_every_page(mem: &Mem) -> u64 {
        let mut data = 0;
        for &(gpa, len) in &REGIONS {
            for page in (gpa..gpa + len as u64).step_by(PAGE_SIZE as usize) {
                mem.write_slice(&[0x5a], GuestAddress(page)).expect("fill");
                data += PAGE_SIZE;
            }
        }
        data
    }

    #[test]
    fn destination_that_stops_reading_fails_the_source_by_the_deadline() {
        let mem = anon_memory();
        fill_every_page(&mem);
        migrate_to_a_destination_that_stops_reading(mem);
    }

    /// The same with page data sent by `sendfile` from a memory file, and more of it than the
    /// socket holds: a lane blocked inside the kernel's splice into the full socket must be woken
    /// by the deadline's shutdown too.
    #[test]
    fn destination_that_stops_reading_fails_a_sendfile_source_by_the_deadline() {
        let mem = shared_memory();
        let data = fill_every_page(&mem);
        let s = migrate_to_a_destination_that_stops_reading(mem);
        assert!(s.sent_from_file_bytes > 0, "{s:?}");
        assert!(
            s.sent_from_file_bytes < data,
            "the socket took all {data} bytes: nothing blocked ({s:?})"
        );
    }

    #[test]
    fn destination_dies_before_ready_source_resumes() {
        // Reads everything up to Complete, then closes without saying it is ready.
        let l = listener();
        let url = l.url().clone();
        let dst = std::thread::spawn(move || {
            let mut c = l.accept().expect("accept");
            c.write_all(&preamble()).expect("preamble");
            read_preamble(&mut c).expect("source preamble");
            let mut ack = FrameWriter::new(c.try_clone().expect("clone"));
            let mut r = FrameReader::new(c);
            loop {
                match r.recv() {
                    // Ack the config like a real destination, then die before the final ack.
                    Ok(Frame::Config(_)) => {
                        ack.send(&Frame::Ack).expect("config ack");
                    }
                    // A page the running guest rewrote while it was sent (it is sent again); the
                    // buffered reader read the whole frame, so the stream is still in step.
                    Err(ProtocolError::PageSum { .. }) => {}
                    Ok(Frame::Complete) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        });
        let (out, log, view) = send_fake_guest(&url);
        let e = source_err(&out);
        assert!(e.contains("waiting for the destination to be ready"), "{e}");
        assert!(log.events().contains(&"pause".to_string()));
        assert_source_running(&log, &view);
        dst.join().expect("destination thread");
    }

    #[test]
    fn destination_rejecting_config_reports_reason_to_source() {
        let l = listener();
        let url = l.url().clone();
        let dst = spawn_receiver(
            l,
            FakeFactory {
                fail_create: true,
                ..Default::default()
            },
        );
        let (out, log, view) = send_fake_guest(&url);
        let e = source_err(&out);
        assert!(
            e.contains("destination reported: destination: vm build from config: injected: not enough memory"),
            "{e}"
        );
        assert_source_running(&log, &view);
        assert!(dst.join().expect("destination thread").is_err());
    }

    #[test]
    fn destination_failing_to_start_makes_source_resume() {
        let l = listener();
        let url = l.url().clone();
        let dst = spawn_receiver(
            l,
            FakeFactory {
                fail_start: true,
                ..Default::default()
            },
        );
        let (out, log, view) = send_fake_guest(&url);
        let e = source_err(&out);
        assert!(e.contains("vCPU creation failed"), "{e}");
        assert!(log.events().contains(&"pause".to_string()));
        assert_source_running(&log, &view);
        assert!(dst.join().expect("destination thread").is_err());
    }

    #[test]
    fn dirty_source_error_in_final_claim_fails_and_resumes() {
        let l = listener();
        let url = l.url().clone();
        let dst = spawn_receiver(l, FakeFactory::default());
        let mut host = FakeHost::new(anon_memory(), 64, 50);
        host.kvm_fail_when_paused = true;
        let (log, view) = (host.log.clone(), FakeGuestView::of(&host));
        let out = start_send(
            Box::new(host),
            params(&url),
            Arc::new(MigrationStats::new()),
        )
        .expect("spawn")
        .join()
        .expect("source thread");
        assert!(matches!(out.result, Err(MigrationError::DirtySource(_))));
        assert!(source_err(&out).contains("KVM_CLEAR_DIRTY_LOG failed"));
        assert_source_running(&log, &view);
        let e = error_chain(&dst.join().expect("destination thread").expect_err("fails"));
        assert!(
            e.contains("source reported: source: dirty tracking: kvm source: claim"),
            "{e}"
        );
    }

    // ---- receiver fed bad streams ----

    /// Run a receiver, feed it `bytes` on one connection, close our write side, and return the
    /// receiver's error plus the Error frame text it sent back.
    /// Migrates a 64-page fake guest (50 dirtied pages) to `url` on a source thread and waits for
    /// the outcome; returns it with the host's event log and a view of its guest.
    fn send_fake_guest(url: &MigrationUrl) -> (MigrationOutcome, Arc<HostLog>, Arc<FakeGuestView>) {
        let host = FakeHost::new(anon_memory(), 64, 50);
        let (log, view) = (host.log.clone(), FakeGuestView::of(&host));
        let out = start_send(Box::new(host), params(url), Arc::new(MigrationStats::new()))
            .expect("spawn")
            .join()
            .expect("source thread");
        (out, log, view)
    }

    fn feed(bytes: Vec<u8>) -> (MigrationError, String) {
        let l = listener();
        let url = l.url().clone();
        let dst = std::thread::spawn(move || {
            let mut f = FakeFactory::default();
            receive_on(&l, &mut f, &MigrationStats::new()).map(|_| ())
        });
        let c = Connection::connect(&url).expect("connect");
        let mut w = c.try_clone().expect("clone");
        w.write_all(&bytes).expect("write");
        if let Connection::Unix(u) = &c {
            u.shutdown(std::net::Shutdown::Write)
                .expect("shutdown write");
        }
        let mut rc = c;
        read_preamble(&mut rc).expect("receiver preamble");
        let mut r = FrameReader::new(rc);
        // A receiver acks a config it accepted (its VM is built) before failing later.
        let text = loop {
            match r.recv() {
                Ok(Frame::Ack) => continue,
                Ok(Frame::Error(t)) => break t.to_owned(),
                other => panic!("expected an error frame, got {other:?}"),
            }
        };
        let err = dst
            .join()
            .expect("receiver thread")
            .expect_err("receiver must fail");
        (err, text)
    }

    fn frame(f: &Frame<'_>) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new());
        w.send(f).expect("encode");
        std::mem::take(w.get_mut())
    }

    fn good_prefix() -> Vec<u8> {
        let mut b = preamble().to_vec();
        b.extend(frame(&Frame::Hello(Hello {
            session: 1,
            connection_index: 0,
            connections: 1,
            local: false,
        })));
        b.extend(frame(&Frame::Config(&config_bytes(&anon_memory(), 1))));
        b
    }

    fn memory_frame() -> Vec<u8> {
        let page = vec![0xabu8; 4096];
        frame(&Frame::Memory {
            entries: vec![MemoryEntry {
                gpa: GuestAddress(0x2000),
                npages: 1,
                encoding: PageEncoding::Data,
            }],
            data: &page,
        })
    }

    /// Receiver limits: a hello announcing more connections than the protocol allows, a frame
    /// announcing more than the frame limit, a memory table announcing more entries than its
    /// frame holds: each a clear error at once, before waiting for or allocating what it claims.
    #[test]
    fn receiver_refuses_absurd_counts_and_sizes_at_once() {
        let started = std::time::Instant::now();
        let mut b = preamble().to_vec();
        b.extend(frame(&Frame::Hello(Hello {
            session: 1,
            connection_index: 0,
            connections: 1,
            local: false,
        })));
        // connections: 65535 (bytes 10..12 of the payload), with the CRC recomputed.
        let at = preamble().len() + 12 + 10;
        b[at..at + 2].copy_from_slice(&u16::MAX.to_le_bytes());
        let start = preamble().len();
        let mut h = crc32fast::Hasher::new();
        h.update(&b[start..start + 8]);
        h.update(&b[start + 12..]);
        let crc = h.finalize().to_le_bytes();
        b[start + 8..start + 12].copy_from_slice(&crc);
        let (err, text) = feed(b);
        assert!(text.contains("malformed hello frame"), "{text} / {err:?}");
        assert!(
            error_chain(&err).contains("invalid connections: 0xffff"),
            "{}",
            error_chain(&err)
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "waited for the connections"
        );

        let mut b = good_prefix();
        b.extend_from_slice(&[2, 0, 0, 0]);
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        let (err, _) = feed(b);
        assert!(
            matches!(
                err,
                MigrationError::Protocol {
                    source: ProtocolError::TooLarge { .. },
                    ..
                }
            ),
            "{err:?}"
        );

        let mut b = good_prefix();
        let mut m = memory_frame();
        m[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&m[..8]);
        h.update(&m[12..]);
        let crc = h.finalize().to_le_bytes();
        m[8..12].copy_from_slice(&crc);
        b.extend(m);
        let (err, _) = feed(b);
        assert!(
            error_chain(&err).contains("memory entries"),
            "{}",
            error_chain(&err)
        );
    }

    #[test]
    fn receiver_rejects_truncated_stream_with_clear_error() {
        let mut b = good_prefix();
        let m = memory_frame();
        b.extend_from_slice(&m[..m.len() / 2]);
        let (err, text) = feed(b);
        assert!(
            matches!(
                err,
                MigrationError::Protocol {
                    source: ProtocolError::Truncated {
                        what: "frame payload",
                        ..
                    },
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(text.contains("stream truncated in frame payload"), "{text}");
    }

    #[test]
    fn receiver_rejects_truncated_unchecked_page_data() {
        let mut b = good_prefix();
        let e = [MemoryEntry {
            gpa: GuestAddress(0x4000),
            npages: 2,
            encoding: PageEncoding::Data,
        }];
        let mut w = FrameWriter::new(Vec::new());
        w.send_memory_head(&e, &[], 2 * 4096).expect("head");
        b.extend(std::mem::take(w.get_mut()));
        b.extend(vec![0x77u8; 4096 + 100]);
        let (err, text) = feed(b);
        assert!(
            matches!(
                err,
                MigrationError::PageData {
                    direction: "receive",
                    gpa: 0x4000,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            text.contains("receive page data for 0x4000+0x2000"),
            "{text}"
        );
    }

    /// A memory frame with per-page sums for page 0x4000, whose bytes are `sent` while the sum is
    /// that of `summed` (they differ when the page was damaged, or rewritten, on the way).
    fn summed_frame(summed: u8, sent: u8) -> Vec<u8> {
        let e = [MemoryEntry {
            gpa: GuestAddress(0x4000),
            npages: 1,
            encoding: PageEncoding::Data,
        }];
        let mut w = FrameWriter::new(Vec::new());
        let sum = tern_migration::protocol::page_sum::page_sum(&[summed; 4096]);
        w.send_memory_head(&e, &[sum], 4096).expect("head");
        let mut b = std::mem::take(w.get_mut());
        b.extend(vec![sent; 4096]);
        b
    }

    /// Per-page sums: a page whose bytes do not match its sum and that is never sent again was
    /// damaged in transit, and the receiver fails at the end of the stream naming it; a page sent
    /// again intact (as a page the guest rewrote while it was sent is) heals.
    #[test]
    fn receiver_fails_on_a_damaged_page_never_resent_and_heals_a_resent_one() {
        let mut b = good_prefix();
        b.extend(summed_frame(0x11, 0x11));
        b.extend(summed_frame(0x22, 0x23));
        b.extend(frame(&Frame::Complete));
        let (err, text) = feed(b);
        assert!(
            matches!(
                err,
                MigrationError::PageSums {
                    pages: 1,
                    first_gpa: 0x4000
                }
            ),
            "{err:?}"
        );
        assert!(text.contains("damaged in transit"), "{text}");

        // Healed: the receiver accepts the Complete and says it is Ready to run.
        let l = listener();
        let url = l.url().clone();
        let dst = std::thread::spawn(move || {
            let mut f = FakeFactory::default();
            receive_on(&l, &mut f, &MigrationStats::new()).map(|_| ())
        });
        let mut c = Connection::connect(&url).expect("connect");
        let mut b = good_prefix();
        b.extend(summed_frame(0x22, 0x23));
        b.extend(summed_frame(0x24, 0x24));
        b.extend(frame(&Frame::Complete));
        c.write_all(&b).expect("write");
        read_preamble(&mut c).expect("receiver preamble");
        let mut r = FrameReader::new(c);
        loop {
            match r.recv() {
                Ok(Frame::Ack) => continue,
                Ok(Frame::Ready) => break,
                other => panic!("a page resent intact must heal; the receiver said {other:?}"),
            }
        }
        drop(r);
        // Without a Commit the receiver gives up; only its Ready mattered here.
        let _ = dst.join().expect("receiver thread");
    }

    #[test]
    fn receiver_rejects_corrupted_stream_with_clear_error() {
        let mut b = good_prefix();
        let mut m = memory_frame();
        let n = m.len();
        m[n - 100] ^= 0x10;
        b.extend(m);
        let (err, text) = feed(b);
        assert!(
            matches!(
                err,
                MigrationError::Protocol {
                    source: ProtocolError::Checksum {
                        frame: "memory",
                        ..
                    },
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(text.contains("memory frame checksum mismatch"), "{text}");
    }

    #[test]
    fn receiver_rejects_unknown_version_and_foreign_bytes() {
        let mut b = preamble().to_vec();
        b[8] = 9;
        let (err, text) = feed(b);
        assert!(matches!(
            err,
            MigrationError::Protocol {
                source: ProtocolError::UnsupportedVersion { found: 9, .. },
                ..
            }
        ));
        assert!(
            text.contains("unsupported protocol version 9 (this side speaks 4)"),
            "{text}"
        );
        let (_, text) = feed(b"GET / HTTP/1.1\r\n\r\n".to_vec());
        assert!(text.contains("bad magic"), "{text}");
    }

    #[test]
    fn receiver_rejects_memory_outside_guest_ram() {
        let mut b = good_prefix();
        b.extend(frame(&Frame::Memory {
            entries: vec![MemoryEntry {
                gpa: GuestAddress(0x8000_0000),
                npages: 1,
                encoding: PageEncoding::Zero,
            }],
            data: &[],
        }));
        let (err, text) = feed(b);
        assert!(
            matches!(
                err,
                MigrationError::GuestMemory {
                    gpa: 0x8000_0000,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(text.contains("guest memory access at 0x80000000"), "{text}");
    }

    #[test]
    fn receiver_refuses_repeated_state_blobs() {
        // Without the check the receiver keeps every copy: 64 MiB frames, without end.
        for dup in [
            Frame::VcpuState {
                id: 0,
                bytes: &[1; 64],
            },
            Frame::DeviceState {
                id: "serial0",
                bytes: &[2; 64],
            },
            Frame::VmState(&[3; 64]),
        ] {
            let mut b = good_prefix();
            b.extend(frame(&dup));
            b.extend(frame(&dup));
            let (err, text) = feed(b);
            assert!(
                matches!(err, MigrationError::InvalidParams { .. }),
                "{err:?}"
            );
            assert!(text.contains("twice"), "{text}");
        }
    }

    #[test]
    fn receiver_reports_source_that_vanishes() {
        let (err, text) = feed(good_prefix());
        assert!(
            matches!(err, MigrationError::PeerGone { peer: "source", .. }),
            "{err:?}"
        );
        assert!(text.contains("connection closed"), "{text}");
    }
}
