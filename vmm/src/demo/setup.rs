//! Lays the demo guest out in guest memory: payload, GDT/IDT/TSS, stacks, parameter block, generation
//! table and working set.
//!
//! The parameter block layout mirrors guests/demo/demo.S (`P_*` and `S_*`); keep both in sync.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::payload::{parse_header, PayloadHeaderError, PAYLOAD};
use super::DemoConfig;
use crate::arch::x86_64::gdt::{tss_descriptor, KERNEL_CODE, KERNEL_DATA, USER_CODE, USER_DATA};
use crate::arch::x86_64::regs::DemoEntry;

/// Where the payload is linked and loaded (vmm/build.rs links it there).
pub const PAYLOAD_GPA: u64 = 0x10_0000;
const GDT_GPA: u64 = 0x1_0000;
const IDT_GPA: u64 = 0x1_1000;
const TSS_GPA: u64 = 0x1_2000;
const TSS_STRIDE: u64 = 128;
const TSS_LIMIT: u32 = 103;
/// Parameter block (`P_*` offsets in demo.S).
pub const PARAMS_GPA: u64 = 0x2_0000;
const PARAMS_SLOTS: u64 = 0x100;
const SLOT_SIZE: u64 = 0x80;
const STACKS_GPA: u64 = 0x20_0000;
const STACK_STRIDE: u64 = 16 << 10;
const KERNEL_STACK_BYTES: u64 = 4 << 10;
const GEN_TABLE_GPA: u64 = 0x80_0000;
const ALIGN_2M: u64 = 2 << 20;
/// Most vCPUs the demo layout has room for (also the MP table's limit).
pub const MAX_DEMO_VCPUS: u8 = 254;
/// First GDT slot of the per-vCPU TSS descriptors (after null, kernel code/data, user code/data).
const FIRST_TSS_GDT_INDEX: u8 = 5;

const P_MAGIC: u64 = 0x00;
const P_NCPUS: u64 = 0x08;
const P_WS_BASE: u64 = 0x10;
const P_GEN_TABLE: u64 = 0x18;
const P_EXIT_TICKS: u64 = 0x20;
const P_TSC_HZ: u64 = 0x28;
const S_USTACK: u64 = 0x20;
const S_FIRST: u64 = 0x28;
const S_COUNT: u64 = 0x30;
const S_TPW: u64 = 0x38;
/// Device-check block (`P_DEV`, `D_*`, `DV_*` in demo.S): the guest's own record of the passed-through
/// mtty UARTs it found and the sequence each must hold. Only the guest writes it (ring 0); tern
/// zeroes it, which means "PCI bus not scanned yet".
const P_DEV: u64 = 0x8000;
const DEV_BLOCK_BYTES: usize = 0x80;

/// Errors laying out the demo guest.
#[derive(Debug, thiserror::Error)]
pub enum DemoSetupError {
    #[error(
        "demo guest with mib={mib} needs {needed_mib} MiB of low guest RAM but the VM has \
         {available_mib} MiB below 3 GiB; raise --memory or lower mib"
    )]
    DoesNotFit {
        mib: u64,
        needed_mib: u64,
        available_mib: u64,
    },
    #[error("the demo guest supports 1 to {MAX_DEMO_VCPUS} vCPUs, got {0}")]
    TooManyVcpus(u8),
    #[error(transparent)]
    Payload(#[from] PayloadHeaderError),
    #[error("cannot write the demo guest into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// Where the demo guest's working set sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoLayout {
    pub gen_table: u64,
    pub working_set: u64,
    pub pages: u64,
    pub end: u64,
}

/// Computes the layout for `config`, or why it does not fit in `low_ram_end` bytes.
pub fn layout(config: &DemoConfig, low_ram_end: u64) -> Result<DemoLayout, DemoSetupError> {
    let pages = config.mib.saturating_mul(256);
    let gen_bytes = pages.saturating_mul(4);
    let working_set = GEN_TABLE_GPA
        .saturating_add(gen_bytes)
        .next_multiple_of(ALIGN_2M);
    let end = working_set.saturating_add(config.mib.saturating_mul(1 << 20));
    if end > low_ram_end {
        return Err(DemoSetupError::DoesNotFit {
            mib: config.mib,
            needed_mib: end.div_ceil(1 << 20),
            available_mib: low_ram_end >> 20,
        });
    }
    Ok(DemoLayout {
        gen_table: GEN_TABLE_GPA,
        working_set,
        pages,
        end,
    })
}

fn idt_gate(handler: u64, dpl: u8) -> [u64; 2] {
    let selector = 0x08u64; // kernel code
    let type_attr = 0x8eu64 | (u64::from(dpl) << 5); // present interrupt gate
    let low = (handler & 0xffff)
        | (selector << 16)
        | (type_attr << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

fn write<T: vm_memory::ByteValued, M: GuestMemoryBackend>(
    mem: &M,
    value: T,
    addr: u64,
) -> Result<(), DemoSetupError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(DemoSetupError::GuestMemory)
}

/// Writes the demo guest for `vcpus` vCPUs and returns each vCPU's entry state.
/// `tsc_khz` is the guest TSC rate (the guest paces itself with RDTSC).
pub fn load<M: GuestMemoryBackend>(
    mem: &M,
    config: &DemoConfig,
    vcpus: u8,
    low_ram_end: u64,
    tsc_khz: u32,
) -> Result<Vec<DemoEntry>, DemoSetupError> {
    if vcpus == 0 || vcpus > MAX_DEMO_VCPUS {
        return Err(DemoSetupError::TooManyVcpus(vcpus));
    }
    let layout = layout(config, low_ram_end)?;
    let header = parse_header(PAYLOAD)?;
    mem.write_slice(PAYLOAD, GuestAddress(PAYLOAD_GPA))
        .map_err(DemoSetupError::GuestMemory)?;

    // GDT: null, kernel code/data, user code/data, then one 16-byte TSS descriptor per vCPU.
    for (i, e) in [0, KERNEL_CODE, KERNEL_DATA, USER_DATA, USER_CODE]
        .iter()
        .enumerate()
    {
        write(mem, *e, GDT_GPA + i as u64 * 8)?;
    }
    let mut tss_lows = Vec::with_capacity(usize::from(vcpus));
    for cpu in 0..u64::from(vcpus) {
        let tss = TSS_GPA + cpu * TSS_STRIDE;
        let kernel_stack_top = STACKS_GPA + cpu * STACK_STRIDE + KERNEL_STACK_BYTES;
        write(mem, kernel_stack_top, tss + 4)?; // RSP0
        write(mem, 104u16, tss + 102)?; // no I/O bitmap: IOPL 3 grants ring-3 port access
        let desc = tss_descriptor(tss, TSS_LIMIT);
        let slot = GDT_GPA + (u64::from(FIRST_TSS_GDT_INDEX) + cpu * 2) * 8;
        write(mem, desc[0], slot)?;
        write(mem, desc[1], slot + 8)?;
        tss_lows.push(desc[0]);
    }
    let gdt_limit = ((u64::from(FIRST_TSS_GDT_INDEX) + u64::from(vcpus) * 2) * 8 - 1) as u16;

    // IDT: exceptions report and halt; #UD from ring 3 at a UD2 is the payload's call gate.
    for vector in 0..32u64 {
        let stub: u64 = mem
            .read_obj(GuestAddress(header.exception_stubs + vector * 8))
            .map_err(DemoSetupError::GuestMemory)?;
        let gate = idt_gate(stub, 0);
        write(mem, gate[0], IDT_GPA + vector * 16)?;
        write(mem, gate[1], IDT_GPA + vector * 16 + 8)?;
    }

    // Parameter block.
    let tsc_hz = u64::from(tsc_khz) * 1000;
    write(mem, *b"TERNDEMO", PARAMS_GPA + P_MAGIC)?;
    write(mem, u64::from(vcpus), PARAMS_GPA + P_NCPUS)?;
    write(mem, layout.working_set, PARAMS_GPA + P_WS_BASE)?;
    write(mem, layout.gen_table, PARAMS_GPA + P_GEN_TABLE)?;
    let exit_ticks = config.exit_after_s.map_or(0, |s| s.saturating_mul(tsc_hz));
    write(mem, exit_ticks, PARAMS_GPA + P_EXIT_TICKS)?;
    write(mem, tsc_hz, PARAMS_GPA + P_TSC_HZ)?;
    mem.write_slice(&[0u8; DEV_BLOCK_BYTES], GuestAddress(PARAMS_GPA + P_DEV))
        .map_err(DemoSetupError::GuestMemory)?;
    let pages_per_s = config.dirty_mib_per_s.saturating_mul(256);
    let n = u64::from(vcpus);
    let mut entries = Vec::with_capacity(usize::from(vcpus));
    for cpu in 0..n {
        let slot = PARAMS_GPA + PARAMS_SLOTS + cpu * SLOT_SIZE;
        let first = layout.pages * cpu / n;
        let count = layout.pages * (cpu + 1) / n - first;
        let ticks_per_write = match pages_per_s {
            0 => 0,
            rate => (tsc_hz.saturating_mul(n) / rate).max(1),
        };
        write(mem, STACKS_GPA + (cpu + 1) * STACK_STRIDE, slot + S_USTACK)?;
        write(mem, first, slot + S_FIRST)?;
        write(mem, count, slot + S_COUNT)?;
        write(mem, ticks_per_write, slot + S_TPW)?;
        entries.push(DemoEntry {
            entry: GuestAddress(header.entry),
            params: GuestAddress(PARAMS_GPA),
            vcpu_index: cpu,
            kernel_stack_top: GuestAddress(STACKS_GPA + cpu * STACK_STRIDE + KERNEL_STACK_BYTES),
            gdt: GuestAddress(GDT_GPA),
            gdt_limit,
            idt: GuestAddress(IDT_GPA),
            tss_selector_index: FIRST_TSS_GDT_INDEX + (cpu as u8) * 2,
            tss_descriptor_low: tss_lows[cpu as usize],
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_places_working_set_after_generation_table() {
        let l = layout(
            &DemoConfig {
                mib: 16,
                ..Default::default()
            },
            256 << 20,
        )
        .unwrap();
        assert_eq!(l.pages, 16 * 256);
        assert!(l.working_set >= l.gen_table + l.pages * 4);
        assert_eq!(l.working_set % ALIGN_2M, 0);
        assert!(STACKS_GPA + u64::from(MAX_DEMO_VCPUS) * STACK_STRIDE <= GEN_TABLE_GPA);
        assert!(PARAMS_SLOTS + u64::from(MAX_DEMO_VCPUS) * SLOT_SIZE <= P_DEV);
        assert!(PARAMS_GPA + P_DEV + DEV_BLOCK_BYTES as u64 <= 0x9_0000);
        assert!(TSS_GPA + u64::from(MAX_DEMO_VCPUS) * TSS_STRIDE <= PARAMS_GPA);
    }

    #[test]
    fn layout_refuses_a_working_set_larger_than_ram() {
        let err = layout(
            &DemoConfig {
                mib: 300,
                ..Default::default()
            },
            256 << 20,
        )
        .unwrap_err();
        assert!(err.to_string().contains("raise --memory"), "{err}");
    }

    #[test]
    fn idt_gate_encodes_handler_and_dpl() {
        let [low, high] = idt_gate(0x1234_5678_9abc, 3);
        assert_eq!(low & 0xffff, 0x9abc);
        assert_eq!((low >> 48) & 0xffff, 0x5678);
        assert_eq!(high, 0x1234);
        assert_eq!((low >> 40) & 0xff, 0xee);
    }
}
