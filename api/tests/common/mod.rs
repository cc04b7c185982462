//! A fake VMM behind the API: enough state to answer every endpoint the way the real one should,
//! and a record of what it was asked, so tests check what reached the handler.

#![allow(dead_code)] // each test file uses a different part

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_api::types::{
    ConsoleMode, CpusInfo, DeviceConfigInfo, MemoryInfo, PayloadInfo, SerialInfo,
};
use tern_api::{
    ApiError, ApiHandler, ApiServer, DeviceInfo, DmaDirtyInfo, DmaDomain, IommuCapabilities,
    MigrationState, MigrationStatus, ServerOptions, VmConfigInfo, VmInfo, VmReceiveMigrationData,
    VmSendMigrationData, VmState, VmmPingResponse,
};

#[derive(Debug, Default)]
pub struct FakeState {
    /// Endpoint names in the order they were called.
    pub calls: Vec<&'static str>,
    pub vm: Option<VmState>,
    pub sent: Option<VmSendMigrationData>,
    pub received: Option<VmReceiveMigrationData>,
    /// Statuses `vm.migration` returns in order; the last one repeats.
    pub script: VecDeque<MigrationStatus>,
    pub status: MigrationStatus,
    /// `vm.info` sleeps this long (to test the server's deadline).
    pub info_delay: Duration,
    /// `vm.shutdown` panics (to test that a panicking handler yields a 500).
    pub panic_on_vm_shutdown: bool,
}

#[derive(Debug, Default)]
pub struct FakeVmm {
    pub state: Mutex<FakeState>,
}

impl FakeVmm {
    pub fn with_vm(state: VmState) -> Arc<FakeVmm> {
        let vmm = FakeVmm::default();
        vmm.lock().vm = Some(state);
        Arc::new(vmm)
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        // A test that panicked while holding the lock has failed already; keep its state readable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn calls(&self) -> Vec<&'static str> {
        self.lock().calls.clone()
    }

    fn record(&self, name: &'static str) -> std::sync::MutexGuard<'_, FakeState> {
        let mut s = self.lock();
        s.calls.push(name);
        s
    }
}

pub fn sample_info(state: VmState) -> VmInfo {
    VmInfo {
        state,
        config: VmConfigInfo {
            cpus: CpusInfo {
                boot_vcpus: 2,
                max_vcpus: 2,
            },
            memory: MemoryInfo { size: 512 << 20 },
            payload: PayloadInfo {
                kernel: Some("/guests/vmlinux".into()),
                cmdline: Some("console=ttyS0".into()),
                ..PayloadInfo::default()
            },
            serial: SerialInfo {
                mode: ConsoleMode::Tty,
                file: None,
            },
            devices: vec![DeviceConfigInfo {
                path: "/sys/bus/pci/devices/0000:00:04.0".into(),
                id: "vfio0".into(),
            }],
            dirty_tracking: Some("log".into()),
        },
        memory_actual_size: 512 << 20,
        devices: vec![
            DeviceInfo {
                id: "serial0".into(),
                kind: "serial".into(),
                backend: Some("stdout".into()),
                iommu: None,
                dma_dirty: None,
                dma_domain: None,
            },
            DeviceInfo {
                id: "vfio0".into(),
                kind: "vfio-pci".into(),
                backend: Some("/sys/bus/pci/devices/0000:00:04.0".into()),
                iommu: Some(IommuCapabilities {
                    backend: "iommufd".into(),
                    hw_dirty_tracking: true,
                    device_dma_logging: false,
                    vfio_migration: true,
                    vfio_migration_caps: "STOP_COPY|P2P|PRE_COPY".into(),
                }),
                dma_dirty: Some(DmaDirtyInfo {
                    method: "iommufd".into(),
                    migratable: true,
                    reason: "the IOMMU tracks dirty pages".into(),
                }),
                dma_domain: Some(DmaDomain {
                    backend: "iommufd".into(),
                    ioas: Some(1),
                    hwpt: Some(3),
                    dirty_tracking: true,
                    devices: vec!["vfio0".into()],
                }),
            },
        ],
    }
}

impl ApiHandler for FakeVmm {
    fn vmm_ping(&self) -> Result<VmmPingResponse, ApiError> {
        drop(self.record("vmm.ping"));
        Ok(VmmPingResponse {
            build_version: "v9.9.9-fake".into(),
            version: "9.9.9-fake".into(),
            pid: 4242,
            features: vec!["dirty-ring".into()],
        })
    }

    fn vmm_shutdown(&self) -> Result<(), ApiError> {
        drop(self.record("vmm.shutdown"));
        Ok(())
    }

    fn vm_create(&self, _config: tern_api::vm_create::VmCreateConfig) -> Result<(), ApiError> {
        let mut s = self.record("vm.create");
        if s.vm.is_some() {
            return Err(ApiError::Conflict {
                reason: "a VM is already created".into(),
            });
        }
        s.vm = Some(VmState::Created);
        Ok(())
    }

    fn vm_boot(&self) -> Result<(), ApiError> {
        let mut s = self.record("vm.boot");
        match s.vm {
            None => Err(ApiError::NoVm),
            Some(VmState::Created | VmState::Shutdown) => {
                s.vm = Some(VmState::Running);
                Ok(())
            }
            Some(other) => Err(ApiError::InvalidState {
                operation: "boot",
                state: format!("{other:?}").to_lowercase(),
            }),
        }
    }

    fn vm_delete(&self) -> Result<(), ApiError> {
        self.record("vm.delete").vm = None;
        Ok(())
    }

    fn vm_reboot(&self) -> Result<(), ApiError> {
        let s = self.record("vm.reboot");
        match s.vm {
            None => Err(ApiError::NoVm),
            Some(VmState::Running | VmState::Paused) => Ok(()),
            Some(other) => Err(ApiError::InvalidState {
                operation: "reboot",
                state: format!("{other:?}").to_lowercase(),
            }),
        }
    }

    fn vm_info(&self) -> Result<VmInfo, ApiError> {
        let (vm, delay) = {
            let s = self.record("vm.info");
            (s.vm, s.info_delay)
        };
        std::thread::sleep(delay);
        vm.map(sample_info).ok_or(ApiError::NoVm)
    }

    fn vm_pause(&self) -> Result<(), ApiError> {
        let mut s = self.record("vm.pause");
        match s.vm {
            None => Err(ApiError::NoVm),
            Some(VmState::Running) => {
                s.vm = Some(VmState::Paused);
                Ok(())
            }
            Some(other) => Err(ApiError::InvalidState {
                operation: "pause",
                state: format!("{other:?}").to_lowercase(),
            }),
        }
    }

    fn vm_resume(&self) -> Result<(), ApiError> {
        let mut s = self.record("vm.resume");
        match s.vm {
            None => Err(ApiError::NoVm),
            Some(VmState::Paused) => {
                s.vm = Some(VmState::Running);
                Ok(())
            }
            Some(other) => Err(ApiError::InvalidState {
                operation: "resume",
                state: format!("{other:?}").to_lowercase(),
            }),
        }
    }

    fn vm_shutdown(&self) -> Result<(), ApiError> {
        let mut s = self.record("vm.shutdown");
        if s.panic_on_vm_shutdown {
            drop(s);
            panic!("fake vm.shutdown panics on purpose");
        }
        match s.vm {
            None => Err(ApiError::NoVm),
            Some(_) => {
                s.vm = Some(VmState::Shutdown);
                Ok(())
            }
        }
    }

    fn vm_send_migration(&self, data: VmSendMigrationData) -> Result<(), ApiError> {
        let mut s = self.record("vm.send-migration");
        if s.vm.is_none() {
            return Err(ApiError::NoVm);
        }
        if s.status.status.is_running() {
            return Err(ApiError::MigrationRunning);
        }
        s.sent = Some(data);
        s.status = MigrationStatus {
            status: MigrationState::Setup,
            ..MigrationStatus::default()
        };
        Ok(())
    }

    fn vm_receive_migration(&self, data: VmReceiveMigrationData) -> Result<(), ApiError> {
        let mut s = self.record("vm.receive-migration");
        if s.vm.is_some() {
            return Err(ApiError::Conflict {
                reason: "this VMM already has a VM: start a new tern to receive one".into(),
            });
        }
        s.received = Some(data);
        Ok(())
    }

    fn vm_migration_status(&self) -> Result<MigrationStatus, ApiError> {
        let mut s = self.record("vm.migration");
        if s.script.len() > 1 {
            let next = s.script.pop_front().unwrap_or_default();
            s.status = next;
        } else if let Some(last) = s.script.front().cloned() {
            s.status = last;
        }
        Ok(s.status.clone())
    }

    fn vm_migration_cancel(&self) -> Result<(), ApiError> {
        let mut s = self.record("vm.migration-cancel");
        if !s.status.status.is_running() {
            return Err(ApiError::NoMigrationRunning);
        }
        s.status.status = MigrationState::Cancelled;
        s.status.error = Some("cancelled by vm.migration-cancel".into());
        Ok(())
    }
}

/// A server with a fake VMM on a socket in its own temporary directory.
pub struct Harness {
    pub vmm: Arc<FakeVmm>,
    pub server: Option<ApiServer>,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub fn start(vmm: Arc<FakeVmm>) -> Harness {
        Harness::start_with(vmm, ServerOptions::default())
    }

    pub fn start_with(vmm: Arc<FakeVmm>, options: ServerOptions) -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("api.sock");
        let server = ApiServer::start_with(&socket, vmm.clone(), options).expect("server starts");
        Harness {
            vmm,
            server: Some(server),
            socket,
            dir,
        }
    }

    pub fn client(&self) -> tern_api::ApiClient {
        tern_api::ApiClient::new(&self.socket).with_timeout(Duration::from_secs(10))
    }
}
