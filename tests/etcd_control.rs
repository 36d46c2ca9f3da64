//! The etcd control plane end to end: `meshlb run --etcd` in a topology's
//! LB namespace, with a real etcd (started inside that namespace, see
//! `common::etcd`) written by the `meshlb service|task` CLI, by etcdctl and
//! by an in-process churn client.
//!
//! Covered: CLI-made services and tasks carry traffic and their removal
//! stops it; 1000 random writes converge exactly; a watch resumed after a
//! compaction re-lists without stale backends; a watch stream cut (by a
//! TCP proxy the test controls) between its created response and its
//! backlog loses no event; a 30 s etcd outage loses no request and a
//! write after it is applied within 1 s; a 3-member cluster losing its
//! leader mid-churn misses no update; TLS with client-cert auth
//! works and a wrong CA fails clearly; username/password auth works and a
//! missing or wrong password is refused in one line; malformed records are skipped with
//! one log line and a metric each. Needs root; see `common` for the topology.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::etcd::*;
use common::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

/// A non-default prefix, so `--prefix` is exercised everywhere.
const PREFIX: &str = "/mlbt/v1";
const READY: Duration = Duration::from_secs(30);
const REQ_TIMEOUT: Duration = Duration::from_secs(3);
const METRICS: &str = "127.0.0.1:9742";
/// The etcd-defined service most tests use. Deliberately not the embedded
/// demo's 10.96.0.10:80, so a stray demo service cannot mask these tests.
const WEB_VIP_IP: &str = "10.96.0.50";
const WEB_PORT: u16 = 8080;
const WEB_VIP: &str = "10.96.0.50:8080";

/// A port the test itself listens on in the LB namespace, as sshd would.
const SSHD_PORT: u16 = 2222;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn svc_key(name: &str) -> String {
    format!("{PREFIX}/services/{name}")
}

fn task_key(svc: &str, id: &str) -> String {
    format!("{PREFIX}/tasks/{svc}/{id}")
}

fn service_json(name: &str, vip: &str, port: u16) -> String {
    json!({"name": name, "vip": vip, "publish": [{"proto": "tcp", "port": port, "target": HTTP_PORT}]})
        .to_string()
}

fn task_json(addr: &str, port: u16, weight: u32, state: &str) -> String {
    json!({"addr": addr, "port": port, "weight": weight, "state": state}).to_string()
}

/// A meshlb client command with this suite's prefix.
fn cli(c: &EtcdClient, args: &[&str]) -> CmdOutput {
    let mut a = args.to_vec();
    a.extend(["--prefix", PREFIX]);
    c.meshlb(&a)
}

fn cli_ok(topo: &Topology, c: &EtcdClient, args: &[&str]) -> String {
    let out = cli(c, args);
    assert!(
        out.success(),
        "meshlb client command failed: {}{}",
        out.describe(),
        topo.ctx()
    );
    out.stdout
}

/// Backends, nginx on :8000 and warm neighbour caches.
fn prepared(tag: &str) -> Topology {
    let topo = Topology::new(tag, TopoOpts { backends: 3 });
    topo.start_nginx();
    topo.warm_up(None);
    topo
}

/// `meshlb run --node lb --xdp-mode generic --prefix ... --etcd ...` on
/// every LB interface, plus `extra`.
fn start_etcd_daemon(topo: &Topology, etcd: &EtcdClient, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = ["--node", "lb", "--xdp-mode", "generic", "--prefix", PREFIX]
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    args.extend(etcd.meshlb_flags());
    args.extend(extra.iter().map(std::string::ToString::to_string));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let ifaces = topo.lb_ifaces();
    let irefs: Vec<&str> = ifaces.iter().map(String::as_str).collect();
    topo.start_daemon_args(&refs, &irefs)
}

/// One backend as the tests compare it: (addr, port, weight, state), the
/// state in status' words ("up" for a running task).
type BackendRow = (String, u64, u64, String);
/// Service name -> its backends.
type Programmed = BTreeMap<String, BTreeSet<BackendRow>>;

/// What status says, for the services not in `ignore`.
fn from_status(status: &Value, ignore: &[&str]) -> Programmed {
    let mut m = Programmed::new();
    for s in status["services"].as_array().cloned().unwrap_or_default() {
        let name = s["name"].as_str().unwrap_or("").to_string();
        if ignore.contains(&name.as_str()) {
            continue;
        }
        let rows = s["backends"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|b| {
                (
                    b["addr"].as_str().unwrap_or("?").to_string(),
                    b["port"].as_u64().unwrap_or(0),
                    b["weight"].as_u64().unwrap_or(u64::MAX),
                    b["state"].as_str().unwrap_or("?").to_string(),
                )
            })
            .collect();
        m.insert(name, rows);
    }
    m
}

/// What etcd says should be programmed: every service record, with the
/// tasks under its name (records written by these tests are all valid).
fn from_etcd(etcd: &EtcdClient) -> Programmed {
    let kvs = etcd.get_prefix(&format!("{PREFIX}/"));
    let mut m = Programmed::new();
    for k in kvs.keys() {
        if let Some(name) = k.strip_prefix(&format!("{PREFIX}/services/")) {
            m.insert(name.to_string(), BTreeSet::new());
        }
    }
    for (k, (v, _)) in &kvs {
        let Some(rest) = k.strip_prefix(&format!("{PREFIX}/tasks/")) else {
            continue;
        };
        let svc = rest.split('/').next().unwrap_or("");
        let Some(rows) = m.get_mut(svc) else { continue };
        let t: Value =
            serde_json::from_str(v).unwrap_or_else(|e| panic!("{k}: not JSON ({e}): {v}"));
        let state = match t["state"].as_str().unwrap_or("running") {
            "running" => "up",
            other => other,
        };
        rows.insert((
            t["addr"].as_str().unwrap_or("?").to_string(),
            t["port"].as_u64().unwrap_or(u64::from(HTTP_PORT)),
            t["weight"].as_u64().unwrap_or(100),
            state.to_string(),
        ));
    }
    m
}

/// Readable difference between two programmed states.
fn diff(want: &Programmed, got: &Programmed) -> String {
    let mut s = String::new();
    let names: BTreeSet<&String> = want.keys().chain(got.keys()).collect();
    for n in names {
        match (want.get(n), got.get(n)) {
            (Some(w), Some(g)) if w == g => {}
            (Some(w), Some(g)) => {
                s += &format!(
                    "\n  {n}: missing {:?}; extra {:?}",
                    w.difference(g).collect::<Vec<_>>(),
                    g.difference(w).collect::<Vec<_>>()
                );
            }
            (Some(w), None) => s += &format!("\n  {n}: in etcd ({} tasks), not in status", w.len()),
            (None, Some(g)) => {
                s += &format!("\n  {n}: in status ({} backends), not in etcd", g.len());
            }
            (None, None) => {}
        }
    }
    s
}

/// Waits until status (minus `ignore`) equals `want`; returns how long it took.
fn wait_programmed(
    topo: &Topology,
    want: &Programmed,
    ignore: &[&str],
    timeout: Duration,
) -> Duration {
    let t0 = Instant::now();
    let mut last = Programmed::new();
    let r = wait_for(timeout, "status to match etcd", || {
        last = from_status(&topo.try_status()?, ignore);
        if &last == want {
            Ok(())
        } else {
            Err(diff(want, &last))
        }
    });
    if let Err(e) = r {
        panic!("{e}\nwant {want:?}\ngot  {last:?}{}", topo.ctx());
    }
    t0.elapsed()
}

/// Addresses of `service`'s backends in status, `None` while it is absent.
fn backend_addrs(status: &Value, service: &str) -> Option<BTreeSet<String>> {
    let svc = status["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == service)?;
    Some(
        svc["backends"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|b| b["addr"].as_str().map(str::to_string))
            .collect(),
    )
}

fn wait_backend_addrs(topo: &Topology, service: &str, want: &[&str], timeout: Duration) {
    let want: Option<BTreeSet<String>> =
        Some(want.iter().map(std::string::ToString::to_string).collect());
    let r = wait_for(timeout, &format!("{service} backends {want:?}"), || {
        let got = backend_addrs(&topo.try_status()?, service);
        if got == want {
            Ok(())
        } else {
            Err(format!("status has {got:?}"))
        }
    });
    if let Err(e) = r {
        panic!("{e}{}", topo.ctx());
    }
}

fn daemon_metrics(topo: &Topology) -> String {
    in_netns(&topo.lb_ns, || {
        http_get_path(sa(METRICS), "/metrics", Duration::from_secs(3))
    })
    .unwrap_or_else(|e| panic!("daemon /metrics: {e}{}", topo.ctx()))
}

/// Sum of every sample of `name` (any labels) in Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `services/good` (VIP `vip`, port `WEB_PORT`) with one running task on
/// `addr`.
fn put_good(c: &EtcdClient, vip: &str, addr: &str) {
    c.put(&svc_key("good"), &service_json("good", vip, WEB_PORT));
    c.put(
        &task_key("good", "ok"),
        &task_json(addr, HTTP_PORT, 100, "running"),
    );
}

/// Each of `keys` (full etcd keys) named by exactly one line of `log`;
/// one problem per key that is not.
fn once_each(log: &str, keys: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    for k in keys {
        let rel = k.strip_prefix(&format!("{PREFIX}/")).unwrap_or(k);
        let lines: Vec<&str> = log.lines().filter(|l| names_key(l, rel)).collect();
        if lines.len() != 1 {
            problems.push(format!(
                "{rel}: {} log lines (want exactly 1): {:?}",
                lines.len(),
                lines
                    .iter()
                    .map(|l| &l[..l.len().min(300)])
                    .collect::<Vec<_>>()
            ));
        }
    }
    problems
}

/// The id `meshlb task add` printed (first word of its last line).
fn printed_id(stdout: &str) -> String {
    stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("task add printed no id: {stdout:?}"))
        .to_string()
}

/// Whether `line` names `key` itself (not merely a longer key it prefixes).
fn names_key(line: &str, key: &str) -> bool {
    line.match_indices(key).any(|(i, _)| {
        !line[i + key.len()..]
            .starts_with(|c: char| c.is_ascii_alphanumeric() || "-_./".contains(c))
    })
}

/// Whether an error line is about certificates / the CA.
fn mentions_cert(line: &str) -> bool {
    let l = line.to_lowercase();
    l.contains("certificate")
        || l.contains("unknownissuer")
        || l.contains("unknown issuer")
        || l.split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| w == "ca")
}

// ---------------------------------------------------------------------------

/// The harness itself, without meshlb: a server (restart keeps data,
/// compaction), TLS with client-cert auth and a wrong CA, and a 3-member
/// cluster that survives losing its leader.
#[test]
fn harness_etcd_server_tls_and_cluster() {
    require_root();
    let mut e = EtcdServer::start("hes");
    let c = e.client();
    c.put("/k/a", "1");
    c.put("/k/b", "-2");
    assert_eq!(
        c.get_prefix("/k/").get("/k/b").map(|v| v.0.as_str()),
        Some("-2")
    );
    let rev = c.revision();
    c.del("/k/a");
    c.compact(rev);
    assert!(c
        .etcdctl(&["get", "/k/a", "--rev", &(rev - 1).to_string()])
        .stderr
        .contains("compacted"));
    e.stop();
    assert!(
        !c.etcdctl(&["get", "/k/b"]).success(),
        "etcd answered after stop()"
    );
    e.start_again();
    assert_eq!(c.get_prefix("/k/").len(), 1, "data kept across a restart");
    let n = c.with_client(|rt, cl| {
        rt.block_on(cl.put("/k/c", "3", None)).unwrap();
        rt.block_on(cl.get("/k/", Some(etcd_client::GetOptions::new().with_prefix())))
            .unwrap()
            .kvs()
            .len()
    });
    assert_eq!(n, 2);
    drop(e);

    let t = EtcdServer::start_tls("het");
    let c = t.client();
    c.put("/tls", "ok");
    // rustls (what meshlb uses) accepts these certificates too.
    let got = c.with_client(|rt, cl| {
        let r = rt
            .block_on(cl.get("/tls", None))
            .expect("etcd-client get over TLS");
        r.kvs().first().map(|kv| kv.value().to_vec())
    });
    assert_eq!(got.as_deref(), Some(&b"ok"[..]));
    let pki = t.pki.clone().unwrap();
    let no_cert = c.with_tls(Some(ClientTls {
        ca: pki.ca.clone(),
        cert: None,
        key: None,
    }));
    assert!(
        !no_cert.etcdctl(&["get", "/tls"]).success(),
        "client-cert auth not enforced"
    );
    let wrong_ca = c.with_tls(Some(ClientTls {
        ca: pki.other_ca.clone(),
        cert: Some(pki.client_cert.clone()),
        key: Some(pki.client_key.clone()),
    }));
    assert!(
        !wrong_ca.etcdctl(&["get", "/tls"]).success(),
        "wrong CA accepted"
    );
    drop(t);

    let mut cl = EtcdCluster::start("hec", 3);
    let c = cl.client();
    c.put("/x", "1");
    let leader = cl.leader();
    cl.kill_member(leader);
    let survivors = EtcdClient {
        endpoints: (0..3)
            .filter(|&i| i != leader)
            .map(|i| cl.members[i].url())
            .collect(),
        ..c.clone()
    };
    wait_for(Duration::from_secs(15), "a new leader", || {
        let out = survivors.etcdctl(&["put", "/x", "2"]);
        if out.success() {
            Ok(())
        } else {
            Err(out.describe())
        }
    })
    .unwrap_or_else(|e| panic!("{e}{}", cl.logs(20)));
    assert_ne!(cl.leader(), leader);
}

/// a. `service create` + `task add` carry traffic; `task rm` stops new
/// connections to that task; `service rm` stops the VIP. A static service
/// from the config file keeps working alongside; the node registers itself
/// under a 10 s lease.
#[test]
fn cli_service_and_tasks_carry_traffic() {
    require_root();
    let topo = prepared("ea");
    let etcd = EtcdServer::start_in(&topo.lb_ns, "ea");
    let c = etcd.client();
    let b3 = topo.backend("b3").v4;
    let cfg = topo.write_file(
        "meshlb.toml",
        &config_toml(&[Svc {
            name: "fixed",
            vip: Some("10.96.0.20"),
            proto: "tcp",
            port: 81,
            target: HTTP_PORT,
            backends: vec![b3.into()],
        }]),
    );
    let cfg_s = cfg.display().to_string();
    let mut d = start_etcd_daemon(&topo, &c, &["--config", &cfg_s]);
    topo.wait_ready(&mut d, &["fixed"], READY);

    cli_ok(
        &topo,
        &c,
        &[
            "service",
            "create",
            "web",
            "--publish",
            "tcp:8080:8000",
            "--vip",
            WEB_VIP_IP,
        ],
    );
    let mut ids = BTreeMap::new();
    for b in &topo.backends {
        let addr = format!("{}:{HTTP_PORT}", b.v4);
        let out = cli_ok(&topo, &c, &["task", "add", "web", &addr]);
        ids.insert(b.name.clone(), printed_id(&out));
    }
    let ls = cli_ok(&topo, &c, &["task", "ls", "web"]);
    for (name, id) in &ids {
        assert!(
            ls.lines()
                .any(|l| l.split_whitespace().next() == Some(id.as_str())),
            "task ls lacks {name}'s id {id}:\n{ls}"
        );
    }
    let sls = cli_ok(&topo, &c, &["service", "ls"]);
    assert!(
        sls.contains("web") && sls.contains(WEB_VIP_IP),
        "service ls:\n{sls}"
    );
    let inspect = cli_ok(&topo, &c, &["service", "inspect", "web"]);
    assert!(
        inspect.contains(WEB_VIP_IP),
        "service inspect web:\n{inspect}"
    );

    let all: Vec<String> = topo.backends.iter().map(|b| b.v4.to_string()).collect();
    let all_refs: Vec<&str> = all.iter().map(String::as_str).collect();
    wait_backend_addrs(&topo, "web", &all_refs, Duration::from_secs(5));
    let vip = sa(WEB_VIP);
    let burst = topo.http_burst(vip, 300, REQ_TIMEOUT);
    topo.assert_spread(
        "300 GETs over 3 CLI tasks",
        &burst,
        &topo.backend_names(),
        0.15,
    );
    let fixed = topo.http_burst(sa("10.96.0.20:81"), 20, REQ_TIMEOUT);
    topo.assert_spread("static service", &fixed, &["b3".to_string()], 1.0);

    // The node's registration: under a lease granted for 10 s.
    let nodes = c.get_prefix(&format!("{PREFIX}/nodes/"));
    let (_, lease) = nodes
        .get(&format!("{PREFIX}/nodes/lb"))
        .unwrap_or_else(|| panic!("no {PREFIX}/nodes/lb in etcd: {nodes:?}{}", topo.ctx()));
    assert_ne!(*lease, 0, "{PREFIX}/nodes/lb is not bound to a lease");
    let ttl = c.etcdctl_ok(&["lease", "timetolive", &format!("{lease:x}")]);
    assert!(ttl.contains("granted with TTL(10s)"), "node lease: {ttl}");

    let m = daemon_metrics(&topo);
    assert!(
        metric_sum(&m, "meshlb_sync_latency_seconds_count") > 0.0,
        "meshlb_sync_latency_seconds observed nothing after etcd changes:\n{m}"
    );

    // task rm: the removed backend gets no new connection.
    cli_ok(&topo, &c, &["task", "rm", "web", &ids["b1"]]);
    let rest: Vec<&str> = all_refs[1..].to_vec();
    wait_backend_addrs(&topo, "web", &rest, Duration::from_secs(5));
    let burst = topo.http_burst(vip, 100, REQ_TIMEOUT);
    topo.assert_spread(
        "100 GETs after task rm b1",
        &burst,
        &["b2".to_string(), "b3".to_string()],
        0.15,
    );

    // service rm: the VIP is no longer translated (packets go to the stack,
    // which has no route for it).
    cli_ok(&topo, &c, &["service", "rm", "web"]);
    wait_for(
        Duration::from_secs(5),
        "web to leave status",
        || match backend_addrs(&topo.try_status()?, "web") {
            None => Ok(()),
            Some(b) => Err(format!("still there with {b:?}")),
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
    let burst = topo.http_burst(vip, 5, Duration::from_secs(1));
    assert!(
        burst.counts.is_empty(),
        "VIP still answers after service rm: {:?}{}",
        burst.counts,
        topo.ctx()
    );
    let fixed = topo.http_burst(sa("10.96.0.20:81"), 20, REQ_TIMEOUT);
    topo.assert_spread(
        "static service after service rm",
        &fixed,
        &["b3".to_string()],
        1.0,
    );
    assert!(d.is_running(), "daemon died{}", topo.ctx());
}

/// The i-th of the churn's task ids maps to one (addr, port), so no two
/// tasks of a service share a backend address.
fn churn_task(rng: &mut Rng, svc: &str, id: u64) -> Op {
    let key = task_key(svc, &format!("t{id}"));
    if rng.below(3) == 0 {
        return Op::Del(key);
    }
    let addr = format!("10.201.{}.2", id % 3 + 1);
    let port = 8000 + (id / 3) as u16;
    let weight = 1 + rng.below(200) as u32;
    let state = if rng.below(5) == 0 {
        "draining"
    } else {
        "running"
    };
    Op::Put(key, task_json(&addr, port, weight, state))
}

/// `n` random writes over 3 services × 12 task ids (about 3% service
/// puts, 1% service deletes). Seeded; `MLBT_SEED` overrides.
fn churn_ops(n: usize, seed: u64) -> Vec<Op> {
    let seed = std::env::var("MLBT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(seed);
    eprintln!("churn seed {seed}");
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let k = rng.below(3);
            let svc = format!("svc{k}");
            if rng.below(100) < 4 {
                // Mostly re-puts, so most services exist when churn ends.
                if rng.below(4) != 0 {
                    Op::Put(svc_key(&svc), churn_service(k))
                } else {
                    Op::Del(svc_key(&svc))
                }
            } else {
                let id = rng.below(12);
                churn_task(&mut rng, &svc, id)
            }
        })
        .collect()
}

/// Churn service `k`: its own VIP and its own published (node) port, since
/// a published port belongs to one service on every node address.
fn churn_service(k: u64) -> String {
    let name = format!("svc{k}");
    service_json(
        &name,
        &format!("10.96.1.{}", k + 1),
        WEB_PORT + 1 + k as u16,
    )
}

fn put_churn_services(c: &EtcdClient) {
    for k in 0..3 {
        let svc = format!("svc{k}");
        c.put(&svc_key(&svc), &churn_service(k));
    }
}

/// b. 1000 random task (and a few service) writes while the daemon runs:
/// afterwards status equals etcd exactly (addr, port, weight, state).
#[test]
fn churn_converges_exactly() {
    require_root();
    let topo = Topology::new("eb", TopoOpts { backends: 3 });
    let etcd = EtcdServer::start_in(&topo.lb_ns, "eb");
    let c = etcd.client();
    put_churn_services(&c);
    let mut d = start_etcd_daemon(&topo, &c, &[]);
    topo.wait_ready(&mut d, &["svc0", "svc1", "svc2"], READY);

    let t0 = Instant::now();
    let churn = Churn::start(&c, churn_ops(1000, 0x6d65_7368), Duration::from_secs(10));
    churn
        .join()
        .unwrap_or_else(|e| panic!("churn: {e}{}", etcd.log_tail(20)));
    let wrote = t0.elapsed();
    let want = from_etcd(&c);
    let took = wait_programmed(&topo, &want, &[], Duration::from_secs(5));
    eprintln!(
        "1000 writes in {wrote:?}; status matched etcd {took:?} later ({} services, {} tasks)",
        want.len(),
        want.values().map(BTreeSet::len).sum::<usize>()
    );
    assert!(d.is_running(), "daemon died{}", topo.ctx());

    // `status` shows the daemon's sync latency (written at most once a
    // second: the last write may be a second behind the churn's end).
    let mut last = Value::Null;
    let shown = (0..30).any(|_| {
        last = topo.status()["sync_latency"].clone();
        // Bursts coalesce: a few syncs, not one per write.
        let ok = last["count"].as_u64().is_some_and(|n| n >= 3);
        if !ok {
            std::thread::sleep(Duration::from_millis(100));
        }
        ok
    });
    assert!(
        shown,
        "status shows no sync latency of the churn: {last}{}",
        topo.ctx()
    );
    let ms = |k: &str| last[k].as_f64().unwrap_or(-1.0);
    assert!(
        0.0 < ms("p50_ms") && ms("p50_ms") <= ms("p99_ms") && ms("p99_ms") <= ms("max_ms"),
        "sync latency out of order: {last}"
    );
    eprintln!("status sync_latency after the churn: {last}");
    let dir = topo.lb_bpffs().display().to_string();
    let text = topo.meshlb(
        &topo.lb_ns,
        &["status", "--bpffs", &dir],
        Duration::from_secs(15),
    );
    assert!(
        text.stdout
            .contains("sync latency (etcd event -> kernel)  p50 "),
        "the status table has no sync latency line:\n{}",
        text.stdout
    );
}

/// Service "web" with tasks t1 (b1) and t2 (b2) in etcd, and a daemon that
/// has programmed both.
fn web_on_b1_b2(topo: &Topology, c: &EtcdClient) -> Proc {
    let ip = |n: &str| topo.backend(n).v4.to_string();
    c.put(&svc_key("web"), &service_json("web", WEB_VIP_IP, WEB_PORT));
    for (id, b) in [("t1", "b1"), ("t2", "b2")] {
        c.put(
            &task_key("web", id),
            &task_json(&ip(b), HTTP_PORT, 100, "running"),
        );
    }
    let mut d = start_etcd_daemon(topo, c, &[]);
    topo.wait_ready(&mut d, &["web"], READY);
    wait_backend_addrs(topo, "web", &[&ip("b1"), &ip("b2")], Duration::from_secs(5));
    d
}

/// c. The daemon misses changes and the history it would resume from is
/// compacted: it must re-list, keeping no stale backend.
#[test]
fn compaction_forces_relist_without_stale_backends() {
    require_root();
    let topo = prepared("ec");
    let mut etcd = EtcdServer::start_in(&topo.lb_ns, "ec");
    let c = etcd.client();
    let ip = |n: &str| topo.backend(n).v4.to_string();
    let mut d = web_on_b1_b2(&topo, &c);
    let seen = c.revision();

    // Freeze the daemon, and break its watch stream by restarting etcd, so
    // it has to resume from its old revision; then change and compact.
    d.signal(Signal::SIGSTOP);
    let frozen = Instant::now();
    etcd.stop();
    etcd.start_again();
    c.del(&task_key("web", "t1"));
    c.put(
        &task_key("web", "t3"),
        &task_json(&ip("b3"), HTTP_PORT, 100, "running"),
    );
    for i in 0..20 {
        c.put("/unrelated/filler", &i.to_string());
    }
    let rev = c.revision();
    assert!(rev > seen + 20, "revision {rev} did not move past {seen}");
    c.compact(rev);
    d.signal(Signal::SIGCONT);
    eprintln!(
        "daemon frozen for {:?}; compacted at {rev} (daemon saw {seen})",
        frozen.elapsed()
    );

    wait_backend_addrs(
        &topo,
        "web",
        &[&ip("b2"), &ip("b3")],
        Duration::from_secs(10),
    );
    let burst = topo.http_burst(sa(WEB_VIP), 100, REQ_TIMEOUT);
    topo.assert_spread(
        "after re-list",
        &burst,
        &["b2".to_string(), "b3".to_string()],
        0.15,
    );
    let log = fs_log(&topo);
    let compact_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.to_lowercase().contains("compact"))
        .collect();
    eprintln!("daemon log lines mentioning compaction: {compact_lines:?}");
    assert!(d.is_running(), "daemon died{}", topo.ctx());
}

/// The daemon's log (every run of this test, concatenated).
fn fs_log(topo: &Topology) -> String {
    let mut s = String::new();
    if let Ok(rd) = std::fs::read_dir(&topo.dir) {
        let mut paths: Vec<_> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("meshlb-run-"))
            })
            .collect();
        paths.sort();
        for p in paths {
            s += &std::fs::read_to_string(p).unwrap_or_default();
        }
    }
    s
}

/// Sets the flag when dropped, so a panicking test still stops its client loop.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// d. etcd down for 30 s while a client keeps requesting the VIP: nothing
/// fails; once etcd is back and the daemon watches again, a `task add` is
/// programmed within 1 s and takes traffic.
#[test]
fn etcd_outage_keeps_forwarding_and_recovers() {
    require_root();
    let topo = prepared("ed");
    let mut etcd = EtcdServer::start_in(&topo.lb_ns, "ed");
    let c = etcd.client();
    let ip = |n: &str| topo.backend(n).v4.to_string();
    let mut d = web_on_b1_b2(&topo, &c);
    let vip = sa(WEB_VIP);

    let stop = AtomicBool::new(false);
    let tally: Mutex<(usize, Vec<String>)> = Mutex::new((0, Vec::new()));
    thread::scope(|s| {
        let _guard = StopOnDrop(&stop);
        s.spawn(|| {
            topo.client(|| {
                while !stop.load(Ordering::Relaxed) {
                    let r = http_get(vip, REQ_TIMEOUT);
                    let mut t = tally.lock().unwrap();
                    match r {
                        Ok(_) => t.0 += 1,
                        Err(e) => t.1.push(e),
                    }
                    drop(t);
                    thread::sleep(Duration::from_millis(20));
                }
            });
        });
        thread::sleep(Duration::from_secs(1));
        etcd.stop();
        let down = Instant::now();
        while down.elapsed() < Duration::from_secs(30) {
            assert!(
                d.is_running(),
                "daemon exited while etcd was down{}",
                topo.ctx()
            );
            thread::sleep(Duration::from_millis(500));
        }
        etcd.start_again();
        let back = Instant::now();
        // The daemon is back once it holds a watch stream again (etcdctl never does).
        wait_for(
            Duration::from_secs(20),
            "the daemon to watch again",
            || match c.watch_streams()? {
                0 => Err("no watch stream on etcd".into()),
                _ => Ok(()),
            },
        )
        .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
        let rewatch = back.elapsed();

        let t_cli = Instant::now();
        let addr = format!("{}:{HTTP_PORT}", ip("b3"));
        cli_ok(&topo, &c, &["task", "add", "web", &addr]);
        let t_put = Instant::now();
        let want: BTreeSet<String> = [ip("b1"), ip("b2"), ip("b3")].into_iter().collect();
        let seen =
            wait_for(
                Duration::from_secs(10),
                "the new task in status",
                || match backend_addrs(&topo.try_status()?, "web") {
                    Some(b) if b == want => Ok(Instant::now()),
                    other => Err(format!("web has {other:?}")),
                },
            )
            .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
        let apply = seen - t_put;
        eprintln!(
            "watch re-established {rewatch:?} after etcd returned; task add applied {apply:?} \
             after the CLI returned ({:?} after it started)",
            seen - t_cli
        );
        assert!(
            apply <= Duration::from_millis(1100),
            "task add after the outage took {apply:?} (> 1 s + polling) to reach status{}",
            topo.ctx()
        );
        thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
    });
    let (ok, failed) = std::mem::take(&mut *tally.lock().unwrap());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the etcd outage; first: {:?}{}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)],
        topo.ctx()
    );
    assert!(ok >= 300, "only {ok} requests made in ~32 s");
    let burst = topo.http_burst(vip, 150, REQ_TIMEOUT);
    topo.assert_spread("after the outage", &burst, &topo.backend_names(), 0.15);
}

/// e. A 3-member cluster loses its leader in the middle of 800 writes:
/// the daemon (given all endpoints) ends up exactly at etcd's state.
#[test]
fn cluster_leader_loss_misses_no_update() {
    require_root();
    let topo = Topology::new("ee", TopoOpts { backends: 3 });
    let mut cluster = EtcdCluster::start_in(&topo.lb_ns, "ee", 3);
    let c = cluster.client();
    put_churn_services(&c);
    let mut d = start_etcd_daemon(&topo, &c, &[]);
    topo.wait_ready(&mut d, &["svc0", "svc1", "svc2"], READY);

    let churn = Churn::start(&c, churn_ops(800, 0x636c_7573), Duration::from_secs(20));
    churn
        .wait_done(400, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}{}", cluster.logs(20)));
    let leader = cluster.leader();
    cluster.kill_member(leader);
    let killed_at = churn.done.load(Ordering::Relaxed);
    eprintln!("leader (member {leader}) killed after {killed_at} of 800 writes");
    churn
        .join()
        .unwrap_or_else(|e| panic!("churn: {e}{}", cluster.logs(20)));
    let survivors = EtcdClient {
        endpoints: (0..3)
            .filter(|&i| i != leader)
            .map(|i| cluster.members[i].url())
            .collect(),
        ..c.clone()
    };
    let want = from_etcd(&survivors);
    let took = wait_programmed(&topo, &want, &[], Duration::from_secs(10));
    eprintln!("status matched etcd {took:?} after churn ended");
    // The node stays registered (under a live lease) with a member gone.
    wait_for(
        Duration::from_secs(15),
        "nodes/lb in etcd",
        || match survivors
            .get_prefix(&format!("{PREFIX}/nodes/"))
            .get(&format!("{PREFIX}/nodes/lb"))
        {
            Some((_, lease)) if *lease != 0 => Ok(()),
            other => Err(format!("nodes/lb: {other:?}")),
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
    assert!(d.is_running(), "daemon died{}", topo.ctx());
}

/// f. TLS with client-cert auth: the daemon and the CLI work with the
/// right files; with a CA that did not sign the server both fail with an
/// error about the certificate, promptly.
#[test]
fn tls_client_cert_auth_and_wrong_ca() {
    require_root();
    let topo = prepared("ef");
    let etcd = EtcdServer::start_tls_in(&topo.lb_ns, "ef");
    let good = etcd.client();
    let pki = etcd.pki.clone().expect("tls server has a pki");
    assert!(good
        .meshlb_flags()
        .iter()
        .any(|f| f.starts_with("https://")));

    // The CLI with a wrong CA: non-zero exit, one line about the certificate.
    let wrong = good.with_tls(Some(ClientTls {
        ca: pki.other_ca.clone(),
        cert: Some(pki.client_cert.clone()),
        key: Some(pki.client_key.clone()),
    }));
    let t = Instant::now();
    let out = cli(&wrong, &["service", "ls"]);
    let took = t.elapsed();
    assert!(
        out.status.is_some() && !out.success(),
        "service ls with a wrong CA must fail: {}",
        out.describe()
    );
    assert!(took < Duration::from_secs(15), "wrong-CA CLI took {took:?}");
    assert!(
        out.stderr_lines().iter().any(|l| mentions_cert(l)),
        "wrong-CA error does not mention the certificate/CA: {}",
        out.describe()
    );
    // Without a client certificate the server refuses us.
    let no_cert = good.with_tls(Some(ClientTls {
        ca: pki.ca.clone(),
        cert: None,
        key: None,
    }));
    let out = cli(&no_cert, &["service", "ls"]);
    assert!(
        out.status.is_some() && !out.success(),
        "service ls without a client certificate must fail: {}",
        out.describe()
    );

    // The right files: daemon and CLI work end to end.
    let mut d = start_etcd_daemon(&topo, &good, &[]);
    topo.wait_ready(&mut d, &[], READY);
    cli_ok(
        &topo,
        &good,
        &[
            "service",
            "create",
            "web",
            "--publish",
            "tcp:8080:8000",
            "--vip",
            WEB_VIP_IP,
        ],
    );
    for b in &topo.backends {
        cli_ok(
            &topo,
            &good,
            &["task", "add", "web", &format!("{}:{HTTP_PORT}", b.v4)],
        );
    }
    let all: Vec<String> = topo.backends.iter().map(|b| b.v4.to_string()).collect();
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    wait_backend_addrs(&topo, "web", &refs, Duration::from_secs(5));
    let burst = topo.http_burst(sa(WEB_VIP), 150, REQ_TIMEOUT);
    topo.assert_spread(
        "over TLS-registered tasks",
        &burst,
        &topo.backend_names(),
        0.15,
    );
    d.stop(Duration::from_secs(10));

    // The daemon with a wrong CA: exits non-zero or keeps retrying, but
    // either way says within 15 s that the certificate is the problem.
    let mut bad = start_etcd_daemon(&topo, &wrong, &[]);
    let t = Instant::now();
    let verdict = wait_for(
        Duration::from_secs(15),
        "a certificate error from meshlb run",
        || {
            let log = bad.log_text();
            let line = log.lines().find(|l| mentions_cert(l)).map(str::to_string);
            match (bad.exit_status(), line) {
                (Some(st), Some(l)) if !st.success() => Ok(format!("exited {st}: {l}")),
                (Some(st), _) => Err(format!("exited {st} without a certificate error line")),
                (None, Some(l)) => Ok(format!("still running, logged: {l}")),
                (None, None) => Err("no certificate error logged yet".into()),
            }
        },
    );
    let verdict = verdict.unwrap_or_else(|e| panic!("{e}\n{}", bad.log_text()));
    eprintln!("wrong-CA daemon after {:?}: {verdict}", t.elapsed());
    bad.stop(Duration::from_secs(10));
}

/// g. Malformed records are each skipped with exactly one log line naming
/// the key and a `meshlb_config_errors_total` increment; a good service and
/// task written in the same batch are applied and serve.
#[test]
fn malformed_records_are_skipped_once_each() {
    require_root();
    let topo = prepared("eg");
    let etcd = EtcdServer::start_in(&topo.lb_ns, "eg");
    let c = etcd.client();
    // A gateway of the node, and listeners on every address (as sshd).
    let gateway = topo.client_as_gateway("10.250.0.0/16");
    let _listeners = [SSHD_PORT, SSHD_PORT + 1].map(|p| topo.listen_in_lb(p));
    let mut d = start_etcd_daemon(&topo, &c, &[]);
    topo.wait_ready(&mut d, &[], READY);
    let before = metric_sum(&daemon_metrics(&topo), "meshlb_config_errors_total");

    let b1 = topo.backend("b1").v4.to_string();
    let b2 = topo.backend("b2").v4.to_string();
    let long_name = "n".repeat(61);
    let publish = |port: u32| json!([{"proto": "tcp", "port": port, "target": 8000}]);
    // A task that would be valid but for its size (1 MiB of padding).
    let mut huge = task_json(&b2, HTTP_PORT, 100, "running");
    huge.push_str(&" ".repeat(1 << 20));
    let huge_file = topo.write_file("huge.json", &huge);
    let bad: Vec<(String, String)> = vec![
        (svc_key("badjson"), r#"{"name": "badjson", "vip": "#.to_string()),
        (
            task_key("good", "badaddr"),
            json!({"addr": "10.201.1.300", "port": 8000}).to_string(),
        ),
        (
            svc_key("zeroport"),
            json!({"name": "zeroport", "vip": "10.96.0.41", "publish": publish(0)}).to_string(),
        ),
        (
            task_key("good", "hugeport"),
            json!({"addr": b2, "port": 70000}).to_string(),
        ),
        (
            svc_key("badsched"),
            json!({"name": "badsched", "vip": "10.96.0.42", "publish": publish(82), "scheduler": "fastest"})
                .to_string(),
        ),
        (
            svc_key(&long_name),
            json!({"name": long_name, "vip": "10.96.0.43", "publish": publish(83)}).to_string(),
        ),
        // The address policy (SPEC "Node setup without surprises").
        (
            svc_key("loopvip"),
            json!({"name": "loopvip", "vip": "127.0.0.9", "publish": publish(84)}).to_string(),
        ),
        (
            task_key("good", "metadata"),
            json!({"addr": "169.254.169.254", "port": 80}).to_string(),
        ),
        // This node's own checks: its address, its gateway, a port a
        // process here listens on.
        (
            svc_key("nodevip"),
            json!({"name": "nodevip", "vip": LB_V4.to_string(), "publish": publish(85)})
                .to_string(),
        ),
        (
            svc_key("gwvip"),
            json!({"name": "gwvip", "vip": gateway, "publish": publish(86)}).to_string(),
        ),
        (
            svc_key("sshlike"),
            json!({"name": "sshlike", "vip": "10.96.0.44", "publish": publish(SSHD_PORT.into())})
                .to_string(),
        ),
    ];

    for (k, v) in &bad {
        c.put(k, v);
    }
    c.put_file(&task_key("good", "huge"), &huge_file);
    put_good(&c, "10.96.0.30", &b1);

    // The control of the listener check: the service says the port may
    // be taken.
    c.put(
        &svc_key("allowed"),
        &json!({"name": "allowed", "vip": "10.96.0.45", "publish": publish((SSHD_PORT + 1).into()), "allow_port_conflict": true})
            .to_string(),
    );
    c.put(
        &task_key("allowed", "ok"),
        &task_json(&b1, HTTP_PORT, 100, "running"),
    );

    wait_backend_addrs(&topo, "good", &[&b1], Duration::from_secs(5));
    wait_backend_addrs(&topo, "allowed", &[&b1], Duration::from_secs(5));
    let burst = topo.http_burst(sa("10.96.0.30:8080"), 50, REQ_TIMEOUT);
    topo.assert_spread(
        "good service beside bad records",
        &burst,
        &["b1".to_string()],
        1.0,
    );
    // A later change must not re-report the bad keys.
    c.put(
        &task_key("good", "ok2"),
        &task_json(&b2, HTTP_PORT, 100, "running"),
    );
    wait_backend_addrs(&topo, "good", &[&b1, &b2], Duration::from_secs(5));
    thread::sleep(Duration::from_secs(1));

    // Only the good service is programmed: none of the invalid ones, and
    // nothing etcd does not define (no --config).
    let st = topo.status();
    let names: Vec<&str> = st["services"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        names,
        ["allowed", "good"],
        "services programmed beside the bad records: {st}{}",
        topo.ctx()
    );
    let log = d.log_text();
    let mut keys: Vec<String> = bad.iter().map(|(k, _)| k.clone()).collect();
    keys.push(task_key("good", "huge"));
    let problems = once_each(&log, &keys);
    let metrics = daemon_metrics(&topo);
    let errors = metric_sum(&metrics, "meshlb_config_errors_total") - before;
    let samples: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("meshlb_config_errors_total"))
        .collect();
    assert!(
        problems.is_empty() && errors >= keys.len() as f64,
        "malformed records: {}\nmeshlb_config_errors_total rose by {errors} (want >= {}): {samples:?}{}",
        problems.join("\n"),
        keys.len(),
        topo.ctx()
    );
    eprintln!("config error samples: {samples:?}");
    assert!(d.is_running(), "daemon died{}", topo.ctx());
}

#[test]
fn username_and_password_auth() {
    require_root();
    let srv = EtcdServer::start("eau");
    let c = srv.client();
    let as_root = |args: &[&str]| {
        let mut a = vec!["--user=root:s3cret"];
        a.extend_from_slice(args);
        c.etcdctl(&a)
    };
    c.etcdctl_ok(&["user", "add", "root:s3cret", "--interactive=false"]);
    let _ = c.etcdctl(&["user", "grant-role", "root", "root"]);
    c.etcdctl_ok(&["auth", "enable"]);
    let good = srv.dir.join("password");
    let bad = srv.dir.join("wrong-password");
    std::fs::write(&good, "s3cret\n").unwrap();
    std::fs::write(&bad, "nope\n").unwrap();
    let good_s = good.display().to_string();
    let bad_s = bad.display().to_string();

    // This server speaks plain http: the password would cross the network
    // in clear, which meshlb refuses unless told otherwise.
    let refused = cli(
        &c,
        &[
            "service",
            "create",
            "web",
            "--publish",
            "80:8000",
            "--etcd-user",
            "root",
            "--etcd-password-file",
            &good_s,
        ],
    );
    assert!(
        refused.code() == Some(2)
            && refused.stderr_lines().len() == 1
            && refused.stderr.contains("--etcd-insecure"),
        "credentials over http:// without --etcd-insecure must be a one-line usage error: {}",
        refused.describe()
    );
    let created = cli(
        &c,
        &[
            "service",
            "create",
            "web",
            "--publish",
            "80:8000",
            "--etcd-user",
            "root",
            "--etcd-password-file",
            &good_s,
            "--etcd-insecure",
        ],
    );
    assert!(
        created.success(),
        "with the password: {}",
        created.describe()
    );
    let stored = as_root(&["get", &svc_key("web")]);
    assert!(
        stored.success() && stored.stdout.contains("\"web\""),
        "service not stored: {}",
        stored.describe()
    );

    for (what, extra) in [
        ("no credentials", vec![]),
        (
            "a wrong password",
            vec![
                "--etcd-user",
                "root",
                "--etcd-password-file",
                bad_s.as_str(),
                "--etcd-insecure",
            ],
        ),
    ] {
        let mut args = vec!["service", "ls"];
        args.extend(extra);
        let out = cli(&c, &args);
        assert_eq!(
            out.code(),
            Some(1),
            "{what} must be refused: {}",
            out.describe()
        );
        assert_eq!(
            out.stderr_lines().len(),
            1,
            "{what}: one error line: {}",
            out.describe()
        );
    }
}

/// More records than one list page (4,096 records; and than a single
/// 4 MiB gRPC message would hold at scale): the first list pages through
/// them at one revision.
#[test]
fn first_list_pages_through_many_records() {
    let topo = Topology::new("epg", TopoOpts { backends: 1 });
    let etcd = EtcdServer::start_in(&topo.lb_ns, "epg");
    let c = etcd.client();
    // 500 × (1 + 8) = 4,500 records: two pages.
    const SERVICES: u16 = 500;
    const TASKS: u16 = 8;
    c.with_client(|rt, client| {
        for s in 0..SERVICES {
            let name = format!("pg{s}");
            let vip = format!("10.97.{}.{}", s / 250, s % 250 + 1);
            rt.block_on(client.put(svc_key(&name), service_json(&name, &vip, 20_000 + s), None))
                .expect("put service");
            for t in 0..TASKS {
                let addr = format!("10.202.{}.{}", s % 250, t + 1);
                rt.block_on(client.put(
                    task_key(&name, &format!("t{t}")),
                    task_json(&addr, 8000, 100, "running"),
                    None,
                ))
                .expect("put task");
            }
        }
    });
    let want = from_etcd(&c);
    assert_eq!(want.len(), SERVICES as usize);
    let mut daemon = start_etcd_daemon(&topo, &c, &[]);
    let names: Vec<String> = (0..SERVICES).map(|s| format!("pg{s}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    topo.wait_ready(&mut daemon, &refs, READY);
    wait_programmed(&topo, &want, &[], Duration::from_secs(10));
}

/// The node's record carries the address other nodes reach it at: the
/// primary address of the default-route interface, not the numerically
/// lowest address of the node (here the client side's 10.200.0.1); or
/// `--advertise-addr` when given.
#[test]
fn node_record_address_is_the_default_route_interfaces_or_the_advertised() {
    require_root();
    let topo = prepared("en");
    let etcd = EtcdServer::start_in(&topo.lb_ns, "en");
    let c = etcd.client();
    let b2 = topo.backend("b2");
    must(&[
        "ip",
        "-n",
        &topo.lb_ns,
        "route",
        "add",
        "default",
        "via",
        &b2.v4.to_string(),
    ]);
    let recorded = |want: String| {
        wait_for(Duration::from_secs(15), "nodes/lb addr", || {
            let nodes = c.get_prefix(&format!("{PREFIX}/nodes/"));
            let (v, _) = nodes
                .get(&format!("{PREFIX}/nodes/lb"))
                .ok_or_else(|| format!("no nodes/lb: {nodes:?}"))?;
            let rec: Value = serde_json::from_str(v).map_err(|e| format!("{e}: {v}"))?;
            if rec["addr"] == want.as_str() {
                Ok(())
            } else {
                Err(format!("nodes/lb is {rec}, want addr {want}"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
    };
    let mut d = start_etcd_daemon(&topo, &c, &[]);
    recorded(b2.lb_v4.to_string());
    d.stop(Duration::from_secs(10));

    let adv = topo.backend("b3").lb_v4.to_string();
    let _d = start_etcd_daemon(&topo, &c, &["--advertise-addr", &adv]);
    recorded(adv);
}

/// Large values under the prefix (etcd takes up to 1.5 MiB each) do not
/// stop the list or the watch: seven 1.4 MiB values among 2,000 normal
/// records (more than one gRPC message holds in one list page), then
/// three more while the daemon watches. Each is skipped with one line
/// naming its key; the services beside them are programmed and changes
/// keep coming.
#[test]
fn large_values_do_not_stop_list_or_watch() {
    require_root();
    let topo = prepared("el");
    let etcd = EtcdServer::start_in(&topo.lb_ns, "el");
    let c = etcd.client();
    let b1 = topo.backend("b1").v4.to_string();
    let b2 = topo.backend("b2").v4.to_string();
    // 2,000 normal records: tasks of a service nobody defines (kept,
    // ignored), put in one client session.
    c.with_client(|rt, client| {
        rt.block_on(async {
            for i in 0..2000u32 {
                let v = task_json(
                    &format!("10.202.{}.{}", i / 250, i % 250 + 1),
                    8000,
                    100,
                    "running",
                );
                client
                    .put(task_key("bulk", &format!("t{i:04}")), v, None)
                    .await
                    .unwrap_or_else(|e| panic!("put: {e}"));
            }
        });
    });
    let big = topo.write_file("big.json", &"x".repeat(1400 * 1024));
    // Among the bulk tasks by key order, so they share list pages.
    let bigs: Vec<String> = (0..7)
        .map(|i| task_key("bulk", &format!("t{:04}x", 100 + i * 10)))
        .collect();
    for k in &bigs {
        c.put_file(k, &big);
    }
    put_good(&c, "10.96.0.31", &b1);

    let mut d = start_etcd_daemon(&topo, &c, &[]);
    topo.wait_ready(&mut d, &["good"], READY);
    wait_backend_addrs(&topo, "good", &[&b1], Duration::from_secs(10));

    // While watching: three more, then a normal change.
    let more: Vec<String> = (0..3).map(|i| task_key("bulk", &format!("w{i}"))).collect();
    for k in &more {
        c.put_file(k, &big);
    }
    c.put(
        &task_key("good", "ok2"),
        &task_json(&b2, HTTP_PORT, 100, "running"),
    );
    wait_backend_addrs(&topo, "good", &[&b1, &b2], Duration::from_secs(10));
    let burst = topo.http_burst(sa(&format!("10.96.0.31:{WEB_PORT}")), 40, REQ_TIMEOUT);
    topo.assert_spread(
        "good beside large values",
        &burst,
        &["b1".to_string(), "b2".to_string()],
        0.1,
    );
    let log = d.log_text();
    let keys: Vec<String> = bigs.iter().chain(&more).cloned().collect();
    let problems = once_each(&log, &keys);
    assert!(problems.is_empty(), "{}{}", problems.join("\n"), topo.ctx());
    assert!(
        log.contains("etcd: listed 1 services, 2001 tasks"),
        "the list is not 1 service and 2,001 tasks{}",
        topo.ctx()
    );
    assert!(d.is_running(), "daemon died{}", topo.ctx());
}

// ---------------------------------------------------------------------------
// A TCP proxy between the daemon and etcd, which the test controls

/// What [`EtcdProxy`] does with the connections it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProxyMode {
    /// Forward both ways.
    Pass,
    /// Close every connection at once: etcd is unreachable for the daemon.
    Refuse,
    /// Forward until some connection brings a watch-created response:
    /// forward that response, hold back what follows it, cut that
    /// connection, and pass again.
    CutAfterCreated,
}

/// How long the proxy holds a connection after forwarding the created
/// response and before cutting it: time for the daemon to read the
/// response while the connection still looks healthy.
const CREATED_HOLD: Duration = Duration::from_millis(200);

struct ProxyState {
    mode: ProxyMode,
    /// Both sockets of every open connection, by id (clones, to cut them).
    conns: BTreeMap<u64, [TcpStream; 2]>,
    /// The header revision of every created response the proxy cut after.
    cuts: Vec<i64>,
}

struct ProxyShared {
    state: Mutex<ProxyState>,
    stop: AtomicBool,
    /// The connection threads, joined when the proxy is dropped.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl ProxyShared {
    fn state(&self) -> std::sync::MutexGuard<'_, ProxyState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Shuts connection `id` down both ways (ends both of its threads).
    fn cut(&self, id: u64) {
        if let Some(socks) = self.state().conns.remove(&id) {
            for s in &socks {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// A plain-TCP proxy on 127.0.0.1 of a namespace, in front of an etcd
/// listening on 127.0.0.1 of that namespace. It reads the server's side as
/// HTTP/2 frames so that it can cut a connection right after one given
/// gRPC message (see [`watch_created`]). Dropping it cuts every
/// connection and joins every thread.
struct EtcdProxy {
    port: u16,
    shared: Arc<ProxyShared>,
    accept: Option<JoinHandle<()>>,
}

impl EtcdProxy {
    fn start(ns: &str, upstream_port: u16) -> EtcdProxy {
        let listener = in_netns(ns, || TcpListener::bind("127.0.0.1:0"))
            .unwrap_or_else(|e| panic!("proxy: bind 127.0.0.1:0 in {ns}: {e}"));
        let port = listener.local_addr().expect("proxy local_addr").port();
        listener
            .set_nonblocking(true)
            .expect("proxy: non-blocking listener");
        let shared = Arc::new(ProxyShared {
            state: Mutex::new(ProxyState {
                mode: ProxyMode::Pass,
                conns: BTreeMap::new(),
                cuts: Vec::new(),
            }),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        });
        let (sh, ns) = (shared.clone(), ns.to_string());
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream_port));
        let accept = thread::spawn(move || {
            // Upstream sockets are made here, so they must be in `ns`;
            // the connection threads inherit it.
            enter_netns(&ns);
            proxy_accept_loop(&listener, upstream, &sh);
        });
        EtcdProxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cuts every connection and refuses new ones.
    fn refuse(&self) {
        let mut st = self.shared.state();
        st.mode = ProxyMode::Refuse;
        for socks in std::mem::take(&mut st.conns).values() {
            for s in socks {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    fn cut_after_created(&self) {
        self.shared.state().mode = ProxyMode::CutAfterCreated;
    }

    /// The header revision of the `n`-th (from 1) created response cut after.
    fn nth_cut(&self, n: usize) -> Option<i64> {
        self.shared.state().cuts.get(n - 1).copied()
    }
}

impl Drop for EtcdProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        // No new connection now: cut the open ones and wait for their threads.
        self.refuse();
        let threads = std::mem::take(
            &mut *self
                .shared
                .threads
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for h in threads {
            let _ = h.join();
        }
    }
}

fn proxy_accept_loop(listener: &TcpListener, upstream: SocketAddr, sh: &Arc<ProxyShared>) {
    let mut next_id = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        let Ok((client, _)) = listener.accept() else {
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        if sh.state().mode == ProxyMode::Refuse {
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) else {
            continue;
        };
        let Ok(ends) = pump_ends(&client, &server) else {
            continue;
        };
        let id = next_id;
        next_id += 1;
        {
            // Registered under the same lock `refuse` takes, so no
            // connection slips past a cut.
            let mut st = sh.state();
            if st.mode == ProxyMode::Refuse {
                continue;
            }
            st.conns.insert(id, [client, server]);
        }
        let [client_r, server_r, client_w, server_w] = ends;
        let (a, b) = (sh.clone(), sh.clone());
        let up = thread::spawn(move || {
            copy_until_closed(client_r, server_w);
            a.cut(id);
        });
        let down = thread::spawn(move || {
            forward_frames(server_r, client_w, &b);
            b.cut(id);
        });
        sh.threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend([up, down]);
    }
}

/// Blocking, no-delay sockets, and one clone of each per pump direction:
/// reading client, reading server, writing client, writing server.
fn pump_ends(client: &TcpStream, server: &TcpStream) -> std::io::Result<[TcpStream; 4]> {
    for s in [client, server] {
        s.set_nonblocking(false)?;
        s.set_nodelay(true)?;
    }
    Ok([
        client.try_clone()?,
        server.try_clone()?,
        client.try_clone()?,
        server.try_clone()?,
    ])
}

fn copy_until_closed(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Forwards etcd's side of an HTTP/2 connection frame by frame (a partial
/// frame waits for the rest). In `CutAfterCreated`, the first watch-created
/// response is forwarded alone, then nothing more: the connection is held
/// for `CREATED_HOLD` and cut (by the caller, on return).
fn forward_frames(mut from: TcpStream, mut to: TcpStream, sh: &ProxyShared) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while buf.len() - at >= 9 {
            let len = 9
                + (usize::from(buf[at]) << 16
                    | usize::from(buf[at + 1]) << 8
                    | usize::from(buf[at + 2]));
            if buf.len() - at < len {
                break;
            }
            let frame = &buf[at..at + len];
            if to.write_all(frame).is_err() {
                return;
            }
            at += len;
            if let Some(rev) = watch_created(frame) {
                let mut st = sh.state();
                if st.mode == ProxyMode::CutAfterCreated {
                    st.mode = ProxyMode::Pass;
                    drop(st);
                    thread::sleep(CREATED_HOLD);
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                    sh.state().cuts.push(rev);
                    return;
                }
            }
        }
        buf.drain(..at);
    }
}

/// The header revision of `frame` when it is an HTTP/2 DATA frame holding
/// one whole gRPC message that is a watch-created response
/// (`WatchResponse{header: 1, created: 3 = true}`). The other responses
/// on these connections never set field 3 to 1: a count-only range has
/// `more` false, a lease grant or keep-alive carries its TTL of 10.
fn watch_created(frame: &[u8]) -> Option<i64> {
    const DATA: u8 = 0;
    const PADDED: u8 = 0x8;
    if frame.get(3) != Some(&DATA) {
        return None;
    }
    let mut data = &frame[9..];
    if frame[4] & PADDED != 0 {
        let pad = usize::from(*data.first()?);
        data = data.get(1..data.len().checked_sub(pad)?)?;
    }
    // gRPC: uncompressed flag, 4-byte length, the message.
    let (&compressed, rest) = data.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    if compressed != 0 || rest.len() != 4 + len {
        return None;
    }
    let fields = proto_fields(&rest[4..])?;
    if !fields.contains(&(3, ProtoField::Varint(1))) {
        return None;
    }
    let header = fields.iter().find_map(|f| match f {
        (1, ProtoField::Bytes(b)) => Some(*b),
        _ => None,
    })?;
    proto_fields(header)?.iter().find_map(|f| match f {
        (3, ProtoField::Varint(rev)) => i64::try_from(*rev).ok(),
        _ => None,
    })
}

#[derive(Debug, PartialEq, Eq)]
enum ProtoField<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The top-level fields of a protobuf message, `None` when malformed.
fn proto_fields(msg: &[u8]) -> Option<Vec<(u64, ProtoField<'_>)>> {
    fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*i)?;
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut fields = Vec::new();
    let mut i = 0;
    while i < msg.len() {
        let key = varint(msg, &mut i)?;
        let field = match key & 7 {
            0 => ProtoField::Varint(varint(msg, &mut i)?),
            1 | 5 => {
                i += if key & 7 == 1 { 8 } else { 4 };
                ProtoField::Fixed
            }
            2 => {
                let n = usize::try_from(varint(msg, &mut i)?).ok()?;
                let b = msg.get(i..i.checked_add(n)?)?;
                i += n;
                ProtoField::Bytes(b)
            }
            _ => return None,
        };
        fields.push((key >> 3, field));
    }
    (i == msg.len()).then_some(fields)
}

/// Issue 18: a watch stream broken after its created response but before
/// its backlog loses no event. The created response's header is the
/// store's revision, and the backlog from the start revision follows it
/// (etcd sends an unsynced watcher's backlog from a loop that runs every
/// 100 ms): resuming from that header would skip the backlog.
///
/// How the window is hit, deterministically: the daemon reaches etcd only
/// through a proxy. Each round the proxy cuts the daemon off and refuses
/// it while the test writes a few changes directly to etcd; so when the
/// daemon is let back, its new watch starts behind the store and has a
/// backlog. The proxy then forwards etcd's bytes frame by frame up to and
/// including the watch-created response, holds everything after it, and
/// cuts the connection. The daemon must resume from its own last revision
/// and so receive the backlog on the next connection.
#[test]
fn watch_broken_between_creation_and_backlog_loses_no_event() {
    require_root();
    let topo = prepared("ew");
    let etcd = EtcdServer::start_in(&topo.lb_ns, "ew");
    let c = etcd.client();
    let proxy = EtcdProxy::start(&topo.lb_ns, etcd.client_port);
    let via_proxy = EtcdClient {
        endpoints: vec![proxy.url()],
        ..c.clone()
    };
    let ip = |n: &str| topo.backend(n).v4.to_string();
    put_good(&c, "10.96.0.32", &ip("b1"));
    let mut d = start_etcd_daemon(&topo, &via_proxy, &[]);
    topo.wait_ready(&mut d, &["good"], READY);
    wait_backend_addrs(&topo, "good", &[&ip("b1")], Duration::from_secs(10));

    for round in 1..=3u16 {
        proxy.refuse();
        let before = c.revision();
        // The backlog: a changed weight, a new task, a deleted one.
        c.put(
            &task_key("good", "ok"),
            &task_json(&ip("b1"), HTTP_PORT, 10 * u32::from(round), "running"),
        );
        let b = if round % 2 == 1 { "b2" } else { "b3" };
        c.put(
            &task_key("good", &format!("r{round}")),
            &task_json(&ip(b), HTTP_PORT + round, 100, "running"),
        );
        if round > 1 {
            c.del(&task_key("good", &format!("r{}", round - 1)));
        }
        let after = c.revision();
        proxy.cut_after_created();
        let created = wait_for(
            Duration::from_secs(10),
            &format!("round {round}: the daemon's watch-created response through the proxy"),
            || proxy.nth_cut(round.into()).ok_or_else(|| "none yet".into()),
        )
        .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
        // Otherwise the round would not test the window.
        assert!(
            created >= after,
            "round {round}: the watch was created at revision {created}, before the \
             backlog {}..={after} was written{}",
            before + 1,
            topo.ctx()
        );
        let want = from_etcd(&c);
        let mut got = Programmed::new();
        let r = wait_for(Duration::from_secs(5), "status to match etcd", || {
            got = from_status(&topo.try_status()?, &[]);
            if got == want {
                Ok(())
            } else {
                Err(diff(&want, &got))
            }
        });
        if let Err(e) = r {
            panic!(
                "round {round}: the backlog (revisions {}..={after}) of a watch cut right \
                 after its created response (header revision {created}) was lost: {e}\n\
                 want {want:?}\ngot  {got:?}{}",
                before + 1,
                topo.ctx()
            );
        }
        eprintln!(
            "round {round}: cut after the created response at revision {created}; \
             backlog {}..={after} applied",
            before + 1
        );
    }
    assert!(d.is_running(), "daemon died{}", topo.ctx());
}
