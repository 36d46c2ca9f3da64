//! `cargo xtask bench control-plane`: how fast etcd changes reach the
//! kernel, full-sync time and daemon memory at 1k and 10k services, next to
//! kube-proxy's iptables mode loading the same services.
//!
//! This side owns the environment: a release meshlb, the driver (the
//! `control_plane` bench target of the root crate, which needs etcd-client
//! and the pinned-map types), a netns `mlbcp-lb` with one veth pair for
//! the daemon's XDP attach (generic mode), and etcd inside it on loopback.
//! The driver runs in that namespace via nsenter (bpffs stays visible),
//! starts and stops the daemons itself (so process start is an exact
//! instant and their PIDs are known), makes its iptables namespaces
//! `mlbcp-ipt-*`, and writes its samples as JSON; this side adds machine
//! info and the command line and writes
//! `bench/results/<timestamp>-control-plane.json`. Everything is removed
//! on success, error or Ctrl-C: processes in the namespace, the
//! namespaces, the pins (`meshlb cleanup`), the temp dir.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::bench::{utc_stamp, Options};
use crate::cmd::Cmd;
use crate::compile::{self, Target};
use crate::netns::{self, Netns};
use crate::procs::{Daemon, TempDir};
use crate::setup;

const PREFIX: &str = "mlbcp-";
const BPFFS: &str = "/sys/fs/bpf/mlbcp";
/// The interface the daemon attaches to (its peer `cp1` stays idle).
const IFACE: &str = "cp0";
/// etcd's limit on operations per txn; the driver's fill batch is below it.
const MAX_TXN_OPS: u32 = 1024;
const FILL_BATCH: u32 = 1000;
/// Deadline of the whole driver run.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Removes what the driver may leave behind when it is killed: its
/// iptables namespaces (they hold no processes) and the daemon's pins.
struct Leftovers {
    bin: PathBuf,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if let Ok(dir) = std::fs::read_dir("/run/netns") {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{PREFIX}ipt-")) {
                    let _ = Cmd::new("ip")
                        .args(["netns", "del", &name])
                        .cleanup()
                        .timeout(Duration::from_secs(10))
                        .output();
                    println!("deleted netns {name}");
                }
            }
        }
        Daemon::cleanup_pins(&self.bin, Path::new(BPFFS));
    }
}

pub fn control_plane(opt: &Options) -> Result<()> {
    setup::setup()?;
    let bin = match &opt.meshlb {
        Some(b) => b.clone(),
        None => compile::build(Target::X86_64, true)?,
    };
    let driver = build_driver()?;
    let _lock = netns::lock_prefix(PREFIX)?;
    netns::remove_stale(PREFIX)?;
    Daemon::cleanup_pins(&bin, Path::new(BPFFS));

    let tmp = TempDir::new("meshlb-bench-cp")?;
    // Drop order (reverse of declaration): etcd, the namespace with
    // whatever still runs in it, then leftovers and pins, then tmp.
    let _leftovers = Leftovers { bin: bin.clone() };
    println!("creating netns {PREFIX}lb with veth {IFACE} <-> cp1");
    let ns = Netns::create(&format!("{PREFIX}lb"))?;
    ns.ip(&["link", "add", IFACE, "type", "veth", "peer", "name", "cp1"])?;
    ns.ip(&["addr", "add", "10.200.0.1/24", "dev", IFACE])?;
    ns.ip(&["link", "set", IFACE, "up"])?;
    ns.ip(&["link", "set", "cp1", "up"])?;

    let etcd_dir = tmp.path().join("etcd");
    let mut etcd = Cmd::nsenter(&ns.name, "etcd")
        .args(["--name", "mlbcp", "--data-dir"])
        .arg(etcd_dir.to_string_lossy())
        .args([
            "--listen-client-urls",
            "http://127.0.0.1:2379",
            "--advertise-client-urls",
            "http://127.0.0.1:2379",
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "mlbcp=http://127.0.0.1:2380",
            "--max-txn-ops",
            &MAX_TXN_OPS.to_string(),
            // 110k records plus history fit the 2 GiB default many times;
            // raised anyway so a larger --sizes does not hit the alarm.
            "--quota-backend-bytes",
            "8589934592",
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ])
        .spawn_background("etcd", &tmp.path().join("etcd.log"))?;

    let work = tmp.path().join("work");
    let out = tmp.path().join("control-plane.json");
    let run = Cmd::nsenter(&ns.name, driver.to_string_lossy())
        .arg("--meshlb")
        .arg(bin.to_string_lossy())
        .args(["--etcd", "http://127.0.0.1:2379", "--iface", IFACE])
        .args(["--bpffs", BPFFS, "--ns-prefix", PREFIX])
        .args(["--sizes", &opt.sizes])
        .args(["--changes", &opt.changes.to_string()])
        .args(["--batch", &FILL_BATCH.to_string()])
        .arg("--work")
        .arg(work.to_string_lossy())
        .arg("--out")
        .arg(out.to_string_lossy())
        .timeout(DRIVER_TIMEOUT)
        .run();
    if let Err(e) = run {
        if let Some(st) = etcd.exited() {
            eprintln!("etcd exited ({st}); its log:\n{}", etcd.log_tail(30));
        }
        return Err(e.context("control-plane driver"));
    }
    let etcd_log = etcd.log_tail(50);
    drop(etcd);
    drop(ns);

    let driver_doc: Value = serde_json::from_str(
        &std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?,
    )
    .context("driver output")?;
    let file = write_results(driver_doc, opt, &bin, &etcd_log)?;
    println!("\nraw samples: {}", file.display());
    Ok(())
}

/// `cargo bench --bench control_plane --no-run`; the executable's path
/// from cargo's JSON messages.
fn build_driver() -> Result<PathBuf> {
    println!("building the control-plane driver (cargo bench --bench control_plane --no-run)");
    let out = Cmd::new("cargo")
        .args([
            "bench",
            "--package",
            "meshlb",
            "--bench",
            "control_plane",
            "--no-run",
            "--message-format=json",
        ])
        .stdout()
        .context("building the control_plane bench")?;
    executable(&out).context("cargo printed no executable for the control_plane bench")
}

/// The `executable` of the `control_plane` artifact in cargo's JSON lines.
fn executable(cargo_json: &str) -> Option<PathBuf> {
    cargo_json
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "control_plane")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
}

fn first_line(program: &str, args: &[&str]) -> String {
    Cmd::new(program)
        .args(args.iter().copied())
        .output_unchecked()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn proc_field(file: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

fn write_results(mut doc: Value, opt: &Options, bin: &Path, etcd_log: &str) -> Result<PathBuf> {
    let Some(obj) = doc.as_object_mut() else {
        bail!("driver output is not a JSON object");
    };
    let stamp = utc_stamp();
    obj.insert("timestamp".into(), json!(stamp));
    obj.insert(
        "command".into(),
        json!(std::env::args().collect::<Vec<_>>().join(" ")),
    );
    obj.insert(
        "machine".into(),
        json!({
            "uname": first_line("uname", &["-a"]),
            "nproc": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            "cpu": proc_field("/proc/cpuinfo", "model name"),
            "memory": proc_field("/proc/meminfo", "MemTotal"),
            "etcd": first_line("etcd", &["--version"]),
        }),
    );
    obj.insert(
        "setup".into(),
        json!({
            "topology": format!("netns {PREFIX}lb: veth {IFACE} <-> cp1 (XDP generic on {IFACE}), etcd on 127.0.0.1:2379 in the same netns"),
            "etcd": format!("single member, data dir in a temp dir on the host's disk, --max-txn-ops {MAX_TXN_OPS}; filled with txns of {FILL_BATCH} puts"),
            "meshlb": opt.meshlb.as_ref().map_or_else(
                || "built: cargo xtask build --release".to_string(),
                |p| p.display().to_string(),
            ),
            "meshlb_binary": bin.display().to_string(),
            "daemon": format!("meshlb run --config <node only> --etcd http://127.0.0.1:2379 --iface {IFACE} --xdp-mode generic --bpffs {BPFFS} --metrics none (fresh pins for every size)"),
        }),
    );
    obj.insert("etcd_log_tail".into(), json!(etcd_log));
    let dir = crate::root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{stamp}-control-plane.json"));
    std::fs::write(&file, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::executable;

    #[test]
    fn finds_the_driver_in_cargo_messages() {
        let lines = [
            r#"{"reason":"compiler-artifact","target":{"name":"meshlb"},"executable":"/t/release/meshlb"}"#,
            r#"{"reason":"compiler-artifact","target":{"name":"control_plane"},"executable":null}"#,
            "not json",
            r#"{"reason":"compiler-artifact","target":{"name":"control_plane"},"executable":"/t/release/deps/control_plane-abc"}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        assert_eq!(
            executable(&lines),
            Some("/t/release/deps/control_plane-abc".into())
        );
        assert_eq!(executable(r#"{"reason":"build-finished"}"#), None);
    }
}
