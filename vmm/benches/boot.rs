//! Boot benchmark (prints numbers; no pass/fail): for the demo guest with 1 vCPU / 256 MiB and
//! 2 vCPUs / 1 GiB, the time from spawning `tern` until its vCPUs enter KVM_RUN (target ≤ 50 ms),
//! and tern's resident memory beyond the guest RAM the guest touched (target ≤ 20 MiB).
//!
//! Run: `cargo bench -p tern-vmm --bench boot`

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const RUNS: usize = 7;

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn one_run(cpus: &str, memory: &str) -> (f64, f64, f64) {
    let t0 = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_micros();
    let child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--guest", "demo,mib=16,dirty-mib-per-s=16,exit-after=2"])
        .args(["--cpus", cpus, "--memory", memory, "--serial", "off"])
        .env("TERN_BENCH_T0_US", t0.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern");
    std::thread::sleep(Duration::from_millis(1500));
    let pid = child.id();
    // Guest RAM is a shared memfd mapping, so the pages the guest touched show up as RssShmem;
    // everything else resident is tern itself.
    let rss = status_kib(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0;
    let guest = status_kib(pid, "RssShmem:").unwrap_or(0) as f64 / 1024.0;
    let out = child.wait_with_output().expect("wait tern");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let us: f64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("tern-bench: vcpus_released_us="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    (us / 1000.0, rss - guest, guest)
}

fn main() {
    println!("boot benchmark: median of {RUNS} runs (demo guest, mib=16)");
    for (cpus, memory) in [("1", "256M"), ("2", "1G")] {
        let runs: Vec<_> = (0..RUNS).map(|_| one_run(cpus, memory)).collect();
        let start_ms = median(runs.iter().map(|r| r.0).collect());
        let overhead = median(runs.iter().map(|r| r.1).collect());
        let touched = median(runs.iter().map(|r| r.2).collect());
        println!(
            "  {cpus} vCPU / {memory:>4}: spawn → vCPUs in KVM_RUN {start_ms:6.1} ms (target ≤ 50)   \
             tern RSS beyond guest RAM {overhead:5.1} MiB (target ≤ 20; guest touched {touched:.1} MiB)"
        );
    }
}
