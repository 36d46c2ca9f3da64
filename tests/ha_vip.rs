//! Highly available VIPs (SPEC "Highly available VIPs") on the three-node
//! netns cluster of `common::mesh`, with etcd on the switch (10.210.0.250)
//! and the client resolving VIPs on-link, as a host on the nodes' segment:
//! services created with `--announce`, each daemon run with
//! `--announce-iface <its uplink>`.
//!
//! Covered: the probes themselves against the kernel (who answers ARP and
//! neighbour solicitation, gratuitous announcements, the client's
//! neighbour entries); three VIPs spread one per node, etcd
//! (`vips/<ip>`, `vips/candidates/<node>` under one lease), `status --json`
//! and `/metrics` agreeing; a SIGKILLed owner replaced within 5 s with
//! at most 3 s of failed requests, gratuitous ARPs from the new owner and
//! the client moved to it; the killed node's return spread again without
//! flapping and with no stale answer; an owner whose uplink loses carrier
//! replaced with at most 3 s of failed requests; an owner cut off from
//! etcd stops answering ARP and NDP within the lease TTL, never beside
//! another owner, and another node takes over (unsolicited NA for IPv6).
//! Needs root, etcd and nginx.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::arp::{
    arp_who_has, link_mac, mac_str, macs_str, neigh_mac, ns_who_has, Announced, Announcement,
    Capture, Mac, PROBE_V4, PROBE_V6,
};
use common::etcd::{b64_decode, EtcdClient, EtcdServer};
use common::mesh::{Mesh, ALL};
use common::{enter_netns, http_get, http_get_path, in_netns, must, wait_for, Proc};
use serde_json::Value;

/// The switch bridge's address: etcd listens there.
const ETCD_HOST: &str = "10.210.0.250";
const PREFIX: &str = "/meshlb/v1";
/// How long a probe collects answers (the answer of a kernel on the same
/// switch takes well under a millisecond).
const PROBE_WAIT: Duration = Duration::from_millis(80);
/// The client's request loop: a new request this often, each with this
/// timeout.
const REQ_EVERY: Duration = Duration::from_millis(50);
const REQ_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest run of failed requests a failover may cost.
const MAX_GAP: Duration = Duration::from_secs(3);
/// Until every node has its share of the VIPs after the daemons start.
const SPREAD_WITHIN: Duration = Duration::from_secs(20);
/// The etcd cut is sampled this often (one ARP and one NDP probe).
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// An owner losing carrier drops the VIP "at once": at the latest when
/// it would have to fence itself for want of etcd.
const RESIGN_WITHIN: Duration = Duration::from_millis(1500);
/// A request loop never runs longer than this.
const LOOP_MAX: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// The cluster

/// Who owns a VIP, as etcd records it (`vips/<ip>`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Owner {
    /// Index into `Mesh::nodes`.
    node: usize,
    since: String,
    lease: i64,
}

type Owners = BTreeMap<IpAddr, Owner>;

/// One VIP as `status --json` reports it.
#[derive(Debug)]
struct StatusVip {
    owner: Option<String>,
    mine: bool,
}

/// The mesh with etcd on the switch, one announced service per VIP over
/// every task, and a daemon per node.
struct Ha<'m> {
    m: &'m Mesh,
    /// Before `etcd`: dropped (killed) first.
    daemons: Vec<Proc>,
    etcd: EtcdServer,
    c: EtcdClient,
    vips: Vec<IpAddr>,
    /// `webK` for the `k`th VIP.
    services: Vec<String>,
    /// (service, task name) -> task id.
    task_ids: BTreeMap<(String, String), String>,
    /// The nodes' uplink MACs.
    macs: Vec<Mac>,
}

impl<'m> Ha<'m> {
    /// etcd on the switch, the client's VIP routes on-link, a service
    /// `webK` (`--publish 80+K:8000 --vip VIP --announce`: a published
    /// port is also every node's port, so each service has its own) over
    /// t1..t4 (each with its node) for every VIP, then a daemon per node,
    /// each ready.
    fn start(m: &'m Mesh, tag: &str, vips: &[&str]) -> Ha<'m> {
        m.sw_addr(&format!("{ETCD_HOST}/24"));
        m.client_vips_on_link();
        let etcd = EtcdServer::start_on(&m.sw_ns, &format!("ha-{tag}"), ETCD_HOST);
        let c = etcd.client();
        let macs = m.nodes.iter().map(|n| link_mac(&n.ns, &n.eth)).collect();
        let mut ha = Ha {
            m,
            daemons: Vec::new(),
            etcd,
            c,
            vips: vips.iter().map(|v| v.parse().unwrap()).collect(),
            services: Vec::new(),
            task_ids: BTreeMap::new(),
            macs,
        };
        for (k, vip) in vips.iter().enumerate() {
            let svc = format!("web{k}");
            let publish = format!("{}:8000", 80 + k);
            ha.cli(&[
                "service",
                "create",
                &svc,
                "--publish",
                &publish,
                "--vip",
                vip,
                "--announce",
            ]);
            let v6 = ha.vips[k].is_ipv6();
            for name in ALL {
                let t = m.task(name);
                let addr = if v6 {
                    format!("[{}]:8000", t.v6)
                } else {
                    format!("{}:8000", t.v4)
                };
                let node = m.nodes[t.node].name.clone();
                let out = ha.cli(&["task", "add", &svc, &addr, "--node", &node]);
                let id = out
                    .lines()
                    .last()
                    .and_then(|l| l.split_whitespace().next())
                    .unwrap_or_else(|| panic!("task add printed no id: {out:?}"))
                    .to_string();
                ha.task_ids.insert((svc.clone(), name.to_string()), id);
            }
            ha.services.push(svc);
        }
        for i in 0..m.nodes.len() {
            let d = ha.spawn(i);
            ha.daemons.push(d);
        }
        for i in 0..m.nodes.len() {
            ha.wait_ready(i);
        }
        ha
    }

    /// `meshlb run --etcd URL --announce-iface <uplink>` on node `i` (with
    /// `--iface` for its uplink and task bridge).
    fn spawn(&self, i: usize) -> Proc {
        let url = self.etcd.url();
        let eth = self.m.nodes[i].eth.clone();
        self.m
            .start_daemon_args(i, &["--etcd", &url, "--announce-iface", &eth])
    }

    fn wait_ready(&mut self, i: usize) {
        let svcs: Vec<&str> = self.services.iter().map(String::as_str).collect();
        self.m.wait_ready(i, &mut self.daemons[i], &svcs);
    }

    /// A `meshlb` client command against the test's etcd; must succeed.
    fn cli(&self, args: &[&str]) -> String {
        let out = self.c.meshlb(args);
        assert!(
            out.success(),
            "meshlb client command failed: {}{}",
            out.describe(),
            self.m.ctx()
        );
        out.stdout
    }

    fn name(&self, i: usize) -> &str {
        &self.m.nodes[i].name
    }

    fn node_index(&self, name: &str) -> Option<usize> {
        self.m.nodes.iter().position(|n| n.name == name)
    }

    /// `n2 (aa:bb:..)` for a node's uplink MAC, `aa:bb:.. (no node)` else.
    fn who(&self, mac: Mac) -> String {
        match self.macs.iter().position(|m| *m == mac) {
            Some(i) => format!("{} ({})", self.name(i), mac_str(mac)),
            None => format!("{} (no node)", mac_str(mac)),
        }
    }

    fn who_set(&self, set: &BTreeSet<Mac>) -> String {
        let v: Vec<String> = set.iter().map(|m| self.who(*m)).collect();
        format!("{{{}}}", v.join(", "))
    }

    fn show(&self, o: &Owners) -> String {
        let v: Vec<String> = o
            .iter()
            .map(|(vip, w)| format!("{vip} -> {} (since {})", self.name(w.node), w.since))
            .collect();
        v.join(", ")
    }

    /// Keys under `PREFIX/<sub>/` (the rest of the key) with value and
    /// lease id.
    fn etcd_records(&self, sub: &str) -> Result<BTreeMap<String, (String, i64)>, String> {
        let prefix = format!("{PREFIX}/{sub}/");
        let out = self
            .c
            .etcdctl(&["get", "--prefix", "-w", "json", "--", &prefix]);
        if !out.success() {
            return Err(out.describe());
        }
        let v: Value = serde_json::from_str(&out.stdout)
            .map_err(|e| format!("etcdctl get -w json is not JSON ({e}): {}", out.stdout))?;
        let mut m = BTreeMap::new();
        for kv in v["kvs"].as_array().cloned().unwrap_or_default() {
            let dec = |f: &str| {
                String::from_utf8_lossy(&b64_decode(kv[f].as_str().unwrap_or(""))).into_owned()
            };
            let key = dec("key");
            let rest = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
            m.insert(rest, (dec("value"), kv["lease"].as_i64().unwrap_or(0)));
        }
        Ok(m)
    }

    /// The owner of every VIP as etcd records it.
    fn etcd_owners(&self) -> Result<Owners, String> {
        let recs = self.etcd_records("vips")?;
        let mut o = Owners::new();
        for vip in &self.vips {
            let (text, lease) = recs
                .iter()
                .find(|(k, _)| k.parse::<IpAddr>().ok() == Some(*vip))
                .map(|(_, v)| v.clone())
                .ok_or_else(|| format!("etcd has no {PREFIX}/vips/{vip} (vips: {recs:?})"))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| format!("{PREFIX}/vips/{vip} is not JSON ({e}): {text}"))?;
            let node = v["node"]
                .as_str()
                .ok_or_else(|| format!("{PREFIX}/vips/{vip} has no \"node\": {text}"))?;
            let since = v["since"]
                .as_str()
                .filter(|s| s.contains('T'))
                .ok_or_else(|| format!("{PREFIX}/vips/{vip} has no RFC 3339 \"since\": {text}"))?;
            if lease == 0 {
                return Err(format!("{PREFIX}/vips/{vip} is not under a lease: {text}"));
            }
            let node = self
                .node_index(node)
                .ok_or_else(|| format!("{PREFIX}/vips/{vip} names no node of the mesh: {text}"))?;
            o.insert(
                *vip,
                Owner {
                    node,
                    since: since.to_string(),
                    lease,
                },
            );
        }
        Ok(o)
    }

    /// The owners when etcd and the `status --json` of every node of
    /// `live` agree on each VIP (owner, and `mine` exactly on the owner).
    fn owners(&self, live: &[usize]) -> Result<Owners, String> {
        let o = self.etcd_owners()?;
        for &i in live {
            let st = self.m.try_status(i)?;
            let sv = status_vips(&st).map_err(|e| format!("{}: {e}", self.name(i)))?;
            for (vip, w) in &o {
                let got = sv
                    .get(vip)
                    .ok_or_else(|| format!("{} status lists no VIP {vip}: {sv:?}", self.name(i)))?;
                let owner = self.name(w.node);
                if got.owner.as_deref() != Some(owner) || got.mine != (w.node == i) {
                    return Err(format!(
                        "{} status says {vip}: owner {:?}, mine {}; etcd says {owner}",
                        self.name(i),
                        got.owner,
                        got.mine
                    ));
                }
            }
        }
        Ok(o)
    }

    /// Waits until etcd and the status of `live` agree and `ok` holds;
    /// returns the owners and the time since `from`. Panics with what was
    /// last seen at `from + within`.
    fn wait_owners(
        &self,
        live: &[usize],
        from: Instant,
        within: Duration,
        what: &str,
        ok: impl Fn(&Owners) -> Result<(), String>,
    ) -> (Owners, Duration) {
        let left = (from + within).saturating_duration_since(Instant::now());
        let r = wait_for(left, what, || {
            let o = self.owners(live)?;
            ok(&o).map_err(|e| format!("{e}; owners: {}", self.show(&o)))?;
            Ok(o)
        });
        match r {
            Ok(o) => (o, from.elapsed()),
            Err(e) => panic!("{e}{}", self.m.ctx()),
        }
    }

    /// Each of `nodes` owns exactly one VIP.
    fn one_each(&self, o: &Owners, nodes: &[usize]) -> Result<(), String> {
        for &i in nodes {
            let n = o.values().filter(|w| w.node == i).count();
            if n != 1 {
                return Err(format!("{} owns {n} VIPs", self.name(i)));
            }
        }
        Ok(())
    }

    /// Every node of `live` (and none other) is a candidate
    /// (`vips/candidates/<node>`), and each VIP's record shares its owner's
    /// lease.
    fn check_candidates(&self, o: &Owners, live: &[usize]) -> Result<(), String> {
        let recs = self.etcd_records("vips/candidates")?;
        let want: BTreeSet<&str> = live.iter().map(|&i| self.name(i)).collect();
        let got: BTreeSet<&str> = recs.keys().map(String::as_str).collect();
        if got != want {
            return Err(format!(
                "{PREFIX}/vips/candidates/ holds {got:?}, want {want:?}: {recs:?}"
            ));
        }
        for (vip, w) in o {
            let lease = recs.get(self.name(w.node)).map_or(0, |r| r.1);
            if lease != w.lease {
                return Err(format!(
                    "{PREFIX}/vips/{vip} is under lease {:x}, its owner's announcer under {lease:x}",
                    w.lease
                ));
            }
        }
        Ok(())
    }

    /// One request to the VIP's service from the client succeeds, and the
    /// client's kernel then holds node `owner`'s uplink MAC for the VIP.
    fn check_served(&self, vip: IpAddr, owner: usize, when: &str) {
        let dst = self.frontend(vip);
        let r = self.m.client(|| http_get(dst, Duration::from_secs(3)));
        match r {
            Ok(body) if ALL.contains(&body.as_str()) => {}
            other => panic!(
                "{when}: GET http://{dst}/ from the client: {other:?} (owner {}){}",
                self.name(owner),
                self.m.ctx()
            ),
        }
        self.wait_neigh(vip, owner, Instant::now(), Duration::from_secs(2), when);
    }

    /// Waits until the client's neighbour entry for `vip` is node
    /// `owner`'s uplink MAC; the time since `from`.
    fn wait_neigh(
        &self,
        vip: IpAddr,
        owner: usize,
        from: Instant,
        within: Duration,
        when: &str,
    ) -> Duration {
        let iface = self.m.client_iface();
        let want = self.macs[owner];
        let left = (from + within).saturating_duration_since(Instant::now());
        let r = wait_for(left, "the client's neighbour entry", || {
            match neigh_mac(&self.m.client_ns, &iface, vip) {
                Some(m) if m == want => Ok(()),
                Some(m) => Err(format!("it holds {}", self.who(m))),
                None => Err("it holds no MAC".into()),
            }
        });
        if let Err(e) = r {
            panic!(
                "the client's neighbour entry for {vip} is not {}'s uplink {} within {within:?} of {when}: {e}{}",
                self.name(owner),
                mac_str(want),
                self.m.ctx()
            );
        }
        from.elapsed()
    }

    /// `/metrics` of every node of `live` agrees with `o`: the owner
    /// exports `meshlb_vip_owner{vip,node=<itself>} 1`, and no node
    /// exports 1 for another node.
    fn check_metrics(&self, o: &Owners, live: &[usize]) {
        for &i in live {
            let r = wait_for(Duration::from_secs(5), "meshlb_vip_owner", || {
                let rows = vip_owner_rows(self.m, i)?;
                for (vip, w) in o {
                    let owner = self.name(w.node);
                    for (v, node, val) in &rows {
                        if v == vip && *val == 1.0 && node != owner {
                            return Err(format!(
                                "meshlb_vip_owner{{vip=\"{vip}\",node=\"{node}\"}} 1, owner is {owner}: {rows:?}"
                            ));
                        }
                    }
                    let has = rows
                        .iter()
                        .any(|(v, node, val)| v == vip && node == owner && *val == 1.0);
                    if w.node == i && !has {
                        return Err(format!(
                            "no meshlb_vip_owner{{vip=\"{vip}\",node=\"{owner}\"}} 1: {rows:?}"
                        ));
                    }
                }
                Ok(())
            });
            if let Err(e) = r {
                panic!("/metrics of {}: {e}{}", self.name(i), self.m.ctx());
            }
            // The election's keys (`vips/...`) are no records of the
            // desired state: never counted as bad keys.
            let text = in_netns(&self.m.nodes[i].ns, || {
                http_get_path(
                    "127.0.0.1:9742".parse().unwrap(),
                    "/metrics",
                    Duration::from_secs(2),
                )
            })
            .unwrap_or_else(|e| panic!("/metrics of {}: {e}", self.name(i)));
            let bad: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("meshlb_config_errors_total{kind=\"key\"}"))
                .filter(|l| !l.ends_with(" 0"))
                .collect();
            assert!(
                bad.is_empty(),
                "/metrics of {}: etcd keys counted as bad: {bad:?}{}",
                self.name(i),
                self.m.ctx()
            );
        }
    }

    /// Samples etcd and the status of `live` every 250 ms for `dur`: the
    /// owners (and their `since`) never differ from `base`.
    fn hold_steady(&self, base: &Owners, live: &[usize], dur: Duration) {
        let start = Instant::now();
        let mut samples = 0;
        while start.elapsed() < dur {
            let tick = Instant::now();
            match self.owners(live) {
                Ok(o) if o == *base => {}
                Ok(o) => panic!(
                    "owners changed {:?} into the steady state: {} -> {}{}",
                    start.elapsed(),
                    self.show(base),
                    self.show(&o),
                    self.m.ctx()
                ),
                Err(e) => panic!(
                    "{:?} into the steady state etcd and status disagree: {e}{}",
                    start.elapsed(),
                    self.m.ctx()
                ),
            }
            samples += 1;
            thread::sleep(Duration::from_millis(250).saturating_sub(tick.elapsed()));
        }
        eprintln!(
            "steady for {dur:?}: {samples} samples of etcd and status, no owner changed ({})",
            self.show(base)
        );
    }

    /// The `k`th VIP of the test.
    fn vip_of(&self, k: usize) -> IpAddr {
        self.vips[k]
    }

    /// The VIP with its service's published port.
    fn frontend(&self, vip: IpAddr) -> SocketAddr {
        let k = self.vips.iter().position(|v| *v == vip).unwrap();
        SocketAddr::new(vip, 80 + k as u16)
    }
}

/// The `vips` of `status --json`, by VIP.
fn status_vips(st: &Value) -> Result<BTreeMap<IpAddr, StatusVip>, String> {
    let arr = st["vips"].as_array().ok_or_else(|| {
        let keys: Vec<&String> = st
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        format!("status --json has no \"vips\" array (top-level keys {keys:?})")
    })?;
    let mut m = BTreeMap::new();
    for e in arr {
        let vip = e["vip"]
            .as_str()
            .and_then(|s| s.parse::<IpAddr>().ok())
            .ok_or_else(|| format!("status vips entry without a valid \"vip\": {e}"))?;
        let owner = match &e["owner"] {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => return Err(format!("status vips {vip}: \"owner\" is {other}")),
        };
        let mine = e["mine"]
            .as_bool()
            .ok_or_else(|| format!("status vips {vip}: no boolean \"mine\": {e}"))?;
        m.insert(vip, StatusVip { owner, mine });
    }
    Ok(m)
}

/// The `meshlb_vip_owner` series of node `i`: (vip, node, value).
fn vip_owner_rows(m: &Mesh, i: usize) -> Result<Vec<(IpAddr, String, f64)>, String> {
    let text = in_netns(&m.nodes[i].ns, || {
        http_get_path(
            "127.0.0.1:9742".parse().unwrap(),
            "/metrics",
            Duration::from_secs(2),
        )
    })?;
    let mut rows = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("meshlb_vip_owner{") else {
            continue;
        };
        let bad = || format!("malformed line {line:?}");
        let (labels, value) = rest.split_once('}').ok_or_else(bad)?;
        let mut vip = None;
        let mut node = None;
        for l in labels.split(',').filter(|l| !l.is_empty()) {
            let (k, v) = l.split_once('=').ok_or_else(bad)?;
            let v = v.trim_matches('"');
            match k.trim() {
                "vip" => vip = v.parse::<IpAddr>().ok(),
                "node" => node = Some(v.to_string()),
                _ => {}
            }
        }
        let val: f64 = value.trim().parse().map_err(|_| bad())?;
        rows.push((vip.ok_or_else(bad)?, node.ok_or_else(bad)?, val));
    }
    Ok(rows)
}

/// Whether `ip` is an address of `iface` in `ns`.
fn addr_on(ns: &str, iface: &str, ip: IpAddr) -> bool {
    let out = must(&["ip", "-n", ns, "-j", "addr", "show", "dev", iface]);
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    v[0]["addr_info"].as_array().is_some_and(|a| {
        a.iter()
            .any(|x| x["local"].as_str().and_then(|s| s.parse().ok()) == Some(ip))
    })
}

// ---------------------------------------------------------------------------
// The client's request loop

/// One request of the loop.
#[derive(Clone, Debug)]
struct Attempt {
    start: Instant,
    end: Instant,
    ok: bool,
    /// The answering task, or the error.
    what: String,
}

/// From the client, a new `GET /` (its own connection, 1 s timeout) every
/// 50 ms, each on a thread of its own so that one lost request does not
/// hold back the next.
struct RequestLoop {
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    started: Instant,
}

impl RequestLoop {
    fn start(ns: &str, dst: SocketAddr) -> RequestLoop {
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (at, st, ns) = (attempts.clone(), stop.clone(), ns.to_string());
        let handle = thread::spawn(move || {
            let end = Instant::now() + LOOP_MAX;
            let mut next = Instant::now();
            let mut workers: Vec<JoinHandle<()>> = Vec::new();
            while !st.load(Ordering::Relaxed) && Instant::now() < end {
                let (at, ns) = (at.clone(), ns.clone());
                workers.push(thread::spawn(move || {
                    enter_netns(&ns);
                    let start = Instant::now();
                    let r = http_get(dst, REQ_TIMEOUT);
                    let end = Instant::now();
                    let (ok, what) = match r {
                        Ok(body) => (ALL.contains(&body.as_str()), body),
                        Err(e) => (false, e),
                    };
                    at.lock().unwrap().push(Attempt {
                        start,
                        end,
                        ok,
                        what,
                    });
                }));
                workers.retain(|w| !w.is_finished());
                next += REQ_EVERY;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            for w in workers {
                let _ = w.join();
            }
        });
        RequestLoop {
            attempts,
            stop,
            handle: Some(handle),
            started: Instant::now(),
        }
    }

    /// Successful requests that started after `t`.
    fn successes_after(&self, t: Instant) -> usize {
        self.attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.ok && a.start >= t)
            .count()
    }

    /// Waits until `n` requests started after `t` have succeeded.
    fn wait_successes(&self, t: Instant, n: usize, within: Duration) -> Result<(), String> {
        wait_for(within, "requests to succeed", || {
            let got = self.successes_after(t);
            if got >= n {
                Ok(())
            } else {
                Err(format!("{got} of {n} succeeded"))
            }
        })
    }

    /// Stops the loop; every attempt, by start.
    fn stop(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let mut v = self.attempts.lock().unwrap().clone();
        v.sort_by_key(|a| a.start);
        v
    }
}

impl Drop for RequestLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The failures of a request loop.
#[derive(Debug)]
struct Outage {
    /// The longest run of failures: from the end of the last success
    /// before it to the end of the first success after it.
    longest: Duration,
    /// When that run's first failed request started, since the loop began.
    longest_at: Duration,
    failed: usize,
    total: usize,
    /// Failures at the end with no success after them.
    unrecovered: bool,
    first_error: Option<String>,
}

fn outage(attempts: &[Attempt], started: Instant) -> Outage {
    let mut o = Outage {
        longest: Duration::ZERO,
        longest_at: Duration::ZERO,
        failed: 0,
        total: attempts.len(),
        unrecovered: false,
        first_error: None,
    };
    let mut last_ok: Option<Instant> = None;
    // (reference time, start of the first failure)
    let mut run: Option<(Instant, Instant)> = None;
    for a in attempts {
        if a.ok {
            if let Some((from, first)) = run.take() {
                let gap = a.end.saturating_duration_since(from);
                if gap > o.longest {
                    o.longest = gap;
                    o.longest_at = first.saturating_duration_since(started);
                }
            }
            last_ok = Some(last_ok.map_or(a.end, |l| l.max(a.end)));
        } else {
            o.failed += 1;
            o.first_error.get_or_insert_with(|| a.what.clone());
            if run.is_none() {
                run = Some((last_ok.unwrap_or(a.start), a.start));
            }
        }
    }
    if let Some((from, first)) = run {
        o.unrecovered = true;
        let end = attempts.iter().map(|a| a.end).max().unwrap_or(from);
        let gap = end.saturating_duration_since(from);
        if gap > o.longest {
            o.longest = gap;
            o.longest_at = first.saturating_duration_since(started);
        }
    }
    o
}

// ---------------------------------------------------------------------------
// Small helpers

/// A test's time budget, checked between phases.
struct Budget {
    name: &'static str,
    start: Instant,
    limit: Duration,
}

impl Budget {
    fn new(name: &'static str, limit: Duration) -> Budget {
        Budget {
            name,
            start: Instant::now(),
            limit,
        }
    }

    fn check(&self, phase: &str) {
        let t = self.start.elapsed();
        eprintln!("[{}] {phase} at {t:?}", self.name);
        assert!(
            t <= self.limit,
            "{}: {phase} reached after {t:?}, over the test's budget of {:?}",
            self.name,
            self.limit
        );
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// The announcements of `vip` by `mac` at or after `t`.
fn announced_by(
    cap: &Capture,
    vip: IpAddr,
    mac: Mac,
    t: Instant,
    kind: impl Fn(Announced) -> bool,
) -> Vec<Announcement> {
    cap.seen(vip)
        .into_iter()
        .filter(|a| a.mac == mac && a.at >= t && kind(a.kind))
        .collect()
}

fn offsets(v: &[Announcement], from: Instant) -> Vec<String> {
    v.iter()
        .map(|a| format!("{} ms", a.at.saturating_duration_since(from).as_millis()))
        .collect()
}

// ---------------------------------------------------------------------------
// The probes against the kernel

/// The helpers of `common::arp` against what the kernel does today: an
/// ARP or NDP probe for a node's address is answered by exactly that
/// node's uplink, for an unused address by nobody, for an address two
/// nodes hold by both; a kernel's gratuitous ARP and unsolicited NA (on a
/// MAC change, with `arp_notify`/`ndisc_notify`) are captured with the
/// new MAC and move the client's neighbour entries, which the probes
/// (from an address of their own) never touch.
#[test]
fn arp_probe_sees_exactly_the_owner_of_an_address() {
    let budget = Budget::new("arp_probe", Duration::from_secs(60));
    let m = Mesh::new("p");
    let (c, iface) = (m.client_ns.clone(), m.client_iface());
    let macs: Vec<Mac> = m.nodes.iter().map(|n| link_mac(&n.ns, &n.eth)).collect();
    let distinct: BTreeSet<Mac> = macs.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "uplink MACs not distinct: {macs:?}");
    let one = |mac: Mac| BTreeSet::from([mac]);

    for (i, n) in m.nodes.iter().enumerate() {
        let got = arp_who_has(&c, &iface, PROBE_V4, n.v4, PROBE_WAIT);
        assert_eq!(
            got,
            one(macs[i]),
            "ARP for {} ({}'s address) answered by {}, want {}",
            n.v4,
            n.name,
            macs_str(&got),
            mac_str(macs[i])
        );
        let got = ns_who_has(&c, &iface, PROBE_V6, n.v6, PROBE_WAIT);
        assert_eq!(
            got,
            one(macs[i]),
            "NS for {} ({}'s address) answered by {}, want {}",
            n.v6,
            n.name,
            macs_str(&got),
            mac_str(macs[i])
        );
    }
    // From the client's own addresses (its own MAC) too.
    let got = arp_who_has(&c, &iface, m.client_v4, m.nodes[0].v4, PROBE_WAIT);
    assert_eq!(got, one(macs[0]), "ARP from the client's own address");
    let got = ns_who_has(&c, &iface, m.client_v6, m.nodes[0].v6, PROBE_WAIT);
    assert_eq!(got, one(macs[0]), "NS from the client's own address");

    // Nobody holds it: no answer; two nodes hold it: both answer.
    let (un4, un6) = (
        Ipv4Addr::new(10, 210, 0, 77),
        Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 0x77),
    );
    let got = arp_who_has(&c, &iface, PROBE_V4, un4, PROBE_WAIT);
    assert!(
        got.is_empty(),
        "ARP for unused {un4} answered by {}",
        macs_str(&got)
    );
    let got = ns_who_has(&c, &iface, PROBE_V6, un6, PROBE_WAIT);
    assert!(
        got.is_empty(),
        "NS for unused {un6} answered by {}",
        macs_str(&got)
    );
    for n in &m.nodes[1..] {
        must(&[
            "ip",
            "-n",
            &n.ns,
            "addr",
            "add",
            &format!("{un4}/32"),
            "dev",
            &n.eth,
        ]);
        must(&[
            "ip",
            "-n",
            &n.ns,
            "addr",
            "add",
            &format!("{un6}/128"),
            "dev",
            &n.eth,
            "nodad",
        ]);
    }
    let both = BTreeSet::from([macs[1], macs[2]]);
    let got = arp_who_has(&c, &iface, PROBE_V4, un4, PROBE_WAIT);
    assert_eq!(
        got,
        both,
        "ARP for {un4} held by n2 and n3: {}",
        macs_str(&got)
    );
    let got = ns_who_has(&c, &iface, PROBE_V6, un6, PROBE_WAIT);
    assert_eq!(
        got,
        both,
        "NS for {un6} held by n2 and n3: {}",
        macs_str(&got)
    );
    budget.check("probes");

    // The client's kernel learns n3's addresses by sending to them.
    let n3 = m.nodes[2].clone();
    for ip in [IpAddr::V4(n3.v4), IpAddr::V6(n3.v6)] {
        let r = wait_for(Duration::from_secs(5), "the client to resolve n3", || {
            m.client(|| {
                let bind: SocketAddr = if ip.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
                    .parse()
                    .unwrap();
                let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
                s.send_to(b"x", SocketAddr::new(ip, 9))
                    .map_err(|e| e.to_string())
            })?;
            thread::sleep(Duration::from_millis(50));
            match neigh_mac(&c, &iface, ip) {
                Some(mac) if mac == macs[2] => Ok(()),
                other => Err(format!("neighbour {ip}: {other:?}")),
            }
        });
        r.unwrap_or_else(|e| panic!("{e}"));
    }
    // n3 takes another MAC silently: the probes see it, and the client's
    // entries keep the old one (n3 answers a probe at the probe's MAC).
    let quiet: Mac = [0x02, 0, 0, 0, 0, 0x33];
    let set_mac = |mac: Mac| {
        must(&[
            "ip",
            "-n",
            &n3.ns,
            "link",
            "set",
            "dev",
            &n3.eth,
            "address",
            &mac_str(mac),
        ]);
    };
    set_mac(quiet);
    let got = arp_who_has(&c, &iface, PROBE_V4, n3.v4, PROBE_WAIT);
    assert_eq!(got, one(quiet), "ARP for n3 after a silent MAC change");
    let got = ns_who_has(&c, &iface, PROBE_V6, n3.v6, PROBE_WAIT);
    assert_eq!(got, one(quiet), "NS for n3 after a silent MAC change");
    for ip in [IpAddr::V4(n3.v4), IpAddr::V6(n3.v6)] {
        assert_eq!(
            neigh_mac(&c, &iface, ip).map(mac_str),
            Some(mac_str(macs[2])),
            "the client's entry for {ip} after probes answered by {}",
            mac_str(quiet)
        );
    }

    // Then it takes a new MAC and tells the segment (arp_notify,
    // ndisc_notify).
    let cap = Capture::start(&c, &iface);
    let new: Mac = [0x02, 0, 0, 0, 0, 0x34];
    let t = Instant::now();
    must(&[
        "ip",
        "netns",
        "exec",
        &n3.ns,
        "sysctl",
        "-qw",
        &format!("net.ipv4.conf.{}.arp_notify=1", n3.eth),
        &format!("net.ipv6.conf.{}.ndisc_notify=1", n3.eth),
    ]);
    set_mac(new);
    let r = wait_for(Duration::from_secs(3), "n3's announcements", || {
        let garp = announced_by(&cap, n3.v4.into(), new, t, |k| k == Announced::ArpRequest);
        let na = announced_by(&cap, n3.v6.into(), new, t, |k| {
            k == Announced::Na {
                override_flag: true,
                to_all_nodes: true,
            }
        });
        if garp.is_empty() || na.is_empty() {
            return Err(format!(
                "{} gratuitous ARPs for {}, {} unsolicited NAs (override, to ff02::1) for {}; all seen: {:?}",
                garp.len(),
                n3.v4,
                na.len(),
                n3.v6,
                cap.all()
            ));
        }
        Ok(())
    });
    r.unwrap_or_else(|e| panic!("{e}"));
    for ip in [IpAddr::V4(n3.v4), IpAddr::V6(n3.v6)] {
        let r = wait_for(
            Duration::from_secs(2),
            "the client's entry to move",
            || match neigh_mac(&c, &iface, ip) {
                Some(mac) if mac == new => Ok(()),
                other => Err(format!("neighbour {ip}: {:?}", other.map(mac_str))),
            },
        );
        r.unwrap_or_else(|e| panic!("{e}"));
    }
    let got = arp_who_has(&c, &iface, PROBE_V4, n3.v4, PROBE_WAIT);
    assert_eq!(got, one(new), "ARP for n3 after its MAC change");
    let got = ns_who_has(&c, &iface, PROBE_V6, n3.v6, PROBE_WAIT);
    assert_eq!(got, one(new), "NS for n3 after its MAC change");
    let all = cap.stop();
    eprintln!(
        "announcements seen: {:?}",
        all.iter()
            .map(|a| format!("{} {} {:?}", a.ip, mac_str(a.mac), a.kind))
            .collect::<Vec<_>>()
    );
    budget.check("capture");
}

// ---------------------------------------------------------------------------
// The product

/// Three nodes, three announced VIPs: one each. A killed owner's VIP
/// moves to a survivor within 5 s with at most 3 s of failed requests,
/// announced by gratuitous ARPs the client follows; the node's return
/// spreads them again and then nothing flaps.
#[test]
fn three_vips_are_spread_and_a_killed_owner_is_replaced() {
    let budget = Budget::new("spread_and_kill", Duration::from_secs(170));
    let m = Mesh::new("s");
    let mut ha = Ha::start(&m, "s", &["10.96.0.10", "10.96.0.11", "10.96.0.12"]);
    budget.check("cluster ready");
    let all = [0, 1, 2];
    let t0 = Instant::now();
    let (owners, took) = ha.wait_owners(&all, t0, SPREAD_WITHIN, "one VIP per node", |o| {
        ha.one_each(o, &all)
    });
    eprintln!(
        "spread {took:?} after the daemons were ready: {}",
        ha.show(&owners)
    );
    if let Err(e) = ha.check_candidates(&owners, &all) {
        panic!("{e}{}", m.ctx());
    }
    for (vip, w) in &owners {
        ha.check_served(*vip, w.node, "after the start");
    }
    ha.check_metrics(&owners, &all);
    budget.check("spread");

    // The owner of the first VIP is SIGKILLed under a request loop.
    let vip = ha.vip_of(0);
    let old = owners[&vip].node;
    let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != old).collect();
    let cap = Capture::start(&m.client_ns, &m.client_iface());
    let lp = RequestLoop::start(&m.client_ns, ha.frontend(vip));
    if let Err(e) = lp.wait_successes(lp.started, 10, Duration::from_secs(5)) {
        panic!("the request loop to {vip} before the kill: {e}{}", m.ctx());
    }
    let t_kill = Instant::now();
    ha.daemons[old].kill9();
    let (after, took) = ha.wait_owners(
        &survivors,
        t_kill,
        Duration::from_secs(5),
        &format!("a survivor to own {vip}"),
        |o| {
            if o[&vip].node == old {
                Err(format!("{vip} still with the killed {}", ha.name(old)))
            } else {
                Ok(())
            }
        },
    );
    let new = after[&vip].node;
    eprintln!(
        "{vip}: {} owns it {took:?} after {}'s daemon was killed",
        ha.name(new),
        ha.name(old)
    );
    let r = wait_for(
        Duration::from_secs(2),
        "the killed node's announcer to go",
        || ha.check_candidates(&after, &survivors),
    );
    r.unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    let t_new = Instant::now();
    if let Err(e) = lp.wait_successes(t_new, 20, Duration::from_secs(5)) {
        panic!("requests to {vip} after the takeover: {e}{}", m.ctx());
    }
    let started = lp.started;
    let attempts = lp.stop();
    let o = outage(&attempts, started);
    eprintln!(
        "{vip}: longest failure gap {} ms ({} of {} requests failed, the run starting {} ms into the loop; first error {:?})",
        ms(o.longest),
        o.failed,
        o.total,
        ms(o.longest_at),
        o.first_error
    );
    assert!(
        !o.unrecovered && o.longest <= MAX_GAP,
        "killing {vip}'s owner {} cost a failure gap of {} ms (max {} ms; unrecovered {}; {} of {} failed; first error {:?}){}",
        ha.name(old),
        ms(o.longest),
        ms(MAX_GAP),
        o.unrecovered,
        o.failed,
        o.total,
        o.first_error,
        m.ctx()
    );
    // Gratuitous ARP requests from the new owner: three about 200 ms apart,
    // and a fourth about 1.5 s after the first (past any late answer of
    // the previous owner).
    let want_mac = ha.macs[new];
    let r = wait_for(Duration::from_secs(4), "gratuitous ARPs", || {
        let g = announced_by(&cap, vip, want_mac, t_kill, |k| k == Announced::ArpRequest);
        let first = g.first().map(|a| a.at);
        let within = g
            .iter()
            .filter(|a| first.is_some_and(|f| a.at <= f + Duration::from_millis(1000)))
            .count();
        let late = g.iter().any(|a| {
            first.is_some_and(|f| {
                a.at >= f + Duration::from_millis(1300) && a.at <= f + Duration::from_millis(2500)
            })
        });
        if within >= 3 && late {
            Ok(g)
        } else {
            Err(format!(
                "{} gratuitous ARP requests for {vip} from {} since the kill (at {:?}); all announcements of {vip}: {:?}",
                g.len(),
                ha.who(want_mac),
                offsets(&g, t_kill),
                cap.seen(vip)
                    .iter()
                    .map(|a| format!("{} {:?}", ha.who(a.mac), a.kind))
                    .collect::<Vec<_>>()
            ))
        }
    });
    let garps = r.unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    eprintln!(
        "{vip}: gratuitous ARPs from {} at {:?} after the kill",
        ha.who(want_mac),
        offsets(&garps, t_kill)
    );
    let took = ha.wait_neigh(vip, new, t_kill, Duration::from_secs(6), "the kill");
    eprintln!(
        "{vip}: the client's entry is {}'s MAC {took:?} after the kill",
        ha.name(new)
    );
    drop(cap);
    budget.check("failover");

    // The killed node comes back: one VIP each again, then no flapping.
    // Counted from its readiness: loading and verifying its programs is
    // not the announcer's time.
    let t_back = Instant::now();
    ha.daemons[old] = ha.spawn(old);
    ha.wait_ready(old);
    let t_ready = Instant::now();
    let (stable, took) = ha.wait_owners(
        &all,
        t_ready,
        Duration::from_secs(15),
        &format!("{} back with one VIP of its own", ha.name(old)),
        |o| ha.one_each(o, &all),
    );
    eprintln!(
        "{} back: one VIP each {took:?} after it was ready ({:?} after its restart): {}",
        ha.name(old),
        t_back.elapsed(),
        ha.show(&stable)
    );
    ha.hold_steady(&stable, &all, Duration::from_secs(5));
    if let Err(e) = ha.check_candidates(&stable, &all) {
        panic!("{e}{}", m.ctx());
    }
    // No stale answer anywhere: each VIP answered by its owner alone.
    for (vip, w) in &stable {
        let IpAddr::V4(v4) = vip else { unreachable!() };
        let got = arp_who_has(&m.client_ns, &m.client_iface(), PROBE_V4, *v4, PROBE_WAIT);
        assert_eq!(
            got,
            BTreeSet::from([ha.macs[w.node]]),
            "ARP for {vip} (owner {}) answered by {}{}",
            ha.name(w.node),
            ha.who_set(&got),
            m.ctx()
        );
        ha.check_served(*vip, w.node, "after the restart");
    }
    ha.check_metrics(&stable, &all);
    budget.check("restart");

    // A clean stop (SIGTERM) of an owner: it removes its address and
    // revokes its lease, so its VIP moves at once (not when the lease
    // lapses, 1.5-2.5 s) and the client loses nothing.
    let vip = ha.vip_of(1);
    let leaver = stable[&vip].node;
    let rest: Vec<usize> = all.iter().copied().filter(|&i| i != leaver).collect();
    let lp = RequestLoop::start(&m.client_ns, ha.frontend(vip));
    if let Err(e) = lp.wait_successes(lp.started, 10, Duration::from_secs(5)) {
        panic!("the request loop to {vip} before the stop: {e}{}", m.ctx());
    }
    let t_stop = Instant::now();
    ha.daemons[leaver].signal(nix::sys::signal::Signal::SIGTERM);
    let (_, took) = ha.wait_owners(
        &rest,
        t_stop,
        Duration::from_secs(1),
        &format!("a survivor to own {vip} within 1 s of a clean stop"),
        |o| {
            if o[&vip].node == leaver {
                Err(format!("{vip} still with the stopping {}", ha.name(leaver)))
            } else {
                Ok(())
            }
        },
    );
    eprintln!(
        "{vip}: handed over {took:?} after {}'s daemon got SIGTERM",
        ha.name(leaver)
    );
    let exit = ha.daemons[leaver].wait_exit(Duration::from_secs(10));
    assert!(
        exit.is_some_and(|s| s.success()),
        "{} after SIGTERM: {exit:?}{}",
        ha.name(leaver),
        m.ctx()
    );
    let log = ha.daemons[leaver].log_text();
    assert!(
        log.contains("revoked: this node's VIPs are free"),
        "{}'s log does not say its VIP lease was revoked{}",
        ha.name(leaver),
        m.ctx()
    );
    if let Err(e) = lp.wait_successes(Instant::now(), 20, Duration::from_secs(5)) {
        panic!("requests to {vip} after the handover: {e}{}", m.ctx());
    }
    let started = lp.started;
    let o = outage(&lp.stop(), started);
    eprintln!(
        "{vip}: clean stop: longest failure gap {} ms ({} of {} requests failed)",
        ms(o.longest),
        o.failed,
        o.total
    );
    assert!(
        !o.unrecovered && o.longest <= MAX_GAP,
        "a clean stop of {vip}'s owner cost a failure gap of {} ms ({} of {} failed; first error {:?}){}",
        ms(o.longest),
        o.failed,
        o.total,
        o.first_error,
        m.ctx()
    );
    budget.check("clean stop");
}

/// One VIP; its owner's switch port goes down: another node owns the VIP,
/// with at most 3 s of failed requests, and the cut node no longer holds
/// it.
#[test]
fn an_owner_whose_uplink_is_cut_is_replaced_within_three_seconds() {
    let budget = Budget::new("uplink_cut", Duration::from_secs(100));
    let m = Mesh::new("u");
    let ha = Ha::start(&m, "u", &["10.96.0.10"]);
    budget.check("cluster ready");
    let all = [0, 1, 2];
    let vip = ha.vip_of(0);
    let (owners, took) =
        ha.wait_owners(&all, Instant::now(), SPREAD_WITHIN, "an owner", |_| Ok(()));
    let old = owners[&vip].node;
    eprintln!("{vip}: owned by {} ({took:?})", ha.name(old));
    // The cut makes the owner's own tasks unreachable: only the other
    // nodes' tasks serve, so every failure is the VIP's.
    let svc = ha.services[0].clone();
    let keep: BTreeSet<String> = ALL
        .iter()
        .filter(|t| m.task(t).node != old)
        .map(|t| m.task(t).v4.to_string())
        .collect();
    for t in ALL.iter().filter(|t| m.task(t).node == old) {
        let id = ha.task_ids[&(svc.clone(), (*t).to_string())].clone();
        ha.cli(&["task", "rm", &svc, &id]);
    }
    for i in all {
        let r = wait_for(
            Duration::from_secs(10),
            "the owner's tasks to leave",
            || {
                let st = m.try_status(i)?;
                let got: BTreeSet<String> = st["services"]
                    .as_array()
                    .and_then(|a| a.iter().find(|s| s["name"] == svc.as_str()))
                    .and_then(|s| s["backends"].as_array())
                    .map(|b| {
                        b.iter()
                            .filter_map(|x| x["addr"].as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                if got == keep {
                    Ok(())
                } else {
                    Err(format!("{}: backends {got:?}, want {keep:?}", ha.name(i)))
                }
            },
        );
        r.unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    }
    ha.check_served(vip, old, "before the cut");
    budget.check("owner known");

    let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != old).collect();
    let cap = Capture::start(&m.client_ns, &m.client_iface());
    let lp = RequestLoop::start(&m.client_ns, ha.frontend(vip));
    if let Err(e) = lp.wait_successes(lp.started, 10, Duration::from_secs(5)) {
        panic!("the request loop to {vip} before the cut: {e}{}", m.ctx());
    }
    let n = m.nodes[old].clone();
    let t_cut = Instant::now();
    must(&["ip", "-n", &m.sw_ns, "link", "set", &n.sw_port, "down"]);
    // The cut node resigns at once: its uplink no longer holds the VIP.
    let r = wait_for(
        Duration::from_secs(3),
        "the cut node to drop the VIP",
        || {
            if addr_on(&n.ns, &n.eth, vip) {
                Err(format!("{} still holds {vip} on {}", n.name, n.eth))
            } else {
                Ok(t_cut.elapsed())
            }
        },
    );
    let dropped = r.unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    eprintln!(
        "{vip}: {} dropped it {} ms after its uplink was cut",
        n.name,
        ms(dropped)
    );
    assert!(
        dropped <= RESIGN_WITHIN,
        "{vip}: the cut {} dropped it only {} ms after losing carrier (max {} ms){}",
        n.name,
        ms(dropped),
        ms(RESIGN_WITHIN),
        m.ctx()
    );
    let (after, took) = ha.wait_owners(
        &survivors,
        t_cut,
        Duration::from_secs(10),
        &format!("another node to own {vip}"),
        |o| {
            if o[&vip].node == old {
                Err(format!("{vip} still with the cut {}", n.name))
            } else {
                Ok(())
            }
        },
    );
    let new = after[&vip].node;
    eprintln!("{vip}: {} owns it {took:?} after the cut", ha.name(new));
    let st = m
        .try_status(old)
        .unwrap_or_else(|e| panic!("status of the cut node: {e}{}", m.ctx()));
    match status_vips(&st) {
        Ok(v) if v.get(&vip).is_some_and(|x| !x.mine) => {}
        other => panic!(
            "the cut {} still claims {vip} or lists no VIPs: {other:?}{}",
            n.name,
            m.ctx()
        ),
    }
    if let Err(e) = lp.wait_successes(Instant::now(), 20, Duration::from_secs(5)) {
        panic!("requests to {vip} after the takeover: {e}{}", m.ctx());
    }
    let started = lp.started;
    let attempts = lp.stop();
    let o = outage(&attempts, started);
    eprintln!(
        "{vip}: longest failure gap {} ms after the uplink cut ({} of {} requests failed; first error {:?})",
        ms(o.longest),
        o.failed,
        o.total,
        o.first_error
    );
    assert!(
        !o.unrecovered && o.longest <= MAX_GAP,
        "cutting {vip}'s owner {} off the switch cost a failure gap of {} ms (max {} ms; unrecovered {}; {} of {} failed; first error {:?}){}",
        n.name,
        ms(o.longest),
        ms(MAX_GAP),
        o.unrecovered,
        o.failed,
        o.total,
        o.first_error,
        m.ctx()
    );
    let g = announced_by(&cap, vip, ha.macs[new], t_cut, |k| {
        k == Announced::ArpRequest
    });
    assert!(
        !g.is_empty(),
        "no gratuitous ARP for {vip} from its new owner {} after the cut: {:?}{}",
        ha.who(ha.macs[new]),
        cap.seen(vip),
        m.ctx()
    );
    budget.check("failover");
}

/// Answers to one ARP and one NDP probe, taken together.
struct Sample {
    at: Duration,
    v4: BTreeSet<Mac>,
    v6: BTreeSet<Mac>,
}

/// One IPv4 and one IPv6 VIP; their owners lose etcd (a blackhole route
/// to it): sampled every 100 ms for 6 s, no VIP is ever answered by two
/// MACs, each old owner stops answering within 2 s (the lease TTL) and a
/// node that kept etcd answers within 5 s; the IPv6 takeover is
/// announced by an unsolicited NA the client follows.
#[test]
fn an_owner_cut_off_from_etcd_stops_answering_before_its_lease_expires() {
    let budget = Budget::new("etcd_cut", Duration::from_secs(100));
    let m = Mesh::new("f");
    let ha = Ha::start(&m, "f", &["10.96.0.20", "fd00:96::20"]);
    budget.check("cluster ready");
    let all = [0, 1, 2];
    let (vip4, vip6) = (ha.vip_of(0), ha.vip_of(1));
    let (IpAddr::V4(v4), IpAddr::V6(v6)) = (vip4, vip6) else {
        unreachable!()
    };
    let (owners, took) = ha.wait_owners(
        &all,
        Instant::now(),
        SPREAD_WITHIN,
        "both VIPs spread",
        |o| {
            for i in all {
                let n = o.values().filter(|w| w.node == i).count();
                if n > 1 {
                    return Err(format!("{} owns {n} VIPs", ha.name(i)));
                }
            }
            Ok(())
        },
    );
    eprintln!("owners after {took:?}: {}", ha.show(&owners));
    for (vip, w) in &owners {
        ha.check_served(*vip, w.node, "before the cut");
    }
    let old4 = owners[&vip4].node;
    let old6 = owners[&vip6].node;
    let cut: BTreeSet<usize> = [old4, old6].into();
    let kept: Vec<usize> = all.iter().copied().filter(|i| !cut.contains(i)).collect();
    budget.check("owners known");

    let (c, iface) = (m.client_ns.clone(), m.client_iface());
    let cap = Capture::start(&c, &iface);
    let etcd32 = format!("{ETCD_HOST}/32");
    for &i in &cut {
        must(&[
            "ip",
            "-n",
            &m.nodes[i].ns,
            "route",
            "add",
            "blackhole",
            &etcd32,
        ]);
    }
    let t_cut = Instant::now();
    let mut samples = Vec::new();
    for k in 0u32.. {
        let tick = t_cut + SAMPLE_EVERY * k;
        if tick > t_cut + Duration::from_secs(6) {
            break;
        }
        thread::sleep(tick.saturating_duration_since(Instant::now()));
        let at = t_cut.elapsed();
        let (a, b) = thread::scope(|s| {
            let a = s.spawn(|| arp_who_has(&c, &iface, PROBE_V4, v4, PROBE_WAIT));
            let b = s.spawn(|| ns_who_has(&c, &iface, PROBE_V6, v6, PROBE_WAIT));
            (a.join().unwrap(), b.join().unwrap())
        });
        samples.push(Sample { at, v4: a, v6: b });
    }
    budget.check("sampled");

    let mut new_owner = BTreeMap::new();
    for (vip, old, v6) in [(vip4, old4, false), (vip6, old6, true)] {
        let pick = |s: &Sample| if v6 { s.v6.clone() } else { s.v4.clone() };
        let old_mac = ha.macs[old];
        // What answered, each time it changed.
        let mut timeline = Vec::new();
        let mut prev: Option<BTreeSet<Mac>> = None;
        for s in &samples {
            let set = pick(s);
            if prev.as_ref() != Some(&set) {
                timeline.push(format!("{} ms: {}", ms(s.at), ha.who_set(&set)));
                prev = Some(set);
            }
        }
        let timeline = timeline.join(", ");
        eprintln!(
            "{vip} (owner {} cut off from etcd): {timeline}",
            ha.name(old)
        );
        let doubles: Vec<String> = samples
            .iter()
            .filter(|s| pick(s).len() > 1)
            .map(|s| format!("{} ms: {}", ms(s.at), ha.who_set(&pick(s))))
            .collect();
        assert!(
            doubles.is_empty(),
            "{vip} answered by two MACs at once: {doubles:?} (timeline {timeline}){}",
            m.ctx()
        );
        let last_old = samples
            .iter()
            .filter(|s| pick(s).contains(&old_mac))
            .map(|s| s.at)
            .max();
        let stopped = samples
            .iter()
            .find(|s| last_old.is_none_or(|l| s.at > l))
            .map(|s| s.at);
        eprintln!(
            "{vip}: the old owner {} last answered at {:?} ms, silent from {:?} ms after the cut",
            ha.name(old),
            last_old.map(ms),
            stopped.map(ms)
        );
        assert!(
            last_old.is_none_or(|l| l < Duration::from_secs(2)),
            "{vip}: the old owner {} still answered {} ms after it lost etcd (lease TTL 2 s; timeline {timeline}){}",
            ha.name(old),
            last_old.map_or(0, ms),
            m.ctx()
        );
        let first_new = samples
            .iter()
            .find(|s| pick(s).iter().any(|mac| *mac != old_mac));
        let Some(first_new) = first_new else {
            panic!(
                "{vip}: no other node answered within 6 s of the cut (timeline {timeline}){}",
                m.ctx()
            );
        };
        let mac = *pick(first_new).iter().next().unwrap();
        let node = ha.macs.iter().position(|x| *x == mac);
        eprintln!(
            "{vip}: {} answers from {} ms after the cut",
            ha.who(mac),
            ms(first_new.at)
        );
        assert!(
            first_new.at <= Duration::from_secs(5),
            "{vip}: another node answered only {} ms after the cut (max 5000; timeline {timeline}){}",
            ms(first_new.at),
            m.ctx()
        );
        let Some(node) = node.filter(|n| kept.contains(n)) else {
            panic!(
                "{vip}: answered by {}, not a node that kept etcd (timeline {timeline}){}",
                ha.who(mac),
                m.ctx()
            );
        };
        let last = pick(samples.last().unwrap());
        assert_eq!(
            last,
            BTreeSet::from([mac]),
            "{vip}: 6 s after the cut answered by {}, want {} alone (timeline {timeline}){}",
            ha.who_set(&last),
            ha.who(mac),
            m.ctx()
        );
        new_owner.insert(vip, node);
    }

    // etcd and the nodes that kept it agree; the cut ones claim nothing.
    let (after, _) = ha.wait_owners(
        &kept,
        t_cut,
        Duration::from_secs(10),
        "the takeover in etcd",
        |o| {
            for (vip, node) in &new_owner {
                if o[vip].node != *node {
                    return Err(format!(
                        "{vip}: etcd says {}, ARP/NDP {}",
                        ha.name(o[vip].node),
                        ha.name(*node)
                    ));
                }
            }
            Ok(())
        },
    );
    eprintln!("after the cut: {}", ha.show(&after));
    for &i in &cut {
        let st = m
            .try_status(i)
            .unwrap_or_else(|e| panic!("status of the cut {}: {e}{}", ha.name(i), m.ctx()));
        let sv = status_vips(&st).unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
        for vip in [vip4, vip6] {
            assert!(
                sv.get(&vip).is_some_and(|x| !x.mine),
                "the cut {} still claims {vip} (or does not list it): {sv:?}{}",
                ha.name(i),
                m.ctx()
            );
        }
    }
    // The takeovers were announced, and the client followed them.
    let mac6 = ha.macs[new_owner[&vip6]];
    let r = wait_for(Duration::from_secs(2), "an unsolicited NA", || {
        let na = announced_by(&cap, vip6, mac6, t_cut, |k| {
            k == Announced::Na {
                override_flag: true,
                to_all_nodes: true,
            }
        });
        if na.is_empty() {
            Err(format!(
                "no unsolicited NA (Override, to ff02::1) for {vip6} from {}; announcements of {vip6}: {:?}",
                ha.who(mac6),
                cap.seen(vip6)
            ))
        } else {
            Ok(na)
        }
    });
    let na = r.unwrap_or_else(|e| panic!("{e}{}", m.ctx()));
    eprintln!(
        "{vip6}: unsolicited NAs at {:?} after the cut",
        offsets(&na, t_cut)
    );
    let mac4 = ha.macs[new_owner[&vip4]];
    let garp = announced_by(&cap, vip4, mac4, t_cut, |k| k == Announced::ArpRequest);
    assert!(
        !garp.is_empty(),
        "no gratuitous ARP for {vip4} from {}: {:?}{}",
        ha.who(mac4),
        cap.seen(vip4),
        m.ctx()
    );
    for vip in [vip6, vip4] {
        let took = ha.wait_neigh(
            vip,
            new_owner[&vip],
            t_cut,
            Duration::from_secs(8),
            "the cut",
        );
        eprintln!("{vip}: the client's entry moved {took:?} after the cut");
    }
    budget.check("failover");
}
