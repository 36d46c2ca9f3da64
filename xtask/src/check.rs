//! `cargo xtask test`: what CI runs — setup, eBPF build, fmt, clippy, the
//! whole workspace's tests, the three .deb packages checked (`cargo xtask
//! package --check`) and the QEMU guest scenarios (`cargo xtask vm test`),
//! each under a header, with timings.

use std::time::Instant;

use anyhow::Result;

use crate::cmd::Cmd;
use crate::{compile, setup};

struct Steps {
    start: Instant,
    n: usize,
    total: usize,
}

impl Steps {
    fn step<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.n += 1;
        println!("\n==> [{}/{}] {name}", self.n, self.total);
        let t = Instant::now();
        let r = f();
        let ok = if r.is_ok() { "ok" } else { "FAILED" };
        println!("<== {name}: {ok} in {:.1}s", t.elapsed().as_secs_f64());
        r
    }
}

pub fn test() -> Result<()> {
    setup::require_root("test")?;
    let mut s = Steps {
        start: Instant::now(),
        n: 0,
        total: 7,
    };
    let r = run_all(&mut s);
    println!(
        "\ntotal wall time: {:.1}s ({})",
        s.start.elapsed().as_secs_f64(),
        if r.is_ok() { "passed" } else { "FAILED" }
    );
    r
}

fn run_all(s: &mut Steps) -> Result<()> {
    if std::env::var_os("CI").is_some() {
        println!(
            "CI={} (propagated to every step)",
            std::env::var("CI").unwrap_or_default()
        );
    }
    s.step("setup", setup::setup)?;
    s.step("build eBPF object", compile::build_ebpf)?;
    s.step("cargo fmt --check", || {
        Cmd::new("cargo")
            .args(["fmt", "--all", "--", "--check"])
            .run()?;
        // The eBPF crate is outside the workspace; check its formatting too.
        Cmd::new("cargo")
            .args([
                "fmt",
                "--all",
                "--manifest-path",
                "ebpf/meshlb-ebpf/Cargo.toml",
            ])
            .args(["--", "--check"])
            .dir(crate::root())
            .run()
    })?;
    s.step("cargo clippy", || {
        Cmd::new("cargo")
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .run()?;
        // The eBPF crate is outside the workspace: clippy it for its own
        // target, as it is built.
        compile::clippy_ebpf()
    })?;
    s.step("cargo test", || {
        // Tests are parallel-safe (own netns, bpffs dir, ports each) but
        // mostly wait on the kernel and child processes: one test thread
        // per core keeps a 2-core box responsive without serialising.
        let threads = std::env::var("RUST_TEST_THREADS").unwrap_or_else(|_| {
            std::thread::available_parallelism()
                .map_or(2, std::num::NonZero::get)
                .max(2)
                .to_string()
        });
        Cmd::new("cargo")
            .args(["test", "--workspace", "--no-fail-fast", "--"])
            .arg(format!("--test-threads={threads}"))
            .run()
    })?;
    // The .deb of every arch: contents, architecture, lintian, the unit
    // verified (the package scenarios below install them in guests).
    s.step("packages (cargo xtask package --check)", || {
        crate::package::all_checked().map(drop)
    })?;
    // IPVS, the 3-node cluster and the ARM builds run in QEMU guests: they
    // never skip; a missing tool or tree is an error.
    s.step("vm scenarios (cargo xtask vm test)", || {
        crate::vm::run(crate::vm::VmTask::Test {
            scenarios: Vec::new(),
            jobs: 2,
            list: false,
        })
    })?;
    Ok(())
}
