//! Real etcd (Debian's 3.4 `/usr/bin/etcd`) for the control-plane tests:
//! single servers (plain or TLS with client-cert auth), 3-member clusters,
//! and the clients tests use to *check* what meshlb did (`etcdctl`, and an
//! in-process etcd-client for fast churn).
//!
//! The daemon under test runs inside a topology's LB namespace, whose
//! loopback is not the root namespace's. So etcd is normally started inside
//! that namespace too ([`EtcdServer::start_in`], [`EtcdCluster::start_in`])
//! and every client (etcdctl, `meshlb service|task`, the churn client) runs
//! there as well. Free ports are found per namespace by binding port 0.
//!
//! Each server keeps its data, certificates and log in
//! `$TMPDIR/mlbt-etcd-<tag>-<pid>`. Processes are killed by PID; dropping a
//! server kills it and removes that directory (kept when a test fails).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use super::{
    http_get_path, in_netns, run_cmd, run_cmd_env, wait_child, wait_for, CmdOutput, Proc, MESHLB,
};

const ETCD: &str = "/usr/bin/etcd";
const ETCDCTL: &str = "/usr/bin/etcdctl";
/// How long a (re)started etcd may take to answer `endpoint health`.
const HEALTHY: Duration = Duration::from_secs(20);
const CMD_TIMEOUT: Duration = Duration::from_secs(20);

fn require_etcd() {
    for tool in [ETCD, ETCDCTL, "/usr/bin/openssl"] {
        assert!(
            Path::new(tool).is_file(),
            "{tool} is missing: install Debian's etcd-server, etcd-client and openssl"
        );
    }
}

/// `n` distinct free TCP ports on 127.0.0.1 in namespace `ns` (or here).
fn free_ports(ns: Option<&str>, n: usize) -> Vec<u16> {
    let pick = move || {
        // Hold every listener until all are chosen so none repeats.
        let ls: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
            .collect();
        ls.iter()
            .map(|l| l.local_addr().expect("local_addr").port())
            .collect::<Vec<u16>>()
    };
    match ns {
        Some(ns) => in_netns(ns, pick),
        None => pick(),
    }
}

// ---------------------------------------------------------------------------
// Certificates

/// Certificates made with the `openssl` CLI: a CA, a server certificate for
/// IP 127.0.0.1 and a client certificate it signed, plus an unrelated CA
/// (with its own client certificate) for "wrong CA" tests. EC P-256 keys.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing the server knows.
    pub other_ca: PathBuf,
    /// A client certificate signed by `other_ca`.
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
}

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

impl Pki {
    /// Generates everything into `dir` (created if needed).
    pub fn generate(dir: &Path) -> Pki {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let cnf = dir.join("openssl.cnf");
        fs::write(&cnf, OPENSSL_CNF).expect("write openssl.cnf");
        let p = |name: &str| dir.join(name);
        let ossl = |args: &[&str]| {
            let mut argv = vec!["openssl"];
            argv.extend_from_slice(args);
            let out = run_cmd(&argv, CMD_TIMEOUT);
            assert!(out.success(), "openssl failed: {}", out.describe());
        };
        let s = |p: &PathBuf| p.display().to_string();
        let cnf_s = s(&cnf);
        let key = |path: &PathBuf| {
            ossl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &s(path),
            ]);
        };
        let ca = |stem: &str, cn: &str| -> (PathBuf, PathBuf) {
            let (k, c) = (p(&format!("{stem}-key.pem")), p(&format!("{stem}.pem")));
            key(&k);
            ossl(&[
                "req",
                "-x509",
                "-new",
                "-key",
                &s(&k),
                "-days",
                "3",
                "-subj",
                &format!("/CN={cn}"),
                "-config",
                &cnf_s,
                "-extensions",
                "v3_ca",
                "-out",
                &s(&c),
            ]);
            (c, k)
        };
        let leaf =
            |stem: &str, cn: &str, ext: &str, ca: &(PathBuf, PathBuf)| -> (PathBuf, PathBuf) {
                let (k, c, csr) = (
                    p(&format!("{stem}-key.pem")),
                    p(&format!("{stem}.pem")),
                    p(&format!("{stem}.csr")),
                );
                key(&k);
                ossl(&[
                    "req",
                    "-new",
                    "-key",
                    &s(&k),
                    "-subj",
                    &format!("/CN={cn}"),
                    "-config",
                    &cnf_s,
                    "-out",
                    &s(&csr),
                ]);
                let serial = format!("{}", u64::from(std::process::id()) * 1000 + csr_seq());
                ossl(&[
                    "x509",
                    "-req",
                    "-in",
                    &s(&csr),
                    "-CA",
                    &s(&ca.0),
                    "-CAkey",
                    &s(&ca.1),
                    "-set_serial",
                    &serial,
                    "-days",
                    "3",
                    "-extfile",
                    &cnf_s,
                    "-extensions",
                    ext,
                    "-out",
                    &s(&c),
                ]);
                (c, k)
            };
        let main_ca = ca("ca", "meshlb-test-ca");
        let server = leaf("server", "127.0.0.1", "server", &main_ca);
        let client = leaf("client", "meshlb-test-client", "client", &main_ca);
        let other = ca("other-ca", "meshlb-unrelated-ca");
        let other_client = leaf("other-client", "meshlb-stranger", "client", &other);
        Pki {
            ca: main_ca.0,
            server_cert: server.0,
            server_key: server.1,
            client_cert: client.0,
            client_key: client.1,
            other_ca: other.0,
            other_client_cert: other_client.0,
            other_client_key: other_client.1,
        }
    }
}

fn csr_seq() -> u64 {
    static SEQ: AtomicUsize = AtomicUsize::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed) as u64
}

// ---------------------------------------------------------------------------
// Clients

/// Client-side TLS files (`--cacert/--cert/--key` for etcdctl,
/// `--etcd-ca/--etcd-cert/--etcd-key` for meshlb).
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// How a client reaches an etcd server or cluster: endpoints, namespace and
/// TLS. Every method runs its client inside `ns` (when set).
#[derive(Clone, Debug)]
pub struct EtcdClient {
    pub ns: Option<String>,
    pub endpoints: Vec<String>,
    pub tls: Option<ClientTls>,
}

impl EtcdClient {
    /// `--etcd URL,...` plus the TLS flags, for `meshlb run` and the CLI.
    pub fn meshlb_flags(&self) -> Vec<String> {
        let mut v = vec!["--etcd".to_string(), self.endpoints.join(",")];
        if let Some(t) = &self.tls {
            v.push("--etcd-ca".into());
            v.push(t.ca.display().to_string());
            if let (Some(c), Some(k)) = (&t.cert, &t.key) {
                v.push("--etcd-cert".into());
                v.push(c.display().to_string());
                v.push("--etcd-key".into());
                v.push(k.display().to_string());
            }
        }
        v
    }

    /// The same endpoints with other TLS files (e.g. a wrong CA).
    pub fn with_tls(&self, tls: Option<ClientTls>) -> EtcdClient {
        EtcdClient {
            tls,
            ..self.clone()
        }
    }

    fn nsenter_prefix(&self) -> Vec<String> {
        match &self.ns {
            Some(ns) => vec!["nsenter".into(), format!("--net=/run/netns/{ns}")],
            None => Vec::new(),
        }
    }

    fn etcdctl_argv(&self, args: &[&str]) -> Vec<String> {
        let mut argv = self.nsenter_prefix();
        argv.push(ETCDCTL.into());
        argv.push(format!("--endpoints={}", self.endpoints.join(",")));
        argv.push("--dial-timeout=3s".into());
        argv.push("--command-timeout=5s".into());
        if let Some(t) = &self.tls {
            argv.push(format!("--cacert={}", t.ca.display()));
            if let (Some(c), Some(k)) = (&t.cert, &t.key) {
                argv.push(format!("--cert={}", c.display()));
                argv.push(format!("--key={}", k.display()));
            }
        }
        argv.extend(args.iter().map(std::string::ToString::to_string));
        argv
    }

    /// `etcdctl ARGS` (API v3) with these endpoints; for checking and for
    /// writing what meshlb must read. Never panics.
    pub fn etcdctl(&self, args: &[&str]) -> CmdOutput {
        let argv = self.etcdctl_argv(args);
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        run_cmd_env(&refs, &[("ETCDCTL_API", "3")], CMD_TIMEOUT)
    }

    /// `etcdctl ARGS` that must succeed; returns stdout.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args);
        assert!(out.success(), "etcdctl failed: {}", out.describe());
        out.stdout
    }

    /// `meshlb ARGS --etcd ... [TLS flags]` (a client command) in the namespace.
    pub fn meshlb(&self, args: &[&str]) -> CmdOutput {
        let mut argv = self.nsenter_prefix();
        argv.push(MESHLB.into());
        argv.extend(args.iter().map(std::string::ToString::to_string));
        argv.extend(self.meshlb_flags());
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        run_cmd_env(&refs, &[("RUST_BACKTRACE", "0")], CMD_TIMEOUT)
    }

    /// [`EtcdClient::meshlb`] that must succeed; returns stdout.
    pub fn meshlb_ok(&self, args: &[&str]) -> String {
        let out = self.meshlb(args);
        assert!(
            out.success(),
            "meshlb client command failed: {}",
            out.describe()
        );
        out.stdout
    }

    pub fn put(&self, key: &str, value: &str) {
        // `--` so values starting with '-' are not flags.
        self.etcdctl_ok(&["put", "--", key, value]);
    }

    /// Puts the contents of `file` (any size up to etcd's request limit;
    /// argv strings are capped at 128 KiB) via etcdctl's stdin.
    pub fn put_file(&self, key: &str, file: &Path) {
        let argv = self.etcdctl_argv(&["put", "--", key]);
        let input = File::open(file).unwrap_or_else(|e| panic!("open {}: {e}", file.display()));
        let log = file.with_extension("put.log");
        let out = File::create(&log).expect("create put log");
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .env("ETCDCTL_API", "3")
            .stdin(input)
            .stdout(out.try_clone().expect("clone fd"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn etcdctl: {e}"));
        let st = wait_child(&mut child, CMD_TIMEOUT);
        if st.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let text = fs::read_to_string(&log).unwrap_or_default();
        assert!(
            st.is_some_and(|s| s.success()),
            "etcdctl put {key} < {} -> {st:?}: {text}",
            file.display()
        );
    }

    pub fn del(&self, key: &str) {
        self.etcdctl_ok(&["del", "--", key]);
    }

    /// Compacts the key-value history up to `rev` (physically).
    pub fn compact(&self, rev: i64) {
        self.etcdctl_ok(&["compact", &rev.to_string(), "--physical"]);
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl_ok(&["get", "-w", "json", "--", "/"]);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("etcdctl get -w json is not JSON ({e}): {out}"));
        v["header"]["revision"]
            .as_i64()
            .unwrap_or_else(|| panic!("no header.revision in {out}"))
    }

    /// Every key under `prefix` with its value and lease id (0 when none).
    pub fn get_prefix(&self, prefix: &str) -> BTreeMap<String, (String, i64)> {
        let out = self.etcdctl_ok(&["get", "--prefix", "-w", "json", "--", prefix]);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("etcdctl get -w json is not JSON ({e}): {out}"));
        let mut m = BTreeMap::new();
        for kv in v["kvs"].as_array().cloned().unwrap_or_default() {
            let dec = |f: &str| {
                String::from_utf8_lossy(&b64_decode(kv[f].as_str().unwrap_or(""))).into_owned()
            };
            m.insert(
                dec("key"),
                (dec("value"), kv["lease"].as_i64().unwrap_or(0)),
            );
        }
        m
    }

    /// Runs `f` with an in-process etcd-client (rustls when TLS, like
    /// meshlb) connected to these endpoints, on a thread inside the namespace.
    pub fn with_client<T: Send>(
        &self,
        f: impl FnOnce(&tokio::runtime::Runtime, &mut etcd_client::Client) -> T + Send,
    ) -> T {
        let run = || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            let mut opts = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(3))
                .with_timeout(Duration::from_secs(3));
            if let Some(t) = &self.tls {
                let read = |p: &PathBuf| {
                    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
                };
                let mut tls = etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca)));
                if let (Some(c), Some(k)) = (&t.cert, &t.key) {
                    tls = tls.identity(etcd_client::Identity::from_pem(read(c), read(k)));
                }
                opts = opts.with_tls(tls);
            }
            let mut client = rt
                .block_on(etcd_client::Client::connect(&self.endpoints, Some(opts)))
                .unwrap_or_else(|e| panic!("etcd-client connect {:?}: {e}", self.endpoints));
            f(&rt, &mut client)
        };
        match &self.ns {
            Some(ns) => in_netns(ns, run),
            None => thread::scope(|s| {
                s.spawn(run)
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            }),
        }
    }

    /// etcd's own Prometheus metrics from the first endpoint (plain HTTP only).
    pub fn server_metrics(&self) -> Result<String, String> {
        let url = self.endpoints[0].clone();
        let addr: SocketAddr = url
            .trim_start_matches("http://")
            .parse()
            .map_err(|e| format!("{url}: {e}"))?;
        let get = move || http_get_path(addr, "/metrics", Duration::from_secs(2));
        match &self.ns {
            Some(ns) => in_netns(ns, get),
            None => get(),
        }
    }

    /// Open watch streams on the first endpoint's server (etcdctl never
    /// holds one, so this counts watching daemons).
    pub fn watch_streams(&self) -> Result<u64, String> {
        let text = self.server_metrics()?;
        text.lines()
            .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watch_stream_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .ok_or_else(|| "no etcd_debugging_mvcc_watch_stream_total in etcd /metrics".into())
    }
}

/// Standard base64 (etcdctl's JSON output) without padding checks.
pub fn b64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Servers

/// One etcd member: its identity within a cluster and its process.
pub struct EtcdServer {
    /// `--name`, unique per process tree.
    pub name: String,
    pub ns: Option<String>,
    /// Temp dir: data (`<name>.etcd`), certificates, logs.
    pub dir: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
    /// Address the client URL listens on (127.0.0.1 unless started with
    /// [`EtcdServer::start_on`]).
    pub host: String,
    pub pki: Option<Pki>,
    initial_cluster: String,
    /// Whether this struct owns (and removes) `dir`.
    owns_dir: bool,
    proc: Option<Proc>,
    starts: usize,
}

fn test_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mlbt-etcd-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
    d
}

impl EtcdServer {
    /// A single plain-HTTP member on free loopback ports of the root namespace.
    pub fn start(tag: &str) -> EtcdServer {
        Self::start_opts(None, tag, false)
    }

    /// A single plain-HTTP member inside network namespace `ns`.
    pub fn start_in(ns: &str, tag: &str) -> EtcdServer {
        Self::start_opts(Some(ns), tag, false)
    }

    /// A single plain-HTTP member inside `ns` whose client URL listens on
    /// `host` (an address of `ns` other namespaces can reach).
    pub fn start_on(ns: &str, tag: &str, host: &str) -> EtcdServer {
        Self::start_full(Some(ns), tag, false, host)
    }

    /// A single HTTPS member with client-cert auth (root namespace).
    pub fn start_tls(tag: &str) -> EtcdServer {
        Self::start_opts(None, tag, true)
    }

    /// A single HTTPS member with client-cert auth inside `ns`.
    pub fn start_tls_in(ns: &str, tag: &str) -> EtcdServer {
        Self::start_opts(Some(ns), tag, true)
    }

    fn start_opts(ns: Option<&str>, tag: &str, tls: bool) -> EtcdServer {
        Self::start_full(ns, tag, tls, "127.0.0.1")
    }

    fn start_full(ns: Option<&str>, tag: &str, tls: bool, host: &str) -> EtcdServer {
        require_etcd();
        let dir = test_dir(tag);
        let pki = tls.then(|| Pki::generate(&dir.join("pki")));
        let ports = free_ports(ns, 2);
        let name = format!("mlbt-{tag}-{}", std::process::id());
        let initial_cluster = format!("{name}=http://127.0.0.1:{}", ports[1]);
        let mut s = EtcdServer {
            name,
            ns: ns.map(str::to_string),
            dir,
            client_port: ports[0],
            peer_port: ports[1],
            host: host.to_string(),
            pki,
            initial_cluster,
            owns_dir: true,
            proc: None,
            starts: 0,
        };
        s.spawn();
        s.wait_healthy();
        s
    }

    fn scheme(&self) -> &'static str {
        if self.pki.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// This member's client URL.
    pub fn url(&self) -> String {
        format!("{}://{}:{}", self.scheme(), self.host, self.client_port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join(format!("{}.etcd", self.name))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    fn spawn(&mut self) {
        let mut argv: Vec<String> = match &self.ns {
            Some(ns) => vec!["nsenter".into(), format!("--net=/run/netns/{ns}")],
            None => Vec::new(),
        };
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        argv.extend([
            ETCD.to_string(),
            format!("--name={}", self.name),
            format!("--data-dir={}", self.data_dir().display()),
            format!("--listen-client-urls={}", self.url()),
            format!("--advertise-client-urls={}", self.url()),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={}", self.initial_cluster),
            "--initial-cluster-state=new".into(),
            format!("--initial-cluster-token={}", self.dir.display()),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
        ]);
        if let Some(p) = &self.pki {
            argv.push(format!("--cert-file={}", p.server_cert.display()));
            argv.push(format!("--key-file={}", p.server_key.display()));
            argv.push(format!("--trusted-ca-file={}", p.ca.display()));
            argv.push("--client-cert-auth".into());
        }
        // Appends: a restart keeps the earlier run's log above it.
        let log = self.log_path();
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        use std::io::Write as _;
        let _ = writeln!(f, "===== start #{} =====", self.starts);
        self.starts += 1;
        let out = f.try_clone().expect("clone log fd");
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn etcd ({}): {e}", argv.join(" ")));
        self.proc = Some(Proc {
            name: format!("etcd {}", self.name),
            log,
            child,
            status: None,
        });
    }

    /// A client for this server alone (client certificate included when TLS).
    pub fn client(&self) -> EtcdClient {
        EtcdClient {
            ns: self.ns.clone(),
            endpoints: vec![self.url()],
            tls: self.pki.as_ref().map(|p| ClientTls {
                ca: p.ca.clone(),
                cert: Some(p.client_cert.clone()),
                key: Some(p.client_key.clone()),
            }),
        }
    }

    /// The last lines of this server's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "\n===== {} (last {n} lines) =====\n{}",
            self.log_path().display(),
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }

    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    fn wait_healthy(&mut self) {
        let client = self.client();
        let deadline = Instant::now() + HEALTHY;
        loop {
            if let Some(p) = self.proc.as_mut() {
                if let Some(st) = p.exit_status() {
                    panic!(
                        "etcd {} exited while starting: {st}{}",
                        self.name,
                        self.log_tail(40)
                    );
                }
            }
            let out = client.etcdctl(&["endpoint", "health"]);
            if out.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd {} not healthy after {HEALTHY:?}: {}{}",
                self.name,
                out.describe(),
                self.log_tail(40)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM (by PID), waiting for the exit; keeps the data dir.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.stop(Duration::from_secs(10));
        }
    }

    /// SIGKILL (by PID); keeps the data dir.
    pub fn kill(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill9();
        }
    }

    /// Sends `sig` to the etcd process (e.g. SIGSTOP / SIGCONT).
    pub fn signal(&mut self, sig: Signal) {
        if let Some(p) = self.proc.as_mut() {
            p.signal(sig);
        }
    }

    /// Restarts a stopped or killed member with the same ports and data,
    /// waiting until it is healthy (for a cluster member: until the
    /// cluster it rejoins answers through it).
    pub fn start_again(&mut self) {
        assert!(
            !self.is_running(),
            "etcd {} is still running; stop it first",
            self.name
        );
        self.spawn();
        self.wait_healthy();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            if p.is_running() {
                // A stopped process only dies of SIGKILL once continued.
                p.signal(Signal::SIGKILL);
                p.wait_exit(Duration::from_secs(10));
            }
        }
        if self.owns_dir {
            if thread::panicking() {
                eprintln!("test failed: etcd files kept in {}", self.dir.display());
            } else {
                let _ = fs::remove_dir_all(&self.dir);
            }
        }
    }
}

/// A plain-HTTP etcd cluster of `n` members on loopback.
pub struct EtcdCluster {
    pub members: Vec<EtcdServer>,
    dir: PathBuf,
}

impl EtcdCluster {
    /// In the root namespace.
    pub fn start(tag: &str, n: usize) -> EtcdCluster {
        Self::start_opts(None, tag, n)
    }

    /// Inside network namespace `ns`.
    pub fn start_in(ns: &str, tag: &str, n: usize) -> EtcdCluster {
        Self::start_opts(Some(ns), tag, n)
    }

    fn start_opts(ns: Option<&str>, tag: &str, n: usize) -> EtcdCluster {
        require_etcd();
        let dir = test_dir(tag);
        let ports = free_ports(ns, 2 * n);
        let pid = std::process::id();
        let names: Vec<String> = (0..n).map(|i| format!("mlbt-{tag}-{pid}-{i}")).collect();
        let initial_cluster = (0..n)
            .map(|i| format!("{}=http://127.0.0.1:{}", names[i], ports[2 * i + 1]))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<EtcdServer> = (0..n)
            .map(|i| EtcdServer {
                name: names[i].clone(),
                ns: ns.map(str::to_string),
                dir: dir.clone(),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                host: "127.0.0.1".into(),
                pki: None,
                initial_cluster: initial_cluster.clone(),
                owns_dir: false,
                proc: None,
                starts: 0,
            })
            .collect();
        // All members must be up before any can elect a leader.
        for m in &mut members {
            m.spawn();
        }
        let cluster = EtcdCluster { members, dir };
        let client = cluster.client();
        wait_for(HEALTHY, "etcd cluster to be healthy", || {
            let out = client.etcdctl(&["endpoint", "health", "--cluster"]);
            if out.success() {
                Ok(())
            } else {
                Err(out.describe())
            }
        })
        .unwrap_or_else(|e| panic!("{e}{}", cluster.logs(30)));
        cluster
    }

    /// A client for every member.
    pub fn client(&self) -> EtcdClient {
        EtcdClient {
            ns: self.members[0].ns.clone(),
            endpoints: self.members.iter().map(EtcdServer::url).collect(),
            tls: None,
        }
    }

    /// The index of the current leader (asked of every running member).
    pub fn leader(&mut self) -> usize {
        let running: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].is_running())
            .collect();
        let client = EtcdClient {
            endpoints: running.iter().map(|&i| self.members[i].url()).collect(),
            ..self.client()
        };
        let out = client.etcdctl_ok(&["endpoint", "status", "-w", "json"]);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("endpoint status -w json is not JSON ({e}): {out}"));
        for e in v.as_array().cloned().unwrap_or_default() {
            let st = &e["Status"];
            if st["leader"].as_u64().is_some() && st["leader"] == st["header"]["member_id"] {
                let ep = e["Endpoint"].as_str().unwrap_or("");
                if let Some(i) = self.members.iter().position(|m| m.url() == ep) {
                    return i;
                }
            }
        }
        panic!("no member reports itself leader: {out}");
    }

    /// SIGKILL member `i` (data kept).
    pub fn kill_member(&mut self, i: usize) {
        self.members[i].kill();
    }

    pub fn logs(&self, n: usize) -> String {
        self.members.iter().map(|m| m.log_tail(n)).collect()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // Members kill themselves; the shared dir is removed here.
        self.members.clear();
        if thread::panicking() {
            eprintln!("test failed: etcd files kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------
// Churn

/// A small deterministic PRNG (xorshift64*), so churn is reproducible from
/// its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One etcd write of a churn run.
#[derive(Clone, Debug)]
pub enum Op {
    Put(String, String),
    Del(String),
}

/// A background writer applying `ops` in order through etcd-client inside
/// the client's namespace; each op is retried (e.g. across a leader change)
/// until it succeeds or `per_op` runs out. `done` counts applied ops.
pub struct Churn {
    pub done: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<(), String>>>,
}

impl Churn {
    pub fn start(client: &EtcdClient, ops: Vec<Op>, per_op: Duration) -> Churn {
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s, c) = (done.clone(), stop.clone(), client.clone());
        let handle = thread::spawn(move || {
            c.with_client(|rt, cl| {
                for (i, op) in ops.iter().enumerate() {
                    let deadline = Instant::now() + per_op;
                    loop {
                        if s.load(Ordering::Relaxed) {
                            return Err(format!("stopped at op {i}"));
                        }
                        let r = rt.block_on(async {
                            match op {
                                Op::Put(k, v) => {
                                    cl.put(k.as_str(), v.as_str(), None).await.map(drop)
                                }
                                Op::Del(k) => cl.delete(k.as_str(), None).await.map(drop),
                            }
                        });
                        match r {
                            Ok(()) => break,
                            Err(e) if Instant::now() >= deadline => {
                                return Err(format!("op {i} {op:?} failed for {per_op:?}: {e}"))
                            }
                            Err(_) => thread::sleep(Duration::from_millis(50)),
                        }
                    }
                    d.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        });
        Churn {
            done,
            stop,
            handle: Some(handle),
        }
    }

    /// Waits until at least `n` ops are applied (or the writer ended).
    pub fn wait_done(&self, n: usize, timeout: Duration) -> Result<(), String> {
        wait_for(timeout, "churn progress", || {
            let d = self.done.load(Ordering::Relaxed);
            let ended = self
                .handle
                .as_ref()
                .is_none_or(std::thread::JoinHandle::is_finished);
            if d >= n || ended {
                Ok(())
            } else {
                Err(format!("{d} ops applied"))
            }
        })
    }

    /// Waits for the writer to finish; its error, if any.
    pub fn join(mut self) -> Result<(), String> {
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("churn thread panicked".into()),
            None => Ok(()),
        }
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
