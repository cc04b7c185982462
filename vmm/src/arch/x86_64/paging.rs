//! Identity page tables for entering long mode directly.

use vm_memory::{Bytes, GuestMemoryBackend};

use super::layout::{IDENTITY_MAP_BYTES, PDE_START, PDPTE_START, PML4_START};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;

/// Who may use the identity mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappingAccess {
    /// Kernel only (Linux boot).
    Supervisor,
    /// Also ring 3 (the demo guest runs its workload there).
    User,
}

/// Writes a PML4 → PDPT → PD hierarchy identity-mapping the first [`IDENTITY_MAP_BYTES`] with 2 MiB
/// pages, and returns the CR3 value.
pub fn write_identity_tables<M: GuestMemoryBackend>(
    mem: &M,
    access: MappingAccess,
) -> Result<u64, vm_memory::GuestMemoryError> {
    let bits = PRESENT
        | WRITABLE
        | if access == MappingAccess::User {
            USER
        } else {
            0
        };
    mem.write_obj(PDPTE_START.raw_value() | bits, PML4_START)?;
    let gib = IDENTITY_MAP_BYTES >> 30;
    for dir in 0..gib {
        let pd = PDE_START.unchecked_add(dir * 4096);
        mem.write_obj(pd.raw_value() | bits, PDPTE_START.unchecked_add(dir * 8))?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((dir << 30) | (i << 21)) | bits | HUGE).to_le_bytes())
            .collect();
        mem.write_slice(&entries, pd)?;
    }
    Ok(PML4_START.raw_value())
}

#[allow(unused_imports)]
use vm_memory::Address as _;

#[cfg(test)]
mod tests {
    use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

    use super::*;

    #[test]
    fn identity_tables_map_every_2mib_page_to_itself() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_identity_tables(&mem, MappingAccess::User).unwrap();
        let walk = |va: u64| -> u64 {
            let pml4e: u64 = mem
                .read_obj(GuestAddress(cr3 + ((va >> 39) & 511) * 8))
                .unwrap();
            let pdpte: u64 = mem
                .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 511) * 8))
                .unwrap();
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & (PRESENT | USER | HUGE), PRESENT | USER | HUGE);
            (pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff)
        };
        for va in [
            0u64,
            0x12_3456,
            0xBFFF_F000,
            0xFEE0_0000,
            IDENTITY_MAP_BYTES - 1,
        ] {
            assert_eq!(walk(va) & !0xfff, va & !0xfff);
        }
        let pml4e: u64 = mem.read_obj(PML4_START.unchecked_add(0)).unwrap();
        assert_eq!(pml4e & 0xfff, PRESENT | WRITABLE | USER);
    }
}
