//! `cargo xtask setup`: check (quickly) and install what building and
//! testing meshlb needs; every check is idempotent and says what it found.

use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::Cmd;

/// Build tools and the peers/tools the tests, demo and benchmarks use.
pub const APT_PACKAGES: &[&str] = &[
    "protobuf-compiler",
    "libprotobuf-dev",
    "openssl",
    "etcd-server",
    "etcd-client",
    // dockerd (+ containerd, runc) and the busybox the Docker registration
    // tests build their image from (`docker import`, no registry).
    "docker.io",
    "busybox-static",
    "nginx-light",
    "wrk",
    "ethtool",
    "haproxy",
    "iptables",
    "iproute2",
    "curl",
    "gcc-aarch64-linux-gnu",
    "gcc-arm-linux-gnueabihf",
    "libc6-dev-arm64-cross",
    "libc6-dev-armhf-cross",
    "python3",
];

pub const CROSS_TARGETS: &[&str] = &["aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf"];

const BPF_LINKER_VERSION: &str = "0.13.0";
pub const BPFFS: &str = "/sys/fs/bpf";

/// Everything: apt, rustup component and targets, bpf-linker, bpffs.
pub fn setup() -> Result<()> {
    apt(APT_PACKAGES)?;
    rust_src()?;
    rust_targets(CROSS_TARGETS)?;
    bpf_linker()?;
    bpffs()?;
    vm_packages()?;
    package_tools()?;
    println!("setup: all prerequisites present");
    Ok(())
}

const CARGO_DEB_VERSION: &str = "3.8.0";

/// What `cargo xtask package` and its checks need: cargo-deb (the Rust
/// ecosystem's .deb builder), lintian, and systemd's `systemd-analyze`.
pub fn package_tools() -> Result<()> {
    apt(&["lintian", "systemd", "dpkg-dev"])?;
    let have = Cmd::new("cargo")
        .args(["deb", "--version"])
        .stdout()
        .is_ok_and(|v| v.split_whitespace().any(|w| w == CARGO_DEB_VERSION));
    if have {
        println!("cargo-deb: {CARGO_DEB_VERSION} present");
        return Ok(());
    }
    println!("cargo-deb: installing {CARGO_DEB_VERSION} (takes a few minutes)");
    Cmd::new("cargo")
        .env_remove("CARGO_TARGET_DIR")
        .args([
            "install",
            "cargo-deb",
            "--locked",
            "--version",
            CARGO_DEB_VERSION,
        ])
        .run()
        .context("installing cargo-deb failed")?;
    Ok(())
}

/// apt packages of the QEMU guest harness (`cargo xtask vm`). Debian 12 images may carry a backported
/// qemu-utils whose `Breaks` rejects bookworm's qemu-system-common: it is
/// brought back to the suite's version alongside.
pub fn vm_packages() -> Result<()> {
    apt(&["busybox-static", "kmod", "mmdebstrap"])?;
    let have = |p: &str| {
        Cmd::new("dpkg-query")
            .args(["-W", "-f=${db:Status-Abbrev}", p])
            .stdout()
            .is_ok_and(|s| s.starts_with("ii"))
    };
    if ["qemu-system-x86", "qemu-system-arm", "qemu-utils"]
        .iter()
        .all(|p| have(p))
    {
        println!("apt: qemu-system-x86 qemu-system-arm present");
        return Ok(());
    }
    if !is_root() {
        bail!("qemu missing and not root: run `sudo apt-get install --no-install-recommends qemu-system-x86 qemu-system-arm qemu-utils`");
    }
    let suite = Cmd::new("sh")
        .args(["-c", ". /etc/os-release && echo $VERSION_CODENAME"])
        .stdout()?
        .trim()
        .to_string();
    Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .arg("--allow-downgrades")
        .args(["qemu-system-x86", "qemu-system-arm"])
        .arg(format!("qemu-utils/{suite}"))
        .timeout(Duration::from_secs(15 * 60))
        .run()
        .context("installing qemu")
}

pub fn is_root() -> bool {
    // /proc/self/status "Uid:\treal\teffective\t..." — no libc needed.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask {what}` must run as root (it needs netns, XDP and bpffs); try sudo");
    }
    Ok(())
}

/// Install the packages of `pkgs` that dpkg does not list as installed.
pub fn apt(pkgs: &[&str]) -> Result<()> {
    let out = Cmd::new("dpkg-query")
        .args(["-W", "-f=${Package}\t${db:Status-Abbrev}\n"])
        .args(pkgs.iter().copied())
        .output_unchecked()
        .context("dpkg-query not available: setup supports Debian/Ubuntu only")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, st)| st.starts_with("ii"))
        .map(|(p, _)| p)
        .collect();
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect();
    if missing.is_empty() {
        println!("apt: {} packages present", pkgs.len());
        return Ok(());
    }
    println!("apt: missing {}", missing.join(" "));
    if !is_root() {
        bail!(
            "apt packages missing and not root: run `sudo apt-get install {}`",
            missing.join(" ")
        );
    }
    let apt_get = |args: &[&str]| {
        Cmd::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(args.iter().copied())
    };
    apt_get(&["update", "-q"])
        .run()
        .context("apt-get update failed (no network or broken sources?)")?;
    apt_get(&["install", "-y", "-q", "--no-install-recommends"])
        .args(missing.iter().copied())
        .run()
        .with_context(|| format!("apt-get install {} failed", missing.join(" ")))?;
    Ok(())
}

/// The rust-src component (for `-Z build-std=core` of the BPF target).
pub fn rust_src() -> Result<()> {
    let have = Cmd::new("rustup")
        .args(["component", "list", "--installed"])
        .stdout()
        .context("rustup is required (the eBPF build uses rustup components)")?;
    if have.lines().any(|l| l.trim().starts_with("rust-src")) {
        println!("rustup: rust-src present");
        return Ok(());
    }
    Cmd::new("rustup")
        .args(["component", "add", "rust-src"])
        .run()
        .context("`rustup component add rust-src` failed: rustup could not fetch the component")
}

/// Rust std for the given target triples.
pub fn rust_targets(targets: &[&str]) -> Result<()> {
    let have = Cmd::new("rustup")
        .args(["target", "list", "--installed"])
        .stdout()
        .context("rustup is required to add cross targets")?;
    let missing: Vec<&str> = targets
        .iter()
        .copied()
        .filter(|t| !have.lines().any(|l| l.trim() == *t))
        .collect();
    if missing.is_empty() {
        println!("rustup: targets {} present", targets.join(" "));
        return Ok(());
    }
    Cmd::new("rustup")
        .args(["target", "add"])
        .args(missing.iter().copied())
        .run()
        .with_context(|| {
            format!(
                "`rustup target add {}` failed: rustup could not fetch them",
                missing.join(" ")
            )
        })
}

/// bpf-linker 0.13, linked against this toolchain's own libLLVM.
pub fn bpf_linker() -> Result<()> {
    if let Ok(v) = Cmd::new("bpf-linker").arg("--version").stdout() {
        if v.split_whitespace().any(|w| w.starts_with("0.13")) {
            println!("bpf-linker: {} present", v.trim());
            return Ok(());
        }
        println!(
            "bpf-linker: found `{}`, need {BPF_LINKER_VERSION}",
            v.trim()
        );
    } else {
        println!("bpf-linker: not found or broken");
    }
    let sysroot = Cmd::new("rustc")
        .args(["--print", "sysroot"])
        .stdout()?
        .trim()
        .to_string();
    let libdir = Path::new(&sysroot).join("lib");
    let llvm = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {} (rustup toolchain)", libdir.display()))?;
    let vv = Cmd::new("rustc").arg("-vV").stdout()?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV does not report an LLVM version")?
        .to_string();
    // A directory with `libLLVM.so` so `-lLLVM` resolves to the toolchain's
    // copy; the rpath makes the installed binary find it at run time.
    let d: PathBuf = std::env::temp_dir().join("meshlb-bpf-linker-llvm");
    std::fs::create_dir_all(&d)?;
    let link = d.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("symlinking {}", link.display()))?;
    println!(
        "bpf-linker: building {BPF_LINKER_VERSION} against {} (takes a few minutes)",
        llvm.display()
    );
    Cmd::new("cargo")
        .env(
            "RUSTFLAGS",
            format!(
                "-L {} -C link-arg=-Wl,-rpath,{}",
                d.display(),
                libdir.display()
            ),
        )
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--force",
        ])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .run()
        .context("installing bpf-linker failed")?;
    let v = Cmd::new("bpf-linker")
        .arg("--version")
        .stdout()
        .context("bpf-linker installed but does not run (is ~/.cargo/bin on PATH?)")?;
    println!("bpf-linker: {} installed", v.trim());
    Ok(())
}

pub fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == BPFFS && f[2] == "bpf"
        })
    })
}

/// bpffs at /sys/fs/bpf (pinned maps and links live there).
pub fn bpffs() -> Result<()> {
    if bpffs_mounted() {
        println!("bpffs: mounted at {BPFFS}");
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted at {BPFFS} and not root: run `sudo mount -t bpf bpf {BPFFS}`");
    }
    Cmd::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .run()
        .with_context(|| format!("mounting bpffs at {BPFFS}"))
}
