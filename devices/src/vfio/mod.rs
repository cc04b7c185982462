//! VFIO passthrough: what the user asks for ([`spec`]) and the host checks that turn every common
//! set-up mistake into an error naming its fix before any VFIO ioctl runs ([`preflight`]).
//!
//! Opening the device with vfio-ioctls (type1 container + group, or cdev + iommufd with a HWPT tern
//! allocates), mapping guest RAM with IOVA = GPA, BAR passthrough and MSI/MSI-X emulation on top of
//! [`crate::pci`] come next; they need /dev/vfio and an IOMMU, which only the nested lab has.

pub mod preflight;
pub mod spec;
