//! Segment descriptors: the flat 64-bit GDTs tern builds for its guests, and their `kvm_segment` form
//! for KVM_SET_SREGS.

use kvm_bindings::kvm_segment;

/// Code segment, DPL 0, long mode.
pub const KERNEL_CODE: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// Data segment, DPL 0.
pub const KERNEL_DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
/// Code segment, DPL 3, long mode.
pub const USER_CODE: u64 = gdt_entry(0xa0fb, 0, 0xfffff);
/// Data segment, DPL 3.
pub const USER_DATA: u64 = gdt_entry(0xc0f3, 0, 0xfffff);

/// Encodes a legacy 8-byte descriptor from (flags, base, limit) like Linux's `GDT_ENTRY`.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The two 8-byte halves of a 64-bit available TSS descriptor for a TSS at `base` with `limit`.
pub fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let low = gdt_entry(0x0089, (base & 0xffff_ffff) as u32, limit);
    [low, base >> 32]
}

/// The `kvm_segment` a CPU would cache after loading `entry` through selector index `table_index`.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let flag = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    let granular = flag(55, 1) != 0;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: (u16::from(table_index) * 8) | u16::from(flag(45, 3)),
        type_: flag(40, 0xf),
        present: flag(47, 1),
        dpl: flag(45, 3),
        db: flag(54, 1),
        s: flag(44, 1),
        l: flag(53, 1),
        g: flag(55, 1),
        avl: flag(52, 1),
        unusable: u8::from(flag(47, 1) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = kvm_segment_from_gdt(KERNEL_CODE, 1);
        assert_eq!(
            (code.selector, code.l, code.dpl, code.type_),
            (0x8, 1, 0, 0xb)
        );
        assert_eq!((code.base, code.limit, code.g), (0, 0xffff_ffff, 1));
        let user = kvm_segment_from_gdt(USER_CODE, 3);
        assert_eq!((user.selector, user.dpl, user.l), (0x1b, 3, 1));
        let data = kvm_segment_from_gdt(USER_DATA, 4);
        assert_eq!(
            (data.selector, data.dpl, data.db, data.type_),
            (0x23, 3, 1, 0x3)
        );
    }

    #[test]
    fn tss_descriptor_splits_64_bit_base() {
        let [low, high] = tss_descriptor(0x1_2345_6789, 0x67);
        let seg = kvm_segment_from_gdt(low, 5);
        assert_eq!(seg.base, 0x2345_6789);
        assert_eq!(seg.limit, 0x67);
        assert_eq!(seg.type_, 0x9);
        assert_eq!(high, 1);
    }
}
