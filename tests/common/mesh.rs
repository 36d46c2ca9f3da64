//! A netns "cluster" for the routing mesh: three node namespaces on one L2
//! switch with a client, each node with its own bridge of task namespaces,
//! each node running its own `meshlb run`. Nothing is added to the root
//! namespace; everything is named after the test's prefix and removed on
//! drop.
//!
//! ```text
//!                      switch ns: bridge <short>sw
//!        +-----------------+-----------------+-----------------+
//!   client 10.210.0.100  node n1 .1        node n2 .2        node n3 .3
//!   fd00:210::100        (eth <short>e1)   (eth <short>e2)   (eth <short>e3)
//!                        bridge 10.221.0.1 bridge 10.222.0.1 bridge 10.223.0.1
//!                         t1 .2   t2 .3     t3 .2             t4 .2
//! ```
//!
//! IPv6 mirrors it (fd00:210::/64, fd00:22i::/64). Nodes route the other
//! nodes' task subnets via those nodes (host-gw style); tasks route
//! everything via their node; the client routes the VIP ranges via n1.
//! The switch ports facing the nodes run `meshlb xdp-pass`, so the nodes'
//! native XDP can transmit into them.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use super::{
    ensure_bpffs, http_get_path, in_netns, must, require_root, run_cmd, run_cmd_env,
    start_nginx_in, stop_servers, tcp_connect, wait_for, CmdOutput, Proc, UdpEcho,
    CLIENT_PORT_RANGE, MESHLB,
};

/// The services' VIPs.
pub const VIP4: &str = "10.96.0.10";
pub const VIP6: &str = "fd00:96::10";

/// Port the tasks' UDP echo servers listen on.
pub const UDP_PORT: u16 = 5353;

/// One node namespace.
#[derive(Clone, Debug)]
pub struct Node {
    /// "n1".."n3": also its `--node` name.
    pub name: String,
    pub ns: String,
    /// Uplink (veth) in the node namespace.
    pub eth: String,
    /// Its peer: a port of the switch bridge.
    pub sw_port: String,
    /// The node's task bridge.
    pub br: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub br_v4: Ipv4Addr,
    pub br_v6: Ipv6Addr,
}

/// One task (backend) namespace behind a node's bridge.
#[derive(Clone, Debug)]
pub struct Task {
    /// "t1".."t4": also what its servers answer.
    pub name: String,
    pub ns: String,
    /// Index into `Mesh::nodes`.
    pub node: usize,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// See the module documentation.
pub struct Mesh {
    pub prefix: String,
    pub short: String,
    pub sw_ns: String,
    pub client_ns: String,
    pub client_v4: Ipv4Addr,
    pub client_v6: Ipv6Addr,
    pub nodes: Vec<Node>,
    pub tasks: Vec<Task>,
    pub dir: PathBuf,
    pub bpffs_root: PathBuf,
    servers: Mutex<Vec<Proc>>,
    udp: Mutex<Vec<UdpEcho>>,
    logs: Mutex<Vec<PathBuf>>,
    seq: AtomicUsize,
}

/// Which node each task sits on: t1, t2 on n1; t3 on n2; t4 on n3.
const TASK_NODES: [usize; 4] = [0, 0, 1, 2];

/// Shape of a mesh beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct MeshOpts {
    /// MTU of the switch: every veth pair on it (node uplinks, the
    /// client's link, and their switch ports), i.e. the node-to-node links.
    /// The switch is one L2 segment, and a segment has one MTU: a bridge
    /// silently drops a frame larger than its egress port's MTU (L2 sends
    /// no ICMP), so a 1500-byte client port beside 1400-byte node ports
    /// would be a black hole, not a path MTU. The task bridges and task
    /// links keep 1500, so packets from tasks meet the smaller MTU where a
    /// node routes them onto its uplink. The client then plays a remote
    /// host on a 1500-byte LAN whose path into the cluster crosses this
    /// smaller fabric: it sends at most `mtu`-byte packets but advertises
    /// its LAN's MSS (routes with `advmss` 1460 / 1440), so a task answers
    /// it with full 1500-byte segments, which must shrink at the first
    /// node that routes them onto the fabric.
    pub switch_mtu: Option<u32>,
}

impl Mesh {
    /// Builds the cluster network and starts nginx (:8000) and a UDP echo
    /// (:5353) in every task. `tag`: 1-3 alphanumerics, unique per test
    /// binary.
    pub fn new(tag: &str) -> Mesh {
        Mesh::with_opts(tag, MeshOpts::default())
    }

    /// [`Mesh::new`] with `opts`.
    pub fn with_opts(tag: &str, opts: MeshOpts) -> Mesh {
        require_root();
        assert!(
            (1..=3).contains(&tag.len()) && tag.chars().all(|c| c.is_ascii_alphanumeric()),
            "mesh tag {tag:?} must be 1-3 ascii alphanumerics"
        );
        ensure_bpffs();
        let pid = std::process::id() % 10000;
        let prefix = format!("mlbt-m{tag}-{pid}");
        let short = format!("{tag}{pid}");
        let nodes = (1..=3u8)
            .map(|i| Node {
                name: format!("n{i}"),
                ns: format!("{prefix}-n{i}"),
                eth: format!("{short}e{i}"),
                sw_port: format!("{short}s{i}"),
                br: format!("{short}br"),
                v4: Ipv4Addr::new(10, 210, 0, i),
                v6: Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, u16::from(i)),
                br_v4: Ipv4Addr::new(10, 220 + i, 0, 1),
                br_v6: Ipv6Addr::new(0xfd00, 0x220 + u16::from(i), 0, 0, 0, 0, 0, 1),
            })
            .collect::<Vec<_>>();
        let mut per_node = [0u8; 3];
        let tasks = TASK_NODES
            .iter()
            .enumerate()
            .map(|(j, &n)| {
                per_node[n] += 1;
                let host = 1 + per_node[n];
                Task {
                    name: format!("t{}", j + 1),
                    ns: format!("{prefix}-t{}", j + 1),
                    node: n,
                    v4: Ipv4Addr::new(10, 221 + n as u8, 0, host),
                    v6: Ipv6Addr::new(0xfd00, 0x221 + n as u16, 0, 0, 0, 0, 0, u16::from(host)),
                }
            })
            .collect();
        let m = Mesh {
            sw_ns: format!("{prefix}-sw"),
            client_ns: format!("{prefix}-c"),
            client_v4: Ipv4Addr::new(10, 210, 0, 100),
            client_v6: Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 0x100),
            nodes,
            tasks,
            dir: std::env::temp_dir().join(&prefix),
            bpffs_root: PathBuf::from("/sys/fs/bpf").join(&prefix),
            prefix,
            short,
            servers: Mutex::new(Vec::new()),
            udp: Mutex::new(Vec::new()),
            logs: Mutex::new(Vec::new()),
            seq: AtomicUsize::new(0),
        };
        // From here on a panic drops `m`, which removes whatever exists.
        m.remove_stale();
        fs::create_dir_all(&m.dir).expect("create test temp dir");
        fs::create_dir_all(&m.bpffs_root).expect("create test bpffs dir");
        m.build(&opts);
        m.start_servers();
        m
    }

    fn all_ns(&self) -> Vec<String> {
        let mut v = vec![self.sw_ns.clone(), self.client_ns.clone()];
        v.extend(self.nodes.iter().map(|n| n.ns.clone()));
        v.extend(self.tasks.iter().map(|t| t.ns.clone()));
        v
    }

    fn remove_stale(&self) {
        for ns in self.all_ns() {
            if Path::new("/run/netns").join(&ns).exists() {
                let _ = run_cmd(&["ip", "netns", "del", &ns], Duration::from_secs(30));
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_dir_all(&self.bpffs_root);
    }

    fn build(&self, opts: &MeshOpts) {
        let range = format!(
            "net.ipv4.ip_local_port_range={} {}",
            CLIENT_PORT_RANGE.0, CLIENT_PORT_RANGE.1
        );
        for ns in self.all_ns() {
            must(&["ip", "netns", "add", &ns]);
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            let mut sysctls = vec![
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ];
            if self.nodes.iter().any(|n| n.ns == ns) {
                sysctls.extend(["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
            }
            if ns == self.client_ns {
                sysctls.extend([range.as_str(), "net.ipv4.tcp_tw_reuse=1"]);
            }
            let mut argv = vec!["ip", "netns", "exec", &ns, "sysctl", "-qw"];
            argv.extend(sysctls.iter().copied());
            must(&argv);
        }
        let sw = self.sw_ns.as_str();
        let swbr = format!("{}sw", self.short);
        must(&["ip", "-n", sw, "link", "add", &swbr, "type", "bridge"]);
        must(&["ip", "-n", sw, "link", "set", &swbr, "up"]);

        // Client and nodes on the switch.
        let client_if = format!("{}c", self.short);
        let client_port = format!("{}sc", self.short);
        let mut uplinks = vec![(
            self.client_ns.clone(),
            client_if,
            client_port,
            self.client_v4,
            self.client_v6,
        )];
        for n in &self.nodes {
            uplinks.push((n.ns.clone(), n.eth.clone(), n.sw_port.clone(), n.v4, n.v6));
        }
        for (ns, ifname, port, v4, v6) in &uplinks {
            must(&[
                "ip", "-n", ns, "link", "add", ifname, "type", "veth", "peer", "name", port,
                "netns", sw,
            ]);
            must(&["ip", "-n", sw, "link", "set", port, "master", &swbr]);
            addr(ns, ifname, &format!("{v4}/24"), &format!("{v6}/64"));
            // The switch is the wire: it hands on complete checksums, as a
            // NIC does. The client plays a remote host. Nodes and tasks
            // keep the kernel's default offloads.
            if *ns == self.client_ns {
                tx_off(ns, ifname);
            }
            tx_off(sw, port);
            if let Some(mtu) = opts.switch_mtu {
                let mtu = mtu.to_string();
                must(&["ip", "-n", ns, "link", "set", ifname, "mtu", &mtu]);
                must(&["ip", "-n", sw, "link", "set", port, "mtu", &mtu]);
            }
            must(&["ip", "-n", sw, "link", "set", port, "up"]);
            must(&["ip", "-n", ns, "link", "set", ifname, "up"]);
        }
        let (n1v4, n1v6) = (self.nodes[0].v4.to_string(), self.nodes[0].v6.to_string());
        let c = self.client_ns.as_str();
        must(&["ip", "-n", c, "route", "add", "10.96.0.0/16", "via", &n1v4]);
        must(&[
            "ip",
            "-n",
            c,
            "-6",
            "route",
            "add",
            "fd00:96::/64",
            "via",
            &n1v6,
        ]);
        if opts.switch_mtu.is_some() {
            self.client_lan_mss();
        }

        // Each node's task bridge, and routes to the other nodes' tasks.
        for n in &self.nodes {
            must(&["ip", "-n", &n.ns, "link", "add", &n.br, "type", "bridge"]);
            addr(
                &n.ns,
                &n.br,
                &format!("{}/24", n.br_v4),
                &format!("{}/64", n.br_v6),
            );
            must(&["ip", "-n", &n.ns, "link", "set", &n.br, "up"]);
            for o in self.nodes.iter().filter(|o| o.name != n.name) {
                let net4 = format!("{}/24", Ipv4Addr::from(u32::from(o.br_v4) & !0xff));
                let seg = o.br_v6.segments();
                let net6 = format!("{:x}:{:x}::/64", seg[0], seg[1]);
                must(&[
                    "ip",
                    "-n",
                    &n.ns,
                    "route",
                    "add",
                    &net4,
                    "via",
                    &o.v4.to_string(),
                ]);
                must(&[
                    "ip",
                    "-n",
                    &n.ns,
                    "-6",
                    "route",
                    "add",
                    &net6,
                    "via",
                    &o.v6.to_string(),
                ]);
            }
        }
        for (j, t) in self.tasks.iter().enumerate() {
            let n = &self.nodes[t.node];
            let host_if = format!("{}h{}", self.short, j + 1);
            let task_if = format!("{}t{}", self.short, j + 1);
            must(&[
                "ip", "-n", &n.ns, "link", "add", &host_if, "type", "veth", "peer", "name",
                &task_if, "netns", &t.ns,
            ]);
            must(&["ip", "-n", &n.ns, "link", "set", &host_if, "master", &n.br]);
            addr(
                &t.ns,
                &task_if,
                &format!("{}/24", t.v4),
                &format!("{}/64", t.v6),
            );
            must(&["ip", "-n", &n.ns, "link", "set", &host_if, "up"]);
            must(&["ip", "-n", &t.ns, "link", "set", &task_if, "up"]);
            must(&[
                "ip",
                "-n",
                &t.ns,
                "route",
                "add",
                "default",
                "via",
                &n.br_v4.to_string(),
            ]);
            must(&[
                "ip",
                "-n",
                &t.ns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &n.br_v6.to_string(),
            ]);
        }
        for ns in self.all_ns() {
            wait_for(Duration::from_secs(10), "IPv6 addresses to settle", || {
                let out = must(&["ip", "-n", &ns, "-6", "addr", "show", "tentative"]);
                if out.trim().is_empty() {
                    Ok(())
                } else {
                    Err(format!("{ns}: {out}"))
                }
            })
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let root_links = must(&["ip", "-o", "link", "show"]);
        for line in root_links.lines() {
            let name = line.split(':').nth(1).unwrap_or("").trim();
            assert!(
                !name.starts_with(&self.short),
                "mesh leaked interface {name} into the root namespace"
            );
        }
        // Native XDP on a node's uplink transmits into its switch port.
        for n in &self.nodes {
            let dir = self.bpffs_root.join(format!("sw-{}", n.name));
            let out = self.meshlb(
                sw,
                &[
                    "xdp-pass",
                    "--iface",
                    &n.sw_port,
                    "--bpffs",
                    &dir.display().to_string(),
                ],
                Duration::from_secs(30),
            );
            assert!(
                out.success(),
                "xdp-pass on {}: {}",
                n.sw_port,
                out.describe()
            );
        }
    }

    /// The client's routes into the cluster (the VIP ranges via n1 and the
    /// switch subnet) advertise the MSS of a 1500-byte LAN: see
    /// [`MeshOpts::switch_mtu`].
    fn client_lan_mss(&self) {
        let c = self.client_ns.as_str();
        let dev = format!("{}c", self.short);
        let (n1v4, n1v6) = (self.nodes[0].v4.to_string(), self.nodes[0].v6.to_string());
        let src = self.client_v4.to_string();
        let v4: [&[&str]; 2] = [
            &["10.96.0.0/16", "via", &n1v4, "dev", &dev],
            &[
                "10.210.0.0/24",
                "dev",
                &dev,
                "proto",
                "kernel",
                "scope",
                "link",
                "src",
                &src,
            ],
        ];
        for r in v4 {
            let mut argv = vec!["ip", "-n", c, "route", "replace"];
            argv.extend_from_slice(r);
            argv.extend(["advmss", "1460"]);
            must(&argv);
        }
        let v6: [&[&str]; 2] = [
            &["fd00:96::/64", "via", &n1v6, "dev", &dev],
            &[
                "fd00:210::/64",
                "dev",
                &dev,
                "proto",
                "kernel",
                "metric",
                "256",
            ],
        ];
        for r in v6 {
            let mut argv = vec!["ip", "-n", c, "-6", "route", "replace"];
            argv.extend_from_slice(r);
            argv.extend(["advmss", "1440"]);
            must(&argv);
        }
    }

    /// Serves `data` as `/<name>` from a second nginx in task `task`, on
    /// `port` (v4 and v6), from a document root of its own (the task's
    /// main nginx answers every path with its name). `sendfile` on, as a
    /// file server would: the task's stack sends full-sized (TSO) segments.
    /// It also takes uploads: `PUT /up/<file>` (any size) stores the body
    /// as `<root>/up/<file>`. Waits until the task itself downloads the
    /// file intact; returns the document root.
    pub fn serve_file(&self, task: &str, port: u16, name: &str, data: &[u8]) -> PathBuf {
        let t = self.task(task).clone();
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let d = self.dir.join(format!("files-{}-{port}", t.name));
        let root = d.join("root");
        fs::create_dir_all(d.join("tmp")).expect("file server dir");
        fs::create_dir_all(root.join("up")).expect("file server root");
        fs::write(root.join(name), data).expect("write served file");
        let dd = d.display();
        let conf = format!(
            r"master_process off;
daemon off;
worker_processes 1;
pid {dd}/nginx.pid;
error_log {dd}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dd}/tmp/body;
    proxy_temp_path {dd}/tmp/proxy;
    fastcgi_temp_path {dd}/tmp/fastcgi;
    uwsgi_temp_path {dd}/tmp/uwsgi;
    scgi_temp_path {dd}/tmp/scgi;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    server {{
        listen {port};
        listen [::]:{port} ipv6only=on;
        root {root};
        location /up/ {{
            dav_methods PUT;
            client_max_body_size 0;
        }}
    }}
}}
",
            root = root.display()
        );
        let conf_path = d.join("nginx.conf");
        fs::write(&conf_path, conf).expect("write file server nginx.conf");
        let argv: Vec<String> = [
            "ip",
            "netns",
            "exec",
            &t.ns,
            "nginx",
            "-p",
            &d.display().to_string(),
            "-e",
            &d.join("error.log").display().to_string(),
            "-c",
            &conf_path.display().to_string(),
        ]
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
        let log = self.dir.join(format!("files-{}-{port}-{n}.log", t.name));
        let mut p = Proc::spawn(&format!("file server {} :{port}", t.name), &argv, &[], log);
        let path = format!("/{name}");
        let r = wait_for(Duration::from_secs(10), "the file server to answer", || {
            if let Some(st) = p.exit_status() {
                return Err(format!("nginx exited: {st}"));
            }
            in_netns(&t.ns, || {
                for a in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
                    let got = http_download(a.parse().unwrap(), &path, Duration::from_secs(5))?;
                    if got != data {
                        return Err(format!("{a}{path}: {} bytes, not the file", got.len()));
                    }
                }
                Ok(())
            })
        });
        if let Err(e) = r {
            let elog = fs::read_to_string(d.join("error.log")).unwrap_or_default();
            panic!("file server in {}: {e}\n{}\n{elog}", t.name, p.log_text());
        }
        self.servers.lock().unwrap().push(p);
        root
    }

    fn start_servers(&self) {
        for t in &self.tasks {
            let n = self.seq.fetch_add(1, Ordering::Relaxed);
            let p = start_nginx_in(
                &self.dir.join(format!("nginx-{}", t.name)),
                &t.ns,
                &t.name,
                self.dir.join(format!("nginx-{}-{n}.log", t.name)),
            );
            self.servers.lock().unwrap().push(p);
            let e = UdpEcho::start(&t.ns, UDP_PORT, t.name.clone());
            self.udp.lock().unwrap().push(e);
        }
    }

    pub fn task(&self, name: &str) -> &Task {
        self.tasks
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no task {name}"))
    }

    pub fn task_names(&self) -> Vec<String> {
        self.tasks.iter().map(|t| t.name.clone()).collect()
    }

    /// The task answering from address `ip`.
    pub fn task_by_ip(&self, ip: IpAddr) -> Option<&Task> {
        self.tasks
            .iter()
            .find(|t| IpAddr::from(t.v4) == ip || IpAddr::from(t.v6) == ip)
    }

    /// `[[service.backend]]` tables for `tasks` (by name), v4 or v6, each
    /// with the node it runs on.
    pub fn backends_toml(&self, tasks: &[&str], v6: bool) -> String {
        let mut s = String::new();
        for name in tasks {
            let t = self.task(name);
            let a: IpAddr = if v6 { t.v6.into() } else { t.v4.into() };
            s += &format!(
                "[[service.backend]]\naddr = \"{a}\"\nnode = \"{}\"\n\n",
                self.nodes[t.node].name
            );
        }
        s
    }

    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    pub fn bpffs(&self, node: &Node) -> PathBuf {
        self.bpffs_root.join(&node.name)
    }

    /// Runs `meshlb ARGS` in namespace `ns`.
    pub fn meshlb(&self, ns: &str, args: &[&str], timeout: Duration) -> CmdOutput {
        let net = format!("--net=/run/netns/{ns}");
        let mut argv = vec!["nsenter", net.as_str(), MESHLB];
        argv.extend_from_slice(args);
        run_cmd_env(&argv, &[("RUST_BACKTRACE", "0")], timeout)
    }

    /// Runs a shell script in namespace `ns` (nsenter, so bpffs stays
    /// visible).
    pub fn meshlb_sh(&self, ns: &str, script: &str, timeout: Duration) -> CmdOutput {
        let net = format!("--net=/run/netns/{ns}");
        run_cmd_env(
            &["nsenter", net.as_str(), "sh", "-c", script],
            &[("RUST_BACKTRACE", "0")],
            timeout,
        )
    }

    /// Starts `meshlb run --config CONFIG --node <name>` on node `i`,
    /// attached to its uplink and its task bridge.
    pub fn start_daemon(&self, i: usize, config: &Path) -> Proc {
        self.start_daemon_args(i, &["--config", &config.display().to_string()])
    }

    /// Starts `meshlb run ARGS --node <name>` on node `i`, attached to its
    /// uplink and its task bridge.
    pub fn start_daemon_args(&self, i: usize, args: &[&str]) -> Proc {
        let n = &self.nodes[i];
        self.start_daemon_ifaces(i, args, &[&n.eth, &n.br])
    }

    /// Starts `meshlb run ARGS --node <name>` on node `i` with `--iface`
    /// for each of `ifaces` only (none: the daemon picks them itself).
    pub fn start_daemon_ifaces(&self, i: usize, args: &[&str], ifaces: &[&str]) -> Proc {
        let n = &self.nodes[i];
        let log = self.dir.join(format!(
            "meshlb-{}-{}.log",
            n.name,
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        self.logs.lock().unwrap().push(log.clone());
        let bpffs = self.bpffs(n).display().to_string();
        let net = format!("--net=/run/netns/{}", n.ns);
        let mut argv: Vec<&str> = vec!["nsenter", &net, MESHLB, "run"];
        argv.extend_from_slice(args);
        argv.extend(["--node", &n.name, "--bpffs", &bpffs]);
        for i in ifaces {
            argv.extend(["--iface", i]);
        }
        let argv: Vec<String> = argv.iter().map(std::string::ToString::to_string).collect();
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        Proc::spawn(
            &format!("meshlb run {}", n.name),
            &argv,
            &[("RUST_LOG", &rust_log), ("RUST_BACKTRACE", "1")],
            log,
        )
    }

    /// Waits until node `i`'s daemon serves metrics, lists every service
    /// of `services` in `status`, and XDP sits on both its interfaces
    /// (native on the uplink, generic on the bridge).
    pub fn wait_ready(&self, i: usize, daemon: &mut Proc, services: &[&str]) -> Value {
        let n = &self.nodes[i];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = daemon.exit_status() {
                panic!(
                    "daemon {} exited before it was ready: {st}{}",
                    n.name,
                    self.ctx()
                );
            }
            let r = (|| -> Result<Value, String> {
                in_netns(&n.ns, || {
                    http_get_path(
                        "127.0.0.1:9742".parse().unwrap(),
                        "/metrics",
                        Duration::from_secs(2),
                    )
                })
                .map_err(|e| format!("metrics: {e}"))?;
                let st = self.try_status(i)?;
                for want in services {
                    let found = st["services"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|s| s["name"] == *want));
                    if !found {
                        return Err(format!("service {want} not in status"));
                    }
                }
                if xdp_mode(&n.ns, &n.eth) != Some(1) {
                    return Err(format!(
                        "XDP mode of {}: {:?}",
                        n.eth,
                        xdp_mode(&n.ns, &n.eth)
                    ));
                }
                if xdp_mode(&n.ns, &n.br).is_some() {
                    return Err(format!("{}: XDP attached to a task bridge", n.br));
                }
                Ok(st)
            })();
            match r {
                Ok(v) => return v,
                Err(e) if Instant::now() >= deadline => {
                    daemon.signal(Signal::SIGKILL);
                    panic!("daemon {} not ready: {e}{}", n.name, self.ctx());
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Node `i`'s data path counters by name (`status --json`); panics
    /// with the context when status fails.
    pub fn counters(&self, i: usize) -> BTreeMap<String, u64> {
        let st = self
            .try_status(i)
            .unwrap_or_else(|e| panic!("status of {}: {e}{}", self.nodes[i].name, self.ctx()));
        st["counters"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn try_status(&self, i: usize) -> Result<Value, String> {
        let n = &self.nodes[i];
        let dir = self.bpffs(n).display().to_string();
        let out = self.meshlb(
            &n.ns,
            &["status", "--json", "--bpffs", &dir],
            Duration::from_secs(15),
        );
        if !out.success() {
            return Err(out.describe());
        }
        serde_json::from_str(&out.stdout).map_err(|e| format!("status --json: {e}"))
    }

    /// The text of every daemon log of node `i` so far (all its runs).
    pub fn log_text(&self, i: usize) -> String {
        let prefix = format!("meshlb-{}-", self.nodes[i].name);
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
            })
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    /// Every daemon log of this test (tail) and each node's non-zero data
    /// path counters, for failure messages.
    pub fn ctx(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if let Ok(st) = self.try_status(i) {
                let c: Vec<String> = st["counters"]
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .filter(|(_, v)| v.as_u64() != Some(0))
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect()
                    })
                    .unwrap_or_default();
                s += &format!("\n===== {} counters: {}", n.name, c.join(" "));
            }
        }
        for p in self.logs.lock().unwrap().iter() {
            let text = fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            s += &format!("\n===== {} =====\n{}", p.display(), tail.join("\n"));
        }
        s
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.client_ns, f)
    }

    /// The client's interface on the switch (in `client_ns`).
    pub fn client_iface(&self) -> String {
        format!("{}c", self.short)
    }

    /// The switch bridge (in `sw_ns`).
    pub fn sw_bridge(&self) -> String {
        format!("{}sw", self.short)
    }

    /// Gives the switch bridge the address `cidr` (e.g. `10.210.0.250/24`),
    /// so that a server in `sw_ns` (etcd) is reachable from every node and
    /// from the client over the switch, and a node can be cut off from it
    /// alone.
    pub fn sw_addr(&self, cidr: &str) {
        must(&[
            "ip",
            "-n",
            &self.sw_ns,
            "addr",
            "add",
            cidr,
            "dev",
            &self.sw_bridge(),
        ]);
    }

    /// Routes the VIP ranges (10.96.0.0/16, fd00:96::/64) on-link from the
    /// client instead of via n1: the client resolves a VIP itself (ARP,
    /// neighbour solicitation), as a host on the segment of announced VIPs
    /// does.
    pub fn client_vips_on_link(&self) {
        let (c, dev) = (self.client_ns.as_str(), self.client_iface());
        must(&[
            "ip",
            "-n",
            c,
            "route",
            "replace",
            "10.96.0.0/16",
            "dev",
            &dev,
        ]);
        must(&[
            "ip",
            "-n",
            c,
            "-6",
            "route",
            "replace",
            "fd00:96::/64",
            "dev",
            &dev,
        ]);
    }
}

/// The mesh tests' config: `web` (v4) and `web6` over `tasks`; `solo`
/// (v4, port 81) has only t3, which runs on n2.
pub fn config(m: &Mesh, tasks: &[&str]) -> String {
    format!(
        r#"
[[service]]
name = "web"
vip = "{VIP4}"
publish = [{{ proto = "tcp", port = 80, target = 8000 }}, {{ proto = "udp", port = 53, target = {UDP_PORT} }}]

{}
[[service]]
name = "web6"
vip = "{VIP6}"
publish = [{{ proto = "tcp", port = 8080, target = 8000 }}, {{ proto = "udp", port = 5300, target = {UDP_PORT} }}]

{}
[[service]]
name = "solo"
publish = [{{ proto = "tcp", port = 81, target = 8000 }}]

{}
"#,
        m.backends_toml(tasks, false),
        m.backends_toml(tasks, true),
        m.backends_toml(&["t3"], false),
    )
}

/// `config` plus the file services of the path MTU test, both with only
/// t3 (on n2), to the file server `serve_file` runs on `FILE_PORT`:
/// `bulk` (v4, port 82) and `bulk6` (v6, port 8082).
pub fn config_with_files(m: &Mesh) -> String {
    format!(
        r#"{}
[[service]]
name = "bulk"
publish = [{{ proto = "tcp", port = 82, target = {FILE_PORT} }}]

{}
[[service]]
name = "bulk6"
publish = [{{ proto = "tcp", port = 8082, target = {FILE_PORT} }}]

{}
"#,
        config(m, &ALL),
        m.backends_toml(&["t3"], false),
        m.backends_toml(&["t3"], true),
    )
}

/// Port of the file server of `Mesh::serve_file` in the path MTU test.
pub const FILE_PORT: u16 = 8002;

/// Every task.
pub const ALL: [&str; 4] = ["t1", "t2", "t3", "t4"];
/// The services of `config`.
pub const SERVICES: [&str; 3] = ["web", "web6", "solo"];

/// Starts a daemon on every node with `config(m, &ALL)` and waits until
/// each is ready.
pub fn start_cluster(m: &Mesh) -> Vec<Proc> {
    start_cluster_with(m, &config(m, &ALL), &SERVICES)
}

/// Starts a daemon on every node with `text` as config and waits until
/// each lists `services`.
pub fn start_cluster_with(m: &Mesh, text: &str, services: &[&str]) -> Vec<Proc> {
    let cfg = m.write_file("meshlb.toml", text);
    let mut daemons: Vec<Proc> = (0..3).map(|i| m.start_daemon(i, &cfg)).collect();
    for (i, d) in daemons.iter_mut().enumerate() {
        m.wait_ready(i, d, services);
    }
    daemons
}

/// `GET path` (HTTP/1.0) on its own connection, in the calling thread's
/// namespace: the body of a 200 answer, which must be as long as its
/// `Content-Length`, all within `timeout`.
pub fn http_download(dst: SocketAddr, path: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timeout;
    let mut s = tcp_connect(None, dst, timeout).map_err(|e| format!("connect {dst}: {e}"))?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {dst}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send to {dst}: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "{dst}{path}: not complete within {timeout:?} ({} bytes so far)",
                buf.len()
            ));
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err(format!(
                    "{dst}{path}: stalled: not complete within {timeout:?} ({} bytes so far)",
                    buf.len()
                ))
            }
            Err(e) => {
                return Err(format!(
                    "{dst}{path}: read: {e} ({} bytes so far)",
                    buf.len()
                ))
            }
        }
    }
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{dst}{path}: no header end in {} bytes", buf.len()))?;
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{dst}{path}: status {status:?}"));
    }
    let body = buf.split_off(end + 4);
    let len: Option<usize> = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    });
    match len {
        Some(n) if n == body.len() => Ok(body),
        Some(n) => Err(format!(
            "{dst}{path}: {} body bytes of Content-Length {n}",
            body.len()
        )),
        None => Err(format!("{dst}{path}: no Content-Length in {head:?}")),
    }
}

/// The IP, ICMP and IPv6 counters of namespace `ns` (`/proc/net/snmp` as
/// "Group.Name", `/proc/net/snmp6` by its own names).
pub fn snmp(ns: &str) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    let v4 = must(&["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"]);
    super::add_paired_counters(&mut m, ns, "/proc/net/snmp", &v4, ".");
    let v6 = must(&["ip", "netns", "exec", ns, "cat", "/proc/net/snmp6"]);
    super::add_line_counters(&mut m, &v6);
    m
}

/// A socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` report it as EAGAIN).
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// `PUT path` (HTTP/1.0) of `body` on its own connection, in the calling
/// thread's namespace: the answer's status code, all within `timeout`.
pub fn http_put(
    dst: SocketAddr,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<u16, String> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut s = tcp_connect(None, dst, timeout).map_err(|e| format!("connect {dst}: {e}"))?;
    let head = format!(
        "PUT {path} HTTP/1.0\r\nHost: {dst}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .map_err(|e| format!("send to {dst}: {e}"))?;
    // One write at a time, each with what is left of the deadline (a
    // `write_all` would restart the timeout after every partial write).
    let mut sent = 0;
    while sent < body.len() {
        if left().is_zero() {
            return Err(format!(
                "{dst}{path}: {sent} of {} bytes sent within {timeout:?}",
                body.len()
            ));
        }
        s.set_write_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        match s.write(&body[sent..]) {
            Ok(0) => return Err(format!("{dst}{path}: connection closed after {sent} bytes")),
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return Err(format!(
                    "{dst}{path}: stalled: {sent} of {} bytes sent within {timeout:?}",
                    body.len()
                ))
            }
            Err(e) => {
                return Err(format!(
                    "{dst}{path}: send: {e} ({sent} of {} bytes sent)",
                    body.len()
                ))
            }
        }
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if left().is_zero() {
            return Err(format!(
                "{dst}{path}: no complete answer within {timeout:?} (body sent)"
            ));
        }
        s.set_read_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("{dst}{path}: read: {e} (body sent)")),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let status = text.lines().next().unwrap_or("");
    status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{dst}{path}: malformed answer {text:?}"))
}

/// `ip -d -j link` XDP attach mode of `iface` in `ns` (1 native, 2 generic).
pub fn xdp_mode(ns: &str, iface: &str) -> Option<u64> {
    let out = must(&["ip", "-n", ns, "-d", "-j", "link", "show", "dev", iface]);
    let v: Value = serde_json::from_str(&out).ok()?;
    v[0]["xdp"]["mode"].as_u64()
}

fn addr(ns: &str, ifname: &str, v4: &str, v6: &str) {
    must(&["ip", "-n", ns, "addr", "add", v4, "dev", ifname]);
    must(&["ip", "-n", ns, "addr", "add", v6, "dev", ifname, "nodad"]);
}

/// A device that computes checksums in software (a wire, a router, a
/// remote host): no TX checksum offload.
fn tx_off(ns: &str, ifname: &str) {
    must(&[
        "ip", "netns", "exec", ns, "ethtool", "-K", ifname, "tx", "off",
    ]);
}

/// The node-port address of node `n` for a published port.
pub fn node_addr(n: &Node, port: u16, v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(n.v6.into(), port)
    } else {
        SocketAddr::new(n.v4.into(), port)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        stop_servers(&self.udp, &self.servers);
        // Detach and unpin: each node's dir in its namespace, the switch
        // ports' in the switch namespace.
        let mut dirs: Vec<(String, PathBuf)> = self
            .nodes
            .iter()
            .map(|n| (n.ns.clone(), self.bpffs(n)))
            .collect();
        dirs.extend(self.nodes.iter().map(|n| {
            (
                self.sw_ns.clone(),
                self.bpffs_root.join(format!("sw-{}", n.name)),
            )
        }));
        for (ns, d) in dirs {
            if d.is_dir() && Path::new("/run/netns").join(&ns).exists() {
                let ds = d.display().to_string();
                let out = self.meshlb(&ns, &["cleanup", "--bpffs", &ds], Duration::from_secs(20));
                if !out.success() {
                    eprintln!("teardown: {}", out.describe());
                }
            }
        }
        let _ = fs::remove_dir_all(&self.bpffs_root);
        for ns in self.all_ns() {
            if Path::new("/run/netns").join(&ns).exists() {
                let out = run_cmd(&["ip", "netns", "del", &ns], Duration::from_secs(30));
                if !out.success() {
                    eprintln!("teardown: {}", out.describe());
                }
            }
        }
        if thread::panicking() {
            eprintln!("test failed: logs kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
