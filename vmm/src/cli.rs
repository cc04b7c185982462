//! The `tern` command line.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{
    parse_dirty_tracking, parse_memory_size, parse_serial, ConfigError, PayloadConfig, VmConfig,
};
use crate::demo::DemoConfig;

/// tern — a KVM VMM built for live migration of VMs with VFIO passthrough devices.
#[derive(Debug, Parser)]
#[command(name = "tern", version)]
pub struct Cli {
    /// Linux kernel to boot: bzImage (64-bit boot protocol) or ELF vmlinux (PVH entry).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs for the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Built-in guest instead of a kernel: demo[,mib=N][,dirty-mib-per-s=R][,exit-after=SECONDS].
    #[arg(long, value_name = "demo[,key=value...]")]
    pub guest: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u64,
    /// Guest RAM, e.g. 512M or 2G (a bare number is MiB).
    #[arg(long, default_value = "512M", value_name = "SIZE")]
    pub memory: String,
    /// Serial console (COM1) output: stdout, off or file=PATH.
    #[arg(long, default_value = "stdout", value_name = "stdout|file=PATH|off")]
    pub serial: String,
    /// REST API socket. Alone (no kernel or guest), tern waits for an incoming migration.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// How KVM reports dirty pages during migration: log (dirty bitmap, cleared per chunk) or ring
    /// (per-vCPU dirty ring; needs KVM_CAP_DIRTY_LOG_RING).
    #[arg(long, default_value = "log", value_name = "log|ring")]
    pub dirty_tracking: String,
    /// KVM device to use.
    #[arg(long, default_value = "/dev/kvm", value_name = "PATH", hide = true)]
    pub kvm_device: PathBuf,
}

/// Any bad command-line value.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Guest(#[from] crate::demo::config::DemoConfigError),
}

impl Cli {
    /// The VM this command line asks for; `None` when tern should only wait on its API socket.
    pub fn vm_config(&self) -> Result<Option<VmConfig>, CliError> {
        let payload = match (&self.kernel, &self.guest) {
            (Some(_), Some(_)) => return Err(ConfigError::KernelAndGuest.into()),
            (None, Some(guest)) => {
                if self.initramfs.is_some() || self.cmdline.is_some() {
                    return Err(ConfigError::KernelOptionsWithoutKernel.into());
                }
                PayloadConfig::Demo(guest.parse::<DemoConfig>()?)
            }
            (Some(kernel), None) => PayloadConfig::Kernel {
                kernel: kernel.clone(),
                initramfs: self.initramfs.clone(),
                cmdline: self
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| "console=ttyS0".into()),
            },
            (None, None) => {
                if self.initramfs.is_some() || self.cmdline.is_some() {
                    return Err(ConfigError::KernelOptionsWithoutKernel.into());
                }
                if self.api_socket.is_some() {
                    return Ok(None);
                }
                return Err(ConfigError::NothingToRun.into());
            }
        };
        if self.cpus == 0 {
            return Err(ConfigError::NoCpus.into());
        }
        let max = u64::from(crate::demo::setup::MAX_DEMO_VCPUS);
        let cpus = u8::try_from(self.cpus)
            .ok()
            .filter(|&c| u64::from(c) <= max)
            .ok_or(ConfigError::TooManyCpus {
                asked: self.cpus,
                max,
            })?;
        Ok(Some(VmConfig {
            cpus,
            memory_bytes: parse_memory_size(&self.memory)?,
            payload,
            serial: parse_serial(&self.serial)?,
            dirty_tracking: parse_dirty_tracking(&self.dirty_tracking)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("tern").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn cli_builds_demo_config() {
        let c = cli(&["--guest", "demo,mib=8", "--cpus", "2", "--memory", "1G"])
            .vm_config()
            .unwrap()
            .unwrap();
        assert_eq!(c.cpus, 2);
        assert_eq!(c.memory_bytes, 1 << 30);
        assert!(matches!(
            c.payload,
            PayloadConfig::Demo(DemoConfig { mib: 8, .. })
        ));
    }

    #[test]
    fn cli_rejects_conflicts_and_zero_cpus() {
        assert!(cli(&["--guest", "demo", "--cpus", "0"])
            .vm_config()
            .is_err());
        assert!(cli(&["--guest", "demo", "--cpus", "300"])
            .vm_config()
            .is_err());
        assert!(cli(&["--guest", "demo", "--kernel", "k"])
            .vm_config()
            .is_err());
        assert!(cli(&["--guest", "demo", "--initramfs", "i"])
            .vm_config()
            .is_err());
        assert!(cli(&[]).vm_config().is_err());
        assert!(cli(&["--api-socket", "/tmp/s"])
            .vm_config()
            .unwrap()
            .is_none());
    }
}
