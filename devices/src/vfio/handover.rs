//! Live update of passthrough devices: a same-host (local) migration hands each device to the new
//! tern process as it is — its VFIO device fd, the type1 container or iommufd fd, and the
//! eventfds VFIO signals for its vectors travel over the Unix socket (SCM_RIGHTS) with a JSON
//! [`HandoverMeta`] each. No device state is read and the device is never reset: vfio-pci resets
//! a function on its first open and last close, and the file stays open throughout (the old
//! process closes its descriptors only after the new one took over).
//!
//! ```text
//!  source (running)   collect: fds + meta ──────────► destination: InheritedDevices::from_fds
//!                                                      VfioPciDevice::inherit (no open, no reset;
//!                                                      BARs mmap'ed from the inherited fd)
//!  source (paused)    release: type1 VFIO_DMA_UNMAP_FLAG_VADDR (all); irqfds off
//!                     state ─────────────────────────► take_over: type1 VFIO_DMA_MAP_FLAG_VADDR
//!                                                      per mapping (its own address of the same
//!                                                      memfd); iommufd IOMMU_IOAS_CHANGE_PROCESS
//!                                                      where the kernel has it; restore: routes and
//!                                                      irqfds on the inherited eventfds
//!                     ◄──────────────────────── Ready / Commit / Ack
//!  failure before Commit: reclaim (type1: own addresses again) and resume
//! ```
//!
//! The IOMMU keeps translating throughout: a vfio-pci device's pages are pinned when mapped, and
//! invalidating the process address only stops new pins (mdev drivers pin on demand, which is why
//! the kernel offers `VFIO_UPDATE_VADDR` only without an mdev in the container).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::container::GuestRamRange;
use crate::sys::fd_handover::{adopt_eventfd, duplicate, AdoptError};
use crate::sys::iommufd_change_process::{change_process, AccountingMove};
use crate::sys::iova::Iova;
use crate::sys::vfio_device_fd::{DeviceFd, DeviceFdError};
use crate::sys::vfio_dma_vaddr::{invalidate, supports_update_vaddr, update_vaddr, VaddrError};

/// What one handed-over descriptor is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HandoverMeta {
    /// A type1 container and its DMA mappings (IOVA, bytes; IOVA = GPA). `key` is how the
    /// devices in it name it.
    Type1Container { key: i32, mappings: Vec<(u64, u64)> },
    /// An iommufd with the VM's IOAS (its mappings stay as they are).
    Iommufd { key: i32, ioas: u32 },
    /// A device file (bound and attached as it was).
    Device(HandedDevice),
    /// The eventfd VFIO signals for vector `vector` of device `id`.
    Vector { id: String, vector: u16 },
}

/// What the new process needs to know of a handed device besides its fd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedDevice {
    pub id: String,
    pub sysfs: PathBuf,
    /// true: iommufd cdev; false: type1 group.
    pub iommufd: bool,
    /// The `key` of the container or iommufd it is in.
    pub dma_key: i32,
    /// The HWPT it is attached to (iommufd).
    pub hwpt: Option<u32>,
    pub vendor_id: u16,
    pub device_id: u16,
    /// Vector eventfds that follow (one per MSI/MSI-X vector the VMM gave it).
    pub vectors: u16,
}

/// Errors of a live update's device handover.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("device {id} is an mdev: the kernel's type1 update-vaddr interface (VFIO_UPDATE_VADDR) excludes mdevs, whose drivers pin pages by process address, so its DMA cannot move to a new process")]
    Mdev { id: String },
    #[error("device {id}: its type1 container does not offer VFIO_UPDATE_VADDR (the kernel withholds it while an mdev or other emulated IOMMU user is in the container), so the DMA mappings cannot move to a new process")]
    NoUpdateVaddr { id: String },
    #[error("device {id} has no VFIO device file or DMA space to hand over")]
    NotVfio { id: String },
    #[error("cannot duplicate a descriptor of device {id}")]
    Duplicate {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a handed descriptor's description does not parse")]
    Meta(#[source] serde_json::Error),
    #[error("the VM's device {id} was not handed over")]
    Missing { id: String },
    #[error("device {id} was handed over twice")]
    Duplicated { id: String },
    #[error("device {id}: {got} vector eventfds arrived, {want} announced")]
    Vectors { id: String, got: usize, want: u16 },
    #[error("device {id} names DMA space {key}, which was not handed over")]
    NoSpace { id: String, key: i32 },
    #[error("device {id}: vector {vector}")]
    Vector {
        id: String,
        vector: u16,
        #[source]
        source: AdoptError,
    },
    #[error("device {id}: the inherited device file")]
    DeviceFd {
        id: String,
        #[source]
        source: DeviceFdError,
    },
    #[error("handed devices nobody asked for: {ids:?}")]
    Unclaimed { ids: Vec<String> },
    #[error("DMA mapping {iova:#x}+{len:#x} is not inside guest RAM")]
    NotRam { iova: Iova, len: usize },
    #[error("type1 DMA mappings")]
    Vaddr(#[source] VaddrError),
}

/// A device's DMA space as a live update sees it.
#[derive(Debug, Clone)]
pub enum DmaHandle {
    Type1 {
        container: RawFd,
        mappings: Vec<(Iova, usize)>,
    },
    Iommufd {
        iommufd: RawFd,
        ioas: u32,
        hwpt: u32,
    },
}

impl DmaHandle {
    fn key(&self) -> RawFd {
        match self {
            DmaHandle::Type1 { container, .. } => *container,
            DmaHandle::Iommufd { iommufd, .. } => *iommufd,
        }
    }
}

/// What the source needs to know of each device it hands over.
#[derive(Debug)]
pub struct DeviceParts<'a> {
    pub id: &'a str,
    pub sysfs: &'a std::path::Path,
    pub mdev: bool,
    pub vendor_id: u16,
    pub device_id: u16,
    pub device_fd: Option<RawFd>,
    pub dma: Option<DmaHandle>,
    pub vectors: &'a [EventFd],
}

/// The descriptors to send, in order (each space before its devices, a device before its
/// vectors), the devices' ids, and per device what becomes of its pinning accounting.
#[derive(Debug, Default)]
pub struct Collected {
    pub fds: Vec<(Vec<u8>, OwnedFd)>,
    pub devices: Vec<String>,
    pub notes: Vec<(String, String)>,
}

fn meta_bytes(m: &HandoverMeta) -> Vec<u8> {
    serde_json::to_vec(m).expect("handover meta is plain data")
}

/// Source side: checks every device can go to a new process as it is and duplicates its
/// descriptors. Refused, naming the device and why, before anything is sent.
pub fn collect(devices: &[DeviceParts<'_>]) -> Result<Collected, HandoverError> {
    let mut out = Collected::default();
    let mut spaces: Vec<RawFd> = Vec::new();
    for d in devices {
        let id = d.id.to_string();
        if d.mdev {
            return Err(HandoverError::Mdev { id });
        }
        let (Some(fd), Some(dma)) = (d.device_fd, d.dma.clone()) else {
            return Err(HandoverError::NotVfio { id });
        };
        let dup = |fd: &dyn AsRawFd| {
            duplicate(&fd.as_raw_fd()).map_err(|source| HandoverError::Duplicate {
                id: id.clone(),
                source,
            })
        };
        let key = dma.key();
        let hwpt = match &dma {
            DmaHandle::Type1 {
                container,
                mappings,
            } => {
                if !supports_update_vaddr(container) {
                    return Err(HandoverError::NoUpdateVaddr { id });
                }
                if !spaces.contains(&key) {
                    let m = HandoverMeta::Type1Container {
                        key,
                        mappings: mappings.iter().map(|&(i, l)| (i.raw(), l as u64)).collect(),
                    };
                    out.fds.push((meta_bytes(&m), dup(container)?));
                }
                out.notes.push((
                    id.clone(),
                    "type1: DMA mappings' process addresses moved with VFIO_DMA_UNMAP/MAP_FLAG_VADDR; \
                     the kernel moves their locked-memory accounting to the new process"
                        .into(),
                ));
                None
            }
            DmaHandle::Iommufd {
                iommufd,
                ioas,
                hwpt,
            } => {
                if !spaces.contains(&key) {
                    let m = HandoverMeta::Iommufd { key, ioas: *ioas };
                    out.fds.push((meta_bytes(&m), dup(iommufd)?));
                }
                out.notes.push((
                    id.clone(),
                    "iommufd: the IOAS keeps its mappings; without IOMMU_IOAS_CHANGE_PROCESS \
                     (Linux 6.13, and only for IOMMU_IOAS_MAP_FILE maps) the pinned pages stay \
                     charged to the old process's mm and user until they are unmapped"
                        .into(),
                ));
                Some(*hwpt)
            }
        };
        if !spaces.contains(&key) {
            spaces.push(key);
        }
        let m = HandoverMeta::Device(HandedDevice {
            id: id.clone(),
            sysfs: d.sysfs.to_path_buf(),
            iommufd: hwpt.is_some(),
            dma_key: key,
            hwpt,
            vendor_id: d.vendor_id,
            device_id: d.device_id,
            vectors: u16::try_from(d.vectors.len()).unwrap_or(u16::MAX),
        });
        out.fds.push((meta_bytes(&m), dup(&fd)?));
        for (v, e) in d.vectors.iter().enumerate() {
            let m = HandoverMeta::Vector {
                id: id.clone(),
                vector: v as u16,
            };
            out.fds.push((meta_bytes(&m), dup(e)?));
        }
        out.devices.push(id);
    }
    Ok(out)
}

fn type1_containers(handles: &[DmaHandle]) -> Vec<(RawFd, Vec<(Iova, usize)>)> {
    let mut out: Vec<(RawFd, Vec<(Iova, usize)>)> = Vec::new();
    for h in handles {
        if let DmaHandle::Type1 {
            container,
            mappings,
        } = h
        {
            if !out.iter().any(|(c, _)| c == container) {
                out.push((*container, mappings.clone()));
            }
        }
    }
    out
}

/// Source side, paused: invalidates this process's addresses of every type1 mapping (the
/// IOVAs stay mapped and pinned; the device keeps DMAing).
pub fn release(handles: &[DmaHandle]) -> Result<(), HandoverError> {
    for (container, _) in type1_containers(handles) {
        invalidate(&container, None).map_err(HandoverError::Vaddr)?;
    }
    Ok(())
}

/// Where `iova..+len` of guest RAM is in this process.
fn host_addr(ram: &[GuestRamRange], iova: Iova, len: usize) -> Result<usize, HandoverError> {
    ram.iter()
        .find(|r| iova.0 >= r.iova.0 && iova.0 + len as u64 <= r.iova.0 + r.len)
        .map(|r| r.host_addr + (iova.0 - r.iova.0) as usize)
        .ok_or(HandoverError::NotRam { iova, len })
}

/// Sets this process's addresses on every type1 mapping in `handles`. With `retake`, a mapping
/// whose address is valid (a destination that died after it took it) is invalidated first.
fn set_vaddrs(
    handles: &[DmaHandle],
    ram: &[GuestRamRange],
    retake: bool,
) -> Result<(), HandoverError> {
    for (container, mappings) in type1_containers(handles) {
        for (iova, len) in mappings {
            let host = host_addr(ram, iova, len)?;
            match update_vaddr(&container, iova, len, host) {
                Ok(()) => {}
                Err(e) if retake && e.errno() == libc::EINVAL => {
                    invalidate(&container, Some((iova, len))).map_err(HandoverError::Vaddr)?;
                    update_vaddr(&container, iova, len, host).map_err(HandoverError::Vaddr)?;
                }
                Err(e) => return Err(HandoverError::Vaddr(e)),
            }
        }
    }
    Ok(())
}

/// Source side, after a failed handover: this process's addresses on every type1 mapping again,
/// whether or not the destination had supplied its own.
pub fn reclaim(handles: &[DmaHandle], ram: &[GuestRamRange]) -> Result<(), HandoverError> {
    set_vaddrs(handles, ram, true)
}

/// Destination side, at the switchover (the source has released): this process's addresses on
/// every type1 mapping; for an iommufd, the pinned-page accounting moved here where the kernel
/// can. Returns what became of the accounting per iommufd (for the log).
pub fn take_over(
    handles: &[DmaHandle],
    ram: &[GuestRamRange],
) -> Result<Vec<AccountingMove>, HandoverError> {
    set_vaddrs(handles, ram, false)?;
    let mut moves = Vec::new();
    let mut seen = Vec::new();
    for h in handles {
        if let DmaHandle::Iommufd { iommufd, .. } = h {
            if !seen.contains(iommufd) {
                seen.push(*iommufd);
                moves.push(change_process(iommufd));
            }
        }
    }
    Ok(moves)
}

/// A DMA space the new process inherited: the file and what is mapped in it.
#[derive(Debug)]
pub struct HandedDma {
    file: File,
    kind: HandedKind,
    devices: Mutex<Vec<String>>,
}

#[derive(Debug)]
enum HandedKind {
    Type1 { mappings: Vec<(Iova, usize)> },
    Iommufd { ioas: u32 },
}

impl HandedDma {
    /// The DMA mappings (IOVA, bytes).
    pub fn mappings(&self) -> Vec<(Iova, usize)> {
        match &self.kind {
            HandedKind::Type1 { mappings } => mappings.clone(),
            // The IOAS maps all guest RAM; its ranges are not carried (nothing here needs them).
            HandedKind::Iommufd { .. } => Vec::new(),
        }
    }

    /// The handle a later live update hands on (`hwpt` for an iommufd device).
    pub fn handle(&self, hwpt: Option<u32>) -> DmaHandle {
        match &self.kind {
            HandedKind::Type1 { mappings } => DmaHandle::Type1 {
                container: self.file.as_raw_fd(),
                mappings: mappings.clone(),
            },
            HandedKind::Iommufd { ioas } => DmaHandle::Iommufd {
                iommufd: self.file.as_raw_fd(),
                ioas: *ioas,
                hwpt: hwpt.unwrap_or(0),
            },
        }
    }

    /// The iommufd's IOAS, if it is one.
    pub fn ioas(&self) -> Option<u32> {
        match self.kind {
            HandedKind::Iommufd { ioas } => Some(ioas),
            HandedKind::Type1 { .. } => None,
        }
    }

    /// Devices in this space.
    pub fn devices(&self) -> Vec<String> {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn join(&self, id: &str) {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.to_string());
    }
}

/// One inherited device, ready to be built.
#[derive(Debug)]
pub struct InheritedDevice {
    pub meta: HandedDevice,
    pub device: DeviceFd,
    pub dma: Arc<HandedDma>,
    pub vectors: Vec<EventFd>,
}

/// Destination side: what the source handed over, by device id.
#[derive(Debug, Default)]
pub struct InheritedDevices {
    devices: BTreeMap<String, (HandedDevice, OwnedFd)>,
    vectors: BTreeMap<String, BTreeMap<u16, OwnedFd>>,
    spaces: BTreeMap<i32, Arc<HandedDma>>,
}

impl InheritedDevices {
    /// Sorts the received descriptors by their descriptions.
    pub fn from_fds(fds: Vec<(Vec<u8>, OwnedFd)>) -> Result<Self, HandoverError> {
        let mut s = Self::default();
        for (meta, fd) in fds {
            let dma = |kind, fd: OwnedFd| {
                Arc::new(HandedDma {
                    file: File::from(fd),
                    kind,
                    devices: Mutex::new(Vec::new()),
                })
            };
            match serde_json::from_slice(&meta).map_err(HandoverError::Meta)? {
                HandoverMeta::Type1Container { key, mappings } => {
                    let mappings = mappings
                        .into_iter()
                        .map(|(i, l)| (Iova(i), l as usize))
                        .collect();
                    s.spaces
                        .insert(key, dma(HandedKind::Type1 { mappings }, fd));
                }
                HandoverMeta::Iommufd { key, ioas } => {
                    s.spaces.insert(key, dma(HandedKind::Iommufd { ioas }, fd));
                }
                HandoverMeta::Device(d) => {
                    if s.devices.contains_key(&d.id) {
                        return Err(HandoverError::Duplicated { id: d.id });
                    }
                    s.devices.insert(d.id.clone(), (d, fd));
                }
                HandoverMeta::Vector { id, vector } => {
                    s.vectors.entry(id).or_default().insert(vector, fd);
                }
            }
        }
        Ok(s)
    }

    /// Nothing was handed over.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Takes device `id` with its space and vector eventfds.
    pub fn take(&mut self, id: &str) -> Result<InheritedDevice, HandoverError> {
        let (meta, fd) = self
            .devices
            .remove(id)
            .ok_or(HandoverError::Missing { id: id.to_string() })?;
        let dma = self
            .spaces
            .get(&meta.dma_key)
            .cloned()
            .ok_or(HandoverError::NoSpace {
                id: id.to_string(),
                key: meta.dma_key,
            })?;
        let fds = self.vectors.remove(id).unwrap_or_default();
        if fds.len() != usize::from(meta.vectors) || fds.keys().any(|&v| v >= meta.vectors) {
            return Err(HandoverError::Vectors {
                id: id.to_string(),
                got: fds.len(),
                want: meta.vectors,
            });
        }
        let vectors = fds
            .into_iter()
            .map(|(vector, fd)| {
                adopt_eventfd(fd).map_err(|source| HandoverError::Vector {
                    id: id.to_string(),
                    vector,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let device = DeviceFd::new(File::from(fd)).map_err(|source| HandoverError::DeviceFd {
            id: id.to_string(),
            source,
        })?;
        dma.join(id);
        Ok(InheritedDevice {
            meta,
            device,
            dma,
            vectors,
        })
    }

    /// Every handed device was taken: a device the VM does not have is an error.
    pub fn finish(&self) -> Result<(), HandoverError> {
        if self.devices.is_empty() {
            return Ok(());
        }
        Err(HandoverError::Unclaimed {
            ids: self.devices.keys().cloned().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eventfd() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")
    }

    fn fd() -> OwnedFd {
        vmm_sys_util::tempfile::TempFile::new()
            .expect("temp")
            .into_file()
            .into()
    }

    #[test]
    fn meta_round_trips_as_tagged_json() {
        let m = HandoverMeta::Device(HandedDevice {
            id: "edu0".into(),
            sysfs: "/sys/bus/pci/devices/0000:00:03.0".into(),
            iommufd: true,
            dma_key: 7,
            hwpt: Some(3),
            vendor_id: 0x1234,
            device_id: 0x11e8,
            vectors: 1,
        });
        let b = meta_bytes(&m);
        assert!(std::str::from_utf8(&b)
            .unwrap()
            .contains("\"kind\":\"device\""));
        assert_eq!(serde_json::from_slice::<HandoverMeta>(&b).unwrap(), m);
        let v = HandoverMeta::Vector {
            id: "edu0".into(),
            vector: 0,
        };
        assert_eq!(
            serde_json::from_slice::<HandoverMeta>(&meta_bytes(&v)).unwrap(),
            v
        );
    }

    #[test]
    fn an_mdev_is_refused_naming_the_device_and_the_kernel_rule() {
        let parts = DeviceParts {
            id: "mtty0",
            sysfs: std::path::Path::new("/sys/bus/mdev/devices/x"),
            mdev: true,
            vendor_id: 0x4348,
            device_id: 0x3253,
            device_fd: Some(0),
            dma: None,
            vectors: &[],
        };
        let e = collect(&[parts]).unwrap_err().to_string();
        assert!(
            e.contains("mtty0") && e.contains("VFIO_UPDATE_VADDR"),
            "{e}"
        );
    }

    #[test]
    fn inherited_set_checks_vectors_spaces_and_leftovers() {
        let dev = |id: &str, key, vectors| {
            meta_bytes(&HandoverMeta::Device(HandedDevice {
                id: id.into(),
                sysfs: "/x".into(),
                iommufd: false,
                dma_key: key,
                hwpt: None,
                vendor_id: 1,
                device_id: 2,
                vectors,
            }))
        };
        let vec0 = |id: &str| {
            meta_bytes(&HandoverMeta::Vector {
                id: id.into(),
                vector: 0,
            })
        };
        let e = eventfd();
        let fds = vec![
            (dev("a", 5, 1), fd()),
            (vec0("a"), duplicate(&e).unwrap()),
            (dev("b", 9, 0), fd()),
            (dev("c", 5, 2), fd()),
            (vec0("c"), duplicate(&e).unwrap()),
        ];
        let mut set = InheritedDevices::from_fds(fds).unwrap();
        assert!(!set.is_empty());
        // No space 5 arrived: named.
        let err = set.take("a").unwrap_err().to_string();
        assert!(err.contains("DMA space 5"), "{err}");
        assert!(matches!(set.take("zz"), Err(HandoverError::Missing { .. })));
        let err = set.finish().unwrap_err().to_string();
        assert!(err.contains("\"b\"") && err.contains("\"c\""), "{err}");

        // A device announced with 2 vectors and sent with 1 is refused.
        let fds = vec![
            (
                meta_bytes(&HandoverMeta::Type1Container {
                    key: 5,
                    mappings: vec![(0, 4096)],
                }),
                fd(),
            ),
            (dev("c", 5, 2), fd()),
            (vec0("c"), duplicate(&e).unwrap()),
        ];
        let mut set = InheritedDevices::from_fds(fds).unwrap();
        let err = set.take("c").unwrap_err().to_string();
        assert!(
            err.contains("1 vector eventfds arrived, 2 announced"),
            "{err}"
        );
        assert!(InheritedDevices::from_fds(vec![(b"{".to_vec(), fd())]).is_err());
    }

    #[test]
    fn host_addresses_come_from_the_range_holding_the_mapping() {
        let ram = [
            GuestRamRange {
                iova: Iova(0),
                host_addr: 0x7000_0000,
                len: 0x1000_0000,
            },
            GuestRamRange {
                iova: Iova(0x1_0000_0000),
                host_addr: 0x9000_0000,
                len: 0x1000_0000,
            },
        ];
        assert_eq!(
            host_addr(&ram, Iova(0x400_0000), 0x400_0000).unwrap(),
            0x7400_0000
        );
        assert_eq!(
            host_addr(&ram, Iova(0x1_0000_0000), 0x1000).unwrap(),
            0x9000_0000
        );
        assert!(host_addr(&ram, Iova(0xf00_0000), 0x200_0000).is_err());
    }
}
