//! `vm.create`: a Cloud Hypervisor `VmConfig` body becomes the command line's [`VmArgs`], and the
//! VM is built from those by the same [`VmArgs::vm_config`] the command line uses — one set of
//! checks and one error text for a VM however it is asked for.

use clap::{Args, FromArgMatches};

use tern_api::vm_create::{CreatePayload, CreateSerial, VmCreateConfig};

use crate::cli::{CliError, VmArgs};
use crate::config::VmConfig;

/// A `vm.create` body tern cannot turn into a VM.
#[derive(Debug, thiserror::Error)]
pub enum ApiCreateError {
    #[error("memory.size {0} is not a whole number of 4 KiB pages")]
    MemorySize(u64),
    #[error(transparent)]
    Config(#[from] CliError),
    #[error("the command line's defaults do not parse")]
    Defaults(#[source] clap::Error),
}

impl VmArgs {
    /// The command line's defaults (`--cpus 1 --memory 512M ...`), from clap's own definitions.
    pub fn defaults() -> Result<VmArgs, clap::Error> {
        let cmd = VmArgs::augment_args(clap::Command::new("tern"));
        VmArgs::from_arg_matches(&cmd.try_get_matches_from(["tern"])?)
    }
}

/// The command-line arguments that ask for the VM `c` describes.
pub fn vm_args(c: &VmCreateConfig) -> Result<VmArgs, ApiCreateError> {
    let mut a = VmArgs::defaults().map_err(ApiCreateError::Defaults)?;
    a.cpus = u64::from(c.boot_vcpus);
    if !c.memory_bytes.is_multiple_of(4096) {
        return Err(ApiCreateError::MemorySize(c.memory_bytes));
    }
    a.memory = format!("{}K", c.memory_bytes / 1024);
    match &c.payload {
        CreatePayload::Kernel {
            kernel,
            initramfs,
            cmdline,
        } => {
            a.kernel = Some(kernel.into());
            a.initramfs = initramfs.as_ref().map(Into::into);
            a.cmdline = cmdline.clone();
        }
        CreatePayload::Demo(d) => {
            let mut guest = String::from("demo");
            if let Some(mib) = d.mib {
                guest.push_str(&format!(",mib={mib}"));
            }
            if let Some(rate) = d.dirty_mib_per_s {
                guest.push_str(&format!(",dirty-mib-per-s={rate}"));
            }
            if let Some(s) = d.exit_after_s {
                guest.push_str(&format!(",exit-after={s}"));
            }
            a.guest = Some(guest);
        }
    }
    a.serial = match &c.serial {
        CreateSerial::Off => "off".into(),
        CreateSerial::Tty => "stdout".into(),
        CreateSerial::File(f) => format!("file={f}"),
    };
    if let Some(t) = &c.dirty_tracking {
        a.dirty_tracking = t.clone();
    }
    a.devices = c
        .devices
        .iter()
        .map(|d| {
            let mut spec = format!("path={}", d.path);
            if let Some(id) = &d.id {
                spec.push_str(&format!(",id={id}"));
            }
            if d.iommufd {
                spec.push_str(",iommufd=on");
            }
            if let Some(dirty) = &d.dirty {
                spec.push_str(&format!(",dirty={dirty}"));
            }
            spec
        })
        .collect();
    Ok(a)
}

/// The VM a `vm.create` body asks for.
pub fn vm_config(c: &VmCreateConfig) -> Result<VmConfig, ApiCreateError> {
    let args = vm_args(c)?;
    // A body always names a payload (the API type refuses one without), so `None` cannot come back;
    // the command line's own error says so if it ever did.
    args.vm_config()?
        .ok_or(CliError::Config(crate::config::ConfigError::NothingToRun))
        .map_err(ApiCreateError::Config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: serde_json::Value) -> VmCreateConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_body_and_its_command_line_build_the_same_vm() {
        let api = vm_config(&body(json!({
            "cpus": {"boot_vcpus": 2},
            "memory": {"size": 268435456u64},
            "payload": {"demo": {"mib": 8, "dirty_mib_per_s": 4}},
            "serial": {"mode": "File", "file": "/tmp/x.log"},
            "dirty_tracking": "ring",
        })))
        .unwrap();
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from([
            "tern",
            "--guest",
            "demo,mib=8,dirty-mib-per-s=4",
            "--cpus",
            "2",
            "--memory",
            "256M",
            "--serial",
            "file=/tmp/x.log",
            "--dirty-tracking",
            "ring",
        ])
        .unwrap()
        .vm_config()
        .unwrap()
        .unwrap();
        assert_eq!(api, cli);
    }

    #[test]
    fn the_command_lines_checks_apply_to_bodies() {
        let err = |v| vm_config(&body(v)).unwrap_err().to_string();
        let demo = json!({"demo": {"mib": 8}});
        assert!(err(json!({"cpus": {"boot_vcpus": 0}, "payload": demo})).contains("at least 1"));
        assert!(err(json!({"cpus": {"boot_vcpus": 300}, "payload": demo})).contains("300"));
        assert!(err(json!({"memory": {"size": 4097}, "payload": demo})).contains("4 KiB"));
        assert!(err(json!({"memory": {"size": 4096}, "payload": demo})).contains("at least 1 MiB"));
        assert!(err(json!({"payload": demo, "dirty_tracking": "bitmap"})).contains("bitmap"));
        assert!(err(json!({
            "payload": demo,
            "devices": [{"path": "/sys/a", "id": "x"}, {"path": "/sys/b", "id": "x"}],
        }))
        .contains("two devices"));
    }
}
