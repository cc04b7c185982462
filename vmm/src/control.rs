//! The VMM controller: owns the (optional) machine and the migration jobs, answers the REST API
//! (`tern_api::ApiHandler`), and runs the main event loop that decides when tern exits.
//!
//! API handlers run on the API server's threads and only take the controller's lock briefly; every
//! long operation (a migration) runs on its own thread and reports back through [`MigrationStats`]
//! and the controller's wake eventfd.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tern_api::types::{
    DirtyPagesBySource as ApiDirtyPages, MigrationState as ApiMigrationState, MigrationStatus,
    VmInfo, VmReceiveMigrationData, VmSendMigrationData, VmState as ApiVmState, VmmPingResponse,
};
use tern_api::{ApiError, ApiHandler, MigrationUrl as ApiUrl};
use tern_migration::engine::{
    error_chain, receive_on, send, InDoubtVm, MigrationError, MigrationHost, MigrationOutcome,
    MigrationStats, MigrationStatsSnapshot, MigrationStatus as EngineStatus, SendParams,
    TimeoutStrategy,
};
use tern_migration::transport::{
    check_plain_tcp, MigrationListener, MigrationUrl, TlsClient, TlsServer,
};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{SerialConfig, VmConfig};
use crate::event_loop::{self, ControlEvents, WatchedMachine};
use crate::machine::{Machine, MachineExit};
use crate::migration::host::MachineHost;
use crate::migration::target::{ReceivedMachine, TernTargetFactory};
use crate::seccomp::{self, ThreadKind};

/// How long a source that handed its VM over keeps answering the API (so a watcher sees
/// `completed`) before it exits.
const COMPLETED_GRACE: Duration = Duration::from_millis(500);
/// How long `vmm.shutdown` waits before the API server stops, so its own 204 gets out.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(100);

/// Why the controller's loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmExit {
    /// The guest ended (power-off, reset, failure).
    Guest(MachineExit),
    /// `vmm.shutdown`.
    Requested,
    /// The VM moved to another tern.
    MigratedAway,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    /// `vm.create` recorded a configuration; nothing runs yet.
    Created,
    Running,
    Paused,
    Shutdown,
}

impl RunState {
    fn name(self) -> &'static str {
        match self {
            RunState::Created => "created",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shut down",
        }
    }

    fn api(self) -> ApiVmState {
        match self {
            RunState::Created => ApiVmState::Created,
            RunState::Running => ApiVmState::Running,
            RunState::Paused => ApiVmState::Paused,
            RunState::Shutdown => ApiVmState::Shutdown,
        }
    }
}

mod lifecycle;

#[derive(Debug)]
struct MigrationJob {
    stats: Arc<MigrationStats>,
    outgoing: bool,
}

#[derive(Debug)]
struct Inner {
    /// The VM's configuration: created by the command line or `vm.create`, or received. Set
    /// whenever `machine` is; kept after `vm.shutdown` so that `vm.boot` boots it again.
    config: Option<VmConfig>,
    machine: Option<Arc<Machine>>,
    run_state: RunState,
    migration: Option<MigrationJob>,
    exit: Option<VmmExit>,
    /// An incoming VM held paused because the link died at the switchover's undecidable point:
    /// `vm.resume` runs it here, `vm.shutdown` / `vmm.shutdown` drop it.
    in_doubt: Option<InDoubtVm>,
}

/// The controller shared by the API threads and the main loop.
#[derive(Debug)]
pub struct Controller {
    kvm_path: PathBuf,
    serial: SerialConfig,
    inner: Mutex<Inner>,
    /// Shared with the main loop's [`ControlEvents`] subscriber, which drains it.
    wake: Arc<EventFd>,
    received: Arc<ReceivedMachine>,
    /// Background threads (migration watchers) hold the controller through this.
    me: std::sync::Weak<Controller>,
    /// `--migration-allow-plain-tcp`: plain tcp to/on a non-loopback address without `tls_dir`.
    allow_plain_tcp: std::sync::atomic::AtomicBool,
    /// `--stay-after-migration`: a source whose VM migrated away drops it and keeps serving.
    stay_after_migration: std::sync::atomic::AtomicBool,
}

fn internal(e: impl std::error::Error) -> ApiError {
    ApiError::Internal {
        reason: error_chain(&e),
    }
}

impl Controller {
    /// A controller with no VM: give it one with [`Controller::create_vm`] and
    /// [`Controller::boot_vm`] (the command line and `vm.create` alike) or an incoming migration.
    pub fn new(kvm_path: PathBuf, serial: SerialConfig) -> std::io::Result<Arc<Self>> {
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let received = ReceivedMachine::new()?;
        Ok(Arc::new_cyclic(|me| Self {
            kvm_path,
            serial,
            inner: Mutex::new(Inner {
                config: None,
                machine: None,
                run_state: RunState::Shutdown,
                migration: None,
                exit: None,
                in_doubt: None,
            }),
            wake,
            received,
            me: me.clone(),
            allow_plain_tcp: std::sync::atomic::AtomicBool::new(false),
            stay_after_migration: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Allow plain tcp migration to or on non-loopback addresses (`--migration-allow-plain-tcp`).
    pub fn set_allow_plain_tcp(&self, on: bool) {
        self.allow_plain_tcp
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Keep the process serving after its VM migrated away (`--stay-after-migration`).
    pub fn set_stay_after_migration(&self, on: bool) {
        self.stay_after_migration
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// After a completed send: exit, or (`--stay-after-migration`) drop the VM, which now runs at
    /// the destination, and stay idle with the final statistics, ready to receive again.
    fn migrated_away(&self) {
        if !self
            .stay_after_migration
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.request_exit(VmmExit::MigratedAway);
            return;
        }
        let mut inner = self.lock();
        let machine = inner.machine.take();
        inner.config = None;
        inner.run_state = RunState::Shutdown;
        drop(inner);
        // The main loop stops watching the machine's exit fds when it wakes.
        drop(machine);
        let _ = self.wake.write(1);
    }

    /// The URL to migrate over: with `tls_dir`, TLS from its files; without, the plain-tcp policy.
    fn secure_url(
        &self,
        url: MigrationUrl,
        tls_dir: Option<&std::path::Path>,
    ) -> Result<MigrationUrl, ApiError> {
        let bad = |e: &dyn std::error::Error| ApiError::BadRequest {
            reason: error_chain(e),
        };
        match tls_dir {
            Some(dir) => {
                let tls = TlsClient::from_dir(dir).map_err(|e| bad(&e))?;
                url.with_tls(tls).map_err(|e| bad(&e))
            }
            None => {
                let allow = self
                    .allow_plain_tcp
                    .load(std::sync::atomic::Ordering::Relaxed);
                check_plain_tcp(&url, allow).map_err(|e| bad(&e))?;
                Ok(url)
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request_exit(&self, exit: VmmExit) {
        self.lock().exit.get_or_insert(exit);
        let _ = self.wake.write(1);
    }

    fn running_migration(inner: &Inner) -> bool {
        inner
            .migration
            .as_ref()
            .is_some_and(|m| !m.stats.status().is_final())
    }

    /// Runs until the guest ends, `vmm.shutdown`, or the VM migrated away: the main thread's
    /// event loop ([`crate::event_loop`]), which wakes when the VM's exit eventfds, the API's
    /// wake-up or a received VM fire, and then looks at the controller's state again.
    pub fn run(self: &Arc<Self>) -> std::io::Result<VmmExit> {
        let mut events = event_loop::new_manager()?;
        let _control =
            ControlEvents::add(&mut events, self.wake.clone(), self.received.ready_fd())?;
        let mut watched: Option<WatchedMachine> = None;
        loop {
            if let Some(m) = self.received.take() {
                let mut inner = self.lock();
                inner.config = Some(m.config().clone());
                inner.machine = Some(m);
                inner.run_state = RunState::Running;
            }
            // Follow the VM: one arrives by an incoming migration, one leaves by an outgoing one.
            let machine = self.lock().machine.clone();
            if watched
                .as_ref()
                .is_some_and(|w| !machine.as_ref().is_some_and(|m| w.watches(m)))
            {
                if let Some(w) = watched.take() {
                    w.remove(&mut events);
                }
            }
            if let (None, Some(m)) = (&watched, &machine) {
                watched = Some(WatchedMachine::add(&mut events, m.clone())?);
            }
            drop(machine);
            if let Some(exit) = watched.as_ref().and_then(WatchedMachine::take_exit) {
                let mut inner = self.lock();
                if let Some(job) = inner.migration.as_ref().filter(|j| j.outgoing) {
                    job.stats.cancel();
                }
                inner.machine = None;
                inner.run_state = RunState::Shutdown;
                return Ok(VmmExit::Guest(exit));
            }
            // Bound first: an `if let` on `self.lock()` would hold the lock through the grace sleep
            // and starve the API threads.
            let requested = self.lock().exit.clone();
            if let Some(exit) = requested {
                match exit {
                    VmmExit::MigratedAway => std::thread::sleep(COMPLETED_GRACE),
                    VmmExit::Requested => std::thread::sleep(SHUTDOWN_GRACE),
                    VmmExit::Guest(_) => {}
                }
                return Ok(exit);
            }
            event_loop::run_once(&mut events)?;
        }
    }
}

/// `vm.info` entries for the VM's DMA-capable devices: VFIO passthrough and the lab's mock-dma.
fn passthrough_devices(machine: &Machine) -> Vec<tern_api::types::DeviceInfo> {
    use tern_api::types::{DeviceInfo, IommuCapabilities};
    use tern_devices::vfio::spec::VfioBackend;
    let mut v: Vec<DeviceInfo> = machine
        .devices()
        .passthrough_info()
        .into_iter()
        .map(|(d, domain)| {
            let backend = match d.backend {
                VfioBackend::Type1 => "type1",
                VfioBackend::Iommufd => "iommufd",
            };
            DeviceInfo {
                id: d.id,
                kind: "vfio-pci".into(),
                backend: Some(format!("{} ({backend})", d.sysfs.display())),
                iommu: Some(IommuCapabilities {
                    backend: match d.backend {
                        VfioBackend::Type1 => "vfio-type1",
                        VfioBackend::Iommufd => "iommufd",
                    }
                    .into(),
                    hw_dirty_tracking: d.hw_dirty_tracking,
                    device_dma_logging: d.dma_logging,
                    vfio_migration: d.migration.is_some(),
                    vfio_migration_caps: d
                        .migration
                        .map_or_else(|| "none".into(), |c| c.to_string()),
                }),
                dma_dirty: Some(dma_dirty_info(d.dma_dirty)),
                dma_domain: domain.map(dma_domain_info),
            }
        })
        .collect();
    for m in machine.devices().mock_dma_info() {
        v.push(DeviceInfo {
            id: m.id,
            kind: "mock-dma".into(),
            backend: Some("iommufd selftest mock domain (lab only)".into()),
            iommu: Some(IommuCapabilities {
                backend: "iommufd".into(),
                hw_dirty_tracking: true,
                device_dma_logging: false,
                vfio_migration: false,
                vfio_migration_caps: "none".into(),
            }),
            dma_dirty: Some(dma_dirty_info(m.dma_dirty)),
            dma_domain: Some(dma_domain_info(m.domain)),
        });
    }
    v
}

/// A device's DMA space as `vm.info` shows it.
fn dma_domain_info(d: tern_devices::vfio::device::DmaDomainInfo) -> tern_api::types::DmaDomain {
    use tern_devices::vfio::device::DmaDomainInfo;
    match d {
        DmaDomainInfo::Type1 { devices } => tern_api::types::DmaDomain {
            backend: "type1".into(),
            devices,
            ..Default::default()
        },
        DmaDomainInfo::Iommufd {
            ioas,
            hwpt,
            dirty_tracking,
            devices,
        } => tern_api::types::DmaDomain {
            backend: "iommufd".into(),
            ioas: Some(ioas),
            hwpt: Some(hwpt),
            dirty_tracking,
            devices,
        },
    }
}

/// A device's DMA dirty-tracking selection as `vm.info` shows it.
fn dma_dirty_info(
    s: tern_devices::vfio::dma_dirty::method::DmaDirtySelection,
) -> tern_api::types::DmaDirtyInfo {
    tern_api::types::DmaDirtyInfo {
        method: s.method.map_or("none", |m| m.name()).into(),
        migratable: s.migratable,
        reason: s.reason,
    }
}

fn convert_url(url: &ApiUrl) -> MigrationUrl {
    match url {
        ApiUrl::Tcp { host, port } => MigrationUrl::Tcp {
            host: host.clone(),
            port: *port,
        },
        ApiUrl::Unix { path } => MigrationUrl::Unix(path.clone()),
    }
}

fn convert_status(s: &MigrationStatsSnapshot) -> MigrationStatus {
    use tern_api::types::{MigrationIteration, MigrationPass};
    use tern_migration::engine::{DirtyPagesBySource as EngineDirtyPages, PassKind};
    let dirty = |d: &EngineDirtyPages| ApiDirtyPages {
        kvm: d.kvm,
        vmm: d.vmm,
        dma: d.dma,
    };
    let iterations = s
        .history
        .iter()
        .map(|r| MigrationIteration {
            iteration: r.iteration,
            pass: match r.pass {
                PassKind::Full => MigrationPass::Full,
                PassKind::Dirty => MigrationPass::Dirty,
                PassKind::Final => MigrationPass::Final,
            },
            pages_sent: r.pages_sent,
            bytes_sent: r.bytes_sent,
            duration_ms: r.duration_ms,
            dirty_pages_by_source: dirty(&r.dirty_pages),
            dma_pages_by_device: r.dma_pages_by_source.clone(),
            expected_downtime_ms: r.expected_downtime_ms,
            bandwidth_bytes_per_s: r.bandwidth_bytes_per_sec,
            cpu_throttle_percent: u8::try_from(r.throttle_percent).unwrap_or(u8::MAX),
        })
        .collect();
    let status = match s.status {
        EngineStatus::None => ApiMigrationState::None,
        EngineStatus::Setup => ApiMigrationState::Setup,
        EngineStatus::Active => ApiMigrationState::Active,
        EngineStatus::Completing => ApiMigrationState::Completing,
        EngineStatus::Completed => ApiMigrationState::Completed,
        EngineStatus::Failed => ApiMigrationState::Failed,
        EngineStatus::Cancelled => ApiMigrationState::Cancelled,
        EngineStatus::InDoubt => ApiMigrationState::InDoubt,
    };
    MigrationStatus {
        status,
        iteration: s.iteration,
        total_bytes: s.total_bytes,
        transferred_bytes: s.transferred_bytes,
        remaining_bytes: s.remaining_bytes,
        bandwidth_bytes_per_s: s.bandwidth_bytes_per_sec,
        dirty_pages_per_s: s.dirty_pages_per_sec,
        dirty_pages_by_source: dirty(&s.dirty_pages),
        dma_pages_by_device: s.dma_pages_by_source.clone(),
        iterations,
        expected_downtime_ms: s.expected_downtime_ms,
        cpu_throttle_percent: u8::try_from(s.throttle_percent).unwrap_or(u8::MAX),
        downtime_limit_ms: s.downtime_target_ms,
        downtime_ms: s.downtime_ms,
        paused_at_unix_us: s.paused_at_unix_us,
        resumed_at_unix_us: s.resumed_at_unix_us,
        total_time_ms: status.is_terminal().then_some(s.total_time_ms),
        setup_time_ms: s.setup_time_ms,
        data_pages: s.data_pages,
        zero_pages: s.zero_pages,
        sent_from_file_bytes: s.sent_from_file_bytes,
        read_ahead_pages: s.read_ahead_pages,
        populated_hint_bytes: s.populated_hint_bytes,
        prefaulted_bytes: s.prefaulted_bytes,
        error: s.error.clone(),
        devices: s
            .devices
            .iter()
            .map(|d| tern_api::types::DeviceMigrationStatus {
                id: d.id.clone(),
                precopy_bytes: d.precopy_bytes,
                stop_copy_bytes: d.stop_copy_bytes,
                stop_copy_us: d.stop_copy_us,
                initial_data_acked: d.initial_data_acked,
                p2p: d.p2p,
                reset: d.reset,
                handed_over: d.handed_over,
                handover_note: d.handover_note.clone(),
            })
            .collect(),
        switchover: s.switchover.map(|b| tern_api::types::SwitchoverTimes {
            pause_us: b.pause_us,
            final_sync_us: b.final_sync_us,
            final_claim_us: b.final_claim_us,
            final_claimed_chunks: b.final_claimed_chunks,
            final_pass_us: b.final_pass_us,
            state_save_us: b.state_save_us,
            send_us: b.send_us,
            destination_restore_us: b.destination_restore_us,
            destination_start_us: b.destination_start_us,
            queued_at_pause_bytes: b.queued_at_pause_bytes,
        }),
        setup_steps: api_steps(&s.setup_steps),
        switchover_steps: api_steps(&s.switchover_steps),
    }
}

fn api_steps(steps: &[tern_migration::engine::TimedStep]) -> Vec<tern_api::types::TimedStep> {
    steps
        .iter()
        .map(|t| tern_api::types::TimedStep {
            name: t.name.clone(),
            us: t.us,
        })
        .collect()
}

impl ApiHandler for Controller {
    fn vmm_ping(&self) -> Result<VmmPingResponse, ApiError> {
        // Probe outside the lock: without a VM it opens /dev/kvm.
        let machine = self.lock().machine.clone();
        let facts = crate::features::probe(&self.kvm_path, machine.as_deref());
        Ok(crate::api_info::ping(crate::features::feature_names(
            &facts,
        )))
    }

    fn vmm_shutdown(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if let Some(job) = &inner.migration {
            job.stats.cancel();
        }
        if let Some(vm) = inner.in_doubt.take() {
            log::warn!("dropping the VM held in doubt: the operator chose the source");
            vm.abandon();
        }
        drop(inner);
        self.request_exit(VmmExit::Requested);
        Ok(())
    }

    fn vm_create(&self, config: tern_api::vm_create::VmCreateConfig) -> Result<(), ApiError> {
        let config = crate::api_create::vm_config(&config).map_err(|e| ApiError::BadRequest {
            reason: format!("vm.create: {}", error_chain(&e)),
        })?;
        self.create_vm(config)
    }

    fn vm_boot(&self) -> Result<(), ApiError> {
        self.boot_vm()
    }

    fn vm_delete(&self) -> Result<(), ApiError> {
        self.delete_vm()
    }

    fn vm_reboot(&self) -> Result<(), ApiError> {
        self.reboot_vm()
    }

    fn vm_info(&self) -> Result<VmInfo, ApiError> {
        let inner = self.lock();
        // A running VM reports the configuration it was built from (a received one's included).
        let config = match &inner.machine {
            Some(m) => m.config(),
            None => inner.config.as_ref().ok_or(ApiError::NoVm)?,
        };
        Ok(VmInfo {
            state: inner.run_state.api(),
            config: crate::api_info::vm_config_info(config),
            memory_actual_size: config.memory_bytes,
            devices: inner
                .machine
                .as_deref()
                .map(passthrough_devices)
                .unwrap_or_default(),
        })
    }

    fn vm_pause(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if Self::running_migration(&inner) {
            return Err(ApiError::MigrationRunning);
        }
        let machine = inner.machine.clone().ok_or(ApiError::NoVm)?;
        machine.pause();
        inner.run_state = RunState::Paused;
        Ok(())
    }

    fn vm_resume(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if Self::running_migration(&inner) {
            return Err(ApiError::MigrationRunning);
        }
        if let Some(vm) = inner.in_doubt.take() {
            // The operator resolved an in-doubt switchover in favour of this side: devices to
            // RUNNING, vCPUs start, and the main loop takes the machine.
            log::warn!("running the VM held in doubt: the operator chose this side");
            return vm.run().map(drop).map_err(|e| ApiError::Internal {
                reason: format!("running the VM held in doubt: {}", error_chain(&e)),
            });
        }
        let machine = inner.machine.clone().ok_or(ApiError::NoVm)?;
        // After an in-doubt switchover the devices are stopped: back to RUNNING first.
        machine
            .devices()
            .recover_device_states()
            .map_err(|e| ApiError::Internal {
                reason: format!("bringing the devices back to RUNNING: {}", error_chain(&e)),
            })?;
        machine.resume();
        inner.run_state = RunState::Running;
        Ok(())
    }

    fn vm_shutdown(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if Self::running_migration(&inner) {
            return Err(ApiError::MigrationRunning);
        }
        if let Some(vm) = inner.in_doubt.take() {
            log::warn!("dropping the VM held in doubt: the operator chose the source");
            vm.abandon();
            return Ok(());
        }
        let machine = inner.machine.take().ok_or(ApiError::NoVm)?;
        machine.pause();
        inner.run_state = RunState::Shutdown;
        drop(inner);
        drop(machine);
        let _ = self.wake.write(1);
        Ok(())
    }

    fn vm_send_migration(&self, data: VmSendMigrationData) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if Self::running_migration(&inner) {
            return Err(ApiError::MigrationRunning);
        }
        let machine = inner.machine.clone().ok_or(ApiError::NoVm)?;
        // Refused before anything starts (nothing is paused), naming each device and why. A local
        // migration (live update) hands the passthrough devices over as they are instead.
        let blockers = if data.local {
            machine
                .devices()
                .handover_collect()
                .map_err(|e| ApiError::BadRequest {
                    reason: format!("the VM cannot be live-updated: {}", error_chain(&e)),
                })?;
            Vec::new()
        } else {
            machine.devices().migration_blockers()
        };
        if !blockers.is_empty() {
            let list: Vec<String> = blockers.iter().map(ToString::to_string).collect();
            return Err(ApiError::BadRequest {
                reason: format!("the VM cannot migrate: {}", list.join("; ")),
            });
        }
        if inner.run_state != RunState::Running {
            return Err(ApiError::InvalidState {
                operation: "send a migration",
                state: "paused (resume it first)".into(),
            });
        }
        let destination =
            self.secure_url(convert_url(&data.destination_url), data.tls_dir.as_deref())?;
        let mut params = SendParams::new(destination);
        params.local = data.local;
        params.downtime_ms = data.downtime_ms;
        params.timeout = Duration::from_secs(data.timeout_s);
        params.timeout_strategy = match data.timeout_strategy {
            tern_api::types::TimeoutStrategy::Cancel => TimeoutStrategy::Cancel,
            tern_api::types::TimeoutStrategy::Ignore => TimeoutStrategy::Ignore,
        };
        params.max_bandwidth_mbps = data.max_bandwidth_mbps;
        params.connections = u16::try_from(data.connections).map_err(|_| ApiError::BadRequest {
            reason: format!("connections {} is out of range", data.connections),
        })?;
        params.auto_converge = data.auto_converge;
        params.page_checksums = data.page_checksums;
        params.validate().map_err(|e| ApiError::BadRequest {
            reason: error_chain(&e),
        })?;
        let stats = Arc::new(MigrationStats::starting());
        // The engine's own thread (what `start_send` does), started here so that it runs under the
        // migration seccomp filter; the lane and watcher threads it starts inherit that filter.
        let mut host: Box<dyn MigrationHost> = Box::new(MachineHost::new(machine));
        let thread_stats = stats.clone();
        let handle = std::thread::Builder::new()
            .name("tern-migrate-src".into())
            .spawn(move || {
                seccomp::install_or_log(ThreadKind::Migration);
                let result = send(host.as_mut(), params, thread_stats);
                MigrationOutcome { host, result }
            })
            .map_err(internal)?;
        inner.migration = Some(MigrationJob {
            stats: stats.clone(),
            outgoing: true,
        });
        drop(inner);
        let controller = self.self_ref();
        std::thread::Builder::new()
            .name("tern-migrate-watch".into())
            .spawn(move || {
                let outcome = handle.join();
                match outcome {
                    Ok(o) if o.result.is_ok() => {
                        log::info!("migration completed; this tern hands its VM over");
                        // The engine's host holds the machine too: release it first, so that the
                        // VM's memory and threads go when the controller lets go of it.
                        drop(o);
                        if let Some(c) = controller {
                            c.migrated_away();
                        }
                    }
                    Ok(o) => match &o.result {
                        Err(e @ MigrationError::InDoubt { .. }) => eprintln!(
                            "tern: {}; vm.resume runs it here, vmm.shutdown ends it",
                            error_chain(e)
                        ),
                        Err(e) => eprintln!(
                            "tern: migration failed, VM keeps running here: {}",
                            error_chain(e)
                        ),
                        Ok(()) => {}
                    },
                    Err(_) => eprintln!("tern: migration thread panicked; VM state unknown"),
                }
            })
            .map_err(internal)?;
        Ok(())
    }

    fn vm_receive_migration(&self, data: VmReceiveMigrationData) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if inner.machine.is_some() || inner.config.is_some() {
            return Err(ApiError::Conflict {
                reason:
                    "this tern already has a VM: vm.delete it, or start a destination tern with only --api-socket"
                        .into(),
            });
        }
        if Self::running_migration(&inner) {
            return Err(ApiError::MigrationRunning);
        }
        let url = convert_url(&data.receiver_url);
        let tls = match &data.tls_dir {
            Some(dir) => Some(TlsServer::from_dir(dir).map_err(|e| ApiError::BadRequest {
                reason: error_chain(&e),
            })?),
            None => {
                let allow = self
                    .allow_plain_tcp
                    .load(std::sync::atomic::Ordering::Relaxed);
                check_plain_tcp(&url, allow).map_err(|e| ApiError::BadRequest {
                    reason: error_chain(&e),
                })?;
                None
            }
        };
        let bound = match tls {
            Some(tls) => MigrationListener::bind_tls(&url, tls),
            None => MigrationListener::bind(&url),
        };
        let listener = bound.map_err(|e| ApiError::BadRequest {
            reason: format!("cannot listen on the receiver url: {}", error_chain(&e)),
        })?;
        let stats = Arc::new(MigrationStats::starting());
        inner.migration = Some(MigrationJob {
            stats: stats.clone(),
            outgoing: false,
        });
        let mut factory = TernTargetFactory::new(
            self.kvm_path.clone(),
            self.serial.clone(),
            self.received.clone(),
            data.devices
                .iter()
                .map(|d| (d.id.clone(), d.path.clone()))
                .collect(),
        );
        let controller = self.self_ref();
        std::thread::Builder::new()
            .name("tern-migrate-dst".into())
            .spawn(move || match mig_receive(&listener, &mut factory, &stats) {
                Ok(_) => {}
                Err(MigrationError::InDoubt {
                    detail,
                    held: Some(vm),
                }) => {
                    eprintln!(
                        "tern: incoming migration in doubt ({detail}): the VM is held paused here; \
                         vm.resume runs it here, vm.shutdown drops it"
                    );
                    if let Some(c) = &controller {
                        c.lock().in_doubt = Some(*vm);
                    }
                }
                Err(e) => eprintln!("tern: incoming migration failed: {}", error_chain(&e)),
            })
            .map_err(internal)?;
        Ok(())
    }

    fn vm_migration_status(&self) -> Result<MigrationStatus, ApiError> {
        Ok(match &self.lock().migration {
            Some(job) => convert_status(&job.stats.snapshot()),
            None => MigrationStatus::default(),
        })
    }

    fn vm_migration_cancel(&self) -> Result<(), ApiError> {
        let inner = self.lock();
        match &inner.migration {
            Some(job) if !job.stats.status().is_final() => {
                job.stats.cancel();
                Ok(())
            }
            _ => Err(ApiError::NoMigrationRunning),
        }
    }
}

impl Controller {
    /// A strong reference to this controller for background threads, if it is shared (always, in
    /// tern: the controller is created as an `Arc`).
    fn self_ref(&self) -> Option<Arc<Controller>> {
        self.me.upgrade()
    }
}

/// [`receive_on`] on the calling (`tern-migrate-dst`) thread under the migration seccomp filter: its
/// data-lane threads and the VM it builds (vCPU and helper threads) start under that filter.
fn mig_receive(
    listener: &MigrationListener,
    factory: &mut TernTargetFactory,
    stats: &MigrationStats,
) -> Result<Box<dyn tern_migration::engine::MigrationTarget>, tern_migration::engine::MigrationError>
{
    seccomp::install_or_log(ThreadKind::Migration);
    // The VM's config-free part, alongside the source's connection.
    factory.prebuild();
    receive_on(listener, factory, stats)
}
