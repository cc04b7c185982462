//! Opens the VM's VFIO passthrough devices (`--device`) and puts them on PCI bus 0: the VMM side of
//! [`tern_devices::vfio::device`], which needs BAR addresses and MSI vectors from the
//! [`PciManager`], memory slots for the BAR parts mapped straight into the guest ([`BarSlots`]),
//! and the host addresses of guest RAM for DMA mapping.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tern_devices::pci::bar::BarSpec;
use tern_devices::pci::msi::MsiRouteSink;
use tern_devices::sys::iova::Iova;
use tern_devices::sys::vfio_region_mmap::RegionMapping;
use tern_devices::vfio::bar_map::BarMemory;
use tern_devices::vfio::container::GuestRamRange;
use tern_devices::vfio::device::{PciResources, ResourceError, VfioDeviceError, VfioPciDevice};
use tern_devices::vfio::dma_space::DmaSpaces;
use tern_devices::vfio::handover::{HandoverError, InheritedDevices};
use tern_devices::vfio::preflight::HostRoots;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use crate::config::PassthroughConfig;
use crate::pci_manager::{PciManager, PciManagerError};
use crate::sys::kvm_memslot::DeviceSlot;
use crate::vstate::memory::GuestRam;
use crate::vstate::vm::Vm;

/// Errors adding passthrough devices.
#[derive(Debug, thiserror::Error)]
pub enum VfioManagerError {
    #[error(transparent)]
    Open(#[from] VfioDeviceError),
    #[error("guest RAM at {gpa:#x} has no host mapping")]
    HostAddress { gpa: u64 },
    #[error("live update")]
    Handover(#[from] HandoverError),
    #[error("--device {id}: cannot put it on PCI bus 0")]
    Add {
        id: String,
        #[source]
        source: PciManagerError,
    },
}

/// Highest memory slot id tern hands to device mappings (x86 KVM has 32764 user slots).
const MAX_DEVICE_SLOT: u32 = 32_000;

/// The VM's memory slots holding device mappings, numbered from just above the RAM slots
/// (`0..Vm::slot_count()`); freed ids are reused, as guests move BARs and toggle decode often.
#[derive(Debug)]
pub struct BarSlots {
    vm: Arc<Vm>,
    first: u32,
    slots: Mutex<BTreeMap<u32, DeviceSlot>>,
}

impl BarSlots {
    /// No device slots yet in `vm`.
    pub fn new(vm: Arc<Vm>) -> Self {
        let first = vm.slot_count();
        Self {
            vm,
            first,
            slots: Mutex::new(BTreeMap::new()),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, DeviceSlot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Device slots in use: (slot, guest address, length).
    pub fn in_use(&self) -> Vec<(u32, u64, u64)> {
        self.slots()
            .values()
            .map(|s| {
                let (gpa, len) = s.range();
                (s.slot(), gpa, len)
            })
            .collect()
    }

    fn map(&self, gpa: u64, mapping: &Arc<RegionMapping>) -> Result<u32, ResourceError> {
        let mut slots = self.slots();
        let slot = (self.first..=MAX_DEVICE_SLOT)
            .find(|s| !slots.contains_key(s))
            .ok_or("no KVM memory slot left for a device mapping")?;
        let s = DeviceSlot::new(self.vm.clone(), slot, gpa, mapping.clone())
            .map_err(|e| format!("KVM refused memory slot {slot} at {gpa:#x}: {e}"))?;
        slots.insert(slot, s);
        Ok(slot)
    }

    fn unmap(&self, slot: u32) {
        // Dropping the entry deletes the slot, then releases the mapping.
        self.slots().remove(&slot);
    }
}

/// One device's view of [`BarSlots`]: says on stderr which BAR parts bypass the VMM, since a
/// BAR the guest reaches without exits is otherwise invisible.
struct DeviceBarMemory {
    id: String,
    slots: Arc<BarSlots>,
}

impl BarMemory for DeviceBarMemory {
    fn map(&self, gpa: u64, mapping: &Arc<RegionMapping>) -> Result<u32, ResourceError> {
        let slot = self.slots.map(gpa, mapping)?;
        eprintln!(
            "tern: VFIO {}: BAR memory {gpa:#x}+{:#x} mapped into the guest as KVM memory slot {slot}",
            self.id,
            mapping.len()
        );
        Ok(slot)
    }

    fn unmap(&self, slot: u32) {
        self.slots.unmap(slot);
    }
}

/// The PCI manager as the VFIO device `id` sees it.
struct Resources<'a> {
    pci: &'a mut PciManager,
    id: &'a str,
    /// A live update's device: the vector eventfds it inherited (VFIO signals them).
    inherited: Option<Vec<EventFd>>,
}

impl PciResources for Resources<'_> {
    fn allocate_bar(&mut self, spec: &BarSpec) -> Result<u64, ResourceError> {
        Ok(self.pci.allocate_bar(spec)?)
    }

    fn msi_vectors(
        &mut self,
        count: u16,
    ) -> Result<(Arc<dyn MsiRouteSink>, Vec<EventFd>), ResourceError> {
        let (sink, fds) = match self.inherited.take() {
            Some(fds) if fds.len() == usize::from(count) => self.pci.msi_vectors_inherited(fds)?,
            Some(fds) => {
                return Err(format!(
                    "it has {count} MSI/MSI-X vectors, the old process handed {}",
                    fds.len()
                )
                .into())
            }
            None => self.pci.msi_vectors(count)?,
        };
        Ok((sink, fds))
    }

    fn bar_memory(&mut self) -> Option<Arc<dyn BarMemory>> {
        Some(Arc::new(DeviceBarMemory {
            id: self.id.to_string(),
            slots: self.pci.bar_slots(),
        }))
    }
}

/// Guest RAM as DMA ranges: IOVA = GPA, with tern's host address of each range.
pub fn dma_ranges(ram: &GuestRam) -> Result<Vec<GuestRamRange>, VfioManagerError> {
    ram.ranges()
        .iter()
        .map(|r| {
            let host = ram
                .memory()
                .get_host_address(r.gpa)
                .map_err(|_| VfioManagerError::HostAddress { gpa: r.gpa.0 })?;
            Ok(GuestRamRange {
                iova: Iova(r.gpa.0),
                host_addr: host as usize,
                len: r.len,
            })
        })
        .collect()
}

/// Opens every device in `configs` in the VM's DMA `spaces` and adds it to bus 0 (first free
/// slots, in order).
pub fn add_devices(
    pci: &mut PciManager,
    spaces: &mut DmaSpaces,
    configs: &[PassthroughConfig],
) -> Result<Vec<Arc<Mutex<VfioPciDevice>>>, VfioManagerError> {
    let mut devices = Vec::with_capacity(configs.len());
    for c in configs {
        let spec = c.spec();
        let mut resources = Resources {
            pci: &mut *pci,
            id: &c.id,
            inherited: None,
        };
        let dev = VfioPciDevice::open(&spec, &HostRoots::default(), spaces, &mut resources)?;
        let (dev, slot) = plug(pci, c, dev)?;
        log::info!("VFIO {}: {} in PCI slot {slot}", c.id, c.path.display());
        devices.push(dev);
    }
    Ok(devices)
}

/// Adds `dev` (the device of `c`) to bus 0; returns it shared, with its slot.
fn plug(
    pci: &mut PciManager,
    c: &PassthroughConfig,
    dev: VfioPciDevice,
) -> Result<(Arc<Mutex<VfioPciDevice>>, u8), VfioManagerError> {
    let dev = Arc::new(Mutex::new(dev));
    let slot = pci
        .add_vfio_device(dev.clone())
        .map_err(|source| VfioManagerError::Add {
            id: c.id.clone(),
            source,
        })?;
    Ok((dev, slot))
}

/// A live update's destination: builds every device in `configs` from what the old process
/// handed over (`inherited`, by id) and adds it to bus 0 in the same order (so in the same slots).
/// Nothing is opened or reset; a device of the VM that was not handed over, or one handed over
/// that the VM lacks, is an error.
pub fn add_inherited_devices(
    pci: &mut PciManager,
    inherited: &mut InheritedDevices,
    configs: &[PassthroughConfig],
) -> Result<Vec<Arc<Mutex<VfioPciDevice>>>, VfioManagerError> {
    let mut devices = Vec::with_capacity(configs.len());
    for c in configs {
        let mut handed = inherited.take(&c.id)?;
        let vectors = std::mem::take(&mut handed.vectors);
        let mut resources = Resources {
            pci: &mut *pci,
            id: &c.id,
            inherited: Some(vectors),
        };
        let dev = VfioPciDevice::inherit(handed, &mut resources)?;
        let (dev, slot) = plug(pci, c, dev)?;
        log::info!(
            "VFIO {}: inherited from the old process, PCI slot {slot}",
            c.id
        );
        devices.push(dev);
    }
    inherited.finish()?;
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_ranges_cover_all_guest_ram_with_iova_equal_to_gpa() {
        // 4 GiB of RAM is split around the MMIO hole: both ranges must be mapped.
        let ram = GuestRam::new(4 << 30).unwrap();
        let ranges = dma_ranges(&ram).unwrap();
        assert_eq!(ranges.len(), ram.ranges().len());
        assert!(ranges.len() >= 2);
        for (d, r) in ranges.iter().zip(ram.ranges()) {
            assert_eq!(d.iova, Iova(r.gpa.0));
            assert_eq!(d.len, r.len);
            assert_eq!(
                d.host_addr,
                ram.memory().get_host_address(r.gpa).unwrap() as usize
            );
        }
        assert_eq!(ranges.iter().map(|r| r.len).sum::<u64>(), 4 << 30);
    }

    #[test]
    fn bar_slots_number_above_ram_reuse_ids_and_refuse_overlaps() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let ram = GuestRam::new(64 << 20).unwrap();
        let vm = Arc::new(Vm::new(&kvm, &ram).unwrap());
        let slots = BarSlots::new(vm.clone());
        let first = vm.slot_count();
        let m = |len| Arc::new(RegionMapping::anonymous(len).unwrap());
        let a = slots.map(0xc000_0000, &m(0x10_0000)).unwrap();
        let b = slots.map(0xc010_0000, &m(0x1000)).unwrap();
        assert_eq!((a, b), (first, first + 1));
        assert_eq!(
            slots.in_use(),
            vec![(a, 0xc000_0000, 0x10_0000), (b, 0xc010_0000, 0x1000)]
        );
        // KVM refuses a slot over another one (or over RAM): an error, no slot taken.
        assert!(slots.map(0xc000_1000, &m(0x1000)).is_err());
        assert!(slots.map(0, &m(0x1000)).is_err());
        assert_eq!(slots.in_use().len(), 2);
        // A deleted slot's id and range are free again.
        slots.unmap(a);
        assert_eq!(slots.map(0xc000_1000, &m(0x1000)).unwrap(), first);
        slots.unmap(first);
        slots.unmap(b);
        assert!(slots.in_use().is_empty());
    }
}
