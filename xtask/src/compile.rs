//! `cargo xtask build-ebpf` and `cargo xtask build`: the eBPF object first
//! (the host crate's build script embeds it), then the `meshlb` binary.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::ValueEnum;

use crate::cmd::Cmd;
use crate::setup;

/// Where cargo puts artifacts for the workspace.
pub fn target_dir() -> PathBuf {
    let root = crate::root();
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(
            || root.join("target"),
            |p| if p.is_absolute() { p } else { root.join(p) },
        )
}

/// The compiled XDP object that the host crate embeds.
pub fn ebpf_object() -> PathBuf {
    target_dir().join("bpfel-unknown-none/release/meshlb-ebpf")
}

/// `cargo <subcommand>` on `ebpf/meshlb-ebpf` as it is built: stable with
/// `RUSTC_BOOTSTRAP`, bpfel, `build-std=core`, release, the shared target
/// directory.
fn ebpf_cargo(subcommand: &str) -> Cmd {
    Cmd::new("cargo")
        .dir(crate::root().join("ebpf/meshlb-ebpf"))
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args([subcommand, "--release", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(target_dir().to_string_lossy())
}

/// Build `ebpf/meshlb-ebpf` for bpfel (serves x86_64, aarch64 and armv7).
pub fn build_ebpf() -> Result<PathBuf> {
    setup::rust_src()?;
    setup::bpf_linker()?;
    ebpf_cargo("build")
        .run()
        .context("building the eBPF program")?;
    let obj = ebpf_object();
    anyhow::ensure!(obj.exists(), "eBPF build produced no {}", obj.display());
    println!("eBPF object: {}", obj.display());
    Ok(obj)
}

/// clippy on `ebpf/meshlb-ebpf` for the target and flags it is built with
/// (its lints are in its own Cargo.toml: it is outside the workspace);
/// any warning fails.
pub fn clippy_ebpf() -> Result<()> {
    setup::rust_src()?;
    ebpf_cargo("clippy")
        .args(["--", "-D", "warnings"])
        .run()
        .context("clippy on the eBPF program")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    #[value(name = "x86_64", alias = "x86-64")]
    X86_64,
    Aarch64,
    Armv7,
}

impl Target {
    pub fn triple(self) -> &'static str {
        match self {
            Target::X86_64 => "x86_64-unknown-linux-gnu",
            Target::Aarch64 => "aarch64-unknown-linux-gnu",
            Target::Armv7 => "armv7-unknown-linux-gnueabihf",
        }
    }

    /// apt packages that provide the cross linker and libc.
    fn cross_packages(self) -> &'static [&'static str] {
        match self {
            Target::X86_64 => &[],
            Target::Aarch64 => &["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"],
            Target::Armv7 => &["gcc-arm-linux-gnueabihf", "libc6-dev-armhf-cross"],
        }
    }
}

/// Build the eBPF object, then the `meshlb` binary; returns its path.
pub fn build(target: Target, release: bool) -> Result<PathBuf> {
    build_ebpf()?;
    // protoc and the protobuf well-known types are needed by the host crate's dependencies on every target.
    let mut pkgs = vec!["protobuf-compiler", "libprotobuf-dev"];
    pkgs.extend_from_slice(target.cross_packages());
    setup::apt(&pkgs)?;
    let mut cmd = Cmd::new("cargo").args(["build", "--package", "meshlb", "--bin", "meshlb"]);
    if release {
        cmd = cmd.arg("--release");
    }
    let profile = if release { "release" } else { "debug" };
    // The host target is built without --target so it shares artifacts with
    // `cargo test`/`clippy`; cross targets get their own directory.
    let bin = if target == Target::X86_64 {
        target_dir().join(profile).join("meshlb")
    } else {
        setup::rust_targets(&[target.triple()])?;
        cmd = cmd.args(["--target", target.triple()]);
        target_dir()
            .join(target.triple())
            .join(profile)
            .join("meshlb")
    };
    cmd.run().context("building meshlb")?;
    anyhow::ensure!(bin.exists(), "build produced no {}", bin.display());
    println!("binary: {}", bin.display());
    Ok(bin)
}
