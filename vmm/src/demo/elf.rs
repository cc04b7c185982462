//! The demo guest as a standalone PVH ELF (guests/demo/pvh.S), for any VMM with PVH boot: tern's
//! `--kernel` and QEMU's `-kernel` run the same ring-3 workload and verifier as `--guest demo`.
//!
//! The ELF sets up its own paging, GDT, IDT and TSS from the PVH 32-bit entry and reads its options
//! from a config block inside its image, which [`pvh_elf`] fills in: `TERNPVHC`, version, then the
//! u64 fields `mib`, `dirty_mib_per_s`, `exit_after_s` (0 = never) and `tsc_khz`. It runs on the
//! boot vCPU only.

use std::path::Path;

use super::DemoConfig;

/// The assembled ELF with the defaults of guests/demo/pvh.S (and no TSC rate: it refuses to run).
pub static PVH_TEMPLATE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo-pvh.elf"));

const MAGIC: &[u8; 8] = b"TERNPVHC";
const VERSION: u64 = 1;

/// Why the ELF cannot be produced.
#[derive(Debug, thiserror::Error)]
pub enum PvhElfError {
    #[error("the built demo PVH ELF has no valid config block (a build problem)")]
    NoConfigBlock,
    #[error("the demo PVH ELF needs the guest's TSC rate (KVM reported none)")]
    NoTscRate,
    #[error("cannot read the TSC rate from KVM")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The ELF for `config`, pacing itself with a TSC of `tsc_khz`.
pub fn pvh_elf(config: &DemoConfig, tsc_khz: u32) -> Result<Vec<u8>, PvhElfError> {
    if tsc_khz == 0 {
        return Err(PvhElfError::NoTscRate);
    }
    let mut image = PVH_TEMPLATE.to_vec();
    let at = image
        .windows(MAGIC.len())
        .position(|w| w == MAGIC)
        .ok_or(PvhElfError::NoConfigBlock)?;
    let field = |i: usize| at + 8 + i * 8;
    let version = image
        .get(field(0)..field(0) + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if version != Some(VERSION) || image.len() < field(5) {
        return Err(PvhElfError::NoConfigBlock);
    }
    let values = [
        config.mib,
        config.dirty_mib_per_s,
        config.exit_after_s.unwrap_or(0),
        u64::from(tsc_khz),
    ];
    for (i, v) in values.iter().enumerate() {
        image[field(i + 1)..field(i + 2)].copy_from_slice(&v.to_le_bytes());
    }
    Ok(image)
}

/// The TSC rate a vCPU of this host's KVM gets (what tern and QEMU guests see without scaling).
pub fn host_tsc_khz(kvm_device: &Path) -> Result<u32, PvhElfError> {
    let c_path = std::ffi::CString::new(kvm_device.as_os_str().as_encoded_bytes())
        .map_err(|_| PvhElfError::Kvm(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = kvm_ioctls::Kvm::new_with_path(&c_path).map_err(PvhElfError::Kvm)?;
    let vm = kvm.create_vm().map_err(PvhElfError::Kvm)?;
    let vcpu = vm.create_vcpu(0).map_err(PvhElfError::Kvm)?;
    vcpu.get_tsc_khz().map_err(PvhElfError::Kvm)
}

/// Writes the ELF for `config` to `path`, with this host's TSC rate.
pub fn write_pvh_elf(
    config: &DemoConfig,
    kvm_device: &Path,
    path: &Path,
) -> Result<(), PvhElfError> {
    let image = pvh_elf(config, host_tsc_khz(kvm_device)?)?;
    std::fs::write(path, image).map_err(|source| PvhElfError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(image: &[u8], i: usize) -> u64 {
        let at = image.windows(8).position(|w| w == MAGIC).unwrap() + 8 + i * 8;
        u64::from_le_bytes(image[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn pvh_elf_carries_the_options_and_a_pvh_note() {
        let config = DemoConfig {
            mib: 512,
            dirty_mib_per_s: 40,
            exit_after_s: Some(7),
        };
        let image = pvh_elf(&config, 2_000_000).unwrap();
        assert_eq!(&image[..4], b"\x7fELF");
        assert_eq!(
            [
                read(&image, 0),
                read(&image, 1),
                read(&image, 2),
                read(&image, 3),
                read(&image, 4)
            ],
            [VERSION, 512, 40, 7, 2_000_000]
        );
        // XEN_ELFNOTE_PHYS32_ENTRY: namesz 4, descsz 8, type 18, "Xen\0".
        let note: Vec<u8> = [4u32, 8, 18]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .chain(*b"Xen\0")
            .collect();
        assert!(image.windows(note.len()).any(|w| w == note));
    }

    #[test]
    fn pvh_elf_needs_a_tsc_rate() {
        assert!(matches!(
            pvh_elf(&DemoConfig::default(), 0),
            Err(PvhElfError::NoTscRate)
        ));
    }
}
