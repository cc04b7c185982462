//! Model-specific registers: boot values and the list tern saves and restores.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

/// Errors about MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// KVM_GET_MSR_INDEX_LIST failed.
    #[error("cannot read KVM's MSR index list")]
    IndexList(#[source] kvm_ioctls::Error),
    /// A list of MSRs could not be wrapped for KVM.
    #[error("too many MSRs ({count})")]
    TooMany { count: usize },
    /// KVM_GET_MSRS failed or returned fewer entries than asked.
    #[error("cannot read MSRs (read {read} of {asked})")]
    Read { read: usize, asked: usize },
    /// KVM_SET_MSRS failed or applied fewer entries than given.
    #[error("cannot write MSRs (MSR {index:#x} rejected; wrote {written} of {given})")]
    Write {
        index: u32,
        written: usize,
        given: usize,
    },
}

pub const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// MSR values of a freshly reset vCPU that boots straight into a 64-bit kernel.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// The MSRs KVM reports as saveable that this vCPU can actually read: KVM lists some that a given
/// host or CPUID refuses. KVM_GET_MSRS stops at the first MSR it cannot read and returns how many
/// it read, so the list is probed in batches: one ioctl for the readable run up to each refused
/// MSR, which is then skipped (one ioctl in all when every MSR reads, instead of one per MSR — a
/// migration destination builds its vCPUs with this while the source waits).
pub fn saveable_msr_indices(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, MsrError> {
    let list = kvm.get_msr_index_list().map_err(MsrError::IndexList)?;
    let all = list.as_slice();
    let mut readable = Vec::with_capacity(all.len());
    let mut rest = all;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(PROBE_BATCH)];
        let entries: Vec<_> = batch.iter().map(|&i| entry(i, 0)).collect();
        let mut probe = Msrs::from_entries(&entries).map_err(|_| MsrError::TooMany {
            count: entries.len(),
        })?;
        // An ioctl error reads as "the first one refused": it is skipped, as a lone probe would.
        let read = vcpu.get_msrs(&mut probe).unwrap_or(0).min(batch.len());
        readable.extend_from_slice(&batch[..read]);
        // Past the readable run: the refused MSR (if the batch stopped early) is left out.
        let skip = if read < batch.len() { read + 1 } else { read };
        rest = &rest[skip..];
    }
    Ok(readable)
}

/// Most MSRs one probe asks for (KVM refuses more than this in one KVM_GET_MSRS).
const PROBE_BATCH: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES - 1;

/// Reads `indices` from `vcpu`.
pub fn read(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, MsrError> {
    let entries: Vec<_> = indices.iter().map(|&i| entry(i, 0)).collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| MsrError::TooMany {
        count: entries.len(),
    })?;
    let read = vcpu.get_msrs(&mut msrs).map_err(|_| MsrError::Read {
        read: 0,
        asked: entries.len(),
    })?;
    if read != entries.len() {
        return Err(MsrError::Read {
            read,
            asked: entries.len(),
        });
    }
    Ok(msrs.as_slice().to_vec())
}

/// Writes `entries` to `vcpu`; KVM stops at the first MSR it rejects, which is named in the error.
pub fn write(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), MsrError> {
    let msrs = Msrs::from_entries(entries).map_err(|_| MsrError::TooMany {
        count: entries.len(),
    })?;
    let written = vcpu.set_msrs(&msrs).unwrap_or(0);
    if written != entries.len() {
        return Err(MsrError::Write {
            index: entries.get(written).map_or(0, |e| e.index),
            written,
            given: entries.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batched probe keeps exactly the MSRs a lone KVM_GET_MSRS of each can read, in KVM's
    /// order.
    #[test]
    fn batched_probe_matches_one_probe_per_msr() {
        let kvm = Kvm::new().expect("these tests need /dev/kvm");
        let vm = kvm.create_vm().expect("create VM");
        let vcpu = vm.create_vcpu(0).expect("create vCPU");
        let list = kvm.get_msr_index_list().expect("MSR index list");
        let one_by_one: Vec<u32> = list
            .as_slice()
            .iter()
            .copied()
            .filter(|&i| {
                let mut probe = Msrs::from_entries(&[entry(i, 0)]).expect("one MSR");
                matches!(vcpu.get_msrs(&mut probe), Ok(1))
            })
            .collect();
        assert!(!one_by_one.is_empty());
        assert_eq!(
            saveable_msr_indices(&kvm, &vcpu).expect("probe"),
            one_by_one
        );
    }
}
