//! `cargo xtask bench`: end-to-end throughput of the meshlb VIP against the
//! same backend reached directly, in network namespaces (`mlbb-*`), with
//! wrk; raw samples go to `bench/results/<timestamp>.json`.
//!
//! Rounds interleave the paths (A B A B ...) so drift (thermal, noisy
//! neighbours) hits both alike. Each path has its own client source
//! address (wrk cannot bind one, so the client's route to the VIP carries
//! `src 10.200.0.3` while the direct path leaves from 10.200.0.2): a
//! DNAT-ing load balancer keeps the client's address and port, so with one
//! shared address the backend would see the same 4-tuples from both paths,
//! and its TIME_WAIT sockets of one round would reject the SYNs of the next
//! (seen here: both paths fell to ~400 req/s by round 4). That mixed case
//! is a scenario of its own, not noise between rounds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde_json::json;

use crate::cmd::{self, Cmd};
use crate::compile::{self, Target};
use crate::netns::{self, Topology};
use crate::procs::{self, Daemon, TempDir};
use crate::setup;

const PREFIX: &str = "mlbb-";
const BPFFS: &str = "/sys/fs/bpf/mlbb";
const VIP_URL: &str = "http://10.96.0.10:80/";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// wrk through the VIP vs. direct, keep-alive and connection-per-request.
    Dataplane,
    /// Every suite (today: dataplane).
    All,
}

pub struct Options {
    pub rounds: usize,
    pub duration_s: u32,
    pub connections: u32,
    /// A prebuilt meshlb binary; built (release) when absent.
    pub meshlb: Option<PathBuf>,
    /// "native" or "generic".
    pub xdp_mode: String,
}

struct Scenario {
    name: &'static str,
    extra: &'static [&'static str],
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "keepalive",
        extra: &[],
    },
    Scenario {
        name: "conn-per-request",
        extra: &["-H", "Connection: close"],
    },
];

struct Sample {
    scenario: &'static str,
    path: &'static str,
    round: usize,
    rps: f64,
    requests: u64,
    socket_errors: u64,
    non_2xx: u64,
    latency_avg_us: Option<f64>,
}

pub fn bench(suite: Suite, opt: &Options) -> Result<()> {
    setup::require_root("bench")?;
    match suite {
        Suite::Dataplane | Suite::All => dataplane(opt),
    }
}

fn dataplane(opt: &Options) -> Result<()> {
    anyhow::ensure!(opt.rounds >= 1, "--rounds must be at least 1");
    setup::setup()?;
    let bin = match &opt.meshlb {
        Some(b) => b.clone(),
        None => compile::build(Target::X86_64, true)?,
    };
    let _lock = netns::lock_prefix(PREFIX)?;
    netns::remove_stale(PREFIX)?;
    Daemon::cleanup_pins(&bin, Path::new(BPFFS));
    for ns in ["client", "b1"] {
        Daemon::cleanup_pins(&bin, Path::new(&format!("{BPFFS}-peer-{PREFIX}{ns}")));
    }

    let tmp = TempDir::new("meshlb-bench")?;
    let topo = Topology::create(PREFIX, 1)?;
    topo.client
        .ip(&["addr", "add", "10.200.0.3/24", "dev", "cl-lb"])?;
    // A load generator's usual setting: reuse client ports in TIME_WAIT
    // (wrk sometimes closes first). Without it every path collapses to
    // ~500 connections/s once the ephemeral range is spent (seen here).
    topo.client.sysctl("net.ipv4.tcp_tw_reuse=1")?;
    topo.client.ip(&[
        "route",
        "add",
        "10.96.0.0/16",
        "via",
        "10.200.0.1",
        "src",
        "10.200.0.3",
    ])?;
    let backend = netns::backend_v4(1);
    let _nginx = procs::start_nginx(&topo.backends[0].name, &tmp.path().join("b1"), "b1", 8000)?;

    let config = tmp.path().join("meshlb.toml");
    std::fs::write(
        &config,
        format!(
            r#"node = "bench"

[[service]]
name = "whoami"
vip = "10.96.0.10"
publish = [{{ proto = "tcp", port = 80, target = 8000 }}]

[[service.backend]]
addr = "{backend}"
"#
        ),
    )?;
    let mut args = vec![
        "--config".to_string(),
        config.to_string_lossy().into_owned(),
    ];
    for i in &topo.lb_ifaces {
        args.push("--iface".into());
        args.push(i.clone());
    }
    let xdp_mode = opt.xdp_mode.as_str();
    args.extend(["--xdp-mode".into(), xdp_mode.into()]);
    if xdp_mode == "native" {
        // Native redirect into a veth only delivers when its peer runs an
        // XDP program: a pass-everything one on the client and backend ends.
        for (ns, iface) in [
            (&topo.client.name, "cl-lb"),
            (&topo.backends[0].name, "b1-lb"),
        ] {
            Cmd::nsenter(ns, bin.to_string_lossy())
                .args(["xdp-pass", "--iface", iface, "--bpffs"])
                .arg(format!("{BPFFS}-peer-{ns}"))
                .timeout(Duration::from_secs(20))
                .run()
                .with_context(|| format!("xdp-pass on {ns}/{iface}"))?;
        }
    }
    let mut daemon = Daemon::start(
        &bin,
        &topo.lb.name,
        &args,
        Path::new(BPFFS),
        &tmp.path().join("meshlb.log"),
    )?;
    daemon.wait_ready("whoami", Duration::from_secs(20))?;

    let direct_url = format!("http://{backend}:8000/");
    let paths: [(&'static str, &str); 2] = [("direct", &direct_url), ("meshlb", VIP_URL)];
    for (name, url) in paths {
        let body = procs::curl(&topo.client.name, url, Duration::from_secs(3))
            .with_context(|| format!("{name} path {url} does not answer; not benchmarking"))?;
        anyhow::ensure!(body.trim() == "b1", "{name} path {url} answered {body:?}");
    }

    let mut samples = Vec::new();
    for sc in SCENARIOS {
        println!(
            "\n== {} ({} rounds, A=direct B=meshlb)",
            sc.name, opt.rounds
        );
        for round in 1..=opt.rounds {
            for (path, url) in paths {
                cmd::check_interrupted()?;
                let s = wrk(&topo.client.name, url, sc, path, round, opt)?;
                println!(
                    "  round {round} {path:<7} {:>10.0} req/s  ({} requests, {} socket errors, {} non-2xx)",
                    s.rps, s.requests, s.socket_errors, s.non_2xx
                );
                samples.push(s);
            }
        }
    }
    let meshlb_log = daemon.log_tail(200);
    drop(daemon);
    for ns in [&topo.client.name, &topo.backends[0].name] {
        Daemon::cleanup_pins(&bin, Path::new(&format!("{BPFFS}-peer-{ns}")));
    }
    drop(_nginx);
    drop(topo);

    let summary = summarize(&samples);
    print_summary(&summary, xdp_mode);
    let file = write_results(&samples, &summary, opt, xdp_mode, &meshlb_log)?;
    println!("\nraw samples: {}", file.display());
    drop(tmp);
    Ok(())
}

fn wrk(
    ns: &str,
    url: &str,
    sc: &Scenario,
    path: &'static str,
    round: usize,
    opt: &Options,
) -> Result<Sample> {
    let out = Cmd::in_netns(ns, "wrk")
        .args([
            "-t1",
            &format!("-c{}", opt.connections),
            &format!("-d{}s", opt.duration_s),
        ])
        .args(sc.extra.iter().copied())
        .arg(url)
        .timeout(Duration::from_secs(u64::from(opt.duration_s) + 30))
        .stdout()?;
    let mut s = parse_wrk(&out).with_context(|| format!("parsing wrk output:\n{out}"))?;
    s.scenario = sc.name;
    s.path = path;
    s.round = round;
    Ok(s)
}

/// Pull the numbers out of wrk's text report.
fn parse_wrk(out: &str) -> Result<Sample> {
    let mut s = Sample {
        scenario: "",
        path: "",
        round: 0,
        rps: f64::NAN,
        requests: 0,
        socket_errors: 0,
        non_2xx: 0,
        latency_avg_us: None,
    };
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            s.rps = v.trim().parse().context("Requests/sec")?;
        } else if line.contains(" requests in ") {
            s.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .context("requests count")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            s.socket_errors = v
                .split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            s.non_2xx = v.trim().parse().context("Non-2xx")?;
        } else if let Some(v) = line.strip_prefix("Latency") {
            s.latency_avg_us = v.split_whitespace().next().and_then(duration_us);
        }
    }
    if s.rps.is_nan() {
        bail!("no Requests/sec line");
    }
    Ok(s)
}

/// wrk durations: `812.00us`, `1.23ms`, `2.00s`, `1.5m`.
fn duration_us(v: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|x| x * mult)
}

struct Row {
    scenario: &'static str,
    path: &'static str,
    median: f64,
    min: f64,
    max: f64,
    errors: u64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn summarize(samples: &[Sample]) -> Vec<Row> {
    let mut rows = Vec::new();
    for sc in SCENARIOS {
        for path in ["direct", "meshlb"] {
            let mine: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.scenario == sc.name && s.path == path)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let mut rps: Vec<f64> = mine.iter().map(|s| s.rps).collect();
            rows.push(Row {
                scenario: sc.name,
                path,
                median: median(&mut rps),
                min: rps.first().copied().unwrap_or(f64::NAN),
                max: rps.last().copied().unwrap_or(f64::NAN),
                errors: mine.iter().map(|s| s.socket_errors + s.non_2xx).sum(),
            });
        }
    }
    rows
}

/// meshlb median / direct median for a scenario.
fn ratio(rows: &[Row], scenario: &str) -> Option<f64> {
    let get = |p: &str| {
        rows.iter()
            .find(|r| r.scenario == scenario && r.path == p)
            .map(|r| r.median)
    };
    Some(get("meshlb")? / get("direct")?)
}

fn print_summary(rows: &[Row], xdp_mode: &str) {
    println!("\nsummary (req/s, wrk -t1; meshlb XDP {xdp_mode}):");
    println!(
        "  {:<17} {:<7} {:>10} {:>10} {:>10} {:>7} {:>13}",
        "scenario", "path", "median", "min", "max", "errors", "meshlb/direct"
    );
    for r in rows {
        let ratio = if r.path == "meshlb" {
            ratio(rows, r.scenario).map_or(String::new(), |x| format!("{x:.2}"))
        } else {
            String::new()
        };
        println!(
            "  {:<17} {:<7} {:>10.0} {:>10.0} {:>10.0} {:>7} {:>13}",
            r.scenario, r.path, r.median, r.min, r.max, r.errors, ratio
        );
    }
}

fn write_results(
    samples: &[Sample],
    rows: &[Row],
    opt: &Options,
    xdp_mode: &str,
    meshlb_log: &str,
) -> Result<PathBuf> {
    let stamp = utc_stamp();
    let dir = crate::root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let uname = Cmd::new("uname").arg("-a").stdout().unwrap_or_default();
    let wrk_version = Cmd::new("wrk")
        .arg("-v")
        .output_unchecked()
        .map(|o| {
            let t = String::from_utf8_lossy(&o.stdout).into_owned();
            t.lines().next().unwrap_or_default().to_string()
        })
        .unwrap_or_default();
    let doc = json!({
        "suite": "dataplane",
        "timestamp": stamp,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": {
            "uname": uname.trim(),
            "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "wrk": wrk_version,
        },
        "setup": {
            "topology": "client ns -> LB ns (meshlb) -> backend ns, veth, tx offload off",
            "backend": "nginx-light, 1 worker, access_log off",
            "meshlb": opt.meshlb.as_ref().map_or_else(
                || "built: cargo xtask build --release".to_string(),
                |p| p.display().to_string(),
            ),
            "xdp_mode": xdp_mode,
            "rounds": opt.rounds,
            "duration_s": opt.duration_s,
            "wrk": format!("-t1 -c{} -d{}s", opt.connections, opt.duration_s),
            "order": "interleaved per round: direct then meshlb",
            "client_source": "shared (10.200.0.2); no conntrack in any namespace on the path",
        },
        "samples": samples.iter().map(|s| json!({
            "scenario": s.scenario,
            "path": s.path,
            "round": s.round,
            "rps": s.rps,
            "requests": s.requests,
            "socket_errors": s.socket_errors,
            "non_2xx": s.non_2xx,
            "latency_avg_us": s.latency_avg_us,
        })).collect::<Vec<_>>(),
        "summary": rows.iter().map(|r| json!({
            "scenario": r.scenario,
            "path": r.path,
            "median_rps": r.median,
            "min_rps": r.min,
            "max_rps": r.max,
            "errors": r.errors,
            "ratio_vs_direct": if r.path == "meshlb" { ratio(rows, r.scenario) } else { None },
        })).collect::<Vec<_>>(),
        "meshlb_log_tail": meshlb_log,
    });
    let file = dir.join(format!("{stamp}.json"));
    std::fs::write(&file, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(file)
}

/// `YYYYMMDDTHHMMSSZ` for now (UTC), without a date crate.
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 5s test @ http://10.96.0.10:80/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   485.12us  100.00us   3.00ms   90.00%
    Req/Sec    66.10k     1.20k   68.00k    80.00%
  330512 requests in 5.00s, 48.00MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  66102.40
Transfer/sec:      9.60MB
";

    #[test]
    fn parses_wrk_report() {
        let s = parse_wrk(WRK).unwrap();
        assert_eq!(s.rps, 66102.40);
        assert_eq!(s.requests, 330512);
        assert_eq!(s.socket_errors, 6);
        assert_eq!(s.non_2xx, 7);
        assert_eq!(s.latency_avg_us, Some(485.12));
        assert!(parse_wrk("garbage").is_err());
    }

    #[test]
    fn durations_and_median() {
        assert_eq!(duration_us("1.50ms"), Some(1500.0));
        assert_eq!(duration_us("2.00s"), Some(2e6));
        assert_eq!(duration_us("x"), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn stamp_shape() {
        let s = utc_stamp();
        assert_eq!(s.len(), 16, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z'), "{s}");
    }
}
