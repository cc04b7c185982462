//! VFIO passthrough: what the user asks for ([`spec`]), the host checks that turn every common
//! set-up mistake into an error naming its fix before any VFIO ioctl runs ([`preflight`]), the
//! legacy type1 container ([`container`]) or the cdev + iommufd backend with HWPTs tern allocates
//! ([`iommufd`]), one of each per VM with all guest RAM mapped for DMA once ([`dma_space`]), the
//! passed-through function on the guest's PCI bus ([`device`]), and its mmap-able BAR parts as
//! guest memory slots ([`bar_map`]); a live update hands devices to a new process ([`handover`]).

pub mod bar_map;
pub mod container;
pub mod device;
pub mod dma_dirty;
pub mod dma_space;
pub mod handover;
pub mod iommufd;
pub mod migration;
pub mod mock_dma;
pub mod preflight;
pub mod spec;
