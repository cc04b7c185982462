//! VFIO passthrough: what the user asks for ([`spec`]), the host checks that turn every common
//! set-up mistake into an error naming its fix before any VFIO ioctl runs ([`preflight`]), the
//! legacy type1 container ([`container`]) or the cdev + iommufd backend with a HWPT tern allocates
//! ([`iommufd`]), each with all guest RAM mapped for DMA, and the passed-through function on the
//! guest's PCI bus ([`device`]).

pub mod container;
pub mod device;
pub mod iommufd;
pub mod preflight;
pub mod spec;
