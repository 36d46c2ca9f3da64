//! Docker auto-registration end to end: `meshlb run --etcd ... --docker=SOCK`
//! in a topology's LB namespace, next to a real dockerd and a real etcd
//! started inside that namespace (see `common::docker`, `common::etcd`).
//! XDP runs on the client-facing veth and on docker0 (generic mode); the
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
//! Needs root; never skips.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::docker::*;
use common::etcd::*;
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

    fn ifaces(&self) -> Vec<String> {
        vec![self.topo.lb_client_iface.clone(), "docker0".into()]
    }

    /// `meshlb run --node lb --etcd ... --docker=SOCK` on the client veth
    /// and docker0, ready.
    fn daemon(&self) -> Proc {
        let mut args: Vec<String> = ["--node", "lb", "--xdp-mode", "generic", "--prefix", PREFIX]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(self.c.meshlb_flags());
        args.push(format!("--docker={}", self.docker.socket.display()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let ifaces = self.ifaces();
        let irefs: Vec<&str> = ifaces.iter().map(String::as_str).collect();
        let mut d = self.topo.start_daemon_args(&refs, &irefs);
        self.topo.wait_ready_on(&mut d, &[], READY, &irefs);
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

    /// The lease `nodes/lb` is held under.
    fn node_lease(&self) -> i64 {
        let nodes = self.c.get_prefix(&format!("{PREFIX}/nodes/"));
        let (_, lease) = nodes
            .get(&format!("{PREFIX}/nodes/lb"))
            .unwrap_or_else(|| panic!("no nodes/lb in etcd: {nodes:?}{}", self.ctx()));
        assert_ne!(*lease, 0, "nodes/lb has no lease");
        *lease
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
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
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

fn ids(v: &[&String]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Checks one docker task record.
fn check_record(w: &World, what: &str, rec: &Value, addr: &str, port: u64, weight: u64) {
    assert_eq!(rec["addr"], addr, "{what}: {rec}{}", w.ctx());
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
    for (id, name) in [(&w1, "w1"), (&w2, "w2"), (&w3, "w3")] {
        let (rec, l) = &tasks[id];
        check_record(&w, name, rec, &w.docker.ip(name), 8000, 100);
        assert_eq!(*l, lease, "{name}'s task is not under the node lease");
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
    w.spread("60 GETs over 3 containers", vip, 60, &["w1", "w2", "w3"]);

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
    let d = w.daemon();

    let e1 = w.docker.run_web("e1", &["-e", "SERVICE_NAME=api"]);
    let e2 = w.docker.run_web("e2", &["-e", "SERVICE_8000_NAME=api"]);
    w.docker
        .run_web("e3", &["-e", "SERVICE_NAME=api", "-e", "SERVICE_IGNORE=1"]);
    let bad: [(&str, &str, &str); 3] = [
        ("bad1", "meshlb.port", "meshlb.port=http"),
        ("bad2", "meshlb.port", "meshlb.port=9000"),
        ("bad3", "meshlb.weight", "meshlb.weight=heavy"),
    ];
    for (name, _, l) in bad {
        w.docker
            .run_web(name, &["--label", "meshlb.service=api", "--label", l]);
    }
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
