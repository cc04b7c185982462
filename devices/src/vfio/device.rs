//! A host PCI function passed through with VFIO, seen by the guest as a [`PciDevice`] on bus 0.
//!
//! ```text
//!  open:   preflight ─► type1: the VM's container ─► VfioDevice (group joins; the first one
//!                               sets type1 and maps RAM)
//!                     iommufd: the VM's IOAS (RAM mapped once) ─► VfioDevice (cdev bound)
//!                               ─► a shared compatible HWPT, or its own ─► attach
//!          (all guest RAM, IOVA = GPA) ─► reset (migration state not RUNNING: the
//!          checked VFIO_DEVICE_RESET) ─► read BARs/MSI/MSI-X from the VFIO regions
//!          ─► BARs and vectors from the VMM (PciResources) ─► emulated config space
//!  guest:  config reads ─► emulated space (IDs copied from the device, BARs and MSI/MSI-X emulated)
//!          command writes ─► also written to the device (memory/I/O decode, bus master)
//!          MSI/MSI-X enable ─► VFIO_DEVICE_SET_IRQS with the per-vector eventfds (KVM irqfds)
//!          BAR accesses ─► mmap-able parts: KVM memory slots, no exit ([`super::bar_map`])
//!                        ─► the rest: VFIO region read/write (trapped; MSI-X table and PBA emulated)
//!  drop:   delete BAR slots ─► disable MSI/MSI-X ─► leave the DMA space (the last type1 member
//!          unmaps) ─► close device ─► group leaves the container / the HWPT's last user destroys it
//! ```
//!
//! **Configuration space.** The guest sees a configuration space built by tern: the device's IDs,
//! class and subsystem, its BARs (sizes from VFIO region info, addresses from the VMM), and MSI and
//! MSI-X capabilities emulated with [`crate::pci::msi`] and [`crate::pci::msix`]. The device's other
//! capabilities (PCIe, power management, vendor-specific) are not shown yet, and it has no INTx.
//!
//! **Migration.** A device with VFIO migration v2 (STOP_COPY) hands out its own state through
//! [`VfioPciDevice::state_source`] / [`VfioPciDevice::state_sink`] (the engine drives them); what
//! tern emulates of it (configuration space, MSI-X table) is [`VfioPciState`], saved with the PCI
//! bus and loaded into the destination's function ([`VfioPciDevice::restore`]), whose BARs then
//! decode, and whose vectors fire, where the guest had them.
//!
//! **BARs.** The parts VFIO lets tern mmap (minus the MSI-X table and PBA pages) are KVM memory
//! slots that follow the BAR through [`PciDevice::move_bar`] ([`super::bar_map`]); every other
//! guest access is a `pread`/`pwrite` on the VFIO region.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tern_migration::engine::{DeviceStateSink, DeviceStateSource};
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioDevice, VfioError, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use super::bar_map::{direct_areas, BarMemory, DirectBars};
use super::container::{Type1Dma, Type1Error};
use super::dma_dirty::domain::DirtyDomain;
use super::dma_dirty::method::{
    select, DmaDirtyCaps, DmaDirtyMethod, DmaDirtySelection, MethodUnavailable,
};
use super::dma_dirty::MappedRange;
use super::dma_space::DmaSpaces;
use super::handover::{DeviceParts, DmaHandle, HandedDma, InheritedDevice};
use super::iommufd::{Hwpt, IommufdBackendError};
use super::migration::{
    DeviceMigration, DeviceMigrationError, MigState, MigrationCaps, VfioStateSink, VfioStateSource,
};
use super::preflight::{preflight, HostRoots, VfioPreflightError};
use super::spec::{VfioBackend, VfioDeviceSpec};
use crate::pci::bar::{BarError, BarKind, BarRegion, BarSpec};
use crate::pci::config::{ConfigSpace, ConfigSpaceState, PciIds};
use crate::pci::msi::{MsiCap, MsiCapError, MsiRouteSink};
use crate::pci::msix::{Msix, MsixError, MsixState};
use crate::pci::{MoveBarError, PciDevice, PciDeviceState, PciStateError};
use crate::sys::vfio_device_fd::DeviceFd;
use crate::sys::vfio_dma_logging_probe::supports_dma_logging;
use crate::sys::vfio_region_mmap::{page_size, RegionMapping};

/// A boxed error from the VMM's side of [`PciResources`].
pub type ResourceError = Box<dyn std::error::Error + Send + Sync>;

/// What a passthrough function needs from the VMM's PCI bus.
pub trait PciResources {
    /// A guest address for `spec` in the window of its kind.
    fn allocate_bar(&mut self, spec: &BarSpec) -> Result<u64, ResourceError>;
    /// `count` MSI/MSI-X vectors: the sink the capability emulation reports routes to, and one
    /// eventfd per vector that KVM turns into the programmed message.
    fn msi_vectors(
        &mut self,
        count: u16,
    ) -> Result<(Arc<dyn MsiRouteSink>, Vec<EventFd>), ResourceError>;
    /// Where mmap'ed BAR parts become guest memory; `None` keeps every BAR access trapped.
    fn bar_memory(&mut self) -> Option<Arc<dyn BarMemory>> {
        None
    }
}

/// What the emulation needs from the host function: vfio-ioctls' [`VfioDevice`] in tern, a fake
/// in the unit tests (so the config, BAR and MSI/MSI-X logic is tested without /dev/vfio).
pub trait VfioFunction: Send {
    /// Reads `buf.len()` bytes at `offset` of region `index`; leaves `buf` alone on failure.
    fn region_read(&self, index: u32, buf: &mut [u8], offset: u64);
    /// Writes `buf` at `offset` of region `index` (failures are logged by the implementation).
    fn region_write(&self, index: u32, buf: &[u8], offset: u64);
    /// Size of region `index` (0: absent).
    fn region_size(&self, index: u32) -> u64;
    /// Vectors of interrupt index `index` (0: none).
    fn irq_count(&self, index: u32) -> u32;
    /// VFIO_DEVICE_SET_IRQS: signal `fds` for the vectors of `index`.
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> Result<(), VfioError>;
    /// VFIO_DEVICE_SET_IRQS: stop signalling for `index`.
    fn disable_irq(&self, index: u32) -> Result<(), VfioError>;
    /// The `(offset, len)` parts of region `index` VFIO lets tern mmap (none by default).
    fn mmap_areas(&self, _index: u32) -> Vec<(u64, u64)> {
        Vec::new()
    }
    /// mmaps `len` bytes at `offset` of region `index`.
    fn mmap(&self, _index: u32, _offset: u64, _len: u64) -> std::io::Result<RegionMapping> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
    /// The device file's descriptor, which a live update hands on (`None` for fakes).
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// An inherited device file (live update): the same calls on the fd itself.
impl VfioFunction for DeviceFd {
    fn region_read(&self, index: u32, buf: &mut [u8], offset: u64) {
        self.read(index, buf, offset)
    }
    fn region_write(&self, index: u32, buf: &[u8], offset: u64) {
        self.write(index, buf, offset)
    }
    fn region_size(&self, index: u32) -> u64 {
        self.region(index).size
    }
    fn irq_count(&self, index: u32) -> u32 {
        DeviceFd::irq_count(self, index)
    }
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> Result<(), VfioError> {
        let raw: Vec<RawFd> = fds.iter().map(|e| e.as_raw_fd()).collect();
        self.set_irqs(index, &raw).map_err(|e| {
            log::warn!("VFIO: {e}");
            VfioError::VfioDeviceEnableIrq
        })
    }
    fn disable_irq(&self, index: u32) -> Result<(), VfioError> {
        self.set_irqs(index, &[]).map_err(|e| {
            log::warn!("VFIO: {e}");
            VfioError::VfioDeviceDisableIrq
        })
    }
    fn mmap_areas(&self, index: u32) -> Vec<(u64, u64)> {
        // Sparse-mmap capabilities are not read: the whole region is tried, and a region the
        // kernel lets be mapped only in parts stays trapped (the mmap fails; slower, correct).
        let r = self.region(index);
        if r.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Vec::new();
        }
        vec![(0, r.size)]
    }
    fn mmap(&self, index: u32, offset: u64, len: u64) -> std::io::Result<RegionMapping> {
        RegionMapping::new(self, self.region(index).offset + offset, len)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// What a handed-over device's slot holds in the old process: nothing to call.
struct Released;

impl VfioFunction for Released {
    fn region_read(&self, _: u32, _: &mut [u8], _: u64) {}
    fn region_write(&self, _: u32, _: &[u8], _: u64) {}
    fn region_size(&self, _: u32) -> u64 {
        0
    }
    fn irq_count(&self, _: u32) -> u32 {
        0
    }
    fn enable_irq(&self, _: u32, _: &[&EventFd]) -> Result<(), VfioError> {
        Ok(())
    }
    fn disable_irq(&self, _: u32) -> Result<(), VfioError> {
        Ok(())
    }
}

impl VfioFunction for VfioDevice {
    fn region_read(&self, index: u32, buf: &mut [u8], offset: u64) {
        VfioDevice::region_read(self, index, buf, offset)
    }
    fn region_write(&self, index: u32, buf: &[u8], offset: u64) {
        VfioDevice::region_write(self, index, buf, offset)
    }
    fn region_size(&self, index: u32) -> u64 {
        self.get_region_size(index)
    }
    fn irq_count(&self, index: u32) -> u32 {
        self.get_irq_info(index).map_or(0, |i| i.count)
    }
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> Result<(), VfioError> {
        VfioDevice::enable_irq(self, index, fds.to_vec())
    }
    fn disable_irq(&self, index: u32) -> Result<(), VfioError> {
        VfioDevice::disable_irq(self, index)
    }
    fn mmap_areas(&self, index: u32) -> Vec<(u64, u64)> {
        if self.get_region_flags(index) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Vec::new();
        }
        // With a sparse-mmap capability only its areas may be mapped; without, the whole region.
        for cap in self.get_region_caps(index) {
            if let VfioRegionInfoCap::SparseMmap(s) = cap {
                return s.areas.iter().map(|a| (a.offset, a.size)).collect();
            }
        }
        vec![(0, self.get_region_size(index))]
    }
    fn mmap(&self, index: u32, offset: u64, len: u64) -> std::io::Result<RegionMapping> {
        // The mapping keeps its own reference to the device file, so it may outlive `self`.
        RegionMapping::new(self, self.get_region_offset(index) + offset, len)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// The device shared with its DMA-logging dirty source.
impl VfioFunction for Arc<VfioDevice> {
    fn region_read(&self, index: u32, buf: &mut [u8], offset: u64) {
        VfioFunction::region_read(&**self, index, buf, offset)
    }
    fn region_write(&self, index: u32, buf: &[u8], offset: u64) {
        VfioFunction::region_write(&**self, index, buf, offset)
    }
    fn region_size(&self, index: u32) -> u64 {
        VfioFunction::region_size(&**self, index)
    }
    fn irq_count(&self, index: u32) -> u32 {
        VfioFunction::irq_count(&**self, index)
    }
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> Result<(), VfioError> {
        VfioFunction::enable_irq(&**self, index, fds)
    }
    fn disable_irq(&self, index: u32) -> Result<(), VfioError> {
        VfioFunction::disable_irq(&**self, index)
    }
    fn mmap_areas(&self, index: u32) -> Vec<(u64, u64)> {
        VfioFunction::mmap_areas(&**self, index)
    }
    fn mmap(&self, index: u32, offset: u64, len: u64) -> std::io::Result<RegionMapping> {
        VfioFunction::mmap(&**self, index, offset, len)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        VfioFunction::raw_fd(&**self)
    }
}

/// Errors opening a passthrough device.
#[derive(Debug, thiserror::Error)]
pub enum VfioDeviceError {
    #[error("--device {id}")]
    Preflight {
        id: String,
        #[source]
        source: VfioPreflightError,
    },
    #[error("--device {id}: iommufd backend")]
    Iommufd {
        id: String,
        #[source]
        source: IommufdBackendError,
    },
    #[error("--device {id}")]
    Type1 {
        id: String,
        #[source]
        source: Type1Error,
    },
    #[error("--device {id}: DMA dirty tracking")]
    DirtyMethod {
        id: String,
        #[source]
        source: MethodUnavailable,
    },
    #[error("--device {id}: cannot open the VFIO device")]
    Open {
        id: String,
        #[source]
        source: VfioError,
    },
    #[error("--device {id}: BAR {index} cannot be passed through")]
    Bar {
        id: String,
        index: u8,
        #[source]
        source: BarError,
    },
    #[error("--device {id}: BAR {index} has a size of {size:#x}, not a power of two")]
    BarSize { id: String, index: u8, size: u64 },
    #[error("--device {id}: cannot emulate its MSI capability")]
    Msi {
        id: String,
        #[source]
        source: MsiCapError,
    },
    #[error("--device {id}: cannot emulate its MSI-X capability")]
    Msix {
        id: String,
        #[source]
        source: MsixError,
    },
    #[error("--device {id}: the VMM cannot give it {what}")]
    Resources {
        id: String,
        what: &'static str,
        #[source]
        source: ResourceError,
    },
    #[error("--device {id}: cannot bring its VFIO migration state back to RUNNING")]
    MigrationState {
        id: String,
        #[source]
        source: DeviceMigrationError,
    },
}

/// What `vm.info` shows about a passthrough device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioDeviceInfo {
    pub id: String,
    pub sysfs: std::path::PathBuf,
    pub backend: VfioBackend,
    /// The IOMMU tracks DMA writes itself: iommufd with a HWPT allocated with dirty tracking.
    /// Always false with type1: its dirty log is the pinned-page approximation, which tern does
    /// not count as hardware tracking.
    pub hw_dirty_tracking: bool,
    /// The device's VFIO migration v2 capabilities; `None`: it has no migration v2 with
    /// STOP_COPY, so its own state cannot move.
    pub migration: Option<MigrationCaps>,
    /// PCI vendor and device ID, as the function reports them.
    pub vendor_id: u16,
    pub device_id: u16,
    /// The device offers VFIO DMA logging (probed with VFIO_DEVICE_FEATURE_PROBE).
    pub dma_logging: bool,
    /// How migration learns which pages the device writes, and why.
    pub dma_dirty: DmaDirtySelection,
    /// Bytes of guest RAM mapped for DMA.
    pub dma_mapped_bytes: u64,
}

/// What migrates of a passthrough function besides its own device state: the configuration space
/// tern emulates (command register, BAR addresses, MSI and MSI-X capability registers) and the
/// MSI-X table and PBA it keeps. The destination loads it into the function it opened from its
/// own path: the BARs decode where the guest put them and the vectors the guest enabled are
/// handed to VFIO again with the destination's eventfds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioPciState {
    /// The device's id (`--device id=`), which the destination maps to its own function.
    pub id: String,
    pub config: ConfigSpaceState,
    /// The BARs the function has (the destination's function must have the same).
    pub bars: Vec<BarSpec>,
    pub msi: Option<MsiCap>,
    /// The emulated MSI-X table and PBA.
    pub msix: Option<MsixState>,
}

/// The DMA space a passthrough device is in, and who shares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmaDomainInfo {
    /// The VM's type1 container; `devices` are all the devices in it (this one included).
    Type1 { devices: Vec<String> },
    /// The VM's IOAS and a HWPT on it; `devices` are all the devices attached to the HWPT.
    Iommufd {
        ioas: u32,
        hwpt: u32,
        dirty_tracking: bool,
        devices: Vec<String>,
    },
}

/// Where the device's own MSI-X table and PBA are (the emulated capability keeps them there).
#[derive(Debug, Clone, Copy)]
struct MsixLayout {
    vectors: u16,
    table: (u8, u32),
    pba: (u8, u32),
}

/// Where the device's DMA goes: the VM's container, or a HWPT on the VM's IOAS.
#[derive(Debug)]
enum Dma {
    Type1(Arc<Type1Dma>),
    Iommufd(Arc<Hwpt>),
    /// Inherited from the old process in a live update (with the HWPT id for iommufd).
    Handed(Arc<HandedDma>, Option<u32>),
}

impl Dma {
    /// The DMA mappings (IOVA = GPA).
    fn mappings(&self) -> Vec<(crate::sys::iova::Iova, usize)> {
        match self {
            Dma::Type1(d) => d.mapped(),
            Dma::Iommufd(h) => h.space().mapped(),
            Dma::Handed(d, _) => d.mappings(),
        }
    }

    /// The device leaves the space (before it closes).
    fn leave(&self, id: &str) {
        match self {
            Dma::Type1(d) => d.leave(id),
            Dma::Iommufd(h) => h.leave(id),
            // Nothing to undo by hand: closing the container or iommufd (the last user) tears
            // its mappings down.
            Dma::Handed(..) => {}
        }
    }

    fn info(&self) -> DmaDomainInfo {
        match self {
            Dma::Type1(d) => DmaDomainInfo::Type1 {
                devices: d.members(),
            },
            Dma::Iommufd(h) => DmaDomainInfo::Iommufd {
                ioas: h.space().ioas_id(),
                hwpt: h.id(),
                dirty_tracking: h.dirty_tracking(),
                devices: h.devices(),
            },
            Dma::Handed(d, hwpt) => match d.ioas() {
                Some(ioas) => DmaDomainInfo::Iommufd {
                    ioas,
                    hwpt: hwpt.unwrap_or(0),
                    dirty_tracking: false,
                    devices: d.devices(),
                },
                None => DmaDomainInfo::Type1 {
                    devices: d.devices(),
                },
            },
        }
    }

    fn handle(&self) -> DmaHandle {
        match self {
            Dma::Type1(d) => DmaHandle::Type1 {
                container: d.container().as_raw_fd(),
                mappings: d.mapped(),
            },
            Dma::Iommufd(h) => DmaHandle::Iommufd {
                iommufd: h.space().iommufd().as_raw_fd(),
                ioas: h.space().ioas_id(),
                hwpt: h.id(),
            },
            Dma::Handed(d, hwpt) => d.handle(*hwpt),
        }
    }
}

/// A device's part in a live update ([`super::handover`]).
#[derive(Debug, Clone, Copy, Default)]
struct LiveUpdate {
    /// An mdev (type1's update-vaddr interface excludes them).
    mdev: bool,
    /// VFIO already signals this VM's vector eventfds (inherited): a restore sets the routes
    /// only, no VFIO_DEVICE_SET_IRQS.
    irqs_inherited: bool,
    /// Released for a live update (the VM is paused): its emulated state may be saved although
    /// the device itself cannot migrate — it goes to the new process as it is.
    released: bool,
    /// Another process owns the device (the new one, after a handover; the old one, until a
    /// live update's destination runs the VM): nothing here may touch it, drop included.
    foreign: bool,
}

/// A passed-through PCI function.
pub struct VfioPciDevice {
    info: VfioDeviceInfo,
    // Both declared before `dma`: fields drop in order, and the cdev must close (detach) before
    // the last user of its HWPT destroys it.
    device: Box<dyn VfioFunction>,
    // The same device as `device`, for its DMA-logging dirty source (`None` for fakes).
    vfio: Option<Arc<VfioDevice>>,
    // `None` only for the unit tests' fake function, whose DMA is nobody's.
    dma: Option<Dma>,
    config: ConfigSpace,
    bars: Vec<BarSpec>,
    msi: Option<MsiCap>,
    msix: Option<Msix>,
    sink: Arc<dyn MsiRouteSink>,
    vectors: Vec<EventFd>,
    direct: DirectBars,
    live: LiveUpdate,
}

impl std::fmt::Debug for VfioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPciDevice")
            .field("info", &self.info)
            .field("bars", &self.bars)
            .finish()
    }
}

/// Reads a dword of the device's real configuration space; all-ones if VFIO refuses (as a master
/// abort would read).
fn real_config32(device: &dyn VfioFunction, offset: u64) -> u32 {
    let mut b = [0xff; 4];
    device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut b, offset);
    u32::from_le_bytes(b)
}

/// The BARs VFIO reports (`size` of each region index 0..6), with the kind their real registers
/// declare (`config32` reads the device's configuration space).
fn discover_bars(
    config32: impl Fn(u64) -> u32,
    size: impl Fn(u8) -> u64,
    id: &str,
) -> Result<Vec<BarSpec>, VfioDeviceError> {
    let mut bars = Vec::new();
    let mut index = 0u8;
    while index < 6 {
        let size = size(index);
        let reg = config32(0x10 + 4 * u64::from(index));
        let kind = if reg & 1 == 1 {
            BarKind::Io
        } else if (reg >> 1) & 3 == 2 {
            BarKind::Memory64 {
                prefetchable: reg & 8 != 0,
            }
        } else {
            BarKind::Memory32 {
                prefetchable: reg & 8 != 0,
            }
        };
        if size != 0 {
            if !size.is_power_of_two() {
                return Err(VfioDeviceError::BarSize {
                    id: id.to_string(),
                    index,
                    size,
                });
            }
            bars.push(BarSpec { index, kind, size });
        }
        index += if matches!(kind, BarKind::Memory64 { .. }) {
            2
        } else {
            1
        };
    }
    Ok(bars)
}

/// The device's real MSI-X capability, found by walking its capability list (`config32` reads
/// the device's configuration space).
fn discover_msix(config32: impl Fn(u64) -> u32) -> Option<MsixLayout> {
    if (config32(4) >> 16) & (1 << 4) == 0 {
        return None;
    }
    let mut ptr = u64::from(config32(0x34) & 0xfc);
    // At most 48 capabilities fit in 256 bytes; the bound stops a looping list.
    for _ in 0..48 {
        if ptr < 0x40 {
            return None;
        }
        let head = config32(ptr);
        if head & 0xff == 0x11 {
            let table = config32(ptr + 4);
            let pba = config32(ptr + 8);
            return Some(MsixLayout {
                vectors: (((head >> 16) & 0x7ff) + 1) as u16,
                table: ((table & 7) as u8, table & !7),
                pba: ((pba & 7) as u8, pba & !7),
            });
        }
        ptr = u64::from((head >> 8) & 0xfc);
    }
    None
}

/// The device's migration capabilities, with its migration state back in RUNNING: a tern that
/// died mid-migration leaves a device in RESUMING, STOP or ERROR, and vfio-ioctls' reset skips
/// functions without `VFIO_DEVICE_FLAGS_RESET` (mtty), so the checked reset is issued here.
/// `None`: no migration v2 with STOP_COPY (or the probe failed, which is logged).
fn ready_for_migration(
    id: &str,
    device: &Arc<VfioDevice>,
) -> Result<Option<MigrationCaps>, VfioDeviceError> {
    let caps = match MigrationCaps::probe(device) {
        Ok(Some(caps)) => caps,
        Ok(None) => return Ok(None),
        Err(e) => {
            log::warn!("VFIO {id}: VFIO_DEVICE_FEATURE_MIGRATION failed ({e}); not migratable");
            return Ok(None);
        }
    };
    let err = |source| VfioDeviceError::MigrationState {
        id: id.to_string(),
        source,
    };
    let mut mig = DeviceMigration::new(id, device.clone()).map_err(err)?;
    if mig.state() != MigState::Running {
        eprintln!(
            "tern: VFIO {id}: migration state {} left by its last user; resetting the device",
            mig.state()
        );
        mig.reset().map_err(err)?;
    }
    Ok(Some(caps))
}

impl VfioPciDevice {
    /// Checks and opens the device `spec` names, resets it, puts it in the VM's DMA space of its
    /// backend (guest RAM mapped with IOVA = GPA), and takes BAR addresses and MSI vectors from
    /// `resources`.
    pub fn open(
        spec: &VfioDeviceSpec,
        roots: &HostRoots,
        spaces: &mut DmaSpaces,
        resources: &mut dyn PciResources,
    ) -> Result<Self, VfioDeviceError> {
        let id = spec.id.clone();
        let target = preflight(spec, roots).map_err(|source| VfioDeviceError::Preflight {
            id: id.clone(),
            source,
        })?;
        let open_err = |source| VfioDeviceError::Open {
            id: id.clone(),
            source,
        };
        // `dma` binds first so that, on an error below, `device` drops (closes) before it.
        let (dma, device) = match spec.backend {
            VfioBackend::Type1 => {
                let type1 = |source| VfioDeviceError::Type1 {
                    id: id.clone(),
                    source,
                };
                let shared = spaces.type1().map_err(type1)?;
                let (dma, device) =
                    match VfioDevice::new(&target.sysfs, shared.container().clone(), false) {
                        Ok(device) => (shared, device),
                        // A group the shared container's IOMMU cannot take gets its own
                        // container, as QEMU does.
                        Err(e) if !shared.members().is_empty() => {
                            log::info!(
                            "VFIO {id}: cannot join the VM's type1 container ({e}); using its own"
                        );
                            let own = Type1Dma::open().map_err(type1)?;
                            let device =
                                VfioDevice::new(&target.sysfs, own.container().clone(), false)
                                    .map_err(open_err)?;
                            (own, device)
                        }
                        Err(e) => return Err(open_err(e)),
                    };
                // The group is in the container and type1 is set only once a device is open.
                dma.join(&id, spaces.ram()).map_err(type1)?;
                (Dma::Type1(dma), device)
            }
            VfioBackend::Iommufd => {
                let iommufd = |source| VfioDeviceError::Iommufd {
                    id: id.clone(),
                    source,
                };
                let space = spaces.iommufd().map_err(iommufd)?;
                let device =
                    VfioDevice::new(&target.sysfs, space.ops().clone(), false).map_err(open_err)?;
                let hwpt = space.attach_vfio(&device, &id).map_err(iommufd)?;
                (Dma::Iommufd(hwpt), device)
            }
        };
        // Start from a known device state whatever the last user left behind (no-op for
        // functions without reset support).
        device.reset();
        let device = Arc::new(device);
        let migration = ready_for_migration(&id, &device)?;
        let caps = DmaDirtyCaps {
            hwpt_dirty: matches!(&dma, Dma::Iommufd(h) if h.dirty_tracking()),
            dma_logging: supports_dma_logging(&device),
            type1: matches!(dma, Dma::Type1(_)),
            mdev: matches!(target.kind, super::preflight::VfioDeviceKind::Mdev { .. }),
        };
        let dma_dirty =
            select(spec.dirty, caps).map_err(|source| VfioDeviceError::DirtyMethod {
                id: id.clone(),
                source,
            })?;
        let info = VfioDeviceInfo {
            id,
            sysfs: target.sysfs.clone(),
            backend: spec.backend,
            hw_dirty_tracking: caps.hwpt_dirty,
            migration,
            // Read from the function by `emulate`.
            vendor_id: 0,
            device_id: 0,
            dma_logging: caps.dma_logging,
            dma_dirty,
            dma_mapped_bytes: dma.mappings().iter().map(|&(_, len)| len as u64).sum(),
        };
        let mdev = matches!(target.kind, super::preflight::VfioDeviceKind::Mdev { .. });
        let mut dev = Self::emulate(info, Box::new(device.clone()), Some(dma), resources)?;
        dev.vfio = Some(device);
        dev.live.mdev = mdev;
        Ok(dev)
    }

    /// Builds the guest's view of a device handed over by the old process (live update): no
    /// open, no reset, no DMA mapping — the device runs on as it was. `resources` must give it
    /// the inherited vector eventfds (VFIO signals them already); the state restore then sets
    /// their routes.
    pub fn inherit(
        handed: InheritedDevice,
        resources: &mut dyn PciResources,
    ) -> Result<Self, VfioDeviceError> {
        let InheritedDevice {
            meta, device, dma, ..
        } = handed;
        let backend = if meta.iommufd {
            VfioBackend::Iommufd
        } else {
            VfioBackend::Type1
        };
        let dma = Dma::Handed(dma, meta.hwpt);
        let info = VfioDeviceInfo {
            id: meta.id,
            sysfs: meta.sysfs,
            backend,
            hw_dirty_tracking: false,
            migration: None,
            vendor_id: 0,
            device_id: 0,
            dma_logging: false,
            dma_dirty: DmaDirtySelection {
                method: None,
                migratable: false,
                reason: "inherited in a live update: DMA is not tracked (a later live update \
                         hands the device on again)"
                    .into(),
            },
            dma_mapped_bytes: dma.mappings().iter().map(|&(_, len)| len as u64).sum(),
        };
        let mut dev = Self::emulate(info, Box::new(device), Some(dma), resources)?;
        dev.live.irqs_inherited = true;
        // The old process owns it until this VM runs ([`VfioPciDevice::set_owned`]).
        dev.live.foreign = true;
        Ok(dev)
    }

    /// What a live update needs of this device to hand it over.
    pub fn handover_parts(&self) -> DeviceParts<'_> {
        DeviceParts {
            id: &self.info.id,
            sysfs: &self.info.sysfs,
            mdev: self.live.mdev,
            vendor_id: self.info.vendor_id,
            device_id: self.info.device_id,
            device_fd: self.device.raw_fd(),
            dma: self.dma.as_ref().map(Dma::handle),
            vectors: &self.vectors,
        }
    }

    /// The DMA space as a live update sees it.
    pub fn dma_handle(&self) -> Option<DmaHandle> {
        self.dma.as_ref().map(Dma::handle)
    }

    /// The device belongs to a new process now: from here on (drop included) nothing here
    /// touches it — no interrupt change, no unmap, no detach, no close ioctl. Its descriptors are
    /// closed when this process exits.
    pub fn set_handed_over(&mut self) {
        self.live.foreign = true;
    }

    /// Live update: released for the new process (`true`, the VM paused) or taken back.
    pub fn set_released(&mut self, released: bool) {
        self.live.released = released;
    }

    /// A live update's destination runs the VM: the inherited device is this process's now (a
    /// failure before leaves it untouched for the old process).
    pub fn set_owned(&mut self) {
        self.live.foreign = false;
    }

    /// Builds the guest's view of `device`: configuration space with its IDs, BARs at addresses
    /// from `resources`, and MSI/MSI-X capabilities wired to vectors from `resources`.
    fn emulate(
        mut info: VfioDeviceInfo,
        device: Box<dyn VfioFunction>,
        dma: Option<Dma>,
        resources: &mut dyn PciResources,
    ) -> Result<Self, VfioDeviceError> {
        let id = info.id.clone();
        let bars = discover_bars(
            |o| real_config32(device.as_ref(), o),
            |i| device.region_size(u32::from(i)),
            &id,
        )?;
        let cfg = |o| real_config32(device.as_ref(), o);
        let (idv, class, subsys) = (cfg(0), cfg(8), cfg(0x2c));
        (info.vendor_id, info.device_id) = (idv as u16, (idv >> 16) as u16);
        let mut config = ConfigSpace::new(PciIds {
            vendor: idv as u16,
            device: (idv >> 16) as u16,
            revision: class as u8,
            prog_if: (class >> 8) as u8,
            subclass: (class >> 16) as u8,
            class: (class >> 24) as u8,
            subsystem_vendor: subsys as u16,
            subsystem: (subsys >> 16) as u16,
        });
        for bar in &bars {
            let addr =
                resources
                    .allocate_bar(bar)
                    .map_err(|source| VfioDeviceError::Resources {
                        id: id.clone(),
                        what: "a BAR address",
                        source,
                    })?;
            bar.install(&mut config, addr)
                .map_err(|source| VfioDeviceError::Bar {
                    id: id.clone(),
                    index: bar.index,
                    source,
                })?;
        }

        let msi_count = device.irq_count(VFIO_PCI_MSI_IRQ_INDEX).min(32) as u16;
        let msi = if msi_count > 0 {
            // A function asks for a power of two; round a stray count down to one.
            let vectors = 1u16 << (15 - msi_count.leading_zeros());
            Some(MsiCap::add(&mut config, vectors, false).map_err(|source| {
                VfioDeviceError::Msi {
                    id: id.clone(),
                    source,
                }
            })?)
        } else {
            None
        };
        let msix_layout = (device.irq_count(VFIO_PCI_MSIX_IRQ_INDEX) > 0)
            .then(|| discover_msix(|o| real_config32(device.as_ref(), o)))
            .flatten();
        let msix = match msix_layout {
            Some(l) => Some(Msix::add(&mut config, l.vectors, l.table, l.pba).map_err(
                |source| VfioDeviceError::Msix {
                    id: id.clone(),
                    source,
                },
            )?),
            None => None,
        };
        let count = msi
            .map_or(0, |m| m.vectors())
            .max(msix.as_ref().map_or(0, Msix::vectors));
        let (sink, vectors) =
            resources
                .msi_vectors(count)
                .map_err(|source| VfioDeviceError::Resources {
                    id: id.clone(),
                    what: "MSI vectors",
                    source,
                })?;
        let direct = match resources.bar_memory() {
            Some(memory) => Self::map_bars(&id, device.as_ref(), &bars, msix.as_ref(), memory),
            None => DirectBars::none(),
        };
        Ok(Self {
            info,
            device,
            dma,
            vfio: None,
            config,
            bars,
            msi,
            msix,
            sink,
            vectors,
            direct,
            live: LiveUpdate::default(),
        })
    }

    /// mmaps the parts of the memory BARs that may go straight into the guest (all but the
    /// MSI-X table and PBA pages). A part that fails to map stays trapped: slower, still correct.
    fn map_bars(
        id: &str,
        device: &dyn VfioFunction,
        bars: &[BarSpec],
        msix: Option<&Msix>,
        memory: Arc<dyn BarMemory>,
    ) -> DirectBars {
        let mut direct = DirectBars::new(memory);
        for bar in bars.iter().filter(|b| !b.kind.is_io()) {
            let mut trapped = Vec::new();
            if let Some(m) = msix {
                let (tb, to) = m.table_location();
                let (pb, po) = m.pba_location();
                if tb == bar.index {
                    trapped.push((to, m.table_len_bytes()));
                }
                if pb == bar.index {
                    trapped.push((po, m.pba_len_bytes()));
                }
            }
            let areas = device.mmap_areas(u32::from(bar.index));
            for (offset, len) in direct_areas(bar.size, &areas, &trapped, page_size()) {
                match device.mmap(u32::from(bar.index), offset, len) {
                    Ok(m) => direct.add(bar.index, offset, m),
                    Err(e) => log::warn!(
                        "VFIO {id}: BAR {} {offset:#x}+{len:#x} stays trapped: mmap: {e}",
                        bar.index
                    ),
                }
            }
        }
        direct
    }

    /// The BAR parts mapped into the guest now: (BAR index, memory slot, guest address).
    pub fn direct_slots(&self) -> Vec<(u8, u32, u64)> {
        self.direct.slots()
    }

    /// What `vm.info` shows.
    pub fn info(&self) -> &VfioDeviceInfo {
        &self.info
    }

    /// Where the device's DMA writes are recorded by its selected method; `None` when nothing
    /// is tracked (the operator's `dirty=none`, or no method: migration is then refused
    /// earlier). Devices sharing a domain get one source ([`super::dma_dirty::domain::sources`]).
    pub fn dirty_domain(&self) -> Option<DirtyDomain> {
        let dma = self.dma.as_ref()?;
        match (self.info.dma_dirty.method?, dma) {
            (DmaDirtyMethod::Iommufd, Dma::Iommufd(h)) => Some(DirtyDomain::Hwpt(h.clone())),
            (DmaDirtyMethod::Type1, Dma::Type1(t)) => Some(DirtyDomain::Type1(t.clone())),
            (DmaDirtyMethod::DmaLogging, _) => Some(DirtyDomain::Logging {
                device: self.vfio.clone()?,
                mapped: MappedRange::from_mappings(&dma.mappings()),
            }),
            _ => None,
        }
    }

    /// The DMA space the device is in and who shares it (`None` for the tests' fakes).
    pub fn dma_domain(&self) -> Option<DmaDomainInfo> {
        self.dma.as_ref().map(Dma::info)
    }

    /// Hands the vector eventfds to VFIO (`on`) or takes them back, for MSI or MSI-X. Logged
    /// either way; the error is returned for callers that must not go on without interrupts.
    fn set_irqs(&self, irq_index: u32, vectors: u16, on: bool) -> Result<(), VfioError> {
        let name = if irq_index == VFIO_PCI_MSI_IRQ_INDEX {
            "MSI"
        } else {
            "MSI-X"
        };
        let r = if on {
            let fds: Vec<&EventFd> = self.vectors.iter().take(usize::from(vectors)).collect();
            self.device.enable_irq(irq_index, &fds)
        } else {
            self.device.disable_irq(irq_index)
        };
        match &r {
            Ok(()) => log::info!(
                "VFIO {}: {name} {}",
                self.info.id,
                if on { "on" } else { "off" }
            ),
            Err(e) => log::warn!("VFIO {}: cannot switch {name} to {on}: {e}", self.info.id),
        }
        r
    }

    /// The device as the migration engine's source of its state; `None` when it cannot migrate
    /// (no migration v2 with STOP_COPY) or is not a real VFIO device (the tests' fakes).
    pub fn state_source(&self) -> Result<Option<Box<dyn DeviceStateSource>>, DeviceMigrationError> {
        let (Some(_), Some(device)) = (self.info.migration, &self.vfio) else {
            return Ok(None);
        };
        Ok(Some(Box::new(VfioStateSource::new(
            self.info.id.clone(),
            device.clone(),
        )?)))
    }

    /// The device as the migration engine's sink for the state of the source device with the same
    /// id; `None` as for [`Self::state_source`].
    pub fn state_sink(&self) -> Result<Option<Box<dyn DeviceStateSink>>, DeviceMigrationError> {
        let (Some(_), Some(device)) = (self.info.migration, &self.vfio) else {
            return Ok(None);
        };
        Ok(Some(Box::new(VfioStateSink::new(
            self.info.id.clone(),
            device.clone(),
        )?)))
    }

    /// Checks that `state` was saved from a function like this one (same id, PCI IDs, BARs and
    /// capabilities); returns the configuration space to load.
    fn check_state(&self, state: &VfioPciState) -> Result<ConfigSpace, PciStateError> {
        let device = format!("VFIO device {}", self.info.id);
        let mismatch = |reason: String| PciStateError::Mismatch {
            device: device.clone(),
            reason,
        };
        if state.id != self.info.id {
            return Err(mismatch(format!("it was saved from device {}", state.id)));
        }
        let config =
            ConfigSpace::restore(&state.config).map_err(|source| PciStateError::Config {
                device: device.clone(),
                source,
            })?;
        let ids = |c: &ConfigSpace| {
            let r = c.read_reg(0);
            format!("{:04x}:{:04x}", r & 0xffff, r >> 16)
        };
        if ids(&config) != ids(&self.config) {
            return Err(mismatch(format!(
                "the saved function is {}, this one is {}",
                ids(&config),
                ids(&self.config)
            )));
        }
        if state.bars != self.bars {
            return Err(mismatch(format!(
                "the saved function has BARs {:?}, this one {:?}",
                state.bars, self.bars
            )));
        }
        if state.msi != self.msi {
            return Err(mismatch(format!(
                "the saved function has MSI {:?}, this one {:?}",
                state.msi, self.msi
            )));
        }
        let vectors =
            |n: Option<usize>| n.map_or("no MSI-X".into(), |n| format!("{n} MSI-X vectors"));
        let (saved, here) = (
            state.msix.as_ref().map(|m| m.entries.len()),
            self.msix.as_ref().map(|m| usize::from(m.vectors())),
        );
        if saved != here {
            return Err(mismatch(format!(
                "the saved function has {}, this one {}",
                vectors(saved),
                vectors(here)
            )));
        }
        if config.capabilities() != self.config.capabilities() {
            return Err(mismatch(format!(
                "the saved capability list is {:?}, this one {:?}",
                config.capabilities(),
                self.config.capabilities()
            )));
        }
        Ok(config)
    }

    /// Whether [`Self::restore`] would take `state` (same id, PCI IDs, BARs and capabilities),
    /// without changing anything.
    pub fn check_restore(&self, state: &VfioPciState) -> Result<(), PciStateError> {
        self.check_state(state).map(drop)
    }

    /// Loads a passthrough function's configuration saved on the source into this function (the
    /// destination's, opened from its own path): the configuration space and MSI-X table, the
    /// command register written through to the function, and the enabled MSI or MSI-X vectors
    /// routed and handed to VFIO with this VM's eventfds. The BARs decode at the saved addresses
    /// from now on; the bus moves their dispatch and memory slots there
    /// (`PciBus::refresh`). vCPUs must be paused.
    pub fn restore(&mut self, state: &VfioPciState) -> Result<(), PciStateError> {
        let config = self.check_state(state)?;
        let device = format!("VFIO device {}", self.info.id);
        let fail = |reason: String| PciStateError::Interrupts {
            device: device.clone(),
            reason,
        };
        let mut msix = self.msix.clone();
        if let (Some(m), Some(saved)) = (msix.as_mut(), &state.msix) {
            m.load(saved).map_err(|e| PciStateError::Mismatch {
                device: device.clone(),
                reason: e.to_string(),
            })?;
        }
        // Whatever this function had enabled goes first (nothing, on a fresh destination).
        if !self.live.irqs_inherited {
            self.interrupts_off();
        }
        self.config = config;
        self.msix = msix;
        // Decode and bus master as the guest left them.
        let command = self.config.command().to_le_bytes();
        self.device
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, &command, 4);
        let chain = |e: &dyn std::error::Error| tern_migration::engine::error_chain(e);
        // A live update's device keeps signalling the eventfds it inherited: routes only.
        let set_irqs = !std::mem::take(&mut self.live.irqs_inherited);
        if let Some(msi) = self.msi.filter(|m| m.enabled(&self.config)) {
            msi.replay(&self.config, self.sink.as_ref())
                .map_err(|e| fail(format!("MSI route: {}", chain(&e))))?;
            if set_irqs {
                self.set_irqs(VFIO_PCI_MSI_IRQ_INDEX, msi.vectors(), true)
                    .map_err(|e| fail(format!("VFIO_DEVICE_SET_IRQS (MSI): {}", chain(&e))))?;
            }
        }
        if let Some(msix) = self.msix.as_ref().filter(|m| m.enabled(&self.config)) {
            msix.replay(&self.config, self.sink.as_ref())
                .map_err(|e| fail(format!("MSI-X route: {}", chain(&e))))?;
            if set_irqs {
                self.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, msix.vectors(), true)
                    .map_err(|e| fail(format!("VFIO_DEVICE_SET_IRQS (MSI-X): {}", chain(&e))))?;
            }
        }
        Ok(())
    }

    /// Disables the enabled MSI or MSI-X vectors: routes removed, eventfds taken back from VFIO.
    fn interrupts_off(&mut self) {
        if let Some(msi) = self.msi.filter(|m| m.enabled(&self.config)) {
            for (v, r) in msi.routes(&self.config).into_iter().enumerate() {
                if r.is_some() {
                    if let Err(e) = self.sink.set_route(v as u16, None) {
                        log::warn!("VFIO {}: vector {v} route: {e}", self.info.id);
                    }
                }
            }
            let _ = self.set_irqs(VFIO_PCI_MSI_IRQ_INDEX, 0, false);
        }
        if let Some(msix) = self.msix.as_ref().filter(|m| m.enabled(&self.config)) {
            for (v, r) in msix.routes(&self.config).into_iter().enumerate() {
                if r.is_some() {
                    if let Err(e) = self.sink.set_route(v as u16, None) {
                        log::warn!("VFIO {}: vector {v} route: {e}", self.info.id);
                    }
                }
            }
            let _ = self.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0, false);
        }
    }

    /// Where `offset` of BAR `index` falls in the emulated MSI-X structures, if anywhere.
    fn msix_part(&self, index: u8, offset: u64, len: usize) -> Option<(bool, u64)> {
        let msix = self.msix.as_ref()?;
        let (tb, to) = msix.table_location();
        let (pb, po) = msix.pba_location();
        let end = offset + len as u64;
        if index == tb && offset >= to && end <= to + msix.table_len_bytes() {
            return Some((true, offset - to));
        }
        if index == pb && offset >= po && end <= po + msix.pba_len_bytes() {
            return Some((false, offset - po));
        }
        None
    }
}

impl PciDevice for VfioPciDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if let Some(msi) = self.msi.filter(|m| m.covers(offset, data.len())) {
            let was = msi.enabled(&self.config);
            if let Err(e) = msi.config_write(&mut self.config, offset, data, self.sink.as_ref()) {
                log::warn!("VFIO {}: MSI route: {e}", self.info.id);
            }
            let now = msi.enabled(&self.config);
            if was != now {
                let _ = self.set_irqs(VFIO_PCI_MSI_IRQ_INDEX, msi.vectors(), now);
            }
        } else if let Some(msix) = self.msix.as_ref().filter(|m| m.covers(offset, data.len())) {
            let was = msix.enabled(&self.config);
            if let Err(e) = msix.config_write(&mut self.config, offset, data, self.sink.as_ref()) {
                log::warn!("VFIO {}: MSI-X route: {e}", self.info.id);
            }
            let (now, vectors) = (msix.enabled(&self.config), msix.vectors());
            if was != now {
                let _ = self.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, vectors, now);
            }
        } else {
            self.config.write(offset, data);
            // Decode and bus-master enables must reach the function: without bus master its
            // DMA never leaves it.
            if offset < 6 && offset + data.len() > 4 {
                let command = self.config.command().to_le_bytes();
                self.device
                    .region_write(VFIO_PCI_CONFIG_REGION_INDEX, &command, 4);
            }
        }
    }

    fn bar_specs(&self) -> Vec<BarSpec> {
        self.bars.clone()
    }

    fn decoded_bars(&self) -> Vec<BarRegion> {
        self.bars
            .iter()
            .filter_map(|b| b.decoded(&self.config))
            .collect()
    }

    fn move_bar(&mut self, index: u8, _: Option<u64>, to: Option<u64>) -> Result<(), MoveBarError> {
        // The bus's dispatch map already moved (the trapped parts); the slots follow. A refused
        // slot leaves its part trapped rather than unmapping the BAR.
        if let Err(e) = self.direct.move_bar(index, to) {
            log::warn!("VFIO {}: BAR {index} partly trapped: {e}", self.info.id);
        }
        Ok(())
    }

    fn bar_read(&mut self, index: u8, offset: u64, data: &mut [u8]) {
        match (self.msix_part(index, offset, data.len()), &self.msix) {
            (Some((true, o)), Some(m)) => m.table_read(o, data),
            (Some((false, o)), Some(m)) => m.pba_read(o, data),
            _ => {
                data.fill(0xff);
                self.device.region_read(u32::from(index), data, offset);
            }
        }
    }

    fn bar_write(&mut self, index: u8, offset: u64, data: &[u8]) {
        match (self.msix_part(index, offset, data.len()), &mut self.msix) {
            (Some((true, o)), Some(m)) => {
                if let Err(e) = m.table_write(&self.config, o, data, self.sink.as_ref()) {
                    log::warn!("VFIO {}: MSI-X route: {e}", self.info.id);
                }
            }
            // The PBA is read-only.
            (Some((false, _)), Some(_)) => {}
            _ => self.device.region_write(u32::from(index), data, offset),
        }
    }

    fn save(&self) -> Result<PciDeviceState, PciStateError> {
        if self.info.migration.is_none() && !self.live.released {
            return Err(PciStateError::NotMigratable {
                device: format!(
                    "VFIO device {} (no VFIO migration v2 with STOP_COPY)",
                    self.info.id
                ),
            });
        }
        Ok(PciDeviceState::Vfio(VfioPciState {
            id: self.info.id.clone(),
            config: self.config.save(),
            bars: self.bars.clone(),
            msi: self.msi,
            msix: self.msix.as_ref().map(Msix::save),
        }))
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        if self.live.foreign {
            // The new process runs the device: leak this side's handles rather than let their
            // drops disable interrupts, unmap DMA, detach or put the group on the shared files.
            std::mem::forget(std::mem::replace(&mut self.device, Box::new(Released)));
            std::mem::forget(self.vfio.take());
            std::mem::forget(self.dma.take());
            return;
        }
        // Interrupts off first so no eventfd fires into a torn-down router, then DMA unmapped
        // while the group is still in the container; the fields then close the device and put
        // the group. The guest's slots go first, while the device is still whole.
        self.direct.clear();
        if self.msi.is_some_and(|m| m.enabled(&self.config)) {
            let _ = self.set_irqs(VFIO_PCI_MSI_IRQ_INDEX, 0, false);
        }
        if self.msix.as_ref().is_some_and(|m| m.enabled(&self.config)) {
            let _ = self.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0, false);
        }
        if let Some(dma) = &self.dma {
            dma.leave(&self.info.id);
        }
    }
}

#[cfg(test)]
mod emulation_tests;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A fake configuration space: dword registers by offset, all-ones elsewhere.
    fn space(regs: &[(u64, u32)]) -> impl Fn(u64) -> u32 {
        let m: BTreeMap<u64, u32> = regs.iter().copied().collect();
        move |o| m.get(&o).copied().unwrap_or(0)
    }

    #[test]
    fn bars_take_kind_from_the_register_and_size_from_vfio() {
        // BAR0 32-bit memory, BAR1 I/O, BAR2+3 64-bit prefetchable, BAR4 absent, BAR5 32-bit.
        let cfg = space(&[
            (0x10, 0xfeb0_0000),
            (0x14, 0xc001),
            (0x18, 0x0000_000c),
            (0x1c, 0x1),
            (0x24, 0x0),
        ]);
        let sizes = [1 << 20, 0x20, 1 << 30, 0, 0, 0x1000];
        let bars = discover_bars(cfg, |i| sizes[usize::from(i)], "t").unwrap();
        assert_eq!(
            bars,
            vec![
                BarSpec {
                    index: 0,
                    kind: BarKind::Memory32 {
                        prefetchable: false
                    },
                    size: 1 << 20
                },
                BarSpec {
                    index: 1,
                    kind: BarKind::Io,
                    size: 0x20
                },
                BarSpec {
                    index: 2,
                    kind: BarKind::Memory64 { prefetchable: true },
                    size: 1 << 30
                },
                BarSpec {
                    index: 5,
                    kind: BarKind::Memory32 {
                        prefetchable: false
                    },
                    size: 0x1000
                },
            ]
        );
    }

    #[test]
    fn bar_with_odd_size_is_refused_by_name() {
        let err = discover_bars(space(&[]), |i| if i == 0 { 3000 } else { 0 }, "edu").unwrap_err();
        assert_eq!(
            err.to_string(),
            "--device edu: BAR 0 has a size of 0xbb8, not a power of two"
        );
    }

    #[test]
    fn msix_capability_is_found_through_the_list() {
        // Status has the capability bit; 0x34 -> 0x40 (PM, id 1) -> 0x50 (MSI-X, 16 vectors,
        // table in BAR 2 at 0x2000, PBA in BAR 2 at 0x3000).
        let cfg = space(&[
            (0x04, 1 << 20),
            (0x34, 0x40),
            (0x40, 0x0000_5001),
            (0x50, 0x000f_0011),
            (0x54, 0x2002),
            (0x58, 0x3002),
        ]);
        let l = discover_msix(cfg).unwrap();
        assert_eq!((l.vectors, l.table, l.pba), (16, (2, 0x2000), (2, 0x3000)));
    }

    #[test]
    fn msix_walk_stops_on_missing_list_and_on_loops() {
        assert!(discover_msix(space(&[(0x34, 0x40), (0x40, 0x11)])).is_none());
        // A list pointing back at itself never ends on real hardware bugs: bounded walk.
        let looped = space(&[(0x04, 1 << 20), (0x34, 0x40), (0x40, 0x0000_4001)]);
        assert!(discover_msix(looped).is_none());
    }
}
