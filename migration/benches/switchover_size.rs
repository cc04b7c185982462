//! Switchover cost against guest size: the same idle guest (a 1 MiB hot set rewritten slowly)
//! in 1, 4, 16 and 64 GiB of sparse anonymous memory (never touched beyond the hot set), migrated
//! over a unix socket by the real engine with the fake KVM log and the real VMM-write source.
//! Prints the downtime and the switchover's breakdown: what grows with the guest is the final
//! sync (KVM's and vm-memory's bitmaps are harvested whole, a word per 64 pages), not the claims
//! or the pages sent, which follow the dirty set.
//!
//! `cargo bench -p tern-migration --bench switchover_size` (64 GiB of address space; a few seconds
//! per size, most of it iteration 0 reading /proc/self/pagemap).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;

use common::*;
use tern_migration::engine::{receive_on, start_send, MigrationStats, SendParams};
use tern_migration::transport::{MigrationListener, MigrationUrl};

const GIB: usize = 1 << 30;

fn once(gib: usize) -> Option<(u64, tern_migration::engine::SwitchoverBreakdown)> {
    let host = FakeHost::hot_set(anon_memory_of(&[(0, gib * GIB)]), 256, 2000);
    let url = MigrationUrl::Unix(
        std::env::temp_dir().join(format!("tern-swsize-{}-{gib}.sock", std::process::id())),
    );
    let l = MigrationListener::bind(&url).expect("bind");
    let url = l.url().clone();
    let dst = std::thread::spawn(move || {
        let mut f = FakeFactory::default();
        receive_on(&l, &mut f, &MigrationStats::new()).map(|_| ())
    });
    let mut p = SendParams::new(url);
    p.downtime_ms = 5;
    let stats = Arc::new(MigrationStats::new());
    let out = start_send(Box::new(host), p, stats.clone())
        .expect("spawn")
        .join()
        .expect("source");
    if let Err(e) = &out.result {
        println!(
            "{gib:>4} GiB FAILED: {}",
            tern_migration::engine::error_chain(e)
        );
        return None;
    }
    dst.join()
        .expect("destination")
        .expect("destination result");
    let s = stats.snapshot();
    Some((s.downtime_ms.unwrap_or(0), s.switchover.unwrap_or_default()))
}

fn main() {
    println!("idle guest, 1 MiB hot set; µs unless marked; median of 3 by downtime");
    println!(
        "{:>7} {:>9} {:>7} {:>6} {:>7} {:>7} {:>10} {:>6} {:>5} {:>8} {:>6}",
        "guest",
        "downtime",
        "pause",
        "sync",
        "claims",
        "chunks",
        "final pass",
        "state",
        "send",
        "restore",
        "start"
    );
    for gib in [1, 4, 16, 64] {
        let mut runs: Vec<_> = (0..3).filter_map(|_| once(gib)).collect();
        runs.sort_by_key(|r| r.0);
        let Some((downtime, t)) = runs.get(runs.len() / 2).copied() else {
            continue;
        };
        println!(
            "{:>4} GiB {:>6} ms {:>7} {:>6} {:>7} {:>7} {:>10} {:>6} {:>5} {:>8} {:>6}",
            gib,
            downtime,
            t.pause_us,
            t.final_sync_us,
            t.final_claim_us,
            t.final_claimed_chunks,
            t.final_pass_us,
            t.state_save_us,
            t.send_us,
            t.destination_restore_us,
            t.destination_start_us
        );
    }
}
