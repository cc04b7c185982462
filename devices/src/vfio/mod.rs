//! VFIO passthrough: what the user asks for ([`spec`]), the host checks that turn every common
//! set-up mistake into an error naming its fix before any VFIO ioctl runs ([`preflight`]), the
//! legacy type1 container with guest RAM mapped for DMA ([`container`]) and the passed-through
//! function on the guest's PCI bus ([`device`]).
//!
//! The cdev + iommufd backend is not built yet: `iommufd=on` is refused with an error saying so.

pub mod container;
pub mod device;
pub mod preflight;
pub mod spec;
