//! Assembles tern's built-in guest code with GNU as + ld: the demo guest (a flat binary embedded in
//! tern) and the probe kernels the loader tests boot (embedded in the tests, so the nested lab can run
//! them without a toolchain).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Guest-physical address the demo payload is linked for (vmm/src/demo/setup.rs: `PAYLOAD_GPA`).
const DEMO_LINK_ADDR: u64 = 0x100000;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

/// Assembles `src` and links it at `link_addr` into `out/name` (flat binary or ELF).
fn build(src: &Path, out: &Path, name: &str, link_addr: u64, flat: bool, entry: &str) {
    println!("cargo:rerun-if-changed={}", src.display());
    let obj = out.join(format!("{name}.o"));
    // `.include` files (guests/probe/console.S) are found next to the source.
    let include_dir = src.parent().expect("guest sources live in a directory");
    run(Command::new("as")
        .arg("--64")
        .arg("-I")
        .arg(include_dir)
        .arg("-o")
        .arg(&obj)
        .arg(src));
    let mut ld = Command::new("ld");
    ld.args(["-nostdlib", "-e", entry])
        .arg(format!("-Ttext={link_addr:#x}"));
    if flat {
        ld.arg("--oformat=binary");
    }
    run(ld.arg("-o").arg(out.join(name)).arg(&obj));
}

/// The demo guest as a standalone PVH ELF (guests/demo/pvh.S includes demo.S; pvh.ld places the
/// PVH note in its own PT_NOTE right after the image). `tern --write-demo-elf` patches its options in.
fn build_demo_pvh(dir: &Path, out: &Path) {
    for file in ["pvh.S", "pvh.ld"] {
        println!("cargo:rerun-if-changed={}", dir.join(file).display());
    }
    let obj = out.join("demo-pvh.o");
    run(Command::new("as")
        .arg("--64")
        .arg("-I")
        .arg(dir)
        .arg("-o")
        .arg(&obj)
        .arg(dir.join("pvh.S")));
    run(Command::new("ld")
        .args(["-nostdlib", "--no-warn-rwx-segments", "-T"])
        .arg(dir.join("pvh.ld"))
        .arg("-o")
        .arg(out.join("demo-pvh.elf"))
        .arg(&obj));
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guests = manifest.join("../guests");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    build(
        &guests.join("demo/demo.S"),
        &out,
        "demo.bin",
        DEMO_LINK_ADDR,
        true,
        "0",
    );
    build_demo_pvh(&guests.join("demo"), &out);
    println!(
        "cargo:rerun-if-changed={}",
        guests.join("probe/console.S").display()
    );
    let probe64 = guests.join("probe/probe64.S");
    build(&probe64, &out, "probe64.elf", 0x100000, false, "_start");
    // bzImage form: the 64-bit entry sits 0x200 bytes into the protected-mode kernel.
    build(&probe64, &out, "probe64.bin", 0x100200, true, "_start");
    build(
        &guests.join("probe/probe_pci.S"),
        &out,
        "probe_pci.elf",
        0x100000,
        false,
        "_start",
    );
    // The passthrough probes the nested lab's vfio-* scenarios boot (scripts/lab assembles them
    // the same way and ships them in); built here too so a broken probe fails `cargo build`.
    for probe in ["probe_edu", "probe_mtty"] {
        build(
            &guests.join(format!("probe/{probe}.S")),
            &out,
            &format!("{probe}.elf"),
            0x100000,
            false,
            "_start",
        );
    }
}
