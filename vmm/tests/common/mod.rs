//! Helpers shared by tern's integration tests: run the real `tern` binary and inspect its output.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod ch_client;

/// The `tern` binary cargo built for these tests, or the one `TERN_TEST_BIN` names (to run a
/// suite against another build, e.g. an older tern as a negative control).
pub fn tern_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("TERN_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tern").to_owned())
    })
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("tern-test-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `tern args...`, killing it after `timeout`; returns its output and whether it timed out.
pub fn run_tern(args: &[&str], timeout: Duration) -> (Output, bool) {
    let mut child = Command::new(tern_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern");
    let start = Instant::now();
    let mut timed_out = false;
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child.wait_with_output().expect("output"), timed_out)
}

/// Asserts that a failed run printed one clear `tern: error:` line and no panic.
pub fn assert_clean_error(out: &Output, expected_fragment: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "tern panicked: {stderr}");
    assert!(
        stderr.contains(expected_fragment),
        "stderr lacks {expected_fragment:?}: {stderr}"
    );
}

/// A `tern` process with an API socket and its serial console in a file; killed on drop.
pub struct TernProcess {
    pub child: std::process::Child,
    pub socket: PathBuf,
    pub serial: PathBuf,
    pub stderr: PathBuf,
}

impl TernProcess {
    /// Starts `tern --api-socket DIR/NAME.sock --serial file=DIR/NAME.log extra...`.
    pub fn start(dir: &TempDir, name: &str, extra: &[&str]) -> Self {
        let socket = dir.join(&format!("{name}.sock"));
        let serial = dir.join(&format!("{name}.log"));
        let stderr = dir.join(&format!("{name}.err"));
        let child = Command::new(tern_bin())
            .arg("--api-socket")
            .arg(&socket)
            .arg("--serial")
            .arg(format!("file={}", serial.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn tern");
        let p = Self {
            child,
            socket,
            serial,
            stderr,
        };
        let start = Instant::now();
        while !p.socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{name}: API socket never appeared: {}",
                p.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    pub fn client(&self) -> tern_api::ApiClient {
        tern_api::ApiClient::new(&self.socket)
    }

    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the process to exit; returns its status, or None on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return Some(s);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// Waits until the serial log has `count` more demo progress lines than now, and returns the
    /// new text. Panics on timeout.
    pub fn wait_more_passes(&self, count: usize, timeout: Duration) -> String {
        let before = demo_pass_count(&self.serial_text());
        let start = Instant::now();
        loop {
            let text = self.serial_text();
            if demo_pass_count(&text) >= before + count {
                return text;
            }
            assert!(
                start.elapsed() < timeout,
                "guest made no progress: {text}\n{}",
                self.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TernProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Number of `DEMO: pass` lines in a serial log.
pub fn demo_pass_count(text: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with("DEMO: pass "))
        .count()
}

/// Asserts the demo guest's verifier never fired.
pub fn assert_verifier_clean(text: &str) {
    assert!(
        !text.contains("CORRUPT") && !text.contains("FAULT"),
        "guest verifier failed:\n{text}"
    );
}

/// A `vm.receive-migration` body from JSON (a test's own input: panics if it does not parse).
pub fn receive_body(v: serde_json::Value) -> tern_api::types::VmReceiveMigrationData {
    serde_json::from_value(v).expect("valid receive body")
}

/// A `vm.send-migration` body from JSON (a test's own input: panics if it does not parse).
pub fn send_body(v: serde_json::Value) -> tern_api::types::VmSendMigrationData {
    serde_json::from_value(v).expect("valid send body")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
