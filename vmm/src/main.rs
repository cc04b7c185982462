//! `tern`: launch a VM from the command line and run it until the guest powers off.

use std::process::ExitCode;

use clap::Parser;
use tern_vmm::cli::Cli;
use tern_vmm::machine::{Machine, MachineExit};

/// Prints an error and its whole source chain on one line.
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

fn run(cli: &Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let Some(config) = cli.vm_config()? else {
        return Err("waiting for an incoming migration needs the migration API, which this build does not have yet".into());
    };
    let machine = Machine::create(&cli.kvm_device, config)?;
    machine.resume();
    let exit = machine.wait_exit()?;
    Ok(match exit {
        MachineExit::PowerOff => ExitCode::SUCCESS,
        MachineExit::GuestReset(reason) => {
            eprintln!("tern: guest reset ({reason}); exiting");
            ExitCode::SUCCESS
        }
        MachineExit::Failed(reason) => {
            eprintln!("tern: error: {reason}");
            ExitCode::from(1)
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern: error: {}", error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}
