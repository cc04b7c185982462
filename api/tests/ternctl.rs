//! `ternctl` end to end: the built binary against a server with a fake VMM.

mod common;

use std::process::{Command, Output};
use std::sync::Arc;

use common::{FakeVmm, Harness};
use tern_api::types::{MigrationIteration, MigrationPass};
use tern_api::{
    DirtyPagesBySource, MigrationState, MigrationStatus, MigrationUrl, TimeoutStrategy, VmState,
};

fn ternctl(h: &Harness, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ternctl"))
        .arg("--api-socket")
        .arg(&h.socket)
        .args(args)
        .output()
        .expect("ternctl runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn every_command_calls_its_endpoint() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    let commands: &[(&[&str], &str)] = &[
        (&["ping"], "vmm.ping"),
        (&["info"], "vm.info"),
        (&["pause"], "vm.pause"),
        (&["resume"], "vm.resume"),
        (&["send-migration", "unix:/tmp/d.sock"], "vm.send-migration"),
        (&["migration-status"], "vm.migration"),
        (&["migration-cancel"], "vm.migration-cancel"),
        (&["shutdown"], "vm.shutdown"),
        (&["shutdown-vmm"], "vmm.shutdown"),
    ];
    for (args, endpoint) in commands {
        let out = ternctl(&h, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert_eq!(h.vmm.calls().last(), Some(endpoint), "{args:?}");
    }
    // A VM's life, from a VmConfig file.
    let h = Harness::start(Arc::new(FakeVmm::default()));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("vm.json");
    std::fs::write(&config, r#"{"payload": {"demo": {"mib": 8}}}"#).expect("write");
    let config_arg = config.to_string_lossy().into_owned();
    let life: &[(&[&str], &str)] = &[
        (&["create", &config_arg], "vm.create"),
        (&["boot"], "vm.boot"),
        (&["reboot"], "vm.reboot"),
        (&["delete"], "vm.delete"),
    ];
    for (args, endpoint) in life {
        let out = ternctl(&h, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert_eq!(h.vmm.calls().last(), Some(endpoint), "{args:?}");
    }
    let missing = ternctl(&h, &["create", "/nonexistent/vm.json"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("cannot read /nonexistent/vm.json"),
        "{}",
        stderr(&missing)
    );

    let h = Harness::start(Arc::new(FakeVmm::default()));
    let out = ternctl(&h, &["receive-migration", "tcp:0.0.0.0:6000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        h.vmm
            .lock()
            .received
            .as_ref()
            .map(|d| d.receiver_url.clone()),
        Some(MigrationUrl::Tcp {
            host: "0.0.0.0".into(),
            port: 6000
        })
    );
    assert!(h.vmm.lock().received.as_ref().unwrap().devices.is_empty());
}

#[test]
fn receive_migration_maps_devices_with_repeated_device_flags() {
    let h = Harness::start(Arc::new(FakeVmm::default()));
    let out = ternctl(
        &h,
        &[
            "receive-migration",
            "unix:/tmp/in.sock",
            "--device",
            "mtty0=/sys/bus/mdev/devices/u2",
            "--device",
            "edu0=/sys/bus/pci/devices/0000:00:05.0",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let got = h.vmm.lock().received.clone().unwrap().devices;
    let got: Vec<(String, String)> = got
        .into_iter()
        .map(|d| (d.id, d.path.display().to_string()))
        .collect();
    assert_eq!(
        got,
        [
            ("mtty0".into(), "/sys/bus/mdev/devices/u2".into()),
            ("edu0".into(), "/sys/bus/pci/devices/0000:00:05.0".into())
        ]
    );
    // Malformed flags are usage errors; the server's rules (duplicates) come back from it.
    for bad in ["mtty0", "=/sys/x", "mtty0="] {
        let out = ternctl(
            &h,
            &["receive-migration", "unix:/tmp/in.sock", "--device", bad],
        );
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
        assert!(stderr(&out).contains("is not ID=PATH"), "{}", stderr(&out));
    }
    let out = ternctl(
        &h,
        &[
            "receive-migration",
            "unix:/tmp/in.sock",
            "--device",
            "a=/x",
            "--device",
            "a=/y",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("maps id a twice"), "{}", stderr(&out));
}

#[test]
fn data_commands_print_json() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Paused));
    let out = ternctl(&h, &["ping"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["version"], "9.9.9-fake");
    let out = ternctl(&h, &["info"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["state"], "Paused");
    assert_eq!(v["config"]["cpus"]["boot_vcpus"], 2);
    assert_eq!(v["devices"][1]["iommu"]["hw_dirty_tracking"], true);
    let out = ternctl(&h, &["migration-status"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["status"], "none");
}

#[test]
fn send_migration_flags_reach_the_handler() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    let out = ternctl(
        &h,
        &[
            "send-migration",
            "unix:/run/dst.sock",
            "--local",
            "--downtime-ms",
            "7",
            "--timeout-s",
            "90",
            "--timeout-strategy",
            "ignore",
            "--max-bandwidth-mbps",
            "2500",
            "--connections",
            "3",
            "--auto-converge",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let sent = h.vmm.lock().sent.clone().unwrap();
    assert_eq!(
        sent.destination_url,
        MigrationUrl::Unix {
            path: "/run/dst.sock".into()
        }
    );
    assert!(sent.local && sent.auto_converge);
    assert_eq!(
        (
            sent.downtime_ms,
            sent.timeout_s,
            sent.max_bandwidth_mbps,
            sent.connections
        ),
        (7, 90, 2500, 3)
    );
    assert_eq!(sent.timeout_strategy, TimeoutStrategy::Ignore);
}

#[test]
fn failures_exit_nonzero_with_the_servers_error() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    // Rejected by the server's validation.
    let out = ternctl(&h, &["send-migration", "tcp:h:1", "--connections", "129"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("connections is 129"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("HTTP 400"), "{}", stderr(&out));
    // Rejected by the handler.
    let out = ternctl(&h, &["resume"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot resume while the VM is running (HTTP 409)"),
        "{}",
        stderr(&out)
    );
    // A bad URL never leaves ternctl.
    let out = ternctl(&h, &["send-migration", "localhost:6000"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown scheme \"localhost\""),
        "{}",
        stderr(&out)
    );
    assert_eq!(h.vmm.calls(), ["vm.resume"]);
    // No server at all.
    let gone = h.dir.path().join("nothing.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_ternctl"))
        .arg("--api-socket")
        .arg(&gone)
        .arg("ping")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot connect"), "{}", stderr(&out));
}

fn progress(state: MigrationState, iteration: u64, remaining: u64) -> MigrationStatus {
    MigrationStatus {
        status: state,
        iteration,
        total_bytes: 512 << 20,
        transferred_bytes: iteration * (64 << 20),
        remaining_bytes: remaining,
        bandwidth_bytes_per_s: 1 << 30,
        dirty_pages_per_s: 1000,
        expected_downtime_ms: remaining / (1 << 20),
        ..MigrationStatus::default()
    }
}

#[test]
fn watch_without_tty_prints_lines_then_summary() {
    let vmm = FakeVmm::with_vm(VmState::Running);
    {
        let mut s = vmm.lock();
        s.script
            .push_back(progress(MigrationState::Setup, 0, 512 << 20));
        s.script
            .push_back(progress(MigrationState::Active, 1, 300 << 20));
        let mut active = progress(MigrationState::Active, 2, 20 << 20);
        active.dma_pages_by_device = [("hwpt 3: edu0".to_owned(), 5)].into();
        s.script.push_back(active);
        s.script
            .push_back(progress(MigrationState::Completing, 3, 1 << 20));
        let mut done = progress(MigrationState::Completed, 3, 0);
        done.downtime_ms = Some(6);
        done.total_time_ms = Some(48);
        done.setup_time_ms = Some(3);
        done.dirty_pages_by_source = DirtyPagesBySource {
            kvm: 1234,
            vmm: 56,
            dma: 7,
        };
        done.dma_pages_by_device = [("hwpt 3: edu0".to_owned(), 7)].into();
        let pass =
            |iteration, pass, pages_sent: u64, kvm, dma, expected_downtime_ms| MigrationIteration {
                iteration,
                pass,
                pages_sent,
                bytes_sent: pages_sent * 4096,
                duration_ms: pages_sent / 1000,
                dirty_pages_by_source: DirtyPagesBySource { kvm, vmm: 0, dma },
                dma_pages_by_device: [("hwpt 3: edu0".to_owned(), dma)].into(),
                expected_downtime_ms,
                bandwidth_bytes_per_s: 1 << 30,
                cpu_throttle_percent: if pass == MigrationPass::Dirty { 20 } else { 0 },
            };
        done.iterations = vec![
            pass(0, MigrationPass::Full, 131_072, 0, 0, 0),
            pass(1, MigrationPass::Dirty, 1_000, 990, 5, 12),
            pass(2, MigrationPass::Final, 50, 44, 2, 9),
        ];
        s.script.push_back(done);
    }
    let h = Harness::start(vmm);
    let out = ternctl(&h, &["migration-status", "--watch", "--interval-ms", "10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    for (i, state) in ["setup", "active", "active", "completing", "completed"]
        .iter()
        .enumerate()
    {
        assert!(
            lines[i].starts_with(&format!("migration {state} iteration")),
            "line {i}: {text}"
        );
    }
    assert!(
        lines[2].ends_with(" · dma [hwpt 3: edu0] 5"),
        "line 2: {text}"
    );
    for want in [
        "downtime:     6 ms",
        "total time:   48 ms",
        "setup time:   3 ms",
        "iterations:   3",
        "dirty pages:  kvm 1234, vmm 56, dma 7",
        "dma pages:    [hwpt 3: edu0] 7",
        "(201326592 bytes) of 512.00 MiB",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    // The history table: a header, then one row per pass whose columns read back.
    let header = lines
        .iter()
        .position(|l| l.trim_start().starts_with("iter "))
        .unwrap_or_else(|| panic!("no history table in:\n{text}"));
    let rows: Vec<Vec<&str>> = lines[header + 1..]
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            // iter pass pages MiB ms MiB/s dirty:kvm vmm dma exp.downtime throttle
            ["0", "full", "131072", "512.0", "131", "3908", "0", "0", "0", "-", "0%"].as_slice(),
            ["1", "dirty", "1000", "3.9", "1", "3906", "990", "0", "5", "12", "ms", "20%"]
                .as_slice(),
            ["2", "final", "50", "0.2", "0", "-", "44", "0", "2", "9", "ms", "0%"].as_slice(),
        ],
        "{text}"
    );
}

#[test]
fn watch_exits_nonzero_on_failed_migration_with_its_error() {
    let vmm = FakeVmm::with_vm(VmState::Running);
    {
        let mut s = vmm.lock();
        s.script
            .push_back(progress(MigrationState::Active, 1, 1 << 20));
        let mut failed = progress(MigrationState::Failed, 1, 1 << 20);
        failed.error = Some("destination rejected frame 12: bad checksum".into());
        s.script.push_back(failed);
    }
    let h = Harness::start(vmm);
    let out = ternctl(&h, &["migration-status", "--watch", "--interval-ms", "10"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("migration failed\n"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("migration failed: destination rejected frame 12: bad checksum"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn watch_refuses_when_no_migration_has_run() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    let out = ternctl(&h, &["migration-status", "--watch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no migration has run"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn watch_reports_a_vmm_that_went_away() {
    let vmm = FakeVmm::with_vm(VmState::Running);
    vmm.lock()
        .script
        .push_back(progress(MigrationState::Completing, 4, 1 << 20));
    let mut h = Harness::start(vmm);
    let socket = h.socket.clone();
    let server = h.server.take().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ternctl"))
        .arg("--api-socket")
        .arg(&socket)
        .args(["migration-status", "--watch", "--interval-ms", "100"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Let ternctl see the first status, then stop the "source" as a finished migration would.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !h.vmm.calls().contains(&"vm.migration") {
        assert!(std::time::Instant::now() < deadline, "ternctl never polled");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    server.shutdown().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("lost the VMM while the migration was completing"),
        "{}",
        stderr(&out)
    );
}

/// A migration that never converged: every pre-copy pass expects more than the limit while the
/// throttle climbs, then the timeout cancels it.
fn stuck_migration() -> MigrationStatus {
    let mut s = progress(MigrationState::Cancelled, 6, 64 << 20);
    s.downtime_limit_ms = Some(20);
    s.error = Some("timeout: expected downtime never fell to 20 ms".into());
    s.iterations = (0..6u8)
        .map(|i| MigrationIteration {
            iteration: u64::from(i),
            pass: if i == 0 {
                MigrationPass::Full
            } else {
                MigrationPass::Dirty
            },
            pages_sent: 16_384,
            bytes_sent: 64 << 20,
            duration_ms: 100,
            dirty_pages_by_source: DirtyPagesBySource {
                kvm: 16_000,
                vmm: 0,
                dma: 384,
            },
            expected_downtime_ms: if i == 0 { 0 } else { 80 - u64::from(i) },
            cpu_throttle_percent: 10 * i,
            ..MigrationIteration::default()
        })
        .collect();
    s
}

#[test]
fn migration_report_explains_the_history_and_draws_it() {
    let vmm = FakeVmm::with_vm(VmState::Running);
    vmm.lock().script.push_back(stuck_migration());
    let h = Harness::start(vmm);
    let dir = tempfile::tempdir().expect("tempdir");
    let chart = dir.path().join("chart.svg");
    let chart_arg = chart.to_string_lossy().into_owned();
    let out = ternctl(&h, &["migration-report", "--svg", &chart_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("did not converge") && text.contains("75 ms > 20 ms"),
        "{text}"
    );
    assert!(text.contains("throttled the vCPUs up to 50%"), "{text}");
    // One row per pass, all of them.
    let rows = text
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("dirty"))
        .count();
    assert_eq!(rows, 5, "{text}");
    let svg = std::fs::read_to_string(&chart).expect("the chart was written");
    assert!(
        svg.starts_with("<svg"),
        "not an SVG: {}",
        &svg[..svg.len().min(80)]
    );
    for label in ["dirty: kvm", "dirty: dma", "downtime limit", "throttle %"] {
        assert!(svg.contains(label), "no {label:?} in the chart");
    }

    // The same report from a saved status, without asking the VMM.
    let saved = dir.path().join("status.json");
    let json = ternctl(&h, &["migration-status"]);
    std::fs::write(&saved, &json.stdout).expect("save");
    let saved_arg = saved.to_string_lossy().into_owned();
    let again = ternctl(&h, &["migration-report", "--from", &saved_arg]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(
        stdout(&again),
        text.replace(&format!("chart: {chart_arg}\n"), "")
    );

    // A file that is not a status is named in the error.
    std::fs::write(&saved, "{\"status\": 7}").expect("write");
    let bad = ternctl(&h, &["migration-report", "--from", &saved_arg]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("is not a vm.migration answer"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn a_reader_that_went_away_ends_ternctl_quietly() {
    let h = Harness::start(FakeVmm::with_vm(VmState::Running));
    // A pipe whose read end is already closed: every write to it fails with EPIPE.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_ternctl"))
        .arg("--api-socket")
        .arg(&h.socket)
        .arg("info")
        .stdout(writer)
        .output()
        .expect("ternctl runs");
    assert!(
        !stderr(&out).contains("panicked"),
        "ternctl panicked on a closed stdout: {}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
