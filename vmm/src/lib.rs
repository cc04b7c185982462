//! tern-vmm: builds and runs a KVM virtual machine (memory, vCPUs, platform devices) and exposes it to
//! the API and migration layers.
