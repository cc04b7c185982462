//! Matching the source's passthrough devices to this host's, by id: the source stamps each
//! device's PCI IDs into the config it sends ([`stamp_pci_ids`]); the destination opens each
//! device at the local path the receive request names for its id, else at the source's path
//! ([`apply_mapping`]), and refuses the migration before the source pauses when a local device
//! cannot take the source device's state ([`check_local`]).

use std::path::PathBuf;

use tern_devices::vfio::migration::MigrationCaps;

use crate::config::{PassthroughConfig, PciFunctionIds};

/// Why the source's devices cannot be matched to this host's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceMapError {
    #[error("the receive request maps device {id}, which the source VM does not have (its passthrough devices: {})", names(known))]
    UnknownId { id: String, known: Vec<String> },
    #[error("device {id}: the local device {} has no VFIO migration support (migration v2 with STOP_COPY), so the source device's state cannot be loaded into it", path.display())]
    NotMigratable { id: String, path: PathBuf },
    #[error("device {id}: the local device {} is PCI {local}, the source's device is {theirs}: its state would not fit", path.display())]
    WrongDevice {
        id: String,
        path: PathBuf,
        local: PciFunctionIds,
        theirs: PciFunctionIds,
    },
    #[error("device {id}: the incoming VM has no such passthrough device")]
    Missing { id: String },
}

fn names(ids: &[String]) -> String {
    if ids.is_empty() {
        "none".into()
    } else {
        ids.join(", ")
    }
}

/// What the destination learned about one device it opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDevice {
    pub id: String,
    pub migration: Option<MigrationCaps>,
    pub ids: PciFunctionIds,
}

/// Source side: records each opened device's PCI IDs in the config sent to the destination.
pub fn stamp_pci_ids(devices: &mut [PassthroughConfig], opened: &[(String, PciFunctionIds)]) {
    for d in devices {
        if let Some((_, ids)) = opened.iter().find(|(id, _)| *id == d.id) {
            d.pci_ids = Some(*ids);
        }
    }
}

/// Destination side: each device named in `mapping` (source id → local path) is opened at its
/// local path. Refused when `mapping` names an id the source does not have.
pub fn apply_mapping(
    devices: &mut [PassthroughConfig],
    mapping: &[(String, PathBuf)],
) -> Result<(), DeviceMapError> {
    for (id, _) in mapping {
        if !devices.iter().any(|d| d.id == *id) {
            return Err(DeviceMapError::UnknownId {
                id: id.clone(),
                known: devices.iter().map(|d| d.id.clone()).collect(),
            });
        }
    }
    for d in devices {
        if let Some((_, path)) = mapping.iter().find(|(id, _)| *id == d.id) {
            eprintln!(
                "tern: incoming device {}: {} (the source's was {})",
                d.id,
                path.display(),
                d.path.display()
            );
            d.path = path.clone();
        }
    }
    Ok(())
}

/// Destination side, after opening the devices of `config` as `local`: every device must take
/// migrated state (VFIO migration v2 with STOP_COPY) and have the source device's PCI IDs (when
/// the source sent them; an older source does not).
pub fn check_local(
    config: &[PassthroughConfig],
    local: &[LocalDevice],
) -> Result<(), DeviceMapError> {
    for c in config {
        let l = local
            .iter()
            .find(|l| l.id == c.id)
            .ok_or_else(|| DeviceMapError::Missing { id: c.id.clone() })?;
        if l.migration.is_none() {
            return Err(DeviceMapError::NotMigratable {
                id: c.id.clone(),
                path: c.path.clone(),
            });
        }
        if let Some(theirs) = c.pci_ids.filter(|theirs| *theirs != l.ids) {
            return Err(DeviceMapError::WrongDevice {
                id: c.id.clone(),
                path: c.path.clone(),
                local: l.ids,
                theirs,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTTY: PciFunctionIds = PciFunctionIds {
        vendor: 0x4348,
        device: 0x3253,
    };
    const EDU: PciFunctionIds = PciFunctionIds {
        vendor: 0x1234,
        device: 0x11e8,
    };

    fn dev(id: &str, path: &str) -> PassthroughConfig {
        PassthroughConfig {
            path: path.into(),
            id: id.into(),
            iommufd: false,
            dirty: Default::default(),
            pci_ids: None,
        }
    }

    fn source_config() -> Vec<PassthroughConfig> {
        let mut devices = vec![
            dev("mtty0", "/sys/bus/mdev/devices/u0"),
            dev("mtty1", "/sys/bus/mdev/devices/u1"),
        ];
        stamp_pci_ids(
            &mut devices,
            &[("mtty0".into(), MTTY), ("mtty1".into(), MTTY)],
        );
        devices
    }

    fn local(id: &str, migration: Option<MigrationCaps>, ids: PciFunctionIds) -> LocalDevice {
        LocalDevice {
            id: id.into(),
            migration,
            ids,
        }
    }

    #[test]
    fn the_source_stamps_ids_that_survive_the_config_message() {
        let devices = source_config();
        assert!(devices.iter().all(|d| d.pci_ids == Some(MTTY)));
        let json = serde_json::to_string(&devices).unwrap();
        let back: Vec<PassthroughConfig> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, devices);
        // An older source sends no ids; a command-line config serializes none.
        let old: PassthroughConfig = serde_json::from_str(
            r#"{"path": "/sys/bus/mdev/devices/u0", "id": "mtty0", "iommufd": false}"#,
        )
        .unwrap();
        assert_eq!(old.pci_ids, None);
        assert!(!serde_json::to_string(&dev("a", "/x"))
            .unwrap()
            .contains("pci_ids"));
    }

    #[test]
    fn mapped_ids_take_the_local_path_and_the_rest_keep_the_source_path() {
        let mut devices = source_config();
        apply_mapping(
            &mut devices,
            &[("mtty0".into(), "/sys/bus/mdev/devices/u9".into())],
        )
        .unwrap();
        assert_eq!(devices[0].path, PathBuf::from("/sys/bus/mdev/devices/u9"));
        assert_eq!(devices[1].path, PathBuf::from("/sys/bus/mdev/devices/u1"));
        assert_eq!(devices[0].id, "mtty0", "the id stays the source's");
        let mut unchanged = source_config();
        apply_mapping(&mut unchanged, &[]).unwrap();
        assert_eq!(unchanged, source_config());
    }

    #[test]
    fn an_unknown_id_is_refused_naming_the_source_devices() {
        let mut devices = source_config();
        let err = apply_mapping(
            &mut devices,
            &[
                ("mtty0".into(), "/sys/bus/mdev/devices/u9".into()),
                ("gpu0".into(), "/sys/bus/pci/devices/0000:00:05.0".into()),
            ],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the receive request maps device gpu0, which the source VM does not have (its passthrough devices: mtty0, mtty1)"
        );
        assert_eq!(devices, source_config(), "nothing is mapped on a refusal");
        let err = apply_mapping(&mut [], &[("x".into(), "/x".into())]).unwrap_err();
        assert!(err.to_string().ends_with("(its passthrough devices: none)"));
    }

    #[test]
    fn local_devices_must_migrate_and_match_the_source_ids() {
        let devices = source_config();
        let all = Some(MigrationCaps::ALL);
        check_local(
            &devices,
            &[local("mtty0", all, MTTY), local("mtty1", all, MTTY)],
        )
        .unwrap();

        let err = check_local(
            &devices,
            &[local("mtty0", all, MTTY), local("mtty1", None, MTTY)],
        )
        .unwrap_err();
        assert_eq!(
            err,
            DeviceMapError::NotMigratable {
                id: "mtty1".into(),
                path: "/sys/bus/mdev/devices/u1".into()
            }
        );
        assert!(
            err.to_string().contains("no VFIO migration support"),
            "{err}"
        );

        let err = check_local(
            &devices,
            &[local("mtty0", all, EDU), local("mtty1", all, MTTY)],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "device mtty0: the local device /sys/bus/mdev/devices/u0 is PCI 1234:11e8, the source's device is 4348:3253: its state would not fit"
        );

        // Without ids from the source only migratability is checked.
        let mut old = devices.clone();
        old.iter_mut().for_each(|d| d.pci_ids = None);
        check_local(&old, &[local("mtty0", all, EDU), local("mtty1", all, EDU)]).unwrap();
        assert_eq!(
            check_local(&old, &[local("mtty0", all, EDU)]),
            Err(DeviceMapError::Missing { id: "mtty1".into() })
        );
    }
}
