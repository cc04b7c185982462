//! Where a VM's passthrough devices DMA: at most one type1 container and one iommufd IOAS per VM,
//! opened when the first device needs it and shared by all the others (QEMU shares them too), so
//! guest RAM is mapped and pinned once, not once per device, and devices behind one IOMMU share one
//! HWPT and one dirty bitmap.

use std::sync::Arc;

use super::container::{GuestRamRange, Type1Dma, Type1Error};
use super::iommufd::{IommufdBackendError, IommufdSpace};

/// The VM's DMA spaces and the guest RAM they map.
#[derive(Debug)]
pub struct DmaSpaces {
    ram: Vec<GuestRamRange>,
    type1: Option<Arc<Type1Dma>>,
    iommufd: Option<Arc<IommufdSpace>>,
}

impl DmaSpaces {
    /// No space open yet; `ram` is what each maps (IOVA = GPA).
    pub fn new(ram: Vec<GuestRamRange>) -> Self {
        DmaSpaces {
            ram,
            type1: None,
            iommufd: None,
        }
    }

    /// Guest RAM as DMA ranges.
    pub fn ram(&self) -> &[GuestRamRange] {
        &self.ram
    }

    /// The VM's type1 container, opened on first use. Its RAM is mapped when the first device's
    /// group has joined ([`Type1Dma::join`]).
    pub fn type1(&mut self) -> Result<Arc<Type1Dma>, Type1Error> {
        if let Some(t) = &self.type1 {
            return Ok(t.clone());
        }
        let t = Type1Dma::open()?;
        self.type1 = Some(t.clone());
        Ok(t)
    }

    /// The VM's iommufd IOAS with all guest RAM mapped, opened and mapped on first use.
    pub fn iommufd(&mut self) -> Result<Arc<IommufdSpace>, IommufdBackendError> {
        if let Some(s) = &self.iommufd {
            return Ok(s.clone());
        }
        let s = IommufdSpace::open()?;
        s.map(&self.ram)?;
        self.iommufd = Some(s.clone());
        Ok(s)
    }
}
