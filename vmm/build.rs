//! Assembles the built-in demo guest (guests/demo/demo.S) into a flat binary with GNU as + ld.

use std::path::PathBuf;
use std::process::Command;

/// Guest-physical address the payload is linked for (vmm/src/demo/layout.rs: `PAYLOAD_GPA`).
const PAYLOAD_LINK_ADDR: &str = "0x100000";

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let src = manifest.join("../guests/demo/demo.S");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let obj = out.join("demo.o");
    let bin = out.join("demo.bin");
    println!("cargo:rerun-if-changed={}", src.display());
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
    run(Command::new("ld")
        .args(["-nostdlib", "-e", "0", "--oformat=binary"])
        .arg(format!("-Ttext={PAYLOAD_LINK_ADDR}"))
        .arg("-o")
        .arg(&bin)
        .arg(&obj));
}
