//! seccomp: a thread under the vCPU filter cannot open a socket or start a program (and can without
//! the filter), and every thread of a running `tern` is filtered by default.
//!
//! The filtered calls run in a child process (this test binary again, told by an environment
//! variable to run only `child_entry`): a filter cannot be removed, so the test harness's own
//! threads stay unfiltered.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{TempDir, TernProcess};
use tern_vmm::seccomp::{self, SeccompMode, ThreadKind};

const CHILD_ENV: &str = "TERN_SECCOMP_TEST_CHILD";

/// What the child reports, one line per call: `socket ok`, `socket errno=N`, `spawn ok`, ...
fn run_child(mode: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .output()
        .expect("run the test binary as a child");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child ({mode}) failed: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn outcome<T>(what: &str, r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => format!("RESULT {what} ok"),
        Err(e) => format!("RESULT {what} errno={}", e.raw_os_error().unwrap_or(-1)),
    }
}

/// `ioctl(fd, request)` with no argument, as an io::Result.
fn ioctl_no_arg(fd: &impl std::os::fd::AsRawFd, request: u64) -> std::io::Result<i32> {
    // SAFETY: the requests used here (TIOCEXCL, KVM_GET_API_VERSION) take no argument, so the
    // kernel reads or writes no memory of ours.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, 0usize) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `_IO(KVMIO, 0x00)`: KVM_GET_API_VERSION.
const KVM_GET_API_VERSION: u64 = 0xAE00;

/// In the child only: a thread installs the vCPU filter (as a tern vCPU thread does) and tries to
/// open a UDP socket, to run /bin/true, a terminal ioctl (`TIOCEXCL`, no argument) on /dev/null
/// (ENOTTY without a filter: the call reaches the driver) and a KVM ioctl on /dev/kvm (opened
/// before the filter, as tern's vCPU threads get their fds).
#[test]
fn child_entry() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mode: SeccompMode = mode.parse().unwrap();
    seccomp::init(mode).unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    let kvm = std::fs::File::open("/dev/kvm").ok();
    let lines = std::thread::spawn(move || {
        seccomp::install(ThreadKind::Vcpu).unwrap();
        let mut lines = vec![
            outcome("socket", std::net::UdpSocket::bind("127.0.0.1:0")),
            outcome("spawn", Command::new("/bin/true").status()),
            outcome("tty-ioctl", ioctl_no_arg(&null, libc::TIOCEXCL)),
        ];
        if let Some(kvm) = kvm {
            lines.push(outcome(
                "kvm-ioctl",
                ioctl_no_arg(&kvm, KVM_GET_API_VERSION),
            ));
        }
        lines
    })
    .join()
    .unwrap();
    for l in lines {
        println!("{l}");
    }
}

#[test]
fn vcpu_filter_stops_socket_and_exec() {
    let out = run_child("true");
    let eperm = libc::EPERM;
    assert!(
        out.contains(&format!("RESULT socket errno={eperm}")),
        "socket() was not refused: {out}"
    );
    assert!(
        out.contains(&format!("RESULT spawn errno={eperm}")),
        "starting a program was not refused: {out}"
    );
    assert!(
        out.contains(&format!("RESULT tty-ioctl errno={eperm}")),
        "a terminal ioctl was not refused: {out}"
    );
    if std::path::Path::new("/dev/kvm").exists() {
        assert!(
            out.contains("RESULT kvm-ioctl ok"),
            "the vCPU filter refused a KVM ioctl: {out}"
        );
    }
}

#[test]
fn without_the_filter_the_same_calls_work() {
    let out = run_child("false");
    assert!(out.contains("RESULT socket ok"), "{out}");
    assert!(out.contains("RESULT spawn ok"), "{out}");
    // /dev/null is no terminal: the driver itself answers ENOTTY.
    assert!(
        out.contains(&format!("RESULT tty-ioctl errno={}", libc::ENOTTY)),
        "{out}"
    );
}

#[test]
fn log_mode_lets_the_calls_through() {
    let out = run_child("log");
    assert!(out.contains("RESULT socket ok"), "{out}");
    assert!(out.contains("RESULT spawn ok"), "{out}");
}

/// `Seccomp:` (0 none, 2 filter) and `Seccomp_filters:` of each thread of `pid`, by thread name.
fn thread_seccomp(pid: u32) -> Vec<(String, u32, u32)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        v.push((
            field("Name:"),
            field("Seccomp:").parse().unwrap_or(0),
            field("Seccomp_filters:").parse().unwrap_or(0),
        ));
    }
    v.sort();
    v
}

#[test]
fn every_tern_thread_is_filtered_by_default() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = TempDir::new("seccomp");
    let tern = TernProcess::start(&dir, "on", &["--guest", "demo,mib=8", "--cpus", "2"]);
    tern.wait_more_passes(1, Duration::from_secs(20));
    // One request so the API's handler threads exist too.
    tern.client().vm_info().unwrap();
    let threads = thread_seccomp(tern.child.id());
    for name in ["tern", "vcpu0", "vcpu1", "tern-api"] {
        assert!(
            threads.iter().any(|t| t.0 == name),
            "no {name} thread: {threads:?}"
        );
    }
    for (name, mode, filters) in &threads {
        assert_eq!(*mode, 2, "{name} runs unfiltered: {threads:?}");
        assert!(*filters >= 1, "{name}: {threads:?}");
    }

    let off = TernProcess::start(
        &dir,
        "off",
        &["--guest", "demo,mib=8", "--seccomp", "false"],
    );
    off.wait_more_passes(1, Duration::from_secs(20));
    let threads = thread_seccomp(off.child.id());
    assert!(threads.iter().all(|t| t.1 == 0), "{threads:?}");
}
