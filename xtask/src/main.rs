//! meshlb's developer tasks (`cargo xtask ...`): setup, eBPF and host
//! builds, the CI test run, the netns demo and the data-plane and
//! control-plane benchmarks.

#![forbid(unsafe_code)]

mod bench;
mod bench_control_plane;
mod bench_peers;
mod bench_vm;
mod check;
mod cmd;
mod compile;
mod demo;
mod loadgen;
mod microbench;
mod netns;
mod package;
mod procs;
mod report;
mod report_vm;
mod setup;
mod vm;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "meshlb developer tasks"
)]
struct Cli {
    /// Echo every command, probes included (on by default when CI is set).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    cmd: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check and install every prerequisite (apt packages, rustup component
    /// and targets, bpf-linker, bpffs, QEMU, package tools); idempotent,
    /// never changes an installed package.
    Setup,
    /// Build the XDP object (target/bpfel-unknown-none/release/meshlb-ebpf).
    BuildEbpf,
    /// Build the eBPF object, then the `meshlb` binary.
    Build {
        #[arg(long, value_enum, default_value = "x86_64")]
        target: compile::Target,
        #[arg(long)]
        release: bool,
    },
    /// What CI runs: setup, eBPF build, fmt, clippy, all tests (as root).
    Test,
    /// Three nginx backends behind a meshlb VIP in network namespaces
    /// (installs only what the demo needs).
    Demo {
        /// Number of requests to send to the VIP.
        #[arg(long)]
        requests: Option<usize>,
        /// Skip meshlb: check the topology and backends through plain
        /// kernel forwarding only.
        #[arg(long)]
        kernel_only: bool,
        /// Use this meshlb binary instead of building one.
        #[arg(long, value_name = "PATH")]
        meshlb: Option<PathBuf>,
    },
    /// End-to-end benchmarks in network namespaces (results in bench/results).
    Bench {
        #[arg(value_enum, default_value = "dataplane")]
        suite: bench::Suite,
        /// Rounds per scenario and path (interleaved A B A B).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds per run (wrk, paced client, UDP sender); microbench:
        /// 40k calls per case and round per second.
        #[arg(long, default_value_t = 5)]
        duration: u32,
        /// wrk connections.
        #[arg(long, default_value_t = 32)]
        connections: u32,
        /// Use this meshlb binary instead of building a release one.
        #[arg(long, value_name = "PATH")]
        meshlb: Option<PathBuf>,
        /// control-plane: service counts to sync (10 tasks each).
        #[arg(long, default_value = "100,1000,10000")]
        sizes: String,
        /// control-plane: single etcd changes timed per size.
        #[arg(long, default_value_t = 200)]
        changes: usize,
        /// vm: the guests' architectures (default: x86_64 and aarch64).
        #[arg(long, value_enum, value_delimiter = ',')]
        arch: Vec<compile::Target>,
    },
    /// Debian packages: target/package/meshlb_<version>_<arch>.deb (cargo-deb).
    Package {
        /// One architecture (default: all three).
        #[arg(long, value_enum)]
        target: Option<compile::Target>,
        /// Debian revision (the part after the `-` of the version).
        #[arg(long, default_value_t = 1)]
        revision: u32,
        /// Also check each package: contents, architecture, lintian,
        /// `systemd-analyze verify`.
        #[arg(long)]
        check: bool,
    },
    /// QEMU guests (Debian kernels, TCG): IPVS, multi-node and ARM tests.
    Vm {
        #[command(subcommand)]
        task: vm::VmTask,
    },
    /// `cargo xtask bench vm`'s one-round smoke (x86_64), as `cargo xtask
    /// test` runs it beside the package builds.
    #[command(hide = true)]
    BenchVmSmoke {
        /// The prebuilt release meshlb (no cargo call: the package builds
        /// hold cargo's lock meanwhile).
        #[arg(long, value_name = "PATH")]
        meshlb: PathBuf,
    },
    /// The load generators of `bench dataplane`, run by it inside a
    /// namespace: `paced`, `udp-blast`.
    #[command(hide = true)]
    BenchHelper {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// The workspace root (parent of xtask/).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn main() {
    let cli = Cli::parse();
    cmd::set_verbose(cli.verbose || std::env::var_os("CI").is_some());
    let start = Instant::now();
    let r = run(cli.cmd);
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        eprintln!("(after {:.1}s)", start.elapsed().as_secs_f64());
        std::process::exit(1);
    }
}

fn run(mut task: Task) -> Result<()> {
    cmd::install_signal_handlers()?;
    // Paths given on the command line are relative to where we were started.
    if let Task::Demo {
        meshlb: Some(p), ..
    }
    | Task::Bench {
        meshlb: Some(p), ..
    } = &mut task
    {
        *p = std::path::absolute(&*p)?;
    }
    // The load generators also run inside QEMU guests (`bench vm`), where
    // the workspace does not exist.
    if !matches!(task, Task::BenchHelper { .. }) {
        std::env::set_current_dir(root())?;
    }
    match task {
        Task::Setup => setup::setup(),
        Task::BuildEbpf => compile::build_ebpf().map(drop),
        Task::Build { target, release } => compile::build(target, release).map(drop),
        Task::Test => check::test(),
        Task::Package {
            target,
            revision,
            check,
        } => {
            let targets = target.map_or(package::TARGETS.to_vec(), |t| vec![t]);
            for t in targets {
                let deb = package::package(t, revision, &package::out_dir())?;
                if check {
                    package::check(t, &deb)?;
                }
            }
            Ok(())
        }
        Task::Demo {
            requests,
            kernel_only,
            meshlb,
        } => demo::demo(requests, kernel_only, meshlb),
        Task::Bench {
            suite,
            rounds,
            duration,
            connections,
            meshlb,
            sizes,
            changes,
            arch,
        } => bench::bench(
            suite,
            &bench::Options {
                rounds,
                duration_s: duration,
                connections,
                meshlb,
                sizes,
                changes,
                arches: if arch.is_empty() {
                    vec![compile::Target::X86_64, compile::Target::Aarch64]
                } else {
                    arch
                },
            },
        ),
        Task::Vm { task } => vm::run(task),
        Task::BenchVmSmoke { meshlb } => bench_vm::smoke(&meshlb),
        Task::BenchHelper { args } => loadgen::helper(&args),
    }
}
