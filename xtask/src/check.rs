//! `cargo xtask test`: what CI runs — setup, eBPF build, fmt, clippy, the
//! whole workspace's tests, the three .deb packages checked (`cargo xtask
//! package --check`) with the one-round smoke of `cargo xtask bench vm`
//! beside them, and the QEMU guest scenarios (`cargo xtask vm test`), each
//! under a header, with timings.

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
    // verified (the package scenarios below install them in guests). The
    // `cargo xtask bench vm` smoke (one round of 1 s per path, x86_64, every
    // part) runs beside the ARM builds, whose fat-LTO link keeps one core
    // busy and leaves the other idle; it needs only the x86_64 release
    // binary, built first.
    s.step(
        "packages (cargo xtask package --check), bench vm smoke alongside",
        packages_and_smoke,
    )?;
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

/// The packages step: the x86_64 .deb, then the bench vm smoke in a child
/// process (`xtask bench-vm-smoke`, its output in
/// `target/bench-vm-smoke.log`) while the aarch64 and armv7 .debs build;
/// both must succeed.
fn packages_and_smoke() -> Result<()> {
    use crate::compile::Target;
    use crate::package;
    let deb = package::package(Target::X86_64, 1, &package::out_dir())?;
    package::check(Target::X86_64, &deb)?;
    let bin = compile::target_dir().join("release/meshlb");
    let log = compile::target_dir().join("bench-vm-smoke.log");
    let _ = std::fs::remove_file(&log);
    let mut smoke = Cmd::new(std::env::current_exe()?.to_string_lossy())
        .arg("bench-vm-smoke")
        .arg("--meshlb")
        .arg(bin.to_string_lossy())
        .spawn_background("bench vm smoke", &log)?;
    let rest: Result<()> = [Target::Aarch64, Target::Armv7]
        .into_iter()
        .try_for_each(|t| {
            let deb = package::package(t, 1, &package::out_dir())?;
            package::check(t, &deb)
        });
    let deadline = Instant::now() + std::time::Duration::from_secs(40 * 60);
    println!("waiting for the bench vm smoke ({})", log.display());
    let status = loop {
        if let Some(st) = smoke.exited() {
            break Some(st);
        }
        if Instant::now() >= deadline || crate::cmd::interrupted() {
            smoke.stop(std::time::Duration::from_secs(10));
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let ok = status.is_some_and(|s| s.success());
    println!(
        "----- bench vm smoke ({}) -----\n{}\n-----",
        log.display(),
        smoke.log_tail(if ok { 16 } else { 80 })
    );
    rest?;
    anyhow::ensure!(
        ok,
        "bench vm smoke failed ({}; log {})",
        status.map_or("no exit within 40 min".to_string(), |s| s.to_string()),
        log.display()
    );
    Ok(())
}
