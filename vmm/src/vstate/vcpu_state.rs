//! A vCPU's complete architectural state, as KVM exposes it, for save/restore and migration.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::msr;

/// Errors saving or restoring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("cannot {op} vCPU {what}")]
    Ioctl {
        op: &'static str,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot {op} vCPU MSRs")]
    Msrs {
        op: &'static str,
        #[source]
        source: msr::MsrError,
    },
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

fn get<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuStateError> {
    r.map_err(|source| VcpuStateError::Ioctl {
        op: "read",
        what,
        source,
    })
}

fn set(what: &'static str, r: Result<(), kvm_ioctls::Error>) -> Result<(), VcpuStateError> {
    r.map_err(|source| VcpuStateError::Ioctl {
        op: "restore",
        what,
        source,
    })
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running. `msr_indices` comes from
    /// [`msr::saveable_msr_indices`].
    pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, VcpuStateError> {
        // mp_state first: reading it makes KVM flush pending APIC events into the state read next.
        let mp_state = get("mp_state", vcpu.get_mp_state())?;
        Ok(Self {
            mp_state,
            regs: get("regs", vcpu.get_regs())?,
            sregs: get("sregs", vcpu.get_sregs())?,
            xsave: get("xsave", vcpu.get_xsave())?,
            xcrs: get("xcrs", vcpu.get_xcrs())?,
            debugregs: get("debugregs", vcpu.get_debug_regs())?,
            lapic: get("lapic", vcpu.get_lapic())?,
            msrs: msr::read(vcpu, msr_indices)
                .map_err(|source| VcpuStateError::Msrs { op: "read", source })?,
            events: get("events", vcpu.get_vcpu_events())?,
            tsc_khz: vcpu.get_tsc_khz().ok(),
        })
    }

    /// Loads this state into a vCPU that is not running (and whose CPUID is already set).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VcpuStateError> {
        if let Some(khz) = self.tsc_khz {
            // Scaling may be unsupported; a same-host migration never needs it.
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                if let Err(e) = vcpu.set_tsc_khz(khz) {
                    log::warn!("cannot set guest TSC to {khz} kHz ({e}); keeping the host rate");
                }
            }
        }
        set("mp_state", vcpu.set_mp_state(self.mp_state))?;
        set("regs", vcpu.set_regs(&self.regs))?;
        set("sregs", vcpu.set_sregs(&self.sregs))?;
        set(
            "xsave",
            crate::sys::xsave::set_legacy_xsave(vcpu, &self.xsave),
        )?;
        set("xcrs", vcpu.set_xcrs(&self.xcrs))?;
        set("debugregs", vcpu.set_debug_regs(&self.debugregs))?;
        set("lapic", vcpu.set_lapic(&self.lapic))?;
        msr::write(vcpu, &self.msrs).map_err(|source| VcpuStateError::Msrs {
            op: "restore",
            source,
        })?;
        set("events", vcpu.set_vcpu_events(&self.events))?;
        Ok(())
    }
}
