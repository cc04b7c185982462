//! tern-devices: the devices a tern VM exposes to its guest — legacy platform devices, the PCI bus and
//! VFIO passthrough — and the thin `sys` wrappers for kernel uAPIs the rust-vmm crates lack.
#![deny(unsafe_code)]

pub mod sys;
