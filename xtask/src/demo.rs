//! `cargo xtask demo`: three nginx backends behind a meshlb VIP in network
//! namespaces (`mlbd-*`); curl the VIP, show who answered, then tear down.
//! It installs only what it uses ([`setup::demo`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::cmd;
use crate::compile::{self, Target};
use crate::netns::{self, Topology};
use crate::procs::{self, Daemon, TempDir};
use crate::setup;

const PREFIX: &str = "mlbd-";
const BPFFS: &str = "/sys/fs/bpf/mlbd";
const BACKENDS: usize = 3;
/// The embedded default service: whoami, 10.96.0.10 tcp 80 -> 8000.
const VIP_URL: &str = "http://10.96.0.10:80/";
const REQUESTS: usize = 30;
/// The demo's service (`meshlb run` needs a config or etcd).
const DEMO_CONFIG: &str = include_str!("../../src/demo.toml");

pub fn demo(requests: Option<usize>, kernel_only: bool, meshlb: Option<PathBuf>) -> Result<()> {
    setup::require_root("demo")?;
    // Only what the demo uses; `cargo xtask setup` installs the rest.
    setup::demo()?;
    let bin = match (kernel_only, meshlb) {
        (true, _) => None,
        (false, Some(b)) => Some(b),
        (false, None) => Some(compile::build(Target::X86_64, false)?),
    };
    let _lock = netns::lock_prefix(PREFIX)?;
    netns::remove_stale(PREFIX)?;
    if let Some(bin) = &bin {
        Daemon::cleanup_pins(bin, Path::new(BPFFS));
    }

    // Declaration order is reverse cleanup order: daemon, nginx, netns, tmp.
    let tmp = TempDir::new("meshlb-demo")?;
    let topo = Topology::create(PREFIX, BACKENDS)?;
    let mut nginx = Vec::new();
    for (i, b) in topo.backends.iter().enumerate() {
        let name = format!("b{}", i + 1);
        nginx.push(procs::start_nginx(
            &b.name,
            &tmp.path().join(&name),
            &name,
            8000,
        )?);
    }
    // The kernel path works before meshlb exists: client -> LB (forwarding)
    // -> backend. If this fails, the topology is broken, not meshlb.
    let direct = procs::curl(
        &topo.client.name,
        &format!("http://{}:8000/", netns::backend_v4(1)),
        Duration::from_secs(3),
    )?;
    println!("direct (kernel forwarding) to b1: {}", direct.trim());
    let Some(bin) = bin else {
        return kernel_only_check(&topo);
    };

    // The client side is an uplink (XDP); the backends are local tasks at
    // default offloads, served by the TC program (`--task-iface`).
    let cfg = tmp.path().join("meshlb.toml");
    std::fs::write(&cfg, DEMO_CONFIG)?;
    let mut args = vec!["--config".to_string(), cfg.display().to_string()];
    for (n, i) in topo.lb_ifaces.iter().enumerate() {
        args.push(if n == 0 { "--iface" } else { "--task-iface" }.to_string());
        args.push(i.clone());
    }
    args.extend(["--xdp-mode".to_string(), "generic".to_string()]);
    let mut daemon = Daemon::start(
        &bin,
        &topo.lb.name,
        &args,
        Path::new(BPFFS),
        &tmp.path().join("meshlb.log"),
    )?;
    daemon.wait_ready("whoami", Duration::from_secs(20))?;

    let n = requests.unwrap_or(REQUESTS);
    println!("\n{n} requests from {} to {VIP_URL}:", netns::CLIENT_V4);
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed = 0;
    for i in 1..=n {
        cmd::check_interrupted()?;
        match procs::curl(&topo.client.name, VIP_URL, Duration::from_secs(3)) {
            Ok(body) => {
                let who = body.trim().to_string();
                println!("  {i:>3}  {who}");
                *tally.entry(who).or_default() += 1;
            }
            Err(e) => {
                println!("  {i:>3}  FAILED: {e}");
                failed += 1;
            }
        }
    }
    println!("\ntally:");
    for (who, count) in &tally {
        println!("  {who}: {count}");
    }
    if failed > 0 {
        println!("  failed: {failed}");
    }

    println!("\n$ meshlb status");
    match daemon.client(&["status"]).stdout() {
        Ok(s) => print!("{s}"),
        Err(e) => println!("{e}"),
    }
    println!("\n$ meshlb explain tcp 10.200.0.2:40000 10.96.0.10:80");
    match daemon
        .client(&["explain", "tcp", "10.200.0.2:40000", "10.96.0.10:80"])
        .stdout()
    {
        Ok(s) => print!("{s}"),
        Err(e) => println!("{e}"),
    }
    if failed > 0 {
        println!("\nmeshlb log (tail):\n{}", daemon.log_tail(30));
    }
    println!();
    drop(daemon);
    drop(nginx);
    drop(topo);
    drop(tmp);
    if failed > 0 {
        bail!("{failed} of {n} requests to the VIP failed");
    }
    println!("demo: all {n} requests answered");
    Ok(())
}

/// Every backend, v4 and v6, through the LB namespace's plain forwarding.
fn kernel_only_check(topo: &Topology) -> Result<()> {
    for n in 1..=topo.backends.len() {
        for url in [
            format!("http://10.201.{n}.2:8000/"),
            format!("http://[fd00:201:{n}::2]:8000/"),
        ] {
            let body = procs::curl(&topo.client.name, &url, Duration::from_secs(3))?;
            println!("  {url} -> {}", body.trim());
            anyhow::ensure!(body.trim() == format!("b{n}"), "{url} answered {body:?}");
        }
    }
    println!("demo --kernel-only: topology and backends work without meshlb");
    Ok(())
}
