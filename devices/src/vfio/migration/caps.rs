//! What a device's VFIO migration v2 implementation offers: `VFIO_DEVICE_FEATURE_MIGRATION`'s
//! flags (STOP_COPY, P2P, PRE_COPY) as a type `vm.info` can show.

use std::fmt;

use serde::{Deserialize, Serialize};
use vfio_bindings::bindings::vfio::{
    VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
};
use vmm_sys_util::errno;

use super::ops::MigrationOps;
use super::state::MigState;

/// The migration capabilities of one device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MigrationCaps {
    /// STOP, STOP_COPY and RESUMING: the base every migration v2 driver implements.
    pub stop_copy: bool,
    /// RUNNING_P2P (and PRE_COPY_P2P with `pre_copy`): the device stops initiating DMA to other
    /// devices but still answers, so several devices can all quiesce before any stops.
    pub p2p: bool,
    /// PRE_COPY: device state streams while the device still runs.
    pub pre_copy: bool,
}

impl MigrationCaps {
    /// Every capability the uAPI defines.
    pub const ALL: Self = Self {
        stop_copy: true,
        p2p: true,
        pre_copy: true,
    };

    /// From `vfio_device_feature_migration.flags`; unknown bits are ignored.
    pub const fn from_flags(flags: u64) -> Self {
        Self {
            stop_copy: flags & VFIO_MIGRATION_STOP_COPY as u64 != 0,
            p2p: flags & VFIO_MIGRATION_P2P as u64 != 0,
            pre_copy: flags & VFIO_MIGRATION_PRE_COPY as u64 != 0,
        }
    }

    /// The uAPI flags.
    pub const fn flags(self) -> u64 {
        (if self.stop_copy {
            VFIO_MIGRATION_STOP_COPY as u64
        } else {
            0
        }) | (if self.p2p {
            VFIO_MIGRATION_P2P as u64
        } else {
            0
        }) | (if self.pre_copy {
            VFIO_MIGRATION_PRE_COPY as u64
        } else {
            0
        })
    }

    /// Asks the device (`VFIO_DEVICE_FEATURE_MIGRATION`). `None`: no migration v2 at all (the
    /// kernel answers ENOTTY or EINVAL), or a driver without STOP_COPY, which the uAPI makes
    /// mandatory.
    pub fn probe(device: &(impl MigrationOps + ?Sized)) -> Result<Option<Self>, errno::Error> {
        Ok(device
            .migration_flags()?
            .map(Self::from_flags)
            .filter(|c| c.stop_copy))
    }

    /// Whether a device with these capabilities has `state` (the kernel's `state_flags_table`:
    /// ERROR is never a state one can ask for).
    pub const fn supports(self, state: MigState) -> bool {
        match state {
            MigState::Error => false,
            MigState::Stop | MigState::Running | MigState::StopCopy | MigState::Resuming => {
                self.stop_copy
            }
            MigState::RunningP2p => self.stop_copy && self.p2p,
            MigState::PreCopy => self.stop_copy && self.pre_copy,
            MigState::PreCopyP2p => self.stop_copy && self.p2p && self.pre_copy,
        }
    }
}

impl fmt::Display for MigrationCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (self.stop_copy, "STOP_COPY"),
            (self.p2p, "P2P"),
            (self.pre_copy, "PRE_COPY"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
        if names.is_empty() {
            f.write_str("no migration")
        } else {
            f.write_str(&names.join("|"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_round_trip_and_mtty_value() {
        for flags in 0..8u64 {
            assert_eq!(MigrationCaps::from_flags(flags).flags(), flags);
        }
        // The lab's mtty reports 0x7.
        assert_eq!(MigrationCaps::from_flags(0x7), MigrationCaps::ALL);
        assert_eq!(MigrationCaps::from_flags(0x7 | 1 << 40), MigrationCaps::ALL);
    }

    #[test]
    fn display_lists_the_flags() {
        assert_eq!(MigrationCaps::ALL.to_string(), "STOP_COPY|P2P|PRE_COPY");
        assert_eq!(MigrationCaps::from_flags(1).to_string(), "STOP_COPY");
        assert_eq!(MigrationCaps::default().to_string(), "no migration");
    }

    #[test]
    fn serde_shape_for_vm_info() {
        let json = serde_json::to_value(MigrationCaps::from_flags(0x5)).expect("serialize");
        assert_eq!(
            json,
            serde_json::json!({"stop_copy": true, "p2p": false, "pre_copy": true})
        );
        let back: MigrationCaps = serde_json::from_value(json).expect("deserialize");
        assert_eq!(back.flags(), 0x5);
    }

    #[test]
    fn supported_states_follow_the_kernel_flags_table() {
        let base = MigrationCaps::from_flags(1);
        assert!(base.supports(MigState::Running) && base.supports(MigState::Resuming));
        assert!(!base.supports(MigState::RunningP2p) && !base.supports(MigState::PreCopy));
        let pre = MigrationCaps::from_flags(0x5);
        assert!(pre.supports(MigState::PreCopy) && !pre.supports(MigState::PreCopyP2p));
        assert!(MigrationCaps::ALL.supports(MigState::PreCopyP2p));
        assert!(!MigrationCaps::ALL.supports(MigState::Error));
        assert!(!MigrationCaps::from_flags(0x6).supports(MigState::Running));
    }
}
