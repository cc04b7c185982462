//! The user's description of a passthrough device:
//! `path=/sys/bus/pci/devices/BDF[,id=ID][,iommufd=on|off][,dirty=auto|iommufd|dma-logging|type1|none]`
//! or `path=/sys/bus/mdev/devices/UUID[,...]`, parsed once with errors that name the bad part.

use std::path::PathBuf;
use std::str::FromStr;

use super::dma_dirty::method::{BadDirtyChoice, DirtyChoice};

/// Which kernel interface tern uses to reach the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VfioBackend {
    /// Legacy group (`/dev/vfio/N`) in a type1 container (`/dev/vfio/vfio`).
    Type1,
    /// Device cdev (`/dev/vfio/devices/vfioX`) bound to an iommufd (`/dev/iommu`).
    Iommufd,
}

/// A `--device` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioDeviceSpec {
    /// The device's sysfs directory.
    pub path: PathBuf,
    /// Name used in the API and in errors; defaults to the path's last component.
    pub id: String,
    pub backend: VfioBackend,
    /// How migration tracks the device's DMA (`dirty=`).
    pub dirty: DirtyChoice,
}

/// Errors parsing a `--device` argument.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VfioSpecError {
    #[error("--device needs path=/sys/bus/pci/devices/<BDF> or path=/sys/bus/mdev/devices/<UUID>")]
    MissingPath,
    #[error("--device: unknown option {key:?} (known: path, id, iommufd, dirty)")]
    UnknownKey { key: String },
    #[error("--device: {item:?} is not key=value")]
    NotKeyValue { item: String },
    #[error("--device: iommufd={value:?} must be on or off")]
    BadIommufd { value: String },
    #[error("--device: {key} given twice")]
    Duplicate { key: String },
    #[error("--device: id must not be empty")]
    EmptyId,
    // The choice's own message, not a source: the error chain would print it twice.
    #[error("--device: {0}")]
    BadDirty(BadDirtyChoice),
}

impl FromStr for VfioDeviceSpec {
    type Err = VfioSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut path, mut id, mut backend, mut dirty) = (None, None, None, None);
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| VfioSpecError::NotKeyValue {
                    item: item.to_string(),
                })?;
            let dup = || VfioSpecError::Duplicate {
                key: key.to_string(),
            };
            match key {
                "path" => {
                    if path.replace(PathBuf::from(value)).is_some() {
                        return Err(dup());
                    }
                }
                "id" => {
                    if value.is_empty() {
                        return Err(VfioSpecError::EmptyId);
                    }
                    if id.replace(value.to_string()).is_some() {
                        return Err(dup());
                    }
                }
                "iommufd" => {
                    let b = match value {
                        "on" => VfioBackend::Iommufd,
                        "off" => VfioBackend::Type1,
                        _ => {
                            return Err(VfioSpecError::BadIommufd {
                                value: value.to_string(),
                            })
                        }
                    };
                    if backend.replace(b).is_some() {
                        return Err(dup());
                    }
                }
                "dirty" => {
                    if dirty
                        .replace(
                            value
                                .parse::<DirtyChoice>()
                                .map_err(VfioSpecError::BadDirty)?,
                        )
                        .is_some()
                    {
                        return Err(dup());
                    }
                }
                _ => {
                    return Err(VfioSpecError::UnknownKey {
                        key: key.to_string(),
                    })
                }
            }
        }
        let path = path
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or(VfioSpecError::MissingPath)?;
        let id = match id {
            Some(id) => id,
            None => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or(VfioSpecError::MissingPath)?,
        };
        Ok(Self {
            path,
            id,
            backend: backend.unwrap_or(VfioBackend::Type1),
            dirty: dirty.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_pci_and_mdev_forms() {
        let s: VfioDeviceSpec = "path=/sys/bus/pci/devices/0000:00:04.0".parse().unwrap();
        assert_eq!(s.id, "0000:00:04.0");
        assert_eq!(s.backend, VfioBackend::Type1);
        let s: VfioDeviceSpec = "path=/sys/bus/pci/devices/0000:00:04.0/,id=edu,iommufd=on"
            .parse()
            .unwrap();
        assert_eq!(s.id, "edu");
        assert_eq!(s.backend, VfioBackend::Iommufd);
        let s: VfioDeviceSpec =
            "iommufd=off,path=/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
                .parse()
                .unwrap();
        assert_eq!(s.id, "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001");
        assert_eq!(s.dirty, DirtyChoice::Auto);
        let s: VfioDeviceSpec = "path=/sys/bus/pci/devices/0000:00:04.0,dirty=type1"
            .parse()
            .unwrap();
        assert_eq!(
            s.dirty,
            DirtyChoice::Force(super::super::dma_dirty::method::DmaDirtyMethod::Type1)
        );
        assert!(matches!(
            "path=/a,dirty=fast".parse::<VfioDeviceSpec>(),
            Err(VfioSpecError::BadDirty(_))
        ));
    }

    #[test]
    fn spec_errors_name_the_bad_part() {
        let e = |s: &str| s.parse::<VfioDeviceSpec>().unwrap_err();
        assert_eq!(e(""), VfioSpecError::MissingPath);
        assert_eq!(e("id=x"), VfioSpecError::MissingPath);
        assert_eq!(e("path="), VfioSpecError::MissingPath);
        assert_eq!(
            e("path=/a,speed=9"),
            VfioSpecError::UnknownKey {
                key: "speed".into()
            }
        );
        assert_eq!(
            e("path=/a,iommufd=yes"),
            VfioSpecError::BadIommufd {
                value: "yes".into()
            }
        );
        assert_eq!(
            e("/sys/bus/pci/devices/x"),
            VfioSpecError::NotKeyValue {
                item: "/sys/bus/pci/devices/x".into()
            }
        );
        assert_eq!(
            e("path=/a,path=/b"),
            VfioSpecError::Duplicate { key: "path".into() }
        );
        assert_eq!(e("path=/a,id="), VfioSpecError::EmptyId);
    }
}
