//! The shared part of the routed topologies (`tests/real_traffic.rs`,
//! `tests/docker.rs`): a remote client reaches a node through a router
//! that computes checksums in software.
//!
//! ```text
//!  client ns              router ns                 node ns
//!  client_if ---veth--- router_c_if    router_n_if ---veth--- uplink
//!  (tx csum off)        (tx csum off)  (tx csum off)          (default offloads)
//! ```
//!
//! [`Hops`] names the namespaces and interfaces, [`HopAddrs`] their
//! addresses; the free functions are the building blocks (addresses,
//! routes, offloads, XDP attach mode, `/proc/net/snmp{,6}`, `status
//! --json` counters, request bursts) both tests use.

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    http_get, http_get_path, in_netns, must, run_cmd, run_cmd_env, udp_request, wait_for, Burst,
    CmdOutput, CLIENT_PORT_RANGE, MESHLB,
};

/// The checksum error counters every routed test checks: TCP and UDP
/// (`/proc/net/snmp`), UDP6 (`/proc/net/snmp6`).
pub const CSUM_ERRORS: [&str; 3] = ["Tcp.InCsumErrors", "Udp.InCsumErrors", "Udp6InCsumErrors"];

/// Addresses of the client -> router -> node hops (v4 /24, v6 /64).
pub struct HopAddrs {
    pub client4: Ipv4Addr,
    pub client6: Ipv6Addr,
    pub router_c4: Ipv4Addr,
    pub router_c6: Ipv6Addr,
    pub router_n4: Ipv4Addr,
    pub router_n6: Ipv6Addr,
    pub node4: Ipv4Addr,
    pub node6: Ipv6Addr,
}

impl HopAddrs {
    /// Client `10.<v4>.1.2` / `fd00:<v6>:1::2`, the router `.1.1` / `::1`
    /// on that link and `10.<v4>.2.1` / `fd00:<v6>:2::1` on the node's,
    /// the node `10.<v4>.2.2` / `fd00:<v6>:2::2`.
    pub const fn new(v4: u8, v6: u16) -> HopAddrs {
        HopAddrs {
            client4: Ipv4Addr::new(10, v4, 1, 2),
            client6: Ipv6Addr::new(0xfd00, v6, 1, 0, 0, 0, 0, 2),
            router_c4: Ipv4Addr::new(10, v4, 1, 1),
            router_c6: Ipv6Addr::new(0xfd00, v6, 1, 0, 0, 0, 0, 1),
            router_n4: Ipv4Addr::new(10, v4, 2, 1),
            router_n6: Ipv6Addr::new(0xfd00, v6, 2, 0, 0, 0, 0, 1),
            node4: Ipv4Addr::new(10, v4, 2, 2),
            node6: Ipv6Addr::new(0xfd00, v6, 2, 0, 0, 0, 0, 2),
        }
    }
}

/// Names and dirs of a routed topology: the client -> router -> node
/// hops' namespaces and interfaces, its temp dir and bpffs dir. The tests'
/// topologies hold one (and deref to it) and tear it down on drop.
pub struct Hops {
    /// `mlbt-...-<pid%10000>`: namespaces, temp dir and bpffs dir.
    pub prefix: String,
    /// `...<pid%10000>`: every interface name starts with it.
    pub short: String,
    pub client_ns: String,
    pub router_ns: String,
    pub node_ns: String,
    pub client_if: String,
    /// The router's veth facing the client.
    pub router_c_if: String,
    /// The router's veth facing the node (xdp-pass in native mode).
    pub router_n_if: String,
    /// The node's uplink (XDP).
    pub uplink: String,
    /// Temp dir: config, logs, servers' state.
    pub dir: PathBuf,
    /// `/sys/fs/bpf/<prefix>`: the daemon's dir and `rt` (the router's
    /// xdp-pass).
    pub bpffs_root: PathBuf,
    pub addrs: &'static HopAddrs,
}

impl Hops {
    /// Namespaces `<prefix>-c`, `<prefix>-r` and `<prefix>-<node>`;
    /// interfaces `<short>c`, `<short>rc`, `<short>rn`, `<short>e`.
    pub fn new(prefix: String, short: String, node: &str, addrs: &'static HopAddrs) -> Hops {
        Hops {
            client_ns: format!("{prefix}-c"),
            router_ns: format!("{prefix}-r"),
            node_ns: format!("{prefix}-{node}"),
            client_if: format!("{short}c"),
            router_c_if: format!("{short}rc"),
            router_n_if: format!("{short}rn"),
            uplink: format!("{short}e"),
            dir: std::env::temp_dir().join(&prefix),
            bpffs_root: PathBuf::from("/sys/fs/bpf").join(&prefix),
            prefix,
            short,
            addrs,
        }
    }

    /// The client, router and node namespaces.
    pub fn hop_ns(&self) -> [&str; 3] {
        [&self.client_ns, &self.router_ns, &self.node_ns]
    }

    /// Removes the leftovers of an earlier run (namespaces `nss`, the
    /// dirs), then creates the temp dir and the bpffs dir.
    pub fn prepare<S: AsRef<str>>(&self, nss: &[S]) {
        remove_stale(nss, &self.dir, &self.bpffs_root);
        fs::create_dir_all(&self.dir).expect("create test temp dir");
        fs::create_dir_all(&self.bpffs_root)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", self.bpffs_root.display()));
    }

    /// `meshlb run`'s log in the temp dir.
    pub fn daemon_log(&self) -> PathBuf {
        self.dir.join("meshlb-run.log")
    }

    /// [`teardown`]: the daemon's pins at `node_bpffs` in the node
    /// namespace, the router's xdp-pass, the namespaces `nss`.
    pub fn teardown<S: AsRef<str>>(&self, node_bpffs: PathBuf, cleanup: Duration, nss: &[S]) {
        // Detach and unpin: the daemon's dir in the node namespace, the
        // xdp-pass dir in the router namespace.
        teardown(
            &[
                (&self.node_ns, node_bpffs),
                (&self.router_ns, self.bpffs_root.join("rt")),
            ],
            cleanup,
            &self.bpffs_root,
            nss,
            &self.prefix,
            &self.dir,
        );
    }

    /// Client <-> router (a remote host on a wire, a software router),
    /// then router <-> node (only the router's end computes in software):
    /// veths, addresses, TX checksum offload off on the software ends, up.
    pub fn link(&self) {
        let (c, r, n, a) = (
            &*self.client_ns,
            &*self.router_ns,
            &*self.node_ns,
            self.addrs,
        );
        // Client <-> router: a remote host on a wire, a software router.
        veth(r, &self.router_c_if, c, &self.client_if);
        addr(c, &self.client_if, a.client4.into(), a.client6.into());
        addr(r, &self.router_c_if, a.router_c4.into(), a.router_c6.into());
        tx_off(c, &self.client_if);
        tx_off(r, &self.router_c_if);
        must(&["ip", "-n", c, "link", "set", &self.client_if, "up"]);
        must(&["ip", "-n", r, "link", "set", &self.router_c_if, "up"]);
        // Router <-> node: only the router's end computes in software.
        veth(r, &self.router_n_if, n, &self.uplink);
        addr(r, &self.router_n_if, a.router_n4.into(), a.router_n6.into());
        addr(n, &self.uplink, a.node4.into(), a.node6.into());
        tx_off(r, &self.router_n_if);
        must(&["ip", "-n", r, "link", "set", &self.router_n_if, "up"]);
        must(&["ip", "-n", n, "link", "set", &self.uplink, "up"]);
    }

    /// The client routes everything via the router; the router routes the
    /// VIP ranges (10.96.0.0/16, fd00:96::/64) and the node's task subnets
    /// `tasks4` / `tasks6` via the node; the node routes everything else
    /// via the router.
    pub fn routes(&self, tasks4: &str, tasks6: &str) {
        let (c, r, n, a) = (
            &*self.client_ns,
            &*self.router_ns,
            &*self.node_ns,
            self.addrs,
        );
        route(c, "default", a.router_c4.into());
        route(c, "default", a.router_c6.into());
        for net in ["10.96.0.0/16", tasks4] {
            route(r, net, a.node4.into());
        }
        for net in ["fd00:96::/64", tasks6] {
            route(r, net, a.node6.into());
        }
        route(n, "default", a.router_n4.into());
        route(n, "default", a.router_n6.into());
    }

    /// `meshlb xdp-pass` on the router's node-facing veth, pinned under
    /// `<bpffs_root>/rt`: native XDP on the uplink transmits into that
    /// veth, which needs an XDP program there.
    pub fn router_xdp_pass(&self) {
        let dir = self.bpffs_root.join("rt").display().to_string();
        let out = meshlb_in(
            &self.router_ns,
            &["xdp-pass", "--iface", &self.router_n_if, "--bpffs", &dir],
            Duration::from_secs(30),
        );
        assert!(
            out.success(),
            "xdp-pass on {}: {}",
            self.router_n_if,
            out.describe()
        );
        assert_eq!(
            xdp_mode(&self.router_ns, &self.router_n_if),
            Some(1),
            "after xdp-pass, {} should have a native XDP program",
            self.router_n_if
        );
    }

    /// TX checksum offload off on the client's and the router's veths
    /// (software), on (kernel default) on the node's uplink; as
    /// `(netns path, ifname, on)` for [`assert_tx_checksumming`].
    pub fn offloads(&self) -> Vec<(String, String, bool)> {
        vec![
            (netns_path(&self.client_ns), self.client_if.clone(), false),
            (netns_path(&self.router_ns), self.router_c_if.clone(), false),
            (netns_path(&self.router_ns), self.router_n_if.clone(), false),
            (netns_path(&self.node_ns), self.uplink.clone(), true),
        ]
    }
}

/// `/run/netns/<ns>`: the path of a named namespace, for nsenter.
pub fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

/// Creates namespace `ns` with lo up and no DAD anywhere (link-local and
/// `default` included: addresses usable at once); `forward`: v4 and v6
/// forwarding on; `client`: the client port range and `tcp_tw_reuse`.
pub fn add_netns(ns: &str, forward: bool, client: bool) {
    let range = format!(
        "net.ipv4.ip_local_port_range={} {}",
        CLIENT_PORT_RANGE.0, CLIENT_PORT_RANGE.1
    );
    must(&["ip", "netns", "add", ns]);
    must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    let mut sysctls = vec![
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ];
    if forward {
        sysctls.extend(["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
    }
    if client {
        sysctls.extend([range.as_str(), "net.ipv4.tcp_tw_reuse=1"]);
    }
    let mut argv = vec!["ip", "netns", "exec", ns, "sysctl", "-qw"];
    argv.extend(sysctls.iter().copied());
    must(&argv);
}

/// Waits until no IPv6 address of the namespaces `nss` is tentative, then
/// asserts no interface whose name starts with `short` sits in the root
/// namespace.
pub fn settle_and_check_root<S: AsRef<str>>(nss: &[S], short: &str) {
    for ns in nss {
        let ns = ns.as_ref();
        wait_for(
            Duration::from_secs(10),
            "IPv6 addresses to leave tentative state",
            || {
                let out = must(&["ip", "-n", ns, "-6", "addr", "show", "tentative"]);
                if out.trim().is_empty() {
                    Ok(())
                } else {
                    Err(format!("{ns}: {out}"))
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    // Nothing of ours may leak into the root namespace.
    let root_links = must(&["ip", "-o", "link", "show"]);
    for line in root_links.lines() {
        let name = line.split(':').nth(1).unwrap_or("").trim();
        assert!(
            !name.starts_with(short),
            "topology leaked interface {name} into the root namespace"
        );
    }
}

/// Deletes the namespaces `nss` that exist, and the dirs `dir` and
/// `bpffs_root` (leftovers of an earlier run).
pub fn remove_stale<S: AsRef<str>>(nss: &[S], dir: &Path, bpffs_root: &Path) {
    for ns in nss {
        let ns = ns.as_ref();
        if Path::new("/run/netns").join(ns).exists() {
            let _ = run_cmd(&["ip", "netns", "del", ns], Duration::from_secs(30));
        }
    }
    let _ = fs::remove_dir_all(dir);
    let _ = fs::remove_dir_all(bpffs_root);
}

/// Teardown: `meshlb cleanup` of each `(namespace, bpffs dir)` in
/// `pinned` (`cleanup` timeout each), `rm -r bpffs_root`, deletes the
/// namespaces `nss`, and removes `dir` unless the test failed (then its
/// logs are kept and said so, under the test's `prefix`).
pub fn teardown<S: AsRef<str>>(
    pinned: &[(&str, PathBuf)],
    cleanup: Duration,
    bpffs_root: &Path,
    nss: &[S],
    prefix: &str,
    dir: &Path,
) {
    for (ns, d) in pinned {
        if d.is_dir() && Path::new("/run/netns").join(ns).exists() {
            let ds = d.display().to_string();
            let out = meshlb_in(ns, &["cleanup", "--bpffs", &ds], cleanup);
            if !out.success() {
                eprintln!("teardown: {}", out.describe());
            }
        }
    }
    if let Err(e) = fs::remove_dir_all(bpffs_root) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("teardown: rm -r {}: {e}", bpffs_root.display());
        }
    }
    for ns in nss {
        let ns = ns.as_ref();
        if Path::new("/run/netns").join(ns).exists() {
            let out = run_cmd(&["ip", "netns", "del", ns], Duration::from_secs(30));
            if !out.success() {
                eprintln!("teardown: {}", out.describe());
            }
        }
    }
    if thread::panicking() {
        eprintln!("test {prefix} failed: logs kept in {}", dir.display());
    } else {
        let _ = fs::remove_dir_all(dir);
    }
}

/// `meshlb ARGS` in namespace `ns` (nsenter, so bpffs stays visible).
pub fn meshlb_in(ns: &str, args: &[&str], timeout: Duration) -> CmdOutput {
    let net = format!("--net=/run/netns/{ns}");
    let mut argv = vec!["nsenter", net.as_str(), MESHLB];
    argv.extend_from_slice(args);
    run_cmd_env(&argv, &[("RUST_BACKTRACE", "0")], timeout)
}

/// A veth pair: `if_a` in `ns_a`, its peer `if_b` in `ns_b`.
pub fn veth(ns_a: &str, if_a: &str, ns_b: &str, if_b: &str) {
    must(&[
        "ip", "-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b,
    ]);
}

/// `v4/24` and `v6/64` (no DAD) on `ifname` in `ns`.
pub fn addr(ns: &str, ifname: &str, v4: IpAddr, v6: IpAddr) {
    addr_plen(ns, ifname, v4, 24, v6);
}

/// `v4/plen4` and `v6/64` (no DAD) on `ifname` in `ns`.
pub fn addr_plen(ns: &str, ifname: &str, v4: IpAddr, plen4: u8, v6: IpAddr) {
    must(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{v4}/{plen4}"),
        "dev",
        ifname,
    ]);
    must(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{v6}/64"),
        "dev",
        ifname,
        "nodad",
    ]);
}

/// A route to `to` via `via` in `ns` (its family from `via`).
pub fn route(ns: &str, to: &str, via: IpAddr) {
    let fam = if via.is_ipv6() { "-6" } else { "-4" };
    must(&[
        "ip",
        "-n",
        ns,
        fam,
        "route",
        "add",
        to,
        "via",
        &via.to_string(),
    ]);
}

/// A device that computes checksums in software: no TX checksum offload.
pub fn tx_off(ns: &str, ifname: &str) {
    must(&[
        "ip", "netns", "exec", ns, "ethtool", "-K", ifname, "tx", "off",
    ]);
}

/// Whether `ifname` in the network namespace at `netns` (a path) has TX
/// checksum offload on (`ethtool -k`: `tx-checksumming: on`).
pub fn tx_checksumming(netns: &str, ifname: &str) -> bool {
    let net = format!("--net={netns}");
    let out = must(&["nsenter", &net, "ethtool", "-k", ifname]);
    let line = out
        .lines()
        .find(|l| l.starts_with("tx-checksumming:"))
        .unwrap_or_else(|| panic!("ethtool -k {ifname} in {netns}: no tx-checksumming\n{out}"));
    line.split_whitespace().nth(1) == Some("on")
}

/// Asserts TX checksum offload of each `(netns path, ifname, on)`.
pub fn assert_tx_checksumming(want: &[(String, String, bool)]) {
    for (ns, ifname, on) in want {
        let got = tx_checksumming(ns, ifname);
        assert_eq!(
            got,
            *on,
            "{ifname} in {ns}: tx-checksumming {}, expected {}",
            if got { "on" } else { "off" },
            if *on { "on (kernel default)" } else { "off" }
        );
    }
}

/// `ip -d -j link` XDP attach mode of `iface` in `ns` (1 native, 2 generic).
pub fn xdp_mode(ns: &str, iface: &str) -> Option<u64> {
    let out = must(&["ip", "-n", ns, "-d", "-j", "link", "show", "dev", iface]);
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("ip -j link output is not JSON ({e}): {out}"));
    v[0]["xdp"]["mode"].as_u64()
}

/// `/proc/net/snmp` as `Group.Field` (e.g. `Udp.InCsumErrors`) and
/// `/proc/net/snmp6` under its own names (e.g. `Udp6InCsumErrors`), of the
/// network namespace at `netns` (a path; /proc/net is per namespace).
pub fn snmp(netns: &str) -> BTreeMap<String, i64> {
    let net = format!("--net={netns}");
    let mut m = BTreeMap::new();
    let v4 = must(&["nsenter", &net, "cat", "/proc/net/snmp"]);
    super::add_paired_counters(&mut m, netns, "/proc/net/snmp", &v4, ".");
    let v6 = must(&["nsenter", &net, "cat", "/proc/net/snmp6"]);
    super::add_line_counters(&mut m, &v6);
    m
}

/// [`CSUM_ERRORS`] of each `(label, netns path)`, by label.
pub fn csum_errors(
    netns: impl IntoIterator<Item = (String, String)>,
) -> BTreeMap<String, BTreeMap<&'static str, i64>> {
    netns
        .into_iter()
        .map(|(label, path)| {
            let s = snmp(&path);
            let pick = CSUM_ERRORS
                .into_iter()
                .map(|k| {
                    let n = *s
                        .get(k)
                        .unwrap_or_else(|| panic!("{label}: no {k} in /proc/net/snmp{{,6}}"));
                    (k, n)
                })
                .collect();
            (label, pick)
        })
        .collect()
}

/// `meshlb status --json` of the daemon pinned at `bpffs` in namespace
/// `ns`, parsed.
pub fn status(ns: &str, bpffs: &Path, timeout: Duration) -> Result<Value, String> {
    let dir = bpffs.display().to_string();
    let out = meshlb_in(ns, &["status", "--json", "--bpffs", &dir], timeout);
    if !out.success() {
        return Err(out.describe());
    }
    serde_json::from_str(&out.stdout)
        .map_err(|e| format!("status --json is not JSON ({e}): {}", out.stdout))
}

/// The data-path counters (`counters`) of a `status --json`, `status`;
/// a failed status panics with `ctx()` appended.
pub fn status_counters(
    status: Result<Value, String>,
    ctx: impl FnOnce() -> String,
) -> BTreeMap<String, u64> {
    let st = status.unwrap_or_else(|e| panic!("{e}{}", ctx()));
    let c = st["counters"]
        .as_object()
        .unwrap_or_else(|| panic!("status --json has no counters object: {st}"));
    c.iter()
        .map(|(k, v)| {
            let n = v
                .as_u64()
                .unwrap_or_else(|| panic!("counter {k} is not a number: {v}"));
            (k.clone(), n)
        })
        .collect()
}

/// Failure context: the node's non-zero counters (from `status`) and the
/// last 80 lines of the daemon's log `log`.
pub fn daemon_ctx(log: &Path, status: Result<Value, String>) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(80)..];
    let counters = match status {
        Ok(st) => {
            let nz: BTreeMap<&str, u64> = st["counters"]
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, v)| v.as_u64().filter(|n| *n > 0).map(|n| (&**k, n)))
                        .collect()
                })
                .unwrap_or_default();
            format!("{nz:?}")
        }
        Err(e) => format!("(no status: {e})"),
    };
    format!(
        "\n===== node counters (non-zero) =====\n{counters}\n===== {} (last {} lines) =====\n{}",
        log.display(),
        tail.len(),
        tail.join("\n")
    )
}

/// `n` requests from namespace `ns` to `dst`: HTTP GETs (each its own
/// connection) or UDP datagrams (each from a new socket). `udp_request`
/// checks the reply comes from `dst` itself; a TCP handshake only
/// completes when it does.
pub fn burst_from(ns: &str, dst: SocketAddr, udp: bool, n: usize, timeout: Duration) -> Burst {
    in_netns(ns, || {
        let mut b = Burst::default();
        for i in 0..n {
            let r = if udp {
                udp_request(dst, format!("ping {i}").as_bytes(), timeout)
            } else {
                http_get(dst, timeout)
            };
            match r {
                Ok(body) => *b.counts.entry(body).or_default() += 1,
                Err(e) => b.failures.push(format!("request {i}: {e}")),
            }
        }
        b
    })
}

/// Every one of the `n` outcomes of `b` succeeded, answered by one of
/// `names`, each of which answered at least once; a description when not.
pub fn check_all(what: &str, b: &Burst, n: usize, names: &[&str]) -> Result<(), String> {
    let mut problems = Vec::new();
    if !b.failures.is_empty() {
        problems.push(format!(
            "{} of {n} failed (first: {:?})",
            b.failures.len(),
            &b.failures[..b.failures.len().min(3)]
        ));
    }
    if b.total() != n {
        problems.push(format!("{} outcomes for {n} requests", b.total()));
    }
    for t in names {
        if b.counts.get(*t).copied().unwrap_or(0) == 0 {
            problems.push(format!("{t} never answered"));
        }
    }
    for k in b.counts.keys() {
        if !names.contains(&k.as_str()) {
            problems.push(format!("unexpected answer {k:?}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}; answers {:?}",
            problems.join("; "),
            b.counts
        ))
    }
}

/// One readiness probe of a daemon on the node `node_ns`: it serves
/// metrics (127.0.0.1:9742), its `status` lists every one of `services`
/// with data plane `dataplane`, and XDP sits on `uplink` in `link_mode`
/// (1 native, 2 generic).
pub fn probe_ready(
    node_ns: &str,
    status: impl FnOnce() -> Result<Value, String>,
    services: &[&str],
    dataplane: &str,
    uplink: &str,
    link_mode: u64,
) -> Result<(), String> {
    in_netns(node_ns, || {
        http_get_path(
            "127.0.0.1:9742".parse().unwrap(),
            "/metrics",
            Duration::from_secs(2),
        )
    })
    .map_err(|e| format!("metrics: {e}"))?;
    let st = status()?;
    for want in services {
        let found = st["services"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["name"] == *want));
        if !found {
            return Err(format!("service {want} not in status: {st}"));
        }
    }
    if st["dataplane"] != dataplane {
        return Err(format!("dataplane {} in status", st["dataplane"]));
    }
    let m = xdp_mode(node_ns, uplink);
    if m != Some(link_mode) {
        return Err(format!("XDP mode of {uplink}: {m:?}"));
    }
    Ok(())
}

/// `<ok> ok, <failed> failed, answers <counts> in <elapsed since started>`.
pub fn burst_summary(b: &Burst, started: Instant) -> String {
    format!(
        "{} ok, {} failed, answers {:?} in {:.1?}",
        b.counts.values().sum::<usize>(),
        b.failures.len(),
        b.counts,
        started.elapsed()
    )
}

/// A problem for each non-zero checksum error counter of `csum`; returns
/// the counters as text, a line each namespace.
pub fn csum_report(
    csum: &BTreeMap<String, BTreeMap<&'static str, i64>>,
    problems: &mut Vec<String>,
) -> String {
    let mut text = String::new();
    for (ns, c) in csum {
        text += &format!("\n  {ns}: {c:?}");
        for (k, v) in c {
            if *v != 0 {
                problems.push(format!("{ns}: {k} = {v}"));
            }
        }
    }
    text
}
