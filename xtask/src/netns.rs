//! Throwaway network-namespace topologies for the demo and benchmarks:
//! client ns ↔ LB ns ↔ N backend ns over veth pairs, removed on drop.
//!
//! Addressing (the same for every prefix; namespaces keep them apart):
//! client 10.200.0.2/24 + fd00:200::2/64 ↔ LB 10.200.0.1 + fd00:200::1;
//! backend N 10.201.N.2/24 + fd00:201:N::2/64 ↔ LB 10.201.N.1 + fd00:201:N::1.

use std::fs::File;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, Cmd};

pub const CLIENT_V4: &str = "10.200.0.2";

pub fn backend_v4(n: usize) -> String {
    format!("10.201.{n}.2")
}

/// One named network namespace; on drop, the processes still in it are
/// stopped and it is deleted.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        Cmd::new("ip").args(["netns", "add", name]).output()?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME args...`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        Cmd::new("ip")
            .args(["-n", &self.name])
            .args(args.iter().copied())
            .timeout(Duration::from_secs(10))
            .output()?;
        Ok(())
    }

    pub fn exec(&self, program: &str) -> Cmd {
        Cmd::in_netns(&self.name, program)
    }

    pub fn sysctl(&self, kv: &str) -> Result<()> {
        self.exec("sysctl")
            .args(["-q", "-w", kv])
            .timeout(Duration::from_secs(10))
            .output()?;
        Ok(())
    }

    /// Disable TX checksum offload: the end then checksums in software, as
    /// a remote host's NIC on a wire delivers complete checksums.
    pub fn tx_off(&self, iface: &str) -> Result<()> {
        self.exec("ethtool")
            .args(["-K", iface, "tx", "off"])
            .timeout(Duration::from_secs(10))
            .output()?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove_netns(&self.name);
    }
}

/// Stop whatever still runs in `name` (all of it started by these tools),
/// then delete the namespace.
fn remove_netns(name: &str) {
    let pids = |name: &str| -> Vec<u32> {
        Cmd::new("ip")
            .args(["netns", "pids", name])
            .cleanup()
            .timeout(Duration::from_secs(10))
            .stdout()
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let left = pids(name);
    if !left.is_empty() {
        for p in &left {
            cmd::signal(*p, "TERM");
        }
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end && !pids(name).is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
        for p in pids(name) {
            cmd::signal(p, "KILL");
        }
    }
    let del = Cmd::new("ip")
        .args(["netns", "del", name])
        .cleanup()
        .timeout(Duration::from_secs(10));
    match del.output() {
        Ok(_) => println!("deleted netns {name}"),
        Err(e) => eprintln!("warning: {e}"),
    }
}

/// Delete namespaces named `<prefix>*` left by an earlier, killed run.
pub fn remove_stale(prefix: &str) -> Result<()> {
    let list = Cmd::new("ip").args(["netns", "list"]).stdout()?;
    for name in list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
    {
        println!("removing stale netns {name}");
        remove_netns(name);
    }
    Ok(())
}

/// Only one run per prefix at a time: a second one would delete the first
/// one's namespaces as stale. Held until dropped.
pub struct PrefixLock(#[allow(dead_code)] File);

pub fn lock_prefix(prefix: &str) -> Result<PrefixLock> {
    let dir = if std::path::Path::new("/run/lock").is_dir() {
        "/run/lock"
    } else {
        "/tmp"
    };
    let path = format!("{dir}/meshlb-xtask-{prefix}lock");
    let f = File::create(&path).with_context(|| format!("creating {path}"))?;
    match f.try_lock() {
        Ok(()) => Ok(PrefixLock(f)),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("another run using the `{prefix}` namespaces is in progress (lock {path})")
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e).context(format!("locking {path}")),
    }
}

/// The client/LB/backends topology. Field order is drop order: backends,
/// then the LB, then the client.
pub struct Topology {
    /// `lb-cl` first, then `lb-b1`, `lb-b2`, ...: the LB-side interfaces.
    pub lb_ifaces: Vec<String>,
    pub backends: Vec<Netns>,
    pub lb: Netns,
    pub client: Netns,
}

impl Topology {
    /// Build `<prefix>client`, `<prefix>lb` and `<prefix>b1..=n`. Routes:
    /// client default via the LB, backends default via the LB, forwarding
    /// on in the LB. TX checksum offload is off only on the client's end
    /// (it plays a remote host: a wire carries complete checksums); the
    /// LB and the backends (local tasks, served by meshlb's TC program on
    /// `lb-b*`) keep the kernel's defaults.
    pub fn create(prefix: &str, n_backends: usize) -> Result<Self> {
        println!("creating netns topology {prefix}{{client,lb,b1..b{n_backends}}}");
        let client = Netns::create(&format!("{prefix}client"))?;
        let lb = Netns::create(&format!("{prefix}lb"))?;
        let mut topo = Topology {
            lb_ifaces: vec!["lb-cl".into()],
            backends: Vec::new(),
            lb,
            client,
        };
        veth(&topo.lb, "lb-cl", &topo.client, "cl-lb")?;
        topo.client.tx_off("cl-lb")?;
        addr(&topo.lb, "lb-cl", "10.200.0.1/24", "fd00:200::1/64")?;
        addr(&topo.client, "cl-lb", "10.200.0.2/24", "fd00:200::2/64")?;
        topo.client
            .ip(&["route", "add", "default", "via", "10.200.0.1"])?;
        topo.client
            .ip(&["-6", "route", "add", "default", "via", "fd00:200::1"])?;
        for n in 1..=n_backends {
            let b = Netns::create(&format!("{prefix}b{n}"))?;
            let (lb_if, b_if) = (format!("lb-b{n}"), format!("b{n}-lb"));
            veth(&topo.lb, &lb_if, &b, &b_if)?;
            addr(
                &topo.lb,
                &lb_if,
                &format!("10.201.{n}.1/24"),
                &format!("fd00:201:{n}::1/64"),
            )?;
            addr(
                &b,
                &b_if,
                &format!("10.201.{n}.2/24"),
                &format!("fd00:201:{n}::2/64"),
            )?;
            b.ip(&["route", "add", "default", "via", &format!("10.201.{n}.1")])?;
            b.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:201:{n}::1"),
            ])?;
            topo.lb_ifaces.push(lb_if);
            topo.backends.push(b);
        }
        topo.lb.sysctl("net.ipv4.ip_forward=1")?;
        topo.lb.sysctl("net.ipv6.conf.all.forwarding=1")?;
        Ok(topo)
    }
}

/// A veth pair `a_if` (in `a`) <-> `b_if` (in `b`), both up, at the
/// kernel's default offloads (callers switch TX checksum offload off where
/// an end plays a remote host or a wire).
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])
    .with_context(|| format!("creating veth {a_if} <-> {b_if}"))?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

fn addr(ns: &Netns, iface: &str, v4: &str, v6: &str) -> Result<()> {
    ns.ip(&["addr", "add", v4, "dev", iface])?;
    // nodad: the address is usable at once instead of after ~2 s of DAD.
    ns.ip(&["-6", "addr", "add", v6, "dev", iface, "nodad"])?;
    Ok(())
}
