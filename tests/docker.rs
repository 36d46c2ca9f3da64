//! Docker auto-registration end to end: `meshlb run --etcd ... --docker=SOCK`
//! in a topology's LB namespace, next to a real dockerd and a real etcd
//! started inside that namespace (see `common::docker`, `common::etcd`).
//! XDP runs on the client-facing veth (generic mode) and, docker0 being a
//! bridge and hence a task interface, the TC program on docker0; the
//! client reaches the containers through a service VIP defined in etcd.
//!
//! Covered: 3 labelled containers and 1 unlabelled → exactly 3 tasks within
//! 2 s, all 3 answering through the VIP; `docker stop` → draining (its
//! established connections still answered, no new ones) then gone;
//! `docker kill` → gone within 2 s; registrator-style env registered the
//! same way and `SERVICE_IGNORE` honoured; bad labels → one log line naming
//! container and label, the others unaffected; a HEALTHCHECK container
//! registered only while healthy; a published port registered as node
//! address + host port; dockerd restarted → resynced with no duplicates and
//! no stale entries; `meshlb run` SIGKILLed → its tasks vanish when the
//! lease expires, not before; `--docker` without etcd → usage error.
//!
//! Then containers at the kernel's default offloads (partial checksums)
//! behind a router that checksums in software (the routed world below):
//! a remote client's requests on the VIP and node port paths (TCP and
//! UDP, v4 and v6) all answered with no checksum error anywhere, and a
//! container's calls to its own services (hairpin to itself and to its
//! neighbour) all answered.
//! Needs root; never skips.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use common::docker::*;
use common::etcd::*;
use common::router::*;
use common::*;
use serde_json::{json, Value};

const PREFIX: &str = "/mlbt/v1";
const READY: Duration = Duration::from_secs(60);
const REQ_TIMEOUT: Duration = Duration::from_secs(3);
/// How fast a registration change must reach etcd.
const FAST: Duration = Duration::from_secs(2);

/// A test's world: topology (client + LB namespaces), dockerd and etcd in
/// the LB namespace. Fields drop in order: dockerd, etcd, then the
/// namespaces.
struct World {
    docker: Dockerd,
    etcd: EtcdServer,
    c: EtcdClient,
    topo: Topology,
}

impl World {
    fn new(tag: &str) -> World {
        require_root();
        require_docker();
        let topo = Topology::new(tag, TopoOpts { backends: 0 });
        let docker = Dockerd::start_in(&topo.lb_ns, &topo.dir.join("docker"));
        let etcd = EtcdServer::start_in(&topo.lb_ns, tag);
        let c = etcd.client();
        World {
            docker,
            etcd,
            c,
            topo,
        }
    }

    /// `services/<name>` with a VIP, publishing `port` → 8000.
    fn service(&self, name: &str, vip: &str, port: u16) {
        let v =
            json!({"vip": vip, "publish": [{"proto": "tcp", "port": port, "target": WEB_PORT}]});
        self.c
            .put(&format!("{PREFIX}/services/{name}"), &v.to_string());
    }

    /// Only the uplink is named, as in the README: docker0 (and the
    /// bridges of containers' networks) the daemon attaches itself.
    fn ifaces(&self) -> Vec<String> {
        vec![self.topo.lb_client_iface.clone()]
    }

    /// `meshlb run --node lb --etcd ... --docker=SOCK --iface <client
    /// veth>` (XDP there), ready, with docker0 attached automatically (a
    /// Docker bridge: a task interface, TC) and listed so by `status`.
    fn daemon(&self) -> Proc {
        self.daemon_with(&[])
    }

    /// [`World::daemon`] with `extra` flags.
    fn daemon_with(&self, extra: &[&str]) -> Proc {
        let mut args: Vec<String> = ["--node", "lb", "--xdp-mode", "generic", "--prefix", PREFIX]
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
        args.extend(extra.iter().map(std::string::ToString::to_string));
        args.extend(self.c.meshlb_flags());
        args.push(format!("--docker={}", self.docker.socket.display()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let ifaces = self.ifaces();
        let irefs: Vec<&str> = ifaces.iter().map(String::as_str).collect();
        let mut d = self.topo.start_daemon_args(&refs, &irefs);
        // XDP on the uplink only; docker0 gets the TC program.
        let uplink = [self.topo.lb_client_iface.as_str()];
        self.topo.wait_ready_on(&mut d, &[], READY, &uplink);
        wait_tc_attached(&mut d, "docker0", READY).unwrap_or_else(|e| panic!("{e}{}", self.ctx()));
        let st = self.topo.status();
        let docker0 = st["interfaces"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == "docker0"))
            .unwrap_or_else(|| panic!("status does not list docker0: {st}{}", self.ctx()));
        assert_eq!(
            (&docker0["role"], &docker0["mode"]),
            (&json!("task"), &json!("tc")),
            "docker0 in status: {docker0}"
        );
        assert_eq!(
            self.topo.xdp_mode(&self.topo.lb_ns, "docker0"),
            None,
            "XDP attached to docker0, a task bridge (TC's){}",
            self.ctx()
        );
        d
    }

    /// Failure context: daemon logs, dockerd and etcd log tails.
    fn ctx(&self) -> String {
        format!(
            "{}{}{}",
            self.topo.ctx(),
            self.docker.log_tail(20),
            self.etcd.log_tail(10)
        )
    }

    /// `tasks/<service>/*` in etcd: id → (record, lease).
    fn tasks(&self, service: &str) -> BTreeMap<String, (Value, i64)> {
        let p = format!("{PREFIX}/tasks/{service}/");
        self.c
            .get_prefix(&p)
            .into_iter()
            .map(|(k, (v, lease))| {
                let rec: Value =
                    serde_json::from_str(&v).unwrap_or_else(|e| panic!("{k}: not JSON ({e}): {v}"));
                (k[p.len()..].to_string(), (rec, lease))
            })
            .collect()
    }

    /// Waits until the task ids of `service` are exactly `ids`; returns
    /// the tasks and how long it took.
    fn wait_task_ids(
        &self,
        service: &str,
        ids: &BTreeSet<String>,
        timeout: Duration,
    ) -> (BTreeMap<String, (Value, i64)>, Duration) {
        let t0 = Instant::now();
        let tasks = wait_for(timeout, &format!("tasks of {service} = {ids:?}"), || {
            let t = self.tasks(service);
            let got: BTreeSet<String> = t.keys().cloned().collect();
            if &got == ids {
                Ok(t)
            } else {
                Err(format!("have {got:?}"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}{}", self.ctx()));
        (tasks, t0.elapsed())
    }

    /// The lease `nodes/lb` is held under (waiting for the record: the
    /// daemon may answer metrics before it has registered).
    fn node_lease(&self) -> i64 {
        let key = format!("{PREFIX}/nodes/lb");
        let lease = wait_for(Duration::from_secs(10), "nodes/lb in etcd", || {
            let nodes = self.c.get_prefix(&format!("{PREFIX}/nodes/"));
            match nodes.get(&key) {
                Some((_, lease)) => Ok(*lease),
                None => Err(format!("nodes: {nodes:?}")),
            }
        })
        .unwrap_or_else(|e| panic!("{e}{}", self.ctx()));
        assert_ne!(lease, 0, "nodes/lb has no lease");
        lease
    }

    /// Waits until status shows `service` with exactly these backend
    /// (addr, state) pairs.
    fn wait_backends(&self, service: &str, want: &BTreeSet<(String, String)>, timeout: Duration) {
        wait_for(timeout, &format!("{service} backends {want:?}"), || {
            let st = self.topo.try_status()?;
            let got: BTreeSet<(String, String)> = st["services"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter(|s| s["name"] == service)
                .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
                .map(|b| {
                    (
                        b["addr"].as_str().unwrap_or("?").to_string(),
                        b["state"].as_str().unwrap_or("?").to_string(),
                    )
                })
                .collect();
            if &got == want {
                Ok(())
            } else {
                Err(format!("status has {got:?}"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}{}", self.ctx()));
    }

    /// `n` GETs through the VIP from the client: every one answered, every
    /// name in `names` answering at least 10% of them, nobody else.
    fn spread(&self, what: &str, vip: SocketAddr, n: usize, names: &[&str]) {
        let names: Vec<String> = names.iter().map(std::string::ToString::to_string).collect();
        let b = self.topo.http_burst(vip, n, REQ_TIMEOUT);
        assert!(
            b.failures.is_empty(),
            "{what}: {} of {n} failed: {:?}; answers {:?}{}",
            b.failures.len(),
            &b.failures[..b.failures.len().min(3)],
            b.counts,
            self.ctx()
        );
        self.topo.assert_spread(what, &b, &names, 0.1);
    }
}

/// Waits until the daemon logs that `iface` got the TC program (a task
/// interface); fails at once when the daemon exits.
fn wait_tc_attached(d: &mut Proc, iface: &str, timeout: Duration) -> Result<(), String> {
    let line = format!("iface {iface}: task interface: TC load balancer attached");
    wait_for(timeout, &format!("the TC program on {iface}"), || {
        if let Some(st) = d.exit_status() {
            return Err(format!("daemon exited: {st}"));
        }
        if d.log_text().contains(&line) {
            Ok(())
        } else {
            Err(format!("no {line:?} in the daemon's log"))
        }
    })
}

fn ids(v: &[&String]) -> BTreeSet<String> {
    v.iter().map(|s| (*s).clone()).collect()
}

/// Checks one docker task record. A container registered by its own
/// address (no published port) is local: only this node reaches it.
fn check_record(w: &World, what: &str, rec: &Value, addr: &str, port: u64, weight: u64) {
    let key = format!("{PREFIX}/nodes/lb");
    let nodes = w.c.get_prefix(&key);
    let node: Value = serde_json::from_str(&nodes[&key].0).unwrap();
    let local = node["addr"].as_str() != Some(addr);
    assert_eq!(rec["addr"], addr, "{what}: {rec}{}", w.ctx());
    assert_eq!(
        rec["local"].as_bool().unwrap_or(false),
        local,
        "{what}: local: {rec}"
    );
    assert_eq!(rec["port"], port, "{what}: {rec}");
    assert_eq!(rec["weight"], weight, "{what}: {rec}");
    assert_eq!(rec["node"], "lb", "{what}: {rec}");
    assert_eq!(rec["source"], "docker", "{what}: {rec}");
    assert_eq!(rec["state"], "running", "{what}: {rec}");
}

#[test]
fn labelled_containers_register_drain_and_go() {
    let w = World::new("dk1");
    let vip: SocketAddr = "10.96.0.60:8080".parse().unwrap();
    w.service("web", "10.96.0.60", 8080);
    let mut d = w.daemon();
    let lease = w.node_lease();

    let label = [
        "--label",
        "meshlb.service=web",
        "--label",
        "meshlb.port=8000",
    ];
    let w1 = w.docker.run_web("w1", &label);
    let w2 = w.docker.run_web("w2", &label);
    let w3 = w.docker.run_web("w3", &label);
    let plain = w.docker.run_web("plain", &[]);
    let t_started = Instant::now();
    let (tasks, _) = w.wait_task_ids("web", &ids(&[&w1, &w2, &w3]), Duration::from_secs(10));
    let took = t_started.elapsed();
    assert!(
        took <= FAST,
        "3 labelled containers took {took:?} (> {FAST:?}) to be registered{}",
        w.ctx()
    );
    let log = d.log_text();
    for (id, name) in [(&w1, "w1"), (&w2, "w2"), (&w3, "w3")] {
        let (rec, l) = &tasks[id];
        check_record(&w, name, rec, &w.docker.ip(name), 8000, 100);
        assert_eq!(*l, lease, "{name}'s task is not under the node lease");
        // Served by this node only (docker0 is every node's 172.17/16):
        // said once per container.
        let warned = log
            .lines()
            .filter(|l| l.contains(&format!("container {name} (")))
            .filter(|l| l.contains("only reachable from this node"))
            .count();
        assert_eq!(warned, 1, "{name}: local-only warnings in the log:\n{log}");
    }
    // Exactly 3: the unlabelled container is nowhere under tasks/.
    let all = w.c.get_prefix(&format!("{PREFIX}/tasks/"));
    assert_eq!(all.len(), 3, "tasks in etcd: {all:?}");
    assert!(!all.keys().any(|k| k.contains(&plain)), "{all:?}");

    let ip = |n: &str| w.docker.ip(n);
    let up = |names: &[&str], state: &str| -> BTreeSet<(String, String)> {
        names.iter().map(|n| (ip(n), state.to_string())).collect()
    };
    w.wait_backends(
        "web",
        &up(&["w1", "w2", "w3"], "up"),
        Duration::from_secs(5),
    );
    w.spread("300 GETs over 3 containers", vip, 300, &["w1", "w2", "w3"]);

    // Established connections on w1, found with `explain`.
    let w1_ip = ip("w1");
    let mut on_w1 = Vec::new();
    for _ in 0..40 {
        let ka = w
            .topo
            .client(|| KeepAlive::open(vip, REQ_TIMEOUT))
            .unwrap_or_else(|e| panic!("{e}{}", w.ctx()));
        let e = w.topo.explain("tcp", ka.local, vip);
        if e["backend"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("{w1_ip}:"))
        {
            on_w1.push(ka);
            if on_w1.len() == 2 {
                break;
            }
        }
    }
    assert!(!on_w1.is_empty(), "no connection landed on w1{}", w.ctx());

    // docker stop: kill (SIGTERM) → draining; httpd ignores SIGTERM as PID
    // 1, so it stays draining until the 4 s timeout kills it.
    let host = w.docker.host.clone();
    let stopper = thread::spawn(move || {
        run_cmd_env(
            &["docker", "stop", "-t", "4", "w1"],
            &[("DOCKER_HOST", &host)],
            Duration::from_secs(60),
        )
    });
    let t_stop = Instant::now();
    wait_for(FAST, "w1 to be draining in etcd", || {
        match w.tasks("web").get(&w1) {
            Some((r, _)) if r["state"] == "draining" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}{}", w.ctx()));
    let mut want = up(&["w2", "w3"], "up");
    want.insert((w1_ip.clone(), "draining".into()));
    w.wait_backends("web", &want, FAST);
    assert!(
        t_stop.elapsed() < Duration::from_secs(3),
        "w1 draining seen too late to test it ({:?})",
        t_stop.elapsed()
    );
    // No new flows to w1; its established ones still answer.
    let b = w.topo.http_burst(vip, 30, REQ_TIMEOUT);
    assert!(b.failures.is_empty(), "while w1 drains: {:?}", b.failures);
    assert!(
        !b.counts.contains_key("w1"),
        "a new connection reached draining w1: {:?}{}",
        b.counts,
        w.ctx()
    );
    for ka in &mut on_w1 {
        let body = ka
            .get()
            .unwrap_or_else(|e| panic!("established flow to draining w1: {e}{}", w.ctx()));
        assert_eq!(body, "w1");
    }
    let out = stopper.join().expect("docker stop thread");
    assert!(out.success(), "{}", out.describe());
    w.wait_task_ids("web", &ids(&[&w2, &w3]), FAST);
    assert!(
        t_stop.elapsed() >= Duration::from_secs(3),
        "w1 was removed before it exited ({:?} after docker stop -t 4)",
        t_stop.elapsed()
    );

    // docker kill: gone within 2 s.
    w.docker.cli_ok(&["kill", "w2"]);
    let (_, took) = w.wait_task_ids("web", &ids(&[&w3]), Duration::from_secs(10));
    assert!(
        took <= FAST,
        "docker kill w2: removed after {took:?}{}",
        w.ctx()
    );
    w.wait_backends("web", &up(&["w3"], "up"), Duration::from_secs(5));
    w.spread("20 GETs after stop and kill", vip, 20, &["w3"]);
    assert!(d.is_running(), "daemon died{}", w.ctx());
}

/// Lines of the daemon's log that contain both `a` and `b`.
fn log_lines(d: &Proc, a: &str, b: &str) -> Vec<String> {
    d.log_text()
        .lines()
        .filter(|l| l.contains(a) && l.contains(b))
        .map(str::to_owned)
        .collect()
}

#[test]
fn registrator_env_bad_labels_health_and_published_ports() {
    let w = World::new("dk2");
    let vip: SocketAddr = "10.96.0.61:8080".parse().unwrap();
    w.service("api", "10.96.0.61", 8080);
    let bare_vip: SocketAddr = "10.96.0.62:8081".parse().unwrap();
    w.service("bare", "10.96.0.62", 8081);
    let d = w.daemon();

    let e1 = w.docker.run_web("e1", &["-e", "SERVICE_NAME=api"]);
    let e2 = w.docker.run_web("e2", &["-e", "SERVICE_8000_NAME=api"]);
    w.docker
        .run_web("e3", &["-e", "SERVICE_NAME=api", "-e", "SERVICE_IGNORE=1"]);
    // (container, the label it is rejected for, its run flags). A
    // registrator port must be exposed (as registrator requires); a port
    // named by `meshlb.port` need not (n1 below).
    let bad: [(&str, &str, &[&str]); 3] = [
        (
            "bad1",
            "meshlb.port",
            &[
                "--label",
                "meshlb.service=api",
                "--label",
                "meshlb.port=http",
            ],
        ),
        (
            "bad2",
            "SERVICE_9000_NAME",
            &["-e", "SERVICE_9000_NAME=api"],
        ),
        (
            "bad3",
            "meshlb.weight",
            &[
                "--label",
                "meshlb.service=api",
                "--label",
                "meshlb.weight=heavy",
            ],
        ),
    ];
    for (name, _, flags) in bad {
        w.docker.run_web(name, flags);
    }
    // Labelled with its port, exposing nothing (no EXPOSE, no --expose).
    let n1 = w.docker.run_web_unexposed(
        "n1",
        &[
            "--label",
            "meshlb.service=bare",
            "--label",
            "meshlb.port=8000",
        ],
    );
    let l1 = w.docker.run_web(
        "l1",
        &[
            "--label",
            "meshlb.service=api",
            "--label",
            "meshlb.weight=50",
        ],
    );
    let h1 = w.docker.run_web(
        "h1",
        &[
            "--label",
            "meshlb.service=api",
            "--health-cmd",
            "test -f /tmp/ok",
            "--health-interval",
            "300ms",
            "--health-retries",
            "1",
        ],
    );
    let t0 = Instant::now();
    let (tasks, _) = w.wait_task_ids("api", &ids(&[&e1, &e2, &l1]), Duration::from_secs(10));
    let took = t0.elapsed();
    assert!(took <= FAST, "registration took {took:?}{}", w.ctx());
    check_record(&w, "e1", &tasks[&e1].0, &w.docker.ip("e1"), 8000, 100);
    check_record(&w, "e2", &tasks[&e2].0, &w.docker.ip("e2"), 8000, 100);
    check_record(&w, "l1", &tasks[&l1].0, &w.docker.ip("l1"), 8000, 50);
    let (tasks, _) = w.wait_task_ids("bare", &ids(&[&n1]), Duration::from_secs(5));
    check_record(&w, "n1", &tasks[&n1].0, &w.docker.ip("n1"), 8000, 100);

    // Each bad container: one warning naming it and its label, even after
    // another event (pause/unpause) made the daemon look at it again.
    for (name, _, _) in bad {
        w.docker.cli_ok(&["pause", name]);
        w.docker.cli_ok(&["unpause", name]);
    }
    thread::sleep(Duration::from_millis(500));
    for (name, label, _) in bad {
        let lines = log_lines(
            &d,
            &format!("container {name} ("),
            &format!("label {label}"),
        );
        assert_eq!(
            lines.len(),
            1,
            "want one log line naming container {name} and label {label}, got {lines:?}{}",
            w.ctx()
        );
        assert!(lines[0].contains("WARN"), "{lines:?}");
    }

    let want: BTreeSet<(String, String)> = ["e1", "e2", "l1"]
        .iter()
        .map(|n| (w.docker.ip(n), "up".to_string()))
        .collect();
    w.wait_backends("api", &want, Duration::from_secs(5));
    w.spread(
        "60 GETs over env and label containers",
        vip,
        60,
        &["e1", "e2", "l1"],
    );
    let want: BTreeSet<(String, String)> = [(w.docker.ip("n1"), "up".to_string())].into();
    w.wait_backends("bare", &want, Duration::from_secs(5));
    w.spread(
        "10 GETs to a container that exposes nothing but names its port",
        bare_vip,
        10,
        &["n1"],
    );

    // HEALTHCHECK: registered only while healthy.
    assert!(
        !w.tasks("api").contains_key(&h1),
        "h1 registered before it was healthy"
    );
    w.docker
        .cli_ok(&["exec", "h1", "/bin/busybox", "touch", "/tmp/ok"]);
    w.wait_task_ids("api", &ids(&[&e1, &e2, &l1, &h1]), Duration::from_secs(5));
    w.docker
        .cli_ok(&["exec", "h1", "/bin/busybox", "rm", "/tmp/ok"]);
    w.wait_task_ids("api", &ids(&[&e1, &e2, &l1]), Duration::from_secs(5));

    // A published port: this node's address and the host port.
    let p1 = w
        .docker
        .run_web("p1", &["--label", "meshlb.service=pub", "-p", "18000:8000"]);
    let (tasks, _) = w.wait_task_ids("pub", &ids(&[&p1]), Duration::from_secs(5));
    let nodes = w.c.get_prefix(&format!("{PREFIX}/nodes/lb"));
    let node: Value = serde_json::from_str(&nodes[&format!("{PREFIX}/nodes/lb")].0).unwrap();
    let node_addr = node["addr"].as_str().expect("nodes/lb has an addr");
    check_record(&w, "p1", &tasks[&p1].0, node_addr, 18000, 100);
}

#[test]
fn dockerd_restart_resyncs_and_tasks_die_with_the_lease() {
    let mut w = World::new("dk3");
    let vip: SocketAddr = "10.96.0.62:8080".parse().unwrap();
    w.service("web", "10.96.0.62", 8080);
    let mut d = w.daemon();
    let label = ["--label", "meshlb.service=web", "--restart", "always"];
    let r: Vec<String> = ["r1", "r2", "r3"]
        .iter()
        .map(|n| w.docker.run_web(n, &label))
        .collect();
    let all = ids(&r.iter().collect::<Vec<_>>());
    w.wait_task_ids("web", &all, Duration::from_secs(10));

    // dockerd stops (its containers with it); while it is away, one
    // registration is lost and a stale one appears (a container this node
    // no longer has): the resync must fix both.
    w.docker.stop();
    wait_for(
        Duration::from_secs(10),
        "the daemon to notice dockerd is gone",
        || {
            if d.log_text().contains("reconnecting (registrations kept") {
                Ok(())
            } else {
                Err("not yet".into())
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", w.ctx()));
    let stale = format!("{PREFIX}/tasks/web/00000000stale");
    w.c.put(
        &stale,
        &json!({"addr": "172.17.0.250", "port": 8000, "node": "lb", "source": "docker"})
            .to_string(),
    );
    let other_node = format!("{PREFIX}/tasks/web/othernode");
    w.c.put(
        &other_node,
        &json!({"addr": "10.200.0.250", "port": 8000, "node": "n2", "source": "docker"})
            .to_string(),
    );
    w.c.del(&format!("{PREFIX}/tasks/web/{}", r[0]));
    w.docker.start_again();
    let mut want = all.clone();
    want.insert("othernode".into());
    let (tasks, _) = w.wait_task_ids("web", &want, Duration::from_secs(20));
    // No duplicates: one task per container, each at its container's
    // current address, all running.
    let lease = w.node_lease();
    let mut addrs = BTreeSet::new();
    for (id, name) in r.iter().zip(["r1", "r2", "r3"]) {
        let (rec, l) = &tasks[id];
        check_record(&w, name, rec, &w.docker.ip(name), 8000, 100);
        assert_eq!(*l, lease, "{name}: not under the node lease");
        addrs.insert(rec["addr"].to_string());
    }
    assert_eq!(addrs.len(), 3, "duplicate addresses: {tasks:?}");
    // Another node's task is not this node's to remove.
    w.c.del(&other_node);
    w.wait_task_ids("web", &all, Duration::from_secs(5));
    let want: BTreeSet<(String, String)> = ["r1", "r2", "r3"]
        .iter()
        .map(|n| (w.docker.ip(n), "up".to_string()))
        .collect();
    w.wait_backends("web", &want, Duration::from_secs(5));
    w.spread(
        "60 GETs after the dockerd restart",
        vip,
        60,
        &["r1", "r2", "r3"],
    );

    // SIGKILL: the tasks outlive the daemon until the lease expires.
    let ttl =
        w.c.etcdctl_ok(&["lease", "timetolive", &format!("{lease:x}")]);
    assert!(ttl.contains("granted with TTL(10s)"), "{ttl}");
    d.kill9();
    let killed = Instant::now();
    thread::sleep(Duration::from_secs(4));
    let left = w.tasks("web");
    assert_eq!(
        left.len(),
        3,
        "tasks vanished {:?} after the daemon was killed, before the lease could expire: {left:?}",
        killed.elapsed()
    );
    wait_for(
        Duration::from_secs(15),
        "tasks to expire with the lease",
        || {
            let t = w.tasks("web");
            if t.is_empty() {
                Ok(())
            } else {
                Err(format!("{} left", t.len()))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", w.ctx()));
    let gone = killed.elapsed();
    assert!(
        gone >= Duration::from_secs(5) && gone <= Duration::from_secs(13),
        "tasks vanished {gone:?} after SIGKILL (lease TTL 10 s, kept alive every ~3 s)"
    );
}

/// The DNS view with etcd and Docker (issue 22): `meshlb run --dns
/// 172.17.0.1:53` (docker0's address). Two labelled containers are
/// `tasks.web.meshlb`; a task put into etcd by hand is answered within
/// 1 s of the put, and gone within 1 s of its delete; a container started
/// with `--dns 172.17.0.1` resolves `web.meshlb` (busybox nslookup, in
/// the container) to the VIP and reaches the service at that address
/// (busybox wget).
#[test]
fn dns_follows_etcd_and_a_container_resolves_services_through_it() {
    const DNS: &str = "172.17.0.1";
    let w = World::new("dkn");
    w.service("web", "10.96.0.62", 8080);
    let label = [
        "--label",
        "meshlb.service=web",
        "--label",
        "meshlb.port=8000",
    ];
    w.docker.run_web("w1", &label);
    w.docker.run_web("w2", &label);
    let _d = w.daemon_with(&["--dns", &format!("{DNS}:53")]);
    let ip = |n: &str| w.docker.ip(n);
    let dig = |name: &str| -> BTreeSet<String> {
        let server = format!("@{DNS}");
        let out = run_cmd(
            &[
                "ip",
                "netns",
                "exec",
                &w.topo.lb_ns,
                "dig",
                &server,
                name,
                "A",
                "+short",
                "+time=1",
                "+tries=2",
            ],
            Duration::from_secs(10),
        );
        assert!(out.success(), "dig {name}: {}", out.describe());
        out.stdout
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    };
    wait_for(
        Duration::from_secs(15),
        "w1 and w2 in tasks.web.meshlb",
        || {
            let got = dig("tasks.web.meshlb");
            if got == [ip("w1"), ip("w2")].into_iter().collect() {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", w.ctx()));
    assert_eq!(
        dig("web.meshlb"),
        ["10.96.0.62".to_string()]
            .into_iter()
            .collect::<BTreeSet<_>>()
    );

    // A task put into etcd by hand: answered within 1 s; deleted: gone
    // within 1 s.
    let manual = "172.17.0.250";
    let key = format!("{PREFIX}/tasks/web/manual1");
    let task = json!({"addr": manual, "port": 8000, "weight": 100, "node": "lb", "state": "running", "source": "manual"});
    let put = Instant::now();
    w.c.put(&key, &task.to_string());
    let appeared = wait_for(
        Duration::from_secs(10),
        "the etcd task in tasks.web.meshlb",
        || {
            if dig("tasks.web.meshlb").contains(manual) {
                Ok(put.elapsed())
            } else {
                Err("not yet".into())
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", w.ctx()));
    let del = Instant::now();
    w.c.etcdctl_ok(&["del", &key]);
    let gone = wait_for(
        Duration::from_secs(10),
        "the etcd task gone from tasks.web.meshlb",
        || {
            if dig("tasks.web.meshlb").contains(manual) {
                Err("still there".into())
            } else {
                Ok(del.elapsed())
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", w.ctx()));
    eprintln!("etcd task in DNS {appeared:?} after the put, out {gone:?} after the delete");
    assert!(
        appeared <= Duration::from_secs(1) && gone <= Duration::from_secs(1),
        "an etcd task reached DNS {appeared:?} after its put, left {gone:?} after its delete (want <= 1 s){}",
        w.ctx()
    );

    // A container pointed at the node's DNS: resolves, then reaches.
    w.docker.cli_ok(&[
        "run",
        "-d",
        "--name",
        "client",
        "--dns",
        DNS,
        IMAGE,
        "/bin/busybox",
        "sleep",
        "600",
    ]);
    let script = "ip=$(/bin/busybox nslookup -type=a web.meshlb | /bin/busybox awk '/^Name:/{n=1} n && /^Address/{print $2; exit}'); \
                  echo \"resolved $ip\"; for i in 1 2 3 4 5 6 7 8 9 10; do \
                  /bin/busybox timeout -s KILL 5 /bin/busybox wget -q -O - http://$ip:8080/ || echo fail; done";
    let out = w.docker.cli_timeout(
        &["exec", "client", "/bin/busybox", "sh", "-c", script],
        Duration::from_secs(120),
    );
    assert!(
        out.success(),
        "docker exec client: {}{}",
        out.describe(),
        w.ctx()
    );
    let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    assert_eq!(
        lines.first().copied(),
        Some("resolved 10.96.0.62"),
        "the container's lookup: {}",
        out.stdout
    );
    let answers: BTreeSet<&str> = lines[1..].iter().copied().collect();
    assert!(
        lines.len() == 11 && answers.iter().all(|a| ["w1", "w2"].contains(a)),
        "the container's requests to web.meshlb: {}{}",
        out.stdout,
        w.ctx()
    );
}

#[test]
fn docker_without_etcd_is_a_usage_error() {
    let out = run_cmd(
        &[
            MESHLB,
            "run",
            "--docker",
            "--iface",
            "lo",
            "--metrics",
            "none",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(out.code(), Some(2), "{}", out.describe());
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "{}", out.describe());
    assert!(
        lines[0].contains("--docker") && lines[0].contains("--etcd"),
        "{}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------
// Containers at default offloads behind a software router
//
// ```text
//  client ns             router ns                     node ns (dockerd, etcd, meshlb run --node lb)
//  <s>c ------veth------ <s>rc          <s>rn ------veth------ <s>e  (uplink: XDP)
//  10.240.1.2/24         10.240.1.1/24  10.240.2.1/24          10.240.2.2/24
//  fd00:240:1::2/64      fd00:240:1::1  fd00:240:2::1          fd00:240:2::2/64
//  (tx csum off)         (tx csum off)  (tx csum off)          docker0 (TC): 172.17.0.1/16,
//                                                                fd00:172:17::1/64
//                                                                `-- containers .2, .3 / ::2, ::3
// ```
//
// (`<s>` is the test's short name, `<tag><pid>`.) The client plays a remote
// host and the router a router that computes checksums in software: every
// packet the client receives carries a complete checksum its stack checks.
// The node's uplink, docker0, the containers' veths (both ends) keep the
// kernel's defaults (TX checksum offload on): the containers' packets are
// CHECKSUM_PARTIAL, which is what the TC program on docker0 must translate
// right; the build asserts those offloads. dockerd runs with IPv6 on the
// default bridge (`--ipv6 --fixed-cidr-v6`). The client routes everything
// via the router, the router routes the VIP ranges and the container
// subnets via the node, the node routes everything else via the router.

/// Client {10.240.1.2, fd00:240:1::2}, router {.1.1, ::1} and {10.240.2.1,
/// fd00:240:2::1}, node {10.240.2.2, fd00:240:2::2}.
const R_ADDRS: HopAddrs = HopAddrs::new(240, 0x240);
const R_NODE4: Ipv4Addr = R_ADDRS.node4;
const R_NODE6: Ipv6Addr = R_ADDRS.node6;
/// docker0's subnets (dockerd's default v4 one; v6 given to dockerd).
const DOCKER_NET4: &str = "172.17.0.0/16";
const DOCKER_NET6: &str = "fd00:172:17::/64";
/// Service `web`: tcp VIP:8080 and node port 8080 -> containers :8000.
const WEB_VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);
const WEB_TCP: u16 = 8080;
/// Service `webu`: udp VIP:5300 and node port 5300 -> containers :5353.
const WEBU_VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 71);
const WEBU_UDP: u16 = 5300;
/// Service `web6`: tcp 8086 -> :8000 and udp 5306 -> :5353 on its VIP and
/// the node's v6 address.
const WEB6_VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x70);
const WEB6_TCP: u16 = 8086;
const WEB6_UDP: u16 = 5306;
/// Long enough for two SYN retransmits (1 s, 3 s) on a loaded 2-CPU VM.
const R_REQ_TIMEOUT: Duration = Duration::from_secs(5);

/// The namespaces and veths of the routed world; torn down on drop.
/// `prefix` is `mlbt-<tag>-<pid%10000>`, `short` `<tag><pid%10000>`; the
/// temp dir holds dockerd's state and the daemon's log, the bpffs dir `lb`
/// (daemon) and `rt` (router's xdp-pass).
struct RoutedNet {
    /// `--xdp-mode` of the node's uplink: "native" (then the router's
    /// node-facing veth runs `meshlb xdp-pass`: XDP transmit on a veth
    /// delivers only into a peer with an XDP program) or "generic".
    xdp_mode: &'static str,
    hops: Hops,
}

impl std::ops::Deref for RoutedNet {
    type Target = Hops;

    fn deref(&self) -> &Hops {
        &self.hops
    }
}

impl RoutedNet {
    fn new(tag: &str, xdp_mode: &'static str) -> RoutedNet {
        require_root();
        assert!(
            (1..=4).contains(&tag.len()) && tag.chars().all(|c| c.is_ascii_alphanumeric()),
            "tag {tag:?} must be 1-4 ascii alphanumerics"
        );
        assert!(matches!(xdp_mode, "native" | "generic"), "{xdp_mode}");
        ensure_bpffs();
        let pid = std::process::id() % 10000;
        let prefix = format!("mlbt-{tag}-{pid}");
        let short = format!("{tag}{pid}");
        let net = RoutedNet {
            xdp_mode,
            hops: Hops::new(prefix, short, "n", &R_ADDRS),
        };
        // From here on a panic drops `net`, which removes whatever exists.
        net.prepare(&net.hop_ns());
        net.build();
        if xdp_mode == "native" {
            net.router_xdp_pass();
        }
        net
    }

    fn build(&self) {
        for ns in self.hop_ns() {
            // No DAD (docker0 inherits `default`): addresses usable at once.
            add_netns(ns, ns != self.client_ns, ns == self.client_ns);
        }
        self.link();
        // Routes (docker0 and its routes come with dockerd).
        self.routes(DOCKER_NET4, DOCKER_NET6);
        settle_and_check_root(&self.hop_ns(), &self.short);
    }

    fn bpffs(&self) -> PathBuf {
        self.bpffs_root.join("lb")
    }
}

impl Drop for RoutedNet {
    fn drop(&mut self) {
        self.teardown(self.bpffs(), Duration::from_secs(30), &self.hop_ns());
    }
}

/// The routed world: network, dockerd (IPv6 on) and etcd in the node
/// namespace, and the daemon once started. Drop stops the daemon
/// (SIGTERM), then the fields drop in order: dockerd (its containers with
/// it), etcd, the network.
struct Routed {
    daemon: Option<Proc>,
    /// Extra `meshlb run` flags (`start_daemon`).
    daemon_args: Vec<String>,
    docker: Dockerd,
    etcd: EtcdServer,
    c: EtcdClient,
    net: RoutedNet,
}

impl Drop for Routed {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(5));
        }
    }
}

impl Routed {
    fn new(tag: &str, xdp_mode: &'static str) -> Routed {
        require_docker();
        let net = RoutedNet::new(tag, xdp_mode);
        let v6 = format!("--fixed-cidr-v6={DOCKER_NET6}");
        let docker =
            Dockerd::start_in_with(&net.node_ns, &net.dir.join("docker"), &["--ipv6", &v6]);
        let etcd = EtcdServer::start_in(&net.node_ns, tag);
        let c = etcd.client();
        Routed {
            daemon: None,
            daemon_args: Vec::new(),
            docker,
            etcd,
            c,
            net,
        }
    }

    fn service(&self, name: &str, v: Value) {
        self.c
            .put(&format!("{PREFIX}/services/{name}"), &v.to_string());
    }

    /// `meshlb run --node lb --etcd ... --docker=SOCK` on the uplink (XDP)
    /// and docker0 (TC); waits until it is ready with `services`.
    fn start_daemon(&mut self, services: &[&str]) {
        let net = format!("--net=/run/netns/{}", self.net.node_ns);
        let mut argv: Vec<String> = ["nsenter", &net, MESHLB, "run", "--node", "lb"]
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
        argv.extend(["--xdp-mode".into(), self.net.xdp_mode.into()]);
        argv.extend(["--prefix".into(), PREFIX.into()]);
        argv.extend(self.c.meshlb_flags());
        argv.push(format!("--docker={}", self.docker.socket.display()));
        argv.extend(["--bpffs".into(), self.net.bpffs().display().to_string()]);
        argv.extend(["--iface".into(), self.net.uplink.clone()]);
        argv.extend(["--iface".into(), "docker0".into()]);
        argv.extend(self.daemon_args.iter().cloned());
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        self.daemon = Some(Proc::spawn(
            "meshlb run lb",
            &argv,
            &[("RUST_LOG", &rust_log), ("RUST_BACKTRACE", "1")],
            self.net.daemon_log(),
        ));
        let want_dp = format!("xdp-{}", self.net.xdp_mode);
        let want_mode = if self.net.xdp_mode == "native" { 1 } else { 2 };
        let r = wait_for(READY, "the daemon to be ready", || {
            let d = self.daemon.as_mut().expect("daemon");
            if let Some(st) = d.exit_status() {
                return Err(format!("daemon exited: {st}"));
            }
            probe_ready(
                &self.net.node_ns,
                || self.try_status(),
                services,
                &want_dp,
                &self.net.uplink,
                want_mode,
            )
        });
        if let Err(e) = r {
            panic!("{e}{}", self.ctx());
        }
        let d = self.daemon.as_mut().expect("daemon");
        wait_tc_attached(d, "docker0", READY).unwrap_or_else(|e| panic!("{e}{}", self.ctx()));
        assert_eq!(
            xdp_mode(&self.net.node_ns, "docker0"),
            None,
            "XDP attached to docker0, a task bridge (TC's){}",
            self.ctx()
        );
    }

    fn assert_daemon_alive(&mut self) {
        let st = self.daemon.as_mut().and_then(common::Proc::exit_status);
        if let Some(st) = st {
            panic!("the daemon exited during the test: {st}{}", self.ctx());
        }
    }

    fn try_status(&self) -> Result<Value, String> {
        status(
            &self.net.node_ns,
            &self.net.bpffs(),
            Duration::from_secs(30),
        )
    }

    /// The node's data-path counters (`status --json` `counters`).
    fn counters(&self) -> BTreeMap<String, u64> {
        status_counters(self.try_status(), || self.ctx())
    }

    /// Failure context: the node's non-zero counters, the daemon's log
    /// tail, dockerd's and etcd's.
    fn ctx(&self) -> String {
        format!(
            "{}{}{}",
            daemon_ctx(&self.net.daemon_log(), self.try_status()),
            self.docker.log_tail(20),
            self.etcd.log_tail(10)
        )
    }

    /// Starts `names` with [`Dockerd::run_web_udp`] (`extra` flags each),
    /// and waits until each answers HTTP and UDP on its v4 and v6 address,
    /// straight from the node namespace.
    fn containers(&self, names: &[&str], extra: &[&str]) -> Vec<Ctr> {
        for n in names {
            self.docker.run_web_udp(n, extra);
        }
        names
            .iter()
            .map(|n| {
                let v4: Ipv4Addr = self.docker.ip(n).parse().unwrap_or_else(|e| {
                    panic!(
                        "{n}: IPv4 {:?}: {e}{}",
                        self.docker.ip(n),
                        self.docker.log_tail(20)
                    )
                });
                let v6: Ipv6Addr = self.docker.ip6(n).parse().unwrap_or_else(|e| {
                    panic!(
                        "{n}: IPv6 {:?} (dockerd --ipv6): {e}{}",
                        self.docker.ip6(n),
                        self.docker.log_tail(20)
                    )
                });
                let c = Ctr {
                    name: n.to_string(),
                    v4,
                    v6,
                    pid: self.docker.pid(n),
                };
                let logs = || self.docker.cli(&["logs", n]).describe();
                wait_for(Duration::from_secs(30), &format!("{n} to answer"), || {
                    in_netns(&self.net.node_ns, || {
                        for ip in [IpAddr::from(c.v4), IpAddr::from(c.v6)] {
                            let t = Duration::from_secs(2);
                            let h = http_get(SocketAddr::new(ip, WEB_PORT), t)?;
                            let u = udp_request(SocketAddr::new(ip, UDP_ECHO_PORT), b"up?", t)?;
                            if h != *n || u != *n {
                                return Err(format!("{ip}: http {h:?}, udp {u:?}"));
                            }
                        }
                        Ok(())
                    })
                })
                .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
                c
            })
            .collect()
    }

    /// Waits until status shows `service` with exactly the backends
    /// `addrs`, all up.
    fn wait_backends(&self, service: &str, addrs: &[IpAddr]) {
        let want: BTreeSet<(IpAddr, String)> =
            addrs.iter().map(|a| (*a, "up".to_string())).collect();
        wait_for(
            Duration::from_secs(10),
            &format!("{service} backends {want:?}"),
            || {
                let st = self.try_status()?;
                let got: BTreeSet<(IpAddr, String)> = st["services"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter(|s| s["name"] == service)
                    .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
                    .filter_map(|b| {
                        let a = b["addr"].as_str()?.parse().ok()?;
                        Some((a, b["state"].as_str().unwrap_or("?").to_string()))
                    })
                    .collect();
                if got == want {
                    Ok(())
                } else {
                    Err(format!("status has {got:?}"))
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}{}", self.ctx()));
    }

    /// TX checksum offload: off on the client's and the router's veths
    /// (software), on (kernel default) on the node's uplink, docker0, its
    /// ports and the containers' eth0.
    fn check_offloads(&self, ctrs: &[Ctr]) {
        let mut want = self.net.offloads();
        want.push((netns_path(&self.net.node_ns), "docker0".into(), true));
        let ports = must(&[
            "ip",
            "-n",
            &self.net.node_ns,
            "-j",
            "link",
            "show",
            "master",
            "docker0",
        ]);
        let ports: Value = serde_json::from_str(&ports)
            .unwrap_or_else(|e| panic!("ip -j link output is not JSON ({e}): {ports}"));
        let ports: Vec<String> = ports
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            ports.len(),
            ctrs.len(),
            "docker0 ports {ports:?} for containers {:?}",
            ctrs.iter().map(|c| &c.name).collect::<Vec<_>>()
        );
        for p in ports {
            want.push((netns_path(&self.net.node_ns), p, true));
        }
        for c in ctrs {
            want.push((c.netns(), "eth0".into(), true));
        }
        assert_tx_checksumming(&want);
    }

    /// `TcpInCsumErrors`, `UdpInCsumErrors` (/proc/net/snmp) and
    /// `Udp6InCsumErrors` (/proc/net/snmp6) of the client, router and node
    /// namespaces and of each container's.
    fn csum_errors(&self, ctrs: &[Ctr]) -> BTreeMap<String, BTreeMap<&'static str, i64>> {
        let mut v: Vec<(String, String)> = self
            .net
            .hop_ns()
            .iter()
            .map(|ns| (ns.to_string(), netns_path(ns)))
            .collect();
        v.extend(
            ctrs.iter()
                .map(|c| (format!("container {}", c.name), c.netns())),
        );
        csum_errors(v)
    }
}

/// A container of the routed world.
struct Ctr {
    name: String,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    pid: i32,
}

impl Ctr {
    /// Its network namespace, for nsenter.
    fn netns(&self) -> String {
        format!("/proc/{}/ns/net", self.pid)
    }
}

/// Counter deltas between two `counters()` reads, non-zero ones only.
fn deltas(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, i64> {
    after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                *v as i64 - before.get(k).copied().unwrap_or(0) as i64,
            )
        })
        .filter(|(_, d)| *d != 0)
        .collect()
}

/// The routed world with two containers `names` on docker0 running
/// [`Dockerd::run_web_udp`], at default offloads (checked before and after
/// the daemon starts), as backends of three services: `web` (v4 tcp) and
/// `webu` (v4 udp) registered through `--docker` (registrator env), and
/// `web6` (v6 tcp and udp) as manual etcd tasks at their v6 addresses
/// (Docker registration takes a container's IPv4 address). The daemon
/// runs with `--socket-lb=<socket_lb>`. Returns the world, ready, and the
/// containers.
fn web_world(tag: &str, names: &[&str], socket_lb: bool) -> (Routed, Vec<Ctr>) {
    let mut w = Routed::new(tag, "native");
    w.daemon_args = vec![format!("--socket-lb={socket_lb}")];
    w.service(
        "web",
        json!({"vip": WEB_VIP4.to_string(), "publish": [{"proto": "tcp", "port": WEB_TCP, "target": WEB_PORT}]}),
    );
    w.service(
        "webu",
        json!({"vip": WEBU_VIP4.to_string(), "publish": [{"proto": "udp", "port": WEBU_UDP, "target": UDP_ECHO_PORT}]}),
    );
    w.service(
        "web6",
        json!({"vip": WEB6_VIP.to_string(), "publish": [
            {"proto": "tcp", "port": WEB6_TCP, "target": WEB_PORT},
            {"proto": "udp", "port": WEB6_UDP, "target": UDP_ECHO_PORT}]}),
    );
    let env_tcp = format!("SERVICE_{WEB_PORT}_NAME=web");
    let env_udp = format!("SERVICE_{UDP_ECHO_PORT}_NAME=webu");
    let ctrs = w.containers(names, &["-e", &env_tcp, "-e", &env_udp]);
    w.check_offloads(&ctrs);
    w.start_daemon(&["web", "webu", "web6"]);
    for c in &ctrs {
        let task = json!({"addr": c.v6.to_string(), "weight": 100, "node": "lb",
                          "state": "running", "source": "manual"});
        w.c.put(
            &format!("{PREFIX}/tasks/web6/{}", c.name),
            &task.to_string(),
        );
    }
    let v4: Vec<IpAddr> = ctrs.iter().map(|c| c.v4.into()).collect();
    let v6: Vec<IpAddr> = ctrs.iter().map(|c| c.v6.into()).collect();
    w.wait_backends("web", &v4);
    w.wait_backends("webu", &v4);
    w.wait_backends("web6", &v6);
    // Nothing turned an offload off meanwhile (dockerd, the daemon).
    w.check_offloads(&ctrs);
    (w, ctrs)
}

/// The eight service paths of [`web_world`]: (label, destination, udp).
fn web_paths() -> [(&'static str, SocketAddr, bool); 8] {
    let sa = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);
    [
        ("VIP v4 tcp", sa(WEB_VIP4.into(), WEB_TCP), false),
        ("node port v4 tcp", sa(R_NODE4.into(), WEB_TCP), false),
        ("VIP v4 udp", sa(WEBU_VIP4.into(), WEBU_UDP), true),
        ("node port v4 udp", sa(R_NODE4.into(), WEBU_UDP), true),
        ("VIP v6 tcp", sa(WEB6_VIP.into(), WEB6_TCP), false),
        ("node port v6 tcp", sa(R_NODE6.into(), WEB6_TCP), false),
        ("VIP v6 udp", sa(WEB6_VIP.into(), WEB6_UDP), true),
        ("node port v6 udp", sa(R_NODE6.into(), WEB6_UDP), true),
    ]
}

/// Checksum errors of every namespace of the world: a problem each
/// non-zero one; returns the text for the report.
fn check_csum(w: &Routed, ctrs: &[Ctr], problems: &mut Vec<String>) -> String {
    let text = csum_report(&w.csum_errors(ctrs), problems);
    eprintln!("[{}] checksum errors:{text}", w.net.prefix);
    text
}

/// Two real containers on docker0 in the node namespace, at default
/// offloads ([`web_world`]). A remote client behind a router that
/// checksums in software sends 300 requests on each of the eight paths
/// (VIP and node port, TCP and UDP, v4 and v6): none fails, both
/// containers answer on each, and no namespace (client, router, node,
/// containers) counts a checksum error.
#[test]
fn containers_at_default_offloads_through_a_software_checksum_hop() {
    const N: usize = 300;
    const NAMES: [&str; 2] = ["k1", "k2"];
    let (mut w, ctrs) = web_world("dkr", &NAMES, true);
    let paths = web_paths();
    let before = w.counters();
    let mut report = String::new();
    let mut problems = Vec::new();
    for (label, dst, udp) in paths {
        let started = Instant::now();
        let b = burst_from(&w.net.client_ns, dst, udp, N, R_REQ_TIMEOUT);
        let line = format!("{label} {dst}: {}", burst_summary(&b, started));
        eprintln!("[{}] {line}", w.net.prefix);
        report += &format!("\n  {line}");
        if let Err(e) = check_all(label, &b, N, &NAMES) {
            problems.push(e);
        }
    }
    w.assert_daemon_alive();
    let d = deltas(&before, &w.counters());
    eprintln!("[{}] counters moved: {d:?}", w.net.prefix);
    report += &format!("\n  node counters moved: {d:?}");
    // Every HTTP request is a new TCP connection, hence a new flow (a UDP
    // request may reuse an earlier tuple when its source port repeats).
    let tcp_requests = (paths.iter().filter(|p| !p.2).count() * N) as i64;
    let new_flows = d.get("new_flow").copied().unwrap_or(0);
    if new_flows < tcp_requests {
        problems.push(format!(
            "new_flow moved by {new_flows}, expected >= {tcp_requests}"
        ));
    }
    let csum_text = check_csum(&w, &ctrs, &mut problems);
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  {}\nrequests:{report}\nchecksum errors:{csum_text}{}",
        problems.len(),
        problems.join("\n  "),
        w.ctx()
    );
}

/// `n` GETs of `http://dst/` from inside container `from` (`docker exec`,
/// busybox wget, one connection each, killed after 5 s: this busybox's
/// `wget -T` crashes): answers by body, and failures.
fn wget_burst(w: &Routed, from: &str, dst: SocketAddr, n: usize) -> Burst {
    let script = format!(
        "i=0; while [ $i -lt {n} ]; do i=$((i+1)); \
         if b=$(/bin/busybox timeout -s KILL 5 /bin/busybox wget -q -O - http://{dst}/ 2>&1); \
         then echo \"ok $b\"; else echo \"fail $i (exit $?) $b\"; fi; done"
    );
    let out = w.docker.cli_timeout(
        &["exec", from, "/bin/busybox", "sh", "-c", &script],
        Duration::from_secs(6 * n as u64 + 60),
    );
    assert!(
        out.success(),
        "docker exec {from}: {}{}",
        out.describe(),
        w.ctx()
    );
    let mut b = Burst::default();
    for line in out.stdout.lines() {
        if let Some(body) = line.strip_prefix("ok ") {
            *b.counts.entry(body.trim().to_string()).or_default() += 1;
        } else if let Some(f) = line.strip_prefix("fail ") {
            b.failures.push(f.to_string());
        } else if let Some(last) = b.failures.last_mut() {
            // wget's message continued on another line.
            last.push_str(&format!(" / {line}"));
        } else {
            b.failures.push(format!("unexpected output {line:?}"));
        }
    }
    b
}

/// With the socket-level balancer off (`--socket-lb=false`: where cgroup
/// v2 is missing, containers are served this way): from inside container
/// k1 on docker0, 100 calls on each of the eight paths of [`web_world`]
/// (VIP and node port, the node's uplink address;
/// TCP with busybox wget through `docker exec`, UDP from a socket in k1's
/// network namespace, which busybox cannot do; v4 and v6). Both backends
/// are containers on this node, so every call is hairpinned (source
/// translated to docker0's address): every call succeeds, k1 itself
/// (hairpin to itself) and k2 (its neighbour on docker0) each answer on
/// every path, the node's `hairpin` counter moves by at least one per TCP
/// call (each a new connection; a UDP call may reuse an earlier tuple when
/// its source port repeats), and no namespace counts a checksum error.
#[test]
fn container_hairpin_to_vip_and_node_port() {
    const N: usize = 100;
    const NAMES: [&str; 2] = ["k1", "k2"];
    let (mut w, ctrs) = web_world("dkh", &NAMES, false);
    let from = &ctrs[0];
    let paths = web_paths();
    let before = w.counters();
    let mut report = String::new();
    let mut problems = Vec::new();
    for (label, dst, udp) in paths {
        let started = Instant::now();
        let b = if udp {
            in_netns_path(&from.netns(), || {
                let mut b = Burst::default();
                for i in 0..N {
                    match udp_request(dst, format!("ping {i}").as_bytes(), R_REQ_TIMEOUT) {
                        Ok(body) => *b.counts.entry(body).or_default() += 1,
                        Err(e) => b.failures.push(format!("request {i}: {e}")),
                    }
                }
                b
            })
        } else {
            wget_burst(&w, &from.name, dst, N)
        };
        let line = format!(
            "{} -> {label} {dst}: {}",
            from.name,
            burst_summary(&b, started)
        );
        eprintln!("[{}] {line}", w.net.prefix);
        report += &format!("\n  {line}");
        if let Err(e) = check_all(label, &b, N, &NAMES) {
            problems.push(e);
        }
    }
    w.assert_daemon_alive();
    let d = deltas(&before, &w.counters());
    eprintln!("[{}] counters moved: {d:?}", w.net.prefix);
    report += &format!("\n  node counters moved: {d:?}");
    let hairpin = d.get("hairpin").copied().unwrap_or(0);
    let want = (paths.iter().filter(|p| !p.2).count() * N) as i64;
    if hairpin < want {
        problems.push(format!(
            "hairpin counter moved by {hairpin}, expected >= {want} (a new hairpin flow per TCP call)"
        ));
    }
    let no_addr = d.get("hairpin_no_addr").copied().unwrap_or(0);
    if no_addr != 0 {
        problems.push(format!("hairpin_no_addr moved by {no_addr}"));
    }
    let csum_text = check_csum(&w, &ctrs, &mut problems);
    assert!(
        problems.is_empty(),
        "hairpin: {} problem(s):\n  {}\nrequests:{report}\nchecksum errors:{csum_text}{}",
        problems.len(),
        problems.join("\n  "),
        w.ctx()
    );
}

/// The socket-level balancer (issue 20) serving a container: from inside
/// container k1 on docker0, 100 calls each to the VIP, the node's address
/// and loopback on the published port, TCP and UDP (unconnected and
/// connected), IPv4 and IPv6. TCP twice: busybox wget through `docker
/// exec` (a process of the container) and a socket in k1's namespace that
/// checks `getpeername` names the frontend; UDP from sockets in k1's
/// namespace (busybox has no UDP client), whose answers must come from
/// the frontend. Every call succeeds and both containers answer on every
/// path; the node's `hairpin` counter does not move for the TCP calls (no
/// packet of theirs needed NAT); status says the balancer is on and serves
/// the node's and both containers' namespaces. Then the daemon is
/// SIGKILLed and started again under a loop of k1's loopback calls: none
/// fails (the hooks and the namespaces they serve outlive the daemon).
#[test]
fn containers_reach_services_through_the_socket_balancer() {
    const N: usize = 100;
    const NAMES: [&str; 2] = ["k1", "k2"];
    let (mut w, ctrs) = web_world("dks", &NAMES, true);
    let from = &ctrs[0];
    wait_for(
        Duration::from_secs(10),
        "socket_lb to serve both containers' namespaces",
        || {
            let st = w.try_status()?;
            let sl = &st["socket_lb"];
            if sl["on"] == true && sl["namespaces"].as_u64().unwrap_or(0) >= 3 {
                Ok(())
            } else {
                Err(format!("socket_lb: {sl}"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", w.ctx()));
    let sa = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);
    let lo4 = IpAddr::from(Ipv4Addr::LOCALHOST);
    let lo6 = IpAddr::from(Ipv6Addr::LOCALHOST);
    let mut paths: Vec<(&str, SocketAddr, bool)> = web_paths().to_vec();
    paths.extend([
        ("loopback v4 tcp", sa(lo4, WEB_TCP), false),
        ("loopback v4 udp", sa(lo4, WEBU_UDP), true),
        ("loopback v6 tcp", sa(lo6, WEB6_TCP), false),
        ("loopback v6 udp", sa(lo6, WEB6_UDP), true),
    ]);
    let before = w.counters();
    let mut report = String::new();
    let mut problems = Vec::new();
    let mut tcp_calls = 0;
    for (label, dst, udp) in paths {
        let mut runs = Vec::new();
        if udp {
            runs.push(("udp", socket_burst(&from.netns(), dst, SockKind::Udp, N)));
            runs.push((
                "connected udp",
                socket_burst(&from.netns(), dst, SockKind::UdpConnected, N),
            ));
        } else {
            if !dst.ip().is_loopback() || dst.is_ipv4() {
                // busybox wget has no [::1] URL support worth trusting.
                runs.push(("wget", wget_burst(&w, &from.name, dst, N)));
                tcp_calls += N;
            }
            runs.push(("tcp", socket_burst(&from.netns(), dst, SockKind::Tcp, N)));
            tcp_calls += N;
        }
        for (how, b) in runs {
            let line = format!("{} -> {label} {dst} ({how}): {:?}", from.name, b.counts);
            eprintln!("[{}] {line}", w.net.prefix);
            report += &format!("\n  {line}");
            if let Err(e) = check_all(&format!("{label} ({how})"), &b, N, &NAMES) {
                problems.push(e);
            }
        }
    }
    w.assert_daemon_alive();
    let d = deltas(&before, &w.counters());
    eprintln!(
        "[{}] counters moved: {d:?} ({tcp_calls} TCP calls)",
        w.net.prefix
    );
    let hairpin = d.get("hairpin").copied().unwrap_or(0);
    if hairpin > 0 {
        problems.push(format!(
            "hairpin counter moved by {hairpin}: TCP calls went through the TC program, not the socket balancer"
        ));
    }

    // The daemon SIGKILLed and started again while k1 keeps calling its
    // loopback (which only the socket balancer serves): no call fails.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (ok, failed) = thread::scope(|s| {
        let calls = s.spawn(|| {
            let (mut ok, mut failed) = (0usize, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let (dst, kind) = if i.is_multiple_of(2) {
                    (sa(lo4, WEB_TCP), SockKind::Tcp)
                } else {
                    (sa(lo4, WEBU_UDP), SockKind::UdpConnected)
                };
                let b = socket_burst(&from.netns(), dst, kind, 1);
                ok += b.counts.values().sum::<usize>();
                failed.extend(b.failures.into_iter().map(|f| format!("{dst}: {f}")));
                i += 1;
                thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        });
        thread::sleep(Duration::from_secs(1));
        if let Some(d) = w.daemon.as_mut() {
            d.kill9();
        }
        thread::sleep(Duration::from_secs(1));
        w.start_daemon(&["web", "webu", "web6"]);
        thread::sleep(Duration::from_secs(2));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        calls.join().expect("call loop")
    });
    eprintln!(
        "[{}] k1's loopback calls across a daemon restart: {ok} answered, {} failed",
        w.net.prefix,
        failed.len()
    );
    if ok < 50 || !failed.is_empty() {
        problems.push(format!(
            "k1's loopback calls across a daemon restart: {ok} answered, {} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        ));
    }
    assert!(
        problems.is_empty(),
        "socket balancer from a container: {} problem(s):\n  {}\nrequests:{report}{}",
        problems.len(),
        problems.join("\n  "),
        w.ctx()
    );
}

/// How `socket_burst` calls.
#[derive(Clone, Copy, Debug)]
enum SockKind {
    /// connect, `getpeername` (must be the destination), GET.
    Tcp,
    /// `sendto` + `recvfrom` (the answer must come from the destination).
    Udp,
    /// connect, `getpeername`, send + recv.
    UdpConnected,
}

/// `n` calls of `kind` to `dst` from sockets in the network namespace at
/// path `netns`, each on a new socket: answers by body, and failures.
fn socket_burst(netns: &str, dst: SocketAddr, kind: SockKind, n: usize) -> Burst {
    in_netns_path(netns, || {
        let mut b = Burst::default();
        for i in 0..n {
            let r = match kind {
                SockKind::Tcp => tcp_connect(None, dst, R_REQ_TIMEOUT)
                    .map_err(|e| format!("connect: {e}"))
                    .and_then(|s| {
                        let peer = s.peer_addr().map_err(|e| format!("getpeername: {e}"))?;
                        if peer == dst {
                            Ok(())
                        } else {
                            Err(format!("getpeername says {peer}"))
                        }
                    })
                    .and_then(|()| http_get(dst, R_REQ_TIMEOUT)),
                SockKind::Udp => udp_request(dst, format!("ping {i}").as_bytes(), R_REQ_TIMEOUT),
                SockKind::UdpConnected => connected_udp_request(dst, R_REQ_TIMEOUT),
            };
            match r {
                Ok(body) => *b.counts.entry(body).or_default() += 1,
                Err(e) => b.failures.push(format!("request {i}: {e}")),
            }
        }
        b
    })
}

/// Runs `f` on a thread inside the network namespace at path `netns`.
fn in_netns_path<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        let h = s.spawn(|| {
            let file = fs::File::open(netns).unwrap_or_else(|e| panic!("open {netns}: {e}"));
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns({netns}): {e}"));
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}
