//! `cargo xtask bench [dataplane|microbench|control-plane|report|all]`:
//! the suites' shared options and the wrk output parser. The data-plane
//! suite (meshlb vs direct, iptables DNAT and HAProxy, interleaved) lives in
//! `bench_peers`, the XDP micro-benchmark in `microbench`, the control-plane
//! suite in `bench_control_plane`, and REPORT.md in `report`; raw samples
//! go to `bench/results/<timestamp>-<suite>.json`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use crate::setup;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// meshlb (XDP native and generic) vs direct, iptables DNAT and HAProxy:
    /// keep-alive, connection per request, mixed, latency, UDP.
    Dataplane,
    /// ns per packet of the XDP programs through BPF_PROG_TEST_RUN.
    Microbench,
    /// etcd put -> kernel map latency, full sync at 1k/10k services, daemon
    /// memory, and kube-proxy's iptables-restore for the same services.
    ControlPlane,
    /// The data-plane paths, the routing mesh and the control plane inside
    /// QEMU guests (IPVS, kube-proxy-style ipvsadm, other arches).
    Vm,
    /// Rewrite bench/REPORT.md and its charts from the newest results.
    Report,
    /// Every suite: dataplane, microbench, control-plane, then the report.
    All,
}

pub struct Options {
    pub rounds: usize,
    pub duration_s: u32,
    pub connections: u32,
    /// A prebuilt meshlb binary; built (release) when absent.
    pub meshlb: Option<PathBuf>,
    /// Control plane: comma-separated service counts.
    pub sizes: String,
    /// Control plane: single changes timed per size.
    pub changes: usize,
    /// vm: the guests' architectures.
    pub arches: Vec<crate::compile::Target>,
}

/// The numbers of one wrk run.
pub struct WrkSample {
    pub rps: f64,
    pub requests: u64,
    pub socket_errors: u64,
    pub non_2xx: u64,
    pub latency_avg_us: Option<f64>,
}

pub fn bench(suite: Suite, opt: &Options) -> Result<()> {
    setup::require_root("bench")?;
    match suite {
        Suite::Dataplane => crate::bench_peers::dataplane(opt).map(drop),
        Suite::Microbench => crate::microbench::run(opt).map(drop),
        Suite::ControlPlane => crate::bench_control_plane::control_plane(opt),
        Suite::Vm => {
            let (_, ok) = crate::bench_vm::run(&crate::bench_vm::VmBench {
                arches: opt.arches.clone(),
                rounds: opt.rounds,
                duration_s: opt.duration_s,
                connections: opt.connections,
                cp_rounds: opt.rounds.min(3),
                results: Some(crate::root().join("bench/results")),
                meshlb: opt.meshlb.clone(),
            })?;
            crate::report::write()?;
            if !ok {
                bail!(
                    "bench vm: some runs failed (reported as failed in the results and the report)"
                );
            }
            Ok(())
        }
        Suite::Report => crate::report::write().map(drop),
        Suite::All => {
            crate::bench_peers::dataplane(opt)?;
            crate::microbench::run(opt)?;
            crate::bench_control_plane::control_plane(opt)?;
            crate::report::write().map(drop)
        }
    }
}

/// Pull the numbers out of wrk's text report.
pub fn parse_wrk(out: &str) -> Result<WrkSample> {
    let mut s = WrkSample {
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

/// `YYYYMMDDTHHMMSSZ` for now (UTC), without a date crate.
pub fn utc_stamp() -> String {
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
        assert_eq!(s.requests, 330_512);
        assert_eq!(s.socket_errors, 6);
        assert_eq!(s.non_2xx, 7);
        assert_eq!(s.latency_avg_us, Some(485.12));
        assert!(parse_wrk("garbage").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration_us("1.50ms"), Some(1500.0));
        assert_eq!(duration_us("2.00s"), Some(2e6));
        assert_eq!(duration_us("x"), None);
    }

    #[test]
    fn stamp_shape() {
        let s = utc_stamp();
        assert_eq!(s.len(), 16, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z'), "{s}");
    }
}
