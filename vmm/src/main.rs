//! `tern`: launch a VM from the command line and run it until the guest powers off; with
//! `--api-socket`, serve the REST API (migration, pause/resume, info) meanwhile, or wait for an
//! incoming migration when no VM is given.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tern_api::ApiServer;
use tern_vmm::cli::Cli;
use tern_vmm::config::parse_serial;
use tern_vmm::control::{Controller, VmmExit};
use tern_vmm::event_loop;
use tern_vmm::machine::{Machine, MachineExit};
use tern_vmm::seccomp::{self, ThreadKind};

/// An error and its whole source chain on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn guest_exit_code(exit: &MachineExit) -> ExitCode {
    match exit {
        MachineExit::PowerOff => ExitCode::SUCCESS,
        MachineExit::GuestReset(reason) => {
            eprintln!("tern: guest reset ({reason}); exiting");
            ExitCode::SUCCESS
        }
        MachineExit::Failed(reason) => {
            eprintln!("tern: error: {reason}");
            ExitCode::from(1)
        }
    }
}

/// For the boot benchmark: `TERN_BENCH_T0_US` is the wall-clock time (µs since the epoch) at which
/// the benchmark spawned tern; tern reports how long it took until its vCPUs were released into
/// KVM_RUN.
fn report_start_latency() {
    let Some(t0) = std::env::var("TERN_BENCH_T0_US")
        .ok()
        .and_then(|v| v.parse::<u128>().ok())
    else {
        return;
    };
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        eprintln!(
            "tern-bench: vcpus_released_us={}",
            now.as_micros().saturating_sub(t0)
        );
    }
}

fn run(cli: &Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if let Some(path) = &cli.write_demo_elf {
        let guest = cli
            .vm
            .guest
            .as_deref()
            .ok_or("--write-demo-elf needs --guest demo,...")?;
        if cli.vm.cpus != 1 {
            return Err("--write-demo-elf: the PVH demo ELF runs on one vCPU (--cpus 1)".into());
        }
        let config = guest.parse::<tern_vmm::demo::DemoConfig>()?;
        tern_vmm::demo::elf::write_pvh_elf(&config, &cli.kvm_device, path)?;
        return Ok(ExitCode::SUCCESS);
    }
    let config = cli.vm_config()?;
    let Some(socket) = &cli.api_socket else {
        let config = config.ok_or("nothing to run")?;
        let machine = Machine::create(&cli.kvm_device, config)?;
        machine.resume();
        report_start_latency();
        seccomp::install(ThreadKind::Main)?;
        return Ok(guest_exit_code(&event_loop::wait_machine_exit(Arc::new(
            machine,
        ))?));
    };
    let controller = Controller::new(cli.kvm_device.clone(), parse_serial(&cli.vm.serial)?)?;
    // The command line's VM takes the path a vm.create + vm.boot takes.
    if let Some(config) = config {
        controller.create_vm(config)?;
        controller.boot_vm()?;
        report_start_latency();
    }
    controller.set_allow_plain_tcp(cli.migration_allow_plain_tcp);
    controller.set_stay_after_migration(cli.stay_after_migration);
    // The API server thread (and its handler threads) inherit the API filter; the main thread then
    // narrows itself to the main filter.
    seccomp::install(ThreadKind::Api)?;
    let server = ApiServer::start(socket, controller.clone() as Arc<dyn tern_api::ApiHandler>)?;
    seccomp::install(ThreadKind::Main)?;
    let exit = controller.run()?;
    let _ = server.shutdown();
    Ok(match exit {
        VmmExit::Guest(e) => guest_exit_code(&e),
        VmmExit::Requested => ExitCode::SUCCESS,
        VmmExit::MigratedAway => {
            eprintln!("tern: VM migrated away; exiting");
            ExitCode::SUCCESS
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.log_level {
        Some(l) => l,
        None => match std::env::var("RUST_LOG") {
            Ok(v) => match tern_vmm::logger::parse_level(&v) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("tern: error: RUST_LOG: {e}");
                    return ExitCode::from(2);
                }
            },
            Err(_) => log::LevelFilter::Warn,
        },
    };
    tern_vmm::logger::init(level);
    // Compiled and checked before any thread starts; each thread installs its kind's filter.
    if let Err(e) = seccomp::init(cli.seccomp) {
        eprintln!("tern: error: {}", error_chain(&e));
        return ExitCode::from(1);
    }
    tern_devices::vfio::mock_dma::set_thread_init(seccomp::install_device);
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern: error: {}", error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}
