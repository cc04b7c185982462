//! Booting guests with the real `tern` binary on this host's /dev/kvm: the demo guest, and the
//! Linux boot protocols exercised with a small probe kernel (a stock Linux kernel cannot boot on
//! this host's PVM KVM; the nested lab's `linux-boot` scenario boots one).

mod common;

use std::time::Duration;

use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);

fn demo_run(cpus: &str, guest: &str, memory: &str) -> (String, std::process::Output) {
    let (out, timed_out) = run_tern(
        &[
            "--guest", guest, "--cpus", cpus, "--memory", memory, "--serial", "stdout",
        ],
        TIMEOUT,
    );
    assert!(!timed_out, "tern did not power off in time");
    (String::from_utf8_lossy(&out.stdout).into_owned(), out)
}

fn pass_lines(stdout: &str) -> Vec<(u64, u64, u64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            // DEMO: pass N verified M pages written W pages
            (w.len() >= 8 && w[0] == "DEMO:" && w[1] == "pass").then(|| {
                (
                    w[2].parse().unwrap(),
                    w[4].parse().unwrap(),
                    w[7].parse().unwrap(),
                )
            })
        })
        .collect()
}

#[test]
fn demo_guest_verifies_and_powers_off() {
    let (stdout, out) = demo_run("1", "demo,mib=8,dirty-mib-per-s=32,exit-after=2", "128M");
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("DEMO: start cpus=1 pages=2048"), "{stdout}");
    assert!(
        !stdout.contains("CORRUPT") && !stdout.contains("FAULT"),
        "{stdout}"
    );
    assert!(stdout.contains("DEMO: done"), "{stdout}");
    let passes = pass_lines(&stdout);
    assert!(passes.len() >= 2, "{stdout}");
    let (_, verified, written) = *passes.last().unwrap();
    assert!(verified > 2048, "verified only {verified}");
    // 32 MiB/s for about a second = about 8192 pages; allow wide scheduling slack.
    assert!((2000..40000).contains(&written), "written {written}");
}

#[test]
fn demo_guest_runs_every_vcpu() {
    // With an idle rate, writes only happen if every vCPU's partition is driven: compare a
    // 2-vCPU run's write rate with the configured total.
    let (stdout, out) = demo_run("2", "demo,mib=8,dirty-mib-per-s=64,exit-after=2", "128M");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("DEMO: start cpus=2"), "{stdout}");
    let passes = pass_lines(&stdout);
    let (_, _, written) = *passes.last().expect("pass lines");
    // 64 MiB/s split over two vCPUs: one vCPU alone would write half of that.
    assert!(
        written > 64 * 256 * 6 / 10,
        "written {written}: not every vCPU runs\n{stdout}"
    );
}

#[test]
fn demo_guest_idle_writes_nothing() {
    let (stdout, out) = demo_run("1", "demo,mib=4,dirty-mib-per-s=0,exit-after=1", "64M");
    assert!(out.status.success());
    for (_, _, written) in pass_lines(&stdout) {
        assert_eq!(written, 0, "{stdout}");
    }
}

/// Probe kernels assembled by build.rs (guests/probe/).
const PROBE64_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe64.elf"));
const PROBE64_FLAT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe64.bin"));

#[derive(Clone, Copy)]
enum Probe {
    Elf64,
    BzImage,
}

fn probe_kernel(dir: &TempDir, probe: Probe) -> std::path::PathBuf {
    let bytes = match probe {
        Probe::Elf64 => PROBE64_ELF.to_vec(),
        Probe::BzImage => {
            // Two setup sectors with a boot protocol header, then the protected-mode kernel whose
            // 64-bit entry is 0x200 bytes in.
            let mut image = vec![0u8; 1024];
            image[0x1f1] = 1; // setup_sects
            image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
            image[0x202..0x206].copy_from_slice(b"HdrS");
            image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
            image[0x211] = 1; // LOADED_HIGH
            image[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes());
            image[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
            image.extend_from_slice(&[0u8; 0x200]);
            image.extend_from_slice(PROBE64_FLAT);
            image
        }
    };
    let path = dir.join("probe-kernel");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn boot_probe(probe: Probe) {
    let dir = TempDir::new("probe");
    let kernel = probe_kernel(&dir, probe);
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, b"TERNINITRD-0123456789").unwrap();
    let (out, timed_out) = run_tern(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initrd.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 tern.test=42",
            "--memory",
            "64M",
        ],
        TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!timed_out, "probe kernel did not power off: {stdout}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("PROBE cmdline=console=ttyS0 tern.test=42 initrd=TERNINITRD-01234\n"),
        "{stdout}"
    );
}

#[test]
fn elf_kernel_gets_cmdline_and_initramfs() {
    boot_probe(Probe::Elf64);
}

#[test]
fn bzimage_kernel_gets_cmdline_and_initramfs() {
    boot_probe(Probe::BzImage);
}

// PVH enters in 32-bit protected mode, which this host's PVM KVM cannot run: the nested lab's
// `linux-boot-pvh` scenario boots Debian's vmlinux through its PVH note instead.

#[test]
fn initramfs_that_does_not_fit_is_refused() {
    let dir = TempDir::new("bigrd");
    let kernel = probe_kernel(&dir, Probe::Elf64);
    let initrd = dir.join("huge");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let (out, _) = run_tern(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initrd.to_str().unwrap(),
            "--memory",
            "32M",
        ],
        TIMEOUT,
    );
    assert_clean_error(&out, "does not fit in guest memory");
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage_is_refused() {
    let dir = TempDir::new("badkernel");
    let kernel = dir.join("notakernel");
    std::fs::write(&kernel, vec![0x5au8; 8192]).unwrap();
    let (out, _) = run_tern(&["--kernel", kernel.to_str().unwrap()], TIMEOUT);
    assert_clean_error(&out, "neither an x86_64 ELF vmlinux nor a bzImage");
    let (out, _) = run_tern(&["--kernel", "/nonexistent/kernel"], TIMEOUT);
    assert_clean_error(&out, "cannot open kernel /nonexistent/kernel");
}

#[test]
fn bad_command_lines_get_clear_errors() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--guest", "demo", "--memory", "0"],
            "--memory must be at least 1 MiB",
        ),
        (
            &["--guest", "demo", "--memory", "lots"],
            "invalid --memory 'lots'",
        ),
        (
            &["--guest", "demo", "--cpus", "0"],
            "--cpus must be at least 1",
        ),
        (
            &["--guest", "demo", "--cpus", "100000"],
            "--cpus 100000 is more than",
        ),
        (
            &["--guest", "demo,colour=blue"],
            "unknown demo guest option 'colour'",
        ),
        (&["--guest", "windows"], "unknown guest 'windows'"),
        (
            &["--guest", "demo,mib=4096", "--memory", "256M"],
            "raise --memory or lower mib",
        ),
        (
            &["--guest", "demo", "--serial", "tty"],
            "invalid --serial 'tty'",
        ),
        (&[], "nothing to run"),
        (
            &["--guest", "demo", "--kvm-device", "/nonexistent/kvm"],
            "cannot open /nonexistent/kvm",
        ),
        (
            &["--guest", "demo", "--device", "path=/sys/x,dirty=fast"],
            "--device: dirty=\"fast\" must be auto, iommufd, dma-logging, type1 or none",
        ),
        (
            &["--guest", "demo", "--mock-dma", "dirty=fast"],
            "--mock-dma: dirty=\"fast\" must be auto",
        ),
        (
            &["--guest", "demo", "--mock-dma", "speed=9"],
            "--mock-dma: unknown key \"speed\"",
        ),
        (
            &["--guest", "demo", "--memory", "128M", "--mock-dma", "mib=3"],
            "a power-of-two number of pages",
        ),
    ];
    for (args, expected) in cases {
        let (out, timed_out) = run_tern(args, TIMEOUT);
        assert!(!timed_out, "{args:?} hung");
        assert_clean_error(&out, expected);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: not one line: {stderr}"
        );
    }
}

#[test]
fn cpus_beyond_kvm_limit_are_refused() {
    // The demo layout allows 254; whatever this host's KVM allows below that must be enforced by
    // tern itself, not by a failing ioctl.
    let kvm_max = kvm_ioctls::Kvm::new().unwrap().get_max_vcpus();
    if kvm_max < 254 {
        let cpus = (kvm_max + 1).to_string();
        let (out, _) = run_tern(&["--guest", "demo", "--cpus", &cpus], TIMEOUT);
        assert_clean_error(&out, "is more than this host's KVM allows");
    }
}
