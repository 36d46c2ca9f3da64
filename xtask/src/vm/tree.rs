//! Guest trees: a Debian userland and kernel per architecture, unpacked by
//! mmdebstrap from `vm/packages.lock`, plus the small initramfs that mounts
//! it over 9p. Cached under `target/vm/<arch>-<hash>`, the hash covering the
//! lock file and the initramfs's init; a tree is rebuilt only when they
//! change.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::Cmd;
use crate::compile::{self, Target};

/// Bumped when the way a tree is assembled changes (not its packages).
const TREE_FORMAT: u32 = 1;
/// Modules stage 1 loads (with their dependencies) to mount the tree.
const STAGE1_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// The parsed `vm/packages.lock`.
#[derive(Debug, PartialEq, Eq)]
pub struct Lock {
    pub mirror: String,
    pub suite: String,
    /// (Debian architecture, packages).
    pub arches: Vec<(String, Vec<String>)>,
}

impl Lock {
    pub fn parse(text: &str) -> Result<Self> {
        let (mut mirror, mut suite, mut arches) = (None, None, Vec::new());
        for (n, line) in text.lines().enumerate() {
            let mut words = line.split('#').next().unwrap_or("").split_whitespace();
            let Some(key) = words.next() else { continue };
            let rest: Vec<String> = words.map(str::to_string).collect();
            match key {
                "mirror" | "suite" if rest.len() != 1 => {
                    bail!("vm/packages.lock line {}: `{key}` takes one value", n + 1)
                }
                "mirror" => mirror = rest.into_iter().next(),
                "suite" => suite = rest.into_iter().next(),
                arch if rest.is_empty() => {
                    bail!(
                        "vm/packages.lock line {}: `{arch}` lists no packages",
                        n + 1
                    )
                }
                arch => arches.push((arch.to_string(), rest)),
            }
        }
        Ok(Self {
            mirror: mirror.context("vm/packages.lock has no `mirror` line")?,
            suite: suite.context("vm/packages.lock has no `suite` line")?,
            arches,
        })
    }

    pub fn packages(&self, arch: &str) -> Result<&[String]> {
        self.arches
            .iter()
            .find(|(a, _)| a == arch)
            .map(|(_, p)| p.as_slice())
            .with_context(|| format!("vm/packages.lock has no `{arch}` line"))
    }
}

/// Debian's name for a build target's architecture.
pub fn debian_arch(t: Target) -> &'static str {
    match t {
        Target::X86_64 => "amd64",
        Target::Aarch64 => "arm64",
        Target::Armv7 => "armhf",
    }
}

/// A built guest tree.
pub struct Tree {
    /// `target/vm/<arch>-<hash>`.
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The unpacked Debian root (shared read-only as 9p tag `root`).
    pub root: PathBuf,
}

impl Tree {
    fn at(dir: PathBuf) -> Result<Self> {
        let root = dir.join("root");
        let boot = root.join("boot");
        let kernel = std::fs::read_dir(&boot)
            .with_context(|| format!("reading {}", boot.display()))?
            .filter_map(std::result::Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
        Ok(Self {
            initrd: dir.join("initrd.cpio"),
            kernel,
            root,
            dir,
        })
    }
}

fn cache_dir() -> PathBuf {
    compile::target_dir().join("vm")
}

/// sha256 of the lock file, stage 1's init and the format version (first
/// 16 hex digits).
fn key(lock_text: &str, stage1: &str) -> Result<String> {
    let tmp = cache_dir().join(format!(".key-{}", std::process::id()));
    std::fs::create_dir_all(cache_dir())?;
    std::fs::write(&tmp, format!("{TREE_FORMAT}\n{lock_text}\n{stage1}"))?;
    let out = Cmd::new("sha256sum").arg(tmp.to_string_lossy()).stdout();
    let _ = std::fs::remove_file(&tmp);
    Ok(out?.chars().take(16).collect())
}

/// The tree for `target`, built if the cache has none for the current lock
/// file.
pub fn ensure(target: Target) -> Result<Tree> {
    let root = crate::root();
    let lock_text = std::fs::read_to_string(root.join("vm/packages.lock"))
        .context("reading vm/packages.lock")?;
    let stage1 = std::fs::read_to_string(root.join("vm/initramfs-init"))
        .context("reading vm/initramfs-init")?;
    let lock = Lock::parse(&lock_text)?;
    let arch = debian_arch(target);
    let pkgs = lock.packages(arch)?;
    let dir = cache_dir().join(format!("{arch}-{}", key(&lock_text, &stage1)?));
    if dir.join("complete").exists() {
        println!("vm: {arch} tree cached at {}", dir.display());
        return Tree::at(dir);
    }
    let t = Instant::now();
    let tmp = cache_dir().join(format!(".{arch}-building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let r = build(&lock, arch, pkgs, &tmp, &stage1);
    if let Err(e) = r {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("building the {arch} guest tree")));
    }
    // Older trees of this arch are stale now.
    if let Ok(rd) = std::fs::read_dir(cache_dir()) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!("{arch}-")) && e.path() != dir {
                println!("vm: removing stale tree {}", e.path().display());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("moving {} to {}", tmp.display(), dir.display()))?;
    println!(
        "vm: {arch} tree built in {:.1}s: {}",
        t.elapsed().as_secs_f64(),
        dir.display()
    );
    Tree::at(dir)
}

fn build(lock: &Lock, arch: &str, pkgs: &[String], dir: &Path, stage1: &str) -> Result<()> {
    let root = dir.join("root");
    Cmd::new("mmdebstrap")
        .args(["--variant=extract", "--quiet", "--skip=cleanup/apt/cache"])
        .arg(format!("--architectures={arch}"))
        .arg(format!("--include={}", pkgs.join(",")))
        .arg(&lock.suite)
        .arg(root.to_string_lossy())
        .arg(format!("deb {} {} main", lock.mirror, lock.suite))
        .timeout(Duration::from_secs(15 * 60))
        .run()
        .context("mmdebstrap (network to the Debian mirror?)")?;
    register_packages(&root)?;
    let kver = kernel_version(&root)?;
    // The extract variant runs no maintainer scripts: index the modules.
    Cmd::new("depmod")
        .args(["-b"])
        .arg(root.to_string_lossy())
        .arg(&kver)
        .timeout(Duration::from_secs(120))
        .output()
        .context("depmod")?;
    write_initramfs(&root, &kver, stage1, &dir.join("initrd.cpio"))?;
    let versions = Cmd::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f=${Package} ${Version}\n"])
        .stdout()
        .unwrap_or_else(|e| format!("(dpkg-query failed: {e})\n"));
    std::fs::write(
        dir.join("versions.txt"),
        format!("kernel {kver}\n{versions}"),
    )?;
    std::fs::write(dir.join("complete"), "")?;
    Ok(())
}

/// The extract variant unpacks without registering: write the dpkg
/// status of what it unpacked (from the downloaded .debs, which are then
/// dropped), so `dpkg -i` in a guest checks dependencies against the
/// tree's real packages.
fn register_packages(root: &Path) -> Result<()> {
    let cache = root.join("var/cache/apt/archives");
    let mut status = String::new();
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&cache)
        .with_context(|| format!("reading {}", cache.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    debs.sort();
    for deb in &debs {
        let control = Cmd::new("dpkg-deb")
            .arg("--field")
            .arg(deb.to_string_lossy())
            .stdout()?;
        for line in control.lines() {
            status.push_str(line);
            status.push('\n');
            if line.starts_with("Package:") {
                status.push_str("Status: install ok installed\n");
            }
        }
        status.push('\n');
        std::fs::remove_file(deb)?;
    }
    anyhow::ensure!(
        !debs.is_empty(),
        "mmdebstrap left no .debs in {}",
        cache.display()
    );
    std::fs::write(root.join("var/lib/dpkg/status"), status)?;
    Ok(())
}

fn kernel_version(root: &Path) -> Result<String> {
    let m = root.join("lib/modules");
    let mut v: Vec<String> = std::fs::read_dir(&m)
        .with_context(|| format!("reading {}", m.display()))?
        .filter_map(std::result::Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match v.len() {
        1 => Ok(v.remove(0)),
        _ => bail!("expected one kernel in {}, found {v:?}", m.display()),
    }
}

/// The initramfs: busybox (static, the guest's), stage 1's init, and the
/// modules it loads in dependency order (`modules/order`).
fn write_initramfs(root: &Path, kver: &str, stage1: &str, out: &Path) -> Result<()> {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut order = String::new();
    for m in STAGE1_MODULES {
        let deps = Cmd::new("modprobe")
            .arg("-d")
            .arg(root.to_string_lossy())
            .args(["-S", kver, "--show-depends", m])
            .stdout()
            .with_context(|| format!("resolving module {m}"))?;
        for line in deps.lines() {
            // "insmod /path/x.ko [params]" or "builtin x"
            let Some(path) = line.strip_prefix("insmod ") else {
                continue;
            };
            let path = path.split_whitespace().next().unwrap_or_default();
            let name = Path::new(path)
                .file_name()
                .and_then(|n| n.to_str())
                .context("module path")?
                .to_string();
            if order.lines().any(|l| l == name) {
                continue;
            }
            let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
            files.push((format!("modules/{name}"), data));
            let _ = writeln!(order, "{name}");
        }
    }
    files.push(("modules/order".into(), order.into_bytes()));
    let busybox = root.join("bin/busybox");
    files.push((
        "bin/busybox".into(),
        std::fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?,
    ));
    files.push(("init".into(), stage1.as_bytes().to_vec()));
    let dirs = [
        "bin", "modules", "dev", "proc", "sys", "lower", "rw", "newroot",
    ];
    std::fs::write(out, cpio_newc(&dirs, &files))
        .with_context(|| format!("writing {}", out.display()))
}

/// A `newc` cpio archive (what the kernel unpacks as initramfs): the
/// directories, then the files (all executable: busybox and init need it,
/// the rest does not mind).
fn cpio_newc(dirs: &[&str], files: &[(String, Vec<u8>)]) -> Vec<u8> {
    fn entry(buf: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            name.len() + 1,
            0, // check
        );
        buf.extend_from_slice(header.as_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.push(0);
        buf.resize(buf.len().next_multiple_of(4), 0);
        buf.extend_from_slice(data);
        buf.resize(buf.len().next_multiple_of(4), 0);
    }
    let mut buf = Vec::new();
    let mut ino = 1;
    for d in dirs {
        entry(&mut buf, ino, d, 0o040_755, &[]);
        ino += 1;
    }
    for (name, data) in files {
        entry(&mut buf, ino, name, 0o100_755, data);
        ino += 1;
    }
    entry(&mut buf, ino, "TRAILER!!!", 0, &[]);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_lock_file() {
        let l = Lock::parse(
            "# c\nmirror http://m/debian\nsuite bookworm\n\namd64 linux-image-amd64 busybox-static # k\n",
        )
        .unwrap();
        assert_eq!(l.mirror, "http://m/debian");
        assert_eq!(l.suite, "bookworm");
        assert_eq!(
            l.packages("amd64").unwrap(),
            ["linux-image-amd64", "busybox-static"]
        );
        assert!(l.packages("arm64").is_err());
        for bad in [
            "suite s\namd64 x",
            "mirror m\namd64 x",
            "mirror m\nsuite s\namd64",
            "mirror a b\nsuite s",
        ] {
            assert!(Lock::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_checked_in_lock_has_every_arch() {
        let text = std::fs::read_to_string(crate::root().join("vm/packages.lock")).unwrap();
        let l = Lock::parse(&text).unwrap();
        for t in [Target::X86_64, Target::Aarch64, Target::Armv7] {
            let p = l.packages(debian_arch(t)).unwrap();
            assert!(p.iter().any(|p| p.starts_with("linux-image-")), "{p:?}");
            assert!(p.iter().any(|p| p == "busybox-static"), "{p:?}");
        }
    }

    #[test]
    fn cpio_layout() {
        let a = cpio_newc(&["bin"], &[("init".into(), b"abc".to_vec())]);
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        // header 110 + "bin\0" (4) = 114 -> padded 116; second entry starts there
        assert_eq!(&a[116..122], b"070701");
        let t = a.windows(10).position(|w| w == b"TRAILER!!!");
        assert!(t.is_some());
    }
}
