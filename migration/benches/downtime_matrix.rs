//! Downtime promise matrix: whole engine migrations over a unix socket for every (hot set, dirty
//! rate, bandwidth cap, downtime target) cell, printing the measured downtime beside the target
//! and the estimate that decided the switchover. Goal: actual ≤ target + 2 ms wherever the
//! migration converges; where it cannot, the timeout strategy (cancel) ends it and the cell says
//! "cannot converge". No pass/fail: two shared cores make single numbers noisy, so each cell runs
//! `TERN_MATRIX_RUNS` times (default 3) and prints min/median/max.
//!
//! The "guest" is the tests' fake vCPU thread rewriting random pages of its hot set through
//! vm-memory (fake KVM log + the real VmmWriteSource); the rest of its 512 MiB is never written
//! and goes as zero markers. VM state is a few KiB. Engine numbers only: a VMM adds its own
//! pause, state save and restore costs.
//!
//! Run: `cargo bench -p tern-migration --bench downtime_matrix`
//! (`TERN_MATRIX_RUNS=1` for a quick look, `TERN_MATRIX_TIMEOUT_S` for the convergence budget.)

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tern_migration::engine::{
    error_chain, receive_on, start_send, MigrationError, MigrationStats, SendParams,
    SwitchoverBreakdown, TimeoutStrategy,
};
use tern_migration::transport::{MigrationListener, MigrationUrl};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const GUEST: [(u64, usize); 1] = [(0, 512 << 20)];

/// What one migration of a cell ended with.
enum Outcome {
    Done {
        downtime_ms: u64,
        expected_ms: u64,
        switchover: Option<SwitchoverBreakdown>,
        /// The final pass: (pages sent, the bandwidth its estimate used in bytes/s).
        final_pass: (u64, u64),
    },
    CannotConverge {
        expected_ms: u64,
    },
    Failed(String),
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn once(hot_mib: u64, dirty_mib_s: u64, cap_mbps: u64, target_ms: u64, tag: &str) -> Outcome {
    let hot_pages = hot_mib * MIB / 4096;
    // The fake vCPU writes 32 pages, then sleeps: 32 pages per `pause_us` gives the rate.
    let pause_us = 32 * 4096 * 1_000_000 / (dirty_mib_s * MIB);
    let host = FakeHost::hot_set(anon_memory_of(&GUEST), hot_pages, pause_us);
    // The hot set holds data before the migration, like a guest that has been running.
    for p in 0..hot_pages {
        host.mem
            .write_slice(&[0xa5; 64], GuestAddress(p * 4096))
            .expect("prefill the hot set");
    }
    let path = std::env::temp_dir().join(format!("tern-dtm-{}-{tag}.sock", std::process::id()));
    let l = MigrationListener::bind(&MigrationUrl::Unix(path)).expect("bind");
    let url = l.url().clone();
    let dst = std::thread::spawn(move || {
        let mut f = FakeFactory::default();
        receive_on(&l, &mut f, &MigrationStats::new()).map(|_| ())
    });
    let mut p = SendParams::new(url);
    p.downtime_ms = target_ms;
    p.max_bandwidth_mbps = cap_mbps;
    p.timeout = Duration::from_secs(env_u64("TERN_MATRIX_TIMEOUT_S", 12));
    p.timeout_strategy = TimeoutStrategy::Cancel;
    let stats = Arc::new(MigrationStats::new());
    let out = start_send(Box::new(host), p, stats.clone())
        .expect("spawn")
        .join()
        .expect("source thread");
    // The destination ends with an error when the source gives up; only its panics matter here.
    let _ = dst.join().expect("destination thread");
    let s = stats.snapshot();
    match out.result {
        Ok(()) => Outcome::Done {
            downtime_ms: s.downtime_ms.unwrap_or(0),
            // The final pass's record carries the estimate that decided the switchover.
            expected_ms: s.history.last().map_or(0, |r| r.expected_downtime_ms),
            switchover: s.switchover,
            final_pass: s
                .history
                .last()
                .map_or((0, 0), |r| (r.pages_sent, r.bandwidth_bytes_per_sec)),
        },
        Err(MigrationError::Timeout {
            expected_downtime_ms,
            ..
        }) => Outcome::CannotConverge {
            expected_ms: expected_downtime_ms,
        },
        Err(e) => Outcome::Failed(error_chain(&e)),
    }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let runs = env_u64("TERN_MATRIX_RUNS", 3).max(1);
    let budget = env_u64("TERN_MATRIX_TIMEOUT_S", 12);
    // (hot set MiB, dirty MiB/s): a small fast set, the two demo-guest cases.
    let workloads = [(4u64, 40u64), (64, 16), (256, 40)];
    let caps = [400u64, 1000, 0];
    let targets = [5u64, 20];
    // TERN_MATRIX_ONLY=hot,rate,cap,target runs one cell.
    let only: Option<Vec<u64>> = std::env::var("TERN_MATRIX_ONLY")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect());
    println!(
        "512 MiB guest, unix socket, {runs} run(s) per cell; downtime ms as min/median/max; \
         'est' = the estimate that decided the switchover (median)"
    );
    println!(
        "{:>8} {:>8} {:>9} {:>7}  {:<16} {:>6} {:>7}  verdict",
        "hot MiB", "MiB/s", "cap Mbit", "target", "actual", "est", "ok≤+2"
    );
    for &(hot, rate) in &workloads {
        for &cap in &caps {
            for &target in &targets {
                if only
                    .as_ref()
                    .is_some_and(|o| o[..] != [hot, rate, cap, target])
                {
                    continue;
                }
                let mut worst: Option<(u64, SwitchoverBreakdown, (u64, u64))> = None;
                let mut down = Vec::new();
                let mut est = Vec::new();
                let mut stuck = Vec::new();
                let mut failed = None;
                for r in 0..runs {
                    let tag = format!("{hot}-{rate}-{cap}-{target}-{r}");
                    match once(hot, rate, cap, target, &tag) {
                        Outcome::Done {
                            downtime_ms,
                            expected_ms,
                            switchover,
                            final_pass,
                        } => {
                            if let Some(b) = switchover {
                                if worst.is_none_or(|w| w.0 < downtime_ms) {
                                    worst = Some((downtime_ms, b, final_pass));
                                }
                            }
                            down.push(downtime_ms);
                            est.push(expected_ms);
                        }
                        Outcome::CannotConverge { expected_ms } => stuck.push(expected_ms),
                        Outcome::Failed(e) => failed = Some(e),
                    }
                }
                let cap_s = if cap == 0 {
                    "none".to_owned()
                } else {
                    cap.to_string()
                };
                let head = format!("{hot:>8} {rate:>8} {cap_s:>9} {target:>7}");
                if let Some(e) = failed {
                    println!("{head}  FAILED: {e}");
                    continue;
                }
                if down.is_empty() {
                    let e = median(&mut stuck);
                    println!(
                        "{head}  {:<16} {e:>6} {:>7}  cannot converge in {budget} s: the \
                         estimate stayed above the target; timeout strategy cancel kept the VM \
                         on the source",
                        "-", "-"
                    );
                    continue;
                }
                let n = down.len();
                let (min, max) = (
                    *down.iter().min().unwrap_or(&0),
                    *down.iter().max().unwrap_or(&0),
                );
                let med = median(&mut down);
                let e = median(&mut est);
                let ok = down.iter().filter(|&&d| d <= target + 2).count();
                let mut verdict = String::from("converged");
                if !stuck.is_empty() {
                    verdict = format!("converged {n}/{runs}, timed out {}", stuck.len());
                }
                println!(
                    "{head}  {:<16} {e:>6} {:>7}  {verdict}",
                    format!("{min}/{med}/{max}"),
                    format!("{ok}/{n}")
                );
                // Where a run over the goal spent its switchover (µs).
                if let Some((d, b, (pages, bw))) = worst.filter(|w| w.0 > target + 2) {
                    println!(
                        "{:>36}  {d} ms: pause {} sync {} claims {} ({} chunks) pass {} \
                         save {} send {} dst restore {} dst start {}; final pass {pages} pages \
                         estimated at {} MB/s; {} KiB queued at the pause",
                        "",
                        b.pause_us,
                        b.final_sync_us,
                        b.final_claim_us,
                        b.final_claimed_chunks,
                        b.final_pass_us,
                        b.state_save_us,
                        b.send_us,
                        b.destination_restore_us,
                        b.destination_start_us,
                        bw / 1_000_000,
                        b.queued_at_pause_bytes >> 10
                    );
                }
            }
        }
    }
}
