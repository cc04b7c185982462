//! KVM_SET_XSAVE, which kvm-ioctls exposes as an `unsafe fn` because the kernel may read past 4 KiB
//! when dynamically enabled XSTATE features (AMX) are on.

use kvm_bindings::kvm_xsave;
use kvm_ioctls::VcpuFd;

/// Loads `xsave` into `vcpu`.
pub fn set_legacy_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: tern never asks for guest permission for dynamic XSTATE features
    // (arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)), so KVM's XSAVE area for this vCPU is at most the
    // legacy 4096 bytes of `kvm_xsave`, which `xsave` fully provides; the kernel only reads it.
    unsafe { vcpu.set_xsave(xsave) }
}
