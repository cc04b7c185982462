//! `--guest demo[,key=value...]` options.

use serde::{Deserialize, Serialize};

/// Options of the demo guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemoConfig {
    /// Working-set size in MiB (split evenly between the vCPUs).
    pub mib: u64,
    /// How fast the guest rewrites its working set, in MiB/s over all vCPUs; 0 = never (idle).
    pub dirty_mib_per_s: u64,
    /// Power off after this many seconds; `None` = run until stopped.
    pub exit_after_s: Option<u64>,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            mib: 64,
            dirty_mib_per_s: 16,
            exit_after_s: None,
        }
    }
}

/// A bad `--guest` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DemoConfigError {
    #[error("unknown guest '{0}': the only built-in guest is 'demo'")]
    UnknownGuest(String),
    #[error("unknown demo guest option '{0}': valid options are mib=N, dirty-mib-per-s=N, exit-after=SECONDS")]
    UnknownKey(String),
    #[error("demo guest option '{key}' needs a value: {key}=N")]
    MissingValue { key: String },
    #[error("demo guest option '{key}={value}' is not a non-negative integer")]
    BadNumber { key: String, value: String },
    #[error("demo guest working set must be at least 1 MiB (mib=0 given)")]
    EmptyWorkingSet,
}

impl std::str::FromStr for DemoConfig {
    type Err = DemoConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let name = parts.next().unwrap_or_default();
        if name != "demo" {
            return Err(DemoConfigError::UnknownGuest(name.to_owned()));
        }
        let mut config = DemoConfig::default();
        for part in parts.filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                if matches!(part, "mib" | "dirty-mib-per-s" | "exit-after") {
                    DemoConfigError::MissingValue { key: part.into() }
                } else {
                    DemoConfigError::UnknownKey(part.into())
                }
            })?;
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| DemoConfigError::BadNumber {
                        key: key.into(),
                        value: value.into(),
                    })
            };
            match key {
                "mib" => config.mib = number()?,
                "dirty-mib-per-s" => config.dirty_mib_per_s = number()?,
                "exit-after" => config.exit_after_s = Some(number()?),
                _ => return Err(DemoConfigError::UnknownKey(key.into())),
            }
        }
        if config.mib == 0 {
            return Err(DemoConfigError::EmptyWorkingSet);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_parses_keys() {
        let c: DemoConfig = "demo,mib=4,dirty-mib-per-s=70,exit-after=3"
            .parse()
            .unwrap();
        assert_eq!(
            c,
            DemoConfig {
                mib: 4,
                dirty_mib_per_s: 70,
                exit_after_s: Some(3)
            }
        );
        assert_eq!("demo".parse::<DemoConfig>().unwrap(), DemoConfig::default());
    }

    #[test]
    fn demo_config_rejects_bad_input() {
        use DemoConfigError::*;
        assert_eq!(
            "linux".parse::<DemoConfig>(),
            Err(UnknownGuest("linux".into()))
        );
        assert_eq!(
            "demo,foo=1".parse::<DemoConfig>(),
            Err(UnknownKey("foo".into()))
        );
        assert_eq!(
            "demo,bar".parse::<DemoConfig>(),
            Err(UnknownKey("bar".into()))
        );
        assert_eq!(
            "demo,mib".parse::<DemoConfig>(),
            Err(MissingValue { key: "mib".into() })
        );
        assert!(matches!(
            "demo,mib=-1".parse::<DemoConfig>(),
            Err(BadNumber { .. })
        ));
        assert_eq!("demo,mib=0".parse::<DemoConfig>(), Err(EmptyWorkingSet));
    }
}
