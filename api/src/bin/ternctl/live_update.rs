//! `ternctl live-update --binary PATH`: replaces the tern process under a running VM on this host.
//! Starts the new tern (API socket next to the old one), has it receive, sends the VM to it in
//! local mode — guest memory and passthrough devices go as file descriptors, nothing is copied or
//! reset — follows the migration to its end and prints the downtime and what was handed over.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use tern_api::types::{MigrationState, MigrationStatus};
use tern_api::{
    ApiClient, MigrationMode, MigrationUrl, TimeoutStrategy, VmReceiveMigrationData,
    VmSendMigrationData,
};

/// What the command needs.
#[derive(Debug)]
pub struct LiveUpdate {
    pub binary: PathBuf,
    pub new_api_socket: PathBuf,
    pub tern_args: Vec<String>,
    pub downtime_ms: u64,
    /// Where the new tern's stdout and stderr go (appended); `None`: nowhere. Never ternctl's
    /// own: the new tern outlives ternctl, and a pipe it held would never reach its end.
    pub new_log: Option<PathBuf>,
}

/// Errors of a live update.
#[derive(Debug, thiserror::Error)]
pub enum LiveUpdateError {
    #[error("cannot open the new tern's log {}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the new tern {}", path.display())]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the new tern exited before its API socket {} answered ({status})", socket.display())]
    NewExited {
        socket: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("the new tern's API socket {} did not answer within 30 s", .0.display())]
    NewSilent(PathBuf),
    #[error("the new tern refused to receive")]
    Receive(#[source] tern_api::ApiClientError),
    #[error("the old tern refused the live update")]
    Send(#[source] tern_api::ApiClientError),
    #[error("the live update failed (the VM runs on in the old tern): {0}")]
    Failed(String),
    #[error("cannot follow the live update on the old tern")]
    Status(#[source] tern_api::ApiClientError),
}

fn wait_answer(
    child: &mut Child,
    client: &ApiClient,
    socket: &Path,
) -> Result<(), LiveUpdateError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if socket.exists() && client.vmm_ping().is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LiveUpdateError::NewExited {
                socket: socket.to_path_buf(),
                status,
            });
        }
        if Instant::now() > deadline {
            return Err(LiveUpdateError::NewSilent(socket.to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Follows the old tern's migration to its end; it exits shortly after a completed one, so a
/// status read that fails after `completing` was seen counts as the last word only if it said so.
fn follow(old: &ApiClient) -> Result<MigrationStatus, LiveUpdateError> {
    loop {
        let s = old.vm_migration_status().map_err(LiveUpdateError::Status)?;
        match s.status {
            MigrationState::Completed => return Ok(s),
            MigrationState::Failed | MigrationState::Cancelled | MigrationState::InDoubt => {
                return Err(LiveUpdateError::Failed(
                    s.error.unwrap_or_else(|| format!("{:?}", s.status)),
                ))
            }
            // Each poll is an API request the old tern answers while it may be switching over:
            // on a host short of CPUs it competes with the switchover itself.
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Runs the live update; prints one summary line per fact on stdout.
pub fn run(old: &ApiClient, args: LiveUpdate) -> Result<ExitCode, LiveUpdateError> {
    let socket = args.new_api_socket;
    let _ = std::fs::remove_file(&socket);
    let (out, err) = match &args.new_log {
        Some(path) => {
            let log = |source| LiveUpdateError::Log {
                path: path.clone(),
                source,
            };
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(log)?;
            (Stdio::from(f.try_clone().map_err(log)?), Stdio::from(f))
        }
        None => (Stdio::null(), Stdio::null()),
    };
    let mut child = Command::new(&args.binary)
        .arg("--api-socket")
        .arg(&socket)
        .args(&args.tern_args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|source| LiveUpdateError::Spawn {
            path: args.binary.clone(),
            source,
        })?;
    let new = ApiClient::new(&socket);
    let result = (|| {
        wait_answer(&mut child, &new, &socket)?;
        let mut mig = socket.clone().into_os_string();
        mig.push(".mig");
        let url = MigrationUrl::Unix {
            path: PathBuf::from(mig),
        };
        new.vm_receive_migration(&VmReceiveMigrationData {
            receiver_url: url.clone(),
            devices: Vec::new(),
            tls_dir: None,
            memory_mode: MigrationMode::MemFDs,
        })
        .map_err(LiveUpdateError::Receive)?;
        old.vm_send_migration(&VmSendMigrationData {
            destination_url: url,
            local: true,
            downtime_ms: args.downtime_ms,
            timeout_s: tern_api::types::DEFAULT_TIMEOUT_S,
            timeout_strategy: TimeoutStrategy::Cancel,
            max_bandwidth_mbps: 0,
            connections: 1,
            auto_converge: false,
            page_checksums: true,
            tls_dir: None,
            memory_mode: MigrationMode::MemFDs,
        })
        .map_err(LiveUpdateError::Send)?;
        follow(old)
    })();
    let s = match result {
        Ok(s) => s,
        Err(e) => {
            // The VM stays with the old tern; the new one has nothing to run.
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let steps_us = s.switchover.as_ref().map_or(0, |t| t.total_us());
    println!(
        "live-update: completed: new tern pid {} on {}",
        child.id(),
        socket.display()
    );
    println!(
        "live-update: downtime {} ms ({} us from pause to the new tern's ack)",
        s.downtime_ms.unwrap_or(0),
        steps_us
    );
    if let Some(t) = &s.switchover {
        println!(
            "live-update: switchover: {}",
            crate::report::switchover_line(t)
        );
    }
    if !s.switchover_steps.is_empty() {
        println!(
            "live-update: source steps: {}",
            crate::report::steps_line(&s.switchover_steps)
        );
    }
    // The new tern timed its side from the old one's Complete to its ack; it records them right
    // after that ack, so they may lag the old tern's completion by a moment.
    for _ in 0..100 {
        match new.vm_migration_status() {
            Ok(d) if !d.switchover_steps.is_empty() => {
                println!(
                    "live-update: new tern steps: {}",
                    crate::report::steps_line(&d.switchover_steps)
                );
                // Both stamps are this host's wall clock: the time the guest stood still, without
                // the ack's way back (on a host short of CPUs the resumed guest may run first).
                if let (Some(p), Some(r)) = (s.paused_at_unix_us, d.resumed_at_unix_us) {
                    println!(
                        "live-update: vCPUs stopped -> running in the new tern: {} us",
                        r.saturating_sub(p)
                    );
                }
                break;
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                eprintln!("live-update: the new tern's switchover steps: {e}");
                break;
            }
        }
    }
    let handed: Vec<&str> = s
        .devices
        .iter()
        .filter(|d| d.handed_over)
        .map(|d| d.id.as_str())
        .collect();
    println!(
        "live-update: devices handed over: {}",
        if handed.is_empty() {
            "none".to_string()
        } else {
            handed.join(", ")
        }
    );
    for d in s.devices.iter().filter(|d| d.handed_over) {
        if let Some(n) = &d.handover_note {
            println!("live-update: {}: {n}", d.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}
