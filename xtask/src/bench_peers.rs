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
//! | 6    | `mlbp-bare`  | bare-forwarder   | 10.211.6.2:9000 (UDP only) |
//!
//! Lane 1 is plain kernel forwarding (no XDP, no netfilter rules). Lane 6
//! is kernel forwarding with `meshlb_bare` (parse, FIB lookup, TTL, MACs,
//! redirect: what any routing XDP program must do) attached natively to
//! its client-facing veth, the reference of the XDP paths. UDP :90 on each
//! DNAT VIP goes to backend :9000 (HAProxy has no UDP). A last namespace,
//! `mlbp-gsink`, only takes the packet generator's frames (its ceiling).
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
//! * `udp`: frames from the packet generator (bench/pktgen.rs, out of the
//!   client's veth, no socket buffer per frame: BPF_PROG_TEST_RUN in
//!   live-frames mode, or where the kernel refuses live frames (EPERM on
//!   this project's VM kernel) an AF_XDP socket in copy mode); packets/s
//!   that reach the backend's IP layer, beside the frames/s the generator
//!   sent, and the generator's own ceiling (into a namespace that drops
//!   everything), all interleaved per round. Where neither runs, the
//!   socket blaster of [`crate::loadgen`] sends instead. The results say
//!   which sender ran and why the ones before it did not.
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
/// Packet generator: sending threads (pinned from CPU [`GEN_CPU`] on),
/// frames per live-frames batch. AF_XDP and the socket blaster run one
/// thread on the same CPU.
const GEN_THREADS: u32 = 1;
const GEN_CPU: u32 = 0;
const GEN_BATCH: u32 = 64;
/// The generator's UDP source port (the low 4 bits vary: 16 flows).
const GEN_SPORT: u16 = 40000;
/// The namespace and veth (client end, far end) of the generator's ceiling.
const GSINK_TAG: &str = "gsink";
/// The UDP scenario's path name of the sender's ceiling.
const CEILING: &str = "sender-ceiling";
const GSINK_IF: (&str, &str) = ("g0", "g0p");
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
    Lane {
        idx: 6,
        tag: "bare",
    },
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
    tcp: bool,
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
        tcp: true,
        udp: true,
    },
    Path4 {
        name: "meshlb-native",
        lane: 2,
        via_vip: true,
        tcp: true,
        udp: true,
    },
    Path4 {
        name: "meshlb-generic",
        lane: 3,
        via_vip: true,
        tcp: true,
        udp: true,
    },
    Path4 {
        name: "iptables",
        lane: 4,
        via_vip: true,
        tcp: true,
        udp: true,
    },
    Path4 {
        name: "haproxy",
        lane: 5,
        via_vip: true,
        tcp: true,
        udp: false,
    },
    Path4 {
        name: "bare-forwarder",
        lane: 6,
        via_vip: false,
        tcp: false,
        udp: true,
    },
];

/// The mixed scenarios: (scenario, direct path through the lane, VIP path).
fn mixed() -> [(&'static str, Path4, Path4); 2] {
    let direct = |lane| Path4 {
        name: "direct-same-src",
        lane,
        via_vip: false,
        tcp: true,
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
    /// `pktgen attach-bare` on lane 6 (the link goes with the process).
    _bare: Background,
    daemons: Vec<Daemon>,
    _nginx: Background,
    _lanes: Vec<Netns>,
    _gsink: Netns,
    _backend: Netns,
    client: Netns,
    peer_pins: Vec<PathBuf>,
    bin: PathBuf,
    /// The packet generator (a private copy of the `pktgen` bench binary).
    pktgen: PathBuf,
    /// What the UDP scenario attached and set where, for the results file.
    receivers: Vec<String>,
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

fn build(bin: &Path, pktgen: &Path, tmp: &Path) -> Result<Bed> {
    println!("creating netns bed {PREFIX}{{client,backend,fwd,xdpn,xdpg,ipt,hap,bare,gsink}}");
    let client = Netns::create(&format!("{PREFIX}client"))?;
    let backend = Netns::create(&format!("{PREFIX}backend"))?;
    let gsink = Netns::create(&format!("{PREFIX}{GSINK_TAG}"))?;
    veth(&client, GSINK_IF.0, &gsink, GSINK_IF.1)?;
    client.tx_off(GSINK_IF.0)?;
    client.ip(&["addr", "add", "10.212.0.2/24", "dev", GSINK_IF.0])?;
    gsink.ip(&["addr", "add", "10.212.0.1/24", "dev", GSINK_IF.1])?;
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

    // Native redirect (and XDP_TX) into a veth only delivers when its peer
    // runs an XDP program: a pass-everything one on the far ends of the
    // XDP lanes (meshlb native: both; the bare forwarder: the backend's).
    // The sender's sink takes frames as the direct lane does (GRO, set
    // with the UDP scenario): XDP on skbs from a socket would copy each.
    let mut peer_pins = Vec::new();
    let (xn, bare) = (LANES[1].idx, LANES[5].idx);
    for (ns, ifaces) in [
        (&client.name, vec![format!("c{xn}")]),
        (&backend.name, vec![format!("b{xn}"), format!("b{bare}")]),
    ] {
        let pins = PathBuf::from(format!("{BPFFS}-peer-{ns}"));
        Daemon::cleanup_pins(bin, &pins);
        let mut c = Cmd::nsenter(ns, bin.to_string_lossy()).arg("xdp-pass");
        for i in &ifaces {
            c = c.args(["--iface", i]);
        }
        c.arg("--bpffs")
            .arg(pins.to_string_lossy())
            .timeout(Duration::from_secs(20))
            .run()
            .with_context(|| format!("xdp-pass on {ns}/{ifaces:?}"))?;
        peer_pins.push(pins);
    }

    // The bare forwarder, natively on lane 6's client-facing veth.
    let bare_ns = LANES[5].ns();
    let bare_log = tmp.join("attach-bare.log");
    let mut bare_fwd = Cmd::new(pktgen.to_string_lossy())
        .args(["attach-bare", "--netns", &bare_ns, "--iface"])
        .arg(format!("l{bare}c"))
        .spawn_background("bare forwarder", &bare_log)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&bare_log)
        .unwrap_or_default()
        .contains("\"attached\"")
    {
        anyhow::ensure!(
            bare_fwd.exited().is_none() && std::time::Instant::now() < deadline,
            "pktgen attach-bare did not attach:\n{}",
            bare_fwd.log_tail(20)
        );
        cmd::sleep(Duration::from_millis(50))?;
    }

    // meshlb, native and generic.
    let mut daemons = Vec::new();
    for (lane, mode) in [(LANES[1], "native"), (LANES[2], "generic")] {
        let cfg = tmp.join(format!("meshlb-{}.toml", lane.tag));
        std::fs::write(&cfg, meshlb_config(lane))?;
        let i = lane.idx;
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
        _bare: bare_fwd,
        daemons,
        _nginx: nginx,
        _lanes: lanes,
        _gsink: gsink,
        _backend: backend,
        client,
        peer_pins,
        bin: bin.to_path_buf(),
        pktgen: pktgen.to_path_buf(),
        receivers: Vec::new(),
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

fn link(ns: &str, iface: &str) -> Result<Value> {
    let out = Cmd::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "dev", iface])
        .timeout(Duration::from_secs(10))
        .stdout()?;
    let v: Value = serde_json::from_str(&out)?;
    Ok(v[0].clone())
}

fn rx_packets(ns: &str, iface: &str) -> Result<u64> {
    link(ns, iface)?["stats64"]["rx"]["packets"]
        .as_u64()
        .with_context(|| format!("no rx packet count for {ns}/{iface}"))
}

fn mac_of(ns: &str, iface: &str) -> Result<String> {
    link(ns, iface)?["address"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no MAC address for {ns}/{iface}"))
}

/// One target of the packet generator: the client veth its frames leave
/// by (the next hop is that veth's peer), their addresses, and where
/// their arrival is counted.
struct UdpLane {
    name: String,
    out_if: String,
    /// The peer of `out_if`: (namespace, interface).
    next_hop: (String, String),
    src: String,
    dst: String,
    /// The far end: (namespace, interface) whose raw-table rule counts
    /// (and drops) what arrives addressed to `arrive`.
    sink: (String, String),
    /// The address the frames must reach: the backend's (VIP paths:
    /// translated).
    arrive: (String, u16),
}

impl UdpLane {
    fn of(p: &Path4) -> UdpLane {
        let lane = p.lane();
        UdpLane {
            name: p.name.to_string(),
            out_if: format!("c{}", lane.idx),
            next_hop: (lane.ns(), format!("l{}c", lane.idx)),
            src: format!("{}:{GEN_SPORT}", lane.client()),
            dst: p.udp_target(),
            sink: (format!("{PREFIX}backend"), format!("b{}", lane.idx)),
            arrive: (lane.backend(), UDP_PORT_SINK),
        }
    }

    /// The generator's ceiling: into a namespace that drops every frame.
    fn ceiling() -> UdpLane {
        let ns = format!("{PREFIX}{GSINK_TAG}");
        UdpLane {
            name: CEILING.into(),
            out_if: GSINK_IF.0.into(),
            next_hop: (ns.clone(), GSINK_IF.1.into()),
            src: format!("10.212.0.2:{GEN_SPORT}"),
            dst: format!("10.212.0.1:{UDP_PORT_SINK}"),
            sink: (ns, GSINK_IF.1.into()),
            arrive: ("10.212.0.1".into(), UDP_PORT_SINK),
        }
    }

    /// The raw-table rule (PREROUTING, so before routing and conntrack)
    /// that counts what reaches the far end's IP layer addressed as
    /// translated, and drops it there: the backend's own socket costs are
    /// not part of the figure.
    fn rule(&self) -> Vec<String> {
        let (ip, port) = (&self.arrive.0, self.arrive.1.to_string());
        [
            "-i",
            &self.sink.1,
            "-d",
            ip,
            "-p",
            "udp",
            "--dport",
            &port,
            "-j",
            "DROP",
        ]
        .iter()
        .map(std::string::ToString::to_string)
        .collect()
    }
}

/// The packets counted by `l`'s raw-table rule so far.
fn delivered(l: &UdpLane) -> Result<u64> {
    let out = Cmd::in_netns(&l.sink.0, "iptables-save")
        .args(["-c", "-t", "raw"])
        .timeout(Duration::from_secs(10))
        .stdout()?;
    let want = format!("-i {} ", l.sink.1);
    out.lines()
        .filter(|line| line.contains(&want) && line.contains("-A PREROUTING"))
        .find_map(|line| {
            let counts = line.strip_prefix('[')?.split(']').next()?;
            counts.split(':').next()?.parse().ok()
        })
        .with_context(|| format!("no counter rule for {}/{} in:\n{out}", l.sink.0, l.sink.1))
}

/// What sends the UDP scenario's frames: the first of live frames,
/// AF_XDP, the socket blaster that runs here.
enum Sender {
    /// bench/pktgen.rs: BPF_PROG_TEST_RUN in live-frames mode.
    LiveFrames,
    /// bench/pktgen.rs: an AF_XDP socket in copy mode; why live frames
    /// did not run.
    AfXdp { live: String },
    /// The socket blaster of [`crate::loadgen`] (`send()` per datagram,
    /// one thread on [`GEN_CPU`]); why live frames and AF_XDP did not run.
    Blaster { live: String, xsk: String },
}

impl Sender {
    /// The results file's `udp_sender`.
    fn key(&self) -> &'static str {
        match self {
            Sender::LiveFrames => "generator (live frames)",
            Sender::AfXdp { .. } => "generator (AF_XDP, copy mode)",
            Sender::Blaster { .. } => "socket-blaster",
        }
    }

    /// `pktgen send --via`, for the generator's two paths.
    fn via(&self) -> Option<&'static str> {
        match self {
            Sender::LiveFrames => Some("live-frames"),
            Sender::AfXdp { .. } => Some("af-xdp"),
            Sender::Blaster { .. } => None,
        }
    }

    /// Why the senders before this one did not run.
    fn refused(&self) -> Value {
        match self {
            Sender::LiveFrames => json!({}),
            Sender::AfXdp { live } => json!({ "live-frames": live }),
            Sender::Blaster { live, xsk } => json!({ "live-frames": live, "af-xdp": xsk }),
        }
    }

    fn describe(&self) -> String {
        let frame = "one 60-byte IPv4 UDP template frame (18-byte payload) from the lane's client address, 16 source ports, UDP checksum 0";
        match self {
            Sender::LiveFrames => format!(
                "packet generator bench/pktgen.rs: meshlb_gen through BPF_PROG_TEST_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES), {GEN_THREADS} thread pinned to CPU {GEN_CPU}, batch {GEN_BATCH}, {frame}, XDP_TX out of the client's veth of the lane"
            ),
            Sender::AfXdp { live } => format!(
                "packet generator bench/pktgen.rs over AF_XDP in copy mode (XDP_COPY), because this kernel refused live frames ({live}): 1 thread pinned to CPU {GEN_CPU}, one socket on queue 0 of the client's veth of the lane, a UMEM of 4096 2048-byte frames each holding {frame}; descriptors through the TX ring 64 at a time, one sendto kick per batch, the kernel's generic xmit building an skb per frame straight into the veth (no qdisc), so a native XDP program on the next hop gets an skb, as from any socket (veth runs XDP on it, copying it into a page when its headroom is short of XDP's); frames counted from the completion ring"
            ),
            Sender::Blaster { live, xsk } => format!(
                "socket blaster (`bench-helper udp-blast`: 1 thread pinned to CPU {GEN_CPU}, one connected UDP socket, send() of 18-byte datagrams) because this kernel refused the packet generator's live frames ({live}) and its AF_XDP socket ({xsk})"
            ),
        }
    }
}

/// pktgen's own message of a failed run, without the command line before
/// it.
fn pktgen_error(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    text.rsplit_once("error: ")
        .map_or(text.as_str(), |(_, m)| m)
        .trim()
        .to_string()
}

/// The first sender the kernel runs: a short run of each generator path
/// into the generator's sink namespace, else the socket blaster.
fn pick_sender(bed: &Bed) -> Sender {
    let live = match generate(bed, &UdpLane::ceiling(), "live-frames", 0.2) {
        Ok(_) => return Sender::LiveFrames,
        Err(e) => pktgen_error(&e),
    };
    println!("  live frames refused here, trying AF_XDP: {live}");
    let xsk = match generate(bed, &UdpLane::ceiling(), "af-xdp", 0.2) {
        Ok(v) if v["frames"].as_u64().unwrap_or(0) > 0 => return Sender::AfXdp { live },
        Ok(v) => format!("a trial run completed no frame: {v}"),
        Err(e) => pktgen_error(&e),
    };
    println!("  AF_XDP does not run here either; falling back to the socket blaster: {xsk}");
    Sender::Blaster { live, xsk }
}

/// `pktgen send --via via` for `secs` out of `l`'s client veth; its JSON
/// line.
fn generate(bed: &Bed, l: &UdpLane, via: &str, secs: f64) -> Result<Value> {
    let out = Cmd::new(bed.pktgen.to_string_lossy())
        .args(["send", "--via", via])
        .args(["--netns", &bed.client.name, "--iface", &l.out_if])
        .arg("--src-mac")
        .arg(mac_of(&bed.client.name, &l.out_if)?)
        .arg("--dst-mac")
        .arg(mac_of(&l.next_hop.0, &l.next_hop.1)?)
        .args(["--src", &l.src, "--dst", &l.dst])
        .args(["--seconds", &secs.to_string()])
        .args(["--batch", &GEN_BATCH.to_string()])
        .args(["--threads", &GEN_THREADS.to_string()])
        .args(["--cpu", &GEN_CPU.to_string()])
        .timeout(Duration::from_secs_f64(secs + 30.0))
        .stdout()?;
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("pktgen send output: {out}"))
}

/// The blaster for `secs` to `l`'s destination; its JSON line, with
/// `frames` and `elapsed_s` as the generator reports them.
fn blast(exe: &Path, bed: &Bed, l: &UdpLane, secs: u64) -> Result<Value> {
    let out = Cmd::in_netns(&bed.client.name, "taskset")
        .args(["-c", &GEN_CPU.to_string()])
        .arg(exe.to_string_lossy())
        .args(["bench-helper", "udp-blast", "--target", &l.dst])
        .args(["--secs", &secs.to_string(), "--threads", "1"])
        .timeout(Duration::from_secs(secs + 30))
        .stdout()?;
    let line = out.lines().last().unwrap_or_default();
    let mut v: Value =
        serde_json::from_str(line).with_context(|| format!("bench-helper output: {out}"))?;
    v["frames"] = v["sent"].clone();
    v["elapsed_s"] = v["secs"].clone();
    Ok(v)
}

/// Before the UDP rounds, so the TCP scenarios keep their settings: every
/// frame the generator sends must be taken by its next hop (a veth takes
/// frames sent with `ndo_xdp_xmit` only when it has NAPI: a native XDP
/// program, or GRO on), and the next hop's NAPI runs threaded, in a
/// kernel thread, not in the generator's softirq on the generator's CPU;
/// the far ends count with a raw-table rule. Returns the lanes in round
/// order and the sender, and says what was set where in `bed.receivers`.
fn udp_prepare(bed: &mut Bed) -> Result<(Vec<UdpLane>, Sender)> {
    let mut lanes = vec![UdpLane::ceiling()];
    lanes.extend(PATHS.iter().filter(|p| p.udp).map(UdpLane::of));
    let mut said = Vec::new();
    for l in &lanes {
        let (ns, iface) = (&l.next_hop.0, &l.next_hop.1);
        let xdp = link(ns, iface)?["xdp"].clone();
        let native = xdp["mode"].as_u64() == Some(1)
            || xdp["attached"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["mode"].as_u64() == Some(1)));
        let napi = if native {
            format!("native XDP ({})", xdp_prog_name(&xdp))
        } else {
            Cmd::in_netns(ns, "ethtool")
                .args(["-K", iface, "gro", "on"])
                .timeout(Duration::from_secs(10))
                .run()?;
            let generic = if xdp.is_null() {
                String::new()
            } else {
                format!(", generic XDP ({})", xdp_prog_name(&xdp))
            };
            format!("GRO on{generic}")
        };
        Cmd::in_netns(ns, "sh")
            .arg("-c")
            .arg(format!("echo 1 > /sys/class/net/{iface}/threaded"))
            .timeout(Duration::from_secs(10))
            .run()
            .with_context(|| format!("threaded NAPI on {ns}/{iface}"))?;
        let threaded = Cmd::in_netns(ns, "cat")
            .arg(format!("/sys/class/net/{iface}/threaded"))
            .timeout(Duration::from_secs(10))
            .stdout()?;
        anyhow::ensure!(
            threaded.trim() == "1",
            "{ns}/{iface} refused threaded NAPI (reads {threaded:?})"
        );
        Cmd::in_netns(&l.sink.0, "iptables")
            .args(["-w", "-t", "raw", "-A", "PREROUTING"])
            .args(l.rule())
            .timeout(Duration::from_secs(10))
            .run()?;
        let far = link(&l.sink.0, &l.sink.1)?["xdp"].clone();
        said.push(format!(
            "{}: client {} -> {}/{} ({napi}, threaded NAPI); counted at {}/{} ({}), raw PREROUTING `{}`",
            l.name,
            l.out_if,
            ns,
            iface,
            l.sink.0,
            l.sink.1,
            if far.is_null() {
                "no XDP: skbs from the kernel's forwarding".to_string()
            } else {
                format!("native XDP ({})", xdp_prog_name(&far))
            },
            l.rule().join(" ")
        ));
    }
    for line in &said {
        println!("  {line}");
    }
    bed.receivers = said;
    let sender = pick_sender(bed);
    Ok((lanes, sender))
}

/// The program name(s) of `ip -j link`'s `xdp` object.
fn xdp_prog_name(xdp: &Value) -> String {
    let mut names: Vec<String> = xdp["attached"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["prog"]["name"].as_str().map(str::to_string))
        .collect();
    if let Some(n) = xdp["prog"]["name"].as_str() {
        names.push(n.to_string());
    }
    names.dedup();
    if names.is_empty() {
        "program".into()
    } else {
        names.join(", ")
    }
}

fn udp_round(bed: &Bed, l: &UdpLane, sender: &Sender, exe: &Path, opt: &Options) -> Result<Value> {
    let secs = u64::from(opt.duration_s);
    let (before, rx_before) = (delivered(l)?, rx_packets(&l.sink.0, &l.sink.1)?);
    let gen = match sender.via() {
        Some(via) => generate(bed, l, via, secs as f64)?,
        None => blast(exe, bed, l, secs)?,
    };
    // What is still in the rings arrives within milliseconds.
    cmd::sleep(Duration::from_millis(200))?;
    let got = delivered(l)?.saturating_sub(before);
    let rx = rx_packets(&l.sink.0, &l.sink.1)?.saturating_sub(rx_before);
    let sent = gen["frames"].as_u64().unwrap_or(0);
    let elapsed = gen["elapsed_s"].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "sent": sent,
        "sent_pps": sent as f64 / elapsed,
        "delivered": got,
        "pps": got as f64 / elapsed,
        "far_end_rx": rx,
        "loss": if sent == 0 { f64::NAN } else { 1.0 - got as f64 / sent as f64 },
        "elapsed_s": elapsed,
        "sender": gen,
    }))
}

/// `cargo bench --no-run --bench pktgen` (once per run), and a private
/// copy of the binary in `tmp` (a concurrent build may replace the
/// original).
fn pktgen_binary(tmp: &Path) -> Result<PathBuf> {
    let out = Cmd::new("cargo")
        .args(["bench", "--no-run", "--bench", "pktgen"])
        .args(["--message-format", "json-render-diagnostics"])
        .timeout(Duration::from_secs(3600))
        .stdout()
        .context("building the packet generator (bench/pktgen.rs)")?;
    let exe = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "pktgen")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo reported no pktgen executable")?;
    let copy = tmp.join("pktgen");
    std::fs::copy(&exe, &copy).with_context(|| format!("copying {}", exe.display()))?;
    println!(
        "packet generator: {} (from {})",
        copy.display(),
        exe.display()
    );
    Ok(copy)
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
    let pktgen = pktgen_binary(tmp.path())?;
    let mut bed = build(&bin, &pktgen, tmp.path())?;

    for p in PATHS.iter().filter(|p| p.tcp) {
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
    let tcp_paths: Vec<&Path4> = PATHS.iter().filter(|p| p.tcp).collect();
    let order = tcp_paths
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(" ");
    for (scenario, close) in [("keepalive", false), ("conn-per-request", true)] {
        println!("\n== {scenario} ({} rounds, order {order})", opt.rounds);
        for round in 1..=opt.rounds {
            for p in &tcp_paths {
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
        for p in &tcp_paths {
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
        "\n== udp ({} rounds, generator's ceiling first)",
        opt.rounds
    );
    let (udp, sender) = udp_prepare(&mut bed)?;
    println!("  sender: {}", sender.describe());
    for round in 1..=opt.rounds {
        for l in &udp {
            cmd::check_interrupted()?;
            let v = udp_round(&bed, l, &sender, &exe, opt)?;
            push(sample("udp", &l.name, round, v));
        }
    }

    let receivers = std::mem::take(&mut bed.receivers);
    let logs: Value = bed
        .daemons
        .iter()
        .map(|d| (d.ns.clone(), json!(d.log_tail(100))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    drop(bed);
    let file = write(samples, opt, &bin, logs, (sender, receivers))?;
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
            "{:>10.0} pkt/s delivered  (sender sent {:.0}/s, loss {:.1} %)",
            f("pps"),
            f("sent_pps"),
            100.0 * f("loss")
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

fn write(
    samples: Vec<Value>,
    opt: &Options,
    bin: &Path,
    logs: Value,
    (sender, receivers): (Sender, Vec<String>),
) -> Result<PathBuf> {
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
                "target": if p.tcp { p.tcp_target() } else { "–".into() },
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
            "udp": format!("{}; pps = packets counted by a raw PREROUTING rule at the far end (addressed to the backend:{UDP_PORT_SINK}, dropped there) / the sender's elapsed time; sent_pps = what the sender sent; path `sender-ceiling` = the same sender into a namespace that drops everything (the sender's ceiling)", sender.describe()),
            "udp_sender": sender.key(),
            "udp_sender_refused": sender.refused(),
            "udp_receivers": receivers,
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
