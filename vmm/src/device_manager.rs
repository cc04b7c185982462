//! Creates the VM's platform devices, places them on the I/O buses, and saves/restores their state as
//! one closed, typed struct (a device without state handling does not compile in).

use std::fs::OpenOptions;
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
}

/// Every device's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: SerialDeviceState,
    pub cmos: CmosState,
    pub pci: crate::pci_manager::PciManagerState,
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
    // Registered as the COM1 irqfd for the VM's lifetime; cloned when the UART is restored.
    serial_irq: EventFd,
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
                serial_irq,
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
        let added = crate::vfio_manager::add_devices(&mut self.pci, ram, configs)
            .map_err(DeviceError::Passthrough)?;
        self.passthrough.extend(added);
        Ok(())
    }

    /// What `vm.info` shows about each passthrough device.
    pub fn passthrough_info(&self) -> Vec<tern_devices::vfio::device::VfioDeviceInfo> {
        self.passthrough
            .iter()
            .map(|d| d.lock().unwrap_or_else(|p| p.into_inner()).info().clone())
            .collect()
    }

    /// Loads saved state into the existing devices: a migration destination builds its devices
    /// before the state arrives, so the switchover only pays for this.
    pub fn restore(
        &self,
        states: &DeviceStates,
        serial_config: &SerialConfig,
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
        self.pci
            .restore(&states.pci)
            .map_err(DeviceError::PciRestore)?;
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
        })
    }
}
