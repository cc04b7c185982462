//! VMM state decoding target: the engine's opaque state blobs (vCPUs, VM, devices by id) as a
//! destination receives them, through `decode_state` and then the restores that need no KVM
//! (CMOS, PCI configuration spaces). Invariant: a typed error or a state that encodes again.

use tern_devices::legacy::cmos::Cmos;
use tern_devices::pci::config::ConfigSpace;
use tern_devices::pci::root::HostBridge;
use tern_devices::pci::{PciDevice, PciDeviceState};
use tern_migration::engine::MigrationState;
use tern_vmm::device_manager::DeviceStates;
use tern_vmm::machine::MachineState;
use tern_vmm::migration::state_codec::{decode_state, encode_state};
use tern_vmm::pci_manager::PciManagerState;
use tern_vmm::vstate::vcpu_state::VcpuState;
use tern_vmm::vstate::vm::VmState;

use super::input::Input;

const IDS: [&str; 6] = [
    "serial0",
    "cmos0",
    "pci0",
    "mock-dma/a",
    "mock-dma/",
    "gpu7",
];
const MAX_BLOB: usize = 1 << 20;

/// Recipe → the state blobs: `u8` vCPU count (mod 4), each `u32` index + blob; `u8` device count
/// (mod 8), each `u8` id choice (an unknown choice reads a raw id) + blob; the VM blob is the rest.
/// A blob is a `u32` length (mod its maximum + 1) then its bytes.
fn parse(data: &[u8]) -> MigrationState {
    let mut inp = Input::new(data);
    let vcpus = (0..inp.u8() % 4)
        .map(|_| (inp.u32(), inp.bytes(MAX_BLOB).to_vec()))
        .collect();
    let devices = (0..inp.u8() % 8)
        .map(|_| {
            let id = match IDS.get(usize::from(inp.u8())) {
                Some(id) => id.to_string(),
                None => String::from_utf8_lossy(inp.bytes(32)).into_owned(),
            };
            (id, inp.bytes(MAX_BLOB).to_vec())
        })
        .collect();
    MigrationState {
        vm: inp.rest().to_vec(),
        vcpus,
        devices,
    }
}

fn unparse(s: &MigrationState) -> Vec<u8> {
    let mut out = vec![s.vcpus.len() as u8];
    let blob = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    };
    for (i, b) in &s.vcpus {
        out.extend_from_slice(&i.to_le_bytes());
        blob(&mut out, b);
    }
    out.push(s.devices.len() as u8);
    for (id, b) in &s.devices {
        match IDS.iter().position(|k| k == id) {
            Some(k) => out.push(k as u8),
            None => {
                out.push(0xff);
                blob(&mut out, id.as_bytes());
            }
        }
        blob(&mut out, b);
    }
    out.extend_from_slice(&s.vm);
    out
}

/// Every register and byte of a restored configuration space, and its capability list.
fn exercise(config: &ConfigSpace) {
    for reg in 0..64 {
        let _ = config.read_reg(reg);
    }
    let mut b = [0u8; 4];
    for offset in 0..260 {
        for len in [1, 2, 4] {
            config.read(offset, &mut b[..len]);
        }
    }
    assert!(config.capabilities().len() <= 48);
    let mut c = config.clone();
    for offset in (0..256).step_by(4) {
        c.write(offset, &[0xff; 4]);
    }
}

/// Target `vmm_state`.
pub fn state(data: &[u8]) {
    let blobs = parse(data);
    let Ok(state) = decode_state(&blobs) else {
        return;
    };
    encode_state(&state).expect("a decoded state encodes again");
    let _ = Cmos::restore(&state.devices.cmos);
    for (_, f) in &state.devices.pci.functions {
        match f {
            PciDeviceState::HostBridge(s) => {
                if let Ok(hb) = HostBridge::restore(s) {
                    exercise(&ConfigSpace::restore(&s.config).expect("restored once"));
                    let _ = hb.save();
                }
            }
            PciDeviceState::Vfio(s) => {
                if let Ok(c) = ConfigSpace::restore(&s.config) {
                    exercise(&c);
                }
            }
        }
    }
}

/// A machine state as a freshly booted one-vCPU VM has it, without KVM.
fn sample_state(vcpus: usize) -> MachineState {
    let vcpu = || VcpuState {
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic: Default::default(),
        msrs: vec![Default::default(); 2],
        events: Default::default(),
        tsc_khz: Some(2_000_000),
    };
    let bridge = HostBridge::new().save().expect("host bridge state");
    MachineState {
        vcpus: (0..vcpus).map(|_| vcpu()).collect(),
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        devices: DeviceStates {
            serial: serde_json::from_str(
                r#"{"baud_divisor_low":12,"baud_divisor_high":0,"interrupt_enable":0,
                "interrupt_identification":1,"line_control":3,"line_status":96,"modem_control":8,
                "modem_status":176,"scratch":0,"in_buffer":[104,105]}"#,
            )
            .expect("serial state"),
            cmos: Cmos::new().save(),
            pci: PciManagerState {
                functions: vec![(0, bridge)],
            },
            mock_dma: serde_json::from_str(r#"{"sim1":{"writes":3,"seqs":[0,1,2,0]}}"#)
                .expect("mock-dma state"),
        },
    }
}

/// Seeds: valid encoded states (one and two vCPUs), one with a device missing, one unknown id.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for n in [1, 2] {
        let s = encode_state(&sample_state(n)).expect("encode");
        out.push(unparse(&s));
        let mut missing = s.clone();
        missing.devices.retain(|(id, _)| id != "pci0");
        out.push(unparse(&missing));
        let mut unknown = s;
        unknown.devices.push(("vfio/x".into(), b"{}".to_vec()));
        out.push(unparse(&unknown));
    }
    out
}

/// The recipe format reads back what [`seeds`] wrote.
pub fn parse_round_trips() {
    for (i, s) in seeds().iter().enumerate() {
        assert_eq!(&unparse(&parse(s)), s);
        // Seeds 0 and 3 are complete states, the others lack or add a device.
        let decoded = decode_state(&parse(s));
        assert_eq!(decoded.is_ok(), i % 3 == 0, "seed {i}: {:?}", decoded.err());
    }
}
