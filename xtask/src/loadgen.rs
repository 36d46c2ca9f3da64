//! The load generators the data-plane benchmark needs and no installed
//! tool provides, run as `cargo xtask bench-helper ...` inside the client
//! namespace (the xtask re-executes itself there): a paced HTTP client
//! (fixed request rate, per-request latency) and a UDP blaster (the UDP
//! scenario's sender only where the kernel refuses the packet generator,
//! bench/pktgen.rs). Each prints one JSON line on stdout.
//!
//! The paced client is open-loop: request `i` is due at `t0 + i / rate`
//! and its latency counts from that instant, not from when a worker got
//! round to it, so a stalled path shows up as latency instead of silently
//! lowering the rate (no coordinated omission). Every request opens its own
//! connection (`Connection: close`): the SYN path is where load balancers
//! differ most.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

/// `bench-helper <tool> args...`.
pub fn helper(args: &[String]) -> Result<()> {
    let get = |name: &str| -> Result<&str> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
            .with_context(|| format!("bench-helper: missing {name}"))
    };
    let num = |name: &str| -> Result<f64> {
        get(name)?
            .parse::<f64>()
            .with_context(|| format!("bench-helper: {name} is not a number"))
    };
    let out = match args.first().map(String::as_str) {
        Some("paced") => paced(
            get("--target")?.parse()?,
            num("--rate")?,
            Duration::from_secs_f64(num("--secs")?),
            num("--workers")? as usize,
        )?,
        Some("udp-blast") => udp_blast(
            get("--target")?.parse()?,
            Duration::from_secs_f64(num("--secs")?),
            num("--threads")? as usize,
        )?,
        other => bail!("bench-helper: unknown tool {other:?} (paced, udp-blast)"),
    };
    println!("{out}");
    Ok(())
}

/// Percentiles of the latency CDF recorded per run (the report's chart).
pub const CDF_POINTS: &[f64] = &[
    0.0, 1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 97.0, 98.0, 99.0,
    99.5, 99.9, 100.0,
];

/// The value at percentile `p` (nearest rank) of sorted `v`.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn one_request(target: SocketAddr, timeout: Duration) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&target, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    if !got.starts_with(b"HTTP/1.1 200") {
        bail!("not a 200 response");
    }
    Ok(())
}

#[allow(
    clippy::unnecessary_wraps,
    reason = "the shape of the other workloads, which can fail"
)]
fn paced(
    target: SocketAddr,
    rate: f64,
    secs: Duration,
    workers: usize,
) -> Result<serde_json::Value> {
    let total = (rate * secs.as_secs_f64()) as u64;
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let t0 = Instant::now() + Duration::from_millis(50);
    let mut threads = Vec::new();
    for _ in 0..workers.max(1) {
        let (next, errors, lat) = (next.clone(), errors.clone(), lat.clone());
        threads.push(std::thread::spawn(move || {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                match one_request(target, Duration::from_secs(2)) {
                    Ok(()) => mine.push(due.elapsed().as_secs_f64() * 1e6),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat.lock().expect("no panics while held").extend(mine);
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    let mut v = std::mem::take(&mut *lat.lock().expect("workers joined"));
    v.sort_by(f64::total_cmp);
    let achieved = v.len() as f64 / (t0.elapsed().as_secs_f64().max(1e-9));
    Ok(json!({
        "requests": total,
        "ok": v.len(),
        "errors": errors.load(Ordering::Relaxed),
        "achieved_rps": achieved,
        "p50_us": percentile(&v, 50.0),
        "p90_us": percentile(&v, 90.0),
        "p99_us": percentile(&v, 99.0),
        "p999_us": percentile(&v, 99.9),
        "max_us": percentile(&v, 100.0),
        "cdf_us": CDF_POINTS.iter().map(|p| json!([p, percentile(&v, *p)])).collect::<Vec<_>>(),
    }))
}

fn udp_blast(target: SocketAddr, secs: Duration, threads: usize) -> Result<serde_json::Value> {
    let end = Instant::now() + secs;
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        handles.push(std::thread::spawn(
            move || -> std::io::Result<(u64, u64)> {
                // One socket per thread: each is its own flow (source port).
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.connect(target)?;
                let payload = [0x5au8; 18];
                let (mut sent, mut failed) = (0u64, 0u64);
                'outer: loop {
                    for _ in 0..256 {
                        match s.send(&payload) {
                            Ok(_) => sent += 1,
                            Err(_) => failed += 1,
                        }
                    }
                    if Instant::now() >= end {
                        break 'outer;
                    }
                }
                Ok((sent, failed))
            },
        ));
    }
    let (mut sent, mut failed) = (0, 0);
    for h in handles {
        let (s, f) = h
            .join()
            .map_err(|_| anyhow::anyhow!("blaster thread panicked"))??;
        sent += s;
        failed += f;
    }
    Ok(json!({ "sent": sent, "send_errors": failed, "secs": secs.as_secs_f64() }))
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
