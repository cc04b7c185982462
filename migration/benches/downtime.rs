//! Downtime and total time of whole engine migrations over loopback tcp, unix and local (memfd)
//! for (a) a 512 MiB guest whose vCPU stand-in rewrites a 4 MiB hot set at ~70 MiB/s and
//! (b) an idle 1 GiB guest. The "guest" is a thread writing through vm-memory (so both the fake
//! KVM log and the real VmmWriteSource see every write); pause/resume stop it. VM state is a few
//! KiB. These are engine numbers: the VMM adds its own pause, state save and restore costs.
//!
//! Run: `cargo bench -p tern-migration --bench downtime`

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use tern_migration::engine::{receive_on, start_send, MigrationStats, SendParams};
use tern_migration::transport::{MigrationListener, MigrationUrl};

const MIB: usize = 1 << 20;

fn once(label: &str, url: MigrationUrl, host: FakeHost, local: bool) {
    use vm_memory::{Bytes, GuestAddress};
    // The hot set exists before the migration (written once), and the guest has been running.
    if host
        .guest
        .ctl
        .writes
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0
        || label.contains("hot")
    {
        for p in 0..HOT {
            host.mem
                .write_slice(&[0xa5; 64], GuestAddress(p * 4096))
                .expect("prefill hot set");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let l = MigrationListener::bind(&url).expect("bind");
    let url = l.url().clone();
    let dst = std::thread::spawn(move || {
        let mut f = FakeFactory::default();
        receive_on(&l, &mut f, &MigrationStats::new()).map(|_| ())
    });
    let mut p = SendParams::new(url);
    p.local = local;
    p.downtime_ms = 7;
    let stats = Arc::new(MigrationStats::new());
    let t = Instant::now();
    let out = start_send(Box::new(host), p, stats.clone())
        .expect("spawn")
        .join()
        .expect("source");
    let wall = t.elapsed();
    if let Err(e) = &out.result {
        println!(
            "{label:<24} FAILED: {}",
            tern_migration::engine::error_chain(e)
        );
        return;
    }
    dst.join()
        .expect("destination")
        .expect("destination result");
    let s = stats.snapshot();
    println!(
        "{:<24} {:>9.1} {:>8} {:>5} {:>12.1} {:>10} {:>10}",
        label,
        wall.as_secs_f64() * 1e3,
        s.downtime_ms.unwrap_or(0),
        s.iteration,
        s.transferred_bytes as f64 / MIB as f64,
        s.data_pages,
        s.zero_pages
    );
}

fn sock(n: &str) -> MigrationUrl {
    MigrationUrl::Unix(
        std::env::temp_dir().join(format!("tern-dt-{}-{n}.sock", std::process::id())),
    )
}

fn tcp() -> MigrationUrl {
    MigrationUrl::Tcp {
        host: "127.0.0.1".into(),
        port: 0,
    }
}

const HOT: u64 = (4 * MIB as u64) / 4096;

fn main() {
    // ~70 MiB/s = 17 920 page writes/s: 32 writes, then ~1.79 ms of sleep.
    const PAUSE_US: u64 = 1786;
    let guest512 = [(0u64, 512 * MIB)];
    let idle1g = [(0u64, 1024 * MIB)];
    println!("downtime_ms limit 7; total = start_send → destination ack (wall clock)");
    println!(
        "{:<24} {:>9} {:>8} {:>5} {:>12} {:>10} {:>10}",
        "scenario", "total ms", "down ms", "iter", "wire MiB", "data pg", "zero pg"
    );
    for round in 0..2 {
        once(
            "512M hot4M@70 tcp",
            tcp(),
            FakeHost::hot_set(anon_memory_of(&guest512), HOT, PAUSE_US),
            false,
        );
        once(
            "512M hot4M@70 unix",
            sock(&format!("u{round}")),
            FakeHost::hot_set(anon_memory_of(&guest512), HOT, PAUSE_US),
            false,
        );
        once(
            "512M hot4M@70 local",
            sock(&format!("l{round}")),
            FakeHost::hot_set(shared_memory_of(&guest512), HOT, PAUSE_US),
            true,
        );
        once(
            "1G idle tcp",
            tcp(),
            FakeHost::hot_set(anon_memory_of(&idle1g), 0, PAUSE_US),
            false,
        );
        once(
            "1G idle unix",
            sock(&format!("i{round}")),
            FakeHost::hot_set(anon_memory_of(&idle1g), 0, PAUSE_US),
            false,
        );
        once(
            "1G idle local",
            sock(&format!("j{round}")),
            FakeHost::hot_set(shared_memory_of(&idle1g), 0, PAUSE_US),
            true,
        );
    }
}
