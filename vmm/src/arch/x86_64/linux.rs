//! Loading a Linux kernel: ELF vmlinux through its PVH entry note, or bzImage through the 64-bit boot
//! protocol; initramfs, command line and the e820 / PVH memory map.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};

use super::layout::{
    RamRange, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, PAGE_SIZE, PVH_INFO_START,
    PVH_MEMMAP_START, ZERO_PAGE_START,
};
use super::regs::BootEntry;

/// What to boot.
#[derive(Debug, Clone)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
}

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an x86_64 ELF vmlinux nor a bzImage ({reason})")]
    UnknownKernelFormat { path: PathBuf, reason: String },
    #[error("cannot open initramfs {path}")]
    OpenInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest memory: {available} bytes free \
         between the kernel and the end of low RAM; give the VM more --memory"
    )]
    InitramfsTooLarge {
        path: PathBuf,
        size: u64,
        available: u64,
    },
    #[error("cannot read initramfs {path} into guest memory")]
    ReadInitramfs {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("invalid kernel command line ({reason}); it must be ASCII and at most {CMDLINE_MAX_SIZE} bytes")]
    Cmdline { reason: String },
    #[error("cannot write boot structures to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PVH_MAGIC: u32 = 0x336e_c578;
const PVH_MODLIST_START: GuestAddress = GuestAddress(0x6800);
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// The guest memory map as (start, len, type) triples, shared by e820 and PVH.
fn memory_map(ram: &[RamRange]) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (
            EBDA_START,
            HIMEM_START.raw_value() - EBDA_START,
            E820_RESERVED,
        ),
    ];
    for r in ram {
        let start = r.gpa.raw_value().max(HIMEM_START.raw_value());
        let end = r.gpa.raw_value() + r.len;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

fn load_kernel_image(
    mem: &GuestMemoryMmap<tern_migration::dirty::GuestPageBitmap>,
    path: &Path,
) -> Result<(KernelLoaderResult, bool), LinuxBootError> {
    let mut file = File::open(path).map_err(|source| LinuxBootError::OpenKernel {
        path: path.to_owned(),
        source,
    })?;
    let elf_err = match Elf::load(mem, None, &mut file, Some(HIMEM_START)) {
        Ok(result) => return Ok((result, true)),
        Err(e) => e,
    };
    match BzImage::load(mem, None, &mut file, Some(HIMEM_START)) {
        Ok(result) => Ok((result, false)),
        Err(bz_err) => Err(LinuxBootError::UnknownKernelFormat {
            path: path.to_owned(),
            reason: format!("as ELF: {elf_err}; as bzImage: {bz_err}"),
        }),
    }
}

/// Loads `initramfs` as high in low RAM as it fits, above `kernel_end`.
fn load_initramfs(
    mem: &GuestMemoryMmap<tern_migration::dirty::GuestPageBitmap>,
    path: &Path,
    kernel_end: u64,
    low_ram_end: u64,
    addr_max: u64,
) -> Result<(GuestAddress, u64), LinuxBootError> {
    let mut file = File::open(path).map_err(|source| LinuxBootError::OpenInitramfs {
        path: path.to_owned(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| LinuxBootError::OpenInitramfs {
            path: path.to_owned(),
            source,
        })?
        .len();
    let floor = kernel_end.next_multiple_of(PAGE_SIZE);
    let top = low_ram_end.min(addr_max.saturating_add(1));
    let available = top.saturating_sub(floor);
    if size > available {
        return Err(LinuxBootError::InitramfsTooLarge {
            path: path.to_owned(),
            size,
            available,
        });
    }
    let addr = GuestAddress((top - size) & !(PAGE_SIZE - 1));
    let len = usize::try_from(size).map_err(|_| LinuxBootError::InitramfsTooLarge {
        path: path.to_owned(),
        size,
        available,
    })?;
    mem.get_slice(addr, len)
        .and_then(|slice| {
            let mut slice = slice;
            file.read_exact_volatile(&mut slice)
                .map_err(vm_memory::GuestMemoryError::from)
        })
        .map_err(|source| LinuxBootError::ReadInitramfs {
            path: path.to_owned(),
            source,
        })?;
    Ok((addr, size))
}

/// Loads the kernel, initramfs and command line, writes the boot structures, and returns how vCPU 0
/// enters the kernel.
pub fn load(
    mem: &GuestMemoryMmap<tern_migration::dirty::GuestPageBitmap>,
    ram: &[RamRange],
    boot: &KernelBoot,
) -> Result<BootEntry, LinuxBootError> {
    let (result, is_elf) = load_kernel_image(mem, &boot.kernel)?;

    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| LinuxBootError::Cmdline {
        reason: e.to_string(),
    })?;
    cmdline
        .insert_str(&boot.cmdline)
        .map_err(|e| LinuxBootError::Cmdline {
            reason: e.to_string(),
        })?;
    linux_loader::loader::load_cmdline(mem, CMDLINE_START, &cmdline).map_err(|e| {
        LinuxBootError::Cmdline {
            reason: e.to_string(),
        }
    })?;
    let cmdline_size = cmdline
        .as_cstring()
        .map(|c| c.as_bytes_with_nul().len())
        .unwrap_or(1) as u32;

    let low_ram_end = ram.first().map_or(0, |r| r.gpa.raw_value() + r.len);
    let initrd_max = result
        .setup_header
        .map_or(u64::from(u32::MAX), |h| u64::from(h.initrd_addr_max));
    let initrd = boot
        .initramfs
        .as_deref()
        .map(|p| load_initramfs(mem, p, result.kernel_end, low_ram_end, initrd_max))
        .transpose()?;
    let map = memory_map(ram);

    if let (true, PvhBootCapability::PvhEntryPresent(entry)) = (is_elf, result.pvh_boot_cap) {
        write_pvh(mem, &map, initrd)?;
        return Ok(BootEntry::Pvh {
            entry,
            start_info: PVH_INFO_START,
        });
    }

    let mut params = boot_params::default();
    match result.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START.raw_value() as u32;
    params.hdr.cmdline_size = cmdline_size;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, ZERO_PAGE_START)
        .map_err(LinuxBootError::GuestMemory)?;
    let entry = if is_elf {
        result.kernel_load
    } else {
        result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET)
    };
    Ok(BootEntry::Linux64 {
        entry,
        zero_page: ZERO_PAGE_START,
    })
}

fn write_pvh(
    mem: &GuestMemoryMmap<tern_migration::dirty::GuestPageBitmap>,
    map: &[(u64, u64, u32)],
    initrd: Option<(GuestAddress, u64)>,
) -> Result<(), LinuxBootError> {
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START.raw_value(),
        memmap_paddr: PVH_MEMMAP_START.raw_value(),
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        };
        mem.write_obj(
            entry,
            PVH_MEMMAP_START.unchecked_add(i as u64 * std::mem::size_of_val(&entry) as u64),
        )
        .map_err(LinuxBootError::GuestMemory)?;
    }
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr.raw_value(),
            size,
            ..Default::default()
        };
        mem.write_obj(module, PVH_MODLIST_START)
            .map_err(LinuxBootError::GuestMemory)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START.raw_value();
    }
    mem.write_obj(info, PVH_INFO_START)
        .map_err(LinuxBootError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_reserves_ebda_and_legacy_hole() {
        let map = memory_map(&super::super::layout::ram_ranges(256 << 20));
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (0x100000, (256 << 20) - 0x100000, E820_RAM));
        let total_ram: u64 = map.iter().filter(|m| m.2 == E820_RAM).map(|m| m.1).sum();
        assert!(total_ram < 256 << 20);
    }
}
