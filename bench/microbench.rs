//! Driver of `cargo xtask bench microbench` (Katran's perf mode): the
//! cost per packet of the XDP programs, run on crafted frames through
//! BPF_PROG_TEST_RUN — `meshlb_xdp` (conntrack hit, conntrack miss) against
//! the bare forwarder `meshlb_bare` (what any routing XDP program must
//! do: parse, FIB lookup, TTL, MACs, redirect — on frames addressed to
//! the backend) and the empty `meshlb_pass` (the harness floor), IPv4 and
//! IPv6.
//!
//! # Method
//!
//! The kernel does not restore the frame between the repetitions of one
//! `repeat` run: after the first DNAT the frame is addressed to the
//! backend, so every later repetition of `meshlb_xdp` would measure the
//! "not a service" path (this binary checks that with the counters and
//! records it). So every program is timed the same way: many calls with
//! `repeat = 1` and a fresh frame each, summing the kernel's own duration
//! of each run (which covers the program plus one `ktime_get_ns` and the
//! bh disable/enable around it — the `pass` floor, subtracted for the
//! "net" figures). `repeat = N` runs of the one idempotent program
//! (pass; the bare forwarder decrements the TTL, so its frame changes
//! too) are recorded as a cross-check of that floor.
//!
//! * hit: an ACK of one established flow (its conntrack entry made by a
//!   SYN beforehand); the same frame every call;
//! * miss: a SYN from a new source (address, port) every call — a new
//!   flow each time: frontend hit, conntrack miss, Maglev, two LRU
//!   inserts. Past `MAX_FLOWS` flows the LRU evicts, as a busy node would.
//!
//! Maps are programmed by the daemon's own path (config → desired state →
//! reconciler → `apply_maps`); the FIB lookups run in a private netns
//! (`mlbp-mb-<pid>`) with static neighbours, as in tests/datapath.rs.
//! Without `--out` (as `cargo test --all-targets` runs it) it does nothing.

#![forbid(unsafe_code)]

#[path = "common/ipv4.rs"]
mod ipv4;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya::Ebpf;
use clap::Parser;
use meshlb::engine::xdp::{apply_maps, cleanup, observe_maps};
use meshlb::kernel::pinned::Maps;
use meshlb_common::Counter;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Write every sample as JSON here (the xtask adds machine info).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rounds; each times every case once, in turn.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// `repeat = 1` calls per case and round.
    #[arg(long, default_value_t = 200_000)]
    calls: u32,
    /// `repeat` of the cross-check runs of the idempotent programs.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

const CONFIG: &str = r#"
node = "microbench"
[[service]]
name = "web"
vip = "10.96.0.10"
publish = [{ proto = "tcp", port = 80, target = 8000 }]
[[service.backend]]
addr = "10.201.1.2"

[[service]]
name = "web6"
vip = "fd00:96::10"
publish = [{ proto = "tcp", port = 8080, target = 8000 }]
[[service.backend]]
addr = "fd00:201:1::2"
"#;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// A TCP frame client → VIP:80 (v6: :8080) (64 bytes of headers + a short payload);
/// checksums as a sender would set them (the program only updates them).
fn frame(v6: bool, src_low: u16, sport: u16, flags: u8) -> Vec<u8> {
    frame_to(v6, src_low, sport, flags, false)
}

/// `frame`, or with `to_backend` the same addressed to the backend
/// itself (10.201.1.2:8000, v6 [fd00:201:1::2]:8000): what the bare
/// forwarder routes.
fn frame_to(v6: bool, src_low: u16, sport: u16, flags: u8, to_backend: bool) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    let payload = b"GET / HTTP/1.0\r\n\r\n";
    let mut tcp = Vec::new();
    tcp.extend(sport.to_be_bytes());
    let dport: u16 = match (to_backend, v6) {
        (true, _) => 8000,
        (false, true) => 8080,
        (false, false) => 80,
    };
    tcp.extend(dport.to_be_bytes());
    tcp.extend(1000u32.to_be_bytes());
    tcp.extend(if flags & ACK != 0 { 2000u32 } else { 0 }.to_be_bytes());
    tcp.extend([0x50, flags, 0xff, 0xff, 0x12, 0x34, 0, 0]);
    tcp.extend(payload);
    let [hi, lo] = src_low.to_be_bytes();
    if v6 {
        f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend((tcp.len() as u16).to_be_bytes());
        f.extend([6, 64]);
        f.extend([0xfd, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, hi, lo]);
        f.extend(
            if to_backend {
                "fd00:201:1::2"
            } else {
                "fd00:96::10"
            }
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
        );
    } else {
        f.extend([0x08, 0x00]);
        let mut ip = vec![0x45, 0];
        ip.extend(((20 + tcp.len()) as u16).to_be_bytes());
        ip.extend([0x12, 0x34, 0x40, 0x00, 64, 6, 0, 0]);
        ip.extend([10, 200, hi, lo]);
        ip.extend(if to_backend {
            [10, 201, 1, 2]
        } else {
            [10, 96, 0, 10]
        });
        ipv4::set_header_checksum(&mut ip);
        f.extend(ip);
    }
    f.extend(tcp);
    f
}

#[derive(Clone, Copy, PartialEq)]
enum Flow {
    /// The same frame every call.
    Fixed,
    /// The ACK of one established flow.
    Hit,
    /// A SYN of a new flow every call.
    Miss,
}

struct Case {
    name: &'static str,
    prog: &'static str,
    v6: bool,
    flow: Flow,
}

const CASES: &[Case] = &[
    Case {
        name: "pass-v4",
        prog: meshlb_common::PROG_XDP_PASS,
        v6: false,
        flow: Flow::Fixed,
    },
    Case {
        name: "bare-v4",
        prog: meshlb_common::PROG_XDP_BARE,
        v6: false,
        flow: Flow::Fixed,
    },
    Case {
        name: "lb-hit-v4",
        prog: meshlb_common::PROG_XDP_LB,
        v6: false,
        flow: Flow::Hit,
    },
    Case {
        name: "lb-miss-v4",
        prog: meshlb_common::PROG_XDP_LB,
        v6: false,
        flow: Flow::Miss,
    },
    Case {
        name: "bare-v6",
        prog: meshlb_common::PROG_XDP_BARE,
        v6: true,
        flow: Flow::Fixed,
    },
    Case {
        name: "lb-hit-v6",
        prog: meshlb_common::PROG_XDP_LB,
        v6: true,
        flow: Flow::Hit,
    },
    Case {
        name: "lb-miss-v6",
        prog: meshlb_common::PROG_XDP_LB,
        v6: true,
        flow: Flow::Miss,
    },
];

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The namespace the FIB lookups see: routes and static neighbours for the
/// backends (via fxa) and clients (via fxb). Deleted on drop, with the pins.
struct Fixture {
    ns: String,
    pins: PathBuf,
}

impl Fixture {
    fn new() -> Result<Fixture> {
        let ns = format!("mlbp-mb-{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh(&["ip", "netns", "add", &ns])?;
        let fx = Fixture {
            pins: PathBuf::from(format!("/sys/fs/bpf/{ns}")),
            ns,
        };
        for cmd in [
            "link add fxa type veth peer name fxb",
            "link set fxa address 02:00:00:00:01:01",
            "link set fxb address 02:00:00:00:02:01",
            "link set lo up",
            "link set fxa up",
            "link set fxb up",
            "addr add 10.201.1.1/24 dev fxa",
            "addr add 10.200.0.1/16 dev fxb",
            "addr add fd00:201:1::1/64 dev fxa nodad",
            "addr add fd00:200::1/64 dev fxb nodad",
            "neigh replace 10.201.1.2 lladdr 02:00:00:00:01:02 dev fxa nud permanent",
            "neigh replace fd00:201:1::2 lladdr 02:00:00:00:01:02 dev fxa nud permanent",
        ] {
            let mut v = vec!["ip", "-n", &fx.ns];
            v.extend(cmd.split_whitespace());
            sh(&v)?;
        }
        for kv in [
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv6.conf.all.forwarding=1",
        ] {
            sh(&["ip", "netns", "exec", &fx.ns, "sysctl", "-qw", kv])?;
        }
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        if !mounts.contains("/sys/fs/bpf bpf") {
            sh(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"])?;
        }
        Ok(fx)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = cleanup(&self.pins);
        let _ = std::fs::remove_dir(&self.pins);
    }
}

fn load(pins: &Path) -> Result<(Ebpf, Maps)> {
    let _ = cleanup(pins);
    std::fs::create_dir_all(pins)?;
    let mut ebpf = meshlb::engine::xdp::loader()
        .default_map_pin_directory(pins)
        .load(meshlb::EBPF_OBJECT)
        .context("loading the eBPF object")?;
    let mut maps = Maps::from_ebpf(&mut ebpf)?;
    for name in [
        meshlb_common::PROG_XDP_LB,
        meshlb_common::PROG_XDP_BARE,
        meshlb_common::PROG_XDP_PASS,
    ] {
        let p: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the object"))?
            .try_into()?;
        p.load()
            .with_context(|| format!("verifier rejects {name}"))?;
    }
    let cfg = meshlb::source::config::parse(CONFIG)?;
    let locals = ["10.200.0.1", "fd00:200::1"]
        .iter()
        .map(|a| a.parse::<IpAddr>().expect("literal"))
        .collect();
    let plan = meshlb::control::reconcile::plan(
        &cfg.desired_state(locals, "microbench"),
        &observe_maps(&maps)?,
    )?;
    apply_maps(&mut maps, &plan)?;
    Ok((ebpf, maps))
}

fn prog<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a Xdp> {
    Ok(ebpf.program(name).context("program")?.try_into()?)
}

/// One batch of `repeat = 1` calls; (mean kernel ns per run, verdicts).
fn per_call(
    p: &Xdp,
    case: &Case,
    calls: u32,
    next_flow: &mut u32,
) -> Result<(f64, BTreeMap<u32, u32>)> {
    let mut data = frame_to(
        case.v6,
        1,
        40000,
        if case.flow == Flow::Miss { SYN } else { ACK },
        case.prog == meshlb_common::PROG_XDP_BARE,
    );
    let l4 = if case.v6 { 54 } else { 34 };
    let src_lo = if case.v6 { 14 + 8 + 14 } else { 14 + 12 + 2 };
    let mut total_ns: u64 = 0;
    let mut verdicts = BTreeMap::new();
    for _ in 0..calls {
        if case.flow == Flow::Miss {
            // A new (source address, port) each call: ports 1024..61024
            // on each of 2^14 addresses before a tuple repeats.
            *next_flow += 1;
            let sport = 1024 + (*next_flow % 60_000) as u16;
            let src = 0x4000 | (*next_flow / 60_000 % 0x4000) as u16;
            data[l4..l4 + 2].copy_from_slice(&sport.to_be_bytes());
            data[src_lo..src_lo + 2].copy_from_slice(&src.to_be_bytes());
        }
        let r = p.test_run(TestRunOptions {
            data_in: Some(&data),
            ..TestRunOptions::new()
        })?;
        total_ns += r.duration.as_nanos() as u64;
        *verdicts.entry(r.return_value).or_insert(0) += 1;
    }
    Ok((total_ns as f64 / f64::from(calls), verdicts))
}

/// One `repeat = n` run; kernel ns per repetition.
fn repeated(p: &Xdp, case: &Case, n: u32) -> Result<(f64, u32)> {
    let data = frame_to(
        case.v6,
        1,
        40000,
        ACK,
        case.prog == meshlb_common::PROG_XDP_BARE,
    );
    let r = p.test_run(TestRunOptions {
        data_in: Some(&data),
        repeat: n,
        ..TestRunOptions::new()
    })?;
    Ok((r.duration.as_nanos() as f64, r.return_value))
}

fn delta(before: &[u64], after: &[u64], c: Counter) -> u64 {
    after[c as usize] - before[c as usize]
}

fn run(args: &Args, out: &Path) -> Result<()> {
    let fx = Fixture::new()?;
    let f = std::fs::File::open(format!("/run/netns/{}", fx.ns))?;
    // This thread does every bpf() call: its netns is the one the FIB sees.
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let (ebpf, maps) = load(&fx.pins)?;

    // Establish the flows the hit cases use, and check the program really
    // forwards them (a benchmark of a refusing program is worthless).
    for v6 in [false, true] {
        // The LB's SYN then ACK (the hit cases' flow), then the bare
        // forwarder's frame to the backend.
        let runs = [
            (meshlb_common::PROG_XDP_LB, frame(v6, 1, 40000, SYN)),
            (meshlb_common::PROG_XDP_LB, frame(v6, 1, 40000, ACK)),
            (
                meshlb_common::PROG_XDP_BARE,
                frame_to(v6, 1, 40000, ACK, true),
            ),
        ];
        for (name, data) in runs {
            let r = prog(&ebpf, name)?.test_run(TestRunOptions {
                data_in: Some(&data),
                ..TestRunOptions::new()
            })?;
            if r.return_value != 4 && r.return_value != 3 {
                bail!(
                    "{name} does not forward the fixture frame (v6={v6}): verdict {}",
                    r.return_value
                );
            }
        }
    }

    // What `repeat` would measure for the LB: the counters tell.
    let repeat_check = {
        let before = maps.counters();
        let data = frame(false, 2, 40001, SYN);
        prog(&ebpf, meshlb_common::PROG_XDP_LB)?.test_run(TestRunOptions {
            data_in: Some(&data),
            repeat: 1000,
            ..TestRunOptions::new()
        })?;
        let after = maps.counters();
        json!({
            "what": "meshlb_xdp, one SYN, repeat=1000: counter deltas",
            "new_flow": delta(&before, &after, Counter::NewFlow),
            "forwarded_in": delta(&before, &after, Counter::ForwardedIn),
            "not_service": delta(&before, &after, Counter::NotService),
        })
    };
    println!("repeat check (why the LB is timed per call): {repeat_check}");

    let mut samples = Vec::new();
    let mut next_flow = 0u32;
    let start = Instant::now();
    for round in 1..=args.rounds {
        for case in CASES {
            let p = prog(&ebpf, case.prog)?;
            let before = maps.counters();
            let (ns, verdicts) = per_call(p, case, args.calls, &mut next_flow)?;
            let after = maps.counters();
            let new_flows = delta(&before, &after, Counter::NewFlow);
            let ct_full = delta(&before, &after, Counter::CtFull);
            println!(
                "  round {round} {:<11} {ns:>7.1} ns/run  (verdicts {verdicts:?}, new flows {new_flows}, ct full {ct_full})",
                case.name
            );
            samples.push(json!({
                "method": "per-call",
                "case": case.name,
                "program": case.prog,
                "family": if case.v6 { "ipv6" } else { "ipv4" },
                "round": round,
                "calls": args.calls,
                "ns_per_run": ns,
                "verdicts": verdicts.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
                "new_flows": new_flows,
                "ct_full": ct_full,
            }));
        }
        for case in CASES
            .iter()
            .filter(|c| c.prog == meshlb_common::PROG_XDP_PASS)
        {
            let (ns, verdict) = repeated(prog(&ebpf, case.prog)?, case, args.repeat)?;
            println!(
                "  round {round} {:<11} {ns:>7.1} ns/repetition (repeat {}, verdict {verdict})",
                case.name, args.repeat
            );
            samples.push(json!({
                "method": "repeat",
                "case": case.name,
                "program": case.prog,
                "family": if case.v6 { "ipv6" } else { "ipv4" },
                "round": round,
                "repeat": args.repeat,
                "ns_per_run": ns,
            }));
        }
    }
    let doc = json!({
        "suite": "microbench",
        "method": "BPF_PROG_TEST_RUN; per-call: repeat=1, fresh frame, mean of the kernel-reported run durations; repeat: one run of `repeat` repetitions (idempotent programs only)",
        "rounds": args.rounds,
        "calls": args.calls,
        "repeat": args.repeat,
        "elapsed_s": start.elapsed().as_secs_f64(),
        "repeat_check": repeat_check,
        "samples": samples,
    });
    std::fs::write(out, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    drop(ebpf);
    drop(maps);
    drop(fx);
    Ok(())
}

fn main() {
    let args = Args::parse();
    let Some(out) = args.out.clone() else {
        println!("microbench: run by `cargo xtask bench microbench` (needs root and --out); nothing to do");
        return;
    };
    if let Err(e) = run(&args, &out) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
