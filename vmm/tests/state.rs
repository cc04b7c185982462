//! Whole-VM state save/restore on a running demo guest, on this host's /dev/kvm: pause a VM, save its
//! vCPU/VM/device state through JSON (as migration sends it), copy its RAM into a second VM, restore,
//! and check the guest carries on where it was, with its verifier clean — and that the verifier does
//! catch a page that was not carried over.

mod common;

use std::path::Path;
use std::time::Duration;

use common::TempDir;
use tern_migration::engine::StepTimes;
use tern_vmm::config::{PayloadConfig, SerialConfig, VmConfig};
use tern_vmm::demo::setup::layout;
use tern_vmm::demo::DemoConfig;
use tern_vmm::machine::{Machine, MachineState};
use tern_vmm::vstate::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

fn demo_config(serial: &Path, cpus: u8) -> VmConfig {
    VmConfig {
        cpus,
        memory_bytes: 128 << 20,
        payload: PayloadConfig::Demo(DemoConfig {
            mib: 8,
            dirty_mib_per_s: 64,
            exit_after_s: None,
        }),
        serial: SerialConfig::File(serial.to_owned()),
        dirty_tracking: Default::default(),
        devices: Vec::new(),
        mock_dma: Vec::new(),
    }
}

fn copy_ram(from: &GuestRam, to: &GuestRam) {
    for region in from.memory().iter() {
        let mut buf = vec![0u8; region.len() as usize];
        from.memory()
            .read_slice(&mut buf, region.start_addr())
            .unwrap();
        to.memory().write_slice(&buf, region.start_addr()).unwrap();
    }
}

fn wait_for(path: &Path, needle: &str, timeout: Duration) -> String {
    let start = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) || start.elapsed() > timeout {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a demo VM for a while, pauses it, and returns it with its state.
fn run_and_save(dir: &TempDir, cpus: u8) -> (Machine, MachineState) {
    let serial = dir.join("source.log");
    let source = Machine::create(Path::new("/dev/kvm"), demo_config(&serial, cpus)).unwrap();
    source.resume();
    let text = wait_for(&serial, "verified", Duration::from_secs(10));
    assert!(text.contains("DEMO: start"), "{text}");
    std::thread::sleep(Duration::from_millis(300));
    source.pause();
    let state = source.save_state(&mut StepTimes::start()).unwrap();
    // Through JSON, as the migration stream carries it.
    let json = serde_json::to_vec(&state).unwrap();
    (source, serde_json::from_slice(&json).unwrap())
}

fn restore(
    dir: &TempDir,
    source: &Machine,
    state: &MachineState,
    cpus: u8,
) -> (Machine, std::path::PathBuf) {
    let serial = dir.join("dest.log");
    let ram = GuestRam::new(128 << 20).unwrap();
    copy_ram(source.ram(), &ram);
    let dest = Machine::restore(
        Path::new("/dev/kvm"),
        demo_config(&serial, cpus),
        ram,
        state,
    )
    .unwrap();
    (dest, serial)
}

#[test]
fn restored_vm_continues_where_it_was() {
    for cpus in [1u8, 2] {
        let dir = TempDir::new("state");
        let (source, state) = run_and_save(&dir, cpus);
        assert_eq!(state.vcpus.len(), usize::from(cpus));
        let (dest, serial) = restore(&dir, &source, &state, cpus);
        drop(source);
        dest.resume();
        std::thread::sleep(Duration::from_millis(2500));
        dest.pause();
        let text = std::fs::read_to_string(&serial).unwrap();
        assert!(
            !text.contains("DEMO: start"),
            "guest rebooted instead of resuming: {text}"
        );
        assert!(
            !text.contains("CORRUPT") && !text.contains("FAULT"),
            "{text}"
        );
        let first_pass: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("DEMO: pass "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no progress after restore: {text}"));
        assert!(first_pass > 0, "pass counter restarted: {text}");
        // The restored VM's own state can be saved again.
        let again = dest.save_state(&mut StepTimes::start()).unwrap();
        assert_eq!(again.vcpus.len(), usize::from(cpus));
        assert_eq!(
            again.devices.pci, state.devices.pci,
            "PCI state did not carry over"
        );
        assert!(
            !again.devices.pci.functions.is_empty(),
            "no PCI functions saved"
        );
        assert!(again.vcpus[0].regs.rip != 0);
    }
}

#[test]
fn verifier_catches_a_page_that_was_not_carried_over() {
    let dir = TempDir::new("oracle");
    let (source, state) = run_and_save(&dir, 1);
    let (dest, serial) = restore(&dir, &source, &state, 1);
    // Pick a page the guest has written (generation > 0) and wipe it on the destination only,
    // as a migration that lost that page would.
    let l = layout(
        &DemoConfig {
            mib: 8,
            ..Default::default()
        },
        128 << 20,
    )
    .unwrap();
    let mem = dest.ram().memory();
    let page = (0..l.pages)
        .find(|p| {
            let gen: u32 = mem.read_obj(GuestAddress(l.gen_table + p * 4)).unwrap();
            gen > 0
        })
        .expect("the guest wrote pages");
    mem.write_slice(&[0u8; 4096], GuestAddress(l.working_set + page * 4096))
        .unwrap();
    drop(source);
    dest.resume();
    let text = wait_for(&serial, "CORRUPT", Duration::from_secs(10));
    assert!(
        text.contains(&format!("DEMO: CORRUPT page={page} ")),
        "verifier missed the lost page {page}: {text}"
    );
}
