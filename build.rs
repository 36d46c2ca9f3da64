//! Locates the eBPF object built by `cargo xtask build-ebpf` so the daemon
//! can embed it.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets this"));
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(
            || root.join("target"),
            |p| if p.is_absolute() { p } else { root.join(p) },
        );
    let obj = target_dir.join("bpfel-unknown-none/release/meshlb-ebpf");
    println!("cargo:rerun-if-changed={}", obj.display());
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    assert!(
        obj.exists(),
        "eBPF object {} is missing: run `cargo xtask build-ebpf` first",
        obj.display()
    );
    println!("cargo:rustc-env=MESHLB_EBPF_OBJ={}", obj.display());
}
