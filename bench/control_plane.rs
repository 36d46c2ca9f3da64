//! Driver of `cargo xtask bench control-plane`: how fast etcd changes reach
//! the kernel. The xtask starts etcd in the `mlbcp-lb` namespace and runs
//! this binary there (nsenter, so bpffs stays visible); this binary then
//!
//! * fills etcd with N services × T tasks for each size (batched txns,
//!   untimed), starts `meshlb run --etcd ...` itself (so "process start" is
//!   an exact instant and its PID is known) and times the full sync: until
//!   every SERVICES slot is present, and until the daemon logs the apply;
//!   reads the daemon's VmRSS/VmHWM afterwards;
//! * times single changes on that daemon: t0 right before the etcd put,
//!   t1 when the pinned BACKENDS map shows the new address or weight,
//!   polled every ~50 µs (and when the service's ring hash changes: the
//!   Maglev ring then sends traffic there);
//! * times the kube-proxy equivalent: an iptables-restore input with the
//!   same services (KUBE-SERVICES/NODEPORTS → KUBE-SVC-* with statistic
//!   jumps → KUBE-SEP-* DNAT), loaded into a fresh netns, and one change
//!   the way kube-proxy's iptables mode applied it: a full `--noflush`
//!   re-restore of the table;
//!
//! then prints a summary and writes every sample as JSON to `--out` (the
//! xtask adds machine info and the command line).
//!
//! Not a libtest harness (`harness = false`): run without `--meshlb` (as
//! `cargo test --all-targets` would) it says so and exits 0.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use etcd_client::{Client, ConnectOptions, DeleteOptions, Txn, TxnOp};
use meshlb::kernel::pinned::{addr_bytes, Maps};
use meshlb::model::Proto;
use meshlb::source::config::{PublishDef, ServiceDef};
use meshlb::source::etcd::layout::{self, TaskDef};
use meshlb_common::{
    Backend, FrontendKey, BE_F_PRESENT, MAX_BACKENDS, MAX_SERVICES, SVC_F_PRESENT,
};
use serde_json::{json, Value};

/// Port of every task (the services' `target`).
const TASK_PORT: u16 = 8000;
/// First published port; service i publishes `BASE_PORT + i` (tcp).
const BASE_PORT: u16 = 10000;
/// Weight of a task as first written.
const WEIGHT: i64 = 100;
/// Lowest free backend ids polled for a new task (ids are allocated
/// lowest-free-first, so the new one is among the first few).
const WINDOW: usize = 32;
/// Timeout of one etcd request.
const ETCD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    about = "meshlb control-plane benchmark driver (run by `cargo xtask bench control-plane`)"
)]
struct Args {
    /// The meshlb binary to run as the daemon.
    #[arg(long)]
    meshlb: Option<PathBuf>,
    /// etcd endpoint (reachable from this netns).
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd: String,
    /// etcd key prefix.
    #[arg(long, default_value = "/meshlb/v1")]
    prefix: String,
    /// Interface the daemon attaches XDP to (generic mode).
    #[arg(long, default_value = "cp0")]
    iface: String,
    /// The daemon's pin directory (cleaned before and after each daemon).
    #[arg(long, default_value = "/sys/fs/bpf/mlbcp")]
    bpffs: PathBuf,
    /// Numbers of services to sync, ascending (etcd is filled up to each).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    sizes: Vec<usize>,
    /// Tasks per service.
    #[arg(long, default_value_t = 10)]
    tasks: usize,
    /// Single changes timed per size (half new tasks, half weight changes).
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Puts per etcd txn when filling (etcd needs --max-txn-ops >= this).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Seconds allowed for one full sync.
    #[arg(long, default_value_t = 180)]
    sync_timeout: u64,
    /// iptables-restore re-restores (kube-proxy's incremental) per size.
    #[arg(long, default_value_t = 3)]
    ipt_reps: usize,
    /// Seconds allowed for one iptables-restore run (killed after).
    #[arg(long, default_value_t = 60)]
    ipt_timeout: u64,
    /// Prefix of the network namespaces created for iptables.
    #[arg(long, default_value = "mlbcp-")]
    ns_prefix: String,
    /// Directory for daemon logs, configs and rule files.
    #[arg(long, default_value = "/tmp")]
    work: PathBuf,
    /// Where the JSON results go.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = Args::parse();
    let Some(meshlb) = args.meshlb.clone() else {
        println!("control_plane: run by `cargo xtask bench control-plane` (needs root, etcd and --meshlb); nothing to do");
        return;
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(&args, &meshlb)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------
// Names and records
// ---------------------------------------------------------------------

fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

/// 10.96.x.y, skipping .0.0.
fn vip(i: usize) -> Ipv4Addr {
    let n = i + 1;
    Ipv4Addr::new(10, 96, (n >> 8) as u8, n as u8)
}

/// Task k of service i: 10.201.x.y (wraps every 65536 tasks; distinct
/// within a service, which is all the data plane needs).
fn task_addr(i: usize, k: usize, tasks: usize) -> Ipv4Addr {
    let j = i * tasks + k;
    Ipv4Addr::new(10, 201, (j >> 8) as u8, j as u8)
}

/// The address of the n-th task added during the change runs: 10.202.x.y.
fn extra_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, (n >> 8) as u8, n as u8)
}

fn service_record(i: usize) -> Result<Vec<u8>> {
    let def = ServiceDef {
        name: service_name(i),
        vip: Some(vip(i).to_string()),
        publish: vec![PublishDef {
            proto: Some(Proto::Tcp),
            port: i64::from(BASE_PORT) + i as i64,
            target: Some(i64::from(TASK_PORT)),
        }],
        ..Default::default()
    };
    Ok(serde_json::to_vec(&def)?)
}

fn task_record(addr: Ipv4Addr, weight: i64) -> Result<Vec<u8>> {
    let def = TaskDef {
        addr: addr.to_string(),
        port: Some(i64::from(TASK_PORT)),
        weight: Some(weight),
        ..Default::default()
    };
    Ok(serde_json::to_vec(&def)?)
}

fn task_id(k: usize) -> String {
    format!("t{k}")
}

// ---------------------------------------------------------------------
// etcd
// ---------------------------------------------------------------------

/// Plain connection without keep-alive pings: the poll loops below block
/// this single-threaded runtime for seconds at a time, and an unanswered
/// ping would drop the channel.
async fn connect(endpoint: &str) -> Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(ETCD_TIMEOUT);
        let attempt = async {
            let mut c = Client::connect([endpoint], Some(opts)).await?;
            c.status().await?;
            Ok::<_, etcd_client::Error>(c)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) if Instant::now() >= deadline => bail!("etcd {endpoint}: {e}"),
            Err(_) if Instant::now() >= deadline => bail!("etcd {endpoint}: timed out"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn put(client: &mut Client, key: &str, value: Vec<u8>) -> Result<()> {
    tokio::time::timeout(ETCD_TIMEOUT, client.put(key, value, None))
        .await
        .with_context(|| format!("etcd put {key}: timed out"))?
        .with_context(|| format!("etcd put {key}"))?;
    Ok(())
}

/// Writes services `from..to` with their tasks, `batch` puts per txn.
async fn fill(client: &mut Client, a: &Args, from: usize, to: usize) -> Result<usize> {
    let mut ops = Vec::with_capacity(a.batch);
    let mut written = 0;
    for i in from..to {
        let name = service_name(i);
        ops.push(TxnOp::put(
            layout::service_key(&a.prefix, &name),
            service_record(i)?,
            None,
        ));
        for k in 0..a.tasks {
            ops.push(TxnOp::put(
                layout::task_key(&a.prefix, &name, &task_id(k)),
                task_record(task_addr(i, k, a.tasks), WEIGHT)?,
                None,
            ));
        }
        if ops.len() + a.tasks + 1 > a.batch || i + 1 == to {
            written += ops.len();
            let txn = Txn::new().and_then(std::mem::take(&mut ops));
            tokio::time::timeout(ETCD_TIMEOUT, client.txn(txn))
                .await
                .context("etcd txn: timed out")?
                .context("etcd txn (is --max-txn-ops >= --batch?)")?;
        }
    }
    Ok(written)
}

// ---------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------

/// One log line of the daemon, stamped on arrival.
#[derive(Clone)]
struct LogLine {
    t: Duration,
    line: String,
}

/// A `meshlb run` we started: SIGTERM (then SIGKILL) on drop.
struct Daemon {
    child: Child,
    started: Instant,
    lines: Arc<Mutex<Vec<LogLine>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(a: &Args, meshlb: &Path, config: &Path, log: &Path) -> Result<Daemon> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(meshlb);
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .args(["--etcd", &a.etcd, "--prefix", &a.prefix])
            .args(["--iface", &a.iface, "--xdp-mode", "generic"])
            .arg("--bpffs")
            .arg(&a.bpffs)
            .args(["--metrics", "none", "--node", "mlbcp"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal Ctrl-C reaches the xtask,
            // which stops everything in the namespace in order.
            .process_group(0);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", meshlb.display()))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let file = Arc::new(Mutex::new(
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?,
        ));
        let mut readers = Vec::new();
        let pipes: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().context("daemon stdout")?),
            Box::new(child.stderr.take().context("daemon stderr")?),
        ];
        for pipe in pipes {
            let (lines, file) = (lines.clone(), file.clone());
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let t = started.elapsed();
                    if let Ok(mut f) = file.lock() {
                        let _ = writeln!(f, "+{:.6}s {line}", t.as_secs_f64());
                    }
                    if let Ok(mut v) = lines.lock() {
                        v.push(LogLine { t, line });
                    }
                }
            }));
        }
        Ok(Daemon {
            child,
            started,
            lines,
            readers,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn lines(&self) -> Vec<LogLine> {
        self.lines.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// First line containing `pat`.
    fn find(&self, pat: &str) -> Option<LogLine> {
        self.lines
            .lock()
            .ok()?
            .iter()
            .find(|l| l.line.contains(pat))
            .cloned()
    }

    fn count(&self, pat: &str) -> usize {
        self.lines
            .lock()
            .map_or(0, |v| v.iter().filter(|l| l.line.contains(pat)).count())
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// VmRSS and VmHWM in KiB.
    fn memory_kib(&self) -> (Option<u64>, Option<u64>) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn stop(&mut self) {
        if self.exited().is_none() {
            let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let end = Instant::now() + Duration::from_secs(10);
            while self.exited().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.exited().is_none() {
                eprintln!(
                    "meshlb daemon (pid {}) ignored SIGTERM; killing",
                    self.pid()
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `meshlb cleanup --bpffs DIR`: a fresh daemon must not adopt the last one's
/// state (that would be a restart, not a full sync).
fn cleanup_pins(meshlb: &Path, bpffs: &Path) -> Result<()> {
    if !bpffs.exists() {
        return Ok(());
    }
    let out = Command::new(meshlb)
        .arg("cleanup")
        .arg("--bpffs")
        .arg(bpffs)
        .output()
        .context("meshlb cleanup")?;
    if !out.status.success() {
        bail!(
            "meshlb cleanup --bpffs {}: {}",
            bpffs.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------
// Reading the pinned maps
// ---------------------------------------------------------------------

fn service_present(maps: &Maps, id: u32) -> bool {
    maps.services
        .get(&id, 0)
        .is_ok_and(|s| s.flags & SVC_F_PRESENT != 0)
}

fn ring_hash(maps: &Maps, id: u32) -> u64 {
    maps.services.get(&id, 0).map_or(0, |s| s.ring_hash)
}

fn backend(maps: &Maps, id: u32) -> Option<Backend> {
    maps.backends
        .get(&id, 0)
        .ok()
        .filter(|b| b.flags & BE_F_PRESENT != 0)
}

fn count_services(maps: &Maps) -> usize {
    (0..MAX_SERVICES)
        .filter(|id| service_present(maps, *id))
        .count()
}

/// Service name → id, from SERVICE_NAMES of the present slots.
fn service_ids(maps: &Maps) -> HashMap<String, u32> {
    let mut ids = HashMap::new();
    for id in 0..MAX_SERVICES {
        if !service_present(maps, id) {
            continue;
        }
        if let Ok(n) = maps.service_names.get(&id, 0) {
            let len = usize::from(n.len).min(n.name.len());
            ids.insert(String::from_utf8_lossy(&n.name[..len]).into_owned(), id);
        }
    }
    ids
}

/// Every BACKENDS slot: present ones by (service id, address).
struct BackendTable {
    present: Vec<bool>,
    by_addr: HashMap<(u32, [u8; 16]), u32>,
}

impl BackendTable {
    fn scan(maps: &Maps) -> BackendTable {
        let mut t = BackendTable {
            present: vec![false; MAX_BACKENDS as usize],
            by_addr: HashMap::new(),
        };
        for id in 0..MAX_BACKENDS {
            if let Some(b) = backend(maps, id) {
                t.present[id as usize] = true;
                t.by_addr.insert((b.service_id, b.addr), id);
            }
        }
        t
    }

    fn count(&self) -> usize {
        self.present.iter().filter(|p| **p).count()
    }

    /// The lowest `n` ids not in use.
    fn lowest_free(&self, n: usize) -> Vec<u32> {
        (0..MAX_BACKENDS)
            .filter(|id| !self.present[*id as usize])
            .take(n)
            .collect()
    }
}

fn open_maps(bpffs: &Path, daemon: &mut Daemon, within: Duration) -> Result<Maps> {
    let deadline = Instant::now() + within;
    loop {
        match Maps::from_pins(bpffs) {
            Ok(m) => return Ok(m),
            Err(e) => {
                if let Some(st) = daemon.exited() {
                    bail!(
                        "meshlb daemon exited ({st}) before pinning its maps: {}",
                        tail(daemon, 20)
                    );
                }
                if Instant::now() >= deadline {
                    bail!("pinned maps not there within {within:?}: {e}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn tail(daemon: &Daemon, n: usize) -> String {
    let lines = daemon.lines();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("\n  +{:.3}s {}", l.t.as_secs_f64(), l.line))
        .collect()
}

// ---------------------------------------------------------------------
// (b) full sync, (d) memory
// ---------------------------------------------------------------------

struct Sync {
    n: usize,
    mode: Mode,
    ok: bool,
    error: Option<String>,
    /// Process start (list) or first put (watch-fed) → every SERVICES
    /// slot present.
    services_s: Option<f64>,
    /// The same origin → the daemon's "changes applied" line that follows
    /// (frontends are written last).
    applied_s: Option<f64>,
    /// List: process start → the daemon's line that it waits for the
    /// first list (programs loaded and verified, interfaces attached).
    startup_s: Option<f64>,
    /// List: that line → "changes applied": the list (paged) and the full
    /// sync it feeds, program loading left out.
    list_sync_s: Option<f64>,
    /// Watch-fed: the time the puts took (inside the measured window).
    fill_s: Option<f64>,
    /// "changes applied" lines (watch-fed: snapshots coalesce).
    applies: usize,
    rss_kib: Option<u64>,
    hwm_kib: Option<u64>,
    backends_present: Option<usize>,
    vips_present: Option<usize>,
    log: Vec<LogLine>,
}

impl Sync {
    fn json(&self) -> Value {
        json!({
            "services": self.n,
            "mode": self.mode.as_str(),
            "ok": self.ok,
            "error": self.error,
            "services_present_s": self.services_s,
            "apply_logged_s": self.applied_s,
            "startup_s": self.startup_s,
            "list_sync_s": self.list_sync_s,
            "fill_s": self.fill_s,
            "apply_lines": self.applies,
            "rss_kib": self.rss_kib,
            "hwm_kib": self.hwm_kib,
            "backends_present": self.backends_present,
            "vip_frontends_present": self.vips_present,
            "log": self.log.iter().take(200).map(|l| json!({
                "t_s": l.t.as_secs_f64(),
                "line": l.line,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Waits until services 0..n are present. Ids are allocated lowest-free
/// first in name order, so a cursor over 0..n costs a few reads per poll
/// (a full 10240-slot scan per poll would steal the daemon's CPU); a full
/// count confirms at the end.
fn wait_services(maps: &Maps, daemon: &mut Daemon, n: usize, deadline: Instant) -> Result<Instant> {
    let mut cursor = 0u32;
    loop {
        while (cursor as usize) < n && service_present(maps, cursor) {
            cursor += 1;
        }
        let now = Instant::now();
        if cursor as usize >= n {
            let total = count_services(maps);
            if total == n {
                return Ok(now);
            }
            if total > n {
                bail!("{total} services present, expected {n}");
            }
        }
        if let Some(st) = daemon.exited() {
            bail!(
                "meshlb daemon exited ({st}) during the sync:{}",
                tail(daemon, 20)
            );
        }
        // The list can fail (e.g. a response over the client's message size
        // limit): the daemon then retries forever. Give up after a few.
        if daemon.count("etcd: list:") >= 3 {
            bail!(
                "the daemon's etcd list keeps failing ({} services present):{}",
                cursor,
                tail(daemon, 6)
            );
        }
        if now >= deadline {
            bail!(
                "not all {n} services present in time ({cursor} were):{}",
                tail(daemon, 10)
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How the daemon gets the records.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Already in etcd when the daemon starts: its first list has them all.
    List,
    /// Written (in txns) after the daemon listed an empty prefix: they
    /// arrive as watch events. Run only when the list fails.
    WatchFed,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::List => "list",
            Mode::WatchFed => "watch-fed",
        }
    }
}

async fn full_sync(
    a: &Args,
    meshlb: &Path,
    n: usize,
    mode: Mode,
    client: &mut Client,
    daemon_out: &mut Option<Daemon>,
) -> Result<Sync> {
    cleanup_pins(meshlb, &a.bpffs)?;
    if mode == Mode::WatchFed {
        clear(client, a).await?;
    }
    let config = a.work.join("meshlb.toml");
    // No [[service]]: without --config the embedded demo service would be
    // programmed too.
    std::fs::write(&config, "node = \"mlbcp\"\n")?;
    let log = a.work.join(format!("daemon-{n}-{}.log", mode.as_str()));
    let mut d = Daemon::start(a, meshlb, &config, &log)?;
    let mut s = Sync {
        n,
        mode,
        ok: false,
        error: None,
        services_s: None,
        applied_s: None,
        startup_s: None,
        list_sync_s: None,
        fill_s: None,
        applies: 0,
        rss_kib: None,
        hwm_kib: None,
        backends_present: None,
        vips_present: None,
        log: Vec::new(),
    };
    let res = measure_sync(a, n, mode, client, &mut d, &mut s).await;
    s.log = d.lines();
    s.applies = d.count("changes applied");
    match res {
        Ok(()) => {
            s.ok = true;
            *daemon_out = Some(d);
        }
        Err(e) => {
            s.error = Some(format!("{e:#}"));
            drop(d);
            cleanup_pins(meshlb, &a.bpffs)?;
        }
    }
    Ok(s)
}

async fn measure_sync(
    a: &Args,
    n: usize,
    mode: Mode,
    client: &mut Client,
    d: &mut Daemon,
    s: &mut Sync,
) -> Result<()> {
    let maps = open_maps(&a.bpffs, d, Duration::from_secs(30))?;
    let origin = match mode {
        Mode::List => d.started,
        Mode::WatchFed => {
            let until = Instant::now() + Duration::from_secs(30);
            while d.find("etcd: listed").is_none() {
                if Instant::now() >= until {
                    bail!("the daemon did not list the empty prefix:{}", tail(d, 10));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let t = Instant::now();
            fill(client, a, 0, n).await?;
            s.fill_s = Some(t.elapsed().as_secs_f64());
            t
        }
    };
    let deadline = origin + Duration::from_secs(a.sync_timeout);
    let at = wait_services(&maps, d, n, deadline)?;
    s.services_s = Some((at - origin).as_secs_f64());
    // The apply ends with the frontends, then the line is logged: the
    // first such line from (about) the moment all services were seen.
    let seen = (at - d.started).saturating_sub(Duration::from_millis(10));
    let applied = loop {
        let line = d
            .lines()
            .into_iter()
            .find(|l| l.t >= seen && l.line.contains("changes applied"));
        if let Some(l) = line {
            break l;
        }
        if Instant::now() >= deadline {
            bail!("no \"changes applied\" line in time:{}", tail(d, 10));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    s.applied_s = Some((d.started + applied.t - origin).as_secs_f64());
    if mode == Mode::List {
        if let Some(ready) = d.find("waiting for the first list") {
            s.startup_s = Some(ready.t.as_secs_f64());
            s.list_sync_s = Some(applied.t.saturating_sub(ready.t).as_secs_f64());
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    (s.rss_kib, s.hwm_kib) = d.memory_kib();
    let table = BackendTable::scan(&maps);
    s.backends_present = Some(table.count());
    s.vips_present = Some(
        (0..n)
            .filter(|i| {
                let (addr, family) = addr_bytes(IpAddr::V4(vip(*i)));
                let key = FrontendKey {
                    addr,
                    port: (BASE_PORT + *i as u16).to_be(),
                    proto: meshlb_common::PROTO_TCP,
                    family,
                };
                maps.frontends.get(&key, 0).is_ok()
            })
            .count(),
    );
    Ok(())
}

/// Deletes everything under the prefix.
async fn clear(client: &mut Client, a: &Args) -> Result<()> {
    tokio::time::timeout(
        ETCD_TIMEOUT,
        client.delete(
            format!("{}/", a.prefix),
            Some(DeleteOptions::new().with_prefix()),
        ),
    )
    .await
    .context("etcd delete: timed out")??;
    Ok(())
}

// ---------------------------------------------------------------------
// (a) single changes
// ---------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A new task (new address) in an existing service.
    Add,
    /// A new weight for an existing task.
    Weight,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Add => "add-task",
            Kind::Weight => "weight",
        }
    }
}

struct Change {
    n: usize,
    kind: Kind,
    service: usize,
    put_us: f64,
    /// t0 (before the put) → the BACKENDS slot shows the change.
    visible_us: Option<f64>,
    /// t0 → the service's ring hash changed (its Maglev ring is rewritten).
    ring_us: Option<f64>,
    /// The new task was not in the lowest free ids: found by full scans.
    full_scan: bool,
}

async fn changes(
    a: &Args,
    client: &mut Client,
    maps: &Maps,
    n: usize,
    extra_base: &mut usize,
) -> Result<Vec<Change>> {
    let ids = service_ids(maps);
    let mut table = BackendTable::scan(maps);
    let mut out = Vec::with_capacity(a.changes);
    let mut added_keys = Vec::new();
    let mut reweighted = Vec::new();
    for c in 0..a.changes {
        let kind = if c % 2 == 0 { Kind::Add } else { Kind::Weight };
        // Spread over the services (7919 is prime: a permutation of 0..n).
        let i = (c / 2 * 7919 + if kind == Kind::Weight { 13 } else { 0 }) % n;
        let name = service_name(i);
        let sid = *ids
            .get(&name)
            .with_context(|| format!("service {name} not in SERVICE_NAMES"))?;
        let ring_before = ring_hash(maps, sid);
        let (key, value, addr, weight, candidates) = match kind {
            Kind::Add => {
                let addr = extra_addr(*extra_base);
                let key = layout::task_key(&a.prefix, &name, &format!("x{}", *extra_base));
                *extra_base += 1;
                added_keys.push(key.clone());
                (
                    key,
                    task_record(addr, WEIGHT)?,
                    addr,
                    WEIGHT as u32,
                    table.lowest_free(WINDOW),
                )
            }
            Kind::Weight => {
                let addr = task_addr(i, 0, a.tasks);
                let id = *table
                    .by_addr
                    .get(&(sid, addr_bytes(IpAddr::V4(addr)).0))
                    .with_context(|| format!("task {addr} of {name} not in BACKENDS"))?;
                let weight = WEIGHT + 1 + c as i64;
                let key = layout::task_key(&a.prefix, &name, &task_id(0));
                reweighted.push((key.clone(), addr));
                (
                    key,
                    task_record(addr, weight)?,
                    addr,
                    weight as u32,
                    vec![id],
                )
            }
        };
        let want = addr_bytes(IpAddr::V4(addr)).0;
        let matches = |b: &Backend| b.addr == want && b.service_id == sid && b.weight == weight;

        let t0 = Instant::now();
        put(client, &key, value).await?;
        let put_us = t0.elapsed().as_secs_f64() * 1e6;
        let mut visible = None;
        let mut ring = None;
        let mut full_scan = false;
        let deadline = t0 + Duration::from_secs(20);
        let mut next_full = t0 + Duration::from_secs(1);
        while visible.is_none() || ring.is_none() {
            let now = Instant::now();
            if visible.is_none() {
                let mut hit = candidates
                    .iter()
                    .copied()
                    .find(|id| backend(maps, *id).is_some_and(|b| matches(&b)));
                if hit.is_none() && kind == Kind::Add && now >= next_full {
                    full_scan = true;
                    hit = (0..MAX_BACKENDS)
                        .find(|id| backend(maps, *id).is_some_and(|b| matches(&b)));
                    next_full = Instant::now() + Duration::from_millis(200);
                }
                if let Some(id) = hit {
                    visible = Some(now - t0);
                    table.present[id as usize] = true;
                    table.by_addr.insert((sid, want), id);
                }
            }
            if ring.is_none() && ring_hash(maps, sid) != ring_before {
                ring = Some(now - t0);
            }
            if now >= deadline {
                eprintln!(
                    "warning: {} change {c} on {name}: {} after 20 s",
                    kind.as_str(),
                    if visible.is_none() {
                        "not in BACKENDS"
                    } else {
                        "ring unchanged"
                    }
                );
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        out.push(Change {
            n,
            kind,
            service: i,
            put_us,
            visible_us: visible.map(|d| d.as_secs_f64() * 1e6),
            ring_us: ring.map(|d| d.as_secs_f64() * 1e6),
            full_scan,
        });
    }
    // Back to the filled state (untimed) for the next, larger size.
    for key in added_keys {
        tokio::time::timeout(
            ETCD_TIMEOUT,
            client.delete(key.as_str(), None::<DeleteOptions>),
        )
        .await
        .context("etcd delete: timed out")??;
    }
    for (key, addr) in reweighted {
        put(client, &key, task_record(addr, WEIGHT)?).await?;
    }
    Ok(out)
}

// ---------------------------------------------------------------------
// (c) kube-proxy's iptables mode
// ---------------------------------------------------------------------

/// kube-proxy-style chain names (it hashes; an index fits the 28-char limit).
fn svc_chain(i: usize) -> String {
    format!("KUBE-SVC-{i:016X}")
}

fn sep_chain(j: usize) -> String {
    format!("KUBE-SEP-{j:016X}")
}

/// The nat table kube-proxy's iptables mode writes for `n` ClusterIP +
/// NodePort services of `tasks` endpoints each: one KUBE-SERVICES jump per
/// VIP:port, one KUBE-NODEPORTS jump per node port, a KUBE-SVC chain of
/// `statistic` jumps (1/tasks, 1/(tasks-1), ..., the last unconditional)
/// and per endpoint a KUBE-SEP chain (hairpin mark + DNAT). `moved`: that
/// endpoint gets another address (a one-endpoint change).
fn iptables_rules(n: usize, tasks: usize, moved: Option<usize>) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(n * tasks * 400);
    s.push_str("*nat\n");
    for c in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"] {
        let _ = writeln!(s, ":{c} ACCEPT [0:0]");
    }
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-MARK-MASQ",
        "KUBE-POSTROUTING",
    ] {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    for i in 0..n {
        let _ = writeln!(s, ":{} - [0:0]", svc_chain(i));
        for k in 0..tasks {
            let _ = writeln!(s, ":{} - [0:0]", sep_chain(i * tasks + k));
        }
    }
    s.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for i in 0..n {
        let (name, svc, port) = (service_name(i), svc_chain(i), BASE_PORT as usize + i);
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/{name} cluster IP\" -m tcp --dport {port} -j {svc}",
            vip(i)
        );
        let _ = writeln!(
            s,
            "-A KUBE-NODEPORTS -p tcp -m comment --comment \"bench/{name}\" -m tcp --dport {port} -j {svc}"
        );
        for k in 0..tasks {
            let j = i * tasks + k;
            let sep = sep_chain(j);
            if k + 1 < tasks {
                let _ = writeln!(
                    s,
                    "-A {svc} -m comment --comment \"bench/{name} -> {}:{TASK_PORT}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    task_addr(i, k, tasks),
                    1.0 / (tasks - k) as f64
                );
            } else {
                let _ = writeln!(
                    s,
                    "-A {svc} -m comment --comment \"bench/{name} -> {}:{TASK_PORT}\" -j {sep}",
                    task_addr(i, k, tasks)
                );
            }
            let addr = if moved == Some(j) {
                extra_addr(j)
            } else {
                task_addr(i, k, tasks)
            };
            let _ = writeln!(
                s,
                "-A {sep} -s {addr}/32 -m comment --comment \"bench/{name}\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                s,
                "-A {sep} -p tcp -m comment --comment \"bench/{name}\" -m tcp -j DNAT --to-destination {addr}:{TASK_PORT}"
            );
        }
    }
    s.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n",
    );
    s
}

/// A network namespace of our own, deleted on drop.
struct Netns(String);

impl Netns {
    fn create(name: &str) -> Result<Netns> {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let st = Command::new("ip").args(["netns", "add", name]).status()?;
        if !st.success() {
            bail!("ip netns add {name}: {st}");
        }
        Ok(Netns(name.to_owned()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `nsenter --net=NS <restore> [--noflush] < file`, timed; `None` when it
/// was killed at the deadline.
fn restore(
    ns: &Netns,
    tool: &str,
    file: &Path,
    noflush: bool,
    timeout: Duration,
) -> Result<Option<f64>> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", ns.0)).arg(tool);
    if noflush {
        cmd.arg("--noflush");
    }
    cmd.stdin(std::fs::File::open(file)?)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {tool}"))?;
    loop {
        if let Some(st) = child.try_wait()? {
            let secs = t0.elapsed().as_secs_f64();
            if !st.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("{tool} < {}: {st}: {}", file.display(), err.trim());
            }
            return Ok(Some(secs));
        }
        if t0.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

struct IptRun {
    tool: String,
    n: usize,
    rules: usize,
    bytes: usize,
    full_s: Option<f64>,
    incremental_s: Vec<Option<f64>>,
}

/// The restore tools to compare: the system's `iptables-restore` backend
/// first, then the other one if installed.
fn iptables_tools() -> Vec<(String, String)> {
    let version = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let mut tools = Vec::new();
    let default_nft = version("iptables-restore").is_some_and(|v| v.contains("nf_tables"));
    let order = if default_nft {
        ["iptables-nft-restore", "iptables-legacy-restore"]
    } else {
        ["iptables-legacy-restore", "iptables-nft-restore"]
    };
    for t in order {
        if let Some(v) = version(t) {
            tools.push((t.to_owned(), v));
        }
    }
    tools
}

fn iptables(a: &Args, n: usize, tools: &[(String, String)]) -> Result<Vec<IptRun>> {
    let timeout = Duration::from_secs(a.ipt_timeout);
    let rules = iptables_rules(n, a.tasks, None);
    let file = a.work.join(format!("iptables-{n}.rules"));
    std::fs::write(&file, &rules)?;
    let count = rules.lines().filter(|l| l.starts_with("-A ")).count();
    let mut runs = Vec::new();
    for (tool, _) in tools {
        let short = tool
            .trim_start_matches("iptables-")
            .trim_end_matches("-restore");
        let ns = Netns::create(&format!("{}ipt-{short}-{n}", a.ns_prefix))?;
        print!("  {tool}: {n} services ({count} rules) into a fresh netns ... ");
        let _ = std::io::stdout().flush();
        let full = restore(&ns, tool, &file, false, timeout)?;
        println!("{}", secs_or_timeout(full, timeout));
        let mut run = IptRun {
            tool: tool.clone(),
            n,
            rules: count,
            bytes: rules.len(),
            full_s: full,
            incremental_s: Vec::new(),
        };
        if full.is_some() {
            for r in 0..a.ipt_reps {
                let moved = (r * 7919 + 1) % (n * a.tasks);
                let changed = a.work.join(format!("iptables-{n}-change{r}.rules"));
                std::fs::write(&changed, iptables_rules(n, a.tasks, Some(moved)))?;
                print!(
                    "    one endpoint changed, full re-restore --noflush #{} ... ",
                    r + 1
                );
                let _ = std::io::stdout().flush();
                let t = restore(&ns, tool, &changed, true, timeout)?;
                println!("{}", secs_or_timeout(t, timeout));
                let _ = std::fs::remove_file(&changed);
                run.incremental_s.push(t);
                if t.is_none() {
                    break;
                }
            }
        }
        runs.push(run);
    }
    let _ = std::fs::remove_file(&file);
    Ok(runs)
}

fn secs_or_timeout(t: Option<f64>, timeout: Duration) -> String {
    match t {
        Some(s) => format!("{s:.3} s"),
        None => format!("killed after {} s", timeout.as_secs()),
    }
}

// ---------------------------------------------------------------------
// Statistics and output
// ---------------------------------------------------------------------

struct Stats {
    count: usize,
    p50: f64,
    p99: f64,
    min: f64,
    max: f64,
}

/// Nearest-rank percentiles.
fn stats(mut v: Vec<f64>) -> Option<Stats> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Some(Stats {
        count: v.len(),
        p50: rank(0.50),
        p99: rank(0.99),
        min: v[0],
        max: v[v.len() - 1],
    })
}

#[allow(
    clippy::ref_option,
    reason = "called on the fields of a result struct as they are"
)]
fn stats_json(s: &Option<Stats>) -> Value {
    match s {
        Some(s) => {
            json!({"count": s.count, "p50": s.p50, "p99": s.p99, "min": s.min, "max": s.max})
        }
        None => Value::Null,
    }
}

fn ms(us: f64) -> String {
    format!("{:.2}", us / 1000.0)
}

fn opt_s(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| format!("{s:.2}"))
}

fn median(v: &[f64]) -> Option<f64> {
    stats(v.to_vec()).map(|s| s.p50)
}

// ---------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------

fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn report_sync(s: &Sync) {
    match &s.error {
        None => {
            println!(
                "full sync ({}): services present {} s, apply logged {} s{}{}; VmRSS {} MiB (VmHWM {} MiB); {} backends, {}/{} VIPs, {} apply lines",
                s.mode.as_str(),
                opt_s(s.services_s),
                opt_s(s.applied_s),
                match (s.startup_s, s.list_sync_s) {
                    (Some(a), Some(b)) => format!(" (start-up {a:.2} s, then list + sync {b:.2} s)"),
                    _ => String::new(),
                },
                s.fill_s.map_or(String::new(), |f| format!(" (puts took {f:.2} s)")),
                mib(s.rss_kib),
                mib(s.hwm_kib),
                s.backends_present.unwrap_or(0),
                s.vips_present.unwrap_or(0),
                s.n,
                s.applies,
            );
            for l in s.log.iter().take(10) {
                println!("  daemon +{:.3}s {}", l.t.as_secs_f64(), l.line);
            }
        }
        Some(e) => println!("full sync ({}) FAILED: {e}", s.mode.as_str()),
    }
}

async fn run(a: &Args, meshlb: &Path) -> Result<()> {
    anyhow::ensure!(a.tasks >= 1, "--tasks must be at least 1");
    anyhow::ensure!(a.batch > a.tasks, "--batch must exceed --tasks");
    // Weight changes use 101, 102, ...: they must stay within MAX_WEIGHT.
    anyhow::ensure!(
        a.changes as u32 + WEIGHT as u32 <= meshlb::source::config::MAX_WEIGHT,
        "--changes: at most {}",
        meshlb::source::config::MAX_WEIGHT - WEIGHT as u32
    );
    let mut sizes = a.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    anyhow::ensure!(
        sizes.iter().all(|n| *n >= 1
            && *n <= MAX_SERVICES as usize
            && n * a.tasks + a.changes <= MAX_BACKENDS as usize),
        "--sizes: each must be 1..={MAX_SERVICES} with sizes x tasks + changes <= {MAX_BACKENDS}"
    );
    std::fs::create_dir_all(&a.work)?;
    let mut client = connect(&a.etcd).await?;
    clear(&mut client, a).await?;

    let tools = iptables_tools();
    let mut fills = Vec::new();
    let mut syncs = Vec::new();
    let mut all_changes = Vec::new();
    let mut ipt = Vec::new();
    let mut extra = 0usize;
    let mut filled = 0usize;
    for &n in &sizes {
        println!("\n== {n} services x {} tasks", a.tasks);
        let t = Instant::now();
        let records = fill(&mut client, a, filled, n).await?;
        filled = n;
        let fill_s = t.elapsed().as_secs_f64();
        println!("etcd: wrote {records} records in {fill_s:.2} s (untimed setup)");
        fills.push(json!({"services": n, "records_written": records, "seconds": fill_s}));

        let mut daemon = None;
        let s = full_sync(a, meshlb, n, Mode::List, &mut client, &mut daemon).await?;
        report_sync(&s);
        // A daemon that cannot list this many records never syncs from a
        // list; it may still take them as watch events (its steady state).
        let list_failed = s
            .error
            .as_deref()
            .is_some_and(|e| e.contains("etcd list keeps failing"));
        syncs.push(s);
        if list_failed {
            println!("the daemon cannot list {n} services: watch-fed sync instead (daemon started on an empty prefix, then the same records written)");
            let s = full_sync(a, meshlb, n, Mode::WatchFed, &mut client, &mut daemon).await?;
            report_sync(&s);
            syncs.push(s);
        }

        if let Some(mut d) = daemon {
            let maps = Maps::from_pins(&a.bpffs)?;
            println!(
                "{} single changes (etcd put -> BACKENDS map) ...",
                a.changes
            );
            let ch = changes(a, &mut client, &maps, n, &mut extra).await?;
            let vis = stats(ch.iter().filter_map(|c| c.visible_us).collect());
            if let Some(v) = &vis {
                println!(
                    "  put -> map: p50 {} ms, p99 {} ms (min {}, max {}) over {}",
                    ms(v.p50),
                    ms(v.p99),
                    ms(v.min),
                    ms(v.max),
                    v.count
                );
            }
            all_changes.extend(ch);
            if let Some(st) = d.exited() {
                bail!(
                    "meshlb daemon exited ({st}) during the changes:{}",
                    tail(&d, 20)
                );
            }
            drop(maps);
            d.stop();
            cleanup_pins(meshlb, &a.bpffs)?;
        }

        println!("kube-proxy iptables mode, same services:");
        ipt.extend(iptables(a, n, &tools)?);
    }

    // Summary.
    println!("\n== summary (meshlb XDP generic; sync s from process start (list) or first put (watch-fed))");
    println!(
        "  {:>8} {:<9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "services",
        "mode",
        "sync s",
        "apply s",
        "RSS MiB",
        "chg p50",
        "chg p99",
        "chg min",
        "chg max",
        "ring p50"
    );
    let mut change_rows = Vec::new();
    for s in &syncs {
        let mine: Vec<&Change> = all_changes.iter().filter(|c| s.ok && c.n == s.n).collect();
        let vis = stats(mine.iter().filter_map(|c| c.visible_us).collect());
        let ring = stats(mine.iter().filter_map(|c| c.ring_us).collect());
        let put = stats(mine.iter().map(|c| c.put_us).collect());
        let by_kind = |k: Kind| {
            stats(
                mine.iter()
                    .filter(|c| c.kind == k)
                    .filter_map(|c| c.visible_us)
                    .collect(),
            )
        };
        println!(
            "  {:>8} {:<9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            s.n,
            if s.ok { s.mode.as_str() } else { "FAILED" },
            opt_s(s.services_s),
            opt_s(s.applied_s),
            mib(s.rss_kib),
            vis.as_ref().map_or("-".into(), |v| ms(v.p50)),
            vis.as_ref().map_or("-".into(), |v| ms(v.p99)),
            vis.as_ref().map_or("-".into(), |v| ms(v.min)),
            vis.as_ref().map_or("-".into(), |v| ms(v.max)),
            ring.as_ref().map_or("-".into(), |v| ms(v.p50)),
        );
        if !s.ok {
            continue;
        }
        change_rows.push(json!({
            "services": s.n,
            "sync_mode": s.mode.as_str(),
            "visible_us": stats_json(&vis),
            "visible_us_add_task": stats_json(&by_kind(Kind::Add)),
            "visible_us_weight": stats_json(&by_kind(Kind::Weight)),
            "ring_us": stats_json(&ring),
            "put_us": stats_json(&put),
            "missed": mine.iter().filter(|c| c.visible_us.is_none()).count(),
        }));
    }
    println!("  (chg = ms from just before the etcd put to the BACKENDS slot showing it; ring = to the ring hash changing)");
    println!(
        "\n  {:>8} {:<24} {:>9} {:>10} {:>13} {:>13} {:>15}",
        "services",
        "iptables-restore",
        "rules",
        "full s",
        "re-restore s",
        "meshlb sync/",
        "re-restore/"
    );
    println!(
        "  {:>8} {:<24} {:>9} {:>10} {:>13} {:>13} {:>15}",
        "", "", "", "", "(median)", "ipt full", "meshlb chg p50"
    );
    let mut ipt_rows = Vec::new();
    for r in &ipt {
        let sync = syncs.iter().find(|s| s.ok && s.n == r.n);
        // The whole apply (frontends included), as a restore is everything.
        let sync_s = sync.and_then(|s| s.applied_s.or(s.services_s));
        let chg_p50 = stats(
            all_changes
                .iter()
                .filter(|c| c.n == r.n)
                .filter_map(|c| c.visible_us)
                .collect(),
        )
        .map(|s| s.p50 / 1e6);
        let done: Vec<f64> = r.incremental_s.iter().flatten().copied().collect();
        let re = median(&done);
        let timed_out = r.incremental_s.iter().any(Option::is_none) || r.full_s.is_none();
        let ratio_sync = sync_s.zip(r.full_s).map(|(m, i)| m / i);
        let ratio_chg = re.zip(chg_p50).map(|(i, m)| i / m);
        let re_str = match (re, timed_out) {
            (Some(x), false) => format!("{x:.3}"),
            (_, true) => format!(">{}", a.ipt_timeout),
            (None, false) => "-".into(),
        };
        println!(
            "  {:>8} {:<24} {:>9} {:>10} {:>13} {:>13} {:>15}",
            r.n,
            r.tool,
            r.rules,
            r.full_s
                .map_or(format!(">{}", a.ipt_timeout), |s| format!("{s:.3}")),
            re_str,
            ratio_sync.map_or("-".into(), |x| format!("{x:.2}")),
            match (ratio_chg, timed_out, chg_p50) {
                (Some(x), false, _) => format!("{x:.0}x"),
                // Killed at the deadline: at least this much slower.
                (_, true, Some(m)) => format!(">{:.0}x", a.ipt_timeout as f64 / m),
                _ => "-".into(),
            },
        );
        ipt_rows.push(json!({
            "tool": r.tool,
            "services": r.n,
            "rules": r.rules,
            "input_bytes": r.bytes,
            "full_restore_s": r.full_s,
            "rerestore_noflush_s": r.incremental_s,
            "timeout_s": a.ipt_timeout,
            "rerestore_median_s": re,
            "meshlb_sync_over_iptables_full": ratio_sync,
            "meshlb_sync_mode": sync.map(|s| s.mode.as_str()),
            "rerestore_over_meshlb_change_p50": ratio_chg,
        }));
    }

    if let Some(out) = &a.out {
        let doc = json!({
            "suite": "control-plane",
            "parameters": {
                "sizes": sizes,
                "tasks_per_service": a.tasks,
                "changes_per_size": a.changes,
                "etcd_batch": a.batch,
                "sync_timeout_s": a.sync_timeout,
                "ipt_reps": a.ipt_reps,
                "ipt_timeout_s": a.ipt_timeout,
            },
            "definitions": {
                "full_sync": "from just before spawning `meshlb run --etcd` on an empty bpffs (records already in etcd) to every SERVICES slot present (services_present_s); apply_logged_s: the daemon's \"changes applied\" line (frontends are written last) as it arrived on its stderr pipe; startup_s: to its \"waiting for the first list\" line (programs loaded and verified); list_sync_s: from that line to \"changes applied\" (the paged list and the full sync)",
                "change": "visible_us: from just before the etcd put to the BACKENDS slot showing the new task or weight (polled every ~50 us); ring_us: to the service's ring hash in SERVICES changing; put_us: the put's own round trip. Even changes add a task with a new address to a service, odd ones change a task's weight; spread over the services",
                "iptables": "kube-proxy iptables-mode nat table for the same services (KUBE-SERVICES per VIP:port, KUBE-NODEPORTS per node port, KUBE-SVC-* with statistic random jumps, KUBE-SEP-* mark + DNAT); full_restore_s: iptables-restore into a fresh netns; rerestore_noflush_s: one endpoint address changed, the whole table restored again with --noflush as kube-proxy's iptables mode did (before MinimizeIPTablesRestore); null = killed at timeout_s",
                "memory": "VmRSS/VmHWM of the daemon from /proc/PID/status, 200 ms after the apply line",
            },
            "iptables_tools": tools.iter().map(|(t, v)| json!({"tool": t, "version": v})).collect::<Vec<_>>(),
            "fill": fills,
            "full_sync": syncs.iter().map(Sync::json).collect::<Vec<_>>(),
            "change_summary": change_rows,
            "changes": all_changes.iter().map(|c| json!({
                "services": c.n,
                "kind": c.kind.as_str(),
                "service": service_name(c.service),
                "put_us": c.put_us,
                "visible_us": c.visible_us,
                "ring_us": c.ring_us,
                "full_scan": c.full_scan,
            })).collect::<Vec<_>>(),
            "iptables": ipt_rows,
        });
        std::fs::write(out, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
