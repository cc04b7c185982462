//! `vm.create`'s body: Cloud Hypervisor's `VmConfig` (CH's `vmm/src/api/openapi/cloud-hypervisor.yaml`)
//! as far as tern has the concepts — `cpus.boot_vcpus`/`max_vcpus`, `memory.size`,
//! `payload.{kernel,initramfs,cmdline}`, `serial.{mode,file}`, `devices[].{path,id}` — plus tern's
//! own: `payload.demo` (the built-in guest), `devices[].{iommufd,dirty}` and `dirty_tracking`.
//!
//! A field of CH's that tern does not implement is refused by name when it asks for something
//! (`disks: [...]`, `memory.hotplug_size: 1G`, `payload.firmware`); one that asks for nothing
//! (`null`, `false`, `0`, `""`, `[]`, `{}`) is accepted, so a CH config written out with empty
//! defaults still creates. Nothing is silently dropped that would change the VM.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// CH's defaults for what a body leaves out (`DEFAULT_VCPUS`, `DEFAULT_MEMORY_MB`).
pub const DEFAULT_BOOT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;

/// A validated `vm.create` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "VmCreateFields")]
pub struct VmCreateConfig {
    pub boot_vcpus: u32,
    pub memory_bytes: u64,
    pub payload: CreatePayload,
    pub serial: CreateSerial,
    pub devices: Vec<CreateDevice>,
    /// `log` or `ring` (checked by the VMM, as `--dirty-tracking` is).
    pub dirty_tracking: Option<String>,
}

/// What the VM runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreatePayload {
    Kernel {
        kernel: String,
        initramfs: Option<String>,
        cmdline: Option<String>,
    },
    Demo(CreateDemo),
}

/// tern's built-in demo guest; what is left out takes `--guest demo`'s defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDemo {
    /// Working set in MiB.
    #[serde(default)]
    pub mib: Option<u64>,
    /// Rewrite rate of the working set in MiB/s.
    #[serde(default)]
    pub dirty_mib_per_s: Option<u64>,
    /// Powers off after this many seconds.
    #[serde(default)]
    pub exit_after_s: Option<u64>,
}

/// Where COM1 goes: CH's `Off`/`Null` (nowhere), `Tty` (tern's stdout), `File`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateSerial {
    Off,
    Tty,
    File(String),
}

/// One VFIO passthrough device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateDevice {
    pub path: String,
    pub id: Option<String>,
    pub iommufd: bool,
    /// `dirty=` of `--device` (auto, iommufd, dma-logging, type1, none).
    pub dirty: Option<String>,
}

/// Why a `vm.create` body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmCreateError {
    #[error(
        "{field} is not supported by tern (it creates cpus, memory, payload, serial and devices)"
    )]
    Unsupported { field: String },
    #[error("payload: give a kernel or tern's demo guest (payload.demo), not both")]
    PayloadConflict,
    #[error("payload: no kernel and no demo guest: the VM would have nothing to run")]
    NoPayload,
    #[error("payload.{0} without payload.kernel")]
    KernelOptionWithoutKernel(&'static str),
    #[error("cpus.max_vcpus {max} differs from boot_vcpus {boot}: tern has no vCPU hotplug")]
    VcpuHotplug { boot: u32, max: u32 },
    #[error("serial.mode {0:?}: tern's serial port goes to Off, Null, Tty or File")]
    SerialMode(String),
    #[error("serial.mode File needs serial.file")]
    SerialFileMissing,
    #[error("serial.file is only for serial.mode File")]
    SerialFileWithoutFileMode,
    #[error("devices[{0}].path is empty")]
    DevicePath(usize),
}

/// True when a value asks for nothing: null, false, 0, "", [] or {}.
fn asks_nothing(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// Refuses the first field of `other` (in `prefix`) that asks for something, except the
/// `harmless` ones: fields whose every value leaves tern's VM as it is.
fn refuse_unsupported(
    prefix: &str,
    other: &BTreeMap<String, Value>,
    harmless: &[&str],
) -> Result<(), VmCreateError> {
    match other
        .iter()
        .find(|(k, v)| !harmless.contains(&k.as_str()) && !asks_nothing(v))
    {
        Some((k, _)) => Err(VmCreateError::Unsupported {
            field: format!("{prefix}{k}"),
        }),
        None => Ok(()),
    }
}

#[derive(Debug, Deserialize)]
struct VmCreateFields {
    #[serde(default)]
    cpus: Option<CpusFields>,
    #[serde(default)]
    memory: Option<MemoryFields>,
    #[serde(default)]
    payload: Option<PayloadFields>,
    #[serde(default)]
    serial: Option<SerialFields>,
    #[serde(default)]
    devices: Option<Vec<DeviceFields>>,
    #[serde(default)]
    dirty_tracking: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
struct CpusFields {
    #[serde(default)]
    boot_vcpus: Option<u32>,
    #[serde(default)]
    max_vcpus: Option<u32>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
struct MemoryFields {
    #[serde(default)]
    size: Option<u64>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// Memory fields that cannot change tern's VM: its RAM is always one shared memfd (`shared`), THP
/// is a host-side hint (`thp`), and the hotplug method means nothing without `hotplug_size`.
const HARMLESS_MEMORY_FIELDS: &[&str] = &["shared", "thp", "hotplug_method"];

#[derive(Debug, Deserialize)]
struct PayloadFields {
    #[serde(default)]
    kernel: Option<String>,
    #[serde(default)]
    initramfs: Option<String>,
    #[serde(default)]
    cmdline: Option<String>,
    #[serde(default)]
    demo: Option<CreateDemo>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
struct SerialFields {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    file: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
struct DeviceFields {
    path: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    iommufd: Option<bool>,
    #[serde(default)]
    dirty: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

impl TryFrom<VmCreateFields> for VmCreateConfig {
    type Error = VmCreateError;

    fn try_from(f: VmCreateFields) -> Result<Self, Self::Error> {
        // CH's `console` is a virtio-console, which tern lacks: Off or Null asks for none.
        let mut other = f.other;
        if let Some(console) = other.remove("console") {
            let mode = console.get("mode").and_then(Value::as_str);
            if !asks_nothing(&console) && !matches!(mode, Some("Off" | "Null")) {
                return Err(VmCreateError::Unsupported {
                    field: "console (tern has no virtio-console: use serial)".into(),
                });
            }
        }
        refuse_unsupported("", &other, &[])?;

        let (boot_vcpus, max_vcpus) = match f.cpus {
            Some(c) => {
                refuse_unsupported("cpus.", &c.other, &[])?;
                let boot = c.boot_vcpus.unwrap_or(DEFAULT_BOOT_VCPUS);
                (boot, c.max_vcpus.unwrap_or(boot))
            }
            None => (DEFAULT_BOOT_VCPUS, DEFAULT_BOOT_VCPUS),
        };
        if max_vcpus != boot_vcpus {
            return Err(VmCreateError::VcpuHotplug {
                boot: boot_vcpus,
                max: max_vcpus,
            });
        }

        let memory_bytes = match f.memory {
            Some(m) => {
                refuse_unsupported("memory.", &m.other, HARMLESS_MEMORY_FIELDS)?;
                m.size.unwrap_or(DEFAULT_MEMORY_BYTES)
            }
            None => DEFAULT_MEMORY_BYTES,
        };

        let p = f.payload.ok_or(VmCreateError::NoPayload)?;
        refuse_unsupported("payload.", &p.other, &[])?;
        let payload = match (p.kernel, p.demo) {
            (Some(_), Some(_)) => return Err(VmCreateError::PayloadConflict),
            (Some(kernel), None) => CreatePayload::Kernel {
                kernel,
                initramfs: p.initramfs,
                cmdline: p.cmdline,
            },
            (None, Some(demo)) => {
                if p.initramfs.is_some() {
                    return Err(VmCreateError::KernelOptionWithoutKernel("initramfs"));
                }
                if p.cmdline.is_some() {
                    return Err(VmCreateError::KernelOptionWithoutKernel("cmdline"));
                }
                CreatePayload::Demo(demo)
            }
            (None, None) => return Err(VmCreateError::NoPayload),
        };

        let serial = match f.serial {
            None => CreateSerial::Off,
            Some(s) => {
                refuse_unsupported("serial.", &s.other, &[])?;
                match (s.mode.as_deref().unwrap_or("Null"), s.file) {
                    ("File", Some(file)) if !file.is_empty() => CreateSerial::File(file),
                    ("File", _) => return Err(VmCreateError::SerialFileMissing),
                    (_, Some(_)) => return Err(VmCreateError::SerialFileWithoutFileMode),
                    ("Off" | "Null", None) => CreateSerial::Off,
                    ("Tty", None) => CreateSerial::Tty,
                    (other, None) => return Err(VmCreateError::SerialMode(other.to_owned())),
                }
            }
        };

        let mut devices = Vec::new();
        for (i, d) in f.devices.unwrap_or_default().into_iter().enumerate() {
            refuse_unsupported(&format!("devices[{i}]."), &d.other, &[])?;
            if d.path.is_empty() {
                return Err(VmCreateError::DevicePath(i));
            }
            devices.push(CreateDevice {
                path: d.path,
                id: d.id,
                iommufd: d.iommufd.unwrap_or(false),
                dirty: d.dirty,
            });
        }

        Ok(VmCreateConfig {
            boot_vcpus,
            memory_bytes,
            payload,
            serial,
            devices,
            dirty_tracking: f.dirty_tracking,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<VmCreateConfig, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn a_ch_config_with_tern_payloads_parses() {
        let c = parse(json!({
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
            "memory": {"size": 1073741824u64, "shared": true, "thp": true, "hotplug_method": "Acpi"},
            "payload": {"kernel": "/k", "initramfs": "/i", "cmdline": "console=ttyS0"},
            "serial": {"mode": "File", "file": "/tmp/s.log"},
            "console": {"mode": "Off"},
            "devices": [{"path": "/sys/bus/pci/devices/0000:00:04.0", "id": "edu0", "iommu": false}],
            "disks": null,
            "net": [],
        }))
        .unwrap();
        assert_eq!(c.boot_vcpus, 2);
        assert_eq!(c.memory_bytes, 1 << 30);
        assert_eq!(c.serial, CreateSerial::File("/tmp/s.log".into()));
        assert_eq!(c.devices[0].id.as_deref(), Some("edu0"));
        let demo = parse(json!({"payload": {"demo": {"mib": 8, "dirty_mib_per_s": 0}}})).unwrap();
        assert_eq!(demo.boot_vcpus, DEFAULT_BOOT_VCPUS);
        assert_eq!(demo.memory_bytes, DEFAULT_MEMORY_BYTES);
        assert_eq!(demo.serial, CreateSerial::Off);
    }

    #[test]
    fn what_tern_lacks_is_refused_by_name() {
        let base = || json!({"payload": {"demo": {"mib": 8, "dirty_mib_per_s": 0}}});
        let with = |path: &[&str], v: Value| {
            let mut b = base();
            let mut cur = &mut b;
            for k in &path[..path.len() - 1] {
                cur = cur
                    .as_object_mut()
                    .unwrap()
                    .entry(*k)
                    .or_insert_with(|| json!({}));
            }
            cur[path[path.len() - 1]] = v;
            parse(b).unwrap_err()
        };
        assert!(with(&["disks"], json!([{"path": "/d.img"}])).contains("disks is not supported"));
        assert!(with(&["memory", "hotplug_size"], json!(1 << 30)).contains("memory.hotplug_size"));
        assert!(with(&["payload", "firmware"], json!("/fw")).contains("payload.firmware"));
        assert!(with(&["cpus", "max_vcpus"], json!(4)).contains("vCPU hotplug"));
        assert!(with(&["console"], json!({"mode": "Tty"})).contains("virtio-console"));
        assert!(with(&["serial"], json!({"mode": "Pty"})).contains("\"Pty\""));
        assert!(with(&["serial"], json!({"mode": "File"})).contains("needs serial.file"));
        assert!(with(&["payload", "kernel"], json!("/k")).contains("not both"));
        assert!(parse(json!({"cpus": {"boot_vcpus": 1}}))
            .unwrap_err()
            .contains("nothing to run"));
        assert!(parse(json!({
            "payload": {"demo": {"mib": 8, "dirty_mib_per_s": 0}},
            "devices": [{"path": "/sys/x", "iommu": true}],
        }))
        .unwrap_err()
        .contains("devices[0].iommu"));
    }
}
