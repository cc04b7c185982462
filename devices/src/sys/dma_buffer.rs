//! Anonymous memory that a device may DMA into, and its mappings into a VFIO type1 container or an
//! iommufd IOAS (`VFIO_IOMMU_MAP_DMA` / `IOMMU_IOAS_MAP`).
//!
//! The memory never becomes a Rust reference: a device (or the IOMMU selftest) may write it at any
//! time, so only its address leaves this module, and only into the kernel. A mapping borrows its
//! buffer and unmaps in `Drop`, so the memory cannot be freed while a device can still reach it.

use std::ptr::NonNull;

use iommufd_bindings::iommufd::{
    iommu_ioas_map, iommu_ioas_unmap, iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
};
use iommufd_ioctls::{IommuFd, IommufdError};
use vfio_ioctls::{VfioContainer, VfioError};
use vmm_sys_util::errno;

use super::iova::Iova;
use super::uapi_size::argsz;

/// Errors of DMA buffer allocation and mapping.
#[derive(Debug, thiserror::Error)]
pub enum DmaBufferError {
    /// The requested length is zero or not a multiple of 4 KiB.
    #[error("dma buffer length {len_bytes:#x} is not a non-zero multiple of 4 KiB")]
    BadLength {
        /// The requested length.
        len_bytes: usize,
    },
    /// `mmap` of the anonymous buffer failed.
    #[error("allocating a {len_bytes:#x}-byte dma buffer failed")]
    Mmap {
        /// The requested length.
        len_bytes: usize,
        /// The errno of `mmap`.
        #[source]
        source: errno::Error,
    },
    /// `VFIO_IOMMU_MAP_DMA` failed.
    #[error("mapping {len_bytes:#x} bytes at iova {iova:#x} into the vfio container failed")]
    MapType1 {
        /// Target IOVA.
        iova: Iova,
        /// Length of the mapping.
        len_bytes: usize,
        /// The error vfio-ioctls returned.
        #[source]
        source: VfioError,
    },
    /// `IOMMU_IOAS_MAP` failed.
    #[error("mapping {len_bytes:#x} bytes at iova {iova:#x} into ioas {ioas_id} failed")]
    MapIoas {
        /// Target IOAS.
        ioas_id: u32,
        /// Target IOVA.
        iova: Iova,
        /// Length of the mapping.
        len_bytes: usize,
        /// The error iommufd-ioctls returned.
        #[source]
        source: IommufdError,
    },
}

const PAGE: usize = 4096;

/// Page-aligned anonymous memory, unmapped from the process on drop.
#[derive(Debug)]
pub struct DmaBuffer {
    addr: NonNull<libc::c_void>,
    len_bytes: usize,
}

impl DmaBuffer {
    /// Allocate `len_bytes` (a non-zero multiple of 4 KiB) of zeroed anonymous memory.
    pub fn new(len_bytes: usize) -> Result<Self, DmaBufferError> {
        if len_bytes == 0 || !len_bytes.is_multiple_of(PAGE) {
            return Err(DmaBufferError::BadLength { len_bytes });
        }
        // SAFETY: a fresh anonymous private mapping at an address the kernel picks: no existing
        // memory is affected, and the result is checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(DmaBufferError::Mmap {
                len_bytes,
                source: errno::Error::last(),
            });
        }
        let addr = NonNull::new(addr).ok_or(DmaBufferError::Mmap {
            len_bytes,
            source: errno::Error::new(libc::ENOMEM),
        })?;
        Ok(DmaBuffer { addr, len_bytes })
    }

    /// Length in bytes.
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    /// Map the whole buffer read/write at `iova` into a type1 `container` (which must already hold
    /// a group, so that its IOMMU is set).
    pub fn map_type1<'a>(
        &'a self,
        container: &'a VfioContainer,
        iova: Iova,
    ) -> Result<Type1Mapping<'a>, DmaBufferError> {
        // SAFETY: the range is this buffer's own mmap, which only this module can reach and which
        // no Rust reference ever covers, so device writes race with nothing. The returned mapping
        // borrows `self`, so the buffer outlives the mapping, and `Type1Mapping::drop` unmaps
        // exactly this iova and size before the buffer can be unmapped.
        unsafe { container.vfio_dma_map(iova.0, self.len_bytes, self.addr.as_ptr().cast()) }
            .map_err(|source| DmaBufferError::MapType1 {
                iova,
                len_bytes: self.len_bytes,
                source,
            })?;
        Ok(Type1Mapping {
            container,
            iova,
            len_bytes: self.len_bytes,
            _buffer: self,
        })
    }

    /// Map the whole buffer read/write at the fixed `iova` of IOAS `ioas_id`.
    pub fn map_ioas<'a>(
        &'a self,
        iommufd: &'a IommuFd,
        ioas_id: u32,
        iova: Iova,
    ) -> Result<IoasMapping<'a>, DmaBufferError> {
        let map = iommu_ioas_map {
            size: argsz::<iommu_ioas_map>(),
            flags: iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
                | iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE
                | iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id,
            __reserved: 0,
            user_va: self.addr.as_ptr() as u64,
            length: self.len_bytes as u64,
            iova: iova.0,
        };
        iommufd
            .map_iommu_ioas(&map)
            .map_err(|source| DmaBufferError::MapIoas {
                ioas_id,
                iova,
                len_bytes: self.len_bytes,
                source,
            })?;
        Ok(IoasMapping {
            iommufd,
            ioas_id,
            iova,
            len_bytes: self.len_bytes,
            _buffer: self,
        })
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len_bytes` are exactly the mapping `new` created, and every IOMMU
        // mapping of it borrowed `self` and so has already been dropped (unmapped).
        let ret = unsafe { libc::munmap(self.addr.as_ptr(), self.len_bytes) };
        if ret != 0 {
            log::error!(
                "munmap of a {:#x}-byte dma buffer failed: {}",
                self.len_bytes,
                errno::Error::last()
            );
        }
    }
}

/// A live `VFIO_IOMMU_MAP_DMA` of a [`DmaBuffer`]; unmapped on drop.
pub struct Type1Mapping<'a> {
    container: &'a VfioContainer,
    iova: Iova,
    len_bytes: usize,
    _buffer: &'a DmaBuffer,
}

impl std::fmt::Debug for Type1Mapping<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Type1Mapping")
            .field("iova", &self.iova)
            .field("len_bytes", &self.len_bytes)
            .finish_non_exhaustive()
    }
}

impl Type1Mapping<'_> {
    /// First IOVA of the mapping.
    pub fn iova(&self) -> Iova {
        self.iova
    }

    /// Length of the mapping.
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes as u64
    }
}

impl Drop for Type1Mapping<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.container.vfio_dma_unmap(self.iova.0, self.len_bytes) {
            log::error!("vfio dma unmap of iova {:#x} failed: {e}", self.iova);
        }
    }
}

/// A live `IOMMU_IOAS_MAP` of a [`DmaBuffer`]; unmapped on drop.
pub struct IoasMapping<'a> {
    iommufd: &'a IommuFd,
    ioas_id: u32,
    iova: Iova,
    len_bytes: usize,
    _buffer: &'a DmaBuffer,
}

impl std::fmt::Debug for IoasMapping<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoasMapping")
            .field("ioas_id", &self.ioas_id)
            .field("iova", &self.iova)
            .field("len_bytes", &self.len_bytes)
            .finish_non_exhaustive()
    }
}

impl IoasMapping<'_> {
    /// First IOVA of the mapping.
    pub fn iova(&self) -> Iova {
        self.iova
    }

    /// Length of the mapping.
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes as u64
    }
}

impl Drop for IoasMapping<'_> {
    fn drop(&mut self) {
        let mut unmap = iommu_ioas_unmap {
            size: argsz::<iommu_ioas_unmap>(),
            ioas_id: self.ioas_id,
            iova: self.iova.0,
            length: self.len_bytes as u64,
        };
        if let Err(e) = self.iommufd.unmap_iommu_ioas(&mut unmap) {
            log::error!(
                "ioas {} unmap of iova {:#x} failed: {e}",
                self.ioas_id,
                self.iova
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_rejects_unaligned_lengths() {
        assert!(matches!(
            DmaBuffer::new(0),
            Err(DmaBufferError::BadLength { len_bytes: 0 })
        ));
        assert!(matches!(
            DmaBuffer::new(4097),
            Err(DmaBufferError::BadLength { len_bytes: 4097 })
        ));
    }

    #[test]
    fn new_allocates_requested_length() {
        let buf = DmaBuffer::new(1 << 20).expect("1 MiB of anonymous memory");
        assert_eq!(buf.len_bytes(), 1 << 20);
    }
}
