//! Which kernel interface reports a passthrough device's DMA writes, chosen per device from what
//! the kernel says it can do, best first:
//!
//! 1. **iommufd HWPT dirty tracking** — the IOMMU's own dirty bits (HWDBM): exact, peekable,
//!    read-and-cleared per chunk.
//! 2. **Device DMA logging** (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`) — the device's own tracker.
//! 3. **type1 `VFIO_IOMMU_DIRTY_PAGES`** — exact for an mdev, whose vendor driver pins every page
//!    it writes; for a vfio-pci device it reports *every mapped page* on every read, so it is used
//!    only when the operator opts in (`dirty=type1`) and accepts re-sending all RAM per iteration.
//! 4. **none** — nothing usable: migration is refused, naming the device and what is missing,
//!    unless the operator says the device never writes guest memory (`dirty=none`).

use std::fmt;
use std::str::FromStr;

/// A DMA dirty-tracking interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DmaDirtyMethod {
    /// `IOMMU_HWPT_SET_DIRTY_TRACKING` / `IOMMU_HWPT_GET_DIRTY_BITMAP` on the device's HWPT.
    Iommufd,
    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START/REPORT/STOP` on the device.
    DmaLogging,
    /// `VFIO_IOMMU_DIRTY_PAGES` on the device's type1 container.
    Type1,
}

impl DmaDirtyMethod {
    /// The name used in `dirty=`, `vm.info` and logs.
    pub fn name(self) -> &'static str {
        match self {
            DmaDirtyMethod::Iommufd => "iommufd",
            DmaDirtyMethod::DmaLogging => "dma-logging",
            DmaDirtyMethod::Type1 => "type1",
        }
    }
}

/// What the operator asked for with `dirty=`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DirtyChoice {
    /// The best method the kernel offers (`dirty=auto`, the default).
    #[default]
    Auto,
    /// Exactly this method, or the device is refused at start (`dirty=iommufd|dma-logging|type1`).
    Force(DmaDirtyMethod),
    /// Track nothing: the operator states the device never writes guest memory (`dirty=none`).
    Untracked,
}

impl fmt::Display for DirtyChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyChoice::Auto => f.write_str("auto"),
            DirtyChoice::Force(m) => f.write_str(m.name()),
            DirtyChoice::Untracked => f.write_str("none"),
        }
    }
}

impl serde::Serialize for DirtyChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DirtyChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `dirty=` got a value that names no method.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dirty={0:?} must be auto, iommufd, dma-logging, type1 or none")]
pub struct BadDirtyChoice(pub String);

impl FromStr for DirtyChoice {
    type Err = BadDirtyChoice;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => DirtyChoice::Auto,
            "iommufd" | "hwpt" => DirtyChoice::Force(DmaDirtyMethod::Iommufd),
            "dma-logging" => DirtyChoice::Force(DmaDirtyMethod::DmaLogging),
            "type1" => DirtyChoice::Force(DmaDirtyMethod::Type1),
            "none" => DirtyChoice::Untracked,
            _ => return Err(BadDirtyChoice(s.to_string())),
        })
    }
}

/// What the kernel said about one device (read at open, never assumed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DmaDirtyCaps {
    /// The device sits on a HWPT tern allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` (the
    /// IOMMU reported `IOMMU_HW_CAP_DIRTY_TRACKING`).
    pub hwpt_dirty: bool,
    /// `VFIO_DEVICE_FEATURE_PROBE` of DMA_LOGGING_START succeeded.
    pub dma_logging: bool,
    /// The device is in a type1 container (else iommufd).
    pub type1: bool,
    /// The device is an mdev (its vendor driver pins the pages it writes).
    pub mdev: bool,
}

/// The outcome for one device: the method (or none) and why, in words for `vm.info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaDirtySelection {
    /// The method migration uses; `None` when nothing is tracked.
    pub method: Option<DmaDirtyMethod>,
    /// Migration may proceed (a method, or the operator's `dirty=none`).
    pub migratable: bool,
    /// Why this method, or what is missing.
    pub reason: String,
}

/// A forced method the kernel does not offer for the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dirty={method}: {why}", method = .method.name())]
pub struct MethodUnavailable {
    /// The method asked for.
    pub method: DmaDirtyMethod,
    /// What the kernel lacks.
    pub why: &'static str,
}

const NO_HWPT: &str =
    "the IOMMU reports no dirty tracking (IOMMU_GET_HW_INFO without IOMMU_HW_CAP_DIRTY_TRACKING), or the device is not on iommufd";
const NO_LOGGING: &str = "the device does not offer VFIO_DEVICE_FEATURE_DMA_LOGGING";
const NOT_TYPE1: &str = "the device is not in a type1 container (iommufd=on)";

/// Choose the method for a device with `caps` as `choice` asks. An unavailable forced method is
/// an error (the device is refused at start); an automatic choice that finds nothing is a
/// selection that is not migratable, with the missing pieces named.
pub fn select(
    choice: DirtyChoice,
    caps: DmaDirtyCaps,
) -> Result<DmaDirtySelection, MethodUnavailable> {
    let pick = |method, reason: String| DmaDirtySelection {
        method: Some(method),
        migratable: true,
        reason,
    };
    match choice {
        DirtyChoice::Force(m) => {
            let why = match m {
                DmaDirtyMethod::Iommufd if !caps.hwpt_dirty => Some(NO_HWPT),
                DmaDirtyMethod::DmaLogging if !caps.dma_logging => Some(NO_LOGGING),
                DmaDirtyMethod::Type1 if !caps.type1 => Some(NOT_TYPE1),
                _ => None,
            };
            if let Some(why) = why {
                return Err(MethodUnavailable { method: m, why });
            }
            let mut reason = format!("forced with dirty={}", m.name());
            if m == DmaDirtyMethod::Type1 && !caps.mdev {
                reason.push_str(
                    ": type1 reports every mapped page of a vfio-pci device dirty, so all guest RAM is re-sent every iteration",
                );
            }
            Ok(pick(m, reason))
        }
        DirtyChoice::Untracked => Ok(DmaDirtySelection {
            method: None,
            migratable: true,
            reason: "dirty=none: the operator states the device never writes guest memory; its DMA is not tracked".into(),
        }),
        DirtyChoice::Auto => Ok(if caps.hwpt_dirty {
            pick(
                DmaDirtyMethod::Iommufd,
                "the IOMMU tracks dirty pages (IOMMU_HW_CAP_DIRTY_TRACKING) on the device's HWPT".into(),
            )
        } else if caps.dma_logging {
            pick(
                DmaDirtyMethod::DmaLogging,
                "the device offers VFIO_DEVICE_FEATURE_DMA_LOGGING; the IOMMU has no dirty tracking".into(),
            )
        } else if caps.type1 && caps.mdev {
            pick(
                DmaDirtyMethod::Type1,
                "mdev in a type1 container: VFIO_IOMMU_DIRTY_PAGES reports exactly the pages its driver pins".into(),
            )
        } else {
            let mut missing = vec![NO_HWPT, NO_LOGGING];
            if caps.type1 {
                missing.push("type1 dirty tracking would report every mapped page of this vfio-pci device (pass dirty=type1 to accept re-sending all RAM every iteration)");
            }
            DmaDirtySelection {
                method: None,
                migratable: false,
                reason: format!(
                    "no usable DMA dirty tracking: {}; or pass dirty=none if the device never writes guest memory",
                    missing.join("; ")
                ),
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(hwpt: bool, logging: bool, type1: bool, mdev: bool) -> DmaDirtyCaps {
        DmaDirtyCaps {
            hwpt_dirty: hwpt,
            dma_logging: logging,
            type1,
            mdev,
        }
    }

    #[test]
    fn auto_prefers_hwpt_then_logging_then_type1_for_mdev_only() {
        let m = |c| select(DirtyChoice::Auto, c).unwrap().method;
        assert_eq!(
            m(caps(true, true, false, false)),
            Some(DmaDirtyMethod::Iommufd)
        );
        assert_eq!(
            m(caps(false, true, true, true)),
            Some(DmaDirtyMethod::DmaLogging)
        );
        assert_eq!(
            m(caps(false, false, true, true)),
            Some(DmaDirtyMethod::Type1)
        );
        // vfio-pci in type1 without HWPT or logging: nothing, and the reason says how to opt in.
        let s = select(DirtyChoice::Auto, caps(false, false, true, false)).unwrap();
        assert_eq!(s.method, None);
        assert!(!s.migratable);
        assert!(s.reason.contains("dirty=type1"), "{}", s.reason);
        assert!(s.reason.contains("DMA_LOGGING"), "{}", s.reason);
    }

    #[test]
    fn forced_methods_need_the_kernel_to_offer_them() {
        let f = |m| DirtyChoice::Force(m);
        assert_eq!(
            select(f(DmaDirtyMethod::Iommufd), caps(false, true, false, false)),
            Err(MethodUnavailable {
                method: DmaDirtyMethod::Iommufd,
                why: NO_HWPT
            })
        );
        assert!(select(
            f(DmaDirtyMethod::DmaLogging),
            caps(true, false, false, false)
        )
        .is_err());
        assert!(select(f(DmaDirtyMethod::Type1), caps(true, true, false, false)).is_err());
        // type1 on vfio-pci is the explicit opt-in, and says what it costs.
        let s = select(f(DmaDirtyMethod::Type1), caps(false, false, true, false)).unwrap();
        assert_eq!(s.method, Some(DmaDirtyMethod::Type1));
        assert!(s.reason.contains("all guest RAM"), "{}", s.reason);
        let s = select(DirtyChoice::Untracked, caps(true, true, true, true)).unwrap();
        assert_eq!((s.method, s.migratable), (None, true));
    }

    #[test]
    fn dirty_choice_parses_every_name_and_names_a_bad_one() {
        for (s, c) in [
            ("auto", DirtyChoice::Auto),
            ("iommufd", DirtyChoice::Force(DmaDirtyMethod::Iommufd)),
            (
                "dma-logging",
                DirtyChoice::Force(DmaDirtyMethod::DmaLogging),
            ),
            ("type1", DirtyChoice::Force(DmaDirtyMethod::Type1)),
            ("none", DirtyChoice::Untracked),
        ] {
            assert_eq!(s.parse::<DirtyChoice>(), Ok(c));
        }
        let e = "fast".parse::<DirtyChoice>().unwrap_err();
        assert!(e.to_string().contains("\"fast\""));
    }
}
