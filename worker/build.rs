//! Compiles `launcher/launch.c` into a static executable without a C
//! library that a root worker starts its jobs through (see
//! `src/sandbox.rs`). Where the target is not x86-64 or aarch64 Linux, or
//! no C compiler is found, the file is left empty and the worker uses
//! util-linux `setpriv` instead, as it says at start.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "launcher/launch.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("taskhost-launch");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let built = os == "linux" && matches!(arch.as_str(), "x86_64" | "aarch64") && {
        let compiler = cc::Build::new()
            .cargo_metadata(false)
            .cargo_warnings(false)
            .get_compiler();
        Command::new(compiler.path())
            .args([
                "-static",
                "-nostdlib",
                "-ffreestanding",
                "-fno-stack-protector",
                "-fno-pie",
                "-no-pie",
                "-fno-asynchronous-unwind-tables",
                "-Wl,--build-id=none",
                "-Wl,-z,noexecstack",
                "-O2",
                "-s",
                "-Wall",
                "-Werror",
                "-o",
            ])
            .arg(&out)
            .arg(src)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !built {
        std::fs::write(&out, b"").expect("write the empty launcher");
    }
}
