//! Guest RAM: one memfd, mapped shared, split around the MMIO hole.
//!
//! A memfd (not anonymous memory) because guest RAM must be DMA-mapped for VFIO and handed to another
//! tern process as a file descriptor for same-host migration; the `GuestPageBitmap` records
//! every write the VMM itself makes (device emulation), a dirty source of its own during migration.

use std::fs::File;
use std::sync::Arc;

use tern_migration::dirty::GuestPageBitmap;
use vm_memory::{FileOffset, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::x86_64::layout::{ram_ranges, RamRange, PAGE_SIZE};

/// The guest memory type used throughout tern.
pub type GuestMemory = GuestMemoryMmap<GuestPageBitmap>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be a non-zero multiple of 4 KiB, got {bytes} bytes")]
    InvalidSize { bytes: u64 },
    #[error("cannot create the guest memory file")]
    CreateFile(#[source] std::io::Error),
    #[error("cannot size the guest memory file to {bytes} bytes")]
    SizeFile {
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory file is {actual} bytes, expected {expected}")]
    FileSizeMismatch { expected: u64, actual: u64 },
    #[error("cannot map guest memory range at {gpa:#x} ({len} bytes)")]
    Map {
        gpa: u64,
        len: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Guest RAM and the file behind it.
#[derive(Debug, Clone)]
pub struct GuestRam {
    file: Arc<File>,
    size_bytes: u64,
    ranges: Vec<RamRange>,
    memory: GuestMemory,
}

impl GuestRam {
    /// Creates `size_bytes` of zeroed guest RAM.
    pub fn new(size_bytes: u64) -> Result<Self, MemoryError> {
        if size_bytes == 0 || !size_bytes.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::InvalidSize { bytes: size_bytes });
        }
        let file = crate::sys::memfd::create("tern-guest-ram").map_err(MemoryError::CreateFile)?;
        file.set_len(size_bytes)
            .map_err(|source| MemoryError::SizeFile {
                bytes: size_bytes,
                source,
            })?;
        Self::from_file(file, size_bytes)
    }

    /// Maps an existing guest memory file (same-host migration hands one over).
    pub fn from_file(file: File, size_bytes: u64) -> Result<Self, MemoryError> {
        if size_bytes == 0 || !size_bytes.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::InvalidSize { bytes: size_bytes });
        }
        let actual = file.metadata().map_err(MemoryError::CreateFile)?.len();
        if actual != size_bytes {
            return Err(MemoryError::FileSizeMismatch {
                expected: size_bytes,
                actual,
            });
        }
        let file = Arc::new(file);
        let ranges = ram_ranges(size_bytes);
        let regions = ranges
            .iter()
            .map(|r| {
                let len = usize::try_from(r.len)
                    .map_err(|_| MemoryError::InvalidSize { bytes: size_bytes })?;
                GuestRegionMmap::from_range(
                    r.gpa,
                    len,
                    Some(FileOffset::from_arc(file.clone(), r.file_offset)),
                )
                .map_err(|source| MemoryError::Map {
                    gpa: r.gpa.0,
                    len: r.len,
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let memory = GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map {
            gpa: 0,
            len: size_bytes,
            source: e.into(),
        })?;
        Ok(Self {
            file,
            size_bytes,
            ranges,
            memory,
        })
    }

    /// The mapped memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The RAM ranges (guest-physical, with file offsets).
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total RAM in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The memfd behind guest RAM.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The parts of guest-physical `[gpa, gpa + len)` whose backing pages were ever written (or are
    /// swapped out), as (GPA, length) pairs. Everything else reads as zeroes and was never
    /// allocated: a migration need not read it, and reading it would allocate it.
    pub fn populated(&self, gpa: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for r in &self.ranges {
            let lo = gpa.max(r.gpa.0);
            let hi = gpa.saturating_add(len).min(r.gpa.0 + r.len);
            if lo >= hi {
                continue;
            }
            let file_start = r.file_offset + (lo - r.gpa.0);
            for (off, n) in crate::sys::memfd::data_ranges(&self.file, file_start, hi - lo)? {
                out.push((r.gpa.0 + (off - r.file_offset), n));
            }
        }
        Ok(out)
    }

    /// Bytes of low RAM (below the MMIO hole).
    pub fn low_ram_end(&self) -> u64 {
        self.ranges.first().map_or(0, |r| r.gpa.0 + r.len)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn guest_ram_is_shared_with_its_file() {
        let ram = GuestRam::new(8 << 20).unwrap();
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let copy = GuestRam::from_file(ram.file().try_clone().unwrap(), 8 << 20).unwrap();
        let v: u32 = copy.memory().read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
    }

    #[test]
    fn populated_follows_guest_writes_across_the_mmio_hole() {
        let ram = GuestRam::new(4 << 30).unwrap();
        assert!(ram.populated(0, 8 << 30).unwrap().is_empty());
        ram.memory()
            .write_obj(1u8, GuestAddress(0x20_0000))
            .unwrap();
        ram.memory()
            .write_obj(1u8, GuestAddress(0x1_0000_0000 + 0x3000))
            .unwrap();
        let p = ram.populated(0, 8 << 30).unwrap();
        let covered = |a: u64| p.iter().any(|(s, l)| (*s..s + l).contains(&a));
        assert!(covered(0x20_0000) && covered(0x1_0000_3000), "{p:x?}");
        assert!(
            !covered(0x1000) && !covered(0x1_0000_0000 + (1 << 29)),
            "{p:x?}"
        );
    }

    #[test]
    fn guest_ram_rejects_bad_sizes() {
        assert!(matches!(
            GuestRam::new(0),
            Err(MemoryError::InvalidSize { .. })
        ));
        assert!(matches!(
            GuestRam::new(4097),
            Err(MemoryError::InvalidSize { .. })
        ));
        let ram = GuestRam::new(8 << 20).unwrap();
        assert!(matches!(
            GuestRam::from_file(ram.file().try_clone().unwrap(), 4 << 20),
            Err(MemoryError::FileSizeMismatch { .. })
        ));
    }
}
