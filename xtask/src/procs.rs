//! The long-running processes the demo and benchmarks start: nginx
//! backends, the meshlb daemon, and a temp dir — each cleaned up on drop.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, Background, Cmd};

/// A private temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!("{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Start nginx in netns `ns` on `port` (v4 and v6), answering every request
/// with `200 "<body>\n"`; its config, pid, logs and temp files live in
/// `dir`. Tuned to stay out of the way of a load-balancer measurement:
/// one worker, no access log, effectively unlimited keep-alive requests.
pub fn start_nginx(ns: &str, dir: &Path, body: &str, port: u16) -> Result<Background> {
    std::fs::create_dir_all(dir)?;
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 16384; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 65s;
    tcp_nodelay on;
    server {{
        listen {port} reuseport backlog=8192;
        listen [::]:{port} reuseport backlog=8192 ipv6only=on;
        default_type text/plain;
        location / {{ return 200 "{body}\n"; }}
    }}
}}
"#
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut bg = Cmd::in_netns(ns, "nginx")
        .arg("-p")
        .arg(dir.to_string_lossy())
        .arg("-c")
        .arg(conf_path.to_string_lossy())
        .arg("-e")
        .arg(dir.join("error.log").to_string_lossy())
        .spawn_background(&format!("nginx {body}"), &dir.join("stdout.log"))?;
    let url = format!("http://127.0.0.1:{port}/");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = bg.exited() {
            bail!(
                "nginx {body} in {ns} exited ({st}):\n{}\n{}",
                bg.log_tail(20),
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
        }
        let out = curl(ns, &url, Duration::from_secs(1));
        if out.as_deref().is_ok_and(|b| b.trim() == body) {
            println!("nginx {body} answering on {ns} :{port} (pid {})", bg.pid());
            return Ok(bg);
        }
        if Instant::now() >= deadline {
            bail!("nginx {body} in {ns} did not answer on {url} within 10s");
        }
        cmd::sleep(Duration::from_millis(100))?;
    }
}

/// `curl` from inside `ns`; the body on HTTP success.
pub fn curl(ns: &str, url: &str, timeout: Duration) -> Result<String> {
    let secs = format!("{:.1}", timeout.as_secs_f64());
    let out = Cmd::in_netns(ns, "curl")
        .args([
            "-sS",
            "--fail",
            "--connect-timeout",
            &secs,
            "--max-time",
            &secs,
            url,
        ])
        .timeout(timeout + Duration::from_secs(2))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A `meshlb run` daemon inside a netns (entered with nsenter so the host's
/// bpffs stays visible), plus the client commands that talk to it. On drop:
/// SIGTERM the daemon, then `meshlb cleanup` its pins.
pub struct Daemon {
    pub bin: PathBuf,
    pub ns: String,
    pub bpffs: PathBuf,
    proc: Option<Background>,
}

impl Daemon {
    /// Remove pins left in `bpffs` by an earlier run.
    pub fn cleanup_pins(bin: &Path, bpffs: &Path) {
        if !bpffs.exists() {
            return;
        }
        let r = Cmd::new(bin.to_string_lossy())
            .args(["cleanup", "--bpffs"])
            .arg(bpffs.to_string_lossy())
            .cleanup()
            .timeout(Duration::from_secs(20))
            .output();
        match r {
            Ok(_) => {
                println!("meshlb cleanup --bpffs {}: ok", bpffs.display());
                // Only if empty: whatever else is there is not ours to remove.
                let _ = std::fs::remove_dir(bpffs);
            }
            Err(e) => {
                eprintln!("warning: {e}; removing {} directly", bpffs.display());
                let _ = std::fs::remove_dir_all(bpffs);
            }
        }
    }

    /// `nsenter --net=/run/netns/NS meshlb run ARGS --bpffs DIR`.
    pub fn start(bin: &Path, ns: &str, args: &[String], bpffs: &Path, log: &Path) -> Result<Self> {
        let proc = Cmd::nsenter(ns, bin.to_string_lossy())
            .arg("run")
            .args(args.iter().cloned())
            .arg("--bpffs")
            .arg(bpffs.to_string_lossy())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .spawn_background("meshlb daemon", log)?;
        Ok(Self {
            bin: bin.to_path_buf(),
            ns: ns.to_string(),
            bpffs: bpffs.to_path_buf(),
            proc: Some(proc),
        })
    }

    /// A client subcommand (`status`, `explain`, ...) against this daemon's
    /// node state: run in the same netns, with the same `--bpffs`.
    pub fn client(&self, args: &[&str]) -> Cmd {
        Cmd::nsenter(&self.ns, self.bin.to_string_lossy())
            .args(args.iter().copied())
            .arg("--bpffs")
            .arg(self.bpffs.to_string_lossy())
            .timeout(Duration::from_secs(10))
    }

    /// Poll `meshlb status --json` until `service` is programmed.
    pub fn wait_ready(&mut self, service: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(p) = self.proc.as_mut() {
                if let Some(st) = p.exited() {
                    bail!("meshlb daemon exited ({st}); its log:\n{}", p.log_tail(40));
                }
            }
            let last = match self.client(&["status", "--json"]).output_unchecked() {
                Ok(out) if out.status.success() => {
                    let text = String::from_utf8_lossy(&out.stdout);
                    if status_has_service(&text, service) {
                        println!("meshlb daemon ready: service {service} programmed");
                        return Ok(());
                    }
                    format!("status --json has no service {service}: {}", text.trim())
                }
                Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                let log = self
                    .proc
                    .as_ref()
                    .map(|p| p.log_tail(40))
                    .unwrap_or_default();
                bail!("meshlb daemon not ready within {within:?} (last: {last}); its log:\n{log}");
            }
            cmd::sleep(Duration::from_millis(250))?;
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc
            .as_ref()
            .map(|p| p.log_tail(lines))
            .unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(10));
        }
        Self::cleanup_pins(&self.bin, &self.bpffs);
    }
}

/// Whether `meshlb status --json` output lists a service called `name`.
pub fn status_has_service(json: &str, name: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(json).is_ok_and(|v| {
        v["services"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == name))
    })
}

#[cfg(test)]
mod tests {
    use super::status_has_service;

    #[test]
    fn status_service_detection() {
        let cases = [
            (r#"{"services":[{"name":"whoami","backends":[]}]}"#, true),
            (r#"{"services":[{"name":"other"}]}"#, false),
            (r#"{"services":[]}"#, false),
            (r#"{"node":"x"}"#, false),
            ("not json", false),
        ];
        for (json, want) in cases {
            assert_eq!(status_has_service(json, "whoami"), want, "{json}");
        }
    }
}
