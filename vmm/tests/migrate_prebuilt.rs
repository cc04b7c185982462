//! The destination's VM built ahead of the source (`TernTargetFactory::prebuild` at
//! `vm.receive-migration`, on a thread) and, in local mode, guest memory mapped into it as soon as
//! the source's memory fd arrives (`local_memory`, before the config): a config that does not fit
//! the memory fd is refused with both sizes, one that fits gets a VM on the handed memfd, a
//! receive that ends early releases every descriptor, and a factory with nothing prebuilt still
//! builds.
//!
//! One test: it counts this process's open descriptors, which tests on parallel threads would
//! disturb.

use std::fs::File;
use std::os::unix::fs::FileExt;

use tern_migration::engine::{error_chain, LocalRegion, MigrationTargetFactory};
use tern_vmm::config::{PayloadConfig, SerialConfig, VmConfig};
use tern_vmm::demo::DemoConfig;
use tern_vmm::migration::target::{ReceivedMachine, TernTargetFactory};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MIB: u64 = 1 << 20;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

fn factory() -> TernTargetFactory {
    TernTargetFactory::new(
        "/dev/kvm".into(),
        SerialConfig::Off,
        ReceivedMachine::new().expect("eventfd"),
        Vec::new(),
    )
}

fn config(memory_bytes: u64) -> Vec<u8> {
    let config = VmConfig {
        cpus: 1,
        memory_bytes,
        payload: PayloadConfig::Demo(DemoConfig {
            mib: 4,
            dirty_mib_per_s: 0,
            exit_after_s: None,
        }),
        serial: SerialConfig::Off,
        dirty_tracking: Default::default(),
        devices: Vec::new(),
        mock_dma: Vec::new(),
    };
    serde_json::to_vec(&config).expect("config")
}

fn memfd(bytes: u64) -> File {
    let f = tern_vmm::sys::memfd::create("test-guest-ram").expect("memfd");
    f.set_len(bytes).expect("size the memfd");
    f
}

/// The region a local source sends for `file` (tern's RAM below 3 GiB: one region at 0).
fn region(file: &File) -> LocalRegion {
    LocalRegion {
        gpa: GuestAddress(0),
        len_bytes: file.metadata().expect("memfd size").len(),
        file: file.try_clone().expect("dup"),
        file_offset: 0,
    }
}

#[test]
fn prebuilt_vm_is_used_checked_against_the_config_and_released() {
    let ram = memfd(64 * MIB);
    let before = open_fds();

    // The VM is built ahead, on a thread.
    let mut f = factory();
    f.prebuild();
    let base = f.base.take().expect("nothing is being prebuilt");
    let base = base.join().expect("prebuild thread").expect("prebuilt VM");
    assert!(open_fds() > before, "the prebuilt VM holds no descriptor?");
    drop(base);
    drop(f);
    assert_eq!(open_fds(), before, "the prebuilt VM leaked descriptors");

    // A receive cancelled before its source connected, the VM maybe still being built: it goes
    // with the factory.
    let mut f = factory();
    f.prebuild();
    drop(f);
    assert_eq!(open_fds(), before, "the prebuilt VM leaked descriptors");

    // A source that handed its memory fd and then went away: the VM with its memory slots goes
    // with the factory.
    let mut f = factory();
    f.prebuild();
    let r = region(&ram);
    f.local_memory(&r).expect("map the memory fd");
    drop(r);
    assert!(
        f.mapped.is_some(),
        "the memory was not mapped as it arrived"
    );
    let steps = f.setup_steps();
    assert!(steps.iter().any(|s| s.name == "memory slots"), "{steps:?}");
    drop(f);
    assert_eq!(
        open_fds(),
        before,
        "the memory mapped ahead leaked descriptors"
    );

    // A config whose memory size is not the memory fd's: refused, naming both, nothing kept.
    let mut f = factory();
    f.prebuild();
    let r = region(&ram);
    f.local_memory(&r).expect("map the memory fd");
    let Err(e) = f.create(&config(128 * MIB), vec![r]) else {
        panic!("a 128 MiB config was built on a 64 MiB memory fd");
    };
    let text = error_chain(&e);
    assert!(
        text.contains(&(64 * MIB).to_string()) && text.contains(&(128 * MIB).to_string()),
        "{text}"
    );
    drop(f);
    assert_eq!(open_fds(), before, "a refused config leaked descriptors");

    // A config that fits: the VM runs on the handed memfd itself (a write through the VM's
    // memory is in the file), built on the memory mapped ahead.
    let mut f = factory();
    f.prebuild();
    let r = region(&ram);
    f.local_memory(&r).expect("map the memory fd");
    let target = f.create(&config(64 * MIB), vec![r]).expect("build the VM");
    let mem = target.guest_memory();
    assert_eq!(
        mem.iter()
            .map(vm_memory::GuestMemoryRegion::len)
            .sum::<u64>(),
        64 * MIB
    );
    mem.write_obj(0x7e57_u64, GuestAddress(0x1000))
        .expect("write guest memory");
    let mut word = [0u8; 8];
    ram.read_exact_at(&mut word, 0x1000)
        .expect("read the memfd");
    assert_eq!(u64::from_le_bytes(word), 0x7e57);
    let steps = f.setup_steps();
    assert!(
        !steps.iter().any(|s| s.name == "memory slots"),
        "the memory slots were registered again: {steps:?}"
    );
    drop(mem);
    drop(target);
    drop(f);

    // Nothing prebuilt (it failed, or a caller never asked): create builds it all itself.
    let mut f = factory();
    let r = region(&ram);
    f.local_memory(&r)
        .expect("no prebuilt VM: nothing to map yet");
    assert!(f.mapped.is_none());
    let target = f.create(&config(64 * MIB), vec![r]).expect("build the VM");
    let steps = f.setup_steps();
    assert!(steps.iter().any(|s| s.name == "memory slots"), "{steps:?}");
    drop(target);
}
