//! Does a device's final state wait behind the final memory pass in the downtime? A 512 MiB guest
//! whose 32 MiB hot set is all dirty at the switchover, with one device whose STOP_COPY state is
//! 0, 32 or 128 MiB (a fake VFIO migration v2 device), migrated over a Unix socket with 1, 2 or 4
//! connections. With one connection the device's state follows the memory on it; with several,
//! the last connection carries only device data, so the two overlap. Prints the downtime (vCPU
//! pause to the destination's ack) of each run; the destination's copy of the device state is
//! checked byte for byte.
//!
//! Run: `cargo bench -p tern-migration --bench device_overlap`

#[path = "../tests/common/mod.rs"]
mod common;

use common::device::{FakeSinkDevice, FakeSourceDevice};
use common::{anon_memory_of, run, sock_path, FakeFactory, FakeHost};
use tern_migration::transport::MigrationUrl;

const MIB: usize = 1 << 20;
const HOT_PAGES: u64 = (32 * MIB as u64) / 4096;

/// Downtime in ms and the device's stop-copy bytes of one migration.
fn once(connections: u16, device_mib: usize) -> (u64, u64) {
    let mut host = FakeHost::hot_set(anon_memory_of(&[(0, 512 * MIB)]), HOT_PAGES, 20);
    let mut factory = FakeFactory::default();
    let mut expected = Vec::new();
    let mut received = None;
    if device_mib > 0 {
        let state: Vec<u8> = (0..device_mib * MIB).map(|i| (i * 7 + 3) as u8).collect();
        expected = state.clone();
        let log = host.log.clone();
        let mut dev = FakeSourceDevice::new("dev0", Vec::new(), state, log.clone());
        dev.precopy = false;
        host.devices.push(Box::new(dev));
        let sink = FakeSinkDevice::new("dev0", log);
        received = Some(sink.received.clone());
        factory.sinks.push(Box::new(sink));
    }
    let r = run(MigrationUrl::Unix(sock_path()), host, factory, |p| {
        p.connections = connections;
        // Switch over after the first pass: the whole hot set is in the final pass.
        p.downtime_ms = 60_000;
    });
    r.src.expect("migration");
    if let Some(got) = received {
        assert!(
            *got.lock().expect("received") == expected,
            "device state altered"
        );
    }
    let s = r.src_stats.snapshot();
    let stop = s.devices.first().map_or(0, |d| d.stop_copy_bytes);
    (s.downtime_ms.unwrap_or(0), stop)
}

fn main() {
    const RUNS: usize = 5;
    println!("downtime in ms, median of {RUNS} runs (min–max); 512 MiB guest, 32 MiB dirty at the switchover");
    println!(
        "{:>11} {:>12} {:>20}",
        "connections", "device MiB", "downtime ms"
    );
    for connections in [1u16, 2, 4] {
        for device_mib in [0usize, 32, 128] {
            let mut d: Vec<u64> = (0..RUNS).map(|_| once(connections, device_mib).0).collect();
            d.sort_unstable();
            println!(
                "{:>11} {:>12} {:>8} ({}–{})",
                connections,
                device_mib,
                d[RUNS / 2],
                d[0],
                d[RUNS - 1]
            );
        }
    }
}
