//! `cargo xtask bench microbench`: runs the `microbench` bench target of
//! the root crate (bench/microbench.rs: XDP programs through
//! BPF_PROG_TEST_RUN) and files its samples, with the machine and the
//! command line, as `bench/results/<timestamp>-microbench.json`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::bench::{utc_stamp, Options};
use crate::bench_peers::{command_line, machine};
use crate::cmd::Cmd;
use crate::{compile, setup};

/// `repeat = 1` calls per case and round for each second of `--duration`
/// (5 s → 200k calls, ~0.5 s per case).
const CALLS_PER_SECOND: u32 = 40_000;

pub fn run(opt: &Options) -> Result<PathBuf> {
    anyhow::ensure!(opt.rounds >= 1, "--rounds must be at least 1");
    setup::setup()?;
    compile::build_ebpf()?;
    let stamp = utc_stamp();
    let dir = crate::root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{stamp}-microbench.json"));
    let raw = std::env::temp_dir().join(format!("meshlb-microbench-{}.json", std::process::id()));
    let calls = CALLS_PER_SECOND * opt.duration_s.max(1);
    let bench = Cmd::new("cargo")
        .args(["bench", "--bench", "microbench", "--", "--out"])
        .arg(raw.to_string_lossy())
        .args(["--rounds", &opt.rounds.to_string()])
        .args(["--calls", &calls.to_string()]);
    let exact = bench.display();
    bench.run()?;
    let text =
        std::fs::read_to_string(&raw).with_context(|| format!("reading {}", raw.display()))?;
    let _ = std::fs::remove_file(&raw);
    let mut doc: Value = serde_json::from_str(&text)?;
    doc["timestamp"] = stamp.into();
    doc["command"] = command_line().into();
    doc["bench_command"] = exact.into();
    doc["machine"] = machine();
    std::fs::write(&file, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", file.display()))?;
    crate::report::print_microbench(&doc);
    println!("\nraw samples: {}", file.display());
    Ok(file)
}
