//! Node-local clients (issue 20, SPEC.md "Node-local clients"): a process
//! in the node's own namespace reaches services through their VIP, the
//! node's address and loopback on a published port, TCP and UDP
//! (unconnected and connected), IPv4 and IPv6 (and IPv6 sockets to
//! IPv4-mapped addresses), balanced at the socket by
//! the cgroup hooks (`meshlb-ebpf`'s `sock` module) and spread over the
//! tasks; `getpeername` and `recvfrom` name the frontend, not the task.
//!
//! Also: only the served namespaces are touched (the client namespace's
//! loopback stays its own); `[socket_lb] enabled = false` detaches the
//! hooks (and then the node's processes get nothing: what the feature
//! fixes); a daemon restart under a local request loop loses no request;
//! a connected UDP socket whose backend is removed gets its next answers
//! from a live backend, or an error, within 2 s.
//!
//! Real kernel, real sockets, one topology per test (`common::Topology`).
//! Needs root and cgroup v2; never skips.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const UDP_PORT: u16 = 9000;
const REQ_TIMEOUT: Duration = Duration::from_secs(3);
const READY: Duration = Duration::from_secs(30);
/// Requests per frontend and kind.
const N: usize = 100;
/// Each of the 3 backends gets at least this share of a frontend's
/// requests (a fair share is a third).
const MIN_SHARE: f64 = 0.15;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// web (v4 VIP + node port 80), web6 (v6 VIP + node port 81), echo (UDP
/// v4 VIP + node port 9000), echo6 (UDP v6 VIP + node port 9001), each
/// over the backends not in `skip`; `extra` appended.
fn config(topo: &Topology, skip: &[&str], extra: &str) -> String {
    let live: Vec<&Backend> = topo
        .backends
        .iter()
        .filter(|b| !skip.contains(&b.name.as_str()))
        .collect();
    let v4: Vec<IpAddr> = live.iter().map(|b| b.v4.into()).collect();
    let v6: Vec<IpAddr> = live.iter().map(|b| b.v6.into()).collect();
    let svc = |name, vip, proto, port, target, backends: &Vec<IpAddr>| Svc {
        name,
        vip: Some(vip),
        proto,
        port,
        target,
        backends: backends.clone(),
    };
    let mut text = config_toml(&[
        svc("web", "10.96.0.10", "tcp", 80, HTTP_PORT, &v4),
        svc("web6", "fd00:96::10", "tcp", 81, HTTP_PORT, &v6),
        svc("echo", "10.96.0.11", "udp", UDP_PORT, UDP_PORT, &v4),
        svc("echo6", "fd00:96::11", "udp", UDP_PORT + 1, UDP_PORT, &v6),
    ]);
    text.push_str(extra);
    text
}

/// A topology with 3 backends (nginx and UDP echo), warmed up.
fn prepared(tag: &str) -> Topology {
    let topo = Topology::new(tag, TopoOpts { backends: 3 });
    topo.start_nginx();
    topo.start_udp_echo(UDP_PORT);
    topo.warm_up(Some(UDP_PORT));
    topo
}

/// How a request is made.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// TCP: connect, `getpeername`, GET.
    Tcp,
    /// UDP `sendto` + `recvfrom` on an unconnected socket.
    Udp,
    /// UDP `connect`, `getpeername`, `send` + `recv`.
    UdpConnected,
}

/// One request of `kind` to `dst` from the calling thread's namespace:
/// the answering backend's name. The peer the socket reports must be
/// `dst` itself.
fn request(kind: Kind, dst: SocketAddr) -> Result<String, String> {
    match kind {
        Kind::Tcp => {
            let mut s = tcp_connect(None, dst, REQ_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
            let peer = s.peer_addr().map_err(|e| format!("getpeername: {e}"))?;
            if peer != dst {
                return Err(format!("getpeername says {peer}, not {dst}"));
            }
            http_get_on(&mut s)
        }
        Kind::Udp => udp_request(dst, b"ping", REQ_TIMEOUT),
        Kind::UdpConnected => connected_udp_request(dst, REQ_TIMEOUT),
    }
}

/// An unbound UDP socket of `dst`'s family, with the request timeout.
fn udp_socket_for(dst: SocketAddr) -> Result<UdpSocket, String> {
    let any: SocketAddr = if dst.is_ipv4() {
        sa("0.0.0.0:0")
    } else {
        sa("[::]:0")
    };
    let s = UdpSocket::bind(any).map_err(|e| format!("bind: {e}"))?;
    s.set_read_timeout(Some(REQ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok(s)
}

/// `GET /` on an open connection; the trimmed body of a 200 answer.
fn http_get_on(s: &mut std::net::TcpStream) -> Result<String, String> {
    use std::io::{Read, Write};
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("answer: {head:?}"));
    }
    Ok(body.trim().to_string())
}

/// `n` requests of `kind` to `dst` from namespace `ns`, each on a new
/// socket.
fn burst(ns: &str, kind: Kind, dst: SocketAddr, n: usize) -> Burst {
    in_netns(ns, || {
        let mut b = Burst::default();
        for i in 0..n {
            match request(kind, dst) {
                Ok(who) => *b.counts.entry(who).or_default() += 1,
                Err(e) => b.failures.push(format!("request {i}: {e}")),
            }
        }
        b
    })
}

/// Every frontend a node-local client may use, by kind: VIP, node
/// address and loopback, IPv4 and IPv6.
fn frontends() -> Vec<(Kind, SocketAddr)> {
    let mut v = Vec::new();
    for dst in [
        "10.96.0.10:80",
        "10.200.0.1:80",
        "127.0.0.1:80",
        "[fd00:96::10]:81",
        "[fd00:200::1]:81",
        "[::1]:81",
        // IPv6 sockets to IPv4-mapped addresses: IPv4 frontends.
        "[::ffff:10.96.0.10]:80",
        "[::ffff:127.0.0.1]:80",
    ] {
        v.push((Kind::Tcp, sa(dst)));
    }
    for dst in [
        "10.96.0.11:9000",
        "10.200.0.1:9000",
        "127.0.0.1:9000",
        "[fd00:96::11]:9001",
        "[fd00:200::1]:9001",
        "[::1]:9001",
        "[::ffff:10.96.0.11]:9000",
    ] {
        v.push((Kind::Udp, sa(dst)));
        v.push((Kind::UdpConnected, sa(dst)));
    }
    v
}

/// `SO_COOKIE` of a socket: what the hooks key it by.
fn socket_cookie(s: &socket2::Socket) -> u64 {
    use std::os::fd::AsRawFd;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cookie`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    assert_eq!(r, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    cookie
}

/// `meshlb explain PROTO 0.0.0.0:0 DST --socket COOKIE --json`.
fn explain_socket(topo: &Topology, proto: &str, cookie: u64, dst: SocketAddr) -> serde_json::Value {
    let out = topo.meshlb(
        &topo.lb_ns,
        &[
            "explain",
            proto,
            "0.0.0.0:0",
            &dst.to_string(),
            "--socket",
            &format!("{cookie:#x}"),
            "--json",
            "--bpffs",
            &topo.lb_bpffs().display().to_string(),
        ],
        Duration::from_secs(10),
    );
    assert!(out.success(), "meshlb explain: {}", out.describe());
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("explain json: {e}: {}", out.stdout))
}

/// The `socket_lb` object of `meshlb status --json`.
fn socket_lb_status(topo: &Topology) -> serde_json::Value {
    topo.status()["socket_lb"].clone()
}

#[test]
fn node_processes_reach_services_through_vip_node_address_and_loopback() {
    let topo = prepared("slb");
    let cfg = topo.write_file("meshlb.toml", &config(&topo, &[], ""));
    let mut daemon = topo.start_daemon(&cfg, "generic");
    topo.wait_ready(&mut daemon, &["web", "web6", "echo", "echo6"], READY);
    let st = socket_lb_status(&topo);
    assert_eq!(st["on"], true, "socket_lb in status: {st}{}", topo.ctx());
    assert!(
        st["namespaces"].as_u64().unwrap_or(0) >= 1,
        "socket_lb serves no namespace: {st}{}",
        topo.ctx()
    );
    let names = topo.backend_names();
    let mut summary = BTreeMap::new();
    for (kind, dst) in frontends() {
        let b = burst(&topo.lb_ns, kind, dst, N);
        let what = format!("{kind:?} {dst} from the node's namespace");
        summary.insert(what.clone(), b.counts.clone());
        topo.assert_spread(&what, &b, &names, MIN_SHARE);
    }
    eprintln!("answers by frontend: {summary:#?}");
    // Each balanced socket is one connection of its backend (an
    // unconnected socket's datagrams are not each a new one): echo's UDP
    // frontends saw N unconnected and N connected sockets each.
    let echo_frontends = frontends()
        .iter()
        .filter(|(k, d)| matches!(k, Kind::Udp) && d.port() == UDP_PORT)
        .count();
    let st = topo.status();
    let connections: u64 = st["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "echo"))
        .and_then(|s| s["backends"].as_array())
        .map_or(0, |b| {
            b.iter().filter_map(|b| b["connections"].as_u64()).sum()
        });
    assert_eq!(
        connections,
        (echo_frontends * 2 * N) as u64,
        "connections of echo's backends after {echo_frontends} frontends x {N} unconnected and {N} connected sockets{}",
        topo.ctx()
    );

    // `meshlb explain --socket COOKIE` predicts the backend of a socket
    // before it connects, and names it after.
    let mut explained = BTreeMap::new();
    for i in 0..12u32 {
        let (dst, proto) = if i.is_multiple_of(2) {
            (sa("10.96.0.10:80"), "tcp")
        } else {
            (sa("[fd00:96::10]:81"), "tcp")
        };
        let sock = in_netns(&topo.lb_ns, || {
            socket2::Socket::new(
                socket2::Domain::for_address(dst),
                socket2::Type::STREAM,
                None,
            )
            .expect("socket")
        });
        let cookie = socket_cookie(&sock);
        let before = explain_socket(&topo, proto, cookie, dst);
        assert_eq!(
            before["reason"], "socket-slot",
            "explain before connect: {before}"
        );
        let predicted = before["backend"].as_str().unwrap_or("?").to_string();
        let who = in_netns(&topo.lb_ns, || {
            sock.connect_timeout(&dst.into(), REQ_TIMEOUT)
                .map_err(|e| e.to_string())?;
            let mut s: std::net::TcpStream = sock.into();
            s.set_read_timeout(Some(REQ_TIMEOUT))
                .map_err(|e| e.to_string())?;
            let after = explain_socket(&topo, proto, cookie, dst);
            let answer = http_get_on(&mut s)?;
            Ok::<_, String>((answer, after))
        });
        let (answer, after) = who.unwrap_or_else(|e| panic!("{dst}: {e}{}", topo.ctx()));
        assert_eq!(after["reason"], "socket", "explain after connect: {after}");
        assert_eq!(
            after["backend"], before["backend"],
            "explain before and after connect disagree"
        );
        let b = topo
            .backends
            .iter()
            .find(|b| b.name == answer)
            .unwrap_or_else(|| panic!("answer {answer:?}"));
        let want = if dst.is_ipv4() {
            b.http_v4().to_string()
        } else {
            b.http_v6().to_string()
        };
        assert_eq!(
            predicted,
            want,
            "explain --socket {cookie} predicted {predicted}, {answer} ({want}) answered{}",
            topo.ctx()
        );
        *explained.entry(answer).or_insert(0) += 1;
    }
    eprintln!("explain --socket predicted every backend: {explained:?}");

    // The client namespace is not this node's: its loopback is its own
    // (nothing listens there), and its requests to the VIP still go
    // through the node's XDP program.
    let refused = in_netns(&topo.client_ns, || request(Kind::Tcp, sa("127.0.0.1:80")));
    assert!(
        refused.is_err(),
        "a request to 127.0.0.1:80 in the client namespace was answered ({refused:?}): the hooks act outside their namespaces{}",
        topo.ctx()
    );
    let b = topo.http_burst(sa("10.96.0.10:80"), 30, REQ_TIMEOUT);
    topo.assert_spread("HTTP via the VIP from the client", &b, &names, 0.1);

    // Off: the hooks go, and the node's own processes no longer reach
    // the services (the world this feature fixes).
    daemon.stop(Duration::from_secs(10));
    let cfg = topo.write_file(
        "meshlb.toml",
        &config(&topo, &[], "\n[socket_lb]\nenabled = false\n"),
    );
    let mut daemon = topo.start_daemon(&cfg, "generic");
    topo.wait_ready(&mut daemon, &["web", "web6", "echo", "echo6"], READY);
    let st = socket_lb_status(&topo);
    assert_eq!(st["on"], false, "socket_lb in status: {st}{}", topo.ctx());
    assert!(
        st["why"].as_str().unwrap_or("").contains("enabled = false"),
        "status does not say why socket_lb is off: {st}"
    );
    let off = in_netns(&topo.lb_ns, || request(Kind::Tcp, sa("127.0.0.1:80")));
    assert!(
        off.is_err(),
        "127.0.0.1:80 answered with [socket_lb] enabled = false: {off:?}{}",
        topo.ctx()
    );
    assert!(daemon.is_running(), "daemon died{}", topo.ctx());
}

#[test]
fn restart_under_a_local_request_loop_loses_nothing() {
    let topo = prepared("slr");
    let cfg = topo.write_file("meshlb.toml", &config(&topo, &[], ""));
    let mut daemon = topo.start_daemon(&cfg, "generic");
    topo.wait_ready(&mut daemon, &["web", "echo"], READY);

    let stop = Arc::new(AtomicBool::new(false));
    let looped = {
        let (ns, stop) = (topo.lb_ns.clone(), stop.clone());
        thread::spawn(move || {
            enter_netns(&ns);
            let (mut ok, mut failed) = (0usize, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let (kind, dst) = if i.is_multiple_of(2) {
                    (Kind::Tcp, sa("10.96.0.10:80"))
                } else {
                    (Kind::UdpConnected, sa("127.0.0.1:9000"))
                };
                match request(kind, dst) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("{kind:?} {dst}: {e}")),
                }
                i += 1;
                thread::sleep(Duration::from_millis(10));
            }
            (ok, failed)
        })
    };
    thread::sleep(Duration::from_secs(1));
    // SIGKILL: the hooks and maps stay pinned; nothing is flushed.
    daemon.kill9();
    thread::sleep(Duration::from_secs(2));
    let mut daemon = topo.start_daemon(&cfg, "generic");
    topo.wait_ready(&mut daemon, &["web", "echo"], READY);
    thread::sleep(Duration::from_secs(2));
    // And a clean stop and start.
    daemon.stop(Duration::from_secs(10));
    let mut daemon = topo.start_daemon(&cfg, "generic");
    topo.wait_ready(&mut daemon, &["web", "echo"], READY);
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = looped.join().expect("request loop");
    eprintln!(
        "local request loop across two restarts: {ok} answered, {} failed",
        failed.len()
    );
    assert!(ok > 100, "only {ok} requests were made{}", topo.ctx());
    assert!(
        failed.is_empty(),
        "{} of {} local requests failed across the restarts: {:?}{}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)],
        topo.ctx()
    );
    assert_eq!(
        socket_lb_status(&topo)["on"],
        true,
        "socket_lb after the restarts{}",
        topo.ctx()
    );
    assert!(daemon.is_running(), "daemon died{}", topo.ctx());
}

#[test]
fn a_connected_udp_socket_leaves_a_removed_backend_within_two_seconds() {
    let topo = prepared("slu");
    let cfg = topo.write_file("meshlb.toml", &config(&topo, &[], ""));
    let mut daemon = topo.start_daemon(&cfg, "generic");
    topo.wait_ready(&mut daemon, &["web", "echo"], READY);

    // Connected sockets until one is on b2.
    let dst = sa("10.96.0.11:9000");
    let (sock, was) = in_netns(&topo.lb_ns, || {
        for _ in 0..200 {
            let s = udp_socket_for(dst).unwrap();
            s.connect(dst).unwrap();
            s.send(b"ping").unwrap();
            let mut buf = [0u8; 64];
            let n = s.recv(&mut buf).expect("first answer");
            let who = String::from_utf8_lossy(&buf[..n]).trim().to_string();
            if who == "b2" {
                return (s, who);
            }
        }
        panic!("no connected socket landed on b2 in 200 tries");
    });
    assert_eq!(was, "b2");

    topo.write_file("meshlb.toml", &config(&topo, &["b2"], ""));
    daemon.signal(Signal::SIGHUP);
    let removed = Instant::now();
    // Send every 100 ms until an answer from a live backend or an error.
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut outcome = None;
    while removed.elapsed() < Duration::from_secs(10) {
        let sent = sock.send(b"ping");
        let mut buf = [0u8; 64];
        let got = sent.and_then(|_| sock.recv(&mut buf));
        match got {
            Ok(n) => {
                let who = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                if who != "b2" {
                    outcome = Some(format!("answered by {who}"));
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                outcome = Some(format!("error {e}"));
                break;
            }
        }
    }
    let took = removed.elapsed();
    eprintln!("connected UDP socket after b2's removal: {outcome:?} after {took:?}");
    let outcome = outcome.unwrap_or_else(|| {
        panic!(
            "a connected UDP socket on removed b2 neither moved nor got an error in {took:?}{}",
            topo.ctx()
        )
    });
    assert!(
        took <= Duration::from_secs(2),
        "a connected UDP socket on removed b2: {outcome} only after {took:?} (want <= 2 s){}",
        topo.ctx()
    );
    assert!(daemon.is_running(), "daemon died{}", topo.ctx());
}
