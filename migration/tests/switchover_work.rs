//! The switchover's dirty-bitmap work follows what was dirtied, not the guest's size: the same
//! idle guest (a 1 MiB hot set) at 1 GiB and at 64 GiB of sparse memory makes the paused part of
//! the migration (final sync, plan, claims, pass) walk the same number of bitmap groups. Counted,
//! not timed (`groups_visited`, read on the engine's thread by the fake host at pause and at state
//! save; the receiver's walks, on its own thread, do not count).
//!
//! The fake KVM log's sync still reads its whole bitmap, as KVM_GET_DIRTY_LOG does (the dirty ring
//! is the O(dirty) way for that part); everything tern does with the bits after that is counted.

mod common;

use common::*;
use tern_migration::transport::MigrationUrl;

const GIB: usize = 1 << 30;

/// Groups walked between the pause and the state save of one migration of a `gib` GiB guest.
fn switchover_groups(gib: usize) -> u64 {
    let host = FakeHost::hot_set(anon_memory_of(&[(0, gib * GIB)]), 256, 100);
    let visits = host.groups_visited_at.clone();
    let url = MigrationUrl::Unix(
        std::env::temp_dir().join(format!("tern-swwork-{}-{gib}.sock", std::process::id())),
    );
    let r = run(url, host, FakeFactory::default(), |p| {
        p.downtime_ms = 5;
        p.chunk_bytes = 64 << 20;
    });
    if let Err(e) = r.src.as_ref().map(|_| ()).and(r.dst.as_ref().map(|_| ())) {
        panic!(
            "migration failed: {}",
            tern_migration::engine::error_chain(e)
        );
    }
    let at = visits.lock().expect("lock").clone();
    let reading = |what| {
        at.iter()
            .find(|(w, _)| *w == what)
            .map(|&(_, n)| n)
            .unwrap_or_else(|| panic!("no {what} reading in {at:?}"))
    };
    reading("save_state") - reading("pause")
}

#[test]
fn switchover_bitmap_work_does_not_grow_with_the_guest() {
    let small = switchover_groups(1);
    let large = switchover_groups(64);
    eprintln!("bitmap groups walked while paused: 1 GiB {small}, 64 GiB {large}");
    // 64 GiB has 64 times the groups of 1 GiB (4096 against 64): a walk over the whole guest
    // would show up as thousands. The hot set spans one group; each source and step walks it
    // (the guest writes a page every 100 µs, so the switchover always has dirty pages).
    assert!(
        small > 0,
        "the switchover walked no bitmap group at all: is the counter wired?"
    );
    assert!(
        large <= small + 8,
        "the switchover walked {large} bitmap groups at 64 GiB against {small} at 1 GiB"
    );
}
