//! KVM dirty tracking cost on this host's /dev/kvm: sync + claim time per guest page for a 1 GiB
//! demo guest, dirty log (manual protect) and dirty ring, with the guest running.
//!
//! `cargo bench -p tern-vmm --bench kvm_dirty` (optional args: `--iterations N`, `--mib N`,
//! `--dirty-mib-per-s N`). Each iteration lets the guest run 100 ms, then times one `sync` and
//! the `claim` of every 64 MiB chunk of RAM (what one pre-copy iteration does), and prints ns per
//! guest page (RAM pages, dirty or not) and per dirty page. Iteration 0 (the first claim after
//! start, which with INITIALLY_SET clears and write-protects every page) is printed apart.

use std::path::Path;
use std::time::{Duration, Instant};

use tern_migration::dirty::{DirtyBitmap, DirtySource, GpaRange, PAGE_SIZE};
use tern_vmm::config::{DirtyTracking, PayloadConfig, SerialConfig, VmConfig};
use tern_vmm::demo::DemoConfig;
use tern_vmm::dirty::{kvm_dirty_source, KvmDirtyLog};
use tern_vmm::machine::Machine;
use vm_memory::GuestAddress;

const RAM_BYTES: u64 = 1 << 30;
const CHUNK_BYTES: u64 = 64 << 20;

struct Args {
    iterations: usize,
    mib: u64,
    dirty_mib_per_s: u64,
}

fn args() -> Args {
    let mut a = Args {
        iterations: 20,
        mib: 256,
        dirty_mib_per_s: 256,
    };
    let v: Vec<String> = std::env::args().collect();
    for (i, flag) in v.iter().enumerate() {
        let num = || v.get(i + 1).and_then(|s| s.parse::<u64>().ok());
        match flag.as_str() {
            "--iterations" => a.iterations = num().map_or(a.iterations, |n| n as usize),
            "--mib" => a.mib = num().unwrap_or(a.mib),
            "--dirty-mib-per-s" => a.dirty_mib_per_s = num().unwrap_or(a.dirty_mib_per_s),
            _ => {}
        }
    }
    a
}

fn chunks(m: &Machine) -> Vec<GpaRange> {
    let mut v = Vec::new();
    for r in m.ram().ranges() {
        let mut off = 0;
        while off < r.len {
            let len = CHUNK_BYTES.min(r.len - off);
            v.push(GpaRange::new(GuestAddress(r.gpa.0 + off), len));
            off += len;
        }
    }
    v
}

/// Claims every chunk; returns (claimed pages, elapsed).
fn claim_all(src: &mut dyn DirtySource, chunks: &[GpaRange]) -> (u64, Duration) {
    let mut bitmaps: Vec<DirtyBitmap> = chunks
        .iter()
        .map(|c| DirtyBitmap::new(c.start, c.len_bytes).expect("chunk bitmap"))
        .collect();
    let t = Instant::now();
    for (c, b) in chunks.iter().zip(&mut bitmaps) {
        src.claim(*c, b).expect("claim");
    }
    let elapsed = t.elapsed();
    (bitmaps.iter().map(DirtyBitmap::count).sum(), elapsed)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn bench(tracking: DirtyTracking, a: &Args) {
    let config = VmConfig {
        cpus: 2,
        memory_bytes: RAM_BYTES,
        payload: PayloadConfig::Demo(DemoConfig {
            mib: a.mib,
            dirty_mib_per_s: a.dirty_mib_per_s,
            exit_after_s: None,
        }),
        serial: SerialConfig::Off,
        dirty_tracking: tracking,
        devices: Vec::new(),
        mock_dma: Vec::new(),
    };
    let m = match Machine::create(Path::new("/dev/kvm"), config) {
        Ok(m) => m,
        Err(e) => {
            println!("{tracking:?}: cannot build the VM: {e}");
            return;
        }
    };
    let mode = match tracking {
        DirtyTracking::Log => KvmDirtyLog::new(m.vm_shared(), m.ram()).mode().to_string(),
        DirtyTracking::Ring => format!(
            "dirty ring, {} entries per vCPU",
            m.dirty_rings().map_or(0, |r| r.entries_per_ring())
        ),
    };
    let pages = RAM_BYTES / PAGE_SIZE;
    let chunks = chunks(&m);
    let mut src = kvm_dirty_source(&m).expect("KVM dirty source");
    m.resume();
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    src.start().expect("start");
    let start = t.elapsed();
    let (n0, claim0) = claim_all(src.as_mut(), &chunks);
    println!(
        "{tracking:?} [{mode}]: start {:.1} ms; iteration 0 claim: {n0} pages in {:.1} ms = {:.1} ns/page",
        start.as_secs_f64() * 1e3,
        claim0.as_secs_f64() * 1e3,
        claim0.as_nanos() as f64 / pages as f64
    );
    let (mut sync_ns, mut claim_ns, mut total_ns, mut per_dirty, mut dirty) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..a.iterations {
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        src.sync().expect("sync");
        let sync = t.elapsed();
        let (n, claim) = claim_all(src.as_mut(), &chunks);
        let total = (sync + claim).as_nanos() as f64;
        sync_ns.push(sync.as_nanos() as f64 / pages as f64);
        claim_ns.push(claim.as_nanos() as f64 / pages as f64);
        total_ns.push(total / pages as f64);
        per_dirty.push(if n == 0 { 0.0 } else { total / n as f64 });
        dirty.push(n as f64);
    }
    m.pause();
    src.stop().expect("stop");
    let ring = m
        .dirty_rings()
        .map(|r| {
            let (h, f) = r.counters();
            format!(", {h} ring entries harvested, {f} ring-full exits")
        })
        .unwrap_or_default();
    println!(
        "{tracking:?}: {} iterations of 100 ms, median: {:.0} dirty pages; sync {:.2} + claim {:.2} = {:.2} ns per guest page ({pages} pages); {:.0} ns per dirty page{ring}",
        a.iterations,
        median(dirty),
        median(sync_ns),
        median(claim_ns),
        median(total_ns),
        median(per_dirty),
    );
}

fn main() {
    let a = args();
    println!(
        "kvm_dirty: 1 GiB demo guest, 2 vCPUs, working set {} MiB rewritten at {} MiB/s, {} MiB chunks",
        a.mib,
        a.dirty_mib_per_s,
        CHUNK_BYTES >> 20
    );
    bench(DirtyTracking::Log, &a);
    bench(DirtyTracking::Ring, &a);
}
