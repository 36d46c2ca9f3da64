//! `cargo xtask vm build|test|shell`: QEMU (TCG) guests running Debian's
//! kernels, for what the host kernel cannot test — IPVS, multi-node
//! clusters, aarch64 and armv7. `tree` makes and caches the guest trees,
//! `qemu` boots one guest under a deadline; this file holds the scenario
//! table and runs it. The guest side is `vm/` (scripts, package lock).
//!
//! A guest boots the tree's kernel with a small initramfs that mounts the
//! tree (9p, read-only, under a tmpfs overlay) and a per-run share holding
//! this build's `meshlb` for the guest's arch and the `vm/` scripts, runs
//! one scenario script and prints one `MESHLB-VM-RESULT` line.

pub mod qemu;
pub mod tree;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use crate::cmd;
use crate::compile::{self, Target};
use crate::netns::{self, Netns};
use crate::procs::TempDir;
use crate::setup;

use qemu::{Guest, Nic, Outcome, Running};

#[derive(Subcommand)]
pub enum VmTask {
    /// Build (or find in the cache) the guest trees: all arches, or those named.
    Build {
        #[arg(value_enum)]
        arch: Vec<Target>,
    },
    /// Run scenarios (all, or those named), one result line each; non-zero
    /// exit if any fails.
    Test {
        scenarios: Vec<String>,
        /// Single-guest scenarios run this many at a time.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// List the scenarios and exit.
        #[arg(long)]
        list: bool,
    },
    /// Boot a guest with a shell on this terminal (the host build's meshlb
    /// at /mnt/host/meshlb).
    Shell {
        #[arg(value_enum)]
        arch: Target,
    },
}

/// One scenario: `guests` guests of `arch` running `vm/scenarios/<script>.sh`.
pub struct Scenario {
    pub name: &'static str,
    pub arch: Target,
    pub script: &'static str,
    pub args: &'static [&'static str],
    /// 1, or a cluster on one L2 segment (node names n1..nN).
    pub guests: usize,
    pub deadline: Duration,
    pub what: &'static str,
}

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "x86_64-xdp",
        arch: Target::X86_64,
        script: "xdp",
        args: &[],
        guests: 1,
        deadline: Duration::from_secs(240),
        what: "meshlb XDP (native, veth) forwards HTTP to backend namespaces",
    },
    Scenario {
        name: "x86_64-ipvs-kernel",
        arch: Target::X86_64,
        script: "ipvs-kernel",
        args: &[],
        guests: 1,
        deadline: Duration::from_secs(120),
        what: "IPVS modules load; ipvsadm adds, lists, clears a service",
    },
    Scenario {
        name: "x86_64-ipvs",
        arch: Target::X86_64,
        script: "ipvs",
        args: &[],
        guests: 1,
        deadline: Duration::from_secs(300),
        what: "meshlb IPVS data plane: schedulers, removal, restart adopts",
    },
    Scenario {
        name: "aarch64-xdp",
        arch: Target::Aarch64,
        script: "xdp",
        args: &[],
        guests: 1,
        deadline: Duration::from_secs(480),
        what: "the aarch64 cross build, as x86_64-xdp",
    },
    Scenario {
        name: "aarch64-ipvs",
        arch: Target::Aarch64,
        script: "ipvs",
        args: &[],
        guests: 1,
        deadline: Duration::from_secs(600),
        what: "the aarch64 cross build, as x86_64-ipvs",
    },
    Scenario {
        name: "armv7-xdp",
        arch: Target::Armv7,
        script: "xdp",
        args: &["jit0", "jit1"],
        guests: 1,
        deadline: Duration::from_secs(720),
        what: "the armv7 cross build, as x86_64-xdp, BPF interpreter then JIT",
    },
    Scenario {
        name: "x86_64-package",
        arch: Target::X86_64,
        script: "package",
        args: &[],
        guests: 1,
        deadline: Duration::from_secs(420),
        what: "dpkg -i the .deb, forward as the unit runs it, upgrade under load: 0 failures",
    },
    Scenario {
        name: "aarch64-package",
        arch: Target::Aarch64,
        script: "package",
        args: &[],
        guests: 1,
        deadline: Duration::from_secs(600),
        what: "the arm64 .deb, as x86_64-package",
    },
    Scenario {
        name: "x86_64-mesh3",
        arch: Target::X86_64,
        script: "mesh3",
        args: &["xdp", "etcd"],
        guests: 3,
        deadline: Duration::from_secs(360),
        what: "3 guests on one L2, etcd on n1: every task via every node's published port",
    },
    Scenario {
        name: "x86_64-mesh3-ipvs",
        arch: Target::X86_64,
        script: "mesh3",
        args: &["ipvs", "etcd"],
        guests: 3,
        deadline: Duration::from_secs(360),
        what: "mesh3 on IPVS: remote tasks SNATed (nf_tables), local ones not",
    },
];

pub const NETNS_PREFIX: &str = "mlbvm-";

pub fn run(task: VmTask) -> Result<()> {
    match task {
        VmTask::Build { arch } => {
            setup::vm_packages()?;
            let arches = if arch.is_empty() {
                vec![Target::X86_64, Target::Aarch64, Target::Armv7]
            } else {
                arch
            };
            for a in arches {
                let t = tree::ensure(a)?;
                println!(
                    "vm: {} tree {} (kernel {}, versions in versions.txt)",
                    tree::debian_arch(a),
                    t.dir.display(),
                    t.kernel.display()
                );
            }
            Ok(())
        }
        VmTask::Test {
            scenarios,
            jobs,
            list,
        } => {
            if list {
                for s in SCENARIOS {
                    println!("{:<20} {}", s.name, s.what);
                }
                return Ok(());
            }
            test(&scenarios, jobs)
        }
        VmTask::Shell { arch } => shell(arch),
    }
}

/// What a guest of one arch needs: its tree and a share with this build's
/// `meshlb` and the `vm/` scripts (and, for the package scenarios, the
/// arch's .deb in two revisions: `deb/1/`, `deb/2/`).
pub struct ArchKit {
    pub tree: tree::Tree,
    pub share: TempDir,
}

pub fn kit(arch: Target, debs: bool) -> Result<ArchKit> {
    kit_with(arch, None, debs)
}

/// [`kit`] with a prebuilt `meshlb` for `arch` (no cargo call), or built
/// when `None`.
pub fn kit_with(arch: Target, meshlb: Option<&Path>, debs: bool) -> Result<ArchKit> {
    let tree = tree::ensure(arch)?;
    let t = Instant::now();
    // Release, as packaged: the package scenarios reuse the build, and TCG
    // guests run optimised code much faster.
    let bin = match meshlb {
        Some(b) => b.to_path_buf(),
        None => compile::build(arch, true)?,
    };
    println!(
        "vm: meshlb for {} ready in {:.1}s",
        arch.triple(),
        t.elapsed().as_secs_f64()
    );
    let share = TempDir::new(&format!("meshlb-vm-{}", tree::debian_arch(arch)))?;
    let dst = share.path().join("meshlb");
    if std::fs::hard_link(&bin, &dst).is_err() {
        std::fs::copy(&bin, &dst).with_context(|| format!("copying {}", bin.display()))?;
    }
    if debs {
        for rev in [1, 2] {
            let dir = crate::package::out_dir().join(format!("rev{rev}"));
            let deb = crate::package::package(arch, rev, &dir)?;
            let to = share.path().join(format!("deb/{rev}"));
            std::fs::create_dir_all(&to)?;
            let dst = to.join(deb.file_name().context("deb without a name")?);
            if std::fs::hard_link(&deb, &dst).is_err() {
                std::fs::copy(&deb, &dst).with_context(|| format!("copying {}", deb.display()))?;
            }
        }
    }
    for sub in ["guest", "scenarios"] {
        let (from, to) = (
            crate::root().join("vm").join(sub),
            share.path().join("vm").join(sub),
        );
        std::fs::create_dir_all(&to)?;
        for e in std::fs::read_dir(&from)? {
            let e = e?;
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(ArchKit { tree, share })
}

pub fn logdir() -> Result<PathBuf> {
    let d = compile::target_dir().join("vm/logs");
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn test(names: &[String], jobs: usize) -> Result<()> {
    setup::require_root("vm test")?;
    let t0 = Instant::now();
    let mut chosen: Vec<&Scenario> = Vec::new();
    for n in names {
        let s = SCENARIOS
            .iter()
            .find(|s| s.name == n)
            .with_context(|| format!("no scenario {n} (see `cargo xtask vm test --list`)"))?;
        chosen.push(s);
    }
    if chosen.is_empty() {
        chosen = SCENARIOS.iter().collect();
    }
    setup::vm_packages()?;
    let mut kits: Vec<(Target, ArchKit)> = Vec::new();
    for s in &chosen {
        if !kits.iter().any(|(a, _)| *a == s.arch) {
            let debs = chosen
                .iter()
                .any(|c| c.arch == s.arch && c.script == "package");
            kits.push((s.arch, kit(s.arch, debs)?));
        }
    }
    let kit_of = |a: Target| &kits.iter().find(|(k, _)| *k == a).expect("kit").1;
    println!(
        "vm: trees and binaries ready in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let logs = logdir()?;
    let _lock = netns::lock_prefix(NETNS_PREFIX)?;
    netns::remove_stale(NETNS_PREFIX)?;

    let mut results: Vec<(&Scenario, Outcome)> = Vec::new();
    // Single-guest scenarios, `jobs` at a time; clusters alone afterwards.
    let mut queue: Vec<&Scenario> = chosen.iter().copied().filter(|s| s.guests == 1).collect();
    queue.reverse();
    let mut active: Vec<(&Scenario, Running)> = Vec::new();
    while !queue.is_empty() || !active.is_empty() {
        cmd::check_interrupted()?;
        while active.len() < jobs.max(1) {
            let Some(s) = queue.pop() else { break };
            let k = kit_of(s.arch);
            let g = guest(s, k, "vm", vec![]);
            println!("vm: {} starting ({})", s.name, s.what);
            active.push((s, Running::start(&g, s.name, &logs, None)?));
        }
        let mut i = 0;
        while i < active.len() {
            if active[i].1.finished() {
                let (s, r) = active.remove(i);
                let o = r.wait()?;
                report(s, &o);
                results.push((s, o));
            } else {
                i += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for s in chosen.iter().filter(|s| s.guests > 1) {
        let o = cluster(s, kit_of(s.arch), &logs)?;
        report(s, &o);
        results.push((s, o));
    }

    println!("\nvm scenarios:");
    for (s, o) in &results {
        println!(
            "  {:<20} {} {:>6.1}s  {}",
            s.name,
            if o.pass { "PASS" } else { "FAIL" },
            o.took.as_secs_f64(),
            o.detail
        );
    }
    println!("vm: total {:.1}s", t0.elapsed().as_secs_f64());
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, o)| !o.pass)
        .map(|(s, _)| s.name)
        .collect();
    if !failed.is_empty() {
        bail!(
            "vm scenarios failed: {} (consoles in {})",
            failed.join(", "),
            logs.display()
        );
    }
    Ok(())
}

fn guest<'a>(s: &'a Scenario, k: &'a ArchKit, node: &str, nics: Vec<Nic>) -> Guest<'a> {
    Guest {
        arch: s.arch,
        tree: &k.tree,
        share: k.share.path(),
        scenario: s.name,
        script: s.script,
        node: node.to_string(),
        args: s.args,
        // A meshlb map set is ~220 MB; the xdp scenario holds two.
        mem_mb: if s.guests == 1 { 1536 } else { 1024 },
        smp: 1,
        nics,
        out: None,
        deadline: s.deadline,
    }
}

/// One result line per scenario, with the console's tail on failure.
fn report(s: &Scenario, o: &Outcome) {
    let verdict = if o.pass { "PASS" } else { "FAIL" };
    println!(
        "vm: {} {verdict} in {:.1}s: {}",
        s.name,
        o.took.as_secs_f64(),
        o.detail
    );
    if !o.pass {
        println!(
            "----- {} (last 60 lines) -----\n{}\n-----",
            o.console.display(),
            qemu::console_tail(&o.console, 60)
        );
    }
}

/// A cluster scenario: `s.guests` guests on one L2 segment; n1 also gets
/// a second NIC on the segment for the client namespace.
fn cluster(s: &Scenario, k: &ArchKit, logs: &Path) -> Result<Outcome> {
    run_cluster(s.name, s.guests, true, logs, |node, nics| {
        guest(s, k, node, nics)
    })
}

/// `guests` guests (n1..nN) on one L2 segment: a QEMU socket netdev on a
/// multicast group inside a namespace of our own (so nothing leaves it);
/// with `client_nic`, n1 gets a second NIC (MAC `…:64`) on the segment.
/// `make` gives each node's guest. Passes when every guest passes; the
/// first failure stops the others.
pub fn run_cluster<'a>(
    name: &str,
    guests: usize,
    client_nic: bool,
    logs: &Path,
    make: impl Fn(&str, Vec<Nic>) -> Guest<'a>,
) -> Result<Outcome> {
    let t = Instant::now();
    let ns = Netns::create(&format!("{NETNS_PREFIX}{}", std::process::id()))?;
    ns.ip(&["route", "add", "224.0.0.0/4", "dev", "lo"])?;
    let mcast = "230.0.0.1:47000".to_string();
    let names: Vec<String> = (1..=guests).map(|i| format!("n{i}")).collect();
    let mut running = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let mut nics = vec![Nic {
            mcast: mcast.clone(),
            mac: format!("52:54:00:00:01:{:02x}", i + 1),
        }];
        if i == 0 && client_nic {
            nics.push(Nic {
                mcast: mcast.clone(),
                mac: "52:54:00:00:01:64".into(),
            });
        }
        let g = make(n, nics);
        println!("vm: {name} starting guest {n}");
        running.push(Some(Running::start(
            &g,
            &format!("{name}-{n}"),
            logs,
            Some(&ns.name),
        )?));
    }
    let mut outcomes: Vec<Option<Outcome>> = names.iter().map(|_| None).collect();
    loop {
        cmd::check_interrupted()?;
        for (i, slot) in running.iter_mut().enumerate() {
            if slot.as_mut().is_some_and(qemu::Running::finished) {
                let o = slot.take().expect("running").wait()?;
                println!(
                    "vm: {name} guest {}: {} {}",
                    names[i],
                    if o.pass { "PASS" } else { "FAIL" },
                    o.detail
                );
                outcomes[i] = Some(o);
            }
        }
        if outcomes.iter().flatten().any(|o| !o.pass) {
            for r in running.iter_mut().filter_map(Option::take) {
                println!("vm: stopping {} (another guest failed)", r.name());
                r.kill();
            }
        }
        if running.iter().all(Option::is_none) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(ns);
    let failed: Vec<(usize, &Outcome)> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.as_ref().map(|o| (i, o)))
        .filter(|(_, o)| !o.pass)
        .collect();
    let first = outcomes[0].as_ref();
    Ok(match failed.first() {
        Some((i, o)) => Outcome {
            pass: false,
            detail: format!("{}: {}", names[*i], o.detail),
            console: o.console.clone(),
            took: t.elapsed(),
        },
        None => Outcome {
            pass: outcomes.iter().all(std::option::Option::is_some),
            detail: first.map(|o| o.detail.clone()).unwrap_or_default(),
            console: first.map(|o| o.console.clone()).unwrap_or_default(),
            took: t.elapsed(),
        },
    })
}

fn shell(arch: Target) -> Result<()> {
    setup::vm_packages()?;
    let k = kit(arch, false)?;
    let s = Scenario {
        name: "shell",
        arch,
        script: "shell",
        args: &[],
        guests: 1,
        deadline: Duration::from_secs(24 * 3600),
        what: "",
    };
    let g = guest(&s, &k, "shell", vec![]);
    qemu::interactive(&g)
}
