//! A node that sets itself up (SPEC "Node setup without surprises"): the
//! daemon picks its interfaces itself. In the mesh of `common::mesh`
//! (three nodes, each with an uplink on the switch and a bridge of task
//! namespaces):
//! - only the uplink named (`--iface` once) on n1 and n3, nothing named on
//!   n2 (its default route names the uplink): every node's tasks behind
//!   the bridges answer 300/300 through the VIP and each node's port, and
//!   `status --json` lists each attached interface with its role, mode
//!   and why (the bridges: TC, for their local backends);
//! - a bridge created 5 s after the daemon started, with a task behind it
//!   that a service names: the task answers through the VIP within 2 s of
//!   the bridge's creation, without a restart;
//! - SIGHUP with a changed `interfaces` list attaches, then detaches, an
//!   uplink without a restart.
//!
//! Needs root; never skips.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::mesh::*;
use common::router::{burst_from, check_all};
use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

const REQ_TIMEOUT: Duration = Duration::from_secs(3);

/// The interfaces `status --json` lists, by name: (role, mode, why).
fn interfaces(st: &Value) -> std::collections::BTreeMap<String, (String, String, String)> {
    st["interfaces"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|i| {
            let s = |k: &str| i[k].as_str().unwrap_or("?").to_string();
            (s("name"), (s("role"), s("mode"), s("why")))
        })
        .collect()
}

/// Deletes a namespace this test made, when dropped.
struct NsGuard(String);

impl Drop for NsGuard {
    fn drop(&mut self) {
        if Path::new("/run/netns").join(&self.0).exists() {
            let _ = run_cmd(&["ip", "netns", "del", &self.0], Duration::from_secs(30));
        }
    }
}

#[test]
fn only_the_uplink_named_or_none_local_tasks_behind_bridges_answer() {
    let m = Mesh::new("u");
    // n2 names no interface: its default route (via the client, on the
    // switch) makes its uplink the uplink.
    let client = m.client_v4.to_string();
    must(&[
        "ip",
        "-n",
        &m.nodes[1].ns,
        "route",
        "add",
        "default",
        "via",
        &client,
    ]);
    let cfg = m.write_file("meshlb.toml", &config(&m, &ALL));
    let c = cfg.display().to_string();
    let mut daemons: Vec<Proc> = (0..3)
        .map(|i| {
            let eth = m.nodes[i].eth.as_str();
            let ifaces: &[&str] = if i == 1 { &[] } else { &[eth] };
            m.start_daemon_ifaces(i, &["--config", &c], ifaces)
        })
        .collect();
    // Ready: XDP native on each uplink, none on each bridge.
    for (i, d) in daemons.iter_mut().enumerate() {
        m.wait_ready(i, d, &SERVICES);
    }
    for (i, n) in m.nodes.iter().enumerate() {
        let st = m.try_status(i).unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
        let ifs = interfaces(&st);
        let names: Vec<&String> = ifs.keys().collect();
        assert_eq!(
            names,
            {
                let mut v = vec![&n.eth, &n.br];
                v.sort();
                v
            },
            "{}: attached interfaces: {st}{}",
            n.name,
            m.ctx()
        );
        let (role, mode, why) = &ifs[&n.eth];
        let want_why = if i == 1 {
            "IPv4 default route"
        } else {
            "listed"
        };
        assert_eq!(
            (role.as_str(), mode.as_str(), why.as_str()),
            ("uplink", "xdp-native", want_why),
            "{}: {}",
            n.name,
            n.eth
        );
        let (role, mode, why) = &ifs[&n.br];
        assert_eq!((role.as_str(), mode.as_str()), ("task", "tc"), "{}", n.br);
        assert!(
            why.starts_with("local backend "),
            "{}: {} attached because {why:?}",
            n.name,
            n.br
        );
        assert_eq!(xdp_mode(&n.ns, &n.br), None, "XDP on task bridge {}", n.br);
    }
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let b = burst_from(&m.client_ns, vip, false, 300, REQ_TIMEOUT);
    check_all("VIP via n1 (only its uplink named)", &b, 300, &ALL)
        .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    for n in &m.nodes {
        let dst = node_addr(n, 80, false);
        let b = burst_from(&m.client_ns, dst, false, 100, REQ_TIMEOUT);
        check_all(&format!("node port of {} ({dst})", n.name), &b, 100, &ALL)
            .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    }
    for d in &mut daemons {
        assert!(d.is_running(), "a daemon exited{}", m.ctx());
    }
}

#[test]
fn a_bridge_created_after_start_is_attached_and_its_task_answers_within_2s() {
    let m = Mesh::new("b");
    let n = m.nodes[0].clone();
    let late_ns = format!("{}-late", m.prefix);
    let _ns = NsGuard(late_ns.clone());
    let br = format!("{}lb", m.short);
    let host = format!("{}lh", m.short);
    let task = format!("{}lt", m.short);
    // The task exists first (a container whose network is being set up):
    // its veth end on the node waits, unbridged, for the bridge.
    must(&["ip", "netns", "add", &late_ns]);
    must(&[
        "ip", "-n", &n.ns, "link", "add", &host, "type", "veth", "peer", "name", &task, "netns",
        &late_ns,
    ]);
    must(&[
        "ip",
        "-n",
        &late_ns,
        "addr",
        "add",
        "10.231.0.2/24",
        "dev",
        &task,
    ]);
    for (ns, i) in [(&late_ns, task.as_str()), (&late_ns, "lo")] {
        must(&["ip", "-n", ns, "link", "set", i, "up"]);
    }
    must(&[
        "ip",
        "-n",
        &late_ns,
        "route",
        "add",
        "default",
        "via",
        "10.231.0.1",
    ]);
    let mut server = start_nginx_in(
        &m.dir.join("late-nginx"),
        &late_ns,
        "late",
        m.dir.join("late-nginx.log"),
    );
    let cfg = m.write_file(
        "meshlb.toml",
        r#"
[[service]]
name = "late"
vip = "10.96.0.20"
publish = [{ proto = "tcp", port = 80, target = 8000 }]

[[service.backend]]
addr = "10.231.0.2"
"#,
    );
    let c = cfg.display().to_string();
    let mut d = m.start_daemon_ifaces(0, &["--config", &c], &[&n.eth]);
    let started = Instant::now();
    m.wait_ready(0, &mut d, &["late"]);
    let st = m.try_status(0).unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    assert!(
        !interfaces(&st).contains_key(&br),
        "{br} attached before it exists: {st}"
    );
    thread::sleep(Duration::from_secs(5).saturating_sub(started.elapsed()));
    let created = Instant::now();
    must(&["ip", "-n", &n.ns, "link", "add", &br, "type", "bridge"]);
    must(&[
        "ip",
        "-n",
        &n.ns,
        "addr",
        "add",
        "10.231.0.1/24",
        "dev",
        &br,
    ]);
    must(&["ip", "-n", &n.ns, "link", "set", &br, "up"]);
    must(&["ip", "-n", &n.ns, "link", "set", &host, "master", &br]);
    must(&["ip", "-n", &n.ns, "link", "set", &host, "up"]);
    let setup = created.elapsed();
    let vip: SocketAddr = "10.96.0.20:80".parse().unwrap();
    let deadline = created + Duration::from_secs(10);
    let mut last = String::new();
    let answered = loop {
        match m.client(|| http_get(vip, Duration::from_millis(300))) {
            Ok(body) if body == "late" => break Some(created.elapsed()),
            Ok(other) => last = format!("answered {other:?}"),
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let took = answered.unwrap_or_else(|| {
        panic!(
            "the task behind {br} never answered through the VIP (last: {last}){}",
            m.ctx()
        )
    });
    eprintln!("bridge set up in {setup:?}; first answer {took:?} after its creation");
    assert!(
        took <= Duration::from_secs(2),
        "first answer {took:?} after the bridge was created (setup took {setup:?}){}",
        m.ctx()
    );
    assert!(d.is_running(), "the daemon restarted or exited{}", m.ctx());
    let st = m.try_status(0).unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    let ifs = interfaces(&st);
    let (role, mode, why) = ifs
        .get(&br)
        .unwrap_or_else(|| panic!("{br} not listed: {st}"));
    assert_eq!((role.as_str(), mode.as_str()), ("task", "tc"), "{br}");
    assert_eq!(why, "local backend 10.231.0.2 of service late", "{br}");
    let b = burst_from(&m.client_ns, vip, false, 100, REQ_TIMEOUT);
    check_all("VIP after the late bridge", &b, 100, &["late"])
        .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    server.signal(Signal::SIGKILL);
    server.wait_exit(Duration::from_secs(10));
}

#[test]
fn sighup_with_a_changed_interface_list_attaches_and_detaches_without_restart() {
    let m = Mesh::new("h");
    let n = m.nodes[0].clone();
    let extra = format!("{}x0", m.short);
    let peer = format!("{}x1", m.short);
    must(&[
        "ip", "-n", &n.ns, "link", "add", &extra, "type", "veth", "peer", "name", &peer,
    ]);
    for i in [&extra, &peer] {
        must(&["ip", "-n", &n.ns, "link", "set", i, "up"]);
    }
    let with = |ifaces: &[&str]| {
        let list: Vec<String> = ifaces.iter().map(|i| format!("{i:?}")).collect();
        format!("interfaces = [{}]\n{}", list.join(", "), config(&m, &ALL))
    };
    let cfg = m.write_file("meshlb.toml", &with(&[&n.eth]));
    let c = cfg.display().to_string();
    // No --iface: the config's list rules, and SIGHUP may change it.
    let mut d = m.start_daemon_ifaces(0, &["--config", &c], &[]);
    m.wait_ready(0, &mut d, &SERVICES);
    let pid = d.pid();
    let attached = |name: &str| -> Option<(String, String, String)> {
        m.try_status(0)
            .ok()
            .and_then(|st| interfaces(&st).get(name).cloned())
    };
    assert_eq!(
        attached(&extra),
        None,
        "{extra} attached before it is listed"
    );
    assert_eq!(xdp_mode(&n.ns, &extra), None);

    m.write_file("meshlb.toml", &with(&[&n.eth, &extra]));
    d.signal(Signal::SIGHUP);
    wait_for(
        Duration::from_secs(5),
        &format!("{extra} attached"),
        || match (attached(&extra), xdp_mode(&n.ns, &extra)) {
            (Some((role, _, why)), Some(_)) if role == "uplink" && why == "listed" => Ok(()),
            other => Err(format!("status/XDP: {other:?}")),
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let b = burst_from(&m.client_ns, vip, false, 100, REQ_TIMEOUT);
    check_all("VIP after SIGHUP added an uplink", &b, 100, &ALL)
        .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));

    m.write_file("meshlb.toml", &with(&[&n.eth]));
    d.signal(Signal::SIGHUP);
    wait_for(
        Duration::from_secs(5),
        &format!("{extra} detached"),
        || match (attached(&extra), xdp_mode(&n.ns, &extra)) {
            (None, None) => Ok(()),
            other => Err(format!("status/XDP: {other:?}")),
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    assert!(attached(&n.eth).is_some(), "{} detached too", n.eth);
    assert!(xdp_mode(&n.ns, &n.eth).is_some(), "XDP left {}", n.eth);
    assert!(d.is_running() && d.pid() == pid, "the daemon restarted");
    let log = m.log_text(0);
    assert!(
        !log.contains("interfaces changed in the config: takes effect"),
        "SIGHUP called the interface change restart-only:\n{log}"
    );
    let b = burst_from(&m.client_ns, vip, false, 100, REQ_TIMEOUT);
    check_all("VIP after SIGHUP removed the uplink", &b, 100, &ALL)
        .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
}

#[test]
fn an_entry_deleted_behind_the_daemons_back_is_repaired_by_the_periodic_reconcile() {
    let m = Mesh::new("r");
    let cfg = m.write_file(
        "meshlb.toml",
        &format!("reconcile_interval = \"2s\"\n{}", config(&m, &ALL)),
    );
    let mut d = m.start_daemon(0, &cfg);
    m.wait_ready(0, &mut d, &SERVICES);
    let vip: SocketAddr = format!("{VIP4}:80").parse().unwrap();
    // 100 flows: with 20, one of four backends got none about once in 80 runs.
    let b = burst_from(&m.client_ns, vip, false, 100, REQ_TIMEOUT);
    check_all("VIP before the deletion", &b, 100, &ALL)
        .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));

    // Delete the VIP's frontend entry behind the daemon's back.
    let dir = m.bpffs(&m.nodes[0]);
    let vip_keys = |maps: &meshlb::kernel::pinned::Maps| -> Vec<meshlb_common::FrontendKey> {
        maps.frontends
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.family == meshlb_common::FAMILY_V4 && k.addr[..4] == [10, 96, 0, 10])
            .filter(|k| u16::from_be(k.port) == 80)
            .collect()
    };
    let mut maps =
        meshlb::kernel::pinned::Maps::from_pins(&dir).unwrap_or_else(|e| panic!("pins: {e}"));
    let keys = vip_keys(&maps);
    assert_eq!(keys.len(), 1, "the VIP's frontend entry: {keys:?}");
    maps.frontends
        .remove(&keys[0])
        .unwrap_or_else(|e| panic!("delete: {e}"));
    let deleted = Instant::now();
    assert!(vip_keys(&maps).is_empty(), "the entry is still there");
    wait_for(Duration::from_secs(5), "the entry repaired", || {
        if vip_keys(&maps).len() == 1 {
            Ok(())
        } else {
            Err("still missing".to_string())
        }
    })
    .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    let took = deleted.elapsed();
    eprintln!("repaired {took:?} after the deletion (reconcile_interval 2s)");
    // One period, plus the time a loaded machine takes to get to it.
    assert!(
        took <= Duration::from_millis(4500),
        "repaired only after {took:?}{}",
        m.ctx()
    );
    let b = burst_from(&m.client_ns, vip, false, 100, REQ_TIMEOUT);
    check_all("VIP after the repair", &b, 100, &ALL).unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    let log = m.log_text(0);
    assert!(
        log.contains("reconcile: the kernel differed from the desired state"),
        "the repair was not logged:\n{log}"
    );
}

/// The XDP data plane's service table holds this many.
const MAX_SERVICES: usize = meshlb_common::MAX_SERVICES as usize;

/// `n` services `s00000`.., each publishing its own TCP port (20000 + i)
/// with one backend, t1 (and t2 too for those in `two`).
fn many_services(m: &Mesh, n: usize, two: &[usize]) -> String {
    let t1 = m.task("t1").v4;
    let t2 = m.task("t2").v4;
    let mut s = String::with_capacity(n * 160);
    for i in 0..n {
        s += &format!(
            "[[service]]\nname = \"s{i:05}\"\npublish = [{{ proto = \"tcp\", port = {}, target = 8000 }}]\n[[service.backend]]\naddr = \"{t1}\"\nnode = \"n1\"\n",
            20000 + i
        );
        if two.contains(&i) {
            s += &format!("[[service.backend]]\naddr = \"{t2}\"\nnode = \"n1\"\n");
        }
    }
    s
}

#[test]
fn a_service_over_the_table_limit_is_rejected_alone_and_the_others_keep_applying() {
    let m = Mesh::new("x");
    let n = MAX_SERVICES + 1;
    let cfg = m.write_file("meshlb.toml", &many_services(&m, n, &[]));
    let mut d = m.start_daemon(0, &cfg);
    let last = format!("s{:05}", n - 1);
    let first = "s00000";
    let t0 = Instant::now();
    let names = |st: &Value| -> std::collections::BTreeSet<String> {
        st["services"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s["name"].as_str().map(str::to_string))
            .collect()
    };
    // The first sync of 10,240 services takes a while.
    wait_for(
        Duration::from_secs(240),
        "10240 services programmed",
        || {
            if let Some(st) = d.exit_status() {
                return Err(format!("daemon exited: {st}"));
            }
            let st = m.try_status(0)?;
            let got = names(&st);
            // The rejection is logged when the sync is done.
            let logged = d
                .log_text()
                .contains("does not fit the data plane's tables");
            if got.len() == MAX_SERVICES && logged {
                Ok(())
            } else {
                Err(format!(
                    "{} services, rejection logged: {logged}",
                    got.len()
                ))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    eprintln!("{} services programmed in {:?}", MAX_SERVICES, t0.elapsed());
    let st = m.try_status(0).unwrap_or_else(|e| panic!("{e}"));
    let got = names(&st);
    assert!(!got.contains(&last), "{last} programmed beyond the limit");
    assert!(got.contains(first));
    let log = m.log_text(0);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("does not fit the data plane's tables"))
        .collect();
    assert_eq!(lines.len(), 1, "want one line for {last}: {lines:?}");
    assert!(lines[0].contains(&last), "{}", lines[0]);
    // Its port is not taken; the others forward.
    let ok = |port: u16| {
        let dst = SocketAddr::new(m.nodes[0].v4.into(), port);
        m.client(|| http_get(dst, Duration::from_secs(2)))
    };
    assert_eq!(ok(20000).as_deref(), Ok("t1"), "s00000");
    assert_eq!(
        ok(20000 + MAX_SERVICES as u16 - 1).as_deref(),
        Ok("t1"),
        "the 10240th"
    );
    assert!(ok(20000 + MAX_SERVICES as u16).is_err(), "{last} answered");

    // A later change to another service still applies (SIGHUP: s00007
    // gets t2 too); the rejected one stays out.
    m.write_file("meshlb.toml", &many_services(&m, n, &[7]));
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(120), "s00007 with two backends", || {
        let st = m.try_status(0)?;
        let s7 = st["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "s00007"))
            .cloned()
            .ok_or("no s00007")?;
        match s7["backends"].as_array().map(Vec::len) {
            Some(2) => Ok(()),
            other => Err(format!("s00007 backends: {other:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    let b = burst_from(
        &m.client_ns,
        SocketAddr::new(m.nodes[0].v4.into(), 20007),
        false,
        40,
        REQ_TIMEOUT,
    );
    check_all("s00007 after the change", &b, 40, &["t1", "t2"])
        .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    let log = m.log_text(0);
    let n_lines = log
        .lines()
        .filter(|l| l.contains("does not fit the data plane's tables"))
        .count();
    assert_eq!(n_lines, 1, "the rejection was logged again");
    let metrics = in_netns(&m.nodes[0].ns, || {
        http_get_path(
            "127.0.0.1:9742".parse().unwrap(),
            "/metrics",
            Duration::from_secs(5),
        )
    })
    .unwrap_or_else(|e| panic!("metrics: {e}"));
    assert!(
        metrics
            .lines()
            .any(|l| l == "meshlb_config_errors_total{kind=\"table_limit\"} 1"),
        "no table_limit error counted:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("config_errors"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(d.is_running(), "daemon exited{}", m.ctx());
}
