//! Base address registers: how a function's regions appear in configuration space and how the guest
//! sizes and places them.
//!
//! A BAR is a configuration-space register whose writable bits are exactly the address bits at or
//! above the region's size: when the guest writes all-ones and reads back, the read-only low bits come
//! back as zeros and the guest learns the size (`!(value & !flags) + 1`). The low flag bits say I/O or
//! memory, 32- or 64-bit, prefetchable, and are read-only. A 64-bit BAR takes two registers; the upper
//! one holds address bits 63:32. A region is *decoded* only while the command register enables its
//! space and its address is non-zero: guests turn decode off while they size and move BARs, so the
//! transient values they write are never mapped.

use serde::{Deserialize, Serialize};

use super::config::{ConfigSpace, COMMAND_IO, COMMAND_MEMORY, REG_BAR0};

/// BAR registers in a type-0 header.
pub const BAR_COUNT: u8 = 6;

/// Flag bits of an I/O BAR.
const IO_FLAG: u32 = 0x1;
/// Flag bits of a memory BAR: 64-bit type.
const MEM64_FLAG: u32 = 0x4;
/// Flag bits of a memory BAR: prefetchable.
const PREFETCH_FLAG: u32 = 0x8;
/// Smallest memory BAR the spec allows.
const MIN_MEM_BYTES: u64 = 16;
/// Smallest and largest I/O BAR the spec allows.
const MIN_IO_BYTES: u64 = 4;
const MAX_IO_BYTES: u64 = 256;

/// Which address space a BAR decodes and how wide its address is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    /// Port I/O.
    Io,
    /// Memory below 4 GiB.
    Memory32 { prefetchable: bool },
    /// Memory anywhere in the 64-bit space (takes this register and the next).
    Memory64 { prefetchable: bool },
}

impl BarKind {
    /// Whether the region is in the port I/O space.
    pub fn is_io(self) -> bool {
        matches!(self, BarKind::Io)
    }
}

/// What a device declares about one of its BARs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarSpec {
    /// Register index 0..6 (the first of two for a 64-bit BAR).
    pub index: u8,
    pub kind: BarKind,
    /// Size in bytes: a power of two.
    pub size: u64,
}

/// A region a function decodes right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarRegion {
    pub index: u8,
    pub kind: BarKind,
    /// Guest-physical address (memory) or port (I/O).
    pub addr: u64,
    pub size: u64,
}

impl BarRegion {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }

    /// Whether two regions of the same address space share an address.
    pub fn overlaps(&self, other: &BarRegion) -> bool {
        self.kind.is_io() == other.kind.is_io()
            && self.addr < other.end()
            && other.addr < self.end()
    }
}

/// Errors declaring or placing a BAR.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BarError {
    #[error("BAR {index}: size {size:#x} is not a power of two")]
    SizeNotPowerOfTwo { index: u8, size: u64 },
    #[error("BAR {index}: size {size:#x} is outside {min:#x}..={max:#x} for its kind")]
    SizeOutOfRange {
        index: u8,
        size: u64,
        min: u64,
        max: u64,
    },
    #[error("BAR {index}: there are only {BAR_COUNT} BAR registers (a 64-bit BAR takes two)")]
    BadIndex { index: u8 },
    #[error("BAR {index}: address {addr:#x} is not aligned to its size {size:#x}")]
    Misaligned { index: u8, addr: u64, size: u64 },
    #[error("BAR {index}: address {addr:#x} does not fit a {kind:?} BAR")]
    AddressTooWide { index: u8, addr: u64, kind: BarKind },
}

impl BarSpec {
    /// Checks size, index and kind against the spec's rules.
    pub fn validate(&self) -> Result<(), BarError> {
        let index = self.index;
        let last = match self.kind {
            BarKind::Memory64 { .. } => index.checked_add(1),
            _ => Some(index),
        };
        if last.is_none_or(|l| l >= BAR_COUNT) {
            return Err(BarError::BadIndex { index });
        }
        if !self.size.is_power_of_two() {
            return Err(BarError::SizeNotPowerOfTwo {
                index,
                size: self.size,
            });
        }
        let (min, max) = match self.kind {
            BarKind::Io => (MIN_IO_BYTES, MAX_IO_BYTES),
            BarKind::Memory32 { .. } => (MIN_MEM_BYTES, 1 << 31),
            BarKind::Memory64 { .. } => (MIN_MEM_BYTES, 1 << 63),
        };
        if !(min..=max).contains(&self.size) {
            return Err(BarError::SizeOutOfRange {
                index,
                size: self.size,
                min,
                max,
            });
        }
        Ok(())
    }

    fn flags(&self) -> u32 {
        match self.kind {
            BarKind::Io => IO_FLAG,
            BarKind::Memory32 { prefetchable } => {
                if prefetchable {
                    PREFETCH_FLAG
                } else {
                    0
                }
            }
            BarKind::Memory64 { prefetchable } => {
                MEM64_FLAG | if prefetchable { PREFETCH_FLAG } else { 0 }
            }
        }
    }

    /// Writes the BAR's registers with `addr` and makes exactly its address bits guest-writable.
    pub fn install(&self, config: &mut ConfigSpace, addr: u64) -> Result<(), BarError> {
        self.validate()?;
        let index = self.index;
        if !addr.is_multiple_of(self.size) {
            return Err(BarError::Misaligned {
                index,
                addr,
                size: self.size,
            });
        }
        let wide = matches!(self.kind, BarKind::Memory64 { .. });
        if !wide && addr > u64::from(u32::MAX) {
            return Err(BarError::AddressTooWide {
                index,
                addr,
                kind: self.kind,
            });
        }
        let reg = REG_BAR0 + usize::from(index);
        let addr_mask = !(self.size - 1);
        let flag_bits = if self.kind.is_io() { 0x3 } else { 0xf };
        config.set_reg(reg, (addr as u32 & !flag_bits) | self.flags());
        config.set_write_mask(reg, addr_mask as u32 & !flag_bits);
        if wide {
            config.set_reg(reg + 1, (addr >> 32) as u32);
            config.set_write_mask(reg + 1, (addr_mask >> 32) as u32);
        }
        Ok(())
    }

    /// The address the BAR registers hold now.
    pub fn address(&self, config: &ConfigSpace) -> u64 {
        let reg = REG_BAR0 + usize::from(self.index);
        let flag_bits = if self.kind.is_io() { 0x3 } else { 0xf };
        let lo = u64::from(config.read_reg(reg) & !flag_bits);
        match self.kind {
            BarKind::Memory64 { .. } => lo | (u64::from(config.read_reg(reg + 1)) << 32),
            _ => lo,
        }
    }

    /// The region the function decodes now, if any: its space is enabled in the command register and
    /// its address is assigned (non-zero).
    pub fn decoded(&self, config: &ConfigSpace) -> Option<BarRegion> {
        let enable = if self.kind.is_io() {
            COMMAND_IO
        } else {
            COMMAND_MEMORY
        };
        let addr = self.address(config);
        (config.command() & enable != 0 && addr != 0).then_some(BarRegion {
            index: self.index,
            kind: self.kind,
            addr,
            size: self.size,
        })
    }

    /// Whether configuration register `reg` belongs to this BAR.
    pub fn covers_reg(&self, reg: usize) -> bool {
        let first = REG_BAR0 + usize::from(self.index);
        let last = match self.kind {
            BarKind::Memory64 { .. } => first + 1,
            _ => first,
        };
        (first..=last).contains(&reg)
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{PciIds, COMMAND_MEMORY};
    use super::*;

    fn config() -> ConfigSpace {
        ConfigSpace::new(PciIds {
            vendor: 0x1234,
            device: 0x5678,
            revision: 0,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        })
    }

    fn reg_write(c: &mut ConfigSpace, reg: usize, v: u32) {
        c.write(reg * 4, &v.to_le_bytes());
    }

    /// What a guest does to size a BAR: save, write all-ones, read back, restore.
    fn probe(c: &mut ConfigSpace, reg: usize) -> u32 {
        let saved = c.read_reg(reg);
        reg_write(c, reg, 0xffff_ffff);
        let sized = c.read_reg(reg);
        reg_write(c, reg, saved);
        sized
    }

    #[test]
    fn bar_mem32_size_probe_returns_size_mask_and_flags() {
        for (size, prefetchable) in [
            (16u64, false),
            (0x1000, true),
            (1 << 20, false),
            (1 << 31, true),
        ] {
            let mut c = config();
            let spec = BarSpec {
                index: 1,
                kind: BarKind::Memory32 { prefetchable },
                size,
            };
            spec.install(&mut c, 0x8000_0000).unwrap();
            let sized = probe(&mut c, REG_BAR0 + 1);
            assert_eq!(
                sized & 0xf,
                if prefetchable { 8 } else { 0 },
                "size {size:#x}"
            );
            assert_eq!(u64::from(!(sized & !0xf)) + 1, size);
            // The address survived the probe.
            assert_eq!(spec.address(&c), 0x8000_0000);
        }
    }

    #[test]
    fn bar_mem64_size_probe_spans_both_registers() {
        let mut c = config();
        let spec = BarSpec {
            index: 2,
            kind: BarKind::Memory64 { prefetchable: true },
            size: 1 << 33,
        };
        spec.install(&mut c, 0x40_0000_0000).unwrap();
        assert_eq!(c.read_reg(REG_BAR0 + 2) & 0xf, 0xc);
        let lo = probe(&mut c, REG_BAR0 + 2);
        let hi = probe(&mut c, REG_BAR0 + 3);
        let mask = (u64::from(hi) << 32) | u64::from(lo & !0xf);
        assert_eq!(!mask + 1, 1 << 33);
        assert_eq!(lo, 0xc);
        assert_eq!(hi, 0xffff_fffe);
        assert_eq!(spec.address(&c), 0x40_0000_0000);
        // Small 64-bit BARs: the upper register is fully writable.
        let small = BarSpec {
            index: 0,
            kind: BarKind::Memory64 {
                prefetchable: false,
            },
            size: 0x4000,
        };
        small.install(&mut c, 0).unwrap();
        assert_eq!(probe(&mut c, REG_BAR0), 0xffff_c004);
        assert_eq!(probe(&mut c, REG_BAR0 + 1), 0xffff_ffff);
    }

    #[test]
    fn bar_io_size_probe_keeps_io_flag() {
        let mut c = config();
        let spec = BarSpec {
            index: 5,
            kind: BarKind::Io,
            size: 0x20,
        };
        spec.install(&mut c, 0x1000).unwrap();
        assert_eq!(c.read_reg(REG_BAR0 + 5), 0x1001);
        let sized = probe(&mut c, REG_BAR0 + 5);
        assert_eq!(sized, 0xffff_ffe1);
        assert_eq!(u64::from(!(sized & !0x3)) + 1, 0x20);
    }

    #[test]
    fn bar_unused_registers_read_zero_after_probe() {
        let mut c = config();
        for i in 0..6 {
            assert_eq!(probe(&mut c, REG_BAR0 + i), 0);
        }
    }

    #[test]
    fn bar_guest_moves_take_only_aligned_address_bits() {
        let mut c = config();
        let spec = BarSpec {
            index: 0,
            kind: BarKind::Memory32 {
                prefetchable: false,
            },
            size: 0x10000,
        };
        spec.install(&mut c, 0xc000_0000).unwrap();
        reg_write(&mut c, REG_BAR0, 0xd000_1234);
        assert_eq!(spec.address(&c), 0xd000_0000);
        assert_eq!(c.read_reg(REG_BAR0) & 0xf, 0);
    }

    #[test]
    fn bar_decoded_follows_command_register_and_assignment() {
        let mut c = config();
        let mem = BarSpec {
            index: 0,
            kind: BarKind::Memory32 {
                prefetchable: false,
            },
            size: 0x1000,
        };
        let io = BarSpec {
            index: 1,
            kind: BarKind::Io,
            size: 0x10,
        };
        mem.install(&mut c, 0xc000_0000).unwrap();
        io.install(&mut c, 0x1000).unwrap();
        assert_eq!(mem.decoded(&c), None);
        c.write(4, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(
            mem.decoded(&c),
            Some(BarRegion {
                index: 0,
                kind: mem.kind,
                addr: 0xc000_0000,
                size: 0x1000
            })
        );
        assert_eq!(io.decoded(&c), None);
        c.write(4, &(COMMAND_MEMORY | COMMAND_IO).to_le_bytes());
        assert_eq!(io.decoded(&c).map(|r| r.addr), Some(0x1000));
        reg_write(&mut c, REG_BAR0, 0);
        assert_eq!(mem.decoded(&c), None);
    }

    #[test]
    fn bar_specs_outside_the_rules_are_refused() {
        let m32 = BarKind::Memory32 {
            prefetchable: false,
        };
        let m64 = BarKind::Memory64 {
            prefetchable: false,
        };
        let bad = |index, kind, size| {
            BarSpec { index, kind, size }
                .install(&mut config(), 0)
                .unwrap_err()
        };
        assert_eq!(
            bad(0, m32, 0x3000),
            BarError::SizeNotPowerOfTwo {
                index: 0,
                size: 0x3000
            }
        );
        assert!(matches!(bad(0, m32, 8), BarError::SizeOutOfRange { .. }));
        assert!(matches!(
            bad(0, m32, 1 << 32),
            BarError::SizeOutOfRange { .. }
        ));
        assert!(matches!(
            bad(0, BarKind::Io, 512),
            BarError::SizeOutOfRange { .. }
        ));
        assert!(matches!(
            bad(0, BarKind::Io, 2),
            BarError::SizeOutOfRange { .. }
        ));
        assert_eq!(bad(6, m32, 0x1000), BarError::BadIndex { index: 6 });
        assert_eq!(bad(5, m64, 0x1000), BarError::BadIndex { index: 5 });
        let spec = BarSpec {
            index: 0,
            kind: m32,
            size: 0x1000,
        };
        assert!(matches!(
            spec.install(&mut config(), 0xc000_0800),
            Err(BarError::Misaligned { .. })
        ));
        assert!(matches!(
            spec.install(&mut config(), 1 << 32),
            Err(BarError::AddressTooWide { .. })
        ));
    }

    #[test]
    fn bar_regions_overlap_only_within_one_space() {
        let r = |kind, addr, size| BarRegion {
            index: 0,
            kind,
            addr,
            size,
        };
        let m = BarKind::Memory32 {
            prefetchable: false,
        };
        assert!(r(m, 0x1000, 0x1000).overlaps(&r(m, 0x1fff, 1)));
        assert!(!r(m, 0x1000, 0x1000).overlaps(&r(m, 0x2000, 0x1000)));
        assert!(!r(m, 0x1000, 0x1000).overlaps(&r(BarKind::Io, 0x1000, 0x10)));
        assert!(spec_covers());
    }

    fn spec_covers() -> bool {
        let s = BarSpec {
            index: 2,
            kind: BarKind::Memory64 {
                prefetchable: false,
            },
            size: 0x1000,
        };
        s.covers_reg(6) && s.covers_reg(7) && !s.covers_reg(5) && !s.covers_reg(8)
    }
}
