//! A vCPU's complete architectural state, as KVM exposes it, for save/restore and migration.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use tern_migration::engine::StepTimes;

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

/// Everything KVM holds for one vCPU. Each KVM struct goes as one hex string of its bytes
/// ([`super::kvm_blob`]): a destination decodes it inside the downtime.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    #[serde(with = "super::kvm_blob")]
    pub mp_state: kvm_mp_state,
    #[serde(with = "super::kvm_blob")]
    pub regs: kvm_regs,
    #[serde(with = "super::kvm_blob")]
    pub sregs: kvm_sregs,
    #[serde(with = "super::kvm_blob")]
    pub xsave: kvm_xsave,
    #[serde(with = "super::kvm_blob")]
    pub xcrs: kvm_xcrs,
    #[serde(with = "super::kvm_blob")]
    pub debugregs: kvm_debugregs,
    #[serde(with = "super::kvm_blob")]
    pub lapic: kvm_lapic_state,
    #[serde(with = "super::kvm_blob::list")]
    pub msrs: Vec<kvm_msr_entry>,
    #[serde(with = "super::kvm_blob")]
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
    /// [`msr::saveable_msr_indices`]. Each ioctl group is timed into `steps` (summed over vCPUs).
    pub fn save(
        vcpu: &VcpuFd,
        msr_indices: &[u32],
        steps: &mut StepTimes,
    ) -> Result<Self, VcpuStateError> {
        // mp_state first: reading it makes KVM flush pending APIC events into the state read next.
        let mp_state = get("mp_state", vcpu.get_mp_state())?;
        steps.lap("vCPU mp_state");
        let regs = get("regs", vcpu.get_regs())?;
        steps.lap("vCPU regs");
        let sregs = get("sregs", vcpu.get_sregs())?;
        steps.lap("vCPU sregs");
        let xsave = get("xsave", vcpu.get_xsave())?;
        steps.lap("vCPU xsave");
        let xcrs = get("xcrs", vcpu.get_xcrs())?;
        steps.lap("vCPU xcrs");
        let debugregs = get("debugregs", vcpu.get_debug_regs())?;
        steps.lap("vCPU debugregs");
        let lapic = get("lapic", vcpu.get_lapic())?;
        steps.lap("vCPU lapic");
        let msrs = msr::read(vcpu, msr_indices)
            .map_err(|source| VcpuStateError::Msrs { op: "read", source })?;
        steps.lap("vCPU msrs");
        let events = get("events", vcpu.get_vcpu_events())?;
        steps.lap("vCPU events");
        let tsc_khz = vcpu.get_tsc_khz().ok();
        steps.lap("vCPU tsc_khz");
        Ok(Self {
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }

    /// Loads this state into a vCPU that is not running (and whose CPUID is already set). Each
    /// ioctl group is timed into `steps` (summed over vCPUs).
    pub fn restore(&self, vcpu: &VcpuFd, steps: &mut StepTimes) -> Result<(), VcpuStateError> {
        if let Some(khz) = self.tsc_khz {
            // Scaling may be unsupported; a same-host migration never needs it.
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                if let Err(e) = vcpu.set_tsc_khz(khz) {
                    log::warn!("cannot set guest TSC to {khz} kHz ({e}); keeping the host rate");
                }
            }
        }
        steps.lap("vCPU tsc_khz");
        set("mp_state", vcpu.set_mp_state(self.mp_state))?;
        steps.lap("vCPU mp_state");
        set("regs", vcpu.set_regs(&self.regs))?;
        steps.lap("vCPU regs");
        set("sregs", vcpu.set_sregs(&self.sregs))?;
        steps.lap("vCPU sregs");
        set(
            "xsave",
            crate::sys::xsave::set_legacy_xsave(vcpu, &self.xsave),
        )?;
        steps.lap("vCPU xsave");
        set("xcrs", vcpu.set_xcrs(&self.xcrs))?;
        steps.lap("vCPU xcrs");
        set("debugregs", vcpu.set_debug_regs(&self.debugregs))?;
        steps.lap("vCPU debugregs");
        set("lapic", vcpu.set_lapic(&self.lapic))?;
        steps.lap("vCPU lapic");
        msr::write(vcpu, &self.msrs).map_err(|source| VcpuStateError::Msrs {
            op: "restore",
            source,
        })?;
        steps.lap("vCPU msrs");
        set("events", vcpu.set_vcpu_events(&self.events))?;
        steps.lap("vCPU events");
        Ok(())
    }
}
