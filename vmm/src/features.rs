//! `vmm.ping`'s `features`: what this host (and the VM, when there is one) actually gave tern, not
//! what tern could do in principle. [`probe`] asks the kernel; [`feature_names`] turns the answers
//! into the API's names and is the part the unit tests pin down.

use std::path::Path;

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
};
use kvm_ioctls::Kvm;

use crate::config::DirtyTracking;
use crate::machine::Machine;
use crate::sys::kvm_dirty_log::{supported_manual_protect_flags, wanted_manual_protect_flags};

/// The KVM dirty log is read with manual protection (KVM_CLEAR_DIRTY_LOG per chunk) rather than
/// the get-and-clear fallback.
pub const DIRTY_LOG_MANUAL_CLEAR: &str = "dirty-log-manual-clear";
/// The per-vCPU KVM dirty ring.
pub const DIRTY_RING: &str = "dirty-ring";
/// Same-host migration handing guest memory over as file descriptors.
pub const LOCAL_MIGRATION: &str = "local-migration";
/// `/dev/iommu` exists: VFIO devices can use iommufd (and IOMMU dirty tracking).
pub const IOMMUFD: &str = "iommufd";
/// `/dev/vfio/vfio` exists: the legacy VFIO type1 container is available.
pub const VFIO_TYPE1: &str = "vfio-type1";

/// What the host gave, as [`probe`] found it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is offered and the VM (if any) tracks with the dirty log.
    pub manual_dirty_log: bool,
    /// The VM was built with dirty rings, or (no VM yet) KVM offers KVM_CAP_DIRTY_LOG_RING[_ACQ_REL].
    pub dirty_ring: bool,
    /// Guest memory can be handed over as file descriptors (memfd-backed RAM).
    pub local_migration: bool,
    /// `/dev/iommu` exists.
    pub iommufd: bool,
    /// `/dev/vfio/vfio` exists.
    pub vfio_type1: bool,
}

/// The `features` list for `facts`, in a fixed order.
pub fn feature_names(facts: &HostFacts) -> Vec<String> {
    [
        (facts.manual_dirty_log, DIRTY_LOG_MANUAL_CLEAR),
        (facts.dirty_ring, DIRTY_RING),
        (facts.local_migration, LOCAL_MIGRATION),
        (facts.iommufd, IOMMUFD),
        (facts.vfio_type1, VFIO_TYPE1),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .map(|(_, name)| name.to_owned())
    .collect()
}

/// Probes the host. With a VM, the dirty-tracking facts are the VM's: manual clear is what
/// [`crate::dirty::KvmDirtyLog`] will use on this VM's fd (nothing when the VM uses the ring),
/// and the ring is reported only if the VM has one (KVM cannot add it once vCPUs exist). Without a
/// VM they are the capabilities of `kvm_path` (false if it cannot be opened).
pub fn probe(kvm_path: &Path, machine: Option<&Machine>) -> HostFacts {
    let (manual_dirty_log, dirty_ring) = match machine {
        Some(m) => match m.config().dirty_tracking {
            DirtyTracking::Log => (
                wanted_manual_protect_flags(supported_manual_protect_flags(m.vm_shared().fd()))
                    != 0,
                false,
            ),
            DirtyTracking::Ring => (false, m.dirty_rings().is_some()),
        },
        None => probe_kvm(kvm_path),
    };
    HostFacts {
        manual_dirty_log,
        dirty_ring,
        // Guest RAM is always a memfd, so its fds can always be handed over.
        local_migration: true,
        iommufd: Path::new("/dev/iommu").exists(),
        vfio_type1: Path::new("/dev/vfio/vfio").exists(),
    }
}

/// (manual protection, dirty ring) as `/dev/kvm` answers KVM_CHECK_EXTENSION.
fn probe_kvm(kvm_path: &Path) -> (bool, bool) {
    let Ok(c_path) = std::ffi::CString::new(kvm_path.as_os_str().as_encoded_bytes()) else {
        return (false, false);
    };
    let Ok(kvm) = Kvm::new_with_path(&c_path) else {
        return (false, false);
    };
    let check =
        |cap: u32| u64::try_from(kvm.check_extension_raw(libc::c_ulong::from(cap))).unwrap_or(0);
    let manual = wanted_manual_protect_flags(check(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) != 0;
    let ring = check(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0 || check(KVM_CAP_DIRTY_LOG_RING) > 0;
    (manual, ring)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_facts_in_a_fixed_order() {
        assert!(feature_names(&HostFacts::default()).is_empty());
        let all = HostFacts {
            manual_dirty_log: true,
            dirty_ring: true,
            local_migration: true,
            iommufd: true,
            vfio_type1: true,
        };
        assert_eq!(
            feature_names(&all),
            [
                "dirty-log-manual-clear",
                "dirty-ring",
                "local-migration",
                "iommufd",
                "vfio-type1"
            ]
        );
    }

    #[test]
    fn get_and_clear_fallback_drops_manual_clear() {
        // A host without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, type1 only.
        let facts = HostFacts {
            local_migration: true,
            vfio_type1: true,
            ..HostFacts::default()
        };
        assert_eq!(feature_names(&facts), ["local-migration", "vfio-type1"]);
        let facts = HostFacts {
            dirty_ring: true,
            iommufd: true,
            ..HostFacts::default()
        };
        assert_eq!(feature_names(&facts), ["dirty-ring", "iommufd"]);
    }
}
