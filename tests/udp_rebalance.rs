//! Issue 15, UDP re-balance, the lease-expiry half (the health-down half is
//! `health.rs`'s `udp_flow_with_a_fixed_port_moves_off_a_health_downed_backend`):
//! a client with a fixed source port sends 10 datagrams/s; the node that
//! runs its task dies (daemon SIGKILLed, its tasks gone), so its etcd lease
//! expires and takes the node's task records with it; the datagrams must
//! reach another backend within 2 s of meshlb knowing.
//!
//! On the routing mesh of `common::mesh` with a real etcd (in the client
//! namespace, on its switch address): daemons on n1 (node A: the client's
//! traffic enters there) and n2 (node B), both `--etcd`. The service `web`
//! (VIP 10.96.0.10, udp 53 -> 5354) has t1 and t2 (behind n1) and t3
//! (behind n2). Each task record is put under its node's lease, the lease
//! its daemon holds `nodes/<node>` under, as the daemon's own registrar
//! puts its Docker tasks: a node's tasks live and die with the node.
//! "meshlb knowing" is the moment n1's `meshlb status --json` no longer
//! lists t3 as a backend of `web`. Needs root; see `common`.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::etcd::{EtcdClient, EtcdServer};
use common::mesh::{Mesh, VIP4};
use common::{enter_netns, must, wait_for, Proc};
use serde_json::{json, Value};

/// The daemons' default etcd prefix (they run without `--prefix`).
const PREFIX: &str = "/meshlb/v1";
const SERVICE: &str = "web";
/// The service's published UDP port on the VIP.
const VIP_PORT: u16 = 53;
/// The tasks' sequence echo servers. Not the mesh's own echo port
/// (`mesh::UDP_PORT`): those servers cannot be stopped one task at a time.
const ECHO_PORT: u16 = 5354;
/// Node A (the client's entry) and node B (the one that dies), as indexes
/// into `Mesh::nodes`.
const A: usize = 0;
const B: usize = 1;
/// Tasks of `web`: t1, t2 behind n1; t3 behind n2 (the flow's task).
const TASKS: [&str; 3] = ["t1", "t2", "t3"];
const DOOMED: &str = "t3";
/// 10 datagrams/s.
const INTERVAL: Duration = Duration::from_millis(100);
/// The acceptance bound: datagrams reach another backend within this long
/// of meshlb knowing.
const MOVE_WITHIN: Duration = Duration::from_secs(2);
/// How long the client keeps sending after node A knew: the last
/// `AFTER_KNOWN - MOVE_WITHIN` of it (~30 datagrams) must all be answered
/// by another backend.
const AFTER_KNOWN: Duration = Duration::from_secs(5);
/// The daemon's node lease TTL is 10 s (`etcd::watch::NODE_TTL_SECS`, no
/// flag shortens it), kept alive every ~3 s; etcd revokes an expired lease
/// within about a second. So node A must know within this long of the kill.
const KNOW_WITHIN: Duration = Duration::from_secs(20);
/// Fixed source ports tried until Maglev puts one on t3 (outside the
/// client's ephemeral range, `common::CLIENT_PORT_RANGE`).
const PORTS: std::ops::Range<u16> = 41000..41060;
/// The whole test, setup included (teardown excluded).
const BUDGET: Duration = Duration::from_secs(120);

fn task_key(id: &str) -> String {
    format!("{PREFIX}/tasks/{SERVICE}/{id}")
}

fn node_key(node: &str) -> String {
    format!("{PREFIX}/nodes/{node}")
}

/// Signed milliseconds from `from` to `to`.
fn ms(from: Instant, to: Instant) -> i64 {
    if to >= from {
        (to - from).as_millis() as i64
    } else {
        -((from - to).as_millis() as i64)
    }
}

/// A UDP server inside a task namespace that answers each datagram with
/// "<task> <the datagram>", so every answer names its backend and the
/// datagram it answers. Stops (and closes its socket) when stopped or
/// dropped.
struct SeqEcho {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl SeqEcho {
    fn start(ns: &str, port: u16, name: &str) -> SeqEcho {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (ns_owned, name, stop2) = (ns.to_string(), name.to_string(), stop.clone());
        let handle = thread::spawn(move || {
            enter_netns(&ns_owned);
            let sock = match UdpSocket::bind(("0.0.0.0", port)).and_then(|s| {
                s.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(s)
            }) {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("bind 0.0.0.0:{port} in {ns_owned}: {e}")));
                    return;
                }
            };
            let mut buf = [0u8; 512];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let mut reply = format!("{name} ").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = sock.send_to(&reply, from);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("sequence echo: {e}"),
            Err(e) => panic!("sequence echo in {ns} did not start: {e}"),
        }
        SeqEcho {
            stop,
            handle: Some(handle),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for SeqEcho {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One answer the client got: which datagram, from which task, when.
#[derive(Clone, Debug)]
struct Answer {
    seq: usize,
    task: String,
    at: Instant,
}

/// The client's stream: one socket bound to a fixed port in the client
/// namespace, a sender thread sending "seq N" to the VIP every `INTERVAL`
/// (on a fixed schedule, whatever comes back) and a receiver thread
/// recording every answer.
struct Stream {
    /// Send time of datagram N at index N.
    sent: Arc<Mutex<Vec<Instant>>>,
    answers: Arc<Mutex<Vec<Answer>>>,
    /// Anything received that is not an answer of the form "<task> seq N"
    /// from the VIP, and send errors.
    odd: Arc<Mutex<Vec<String>>>,
    stop_send: Arc<AtomicBool>,
    stop_recv: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Stream {
    /// `sock`: bound in the client namespace (it keeps that namespace).
    /// Sends for at most `max` even if never stopped.
    fn start(sock: UdpSocket, dst: SocketAddr, max: Duration) -> Stream {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let odd = Arc::new(Mutex::new(Vec::new()));
        let stop_send = Arc::new(AtomicBool::new(false));
        let stop_recv = Arc::new(AtomicBool::new(false));
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("SO_RCVTIMEO");
        let rsock = sock.try_clone().expect("clone client socket");
        let sender = {
            let (sent, odd, stop) = (sent.clone(), odd.clone(), stop_send.clone());
            thread::spawn(move || {
                let start = Instant::now();
                let mut k = 0usize;
                while !stop.load(Ordering::Relaxed) && start.elapsed() < max {
                    let due = start + INTERVAL * k as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    let at = Instant::now();
                    if let Err(e) = sock.send_to(format!("seq {k}").as_bytes(), dst) {
                        odd.lock().unwrap().push(format!("send seq {k}: {e}"));
                    }
                    sent.lock().unwrap().push(at);
                    k += 1;
                }
            })
        };
        let receiver = {
            let (answers, odd, stop) = (answers.clone(), odd.clone(), stop_recv.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    match rsock.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            let at = Instant::now();
                            let text = String::from_utf8_lossy(&buf[..n]).to_string();
                            let words: Vec<&str> = text.split_whitespace().collect();
                            match (from == dst, words.as_slice()) {
                                (true, [task, "seq", seq]) if seq.parse::<usize>().is_ok() => {
                                    answers.lock().unwrap().push(Answer {
                                        seq: seq.parse().unwrap(),
                                        task: task.to_string(),
                                        at,
                                    });
                                }
                                _ => odd.lock().unwrap().push(format!("{text:?} from {from}")),
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => odd.lock().unwrap().push(format!("recv: {e}")),
                    }
                }
            })
        };
        Stream {
            sent,
            answers,
            odd,
            stop_send,
            stop_recv,
            threads: vec![sender, receiver],
        }
    }

    fn answers(&self) -> Vec<Answer> {
        self.answers.lock().unwrap().clone()
    }

    /// Stops sending, waits `linger` for the last answers, stops.
    fn stop(&mut self, linger: Duration) {
        self.stop_send.store(true, Ordering::Relaxed);
        thread::sleep(linger);
        self.stop_recv.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// The task answering one datagram sent from `port` in the client
/// namespace to `dst` (a socket of its own, closed afterwards).
fn probe(m: &Mesh, port: u16, dst: SocketAddr) -> Result<String, String> {
    m.client(|| {
        let sock = UdpSocket::bind(("0.0.0.0", port)).map_err(|e| format!("bind :{port}: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        sock.send_to(b"seq 0", dst)
            .map_err(|e| format!("send from :{port}: {e}"))?;
        let mut buf = [0u8; 512];
        let (n, from) = sock
            .recv_from(&mut buf)
            .map_err(|e| format!("from :{port}: no answer within 2 s ({e})"))?;
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if from != dst {
            return Err(format!("answer {text:?} came from {from}, not {dst}"));
        }
        Ok(text.split_whitespace().next().unwrap_or("").to_string())
    })
}

/// The addresses `status --json` of node `i` lists as backends of `web`.
fn web_backends(m: &Mesh, i: usize) -> Result<Vec<String>, String> {
    let st: Value = m.try_status(i)?;
    let svc = st["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == SERVICE))
        .ok_or_else(|| format!("{SERVICE} not in status of {}", m.nodes[i].name))?;
    let mut addrs: Vec<String> = svc["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["addr"].as_str().map(String::from))
        .collect();
    addrs.sort();
    Ok(addrs)
}

/// The lease `nodes/<node>` is held under, once the daemon registered it.
fn node_lease(m: &Mesh, c: &EtcdClient, node: &str) -> i64 {
    wait_for(
        Duration::from_secs(15),
        &format!("{} under a lease", node_key(node)),
        || match c.get_prefix(&node_key(node)).get(&node_key(node)) {
            Some((_, lease)) if *lease != 0 => Ok(*lease),
            Some(_) => Err("no lease".into()),
            None => Err("no key".into()),
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", m.ctx()))
}

/// The remaining TTL etcd reports for `lease` ("remaining(7s)").
fn lease_remaining(c: &EtcdClient, lease: i64) -> Option<u64> {
    let out = c.etcdctl_ok(&["lease", "timetolive", &format!("{lease:x}")]);
    let rest = out.split("remaining(").nth(1)?;
    rest.split('s').next()?.parse().ok()
}

/// The data path counters that grew from `before` to `after`, as
/// "name +delta".
fn counter_deltas(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| format!("{k} +{d}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn udp_flow_with_a_fixed_port_moves_off_a_task_whose_node_lease_expired() {
    let t0 = Instant::now();
    let m = Mesh::new("ur");
    let (na, nb) = (m.nodes[A].clone(), m.nodes[B].clone());
    for name in TASKS {
        assert_eq!(
            &m.nodes[m.task(name).node].name,
            if name == DOOMED { &nb.name } else { &na.name },
            "mesh layout: {name} is not where this test expects it"
        );
    }
    let doomed = m.task(DOOMED).clone();
    let mut echoes: BTreeMap<&str, SeqEcho> = TASKS
        .iter()
        .map(|&t| (t, SeqEcho::start(&m.task(t).ns, ECHO_PORT, t)))
        .collect();

    let etcd = EtcdServer::start_on(&m.client_ns, "udp-rb", &m.client_v4.to_string());
    let c = etcd.client();
    let out = c.meshlb(&[
        "service",
        "create",
        SERVICE,
        "--publish",
        &format!("udp:{VIP_PORT}:{ECHO_PORT}"),
        "--vip",
        VIP4,
    ]);
    assert!(out.success(), "service create: {}", out.describe());
    let url = etcd.url();
    let mut daemons: Vec<Proc> = [A, B]
        .iter()
        .map(|&i| m.start_daemon_args(i, &["--etcd", &url]))
        .collect();
    // No service to wait for: `web` has no tasks before the daemons hold
    // the leases they go under.
    for (d, i) in daemons.iter_mut().zip([A, B]) {
        m.wait_ready(i, d, &[]);
    }

    // Each node's tasks under its node's lease, as the node's own Docker
    // registrar puts them (`source` only says who wrote the record; no
    // daemon here runs `--docker`, so none resyncs them).
    let leases: BTreeMap<String, i64> = [&na, &nb]
        .iter()
        .map(|n| (n.name.clone(), node_lease(&m, &c, &n.name)))
        .collect();
    for name in TASKS {
        let t = m.task(name);
        let node = &m.nodes[t.node].name;
        let rec = json!({
            "addr": t.v4.to_string(),
            "weight": 100,
            "node": node,
            "state": "running",
            "source": "docker",
        })
        .to_string();
        c.etcdctl_ok(&[
            "put",
            &format!("--lease={:x}", leases[node]),
            "--",
            &task_key(name),
            &rec,
        ]);
    }
    let tasks = c.get_prefix(&format!("{PREFIX}/tasks/{SERVICE}/"));
    assert_eq!(
        tasks.get(&task_key(DOOMED)).map(|(_, l)| *l),
        Some(leases[&nb.name]),
        "{DOOMED}'s record is not under {}'s lease: {tasks:?}",
        nb.name
    );
    let mut all: Vec<String> = TASKS.iter().map(|t| m.task(t).v4.to_string()).collect();
    all.sort();
    for i in [A, B] {
        wait_for(
            Duration::from_secs(10),
            &format!("{} to program every task of {SERVICE}", m.nodes[i].name),
            || match web_backends(&m, i)? {
                b if b == all => Ok(()),
                b => Err(format!("backends {b:?}")),
            },
        )
        .unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    }

    // A fixed source port whose flow Maglev puts on the doomed task.
    let dst = SocketAddr::V4(SocketAddrV4::new(VIP4.parse().unwrap(), VIP_PORT));
    let mut tried: Vec<(u16, Result<String, String>)> = Vec::new();
    let mut port = None;
    for p in PORTS {
        let r = probe(&m, p, dst);
        let hit = r.as_deref() == Ok(DOOMED);
        tried.push((p, r));
        let misses = tried.iter().filter(|(_, r)| r.is_err()).count();
        assert!(
            misses <= 2,
            "{misses} of {} probes through {} went unanswered: {tried:?}{}",
            tried.len(),
            na.name,
            m.ctx()
        );
        if hit {
            port = Some(p);
            break;
        }
    }
    let port = port.unwrap_or_else(|| {
        panic!(
            "no source port of {PORTS:?} reached {DOOMED} through {}: {tried:?}{}",
            na.name,
            m.ctx()
        )
    });

    let sock = m
        .client(|| UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))
        .unwrap_or_else(|e| panic!("bind client port {port}: {e}"));
    let mut stream = Stream::start(sock, dst, Duration::from_secs(60));
    wait_for(
        Duration::from_secs(5),
        "20 answers to the stream",
        || match stream.answers().len() {
            n if n >= 20 => Ok(()),
            n => Err(format!("{n} answers")),
        },
    )
    .unwrap_or_else(|e| panic!("{e}; {:?}{}", stream.odd.lock().unwrap(), m.ctx()));
    let before = m.counters(A);

    // Node B vanishes: its daemon SIGKILLed (its lease is not revoked, so
    // it lives out its TTL) and its task gone (server stopped, link down).
    let lease_b = leases[&nb.name];
    let remaining = lease_remaining(&c, lease_b);
    daemons[1].kill9();
    let killed = Instant::now();
    echoes
        .get_mut(DOOMED)
        .expect("the doomed task's echo")
        .stop();
    let task_if = format!("{}t{}", m.short, &DOOMED[1..]);
    must(&["ip", "-n", &doomed.ns, "link", "set", &task_if, "down"]);

    // Until node A's status drops the task: when etcd dropped the lease's
    // keys (polled on a thread of its own, so that neither poll slows the
    // other), and when A knew: the start of the first status call that no
    // longer lists the task (A knew at the latest when that call read its
    // maps, at the earliest after the previous call read them).
    let doomed_addr = doomed.v4.to_string();
    let etcd_done = AtomicBool::new(false);
    let (expired, polled) = thread::scope(|s| {
        let watcher = s.spawn(|| -> Result<Instant, String> {
            loop {
                // Read before the check: one more check after A knew.
                let done = etcd_done.load(Ordering::Relaxed) || killed.elapsed() > KNOW_WITHIN;
                let keys = c.get_prefix(PREFIX);
                if !keys.contains_key(&node_key(&nb.name)) {
                    let at = Instant::now();
                    if keys.contains_key(&task_key(DOOMED)) {
                        return Err(format!(
                            "etcd dropped {} but kept {}: {keys:?}",
                            node_key(&nb.name),
                            task_key(DOOMED)
                        ));
                    }
                    return Ok(at);
                }
                if done {
                    return Err(format!("still there: {keys:?}"));
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        let mut prev: Option<Instant> = None;
        let mut last = String::new();
        let polled = loop {
            if killed.elapsed() > KNOW_WITHIN {
                break Err(last);
            }
            let at = Instant::now();
            match web_backends(&m, A) {
                Ok(b) if !b.contains(&doomed_addr) => break Ok((prev, at)),
                Ok(b) => last = format!("backends {b:?}"),
                Err(e) => last = e,
            }
            prev = Some(at);
            thread::sleep(Duration::from_millis(20));
        };
        etcd_done.store(true, Ordering::Relaxed);
        (watcher.join().expect("etcd poller"), polled)
    });
    let expired_s = match &expired {
        Ok(at) => format!("{} ms after the kill", ms(killed, *at)),
        Err(e) => format!("not seen: {e}"),
    };
    let (prev_poll, known) = match polled {
        Ok(p) => p,
        Err(last) => {
            stream.stop(Duration::ZERO);
            panic!(
                "{} still lists {DOOMED} ({doomed_addr}) {KNOW_WITHIN:?} after {}'s daemon was killed \
                 (lease {lease_b:x}, {remaining:?} s left at the kill; etcd dropped {}: {expired_s}); \
                 last: {last}{}\n===== etcd =====\n{}",
                na.name,
                nb.name,
                node_key(&nb.name),
                m.ctx(),
                etcd.log_tail(20)
            );
        }
    };
    if let Err(e) = &expired {
        stream.stop(Duration::ZERO);
        panic!(
            "{} dropped {DOOMED}, but etcd's {}: {e}{}",
            na.name,
            node_key(&nb.name),
            m.ctx()
        );
    }
    let expired = expired.ok();
    let sent_until = known + AFTER_KNOWN;
    while Instant::now() < sent_until {
        thread::sleep(Duration::from_millis(50));
    }
    stream.stop(Duration::from_millis(500));
    let after = m.counters(A);

    // Per datagram: when it was sent, who answered it.
    let sent = stream.sent.lock().unwrap().clone();
    let answers = stream.answers();
    let odd = stream.odd.lock().unwrap().clone();
    let mut by_seq: BTreeMap<usize, &Answer> = BTreeMap::new();
    for a in &answers {
        by_seq.entry(a.seq).or_insert(a);
    }
    let who = |seq: usize| by_seq.get(&seq).map(|a| a.task.as_str());
    let after_kill: Vec<usize> = (0..sent.len()).filter(|&s| sent[s] >= killed).collect();
    let before_kill: Vec<usize> = (0..sent.len()).filter(|&s| sent[s] < killed).collect();
    let moved = after_kill
        .iter()
        .copied()
        .find(|&s| matches!(who(s), Some(t) if t != DOOMED));
    let lost: Vec<usize> = after_kill
        .iter()
        .copied()
        .filter(|&s| who(s).is_none())
        .collect();
    let bound = known + MOVE_WITHIN;
    let late: Vec<usize> = (0..sent.len()).filter(|&s| sent[s] >= bound).collect();
    let mut late_tally: BTreeMap<String, usize> = BTreeMap::new();
    for &s in &late {
        *late_tally
            .entry(who(s).unwrap_or("(lost)").to_string())
            .or_default() += 1;
    }
    let pre_tally = before_kill.iter().fold(BTreeMap::new(), |mut t, &s| {
        *t.entry(who(s).unwrap_or("(lost)")).or_insert(0usize) += 1;
        t
    });
    let summary = format!(
        "source port {port} (after {} probes); {} datagrams before the kill: {pre_tally:?}; \
         lease {lease_b:x} had {remaining:?} s left at the kill; etcd dropped {} {} ms after the kill; \
         {} knew {} ms after the kill ({} ms after etcd; status polled {} ms before); first datagram answered by another backend: {}; \
         lost after the kill: {} of {} ({} of them sent after {} knew); \
         sent from {} knew + {MOVE_WITHIN:?}: {late_tally:?}; {} counters: {}; odd: {odd:?}",
        tried.len(),
        before_kill.len(),
        node_key(&nb.name),
        expired.map_or("?".into(), |e| ms(killed, e).to_string()),
        na.name,
        ms(killed, known),
        expired.map_or("?".into(), |e| ms(e, known).to_string()),
        prev_poll.map_or("?".into(), |p| ms(p, known).to_string()),
        match moved {
            Some(s) => format!(
                "#{s} by {}, sent {} ms after the kill, {} ms after {} knew (answered {} ms after it knew)",
                who(s).unwrap_or("?"),
                ms(killed, sent[s]),
                ms(known, sent[s]),
                na.name,
                ms(known, by_seq[&s].at)
            ),
            None => "none".into(),
        },
        lost.len(),
        after_kill.len(),
        lost.iter().filter(|&&s| sent[s] >= known).count(),
        na.name,
        na.name,
        na.name,
        counter_deltas(&before, &after),
    );
    eprintln!("udp_rebalance: {summary}");

    assert!(
        before_kill.len() >= 20
            && before_kill
                .iter()
                .all(|&s| matches!(who(s), Some(DOOMED) | None))
            && before_kill.iter().filter(|&&s| who(s).is_none()).count() <= 2,
        "before the kill the flow from port {port} must be answered by {DOOMED} (at most 2 lost): {summary}{}",
        m.ctx()
    );
    let Some(moved) = moved else {
        panic!(
            "the flow from port {port} never reached another backend after {DOOMED}'s node died: {summary}{}",
            m.ctx()
        );
    };
    assert!(
        sent[moved] <= bound,
        "the flow reached another backend {} ms after {} knew {DOOMED} was gone, over {MOVE_WITHIN:?}: {summary}{}",
        ms(known, sent[moved]),
        na.name,
        m.ctx()
    );
    assert!(
        late.len() >= 20
            && late
                .iter()
                .all(|&s| matches!(who(s), Some(t) if t != DOOMED && t == who(moved).unwrap())),
        "every datagram sent from {MOVE_WITHIN:?} after {} knew must be answered by the backend the \
         flow moved to ({}): {summary}{}",
        na.name,
        who(moved).unwrap(),
        m.ctx()
    );
    let rebalanced = after.get("rebalanced").copied().unwrap_or(0)
        - before.get("rebalanced").copied().unwrap_or(0);
    assert!(
        rebalanced >= 1,
        "{}'s counter rebalanced moved by {rebalanced}: {summary}{}",
        na.name,
        m.ctx()
    );
    assert!(
        t0.elapsed() < BUDGET,
        "the test took {:?}, over its budget of {BUDGET:?}",
        t0.elapsed()
    );
}
