//! `cargo xtask bench vm [--arch A] [--rounds N]`: the data-plane
//! benchmark inside QEMU guests (`vm/`), where the peers the host kernel
//! lacks exist — IPVS, so meshlb's IPVS data plane and a kube-proxy-style
//! `ipvsadm` table — and on other architectures (aarch64, a Raspberry Pi's).
//!
//! Per arch, three boots (the guest side is `vm/scenarios/bench*.sh`):
//!
//! * **dataplane**: one guest (2 GiB, 2 vCPUs), one lane namespace per
//!   path (direct, meshlb XDP native and generic, meshlb IPVS, `ipvsadm`
//!   rr/masquerade, iptables DNAT, HAProxy), all up at once, paths
//!   interleaved in every round: keep-alive and connection-per-request
//!   (wrk), UDP (the socket blaster of [`crate::loadgen`], datagrams counted
//!   at the backend) and latency at a fixed rate (the paced client);
//! * **mesh**: three guests on one L2 segment, a client on n3 reaching a
//!   task on n2 through n1's published port: meshlb XDP (SNAT), meshlb IPVS
//!   (+ nf_tables masquerade), iptables DNAT + MASQUERADE, and direct;
//! * **control plane**: a guest sized like a Pi (1 GiB, 2 vCPUs): sync of
//!   1,000 services × 10 tasks after SIGHUP, and the daemon's RSS.
//!
//! The guests write raw outputs (wrk's text, the helpers' JSON) to a
//! writable 9p share; this module turns them into samples. A run that
//! failed, or whose file is missing, is a sample with `ok: false` and the
//! reason — never dropped. Results: `bench/results/<stamp>-vm-<arch>.json`;
//! the report's "Under QEMU" section reads the newest per arch.
//!
//! `MESHLB_BENCH_VM_PARTS` (comma-separated `dataplane,mesh,cp`) limits a
//! run to some parts, to re-run one: the others are taken from the newest
//! results of that arch (the file says which, under `"merged"`), or
//! reported as not run (failed) when there are none; the smoke never
//! merges.
//!
//! QEMU runs with TCG here (no KVM on the build machines): absolute figures
//! are emulation-bound and only the ratios between paths of one run mean
//! anything; the results and the report say so.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::bench::{parse_wrk, utc_stamp};
use crate::cmd::Cmd;
use crate::compile::{self, Target};
use crate::netns;
use crate::procs::TempDir;
use crate::setup;
use crate::vm::{self, qemu};

/// The single-guest paths, in lane order (`vm/scenarios/bench.sh`).
pub const PATHS: &[&str] = &[
    "direct",
    "meshlb-native",
    "meshlb-generic",
    "meshlb-ipvs",
    "ipvsadm",
    "iptables",
    "haproxy",
];
/// The mesh case's paths (`vm/scenarios/bench-mesh.sh`): XDP phase, then
/// IPVS phase (iptables measured in both).
pub const MESH_PATHS: &[&str] = &[
    "direct",
    "meshlb-xdp",
    "iptables",
    "meshlb-ipvs",
    "iptables-ipvs",
];
pub const WORKLOADS: &[&str] = &["keepalive", "cpr", "udp", "latency"];
pub const MESH_WORKLOADS: &[&str] = &["keepalive", "cpr"];
/// The paced client's rate in the guests (TCG serves a few thousand
/// connections per second at best).
const RATE: u32 = 200;
const CP_SERVICES: usize = 1000;
const CP_TASKS: usize = 10;

pub struct VmBench {
    pub arches: Vec<Target>,
    pub rounds: usize,
    pub duration_s: u32,
    pub connections: u32,
    /// Control-plane sync rounds.
    pub cp_rounds: usize,
    /// Where results go: `bench/results` (None: a smoke run, a temp dir).
    pub results: Option<PathBuf>,
    /// A prebuilt meshlb for the guests (x86_64 only); built when absent.
    pub meshlb: Option<PathBuf>,
}

/// Runs the benchmark for every arch; returns the results files and
/// whether every sample succeeded.
pub fn run(b: &VmBench) -> Result<(Vec<PathBuf>, bool)> {
    setup::require_root("bench vm")?;
    setup::vm_packages()?;
    let mut files = Vec::new();
    let mut all_ok = true;
    for &arch in &b.arches {
        let (file, ok) = one_arch(arch, b)?;
        println!(
            "bench vm: {} {}: {}",
            arch.triple(),
            if ok {
                "every run succeeded"
            } else {
                "SOME RUNS FAILED"
            },
            file.display()
        );
        all_ok &= ok;
        files.push(file);
    }
    Ok((files, all_ok))
}

/// The xtask binary for `arch` (the guests' load generators): this one on
/// x86_64, a cross build otherwise.
fn helper_binary(arch: Target) -> Result<PathBuf> {
    if arch == Target::X86_64 {
        return std::env::current_exe().context("locating the xtask binary");
    }
    setup::rust_targets(&[arch.triple()])?;
    Cmd::new("cargo")
        .args(["build", "--package", "xtask", "--target", arch.triple()])
        .run()
        .context("cross-building the xtask (the guests' load generators)")?;
    let bin = compile::target_dir()
        .join(arch.triple())
        .join("debug/xtask");
    anyhow::ensure!(bin.exists(), "no {}", bin.display());
    Ok(bin)
}

fn one_arch(arch: Target, b: &VmBench) -> Result<(PathBuf, bool)> {
    let t0 = Instant::now();
    let kit = vm::kit_with(arch, b.meshlb.as_deref(), false)?;
    let helper = helper_binary(arch)?;
    std::fs::copy(&helper, kit.share.path().join("xtask"))
        .with_context(|| format!("copying {}", helper.display()))?;
    let logs = vm::logdir()?;
    let _lock = netns::lock_prefix(vm::NETNS_PREFIX)?;
    netns::remove_stale(vm::NETNS_PREFIX)?;
    let name = |part: &str| format!("bench-{}-{part}", arch_name(arch));
    let common = [
        format!("rounds={}", b.rounds),
        format!("secs={}", b.duration_s),
        format!("conns={}", b.connections),
    ];

    let parts = std::env::var("MESHLB_BENCH_VM_PARTS").unwrap_or_default();
    let want = |p: &str| parts.is_empty() || parts.split(',').any(|x| x == p);
    let skipped = |name: &str| qemu::Outcome {
        pass: false,
        detail: format!("{name}: not run (MESHLB_BENCH_VM_PARTS={parts})"),
        console: PathBuf::new(),
        took: Duration::ZERO,
    };

    // Data plane, one guest.
    let out = TempDir::new("meshlb-bench-vm")?;
    let mut args: Vec<String> = common.to_vec();
    args.push(format!("rate={RATE}"));
    let runs = b.rounds * (WORKLOADS.len() * PATHS.len());
    let deadline = Duration::from_secs(600 + runs as u64 * (u64::from(b.duration_s) + 20));
    let dp = if want("dataplane") {
        boot(
            arch,
            &kit,
            &name("dataplane"),
            "bench",
            &args,
            2048,
            out.path(),
            deadline,
            &logs,
        )?
    } else {
        skipped("dataplane")
    };
    let (samples, dp_ok) = dataplane_samples(out.path(), b.rounds, b.duration_s);
    let meta = read_meta(&out.path().join("meta.txt"));

    // The mesh, three guests.
    let mout = TempDir::new("meshlb-bench-vm-mesh")?;
    let mesh_deadline = Duration::from_secs(
        900 + (b.rounds * MESH_WORKLOADS.len() * MESH_PATHS.len()) as u64
            * (u64::from(b.duration_s) + 20)
            + b.rounds as u64 * 300,
    );
    let margs: Vec<String> = common.to_vec();
    let margs_ref: Vec<&str> = margs.iter().map(String::as_str).collect();
    let mname = name("mesh");
    let mesh = if want("mesh") {
        vm::run_cluster(&mname, 3, false, &logs, |node, nics| qemu::Guest {
            arch,
            tree: &kit.tree,
            share: kit.share.path(),
            scenario: &mname,
            script: "bench-mesh",
            node: node.to_string(),
            args: &margs_ref,
            mem_mb: 1024,
            smp: 1,
            nics,
            out: Some(mout.path()),
            deadline: mesh_deadline,
        })?
    } else {
        skipped("mesh")
    };
    let (mesh_samples, mesh_ok) = mesh_samples(mout.path(), b.rounds);
    let mesh_meta = read_meta(&mout.path().join("mesh-meta.txt"));

    // Control plane, a Pi-sized guest.
    let cout = TempDir::new("meshlb-bench-vm-cp")?;
    let cargs = vec![
        format!("services={CP_SERVICES}"),
        format!("tasks={CP_TASKS}"),
        format!("rounds={}", b.cp_rounds),
    ];
    let cp = if want("cp") {
        boot(
            arch,
            &kit,
            &name("control-plane"),
            "bench-cp",
            &cargs,
            1024,
            cout.path(),
            Duration::from_secs(900 * b.cp_rounds as u64 + 300),
            &logs,
        )?
    } else {
        skipped("control plane")
    };
    let (cp_samples, cp_ok) = cp_samples(cout.path(), b.cp_rounds);

    let mut ok = dp.pass && mesh.pass && cp.pass && dp_ok && mesh_ok && cp_ok;
    let stamp = utc_stamp();
    let mut doc = json!({
        "suite": "vm",
        "timestamp": stamp,
        "command": crate::bench_peers::command_line(),
        "machine": crate::bench_peers::machine(),
        "arch": arch_name(arch),
        "accelerator": "tcg",
        "accelerator_note": "QEMU TCG (no KVM on this machine): every guest instruction is emulated, so absolute figures are emulation-bound; compare paths only by their ratios within this run",
        "took_s": t0.elapsed().as_secs_f64(),
        "setup": {
            "rounds": b.rounds,
            "duration_s": b.duration_s,
            "wrk": format!("-t1 -c{} -d{}s", b.connections, b.duration_s),
            "latency": format!("paced open-loop client (xtask bench-helper paced), {RATE} req/s, 32 workers, new connection per request"),
            "udp": "socket blaster (xtask bench-helper udp-blast, 1 thread, 18-byte datagrams) from the client namespace; pps = datagrams counted by a raw PREROUTING DROP rule on the backend's veth of the lane / run seconds",
            "dataplane_guest": "1 guest, 2 vCPUs, 2048 MiB; client ns -> one lane ns per path -> backend ns (nginx-light, 1 worker, :8000); veth, tx offload off on the client and backend ends",
            "paths": PATHS,
            "mesh": "3 guests (1 vCPU, 1024 MiB each) on one L2 segment (QEMU socket netdev, virtio-net): client n3 -> n1 published port -> task on n2; meshlb XDP and IPVS in turn on n1 (two phases per round), iptables DNAT + MASQUERADE on :8082 (kube-proxy's mark/DNAT/masquerade)",
            "mesh_paths": MESH_PATHS,
            "control_plane": format!("1 guest sized like a Raspberry Pi: 2 vCPUs, 1024 MiB; {CP_SERVICES} services x {CP_TASKS} tasks written to the static config, SIGHUP; sync = signal -> the daemon's 'config reloaded' line, and -> `meshlb status` listing every service"),
            "order": "interleaved per round in path order",
        },
        "guest": meta,
        "mesh_guest": mesh_meta,
        "outcomes": {
            "dataplane": outcome_json(&dp),
            "mesh": outcome_json(&mesh),
            "control_plane": outcome_json(&cp),
        },
        "samples": samples,
        "mesh_samples": mesh_samples,
        "control_plane": cp_samples,
    });
    if !parts.is_empty() && b.results.is_some() {
        ok = merge_previous(arch, &mut doc, &want);
    }
    let dir = match &b.results {
        Some(d) => d.clone(),
        None => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{stamp}-vm-{}.json", arch_name(arch)));
    std::fs::write(&file, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", file.display()))?;
    print_summary(arch, &doc);
    Ok((file, ok))
}

/// A run limited to some parts (`MESHLB_BENCH_VM_PARTS`) takes the other
/// parts from the newest full results of the arch, and says so
/// (`"merged"`: part -> that file's timestamp); returns whether every part
/// of the merged document passed with every run ok.
fn merge_previous(arch: Target, doc: &mut Value, want: &dyn Fn(&str) -> bool) -> bool {
    let prev = crate::report::latest(&format!("vm-{}", arch_name(arch)))
        .and_then(|f| crate::report::load(&f).ok());
    // (part, outcome key, the document's keys of that part)
    let parts: [(&str, &str, &[&str]); 3] = [
        ("dataplane", "dataplane", &["samples", "guest"]),
        ("mesh", "mesh", &["mesh_samples", "mesh_guest"]),
        ("cp", "control_plane", &["control_plane"]),
    ];
    let mut merged = serde_json::Map::new();
    if let Some(prev) = prev {
        for (part, outcome, keys) in parts {
            if want(part) {
                continue;
            }
            for k in keys {
                doc[*k] = prev[*k].clone();
            }
            doc["outcomes"][outcome] = prev["outcomes"][outcome].clone();
            merged.insert(part.to_string(), prev["timestamp"].clone());
        }
    }
    doc["merged"] = Value::Object(merged);
    let runs_ok = ["samples", "mesh_samples", "control_plane"]
        .iter()
        .all(|k| {
            doc[*k]
                .as_array()
                .is_some_and(|v| v.iter().all(|s| s["ok"] == true))
        });
    let guests_ok = doc["outcomes"]
        .as_object()
        .is_some_and(|o| o.values().all(|v| v["pass"] == true));
    runs_ok && guests_ok
}

pub fn arch_name(arch: Target) -> &'static str {
    match arch {
        Target::X86_64 => "x86_64",
        Target::Aarch64 => "aarch64",
        Target::Armv7 => "armv7",
    }
}

#[allow(clippy::too_many_arguments, reason = "one boot, spelled out")]
fn boot(
    arch: Target,
    kit: &vm::ArchKit,
    name: &str,
    script: &str,
    args: &[String],
    mem_mb: u32,
    out: &Path,
    deadline: Duration,
    logs: &Path,
) -> Result<qemu::Outcome> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let g = qemu::Guest {
        arch,
        tree: &kit.tree,
        share: kit.share.path(),
        scenario: name,
        script,
        node: "bench".into(),
        args: &args,
        mem_mb,
        smp: 2,
        nics: Vec::new(),
        out: Some(out),
        deadline,
    };
    println!(
        "bench vm: {name} starting (deadline {}s)",
        deadline.as_secs()
    );
    let o = qemu::Running::start(&g, name, logs, None)?.wait()?;
    println!(
        "bench vm: {name} {} in {:.1}s: {}",
        if o.pass { "PASS" } else { "FAIL" },
        o.took.as_secs_f64(),
        o.detail
    );
    if !o.pass {
        println!(
            "----- {} (last 40 lines) -----\n{}\n-----",
            o.console.display(),
            qemu::console_tail(&o.console, 40)
        );
    }
    Ok(o)
}

fn outcome_json(o: &qemu::Outcome) -> Value {
    json!({
        "pass": o.pass,
        "detail": o.detail,
        "took_s": o.took.as_secs_f64(),
        "console": o.console.display().to_string(),
    })
}

fn read_meta(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut m = serde_json::Map::new();
    for l in text.lines() {
        if let Some((k, v)) = l.split_once('=') {
            m.insert(k.to_string(), Value::String(v.to_string()));
        }
    }
    Value::Object(m)
}

/// One run's file: `Ok(text)`, or `Err(why)` when it is missing or says
/// FAILED.
fn run_file(path: &Path) -> std::result::Result<String, String> {
    match std::fs::read_to_string(path) {
        Err(_) => Err(format!(
            "no result file {} (the guest did not get to this run)",
            path.file_name().unwrap_or_default().to_string_lossy()
        )),
        Ok(t) => match t.strip_prefix("FAILED ") {
            Some(why) => Err(why.trim().to_string()),
            None => Ok(t),
        },
    }
}

fn failed(workload: &str, round: usize, path: &str, why: String) -> Value {
    json!({"workload": workload, "round": round, "path": path, "ok": false, "error": why})
}

/// A wrk sample: requests/s, and `ok` only without socket errors or
/// non-2xx answers.
fn wrk_sample(workload: &str, round: usize, path: &str, file: &Path) -> Value {
    match run_file(file).and_then(|t| parse_wrk(&t).map_err(|e| format!("{e:#}"))) {
        Ok(s) => {
            let errors = s.socket_errors + s.non_2xx;
            json!({
                "workload": workload, "round": round, "path": path,
                "ok": errors == 0 && s.requests > 0,
                "error": if errors > 0 { Some(format!("{} socket errors, {} non-2xx", s.socket_errors, s.non_2xx)) } else { None },
                "rps": s.rps, "requests": s.requests, "errors": errors,
                "latency_avg_us": s.latency_avg_us,
            })
        }
        Err(why) => failed(workload, round, path, why),
    }
}

fn dataplane_samples(out: &Path, rounds: usize, secs: u32) -> (Vec<Value>, bool) {
    let mut v = Vec::new();
    for w in WORKLOADS {
        for r in 1..=rounds {
            for p in PATHS {
                if *w == "udp" && *p == "haproxy" {
                    continue;
                }
                let f = out.join(format!("{w}-r{r}-{p}.txt"));
                v.push(match *w {
                    "keepalive" | "cpr" => wrk_sample(w, r, p, &f),
                    "udp" => udp_sample(r, p, &f, secs),
                    _ => latency_sample(r, p, &f),
                });
            }
        }
    }
    let ok = v.iter().all(|s| s["ok"] == true);
    (v, ok)
}

fn udp_sample(round: usize, path: &str, file: &Path, secs: u32) -> Value {
    let parsed = run_file(file).and_then(|t| {
        let sent: Value = t
            .lines()
            .find(|l| l.starts_with('{'))
            .and_then(|l| serde_json::from_str(l).ok())
            .ok_or("no sender line")?;
        let delivered: u64 = t
            .lines()
            .find_map(|l| l.strip_prefix("delivered "))
            .and_then(|n| n.trim().parse().ok())
            .ok_or("no delivered line")?;
        Ok((sent, delivered))
    });
    match parsed {
        Ok((sent, delivered)) => {
            let s = f64::from(secs);
            let sent_n = sent["sent"].as_u64().unwrap_or(0);
            json!({
                "workload": "udp", "round": round, "path": path,
                "ok": delivered > 0,
                "error": if delivered == 0 { Some("no datagram reached the backend") } else { None },
                "pps": delivered as f64 / s,
                "sent_pps": sent_n as f64 / s,
                "delivered": delivered, "sent": sent_n,
                "loss": if sent_n > 0 { 1.0 - delivered as f64 / sent_n as f64 } else { 1.0 },
            })
        }
        Err(why) => failed("udp", round, path, why),
    }
}

fn latency_sample(round: usize, path: &str, file: &Path) -> Value {
    match run_file(file).and_then(|t| {
        serde_json::from_str::<Value>(t.trim()).map_err(|e| format!("paced client output: {e}"))
    }) {
        Ok(mut j) => {
            let errors = j["errors"].as_u64().unwrap_or(u64::MAX);
            let answered = j["ok"].as_u64().unwrap_or(0);
            j["workload"] = json!("latency");
            j["round"] = json!(round);
            j["path"] = json!(path);
            j["answered"] = json!(answered);
            j["ok"] = json!(errors == 0 && answered > 0);
            j
        }
        Err(why) => failed("latency", round, path, why),
    }
}

fn mesh_samples(out: &Path, rounds: usize) -> (Vec<Value>, bool) {
    let mut v = Vec::new();
    for w in MESH_WORKLOADS {
        for r in 1..=rounds {
            for p in MESH_PATHS {
                let f = out.join(format!("mesh-{w}-r{r}-{p}.txt"));
                v.push(wrk_sample(w, r, p, &f));
            }
        }
    }
    let ok = v.iter().all(|s| s["ok"] == true);
    (v, ok)
}

fn cp_samples(out: &Path, rounds: usize) -> (Vec<Value>, bool) {
    let mut v = Vec::new();
    for r in 1..=rounds {
        let f = out.join(format!("cp-r{r}.txt"));
        v.push(match run_file(&f) {
            Ok(t) => {
                let mut m = serde_json::Map::new();
                m.insert("round".into(), json!(r));
                m.insert("ok".into(), json!(true));
                for l in t.lines() {
                    if let Some((k, val)) = l.split_once('=') {
                        let val = val.trim();
                        m.insert(
                            k.to_string(),
                            val.parse::<f64>().map_or_else(|_| json!(val), |n| json!(n)),
                        );
                    }
                }
                Value::Object(m)
            }
            Err(why) => json!({"round": r, "ok": false, "error": why}),
        });
    }
    let ok = v.iter().all(|s| s["ok"] == true);
    (v, ok)
}

/// Median of the `key` of the ok samples matching `workload`/`path`.
pub fn median(samples: &[Value], workload: &str, path: &str, key: &str) -> Option<f64> {
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|s| s["workload"] == workload && s["path"] == path && s["ok"] == true)
        .filter_map(|s| s[key].as_f64())
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}

/// The key figure of a workload: req/s, packets/s, or p50 latency.
pub fn key_of(workload: &str) -> &'static str {
    match workload {
        "udp" => "pps",
        "latency" => "p50_us",
        _ => "rps",
    }
}

fn print_summary(arch: Target, doc: &Value) {
    let empty = Vec::new();
    let samples = doc["samples"].as_array().unwrap_or(&empty);
    println!("\nbench vm {} (TCG: ratios only):", arch_name(arch));
    for w in WORKLOADS {
        let key = key_of(w);
        let line: Vec<String> = PATHS
            .iter()
            .filter(|p| !(*w == "udp" && **p == "haproxy"))
            .map(|p| match median(samples, w, p, key) {
                Some(x) => format!("{p}={x:.0}"),
                None => format!("{p}=failed"),
            })
            .collect();
        println!("  {w} ({key}): {}", line.join(" "));
    }
    let mesh = doc["mesh_samples"].as_array().unwrap_or(&empty);
    for w in MESH_WORKLOADS {
        let line: Vec<String> = MESH_PATHS
            .iter()
            .map(|p| match median(mesh, w, p, "rps") {
                Some(x) => format!("{p}={x:.0}"),
                None => format!("{p}=failed"),
            })
            .collect();
        println!("  mesh {w} (rps): {}", line.join(" "));
    }
    for c in doc["control_plane"].as_array().unwrap_or(&empty) {
        println!(
            "  control plane: {}",
            serde_json::to_string(c).unwrap_or_default()
        );
    }
}

/// The one-round smoke of `cargo xtask test`: x86_64, 1 round of 1 s per
/// run, with a prebuilt `meshlb`, results to a temp dir; fails when any
/// path of any part failed.
pub fn smoke(meshlb: &Path) -> Result<()> {
    let b = VmBench {
        meshlb: Some(meshlb.to_path_buf()),
        arches: vec![Target::X86_64],
        rounds: 1,
        duration_s: 1,
        connections: 8,
        cp_rounds: 1,
        results: None,
    };
    let (files, ok) = run(&b)?;
    if !ok {
        bail!(
            "bench vm smoke: some runs failed (see {})",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
