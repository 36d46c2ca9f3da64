//! A random-source flood at one node of the routing mesh (see
//! `common::mesh`) must not take the mesh down for anyone else (issue 15).
//!
//! The bug this reproduces: a 20 s `hping3 --rand-source` SYN + ACK flood
//! at n1 left n1 unable to open any new connection to the tasks of other
//! nodes for minutes afterwards. Every flood packet to a remote task took a
//! SNAT port (`snat_new` reached every usable port towards both tasks,
//! `snat_exhausted` counted millions), and a taken port is only freed after
//! an hour idle, so legitimate clients found none left.
//!
//! The acceptance criterion, as the test checks it:
//!
//! 1. `KEEPALIVES` keep-alive connections through n1's VIP, exactly half to
//!    local tasks (t1, t2 on n1: translated by DNAT only) and half to
//!    remote tasks (t3 on n2, t4 on n3: source-translated to n1's
//!    address). Connections are opened until each half is full (at most
//!    `KEEPALIVE_ATTEMPTS`); the surplus is closed again.
//! 2. A `FLOOD_SECS` random-source SYN + ACK + UDP flood (`common/flood.rs`,
//!    a third each, sources in 10.250.0.0/16) at n1's VIP (the `web`
//!    service's TCP and UDP ports), from `FLOOD_THREADS` sender threads:
//!    the highest rate the generator reaches on this machine. The summary
//!    reports the rate.
//! 3. The keep-alive connections stay idle until `MIDDLE_AT` into the
//!    flood (so idle through its middle 15 s, 7.5-22.5 s), then each
//!    sends one request while the flood still runs: all must be answered
//!    by the task that answered before. Right after the flood each sends
//!    one more: again all by the same task.
//! 4. New connections during the flood: one every `DURING_GAP`, alternately
//!    to a local and to a remote task, from `DURING_FIRST` until
//!    `DURING_TIMEOUT` before the flood ends. Their success rate, per
//!    kind, is reported, not asserted: the generator's two threads saturate
//!    both cores, and n1's XDP cannot take all the flood offers, so the
//!    switch port in front of n1 drops the excess, legitimate SYNs among
//!    it, by chance. What that rate is depends on the machine, not on the
//!    product's state.
//! 5. New connections after the flood: `AFTER_PROBES` in the first
//!    `FIRST_WINDOW`, alternately local and remote: every one must succeed
//!    (and then every one of `AFTER_PROBES` in the next `SECOND_WINDOW`).
//! 6. The flood shows where an operator looks: n1's `/metrics`
//!    (`meshlb_snat_exhausted_total` present, the ACK flood's
//!    `meshlb_dropped_total{reason="no_flow"}`, and
//!    `meshlb_flow_events_total{event="created"}`).
//!
//! A new connection's kind is chosen, not observed: the client binds its
//! source port, and the ports are picked before the flood with
//! `meshlb::engine::xdp::inspect::explain` (what `meshlb explain` prints: the Maglev
//! slot n1's data path gives a new flow of that tuple), so a failed probe
//! still counts against the kind it was aimed at. Each port is used once.
//!
//! Timeouts: a keep-alive request may take `KEEPALIVE_TIMEOUT`, a new
//! connection `DURING_TIMEOUT` / `AFTER_TIMEOUT` (connect, request and
//! answer). Under the flood the switch port drops a share of every
//! packet to n1, and TCP recovers by retransmitting (RTO 200 ms and up,
//! doubling; a SYN's is 1 s): the contract is that the flow's state
//! survives, which a retransmission shows as well as a first try.
//!
//! Each second of the flood the test also counts how many keep-alive flows
//! n1's conntrack still holds (a lookup in its pinned map, as `meshlb
//! explain` does): when one is lost, the summary shows when.
//!
//! A binary of its own so no other test competes for the CPU. The summary
//! ends with the load average (its 1-minute figure counts the flood's own
//! threads).

mod common;
#[path = "common/flood.rs"]
mod flood;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use common::mesh::{start_cluster, Mesh, VIP4};
use common::{enter_netns, http_get_from, must, KeepAlive};
use flood::{Flood, FloodReport, FloodSpec, Mix};
use meshlb::kernel::pinned::Maps;
use meshlb::model::Proto;
use serde_json::Value;

const FLOOD_SECS: u64 = 30;
/// Sender threads. Two reach the highest rate here (the summary reports
/// it: 135-250 kpps on two cores, by what else runs; one thread reached
/// about 130 kpps when this was measured). Both saturate n1: the switch
/// port in front of it drops what n1's XDP cannot take (about half),
/// legitimate SYNs included, which is why connections during the flood
/// are only reported.
const FLOOD_THREADS: usize = 2;
/// Keep-alive connections: half to local, half to remote tasks.
const KEEPALIVES: usize = 64;
/// Connections tried at most to fill both halves (a new flow's task is
/// random, about half local).
const KEEPALIVE_ATTEMPTS: usize = 4 * KEEPALIVES;
/// Each keep-alive request's timeout (and the connect's): room for five
/// retransmissions (RTO 200 ms, doubling: the fifth leaves at 6.2 s; a
/// run at 227 kpps saw a 4.4 s answer), and a request at `MIDDLE_AT` still
/// ends within the flood.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(7);
/// When, into the flood, the keep-alive connections send their request.
const MIDDLE_AT: Duration = Duration::from_millis(22_500);
const _: () = assert!(
    MIDDLE_AT.as_millis() + KEEPALIVE_TIMEOUT.as_millis() < FLOOD_SECS as u128 * 1000,
    "the keep-alive requests in the middle must end within the flood"
);
/// The flood's sources; the nodes route them back to the client, which
/// drops them (it does not forward): see `route_flood_replies`.
const SRC_NET: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 0);
const SRC_PREFIX: u8 = 16;
/// The `web` service's published ports (`common::mesh::config`).
const WEB_TCP: u16 = 80;
const WEB_UDP: u16 = 53;
/// New connections during the flood: the first starts `DURING_FIRST` into
/// it, then one every `DURING_GAP` while one can still end within it.
const DURING_FIRST: Duration = Duration::from_secs(1);
const DURING_GAP: Duration = Duration::from_millis(500);
const DURING_TIMEOUT: Duration = Duration::from_secs(2);
/// New connections after the flood: how many per window, the windows, and
/// each one's timeout.
const AFTER_PROBES: usize = 20;
const FIRST_WINDOW: Duration = Duration::from_secs(2);
const SECOND_WINDOW: Duration = Duration::from_secs(10);
const AFTER_TIMEOUT: Duration = Duration::from_secs(2);
/// Source ports of the new connections are picked from here (outside the
/// client's ephemeral range, `common::CLIENT_PORT_RANGE`).
const PROBE_PORTS: (u16, u16) = (45000, 65000);
/// The whole test, setup included (teardown excluded).
const BUDGET: Duration = Duration::from_secs(150);

/// Counters of n1 the summary always shows (besides every `*flow*` and
/// `*snat*` one).
const COUNTERS: [&str; 15] = [
    "new_flow",
    "ct_full",
    "stateless",
    "no_flow",
    "snat_new",
    "snat_exhausted",
    "snat_reclaimed",
    "evicted",
    "expired",
    "swept",
    "healed",
    "rebalanced",
    "rst_ignored",
    "not_service",
    "no_backend",
];

/// Where a task runs, seen from n1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// On n1: reached by DNAT only.
    Local,
    /// On another node: source-translated to n1's address too.
    Remote,
}

impl Side {
    fn of(m: &Mesh, task: &str) -> Side {
        if m.tasks.iter().any(|t| t.name == task && t.node == 0) {
            Side::Local
        } else {
            Side::Remote
        }
    }

    fn name(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Remote => "remote",
        }
    }
}

/// A new connection to make: from `src`, which n1 gives to `task`.
#[derive(Clone, Debug)]
struct Probe {
    src: SocketAddr,
    task: String,
    side: Side,
}

/// What became of a probe: the answering task or the error, and how long
/// it took.
#[derive(Debug)]
struct Outcome {
    probe: Probe,
    result: Result<String, String>,
    took: Duration,
}

/// Outcomes of a series of new connections, by the side each aimed at.
struct Tally<'a>(&'a [Outcome]);

impl Tally<'_> {
    fn ok(&self, side: Option<Side>) -> usize {
        self.of(side).filter(|o| o.result.is_ok()).count()
    }

    fn total(&self, side: Option<Side>) -> usize {
        self.of(side).count()
    }

    fn of(&self, side: Option<Side>) -> impl Iterator<Item = &Outcome> {
        self.0
            .iter()
            .filter(move |o| side.is_none_or(|s| o.probe.side == s))
    }

    fn rate(&self, side: Option<Side>) -> String {
        let (ok, n) = (self.ok(side), self.total(side));
        let pct = if n == 0 {
            0.0
        } else {
            100.0 * ok as f64 / n as f64
        };
        format!("{ok}/{n} ({pct:.1} %)")
    }

    /// "local a/b (x %), remote c/d (y %); all ..; answers {..}; slowest;
    /// answered by another task than predicted; first failures".
    fn describe(&self) -> String {
        let mut answers: BTreeMap<&str, usize> = BTreeMap::new();
        for o in self.0 {
            if let Ok(t) = &o.result {
                *answers.entry(t.as_str()).or_default() += 1;
            }
        }
        let slowest = self
            .0
            .iter()
            .filter(|o| o.result.is_ok())
            .map(|o| o.took)
            .max()
            .unwrap_or_default();
        let mut s = format!(
            "local {}, remote {}; all {}; answers {answers:?}; slowest answer {slowest:.2?}",
            self.rate(Some(Side::Local)),
            self.rate(Some(Side::Remote)),
            self.rate(None)
        );
        let other: Vec<String> = self
            .0
            .iter()
            .filter_map(|o| match &o.result {
                Ok(t) if *t != o.probe.task => Some(format!(
                    "{} predicted {} answered {t}",
                    o.probe.src, o.probe.task
                )),
                _ => None,
            })
            .collect();
        if !other.is_empty() {
            s += &format!("; answered by another task than predicted: {other:?}");
        }
        let failures: Vec<String> = self
            .0
            .iter()
            .filter_map(|o| {
                let e = o.result.as_ref().err()?;
                Some(format!(
                    "{} {} ({}) after {:.2?}: {e}",
                    o.probe.side.name(),
                    o.probe.src,
                    o.probe.task,
                    o.took
                ))
            })
            .collect();
        if !failures.is_empty() {
            s += &format!(
                "; failures ({}): {:?}",
                failures.len(),
                &failures[..failures.len().min(5)]
            );
        }
        s
    }
}

fn sleep_until(t: Instant) {
    let left = t.saturating_duration_since(Instant::now());
    if !left.is_zero() {
        thread::sleep(left);
    }
}

/// `per_side` source ports of the client for new connections to `vip`
/// through n1 that its data path gives to a local task, and as many for
/// remote ones, each as `meshlb explain` predicts it (a Maglev slot:
/// these tuples have no flow yet).
fn plan_probes(m: &Mesh, vip: SocketAddr, per_side: usize) -> (Vec<Probe>, Vec<Probe>) {
    let dir = m.bpffs(&m.nodes[0]);
    let maps = Maps::from_pins(&dir)
        .unwrap_or_else(|e| panic!("n1's maps in {}: {e}{}", dir.display(), m.ctx()));
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    for port in PROBE_PORTS.0..PROBE_PORTS.1 {
        if local.len() >= per_side && remote.len() >= per_side {
            break;
        }
        let src = SocketAddr::new(m.client_v4.into(), port);
        let e = meshlb::engine::xdp::inspect::explain(&maps, Proto::Tcp, src, vip);
        if e.reason != meshlb::model::status::Reason::Maglev {
            continue;
        }
        let Some(task) = e
            .backend
            .as_deref()
            .and_then(|b| b.parse::<SocketAddr>().ok())
            .and_then(|b| m.task_by_ip(b.ip()))
        else {
            continue;
        };
        let side = Side::of(m, &task.name);
        let v = match side {
            Side::Local => &mut local,
            Side::Remote => &mut remote,
        };
        if v.len() < per_side {
            v.push(Probe {
                src,
                task: task.name.clone(),
                side,
            });
        }
    }
    assert!(
        local.len() == per_side && remote.len() == per_side,
        "ports {PROBE_PORTS:?} give only {} local and {} remote new flows (want {per_side} each)",
        local.len(),
        remote.len()
    );
    (local, remote)
}

/// The probes in turn local, remote, local...
fn alternate(local: &mut Vec<Probe>, remote: &mut Vec<Probe>, n: usize) -> Vec<Probe> {
    (0..n)
        .map(|i| {
            let v = if i % 2 == 0 {
                &mut *local
            } else {
                &mut *remote
            };
            v.pop().expect("planned enough probes")
        })
        .collect()
}

/// New connections (`http_get`) from namespace `ns` to `dst`, the i-th
/// from `probes[i].src` starting at `start + i * gap`, each on its own
/// thread with `timeout`: a slow or lost one does not delay the next.
/// With `clock` (the flood's start and the flood), each outcome is
/// printed as it comes.
fn paced_probes(
    ns: &str,
    dst: SocketAddr,
    probes: &[Probe],
    start: Instant,
    gap: Duration,
    timeout: Duration,
    clock: Option<(Instant, &Flood)>,
) -> Vec<Outcome> {
    thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .enumerate()
            .map(|(i, p)| {
                sleep_until(start + gap * i as u32);
                s.spawn(move || {
                    enter_netns(ns);
                    let t = Instant::now();
                    let result = http_get_from(Some(p.src), dst, timeout);
                    let took = t.elapsed();
                    if let Some((t0, flood)) = clock {
                        eprintln!(
                            "flood t={:>5.1}s: {:>9} packets sent; new connection to a {} task ({}, port {}): {}",
                            (t - t0).as_secs_f64(),
                            flood.sent(),
                            p.side.name(),
                            p.task,
                            p.src.port(),
                            match &result {
                                Ok(a) => format!("ok ({a}) in {took:.2?}"),
                                Err(e) => format!("FAILED after {took:.2?} ({e})"),
                            }
                        );
                    }
                    Outcome {
                        probe: p.clone(),
                        result,
                        took,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(probes)
            .map(|(h, p)| {
                h.join().unwrap_or_else(|_| Outcome {
                    probe: p.clone(),
                    result: Err("probe panicked".into()),
                    took: Duration::ZERO,
                })
            })
            .collect()
    })
}

/// One request on every keep-alive connection at once: each one's answer
/// and how long it took.
fn ask_all(conns: &mut [(KeepAlive, String)]) -> Vec<(Result<String, String>, Duration)> {
    thread::scope(|s| {
        let hs: Vec<_> = conns
            .iter_mut()
            .map(|(ka, _)| {
                s.spawn(move || {
                    let t = Instant::now();
                    (ka.get(), t.elapsed())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (Err("panicked".into()), Duration::ZERO))
            })
            .collect()
    })
}

/// How the keep-alive connections fared in one round of `ask_all`: those
/// answered by their task (local, remote), the slowest answer, and the
/// others described (n1's view of each from `meshlb explain`).
struct Round {
    same_local: usize,
    same_remote: usize,
    slowest: Duration,
    lost: Vec<String>,
}

impl Round {
    fn of(
        m: &Mesh,
        conns: &[(KeepAlive, String)],
        answers: &[(Result<String, String>, Duration)],
    ) -> Round {
        let mut r = Round {
            same_local: 0,
            same_remote: 0,
            slowest: Duration::ZERO,
            lost: Vec::new(),
        };
        for ((ka, was), (now, took)) in conns.iter().zip(answers) {
            let side = Side::of(m, was);
            if now.as_ref().is_ok_and(|t| t == was) {
                r.slowest = r.slowest.max(*took);
                match side {
                    Side::Local => r.same_local += 1,
                    Side::Remote => r.same_remote += 1,
                }
            } else {
                r.lost.push(format!(
                    "{} {was} ({} -> {}) -> {now:?} after {took:.2?}; n1 now: {}",
                    side.name(),
                    ka.local,
                    ka.dst,
                    explain(m, ka)
                ));
            }
        }
        r
    }

    fn same(&self) -> usize {
        self.same_local + self.same_remote
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "{}/{KEEPALIVES} ({}/{} local, {}/{} remote), slowest answer {:.2?}",
            self.same(),
            self.same_local,
            KEEPALIVES / 2,
            self.same_remote,
            KEEPALIVES / 2,
            self.slowest
        );
        for l in &self.lost {
            s += &format!("\n  lost: {l}");
        }
        s
    }
}

/// How many of `flows` (client, VIP, side) n1's conntrack holds (an
/// entry not closing, what `meshlb explain` calls "established"): local,
/// remote.
fn tracked_flows(m: &Mesh, flows: &[(SocketAddr, SocketAddr, Side)]) -> (usize, usize) {
    let Ok(maps) = Maps::from_pins(&m.bpffs(&m.nodes[0])) else {
        return (0, 0);
    };
    let (mut local, mut remote) = (0, 0);
    for (src, dst, side) in flows {
        if meshlb::engine::xdp::inspect::explain(&maps, Proto::Tcp, *src, *dst).reason
            == meshlb::model::status::Reason::Conntrack
        {
            match side {
                Side::Local => local += 1,
                Side::Remote => remote += 1,
            }
        }
    }
    (local, remote)
}

/// The seconds of `tracked` (second, local, remote) at which the count
/// changed, as "t=Ns: L+R".
fn tracked_changes(tracked: &[(u32, usize, usize)]) -> String {
    let mut out = Vec::new();
    let mut prev = None;
    for &(k, l, r) in tracked {
        if prev != Some((l, r)) {
            out.push(format!("t={k}s: {l}+{r}"));
            prev = Some((l, r));
        }
    }
    out.join(", ")
}

/// A scoped thread's value; its panic goes on in the caller.
fn joined<T>(h: thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Replies to the flood (SYN-ACKs, RSTs, UDP answers) go to 10.250.x.y.
/// The nodes have no default route, so without this they would die in n1
/// with ICMP errors of their own; with it they take the path replies to
/// real clients take, back to the client, whose namespace drops them (it
/// does not forward). Every node gets it, so no reply can leave the
/// test's namespaces or loop among them.
fn route_flood_replies(m: &Mesh) {
    let net = format!("{SRC_NET}/{SRC_PREFIX}");
    let via = m.client_v4.to_string();
    for n in &m.nodes {
        must(&["ip", "-n", &n.ns, "route", "add", &net, "via", &via]);
    }
}

/// (packets, dropped) of `dev` in `ns`, direction "rx" or "tx".
fn link_stats(ns: &str, dev: &str, dir: &str) -> (u64, u64) {
    let out = must(&["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev]);
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    let s = &v[0]["stats64"][dir];
    (
        s["packets"].as_u64().unwrap_or(0),
        s["dropped"].as_u64().unwrap_or(0),
    )
}

/// Node 0's counters by name and its flow table's fill, from one
/// `status --json` (empty when status fails: the summary says "absent").
fn n1_state(m: &Mesh) -> (BTreeMap<String, u64>, Fill) {
    let Ok(st) = m.try_status(0) else {
        return (BTreeMap::new(), Fill::default());
    };
    let counters = st["counters"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    let fill = Fill {
        conntrack: st["conntrack_entries"].as_u64(),
        embryonic: st["embryonic_flows"].as_u64(),
        snat_ports: st["snat_ports_in_use"].as_u64(),
    };
    (counters, fill)
}

/// What `status --json` says of a node's flow tables (each absent when
/// status does not show it).
#[derive(Clone, Copy, Debug, Default)]
struct Fill {
    conntrack: Option<u64>,
    /// Flows not established yet, where the data path keeps them apart.
    embryonic: Option<u64>,
    snat_ports: Option<u64>,
}

impl Fill {
    fn describe(&self) -> String {
        format!(
            "conntrack {}, embryonic {}, SNAT ports {}",
            show(self.conntrack),
            show(self.embryonic),
            show(self.snat_ports)
        )
    }
}

/// What n1's data path holds for the flow of `ka` (`meshlb explain`),
/// on one line.
fn explain(m: &Mesh, ka: &KeepAlive) -> String {
    let dir = m.bpffs(&m.nodes[0]).display().to_string();
    let (src, dst) = (ka.local.to_string(), ka.dst.to_string());
    let out = m.meshlb(
        &m.nodes[0].ns,
        &["explain", "tcp", &src, &dst, "--bpffs", &dir],
        Duration::from_secs(15),
    );
    let text = if out.success() {
        &out.stdout
    } else {
        &out.stderr
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn show(v: Option<u64>) -> String {
    v.map_or_else(|| "absent".to_string(), |v| v.to_string())
}

/// The machine's load average (1, 5, 15 minutes).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The counters the summary shows, in a stable order.
fn counter_rows(
    before: &BTreeMap<String, u64>,
    end: &BTreeMap<String, u64>,
    last: &BTreeMap<String, u64>,
) -> String {
    let mut names: Vec<String> = COUNTERS
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    for k in before.keys().chain(end.keys()).chain(last.keys()) {
        if (k.contains("flow") || k.contains("snat")) && !names.contains(k) {
            names.push(k.clone());
        }
    }
    let mut s = format!(
        "  {:<16} {:>12} {:>12} {:>12}\n",
        "counter", "before", "flood end", "final"
    );
    for k in &names {
        s += &format!(
            "  {k:<16} {:>12} {:>12} {:>12}\n",
            show(before.get(k).copied()),
            show(end.get(k).copied()),
            show(last.get(k).copied())
        );
    }
    s
}

/// Opens keep-alive connections to `vip` (in the client namespace) until
/// half of `KEEPALIVES` reach local tasks and half remote ones, each
/// with its first answer; the surplus is closed again. Returns them and
/// how many were opened.
fn open_keepalives(m: &Mesh, vip: SocketAddr) -> (Vec<(KeepAlive, String)>, usize) {
    let half = KEEPALIVES / 2;
    m.client(|| {
        let (mut local, mut remote) = (Vec::new(), Vec::new());
        let mut attempts = 0;
        while (local.len() < half || remote.len() < half) && attempts < KEEPALIVE_ATTEMPTS {
            attempts += 1;
            let mut ka = KeepAlive::open(vip, KEEPALIVE_TIMEOUT)
                .unwrap_or_else(|e| panic!("keep-alive {attempts}: {e}{}", m.ctx()));
            let task = ka.get().unwrap_or_else(|e| {
                panic!("keep-alive {attempts}, first request: {e}{}", m.ctx())
            });
            let v = match Side::of(m, &task) {
                Side::Local => &mut local,
                Side::Remote => &mut remote,
            };
            if v.len() < half {
                v.push((ka, task));
            } // else dropped: closed
        }
        assert!(
            local.len() == half && remote.len() == half,
            "{attempts} connections through n1 gave {} local and {} remote tasks (want {half} each)",
            local.len(),
            remote.len()
        );
        local.append(&mut remote);
        (local, attempts)
    })
}

#[test]
fn flood_at_a_node_does_not_take_the_mesh_down() {
    let t0 = Instant::now();
    let load_start = loadavg();
    let m = Mesh::new("fl");
    let _daemons = start_cluster(&m);
    route_flood_replies(&m);
    let vip: SocketAddr = SocketAddr::new(VIP4.parse().unwrap(), WEB_TCP);
    let client_if = format!("{}c", m.short);
    let n1 = &m.nodes[0];

    // 1. Keep-alive connections through n1, half local, half remote; and
    // the source ports of the new connections to come.
    let (mut conns, attempts) = open_keepalives(&m, vip);
    let last_request = Instant::now();
    let mut kept: BTreeMap<String, usize> = BTreeMap::new();
    for (_, t) in &conns {
        *kept.entry(t.clone()).or_default() += 1;
    }
    eprintln!(
        "keep-alive connections through n1: {kept:?} ({} local, {} remote; {attempts} opened)",
        KEEPALIVES / 2,
        KEEPALIVES / 2
    );
    let during_n = ((FLOOD_SECS as u32 * 1000
        - DURING_TIMEOUT.as_millis() as u32
        - DURING_FIRST.as_millis() as u32)
        / DURING_GAP.as_millis() as u32
        + 1) as usize;
    let per_side = (during_n + 2 * AFTER_PROBES).div_ceil(2) + 1;
    let (mut local, mut remote) = plan_probes(&m, vip, per_side);
    let during_probes = alternate(&mut local, &mut remote, during_n);
    let first_probes = alternate(&mut local, &mut remote, AFTER_PROBES);
    let second_probes = alternate(&mut local, &mut remote, AFTER_PROBES);

    // 2. The flood. Meanwhile: new connections, alternately local and
    // remote; at MIDDLE_AT one request on every keep-alive connection,
    // idle until then.
    let (before, fill_before) = n1_state(&m);
    let client_tx0 = link_stats(&m.client_ns, &client_if, "tx");
    let sw_tx0 = link_stats(&m.sw_ns, &n1.sw_port, "tx");
    let n1_rx0 = link_stats(&n1.ns, &n1.eth, "rx");
    let mut spec = FloodSpec::new(
        &m.client_ns,
        VIP4.parse().unwrap(),
        WEB_TCP,
        WEB_UDP,
        Duration::from_secs(FLOOD_SECS),
    );
    spec.src_net = SRC_NET;
    spec.src_prefix = SRC_PREFIX;
    spec.mix = Mix::default();
    spec.threads = FLOOD_THREADS;
    let flood = Flood::start(&spec).unwrap_or_else(|e| panic!("flood: {e}"));
    let flood_start = flood.started();
    let flows: Vec<(SocketAddr, SocketAddr, Side)> = conns
        .iter()
        .map(|(ka, t)| (ka.local, ka.dst, Side::of(&m, t)))
        .collect();
    let (during, middle, idle, middle_done, tracked) = thread::scope(|s| {
        let tracked = s.spawn(|| {
            let mut v = Vec::new();
            for k in 1..=FLOOD_SECS as u32 {
                sleep_until(flood_start + Duration::from_secs(k.into()));
                let (l, r) = tracked_flows(&m, &flows);
                eprintln!(
                    "flood t={:>5.1}s: {:>9} packets sent; keep-alive flows in n1's conntrack: {l} local, {r} remote",
                    flood_start.elapsed().as_secs_f64(),
                    flood.sent()
                );
                v.push((k, l, r));
            }
            v
        });
        let during = s.spawn(|| {
            paced_probes(
                &m.client_ns,
                vip,
                &during_probes,
                flood_start + DURING_FIRST,
                DURING_GAP,
                DURING_TIMEOUT,
                Some((flood_start, &flood)),
            )
        });
        let middle = s.spawn(|| {
            sleep_until(flood_start + MIDDLE_AT);
            let idle = last_request.elapsed();
            eprintln!(
                "flood t={:>5.1}s: {:>9} packets sent; one request on each keep-alive connection (idle {idle:.1?})",
                flood_start.elapsed().as_secs_f64(),
                flood.sent()
            );
            let answers = ask_all(&mut conns);
            eprintln!(
                "flood t={:>5.1}s: keep-alive answers: {} by the same task",
                flood_start.elapsed().as_secs_f64(),
                conns
                    .iter()
                    .zip(&answers)
                    .filter(|((_, was), (now, _))| now.as_ref().is_ok_and(|t| t == was))
                    .count()
            );
            (answers, idle, flood_start.elapsed())
        });
        let (middle, idle, middle_done) = joined(middle);
        (joined(during), middle, idle, middle_done, joined(tracked))
    });
    let load_flood = loadavg();
    let report: FloodReport = flood.wait();
    let flood_end = Instant::now();
    assert!(
        report.error.is_none() && report.sent() > 0,
        "the flood generator failed (a test problem, not the product's): {report:?}"
    );

    // 3. Right after the flood, at the same time: one more request on
    // every keep-alive connection, new connections in the first window and
    // then the second, and n1's counters.
    let (again, first, second, at_end) = thread::scope(|s| {
        let again = s.spawn(|| ask_all(&mut conns));
        let at_end = s.spawn(|| n1_state(&m));
        let first = s.spawn(|| {
            let gap = FIRST_WINDOW / AFTER_PROBES as u32;
            paced_probes(
                &m.client_ns,
                vip,
                &first_probes,
                flood_end,
                gap,
                AFTER_TIMEOUT,
                None,
            )
        });
        let second = s.spawn(|| {
            let gap = SECOND_WINDOW / AFTER_PROBES as u32;
            paced_probes(
                &m.client_ns,
                vip,
                &second_probes,
                flood_end + FIRST_WINDOW,
                gap,
                AFTER_TIMEOUT,
                None,
            )
        });
        (joined(again), joined(first), joined(second), joined(at_end))
    });
    let ((at_end, fill_end), (last, fill_last)) = (at_end, n1_state(&m));
    let client_tx1 = link_stats(&m.client_ns, &client_if, "tx");
    let sw_tx1 = link_stats(&m.sw_ns, &n1.sw_port, "tx");
    let n1_rx1 = link_stats(&n1.ns, &n1.eth, "rx");
    let tracked_end = tracked_flows(&m, &flows);
    let middle = Round::of(&m, &conns, &middle);
    let again = Round::of(&m, &conns, &again);
    let (during, first, second) = (Tally(&during), Tally(&first), Tally(&second));

    // The flood as n1's /metrics shows it.
    let metrics = common::in_netns(&m.nodes[0].ns, || {
        common::http_get_path(
            "127.0.0.1:9742".parse().unwrap(),
            "/metrics",
            Duration::from_secs(3),
        )
    })
    .unwrap_or_default();
    let series = |name: &str| -> Option<u64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    let flow_metrics: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.starts_with("meshlb_flow")
                    || l.starts_with("meshlb_snat")
                    || l.starts_with("meshlb_dropped"))
        })
        .collect();

    // 4. The summary.
    let secs = report.elapsed.as_secs_f64();
    eprintln!(
        "\n===== flood at n1 ({VIP4}:{WEB_TCP} tcp, :{WEB_UDP} udp) from {SRC_NET}/{SRC_PREFIX}, {FLOOD_THREADS} thread(s), {FLOOD_SECS} s =====\n\
         flood: {} packets in {secs:.1} s = {:.0} pps (SYN {}, ACK {}, UDP {}; {} busy batches, longest batch {:?})\n\
         client uplink tx: {} packets, {} dropped; switch port to n1 tx: {} packets, {} dropped; n1 uplink rx: {} packets, {} dropped\n\
         n1 flow tables: before: {}; at flood end: {}; final: {}\n\
         n1 counters:\n{}\
         n1 /metrics:\n  {}\n\
         keep-alive connections: {KEEPALIVES} ({} opened), {kept:?}\n\
         keep-alive flows in n1's conntrack (local+remote of {}+{}), each second of the flood where it changed: {}; at the end: {}+{}\n\
         during the flood, new connections (every {DURING_GAP:?} from t={DURING_FIRST:?}, {DURING_TIMEOUT:?} timeout): {}\n\
         keep-alive connections at t={MIDDLE_AT:?} (idle {idle:.1?}, done at t={middle_done:.1?}), answered by the same task: {}\n\
         keep-alive connections right after the flood, answered by the same task: {}\n\
         new connections in the first {FIRST_WINDOW:?} after the flood: {}\n\
         new connections in the next {SECOND_WINDOW:?}: {}\n\
         load average: {load_start} at the start, {load_flood} at the flood's end\n\
         test time before teardown: {:.1} s",
        report.sent(),
        report.pps(),
        report.syn,
        report.ack,
        report.udp,
        report.busy,
        report.longest_batch,
        client_tx1.0 - client_tx0.0,
        client_tx1.1 - client_tx0.1,
        sw_tx1.0 - sw_tx0.0,
        sw_tx1.1 - sw_tx0.1,
        n1_rx1.0 - n1_rx0.0,
        n1_rx1.1 - n1_rx0.1,
        fill_before.describe(),
        fill_end.describe(),
        fill_last.describe(),
        counter_rows(&before, &at_end, &last),
        flow_metrics.join("\n  "),
        attempts,
        KEEPALIVES / 2,
        KEEPALIVES / 2,
        tracked_changes(&tracked),
        tracked_end.0,
        tracked_end.1,
        during.describe(),
        middle.describe(),
        again.describe(),
        first.describe(),
        second.describe(),
        t0.elapsed().as_secs_f64(),
    );

    // 5. The contract.
    let mut failed = Vec::new();
    if middle.same() != KEEPALIVES {
        failed.push(format!(
            "keep-alive connections answered by their task {MIDDLE_AT:?} into the flood: {}",
            middle.describe()
        ));
    }
    if again.same() != KEEPALIVES {
        failed.push(format!(
            "keep-alive connections answered by their task after the flood: {}",
            again.describe()
        ));
    }
    if first.ok(None) != AFTER_PROBES {
        failed.push(format!(
            "new connections in the first {FIRST_WINDOW:?} after the flood (want all): {}",
            first.describe()
        ));
    }
    if second.ok(None) != AFTER_PROBES {
        failed.push(format!(
            "new connections in the {SECOND_WINDOW:?} after that (want all): {}",
            second.describe()
        ));
    }
    if !last.contains_key("snat_exhausted") {
        failed.push(format!(
            "n1 does not show snat_exhausted among its counters: {last:?}"
        ));
    }
    // The flood is visible where an operator looks: n1's /metrics.
    // (Whether any SNAT port ran out depends on timing: the series must
    // be there, its value may be anything.)
    match (
        series("meshlb_snat_exhausted_total "),
        series("meshlb_dropped_total{reason=\"no_flow\"} "),
        series("meshlb_flow_events_total{event=\"created\"} "),
    ) {
        (Some(_), Some(no_flow), Some(created)) if no_flow > 1_000 && created > 10_000 => {}
        other => failed.push(format!(
            "n1's /metrics does not show the flood (snat_exhausted_total present, no_flow drops > 1000, created > 10000): {other:?}"
        )),
    }
    assert!(
        failed.is_empty(),
        "the mesh did not survive the flood at n1:\n  {}{}",
        failed.join("\n  "),
        m.ctx()
    );
    assert!(
        t0.elapsed() < BUDGET,
        "the test took {:?}, over its budget of {BUDGET:?}",
        t0.elapsed()
    );
}
