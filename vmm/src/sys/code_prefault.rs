//! `madvise(MADV_POPULATE_READ)` over this executable's read-only mappings (its code and
//! constants): every page mapped into the page tables now, in one call, instead of a page fault
//! at the first instruction that runs on it.
//!
//! A switchover runs code a process may never have run: a live update's new tern decodes and
//! restores state, sets routes and starts vCPUs for the first time in its life, and a source
//! that never migrated saves and encodes for the first time. Each first touch of a code page is a
//! fault inside the downtime: about a microsecond on a host, tens of them under the lab's TCG,
//! where a first state decode took 13–38 ms and the same encode 0.4 ms warm against 4–20 ms cold.
//! The pages are the binary's page cache pages, shared with every process running it.

use std::io;

/// What [`populate`] mapped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Populated {
    /// Read-only mappings of the executable found.
    pub mappings: usize,
    /// Their bytes, all mapped now.
    pub bytes: u64,
}

/// The read-only mappings (start, end) of the file with inode `ino` in a `/proc/self/maps` text.
fn readonly_mappings_of(maps: &str, ino: u64) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            let inode: u64 = f.nth(2)?.parse().ok()?;
            if inode != ino || perms.contains('w') || !perms.starts_with('r') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (end > start).then_some((start, end))
        })
        .collect()
}

/// Maps every page of this executable's read-only mappings now. A kernel without
/// `MADV_POPULATE_READ` (before 5.14) answers `EINVAL`, returned as the error.
pub fn populate() -> io::Result<Populated> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata("/proc/self/exe")?.ino();
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut done = Populated::default();
    for (start, end) in readonly_mappings_of(&maps, ino) {
        populate_range(start, end)?;
        done.mappings += 1;
        done.bytes += (end - start) as u64;
    }
    Ok(done)
}

/// Maps every page of the readable mapping `[start, end)` (from `/proc/self/maps`) now.
fn populate_range(start: usize, end: usize) -> io::Result<()> {
    // SAFETY: [start, end) is a mapping of this process that /proc/self/maps listed as readable
    // (the executable's read-only ones stay mapped for the process's life); MADV_POPULATE_READ
    // only faults its pages in for reading, as a read would, and changes neither the mapping nor
    // memory. A range that is not mapped fails with ENOMEM, nothing else.
    let r = unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            end - start,
            libc::MADV_POPULATE_READ,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_executables_readonly_mappings_are_picked() {
        let maps = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 77 /usr/bin/tern
55d0c0a02000-55d0c0b00000 r-xp 00002000 fe:00 77 /usr/bin/tern
55d0c0b00000-55d0c0b01000 rw-p 00100000 fe:00 77 /usr/bin/tern
55d0c0c00000-55d0c0c21000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000001000 r-xp 00000000 fe:00 78 /usr/lib/libc.so.6
7f0000002000-7f0000003000 ---p 00000000 fe:00 77 /usr/bin/tern
";
        assert_eq!(
            readonly_mappings_of(maps, 77),
            vec![
                (0x55d0_c0a0_0000, 0x55d0_c0a0_2000),
                (0x55d0_c0a0_2000, 0x55d0_c0b0_0000)
            ]
        );
        assert!(readonly_mappings_of(maps, 5).is_empty());
    }

    /// Whether the page at `addr` is in this process's page tables (`/proc/self/pagemap` bit 63).
    fn present(pagemap: &std::fs::File, addr: usize) -> bool {
        use std::os::unix::fs::FileExt;
        let mut e = [0u8; 8];
        pagemap
            .read_exact_at(&mut e, (addr / 4096 * 8) as u64)
            .expect("pagemap entry");
        u64::from_le_bytes(e) >> 63 == 1
    }

    #[test]
    fn populate_maps_every_page_of_a_mapping_nothing_touched() {
        let pages = 16;
        let path = std::env::temp_dir().join(format!("tern-prefault-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; pages * 4096]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: a new private read-only mapping of a file this test owns; unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * 4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let start = addr as usize;
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mapped = || {
            (0..pages)
                .filter(|i| present(&pagemap, start + i * 4096))
                .count()
        };
        assert_eq!(mapped(), 0, "a fresh mapping has no page mapped");
        populate_range(start, start + pages * 4096).expect("MADV_POPULATE_READ (Linux 5.14+)");
        assert_eq!(mapped(), pages);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(addr, pages * 4096) };
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn after_populate_every_code_page_is_mapped() {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata("/proc/self/exe").unwrap().ino();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let ranges = readonly_mappings_of(&maps, ino);
        assert!(!ranges.is_empty(), "no read-only mapping of the executable");
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let p = populate().expect("MADV_POPULATE_READ (Linux 5.14+)");
        assert_eq!(p.mappings, ranges.len());
        let all: Vec<usize> = ranges
            .iter()
            .flat_map(|&(s, e)| (s..e).step_by(4096))
            .collect();
        let mapped = all.iter().filter(|&&a| present(&pagemap, a)).count();
        assert_eq!(mapped, all.len(), "pages mapped after populate");
    }
}
