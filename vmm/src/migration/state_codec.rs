//! Machine state ⇄ the engine's opaque [`MigrationState`]: one serde_json encoding per blob, each in
//! its own frame (vCPU i, VM, device by id) — never JSON inside JSON.

use std::collections::BTreeMap;

use tern_migration::engine::MigrationState;

use crate::device_manager::DeviceStates;
use crate::machine::MachineState;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;

const SERIAL_ID: &str = "serial0";
const CMOS_ID: &str = "cmos0";
const PCI_ID: &str = "pci0";
const MOCK_DMA_ID: &str = "mock-dma";

/// The received state does not decode into a machine state.
#[derive(Debug, thiserror::Error)]
pub enum StateCodecError {
    #[error("cannot encode {what} state")]
    Encode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot decode {what} state from the migration stream")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("migration state lacks {what}")]
    Missing { what: String },
    #[error("migration state has vCPU indices {found:?}; expected 0..{expected}")]
    VcpuIndices { found: Vec<u32>, expected: usize },
    #[error("migration state has an unknown device '{id}'")]
    UnknownDevice { id: String },
}

fn encode<T: serde::Serialize>(what: &str, v: &T) -> Result<Vec<u8>, StateCodecError> {
    serde_json::to_vec(v).map_err(|source| StateCodecError::Encode {
        what: what.into(),
        source,
    })
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, StateCodecError> {
    serde_json::from_slice(b).map_err(|source| StateCodecError::Decode {
        what: what.into(),
        source,
    })
}

/// Splits a machine state into the engine's blobs.
pub fn encode_state(state: &MachineState) -> Result<MigrationState, StateCodecError> {
    let vcpus = state
        .vcpus
        .iter()
        .enumerate()
        .map(|(i, v)| Ok((i as u32, encode(&format!("vCPU {i}"), v)?)))
        .collect::<Result<Vec<_>, StateCodecError>>()?;
    let mut devices = vec![
        (SERIAL_ID.into(), encode(SERIAL_ID, &state.devices.serial)?),
        (CMOS_ID.into(), encode(CMOS_ID, &state.devices.cmos)?),
        (PCI_ID.into(), encode(PCI_ID, &state.devices.pci)?),
    ];
    for (id, m) in &state.devices.mock_dma {
        let section = format!("{MOCK_DMA_ID}/{id}");
        let bytes = encode(&section, m)?;
        devices.push((section, bytes));
    }
    Ok(MigrationState {
        vm: encode("VM", &state.vm)?,
        vcpus,
        devices,
    })
}

/// The device id of a mock-dma state section (`mock-dma/ID`).
fn mock_dma_id(section: &str) -> Option<&str> {
    section
        .strip_prefix(MOCK_DMA_ID)?
        .strip_prefix('/')
        .filter(|id| !id.is_empty())
}

/// Rebuilds a machine state from the engine's blobs, refusing anything missing or unknown.
pub fn decode_state(state: &MigrationState) -> Result<MachineState, StateCodecError> {
    let mut vcpus: Vec<(u32, VcpuState)> = state
        .vcpus
        .iter()
        .map(|(i, b)| Ok((*i, decode(&format!("vCPU {i}"), b)?)))
        .collect::<Result<_, StateCodecError>>()?;
    vcpus.sort_by_key(|(i, _)| *i);
    let indices: Vec<u32> = vcpus.iter().map(|(i, _)| *i).collect();
    if indices.iter().enumerate().any(|(pos, i)| pos as u32 != *i) {
        return Err(StateCodecError::VcpuIndices {
            found: indices,
            expected: vcpus.len(),
        });
    }
    let mut serial = None;
    let mut cmos = None;
    let mut pci = None;
    let mut mock_dma = BTreeMap::new();
    for (id, bytes) in &state.devices {
        match id.as_str() {
            SERIAL_ID => serial = Some(decode(SERIAL_ID, bytes)?),
            CMOS_ID => cmos = Some(decode(CMOS_ID, bytes)?),
            PCI_ID => pci = Some(decode(PCI_ID, bytes)?),
            other => match mock_dma_id(other) {
                Some(mock) => {
                    mock_dma.insert(mock.to_string(), decode(other, bytes)?);
                }
                None => return Err(StateCodecError::UnknownDevice { id: id.clone() }),
            },
        }
    }
    let missing = |what: &str| StateCodecError::Missing { what: what.into() };
    Ok(MachineState {
        vcpus: vcpus.into_iter().map(|(_, v)| v).collect(),
        vm: decode::<VmState>("VM", &state.vm)?,
        devices: DeviceStates {
            serial: serial.ok_or_else(|| missing(SERIAL_ID))?,
            cmos: cmos.ok_or_else(|| missing(CMOS_ID))?,
            pci: pci.ok_or_else(|| missing(PCI_ID))?,
            mock_dma,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_state_rejects_garbage_and_gaps() {
        let bad = MigrationState {
            vm: b"{not json".to_vec(),
            vcpus: vec![],
            devices: vec![],
        };
        assert!(matches!(
            decode_state(&bad),
            Err(StateCodecError::Decode { .. })
        ));
        let unknown = MigrationState {
            vm: b"{}".to_vec(),
            vcpus: vec![],
            devices: vec![("gpu7".into(), b"{}".to_vec())],
        };
        assert!(matches!(
            decode_state(&unknown),
            Err(StateCodecError::UnknownDevice { .. })
        ));
    }

    #[test]
    fn mock_dma_sections_carry_their_device_id() {
        assert_eq!(mock_dma_id("mock-dma/sim1"), Some("sim1"));
        assert_eq!(mock_dma_id("mock-dma/a/b"), Some("a/b"));
        for bad in ["mock-dma", "mock-dma/", "mock-dmax/a", "serial"] {
            assert_eq!(mock_dma_id(bad), None, "{bad}");
        }
    }
}
