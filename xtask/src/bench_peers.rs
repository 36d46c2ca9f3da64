//! `cargo xtask bench dataplane`: meshlb against the backend reached
//! directly and against its peers — XDP native, XDP generic, iptables DNAT
//! (kube-proxy's iptables mode), HAProxy in TCP mode — in one namespace
//! topology, with every path's rounds interleaved (A B C D E A B ...).
//!
//! # Topology (`mlbp-*`)
//!
//! One client namespace and one backend namespace (nginx on :8000, a UDP
//! sink on :9000), joined by one *lane* per load balancer: a namespace of
//! its own with a veth to the client (10.210.L.0/24) and one to the backend
//! (10.211.L.0/24). So every path has its own client source address and its
//! own backend address, no two load balancers share a kernel's conntrack,
//! and all of them run at once, which is what lets rounds interleave:
//!
//! | lane | namespace    | path             | client dials       |
//! |------|--------------|------------------|--------------------|
//! | 1    | `mlbp-fwd`   | direct (limit)   | 10.211.1.2:8000    |
//! | 2    | `mlbp-xdpn`  | meshlb-native    | VIP 10.96.0.2:80   |
//! | 3    | `mlbp-xdpg`  | meshlb-generic   | VIP 10.96.0.3:80   |
//! | 4    | `mlbp-ipt`   | iptables         | VIP 10.96.0.4:80   |
//! | 5    | `mlbp-hap`   | haproxy          | VIP 10.96.0.5:80   |
//!
//! Lane 1 is plain kernel forwarding (no XDP, no netfilter rules). UDP
//! :90 on each DNAT VIP goes to the sink (HAProxy has no UDP).
//!
//! # Scenarios
//!
//! * `keepalive`, `conn-per-request`: wrk (`-t1`), all paths interleaved;
//! * `mixed-meshlb`, `mixed-iptables`: connection-per-request, one client
//!   address reaching the same backend directly (through that lane's
//!   namespace) and through the VIP, alternately — the case where a
//!   conntrack-based DNAT sees clashing tuples (ENV.md);
//! * `latency`: the paced client of [`crate::loadgen`] at a fixed rate,
//!   connection per request, latency per request;
//! * `udp`: the UDP blaster of [`crate::loadgen`]; packets/s that reach the
//!   backend's interface (and the sink).
//!
//! Raw samples go to `bench/results/<timestamp>-dataplane.json`; the
//! report is `cargo xtask bench report` ([`crate::report`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::bench::{parse_wrk, utc_stamp, Options};
use crate::cmd::{self, Background, Cmd};
use crate::compile::{self, Target};
use crate::netns::{self, veth, Netns};
use crate::procs::{self, Daemon, TempDir};
use crate::setup;

const PREFIX: &str = "mlbp-";
const BPFFS: &str = "/sys/fs/bpf/mlbp";
/// Paced client: requests/s per path (well under every path's capacity,
/// so the figure is latency, not queueing) and concurrent workers.
const LATENCY_RATE: u32 = 1000;
const LATENCY_WORKERS: u32 = 32;
/// UDP blaster threads (one flow each).
const UDP_THREADS: u32 = 2;
const UDP_PORT_VIP: u16 = 90;
const UDP_PORT_SINK: u16 = 9000;
/// The copy of this binary the namespaces run `bench-helper` from.
const HELPER_EXE: &str = "xtask-bench-helper";

/// A load balancer's namespace between the client and the backend.
#[derive(Clone, Copy)]
struct Lane {
    idx: u8,
    tag: &'static str,
}

const LANES: &[Lane] = &[
    Lane { idx: 1, tag: "fwd" },
    Lane {
        idx: 2,
        tag: "xdpn",
    },
    Lane {
        idx: 3,
        tag: "xdpg",
    },
    Lane { idx: 4, tag: "ipt" },
    Lane { idx: 5, tag: "hap" },
];

impl Lane {
    fn ns(&self) -> String {
        format!("{PREFIX}{}", self.tag)
    }
    fn backend(&self) -> String {
        format!("10.211.{}.2", self.idx)
    }
    fn client(&self) -> String {
        format!("10.210.{}.2", self.idx)
    }
    fn vip(&self) -> String {
        format!("10.96.0.{}", self.idx)
    }
}

/// One way from the client to the backend.
#[derive(Clone, Copy)]
struct Path4 {
    name: &'static str,
    lane: u8,
    /// Through the lane's VIP (else straight to the backend's address).
    via_vip: bool,
    udp: bool,
}

impl Path4 {
    fn lane(&self) -> Lane {
        LANES[usize::from(self.lane) - 1]
    }
    fn tcp_target(&self) -> String {
        if self.via_vip {
            format!("{}:80", self.lane().vip())
        } else {
            format!("{}:8000", self.lane().backend())
        }
    }
    fn udp_target(&self) -> String {
        if self.via_vip {
            format!("{}:{UDP_PORT_VIP}", self.lane().vip())
        } else {
            format!("{}:{UDP_PORT_SINK}", self.lane().backend())
        }
    }
}

const PATHS: &[Path4] = &[
    Path4 {
        name: "direct",
        lane: 1,
        via_vip: false,
        udp: true,
    },
    Path4 {
        name: "meshlb-native",
        lane: 2,
        via_vip: true,
        udp: true,
    },
    Path4 {
        name: "meshlb-generic",
        lane: 3,
        via_vip: true,
        udp: true,
    },
    Path4 {
        name: "iptables",
        lane: 4,
        via_vip: true,
        udp: true,
    },
    Path4 {
        name: "haproxy",
        lane: 5,
        via_vip: true,
        udp: false,
    },
];

/// The mixed scenarios: (scenario, direct path through the lane, VIP path).
fn mixed() -> [(&'static str, Path4, Path4); 2] {
    let direct = |lane| Path4 {
        name: "direct-same-src",
        lane,
        via_vip: false,
        udp: false,
    };
    [
        ("mixed-meshlb", direct(2), PATHS[1]),
        ("mixed-iptables", direct(4), PATHS[3]),
    ]
}

/// Everything started, in drop order: processes first, namespaces last.
struct Bed {
    _haproxy: Background,
    daemons: Vec<Daemon>,
    _nginx: Background,
    _lanes: Vec<Netns>,
    backend: Netns,
    client: Netns,
    peer_pins: Vec<PathBuf>,
    bin: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for p in &self.peer_pins {
            Daemon::cleanup_pins(&self.bin, p);
        }
    }
}

fn meshlb_config(lane: Lane) -> String {
    format!(
        r#"node = "bench-{tag}"

[[service]]
name = "web"
vip = "{vip}"
publish = [{{ proto = "tcp", port = 80, target = 8000 }}, {{ proto = "udp", port = {UDP_PORT_VIP}, target = {UDP_PORT_SINK} }}]

[[service.backend]]
addr = "{be}"
"#,
        tag = lane.tag,
        vip = lane.vip(),
        be = lane.backend(),
    )
}

fn haproxy_config(lane: Lane) -> String {
    format!(
        "global\n    maxconn 4000\n    nbthread 1\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\nfrontend fe\n    bind {vip}:80\n    default_backend be\n\nbackend be\n    server b1 {be}:8000\n",
        vip = lane.vip(),
        be = lane.backend()
    )
}

fn build(bin: &Path, tmp: &Path) -> Result<Bed> {
    println!("creating netns bed {PREFIX}{{client,backend,fwd,xdpn,xdpg,ipt,hap}}");
    let client = Netns::create(&format!("{PREFIX}client"))?;
    let backend = Netns::create(&format!("{PREFIX}backend"))?;
    let mut lanes = Vec::new();
    for lane in LANES {
        let ns = Netns::create(&lane.ns())?;
        let (i, ci, bi) = (lane.idx, format!("c{}", lane.idx), format!("b{}", lane.idx));
        let (lc, lb) = (format!("l{i}c"), format!("l{i}b"));
        veth(&ns, &lc, &client, &ci)?;
        veth(&ns, &lb, &backend, &bi)?;
        // The benchmark's client and backends play hosts on a wire
        // (complete checksums), the LB namespace keeps default offloads.
        client.tx_off(&ci)?;
        backend.tx_off(&bi)?;
        ns.ip(&["addr", "add", &format!("10.210.{i}.1/24"), "dev", &lc])?;
        ns.ip(&["addr", "add", &format!("10.211.{i}.1/24"), "dev", &lb])?;
        client.ip(&["addr", "add", &format!("{}/24", lane.client()), "dev", &ci])?;
        backend.ip(&["addr", "add", &format!("{}/24", lane.backend()), "dev", &bi])?;
        let gw_c = format!("10.210.{i}.1");
        client.ip(&["route", "add", &format!("10.211.{i}.0/24"), "via", &gw_c])?;
        client.ip(&["route", "add", &format!("{}/32", lane.vip()), "via", &gw_c])?;
        backend.ip(&[
            "route",
            "add",
            &format!("10.210.{i}.0/24"),
            "via",
            &format!("10.211.{i}.1"),
        ])?;
        ns.sysctl("net.ipv4.ip_forward=1")?;
        lanes.push(ns);
    }
    // A load generator's usual settings (see bench.rs): reuse TIME_WAIT
    // ports, and the widest ephemeral range.
    client.sysctl("net.ipv4.tcp_tw_reuse=1")?;
    client.sysctl("net.ipv4.ip_local_port_range=1024 65535")?;
    backend.sysctl("net.core.somaxconn=8192")?;

    let nginx = procs::start_nginx(&backend.name, &tmp.join("nginx"), "b1", 8000)?;

    // meshlb, native and generic.
    let mut daemons = Vec::new();
    let mut peer_pins = Vec::new();
    for (lane, mode) in [(LANES[1], "native"), (LANES[2], "generic")] {
        let cfg = tmp.join(format!("meshlb-{}.toml", lane.tag));
        std::fs::write(&cfg, meshlb_config(lane))?;
        let i = lane.idx;
        if mode == "native" {
            // Native redirect into a veth only delivers when its peer runs
            // an XDP program: a pass-everything one on both far ends.
            for (ns, iface) in [
                (&client.name, format!("c{i}")),
                (&backend.name, format!("b{i}")),
            ] {
                let pins = PathBuf::from(format!("{BPFFS}-peer-{ns}"));
                Daemon::cleanup_pins(bin, &pins);
                Cmd::nsenter(ns, bin.to_string_lossy())
                    .args(["xdp-pass", "--iface", &iface, "--bpffs"])
                    .arg(pins.to_string_lossy())
                    .timeout(Duration::from_secs(20))
                    .run()
                    .with_context(|| format!("xdp-pass on {ns}/{iface}"))?;
                peer_pins.push(pins);
            }
        }
        let pins = PathBuf::from(format!("{BPFFS}-{}", lane.tag));
        Daemon::cleanup_pins(bin, &pins);
        let args: Vec<String> = [
            "--config",
            &cfg.to_string_lossy(),
            "--iface",
            &format!("l{i}c"),
            "--iface",
            &format!("l{i}b"),
            "--xdp-mode",
            mode,
        ]
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
        let mut d = Daemon::start(
            bin,
            &lane.ns(),
            &args,
            &pins,
            &tmp.join(format!("meshlb-{}.log", lane.tag)),
        )?;
        d.wait_ready("web", Duration::from_secs(20))?;
        daemons.push(d);
    }

    // iptables DNAT, kube-proxy iptables-mode style (PREROUTING DNAT, then
    // plain forwarding; conntrack un-NATs the replies).
    let ipt = LANES[3];
    for (proto, port, to) in [
        ("tcp", "80", format!("{}:8000", ipt.backend())),
        (
            "udp",
            &*UDP_PORT_VIP.to_string(),
            format!("{}:{UDP_PORT_SINK}", ipt.backend()),
        ),
    ] {
        Cmd::in_netns(&ipt.ns(), "iptables")
            .args(["-w", "-t", "nat", "-A", "PREROUTING", "-d"])
            .arg(format!("{}/32", ipt.vip()))
            .args([
                "-p",
                proto,
                "--dport",
                port,
                "-j",
                "DNAT",
                "--to-destination",
            ])
            .arg(to)
            .timeout(Duration::from_secs(10))
            .run()?;
    }

    // HAProxy, TCP mode, on its VIP (an address of the lane's loopback).
    let hap = LANES[4];
    lanes[4].ip(&["addr", "add", &format!("{}/32", hap.vip()), "dev", "lo"])?;
    lanes[4].sysctl("net.ipv4.tcp_tw_reuse=1")?;
    lanes[4].sysctl("net.ipv4.ip_local_port_range=1024 65535")?;
    let hcfg = tmp.join("haproxy.cfg");
    std::fs::write(&hcfg, haproxy_config(hap))?;
    let haproxy = Cmd::in_netns(&hap.ns(), "haproxy")
        .args(["-db", "-f"])
        .arg(hcfg.to_string_lossy())
        .spawn_background("haproxy", &tmp.join("haproxy.log"))?;

    Ok(Bed {
        _haproxy: haproxy,
        daemons,
        _nginx: nginx,
        _lanes: lanes,
        backend,
        client,
        peer_pins,
        bin: bin.to_path_buf(),
    })
}

fn wrk(client: &str, target: &str, close: bool, opt: &Options) -> Result<Value> {
    let mut c = Cmd::in_netns(client, "wrk").args([
        "-t1",
        &format!("-c{}", opt.connections),
        &format!("-d{}s", opt.duration_s),
    ]);
    if close {
        c = c.args(["-H", "Connection: close"]);
    }
    let out = c
        .arg(format!("http://{target}/"))
        .timeout(Duration::from_secs(u64::from(opt.duration_s) + 30))
        .stdout()?;
    let s = parse_wrk(&out).with_context(|| format!("parsing wrk output:\n{out}"))?;
    Ok(json!({
        "rps": s.rps,
        "requests": s.requests,
        "socket_errors": s.socket_errors,
        "non_2xx": s.non_2xx,
        "latency_avg_us": s.latency_avg_us,
    }))
}

/// This xtask binary (a private copy: a concurrent `cargo build` may
/// replace the original), run as `bench-helper ARGS` in `ns`; its JSON line.
fn helper(exe: &Path, ns: &str, args: &[String], secs: u64) -> Result<Value> {
    let out = Cmd::in_netns(ns, exe.to_string_lossy())
        .arg("bench-helper")
        .args(args.iter().cloned())
        .timeout(Duration::from_secs(secs + 30))
        .stdout()?;
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("bench-helper output: {out}"))
}

fn rx_packets(ns: &str, iface: &str) -> Result<u64> {
    let out = Cmd::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "dev", iface])
        .timeout(Duration::from_secs(10))
        .stdout()?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .with_context(|| format!("no rx packet count for {ns}/{iface}"))
}

fn udp_round(bed: &Bed, p: &Path4, opt: &Options, tmp: &Path) -> Result<Value> {
    let secs = u64::from(opt.duration_s);
    let exe = tmp.join(HELPER_EXE);
    let iface = format!("b{}", p.lane);
    let before = rx_packets(&bed.backend.name, &iface)?;
    let sink_log = tmp.join(format!("sink-{}.log", p.name));
    let _ = std::fs::remove_file(&sink_log);
    let mut sink = Cmd::in_netns(&bed.backend.name, exe.to_string_lossy())
        .args(["bench-helper", "udp-sink", "--port"])
        .arg(UDP_PORT_SINK.to_string())
        .arg("--secs")
        .arg((secs + 2).to_string())
        .spawn_background("udp sink", &sink_log)?;
    cmd::sleep(Duration::from_millis(300))?;
    let blast = helper(
        &exe,
        &bed.client.name,
        &[
            "udp-blast".into(),
            "--target".into(),
            p.udp_target(),
            "--secs".into(),
            secs.to_string(),
            "--threads".into(),
            UDP_THREADS.to_string(),
        ],
        secs,
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sink.exited().is_none() && std::time::Instant::now() < deadline {
        cmd::sleep(Duration::from_millis(50))?;
    }
    let after = rx_packets(&bed.backend.name, &iface)?;
    let received = std::fs::read_to_string(&sink_log)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Value>(l).ok())
        })
        .and_then(|v| v["received"].as_u64());
    let delivered = after.saturating_sub(before);
    Ok(json!({
        "sent": blast["sent"],
        "delivered": delivered,
        "received": received,
        "pps": delivered as f64 / secs as f64,
        "sent_pps": blast["sent"].as_f64().unwrap_or(0.0) / secs as f64,
    }))
}

fn sample(scenario: &str, path: &str, round: usize, mut v: Value) -> Value {
    v["scenario"] = json!(scenario);
    v["path"] = json!(path);
    v["round"] = json!(round);
    v
}

pub fn dataplane(opt: &Options) -> Result<PathBuf> {
    anyhow::ensure!(opt.rounds >= 1, "--rounds must be at least 1");
    setup::setup()?;
    let bin = match &opt.meshlb {
        Some(b) => b.clone(),
        None => compile::build(Target::X86_64, true)?,
    };
    let _lock = netns::lock_prefix(PREFIX)?;
    netns::remove_stale(PREFIX)?;
    let tmp = TempDir::new("meshlb-bench-peers")?;
    let exe = tmp.path().join(HELPER_EXE);
    std::fs::copy(std::env::current_exe()?, &exe).context("copying the xtask binary")?;
    let bed = build(&bin, tmp.path())?;

    for p in PATHS {
        let url = format!("http://{}/", p.tcp_target());
        let body =
            procs::curl(&bed.client.name, &url, Duration::from_secs(3)).with_context(|| {
                format!("path {} ({url}) does not answer; not benchmarking", p.name)
            })?;
        anyhow::ensure!(body.trim() == "b1", "path {} answered {body:?}", p.name);
    }

    let mut samples: Vec<Value> = Vec::new();
    let mut push = |s: Value| {
        println!(
            "  {:<17} round {:<2} {:<16} {}",
            s["scenario"].as_str().unwrap_or_default(),
            s["round"],
            s["path"].as_str().unwrap_or_default(),
            headline(&s)
        );
        samples.push(s);
    };
    let order = PATHS.iter().map(|p| p.name).collect::<Vec<_>>().join(" ");
    for (scenario, close) in [("keepalive", false), ("conn-per-request", true)] {
        println!("\n== {scenario} ({} rounds, order {order})", opt.rounds);
        for round in 1..=opt.rounds {
            for p in PATHS {
                cmd::check_interrupted()?;
                let v = wrk(&bed.client.name, &p.tcp_target(), close, opt)?;
                push(sample(scenario, p.name, round, v));
            }
        }
    }
    for (scenario, direct, vip) in mixed() {
        println!(
            "\n== {scenario} (conn-per-request, {} rounds, same client address {}: direct then VIP)",
            opt.rounds,
            direct.lane().client()
        );
        for round in 1..=opt.rounds {
            for p in [direct, vip] {
                cmd::check_interrupted()?;
                let v = wrk(&bed.client.name, &p.tcp_target(), true, opt)?;
                push(sample(scenario, p.name, round, v));
            }
        }
    }
    println!(
        "\n== latency ({LATENCY_RATE} req/s paced, connection per request, {} rounds)",
        opt.rounds
    );
    for round in 1..=opt.rounds {
        for p in PATHS {
            cmd::check_interrupted()?;
            let v = helper(
                &exe,
                &bed.client.name,
                &[
                    "paced".into(),
                    "--target".into(),
                    p.tcp_target(),
                    "--rate".into(),
                    LATENCY_RATE.to_string(),
                    "--secs".into(),
                    opt.duration_s.to_string(),
                    "--workers".into(),
                    LATENCY_WORKERS.to_string(),
                ],
                u64::from(opt.duration_s),
            )?;
            push(sample("latency", p.name, round, v));
        }
    }
    println!(
        "\n== udp ({UDP_THREADS} blaster threads, 18-byte datagrams, {} rounds)",
        opt.rounds
    );
    for round in 1..=opt.rounds {
        for p in PATHS.iter().filter(|p| p.udp) {
            cmd::check_interrupted()?;
            let v = udp_round(&bed, p, opt, tmp.path())?;
            push(sample("udp", p.name, round, v));
        }
    }

    let logs: Value = bed
        .daemons
        .iter()
        .map(|d| (d.ns.clone(), json!(d.log_tail(100))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    drop(bed);
    let file = write(samples, opt, &bin, logs)?;
    drop(tmp);
    crate::report::print_dataplane(&serde_json::from_str(&std::fs::read_to_string(&file)?)?);
    println!("\nraw samples: {}", file.display());
    Ok(file)
}

fn headline(s: &Value) -> String {
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    match s["scenario"].as_str() {
        Some("latency") => format!(
            "p50 {:.0} us  p99 {:.0} us  ({} errors)",
            f("p50_us"),
            f("p99_us"),
            s["errors"]
        ),
        Some("udp") => format!(
            "{:>10.0} pkt/s delivered  (sent {:.0}/s, sink got {})",
            f("pps"),
            f("sent_pps"),
            s["received"]
        ),
        _ => format!(
            "{:>9.0} req/s  ({} socket errors, {} non-2xx)",
            f("rps"),
            s["socket_errors"],
            s["non_2xx"]
        ),
    }
}

/// The machine, versions and command line, shared by every results file.
pub fn machine() -> Value {
    let first_line = |prog: &str, args: &[&str]| {
        Cmd::new(prog)
            .args(args.iter().copied())
            .timeout(Duration::from_secs(10))
            .output_unchecked()
            .map(|o| {
                let t = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                t.lines().next().unwrap_or_default().trim().to_string()
            })
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or_default()
        .trim()
        .to_string();
    json!({
        "uname": first_line("uname", &["-a"]),
        "cpu": cpu,
        "nproc": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "rustc": first_line("rustc", &["--version"]),
        "wrk": first_line("wrk", &["-v"]),
        "nginx": first_line("nginx", &["-v"]),
        "haproxy": first_line("haproxy", &["-v"]),
        "iptables": first_line("iptables", &["-V"]),
        "meshlb_commit": first_line("git", &["rev-parse", "--short", "HEAD"]),
    })
}

pub fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

fn write(samples: Vec<Value>, opt: &Options, bin: &Path, logs: Value) -> Result<PathBuf> {
    let stamp = utc_stamp();
    let dir = crate::root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let doc = json!({
        "suite": "dataplane",
        "timestamp": stamp,
        "command": command_line(),
        "machine": machine(),
        "setup": {
            "topology": "client ns -> one LB ns per path -> backend ns; veth, tx offload off on the client and backend ends (hosts on a wire), LB at defaults; every path its own client and backend address",
            "paths": PATHS.iter().map(|p| json!({
                "name": p.name,
                "namespace": p.lane().ns(),
                "client_source": p.lane().client(),
                "target": p.tcp_target(),
                "udp_target": if p.udp { Some(p.udp_target()) } else { None },
            })).collect::<Vec<_>>(),
            "mixed": mixed().iter().map(|(s, d, v)| json!({
                "scenario": s, "client_source": d.lane().client(),
                "direct": d.tcp_target(), "vip": v.tcp_target(),
            })).collect::<Vec<_>>(),
            "backend": "nginx-light, 1 worker, access_log off, :8000",
            "meshlb": bin.display().to_string(),
            "haproxy": "mode tcp, maxconn 4000, nbthread 1",
            "iptables": "nat PREROUTING DNAT VIP:80 -> backend:8000 (and udp :90 -> :9000), kernel forwarding",
            "rounds": opt.rounds,
            "duration_s": opt.duration_s,
            "wrk": format!("-t1 -c{} -d{}s", opt.connections, opt.duration_s),
            "latency": format!("paced open-loop client, {LATENCY_RATE} req/s, {LATENCY_WORKERS} workers, new connection per request, latency from the scheduled send time"),
            "udp": format!("{UDP_THREADS} threads x connected UDP socket, 18-byte payload, send() loop; pps = packets received on the backend's veth / duration"),
            "order": "interleaved per round in path order",
        },
        "samples": samples,
        "meshlb_log_tail": logs,
    });
    let file = dir.join(format!("{stamp}-dataplane.json"));
    std::fs::write(&file, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(file)
}
