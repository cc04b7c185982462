//! The `config` of `vm.info`, laid out as Cloud Hypervisor's `VmConfig` as far as tern has the
//! concepts (CH's `vmm/src/api/openapi/cloud-hypervisor.yaml`: `cpus.boot_vcpus`/`max_vcpus`,
//! `memory.size`, `payload.{kernel,initramfs,cmdline}`, `serial.{mode,file}`, `devices[].{path,id}`),
//! so tools that read a CH VM's configuration read tern's. tern's own facts (the demo guest, the
//! dirty-tracking mode) are additional fields CH's readers ignore.

use serde::{Deserialize, Serialize};

/// CH's `CpusConfig`: tern has no vCPU hotplug, so `max_vcpus` equals `boot_vcpus`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusInfo {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
}

/// CH's `MemoryConfig`: guest RAM in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    pub size: u64,
}

/// The built-in demo guest (tern's addition to CH's `PayloadConfig`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoPayloadInfo {
    /// Working set in MiB.
    pub mib: u64,
    /// Rewrite rate of the working set in MiB/s (0: idle).
    pub dirty_mib_per_s: u64,
    /// Powers off after this many seconds; null runs until stopped.
    pub exit_after_s: Option<u64>,
}

/// CH's `PayloadConfig` (`kernel`, `initramfs`, `cmdline`), plus `demo` for tern's built-in guest.
/// Exactly one of `kernel` and `demo` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadInfo {
    pub kernel: Option<String>,
    pub initramfs: Option<String>,
    pub cmdline: Option<String>,
    pub demo: Option<DemoPayloadInfo>,
}

/// CH's `ConsoleMode` values that tern's serial port can be in (`Tty` is tern's `stdout`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    #[default]
    Off,
    Tty,
    File,
}

impl ConsoleMode {
    /// Every mode, in declaration order (used by the spec test).
    pub const ALL: [ConsoleMode; 3] = [ConsoleMode::Off, ConsoleMode::Tty, ConsoleMode::File];
}

/// CH's `SerialConfig`: where COM1 goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialInfo {
    pub mode: ConsoleMode,
    /// The file of `mode: File`, else null.
    pub file: Option<String>,
}

/// CH's `DeviceConfig`: one VFIO passthrough device by sysfs path and id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfigInfo {
    pub path: String,
    pub id: String,
}

/// The VM's configuration in CH's `VmConfig` layout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfigInfo {
    pub cpus: CpusInfo,
    pub memory: MemoryInfo,
    pub payload: PayloadInfo,
    pub serial: SerialInfo,
    /// VFIO passthrough devices (`--device`).
    pub devices: Vec<DeviceConfigInfo>,
    /// How KVM dirty pages are tracked, `log` or `ring` (tern's addition).
    pub dirty_tracking: Option<String>,
}
