//! Creates the VM's platform devices, places them on the I/O buses, and saves/restores their state as
//! one closed, typed struct (a device without state handling does not compile in).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tern_devices::bus::{Bus, BusError};
use tern_devices::legacy::cmos::{Cmos, CmosRestoreError, CmosState, CMOS_PORT, CMOS_PORT_LEN};
use tern_devices::legacy::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use tern_devices::legacy::power::{SleepControl, SLEEP_CONTROL_LEN, SLEEP_CONTROL_PORT};
use tern_devices::legacy::serial::{
    SerialDevice, SerialDeviceState, SerialOutput, SerialRestoreError, COM1_IRQ, COM1_PORT,
    COM_PORT_LEN,
};
use tern_devices::legacy::EventFdTrigger;
use tern_devices::sys::iommufd_change_process::AccountingMove;
use tern_devices::vfio::device::{DmaDomainInfo, VfioDeviceInfo};
use tern_devices::vfio::dma_dirty::domain::DirtyDomain;
use tern_devices::vfio::dma_dirty::method::DmaDirtySelection;
use tern_devices::vfio::dma_space::DmaSpaces;
use tern_devices::vfio::handover::{self, Collected, DmaHandle, HandoverError, InheritedDevices};
use tern_devices::vfio::iommufd::IommufdSpace;
use tern_devices::vfio::migration::DeviceMigrationError;
use tern_devices::vfio::mock_dma::{MockDmaDevice, MockDmaError, MockDmaSpec, MockDmaState};
use tern_migration::dirty::DirtySource;
use tern_migration::engine::{DeviceStateSink, DeviceStateSource};
use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialConfig;
use crate::pci_manager::{PciManager, PciManagerError};
use crate::vstate::vm::Vm;

/// Errors creating devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd for {what}")]
    EventFd {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open serial output file {path}")]
    SerialFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot route the serial interrupt (irqfd on GSI {COM1_IRQ})")]
    SerialIrq(#[source] kvm_ioctls::Error),
    #[error("cannot place {what} on the I/O bus")]
    Bus {
        what: &'static str,
        #[source]
        source: BusError,
    },
    #[error(transparent)]
    SerialRestore(#[from] SerialRestoreError),
    #[error(transparent)]
    CmosRestore(#[from] CmosRestoreError),
    #[error("cannot set up the PCI bus")]
    Pci(#[source] PciManagerError),
    #[error("cannot save PCI device state")]
    PciSave(#[source] tern_devices::pci::PciStateError),
    #[error("cannot restore PCI device state")]
    PciRestore(#[source] PciManagerError),
    #[error("cannot add a passthrough device")]
    Passthrough(#[source] crate::vfio_manager::VfioManagerError),
    #[error(transparent)]
    MockDma(#[from] MockDmaError),
    #[error("the migration carries state of mock-dma {id} but this VM has no --mock-dma id={id}")]
    MockDmaMissing { id: String },
    #[error("--mock-dma id={id} is given twice")]
    MockDmaDuplicate { id: String },
    #[error("VFIO device {id}: cannot open its migration state")]
    DeviceState {
        id: String,
        #[source]
        source: DeviceMigrationError,
    },
    #[error("VFIO device {id} cannot take a migrated device state: it has no VFIO migration support (migration v2 with STOP_COPY)")]
    NoDeviceState { id: String },
    #[error("live update of the passthrough devices")]
    Handover(#[source] HandoverError),
    #[error("a mock-dma device cannot be handed to a new process ({id}): live update takes VFIO devices only")]
    HandoverMock { id: String },
    #[error("VFIO device {id}: cannot bring it back to RUNNING")]
    Recover {
        id: String,
        #[source]
        source: tern_migration::engine::HostError,
    },
}

/// A device whose DMA cannot be tracked, or whose own state cannot move, blocks migration; the
/// reason names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device {id}: {reason}")]
pub struct MigrationBlocker {
    pub id: String,
    pub reason: String,
}

/// Every device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: SerialDeviceState,
    pub cmos: CmosState,
    pub pci: crate::pci_manager::PciManagerState,
    /// The lab-only DMA devices' write logs, by device id.
    #[serde(default)]
    pub mock_dma: BTreeMap<String, MockDmaState>,
}

/// What `vm.info` shows about a lab-only mock DMA device.
#[derive(Debug, Clone)]
pub struct MockDmaInfo {
    pub id: String,
    pub dma_dirty: DmaDirtySelection,
    pub domain: DmaDomainInfo,
}

/// Events devices raise towards the VMM.
#[derive(Debug)]
pub struct PlatformEvents {
    /// The guest requested power-off (ACPI S5).
    pub power_off: EventFd,
    /// The guest pulsed the reset line (i8042).
    pub reset: EventFd,
}

/// The platform devices and the port I/O bus they sit on.
#[derive(Debug)]
pub struct DeviceManager {
    serial: Arc<Mutex<SerialDevice>>,
    cmos: Arc<Mutex<Cmos>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    pci: PciManager,
    // VFIO passthrough functions (also on the PCI bus); dropped with the manager, before guest RAM.
    passthrough: Vec<Arc<Mutex<tern_devices::vfio::device::VfioPciDevice>>>,
    // The VM's type1 container and iommufd IOAS, shared by its passthrough devices (opened with
    // the first device that needs one).
    dma_spaces: Option<DmaSpaces>,
    // The lab-only DMA devices (`--mock-dma`) and the IOAS they share.
    mock_dma: Vec<Mutex<MockDmaDevice>>,
    mock_space: Option<Arc<IommufdSpace>>,
    // Registered as the COM1 irqfd for the VM's lifetime; cloned when the UART is restored.
    serial_irq: EventFd,
    // Live update: the passthrough devices were released for a new process and not taken back.
    handover_released: AtomicBool,
}

fn eventfd(what: &'static str) -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { what, source })
}

fn serial_output(config: &SerialConfig) -> Result<SerialOutput, DeviceError> {
    Ok(match config {
        SerialConfig::Stdout => Box::new(std::io::stdout()),
        SerialConfig::Off => Box::new(std::io::sink()),
        SerialConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| DeviceError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

impl DeviceManager {
    /// Creates the devices in their reset state and wires their interrupts into `vm`
    /// ([`DeviceManager::restore`] loads saved state later).
    pub fn new(
        vm: &Arc<Vm>,
        memory_bytes: u64,
        serial_config: &SerialConfig,
    ) -> Result<(Self, PlatformEvents), DeviceError> {
        let events = PlatformEvents {
            power_off: eventfd("power-off")?,
            reset: eventfd("reset")?,
        };
        let serial_irq = eventfd("the serial interrupt")?;
        vm.fd()
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(DeviceError::SerialIrq)?;
        let trigger = || {
            serial_irq
                .try_clone()
                .map(EventFdTrigger::new)
                .map_err(|source| DeviceError::EventFd {
                    what: "the serial interrupt",
                    source,
                })
        };
        let out = serial_output(serial_config)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(trigger()?, out)));
        let cmos = Arc::new(Mutex::new(Cmos::new()));
        let clone_evt = |evt: &EventFd, what| {
            evt.try_clone()
                .map(EventFdTrigger::new)
                .map_err(|source| DeviceError::EventFd { what, source })
        };
        let i8042 = Arc::new(Mutex::new(I8042::new(clone_evt(&events.reset, "reset")?)));
        let sleep = Arc::new(Mutex::new(SleepControl::new(clone_evt(
            &events.power_off,
            "power-off",
        )?)));

        let mut pio = Bus::new();
        let place = |bus: &mut Bus, dev, base, len, what| {
            bus.insert(dev, base, len)
                .map_err(|source| DeviceError::Bus { what, source })
        };
        place(&mut pio, serial.clone(), COM1_PORT, COM_PORT_LEN, "COM1")?;
        place(&mut pio, cmos.clone(), CMOS_PORT, CMOS_PORT_LEN, "CMOS RTC")?;
        place(&mut pio, i8042, I8042_PORT, I8042_PORT_LEN, "i8042")?;
        place(
            &mut pio,
            sleep,
            SLEEP_CONTROL_PORT,
            SLEEP_CONTROL_LEN,
            "sleep control",
        )?;
        let pci = PciManager::new(vm.clone(), memory_bytes).map_err(DeviceError::Pci)?;
        let mut mmio = Bus::new();
        pci.place(&mut pio, &mut mmio).map_err(DeviceError::Pci)?;
        Ok((
            Self {
                serial,
                cmos,
                pio: Arc::new(pio),
                mmio: Arc::new(mmio),
                pci,
                passthrough: Vec::new(),
                dma_spaces: None,
                mock_dma: Vec::new(),
                mock_space: None,
                serial_irq,
                handover_released: AtomicBool::new(false),
            },
            events,
        ))
    }

    /// The port I/O bus.
    pub fn pio(&self) -> Arc<Bus> {
        self.pio.clone()
    }

    /// The MMIO bus.
    pub fn mmio(&self) -> Arc<Bus> {
        self.mmio.clone()
    }

    /// The PCI bus.
    pub fn pci(&self) -> &PciManager {
        &self.pci
    }

    /// Opens the VFIO passthrough devices and puts them on the PCI bus, with all of `ram` mapped
    /// for their DMA.
    pub fn add_passthrough(
        &mut self,
        ram: &crate::vstate::memory::GuestRam,
        configs: &[crate::config::PassthroughConfig],
    ) -> Result<(), DeviceError> {
        if configs.is_empty() {
            return Ok(());
        }
        let spaces = match &mut self.dma_spaces {
            Some(s) => s,
            None => {
                let ranges =
                    crate::vfio_manager::dma_ranges(ram).map_err(DeviceError::Passthrough)?;
                self.dma_spaces.insert(DmaSpaces::new(ranges))
            }
        };
        let added = crate::vfio_manager::add_devices(&mut self.pci, spaces, configs)
            .map_err(DeviceError::Passthrough)?;
        self.passthrough.extend(added);
        Ok(())
    }

    /// A live update's destination: builds the passthrough devices from what the old process
    /// handed over (nothing opened, nothing reset).
    pub fn add_inherited(
        &mut self,
        ram: &crate::vstate::memory::GuestRam,
        configs: &[crate::config::PassthroughConfig],
        inherited: &mut InheritedDevices,
    ) -> Result<(), DeviceError> {
        let ranges = crate::vfio_manager::dma_ranges(ram).map_err(DeviceError::Passthrough)?;
        self.dma_spaces = Some(DmaSpaces::new(ranges));
        let added = crate::vfio_manager::add_inherited_devices(&mut self.pci, inherited, configs)
            .map_err(DeviceError::Passthrough)?;
        self.passthrough.extend(added);
        Ok(())
    }

    fn dma_handles(&self) -> Vec<DmaHandle> {
        self.passthrough
            .iter()
            .filter_map(|d| d.lock().unwrap_or_else(|p| p.into_inner()).dma_handle())
            .collect()
    }

    fn dma_ram(&self) -> &[tern_devices::vfio::container::GuestRamRange] {
        self.dma_spaces.as_ref().map_or(&[], |s| s.ram())
    }

    /// Live update, source side: every passthrough device's descriptors for the new process, or
    /// the reason one cannot go (named). A VM without passthrough devices hands over nothing.
    pub fn handover_collect(&self) -> Result<Collected, DeviceError> {
        if let Some(m) = self.mocks().next() {
            return Err(DeviceError::HandoverMock {
                id: m.id().to_string(),
            });
        }
        let guards: Vec<_> = self
            .passthrough
            .iter()
            .map(|d| d.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let parts: Vec<_> = guards.iter().map(|d| d.handover_parts()).collect();
        handover::collect(&parts).map_err(DeviceError::Handover)
    }

    /// Live update, source side, paused: type1 mappings' addresses invalidated, irqfds off KVM
    /// (vectors VFIO signals now wait in their eventfds for the new process).
    pub fn handover_release(&self) -> Result<(), DeviceError> {
        self.handover_released.store(true, Ordering::SeqCst);
        for d in &self.passthrough {
            d.lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_released(true);
        }
        let n = self.pci.router().set_irqfds(false);
        log::info!("live update: {n} irqfds off this VM");
        handover::release(&self.dma_handles()).map_err(DeviceError::Handover)
    }

    /// Live update failed: this process's addresses on the type1 mappings again, irqfds back.
    pub fn handover_reclaim(&self) -> Result<(), DeviceError> {
        let r = handover::reclaim(&self.dma_handles(), self.dma_ram());
        for d in &self.passthrough {
            let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
            d.set_released(false);
            // Ours again (an in-doubt source that handed them over in case the other side ran).
            d.set_owned();
        }
        self.handover_released.store(false, Ordering::SeqCst);
        let n = self.pci.router().set_irqfds(true);
        log::info!("live update failed: {n} irqfds back on this VM");
        r.map_err(DeviceError::Handover)
    }

    /// Live update done: the devices belong to the new process; nothing here touches them again.
    pub fn handover_done(&self) {
        for d in &self.passthrough {
            d.lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_handed_over();
        }
    }

    /// Live update, destination side: the VM runs here now, the inherited devices are ours.
    pub fn take_ownership(&self) {
        for d in &self.passthrough {
            d.lock().unwrap_or_else(|p| p.into_inner()).set_owned();
        }
        let n = self.pci.router().set_irqfds(true);
        log::info!("live update: {n} irqfds on this VM");
    }

    /// Live update, destination side, from the build on: the inherited vectors' irqfds stay off
    /// KVM until the VM runs here ([`DeviceManager::take_ownership`]), so a vector that fires
    /// before stays pending in its eventfd for whichever side runs the VM.
    pub fn hold_irqfds(&self) {
        self.pci.router().set_irqfds(false);
    }

    /// Live update, destination side at the switchover: the type1 mappings' addresses are this
    /// process's; iommufd accounting moved here where the kernel can (what happened is returned).
    pub fn take_over(&self) -> Result<Vec<AccountingMove>, DeviceError> {
        handover::take_over(&self.dma_handles(), self.dma_ram()).map_err(DeviceError::Handover)
    }

    /// Adds the lab-only DMA device over `ram`.
    pub fn add_mock_dma(
        &mut self,
        ram: &crate::vstate::memory::GuestRam,
        spec: &MockDmaSpec,
    ) -> Result<(), DeviceError> {
        if self.mocks().any(|m| m.id() == spec.id) {
            return Err(DeviceError::MockDmaDuplicate {
                id: spec.id.clone(),
            });
        }
        let ranges = crate::vfio_manager::dma_ranges(ram).map_err(DeviceError::Passthrough)?;
        let dev = MockDmaDevice::open(spec, &ranges, &mut self.mock_space)?;
        self.mock_dma.push(Mutex::new(dev));
        Ok(())
    }

    fn mocks(&self) -> impl Iterator<Item = std::sync::MutexGuard<'_, MockDmaDevice>> {
        self.mock_dma
            .iter()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// One dirty source per DMA tracking domain of the VM's devices (a HWPT or container shared
    /// by several devices is one source; none for a device the operator marked `dirty=none`).
    pub fn dma_dirty_sources(&self) -> Vec<Box<dyn DirtySource>> {
        let mut domains: Vec<(String, DirtyDomain)> = Vec::new();
        for d in &self.passthrough {
            let d = d.lock().unwrap_or_else(|p| p.into_inner());
            domains.extend(d.dirty_domain().map(|dom| (d.info().id.clone(), dom)));
        }
        for m in self.mocks() {
            domains.extend(m.dirty_domain().map(|dom| (m.id().to_string(), dom)));
        }
        tern_devices::vfio::dma_dirty::domain::sources(&domains)
    }

    /// Why the VM cannot migrate now, device by device (empty: it can). A passthrough device
    /// blocks when it has no VFIO migration v2 with STOP_COPY (its own state cannot move) or its
    /// DMA is not tracked; the reason gives both when both hold.
    pub fn migration_blockers(&self) -> Vec<MigrationBlocker> {
        let mut v = Vec::new();
        for d in &self.passthrough {
            let d = d.lock().unwrap_or_else(|p| p.into_inner());
            let info = d.info();
            let mut reasons = Vec::new();
            if info.migration.is_none() {
                reasons.push(
                    "no VFIO migration support: the device does not implement VFIO migration v2 \
                     with STOP_COPY, so its own state cannot move"
                        .to_string(),
                );
            }
            if !info.dma_dirty.migratable {
                reasons.push(info.dma_dirty.reason.clone());
            }
            if !reasons.is_empty() {
                v.push(MigrationBlocker {
                    id: info.id.clone(),
                    reason: reasons.join("; "),
                });
            }
        }
        v
    }

    /// Brings every migratable passthrough device back to RUNNING (walking back, or by reset)
    /// when a migration left it elsewhere: resuming a VM the operator chose after an in-doubt
    /// switchover, whose devices stopped for the commit. Devices already RUNNING are left alone.
    pub fn recover_device_states(&self) -> Result<(), DeviceError> {
        // A live update that ended in doubt: the devices were released for the new process.
        if self.handover_released.load(Ordering::SeqCst) {
            self.handover_reclaim()?;
        }
        for mut source in self.device_states()? {
            source.recover().map_err(|e| DeviceError::Recover {
                id: source.id().to_owned(),
                source: e,
            })?;
        }
        Ok(())
    }

    /// The passthrough devices whose own state migrates, as the engine's sources (one per
    /// device with VFIO migration v2; the others block migration before this is asked).
    pub fn device_states(&self) -> Result<Vec<Box<dyn DeviceStateSource>>, DeviceError> {
        let mut v = Vec::new();
        for d in &self.passthrough {
            let d = d.lock().unwrap_or_else(|p| p.into_inner());
            let source = d
                .state_source()
                .map_err(|source| DeviceError::DeviceState {
                    id: d.info().id.clone(),
                    source,
                })?;
            v.extend(source);
        }
        Ok(v)
    }

    /// Every passthrough device as the engine's sink for the source device of the same id. A
    /// device without VFIO migration support is an error: its source's state would be lost.
    pub fn device_sinks(&self) -> Result<Vec<Box<dyn DeviceStateSink>>, DeviceError> {
        let mut v = Vec::new();
        for d in &self.passthrough {
            let d = d.lock().unwrap_or_else(|p| p.into_inner());
            let id = d.info().id.clone();
            let sink = d.state_sink().map_err(|source| DeviceError::DeviceState {
                id: id.clone(),
                source,
            })?;
            v.push(sink.ok_or(DeviceError::NoDeviceState { id })?);
        }
        Ok(v)
    }

    /// Stops every device's DMA (migration switchover, after the vCPUs).
    pub fn pause_dma(&self) -> Result<(), DeviceError> {
        for m in self.mocks() {
            m.pause();
        }
        Ok(())
    }

    /// Lets every device's DMA run again.
    pub fn resume_dma(&self) -> Result<(), DeviceError> {
        for mut m in self.mocks() {
            m.resume()?;
        }
        Ok(())
    }

    /// What `vm.info` shows about the lab-only DMA devices: id, DMA dirty method, HWPT.
    pub fn mock_dma_info(&self) -> Vec<MockDmaInfo> {
        self.mocks()
            .map(|m| MockDmaInfo {
                id: m.id().to_string(),
                dma_dirty: m.dma_dirty().clone(),
                domain: DmaDomainInfo::Iommufd {
                    ioas: m.hwpt().space().ioas_id(),
                    hwpt: m.hwpt().id(),
                    dirty_tracking: m.hwpt().dirty_tracking(),
                    devices: m.hwpt().devices(),
                },
            })
            .collect()
    }

    /// What `vm.info` shows about each passthrough device, and the DMA space it is in.
    pub fn passthrough_info(&self) -> Vec<(VfioDeviceInfo, Option<DmaDomainInfo>)> {
        self.passthrough
            .iter()
            .map(|d| {
                let d = d.lock().unwrap_or_else(|p| p.into_inner());
                (d.info().clone(), d.dma_domain())
            })
            .collect()
    }

    /// Loads saved state into the existing devices: a migration destination builds its devices
    /// before the state arrives, so the switchover only pays for this.
    pub fn restore(
        &self,
        states: &DeviceStates,
        serial_config: &SerialConfig,
        steps: &mut tern_migration::engine::StepTimes,
    ) -> Result<(), DeviceError> {
        let trigger = self
            .serial_irq
            .try_clone()
            .map(EventFdTrigger::new)
            .map_err(|source| DeviceError::EventFd {
                what: "the serial interrupt",
                source,
            })?;
        let serial = SerialDevice::restore(trigger, serial_output(serial_config)?, &states.serial)?;
        let cmos = Cmos::restore(&states.cmos)?;
        steps.lap("devices: serial, CMOS");
        self.pci
            .restore(&states.pci, steps)
            .map_err(DeviceError::PciRestore)?;
        for (id, state) in &states.mock_dma {
            let m = self
                .mocks()
                .find(|m| m.id() == id)
                .ok_or_else(|| DeviceError::MockDmaMissing { id: id.clone() })?;
            let v = m.restore(state)?;
            // The lab's oracle for DMA behind KVM's back: every page the source's device wrote
            // must hold its last write here.
            eprintln!(
                "tern: mock-dma {}: {} DMA writes to {} pages; after migration {} intact, {} LOST",
                m.id(),
                state.writes,
                v.written_pages,
                v.written_pages - v.lost_pages,
                v.lost_pages
            );
        }
        *self.serial.lock().unwrap_or_else(|p| p.into_inner()) = serial;
        *self.cmos.lock().unwrap_or_else(|p| p.into_inner()) = cmos;
        Ok(())
    }

    /// Saves every device. vCPUs must be paused so no access is in flight.
    pub fn save(&self) -> Result<DeviceStates, DeviceError> {
        let lock =
            |m: &Arc<Mutex<SerialDevice>>| m.lock().unwrap_or_else(|p| p.into_inner()).save();
        Ok(DeviceStates {
            serial: lock(&self.serial),
            cmos: self.cmos.lock().unwrap_or_else(|p| p.into_inner()).save(),
            pci: self.pci.save().map_err(DeviceError::PciSave)?,
            mock_dma: self
                .mocks()
                .map(|m| (m.id().to_string(), m.save()))
                .collect(),
        })
    }
}
