//! The routing mesh on a three-node netns cluster (see `common::mesh`):
//! every node answers on every published port for every task wherever it
//! runs (local tasks by DNAT, remote ones by DNAT + SNAT to the node),
//! forwarding continues with a node's daemon dead, removed tasks get no new
//! flows while established ones continue, every node picks the same task
//! for the same flow, a task calling its own node's services reaches
//! itself, its neighbour and remote tasks (hairpin), and with node-to-node
//! links of a smaller MTU than the tasks' large transfers and fragmented
//! datagrams still get through (path MTU discovery, fragments).
//! Connection-per-request load to a remote task is in `mesh_load.rs`, a
//! binary of its own so that it runs alone.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::mesh::{
    config, config_with_files, http_download, http_put, node_addr, snmp, start_cluster,
    start_cluster_with, Mesh, MeshOpts, ALL, FILE_PORT, SERVICES, VIP4, VIP6,
};
use common::{http_get, udp_request, KeepAlive, Proc};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Long enough for two SYN retransmits (1 s, 3 s): under CI load the mesh
/// tests run two at a time on 2 cores.
const REQ_TIMEOUT: Duration = Duration::from_secs(5);
const REQUESTS: usize = 300;

/// Answers by task name, and failures.
#[derive(Debug, Default)]
struct Burst {
    counts: BTreeMap<String, usize>,
    failures: Vec<String>,
}

fn burst(m: &Mesh, dst: SocketAddr, udp: bool, n: usize) -> Burst {
    burst_in(&m.client_ns, dst, udp, n, 0)
}

/// `n` requests from namespace `ns` (the client's, or a task's), each on a
/// new connection or from a new UDP socket; a UDP request's payload is
/// padded to `udp_len` bytes.
fn burst_in(ns: &str, dst: SocketAddr, udp: bool, n: usize, udp_len: usize) -> Burst {
    common::in_netns(ns, || {
        let mut b = Burst::default();
        for i in 0..n {
            // udp_request checks the reply comes from `dst` itself; a TCP
            // handshake only completes when it does.
            let r = if udp {
                let mut p = format!("ping {i} ").into_bytes();
                p.resize(p.len().max(udp_len), b'.');
                udp_request(dst, &p, REQ_TIMEOUT)
            } else {
                http_get(dst, REQ_TIMEOUT)
            };
            match r {
                Ok(body) => *b.counts.entry(body).or_default() += 1,
                Err(e) => b.failures.push(format!("request {i}: {e}")),
            }
        }
        b
    })
}

/// Every request succeeded, each of `tasks` got at least 10% and nobody
/// else answered.
fn assert_spread(m: &Mesh, what: &str, b: &Burst, tasks: &[&str]) {
    assert!(
        b.failures.is_empty(),
        "{what}: {} failed; first {:?}; answers {:?}{}",
        b.failures.len(),
        &b.failures[..b.failures.len().min(3)],
        b.counts,
        m.ctx()
    );
    let total: usize = b.counts.values().sum();
    for t in tasks {
        let got = b.counts.get(*t).copied().unwrap_or(0);
        assert!(
            got * 10 >= total,
            "{what}: task {t} got {got} of {total}: {:?}{}",
            b.counts,
            m.ctx()
        );
    }
    for k in b.counts.keys() {
        assert!(
            tasks.contains(&k.as_str()),
            "{what}: unexpected answer {k:?}: {:?}{}",
            b.counts,
            m.ctx()
        );
    }
}

#[test]
fn every_node_reaches_every_task_tcp_and_udp_v4_and_v6() {
    let m = Mesh::new("a");
    let _daemons = start_cluster(&m);
    for n in &m.nodes {
        for (port, udp, v6) in [
            (80, false, false),
            (53, true, false),
            (8080, false, true),
            (5300, true, true),
        ] {
            let dst = node_addr(n, port, v6);
            let what = format!("node {} {dst} {}", n.name, if udp { "udp" } else { "tcp" });
            let b = burst(&m, dst, udp, REQUESTS);
            assert_spread(&m, &what, &b, &ALL);
            eprintln!("{what}: {:?}", b.counts);
        }
    }
    for (dst, udp) in [
        (format!("{VIP4}:80"), false),
        (format!("{VIP4}:53"), true),
        (format!("[{VIP6}]:8080"), false),
        (format!("[{VIP6}]:5300"), true),
    ] {
        let dst: SocketAddr = dst.parse().unwrap();
        let what = format!("VIP {dst} via n1 {}", if udp { "udp" } else { "tcp" });
        let b = burst(&m, dst, udp, REQUESTS);
        assert_spread(&m, &what, &b, &ALL);
    }
    // The remote flows were source-translated on the node that took them.
    let st = m.try_status(0).unwrap();
    let snat = st["counters"]["snat_new"].as_u64().unwrap_or(0);
    assert!(snat > 0, "n1 status shows no SNAT flows: {st}");
}

/// The static config of the mesh without any `node =`: each node infers
/// from its routing table which tasks are its own (on its task bridge)
/// and which are other nodes' (routed via them: source-translated), and
/// says so in its log. Every node then answers for every task, v4 and
/// v6, and n1 translated its remote flows.
#[test]
fn static_backends_without_node_are_placed_by_route() {
    let m = Mesh::new("l");
    let text: String = config(&m, &ALL)
        .lines()
        .filter(|l| !l.starts_with("node = "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(!text.contains("node ="), "{text}");
    let _daemons = start_cluster_with(&m, &text, &SERVICES);
    for n in &m.nodes {
        for (port, v6) in [(80, false), (8080, true)] {
            let dst = node_addr(n, port, v6);
            let what = format!("node {} {dst} (no node = in the config)", n.name);
            let b = burst(&m, dst, false, 100);
            assert_spread(&m, &what, &b, &ALL);
        }
    }
    let st = m.try_status(0).unwrap();
    assert!(
        st["counters"]["snat_new"].as_u64().unwrap_or(0) > 0,
        "n1 translated no flow to another node's task: {st}"
    );
    // n1's log names each inference: t1 and t2 are on n1's bridge, t3 and
    // t4 routed via the other nodes.
    let log = m.log_text(0);
    for t in ALL {
        let task = m.task(t);
        let own = task.node == 0;
        let line = log
            .lines()
            .find(|l| l.contains(&format!("backend {} (no node given)", task.v4)))
            .unwrap_or_else(|| panic!("n1 did not log how it placed {t}:\n{log}"));
        let want = if own { "local" } else { "via gateway" };
        assert!(line.contains(want), "{t} (on node {}): {line}", task.node);
    }
}

#[test]
fn forwarding_survives_a_dead_daemon_and_removed_tasks_drain() {
    let m = Mesh::new("b");
    let mut daemons = start_cluster(&m);

    // n2's daemon dies: n2 keeps forwarding, to local and remote tasks.
    daemons[1].kill9();
    let b = burst(&m, node_addr(&m.nodes[1], 80, false), false, REQUESTS);
    assert_spread(&m, "via n2 with its daemon dead", &b, &ALL);

    // Established keep-alive connections via n1, by task.
    let n1 = node_addr(&m.nodes[0], 80, false);
    let mut conns: Vec<(KeepAlive, String)> = m.client(|| {
        (0..16)
            .map(|_| {
                let mut ka = KeepAlive::open(n1, REQ_TIMEOUT).expect("keep-alive connect");
                let t = ka.get().expect("first request");
                (ka, t)
            })
            .collect()
    });
    let kept: Vec<String> = conns.iter().map(|(_, t)| t.clone()).collect();
    assert!(
        kept.iter().any(|t| t != "t3"),
        "no keep-alive connection landed off t3: {kept:?}"
    );

    // n2's task leaves the config of the other nodes.
    m.write_file("meshlb.toml", &config(&m, &["t1", "t2", "t4"]));
    for i in [0, 2] {
        daemons[i].signal(Signal::SIGHUP);
    }
    for i in [0, 2] {
        common::wait_for(Duration::from_secs(10), "web to lose t3", || {
            let st = m.try_status(i)?;
            let n = backends_of(&st, "web");
            if n == 3 {
                Ok(())
            } else {
                Err(format!("node {i}: web has {n} backends"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    }
    for i in [0, 2] {
        let n = &m.nodes[i];
        let b = burst(&m, node_addr(n, 80, false), false, REQUESTS);
        assert_spread(
            &m,
            &format!("via {} after t3 removed", n.name),
            &b,
            &["t1", "t2", "t4"],
        );
    }
    for (ka, first) in conns.iter_mut().filter(|(_, t)| t != "t3") {
        for _ in 0..3 {
            let again = ka
                .get()
                .unwrap_or_else(|e| panic!("established flow to {first} broke: {e}{}", m.ctx()));
            assert_eq!(&again, first, "an established flow changed task");
        }
    }

    // A restarted n2 adopts the pinned state and keeps forwarding.
    let mut d = m.start_daemon(1, &m.dir.join("meshlb.toml"));
    m.wait_ready(1, &mut d, &SERVICES);
    let b = burst(&m, node_addr(&m.nodes[1], 80, false), false, 100);
    assert_spread(&m, "via n2 after restart", &b, &["t1", "t2", "t4"]);
}

/// Distinct backend addresses of `service` (over all its ports).
fn backends_of(st: &Value, service: &str) -> usize {
    let addrs: std::collections::BTreeSet<String> = st["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["addr"].as_str().map(String::from))
        .collect();
    addrs.len()
}

/// A small deterministic PRNG (xorshift) for reproducible random flows.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn all_nodes_pick_the_same_task_for_the_same_flow() {
    let m = Mesh::new("c");
    let _daemons = start_cluster(&m);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let flows: Vec<String> = (0..1000)
        .map(|_| {
            let r = rng.next();
            let src = std::net::Ipv4Addr::from((r as u32 & 0x00ff_ffff) | 0x0b00_0000);
            let sport = 1024 + (r >> 32) as u16 % 60000;
            format!("{src}:{sport} {VIP4}:80")
        })
        .collect();
    // One `meshlb explain --json` per flow and node, from a flows file.
    let mut picks: Vec<Vec<String>> = Vec::new();
    for n in &m.nodes {
        let dir = m.bpffs(n).display().to_string();
        let list = m.write_file(&format!("flows-{}", n.name), &(flows.join("\n") + "\n"));
        let script = format!(
            "while read s d; do {} explain tcp \"$s\" \"$d\" --json --bpffs {dir} || echo FAILED; done < {}",
            common::MESHLB,
            list.display()
        );
        let out = m.meshlb_sh(&n.ns, &script, Duration::from_secs(300));
        assert!(
            out.success(),
            "explain loop on {}: {}",
            n.name,
            out.describe()
        );
        let got: Vec<String> = out
            .stdout
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{}: explain output {l:?}: {e}", n.name));
                assert_eq!(v["reason"], "maglev", "{}: {v}", n.name);
                v["backend"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        assert_eq!(got.len(), flows.len(), "{}: one answer per flow", n.name);
        picks.push(got);
    }
    let mut per_task: BTreeMap<String, usize> = BTreeMap::new();
    for (i, f) in flows.iter().enumerate() {
        assert!(
            picks[0][i] == picks[1][i] && picks[1][i] == picks[2][i],
            "flow {f}: n1 {} n2 {} n3 {}",
            picks[0][i],
            picks[1][i],
            picks[2][i]
        );
        let ip: IpAddr = picks[0][i].rsplit_once(':').unwrap().0.parse().unwrap();
        *per_task
            .entry(m.task_by_ip(ip).unwrap().name.clone())
            .or_default() += 1;
    }
    eprintln!("1000 flows, same task on all nodes: {per_task:?}");
    assert_eq!(per_task.len(), 4, "every task picked: {per_task:?}");

    // And on the wire: one client tuple through n1, then (the route moved,
    // as after an ECMP change) through n2, reaches the same task.
    let src: SocketAddr = SocketAddr::new(m.client_v4.into(), 45678);
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let first = m
        .client(|| common::http_get_from(Some(src), vip, REQ_TIMEOUT))
        .expect("via n1");
    common::must(&[
        "ip",
        "-n",
        &m.client_ns,
        "route",
        "replace",
        "10.96.0.0/16",
        "via",
        &m.nodes[1].v4.to_string(),
    ]);
    // The first connection's tuple sits in TIME_WAIT on the client: wait it out via tw_reuse.
    std::thread::sleep(Duration::from_millis(1100));
    let second = m
        .client(|| common::http_get_from(Some(src), vip, REQ_TIMEOUT))
        .expect("via n2");
    assert_eq!(
        first, second,
        "the same flow through another node reached another task"
    );
}

#[test]
fn etcd_driven_mesh_snats_tasks_of_other_nodes() {
    let m = Mesh::new("e");
    // etcd in the client namespace, on its switch address: every node
    // reaches it.
    let etcd = common::etcd::EtcdServer::start_on(&m.client_ns, "mesh-e", &m.client_v4.to_string());
    let c = etcd.client();
    let ok = |args: &[&str]| {
        let out = c.meshlb(args);
        assert!(out.success(), "{}{}", out.describe(), m.ctx());
        out.stdout
    };
    ok(&[
        "service",
        "create",
        "web",
        "--publish",
        "tcp:80:8000",
        "--vip",
        VIP4,
    ]);
    let mut ids = BTreeMap::new();
    for name in ALL {
        let t = m.task(name);
        let node = &m.nodes[t.node].name;
        let out = ok(&[
            "task",
            "add",
            "web",
            &format!("{}:8000", t.v4),
            "--node",
            node,
        ]);
        let id = out
            .lines()
            .last()
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_default();
        ids.insert(name, id.to_string());
    }
    let url = etcd.url();
    let mut daemons: Vec<Proc> = (0..3)
        .map(|i| m.start_daemon_args(i, &["--etcd", &url]))
        .collect();
    for (i, d) in daemons.iter_mut().enumerate() {
        m.wait_ready(i, d, &["web"]);
    }
    for n in &m.nodes {
        let b = burst(&m, node_addr(n, 80, false), false, REQUESTS);
        assert_spread(&m, &format!("etcd: via {}", n.name), &b, &ALL);
    }
    // Each node SNATs exactly the tasks of the other nodes.
    for (i, n) in m.nodes.iter().enumerate() {
        let st = m.try_status(i).unwrap();
        let snat = st["counters"]["snat_new"].as_u64().unwrap_or(0);
        assert!(snat > 0, "{}: no SNAT flows: {}", n.name, st["counters"]);
    }
    // The task of n2 goes: no node sends it new flows.
    ok(&["task", "rm", "web", &ids["t3"]]);
    for i in 0..3 {
        common::wait_for(Duration::from_secs(10), "t3 to leave web", || {
            let n = backends_of(&m.try_status(i)?, "web");
            if n == 3 {
                Ok(())
            } else {
                Err(format!("node {i}: {n} backends"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    }
    for n in &m.nodes {
        let b = burst(&m, node_addr(n, 80, false), false, 100);
        assert_spread(
            &m,
            &format!("etcd: via {} without t3", n.name),
            &b,
            &["t1", "t2", "t4"],
        );
    }
}

/// Calls a task makes to its own node's services, per target.
const HAIRPIN_CALLS: usize = 100;

/// A task calls its node's services (the VIP and the node's own address),
/// v4 and v6: the flows its node sends back to the task itself or to its
/// neighbour on the same bridge are hairpinned (source-translated to the
/// bridge address, counted as `hairpin`), the ones to the other nodes'
/// tasks are source-translated to the node; every call succeeds, and each
/// of the three cases happens for each target.
#[test]
fn hairpin_from_a_task_reaches_itself_its_neighbour_and_remote_tasks() {
    let m = Mesh::new("h");
    let _daemons = start_cluster(&m);
    let t1 = m.task("t1").clone();
    let n1 = m.nodes[0].clone();
    // `config(m, &ALL)`: web and web6 both over every task.
    let st = m.try_status(0).unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    for svc in ["web", "web6"] {
        assert_eq!(backends_of(&st, svc), 4, "{svc} on n1: {st}");
    }
    let mut summary = Vec::new();
    for v6 in [false, true] {
        let vip: IpAddr = if v6 { VIP6 } else { VIP4 }.parse().unwrap();
        let port = if v6 { 8080 } else { 80 };
        let before = m.counters(0);
        let mut local = 0;
        for (label, dst) in [
            ("VIP", SocketAddr::new(vip, port)),
            ("n1 node port", node_addr(&n1, port, v6)),
        ] {
            let what = format!("t1 -> {label} {dst}");
            let b = burst_in(&t1.ns, dst, false, HAIRPIN_CALLS, 0);
            eprintln!("{what}: {:?}, {} failed", b.counts, b.failures.len());
            assert!(
                b.failures.is_empty(),
                "{what}: {} of {HAIRPIN_CALLS} failed; first {:?}; answers {:?}{}",
                b.failures.len(),
                &b.failures[..b.failures.len().min(3)],
                b.counts,
                m.ctx()
            );
            let got = |t: &str| b.counts.get(t).copied().unwrap_or(0);
            for k in b.counts.keys() {
                assert!(
                    ALL.contains(&k.as_str()),
                    "{what}: unexpected answer {k:?}: {:?}{}",
                    b.counts,
                    m.ctx()
                );
            }
            // t1 answering is the hairpin to itself, t2 the one to its
            // neighbour on the same bridge, t3/t4 the mesh to another node.
            for (case, n) in [
                ("itself (t1)", got("t1")),
                ("its neighbour (t2)", got("t2")),
                ("a remote task (t3, t4)", got("t3") + got("t4")),
            ] {
                assert!(
                    n > 0,
                    "{what}: never answered by {case}: {:?}{}",
                    b.counts,
                    m.ctx()
                );
            }
            local += got("t1") + got("t2");
        }
        let after = m.counters(0);
        let delta = |k: &str| {
            after.get(k).copied().unwrap_or(0) as i64 - before.get(k).copied().unwrap_or(0) as i64
        };
        let line = format!(
            "{}: {local} calls answered by t1/t2; n1 hairpin +{}, hairpin_no_addr +{}, snat_new +{}",
            if v6 { "v6" } else { "v4" },
            delta("hairpin"),
            delta("hairpin_no_addr"),
            delta("snat_new")
        );
        eprintln!("{line}");
        // Each call is a new connection: each answered by t1 or t2 was a
        // new hairpin flow.
        assert!(
            delta("hairpin") >= local as i64,
            "{line}: the hairpin counter moved by less than the local answers{}",
            m.ctx()
        );
        summary.push(line);
    }
    eprintln!("hairpin from t1: {}", summary.join("; "));
}

/// Size of the file downloaded across the mesh.
const FILE_SIZE: usize = 5 * 1024 * 1024;
/// Deadline of one download.
const DOWNLOAD_DEADLINE: Duration = Duration::from_secs(60);
/// Datagrams of `UDP_BIG` bytes per family to the VIP.
const UDP_DATAGRAMS: usize = 20;
/// Larger than the switch MTU (1400) twice over: the client sends each
/// datagram in three fragments.
const UDP_BIG: usize = 3000;

/// Node-to-node links (the switch) at MTU 1400, tasks at 1500 (see
/// `MeshOpts::switch_mtu`): a 5 MB download from t3 on n2 through n1's
/// node address (v4 and v6) arrives complete, though t3 starts with
/// 1500-byte segments that n2 cannot route onto the switch (asserted:
/// n2 refused some and told t3); 3000-byte datagrams to the VIP, which the
/// client fragments, are answered (the fragments translated by n1, to
/// local and remote tasks).
#[test]
fn pmtu_across_the_mesh_with_1400_byte_node_links() {
    let m = Mesh::with_opts(
        "p",
        MeshOpts {
            switch_mtu: Some(1400),
        },
    );
    let data = file_data();
    m.serve_file("t3", FILE_PORT, "big", &data);
    let _daemons = start_cluster_with(
        &m,
        &config_with_files(&m),
        &["web", "web6", "solo", "bulk", "bulk6"],
    );
    let n1 = m.nodes[0].clone();
    let n2 = m.nodes[1].clone();
    let mut report = Vec::new();

    for (v6, port) in [(false, 82), (true, 8082)] {
        let dst = node_addr(&n1, port, v6);
        let before = snmp(&n2.ns);
        let t0 = Instant::now();
        let r = m.client(|| http_download(dst, "/big", DOWNLOAD_DEADLINE));
        let took = t0.elapsed();
        let after = snmp(&n2.ns);
        let body = r.unwrap_or_else(|e| {
            panic!(
                "download of {FILE_SIZE} bytes from t3 via {dst} failed after {took:?}: {e}{}",
                m.ctx()
            )
        });
        assert_eq!(
            body.len(),
            FILE_SIZE,
            "download via {dst}: byte count{}",
            m.ctx()
        );
        if let Some(at) = body.iter().zip(&data).position(|(a, b)| a != b) {
            panic!("download via {dst}: content differs from byte {at} on");
        }
        let d = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
        // The 1400-byte hop was really crossed: t3 (MTU 1500, told MSS
        // 1460/1440 by the client) sent full segments towards n1, which n2
        // could not route onto its uplink and answered with ICMP.
        let (refused, told) = if v6 {
            (d("Ip6FragFails"), d("Icmp6OutPktTooBigs"))
        } else {
            (d("Ip.FragFails"), d("IcmpMsg.OutType3"))
        };
        let line = format!(
            "download {FILE_SIZE} bytes t3 -> client via {dst}: {:.2} s; n2 refused {refused} too-big packets and sent {told} {}",
            took.as_secs_f64(),
            if v6 { "packet-too-big" } else { "destination-unreachable" }
        );
        eprintln!("{line}");
        assert!(
            refused > 0 && told > 0,
            "{line}: the big segments never met the 1400-byte hop{}",
            m.ctx()
        );
        report.push(line);
    }

    for dst in [format!("{VIP4}:53"), format!("[{VIP6}]:5300")] {
        let dst: SocketAddr = dst.parse().unwrap();
        let before = m.counters(0);
        let b = burst_in(&m.client_ns, dst, true, UDP_DATAGRAMS, UDP_BIG);
        let after = m.counters(0);
        let what = format!("{UDP_DATAGRAMS} datagrams of {UDP_BIG} bytes to {dst}");
        let ft = after.get("frag_translated").copied().unwrap_or(0)
            - before.get("frag_translated").copied().unwrap_or(0);
        let line = format!(
            "{what}: answers {:?}, {} failed; n1 frag_translated +{ft}",
            b.counts,
            b.failures.len(),
        );
        eprintln!("{line}");
        assert!(
            b.failures.is_empty(),
            "{line}; first failures {:?}{}",
            &b.failures[..b.failures.len().min(3)],
            m.ctx()
        );
        for k in b.counts.keys() {
            assert!(
                ALL.contains(&k.as_str()),
                "{what}: unexpected answer {k:?}: {:?}{}",
                b.counts,
                m.ctx()
            );
        }
        let got = |t: &str| b.counts.get(t).copied().unwrap_or(0);
        assert!(
            got("t1") + got("t2") > 0 && got("t3") + got("t4") > 0,
            "{what}: not answered by both a task of n1 and a remote one: {:?}{}",
            b.counts,
            m.ctx()
        );
        // Every datagram came in three fragments; n1 translated the two
        // later ones of each (nothing else gets them to a task).
        assert!(
            ft >= 2 * UDP_DATAGRAMS as u64,
            "{line}: expected n1 frag_translated +{} at least{}",
            2 * UDP_DATAGRAMS,
            m.ctx()
        );
        report.push(line);
    }

    for (i, n) in m.nodes.iter().enumerate() {
        let c = m.counters(i);
        let line = format!(
            "{} counters: frag_translated={} icmp_translated={} fragment={} frag_unknown={}",
            n.name,
            c.get("frag_translated").copied().unwrap_or(0),
            c.get("icmp_translated").copied().unwrap_or(0),
            c.get("fragment").copied().unwrap_or(0),
            c.get("frag_unknown").copied().unwrap_or(0),
        );
        eprintln!("{line}");
        report.push(line);
    }
    eprintln!("pmtu summary:\n  {}", report.join("\n  "));
}

/// Deadline of one transfer of `pmtu_from_tasks_...` (each takes well under
/// a second when it works).
const TRANSFER_DEADLINE: Duration = Duration::from_secs(20);
/// Datagrams of `pmtu_from_tasks_...` that may be lost while the path MTU
/// is learnt: the first one that meets the narrow link (which one that is
/// depends on which task Maglev picks for each; local tasks need no
/// fragmenting). Its sender then knows the path MTU to the VIP, so no
/// later one may be lost.
const UDP_LOST_MAX: usize = 1;

/// The file of the path MTU tests.
fn file_data() -> Vec<u8> {
    (0..FILE_SIZE)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect()
}

/// The 1400-byte fabric of `pmtu_across_the_mesh_...`, where it is a
/// node's own program that translates a task's full-sized (1500-byte)
/// packets onto its uplink, v4 and v6:
/// (a) a 5 MB download by the client through n2, the node t3 runs on (n2
///     translates t3's answers back to its node address);
/// (b) a 5 MB upload (PUT) from t1 through n1 to t3 (n1 translates t1's
///     segments to t3 and to its own address);
/// (c) 3000-byte datagrams from t1 to the VIP, which t1 sends in
///     1500-byte fragments (n1 translates them; to t3 and t4 they must
///     cross the fabric).
/// The node refusing a packet too big for its uplink must make the task
/// learn the path MTU, with an ICMP error the task recognises as its own
/// flow's (meshlb builds it: `too_big`, asserted to move on the node that
/// translated). The TCP transfers must arrive whole. A datagram is lost
/// until its sender has learnt the path MTU (as over any IPv6 path; for
/// IPv4 meshlb answers instead of fragmenting): at most `UDP_LOST_MAX` of
/// each family may go unanswered.
#[test]
fn pmtu_from_tasks_and_through_the_tasks_own_node_with_1400_byte_node_links() {
    let m = Mesh::with_opts(
        "q",
        MeshOpts {
            switch_mtu: Some(1400),
        },
    );
    let data = file_data();
    let root = m.serve_file("t3", FILE_PORT, "big", &data);
    let _daemons = start_cluster_with(
        &m,
        &config_with_files(&m),
        &["web", "web6", "solo", "bulk", "bulk6"],
    );
    let t1 = m.task("t1").clone();
    let (n1, n2) = (m.nodes[0].clone(), m.nodes[1].clone());
    let mut report = Vec::new();
    let mut problems = Vec::new();
    // What the translating node did with packets too big for its uplink:
    // meshlb's answers (`too_big`), and what its stack refused and
    // answered itself (nothing, once meshlb answers).
    let refusals = |i: usize, before: &BTreeMap<String, i64>, tb: u64, v6: bool| {
        let n = &m.nodes[i];
        let after = snmp(&n.ns);
        let d = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
        let too_big = m.counters(i).get("too_big").copied().unwrap_or(0) - tb;
        let stack = if v6 {
            format!(
                "stack: {} refused, {} packet-too-big sent",
                d("Ip6FragFails"),
                d("Icmp6OutPktTooBigs")
            )
        } else {
            format!(
                "stack: {} refused, {} unreachable sent",
                d("Ip.FragFails"),
                d("IcmpMsg.OutType3")
            )
        };
        (too_big, format!("meshlb too_big +{too_big}; {stack}"))
    };
    let too_big = |i: usize| m.counters(i).get("too_big").copied().unwrap_or(0);

    // (a) Through the task's own node.
    for (v6, port) in [(false, 82), (true, 8082)] {
        let dst = node_addr(&n2, port, v6);
        let (before, tb) = (snmp(&n2.ns), too_big(1));
        let t0 = Instant::now();
        let r = m.client(|| http_download(dst, "/big", TRANSFER_DEADLINE));
        let took = t0.elapsed();
        let what = format!("(a) client downloads {FILE_SIZE} bytes from t3 via n2 {dst}");
        let outcome = match r {
            Ok(body) if body == data => "complete".to_string(),
            Ok(body) => {
                problems.push(format!("{what}: {} bytes, not the file", body.len()));
                "WRONG CONTENT".to_string()
            }
            Err(e) => {
                problems.push(format!("{what}: {e}"));
                format!("FAILED: {e}")
            }
        };
        let (answered, r) = refusals(1, &before, tb, v6);
        if answered == 0 {
            problems.push(format!("{what}: n2 never answered a too-big packet ({r})"));
        }
        report.push(format!(
            "{what}: {outcome} after {:.2} s; n2: {r}",
            took.as_secs_f64()
        ));
    }

    // (b) From a task on n1 to a task on n2.
    for (v6, port) in [(false, 82), (true, 8082)] {
        let dst = node_addr(&n1, port, v6);
        let name = format!("t1-{}", if v6 { "v6" } else { "v4" });
        let (before, tb) = (snmp(&n1.ns), too_big(0));
        let t0 = Instant::now();
        let r = common::in_netns(&t1.ns, || {
            http_put(dst, &format!("/up/{name}"), &data, TRANSFER_DEADLINE)
        });
        let took = t0.elapsed();
        let what = format!("(b) t1 uploads {FILE_SIZE} bytes to t3 via n1 {dst}");
        let stored = std::fs::read(root.join("up").join(&name)).unwrap_or_default();
        let outcome = match r {
            Ok(201 | 204) if stored == data => "complete".to_string(),
            Ok(code) => {
                problems.push(format!(
                    "{what}: status {code}, {} bytes stored",
                    stored.len()
                ));
                format!("status {code}, {} bytes stored", stored.len())
            }
            Err(e) => {
                problems.push(format!("{what}: {e}"));
                format!("FAILED: {e}")
            }
        };
        let (answered, r) = refusals(0, &before, tb, v6);
        if answered == 0 {
            problems.push(format!("{what}: n1 never answered a too-big packet ({r})"));
        }
        report.push(format!(
            "{what}: {outcome} after {:.2} s; n1: {r}",
            took.as_secs_f64()
        ));
    }

    // (c) Fragmented datagrams from a task on n1.
    for (v6, dst) in [
        (false, format!("{VIP4}:53")),
        (true, format!("[{VIP6}]:5300")),
    ] {
        let dst: SocketAddr = dst.parse().unwrap();
        let (before, tb) = (snmp(&n1.ns), too_big(0));
        let b = burst_in(&t1.ns, dst, true, UDP_DATAGRAMS, UDP_BIG);
        let what = format!("(c) t1 sends {UDP_DATAGRAMS} datagrams of {UDP_BIG} bytes to {dst}");
        let got = |t: &str| b.counts.get(t).copied().unwrap_or(0);
        if b.failures.len() > UDP_LOST_MAX {
            problems.push(format!(
                "{what}: {} unanswered, more than the {UDP_LOST_MAX} lost while the path MTU is learnt (answers {:?}); first: {:?}",
                b.failures.len(),
                b.counts,
                &b.failures[..b.failures.len().min(3)]
            ));
        } else if got("t3") + got("t4") == 0 || got("t1") + got("t2") == 0 {
            problems.push(format!(
                "{what}: not answered by both a task of n1 and a remote one: {:?}",
                b.counts
            ));
        }
        let (_, r) = refusals(0, &before, tb, v6);
        report.push(format!(
            "{what}: answers {:?}, {} unanswered {:?}; n1: {r}",
            b.counts,
            b.failures.len(),
            b.failures,
        ));
    }

    for (i, n) in m.nodes.iter().enumerate() {
        let c = m.counters(i);
        let k = |name: &str| c.get(name).copied().unwrap_or(0);
        report.push(format!(
            "{} counters: too_big={} frag_translated={} icmp_translated={} fragment={} fib_pass={}",
            n.name,
            k("too_big"),
            k("frag_translated"),
            k("icmp_translated"),
            k("fragment"),
            k("fib_pass")
        ));
    }
    eprintln!("pmtu from tasks:\n  {}", report.join("\n  "));
    assert!(
        problems.is_empty(),
        "{} of 6 cases failed:\n  {}\nreport:\n  {}{}",
        problems.len(),
        problems.join("\n  "),
        report.join("\n  "),
        m.ctx()
    );
}
