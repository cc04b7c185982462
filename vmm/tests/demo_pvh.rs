//! The demo guest as a standalone PVH ELF (`tern --write-demo-elf`, guests/demo/pvh.S): it boots
//! through tern's PVH kernel path, runs the same self-checking loop as `--guest demo`, and migrates
//! with its verifier clean. scripts/bench-peers boots the same ELF on QEMU.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tern_api::types::MigrationState;

const T: Duration = Duration::from_secs(60);

fn write_elf(dir: &TempDir, guest: &str) -> String {
    let path = dir.join("demo.elf").display().to_string();
    let (out, timed_out) = run_tern(&["--write-demo-elf", &path, "--guest", guest], T);
    assert!(
        !timed_out && out.status.success(),
        "--write-demo-elf: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

#[test]
fn pvh_demo_elf_boots_verifies_and_powers_off() {
    let dir = TempDir::new("pvh-elf");
    let elf = write_elf(&dir, "demo,mib=8,dirty-mib-per-s=32,exit-after=2");
    let (out, timed_out) = run_tern(
        &["--kernel", &elf, "--memory", "128M", "--serial", "stdout"],
        T,
    );
    assert!(!timed_out, "the PVH demo did not power off in time");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}: {}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("DEMO: start cpus=1 pages=2048"), "{stdout}");
    assert_verifier_clean(&stdout);
    assert!(stdout.contains("DEMO: done"), "{stdout}");
    assert!(demo_pass_count(&stdout) >= 2, "{stdout}");
    // The last line's counters: whole passes over the working set, and about 32 MiB/s of writes.
    let last = stdout
        .lines()
        .rfind(|l| l.starts_with("DEMO: pass "))
        .unwrap();
    let w: Vec<u64> = last
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert!(w[1] > 2048, "verified only {}: {last}", w[1]);
    assert!((2000..40000).contains(&w[2]), "written {}: {last}", w[2]);
}

#[test]
fn pvh_demo_elf_refuses_more_than_one_vcpu() {
    let dir = TempDir::new("pvh-elf-cpus");
    let path = dir.join("demo.elf").display().to_string();
    let (out, _) = run_tern(
        &["--write-demo-elf", &path, "--guest", "demo", "--cpus", "2"],
        T,
    );
    assert_clean_error(&out, "one vCPU");
}

#[test]
fn pvh_demo_elf_migrates_with_its_verifier_clean() {
    let dir = TempDir::new("pvh-elf-mig");
    let elf = write_elf(&dir, "demo,mib=8,dirty-mib-per-s=64");
    let mut src = TernProcess::start(&dir, "src", &["--kernel", &elf, "--memory", "128M"]);
    src.wait_more_passes(2, T);
    let dst = TernProcess::start(&dir, "dst", &[]);
    let url = format!("unix:{}", dir.join("mig.sock").display());
    dst.client()
        .vm_receive_migration(&receive_body(serde_json::json!({ "receiver_url": url })))
        .expect("receive-migration");
    src.client()
        .vm_send_migration(&send_body(serde_json::json!({ "destination_url": url })))
        .expect("send-migration");
    let start = Instant::now();
    loop {
        match src.client().vm_migration_status() {
            Ok(s) if s.status.is_terminal() => {
                assert_eq!(s.status, MigrationState::Completed, "{s:?}");
                break;
            }
            Err(_) if !src.is_running() => break, // migrated away and exited
            _ => {}
        }
        assert!(start.elapsed() < T, "migration did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        src.wait_exit(Duration::from_secs(10)).is_some(),
        "source did not exit"
    );
    assert_verifier_clean(&src.serial_text());
    let text = dst.wait_more_passes(2, T);
    assert!(
        !text.contains("DEMO: start"),
        "destination rebooted the guest:\n{text}"
    );
    assert_verifier_clean(&text);
}
