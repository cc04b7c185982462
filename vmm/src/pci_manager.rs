//! The VM's PCI bus: creates bus 0 with its host bridge, puts the configuration mechanism and the BAR
//! windows on the VMM's buses, allocates BARs, and routes MSI/MSI-X vectors into KVM.
//!
//! ```text
//!  guest config write ─► PciConfigIo (0xCF8) ─► PciBus ─► device.config_write
//!                                                 │        └─► MsiCap/Msix ─► MsiRouteSink ─► GsiRouter
//!                                                 └─► BAR map follows (PciWindow dispatch)     │
//!                                                                    KVM_SET_GSI_ROUTING ◄──────┤
//!                                                    KVM_IRQFD (vector eventfd → its GSI) ◄─────┘
//! ```
//!
//! **Windows.** 32-bit BARs come from the MMIO hole below the IOAPIC (0xC000_0000..0xFEC0_0000),
//! 64-bit BARs from a 64 GiB window starting at the first 1 GiB boundary above RAM, I/O BARs from
//! ports 0xC000..0x10000. Each window sits on the VMM's MMIO or PIO bus once, as a
//! [`PciWindow`]; the guest moving a BAR changes the bus's dispatch map inside the window, never the
//! VMM's buses, so vCPU threads never see a bus being rebuilt under them.
//!
//! **MSI and MSI-X.** Every vector a device registers gets its own GSI (from 24 up) and its own
//! eventfd. A device (or, for VFIO, the kernel via `VFIO_DEVICE_SET_IRQS`) signals the eventfd; KVM's
//! irqfd turns that into the message the guest programmed. When the guest enables, retargets, masks
//! or disables a vector, the device's capability emulation calls [`MsiRouteSink::set_route`]; the
//! router rewrites the whole routing table (`KVM_SET_GSI_ROUTING` replaces it) and registers or
//! unregisters the vector's irqfd. A masked vector has no irqfd, so a signal while masked stays in the
//! eventfd counter and KVM delivers it when the irqfd is registered again on unmask (irqfd assignment
//! polls the eventfd), which is the MSI-X pending-bit behaviour the guest expects.
//!
//! The routing table always carries KVM's default irqchip entries (GSI 0..15 to PIC and IOAPIC,
//! 16..23 to the IOAPIC), because replacing the table drops them otherwise and legacy devices (COM1 on
//! GSI 4) would go silent.
//!
//! **INTx (not used by any device yet).** A function with an interrupt pin gets IOAPIC pin
//! `16 + (slot + pin - 1) % 8` (the conventional swizzle above the ISA IRQs), announced to the guest in
//! the MP table / ACPI _PRT. Its line is level-triggered, so it is wired with
//! `register_irqfd_with_resample(trigger, resample, gsi)`: the device (VFIO: `VFIO_PCI_INTX_IRQ_INDEX`
//! with `VFIO_IRQ_SET_ACTION_TRIGGER`) signals `trigger` and KVM asserts the pin; when the guest EOIs
//! the IOAPIC entry, KVM de-asserts it and signals `resample`, which goes to VFIO's
//! `VFIO_IRQ_SET_ACTION_UNMASK` eventfd (or an emulated device re-checks its level and re-signals).
//! The IOAPIC pins 16..23 are already in the base routing table.
//!
//! **Migration.** Routes are not KVM state: after a restore each device replays its active vectors
//! ([`tern_devices::pci::msi::MsiCap::replay`], [`tern_devices::pci::msix::Msix::replay`]) through a
//! freshly built router.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use serde::{Deserialize, Serialize};
use tern_devices::bus::{Bus, BusError};
use tern_devices::pci::bar::{BarKind, BarSpec};
use tern_devices::pci::bus::{
    PciBus, PciBusError, PciSpace, PciWindow, PciWindowRange, SharedPciDevice,
};
use tern_devices::pci::config_io::{PciConfigIo, PCI_CONFIG_IO_LEN, PCI_CONFIG_IO_PORT};
use tern_devices::pci::msi::{MsiMessage, MsiRouteError, MsiRouteSink};
use tern_devices::pci::root::HostBridge;
use tern_devices::pci::{PciDevice, PciDeviceState, PciStateError};
use tern_devices::vfio::device::VfioPciDevice;
use vm_allocator::{AddressAllocator, AllocPolicy};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{IOAPIC_START, MMIO_HOLE_END, MMIO_HOLE_START};
use crate::vstate::vm::Vm;

/// 32-bit BAR window: the MMIO hole up to the IOAPIC.
pub const MEM32_WINDOW: (u64, u64) = (MMIO_HOLE_START, IOAPIC_START - MMIO_HOLE_START);
/// Size of the 64-bit BAR window above RAM.
pub const MEM64_WINDOW_BYTES: u64 = 64 << 30;
/// I/O BAR window (ports).
pub const IO_WINDOW: (u64, u64) = (0xc000, 0x4000);
/// IOAPIC pins KVM's in-kernel IOAPIC has; GSIs below this are irqchip pins.
pub const IOAPIC_PINS: u32 = 24;
/// GSIs tern hands to MSI/MSI-X vectors (well below KVM_MAX_IRQ_ROUTES = 4096).
pub const MAX_MSI_GSIS: u32 = 1024;

/// Errors building the PCI bus or adding to it.
#[derive(Debug, thiserror::Error)]
pub enum PciManagerError {
    #[error("cannot create the {what} BAR window {base:#x}+{len:#x}")]
    Window {
        what: &'static str,
        base: u64,
        len: u64,
        #[source]
        source: vm_allocator::Error,
    },
    #[error("no room for BAR {index} ({size:#x} bytes) in the {what} window")]
    AllocateBar {
        index: u8,
        size: u64,
        what: &'static str,
        #[source]
        source: vm_allocator::Error,
    },
    #[error("cannot program BAR {index}")]
    Bar {
        index: u8,
        #[source]
        source: tern_devices::pci::bar::BarError,
    },
    #[error("cannot add the device to PCI bus 0")]
    Bus(#[source] PciBusError),
    #[error("cannot place {what} on the VMM bus")]
    Place {
        what: &'static str,
        #[source]
        source: BusError,
    },
    #[error("cannot create the eventfd of MSI vector {vector}")]
    EventFd {
        vector: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("no GSI left for {asked} more MSI vectors ({MAX_MSI_GSIS} in all)")]
    GsisExhausted { asked: u16 },
    #[error("cannot restore a PCI function")]
    Restore(#[source] PciStateError),
    #[error("saved PCI state has a function in slot {slot}, which this VM does not have")]
    UnknownFunction { slot: u8 },
    #[error("saved PCI state lacks the function in slot {slot}")]
    MissingFunction { slot: u8 },
}

/// What a GSI is routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsiRoute {
    /// A pin of the in-kernel PIC (master 0, slave 1) or IOAPIC (2).
    Irqchip { chip: u32, pin: u32 },
    /// An MSI message.
    Msi(MsiMessage),
}

/// KVM's default irqchip routing: GSI 0..15 to both the PIC and the IOAPIC, 16..23 to the IOAPIC.
pub fn base_routes() -> Vec<(u32, GsiRoute)> {
    let mut routes = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        routes.push((
            gsi,
            GsiRoute::Irqchip {
                chip: KVM_IRQCHIP_IOAPIC,
                pin: gsi,
            },
        ));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push((gsi, GsiRoute::Irqchip { chip, pin: gsi % 8 }));
        }
    }
    routes
}

fn kvm_entry(gsi: u32, route: GsiRoute) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        ..Default::default()
    };
    match route {
        GsiRoute::Irqchip { chip, pin } => {
            e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
            e.u.irqchip = kvm_irq_routing_irqchip { irqchip: chip, pin };
        }
        GsiRoute::Msi(m) => {
            e.type_ = KVM_IRQ_ROUTING_MSI;
            e.u.msi = kvm_irq_routing_msi {
                address_lo: m.address as u32,
                address_hi: (m.address >> 32) as u32,
                data: m.data,
                ..Default::default()
            };
        }
    }
    e
}

#[derive(Debug)]
struct Vector {
    irqfd: EventFd,
    route: Option<MsiMessage>,
    registered: bool,
}

/// A KVM call about `vector`'s route or irqfd failed.
fn program_error(vector: u16, source: kvm_ioctls::Error) -> MsiRouteError {
    MsiRouteError::Program {
        vector,
        source: std::io::Error::from_raw_os_error(source.errno()),
    }
}

/// The VM's GSI routing table and the irqfds of every MSI vector.
#[derive(Debug)]
pub struct GsiRouter {
    vm: Arc<Vm>,
    inner: Mutex<RouterInner>,
    /// KVM_SET_GSI_ROUTING calls so far (each writes the whole table).
    table_writes: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct RouterInner {
    next_gsi: u32,
    vectors: BTreeMap<u32, Vector>,
    /// Live update: irqfds are kept off KVM (routes still change; `registered` says what is
    /// due once they go back on).
    irqfds_off: bool,
}

impl GsiRouter {
    /// A router with no MSI vectors (KVM keeps its default table until the first route is set).
    pub fn new(vm: Arc<Vm>) -> Self {
        Self {
            vm,
            inner: Mutex::new(RouterInner {
                next_gsi: IOAPIC_PINS,
                vectors: BTreeMap::new(),
                irqfds_off: false,
            }),
            table_writes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many times the routing table was written to KVM.
    pub fn table_writes(&self) -> u64 {
        self.table_writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes the whole table as `inner` has it (`vector` names the change in errors).
    fn write_table(&self, inner: &RouterInner, vector: u16) -> Result<(), MsiRouteError> {
        let entries: Vec<_> = Self::table_of(inner)
            .into_iter()
            .map(|(g, r)| kvm_entry(g, r))
            .collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| MsiRouteError::NoRouteLeft { vector })?;
        self.table_writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.vm
            .fd()
            .set_gsi_routing(&table)
            .map_err(|e| program_error(vector, e))
    }

    /// Puts `v`'s irqfd on `gsi` (`on`) or takes it off, unless it is so already; with irqfds
    /// off (`off`) only `registered` changes: what is due once they go back on.
    fn set_irqfd(
        &self,
        v: &mut Vector,
        gsi: u32,
        vector: u16,
        on: bool,
        off: bool,
    ) -> Result<(), MsiRouteError> {
        if v.registered != on && !off {
            self.kvm_irqfd(v, gsi, on)
                .map_err(|e| program_error(vector, e))?;
        }
        v.registered = on;
        Ok(())
    }

    /// Registers (`on`) or unregisters `v`'s irqfd on `gsi` with KVM.
    fn kvm_irqfd(&self, v: &Vector, gsi: u32, on: bool) -> Result<(), kvm_ioctls::Error> {
        if on {
            self.vm.fd().register_irqfd(&v.irqfd, gsi)
        } else {
            self.vm.fd().unregister_irqfd(&v.irqfd, gsi)
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, RouterInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `count` GSIs with an eventfd each; returns the GSIs and clones of the eventfds (the
    /// device, or VFIO, signals them).
    pub fn allocate(&self, count: u16) -> Result<Vec<(u32, EventFd)>, PciManagerError> {
        self.allocate_with(count, Vec::new())
    }

    /// Like [`GsiRouter::allocate`], with eventfds inherited from the old process of a live
    /// update (VFIO already signals them) instead of new ones.
    pub fn allocate_inherited(
        &self,
        fds: Vec<EventFd>,
    ) -> Result<Vec<(u32, EventFd)>, PciManagerError> {
        let count = u16::try_from(fds.len()).unwrap_or(u16::MAX);
        self.allocate_with(count, fds)
    }

    fn allocate_with(
        &self,
        count: u16,
        inherited: Vec<EventFd>,
    ) -> Result<Vec<(u32, EventFd)>, PciManagerError> {
        let mut inner = self.inner();
        if inner.next_gsi + u32::from(count) > IOAPIC_PINS + MAX_MSI_GSIS {
            return Err(PciManagerError::GsisExhausted { asked: count });
        }
        let mut inherited = inherited.into_iter();
        let mut out = Vec::with_capacity(usize::from(count));
        for vector in 0..count {
            let evt = |source| PciManagerError::EventFd { vector, source };
            let irqfd = match inherited.next() {
                Some(e) => e,
                None => EventFd::new(libc::EFD_NONBLOCK).map_err(evt)?,
            };
            let clone = irqfd.try_clone().map_err(evt)?;
            let gsi = inner.next_gsi + u32::from(vector);
            out.push((gsi, clone));
            inner.vectors.insert(
                gsi,
                Vector {
                    irqfd,
                    route: None,
                    registered: false,
                },
            );
        }
        inner.next_gsi += u32::from(count);
        Ok(out)
    }

    /// Live update: takes every registered irqfd off KVM and keeps them off (`on` false), so a
    /// vector VFIO signals stays in its eventfd's counter — the old process does this when it
    /// pauses, the new one from the start until the VM runs there; or puts them (back) on (`on`
    /// true: the new process at Commit, the old one when the handover failed), and KVM delivers
    /// what is pending. Routes keep changing meanwhile. Failures are logged; the count of irqfds
    /// changed is returned.
    pub fn set_irqfds(&self, on: bool) -> usize {
        let mut inner = self.inner();
        if inner.irqfds_off != on {
            return 0;
        }
        inner.irqfds_off = !on;
        let mut n = 0;
        for (&gsi, v) in inner.vectors.iter().filter(|(_, v)| v.registered) {
            match self.kvm_irqfd(v, gsi, on) {
                Ok(()) => n += 1,
                Err(e) => log::warn!("GSI {gsi}: irqfd {}: {e}", if on { "on" } else { "off" }),
            }
        }
        n
    }

    /// The full routing table as it would be programmed now.
    pub fn table(&self) -> Vec<(u32, GsiRoute)> {
        Self::table_of(&self.inner())
    }

    fn table_of(inner: &RouterInner) -> Vec<(u32, GsiRoute)> {
        let mut t = base_routes();
        t.extend(
            inner
                .vectors
                .iter()
                .filter_map(|(&gsi, v)| Some((gsi, GsiRoute::Msi(v.route?)))),
        );
        t
    }

    /// Sets the route of `gsi` (`vector` names it in errors) and its irqfd.
    pub fn set_route(
        &self,
        gsi: u32,
        vector: u16,
        route: Option<MsiMessage>,
    ) -> Result<(), MsiRouteError> {
        let mut inner = self.inner();
        let off = inner.irqfds_off;
        let Some(v) = inner.vectors.get_mut(&gsi) else {
            return Err(MsiRouteError::UnknownVector { vector, vectors: 0 });
        };
        let old = v.route;
        v.route = route;
        // Take the irqfd off first when disabling, so no signal lands on a route being removed.
        if route.is_none() {
            self.set_irqfd(v, gsi, vector, false, off)?;
        }
        if let Err(e) = self.write_table(&inner, vector) {
            if let Some(v) = inner.vectors.get_mut(&gsi) {
                v.route = old;
            }
            return Err(e);
        }
        let v = inner
            .vectors
            .get_mut(&gsi)
            .expect("looked up under the same lock");
        if route.is_some() {
            self.set_irqfd(v, gsi, vector, true, off)?;
        }
        Ok(())
    }

    /// Sets the routes of several vectors (`(gsi, vector, route)`) with one table write, then
    /// their irqfds: a restore replays every vector of a device at once, and each
    /// KVM_SET_GSI_ROUTING waits for the routing's readers (an SRCU grace period) inside the
    /// downtime. On a failure no route changed.
    pub fn set_routes(&self, routes: &[(u32, u16, MsiMessage)]) -> Result<(), MsiRouteError> {
        let Some(&(_, first, _)) = routes.first() else {
            return Ok(());
        };
        let mut inner = self.inner();
        let off = inner.irqfds_off;
        let mut old = Vec::with_capacity(routes.len());
        let undo = |inner: &mut RouterInner, old: Vec<(u32, Option<MsiMessage>)>| {
            for (gsi, route) in old {
                if let Some(v) = inner.vectors.get_mut(&gsi) {
                    v.route = route;
                }
            }
        };
        for &(gsi, vector, route) in routes {
            let Some(v) = inner.vectors.get_mut(&gsi) else {
                undo(&mut inner, old);
                return Err(MsiRouteError::UnknownVector { vector, vectors: 0 });
            };
            old.push((gsi, v.route));
            v.route = Some(route);
        }
        if let Err(e) = self.write_table(&inner, first) {
            undo(&mut inner, old);
            return Err(e);
        }
        for &(gsi, vector, _) in routes {
            if let Some(v) = inner.vectors.get_mut(&gsi) {
                self.set_irqfd(v, gsi, vector, true, off)?;
            }
        }
        Ok(())
    }
}

/// One device's view of the router: vector `i` is the `i`-th GSI it was given.
#[derive(Debug)]
pub struct DeviceMsiRoutes {
    router: Arc<GsiRouter>,
    gsis: Vec<u32>,
}

impl MsiRouteSink for DeviceMsiRoutes {
    fn set_route(&self, vector: u16, route: Option<MsiMessage>) -> Result<(), MsiRouteError> {
        let gsi = *self
            .gsis
            .get(usize::from(vector))
            .ok_or(MsiRouteError::UnknownVector {
                vector,
                vectors: self.gsis.len() as u16,
            })?;
        self.router.set_route(gsi, vector, route)
    }

    fn set_routes(&self, routes: &[(u16, MsiMessage)]) -> Result<(), MsiRouteError> {
        let vectors = self.gsis.len() as u16;
        let routes = routes
            .iter()
            .map(|&(vector, route)| {
                let gsi = *self
                    .gsis
                    .get(usize::from(vector))
                    .ok_or(MsiRouteError::UnknownVector { vector, vectors })?;
                Ok((gsi, vector, route))
            })
            .collect::<Result<Vec<_>, MsiRouteError>>()?;
        self.router.set_routes(&routes)
    }
}

/// Saved functions of bus 0, by slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciManagerState {
    pub functions: Vec<(u8, PciDeviceState)>,
}

/// Bus 0, its windows and allocators, and the interrupt router.
#[derive(Debug)]
pub struct PciManager {
    bus: Arc<Mutex<PciBus>>,
    mem32: AddressAllocator,
    mem64: AddressAllocator,
    io: AddressAllocator,
    mem64_base: u64,
    router: Arc<GsiRouter>,
    // Typed handle next to the bus's `dyn` one, so restore can replace the bridge's state in place.
    host_bridge: Arc<Mutex<HostBridge>>,
    // Memory slots of passthrough BAR parts mapped straight into the guest.
    bar_slots: Arc<crate::vfio_manager::BarSlots>,
    // Typed handles of the passthrough functions, by slot, so restore can load their state in place.
    vfio: Vec<(u8, Arc<Mutex<VfioPciDevice>>)>,
}

fn allocator(what: &'static str, base: u64, len: u64) -> Result<AddressAllocator, PciManagerError> {
    AddressAllocator::new(base, len).map_err(|source| PciManagerError::Window {
        what,
        base,
        len,
        source,
    })
}

impl PciManager {
    /// Bus 0 with the host bridge at 00:00.0, for a VM with `ram_bytes` of RAM.
    pub fn new(vm: Arc<Vm>, ram_bytes: u64) -> Result<Self, PciManagerError> {
        let ram_top = crate::arch::x86_64::layout::ram_ranges(ram_bytes)
            .last()
            .map_or(0, |r| r.gpa.0 + r.len)
            .max(MMIO_HOLE_END);
        let mem64_base = ram_top.next_multiple_of(1 << 30);
        let windows = vec![
            PciWindowRange {
                space: PciSpace::Memory,
                base: MEM32_WINDOW.0,
                len: MEM32_WINDOW.1,
            },
            PciWindowRange {
                space: PciSpace::Memory,
                base: mem64_base,
                len: MEM64_WINDOW_BYTES,
            },
            PciWindowRange {
                space: PciSpace::Io,
                base: IO_WINDOW.0,
                len: IO_WINDOW.1,
            },
        ];
        let mut bus = PciBus::new(windows);
        let host_bridge = Arc::new(Mutex::new(HostBridge::new()));
        bus.add_device(Some(0), host_bridge.clone())
            .map_err(PciManagerError::Bus)?;
        Ok(Self {
            bus: Arc::new(Mutex::new(bus)),
            mem32: allocator("32-bit", MEM32_WINDOW.0, MEM32_WINDOW.1)?,
            mem64: allocator("64-bit", mem64_base, MEM64_WINDOW_BYTES)?,
            io: allocator("I/O", IO_WINDOW.0, IO_WINDOW.1)?,
            mem64_base,
            bar_slots: Arc::new(crate::vfio_manager::BarSlots::new(vm.clone())),
            router: Arc::new(GsiRouter::new(vm)),
            host_bridge,
            vfio: Vec::new(),
        })
    }

    /// Puts the configuration mechanism on `pio` and the BAR windows on `mmio` and `pio`.
    pub fn place(&self, pio: &mut Bus, mmio: &mut Bus) -> Result<(), PciManagerError> {
        let place = |bus: &mut Bus, dev, base, len, what| {
            bus.insert(dev, base, len)
                .map_err(|source| PciManagerError::Place { what, source })
        };
        let window =
            |space, base| Arc::new(Mutex::new(PciWindow::new(self.bus.clone(), space, base)));
        place(
            pio,
            Arc::new(Mutex::new(PciConfigIo::new(self.bus.clone()))),
            PCI_CONFIG_IO_PORT,
            PCI_CONFIG_IO_LEN,
            "the PCI configuration ports",
        )?;
        place(
            mmio,
            window(PciSpace::Memory, MEM32_WINDOW.0),
            MEM32_WINDOW.0,
            MEM32_WINDOW.1,
            "the 32-bit PCI window",
        )?;
        place(
            mmio,
            window(PciSpace::Memory, self.mem64_base),
            self.mem64_base,
            MEM64_WINDOW_BYTES,
            "the 64-bit PCI window",
        )?;
        place(
            pio,
            window(PciSpace::Io, IO_WINDOW.0),
            IO_WINDOW.0,
            IO_WINDOW.1,
            "the PCI I/O window",
        )
    }

    /// The VM's memory slots for device mappings (one numbering for all passthrough devices).
    pub fn bar_slots(&self) -> Arc<crate::vfio_manager::BarSlots> {
        self.bar_slots.clone()
    }

    /// Finds an address for `spec` in the window its kind belongs to (naturally aligned).
    pub fn allocate_bar(&mut self, spec: &BarSpec) -> Result<u64, PciManagerError> {
        let (alloc, what) = match spec.kind {
            BarKind::Io => (&mut self.io, "I/O"),
            BarKind::Memory32 { .. } => (&mut self.mem32, "32-bit"),
            BarKind::Memory64 { .. } => (&mut self.mem64, "64-bit"),
        };
        let err = |source| PciManagerError::AllocateBar {
            index: spec.index,
            size: spec.size,
            what,
            source,
        };
        // Memory BARs at least page aligned, so a BAR can later become its own KVM memslot.
        let align = if spec.kind.is_io() {
            spec.size
        } else {
            spec.size.max(4096)
        };
        alloc
            .allocate(spec.size, align, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(err)
    }

    /// Adds `device` (its BARs already programmed, e.g. from [`PciManager::allocate_bar`]) in `slot`
    /// or the first free one; returns the slot.
    pub fn add_device(
        &self,
        slot: Option<u8>,
        device: SharedPciDevice,
    ) -> Result<u8, PciManagerError> {
        self.bus()
            .add_device(slot, device)
            .map_err(PciManagerError::Bus)
    }

    /// Adds a passthrough function like [`PciManager::add_device`], in the first free slot, and
    /// keeps its typed handle for [`PciManager::restore`].
    pub fn add_vfio_device(
        &mut self,
        device: Arc<Mutex<VfioPciDevice>>,
    ) -> Result<u8, PciManagerError> {
        let slot = self.add_device(None, device.clone())?;
        self.vfio.push((slot, device));
        Ok(slot)
    }

    /// `count` MSI/MSI-X vectors for one device: the sink its capability emulation reports to and the
    /// eventfd to signal for each vector (VFIO hands them to the kernel).
    pub fn msi_vectors(
        &self,
        count: u16,
    ) -> Result<(Arc<DeviceMsiRoutes>, Vec<EventFd>), PciManagerError> {
        let (gsis, fds) = self.router.allocate(count)?.into_iter().unzip();
        Ok((
            Arc::new(DeviceMsiRoutes {
                router: self.router.clone(),
                gsis,
            }),
            fds,
        ))
    }

    /// Like [`PciManager::msi_vectors`], over eventfds inherited in a live update.
    pub fn msi_vectors_inherited(
        &self,
        fds: Vec<EventFd>,
    ) -> Result<(Arc<DeviceMsiRoutes>, Vec<EventFd>), PciManagerError> {
        let (gsis, fds) = self.router.allocate_inherited(fds)?.into_iter().unzip();
        Ok((
            Arc::new(DeviceMsiRoutes {
                router: self.router.clone(),
                gsis,
            }),
            fds,
        ))
    }

    /// The interrupt router.
    pub fn router(&self) -> &Arc<GsiRouter> {
        &self.router
    }

    /// Bus 0.
    pub fn bus(&self) -> std::sync::MutexGuard<'_, PciBus> {
        self.bus.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Base of the 64-bit window.
    pub fn mem64_base(&self) -> u64 {
        self.mem64_base
    }

    /// Every function's state, by slot: the host bridge and the passthrough functions. vCPUs must
    /// be paused so no configuration access is in flight.
    pub fn save(&self) -> Result<PciManagerState, PciStateError> {
        let bus = self.bus();
        let functions = bus
            .slots()
            .map(|(slot, d)| {
                let d: &Mutex<dyn PciDevice> = d;
                Ok((slot, d.lock().unwrap_or_else(|p| p.into_inner()).save()?))
            })
            .collect::<Result<_, PciStateError>>()?;
        Ok(PciManagerState { functions })
    }

    /// Loads saved state into the existing functions (the destination of a migration). A state that
    /// names a function this VM does not have, lacks one it has, or does not fit the function in
    /// its slot (a passthrough function of another id or model), is refused before anything
    /// changes. A passthrough function's BARs then decode where the guest put them on the source
    /// (the bus's map and the function's memory slots follow). Each part is timed into `steps`.
    /// vCPUs must be paused.
    pub fn restore(
        &self,
        state: &PciManagerState,
        steps: &mut tern_migration::engine::StepTimes,
    ) -> Result<(), PciManagerError> {
        let mut bridge = None;
        let mut vfio = Vec::new();
        for (slot, f) in &state.functions {
            match (slot, f) {
                (0, PciDeviceState::HostBridge(s)) => {
                    bridge = Some(HostBridge::restore(s).map_err(PciManagerError::Restore)?)
                }
                (slot, PciDeviceState::Vfio(s)) => {
                    let (_, device) = self
                        .vfio
                        .iter()
                        .find(|(at, _)| at == slot)
                        .ok_or(PciManagerError::UnknownFunction { slot: *slot })?;
                    device
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .check_restore(s)
                        .map_err(PciManagerError::Restore)?;
                    vfio.push((*slot, device, s));
                }
                (slot, _) => return Err(PciManagerError::UnknownFunction { slot: *slot }),
            }
        }
        let bridge = bridge.ok_or(PciManagerError::MissingFunction { slot: 0 })?;
        if let Some((slot, _)) = self
            .vfio
            .iter()
            .find(|(at, _)| !vfio.iter().any(|(s, ..)| s == at))
        {
            return Err(PciManagerError::MissingFunction { slot: *slot });
        }
        *self.host_bridge.lock().unwrap_or_else(|p| p.into_inner()) = bridge;
        steps.lap("PCI: states checked");
        for (slot, device, s) in vfio {
            device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore(s)
                .map_err(PciManagerError::Restore)?;
            steps.lap("PCI: VFIO function (command, MSI routes)");
            for e in self.bus().refresh(slot) {
                log::warn!("PCI slot {slot}: {e}");
            }
            steps.lap("PCI: BARs placed (memory slots)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::GuestRam;
    use tern_migration::engine::StepTimes;

    fn vm() -> Arc<Vm> {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let ram = GuestRam::new(16 << 20).unwrap();
        Arc::new(Vm::new(&kvm, &ram).unwrap())
    }

    fn buses(m: &PciManager) -> (Bus, Bus) {
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        m.place(&mut pio, &mut mmio).unwrap();
        (pio, mmio)
    }

    fn cfg_read(pio: &Bus, slot: u32, reg: u32) -> u32 {
        pio.write(
            0xcf8,
            &(0x8000_0000 | (slot << 11) | (reg * 4)).to_le_bytes(),
        );
        let mut b = [0u8; 4];
        pio.read(0xcfc, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn pci_manager_exposes_only_the_host_bridge() {
        let m = PciManager::new(vm(), 64 << 20).unwrap();
        let (pio, _) = buses(&m);
        assert_eq!(cfg_read(&pio, 0, 0), 0x0008_1b36);
        assert_eq!(cfg_read(&pio, 0, 2) >> 8, 0x060000);
        for slot in 1..32 {
            assert_eq!(cfg_read(&pio, slot, 0), 0xffff_ffff, "slot {slot}");
        }
    }

    #[test]
    fn pci_manager_windows_sit_above_ram_and_below_the_ioapic() {
        let m = PciManager::new(vm(), 64 << 20).unwrap();
        assert_eq!(m.mem64_base(), 4 << 30);
        // 5 GiB of RAM: 3 GiB low, 2 GiB from 4 GiB up to 6 GiB.
        let big = PciManager::new(vm(), 5 << 30).unwrap();
        assert_eq!(big.mem64_base(), 6 << 30);
        let (_, mmio) = buses(&m);
        let mut b = [0u8; 4];
        // Window present but nothing decoded: all-ones, and the bus claims the access.
        assert!(mmio.read(MEM32_WINDOW.0, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(
            !mmio.read(IOAPIC_START, &mut b),
            "the IOAPIC must stay outside"
        );
        assert!(mmio.read(4 << 30, &mut b));
    }

    #[test]
    fn pci_manager_allocates_aligned_bars_per_window_until_full() {
        let mut m = PciManager::new(vm(), 64 << 20).unwrap();
        let spec = |index, kind, size| BarSpec { index, kind, size };
        let m32 = BarKind::Memory32 {
            prefetchable: false,
        };
        let a = m.allocate_bar(&spec(0, m32, 0x100)).unwrap();
        let b = m.allocate_bar(&spec(1, m32, 0x10_0000)).unwrap();
        assert!(a >= MEM32_WINDOW.0 && a.is_multiple_of(4096));
        assert!(b.is_multiple_of(0x10_0000) && (b >= a + 4096 || b + 0x10_0000 <= a));
        let c = m
            .allocate_bar(&spec(0, BarKind::Memory64 { prefetchable: true }, 1 << 30))
            .unwrap();
        assert!(c >= 4 << 30 && c.is_multiple_of(1 << 30));
        let io = m.allocate_bar(&spec(2, BarKind::Io, 0x20)).unwrap();
        assert!((IO_WINDOW.0..IO_WINDOW.0 + IO_WINDOW.1).contains(&io) && io.is_multiple_of(0x20));
        // The 32-bit window is 0xC000_0000..0xFEC0_0000 and its first 512 MiB-aligned slot is taken
        // by the small BARs: a 256 MiB BAR still fits, a 512 MiB one cannot.
        assert_eq!(m.allocate_bar(&spec(3, m32, 1 << 28)).unwrap(), 0xd000_0000);
        assert!(matches!(
            m.allocate_bar(&spec(4, m32, 1 << 29)),
            Err(PciManagerError::AllocateBar { index: 4, .. })
        ));
    }

    #[test]
    fn gsi_base_routes_match_kvm_defaults() {
        let t = base_routes();
        // 24 IOAPIC pins + 16 PIC pins.
        assert_eq!(t.len(), 40);
        assert!(t.contains(&(
            4,
            GsiRoute::Irqchip {
                chip: KVM_IRQCHIP_IOAPIC,
                pin: 4
            }
        )));
        assert!(t.contains(&(
            4,
            GsiRoute::Irqchip {
                chip: KVM_IRQCHIP_PIC_MASTER,
                pin: 4
            }
        )));
        assert!(t.contains(&(
            10,
            GsiRoute::Irqchip {
                chip: KVM_IRQCHIP_PIC_SLAVE,
                pin: 2
            }
        )));
        assert!(t.contains(&(
            23,
            GsiRoute::Irqchip {
                chip: KVM_IRQCHIP_IOAPIC,
                pin: 23
            }
        )));
        assert!(!t.iter().any(|(g, r)| *g >= 16
            && matches!(r, GsiRoute::Irqchip { chip, .. } if *chip != KVM_IRQCHIP_IOAPIC)));
    }

    #[test]
    fn inherited_vectors_keep_their_eventfds_and_irqfds_wait_while_held() {
        let m = PciManager::new(vm(), 16 << 20).unwrap();
        let theirs = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (sink, fds) = m
            .msi_vectors_inherited(vec![theirs.try_clone().unwrap()])
            .unwrap();
        // The device's vector is the inherited eventfd itself.
        theirs.write(2).unwrap();
        assert_eq!(fds[0].read().unwrap(), 2);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        // Held: the route is programmed, the irqfd is not registered with KVM yet, so a second
        // registration by hand succeeds (KVM would refuse a duplicate with EBUSY)...
        assert_eq!(m.router().set_irqfds(false), 0);
        sink.set_route(0, Some(msg)).unwrap();
        assert!(m
            .router()
            .table()
            .contains(&(IOAPIC_PINS, GsiRoute::Msi(msg))));
        let gsi = IOAPIC_PINS;
        m.router().vm.fd().register_irqfd(&theirs, gsi).unwrap();
        m.router().vm.fd().unregister_irqfd(&theirs, gsi).unwrap();
        // ...and on release it is registered (now a manual one is a duplicate).
        assert_eq!(m.router().set_irqfds(true), 1);
        assert!(m.router().vm.fd().register_irqfd(&theirs, gsi).is_err());
        // Off again: nothing registered, the route stays.
        assert_eq!(m.router().set_irqfds(false), 1);
        m.router().vm.fd().register_irqfd(&theirs, gsi).unwrap();
        m.router().vm.fd().unregister_irqfd(&theirs, gsi).unwrap();
        assert_eq!(m.router().set_irqfds(false), 0, "already off");
    }

    #[test]
    fn gsi_router_programs_kvm_and_irqfds() {
        let m = PciManager::new(vm(), 16 << 20).unwrap();
        let (sink, fds) = m.msi_vectors(3).unwrap();
        assert_eq!(fds.len(), 3);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        sink.set_route(1, Some(msg)).unwrap();
        let table = m.router().table();
        assert_eq!(table.len(), 41);
        assert!(table.contains(&(IOAPIC_PINS + 1, GsiRoute::Msi(msg))));
        // Registering the same irqfd twice is refused by KVM (EBUSY): re-setting the route must not
        // try, so a retarget works.
        let msg2 = MsiMessage { data: 0x42, ..msg };
        sink.set_route(1, Some(msg2)).unwrap();
        assert!(m
            .router()
            .table()
            .contains(&(IOAPIC_PINS + 1, GsiRoute::Msi(msg2))));
        // Signalling the vector with the route in place is accepted by the eventfd.
        fds[1].write(1).unwrap();
        sink.set_route(1, None).unwrap();
        assert_eq!(m.router().table().len(), 40);
        // Disabling twice is harmless.
        sink.set_route(1, None).unwrap();
        assert!(matches!(
            sink.set_route(3, Some(msg)),
            Err(MsiRouteError::UnknownVector {
                vector: 3,
                vectors: 3
            })
        ));
        // GSIs of a second device do not collide with the first's.
        let (sink2, _) = m.msi_vectors(1).unwrap();
        sink2.set_route(0, Some(msg)).unwrap();
        sink.set_route(0, Some(msg2)).unwrap();
        let t = m.router().table();
        assert!(t.contains(&(IOAPIC_PINS + 3, GsiRoute::Msi(msg))));
        assert!(t.contains(&(IOAPIC_PINS, GsiRoute::Msi(msg2))));
    }

    #[test]
    fn a_replay_of_many_vectors_writes_the_routing_table_once() {
        let m = PciManager::new(vm(), 16 << 20).unwrap();
        let (sink, _fds) = m.msi_vectors(8).unwrap();
        let routes: Vec<(u16, MsiMessage)> = (0..8)
            .map(|v| {
                let msg = MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x40 + u32::from(v),
                };
                (v, msg)
            })
            .collect();
        let before = m.router().table_writes();
        sink.set_routes(&routes).unwrap();
        assert_eq!(
            m.router().table_writes() - before,
            1,
            "one table write for 8 vectors"
        );
        let table = m.router().table();
        for (v, msg) in &routes {
            assert!(table.contains(&(IOAPIC_PINS + u32::from(*v), GsiRoute::Msi(*msg))));
        }
        // Each vector's irqfd is registered: a second registration by hand is refused (EBUSY)
        // and a later per-vector change does not try again.
        let (gsi, fd) = (IOAPIC_PINS + 3, &_fds[3]);
        assert!(m.router().vm.fd().register_irqfd(fd, gsi).is_err());
        sink.set_route(3, Some(routes[4].1)).unwrap();
        // A vector outside the device's refuses the whole batch and changes no route.
        let bad = [(1, routes[0].1), (9, routes[0].1)];
        assert!(matches!(
            sink.set_routes(&bad),
            Err(MsiRouteError::UnknownVector { vector: 9, .. })
        ));
        assert!(m
            .router()
            .table()
            .contains(&(IOAPIC_PINS + 1, GsiRoute::Msi(routes[1].1))));
    }

    #[test]
    fn gsi_router_refuses_more_vectors_than_gsis() {
        let m = PciManager::new(vm(), 16 << 20).unwrap();
        m.msi_vectors(1000).unwrap();
        assert!(matches!(
            m.msi_vectors(25),
            Err(PciManagerError::GsisExhausted { asked: 25 })
        ));
        m.msi_vectors(24).unwrap();
    }

    #[test]
    fn pci_manager_saves_the_host_bridge() {
        let m = PciManager::new(vm(), 16 << 20).unwrap();
        let (pio, _) = buses(&m);
        // Guest enables bus mastering on the bridge through the ports.
        pio.write(0xcf8, &0x8000_0004u32.to_le_bytes());
        pio.write(0xcfc, &[0x04]);
        let saved = m.save().unwrap();
        assert_eq!(saved.functions.len(), 1);
        let (0, PciDeviceState::HostBridge(s)) = &saved.functions[0] else {
            panic!("host bridge not in slot 0: {saved:?}");
        };
        assert_eq!(s.config.regs[1] & 0xffff, 0x4);
        // A new manager from that state shows the guest the same command register.
        let json = serde_json::to_vec(&saved).unwrap();
        let back: PciManagerState = serde_json::from_slice(&json).unwrap();
        let r = PciManager::new(vm(), 16 << 20).unwrap();
        let (pio, _) = buses(&r);
        assert_eq!(cfg_read(&pio, 0, 1) & 0xffff, 0);
        r.restore(&back, &mut StepTimes::start()).unwrap();
        assert_eq!(cfg_read(&pio, 0, 1) & 0xffff, 0x4);
        assert_eq!(cfg_read(&pio, 0, 0), 0x0008_1b36);
        // Refused states leave the restored bridge as it was.
        let mut fresh = back.clone();
        let PciDeviceState::HostBridge(s) = &mut fresh.functions[0].1 else {
            panic!("slot 0 is the host bridge");
        };
        s.config.regs[1] = 0;
        fresh.functions.push((3, fresh.functions[0].1.clone()));
        assert!(matches!(
            r.restore(&fresh, &mut StepTimes::start()),
            Err(PciManagerError::UnknownFunction { slot: 3 })
        ));
        assert!(matches!(
            r.restore(
                &PciManagerState { functions: vec![] },
                &mut StepTimes::start()
            ),
            Err(PciManagerError::MissingFunction { slot: 0 })
        ));
        // A passthrough function's state for a slot without one.
        let PciDeviceState::HostBridge(bridge) = &back.functions[0].1 else {
            panic!("slot 0 is the host bridge");
        };
        let mut vfio = back.clone();
        vfio.functions.push((
            2,
            PciDeviceState::Vfio(tern_devices::vfio::device::VfioPciState {
                id: "mtty0".into(),
                config: bridge.config.clone(),
                bars: vec![],
                msi: None,
                msix: None,
            }),
        ));
        assert!(matches!(
            r.restore(&vfio, &mut StepTimes::start()),
            Err(PciManagerError::UnknownFunction { slot: 2 })
        ));
        assert_eq!(cfg_read(&pio, 0, 1) & 0xffff, 0x4);
    }
}
