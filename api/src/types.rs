//! Request and response bodies of the REST API (serde, snake_case, Cloud Hypervisor's names).
//!
//! These are the API's own types: the VMM converts them to and from its internal config and state,
//! so a change here is a change of the public contract (`api/openapi.yaml` says the same thing, and
//! `tests/openapi.rs` fails when the two drift apart).
//!
//! Request bodies are validated while they are parsed (`deny_unknown_fields`, URL syntax, ranges), so a
//! handler never sees an invalid request: a bad body is a 400 before the VMM is asked anything.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::url::MigrationUrl;

/// Answer to `GET vmm.ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    /// tern's version (`CARGO_PKG_VERSION` of the VMM).
    pub version: String,
    /// Process id of the VMM, so tools can tell a restarted VMM from the one they talked to.
    pub pid: u32,
    /// Optional capabilities of this build, e.g. `"dirty-ring"`, `"iommufd-dirty-tracking"`.
    #[serde(default)]
    pub features: Vec<String>,
}

/// Life-cycle state of the VM, as `vm.info` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Built (or received) but its vCPUs have not run yet.
    Created,
    Running,
    Paused,
    /// The guest shut down or `vm.shutdown` was called; the VMM process may still be up.
    Shutdown,
}

impl VmState {
    /// Every state, in declaration order (used by the spec test).
    pub const ALL: [VmState; 4] = [
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::Shutdown,
    ];
}

/// Summary of the VM's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfigInfo {
    pub cpus: u32,
    pub memory_bytes: u64,
    /// The guest kernel or firmware image the VM booted from, if it was booted (not received).
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    /// How KVM dirty pages are tracked: `"log"` (dirty bitmap) or `"ring"` (dirty ring).
    #[serde(default)]
    pub dirty_tracking: Option<String>,
}

/// What the IOMMU behind a passthrough device can do for migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IommuCapabilities {
    /// IOMMU backend: `"iommufd"` or `"vfio-type1"`.
    pub backend: String,
    /// The IOMMU tracks DMA writes itself (IOMMU_HWPT_SET_DIRTY_TRACKING / VFIO type1 dirty pages).
    pub hw_dirty_tracking: bool,
    /// The device reports its own DMA writes (VFIO device DMA logging).
    pub device_dma_logging: bool,
    /// The device implements VFIO migration v2, so its internal state can move with the VM.
    pub vfio_migration: bool,
    /// The device's VFIO migration v2 capabilities (`VFIO_DEVICE_FEATURE_MIGRATION`), e.g.
    /// `"STOP_COPY|P2P|PRE_COPY"`; `"none"` without migration v2 with STOP_COPY.
    #[serde(default)]
    pub vfio_migration_caps: String,
}

/// One device of the VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Stable id, as used in migration state (e.g. `"serial0"`, `"vfio0"`).
    pub id: String,
    /// Device model, e.g. `"serial"`, `"i8042"`, `"rtc"`, `"vfio-pci"`.
    pub kind: String,
    /// Host side of the device, e.g. a VFIO sysfs path or `"stdout"`.
    #[serde(default)]
    pub backend: Option<String>,
    /// Set for DMA-capable passthrough devices only.
    #[serde(default)]
    pub iommu: Option<IommuCapabilities>,
    /// How migration tracks the device's DMA writes; set for DMA-capable devices only.
    #[serde(default)]
    pub dma_dirty: Option<DmaDirtyInfo>,
    /// The DMA space (IOMMU domain) the device is in and which devices share it.
    #[serde(default)]
    pub dma_domain: Option<DmaDomain>,
}

/// A device's DMA space: the VM's type1 container, or a HWPT on the VM's iommufd IOAS. Devices
/// in one space share one mapping (and pinning) of guest RAM; devices on one HWPT share its dirty
/// bitmap, which migration reads once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaDomain {
    /// `"type1"` or `"iommufd"`.
    pub backend: String,
    /// The IOAS object id (iommufd only).
    #[serde(default)]
    pub ioas: Option<u32>,
    /// The HWPT object id (iommufd only).
    #[serde(default)]
    pub hwpt: Option<u32>,
    /// The HWPT was allocated with IOMMU dirty tracking.
    #[serde(default)]
    pub dirty_tracking: bool,
    /// Every device in this container or on this HWPT, this one included.
    #[serde(default)]
    pub devices: Vec<String>,
}

/// The DMA dirty-tracking method chosen for a device, from what the kernel reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaDirtyInfo {
    /// `iommufd` (IOMMU HWPT dirty tracking), `dma-logging`, `type1`, or `none`.
    pub method: String,
    /// Migration can proceed as far as DMA tracking goes.
    pub migratable: bool,
    /// Why this method, or what is missing.
    pub reason: String,
}

/// Answer to `GET vm.info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub config: VmConfigInfo,
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
}

/// What to do when a migration has not converged within `timeout_s`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutStrategy {
    /// Give up: the source VM keeps running, the migration ends `cancelled`.
    #[default]
    Cancel,
    /// Switch over anyway, accepting a longer downtime than `downtime_ms`.
    Ignore,
}

impl TimeoutStrategy {
    /// Every strategy, in declaration order (used by the spec test).
    pub const ALL: [TimeoutStrategy; 2] = [TimeoutStrategy::Cancel, TimeoutStrategy::Ignore];
}

/// Smallest and largest accepted `connections`.
pub const CONNECTIONS_RANGE: std::ops::RangeInclusive<u32> = 1..=16;
/// Default `downtime_ms` of `vm.send-migration`.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Default `timeout_s` of `vm.send-migration`.
pub const DEFAULT_TIMEOUT_S: u64 = 3600;

/// Why a syntactically valid `vm.send-migration` body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendMigrationDataError {
    #[error("connections is {connections}: use 1 to 16 parallel streams")]
    ConnectionsOutOfRange { connections: u32 },
    #[error("downtime_ms is 0: give the longest acceptable pause in milliseconds, e.g. 300")]
    ZeroDowntime,
    #[error("timeout_s is 0: give the migration's time budget in seconds, e.g. 3600")]
    ZeroTimeout,
    #[error(
        "local migration needs a unix: destination url to pass memory file descriptors, not {url}"
    )]
    LocalNeedsUnix { url: String },
    #[error("tls_dir needs a tcp: destination url, not {url}")]
    TlsNeedsTcp { url: String },
}

/// Body of `PUT vm.send-migration`. The migration starts in the background; the call returns at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SendMigrationFields")]
pub struct VmSendMigrationData {
    /// `tcp:HOST:PORT` or `unix:PATH` of a destination that called `vm.receive-migration`.
    pub destination_url: MigrationUrl,
    /// Same-host migration: guest memory is handed over as file descriptors, not copied.
    pub local: bool,
    /// Longest acceptable pause of the guest at switch-over, in milliseconds.
    pub downtime_ms: u64,
    /// Time budget of the whole migration, in seconds; see `timeout_strategy`.
    pub timeout_s: u64,
    pub timeout_strategy: TimeoutStrategy,
    /// Bandwidth cap in megabits (10^6 bits) per second; 0 means unlimited.
    pub max_bandwidth_mbps: u64,
    /// Parallel streams for memory pages (1..=16).
    pub connections: u32,
    /// Throttle the vCPUs step by step when the guest dirties memory faster than the link sends it.
    pub auto_converge: bool,
    /// Mutual TLS: a directory with `ca-cert.pem`, `client-cert.pem` and `client-key.pem`; the
    /// destination's certificate must name the URL's host (Cloud Hypervisor's field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<std::path::PathBuf>,
}

/// The wire shape of [`VmSendMigrationData`]: serde fills defaults and rejects unknown fields here,
/// then `TryFrom` checks the values that serde cannot.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendMigrationFields {
    destination_url: MigrationUrl,
    #[serde(default)]
    local: bool,
    #[serde(default = "default_downtime_ms")]
    downtime_ms: u64,
    #[serde(default = "default_timeout_s")]
    timeout_s: u64,
    #[serde(default)]
    timeout_strategy: TimeoutStrategy,
    #[serde(default)]
    max_bandwidth_mbps: u64,
    #[serde(default = "default_connections")]
    connections: u32,
    #[serde(default)]
    auto_converge: bool,
    #[serde(default)]
    tls_dir: Option<std::path::PathBuf>,
}

fn default_downtime_ms() -> u64 {
    DEFAULT_DOWNTIME_MS
}

fn default_timeout_s() -> u64 {
    DEFAULT_TIMEOUT_S
}

fn default_connections() -> u32 {
    *CONNECTIONS_RANGE.start()
}

impl TryFrom<SendMigrationFields> for VmSendMigrationData {
    type Error = SendMigrationDataError;

    fn try_from(f: SendMigrationFields) -> Result<Self, Self::Error> {
        let data = VmSendMigrationData {
            destination_url: f.destination_url,
            local: f.local,
            downtime_ms: f.downtime_ms,
            timeout_s: f.timeout_s,
            timeout_strategy: f.timeout_strategy,
            max_bandwidth_mbps: f.max_bandwidth_mbps,
            connections: f.connections,
            auto_converge: f.auto_converge,
            tls_dir: f.tls_dir,
        };
        data.validate()?;
        Ok(data)
    }
}

impl VmSendMigrationData {
    /// A request to `destination_url` with every other field at its default.
    pub fn new(destination_url: MigrationUrl) -> Self {
        VmSendMigrationData {
            destination_url,
            local: false,
            downtime_ms: DEFAULT_DOWNTIME_MS,
            timeout_s: DEFAULT_TIMEOUT_S,
            timeout_strategy: TimeoutStrategy::default(),
            max_bandwidth_mbps: 0,
            connections: default_connections(),
            auto_converge: false,
            tls_dir: None,
        }
    }

    /// Checks the rules that types alone do not express. Parsing runs this; call it again after
    /// building a request by hand.
    pub fn validate(&self) -> Result<(), SendMigrationDataError> {
        if !CONNECTIONS_RANGE.contains(&self.connections) {
            return Err(SendMigrationDataError::ConnectionsOutOfRange {
                connections: self.connections,
            });
        }
        if self.downtime_ms == 0 {
            return Err(SendMigrationDataError::ZeroDowntime);
        }
        if self.timeout_s == 0 {
            return Err(SendMigrationDataError::ZeroTimeout);
        }
        if self.local && !self.destination_url.is_unix() {
            return Err(SendMigrationDataError::LocalNeedsUnix {
                url: self.destination_url.to_string(),
            });
        }
        if self.tls_dir.is_some() && self.destination_url.is_unix() {
            return Err(SendMigrationDataError::TlsNeedsTcp {
                url: self.destination_url.to_string(),
            });
        }
        Ok(())
    }

    /// The bandwidth cap in bytes per second, `None` when unlimited.
    pub fn max_bandwidth_bytes_per_s(&self) -> Option<u64> {
        (self.max_bandwidth_mbps != 0)
            .then(|| self.max_bandwidth_mbps.saturating_mul(1_000_000 / 8))
    }
}

/// Body of `PUT vm.receive-migration`. Returns once the destination listens on `receiver_url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ReceiveMigrationFields")]
pub struct VmReceiveMigrationData {
    /// `tcp:HOST:PORT` or `unix:PATH` to listen on for the incoming migration.
    pub receiver_url: MigrationUrl,
    /// This host's device for each source passthrough device, by the source's id. A source
    /// device not listed is opened at the source's path.
    pub devices: Vec<DeviceMapping>,
    /// Mutual TLS: a directory with `ca-cert.pem`, `server-cert.pem` and `server-key.pem`; only
    /// sources whose client certificate the CA signed are accepted (Cloud Hypervisor's field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<std::path::PathBuf>,
}

/// One source passthrough device mapped to a device of this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMapping {
    /// The device's id on the source (`--device id=`).
    pub id: String,
    /// This host's device: `/sys/bus/pci/devices/BDF` or `/sys/bus/mdev/devices/UUID`.
    pub path: std::path::PathBuf,
}

/// Why a syntactically valid `vm.receive-migration` body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveMigrationDataError {
    #[error("devices maps id {id} twice: give each source device one local path")]
    DuplicateDevice { id: String },
    #[error("devices has an entry with an empty id: name the source's device id")]
    EmptyId,
    #[error(
        "devices maps {id} to {path}, which is not an absolute path: give its sysfs directory"
    )]
    RelativePath { id: String, path: String },
    #[error("tls_dir needs a tcp: receiver url, not {url}")]
    TlsNeedsTcp { url: String },
}

/// The wire shape of [`VmReceiveMigrationData`] (see [`SendMigrationFields`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiveMigrationFields {
    receiver_url: MigrationUrl,
    #[serde(default)]
    devices: Vec<DeviceMapping>,
    #[serde(default)]
    tls_dir: Option<std::path::PathBuf>,
}

impl TryFrom<ReceiveMigrationFields> for VmReceiveMigrationData {
    type Error = ReceiveMigrationDataError;

    fn try_from(f: ReceiveMigrationFields) -> Result<Self, Self::Error> {
        let data = VmReceiveMigrationData {
            receiver_url: f.receiver_url,
            devices: f.devices,
            tls_dir: f.tls_dir,
        };
        data.validate()?;
        Ok(data)
    }
}

impl VmReceiveMigrationData {
    /// Listen on `receiver_url`; every device at the source's path.
    pub fn new(receiver_url: MigrationUrl) -> Self {
        VmReceiveMigrationData {
            receiver_url,
            devices: Vec::new(),
            tls_dir: None,
        }
    }

    /// Checks the rules that types alone do not express. Parsing runs this; call it again after
    /// building a request by hand.
    pub fn validate(&self) -> Result<(), ReceiveMigrationDataError> {
        for (i, d) in self.devices.iter().enumerate() {
            if d.id.is_empty() {
                return Err(ReceiveMigrationDataError::EmptyId);
            }
            if !d.path.is_absolute() {
                return Err(ReceiveMigrationDataError::RelativePath {
                    id: d.id.clone(),
                    path: d.path.display().to_string(),
                });
            }
            if self.devices[..i].iter().any(|o| o.id == d.id) {
                return Err(ReceiveMigrationDataError::DuplicateDevice { id: d.id.clone() });
            }
        }
        if self.tls_dir.is_some() && self.receiver_url.is_unix() {
            return Err(ReceiveMigrationDataError::TlsNeedsTcp {
                url: self.receiver_url.to_string(),
            });
        }
        Ok(())
    }
}

/// Phase of the current (or last) migration of this VMM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// No migration has run in this VMM.
    #[default]
    None,
    /// Connecting, exchanging the config, starting dirty tracking.
    Setup,
    /// Pre-copy iterations while the guest runs.
    Active,
    /// The guest is paused; the last pages and the device state are moving.
    Completing,
    Completed,
    /// Ended by an error; `error` says why. The source VM keeps running.
    Failed,
    /// Ended by `vm.migration-cancel` or by `timeout_strategy: cancel`. The source VM keeps running.
    Cancelled,
    /// The link died at the switchover's one undecidable point (between the destination's ready
    /// and the source's commit, or the commit's ack): this side cannot know whether the other
    /// runs the VM, so its VM stays paused. The operator, who can see both sides, resumes it on
    /// one side (`vm.resume`) and shuts the other down.
    InDoubt,
}

impl MigrationState {
    /// Every state, in declaration order (used by the spec test).
    pub const ALL: [MigrationState; 8] = [
        MigrationState::None,
        MigrationState::Setup,
        MigrationState::Active,
        MigrationState::Completing,
        MigrationState::Completed,
        MigrationState::Failed,
        MigrationState::Cancelled,
        MigrationState::InDoubt,
    ];

    /// True once the migration can no longer change: completed, failed, cancelled or in doubt.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            MigrationState::Completed
                | MigrationState::Failed
                | MigrationState::Cancelled
                | MigrationState::InDoubt
        )
    }

    /// True while a migration is in flight (a second one would conflict).
    pub fn is_running(self) -> bool {
        matches!(
            self,
            MigrationState::Setup | MigrationState::Active | MigrationState::Completing
        )
    }
}

/// Dirty pages reported by each tracking source since the migration started. A page reported by
/// two sources counts for both here, but is sent once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyPagesBySource {
    /// KVM dirty log or dirty ring: vCPU writes.
    pub kvm: u64,
    /// Writes by the VMM's device emulation.
    pub vmm: u64,
    /// DMA by passthrough devices (IOMMU dirty tracking or device DMA logging).
    pub dma: u64,
}

/// Which pass over guest memory a [`MigrationIteration`] describes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPass {
    /// Iteration 0: every page of guest memory (never-written pages as zero markers).
    #[default]
    Full,
    /// A pre-copy iteration: the pages dirtied since they were last sent, guest running.
    Dirty,
    /// The switch-over pass, with vCPUs and devices stopped.
    Final,
}

impl MigrationPass {
    /// Every pass, in declaration order (used by the spec test).
    pub const ALL: [MigrationPass; 3] = [
        MigrationPass::Full,
        MigrationPass::Dirty,
        MigrationPass::Final,
    ];
}

/// One finished pass over guest memory, as `MigrationStatus::iterations` lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MigrationIteration {
    /// Iteration number (0 = the full pass).
    pub iteration: u64,
    pub pass: MigrationPass,
    /// Pages sent (data and zero markers), each once however many sources reported it.
    pub pages_sent: u64,
    /// Bytes put on the wire during the pass.
    pub bytes_sent: u64,
    /// Wall time of the pass.
    pub duration_ms: u64,
    /// Dirty pages claimed from each source during the pass (a page two sources reported counts
    /// for both).
    pub dirty_pages_by_source: DirtyPagesBySource,
    /// DMA dirty pages claimed during the pass, per DMA tracking domain; the key names the domain
    /// and its devices, e.g. `"hwpt 3: edu0"`.
    pub dma_pages_by_device: BTreeMap<String, u64>,
    /// Downtime estimated before the pass (0 for the full and final passes).
    pub expected_downtime_ms: u64,
    /// Bandwidth that estimate used.
    pub bandwidth_bytes_per_s: u64,
    /// vCPU throttle auto-converge had applied at the end of the pass, in percent.
    pub cpu_throttle_percent: u8,
}

/// Answer to `GET vm.migration`: progress and, once terminal, the result of the migration.
///
/// The engine keeps its counters in atomics and snapshots them into this struct; every counter is
/// cumulative since `setup` began, except the rates and `remaining_bytes`, which are current values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MigrationStatus {
    pub status: MigrationState,
    /// Pre-copy iteration in progress (1-based; 0 during setup).
    pub iteration: u64,
    /// Guest memory size being migrated.
    pub total_bytes: u64,
    /// Bytes of guest memory sent so far (all iterations, all connections).
    pub transferred_bytes: u64,
    /// Dirty bytes still to send as of the latest harvest.
    pub remaining_bytes: u64,
    /// Measured send rate over the last iteration.
    pub bandwidth_bytes_per_s: u64,
    /// Rate at which the guest and devices dirty pages, all sources united.
    pub dirty_pages_per_s: u64,
    pub dirty_pages_by_source: DirtyPagesBySource,
    /// DMA dirty pages per DMA tracking domain since the migration started; the key names the
    /// domain and its devices, e.g. `"hwpt 3: edu0"`. Empty without passthrough devices.
    pub dma_pages_by_device: BTreeMap<String, u64>,
    /// One entry per finished pass over guest memory, oldest first (the engine keeps the last
    /// 1024).
    pub iterations: Vec<MigrationIteration>,
    /// Downtime if the VM were paused now: remaining bytes and state size over the bandwidth.
    pub expected_downtime_ms: u64,
    /// vCPU throttle applied by auto-converge, in percent (0 when off).
    pub cpu_throttle_percent: u8,
    /// The downtime the source switches over under (source side only).
    pub downtime_limit_ms: Option<u64>,
    /// Guest pause measured at switch-over (set when `completed`).
    pub downtime_ms: Option<u64>,
    /// From the start of `setup` to the end (set once terminal).
    pub total_time_ms: Option<u64>,
    /// Time spent in `setup` (set once `active` began).
    pub setup_time_ms: Option<u64>,
    /// Why the migration failed or was cancelled, including the peer's reason when it sent one.
    pub error: Option<String>,
    /// Devices whose own state migrates (VFIO migration v2), source side.
    pub devices: Vec<DeviceMigrationStatus>,
}

/// One device's state migration (VFIO migration v2).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceMigrationStatus {
    pub id: String,
    /// Device state bytes sent while the guest ran (PRE_COPY).
    pub precopy_bytes: u64,
    /// Device state bytes sent after the device stopped (STOP_COPY), during the downtime.
    pub stop_copy_bytes: u64,
    /// Time in the device's STOP_COPY arc and the reads of its final state, in microseconds.
    pub stop_copy_us: u64,
    /// The destination acknowledged loading the device's initial data (switchover-ack).
    pub initial_data_acked: bool,
    /// The switchover went through the P2P states (several devices).
    pub p2p: bool,
    /// The device was reset to get it back to RUNNING after a failed migration.
    pub reset: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_send(v: serde_json::Value) -> Result<VmSendMigrationData, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn tls_dir_is_parsed_and_needs_tcp() {
        let d = parse_send(json!({"destination_url": "tcp:10.0.0.2:6000", "tls_dir": "/etc/t"}))
            .expect("valid");
        assert_eq!(d.tls_dir.as_deref(), Some(std::path::Path::new("/etc/t")));
        let e = parse_send(json!({"destination_url": "unix:/s", "tls_dir": "/etc/t"}))
            .expect_err("tls over unix");
        assert!(e.contains("tls_dir needs a tcp:"), "{e}");
        let r: VmReceiveMigrationData =
            serde_json::from_value(json!({"receiver_url": "tcp:0.0.0.0:6000", "tls_dir": "/t"}))
                .expect("valid");
        assert_eq!(r.tls_dir.as_deref(), Some(std::path::Path::new("/t")));
        assert!(serde_json::from_value::<VmReceiveMigrationData>(
            json!({"receiver_url": "unix:/s", "tls_dir": "/t"})
        )
        .is_err());
        // Absent stays absent on the wire.
        let plain = serde_json::to_value(VmSendMigrationData::new(d.destination_url)).unwrap();
        assert!(plain.get("tls_dir").is_none());
    }

    #[test]
    fn send_migration_fills_defaults() {
        let data = parse_send(json!({"destination_url": "tcp:10.0.0.1:6000"})).unwrap();
        assert_eq!(
            data,
            VmSendMigrationData::new(MigrationUrl::Tcp {
                host: "10.0.0.1".into(),
                port: 6000
            })
        );
        assert_eq!(data.downtime_ms, 300);
        assert_eq!(data.timeout_s, 3600);
        assert_eq!(data.connections, 1);
        assert_eq!(data.timeout_strategy, TimeoutStrategy::Cancel);
        assert_eq!(data.max_bandwidth_bytes_per_s(), None);
    }

    #[test]
    fn send_migration_round_trips_every_field() {
        let mut data = VmSendMigrationData::new("unix:/x".parse().unwrap());
        data.local = true;
        data.downtime_ms = 5;
        data.timeout_s = 9;
        data.timeout_strategy = TimeoutStrategy::Ignore;
        data.max_bandwidth_mbps = 800;
        data.connections = 16;
        data.auto_converge = true;
        let text = serde_json::to_string(&data).unwrap();
        assert_eq!(
            serde_json::from_str::<VmSendMigrationData>(&text).unwrap(),
            data
        );
        assert_eq!(data.max_bandwidth_bytes_per_s(), Some(100_000_000));
    }

    #[test]
    fn send_migration_rejects_bad_values_with_named_field() {
        let cases = [
            (
                json!({"destination_url": "tcp:h:1", "connections": 0}),
                "connections is 0",
            ),
            (
                json!({"destination_url": "tcp:h:1", "connections": 17}),
                "connections is 17",
            ),
            (
                json!({"destination_url": "tcp:h:1", "downtime_ms": 0}),
                "downtime_ms is 0",
            ),
            (
                json!({"destination_url": "tcp:h:1", "timeout_s": 0}),
                "timeout_s is 0",
            ),
            (
                json!({"destination_url": "tcp:h:1", "local": true}),
                "local migration needs a unix:",
            ),
            (
                json!({"destination_url": "tcp:h:1", "speed": 1}),
                "unknown field `speed`",
            ),
            (json!({"local": true}), "missing field `destination_url`"),
            (json!({"destination_url": 5}), "invalid type"),
            (json!({"destination_url": "ftp:h:1"}), "unknown scheme"),
            (
                json!({"destination_url": "tcp:h:1", "timeout_strategy": "retry"}),
                "unknown variant `retry`",
            ),
            (
                json!({"destination_url": "tcp:h:1", "downtime_ms": -1}),
                "invalid value",
            ),
        ];
        for (body, want) in cases {
            let err = parse_send(body.clone()).unwrap_err();
            assert!(err.contains(want), "{body}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn receive_migration_rejects_unknown_fields_and_bad_urls() {
        let ok: VmReceiveMigrationData =
            serde_json::from_value(json!({"receiver_url": "unix:/r"})).unwrap();
        assert!(ok.receiver_url.is_unix());
        let err = serde_json::from_value::<VmReceiveMigrationData>(
            json!({"receiver_url": "unix:/r", "local": true}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `local`"), "{err}");
        let err =
            serde_json::from_value::<VmReceiveMigrationData>(json!({"receiver_url": "tcp:h"}))
                .unwrap_err();
        assert!(err.to_string().contains("has no port"), "{err}");
    }

    #[test]
    fn receive_migration_device_mappings_are_checked() {
        let parse = |devices: serde_json::Value| {
            serde_json::from_value::<VmReceiveMigrationData>(
                json!({"receiver_url": "unix:/r", "devices": devices}),
            )
            .map_err(|e| e.to_string())
        };
        let ok = parse(json!([
            {"id": "mtty0", "path": "/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1002"},
            {"id": "nic0", "path": "/sys/bus/pci/devices/0000:00:04.0"}
        ]))
        .unwrap();
        assert_eq!(ok.devices.len(), 2);
        assert_eq!(ok.devices[0].id, "mtty0");
        assert!(parse(json!([])).unwrap().devices.is_empty());
        let cases = [
            (
                json!([{"id": "a", "path": "/x"}, {"id": "a", "path": "/y"}]),
                "maps id a twice",
            ),
            (json!([{"id": "", "path": "/x"}]), "empty id"),
            (json!([{"id": "a", "path": "x"}]), "not an absolute path"),
            (json!([{"id": "a"}]), "missing field `path`"),
            (
                json!([{"id": "a", "path": "/x", "bdf": 1}]),
                "unknown field `bdf`",
            ),
        ];
        for (devices, want) in cases {
            let err = parse(devices.clone()).unwrap_err();
            assert!(err.contains(want), "{devices}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn migration_state_names_are_snake_case_and_classified() {
        let names: Vec<String> = MigrationState::ALL
            .iter()
            .map(|s| {
                serde_json::to_value(s)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "none",
                "setup",
                "active",
                "completing",
                "completed",
                "failed",
                "cancelled",
                "in_doubt"
            ]
        );
        let terminal: Vec<_> = MigrationState::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal.len(), 4);
        assert!(MigrationState::ALL
            .iter()
            .all(|s| !(s.is_terminal() && s.is_running())));
    }

    #[test]
    fn migration_status_parses_partial_objects() {
        // Older or newer engines may omit fields; a client must still read the rest.
        let s: MigrationStatus =
            serde_json::from_value(json!({"status": "active", "iteration": 3})).unwrap();
        assert_eq!(s.status, MigrationState::Active);
        assert_eq!(s.iteration, 3);
        assert_eq!(s.downtime_ms, None);
        assert!(s.dma_pages_by_device.is_empty() && s.iterations.is_empty());
        let s: MigrationStatus = serde_json::from_value(json!({
            "status": "completed",
            "dma_pages_by_device": {"hwpt 3: edu0": 12},
            "iterations": [{"iteration": 2, "pass": "final", "pages_sent": 40}],
        }))
        .unwrap();
        assert_eq!(s.dma_pages_by_device["hwpt 3: edu0"], 12);
        assert_eq!(s.iterations[0].pass, MigrationPass::Final);
        assert_eq!(s.iterations[0].pages_sent, 40);
        assert_eq!(
            s.iterations[0].dirty_pages_by_source,
            DirtyPagesBySource::default()
        );
    }

    #[test]
    fn migration_pass_names_are_snake_case() {
        let names: Vec<_> = MigrationPass::ALL
            .iter()
            .map(|p| serde_json::to_value(p).unwrap())
            .collect();
        assert_eq!(names, [json!("full"), json!("dirty"), json!("final")]);
    }
}
