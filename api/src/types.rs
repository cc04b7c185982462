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
pub use crate::vm_config::{
    ConsoleMode, CpusInfo, DemoPayloadInfo, DeviceConfigInfo, MemoryInfo, PayloadInfo, SerialInfo,
    VmConfigInfo,
};

/// Answer to `GET vmm.ping`, in Cloud Hypervisor's `VmmPingResponse` shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    /// The build (CH: its `git describe`; tern: its version, or `TERN_BUILD_VERSION` at build
    /// time). Older tern servers did not send it.
    #[serde(default)]
    pub build_version: String,
    /// tern's version (`CARGO_PKG_VERSION` of the VMM).
    pub version: String,
    /// Process id of the VMM, so tools can tell a restarted VMM from the one they talked to.
    pub pid: u32,
    /// Optional capabilities of this build, e.g. `"dirty-ring"`, `"iommufd-dirty-tracking"`.
    #[serde(default)]
    pub features: Vec<String>,
}

/// Life-cycle state of the VM, as `vm.info` reports it, spelled as Cloud Hypervisor spells its
/// `VmState` (`Created`, `Running`, `Shutdown`, `Paused`; tern has no `BreakPoint`). The
/// lower-case names older tern servers sent are still read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Built (or received) but its vCPUs have not run yet.
    #[serde(alias = "created")]
    Created,
    #[serde(alias = "running")]
    Running,
    #[serde(alias = "paused")]
    Paused,
    /// The guest shut down or `vm.shutdown` was called; the VMM process may still be up.
    #[serde(alias = "shutdown")]
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

/// Answer to `GET vm.info`: Cloud Hypervisor's `VmInfo` (`state`, `config`, `memory_actual_size`)
/// plus tern's `devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    pub config: VmConfigInfo,
    /// Guest RAM in bytes (tern has no balloon or hotplug: the configured size).
    #[serde(default)]
    pub memory_actual_size: u64,
    /// Every device of the VM with what migration needs to know of it (tern's addition).
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
}

/// What to do when a migration has not converged within `timeout_s`. Spelled as Cloud Hypervisor
/// spells it (`Cancel`, `Ignore`); tern's earlier lower-case names are accepted too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeoutStrategy {
    /// Give up: the source VM keeps running, the migration ends `cancelled`.
    #[default]
    #[serde(alias = "cancel")]
    Cancel,
    /// Switch over anyway, accepting a longer downtime than `downtime_ms`.
    #[serde(alias = "ignore")]
    Ignore,
}

impl TimeoutStrategy {
    /// Every strategy, in declaration order (used by the spec test).
    pub const ALL: [TimeoutStrategy; 2] = [TimeoutStrategy::Cancel, TimeoutStrategy::Ignore];
}

/// How guest memory moves: Cloud Hypervisor's `MigrationMode`. `MemFDs` is tern's `local`
/// (memory handed over as file descriptors on a unix socket); `Precopy` copies it while the guest
/// runs. tern has no post-copy: `Postcopy` parses, and the request is refused naming the field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationMode {
    #[serde(alias = "memfds")]
    MemFDs,
    #[default]
    #[serde(alias = "precopy")]
    Precopy,
    #[serde(alias = "postcopy")]
    Postcopy,
}

impl MigrationMode {
    /// Every mode, in declaration order (used by the spec test).
    pub const ALL: [MigrationMode; 3] = [
        MigrationMode::MemFDs,
        MigrationMode::Precopy,
        MigrationMode::Postcopy,
    ];
}

/// Smallest and largest accepted `connections`.
pub const CONNECTIONS_RANGE: std::ops::RangeInclusive<u32> = 1..=128;
/// Default `downtime_ms` of `vm.send-migration`.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Default `timeout_s` of `vm.send-migration`.
pub const DEFAULT_TIMEOUT_S: u64 = 3600;

/// Why a syntactically valid `vm.send-migration` body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendMigrationDataError {
    #[error("connections is {connections}: use 1 to 128 parallel streams")]
    ConnectionsOutOfRange { connections: u32 },
    #[error(
        "memory_mode is Postcopy: tern migrates by pre-copy only; use \"Precopy\" (or \"MemFDs\" on one host)"
    )]
    PostcopyUnsupported,
    #[error(
        "preserve_source is true: tern does not keep a paused copy of a VM that migrated away (at most one copy of a VM exists); leave it false"
    )]
    PreserveSourceUnsupported,
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
    /// Parallel streams for memory pages (1..=128).
    pub connections: u32,
    /// Throttle the vCPUs step by step when the guest dirties memory faster than the link sends it.
    pub auto_converge: bool,
    /// Check every page end to end with a per-page sum (on by default; costs ~nothing: the sums
    /// are taken from copies the engine makes anyway).
    pub page_checksums: bool,
    /// Mutual TLS: a directory with `ca-cert.pem`, `client-cert.pem` and `client-key.pem`; the
    /// destination's certificate must name the URL's host (Cloud Hypervisor's field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<std::path::PathBuf>,
    /// `Precopy`, or `MemFDs` (the same as `local: true`; parsing sets both together).
    pub memory_mode: MigrationMode,
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
    #[serde(default = "default_page_checksums")]
    page_checksums: bool,
    #[serde(default)]
    tls_dir: Option<std::path::PathBuf>,
    #[serde(default)]
    memory_mode: MigrationMode,
    /// Cloud Hypervisor's "keep the source VM paused after it migrated": refused when true.
    #[serde(default)]
    preserve_source: bool,
}

fn default_downtime_ms() -> u64 {
    DEFAULT_DOWNTIME_MS
}

fn default_timeout_s() -> u64 {
    DEFAULT_TIMEOUT_S
}

fn default_page_checksums() -> bool {
    true
}

fn default_connections() -> u32 {
    *CONNECTIONS_RANGE.start()
}

impl TryFrom<SendMigrationFields> for VmSendMigrationData {
    type Error = SendMigrationDataError;

    fn try_from(f: SendMigrationFields) -> Result<Self, Self::Error> {
        if f.preserve_source {
            return Err(SendMigrationDataError::PreserveSourceUnsupported);
        }
        // CH: `local: true` is `memory_mode: "MemFDs"` (its deprecated spelling).
        let local = f.local || f.memory_mode == MigrationMode::MemFDs;
        let memory_mode = match f.memory_mode {
            MigrationMode::Postcopy => MigrationMode::Postcopy,
            _ if local => MigrationMode::MemFDs,
            _ => MigrationMode::Precopy,
        };
        let data = VmSendMigrationData {
            destination_url: f.destination_url,
            local,
            downtime_ms: f.downtime_ms,
            timeout_s: f.timeout_s,
            timeout_strategy: f.timeout_strategy,
            max_bandwidth_mbps: f.max_bandwidth_mbps,
            connections: f.connections,
            auto_converge: f.auto_converge,
            page_checksums: f.page_checksums,
            tls_dir: f.tls_dir,
            memory_mode,
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
            page_checksums: default_page_checksums(),
            tls_dir: None,
            memory_mode: MigrationMode::Precopy,
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
        if self.memory_mode == MigrationMode::Postcopy {
            return Err(SendMigrationDataError::PostcopyUnsupported);
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
    /// `Precopy` or `MemFDs`: the receiver takes whichever the source sends (tern's hello says
    /// which), so both mean the same here; `Postcopy` is refused.
    pub memory_mode: MigrationMode,
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
    #[error("memory_mode is Postcopy: tern receives by pre-copy only; use \"Precopy\"")]
    PostcopyUnsupported,
    #[error(
        "vfio_fds passes device file descriptors, which tern does not take over the API socket: give each device's sysfs path in devices: [{{\"id\", \"path\"}}]"
    )]
    VfioFdsUnsupported,
    #[error(
        "iommufd_fd passes a file descriptor, which tern does not take over the API socket: tern opens /dev/iommu itself"
    )]
    IommufdFdUnsupported,
    #[error(
        "zone_updates is not empty: tern has no memory zones or host NUMA placement to update"
    )]
    ZoneUpdatesUnsupported,
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
    #[serde(default)]
    memory_mode: MigrationMode,
    // Cloud Hypervisor's fields for what tern does not have: read so that their CH default (null
    // or empty, which current ch-remote sends) is accepted and anything else refused by name.
    #[serde(default)]
    vfio_fds: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    iommufd_fd: Option<serde_json::Value>,
    #[serde(default)]
    zone_updates: Vec<serde_json::Value>,
}

impl TryFrom<ReceiveMigrationFields> for VmReceiveMigrationData {
    type Error = ReceiveMigrationDataError;

    fn try_from(f: ReceiveMigrationFields) -> Result<Self, Self::Error> {
        if f.vfio_fds.is_some_and(|fds| !fds.is_empty()) {
            return Err(ReceiveMigrationDataError::VfioFdsUnsupported);
        }
        if f.iommufd_fd.is_some() {
            return Err(ReceiveMigrationDataError::IommufdFdUnsupported);
        }
        if !f.zone_updates.is_empty() {
            return Err(ReceiveMigrationDataError::ZoneUpdatesUnsupported);
        }
        let data = VmReceiveMigrationData {
            receiver_url: f.receiver_url,
            devices: f.devices,
            tls_dir: f.tls_dir,
            memory_mode: f.memory_mode,
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
            memory_mode: MigrationMode::Precopy,
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
        if self.memory_mode == MigrationMode::Postcopy {
            return Err(ReceiveMigrationDataError::PostcopyUnsupported);
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
    /// Downtime estimated before the pass: 0 for the full pass; for the final pass, the estimate
    /// that decided the switchover.
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
    /// Source: when its vCPUs were paused for the switchover, µs since the Unix epoch (wall
    /// clock: compare with the destination's `resumed_at_unix_us` on the same host).
    pub paused_at_unix_us: Option<u64>,
    /// Destination: when its vCPUs started running the guest, µs since the Unix epoch.
    pub resumed_at_unix_us: Option<u64>,
    /// From the start of `setup` to the end (set once terminal).
    pub total_time_ms: Option<u64>,
    /// Time spent in `setup` (set once `active` began).
    pub setup_time_ms: Option<u64>,
    /// Source: pages sent as data (all passes).
    pub data_pages: u64,
    /// Source: pages sent as zero markers (never read, or read and all zero).
    pub zero_pages: u64,
    /// Source: page data the kernel sent straight from the guest memory file (`sendfile` on a
    /// unix socket: no copy on the source), in bytes; the rest was copied from the mapping.
    pub sent_from_file_bytes: u64,
    /// Source: pages of the memory batches a lane's read-ahead thread prepared (zero check,
    /// sums) while the lane sent the batch before.
    pub read_ahead_pages: u64,
    /// Destination: guest memory the source said it has populated (sent ahead of the pages).
    pub populated_hint_bytes: u64,
    /// Destination: of that, bytes a helper faulted in ahead of their data; the receiving thread
    /// faulted in the rest itself.
    pub prefaulted_bytes: u64,
    /// Why the migration failed or was cancelled, including the peer's reason when it sent one.
    pub error: Option<String>,
    /// Devices whose own state migrates (VFIO migration v2), source side.
    pub devices: Vec<DeviceMigrationStatus>,
    /// Where the switchover's time went (source side, once completed).
    pub switchover: Option<SwitchoverTimes>,
    /// Where the setup went, step by step, once the destination acknowledged the config: on the
    /// source from the send request to that ack (what it waits for before it may pause); on the
    /// destination from the receive's start to its ack (waiting for the source, config, each part
    /// of the VM build); steps named "alongside: ..." ran on another thread meanwhile.
    pub setup_steps: Vec<TimedStep>,
    /// The switchover step by step, once completed, in the order the steps ran: on the source
    /// the VMM's steps inside `switchover`'s pause and state save; on the destination everything
    /// from the source's Complete to this side's ack, adding up to that time.
    pub switchover_steps: Vec<TimedStep>,
}

/// One timed step of a migration's setup or switchover.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TimedStep {
    /// What the step did, e.g. `"memory slots"` or `"vCPU sregs"`.
    pub name: String,
    /// Its wall time in µs (in a switchover, summed over every run, e.g. once per vCPU).
    pub us: u64,
}

/// The switchover's steps, source side, in µs from the pause to the destination's ack; they
/// follow each other, so they add up to about the downtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SwitchoverTimes {
    /// vCPUs paused, device DMA stopped, devices to STOP_COPY.
    pub pause_us: u64,
    /// The dirty sources' final sync (e.g. KVM_GET_DIRTY_LOG).
    pub final_sync_us: u64,
    /// The final pass's claims (KVM clear, DMA read-and-clear, VMM writes), summed.
    pub final_claim_us: u64,
    /// Chunks the final pass claimed: the dirty ones when every source can peek, else all.
    pub final_claimed_chunks: u64,
    /// The final pass and the devices' final state, claims included.
    pub final_pass_us: u64,
    /// vCPU, VM and device state saved.
    pub state_save_us: u64,
    /// State frames queued and every connection drained to the destination.
    pub send_us: u64,
    /// Complete to Ready: the destination restored memory, state and devices.
    pub destination_restore_us: u64,
    /// Commit to Ack: the destination started the VM.
    pub destination_start_us: u64,
    /// Pre-copy data still queued to send when the vCPUs paused (it would go out with the guest
    /// stopped): the source lets it drain before it pauses, so this is 0.
    pub queued_at_pause_bytes: u64,
}

impl SwitchoverTimes {
    /// The steps' sum in µs, the pause to the destination's ack: about the downtime, to the µs.
    pub fn total_us(&self) -> u64 {
        self.pause_us
            + self.final_pass_us
            + self.state_save_us
            + self.send_us
            + self.destination_restore_us
            + self.destination_start_us
    }
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
    /// Live update: the device went to the new process as it was (its descriptors, no state
    /// read, no reset).
    pub handed_over: bool,
    /// Live update: what became of the device's DMA pinning accounting.
    pub handover_note: Option<String>,
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
        data.connections = 128;
        data.auto_converge = true;
        data.memory_mode = MigrationMode::MemFDs;
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
                json!({"destination_url": "tcp:h:1", "connections": 129}),
                "connections is 129",
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

    /// The bodies current ch-remote sends: its `VmSendMigrationData` / `VmReceiveMigrationData`
    /// serialized whole (CH's `api_types`), every optional field at its CH default.
    #[test]
    fn cloud_hypervisor_bodies_are_accepted_with_their_meaning() {
        let send = parse_send(json!({
            "destination_url": "tcp:127.0.0.1:6000", "local": false, "preserve_source": false,
            "downtime_ms": 200, "timeout_s": 60, "timeout_strategy": "Ignore",
            "connections": 128, "tls_dir": null, "memory_mode": "Precopy"
        }))
        .expect("CH send body");
        assert_eq!(send.timeout_strategy, TimeoutStrategy::Ignore);
        assert_eq!(
            (send.downtime_ms, send.timeout_s, send.connections),
            (200, 60, 128)
        );
        assert!(!send.local && send.memory_mode == MigrationMode::Precopy);
        // MemFDs is CH's name for tern's local migration, and `local: true` CH's old spelling.
        for body in [
            json!({"destination_url": "unix:/m", "memory_mode": "MemFDs"}),
            json!({"destination_url": "unix:/m", "local": true}),
        ] {
            let d = parse_send(body).expect("memfds");
            assert!(d.local && d.memory_mode == MigrationMode::MemFDs);
        }
        let recv: VmReceiveMigrationData = serde_json::from_value(json!({
            "receiver_url": "tcp:0.0.0.0:6000", "tls_dir": null, "memory_mode": "Precopy",
            "vfio_fds": null, "iommufd_fd": null, "zone_updates": []
        }))
        .expect("CH receive body");
        assert_eq!(recv, VmReceiveMigrationData::new(recv.receiver_url.clone()));
        let recv: VmReceiveMigrationData =
            serde_json::from_value(json!({"receiver_url": "unix:/r", "vfio_fds": []})).unwrap();
        assert!(recv.devices.is_empty());
    }

    #[test]
    fn cloud_hypervisor_features_tern_lacks_are_refused_by_name() {
        let send = [
            (
                json!({"memory_mode": "Postcopy"}),
                "memory_mode is Postcopy",
            ),
            (json!({"preserve_source": true}), "preserve_source is true"),
            (
                json!({"memory_mode": "Sideways"}),
                "unknown variant `Sideways`",
            ),
        ];
        for (extra, want) in send {
            let mut body = json!({"destination_url": "unix:/m"});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let err = parse_send(body.clone()).unwrap_err();
            assert!(err.contains(want), "{body}: {err}");
        }
        let recv = [
            (
                json!({"memory_mode": "Postcopy"}),
                "memory_mode is Postcopy",
            ),
            (json!({"vfio_fds": [{"id": "v", "fd": 5}]}), "vfio_fds"),
            (json!({"iommufd_fd": 7}), "iommufd_fd"),
            (
                json!({"zone_updates": [{"id": "z", "host_numa_node": 0}]}),
                "zone_updates",
            ),
        ];
        for (extra, want) in recv {
            let mut body = json!({"receiver_url": "unix:/r"});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let err = serde_json::from_value::<VmReceiveMigrationData>(body.clone())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{body}: {err}");
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
