//! The KVM-facing state of a VM: guest memory, the VM file descriptor and the vCPUs.

pub mod kvm_blob;
pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
