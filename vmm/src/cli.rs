//! The `tern` command line.

use std::path::PathBuf;

use clap::Parser;

use tern_devices::vfio::spec::VfioDeviceSpec;

use crate::config::{
    parse_dirty_tracking, parse_memory_size, parse_serial, ConfigError, PassthroughConfig,
    PayloadConfig, VmConfig,
};
use crate::demo::DemoConfig;

/// tern — a KVM VMM built for live migration of VMs with VFIO passthrough devices.
#[derive(Debug, Parser)]
#[command(name = "tern", version)]
pub struct Cli {
    /// The VM to run.
    #[command(flatten)]
    pub vm: VmArgs,
    /// REST API socket. Alone (no kernel or guest), tern waits for an incoming migration or a
    /// `vm.create`.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// KVM device to use.
    #[arg(long, default_value = "/dev/kvm", value_name = "PATH", hide = true)]
    pub kvm_device: PathBuf,
    /// Least severe log messages shown on stderr: off, error, warn, info, debug, trace (default:
    /// RUST_LOG if set, else warn).
    #[arg(long, value_name = "LEVEL", value_parser = crate::logger::parse_level)]
    pub log_level: Option<log::LevelFilter>,
    /// seccomp filters per thread kind (vCPU, API, migration, device, main): true (a call outside a
    /// thread's list fails with EPERM), false, or log (allowed, and logged by the kernel).
    #[arg(long, default_value = "true", value_name = "true|false|log")]
    pub seccomp: crate::seccomp::SeccompMode,
    /// Allow migration over plain (unencrypted, unauthenticated) TCP to or on a non-loopback
    /// address; without it such a send or receive needs `tls_dir`. unix: and loopback tcp: are
    /// always allowed.
    #[arg(long)]
    pub migration_allow_plain_tcp: bool,
    /// After the VM migrated away, keep serving the API with no VM instead of exiting (QEMU's
    /// source stays in `postmigrate` the same way), so a manager reads the final statistics when it
    /// likes and can reuse the process for an incoming migration.
    #[arg(long)]
    pub stay_after_migration: bool,
    /// Write the demo guest given by `--guest demo,...` as a standalone PVH ELF to PATH (for
    /// `--kernel PATH` here or QEMU's `-kernel PATH`; one vCPU, this host's TSC rate) and exit.
    #[arg(long, value_name = "PATH", requires = "guest")]
    pub write_demo_elf: Option<PathBuf>,
}

/// What a VM is made of, as the command line spells it. `vm.create` bodies are turned into these
/// too (`crate::api_create`), so both build their `VmConfig` through [`VmArgs::vm_config`].
#[derive(Debug, Clone, clap::Args)]
pub struct VmArgs {
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
    /// How KVM reports dirty pages during migration: log (dirty bitmap, cleared per chunk) or ring
    /// (per-vCPU dirty ring; needs KVM_CAP_DIRTY_LOG_RING).
    #[arg(long, default_value = "log", value_name = "log|ring")]
    pub dirty_tracking: String,
    /// VFIO passthrough device (repeatable):
    /// path=/sys/bus/pci/devices/BDF[,id=ID][,iommufd=on|off].
    #[arg(long = "device", value_name = "path=PATH[,id=ID][,iommufd=on|off]")]
    pub devices: Vec<String>,
    /// Lab-only DMA device on the iommufd selftest (needs CONFIG_IOMMUFD_TEST), repeatable: writes
    /// guest pages behind KVM's back through a dirty-tracking mock IOMMU (the VM's mock devices
    /// share one IOAS and one HWPT).
    #[arg(
        long = "mock-dma",
        value_name = "id=ID,gpa-mib=N,mib=N,pages-per-s=N,dirty=auto|none"
    )]
    pub mock_dma: Vec<String>,
}

/// Any bad command-line value.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Guest(#[from] crate::demo::config::DemoConfigError),
    #[error(transparent)]
    Device(#[from] tern_devices::vfio::spec::VfioSpecError),
    #[error(transparent)]
    MockDma(#[from] tern_devices::vfio::mock_dma::MockDmaSpecError),
    #[error("--device: id {0:?} given to two devices")]
    DuplicateDeviceId(String),
}

impl Cli {
    /// The VM this command line asks for; `None` when tern should only wait on its API socket.
    pub fn vm_config(&self) -> Result<Option<VmConfig>, CliError> {
        match self.vm.vm_config()? {
            None if self.api_socket.is_none() => Err(ConfigError::NothingToRun.into()),
            config => Ok(config),
        }
    }
}

impl VmArgs {
    /// The VM these arguments describe; `None` when they name nothing to run.
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
                return Ok(None);
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
        let mut devices: Vec<PassthroughConfig> = Vec::new();
        for d in &self.devices {
            let spec = d.parse::<VfioDeviceSpec>()?;
            if devices.iter().any(|p| p.id == spec.id) {
                return Err(CliError::DuplicateDeviceId(spec.id));
            }
            devices.push(spec.into());
        }
        Ok(Some(VmConfig {
            cpus,
            memory_bytes: parse_memory_size(&self.memory)?,
            payload,
            serial: parse_serial(&self.serial)?,
            dirty_tracking: parse_dirty_tracking(&self.dirty_tracking)?,
            devices,
            mock_dma: self
                .mock_dma
                .iter()
                .map(|s| s.parse())
                .collect::<Result<_, _>>()?,
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

    #[test]
    fn cli_collects_repeated_devices_and_rejects_bad_ones() {
        let c = cli(&[
            "--kernel",
            "k",
            "--device",
            "path=/sys/bus/pci/devices/0000:00:03.0",
            "--device",
            "path=/sys/bus/pci/devices/0000:00:04.0,id=nic,iommufd=on",
        ])
        .vm_config()
        .unwrap()
        .unwrap();
        assert_eq!(
            c.devices,
            vec![
                PassthroughConfig {
                    path: "/sys/bus/pci/devices/0000:00:03.0".into(),
                    id: "0000:00:03.0".into(),
                    iommufd: false,
                    dirty: Default::default(),
                    pci_ids: None,
                },
                PassthroughConfig {
                    path: "/sys/bus/pci/devices/0000:00:04.0".into(),
                    id: "nic".into(),
                    iommufd: true,
                    dirty: Default::default(),
                    pci_ids: None,
                },
            ]
        );
        let err = |args: &[&str]| cli(args).vm_config().unwrap_err().to_string();
        assert!(err(&["--kernel", "k", "--device", "id=x"]).contains("path="));
        assert!(err(&[
            "--kernel",
            "k",
            "--device",
            "path=/a,id=x",
            "--device",
            "path=/b,id=x"
        ])
        .contains("\"x\" given to two devices"));
    }
}
