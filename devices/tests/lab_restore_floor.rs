//! The floor of a switchover's KVM work on this kernel: what the bare ioctl sequence of tern's
//! state save and restore costs (one vCPU; the same ioctls, in the same order, as
//! `vmm/src/vstate/{vcpu_state,vm}.rs`), how long a vCPU takes to leave KVM_RUN when kicked
//! (halted and spinning guest), and one thread-to-thread wake-up (what every hand-off between
//! the migration thread, a lane, the peer watcher and a vCPU thread costs at least).
//!
//! A benchmark that prints numbers and asserts only that each ioctl succeeds. In the nested lab
//! (`scripts/lab run restore-floor`: tern's own KVM is the L1 kernel's, under QEMU TCG) it says
//! whether a live update's downtime goal is reachable there at all; on a host,
//! `cargo test -p tern-devices --test lab_restore_floor -- --ignored --nocapture` gives the same
//! lines for comparison:
//!
//! ```text
//! RESTORE-FLOOR step=set_msrs first_us=812 median_us=190
//! RESTORE-FLOOR total save_us=.. restore_us=.. kick_halted_us=.. kick_spinning_us=.. wakeup_us=..
//! ```
//!
//! `first` is the first run in this process (code and data not yet faulted in, as in a new tern
//! at a live update), `median` the median of [`RUNS`] more.

use std::io::Write;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi, kvm_irqchip,
    kvm_msr_entry, kvm_pit_config, kvm_userspace_memory_region, KvmIrqRouting, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// Timed runs after the first.
const RUNS: usize = 15;
/// Guest code at this address: `hlt; jmp -3` (halted) and, 16 bytes on, `jmp $` (spinning).
const CODE: u64 = 0x1000;
const SPIN: u64 = CODE + 16;

fn out(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// First and median time of `f` over 1 + [`RUNS`] calls.
struct Step {
    name: &'static str,
    first: u64,
    runs: Vec<u64>,
}

impl Step {
    fn print(&self) -> u64 {
        let m = median(self.runs.clone());
        out(&format!(
            "RESTORE-FLOOR step={} first_us={} median_us={m}",
            self.name, self.first
        ));
        m
    }
}

/// One more run of step `name` (its first run is kept apart: a cold first call).
fn record(steps: &mut Vec<Step>, name: &'static str, took: u64) {
    match steps.iter_mut().find(|s| s.name == name) {
        Some(s) => s.runs.push(took),
        None => steps.push(Step {
            name,
            first: took,
            runs: Vec::new(),
        }),
    }
}

fn time<T>(steps: &mut Vec<Step>, name: &'static str, f: impl FnOnce() -> T) -> T {
    let t0 = Instant::now();
    let v = f();
    record(steps, name, us(t0.elapsed()));
    v
}

struct Machine {
    _kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    msr_indices: Vec<u32>,
    _mem: GuestMemoryMmap,
}

fn machine() -> Machine {
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("create VM");
    vm.set_tss_address(0xfffb_d000).expect("TSS");
    vm.create_irq_chip().expect("irqchip");
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .expect("PIT");
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
    mem.write_slice(&[0xf4, 0xeb, 0xfd], GuestAddress(CODE))
        .expect("code");
    mem.write_slice(&[0xeb, 0xfe], GuestAddress(SPIN))
        .expect("code");
    let host = mem.get_host_address(GuestAddress(0)).expect("host address") as u64;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: 1 << 20,
        userspace_addr: host,
        flags: 0,
    };
    // SAFETY: `mem` maps these 1 MiB and lives in the returned Machine next to the VM, which is
    // dropped (closing the slot) with it.
    unsafe { vm.set_user_memory_region(region) }.expect("memory slot");
    let vcpu = vm.create_vcpu(0).expect("vCPU");
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("CPUID");
    vcpu.set_cpuid2(&cpuid).expect("set CPUID");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("set sregs");
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("set regs");
    // The MSRs tern saves: every listed one this vCPU can read.
    let list = kvm.get_msr_index_list().expect("MSR list");
    let msr_indices = list
        .as_slice()
        .iter()
        .copied()
        .filter(|&index| {
            let mut probe = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .expect("one MSR");
            matches!(vcpu.get_msrs(&mut probe), Ok(1))
        })
        .collect();
    Machine {
        _kvm: kvm,
        vm,
        vcpu,
        msr_indices,
        _mem: mem,
    }
}

fn irqchip(vm: &VmFd, chip_id: u32) -> kvm_irqchip {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).expect("get irqchip");
    chip
}

/// One save and one restore, each ioctl group timed as tern times it.
fn save_restore(m: &Machine, save: &mut Vec<Step>, restore: &mut Vec<Step>) {
    let (vm, vcpu) = (&m.vm, &m.vcpu);
    let mp = time(save, "get_mp_state", || vcpu.get_mp_state().expect("mp"));
    let regs = time(save, "get_regs", || vcpu.get_regs().expect("regs"));
    let sregs = time(save, "get_sregs", || vcpu.get_sregs().expect("sregs"));
    let xsave = time(save, "get_xsave", || vcpu.get_xsave().expect("xsave"));
    let xcrs = time(save, "get_xcrs", || vcpu.get_xcrs().expect("xcrs"));
    let dbg = time(save, "get_debugregs", || vcpu.get_debug_regs().expect("dr"));
    let lapic = time(save, "get_lapic", || vcpu.get_lapic().expect("lapic"));
    let msrs = time(save, "get_msrs", || {
        let entries: Vec<_> = m
            .msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("MSR list");
        let n = vcpu.get_msrs(&mut msrs).expect("get MSRs");
        assert_eq!(n, entries.len(), "MSRs read");
        msrs
    });
    let events = time(save, "get_vcpu_events", || {
        vcpu.get_vcpu_events().expect("ev")
    });
    let chips = time(save, "get_irqchip x3", || {
        [
            irqchip(vm, KVM_IRQCHIP_PIC_MASTER),
            irqchip(vm, KVM_IRQCHIP_PIC_SLAVE),
            irqchip(vm, KVM_IRQCHIP_IOAPIC),
        ]
    });
    let pit = time(save, "get_pit2", || vm.get_pit2().expect("pit"));
    let clock = time(save, "get_clock", || vm.get_clock().expect("clock"));

    time(restore, "set_irqchip x3", || {
        for c in &chips {
            vm.set_irqchip(c).expect("set irqchip");
        }
    });
    time(restore, "set_pit2", || vm.set_pit2(&pit).expect("set pit"));
    time(restore, "set_clock", || {
        let c = kvm_bindings::kvm_clock_data {
            clock: clock.clock,
            ..Default::default()
        };
        vm.set_clock(&c).expect("set clock")
    });
    time(restore, "get_tsc_khz", || vcpu.get_tsc_khz().expect("tsc"));
    time(restore, "set_mp_state", || {
        vcpu.set_mp_state(mp).expect("mp")
    });
    time(restore, "set_regs", || vcpu.set_regs(&regs).expect("regs"));
    time(restore, "set_sregs", || {
        vcpu.set_sregs(&sregs).expect("sregs")
    });
    time(restore, "set_xsave", || {
        // SAFETY: this process never asks for dynamic XSTATE permission (ARCH_REQ_XCOMP_GUEST_PERM),
        // so KVM reads at most the 4096 bytes of `kvm_xsave`, which KVM_GET_XSAVE just filled.
        unsafe { vcpu.set_xsave(&xsave) }.expect("xsave")
    });
    time(restore, "set_xcrs", || vcpu.set_xcrs(&xcrs).expect("xcrs"));
    time(restore, "set_debugregs", || {
        vcpu.set_debug_regs(&dbg).expect("dr")
    });
    time(restore, "set_lapic", || {
        vcpu.set_lapic(&lapic).expect("lapic")
    });
    time(restore, "set_msrs", || {
        let n = vcpu.set_msrs(&msrs).expect("set MSRs");
        assert_eq!(n, msrs.as_slice().len(), "MSRs written");
    });
    time(restore, "set_vcpu_events", || {
        vcpu.set_vcpu_events(&events).expect("events")
    });
}

/// A device vector's route and irqfd, as a restore with one MSI vector sets them.
fn routes_and_irqfd(m: &Machine, steps: &mut Vec<Step>, irqfd: &EventFd) {
    let mut entries: Vec<kvm_irq_routing_entry> = (0..24)
        .map(|pin| {
            let mut e = kvm_irq_routing_entry {
                gsi: pin,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip = kvm_irq_routing_irqchip {
                irqchip: KVM_IRQCHIP_IOAPIC,
                pin,
            };
            e
        })
        .collect();
    let mut msi = kvm_irq_routing_entry {
        gsi: 24,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    msi.u.msi = kvm_irq_routing_msi {
        address_lo: 0xfee0_0000,
        data: 0x41,
        ..Default::default()
    };
    entries.push(msi);
    let table = KvmIrqRouting::from_entries(&entries).expect("routing table");
    time(steps, "set_gsi_routing", || {
        m.vm.set_gsi_routing(&table).expect("routing")
    });
    time(steps, "irqfd assign", || {
        m.vm.register_irqfd(irqfd, 24).expect("irqfd")
    });
    time(steps, "irqfd deassign", || {
        m.vm.unregister_irqfd(irqfd, 24).expect("irqfd off")
    });
}

/// Kicks the vCPU thread out of KVM_RUN (guest at `rip`) 1 + [`RUNS`] times: the time from the
/// signal to the thread saying it is out.
fn kicks(m: Machine, rip: u64, name: &'static str, steps: &mut Vec<Step>) -> Machine {
    let mut regs = m.vcpu.get_regs().expect("regs");
    regs.rip = rip;
    regs.rflags = 2;
    m.vcpu.set_regs(&regs).expect("set regs");
    let (out_tx, out_rx) = mpsc::channel::<Instant>();
    let (go_tx, go_rx) = mpsc::channel::<bool>();
    let Machine {
        _kvm,
        vm,
        mut vcpu,
        msr_indices,
        _mem,
    } = m;
    let thread = std::thread::spawn(move || {
        while go_rx.recv().unwrap_or(false) {
            loop {
                match vcpu.run() {
                    Err(e) if e.errno() == libc::EINTR => break,
                    Ok(VcpuExit::Hlt) => continue,
                    other => panic!("KVM_RUN: {other:?}"),
                }
            }
            let _ = out_tx.send(Instant::now());
        }
        vcpu
    });
    for _ in 0..=RUNS {
        go_tx.send(true).expect("vCPU thread");
        // Long enough for the thread to be inside KVM_RUN: a kick before it is lost.
        std::thread::sleep(Duration::from_millis(30));
        let kicked = Instant::now();
        let _ = thread.kill(SIGRTMIN());
        let back = loop {
            match out_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(t) => break t,
                Err(_) => {
                    let _ = thread.kill(SIGRTMIN());
                }
            }
        };
        record(steps, name, us(back.saturating_duration_since(kicked)));
    }
    go_tx.send(false).expect("vCPU thread");
    let vcpu = thread.join().expect("vCPU thread");
    Machine {
        _kvm,
        vm,
        vcpu,
        msr_indices,
        _mem,
    }
}

/// One wake-up of a thread blocked on a channel, measured as half a ping-pong.
fn wakeups(steps: &mut Vec<Step>) {
    let (ping_tx, ping_rx) = mpsc::channel::<()>();
    let (pong_tx, pong_rx) = mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        while ping_rx.recv().is_ok() {
            if pong_tx.send(()).is_err() {
                break;
            }
        }
    });
    for _ in 0..=RUNS {
        let t0 = Instant::now();
        ping_tx.send(()).expect("ping");
        pong_rx.recv().expect("pong");
        let took = us(t0.elapsed()) / 2;
        match steps.iter_mut().find(|s| s.name == "thread wake-up") {
            Some(s) => s.runs.push(took),
            None => steps.push(Step {
                name: "thread wake-up",
                first: took,
                runs: Vec::new(),
            }),
        }
    }
    drop(ping_tx);
    let _ = t.join();
}

#[test]
#[ignore = "lab: prints the KVM restore floor of this kernel (a benchmark, no pass/fail on time)"]
fn restore_floor() {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(SIGRTMIN(), noop).expect("kick signal handler");
    let m = machine();
    out(&format!(
        "RESTORE-FLOOR vcpus=1 msrs={} runs={RUNS}",
        m.msr_indices.len()
    ));
    let (mut save, mut restore, mut device, mut other) = (vec![], vec![], vec![], vec![]);
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    for _ in 0..=RUNS {
        save_restore(&m, &mut save, &mut restore);
        routes_and_irqfd(&m, &mut device, &irqfd);
    }
    let m = kicks(m, CODE, "kick halted vCPU", &mut other);
    let _m = kicks(m, SPIN, "kick spinning vCPU", &mut other);
    wakeups(&mut other);
    let sum = |steps: &[Step]| steps.iter().map(Step::print).sum::<u64>();
    let (s, r, d) = (sum(&save), sum(&restore), sum(&device));
    let o: Vec<u64> = other.iter().map(Step::print).collect();
    out(&format!(
        "RESTORE-FLOOR total save_us={s} restore_us={r} one_msi_vector_us={d} \
         kick_halted_us={} kick_spinning_us={} wakeup_us={} (medians)",
        o.first().copied().unwrap_or(0),
        o.get(1).copied().unwrap_or(0),
        o.get(2).copied().unwrap_or(0)
    ));
}
