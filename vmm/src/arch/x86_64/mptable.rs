//! Intel MultiProcessor Specification 1.4 table: how a Linux guest without ACPI finds its vCPUs, the
//! IOAPIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{EBDA_START, IOAPIC_START, LAPIC_START};

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table's 8-bit APIC IDs (minus the IOAPIC's) can name.
    #[error("{count} vCPUs do not fit an MP table (at most 254)")]
    TooManyCpus { count: u8 },
    /// The table could not be written to guest memory.
    #[error("cannot write the MP table to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const ISA_IRQS: u8 = 24;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// CPU signature: family 6 (as Linux expects from a modern CPU); features: FPU + APIC.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer structure and configuration table for `cpus` vCPUs, as bytes to place
/// at [`EBDA_START`].
pub fn build(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MptableError::TooManyCpus { count: cpus });
    }
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for irq in 0..ISA_IRQS {
        let kind = if irq == 0 {
            INT_TYPE_EXTINT
        } else {
            INT_TYPE_INT
        };
        entries.extend_from_slice(&[ENTRY_INTSRC, kind, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // LINT0 = ExtINT (8259 pass-through), LINT1 = NMI, on every local APIC.
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);

    let entry_count = u16::from(cpus) + 2 + u16::from(ISA_IRQS) + 2;
    let table_len = 44 + entries.len();
    let table_addr = EBDA_START + 16;
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.extend_from_slice(&[4, 0]); // spec revision 1.4, checksum (patched below)
    table.extend_from_slice(b"TERN    ");
    table.extend_from_slice(b"TERNVMM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0u8; 4]); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // 16 bytes, spec 1.4, checksum, features
    floating[10] = checksum(&floating);
    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table for `cpus` vCPUs into the EBDA.
pub fn write<M: GuestMemoryBackend>(mem: &M, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mptable_checksums_and_counts() {
        let bytes = build(4).unwrap();
        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(bytes[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &bytes[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 2 + 24 + 2);
        let processors = table[44..].chunks(20).take(4).filter(|e| e[0] == 0).count();
        assert_eq!(processors, 4);
        assert!(EBDA_START as usize + bytes.len() <= 0xA0000);
    }

    #[test]
    fn mptable_rejects_zero_and_too_many_cpus() {
        assert!(build(0).is_err());
        assert!(build(255).is_err());
        assert!(build(254).is_ok());
    }
}
