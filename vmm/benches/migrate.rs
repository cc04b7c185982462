//! Migration benchmark (prints numbers; no pass/fail): downtime and total time of live migrations
//! between two real `tern` processes, over tcp, unix and local (memfd hand-over), for
//!   - a 512 MiB demo guest rewriting a 4 MiB hot set at ~70 MiB/s (targets: tcp total ≤ 50 ms,
//!     downtime ≤ 7 ms; local downtime ≤ 3 ms; about the hot set on the wire, not 512 MiB), and
//!   - an idle 1 GiB demo guest.
//!
//! Run: `cargo bench -p tern-vmm --bench migrate` (release build; uses /dev/kvm).
//! `TERN_BENCH_MODES=local` (comma-separated: tcp, unix, local) runs only those modes;
//! `TERN_BENCH_RUNS=N` takes the median of N runs (default 5; a busy host needs more).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_api::types::{
    MigrationState, MigrationStatus, VmReceiveMigrationData, VmSendMigrationData,
};
use tern_api::ApiClient;

const DEFAULT_RUNS: usize = 5;
const DOWNTIME_TARGET_MS: u64 = 5;

struct Tern {
    child: Child,
    socket: PathBuf,
}

impl Drop for Tern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, name: &str, args: &[&str]) -> Tern {
    let socket = dir.join(format!("{name}.sock"));
    let child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("--api-socket")
        .arg(&socket)
        .args(["--serial", "off"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tern");
    let t0 = Instant::now();
    while !socket.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "tern did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    Tern { child, socket }
}

/// One migration: the source's final status and the destination's (its switchover steps).
fn migrate_once(
    dir: &Path,
    guest: &str,
    memory: &str,
    mode: &str,
) -> Option<(MigrationStatus, MigrationStatus)> {
    let _ = std::fs::remove_file(dir.join("mig.sock"));
    let dst = start(dir, "dst", &[]);
    let src = start(
        dir,
        "src",
        &["--guest", guest, "--memory", memory, "--cpus", "1"],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (url, local) = match mode {
        "tcp" => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .ok()?
                .local_addr()
                .ok()?
                .port();
            (format!("tcp:127.0.0.1:{port}"), false)
        }
        "unix" => (format!("unix:{}", dir.join("mig.sock").display()), false),
        _ => (format!("unix:{}", dir.join("mig.sock").display()), true),
    };
    let recv: VmReceiveMigrationData =
        serde_json::from_value(serde_json::json!({ "receiver_url": url })).ok()?;
    ApiClient::new(&dst.socket)
        .vm_receive_migration(&recv)
        .ok()?;
    let send: VmSendMigrationData = serde_json::from_value(serde_json::json!({
        "destination_url": url,
        "local": local,
        "downtime_ms": DOWNTIME_TARGET_MS,
    }))
    .ok()?;
    let client = ApiClient::new(&src.socket);
    client.vm_send_migration(&send).ok()?;
    let t0 = Instant::now();
    let dst_client = ApiClient::new(&dst.socket);
    // The destination records its steps right after its ack, a moment after the source's end.
    let dst_status = || {
        (0..100)
            .filter_map(|_| {
                let d = dst_client.vm_migration_status().ok()?;
                if d.switchover_steps.is_empty() {
                    std::thread::sleep(Duration::from_millis(10));
                    return None;
                }
                Some(d)
            })
            .next()
            .unwrap_or_default()
    };
    while t0.elapsed() < Duration::from_secs(60) {
        match client.vm_migration_status() {
            Ok(s) if s.status.is_terminal() => return Some((s, dst_status())),
            Ok(_) => {}
            Err(_) => break,
        }
        // Polling competes with the switchover for CPU; the downtime is measured by the source.
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The downtime in µs: the source's switchover steps, pause to the destination's ack.
fn downtime_us(s: &MigrationStatus) -> Option<u64> {
    s.switchover.map(|t| t.total_us())
}

/// Median per step over runs, in the first run's order: `name median` joined.
fn median_steps(runs: &[&[tern_api::types::TimedStep]]) -> String {
    let Some(first) = runs.first() else {
        return String::new();
    };
    first
        .iter()
        .map(|step| {
            let v = runs
                .iter()
                .filter_map(|r| r.iter().find(|s| s.name == step.name))
                .map(|s| s.us as f64)
                .collect();
            format!("{} {:.0}", step.name, median(v))
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

/// Median per named step over runs (a run without the step does not count), in the order the
/// steps first appear: `name median` joined.
fn median_named(runs: &[Vec<(String, u64)>]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for (name, _) in runs.iter().flatten() {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    names
        .iter()
        .map(|name| {
            let v = runs
                .iter()
                .filter_map(|r| r.iter().find(|(n, _)| n == name))
                .map(|(_, us)| *us as f64)
                .collect();
            format!("{name} {:.0}", median(v))
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn main() {
    let dir = std::env::temp_dir().join(format!("tern-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let runs_wanted = std::env::var("TERN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_RUNS);
    println!(
        "migration benchmark: median of {runs_wanted} runs, downtime target {DOWNTIME_TARGET_MS} ms"
    );
    let workloads = [
        (
            "512 MiB, 4 MiB hot set @ 70 MiB/s",
            "demo,mib=4,dirty-mib-per-s=70",
            "512M",
        ),
        ("1 GiB idle", "demo,mib=4,dirty-mib-per-s=0", "1G"),
    ];
    let modes = std::env::var("TERN_BENCH_MODES").unwrap_or_else(|_| "tcp,unix,local".into());
    for (label, guest, memory) in workloads {
        for mode in ["tcp", "unix", "local"] {
            if !modes.split(',').any(|m| m.trim() == mode) {
                continue;
            }
            let pairs: Vec<(MigrationStatus, MigrationStatus)> = (0..runs_wanted)
                .filter_map(|_| migrate_once(&dir, guest, memory, mode))
                .filter(|(s, _)| s.status == MigrationState::Completed)
                .collect();
            let runs: Vec<MigrationStatus> = pairs.iter().map(|(s, _)| s.clone()).collect();
            let ms = |f: fn(&MigrationStatus) -> Option<u64>| {
                median(runs.iter().filter_map(f).map(|v| v as f64).collect())
            };
            println!(
                "  {label:<36} {mode:<5}: {ok}/{runs_wanted} ok  downtime {dt:6.1} ms  total {tt:7.1} ms  \
                 on the wire {mib:7.2} MiB  iterations {it:.0}",
                ok = runs.len(),
                dt = ms(|s| s.downtime_ms),
                tt = ms(|s| s.total_time_ms),
                mib = ms(|s| Some(s.transferred_bytes)) / (1 << 20) as f64,
                it = ms(|s| Some(s.iteration)),
            );
            let sw = |f: fn(&tern_api::types::SwitchoverTimes) -> u64| {
                median(
                    runs.iter()
                        .filter_map(|s| s.switchover.as_ref().map(f))
                        .map(|v| v as f64)
                        .collect(),
                )
            };
            println!(
                "    downtime {:.0} us: pause {:.0} · final pass {:.0} · state save {:.0} · send {:.0} \
                 · destination restore {:.0} · start {:.0} (µs, medians)",
                ms(downtime_us),
                sw(|t| t.pause_us),
                sw(|t| t.final_pass_us),
                sw(|t| t.state_save_us),
                sw(|t| t.send_us),
                sw(|t| t.destination_restore_us),
                sw(|t| t.destination_start_us),
            );
            let src: Vec<&[_]> = runs.iter().map(|s| s.switchover_steps.as_slice()).collect();
            let dst: Vec<&[_]> = pairs
                .iter()
                .map(|(_, d)| d.switchover_steps.as_slice())
                .filter(|d| !d.is_empty())
                .collect();
            println!("    source steps: {} (µs, medians)", median_steps(&src));
            println!(
                "    destination steps: {} (µs, medians)",
                median_steps(&dst)
            );
            let totals: Vec<String> = runs
                .iter()
                .map(|s| s.total_time_ms.unwrap_or(0).to_string())
                .collect();
            println!("    totals {} ms", totals.join(" "));
            let named = |steps: &[tern_api::types::TimedStep]| -> Vec<(String, u64)> {
                steps.iter().map(|s| (s.name.clone(), s.us)).collect()
            };
            let src: Vec<_> = runs.iter().map(|s| named(&s.setup_steps)).collect();
            let dst: Vec<_> = pairs.iter().map(|(_, d)| named(&d.setup_steps)).collect();
            println!("    source setup: {} (µs, medians)", median_named(&src));
            println!(
                "    destination setup: {} (µs, medians)",
                median_named(&dst)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
