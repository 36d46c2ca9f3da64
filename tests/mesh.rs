//! The routing mesh on a three-node netns cluster (see `common::mesh`):
//! every node answers on every published port for every task wherever it
//! runs (local tasks by DNAT, remote ones by DNAT + SNAT to the node),
//! forwarding continues with a node's daemon dead, removed tasks get no new
//! flows while established ones continue, every node picks the same task
//! for the same flow. Connection-per-request load to a remote task is in
//! `mesh_load.rs`, a binary of its own so that it runs alone.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::mesh::{config, node_addr, start_cluster, Mesh, ALL, SERVICES, VIP4, VIP6};
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
    m.client(|| {
        let mut b = Burst::default();
        for i in 0..n {
            // udp_request checks the reply comes from `dst` itself; a TCP
            // handshake only completes when it does.
            let r = if udp {
                udp_request(dst, format!("ping {i}").as_bytes(), REQ_TIMEOUT)
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
