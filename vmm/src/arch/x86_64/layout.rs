//! Guest-physical memory map of a tern VM.
//!
//! ```text
//! 0x0000_0000  low RAM (boot structures, kernel at 1 MiB, initramfs near the top)
//! 0xC000_0000  32-bit PCI/MMIO hole (IOAPIC 0xFEC0_0000, LAPIC 0xFEE0_0000) — no RAM
//! 0x1_0000_0000 high RAM (whatever did not fit below the hole)
//! ```

use vm_memory::GuestAddress;

/// Page size tern tracks and migrates in.
pub const PAGE_SIZE: u64 = 4096;
/// Start of the 32-bit MMIO hole; RAM below it is "low RAM".
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole; RAM above the hole resumes here.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Local APIC MMIO base.
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// KVM's VMX real-mode TSS needs three pages inside the 32-bit space but outside RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xFFFB_D000;

/// Boot GDT (Linux and demo entry).
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// Boot IDT (empty: the kernel installs its own).
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// PVH memory map entries follow the start info.
pub const PVH_MEMMAP_START: GuestAddress = GuestAddress(0x6040);
/// bzImage "zero page" (`boot_params`).
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Identity page tables: PML4, one PDPT, then one PD per GiB.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// First page-directory-pointer table.
pub const PDPTE_START: GuestAddress = GuestAddress(0xA000);
/// First page directory.
pub const PDE_START: GuestAddress = GuestAddress(0xB000);
/// How much guest-physical space the boot page tables identity-map (4 GiB: 4 PDs, 0xB000..0xF000).
pub const IDENTITY_MAP_BYTES: u64 = 4 << 30;
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Longest command line accepted.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the extended BIOS data area; the MP table lives here and it is not usable RAM.
pub const EBDA_START: u64 = 0x9FC00;
/// Start of the legacy VGA/BIOS hole (not usable RAM).
pub const LEGACY_HOLE_START: u64 = 0xA0000;
/// Kernels and the demo payload load at 1 MiB.
pub const HIMEM_START: GuestAddress = GuestAddress(0x100000);

/// One contiguous range of guest RAM and where it sits in the backing memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest-physical start.
    pub gpa: GuestAddress,
    /// Length in bytes.
    pub len: u64,
    /// Offset of this range in the guest memory file.
    pub file_offset: u64,
}

/// Splits `ram_bytes` of RAM around the MMIO hole.
pub fn ram_ranges(ram_bytes: u64) -> Vec<RamRange> {
    let low = ram_bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange {
        gpa: GuestAddress(0),
        len: low,
        file_offset: 0,
    }];
    if ram_bytes > low {
        ranges.push(RamRange {
            gpa: GuestAddress(MMIO_HOLE_END),
            len: ram_bytes - low,
            file_offset: low,
        });
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_split_around_the_mmio_hole() {
        assert_eq!(ram_ranges(256 << 20).len(), 1);
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].len, MMIO_HOLE_START);
        assert_eq!(r[1].gpa, GuestAddress(MMIO_HOLE_END));
        assert_eq!(r[1].len, (4 << 30) - MMIO_HOLE_START);
        assert_eq!(r[1].file_offset, MMIO_HOLE_START);
        assert_eq!(r.iter().map(|r| r.len).sum::<u64>(), 4 << 30);
    }
}
