//! Thin wrappers over kernel uAPIs that the rust-vmm crates do not cover: one file per uAPI, `unsafe`
//! only here.
#![allow(unsafe_code)]

pub mod dma_buffer;
pub mod fd_handover;
pub mod iommufd_change_process;
pub mod iommufd_hwpt_dirty;
pub mod iommufd_test;
pub mod iova;
pub mod uapi_size;
pub mod vfio_device_fd;
pub mod vfio_dma_logging_probe;
pub mod vfio_dma_map;
pub mod vfio_dma_vaddr;
pub mod vfio_migration;
pub mod vfio_region_mmap;
pub mod vfio_type1_dirty;
