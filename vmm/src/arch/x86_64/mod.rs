//! x86_64 platform: guest-physical layout, CPUID, MSRs, long-mode setup and the Linux boot protocols.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod linux;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;
