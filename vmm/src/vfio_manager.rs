//! Opens the VM's VFIO passthrough devices (`--device`) and puts them on PCI bus 0: the VMM side of
//! [`tern_devices::vfio::device`], which needs BAR addresses and MSI vectors from the
//! [`PciManager`] and the host addresses of guest RAM for DMA mapping.

use std::sync::{Arc, Mutex};

use tern_devices::pci::bar::BarSpec;
use tern_devices::pci::msi::MsiRouteSink;
use tern_devices::sys::iova::Iova;
use tern_devices::vfio::container::GuestRamRange;
use tern_devices::vfio::device::{PciResources, ResourceError, VfioDeviceError, VfioPciDevice};
use tern_devices::vfio::preflight::HostRoots;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use crate::config::PassthroughConfig;
use crate::pci_manager::{PciManager, PciManagerError};
use crate::vstate::memory::GuestRam;

/// Errors adding passthrough devices.
#[derive(Debug, thiserror::Error)]
pub enum VfioManagerError {
    #[error(transparent)]
    Open(#[from] VfioDeviceError),
    #[error("guest RAM at {gpa:#x} has no host mapping")]
    HostAddress { gpa: u64 },
    #[error("--device {id}: cannot put it on PCI bus 0")]
    Add {
        id: String,
        #[source]
        source: PciManagerError,
    },
}

/// The PCI manager as the VFIO device sees it.
struct Resources<'a>(&'a mut PciManager);

impl PciResources for Resources<'_> {
    fn allocate_bar(&mut self, spec: &BarSpec) -> Result<u64, ResourceError> {
        Ok(self.0.allocate_bar(spec)?)
    }

    fn msi_vectors(
        &mut self,
        count: u16,
    ) -> Result<(Arc<dyn MsiRouteSink>, Vec<EventFd>), ResourceError> {
        let (sink, fds) = self.0.msi_vectors(count)?;
        Ok((sink, fds))
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

/// Opens every device in `configs` and adds it to bus 0 (first free slots, in order).
pub fn add_devices(
    pci: &mut PciManager,
    ram: &GuestRam,
    configs: &[PassthroughConfig],
) -> Result<Vec<Arc<Mutex<VfioPciDevice>>>, VfioManagerError> {
    if configs.is_empty() {
        return Ok(Vec::new());
    }
    let ranges = dma_ranges(ram)?;
    let mut devices = Vec::with_capacity(configs.len());
    for c in configs {
        let spec = c.spec();
        let dev = VfioPciDevice::open(&spec, &HostRoots::default(), &ranges, &mut Resources(pci))?;
        let dev = Arc::new(Mutex::new(dev));
        let slot = pci
            .add_device(None, dev.clone())
            .map_err(|source| VfioManagerError::Add {
                id: c.id.clone(),
                source,
            })?;
        log::info!("VFIO {}: {} in PCI slot {slot}", c.id, c.path.display());
        devices.push(dev);
    }
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
}
