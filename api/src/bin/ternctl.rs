//! `ternctl`: command-line client for tern's REST API.
//!
//! `ternctl --api-socket PATH <command>`; one command per endpoint. Commands that return data print
//! it as JSON on stdout; the others print nothing. On failure the server's error text goes to
//! stderr and the exit status is 1 (2 for usage errors, as clap does).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tern_api::{
    error_chain, ApiClient, DeviceMapping, MigrationMode, MigrationUrl, TimeoutStrategy,
    VmReceiveMigrationData, VmSendMigrationData,
};

#[path = "ternctl/live_update.rs"]
mod live_update;
#[path = "ternctl/out.rs"]
mod out;
#[path = "ternctl/report.rs"]
mod report;
#[path = "ternctl/watch.rs"]
mod watch;

#[derive(Debug, Parser)]
#[command(
    name = "ternctl",
    version,
    about = "Control a tern VMM through its API socket"
)]
struct Cli {
    /// The VMM's API socket (tern --api-socket PATH).
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Per-request timeout in seconds.
    #[arg(long, value_name = "S", default_value_t = 60)]
    request_timeout_s: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StrategyArg {
    Cancel,
    Ignore,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that the VMM answers (GET vmm.ping).
    Ping,
    /// Stop the VM and exit the VMM process (PUT vmm.shutdown).
    ShutdownVmm,
    /// Create a VM from a Cloud Hypervisor VmConfig JSON file; nothing runs until boot
    /// (PUT vm.create).
    Create {
        /// The VmConfig: cpus, memory, payload (kernel, or tern's demo), serial, devices.
        #[arg(value_name = "FILE")]
        config: PathBuf,
    },
    /// Build and start the created VM (PUT vm.boot).
    Boot,
    /// Stop the VM if it runs and forget it (PUT vm.delete).
    Delete,
    /// Stop the VM and boot it again from its configuration (PUT vm.reboot).
    Reboot,
    /// Show the VM's state, configuration and devices (GET vm.info).
    Info,
    /// Pause the VM's vCPUs (PUT vm.pause).
    Pause,
    /// Resume a paused VM (PUT vm.resume).
    Resume,
    /// Shut the guest down; the VMM keeps running (PUT vm.shutdown).
    Shutdown,
    /// Start a live migration to a destination that is receiving (PUT vm.send-migration).
    SendMigration {
        /// tcp:HOST:PORT or unix:PATH of the destination.
        #[arg(value_parser = parse_url)]
        url: MigrationUrl,
        /// Same host: hand guest memory over as file descriptors (needs a unix: URL).
        #[arg(long)]
        local: bool,
        /// Longest acceptable guest pause at switch-over, in ms.
        #[arg(long, value_name = "MS", default_value_t = tern_api::types::DEFAULT_DOWNTIME_MS)]
        downtime_ms: u64,
        /// Time budget of the whole migration, in seconds.
        #[arg(long, value_name = "S", default_value_t = tern_api::types::DEFAULT_TIMEOUT_S)]
        timeout_s: u64,
        /// What to do when the budget runs out: cancel (VM stays here) or ignore (switch over).
        #[arg(long, value_enum, default_value_t = StrategyArg::Cancel)]
        timeout_strategy: StrategyArg,
        /// Bandwidth cap in megabits per second (0 = unlimited).
        #[arg(long, value_name = "MBPS", default_value_t = 0)]
        max_bandwidth_mbps: u64,
        /// Parallel streams (1 to 128).
        #[arg(long, value_name = "N", default_value_t = 1)]
        connections: u32,
        /// Throttle vCPUs when the guest dirties memory faster than the link sends it.
        #[arg(long)]
        auto_converge: bool,
        /// Send pages without the per-page end-to-end sums (on by default).
        #[arg(long)]
        no_page_checksums: bool,
        /// Mutual TLS: directory with ca-cert.pem, client-cert.pem, client-key.pem.
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<std::path::PathBuf>,
    },
    /// Listen for an incoming migration (PUT vm.receive-migration).
    ReceiveMigration {
        /// tcp:HOST:PORT or unix:PATH to listen on.
        #[arg(value_parser = parse_url)]
        url: MigrationUrl,
        /// This host's device for the source's passthrough device ID (its sysfs directory);
        /// repeatable. Unlisted devices are opened at the source's path.
        #[arg(long = "device", value_name = "ID=PATH", value_parser = parse_device)]
        devices: Vec<DeviceMapping>,
        /// Mutual TLS: directory with ca-cert.pem, server-cert.pem, server-key.pem.
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<std::path::PathBuf>,
    },
    /// Show migration progress (GET vm.migration); --watch follows it to the end.
    MigrationStatus {
        /// Poll until the migration ends, drawing progress, then print a summary.
        #[arg(long)]
        watch: bool,
        /// Poll interval for --watch, in ms.
        #[arg(long, value_name = "MS", default_value_t = 200)]
        interval_ms: u64,
    },
    /// Cancel the running migration; the VM keeps running here (PUT vm.migration-cancel).
    MigrationCancel,
    /// Replace this tern process under its running VM (same host): start BINARY as a new tern,
    /// hand it the VM — guest memory and passthrough devices as file descriptors, no device
    /// reset — and print the downtime and the devices handed over. The old tern exits.
    LiveUpdate {
        /// The new tern binary.
        #[arg(long, value_name = "PATH")]
        binary: PathBuf,
        /// The new tern's API socket (default: the old one's path with ".new" appended).
        #[arg(long, value_name = "PATH")]
        new_api_socket: Option<PathBuf>,
        /// Longest acceptable guest pause at switch-over, in ms.
        #[arg(long, value_name = "MS", default_value_t = tern_api::types::DEFAULT_DOWNTIME_MS)]
        downtime_ms: u64,
        /// Append the new tern's stdout and stderr to this file (default: discarded).
        #[arg(long, value_name = "PATH")]
        new_log: Option<PathBuf>,
        /// More arguments for the new tern (after --), e.g. -- --serial file=PATH.
        #[arg(last = true, value_name = "TERN_ARGS")]
        tern_args: Vec<String>,
    },
    /// Explain a migration: a verdict on its convergence and every pass (bytes, rate, pages each
    /// dirty source reported, expected downtime, throttle); --svg draws the convergence chart.
    MigrationReport {
        /// Read a status saved with `ternctl migration-status > FILE` instead of asking the VMM
        /// (a source tern exits after a completed migration unless --stay-after-migration).
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
        /// Also draw the chart to this SVG file.
        #[arg(long, value_name = "FILE")]
        svg: Option<PathBuf>,
    },
}

fn parse_url(s: &str) -> Result<MigrationUrl, String> {
    s.parse()
        .map_err(|e: tern_api::MigrationUrlError| e.to_string())
}

fn parse_device(s: &str) -> Result<DeviceMapping, String> {
    match s.split_once('=') {
        Some((id, path)) if !id.is_empty() && !path.is_empty() => Ok(DeviceMapping {
            id: id.to_string(),
            path: path.into(),
        }),
        _ => Err(format!(
            "'{s}' is not ID=PATH (the source's device id, then this host's sysfs directory)"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = ApiClient::new(&cli.api_socket)
        .with_timeout(Duration::from_secs(cli.request_timeout_s.max(1)));
    match run(&client, &cli.api_socket, cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ternctl: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<ExitCode, Box<dyn std::error::Error + 'static>>;

fn run(client: &ApiClient, api_socket: &std::path::Path, command: Command) -> CliResult {
    match command {
        Command::LiveUpdate {
            binary,
            new_api_socket,
            downtime_ms,
            new_log,
            tern_args,
        } => {
            let new_api_socket = new_api_socket.unwrap_or_else(|| {
                let mut p = api_socket.as_os_str().to_owned();
                p.push(".new");
                PathBuf::from(p)
            });
            return Ok(live_update::run(
                client,
                live_update::LiveUpdate {
                    binary,
                    new_api_socket,
                    tern_args,
                    downtime_ms,
                    new_log,
                },
            )?);
        }
        Command::Ping => print_json(&client.vmm_ping()?),
        Command::ShutdownVmm => client.vmm_shutdown()?,
        Command::Create { config } => {
            let text = std::fs::read_to_string(&config)
                .map_err(|e| format!("cannot read {}: {e}", config.display()))?;
            client.vm_create_json(&text)?
        }
        Command::Boot => client.vm_boot()?,
        Command::Delete => client.vm_delete()?,
        Command::Reboot => client.vm_reboot()?,
        Command::Info => print_json(&client.vm_info()?),
        Command::Pause => client.vm_pause()?,
        Command::Resume => client.vm_resume()?,
        Command::Shutdown => client.vm_shutdown()?,
        Command::SendMigration {
            url,
            local,
            downtime_ms,
            timeout_s,
            timeout_strategy,
            max_bandwidth_mbps,
            connections,
            auto_converge,
            no_page_checksums,
            tls_dir,
        } => {
            let data = VmSendMigrationData {
                destination_url: url,
                local,
                downtime_ms,
                timeout_s,
                timeout_strategy: match timeout_strategy {
                    StrategyArg::Cancel => TimeoutStrategy::Cancel,
                    StrategyArg::Ignore => TimeoutStrategy::Ignore,
                },
                max_bandwidth_mbps,
                connections,
                auto_converge,
                page_checksums: !no_page_checksums,
                tls_dir,
                memory_mode: if local {
                    MigrationMode::MemFDs
                } else {
                    MigrationMode::Precopy
                },
            };
            // Not validated here: the server's check is the one that counts, and its message is
            // the same one the user would get from any other client.
            client.vm_send_migration(&data)?
        }
        Command::ReceiveMigration {
            url,
            devices,
            tls_dir,
        } => client.vm_receive_migration(&VmReceiveMigrationData {
            receiver_url: url,
            devices,
            tls_dir,
            memory_mode: MigrationMode::Precopy,
        })?,
        Command::MigrationStatus { watch, interval_ms } => {
            if watch {
                return watch::watch(client, Duration::from_millis(interval_ms.max(10)));
            }
            print_json(&client.vm_migration_status()?)
        }
        Command::MigrationCancel => client.vm_migration_cancel()?,
        Command::MigrationReport { from, svg } => {
            let status = match from {
                Some(path) => report::load(&path)?,
                None => client.vm_migration_status()?,
            };
            out::emit(&report::text(&status)?);
            if let Some(path) = svg {
                report::svg(&status, &path)?;
                out::emit(&format!("chart: {}\n", path.display()));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => out::emit(&format!("{text}\n")),
        // The API types always serialize; this only guards against a future non-string map key.
        Err(e) => eprintln!("ternctl: cannot print the answer as JSON: {e}"),
    }
}
