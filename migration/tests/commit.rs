//! The switchover is a commit protocol: the destination runs the VM only on the source's Commit,
//! sent after the destination said Ready; the source resumes only when the destination provably
//! will not run. A proxy cuts the link at every step of the switchover; whatever the cut, at most
//! one side runs the VM, a side that cannot know stays paused and says "in doubt", and nothing
//! leaks (file descriptors back to where they were).

mod common;

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    use super::common::proxy::{Cut, Dir, Proxy};
    use super::common::*;
    use tern_migration::engine::{
        error_chain, receive_on, start_send, MigrationError, MigrationStats, MigrationStatus,
        SendParams,
    };
    use tern_migration::protocol::FrameTag;
    use tern_migration::transport::{MigrationListener, MigrationUrl};

    struct Outcome {
        src_status: MigrationStatus,
        dst_status: MigrationStatus,
        src_resumed: bool,
        /// The source paused its guest at some point.
        src_paused_ever: bool,
        src_paused: bool,
        dst_started: bool,
        /// The destination held its VM in doubt.
        dst_held: bool,
        detail: String,
    }

    fn migrate_through(cut: Option<Cut>) -> Outcome {
        let dest = sock_path();
        let l = MigrationListener::bind(&MigrationUrl::Unix(dest.clone())).expect("bind");
        let proxy = Proxy::start(dest, cut);
        let factory = FakeFactory::default();
        let started = factory.started.clone();
        let dst_stats = Arc::new(MigrationStats::new());
        let ds = dst_stats.clone();
        let dst = std::thread::spawn(move || {
            let mut f = factory;
            receive_on(&l, &mut f, &ds)
        });
        let host = FakeHost::new(anon_memory(), 64, 50);
        let (log, view) = (host.log.clone(), FakeGuestView::of(&host));
        let mut p = SendParams::new(MigrationUrl::Unix(proxy.path.clone()));
        p.chunk_bytes = 1 << 20;
        p.downtime_ms = 20;
        p.ack_timeout = Duration::from_secs(5);
        let src_stats = Arc::new(MigrationStats::new());
        let out = start_send(Box::new(host), p, src_stats.clone())
            .expect("spawn")
            .join()
            .expect("source thread");
        let dst_result = dst.join().expect("destination thread");
        let dst_held = matches!(
            &dst_result,
            Err(MigrationError::InDoubt { held: Some(_), .. })
        );
        let detail = format!(
            "source: {:?}; destination: {:?}; frames after the data: {:?}; host log {:?}",
            out.result.as_ref().err().map(|e| error_chain(e)),
            dst_result.as_ref().err().map(|e| error_chain(e)),
            proxy
                .seen()
                .into_iter()
                .filter(|(_, t)| *t != FrameTag::Memory)
                .collect::<Vec<_>>(),
            log.events()
        );
        drop(dst_result);
        drop(out);
        drop(proxy);
        Outcome {
            src_status: src_stats.status(),
            dst_status: dst_stats.status(),
            src_resumed: log.events().iter().any(|e| e == "resume"),
            src_paused_ever: log.events().iter().any(|e| e == "pause"),
            src_paused: view.is_paused(),
            dst_started: started.load(Ordering::SeqCst),
            dst_held,
            detail,
        }
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
    }

    fn cut(dir: Dir, tag: FrameTag, after: bool) -> Option<Cut> {
        cut_nth(dir, tag, after, 1)
    }

    fn cut_nth(dir: Dir, tag: FrameTag, after: bool, nth: usize) -> Option<Cut> {
        Some(Cut {
            dir,
            tag,
            after,
            nth,
        })
    }

    /// Every cut point of the switchover, in one test so the fd count is this test's alone.
    #[test]
    fn at_most_one_side_runs_whatever_step_the_link_dies_at() {
        use Dir::{DestinationToSource as D2S, SourceToDestination as S2D};
        use MigrationStatus::{Completed, Failed, InDoubt};
        let fds = open_fds();
        // (cut, source status, source runs, destination status, destination runs, held)
        let cases = [
            // No cut: the destination runs, the source is done.
            (None, Completed, false, Completed, true, false),
            // Cut right after the destination built its VM: the source never paused.
            (
                cut(D2S, FrameTag::Ack, true),
                Failed,
                true,
                Failed,
                false,
                false,
            ),
            // Complete never arrives: nobody committed, the source resumes.
            (
                cut(S2D, FrameTag::Complete, false),
                Failed,
                true,
                Failed,
                false,
                false,
            ),
            // Ready is lost: the source never committed and resumes; the destination, which
            // cannot know that, holds its VM paused, in doubt.
            (
                cut(D2S, FrameTag::Ready, false),
                Failed,
                true,
                InDoubt,
                false,
                true,
            ),
            // Commit is lost: the undecidable point; both sides stay paused.
            (
                cut(S2D, FrameTag::Commit, false),
                InDoubt,
                false,
                InDoubt,
                false,
                true,
            ),
            // Commit arrives, then the link dies: the destination runs; the source, which
            // cannot know, stays paused.
            (
                cut(S2D, FrameTag::Commit, true),
                InDoubt,
                false,
                Completed,
                true,
                false,
            ),
            // The final ack is lost: the destination runs; the source, which cannot know, stays
            // paused.
            (
                cut_nth(D2S, FrameTag::Ack, false, 2),
                InDoubt,
                false,
                Completed,
                true,
                false,
            ),
        ];
        for (i, (c, src, src_runs, dst, dst_runs, held)) in cases.into_iter().enumerate() {
            let o = migrate_through(c);
            let ctx = format!("case {i} {c:?}: {}", o.detail);
            assert!(!o.dst_started || o.src_paused, "two running copies: {ctx}");
            assert_eq!(o.src_status, src, "{ctx}");
            assert_eq!(o.dst_status, dst, "{ctx}");
            assert_eq!(!o.src_paused, src_runs, "source runs: {ctx}");
            if o.src_paused_ever {
                assert_eq!(o.src_resumed, src_runs, "source resumed: {ctx}");
            }
            assert_eq!(o.dst_started, dst_runs, "destination runs: {ctx}");
            assert_eq!(o.dst_held, held, "destination held: {ctx}");
        }
        // Every socket and thread-held fd of the migrations is gone.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(open_fds(), fds, "file descriptors leaked");
    }
}
