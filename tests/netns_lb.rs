//! End-to-end load balancing through `meshlb run` in private network
//! namespaces: native and generic XDP, VIP and node-port frontends, IPv4 and
//! IPv6, TCP and UDP, backend removal on SIGHUP, and `explain` agreeing with
//! the data plane. Needs root; see `common` for the topology.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const WEB_VIP: &str = "10.96.0.10:80";
/// web6 publishes 81: frontends are per port, whatever the family, and 80 is web's.
const WEB6_VIP: &str = "[fd00:96::10]:81";
const WEB6_NODE_PORT: &str = "[fd00:200::1]:81";
const ECHO_VIP: &str = "10.96.0.11:9000";
const NODE_PORT: &str = "10.200.0.1:80";
const UDP_PORT: u16 = 9000;
const REQ_TIMEOUT: Duration = Duration::from_secs(3);
const READY: Duration = Duration::from_secs(30);

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// web (v4 VIP + node port), echo (UDP), and optionally web6 (v6 VIP), each
/// over every backend except those named in `skip`.
fn lb_config(topo: &Topology, v6: bool, skip: &[&str]) -> String {
    let live: Vec<&Backend> = topo
        .backends
        .iter()
        .filter(|b| !skip.contains(&b.name.as_str()))
        .collect();
    let v4s: Vec<IpAddr> = live.iter().map(|b| b.v4.into()).collect();
    let mut svcs = vec![
        Svc {
            name: "web",
            vip: Some("10.96.0.10"),
            proto: "tcp",
            port: 80,
            target: HTTP_PORT,
            backends: v4s.clone(),
        },
        Svc {
            name: "echo",
            vip: Some("10.96.0.11"),
            proto: "udp",
            port: UDP_PORT,
            target: UDP_PORT,
            backends: v4s,
        },
    ];
    if v6 {
        svcs.push(Svc {
            name: "web6",
            vip: Some("fd00:96::10"),
            proto: "tcp",
            port: 81,
            target: HTTP_PORT,
            backends: live.iter().map(|b| b.v6.into()).collect(),
        });
    }
    config_toml(&svcs)
}

/// Backends, servers and warm neighbour caches; XDP pass programs on the
/// peers for native mode.
fn prepared(tag: &str, native: bool) -> Topology {
    let topo = Topology::new(tag, TopoOpts { backends: 3 });
    topo.start_nginx();
    topo.start_udp_echo(UDP_PORT);
    topo.warm_up(Some(UDP_PORT));
    if native {
        topo.xdp_pass_peers();
    }
    topo
}

fn assert_backend_counters(topo: &Topology, service: &str) {
    let st = topo.status();
    let svc = st["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == service))
        .unwrap_or_else(|| panic!("service {service} missing from status: {st}"));
    let backends = svc["backends"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        backends.len(),
        topo.backends.len(),
        "status backends of {service}: {svc}"
    );
    for b in backends {
        assert_eq!(b["state"], "up", "{service}: {b}");
        assert!(
            b["packets"].as_u64().unwrap_or(0) > 0 && b["bytes"].as_u64().unwrap_or(0) > 0,
            "{service}: backend counters did not move: {b}"
        );
    }
}

#[test]
fn harness_forwards_without_meshlb() {
    let (namespaces, dir, bpffs);
    {
        let topo = Topology::new("hf", TopoOpts { backends: 2 });
        topo.start_nginx();
        topo.start_udp_echo(UDP_PORT);
        topo.client(|| {
            for b in &topo.backends {
                for dst in [b.http_v4(), b.http_v6()] {
                    assert_eq!(http_get(dst, REQ_TIMEOUT).unwrap(), b.name, "GET {dst}");
                }
                for ip in [IpAddr::from(b.v4), IpAddr::from(b.v6)] {
                    let dst = SocketAddr::new(ip, UDP_PORT);
                    assert_eq!(udp_request(dst, b"hi", REQ_TIMEOUT).unwrap(), b.name);
                }
                // The keep-alive helper keeps one connection for many requests.
                let mut ka = KeepAlive::open(b.http_v4(), REQ_TIMEOUT).unwrap();
                let port = ka.local.port();
                assert!(
                    (CLIENT_PORT_RANGE.0..=CLIENT_PORT_RANGE.1).contains(&port),
                    "client ephemeral port {port} outside the configured range"
                );
                for _ in 0..3 {
                    assert_eq!(ka.get().unwrap(), b.name);
                }
                // A fixed source port works (and can be reused right away).
                let src = SocketAddr::new(CLIENT_V4.into(), 41234);
                for _ in 0..2 {
                    assert_eq!(
                        http_get_from(Some(src), b.http_v4(), REQ_TIMEOUT).unwrap(),
                        b.name
                    );
                }
            }
        });
        // Sockets keep their namespace: one made in the client ns is usable here.
        let mut ka = topo
            .client(|| KeepAlive::open(topo.backends[0].http_v6(), REQ_TIMEOUT))
            .unwrap();
        assert_eq!(ka.get().unwrap(), "b1");
        // Nothing answers on the VIP without meshlb.
        let b = topo.http_burst(sa(WEB_VIP), 1, Duration::from_millis(500));
        assert_eq!(
            b.failures.len(),
            1,
            "VIP answered without a load balancer: {b:?}"
        );
        assert!(topo.xdp_mode(&topo.lb_ns, &topo.lb_client_iface).is_none());
        namespaces = vec![
            topo.client_ns.clone(),
            topo.lb_ns.clone(),
            topo.backends[1].ns.clone(),
        ];
        dir = topo.dir.clone();
        bpffs = topo.bpffs_root.clone();
        assert!(bpffs.is_dir() && dir.is_dir());
    }
    for ns in namespaces {
        assert!(
            !std::path::Path::new("/run/netns").join(&ns).exists(),
            "namespace {ns} survived teardown"
        );
    }
    assert!(!dir.exists(), "{} survived teardown", dir.display());
    assert!(!bpffs.exists(), "{} survived teardown", bpffs.display());
}

#[test]
fn native_xdp_balances_vip_nodeport_v6_and_udp() {
    let topo = prepared("nat", true);
    let cfg = topo.write_file("meshlb.toml", &lb_config(&topo, true, &[]));
    let mut daemon = topo.start_daemon(&cfg, "native");
    let st = topo.wait_ready(&mut daemon, &["web", "web6", "echo"], READY);
    assert_eq!(st["dataplane"], "xdp-native", "status: {st}{}", topo.ctx());
    for i in topo.lb_ifaces() {
        assert_eq!(
            topo.xdp_mode(&topo.lb_ns, &i).as_deref(),
            Some("native"),
            "{i}"
        );
    }
    let names = topo.backend_names();

    let b = topo.http_burst(sa(WEB_VIP), 300, REQ_TIMEOUT);
    topo.assert_spread("HTTP via VIP 10.96.0.10:80", &b, &names, 0.2);
    let b = topo.http_burst(sa(NODE_PORT), 300, REQ_TIMEOUT);
    topo.assert_spread("HTTP via node port 10.200.0.1:80", &b, &names, 0.2);
    let b = topo.http_burst(sa(WEB6_VIP), 300, REQ_TIMEOUT);
    topo.assert_spread("HTTP via VIP [fd00:96::10]:81", &b, &names, 0.2);
    let b = topo.http_burst(sa(WEB6_NODE_PORT), 300, REQ_TIMEOUT);
    topo.assert_spread("HTTP via node port [fd00:200::1]:81", &b, &names, 0.2);
    let b = topo.udp_burst(sa(ECHO_VIP), 300, REQ_TIMEOUT);
    topo.assert_spread("UDP via VIP 10.96.0.11:9000", &b, &names, 0.2);

    assert_backend_counters(&topo, "web");
    assert_backend_counters(&topo, "web6");
    assert_backend_counters(&topo, "echo");
    assert!(daemon.is_running(), "daemon died{}", topo.ctx());
}

#[test]
fn generic_xdp_balances_vip_nodeport_and_udp() {
    // No XDP on the peers: generic mode must not need it.
    let topo = prepared("gen", false);
    let cfg = topo.write_file("meshlb.toml", &lb_config(&topo, false, &[]));
    let mut daemon = topo.start_daemon(&cfg, "generic");
    let st = topo.wait_ready(&mut daemon, &["web", "echo"], READY);
    assert_eq!(st["dataplane"], "xdp-generic", "status: {st}{}", topo.ctx());
    for i in topo.lb_ifaces() {
        assert_eq!(
            topo.xdp_mode(&topo.lb_ns, &i).as_deref(),
            Some("generic"),
            "{i}"
        );
    }
    let names = topo.backend_names();

    let b = topo.http_burst(sa(WEB_VIP), 300, REQ_TIMEOUT);
    topo.assert_spread("HTTP via VIP 10.96.0.10:80", &b, &names, 0.2);
    let b = topo.http_burst(sa(NODE_PORT), 300, REQ_TIMEOUT);
    topo.assert_spread("HTTP via node port 10.200.0.1:80", &b, &names, 0.2);
    let b = topo.udp_burst(sa(ECHO_VIP), 300, REQ_TIMEOUT);
    topo.assert_spread("UDP via VIP 10.96.0.11:9000", &b, &names, 0.2);

    assert_backend_counters(&topo, "web");
    assert!(daemon.is_running(), "daemon died{}", topo.ctx());
}

#[test]
/// A backend removed from the config (no drain): its established TCP
/// flows are reset at their next packet, so their clients learn at once
/// (SPEC "Flow state"), and every other flow keeps its backend.
fn sighup_removes_backend_resets_its_flows_and_keeps_the_others() {
    let topo = prepared("hup", true);
    let cfg = topo.write_file("meshlb.toml", &lb_config(&topo, false, &[]));
    let mut daemon = topo.start_daemon(&cfg, "native");
    topo.wait_ready(&mut daemon, &["web", "echo"], READY);

    // Long-lived connections, until at least two landed on b2 (and some elsewhere).
    let mut conns: Vec<(KeepAlive, String)> = topo.client(|| {
        let mut v = Vec::new();
        while v.len() < 40 {
            let mut ka = KeepAlive::open(sa(WEB_VIP), REQ_TIMEOUT)
                .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
            let who = ka.get().unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
            v.push((ka, who));
            let on_b2 = v.iter().filter(|(_, w)| w == "b2").count();
            if v.len() >= 8 && on_b2 >= 2 && on_b2 < v.len() {
                break;
            }
        }
        v
    });
    let on_b2 = conns.iter().filter(|(_, w)| w == "b2").count();
    assert!(
        on_b2 >= 1,
        "no connection of {} reached b2{}",
        conns.len(),
        topo.ctx()
    );

    // Reload without b2 (and with a table size, which only a restart
    // applies: the reload says so).
    topo.write_file(
        "meshlb.toml",
        &format!(
            "{}\n[conntrack]\nmax_flows = 131072\n",
            lb_config(&topo, false, &["b2"])
        ),
    );
    daemon.signal(Signal::SIGHUP);
    let b2 = topo.backend("b2").v4.to_string();
    wait_for(Duration::from_secs(15), "b2 to leave service web", || {
        let st = topo.try_status()?;
        let web = st["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "web"))
            .ok_or_else(|| format!("no web: {st}"))?;
        let still_up = web["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|b| b["addr"] == b2.as_str() && b["state"] == "up");
        if still_up {
            Err(format!("b2 still up: {web}"))
        } else {
            Ok(())
        }
    })
    .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
    assert!(daemon.is_running(), "daemon died on SIGHUP{}", topo.ctx());
    wait_for(
        Duration::from_secs(5),
        "the reload to name max_flows",
        || {
            let log = daemon.log_text();
            log.lines()
                .find(|l| {
                    l.contains("SIGHUP: conntrack.max_flows changed") && l.contains("next start")
                })
                .map(|_| ())
                .ok_or_else(|| "no line naming conntrack.max_flows".to_string())
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));

    let b = topo.http_burst(sa(WEB_VIP), 100, REQ_TIMEOUT);
    topo.assert_spread(
        "new HTTP connections after removing b2",
        &b,
        &["b1".to_string(), "b3".to_string()],
        0.2,
    );

    let resets_of = || {
        topo.try_status().map_or_else(
            |e| panic!("status: {e}{}", topo.ctx()),
            |st| st["counters"]["reset"].as_u64().unwrap_or(0),
        )
    };
    let resets_before = resets_of();
    for (ka, before) in &mut conns {
        let t = std::time::Instant::now();
        let now = ka.get();
        if before == "b2" {
            // Answered by a reset, well before the request timeout.
            assert!(
                now.is_err() && t.elapsed() < REQ_TIMEOUT / 2,
                "established flow {} to removed b2: {now:?} after {:?}, want a reset at once{}",
                ka.local,
                t.elapsed(),
                topo.ctx()
            );
            continue;
        }
        let now =
            now.unwrap_or_else(|e| panic!("established flow to {before} broke: {e}{}", topo.ctx()));
        assert_eq!(
            &now,
            before,
            "established connection {} moved backends after reload{}",
            ka.local,
            topo.ctx()
        );
    }
    let resets = resets_of() - resets_before;
    assert!(
        resets >= on_b2 as u64,
        "reset counter moved by {resets}, want at least {on_b2} (the flows to b2){}",
        topo.ctx()
    );
}

#[test]
fn explain_names_the_backend_the_data_plane_uses() {
    let topo = prepared("exp", true);
    let cfg = topo.write_file("meshlb.toml", &lb_config(&topo, false, &[]));
    let mut daemon = topo.start_daemon(&cfg, "native");
    topo.wait_ready(&mut daemon, &["web", "echo"], READY);
    let vip = sa(WEB_VIP);
    let from = |port: u16| SocketAddr::new(CLIENT_V4.into(), port);
    let backend_of = |v: &serde_json::Value| -> String {
        let addr = v["backend"]
            .as_str()
            .and_then(parse_sockaddr)
            .unwrap_or_else(|| panic!("explain backend is not ip:port: {v}"));
        assert_eq!(addr.port(), HTTP_PORT, "explain: {v}");
        topo.backend_by_ip(addr.ip())
            .unwrap_or_else(|| panic!("explain names an unknown backend: {v}"))
            .name
            .clone()
    };

    // An established flow: conntrack knows where it went.
    let src = from(41234);
    let mut ka = topo
        .client(|| KeepAlive::open_from(Some(src), vip, REQ_TIMEOUT))
        .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
    let answered = ka.get().unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
    let v = topo.explain("tcp", src, vip);
    assert_eq!(v["reason"], "conntrack", "explain for an open flow: {v}");
    assert_eq!(v["service"], "web", "{v}");
    assert_eq!(v["frontend"], "10.96.0.10:80/tcp", "{v}");
    assert_eq!(
        backend_of(&v),
        answered,
        "explain disagrees with who answered: {v}"
    );
    // Once closed, the tuple may be forgotten, but still maps to the same backend.
    drop(ka);
    std::thread::sleep(Duration::from_millis(200));
    let v = topo.explain("tcp", src, vip);
    assert_eq!(backend_of(&v), answered, "explain after close: {v}");

    // Flows never seen: Maglev's prediction must be what then happens.
    let mut predicted = Vec::new();
    for port in 41300..41306 {
        let src = from(port);
        let v = topo.explain("tcp", src, vip);
        assert_eq!(v["reason"], "maglev", "explain for unused {src}: {v}");
        assert!(v["slot"].is_u64(), "maglev answer without slot: {v}");
        let want = backend_of(&v);
        let mut ka = topo
            .client(|| KeepAlive::open_from(Some(src), vip, REQ_TIMEOUT))
            .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
        let got = ka.get().unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
        assert_eq!(
            got, want,
            "explain predicted {want} for {src}, {got} answered: {v}"
        );
        let open = topo.explain("tcp", src, vip);
        assert_eq!(open["reason"], "conntrack", "{open}");
        assert_eq!(backend_of(&open), want, "{open}");
        predicted.push(want);
    }
    eprintln!("maglev predictions for ports 41300..41306: {predicted:?}");

    let v = topo.explain("tcp", from(41400), sa("10.96.0.99:80"));
    assert_eq!(
        v["reason"], "no-service",
        "explain for a non-service address: {v}"
    );
    assert!(daemon.is_running(), "daemon died{}", topo.ctx());
}

#[test]
/// A client reuses its source port towards another frontend of the same
/// backend (node port, then VIP) while that backend still holds the first
/// connection in TIME_WAIT: the backend may answer the new SYN with the
/// old connection's ACK, which must come back from the VIP (the client's
/// RST then ends the TIME_WAIT and its SYN retransmit connects). Sent out
/// untranslated, the connect timed out.
fn a_client_port_reused_across_frontends_of_one_backend_connects() {
    let topo = prepared("reu", true);
    let cfg = topo.write_file("meshlb.toml", &lb_config(&topo, false, &["b2", "b3"]));
    let mut daemon = topo.start_daemon(&cfg, "native");
    topo.wait_ready(&mut daemon, &["web", "echo"], READY);
    // As in a real cluster, the client cannot reach the backends' network
    // itself: only what comes back from a frontend reaches it.
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            &topo.client_ns,
            "route",
            "replace",
            "blackhole",
            "10.201.0.0/16",
        ])
        .output()
        .unwrap_or_else(|e| panic!("ip route: {e}"));
    assert!(out.status.success(), "ip route: {out:?}");
    // Outside the client's ephemeral range: no other connection uses them.
    let srcs: Vec<SocketAddr> = (0..16)
        .map(|i| SocketAddr::new(CLIENT_V4.into(), 45000 + i))
        .collect();
    let round = |dst: &str| -> Vec<String> {
        topo.client(|| {
            srcs.iter()
                .filter_map(|src| {
                    http_get_from(Some(*src), sa(dst), REQ_TIMEOUT)
                        .err()
                        .map(|e| format!("{src} -> {dst}: {e}"))
                })
                .collect()
        })
    };
    let failed = round(NODE_PORT);
    assert!(
        failed.is_empty(),
        "via the node port: {failed:?}{}",
        topo.ctx()
    );
    // The situation under test: b1 holds those connections in TIME_WAIT.
    let b1 = topo.backend("b1");
    let tw = in_netns(&b1.ns, || {
        std::process::Command::new("ss")
            .args(["-Htan", "state", "time-wait"])
            .output()
            .map_or_else(
                |e| panic!("ss: {e}"),
                |o| String::from_utf8_lossy(&o.stdout).into_owned(),
            )
    });
    let waiting = srcs
        .iter()
        .filter(|s| tw.contains(&format!("{}:{}", CLIENT_V4, s.port())))
        .count();
    assert_eq!(waiting, srcs.len(), "b1's TIME_WAIT sockets: {tw}");
    let failed = round(WEB_VIP);
    assert!(
        failed.is_empty(),
        "{} of {} connects from a reused port failed: {failed:?}{}",
        failed.len(),
        srcs.len(),
        topo.ctx()
    );
}

#[test]
/// A listed interface that does not exist yet (a bridge dockerd creates
/// after the daemon started at boot) is waited for and logged, not an
/// error: nothing is attached meanwhile, and once it appears the daemon
/// starts and forwards, without a restart.
fn a_listed_interface_that_appears_later_is_waited_for() {
    let topo = prepared("late", false);
    let cfg = topo.write_file("meshlb.toml", &lb_config(&topo, false, &[]));
    let late = format!("mlbl{}", std::process::id() % 100_000);
    let mut ifaces = topo.lb_ifaces();
    ifaces.push(late.clone());
    let refs: Vec<&str> = ifaces.iter().map(String::as_str).collect();
    let mut daemon = topo.start_daemon_on(&cfg, "generic", &refs);
    wait_for(Duration::from_secs(10), "the wait to be logged", || {
        let log = daemon.log_text();
        if log.contains(&format!("iface {late}: does not exist yet")) {
            Ok(())
        } else {
            Err(format!("no line about {late}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        daemon.is_running(),
        "daemon exited while waiting{}",
        topo.ctx()
    );
    let iface = &topo.lb_client_iface;
    assert_eq!(
        topo.xdp_mode(&topo.lb_ns, iface),
        None,
        "{iface} attached before every listed interface existed"
    );
    let out = std::process::Command::new("ip")
        .args(["-n", &topo.lb_ns, "link", "add", &late, "type", "bridge"])
        .output()
        .unwrap_or_else(|e| panic!("ip link add: {e}"));
    assert!(out.status.success(), "ip link add {late}: {out:?}");
    let appeared = std::time::Instant::now();
    topo.wait_ready(&mut daemon, &["web", "echo"], READY);
    eprintln!("ready {:?} after {late} appeared", appeared.elapsed());
    let b = topo.http_burst(sa(WEB_VIP), 30, REQ_TIMEOUT);
    topo.assert_spread(
        "VIP after the late interface appeared",
        &b,
        &topo.backend_names(),
        0.1,
    );
}
