//! tern-vmm: builds and runs a KVM virtual machine — guest RAM in a memfd, vCPU threads that can be
//! paused and whose full state can be read and written, platform devices — and exposes it to the API
//! and migration layers.
//!
//! It refuses to guess: a configuration it cannot honour is an error naming the fix, never a silently
//! degraded VM.
#![deny(unsafe_code)]

pub mod api_create;
pub mod api_info;
pub mod arch;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod device_manager;
pub mod dirty;
pub mod event_loop;
pub mod features;
pub mod logger;
pub mod machine;
pub mod migration;
pub mod pci_manager;
pub mod seccomp;
pub mod sys;
pub mod vfio_manager;
pub mod vm_base;
pub mod vstate;
