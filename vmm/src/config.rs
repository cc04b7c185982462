//! What a VM is made of, independent of where the request came from (command line, or a migration
//! source's config message).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::linux::KernelBoot;
use crate::demo::DemoConfig;

/// A whole VM's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub cpus: u8,
    pub memory_bytes: u64,
    pub payload: PayloadConfig,
    pub serial: SerialConfig,
    /// How KVM reports the vCPUs' dirty pages during migration (`--dirty-tracking`). Added for
    /// the KVM dirty sources (vmm/src/dirty); `default` keeps older config messages readable.
    #[serde(default)]
    pub dirty_tracking: DirtyTracking,
    /// VFIO passthrough devices (`--device`, repeatable).
    #[serde(default)]
    pub devices: Vec<PassthroughConfig>,
    /// The lab-only DMA devices on the iommufd selftest (`--mock-dma`, repeatable).
    #[serde(default)]
    pub mock_dma: Vec<tern_devices::vfio::mock_dma::MockDmaSpec>,
}

/// One VFIO passthrough device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassthroughConfig {
    /// The device's sysfs directory (`/sys/bus/pci/devices/BDF`).
    pub path: PathBuf,
    /// Name in `vm.info` and in errors.
    pub id: String,
    /// cdev + iommufd backend instead of the type1 container.
    pub iommufd: bool,
    /// How migration tracks the device's DMA (`dirty=`).
    #[serde(default)]
    pub dirty: tern_devices::vfio::dma_dirty::method::DirtyChoice,
    /// The PCI vendor and device ID of the opened function: filled in by a migration source for
    /// the destination, which refuses a local device with other IDs. `None` on the command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_ids: Option<PciFunctionIds>,
}

/// A PCI function's vendor and device ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciFunctionIds {
    pub vendor: u16,
    pub device: u16,
}

impl std::fmt::Display for PciFunctionIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.device)
    }
}

impl PassthroughConfig {
    /// The device spec the VFIO code works from.
    pub fn spec(&self) -> tern_devices::vfio::spec::VfioDeviceSpec {
        use tern_devices::vfio::spec::VfioBackend;
        tern_devices::vfio::spec::VfioDeviceSpec {
            path: self.path.clone(),
            id: self.id.clone(),
            backend: if self.iommufd {
                VfioBackend::Iommufd
            } else {
                VfioBackend::Type1
            },
            dirty: self.dirty,
        }
    }
}

impl From<tern_devices::vfio::spec::VfioDeviceSpec> for PassthroughConfig {
    fn from(s: tern_devices::vfio::spec::VfioDeviceSpec) -> Self {
        Self {
            path: s.path,
            id: s.id,
            iommufd: s.backend == tern_devices::vfio::spec::VfioBackend::Iommufd,
            dirty: s.dirty,
            pci_ids: None,
        }
    }
}

/// Which KVM dirty-page interface migration uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirtyTracking {
    /// KVM_GET_DIRTY_LOG bitmaps, cleared per chunk with KVM_CLEAR_DIRTY_LOG.
    #[default]
    Log,
    /// The per-vCPU KVM dirty ring (KVM_CAP_DIRTY_LOG_RING), enabled before vCPUs are created.
    Ring,
}

impl DirtyTracking {
    /// The name used on the command line and in `vm.info`.
    pub fn name(self) -> &'static str {
        match self {
            DirtyTracking::Log => "log",
            DirtyTracking::Ring => "ring",
        }
    }
}

/// What runs in the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadConfig {
    /// The built-in demo guest.
    Demo(DemoConfig),
    /// A Linux kernel.
    Kernel {
        kernel: PathBuf,
        initramfs: Option<PathBuf>,
        cmdline: String,
    },
}

impl PayloadConfig {
    /// The kernel to boot, if this is a kernel payload.
    pub fn kernel_boot(&self) -> Option<KernelBoot> {
        match self {
            PayloadConfig::Kernel {
                kernel,
                initramfs,
                cmdline,
            } => Some(KernelBoot {
                kernel: kernel.clone(),
                initramfs: initramfs.clone(),
                cmdline: cmdline.clone(),
            }),
            PayloadConfig::Demo(_) => None,
        }
    }
}

/// Where COM1 output goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SerialConfig {
    Stdout,
    File(PathBuf),
    Off,
}

/// A bad configuration value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid --memory '{0}': use a size like 512M or 2G (K, M, G, T suffixes; a bare number is MiB)")]
    BadMemorySize(String),
    #[error("--memory must be at least 1 MiB, got '{0}'")]
    MemoryTooSmall(String),
    #[error("invalid --serial '{0}': use stdout, off or file=PATH")]
    BadSerial(String),
    #[error("--cpus must be at least 1")]
    NoCpus,
    #[error(
        "--cpus {asked} is more than {max} (the most this host's KVM and tern's MP table allow)"
    )]
    TooManyCpus { asked: u64, max: u64 },
    #[error("nothing to run: give --kernel PATH or --guest demo (or only --api-socket PATH to wait for an incoming migration)")]
    NothingToRun,
    #[error("--kernel and --guest are mutually exclusive")]
    KernelAndGuest,
    #[error("--initramfs and --cmdline need --kernel")]
    KernelOptionsWithoutKernel,
    #[error("invalid --dirty-tracking '{0}': use log or ring")]
    BadDirtyTracking(String),
}

/// Parses a memory size: `512M`, `2G`, `1048576K`, `4096` (MiB).
pub fn parse_memory_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadMemorySize(s.to_owned());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        Some(c) if c.is_ascii_digit() => (t, 20),
        _ => return Err(bad()),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(bad)?;
    if bytes < (1 << 20) {
        return Err(ConfigError::MemoryTooSmall(s.to_owned()));
    }
    if bytes % 4096 != 0 {
        return Err(bad());
    }
    Ok(bytes)
}

/// Parses `--serial`.
pub fn parse_serial(s: &str) -> Result<SerialConfig, ConfigError> {
    match s {
        "stdout" => Ok(SerialConfig::Stdout),
        "off" => Ok(SerialConfig::Off),
        _ => match s.strip_prefix("file=") {
            Some(path) if !path.is_empty() => Ok(SerialConfig::File(path.into())),
            _ => Err(ConfigError::BadSerial(s.to_owned())),
        },
    }
}

/// Parses `--dirty-tracking`.
pub fn parse_dirty_tracking(s: &str) -> Result<DirtyTracking, ConfigError> {
    match s {
        "log" => Ok(DirtyTracking::Log),
        "ring" => Ok(DirtyTracking::Ring),
        _ => Err(ConfigError::BadDirtyTracking(s.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_memory_size_accepts_suffixes() {
        assert_eq!(parse_memory_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_memory_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_memory_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_memory_size("1024").unwrap(), 1 << 30);
        assert_eq!(parse_memory_size("4096K").unwrap(), 4 << 20);
    }

    #[test]
    fn parse_memory_size_rejects_bad_values() {
        assert_eq!(
            parse_memory_size("0"),
            Err(ConfigError::MemoryTooSmall("0".into()))
        );
        assert_eq!(
            parse_memory_size("0M"),
            Err(ConfigError::MemoryTooSmall("0M".into()))
        );
        assert!(matches!(
            parse_memory_size("lots"),
            Err(ConfigError::BadMemorySize(_))
        ));
        assert!(matches!(
            parse_memory_size("99999999999T"),
            Err(ConfigError::BadMemorySize(_))
        ));
        assert!(matches!(
            parse_memory_size("-1G"),
            Err(ConfigError::BadMemorySize(_))
        ));
        assert!(matches!(
            parse_memory_size(""),
            Err(ConfigError::BadMemorySize(_))
        ));
    }

    #[test]
    fn parse_serial_variants() {
        assert_eq!(parse_serial("stdout").unwrap(), SerialConfig::Stdout);
        assert_eq!(parse_serial("off").unwrap(), SerialConfig::Off);
        assert_eq!(
            parse_serial("file=/tmp/x").unwrap(),
            SerialConfig::File("/tmp/x".into())
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tty").is_err());
    }

    #[test]
    fn parse_dirty_tracking_variants() {
        assert_eq!(parse_dirty_tracking("log").unwrap(), DirtyTracking::Log);
        assert_eq!(parse_dirty_tracking("ring").unwrap(), DirtyTracking::Ring);
        assert_eq!(
            parse_dirty_tracking("bitmap"),
            Err(ConfigError::BadDirtyTracking("bitmap".into()))
        );
    }
}
