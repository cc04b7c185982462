//! Initial vCPU registers for each way tern enters a guest.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::gdt::{gdt_entry, kvm_segment_from_gdt, KERNEL_CODE, KERNEL_DATA};
use super::layout::{BOOT_GDT_START, BOOT_IDT_START};
use super::paging::{write_identity_tables, MappingAccess};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How a vCPU starts executing the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    Linux64 {
        entry: GuestAddress,
        zero_page: GuestAddress,
    },
    /// PVH: 32-bit protected mode, paging off, RBX = `hvm_start_info`.
    Pvh {
        entry: GuestAddress,
        start_info: GuestAddress,
    },
    /// The built-in demo guest: long mode with its own GDT/IDT/TSS (already written to guest memory),
    /// RDI = parameter block, RSI = vCPU index, RSP = kernel stack.
    Demo(DemoEntry),
    /// An application processor of a Linux guest: left in its reset state, waiting for INIT/SIPI
    /// from the boot vCPU.
    Ap,
}

/// Per-vCPU entry state of the demo guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoEntry {
    pub entry: GuestAddress,
    pub params: GuestAddress,
    pub vcpu_index: u64,
    pub kernel_stack_top: GuestAddress,
    pub gdt: GuestAddress,
    pub gdt_limit: u16,
    pub idt: GuestAddress,
    pub tss_selector_index: u8,
    pub tss_descriptor_low: u64,
}

/// Errors setting initial registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing boot tables into guest memory failed.
    #[error("cannot write boot tables to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// A register ioctl failed.
    #[error("cannot set vCPU {what}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Ioctl { what, source }
}

/// Writes the boot GDT/IDT (and, for long-mode entries, identity page tables) shared by all vCPUs.
/// Call once per VM before [`setup_vcpu`].
pub fn write_boot_tables<M: GuestMemoryBackend>(
    mem: &M,
    entry: &BootEntry,
) -> Result<(), RegsError> {
    let gdt: [u64; 4] = match entry {
        BootEntry::Pvh { .. } => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x008b, 0, 0x67), // busy 32-bit TSS
        ],
        _ => [0, KERNEL_CODE, KERNEL_DATA, gdt_entry(0x808b, 0, 0xfffff)],
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, BOOT_GDT_START.unchecked_add(i as u64 * 8))
            .map_err(RegsError::GuestMemory)?;
    }
    mem.write_obj(0u64, BOOT_IDT_START)
        .map_err(RegsError::GuestMemory)?;
    match entry {
        BootEntry::Linux64 { .. } => {
            write_identity_tables(mem, MappingAccess::Supervisor)
                .map_err(RegsError::GuestMemory)?;
        }
        BootEntry::Demo(_) => {
            write_identity_tables(mem, MappingAccess::User).map_err(RegsError::GuestMemory)?;
        }
        BootEntry::Pvh { .. } | BootEntry::Ap => {}
    }
    Ok(())
}

use vm_memory::Address as _;

/// Sets `vcpu`'s registers for `entry`.
pub fn setup_vcpu(vcpu: &VcpuFd, entry: &BootEntry) -> Result<(), RegsError> {
    if *entry == BootEntry::Ap {
        return Ok(());
    }
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(ioctl("sregs"))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            let code = kvm_segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
            let data = kvm_segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
            let tss = kvm_segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
            set_flat_segments(&mut sregs, code, data, tss);
            sregs.gdt.base = BOOT_GDT_START.raw_value();
            sregs.gdt.limit = 4 * 8 - 1;
            sregs.idt.base = BOOT_IDT_START.raw_value();
            sregs.idt.limit = 7;
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry.raw_value();
            regs.rbx = start_info.raw_value();
        }
        BootEntry::Linux64 { entry, zero_page } => {
            let code = kvm_segment_from_gdt(KERNEL_CODE, 1);
            let data = kvm_segment_from_gdt(KERNEL_DATA, 2);
            let tss = kvm_segment_from_gdt(gdt_entry(0x808b, 0, 0xfffff), 3);
            set_flat_segments(&mut sregs, code, data, tss);
            sregs.gdt.base = BOOT_GDT_START.raw_value();
            sregs.gdt.limit = 4 * 8 - 1;
            sregs.idt.base = BOOT_IDT_START.raw_value();
            sregs.idt.limit = 7;
            set_long_mode(&mut sregs);
            regs.rip = entry.raw_value();
            regs.rsi = zero_page.raw_value();
            // The boot protocol wants a usable stack below the zero page.
            regs.rsp = 0x8ff0;
            regs.rbp = 0x8ff0;
        }
        BootEntry::Demo(d) => {
            let code = kvm_segment_from_gdt(KERNEL_CODE, 1);
            let data = kvm_segment_from_gdt(KERNEL_DATA, 2);
            let tss = kvm_segment_from_gdt(d.tss_descriptor_low, d.tss_selector_index);
            set_flat_segments(&mut sregs, code, data, tss);
            sregs.gdt.base = d.gdt.raw_value();
            sregs.gdt.limit = d.gdt_limit;
            sregs.idt.base = d.idt.raw_value();
            sregs.idt.limit = 256 * 16 - 1;
            set_long_mode(&mut sregs);
            regs.rip = d.entry.raw_value();
            regs.rdi = d.params.raw_value();
            regs.rsi = d.vcpu_index;
            regs.rsp = d.kernel_stack_top.raw_value();
            // With the in-kernel LAPIC every vCPU but 0 starts waiting for INIT/SIPI; the demo
            // starts all of them directly.
            vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            })
            .map_err(ioctl("mp_state"))?;
        }
        BootEntry::Ap => unreachable!("handled above"),
    }
    vcpu.set_sregs(&sregs).map_err(ioctl("sregs"))?;
    vcpu.set_regs(&regs).map_err(ioctl("regs"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl("fpu"))?;
    Ok(())
}

fn set_flat_segments(
    sregs: &mut kvm_sregs,
    code: kvm_bindings::kvm_segment,
    data: kvm_bindings::kvm_segment,
    tss: kvm_bindings::kvm_segment,
) {
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
}

fn set_long_mode(sregs: &mut kvm_sregs) {
    sregs.cr3 = super::layout::PML4_START.raw_value();
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}
