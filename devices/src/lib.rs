//! tern-devices: the devices a tern VM exposes to its guest — legacy platform devices, the PCI bus and
//! VFIO passthrough — and the thin `sys` wrappers for kernel uAPIs the rust-vmm crates lack.
//!
//! Devices here know nothing of KVM: interrupts and VMM events leave through `EventFd`s, and guest
//! accesses arrive through [`bus::Bus`].
#![deny(unsafe_code)]

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod sys;
pub mod vfio;
