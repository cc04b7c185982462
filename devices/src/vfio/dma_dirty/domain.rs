//! One dirty source per tracking domain: devices that share a HWPT or a type1 container share its
//! dirty bits, so the engine reads them once per chunk and the stats name every device behind
//! them; a device's own DMA logger is a domain of its own.

use std::sync::Arc;

use tern_migration::dirty::DirtySource;
use vfio_ioctls::VfioDevice;

use super::hwpt::HwptDirtySource;
use super::logging::DmaLoggingSource;
use super::type1::Type1DirtySource;
use super::MappedRange;
use crate::vfio::container::Type1Dma;
use crate::vfio::iommufd::Hwpt;

/// Where one device's DMA writes are recorded.
#[derive(Clone)]
pub enum DirtyDomain {
    /// IOMMU dirty tracking of a HWPT (iommufd).
    Hwpt(Arc<Hwpt>),
    /// `VFIO_IOMMU_DIRTY_PAGES` of a type1 container.
    Type1(Arc<Type1Dma>),
    /// The device's own DMA logging over the ranges mapped for it.
    Logging {
        device: Arc<VfioDevice>,
        mapped: Vec<MappedRange>,
    },
}

impl std::fmt::Debug for DirtyDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirtyDomain::Hwpt(h) => f.debug_tuple("Hwpt").field(&h.id()).finish(),
            DirtyDomain::Type1(t) => f.debug_tuple("Type1").field(t).finish(),
            DirtyDomain::Logging { mapped, .. } => {
                f.debug_struct("Logging").field("mapped", mapped).finish()
            }
        }
    }
}

impl DirtyDomain {
    /// Whether `self` and `other` are the same tracking domain.
    fn same(&self, other: &DirtyDomain) -> bool {
        match (self, other) {
            (DirtyDomain::Hwpt(a), DirtyDomain::Hwpt(b)) => Arc::ptr_eq(a, b),
            (DirtyDomain::Type1(a), DirtyDomain::Type1(b)) => Arc::ptr_eq(a, b),
            (DirtyDomain::Logging { device: a, .. }, DirtyDomain::Logging { device: b, .. }) => {
                Arc::ptr_eq(a, b)
            }
            _ => false,
        }
    }

    fn source(&self, devices: &[&str]) -> Box<dyn DirtySource> {
        match self {
            DirtyDomain::Hwpt(h) => Box::new(HwptDirtySource::new(
                h.space().iommufd().clone(),
                h.id(),
                MappedRange::from_mappings(&h.space().mapped()),
                devices,
            )),
            DirtyDomain::Type1(t) => Box::new(Type1DirtySource::new(
                t.container().clone(),
                MappedRange::from_mappings(&t.mapped()),
                devices,
            )),
            DirtyDomain::Logging { device, mapped } => Box::new(DmaLoggingSource::new(
                device.clone(),
                mapped.clone(),
                &devices.join(","),
            )),
        }
    }
}

/// One source per distinct domain among `devices` (device id, its domain), in first-seen order,
/// each labelled with every device id behind it.
pub fn sources(devices: &[(String, DirtyDomain)]) -> Vec<Box<dyn DirtySource>> {
    let mut groups: Vec<(&DirtyDomain, Vec<&str>)> = Vec::new();
    for (id, domain) in devices {
        match groups.iter_mut().find(|(d, _)| d.same(domain)) {
            Some((_, ids)) => ids.push(id),
            None => groups.push((domain, vec![id])),
        }
    }
    groups
        .into_iter()
        .map(|(domain, ids)| domain.source(&ids))
        .collect()
}
