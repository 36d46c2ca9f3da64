//! The DNS view (issue 22, SPEC.md "DNS"), checked with `dig`, a real
//! client, from the client namespace against `meshlb run --dns` in the LB
//! namespace of a `common::Topology` (three nginx backends):
//!
//! - `web.meshlb` A (the VIP), `web6.meshlb` AAAA, `tasks.web.meshlb` A,
//!   `_80._tcp.web.meshlb` SRV (on the VIP), `api.meshlb` (no VIP: its
//!   tasks) and `_8080._tcp.api.meshlb` SRV (each task's port and weight,
//!   targets that resolve), over UDP and TCP: exact answers;
//! - a known name without the type (NODATA) and an unknown one (NXDOMAIN),
//!   both with the SOA (minimum 5 s); `example.com`: REFUSED;
//! - a task whose health check fails is gone from `tasks.web.meshlb` as
//!   soon as `status` shows it down; a drained one (weight 0, SIGHUP) too;
//! - malformed queries (shorter than a header, a question promised but
//!   missing, a compression loop, class CH, two questions) get FORMERR or
//!   nothing, and the server answers on;
//! - a burst of 10,000 queries (64 in flight) is answered in full while
//!   100 requests go through the VIP, all answered: the summary reports
//!   queries/s;
//! - `/metrics` counts queries by response code.
//!
//! Needs root and `dig` (bind9-dnsutils, installed by `cargo xtask
//! test`); never skips.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const READY: Duration = Duration::from_secs(30);
/// Where the daemon serves DNS: the LB's address facing the client.
const DNS: &str = "10.200.0.1";
const HC_INTERVAL_MS: u64 = 500;

/// web (VIP, health-checked), web6 (v6 VIP), api (no VIP, weights 30 and
/// 70 on b1 and b2; b3 at `api_b3_weight`), DNS on `DNS`:53.
fn config(topo: &Topology, api_b3_weight: u32) -> String {
    let b = |n: &str| topo.backend(n);
    let mut s = format!(
        "node = \"lb\"\n\n[dns]\nlisten = [\"{DNS}:53\"]\n\n\
         [[service]]\nname = \"web\"\nvip = \"10.96.0.10\"\n\
         publish = [{{ proto = \"tcp\", port = 80, target = {HTTP_PORT} }}]\n\
         health = {{ kind = \"http\", path = \"/\", interval_ms = {HC_INTERVAL_MS}, timeout_ms = 250, rise = 1, fall = 2 }}\n"
    );
    for n in ["b1", "b2", "b3"] {
        s += &format!("\n[[service.backend]]\naddr = \"{}\"\n", b(n).v4);
    }
    s += &format!(
        "\n[[service]]\nname = \"web6\"\nvip = \"fd00:96::10\"\n\
         publish = [{{ proto = \"tcp\", port = 81, target = {HTTP_PORT} }}]\n"
    );
    for n in ["b1", "b2", "b3"] {
        s += &format!("\n[[service.backend]]\naddr = \"{}\"\n", b(n).v6);
    }
    s += &format!(
        "\n[[service]]\nname = \"api\"\n\
         publish = [{{ proto = \"tcp\", port = 8080, target = {HTTP_PORT} }}]\n"
    );
    for (n, w) in [("b1", 30), ("b2", 70), ("b3", api_b3_weight)] {
        s += &format!(
            "\n[[service.backend]]\naddr = \"{}\"\nweight = {w}\n",
            b(n).v4
        );
    }
    s
}

/// `dig @DNS NAME TYPE` (+tcp) in the client namespace: the status and
/// the answer and authority sections' records (one line each, TTL
/// dropped, sorted).
struct Dig {
    status: String,
    answers: Vec<String>,
    authority: Vec<String>,
}

fn dig(topo: &Topology, name: &str, rtype: &str, tcp: bool) -> Dig {
    let server = format!("@{DNS}");
    let mut argv = vec![
        "ip",
        "netns",
        "exec",
        &topo.client_ns,
        "dig",
        &server,
        name,
        rtype,
        "+norecurse",
        "+time=2",
        "+tries=2",
    ];
    if tcp {
        argv.push("+tcp");
    }
    let out = run_cmd(&argv, Duration::from_secs(15));
    assert!(out.success(), "dig {name} {rtype}: {}", out.describe());
    let text = out.stdout;
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|r| r.split(',').next())
        .unwrap_or("?")
        .to_string();
    let section = |title: &str| -> Vec<String> {
        let mut v: Vec<String> = text
            .split(title)
            .nth(1)
            .map(|rest| {
                rest.lines()
                    .skip(1)
                    .take_while(|l| !l.trim().is_empty())
                    .map(|l| {
                        // name TTL class type data...: drop the TTL.
                        let f: Vec<&str> = l.split_whitespace().collect();
                        let mut g = f.clone();
                        if g.len() > 1 {
                            g.remove(1);
                        }
                        g.join(" ")
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    Dig {
        status,
        answers: section(";; ANSWER SECTION:"),
        authority: section(";; AUTHORITY SECTION:"),
    }
}

/// The addresses of `dig`'s answer lines.
fn addrs(d: &Dig) -> BTreeSet<String> {
    d.answers
        .iter()
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect()
}

fn set(v: &[String]) -> BTreeSet<String> {
    v.iter().cloned().collect()
}

#[test]
fn dig_gets_services_tasks_srv_nxdomain_refused_over_udp_and_tcp() {
    let topo = Topology::new("dns", TopoOpts { backends: 3 });
    topo.start_nginx();
    topo.warm_up(None);
    let cfg = topo.write_file("meshlb.toml", &config(&topo, 100));
    let mut daemon = topo.start_daemon(&cfg, "generic");
    topo.wait_ready(&mut daemon, &["web", "web6", "api"], READY);
    let v4 = |n: &str| topo.backend(n).v4.to_string();
    let all4: Vec<String> = ["b1", "b2", "b3"].iter().map(|n| v4(n)).collect();

    for tcp in [false, true] {
        let via = if tcp { "tcp" } else { "udp" };
        let d = dig(&topo, "web.meshlb", "A", tcp);
        assert_eq!(
            (d.status.as_str(), d.answers.clone()),
            ("NOERROR", vec!["web.meshlb. IN A 10.96.0.10".to_string()]),
            "web A over {via}"
        );
        let d = dig(&topo, "web6.meshlb", "AAAA", tcp);
        assert_eq!(
            d.answers,
            ["web6.meshlb. IN AAAA fd00:96::10"],
            "web6 AAAA over {via}"
        );
        let d = dig(&topo, "tasks.web.meshlb", "A", tcp);
        assert_eq!(
            addrs(&d),
            set(&all4),
            "tasks.web A over {via}: {:?}",
            d.answers
        );
        let d = dig(&topo, "_80._tcp.web.meshlb", "SRV", tcp);
        assert_eq!(
            d.answers,
            ["_80._tcp.web.meshlb. IN SRV 0 100 80 web.meshlb."],
            "SRV over {via}"
        );
        // No VIP: the tasks; SRV with each task's port and weight.
        let d = dig(&topo, "api.meshlb", "A", tcp);
        assert_eq!(addrs(&d), set(&all4), "api A over {via}");
        let d = dig(&topo, "_8080._tcp.api.meshlb", "SRV", tcp);
        let want: BTreeSet<String> = [("b1", 30), ("b2", 70), ("b3", 100)]
            .iter()
            .map(|(n, w)| {
                format!(
                    "_8080._tcp.api.meshlb. IN SRV 0 {w} {HTTP_PORT} {}.tasks.api.meshlb.",
                    v4(n).replace('.', "-")
                )
            })
            .collect();
        assert_eq!(set(&d.answers), want, "api SRV over {via}");
        let target = format!("{}.tasks.api.meshlb", v4("b2").replace('.', "-"));
        assert_eq!(
            addrs(&dig(&topo, &target, "A", tcp)),
            set(&[v4("b2")]),
            "{target}"
        );
        // NODATA and NXDOMAIN carry the SOA; REFUSED outside the zone.
        let d = dig(&topo, "web.meshlb", "AAAA", tcp);
        assert_eq!(
            (d.status.as_str(), d.answers.len()),
            ("NOERROR", 0),
            "web AAAA over {via}"
        );
        assert!(
            d.authority
                .iter()
                .any(|l| l.contains(" SOA ") && l.ends_with(" 5")),
            "NODATA SOA over {via}: {:?}",
            d.authority
        );
        let d = dig(&topo, "nope.meshlb", "A", tcp);
        assert_eq!(d.status, "NXDOMAIN", "unknown name over {via}");
        assert!(
            d.authority
                .iter()
                .any(|l| l.starts_with("meshlb. IN SOA ns.meshlb. hostmaster.meshlb. ")),
            "NXDOMAIN SOA over {via}: {:?}",
            d.authority
        );
        assert_eq!(
            dig(&topo, "example.com", "A", tcp).status,
            "REFUSED",
            "example.com over {via}"
        );
    }

    // Health: b2's nginx killed; once status shows it down, DNS has
    // dropped it (the same sync programs both).
    topo.kill_nginx("b2");
    wait_for(Duration::from_secs(10), "b2 down in status", || {
        let st = topo.try_status()?;
        let down = st["services"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "web"))
            .and_then(|s| s["backends"].as_array())
            .is_some_and(|b| {
                b.iter()
                    .any(|b| b["addr"] == v4("b2").as_str() && b["state"] == "down")
            });
        if down {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
    let d = dig(&topo, "tasks.web.meshlb", "A", false);
    assert_eq!(
        addrs(&d),
        set(&[v4("b1"), v4("b3")]),
        "tasks.web after b2 went down"
    );
    topo.restart_nginx("b2");
    wait_for(Duration::from_secs(10), "b2 back in tasks.web", || {
        let d = dig(&topo, "tasks.web.meshlb", "A", false);
        if addrs(&d).contains(&v4("b2")) {
            Ok(())
        } else {
            Err(format!("{:?}", d.answers))
        }
    })
    .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));

    // Drain: b3 of api at weight 0 (SIGHUP).
    topo.write_file("meshlb.toml", &config(&topo, 0));
    daemon.signal(Signal::SIGHUP);
    wait_for(
        Duration::from_secs(10),
        "b3 drained out of tasks.api",
        || {
            let d = dig(&topo, "tasks.api.meshlb", "A", false);
            if addrs(&d) == set(&[v4("b1"), v4("b2")]) {
                Ok(())
            } else {
                Err(format!("{:?}", d.answers))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));

    // Malformed queries: FORMERR or nothing; the server answers on.
    let dns: SocketAddr = format!("{DNS}:53").parse().unwrap();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("shorter than a header", vec![1, 2, 3]),
        (
            "a question promised, none there",
            vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        ),
        (
            "a compression loop",
            vec![
                0x12, 0x35, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
            ],
        ),
        (
            "class CH",
            [
                vec![0x12, 0x36, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3],
                b"web".to_vec(),
                vec![6],
                b"meshlb".to_vec(),
                vec![0, 0, 1, 0, 3],
            ]
            .concat(),
        ),
        (
            "two questions",
            [
                vec![0x12, 0x37, 1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 3],
                b"web".to_vec(),
                vec![6],
                b"meshlb".to_vec(),
                vec![0, 0, 1, 0, 1, 0xc0, 12, 0, 1, 0, 1],
            ]
            .concat(),
        ),
    ];
    let rcodes: Vec<(String, Option<u8>)> = topo.client(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        bad.iter()
            .map(|(what, b)| {
                s.send_to(b, dns).unwrap();
                let mut buf = [0u8; 512];
                let r = s
                    .recv(&mut buf)
                    .ok()
                    .filter(|n| *n >= 4)
                    .map(|_| buf[3] & 0x0f);
                (what.to_string(), r)
            })
            .collect()
    });
    for (what, r) in &rcodes {
        assert!(
            matches!(r, None | Some(1)),
            "{what}: rcode {r:?} (want FORMERR or nothing){}",
            topo.ctx()
        );
    }
    eprintln!("malformed queries: {rcodes:?}");
    assert_eq!(
        dig(&topo, "web.meshlb", "A", false).status,
        "NOERROR",
        "answers after malformed queries"
    );

    // A burst of 10,000 queries, 64 in flight, while the VIP is used.
    let ((answered, secs), b) = std::thread::scope(|s| {
        let q = s.spawn(|| topo.client(|| burst(dns, 10_000, 64)));
        let b = topo.http_burst(
            "10.96.0.10:80".parse().unwrap(),
            100,
            Duration::from_secs(3),
        );
        (q.join().expect("burst"), b)
    });
    let qps = answered as f64 / secs;
    eprintln!(
        "dns burst: {answered} of 10000 answered in {secs:.2} s = {qps:.0} queries/s; meanwhile {} of 100 requests to the VIP answered",
        b.total() - b.failures.len()
    );
    assert_eq!(
        answered,
        10_000,
        "the burst was not answered in full{}",
        topo.ctx()
    );
    assert!(
        b.failures.is_empty(),
        "the VIP during the burst: {:?}",
        b.failures
    );

    // Metrics by response code.
    let m = in_netns(&topo.lb_ns, || {
        http_get_path(
            "127.0.0.1:9742".parse().unwrap(),
            "/metrics",
            Duration::from_secs(5),
        )
    })
    .unwrap_or_else(|e| panic!("/metrics: {e}"));
    for rcode in ["NOERROR", "NXDOMAIN", "REFUSED", "FORMERR"] {
        let line = format!("meshlb_dns_queries_total{{rcode=\"{rcode}\"}} ");
        assert!(
            m.lines().any(
                |l| l.starts_with(&line) && l[line.len()..].parse::<u64>().is_ok_and(|n| n > 0)
            ),
            "/metrics has no {line}: {}",
            m.lines()
                .filter(|l| l.contains("dns"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(daemon.is_running(), "daemon died{}", topo.ctx());
}

/// `n` A queries for web.meshlb to `dns`, `window` in flight at once (a
/// query unanswered for 1 s is sent again, up to 3 times): how many were
/// answered, and the seconds it took.
fn burst(dns: SocketAddr, n: usize, window: usize) -> (usize, f64) {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect(dns).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let query = |id: u16| -> Vec<u8> {
        [
            id.to_be_bytes().to_vec(),
            vec![1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3],
            b"web".to_vec(),
            vec![6],
            b"meshlb".to_vec(),
            vec![0, 0, 1, 0, 1],
        ]
        .concat()
    };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(120);
    // id -> (sent at, tries)
    let mut pending: std::collections::BTreeMap<u16, (Instant, u32)> = Default::default();
    let (mut next, mut answered) = (0usize, 0usize);
    let mut lost = 0usize;
    let mut buf = [0u8; 512];
    while (answered + lost < n) && Instant::now() < deadline {
        while pending.len() < window && next < n {
            let id = next as u16;
            s.send(&query(id)).unwrap();
            pending.insert(id, (Instant::now(), 1));
            next += 1;
        }
        match s.recv(&mut buf) {
            Ok(len) if len >= 2 => {
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                if pending.remove(&id).is_some() {
                    answered += 1;
                }
            }
            _ => {}
        }
        let now = Instant::now();
        let late: Vec<u16> = pending
            .iter()
            .filter(|(_, (at, _))| now.duration_since(*at) > Duration::from_secs(1))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let (_, tries) = pending[&id];
            if tries >= 3 {
                pending.remove(&id);
                lost += 1;
            } else {
                s.send(&query(id)).unwrap();
                pending.insert(id, (now, tries + 1));
            }
        }
    }
    (answered, t0.elapsed().as_secs_f64())
}
