//! What the engine needs from a VM: the source side ([`MigrationHost`]) and the destination side
//! ([`MigrationTargetFactory`] builds a [`MigrationTarget`] from the source's config bytes).
//!
//! No method has a default body except the device-state and live-update ones (a VM without
//! migratable devices has none) and the switchover step times (a VMM may time nothing): a VMM
//! that cannot do something returns a [`HostError`] that says what and why.

use std::fs::File;
use std::os::fd::OwnedFd;

use crate::dirty::GuestPageBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::device::{DeviceStateSink, DeviceStateSource};
use super::steps::TimedStep;
use crate::dirty::{DirtyBitmap, DirtySource, GpaRange};

/// Boxed cause from the VMM.
pub type HostCause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A VMM operation failed.
#[derive(Debug, thiserror::Error)]
#[error("vm {operation}")]
pub struct HostError {
    /// The operation, e.g. "pause", "save state", "build from config".
    pub operation: &'static str,
    /// Why.
    #[source]
    pub source: HostCause,
}

impl HostError {
    /// Wrap any error as the failure of `operation`.
    pub fn new(operation: &'static str, source: impl Into<HostCause>) -> Self {
        HostError {
            operation,
            source: source.into(),
        }
    }
}

/// Everything the VM needs restored on the destination, as opaque bytes produced by the VMM (one
/// serde encoding, no JSON-in-JSON). Each blob travels in its own frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationState {
    /// VM-wide state (irqchip, clock, …).
    pub vm: Vec<u8>,
    /// Per-vCPU state, by vCPU index.
    pub vcpus: Vec<(u32, Vec<u8>)>,
    /// Per-device state, by device id.
    pub devices: Vec<(String, Vec<u8>)>,
}

impl MigrationState {
    /// Total bytes of all blobs.
    pub fn len_bytes(&self) -> u64 {
        let v: usize = self.vcpus.iter().map(|(_, b)| b.len()).sum();
        let d: usize = self.devices.iter().map(|(_, b)| b.len()).sum();
        (self.vm.len() + v + d) as u64
    }
}

/// One guest memory region handed over as a file (local mode).
#[derive(Debug)]
pub struct LocalRegion {
    /// Region base GPA.
    pub gpa: GuestAddress,
    /// Region length in bytes.
    pub len_bytes: u64,
    /// The memfd (or other shareable file) backing the region.
    pub file: File,
    /// Offset of the region in `file`.
    pub file_offset: u64,
}

/// One file descriptor a live update hands to the new process with the VM's devices (local
/// mode): what it is, as opaque VMM bytes, and the fd itself.
#[derive(Debug)]
pub struct HandoverFd {
    /// Opaque description from the source VMM (which device, which role).
    pub meta: Vec<u8>,
    /// The descriptor (a duplicate: the source keeps its own until the destination took over).
    pub fd: OwnedFd,
}

/// What a source hands over in local mode besides guest memory.
#[derive(Debug, Default)]
pub struct Handover {
    /// The descriptors, in the order they must arrive.
    pub fds: Vec<HandoverFd>,
    /// The ids of the devices handed over (for the stats).
    pub devices: Vec<String>,
    /// Per device: what happens to its DMA pinning accounting, if worth saying (for the stats).
    pub notes: Vec<(String, String)>,
}

/// The source VM, as the engine sees it. Called from the migration thread.
pub trait MigrationHost: Send {
    /// The guest memory. In local mode every region must be file backed (memfd, `MAP_SHARED`).
    fn guest_memory(&self) -> GuestMemoryMmap<GuestPageBitmap>;
    /// Opaque configuration bytes from which the destination builds an identical VM.
    fn config(&mut self) -> Result<Vec<u8>, HostError>;
    /// The dirty sources to union (KVM, VMM writes, DMA). Called once per migration; the engine
    /// starts and stops them.
    fn dirty_sources(&mut self) -> Result<Vec<Box<dyn DirtySource>>, HostError>;
    /// Mark in `out` every page of `range` that may hold non-zero data: resident *or swapped
    /// out*. Unmarked pages are sent as zero markers without being read (iteration 0 only), so a
    /// large, mostly untouched guest does not fault in every page. Use e.g. SEEK_DATA/SEEK_HOLE
    /// on a memfd or the present|swapped bits of /proc/self/pagemap; not mincore, which misses
    /// swapped-out pages. Return `Ok(false)` when unknown: every page is then read.
    fn populated(&mut self, range: GpaRange, out: &mut DirtyBitmap) -> Result<bool, HostError>;
    /// Stop every vCPU.
    fn pause(&mut self) -> Result<(), HostError>;
    /// Stop every device's DMA, after the vCPUs are paused and before the final claim: a device
    /// write after the last DMA-dirty read would otherwise be lost. For a VFIO device this is its
    /// move out of RUNNING.
    fn pause_devices(&mut self) -> Result<(), HostError>;
    /// Undo [`MigrationHost::pause_devices`] and [`MigrationHost::pause`] (devices first) after a
    /// failed or cancelled migration.
    fn resume(&mut self) -> Result<(), HostError>;
    /// Save vCPU, VM and device state; called while paused.
    fn save_state(&mut self) -> Result<MigrationState, HostError>;
    /// Auto-converge: let the vCPUs run only `100 - percent` % of the time (0 = unthrottled).
    fn throttle(&mut self, percent: u8) -> Result<(), HostError>;
    /// The devices whose own state migrates (VFIO migration v2). Called once per migration, before
    /// the dirty sources start; the engine drives them from then on.
    fn device_states(&mut self) -> Result<Vec<Box<dyn DeviceStateSource>>, HostError> {
        Ok(Vec::new())
    }
    /// Local mode: the descriptors of the devices that go to the new process as they are (live
    /// update), or the reason they cannot. Called once, before anything is sent.
    fn handover(&mut self) -> Result<Handover, HostError> {
        Ok(Handover::default())
    }
    /// Local mode, paused: let go of the handed devices so the destination can take them (type1:
    /// invalidate the DMA mappings' process addresses; interrupts stop reaching this VM). The
    /// descriptors stay open here.
    fn handover_release(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    /// Local mode: the destination failed before it took over; take the devices back (the VM
    /// then resumes).
    fn handover_reclaim(&mut self) -> Result<(), HostError> {
        Ok(())
    }
    /// Local mode: the destination runs the VM with the devices; never tear them down here (no
    /// unmap, no interrupt change, no detach), only close this side's descriptors.
    fn handover_done(&mut self) {}
    /// Called once, right after the config went out: work this side only needs done before its
    /// pause, done while the destination builds its VM rather than before the config goes out.
    /// The VMM logs its own failures here.
    fn prepare_switchover(&mut self) {}
    /// The VMM's own steps inside the last switchover's pause, device pause, handover release
    /// and state save (e.g. per KVM ioctl group), in the order they ran; taken once, for the
    /// stats' `switchover_steps`.
    fn switchover_steps(&mut self) -> Vec<TimedStep> {
        Vec::new()
    }
}

/// The destination VM being filled.
pub trait MigrationTarget: Send {
    /// The guest memory. Outside local mode it must be zero-filled when created: zero pages the
    /// source never populated are not written.
    fn guest_memory(&self) -> GuestMemoryMmap<GuestPageBitmap>;
    /// Restore vCPU, VM and device state (after all memory has arrived).
    fn restore_state(&mut self, state: MigrationState) -> Result<(), HostError>;
    /// Start running the guest. The source is told to finish only after this succeeds.
    fn start(&mut self) -> Result<(), HostError>;
    /// The devices that take a source device's state, by the source's ids. Called once, right
    /// after the VM is built; the engine drives them from then on.
    fn device_sinks(&mut self) -> Result<Vec<Box<dyn DeviceStateSink>>, HostError> {
        Ok(Vec::new())
    }
    /// The VMM's own steps inside the last [`MigrationTarget::restore_state`] or
    /// [`MigrationTarget::start`] (e.g. per KVM ioctl group), in the order they ran; taken once
    /// after each, for the stats' `switchover_steps`.
    fn switchover_steps(&mut self) -> Vec<TimedStep> {
        Vec::new()
    }
}

/// Builds the destination VM.
pub trait MigrationTargetFactory {
    /// Local mode (live update): the devices' descriptors the source handed over, before
    /// [`MigrationTargetFactory::create`]. A factory that cannot take devices refuses them.
    fn inherit(&mut self, fds: Vec<HandoverFd>) -> Result<(), HostError> {
        if fds.is_empty() {
            return Ok(());
        }
        Err(HostError::new(
            "inherit devices",
            "this destination cannot take devices handed over",
        ))
    }

    /// Local mode: one of the source's memory regions arrived (they come before the config). A
    /// factory may map it now (the config waits in the socket); `create` gets every region
    /// again. Its steps are taken with [`MigrationTargetFactory::setup_steps`] right after. A
    /// failure here is reported at once (the source has not paused).
    fn local_memory(&mut self, region: &LocalRegion) -> Result<(), HostError> {
        let _ = region;
        Ok(())
    }

    /// Build a VM from the source's config bytes. `local` holds the source's memory regions in
    /// local mode (map them `MAP_SHARED`, do not copy) and is empty otherwise.
    fn create(
        &mut self,
        config: &[u8],
        local: Vec<LocalRegion>,
    ) -> Result<Box<dyn MigrationTarget>, HostError>;

    /// The VMM's own steps inside the last [`MigrationTargetFactory::create`] (e.g. memory
    /// slots, vCPUs), in the order they ran; taken once, for the stats' `setup_steps`.
    fn setup_steps(&mut self) -> Vec<TimedStep> {
        Vec::new()
    }

    /// What the factory built alongside the receive (from before the source connected), step by
    /// step; taken once after `create`, for the stats' `setup_steps` (it overlaps the others).
    fn prebuilt_steps(&mut self) -> Vec<TimedStep> {
        Vec::new()
    }
}
