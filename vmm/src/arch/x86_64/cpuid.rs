//! Per-vCPU CPUID: what KVM supports, with the topology and APIC IDs of an N-vCPU VM.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Errors while building CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read the CPUID KVM supports")]
    Supported(#[source] kvm_ioctls::Error),
}

const HYPERVISOR_BIT: u32 = 1 << 31;
const HTT_BIT: u32 = 1 << 28;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The CPUID KVM supports on this host; computed once per VM and specialised per vCPU.
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)
}

/// Bits needed to number `n` things.
fn id_bits(n: u32) -> u32 {
    u32::BITS - n.saturating_sub(1).leading_zeros()
}

/// Specialises `base` for vCPU `index` of `count` (one socket, `count` cores, one thread each;
/// APIC ID = vCPU index).
pub fn for_vcpu(base: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    let apic_id = u32::from(index);
    let count32 = u32::from(count);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (count32 << 16);
                entry.ecx |= HYPERVISOR_BIT;
                if count > 1 {
                    entry.edx |= HTT_BIT;
                } else {
                    entry.edx &= !HTT_BIT;
                }
            }
            0x4 => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let shared = if (entry.eax >> 5) & 0x7 >= 3 {
                    count32 - 1
                } else {
                    0
                };
                entry.eax = (entry.eax & 0x3fff) | ((count32 - 1) << 26) | (shared << 14);
            }
            0xb | 0x1f => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = id_bits(count32);
                        entry.ebx = count32;
                        entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            0x8000_0008 => {
                entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count32) << 12) | (count32 - 1);
            }
            0x8000_001e => {
                entry.eax = apic_id;
                entry.ebx = (entry.ebx & 0xffff_ff00) | apic_id;
                entry.ecx &= !0xff;
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_bits_counts_topology_bits() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }

    #[test]
    fn for_vcpu_sets_apic_id_and_topology() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let base = supported(&kvm).unwrap();
        let cpuid = for_vcpu(&base, 3, 4);
        let leaf1 = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 1)
            .expect("leaf 1");
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & HYPERVISOR_BIT, 0);
        for e in cpuid.as_slice().iter().filter(|e| e.function == 0xb) {
            assert_eq!(e.edx, 3);
            if e.index == 1 {
                assert_eq!(e.ebx, 4);
            }
        }
    }
}
