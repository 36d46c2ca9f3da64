//! Forwarding survives the daemon: while a client keeps making requests to
//! the VIP, the daemon is SIGKILLed and restarted, then SIGTERMed and
//! restarted. No request may fail, XDP must stay attached while no daemon
//! runs, and a long-lived connection keeps its backend throughout. A
//! restart with an interface no longer listed detaches it and keeps the
//! rest. Needs root; see `common` for the topology.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const VIP: &str = "10.96.0.10:80";
const READY: Duration = Duration::from_secs(30);
const MIN_OK: usize = 200;

/// Sets the flag when dropped, so a panicking test still stops its client loop.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Tally {
    ok: Vec<Instant>,
    failed: Vec<(Instant, String)>,
}

fn assert_still_attached(topo: &Topology, when: &str) {
    for i in topo.lb_ifaces() {
        assert_eq!(
            topo.xdp_mode(&topo.lb_ns, &i).as_deref(),
            Some("native"),
            "XDP left {i} {when}{}",
            topo.ctx()
        );
    }
}

#[test]
fn forwarding_survives_daemon_kill_and_restart() {
    let topo = Topology::new("rst", TopoOpts { backends: 2 });
    topo.start_nginx();
    topo.warm_up(None);
    topo.xdp_pass_peers();
    let vip: SocketAddr = VIP.parse().unwrap();
    let cfg = topo.write_file(
        "meshlb.toml",
        &config_toml(&[Svc {
            name: "web",
            vip: Some("10.96.0.10"),
            proto: "tcp",
            port: 80,
            target: HTTP_PORT,
            backends: topo.backends.iter().map(|b| b.v4.into()).collect(),
        }]),
    );
    let mut daemon = topo.start_daemon(&cfg, "native");
    topo.wait_ready(&mut daemon, &["web"], READY);

    let mut long_lived = topo
        .client(|| KeepAlive::open(vip, Duration::from_secs(3)))
        .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));
    let first = long_lived
        .get()
        .unwrap_or_else(|e| panic!("{e}{}", topo.ctx()));

    let stop = AtomicBool::new(false);
    let tally = Mutex::new(Tally::default());
    let mut gaps = Vec::new();
    thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        s.spawn(|| {
            enter_netns(&topo.client_ns);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = http_get(vip, Duration::from_secs(1));
                let mut tl = tally.lock().unwrap();
                match r {
                    Ok(_) => tl.ok.push(t),
                    Err(e) => tl.failed.push((t, e)),
                }
                drop(tl);
                thread::sleep(Duration::from_millis(2));
            }
        });
        thread::sleep(Duration::from_secs(1));

        // Crash: SIGKILL, one second without a daemon, restart on the same pins.
        daemon.kill9();
        let dead = Instant::now();
        assert_still_attached(&topo, "after SIGKILL of the daemon");
        thread::sleep(Duration::from_secs(1).saturating_sub(dead.elapsed()));
        assert_still_attached(&topo, "one second after SIGKILL of the daemon");
        gaps.push(("SIGKILL", dead, Instant::now()));
        daemon = topo.start_daemon(&cfg, "native");
        topo.wait_ready(&mut daemon, &["web"], READY);
        thread::sleep(Duration::from_secs(1));

        // Orderly stop: SIGTERM must exit without detaching.
        daemon.signal(Signal::SIGTERM);
        let st = daemon.wait_exit(Duration::from_secs(10));
        assert!(
            st.is_some(),
            "daemon ignored SIGTERM for 10 s{}",
            topo.ctx()
        );
        let dead = Instant::now();
        assert!(
            st.unwrap().success(),
            "daemon exited with {st:?} on SIGTERM{}",
            topo.ctx()
        );
        assert_still_attached(&topo, "after SIGTERM of the daemon");
        thread::sleep(Duration::from_secs(1).saturating_sub(dead.elapsed()));
        gaps.push(("SIGTERM", dead, Instant::now()));
        daemon = topo.start_daemon(&cfg, "native");
        topo.wait_ready(&mut daemon, &["web"], READY);
        thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
    });

    let tl = tally.into_inner().unwrap();
    eprintln!(
        "requests across two daemon restarts: {} ok, {} failed",
        tl.ok.len(),
        tl.failed.len()
    );
    assert!(
        tl.failed.is_empty(),
        "{} of {} requests failed across daemon restarts; first: {:?}{}",
        tl.failed.len(),
        tl.ok.len() + tl.failed.len(),
        &tl.failed[..tl.failed.len().min(5)],
        topo.ctx()
    );
    assert!(
        tl.ok.len() >= MIN_OK,
        "only {} requests succeeded",
        tl.ok.len()
    );
    for (what, from, to) in gaps {
        let n = tl.ok.iter().filter(|t| **t >= from && **t <= to).count();
        assert!(
            n > 0,
            "no request was served while no daemon ran (after {what}){}",
            topo.ctx()
        );
    }

    let again = long_lived.get().unwrap_or_else(|e| {
        panic!(
            "long-lived connection broke across restarts: {e}{}",
            topo.ctx()
        )
    });
    assert_eq!(
        again, first,
        "long-lived connection changed backend across restarts"
    );
    assert!(daemon.is_running(), "restarted daemon died{}", topo.ctx());
    let st = topo.status();
    assert!(
        st["conntrack_entries"].as_u64().unwrap_or(0) > 0,
        "no conntrack entries after restarts: {st}{}",
        topo.ctx()
    );
}

#[test]
fn restart_without_an_interface_detaches_it_and_keeps_the_rest() {
    let topo = Topology::new("rsi", TopoOpts { backends: 2 });
    topo.start_nginx();
    topo.warm_up(None);
    let cfg = topo.write_file(
        "meshlb.toml",
        &config_toml(&[Svc {
            name: "web",
            vip: Some("10.96.0.10"),
            proto: "tcp",
            port: 80,
            target: HTTP_PORT,
            backends: vec![topo.backends[0].v4.into()],
        }]),
    );
    let ifaces = topo.lb_ifaces();
    let all: Vec<&str> = ifaces.iter().map(String::as_str).collect();
    let mut daemon = topo.start_daemon_on(&cfg, "generic", &all);
    topo.wait_ready_on(&mut daemon, &["web"], READY, &all);
    for i in &all {
        assert!(
            topo.xdp_mode(&topo.lb_ns, i).is_some(),
            "{i} not attached{}",
            topo.ctx()
        );
    }
    daemon.kill9();
    // The last interface (towards b2, which serves nothing) is dropped.
    let kept = &all[..all.len() - 1];
    let dropped = all[all.len() - 1];
    let mut daemon = topo.start_daemon_on(&cfg, "generic", kept);
    topo.wait_ready_on(&mut daemon, &["web"], READY, kept);
    assert_eq!(
        topo.xdp_mode(&topo.lb_ns, dropped),
        None,
        "{dropped} is no longer listed but XDP stayed{}",
        topo.ctx()
    );
    for i in kept {
        assert!(
            topo.xdp_mode(&topo.lb_ns, i).is_some(),
            "{i} lost XDP{}",
            topo.ctx()
        );
    }
    let vip: SocketAddr = VIP.parse().unwrap();
    let body = topo
        .client(|| http_get(vip, Duration::from_secs(3)))
        .unwrap_or_else(|e| panic!("VIP after restart: {e}{}", topo.ctx()));
    assert_eq!(body.trim(), "b1", "{}", topo.ctx());
}

/// Two daemons on one pin directory would each delete the other's map
/// entries as drift: the second exits 2 at once, naming the first's pid,
/// and the first keeps serving.
#[test]
fn a_second_daemon_on_the_same_pin_directory_exits_2_naming_the_first() {
    let topo = Topology::new("lck", TopoOpts { backends: 1 });
    topo.start_nginx();
    topo.warm_up(None);
    topo.xdp_pass_peers();
    let cfg = topo.write_file(
        "meshlb.toml",
        &config_toml(&[Svc {
            name: "web",
            vip: Some("10.96.0.10"),
            proto: "tcp",
            port: 80,
            target: HTTP_PORT,
            backends: vec![topo.backends[0].v4.into()],
        }]),
    );
    let mut first = topo.start_daemon(&cfg, "native");
    topo.wait_ready(&mut first, &["web"], READY);
    let mut second = topo.start_daemon(&cfg, "native");
    let status = second
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the second daemon still runs after 20 s{}", topo.ctx()));
    let log = std::fs::read_to_string(&second.log).unwrap_or_default();
    assert_eq!(status.code(), Some(2), "second daemon: {log}");
    let want = format!("pid {}", first.pid());
    assert!(
        log.contains(&want) && log.lines().count() == 1,
        "the second daemon must say in one line who holds the pin directory ({want}): {log:?}"
    );
    assert!(
        first.wait_exit(Duration::from_millis(1)).is_none(),
        "the first daemon died{}",
        topo.ctx()
    );
    let vip: SocketAddr = VIP.parse().unwrap();
    let body = topo
        .client(|| http_get(vip, Duration::from_secs(3)))
        .unwrap_or_else(|e| panic!("VIP with the second daemon refused: {e}{}", topo.ctx()));
    assert_eq!(body.trim(), "b1", "{}", topo.ctx());
}
