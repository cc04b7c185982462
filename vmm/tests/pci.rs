//! The PCI bus as a real guest sees it: a probe kernel (guests/probe/probe_pci.S) scans bus 0 through
//! ports 0xCF8/0xCFC inside `tern --kernel`, prints every function it finds and what each BAR register
//! reads back after an all-ones write, and powers off.

mod common;

use std::time::Duration;

use common::*;

const PROBE_PCI_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe_pci.elf"));

fn probe_output(memory: &str) -> String {
    let dir = TempDir::new("pci");
    let kernel = dir.join("probe-pci");
    std::fs::write(&kernel, PROBE_PCI_ELF).unwrap();
    let (out, timed_out) = run_tern(
        &["--kernel", kernel.to_str().unwrap(), "--memory", memory],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!timed_out, "PCI probe did not power off: {stdout}");
    assert!(
        out.status.success(),
        "exit {:?}: {}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PCI scan done"), "{stdout}");
    stdout
}

fn device_lines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("PCI 00:") && l.contains(" class "))
        .collect()
}

#[test]
fn guest_finds_only_the_host_bridge() {
    let stdout = probe_output("64M");
    // 1b36:0008 is the host bridge; class 06/00/00 is "host bridge". Nothing else is on the bus.
    assert_eq!(
        device_lines(&stdout),
        vec!["PCI 00:00.0 1b36:0008 class 060000"],
        "{stdout}"
    );
}

#[test]
fn guest_sizes_the_host_bridge_bars_to_nothing() {
    let stdout = probe_output("64M");
    let bars: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("PCI 00:00.0 bar "))
        .collect();
    let expected: Vec<String> = (0..6)
        .map(|i| format!("PCI 00:00.0 bar {i} mask 00000000"))
        .collect();
    assert_eq!(bars, expected, "{stdout}");
}

#[test]
fn guest_sees_the_same_bus_above_4g_of_ram() {
    // With RAM above the hole the 64-bit window moves up; the bus the guest sees does not change.
    let stdout = probe_output("3200M");
    assert_eq!(
        device_lines(&stdout),
        vec!["PCI 00:00.0 1b36:0008 class 060000"],
        "{stdout}"
    );
}
