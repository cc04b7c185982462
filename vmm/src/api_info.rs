//! What `vmm.ping` and `vm.info` report, in Cloud Hypervisor's shapes: the VMM's configuration
//! converted to the API's `VmConfigInfo` (CH's `VmConfig` layout), and the ping answer.

use tern_api::types::{
    ConsoleMode, CpusInfo, DemoPayloadInfo, DeviceConfigInfo, MemoryInfo, PayloadInfo, SerialInfo,
    VmConfigInfo, VmmPingResponse,
};

use crate::config::{PayloadConfig, SerialConfig, VmConfig};

/// The build tern reports as `build_version`: `TERN_BUILD_VERSION` when the build set it (a
/// packager's `git describe`), else the crate version.
pub fn build_version() -> String {
    option_env!("TERN_BUILD_VERSION")
        .unwrap_or(env!("CARGO_PKG_VERSION"))
        .to_owned()
}

/// The `vmm.ping` answer with this build's optional features.
pub fn ping(features: Vec<String>) -> VmmPingResponse {
    VmmPingResponse {
        build_version: build_version(),
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        features,
    }
}

/// `config` in CH's `VmConfig` layout. tern has no vCPU hotplug, so `max_vcpus` is `boot_vcpus`.
pub fn vm_config_info(config: &VmConfig) -> VmConfigInfo {
    let payload = match &config.payload {
        PayloadConfig::Demo(d) => PayloadInfo {
            demo: Some(DemoPayloadInfo {
                mib: d.mib,
                dirty_mib_per_s: d.dirty_mib_per_s,
                exit_after_s: d.exit_after_s,
            }),
            ..PayloadInfo::default()
        },
        PayloadConfig::Kernel {
            kernel,
            initramfs,
            cmdline,
        } => PayloadInfo {
            kernel: Some(kernel.display().to_string()),
            initramfs: initramfs.as_ref().map(|p| p.display().to_string()),
            cmdline: Some(cmdline.clone()),
            demo: None,
        },
    };
    let serial = match &config.serial {
        SerialConfig::Stdout => SerialInfo {
            mode: ConsoleMode::Tty,
            file: None,
        },
        SerialConfig::File(path) => SerialInfo {
            mode: ConsoleMode::File,
            file: Some(path.display().to_string()),
        },
        SerialConfig::Off => SerialInfo {
            mode: ConsoleMode::Off,
            file: None,
        },
    };
    VmConfigInfo {
        cpus: CpusInfo {
            boot_vcpus: u32::from(config.cpus),
            max_vcpus: u32::from(config.cpus),
        },
        memory: MemoryInfo {
            size: config.memory_bytes,
        },
        payload,
        serial,
        devices: config
            .devices
            .iter()
            .map(|d| DeviceConfigInfo {
                path: d.path.display().to_string(),
                id: d.id.clone(),
            })
            .collect(),
        dirty_tracking: Some(config.dirty_tracking.name().into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::DemoConfig;

    fn config(payload: PayloadConfig, serial: SerialConfig) -> VmConfig {
        VmConfig {
            cpus: 2,
            memory_bytes: 512 << 20,
            payload,
            serial,
            dirty_tracking: Default::default(),
            devices: Vec::new(),
            mock_dma: Vec::new(),
        }
    }

    #[test]
    fn demo_vm_reads_as_a_ch_config() {
        let config = config(
            PayloadConfig::Demo(DemoConfig::default()),
            SerialConfig::File("/tmp/s.log".into()),
        );
        let v = serde_json::to_value(vm_config_info(&config)).unwrap();
        assert_eq!(v["cpus"]["boot_vcpus"], 2);
        assert_eq!(v["cpus"]["max_vcpus"], 2);
        assert_eq!(v["memory"]["size"], 512u64 << 20);
        assert_eq!(v["payload"]["kernel"], serde_json::Value::Null);
        assert_eq!(v["payload"]["demo"]["mib"], 64);
        assert_eq!(v["serial"]["mode"], "File");
        assert_eq!(v["serial"]["file"], "/tmp/s.log");
        assert_eq!(v["devices"], serde_json::json!([]));
    }

    #[test]
    fn kernel_vm_has_ch_payload_and_stdout_is_tty() {
        let config = config(
            PayloadConfig::Kernel {
                kernel: "/k".into(),
                initramfs: Some("/i".into()),
                cmdline: "console=ttyS0".into(),
            },
            SerialConfig::Stdout,
        );
        let v = serde_json::to_value(vm_config_info(&config)).unwrap();
        assert_eq!(v["payload"]["kernel"], "/k");
        assert_eq!(v["payload"]["initramfs"], "/i");
        assert_eq!(v["payload"]["cmdline"], "console=ttyS0");
        assert_eq!(v["payload"]["demo"], serde_json::Value::Null);
        assert_eq!(v["serial"]["mode"], "Tty");
    }
}
