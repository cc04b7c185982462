//! Migration benchmark (prints numbers; no pass/fail): downtime and total time of live migrations
//! between two real `tern` processes, over tcp, unix and local (memfd hand-over), for
//!   - a 512 MiB demo guest rewriting a 4 MiB hot set at ~70 MiB/s (targets: tcp total ≤ 50 ms,
//!     downtime ≤ 7 ms; local downtime ≤ 3 ms; about the hot set on the wire, not 512 MiB), and
//!   - an idle 1 GiB demo guest.
//!
//! Run: `cargo bench -p tern-vmm --bench migrate` (release build; uses /dev/kvm).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_api::types::{
    MigrationState, MigrationStatus, VmReceiveMigrationData, VmSendMigrationData,
};
use tern_api::ApiClient;

const RUNS: usize = 5;
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

fn migrate_once(dir: &Path, guest: &str, memory: &str, mode: &str) -> Option<MigrationStatus> {
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
    let mut last = None;
    while t0.elapsed() < Duration::from_secs(60) {
        match client.vm_migration_status() {
            Ok(s) if s.status.is_terminal() => return Some(s),
            Ok(s) => last = Some(s),
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    last
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
    println!("migration benchmark: median of {RUNS} runs, downtime target {DOWNTIME_TARGET_MS} ms");
    let workloads = [
        (
            "512 MiB, 4 MiB hot set @ 70 MiB/s",
            "demo,mib=4,dirty-mib-per-s=70",
            "512M",
        ),
        ("1 GiB idle", "demo,mib=4,dirty-mib-per-s=0", "1G"),
    ];
    for (label, guest, memory) in workloads {
        for mode in ["tcp", "unix", "local"] {
            let runs: Vec<MigrationStatus> = (0..RUNS)
                .filter_map(|_| migrate_once(&dir, guest, memory, mode))
                .filter(|s| s.status == MigrationState::Completed)
                .collect();
            let ms = |f: fn(&MigrationStatus) -> Option<u64>| {
                median(runs.iter().filter_map(f).map(|v| v as f64).collect())
            };
            println!(
                "  {label:<36} {mode:<5}: {ok}/{RUNS} ok  downtime {dt:6.1} ms  total {tt:7.1} ms  \
                 on the wire {mib:7.2} MiB  iterations {it:.0}",
                ok = runs.len(),
                dt = ms(|s| s.downtime_ms),
                tt = ms(|s| s.total_time_ms),
                mib = ms(|s| Some(s.transferred_bytes)) / (1 << 20) as f64,
                it = ms(|s| Some(s.iteration)),
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
