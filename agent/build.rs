//! Builds the kernel programs (`ebpf/berth-ebpf`) for `bpfel-unknown-none` with the nightly
//! toolchain and `bpf-linker` (both installed by `scripts/bootstrap.sh`), and places the object in
//! `OUT_DIR/berth.bpf.o` for `include_bytes_aligned!`.
//!
//! Cargo cannot build an artifact dependency with `-Z build-std`, so this runs a nested cargo, as
//! aya's template does; the environment cargo sets for build scripts is scrubbed first so the
//! nested build does not inherit the host target's compiler wrappers and flags.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn watch(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                watch(&p);
            } else {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let ebpf_dir = root.join("ebpf/berth-ebpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    watch(&ebpf_dir.join("src"));
    watch(&root.join("ebpf/common/src"));
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("Cargo.toml").display()
    );
    println!("cargo:rerun-if-env-changed=BERTH_EBPF_TOOLCHAIN");

    let toolchain = env::var("BERTH_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let target_dir = root.join("target/ebpf");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        &toolchain,
        "cargo",
        "build",
        "--release",
        "-Z",
        "build-std=core",
    ])
    .args(["--target", "bpfel-unknown-none", "--target-dir"])
    .arg(&target_dir)
    .current_dir(&ebpf_dir);
    for (key, _) in env::vars_os() {
        let k = key.to_string_lossy();
        let scrub = (k.starts_with("CARGO") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k.starts_with("RUSTUP_TOOLCHAIN")
            || k == "RUSTFLAGS"
            || k == "RUSTDOC";
        if scrub {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run `rustup run {toolchain} cargo`: {e}; run scripts/bootstrap.sh first")
    });
    if !status.success() {
        panic!(
            "building the eBPF programs failed ({status}); scripts/bootstrap.sh installs the \
             nightly rust-src component and bpf-linker they need"
        );
    }
    let obj = target_dir.join("bpfel-unknown-none/release/berth");
    std::fs::copy(&obj, out_dir.join("berth.bpf.o"))
        .unwrap_or_else(|e| panic!("copy {}: {e}", obj.display()));
}
