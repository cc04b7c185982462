//! Checks a passthrough device against the host before any VFIO ioctl, so that every common set-up
//! mistake becomes one error that names the fix instead of an errno from deep inside an open.
//!
//! ```text
//!  path exists? ─► PCI (config, vendor) or mdev (mdev_type)? ─► PCI: bound to a vfio driver?
//!     ─► iommu_group link? ─► every other device of the group unbound / vfio / pci-stub / pcieport?
//!     ─► type1:   /dev/vfio/vfio and /dev/vfio/N open read-write?
//!        iommufd: /dev/iommu exists? vfio-dev/vfioX cdev? both open read-write?
//! ```
//!
//! All paths hang off [`HostRoots`], so the checks run unchanged against a fake sysfs/dev tree in a
//! temporary directory (the unit tests) and against the real host (the lab).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::spec::{VfioBackend, VfioDeviceSpec};

/// Where sysfs and /dev are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoots {
    pub sys: PathBuf,
    pub dev: PathBuf,
}

impl Default for HostRoots {
    fn default() -> Self {
        Self {
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }
}

/// What kind of device the path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VfioDeviceKind {
    Pci { bdf: String },
    Mdev { uuid: String },
}

/// The device nodes the chosen backend opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendNodes {
    Type1 { container: PathBuf, group: PathBuf },
    Iommufd { iommu: PathBuf, cdev: PathBuf },
}

/// A device that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioTarget {
    pub kind: VfioDeviceKind,
    /// The device's canonical sysfs directory.
    pub sysfs: PathBuf,
    pub group: u32,
    pub nodes: BackendNodes,
}

/// Drivers the kernel lets share a group with a device in use by VFIO.
const GROUP_SAFE_DRIVERS: [&str; 2] = ["pci-stub", "pcieport"];

/// Why a device cannot be passed through, each with the fix.
#[derive(Debug, thiserror::Error)]
pub enum VfioPreflightError {
    #[error(
        "{path} does not exist: check the address (ls /sys/bus/pci/devices /sys/bus/mdev/devices)"
    )]
    DeviceNotFound { path: PathBuf },
    #[error("{path} is neither a PCI device nor an mdev")]
    NotADevice { path: PathBuf },
    #[error("{bdf} is bound to no driver: bind it to vfio-pci (echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; echo {bdf} > /sys/bus/pci/drivers_probe)")]
    NotBound { bdf: String },
    #[error("{bdf} is bound to {driver}, not vfio-pci: echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind; echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; echo {bdf} > /sys/bus/pci/drivers_probe")]
    BoundToOther { bdf: String, driver: String },
    #[error("{device} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on, VT-d/AMD-Vi in firmware)")]
    NoIommuGroup { device: String },
    #[error("IOMMU group {group} of {device} also holds {others}: bind those to vfio-pci too or unbind them (VFIO takes whole groups)")]
    GroupNotViable {
        device: String,
        group: u32,
        others: String,
    },
    #[error("iommufd=on but {path} does not exist: this kernel lacks iommufd (CONFIG_IOMMUFD); use iommufd=off")]
    IommufdUnavailable { path: PathBuf },
    #[error("iommufd=on but {device} has no VFIO device cdev: this kernel lacks CONFIG_VFIO_DEVICE_CDEV; use iommufd=off")]
    NoDeviceCdev { device: String },
    #[error("{path} does not exist: load the VFIO modules (modprobe vfio-pci)")]
    NodeMissing { path: PathBuf },
    #[error("no permission to open {path}: run tern as root or give this user the node (chown or a udev rule)")]
    NoPermission { path: PathBuf },
    #[error("{path} is busy: another process (another VMM?) holds the device")]
    Busy { path: PathBuf },
    #[error("cannot open {path}")]
    OpenNode {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Sysfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn sysfs_err(path: &Path) -> impl FnOnce(std::io::Error) -> VfioPreflightError + '_ {
    move |source| VfioPreflightError::Sysfs {
        path: path.to_path_buf(),
        source,
    }
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The last component of the symlink `link`, or None when the link does not exist.
fn link_name(link: &Path) -> Result<Option<String>, VfioPreflightError> {
    match std::fs::read_link(link) {
        Ok(target) => Ok(Some(name_of(&target))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(sysfs_err(link)(e)),
    }
}

fn is_vfio_driver(driver: &str) -> bool {
    // vfio-pci and its migration-capable variants (mlx5_vfio_pci, hisi_acc_vfio_pci, ...).
    driver.contains("vfio")
}

/// Maps the error of opening a device node to the variant that names the fix.
pub fn classify_open_error(path: &Path, source: std::io::Error) -> VfioPreflightError {
    let path = path.to_path_buf();
    match source.raw_os_error() {
        Some(libc::ENOENT) => VfioPreflightError::NodeMissing { path },
        Some(libc::EACCES) | Some(libc::EPERM) => VfioPreflightError::NoPermission { path },
        Some(libc::EBUSY) => VfioPreflightError::Busy { path },
        _ => VfioPreflightError::OpenNode { path, source },
    }
}

fn check_open(path: &Path) -> Result<(), VfioPreflightError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|e| classify_open_error(path, e))
}

/// Runs every check for `spec`; returns what the VFIO open needs.
pub fn preflight(
    spec: &VfioDeviceSpec,
    roots: &HostRoots,
) -> Result<VfioTarget, VfioPreflightError> {
    let sysfs = match std::fs::canonicalize(&spec.path) {
        Ok(p) => p,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(VfioPreflightError::DeviceNotFound {
                path: spec.path.clone(),
            })
        }
        Err(e) => return Err(sysfs_err(&spec.path)(e)),
    };
    let name = name_of(&sysfs);
    let kind = if sysfs.join("mdev_type").exists() {
        VfioDeviceKind::Mdev { uuid: name.clone() }
    } else if sysfs.join("config").exists() && sysfs.join("vendor").exists() {
        VfioDeviceKind::Pci { bdf: name.clone() }
    } else {
        return Err(VfioPreflightError::NotADevice {
            path: spec.path.clone(),
        });
    };
    // An mdev is bound to its parent's vendor driver, not vfio-pci; only PCI functions are checked.
    if let VfioDeviceKind::Pci { bdf } = &kind {
        match link_name(&sysfs.join("driver"))? {
            None => return Err(VfioPreflightError::NotBound { bdf: bdf.clone() }),
            Some(d) if !is_vfio_driver(&d) => {
                return Err(VfioPreflightError::BoundToOther {
                    bdf: bdf.clone(),
                    driver: d,
                })
            }
            Some(_) => {}
        }
    }
    let group_name =
        link_name(&sysfs.join("iommu_group"))?.ok_or_else(|| VfioPreflightError::NoIommuGroup {
            device: name.clone(),
        })?;
    let group: u32 = group_name.parse().map_err(|_| VfioPreflightError::Sysfs {
        path: sysfs.join("iommu_group"),
        source: std::io::Error::new(
            ErrorKind::InvalidData,
            format!("group {group_name:?} is not a number"),
        ),
    })?;
    check_group(roots, group, &name)?;
    let nodes = match spec.backend {
        VfioBackend::Type1 => {
            let container = roots.dev.join("vfio/vfio");
            let group_node = roots.dev.join("vfio").join(group.to_string());
            check_open(&container)?;
            check_open(&group_node)?;
            BackendNodes::Type1 {
                container,
                group: group_node,
            }
        }
        VfioBackend::Iommufd => {
            let iommu = roots.dev.join("iommu");
            if !iommu.exists() {
                return Err(VfioPreflightError::IommufdUnavailable { path: iommu });
            }
            let cdev_dir = sysfs.join("vfio-dev");
            let cdev_name = match std::fs::read_dir(&cdev_dir) {
                Ok(entries) => entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .find(|n| n.starts_with("vfio")),
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => return Err(sysfs_err(&cdev_dir)(e)),
            }
            .ok_or_else(|| VfioPreflightError::NoDeviceCdev {
                device: name.clone(),
            })?;
            let cdev = roots.dev.join("vfio/devices").join(cdev_name);
            check_open(&iommu)?;
            check_open(&cdev)?;
            BackendNodes::Iommufd { iommu, cdev }
        }
    };
    Ok(VfioTarget {
        kind,
        sysfs,
        group,
        nodes,
    })
}

/// Every other device of the group must be unbound, bound to a VFIO driver, or bound to a driver the
/// kernel lets share a group with VFIO.
fn check_group(roots: &HostRoots, group: u32, device: &str) -> Result<(), VfioPreflightError> {
    let dir = roots
        .sys
        .join("kernel/iommu_groups")
        .join(group.to_string())
        .join("devices");
    let mut others = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(sysfs_err(&dir))? {
        let entry = entry.map_err(sysfs_err(&dir))?;
        let other = entry.file_name().to_string_lossy().into_owned();
        if other == device {
            continue;
        }
        if let Some(driver) = link_name(&entry.path().join("driver"))? {
            if !is_vfio_driver(&driver) && !GROUP_SAFE_DRIVERS.contains(&driver.as_str()) {
                others.push(format!("{other} (bound to {driver})"));
            }
        }
    }
    if others.is_empty() {
        return Ok(());
    }
    others.sort();
    Err(VfioPreflightError::GroupNotViable {
        device: device.to_string(),
        group,
        others: others.join(", "),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A fake host: sysfs and /dev under a temporary directory, removed on drop.
    struct FakeHost {
        root: PathBuf,
        roots: HostRoots,
    }

    const BDF: &str = "0000:00:04.0";

    impl FakeHost {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let root = std::env::temp_dir().join(format!(
                "tern-vfio-preflight-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&root);
            let roots = HostRoots {
                sys: root.join("sys"),
                dev: root.join("dev"),
            };
            for d in [
                "sys/bus/pci/devices",
                "sys/bus/pci/drivers/vfio-pci",
                "sys/bus/pci/drivers/e1000e",
                "sys/bus/pci/drivers/pcieport",
                "sys/bus/mdev/devices",
                "dev/vfio/devices",
            ] {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            std::fs::write(root.join("dev/vfio/vfio"), b"").unwrap();
            Self { root, roots }
        }

        /// A PCI function in IOMMU group `group`, bound to `driver` (if any).
        fn pci(&self, bdf: &str, group: Option<u32>, driver: Option<&str>) -> &Self {
            let dev = self.root.join("sys/devices/pci0000:00").join(bdf);
            std::fs::create_dir_all(&dev).unwrap();
            std::fs::write(dev.join("config"), [0u8; 64]).unwrap();
            std::fs::write(dev.join("vendor"), b"0x1234\n").unwrap();
            symlink(&dev, self.roots.sys.join("bus/pci/devices").join(bdf)).unwrap();
            if let Some(d) = driver {
                symlink(
                    self.roots.sys.join("bus/pci/drivers").join(d),
                    dev.join("driver"),
                )
                .unwrap();
            }
            if let Some(g) = group {
                let gdir = self.roots.sys.join(format!("kernel/iommu_groups/{g}"));
                std::fs::create_dir_all(gdir.join("devices")).unwrap();
                symlink(&gdir, dev.join("iommu_group")).unwrap();
                symlink(&dev, gdir.join("devices").join(bdf)).unwrap();
                let _ = std::fs::write(self.roots.dev.join(format!("vfio/{g}")), b"");
            }
            self
        }

        fn cdev(&self, bdf: &str, name: &str) {
            let dev = self.root.join("sys/devices/pci0000:00").join(bdf);
            std::fs::create_dir_all(dev.join("vfio-dev").join(name)).unwrap();
            std::fs::write(self.roots.dev.join("vfio/devices").join(name), b"").unwrap();
        }

        fn spec(&self, bdf: &str, backend: VfioBackend) -> VfioDeviceSpec {
            VfioDeviceSpec {
                path: self.roots.sys.join("bus/pci/devices").join(bdf),
                id: bdf.to_string(),
                backend,
                dirty: Default::default(),
            }
        }

        fn check(&self, bdf: &str, backend: VfioBackend) -> Result<VfioTarget, VfioPreflightError> {
            preflight(&self.spec(bdf, backend), &self.roots)
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn preflight_accepts_a_vfio_bound_device_with_type1() {
        let h = FakeHost::new();
        h.pci(BDF, Some(7), Some("vfio-pci"));
        let t = h.check(BDF, VfioBackend::Type1).unwrap();
        assert_eq!(t.kind, VfioDeviceKind::Pci { bdf: BDF.into() });
        assert_eq!(t.group, 7);
        assert_eq!(
            t.nodes,
            BackendNodes::Type1 {
                container: h.roots.dev.join("vfio/vfio"),
                group: h.roots.dev.join("vfio/7"),
            }
        );
        assert!(t.sysfs.ends_with(format!("pci0000:00/{BDF}")));
    }

    #[test]
    fn preflight_accepts_iommufd_with_cdev() {
        let h = FakeHost::new();
        h.pci(BDF, Some(7), Some("vfio-pci"));
        h.cdev(BDF, "vfio3");
        std::fs::write(h.roots.dev.join("iommu"), b"").unwrap();
        let t = h.check(BDF, VfioBackend::Iommufd).unwrap();
        assert_eq!(
            t.nodes,
            BackendNodes::Iommufd {
                iommu: h.roots.dev.join("iommu"),
                cdev: h.roots.dev.join("vfio/devices/vfio3"),
            }
        );
    }

    #[test]
    fn preflight_missing_path_names_it() {
        let h = FakeHost::new();
        let e = h.check("0000:00:09.0", VfioBackend::Type1).unwrap_err();
        assert!(
            matches!(e, VfioPreflightError::DeviceNotFound { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("0000:00:09.0 does not exist"), "{e}");
    }

    #[test]
    fn preflight_refuses_devices_not_bound_to_vfio() {
        let h = FakeHost::new();
        h.pci(BDF, Some(7), Some("e1000e"));
        let e = h.check(BDF, VfioBackend::Type1).unwrap_err();
        assert!(
            matches!(&e, VfioPreflightError::BoundToOther { driver, .. } if driver == "e1000e"),
            "{e}"
        );
        assert!(e.to_string().contains("driver_override"), "{e}");
        let h = FakeHost::new();
        h.pci(BDF, Some(7), None);
        assert!(matches!(
            h.check(BDF, VfioBackend::Type1),
            Err(VfioPreflightError::NotBound { .. })
        ));
        // Variant drivers are VFIO drivers too.
        let h = FakeHost::new();
        std::fs::create_dir_all(h.roots.sys.join("bus/pci/drivers/mlx5_vfio_pci")).unwrap();
        h.pci(BDF, Some(7), Some("mlx5_vfio_pci"));
        h.check(BDF, VfioBackend::Type1).unwrap();
    }

    #[test]
    fn preflight_refuses_a_group_shared_with_host_drivers() {
        let h = FakeHost::new();
        h.pci(BDF, Some(7), Some("vfio-pci"))
            .pci("0000:00:04.1", Some(7), Some("e1000e"))
            .pci("0000:00:04.2", Some(7), None)
            .pci("0000:00:1c.0", Some(7), Some("pcieport"));
        let e = h.check(BDF, VfioBackend::Type1).unwrap_err();
        match &e {
            VfioPreflightError::GroupNotViable { group, others, .. } => {
                assert_eq!(*group, 7);
                assert_eq!(others, "0000:00:04.1 (bound to e1000e)");
            }
            other => panic!("wrong error: {other}"),
        }
        // With the companion moved to vfio-pci the group is viable.
        let h = FakeHost::new();
        h.pci(BDF, Some(7), Some("vfio-pci"))
            .pci("0000:00:04.1", Some(7), Some("vfio-pci"));
        h.check(BDF, VfioBackend::Type1).unwrap();
    }

    #[test]
    fn preflight_without_iommu_group_says_enable_the_iommu() {
        let h = FakeHost::new();
        h.pci(BDF, None, Some("vfio-pci"));
        let e = h.check(BDF, VfioBackend::Type1).unwrap_err();
        assert!(matches!(e, VfioPreflightError::NoIommuGroup { .. }));
        assert!(e.to_string().contains("intel_iommu=on"));
    }

    #[test]
    fn preflight_iommufd_on_a_kernel_without_it() {
        let h = FakeHost::new();
        h.pci(BDF, Some(7), Some("vfio-pci"));
        h.cdev(BDF, "vfio0");
        let e = h.check(BDF, VfioBackend::Iommufd).unwrap_err();
        assert!(
            matches!(e, VfioPreflightError::IommufdUnavailable { .. }),
            "{e}"
        );
        assert!(e.to_string().contains("use iommufd=off"));
        // /dev/iommu present but no device cdev (CONFIG_VFIO_DEVICE_CDEV off).
        let h = FakeHost::new();
        h.pci(BDF, Some(7), Some("vfio-pci"));
        std::fs::write(h.roots.dev.join("iommu"), b"").unwrap();
        assert!(matches!(
            h.check(BDF, VfioBackend::Iommufd),
            Err(VfioPreflightError::NoDeviceCdev { .. })
        ));
    }

    #[test]
    fn preflight_missing_group_node_says_load_vfio() {
        let h = FakeHost::new();
        h.pci(BDF, Some(7), Some("vfio-pci"));
        std::fs::remove_file(h.roots.dev.join("vfio/7")).unwrap();
        let e = h.check(BDF, VfioBackend::Type1).unwrap_err();
        assert!(
            matches!(&e, VfioPreflightError::NodeMissing { path } if path.ends_with("vfio/7")),
            "{e}"
        );
    }

    #[test]
    fn preflight_open_errors_map_to_their_fix() {
        let p = Path::new("/dev/vfio/7");
        let e = |errno| classify_open_error(p, std::io::Error::from_raw_os_error(errno));
        assert!(matches!(
            e(libc::EACCES),
            VfioPreflightError::NoPermission { .. }
        ));
        assert!(matches!(
            e(libc::EPERM),
            VfioPreflightError::NoPermission { .. }
        ));
        assert!(matches!(e(libc::EBUSY), VfioPreflightError::Busy { .. }));
        assert!(matches!(
            e(libc::ENOENT),
            VfioPreflightError::NodeMissing { .. }
        ));
        assert!(matches!(e(libc::EIO), VfioPreflightError::OpenNode { .. }));
        assert!(e(libc::EACCES)
            .to_string()
            .contains("no permission to open /dev/vfio/7"));
    }

    #[test]
    fn preflight_recognises_mdevs_and_non_devices() {
        let h = FakeHost::new();
        let uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
        let dev = h.root.join("sys/devices/virtual/mtty/mtty").join(uuid);
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("mdev_type"), b"").unwrap();
        let gdir = h.roots.sys.join("kernel/iommu_groups/12");
        std::fs::create_dir_all(gdir.join("devices")).unwrap();
        symlink(&gdir, dev.join("iommu_group")).unwrap();
        symlink(&dev, gdir.join("devices").join(uuid)).unwrap();
        std::fs::write(h.roots.dev.join("vfio/12"), b"").unwrap();
        let link = h.roots.sys.join("bus/mdev/devices").join(uuid);
        symlink(&dev, &link).unwrap();
        let spec = VfioDeviceSpec {
            path: link,
            id: uuid.into(),
            backend: VfioBackend::Type1,
            dirty: Default::default(),
        };
        let t = preflight(&spec, &h.roots).unwrap();
        assert_eq!(t.kind, VfioDeviceKind::Mdev { uuid: uuid.into() });
        assert_eq!(t.group, 12);
        let not_dev = VfioDeviceSpec {
            path: h.roots.sys.join("bus"),
            id: "bus".into(),
            backend: VfioBackend::Type1,
            dirty: Default::default(),
        };
        assert!(matches!(
            preflight(&not_dev, &h.roots),
            Err(VfioPreflightError::NotADevice { .. })
        ));
    }
}
