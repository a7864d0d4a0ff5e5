//! Compiles `launcher/launch.c` into a static executable that a root
//! worker starts its jobs through (see `src/sandbox.rs`). Where no C
//! compiler or static C library is found, the file is left empty and the
//! worker uses util-linux `setpriv` instead, as it says at start.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "launcher/launch.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("taskhost-launch");
    let compiler = cc::Build::new()
        .cargo_metadata(false)
        .cargo_warnings(false)
        .get_compiler();
    let built = Command::new(compiler.path())
        .args(["-static", "-O2", "-s", "-o"])
        .arg(&out)
        .arg(src)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !built {
        std::fs::write(&out, b"").expect("write the empty launcher");
    }
}
