//! Which `ioctl` requests a thread kind may make.
//!
//! `ioctl` is one syscall number for every driver, so allowing it outright would let a compromised
//! thread reach any driver behind any descriptor it holds or inherits: terminal ioctls on stdin or
//! stdout (`TIOCSTI` pushes input into the terminal), socket and interface configuration, block
//! devices. tern's threads talk to three families only — KVM, VFIO and iommufd — and set sockets
//! non-blocking. An ioctl request number carries its driver's type byte in bits 8..16 (`_IOC_TYPE`):
//! KVM's is `0xAE`, VFIO's and iommufd's are both `';'`. The filters allow those types whole,
//! because the set of requests follows the devices a VM owns (a device's migration feature, DMA
//! logging, iommufd HWPT dirty tracking), and one exact request beyond them.

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// `_IOC_TYPE` of KVM's ioctls (`KVMIO`).
const KVM_TYPE: u8 = 0xAE;
/// `_IOC_TYPE` of VFIO's (`VFIO_TYPE`) and iommufd's (`IOMMUFD_TYPE`) ioctls.
const VFIO_IOMMUFD_TYPE: u8 = b';';
/// Bits 8..16 of a request: its type.
const TYPE_MASK: u64 = 0xff00;

/// An ioctl a filter lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IoctlAllow {
    /// Every request of a driver type.
    Type(u8),
    /// One request number.
    Request(u64),
}

/// KVM: VM and vCPU setup, `KVM_RUN`, state save/restore, dirty log and ring, irqfd, memory slots.
pub(super) const KVM: IoctlAllow = IoctlAllow::Type(KVM_TYPE);
/// VFIO groups, containers, devices (regions, IRQs, features: migration state, DMA logging) and
/// iommufd (IOAS, HWPT dirty tracking, the selftest's mock DMA).
pub(super) const VFIO_IOMMUFD: IoctlAllow = IoctlAllow::Type(VFIO_IOMMUFD_TYPE);
/// `FIONBIO`: what std's `set_nonblocking` issues on sockets (the API server hands its listener
/// to tokio non-blocking; migration connections switch modes for timeouts and TLS).
pub(super) const SET_NONBLOCKING: IoctlAllow = IoctlAllow::Request(libc::FIONBIO);

impl IoctlAllow {
    /// The seccomp rule matching this allowance on `ioctl`'s request argument (argument 1). The
    /// kernel takes the request as a 32-bit `unsigned int` in every driver, so only the low 32 bits
    /// are compared.
    pub(super) fn rule(self) -> Result<SeccompRule, seccompiler::BackendError> {
        let condition = match self {
            IoctlAllow::Type(t) => SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(TYPE_MASK),
                u64::from(t) << 8,
            ),
            IoctlAllow::Request(r) => {
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, r)
            }
        }?;
        SeccompRule::new(vec![condition])
    }
}
