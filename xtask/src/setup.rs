//! `cargo xtask setup` (and the setup step of `cargo xtask demo` and
//! `cargo xtask test`): check quickly and install what is missing; every
//! check is idempotent and says what it found.
//!
//! Two sets: [`demo`] is what `cargo xtask demo` needs (the eBPF and host
//! builds, nginx backends, curl, namespaces, bpffs); [`setup`] adds what
//! the tests, benchmarks, QEMU guests and packages need. Nothing here
//! changes a package that is already installed, whatever its version: apt
//! is asked only for missing packages, never with `--allow-downgrades`,
//! and with `--no-remove`; a cargo-installed tool at or above the wanted
//! version is kept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::Cmd;

/// What `cargo xtask demo` installs with apt: the host build (C linker,
/// `protoc` and the protobuf well-known types), the nginx backends, curl
/// for the requests, and the tools that build the namespace topology
/// (`ip`, `ethtool`, `sysctl`, `nsenter`, `mount`).
pub const DEMO_APT: &[&str] = &[
    "gcc",
    "libc6-dev",
    "protobuf-compiler",
    "libprotobuf-dev",
    "nginx-light",
    "curl",
    "iproute2",
    "ethtool",
    "procps",
    "util-linux",
];

/// The rest of what the tests and benchmarks use (on top of [`DEMO_APT`]).
pub const TEST_APT: &[&str] = &[
    "openssl",
    "etcd-server",
    "etcd-client",
    // dockerd (+ containerd, runc) and the busybox the Docker registration
    // tests build their image from (`docker import`, no registry).
    "docker.io",
    "busybox-static",
    "wrk",
    // dig: the DNS tests' real client.
    "bind9-dnsutils",
    "haproxy",
    "iptables",
    "gcc-aarch64-linux-gnu",
    "gcc-arm-linux-gnueabihf",
    "libc6-dev-arm64-cross",
    "libc6-dev-armhf-cross",
    "python3",
];

/// apt packages of the QEMU guest harness (`cargo xtask vm`) besides the
/// emulators: mmdebstrap for the guest trees, busybox and kmod for their
/// initramfs.
pub const VM_APT: &[&str] = &["busybox-static", "kmod", "mmdebstrap"];

/// The emulators: `qemu-system-x86_64`, `qemu-system-aarch64` and
/// `qemu-system-arm` (qemu-img and the rest of qemu-utils are not used).
pub const QEMU_APT: &[&str] = &["qemu-system-x86", "qemu-system-arm"];

/// Arch-dependent binary packages of Debian's `qemu` source: they require
/// one another at the same version.
const QEMU_SIBLINGS: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-arm",
    "qemu-system-common",
    "qemu-utils",
    "qemu-block-extra",
];

pub const CROSS_TARGETS: &[&str] = &["aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf"];

/// The bpf-linker installed when none (or an older one) is present.
const BPF_LINKER_VERSION: &str = "0.13.0";
pub const BPFFS: &str = "/sys/fs/bpf";

/// What `cargo xtask demo` needs: [`DEMO_APT`], rust-src, bpf-linker and
/// the bpffs mount.
pub fn demo() -> Result<()> {
    apt(DEMO_APT)?;
    rust_src()?;
    bpf_linker()?;
    bpffs()?;
    println!("setup: the demo's prerequisites are present");
    Ok(())
}

/// Everything (`cargo xtask setup`, `cargo xtask test`): the demo's set,
/// then [`TEST_APT`], the cross targets, the QEMU harness and the package
/// tools.
pub fn setup() -> Result<()> {
    apt(DEMO_APT)?;
    apt(TEST_APT)?;
    rust_src()?;
    rust_targets(CROSS_TARGETS)?;
    bpf_linker()?;
    bpffs()?;
    vm_packages()?;
    package_tools()?;
    println!("setup: all prerequisites present");
    Ok(())
}

/// The cargo-deb installed when none (or an older one) is present.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// What `cargo xtask package` and its checks need: cargo-deb (the Rust
/// ecosystem's .deb builder), lintian, and systemd's `systemd-analyze`.
pub fn package_tools() -> Result<()> {
    apt(&["lintian", "systemd", "dpkg-dev"])?;
    let have = Cmd::new("cargo").args(["deb", "--version"]).stdout().ok();
    match have.as_deref().and_then(version_in) {
        Some(v) if at_least(&v, CARGO_DEB_VERSION) => {
            println!("cargo-deb: {} present", dotted(&v));
            return Ok(());
        }
        Some(v) => println!(
            "cargo-deb: {} is older than {CARGO_DEB_VERSION}",
            dotted(&v)
        ),
        None => println!("cargo-deb: not found"),
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

/// [`VM_APT`] and [`QEMU_APT`]. Missing emulators, while a sibling from
/// the same source is installed, are asked for at the sibling's version:
/// the machine image's backported qemu-utils `Breaks` the suite's
/// qemu-system-common, and is never downgraded. That version comes from
/// the configured sources or else from `<suite>-backports`, added for
/// this one install (the system's sources and lists are left alone).
pub fn vm_packages() -> Result<()> {
    apt(VM_APT)?;
    let installed = installed(QEMU_SIBLINGS)?;
    let plan = Plan::new(QEMU_APT, &installed);
    if !plan.report()? {
        return Ok(());
    }
    update(&[])?;
    let Some((sibling, v)) = qemu_sibling(&installed) else {
        return run_install(&plan, &[], |_| None);
    };
    let pin = |_: &str| Some(v.to_string());
    if plan.missing.iter().all(|p| apt_has(&[], p, v)) {
        return run_install(&plan, &[], pin);
    }
    let suite = codename(&std::fs::read_to_string("/etc/os-release").unwrap_or_default())
        .context("/etc/os-release has no VERSION_CODENAME")?
        .to_string();
    println!("apt: {sibling} {v} is installed; looking for the emulators at that version in {suite}-backports");
    let opts = backports_opts(&suite)?;
    update(&opts)?;
    if !plan.missing.iter().all(|p| apt_has(&opts, p, v)) {
        bail!(
            "{} {v} (the version of the installed {sibling}) is neither in the configured sources nor in {suite}-backports; install them at that version (setup never downgrades {sibling})",
            plan.missing.join(" ")
        );
    }
    let mut opts = opts;
    opts.extend(["-t".to_string(), format!("{suite}-backports")]);
    run_install(&plan, &opts, pin)
}

/// The `VERSION_CODENAME` of an os-release file.
fn codename(os_release: &str) -> Option<&str> {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// The system's one-line sources (`/etc/apt/sources.list`) plus
/// `<suite>-backports` from `mirror`.
fn backports_sources(system: &str, mirror: &str, suite: &str) -> String {
    let mut s = system.trim_end().to_string();
    if !s.is_empty() {
        s.push('\n');
    }
    s.push_str(&format!("deb {mirror} {suite}-backports main\n"));
    s
}

/// apt options that add `<suite>-backports` (from the mirror of
/// `vm/packages.lock`) with lists of their own in a temp directory: the
/// deb822 files in `/etc/apt/sources.list.d` still apply, nothing under
/// `/etc/apt` or `/var/lib/apt/lists` is changed.
fn backports_opts(suite: &str) -> Result<Vec<String>> {
    let lock = std::fs::read_to_string(crate::root().join("vm/packages.lock"))
        .context("reading vm/packages.lock")?;
    let mirror = crate::vm::tree::Lock::parse(&lock)?.mirror;
    let dir = std::env::temp_dir().join("meshlb-apt-backports");
    let lists = dir.join("lists");
    std::fs::create_dir_all(lists.join("partial"))
        .with_context(|| format!("creating {}", lists.display()))?;
    let list = dir.join("sources.list");
    let system = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    std::fs::write(&list, backports_sources(&system, &mirror, suite))
        .with_context(|| format!("writing {}", list.display()))?;
    Ok(vec![
        "-o".into(),
        format!("Dir::Etc::sourcelist={}", list.display()),
        "-o".into(),
        format!("Dir::State::lists={}", lists.display()),
    ])
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

/// Package name to version, for the packages dpkg lists as installed.
pub type Installed = BTreeMap<String, String>;

/// Which of `pkgs` dpkg lists as installed (status `ii`), with versions.
pub fn installed(pkgs: &[&str]) -> Result<Installed> {
    let out = Cmd::new("dpkg-query")
        .args(["-W", "-f=${Package}\t${db:Status-Abbrev}\t${Version}\n"])
        .args(pkgs.iter().copied())
        .output_unchecked()
        .context("dpkg-query not available: setup supports Debian/Ubuntu only")?;
    Ok(parse_installed(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `dpkg-query -W -f='${Package}\t${db:Status-Abbrev}\t${Version}\n'`.
fn parse_installed(listing: &str) -> Installed {
    listing
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (p, st, v) = (f.next()?, f.next()?, f.next()?);
            st.starts_with("ii")
                .then(|| (p.to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Install the packages of `pkgs` that dpkg does not list as installed;
/// one that is installed stays at its version, whatever it is.
pub fn apt(pkgs: &[&str]) -> Result<()> {
    let installed = installed(pkgs)?;
    let plan = Plan::new(pkgs, &installed);
    if !plan.report()? {
        return Ok(());
    }
    update(&[])?;
    run_install(&plan, &[], |_| None)
}

/// Which wanted packages are installed (left alone) and which missing.
#[derive(Debug)]
struct Plan<'a> {
    present: Vec<&'a str>,
    missing: Vec<&'a str>,
}

impl<'a> Plan<'a> {
    fn new(wanted: &[&'a str], installed: &Installed) -> Self {
        let (present, missing) = wanted.iter().partition(|p| installed.contains_key(**p));
        Self { present, missing }
    }

    /// Says what is present and missing; whether there is anything to
    /// install (an error if so and not root).
    fn report(&self) -> Result<bool> {
        if !self.present.is_empty() {
            println!("apt: present: {}", self.present.join(" "));
        }
        if self.missing.is_empty() {
            return Ok(false);
        }
        println!("apt: missing: {}", self.missing.join(" "));
        if !is_root() {
            bail!(
                "apt packages missing and not root: run `sudo apt-get install --no-install-recommends {}`",
                self.missing.join(" ")
            );
        }
        Ok(true)
    }

    /// `apt-get` arguments after `opts`: only the missing packages, each
    /// as `name` or, where `pin` gives a version, `name=version`;
    /// `--no-remove` so that apt aborts rather than remove an installed
    /// package, and never `--allow-downgrades`.
    fn apt_get_args(&self, opts: &[String], pin: impl Fn(&str) -> Option<String>) -> Vec<String> {
        let mut args = opts.to_vec();
        args.extend(
            [
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "--no-remove",
            ]
            .map(String::from),
        );
        args.extend(self.missing.iter().map(|p| match pin(p) {
            Some(v) => format!("{p}={v}"),
            None => p.to_string(),
        }));
        args
    }
}

fn apt_get(args: &[String]) -> Cmd {
    Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(args.iter().cloned())
}

/// `apt-get update` (with `opts`: other sources or lists).
fn update(opts: &[String]) -> Result<()> {
    let mut args = opts.to_vec();
    args.extend(["update".to_string(), "-q".to_string()]);
    apt_get(&args)
        .timeout(Duration::from_secs(10 * 60))
        .run()
        .context("apt-get update failed (no network or broken sources?)")
}

/// Install the missing packages of `plan` (`pin`: a version for one).
fn run_install(plan: &Plan, opts: &[String], pin: impl Fn(&str) -> Option<String>) -> Result<()> {
    let args = plan.apt_get_args(opts, pin);
    println!("apt: apt-get {}", args.join(" "));
    apt_get(&args)
        .timeout(Duration::from_secs(15 * 60))
        .run()
        .with_context(|| format!("apt-get install {} failed", plan.missing.join(" ")))
}

/// An installed package of the QEMU source and its version: the one a
/// missing emulator must match.
fn qemu_sibling(installed: &Installed) -> Option<(&'static str, &str)> {
    QEMU_SIBLINGS
        .iter()
        .find_map(|s| installed.get(*s).map(|v| (*s, v.as_str())))
}

/// Whether apt (with `opts`) can install `pkg` at `version`.
fn apt_has(opts: &[String], pkg: &str, version: &str) -> bool {
    Cmd::new("apt-cache")
        .args(opts.iter().cloned())
        .args(["show", "--no-all-versions"])
        .arg(format!("{pkg}={version}"))
        .output()
        // `apt-cache show` exits 0 for a version it does not know, printing
        // nothing: only a record says the version is there.
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("Package:"))
        })
}

/// The first word of `text` that starts like a version (`0.13.0`,
/// `v3.8.0`), as its leading numeric components.
fn version_in(text: &str) -> Option<Vec<u64>> {
    text.split_whitespace().find_map(|w| {
        let w = w.strip_prefix('v').unwrap_or(w);
        let nums: Vec<u64> = w
            .split('.')
            .map_while(|c| {
                let digits: String = c.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .collect();
        (!nums.is_empty() && w.starts_with(|c: char| c.is_ascii_digit())).then_some(nums)
    })
}

/// `have` >= `want` (a missing component counts as 0).
fn at_least(have: &[u64], want: &str) -> bool {
    let want = version_in(want).unwrap_or_default();
    let n = have.len().max(want.len());
    let pad = |v: &[u64]| {
        (0..n)
            .map(|i| v.get(i).copied().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    pad(have) >= pad(&want)
}

fn dotted(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
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

/// bpf-linker: one at or above [`BPF_LINKER_VERSION`] is kept; otherwise
/// that version is built, linked against this toolchain's own libLLVM.
pub fn bpf_linker() -> Result<()> {
    match Cmd::new("bpf-linker").arg("--version").stdout() {
        Ok(v) => match version_in(&v) {
            Some(n) if at_least(&n, BPF_LINKER_VERSION) => {
                println!("bpf-linker: {} present", v.trim());
                return Ok(());
            }
            _ => println!(
                "bpf-linker: found `{}`, need {BPF_LINKER_VERSION} or newer",
                v.trim()
            ),
        },
        Err(_) => println!("bpf-linker: not found or broken"),
    }
    let sysroot = Cmd::new("rustc")
        .args(["--print", "sysroot"])
        .stdout()?
        .trim()
        .to_string();
    let libdir = Path::new(&sysroot).join("lib");
    let llvm = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(std::result::Result::ok)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn installed(pairs: &[(&str, &str)]) -> Installed {
        pairs
            .iter()
            .map(|(p, v)| (p.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn demo_set_is_what_the_demo_runs() {
        for p in ["nginx-light", "curl", "iproute2", "protobuf-compiler"] {
            assert!(DEMO_APT.contains(&p), "{p} missing from the demo set");
        }
        // Test, benchmark, guest and package tooling stays out of it.
        for p in [
            "docker.io",
            "etcd-server",
            "wrk",
            "haproxy",
            "gcc-aarch64-linux-gnu",
            "qemu-system-x86",
            "qemu-system-arm",
            "qemu-utils",
            "mmdebstrap",
            "lintian",
        ] {
            assert!(!DEMO_APT.contains(&p), "{p} is not the demo's");
        }
        // Each package is listed once across the sets `setup` installs.
        let mut all: Vec<&str> = DEMO_APT.iter().chain(TEST_APT).copied().collect();
        all.sort_unstable();
        let n = all.len();
        all.dedup();
        assert_eq!(all.len(), n, "a package is listed twice");
    }

    #[test]
    fn dpkg_listing_keeps_installed_only() {
        let got = parse_installed(
            "curl\tii \t7.88.1-10\nnginx-light\tun \t\nwrk\trc \t4.1.0-3\nbroken line\n\
             qemu-utils\tii \t1:8.2+dfsg-1~bpo12+1\n",
        );
        assert_eq!(
            got,
            installed(&[
                ("curl", "7.88.1-10"),
                ("qemu-utils", "1:8.2+dfsg-1~bpo12+1")
            ])
        );
    }

    #[test]
    fn present_packages_are_never_installed() {
        let have = installed(&[("curl", "7.88.1-10"), ("iproute2", "9.0.0-1")]);
        let plan = Plan::new(&["curl", "nginx-light", "iproute2", "ethtool"], &have);
        assert_eq!(plan.present, ["curl", "iproute2"]);
        assert_eq!(plan.missing, ["nginx-light", "ethtool"]);
        // Even a pin function that would pin everything only reaches
        // the missing packages.
        let args = plan.apt_get_args(&[], |_| Some("1.0".into()));
        for p in ["curl", "iproute2"] {
            assert!(
                !args
                    .iter()
                    .any(|a| a == p || a.starts_with(&format!("{p}="))),
                "{p} is installed but on the line: {args:?}"
            );
        }
        assert!(args.contains(&"nginx-light=1.0".to_string()));
        assert!(!args.iter().any(|a| a.contains("downgrade")), "{args:?}");
        assert!(args.contains(&"--no-remove".to_string()));
        // Nothing missing: no package on the line.
        let all = Plan::new(&["curl"], &have);
        assert!(all.missing.is_empty());
        assert!(!all.apt_get_args(&[], |_| None).iter().any(|a| a == "curl"));
    }

    #[test]
    fn missing_emulators_match_an_installed_sibling() {
        let bpo = "1:10.0.2+ds-2+deb13u1~bpo12+1";
        let have = installed(&[("qemu-utils", bpo), ("kmod", "30+20221128-1")]);
        assert_eq!(qemu_sibling(&have), Some(("qemu-utils", bpo)));
        let plan = Plan::new(QEMU_APT, &have);
        let (_, v) = qemu_sibling(&have).unwrap();
        let opts = ["-t".to_string(), "bookworm-backports".to_string()];
        let args = plan.apt_get_args(&opts, |_| Some(v.to_string()));
        assert_eq!(&args[..2], &opts);
        assert!(args.contains(&format!("qemu-system-x86={bpo}")), "{args:?}");
        assert!(args.contains(&format!("qemu-system-arm={bpo}")), "{args:?}");
        // The installed sibling itself is never on the line.
        assert!(
            !args.iter().any(|a| a.starts_with("qemu-utils")),
            "{args:?}"
        );
        // One emulator installed: only the other one is asked for.
        let have = installed(&[("qemu-system-x86", bpo)]);
        let plan = Plan::new(QEMU_APT, &have);
        assert_eq!(plan.missing, ["qemu-system-arm"]);
        assert_eq!(qemu_sibling(&have), Some(("qemu-system-x86", bpo)));
        // No sibling installed: no pin.
        assert_eq!(qemu_sibling(&Installed::new()), None);
    }

    #[test]
    fn backports_source() {
        let os = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_CODENAME=bookworm\n";
        assert_eq!(codename(os), Some("bookworm"));
        assert_eq!(codename("ID=debian\n"), None);
        assert_eq!(codename("VERSION_CODENAME=\n"), None);
        let m = "http://deb.debian.org/debian";
        assert_eq!(
            backports_sources("", m, "bookworm"),
            "deb http://deb.debian.org/debian bookworm-backports main\n"
        );
        assert_eq!(
            backports_sources("deb http://x/debian bookworm main\n\n", m, "bookworm"),
            "deb http://x/debian bookworm main\ndeb http://deb.debian.org/debian bookworm-backports main\n"
        );
    }

    #[test]
    fn versions() {
        assert_eq!(version_in("bpf-linker 0.13.0"), Some(vec![0, 13, 0]));
        assert_eq!(version_in("cargo-deb 3.8.0"), Some(vec![3, 8, 0]));
        assert_eq!(version_in("tool v1.2.3-rc1"), Some(vec![1, 2, 3]));
        assert_eq!(version_in("no version here"), None);
        assert_eq!(version_in(""), None);
        assert!(at_least(&[0, 13, 0], "0.13.0"));
        assert!(at_least(&[0, 14], "0.13.0"));
        assert!(at_least(&[1, 0, 0], "0.13.0"));
        assert!(!at_least(&[0, 12, 9], "0.13.0"));
        assert!(at_least(&[3, 10, 0], "3.8.0"));
        assert!(!at_least(&[3, 7], "3.8.0"));
    }
}
