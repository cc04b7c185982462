//! Thin wrappers over kernel interfaces the rust-vmm crates lack: one file per interface, `unsafe`
//! only here.
#![allow(unsafe_code)]

pub mod code_prefault;
pub mod kvm_dirty_log;
pub mod kvm_dirty_ring;
pub mod kvm_memslot;
pub mod memfd;
pub mod xsave;
