//! Shared harness for meshlb's network-namespace integration tests.
//!
//! A [`Topology`] is a private network built only from namespaces and veth
//! pairs (nothing is added to the root namespace), so tests run in parallel
//! with the same addresses:
//!
//! ```text
//!  client ns               LB ns                    backend ns i (i = 1..=N)
//!  10.200.0.2/24  <-veth->  10.200.0.1/24
//!  fd00:200::2/64           fd00:200::1/64
//!                           10.201.i.1/24    <-veth-> 10.201.i.2/24
//!                           fd00:201:i::1/64         fd00:201:i::2/64
//! ```
//!
//! The client routes the VIP ranges (10.96.0.0/16, fd00:96::/64) and the
//! backend ranges via the LB; backends route everything via the LB; the LB
//! forwards (v4 and v6). Every veth end has TX checksum offload off (native
//! XDP redirect on veth needs full checksums).
//!
//! Processes are spawned by PID and killed by PID. The meshlb daemon runs via
//! `nsenter --net=...` (`ip netns exec` remounts /sys and would hide bpffs);
//! nginx runs via `ip netns exec`. Socket helpers (`http_get`, `udp_request`,
//! [`KeepAlive`]) act in the calling thread's namespace: wrap them in
//! [`in_netns`] / [`Topology::client`]. A socket keeps the namespace it was
//! created in, so a socket made in the client namespace may be used from any
//! thread afterwards.
//!
//! Everything waits with a deadline, and failures carry the daemon's log.
#![allow(dead_code)] // every test crate uses a different subset

pub mod arp;
pub mod docker;
pub mod etcd;
pub mod mesh;
pub mod router;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use socket2::{Domain, SockAddr, Socket, Type};

/// The binary under test.
pub const MESHLB: &str = env!("CARGO_BIN_EXE_meshlb");

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
pub const LB_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);
pub const LB_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
/// TCP port every nginx backend listens on (v4 and v6).
pub const HTTP_PORT: u16 = 8000;
/// The same nginx server also listens here (v4 and v6): a direct-path
/// baseline on this port never shares a 4-tuple with VIP flows at the
/// backend. Sharing one makes the backend's TIME_WAIT sockets (from the
/// other path, whose client ISN and TCP timestamp offset differ because they
/// are keyed by the destination the client sees) reject new SYNs for a while.
pub const BASELINE_PORT: u16 = 8001;
/// The client's ephemeral port range; ports outside it (e.g. 41234) are only
/// ever used when a test binds them explicitly.
pub const CLIENT_PORT_RANGE: (u16, u16) = (20000, 39999);

const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// Fails loudly unless running as root: these tests build namespaces, veths
/// and XDP programs, and are meaningless without privileges. Never skips,
/// in CI or elsewhere.
pub fn require_root() {
    let euid = fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid());
    if euid != 0 {
        let ci = std::env::var_os("CI").is_some();
        panic!(
            "meshlb namespace tests need root (netns, veth, XDP, bpffs) but euid is {euid}{}; \
             run them as root (e.g. `sudo -E cargo test`) — they never skip",
            if ci { " and CI is set" } else { "" }
        );
    }
    for tool in ["ip", "nsenter", "ethtool", "mount"] {
        assert!(
            which(tool).is_some(),
            "required tool `{tool}` is not in PATH (install iproute2, util-linux, ethtool)"
        );
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------
// Commands with deadlines

/// Result of a command run to completion (or killed at its deadline).
#[derive(Debug)]
pub struct CmdOutput {
    pub cmdline: String,
    /// `None` when the command hit its deadline and was killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Non-empty stderr lines.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    pub fn describe(&self) -> String {
        let status = match self.status {
            Some(s) => format!("{s}"),
            None => "timed out (killed)".to_string(),
        };
        format!(
            "`{}` -> {status}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

static CMD_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Runs `argv` with a deadline; output goes through files so a grandchild
/// holding a pipe can never block us.
pub fn run_cmd(argv: &[&str], timeout: Duration) -> CmdOutput {
    run_cmd_env(argv, &[], timeout)
}

pub fn run_cmd_env(argv: &[&str], env: &[(&str, &str)], timeout: Duration) -> CmdOutput {
    let cmdline = argv.join(" ");
    let n = CMD_SEQ.fetch_add(1, Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("mlbt-cmd-{}-{n}", std::process::id()));
    let out_path = base.with_extension("out");
    let err_path = base.with_extension("err");
    let out = File::create(&out_path).expect("create temp stdout file");
    let err = File::create(&err_path).expect("create temp stderr file");
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let status = match cmd.spawn() {
        Ok(mut child) => wait_child(&mut child, timeout).or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            None
        }),
        Err(e) => {
            let _ = fs::remove_file(&out_path);
            let _ = fs::remove_file(&err_path);
            return CmdOutput {
                cmdline,
                status: None,
                stdout: String::new(),
                stderr: format!("cannot spawn: {e}"),
            };
        }
    };
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    let _ = fs::remove_file(&out_path);
    let _ = fs::remove_file(&err_path);
    CmdOutput {
        cmdline,
        status,
        stdout,
        stderr,
    }
}

/// Runs `argv` and panics (with its output) unless it succeeds; returns stdout.
pub fn must(argv: &[&str]) -> String {
    let out = run_cmd(argv, CMD_TIMEOUT);
    assert!(out.success(), "command failed: {}", out.describe());
    out.stdout
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(_) => return None,
        }
    }
}

/// Polls `f` until it returns `Ok`, or fails with the last error at the deadline.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {what}: {e}"
                ))
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ---------------------------------------------------------------------------
// Namespaces

/// Moves the calling thread into network namespace `ns` (a name under /run/netns).
pub fn enter_netns(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let f = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    setns(&f, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns({path}): {e}"));
}

/// Runs `f` on a fresh thread inside network namespace `ns`; panics propagate.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        let h = s.spawn(|| {
            enter_netns(ns);
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

static BPFFS: Once = Once::new();

/// Mounts bpffs at /sys/fs/bpf when it is not mounted yet.
pub fn ensure_bpffs() {
    BPFFS.call_once(|| {
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mounted = mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
        });
        if !mounted {
            must(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]);
        }
    });
}

// ---------------------------------------------------------------------------
// Processes

/// A spawned process, killed by PID when dropped.
pub struct Proc {
    pub name: String,
    /// stdout and stderr of the process.
    pub log: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: &str, argv: &[String], env: &[(&str, &str)], log: PathBuf) -> Proc {
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log fd");
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({}): {e}", argv.join(" ")));
        Proc {
            name: name.to_string(),
            log,
            child,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` unless the process has already been reaped.
    pub fn signal(&mut self, sig: Signal) {
        if self.is_running() {
            kill(Pid::from_raw(self.pid()), sig)
                .unwrap_or_else(|e| panic!("kill -{sig} {} ({}): {e}", self.pid(), self.name));
        }
    }

    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_child(&mut self.child, timeout);
        }
        self.status
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        assert!(
            self.wait_exit(Duration::from_secs(10)).is_some(),
            "{} (pid {}) survived SIGKILL for 10 s",
            self.name,
            self.pid()
        );
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if !self.is_running() {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        if self.wait_exit(grace).is_none() {
            let _ = kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
            self.wait_exit(Duration::from_secs(10));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(cannot read log: {e})"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
            self.wait_exit(Duration::from_secs(10));
        }
    }
}

// ---------------------------------------------------------------------------
// Topology

/// Shape of a test network.
#[derive(Clone, Debug)]
pub struct TopoOpts {
    /// Number of backend namespaces (0..=9).
    pub backends: usize,
}

impl Default for TopoOpts {
    fn default() -> Self {
        TopoOpts { backends: 3 }
    }
}

/// One backend namespace.
#[derive(Clone, Debug)]
pub struct Backend {
    /// "b1", "b2", ...: also what its servers answer.
    pub name: String,
    pub ns: String,
    /// The veth end inside the backend namespace.
    pub iface: String,
    /// The veth end inside the LB namespace.
    pub lb_iface: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub lb_v4: Ipv4Addr,
    pub lb_v6: Ipv6Addr,
}

impl Backend {
    pub fn http_v4(&self) -> SocketAddr {
        SocketAddr::new(self.v4.into(), HTTP_PORT)
    }
    pub fn http_v6(&self) -> SocketAddr {
        SocketAddr::new(self.v6.into(), HTTP_PORT)
    }
}

/// A test's private network of namespaces; torn down on drop.
pub struct Topology {
    /// `mlbt-<tag>-<pid%10000>`: namespaces, the temp dir and the bpffs dir carry it.
    pub prefix: String,
    /// `<tag><pid%10000>`: every veth name starts with it.
    pub short: String,
    pub client_ns: String,
    pub lb_ns: String,
    /// The veth end in the client namespace.
    pub client_iface: String,
    /// The LB's veth end facing the client.
    pub lb_client_iface: String,
    pub backends: Vec<Backend>,
    /// Temp dir for configs, logs and server state.
    pub dir: PathBuf,
    /// `/sys/fs/bpf/<prefix>`: every pin of this test lives below it.
    pub bpffs_root: PathBuf,
    servers: Mutex<Vec<Proc>>,
    udp: Mutex<Vec<UdpEcho>>,
    daemon_logs: Mutex<Vec<PathBuf>>,
    seq: AtomicUsize,
}

impl Topology {
    /// Builds the network. `tag` (1–4 alphanumerics) must be unique among
    /// the tests of one test binary; the PID separates binaries.
    pub fn new(tag: &str, opts: TopoOpts) -> Topology {
        require_root();
        assert!(
            (1..=4).contains(&tag.len()) && tag.chars().all(|c| c.is_ascii_alphanumeric()),
            "topology tag {tag:?} must be 1-4 ascii alphanumerics"
        );
        assert!(opts.backends <= 9, "at most 9 backends");
        ensure_bpffs();
        let pid = std::process::id() % 10000;
        let prefix = format!("mlbt-{tag}-{pid}");
        let short = format!("{tag}{pid}");
        let backends = (1..=opts.backends)
            .map(|i| Backend {
                name: format!("b{i}"),
                ns: format!("{prefix}-b{i}"),
                iface: format!("{short}b{i}"),
                lb_iface: format!("{short}l{i}"),
                v4: Ipv4Addr::new(10, 201, i as u8, 2),
                v6: Ipv6Addr::new(0xfd00, 0x201, i as u16, 0, 0, 0, 0, 2),
                lb_v4: Ipv4Addr::new(10, 201, i as u8, 1),
                lb_v6: Ipv6Addr::new(0xfd00, 0x201, i as u16, 0, 0, 0, 0, 1),
            })
            .collect();
        let topo = Topology {
            client_ns: format!("{prefix}-c"),
            lb_ns: format!("{prefix}-lb"),
            client_iface: format!("{short}c"),
            lb_client_iface: format!("{short}lc"),
            backends,
            dir: std::env::temp_dir().join(&prefix),
            bpffs_root: PathBuf::from("/sys/fs/bpf").join(&prefix),
            prefix,
            short,
            servers: Mutex::new(Vec::new()),
            udp: Mutex::new(Vec::new()),
            daemon_logs: Mutex::new(Vec::new()),
            seq: AtomicUsize::new(0),
        };
        // From here on a panic drops `topo`, which removes whatever exists.
        topo.remove_stale();
        fs::create_dir_all(&topo.dir).expect("create test temp dir");
        fs::create_dir_all(&topo.bpffs_root)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", topo.bpffs_root.display()));
        topo.build();
        topo
    }

    fn all_ns(&self) -> Vec<String> {
        let mut v = vec![self.client_ns.clone(), self.lb_ns.clone()];
        v.extend(self.backends.iter().map(|b| b.ns.clone()));
        v
    }

    fn remove_stale(&self) {
        for ns in self.all_ns() {
            if Path::new("/run/netns").join(&ns).exists() {
                let _ = run_cmd(&["ip", "netns", "del", &ns], CMD_TIMEOUT);
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_dir_all(&self.bpffs_root);
    }

    fn build(&self) {
        let (c, lb) = (self.client_ns.as_str(), self.lb_ns.as_str());
        for ns in self.all_ns() {
            must(&["ip", "netns", "add", &ns]);
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            // No DAD anywhere (link-local included): addresses usable at once.
            let mut sysctls = vec![
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ];
            if ns == self.lb_ns {
                sysctls.extend(["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
            }
            let range = format!(
                "net.ipv4.ip_local_port_range={} {}",
                CLIENT_PORT_RANGE.0, CLIENT_PORT_RANGE.1
            );
            if ns == self.client_ns {
                sysctls.push(&range);
                sysctls.push("net.ipv4.tcp_tw_reuse=1");
            }
            let mut argv = vec!["ip", "netns", "exec", &ns, "sysctl", "-qw"];
            argv.extend(sysctls.iter().copied());
            must(&argv);
        }

        // Client <-> LB. Both ends are created directly in their namespaces.
        self.veth(
            lb,
            &self.lb_client_iface,
            c,
            &self.client_iface,
            (LB_V4, LB_V6),
            (CLIENT_V4, CLIENT_V6),
            24,
        );
        let lbv4 = LB_V4.to_string();
        let lbv6 = LB_V6.to_string();
        for net in ["10.96.0.0/16", "10.201.0.0/16"] {
            must(&["ip", "-n", c, "route", "add", net, "via", &lbv4]);
        }
        for net in ["fd00:96::/64", "fd00:201::/32"] {
            must(&["ip", "-n", c, "-6", "route", "add", net, "via", &lbv6]);
        }

        for b in &self.backends {
            self.veth(
                lb,
                &b.lb_iface,
                &b.ns,
                &b.iface,
                (b.lb_v4, b.lb_v6),
                (b.v4, b.v6),
                24,
            );
            must(&[
                "ip",
                "-n",
                &b.ns,
                "route",
                "add",
                "default",
                "via",
                &b.lb_v4.to_string(),
            ]);
            must(&[
                "ip",
                "-n",
                &b.ns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &b.lb_v6.to_string(),
            ]);
        }

        router::settle_and_check_root(&self.all_ns(), &self.short);
    }

    #[allow(clippy::too_many_arguments)]
    fn veth(
        &self,
        ns_a: &str,
        if_a: &str,
        ns_b: &str,
        if_b: &str,
        (a4, a6): (Ipv4Addr, Ipv6Addr),
        (b4, b6): (Ipv4Addr, Ipv6Addr),
        plen: u8,
    ) {
        router::veth(ns_a, if_a, ns_b, if_b);
        for (ns, ifname, v4, v6) in [(ns_a, if_a, a4, a6), (ns_b, if_b, b4, b6)] {
            router::addr_plen(ns, ifname, v4.into(), plen, v6.into());
            // The client and the backends of this topology play hosts on
            // a wire (a classic load balancer's servers, not local tasks:
            // those are tests/common/mesh.rs and tests/real_traffic.rs),
            // which delivers complete checksums. The LB namespace is the
            // node: its devices keep the kernel's defaults.
            if ns != ns_a {
                router::tx_off(ns, ifname);
            }
            must(&["ip", "-n", ns, "link", "set", ifname, "up"]);
        }
    }

    /// The LB namespace's interfaces: client-facing first, then backend-facing.
    pub fn lb_ifaces(&self) -> Vec<String> {
        let mut v = vec![self.lb_client_iface.clone()];
        v.extend(self.backends.iter().map(|b| b.lb_iface.clone()));
        v
    }

    /// A bpffs directory for this test (below `/sys/fs/bpf/<prefix>`).
    pub fn bpffs(&self, sub: &str) -> PathBuf {
        self.bpffs_root.join(sub)
    }

    /// The daemon's bpffs directory.
    pub fn lb_bpffs(&self) -> PathBuf {
        self.bpffs("lb")
    }

    pub fn backend(&self, name: &str) -> &Backend {
        self.backends
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    /// The backend whose address (v4 or v6) is `ip`.
    pub fn backend_by_ip(&self, ip: IpAddr) -> Option<&Backend> {
        self.backends
            .iter()
            .find(|b| IpAddr::from(b.v4) == ip || IpAddr::from(b.v6) == ip)
    }

    pub fn backend_names(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.name.clone()).collect()
    }

    /// Writes `text` to a file in the test's temp dir.
    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    fn next_log(&self, stem: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{stem}-{n}.log"))
    }

    /// Runs `f` on a thread inside the client namespace.
    pub fn client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.client_ns, f)
    }

    // --- meshlb -------------------------------------------------------------

    /// Runs `meshlb ARGS` in namespace `ns` (via nsenter, so bpffs stays visible).
    pub fn meshlb(&self, ns: &str, args: &[&str], timeout: Duration) -> CmdOutput {
        let net = format!("--net=/run/netns/{ns}");
        let mut argv = vec!["nsenter", net.as_str(), MESHLB];
        argv.extend_from_slice(args);
        run_cmd_env(&argv, &[("RUST_BACKTRACE", "0")], timeout)
    }

    /// Starts the daemon in the LB namespace on all LB interfaces.
    pub fn start_daemon(&self, config: &Path, xdp_mode: &str) -> Proc {
        let ifaces = self.lb_ifaces();
        let refs: Vec<&str> = ifaces.iter().map(String::as_str).collect();
        self.start_daemon_on(config, xdp_mode, &refs)
    }

    pub fn start_daemon_on(&self, config: &Path, xdp_mode: &str, ifaces: &[&str]) -> Proc {
        let config = config.display().to_string();
        self.start_daemon_args(&["--config", &config, "--xdp-mode", xdp_mode], ifaces)
    }

    /// Every daemon log of this test (tail), for failure messages.
    pub fn ctx(&self) -> String {
        let mut s = String::new();
        for p in self.daemon_logs.lock().unwrap().iter() {
            let text = fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            s += &format!(
                "\n===== {} (last {} lines) =====\n",
                p.display(),
                tail.len()
            );
            s += &tail.join("\n");
        }
        if s.is_empty() {
            s = "\n(no daemon started)".into();
        }
        s
    }

    /// Waits until the daemon is up: the process lives, its metrics endpoint
    /// (default 127.0.0.1:9742 in the LB namespace) answers — which the pinned
    /// state alone cannot, so this also tells a restarted daemon from the
    /// pins of the previous one — `status --json` lists every service in
    /// `services`, and XDP is attached to every LB interface. Fails at once
    /// when the daemon exits.
    pub fn wait_ready(&self, daemon: &mut Proc, services: &[&str], timeout: Duration) -> Value {
        let ifaces = self.lb_ifaces();
        let refs: Vec<&str> = ifaces.iter().map(String::as_str).collect();
        self.wait_ready_on(daemon, services, timeout, &refs)
    }

    /// `wait_ready` for a daemon attached to `ifaces` only.
    pub fn wait_ready_on(
        &self,
        daemon: &mut Proc,
        services: &[&str],
        timeout: Duration,
        ifaces: &[&str],
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let metrics: SocketAddr = "127.0.0.1:9742".parse().unwrap();
        loop {
            if let Some(st) = daemon.exit_status() {
                panic!("daemon exited before it was ready: {st}{}", self.ctx());
            }
            let r = (|| -> Result<Value, String> {
                in_netns(&self.lb_ns, || {
                    http_get_path(metrics, "/metrics", Duration::from_secs(2))
                })
                .map_err(|e| format!("metrics endpoint: {e}"))?;
                let status = self.try_status()?;
                let names: Vec<&str> = status["services"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
                    .unwrap_or_default();
                for want in services {
                    if !names.contains(want) {
                        return Err(format!("service {want} not in status: {status}"));
                    }
                }
                for i in ifaces {
                    if self.xdp_mode(&self.lb_ns, i).is_none() {
                        return Err(format!("no XDP program on {i}"));
                    }
                }
                Ok(status)
            })();
            let last = match r {
                Ok(v) => return v,
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                daemon.signal(Signal::SIGKILL);
                daemon.wait_exit(Duration::from_secs(5));
                panic!("daemon not ready after {timeout:?}: {last}{}", self.ctx());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `meshlb status --json` against the daemon's bpffs dir.
    pub fn try_status(&self) -> Result<Value, String> {
        let dir = self.lb_bpffs().display().to_string();
        let out = self.meshlb(
            &self.lb_ns,
            &["status", "--json", "--bpffs", &dir],
            Duration::from_secs(15),
        );
        if !out.success() {
            return Err(out.describe());
        }
        serde_json::from_str(&out.stdout)
            .map_err(|e| format!("status --json is not JSON ({e}): {}", out.stdout))
    }

    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|e| panic!("{e}{}", self.ctx()))
    }

    /// `meshlb explain PROTO SRC DST --json` against the daemon's bpffs dir.
    pub fn explain(&self, proto: &str, src: SocketAddr, dst: SocketAddr) -> Value {
        let dir = self.lb_bpffs().display().to_string();
        let (s, d) = (src.to_string(), dst.to_string());
        let out = self.meshlb(
            &self.lb_ns,
            &["explain", proto, &s, &d, "--json", "--bpffs", &dir],
            Duration::from_secs(15),
        );
        assert!(out.success(), "{}{}", out.describe(), self.ctx());
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "explain --json is not JSON ({e}): {}{}",
                out.stdout,
                self.ctx()
            )
        })
    }

    /// Makes the client a gateway of the LB namespace (a route to `net`
    /// via it, e.g. for what a node refuses as its gateway's address);
    /// returns the gateway's address.
    pub fn client_as_gateway(&self, net: &str) -> String {
        let via = CLIENT_V4.to_string();
        must(&["ip", "-n", &self.lb_ns, "route", "add", net, "via", &via]);
        via
    }

    /// A TCP listener on every address of the LB namespace, held by this
    /// test process, as sshd on 22 would be.
    pub fn listen_in_lb(&self, port: u16) -> std::net::TcpListener {
        in_netns(&self.lb_ns, || {
            std::net::TcpListener::bind(("0.0.0.0", port))
                .unwrap_or_else(|e| panic!("listen on {port}: {e}"))
        })
    }

    /// Attaches a pass-all XDP program (`meshlb xdp-pass`, native mode) to
    /// the client's and every backend's veth end: native XDP redirect on veth
    /// only delivers into a peer that has an XDP program.
    pub fn xdp_pass_peers(&self) {
        let mut targets = vec![(
            self.client_ns.clone(),
            self.client_iface.clone(),
            "c".to_string(),
        )];
        targets.extend(
            self.backends
                .iter()
                .map(|b| (b.ns.clone(), b.iface.clone(), b.name.clone())),
        );
        for (ns, iface, sub) in targets {
            let dir = self.bpffs(&sub).display().to_string();
            let out = self.meshlb(
                &ns,
                &["xdp-pass", "--iface", &iface, "--bpffs", &dir],
                Duration::from_secs(30),
            );
            assert!(out.success(), "xdp-pass failed: {}", out.describe());
            let mode = self.xdp_mode(&ns, &iface);
            assert_eq!(
                mode.as_deref(),
                Some("native"),
                "after xdp-pass, {iface} in {ns} should have a native XDP program"
            );
        }
    }

    /// XDP attachment of `iface` in `ns` per `ip -d -j link`: "native",
    /// "generic", "offload", "multi", or None when nothing is attached.
    pub fn xdp_mode(&self, ns: &str, iface: &str) -> Option<String> {
        let out = must(&["ip", "-n", ns, "-d", "-j", "link", "show", "dev", iface]);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("ip -j link output is not JSON ({e}): {out}"));
        let xdp = &v[0]["xdp"];
        if xdp.is_null() {
            return None;
        }
        // XDP_ATTACHED_{DRV=1,SKB=2,HW=3,MULTI=4}
        Some(
            match xdp["mode"].as_u64() {
                Some(1) => "native",
                Some(2) => "generic",
                Some(3) => "offload",
                Some(4) => "multi",
                _ => "unknown",
            }
            .to_string(),
        )
    }

    // --- servers ------------------------------------------------------------

    /// Starts nginx in every backend namespace on :8000 (v4 and v6),
    /// answering `<backend-name>\n`; waits until each answers locally.
    pub fn start_nginx(&self) {
        for b in &self.backends {
            let p = start_nginx_in(
                &self.dir.join(format!("nginx-{}", b.name)),
                &b.ns,
                &b.name,
                self.next_log(&format!("nginx-{}", b.name)),
            );
            self.servers.lock().unwrap().push(p);
        }
    }

    /// Kills backend `name`'s nginx (SIGKILL by PID): it stops answering
    /// on every port at once, established connections are reset.
    pub fn kill_nginx(&self, name: &str) {
        let want = format!("nginx {name}");
        let mut p = {
            let mut v = self.servers.lock().unwrap();
            let i = v
                .iter()
                .position(|p| p.name == want)
                .unwrap_or_else(|| panic!("no running {want}"));
            v.remove(i)
        };
        p.kill9();
    }

    /// Starts backend `name`'s nginx again (after [`Topology::kill_nginx`]).
    pub fn restart_nginx(&self, name: &str) {
        let b = self.backend(name);
        let p = start_nginx_in(
            &self.dir.join(format!("nginx-{name}")),
            &b.ns,
            name,
            self.next_log(&format!("nginx-{name}")),
        );
        self.servers.lock().unwrap().push(p);
    }

    /// Starts a UDP echo server on `port` (v4 and v6) in every backend
    /// namespace, answering each datagram with `<backend-name>`.
    pub fn start_udp_echo(&self, port: u16) {
        for b in &self.backends {
            let e = UdpEcho::start(&b.ns, port, b.name.clone());
            self.udp.lock().unwrap().push(e);
        }
    }

    /// Sends one HTTP request and one UDP datagram directly from the client
    /// to every backend (through plain kernel forwarding in the LB ns), so
    /// every neighbour entry on the path is resolved before a test starts.
    /// Needs nginx; UDP only when `udp_port` is given.
    pub fn warm_up(&self, udp_port: Option<u16>) {
        self.client(|| {
            for b in &self.backends {
                for dst in [b.http_v4(), b.http_v6()] {
                    let body = http_get(dst, Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("warm-up GET {dst}: {e}"));
                    assert_eq!(body, b.name, "warm-up GET {dst}");
                }
                if let Some(port) = udp_port {
                    let dst = SocketAddr::new(b.v4.into(), port);
                    let r = udp_request(dst, b"warm", Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("warm-up UDP {dst}: {e}"));
                    assert_eq!(r, b.name, "warm-up UDP {dst}");
                }
            }
        });
    }

    // --- load ---------------------------------------------------------------

    /// `n` sequential HTTP GETs (each its own connection) from the client ns.
    pub fn http_burst(&self, dst: SocketAddr, n: usize, timeout: Duration) -> Burst {
        self.client(|| {
            let mut b = Burst::default();
            for i in 0..n {
                match http_get(dst, timeout) {
                    Ok(body) => *b.counts.entry(body).or_default() += 1,
                    Err(e) => b.failures.push(format!("request {i}: {e}")),
                }
            }
            b
        })
    }

    /// `n` UDP requests (each a new socket, so a new source port) from the client ns.
    pub fn udp_burst(&self, dst: SocketAddr, n: usize, timeout: Duration) -> Burst {
        self.client(|| {
            let mut b = Burst::default();
            for i in 0..n {
                match udp_request(dst, format!("ping {i}").as_bytes(), timeout) {
                    Ok(body) => *b.counts.entry(body).or_default() += 1,
                    Err(e) => b.failures.push(format!("request {i}: {e}")),
                }
            }
            b
        })
    }

    /// Asserts every request of `b` succeeded and every backend in `names`
    /// got at least `min_share` of them (and nobody else answered).
    pub fn assert_spread(&self, what: &str, b: &Burst, names: &[String], min_share: f64) {
        assert!(
            b.failures.is_empty(),
            "{what}: {} of {} requests failed; first: {:?}; answers: {:?}{}",
            b.failures.len(),
            b.total(),
            &b.failures[..b.failures.len().min(5)],
            b.counts,
            self.ctx()
        );
        let total = b.total();
        for name in names {
            let got = b.counts.get(name).copied().unwrap_or(0);
            assert!(
                got as f64 >= min_share * total as f64,
                "{what}: backend {name} got {got} of {total} (< {:.0}%): {:?}{}",
                min_share * 100.0,
                b.counts,
                self.ctx()
            );
        }
        for k in b.counts.keys() {
            assert!(
                names.contains(k),
                "{what}: unexpected answer {k:?}: {:?}{}",
                b.counts,
                self.ctx()
            );
        }
    }

    /// Runs wrk in the client namespace (`-t1 -c<conns> -d<secs>s`, plus
    /// `Connection: close` when `close` is set).
    pub fn wrk(&self, url: &str, conns: u32, secs: u32, close: bool) -> WrkResult {
        wrk_in(&self.client_ns, url, conns, secs, close)
            .unwrap_or_else(|e| panic!("{e}{}", self.ctx()))
    }
}

/// Runs wrk in namespace `ns` (`-t1 -c<conns> -d<secs>s`, plus
/// `Connection: close` when `close` is set).
pub fn wrk_in(
    ns: &str,
    url: &str,
    conns: u32,
    secs: u32,
    close: bool,
) -> Result<WrkResult, String> {
    if which("wrk").is_none() {
        return Err("wrk is not installed (apt install wrk)".into());
    }
    let c = format!("-c{conns}");
    let d = format!("-d{secs}s");
    let mut argv = vec!["ip", "netns", "exec", ns, "wrk", "-t1", &c, &d];
    if close {
        argv.extend(["-H", "Connection: close"]);
    }
    argv.push(url);
    let out = run_cmd(&argv, Duration::from_secs(u64::from(secs) + 30));
    if !out.success() {
        return Err(format!("wrk failed: {}", out.describe()));
    }
    WrkResult::parse(&out.stdout)
        .map_err(|e| format!("cannot parse wrk output ({e}):\n{}", out.stdout))
}

/// Stops a test's UDP echo threads and server processes (by PID).
pub fn stop_servers(udp: &Mutex<Vec<UdpEcho>>, servers: &Mutex<Vec<Proc>>) {
    let echoes = udp.lock().map(|mut v| std::mem::take(&mut *v));
    drop(echoes);
    let procs = servers
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    for mut p in procs {
        p.stop(Duration::from_secs(3));
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        stop_servers(&self.udp, &self.servers);
        // Detach and unpin what meshlb left (daemon and xdp-pass dirs).
        if self.bpffs_root.is_dir() && Path::new(MESHLB).exists() {
            let subs: Vec<String> = fs::read_dir(&self.bpffs_root)
                .map(|rd| {
                    rd.filter_map(std::result::Result::ok)
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            for sub in subs {
                // "c" is the client's, "b<i>" a backend's, anything else the LB's.
                let ns = if sub == "c" {
                    self.client_ns.clone()
                } else if let Some(b) = self.backends.iter().find(|b| b.name == sub) {
                    b.ns.clone()
                } else {
                    self.lb_ns.clone()
                };
                let d = self.bpffs(&sub);
                if Path::new("/run/netns").join(&ns).exists() {
                    let ds = d.display().to_string();
                    let out =
                        self.meshlb(&ns, &["cleanup", "--bpffs", &ds], Duration::from_secs(20));
                    if !out.success() {
                        eprintln!("teardown: {}", out.describe());
                    }
                }
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.bpffs_root) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("teardown: rm -r {}: {e}", self.bpffs_root.display());
            }
        }
        for ns in self.all_ns() {
            if Path::new("/run/netns").join(&ns).exists() {
                let out = run_cmd(&["ip", "netns", "del", &ns], CMD_TIMEOUT);
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

/// Starts nginx in namespace `ns` on :8000 and :8001 (v4 and v6), state in
/// `d`, answering `<name>\n`; waits until it answers locally.
pub fn start_nginx_in(d: &Path, ns: &str, name: &str, log: PathBuf) -> Proc {
    fs::create_dir_all(d.join("tmp")).expect("nginx dir");
    let dd = d.display();
    let conf = format!(
        r#"master_process off;
daemon off;
worker_processes 1;
pid {dd}/nginx.pid;
error_log {dd}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {dd}/tmp/body;
    proxy_temp_path {dd}/tmp/proxy;
    fastcgi_temp_path {dd}/tmp/fastcgi;
    uwsgi_temp_path {dd}/tmp/uwsgi;
    scgi_temp_path {dd}/tmp/scgi;
    keepalive_timeout 600s;
    keepalive_requests 1000000;
    tcp_nodelay on;
    default_type text/plain;
    server {{
listen {HTTP_PORT} backlog=4096;
listen [::]:{HTTP_PORT} ipv6only=on backlog=4096;
listen {BASELINE_PORT} backlog=4096;
listen [::]:{BASELINE_PORT} ipv6only=on backlog=4096;
location / {{ return 200 "{name}\n"; }}
    }}
}}
"#
    );
    let conf_path = d.join("nginx.conf");
    fs::write(&conf_path, conf).expect("write nginx.conf");
    let argv: Vec<String> = [
        "ip",
        "netns",
        "exec",
        ns,
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
    let mut p = Proc::spawn(&format!("nginx {name}"), &argv, &[], log);
    let want = name.to_string();
    let r = wait_for(Duration::from_secs(10), "nginx to answer", || {
        if let Some(st) = p.exit_status() {
            return Err(format!("nginx exited: {st}"));
        }
        in_netns(ns, || {
            for a in ["127.0.0.1:8000", "[::1]:8000"] {
                let body = http_get(a.parse().unwrap(), Duration::from_secs(1))?;
                if body != want {
                    return Err(format!("{a} answered {body:?}"));
                }
            }
            Ok(())
        })
    });
    if let Err(e) = r {
        let elog = fs::read_to_string(d.join("error.log")).unwrap_or_default();
        panic!("{}: {e}\n{}\n{elog}", name, p.log_text());
    }
    p
}

/// Outcome of a series of requests: answers by backend name, and failures.
#[derive(Debug, Default)]
pub struct Burst {
    pub counts: BTreeMap<String, usize>,
    pub failures: Vec<String>,
}

impl Burst {
    pub fn total(&self) -> usize {
        self.counts.values().sum::<usize>() + self.failures.len()
    }
}

// ---------------------------------------------------------------------------
// Socket clients (act in the calling thread's network namespace)

/// TCP connect with a deadline, optionally from a fixed source address.
pub fn tcp_connect(
    src: Option<SocketAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    if let Some(src) = src {
        sock.set_reuse_address(true)?;
        sock.bind(&SockAddr::from(src))?;
    }
    sock.connect_timeout(&SockAddr::from(dst), timeout)?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One `GET /` on its own connection (HTTP/1.0, Connection: close); returns
/// the trimmed body of a 200 answer.
pub fn http_get(dst: SocketAddr, timeout: Duration) -> Result<String, String> {
    http_get_from(None, dst, timeout)
}

/// [`http_get`] from a fixed source address (e.g. 10.200.0.2:41234).
pub fn http_get_from(
    src: Option<SocketAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<String, String> {
    http_request(src, dst, "/", timeout)
}

/// `GET path` on its own connection; returns the trimmed body of a 200 answer.
pub fn http_get_path(dst: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    http_request(None, dst, path, timeout)
}

fn http_request(
    src: Option<SocketAddr>,
    dst: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut s = tcp_connect(src, dst, timeout).map_err(|e| format!("connect {dst}: {e}"))?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {dst}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send to {dst}: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if Instant::now() >= deadline {
            return Err(format!("{dst}: no complete answer within {timeout:?}"));
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read from {dst}: {e} (got {} bytes)", buf.len())),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{dst}: malformed answer {text:?}"))?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{dst}: status {status:?}"));
    }
    Ok(body.trim().to_string())
}

/// A long-lived HTTP/1.1 keep-alive connection: each [`KeepAlive::get`]
/// sends one request on the same TCP connection.
pub struct KeepAlive {
    stream: TcpStream,
    buf: Vec<u8>,
    pub local: SocketAddr,
    pub dst: SocketAddr,
}

impl KeepAlive {
    /// Connects (in the calling thread's namespace).
    pub fn open(dst: SocketAddr, timeout: Duration) -> Result<KeepAlive, String> {
        Self::open_from(None, dst, timeout)
    }

    /// Connects from a fixed source address (in the calling thread's namespace).
    pub fn open_from(
        src: Option<SocketAddr>,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<KeepAlive, String> {
        let stream = tcp_connect(src, dst, timeout).map_err(|e| format!("connect {dst}: {e}"))?;
        let local = stream.local_addr().map_err(|e| e.to_string())?;
        Ok(KeepAlive {
            stream,
            buf: Vec::new(),
            local,
            dst,
        })
    }

    /// One `GET /` on this connection; returns the trimmed body.
    pub fn get(&mut self) -> Result<String, String> {
        let who = format!("{} -> {}", self.local, self.dst);
        let req = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", self.dst);
        self.stream
            .write_all(req.as_bytes())
            .map_err(|e| format!("{who}: send: {e}"))?;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let status = head.lines().next().unwrap_or("").to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .ok_or_else(|| format!("{who}: no Content-Length in {head:?}"))?;
                if self.buf.len() >= end + 4 + len {
                    let body = String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len])
                        .trim()
                        .to_string();
                    self.buf.drain(..end + 4 + len);
                    if status.split_whitespace().nth(1) != Some("200") {
                        return Err(format!("{who}: status {status:?}"));
                    }
                    return Ok(body);
                }
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(format!("{who}: connection closed by peer")),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("{who}: read: {e}")),
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sends `payload` from a new socket (new source port) and returns the
/// trimmed reply; the reply must come from `dst` itself.
pub fn udp_request(dst: SocketAddr, payload: &[u8], timeout: Duration) -> Result<String, String> {
    let bind: SocketAddr = match dst {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
    };
    let sock = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    sock.send_to(payload, dst)
        .map_err(|e| format!("send to {dst}: {e}"))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    match sock.recv_from(&mut buf) {
        Ok((n, from)) if from == dst => Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
        Ok((n, from)) => Err(format!(
            "{dst}: reply {:?} came from {from}, not from {dst}",
            String::from_utf8_lossy(&buf[..n])
        )),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(format!("{dst}: no reply within {timeout:?}"))
        }
        Err(e) => Err(format!("{dst}: recv: {e}")),
    }
}

/// One request on a connected UDP socket of `dst`'s family (in the
/// calling thread's namespace): `getpeername` must say `dst`; returns the
/// trimmed answer.
pub fn connected_udp_request(dst: SocketAddr, timeout: Duration) -> Result<String, String> {
    let any: SocketAddr = if dst.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(any).map_err(|e| format!("bind: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.connect(dst).map_err(|e| format!("connect: {e}"))?;
    let peer = s.peer_addr().map_err(|e| format!("getpeername: {e}"))?;
    if peer != dst {
        return Err(format!("getpeername says {peer}, not {dst}"));
    }
    s.send(b"ping").map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// A UDP echo server thread inside a namespace; stops when dropped.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl UdpEcho {
    /// Binds `[::]:port` (dual stack) in `ns` and answers every datagram with `reply`.
    pub fn start(ns: &str, port: u16, reply: String) -> UdpEcho {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let ns_owned = ns.to_string();
        let stop2 = stop.clone();
        let handle = thread::spawn(move || {
            enter_netns(&ns_owned);
            let bound = (|| -> io::Result<UdpSocket> {
                let s = Socket::new(Domain::IPV6, Type::DGRAM, None)?;
                s.set_only_v6(false)?;
                s.bind(&SockAddr::from(SocketAddr::from((
                    Ipv6Addr::UNSPECIFIED,
                    port,
                ))))?;
                let s: UdpSocket = s.into();
                s.set_read_timeout(Some(Duration::from_millis(100)))?;
                Ok(s)
            })();
            let sock = match bound {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("udp echo bind [::]:{port} in {ns_owned}: {e}")));
                    return;
                }
            };
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(reply.as_bytes(), from);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(e) => panic!("udp echo in {ns} did not start: {e}"),
        }
        UdpEcho {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------
// wrk

/// What one wrk run reported.
#[derive(Clone, Debug, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub rps: f64,
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeouts: u64,
    pub non_2xx: u64,
}

impl WrkResult {
    pub fn socket_errors(&self) -> u64 {
        self.connect_errors + self.read_errors + self.write_errors + self.timeouts
    }

    /// Parses wrk's text report.
    pub fn parse(out: &str) -> Result<WrkResult, String> {
        let mut r = WrkResult::default();
        let mut saw_rps = false;
        for line in out.lines().map(str::trim) {
            if let Some(v) = line.strip_prefix("Requests/sec:") {
                r.rps = v.trim().parse().map_err(|e| format!("Requests/sec: {e}"))?;
                saw_rps = true;
            } else if line.contains(" requests in ") {
                r.requests = line
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or("requests line")?;
            } else if let Some(v) = line.strip_prefix("Socket errors:") {
                // "connect 0, read 0, write 0, timeout 0"
                for part in v.split(',') {
                    let mut it = part.split_whitespace();
                    let (k, n) = (it.next().unwrap_or(""), it.next().unwrap_or("0"));
                    let n: u64 = n.parse().map_err(|e| format!("socket errors: {e}"))?;
                    match k {
                        "connect" => r.connect_errors = n,
                        "read" => r.read_errors = n,
                        "write" => r.write_errors = n,
                        "timeout" => r.timeouts = n,
                        _ => return Err(format!("unknown socket error kind {k:?}")),
                    }
                }
            } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
                r.non_2xx = v.trim().parse().map_err(|e| format!("non-2xx: {e}"))?;
            }
        }
        if !saw_rps {
            return Err("no Requests/sec line".into());
        }
        Ok(r)
    }
}

/// Parses "ip:port" / "[ip6]:port" as printed by meshlb.
pub fn parse_sockaddr(s: &str) -> Option<SocketAddr> {
    s.parse().ok()
}

// ---------------------------------------------------------------------------
// Config

/// One `[[service]]` of a meshlb config file.
pub struct Svc<'a> {
    pub name: &'a str,
    pub vip: Option<&'a str>,
    pub proto: &'a str,
    pub port: u16,
    pub target: u16,
    /// Backend addresses (the port defaults to `target`).
    pub backends: Vec<IpAddr>,
}

/// A config file (TOML, SPEC.md "Config file") for node "lb" with `services`.
pub fn config_toml(services: &[Svc]) -> String {
    let mut s = String::from("node = \"lb\"\n");
    for svc in services {
        s += &format!("\n[[service]]\nname = \"{}\"\n", svc.name);
        if let Some(vip) = svc.vip {
            s += &format!("vip = \"{vip}\"\n");
        }
        s += &format!(
            "publish = [{{ proto = \"{}\", port = {}, target = {} }}]\n",
            svc.proto, svc.port, svc.target
        );
        for b in &svc.backends {
            s += &format!("\n[[service.backend]]\naddr = \"{b}\"\n");
        }
    }
    s
}

impl Topology {
    /// Starts `meshlb run ARGS --bpffs <lb dir> --iface ...` in the LB
    /// namespace: for flags `start_daemon_on` does not pass (e.g. `--etcd`).
    pub fn start_daemon_args(&self, args: &[&str], ifaces: &[&str]) -> Proc {
        let mut argv = vec![
            "nsenter".to_string(),
            format!("--net=/run/netns/{}", self.lb_ns),
            MESHLB.to_string(),
            "run".into(),
        ];
        argv.extend(args.iter().map(std::string::ToString::to_string));
        argv.push("--bpffs".into());
        argv.push(self.lb_bpffs().display().to_string());
        for i in ifaces {
            argv.push("--iface".into());
            argv.push((*i).into());
        }
        let log = self.next_log("meshlb-run");
        self.daemon_logs.lock().unwrap().push(log.clone());
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        Proc::spawn(
            "meshlb run",
            &argv,
            &[("RUST_LOG", &rust_log), ("RUST_BACKTRACE", "1")],
            log,
        )
    }
}

/// Adds the counters of a `/proc/net/snmp`-style text (`file` of namespace
/// `ns`: per group, a line of names and a line of values, each starting
/// with `Group:`) to `m`, named `{group}{sep}{name}` ("Ip.ForwDatagrams"
/// with `sep` ".", "TcpExtPAWSEstab" as `nstat` names them with "").
pub fn add_paired_counters(
    m: &mut BTreeMap<String, i64>,
    ns: &str,
    file: &str,
    text: &str,
    sep: &str,
) {
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [head, vals] = pair else {
            panic!("{ns}: odd {file}:\n{text}");
        };
        let (g, names) = head
            .split_once(':')
            .unwrap_or_else(|| panic!("{ns}: {file} line {head:?}"));
        let (g2, nums) = vals
            .split_once(':')
            .unwrap_or_else(|| panic!("{ns}: {file} line {vals:?}"));
        assert_eq!(g, g2, "{ns}: {file} header/value mismatch");
        for (k, v) in names.split_whitespace().zip(nums.split_whitespace()) {
            let v: i64 = v
                .parse()
                .unwrap_or_else(|e| panic!("{ns}: {g}{sep}{k} = {v:?}: {e}"));
            m.insert(format!("{g}{sep}{k}"), v);
        }
    }
}

/// Adds the counters of a `/proc/net/snmp6`-style text (a name and a value
/// per line) to `m`.
pub fn add_line_counters(m: &mut BTreeMap<String, i64>, text: &str) {
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if let (Some(k), Some(v)) = (it.next(), it.next()) {
            if let Ok(v) = v.parse() {
                m.insert(k.to_string(), v);
            }
        }
    }
}
