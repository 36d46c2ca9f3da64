//! A real dockerd (Debian's docker.io) for the Docker registration tests,
//! one per test, inside the test's LB namespace: its docker0 bridge and
//! its containers live there, next to the meshlb daemon.
//!
//! dockerd is started with `nsenter --net=...` (`ip netns exec` remounts
//! /sys and dockerd then fails on cgroups), with its own data root, exec
//! root, socket and pid file under the test's temp dir, vfs storage and no
//! iptables. There is no registry: the one image, `mlbt-busybox:1`, is made
//! with `docker import` from a tarball holding busybox-static. Containers
//! run `busybox httpd` on :8000 answering their own name. The `docker` CLI
//! (whatever is first in PATH) talks to it through `DOCKER_HOST`.
//!
//! Dropping a [`Dockerd`] removes every container (SIGKILL) and stops
//! dockerd by PID (SIGKILL after a grace period).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{run_cmd, run_cmd_env, wait_for, CmdOutput, Proc};

const DOCKERD: &str = "/usr/sbin/dockerd";
const BUSYBOX: &str = "/bin/busybox";
/// The image every test container runs.
pub const IMAGE: &str = "mlbt-busybox:1";
/// Where the containers' HTTP responder listens.
pub const WEB_PORT: u16 = 8000;
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// dockerd with vfs starts in a few seconds; on a loaded 2-core machine
/// with parallel tests it may take longer.
const STARTUP: Duration = Duration::from_secs(60);

/// Fails loudly when dockerd, the docker CLI or busybox-static is missing.
pub fn require_docker() {
    for (tool, pkg) in [
        (DOCKERD, "docker.io"),
        ("/usr/bin/containerd", "containerd (docker.io)"),
        ("/usr/sbin/runc", "runc (docker.io)"),
        (BUSYBOX, "busybox-static"),
    ] {
        assert!(
            Path::new(tool).is_file(),
            "{tool} is missing: install {pkg} (cargo xtask setup does)"
        );
    }
    let out = run_cmd(&["docker", "--version"], CMD_TIMEOUT);
    assert!(
        out.success(),
        "the docker CLI is missing (install docker.io): {}",
        out.describe()
    );
}

/// One dockerd inside a network namespace.
pub struct Dockerd {
    pub ns: String,
    pub dir: PathBuf,
    /// `unix://...`, for `DOCKER_HOST`.
    pub host: String,
    /// The socket path, for `meshlb run --docker=...`.
    pub socket: PathBuf,
    proc: Option<Proc>,
    starts: usize,
}

impl Dockerd {
    /// Starts dockerd in `ns` with its state under `dir` (created), waits
    /// until it answers and imports [`IMAGE`].
    pub fn start_in(ns: &str, dir: &Path) -> Dockerd {
        require_docker();
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let socket = dir.join("docker.sock");
        let mut d = Dockerd {
            ns: ns.to_owned(),
            dir: dir.to_owned(),
            host: format!("unix://{}", socket.display()),
            socket,
            proc: None,
            starts: 0,
        };
        d.spawn();
        d.import_image();
        d
    }

    fn spawn(&mut self) {
        let p = |s: &str| self.dir.join(s).display().to_string();
        let argv: Vec<String> = vec![
            "nsenter".into(),
            format!("--net=/run/netns/{}", self.ns),
            DOCKERD.into(),
            format!("--data-root={}", p("data")),
            format!("--exec-root={}", p("exec")),
            format!("-H={}", self.host),
            format!("--pidfile={}", p("docker.pid")),
            "--storage-driver=vfs".into(),
            "--iptables=false".into(),
            "--ip6tables=false".into(),
            // Containers must not outlive a stopped test for long.
            "--shutdown-timeout=5".into(),
        ];
        let log = self.dir.join(format!("dockerd-{}.log", self.starts));
        self.starts += 1;
        self.proc = Some(Proc::spawn("dockerd", &argv, &[], log));
        let r = wait_for(STARTUP, "dockerd to answer", || {
            if let Some(st) = self.proc.as_mut().and_then(|p| p.exit_status()) {
                return Err(format!("dockerd exited: {st}"));
            }
            let out = self.cli(&["version", "--format", "{{.Server.APIVersion}}"]);
            if out.success() {
                Ok(())
            } else {
                Err(out.describe())
            }
        });
        if let Err(e) = r {
            panic!("{e}{}", self.log_tail(40));
        }
    }

    /// The last lines of the current dockerd's log.
    pub fn log_tail(&self, n: usize) -> String {
        let Some(p) = &self.proc else {
            return String::new();
        };
        let text = p.log_text();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "\n===== {} (last {n} lines) =====\n{}",
            p.log.display(),
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }

    /// `docker ARGS` against this dockerd. Never panics.
    pub fn cli(&self, args: &[&str]) -> CmdOutput {
        let mut argv = vec!["docker"];
        argv.extend_from_slice(args);
        run_cmd_env(&argv, &[("DOCKER_HOST", &self.host)], CMD_TIMEOUT)
    }

    /// `docker ARGS` that must succeed; returns stdout, trimmed.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.success(),
            "docker command failed: {}{}",
            out.describe(),
            self.log_tail(20)
        );
        out.stdout.trim().to_owned()
    }

    fn import_image(&self) {
        let root = self.dir.join("image");
        for d in ["bin", "www", "tmp"] {
            fs::create_dir_all(root.join(d)).expect("mkdir image tree");
        }
        fs::copy(BUSYBOX, root.join("bin/busybox")).expect("copy busybox");
        let sh = root.join("bin/sh");
        if !sh.exists() {
            std::os::unix::fs::symlink("busybox", &sh).expect("symlink bin/sh");
        }
        let tar = self.dir.join("image.tar");
        let (r, t) = (root.display().to_string(), tar.display().to_string());
        let out = run_cmd(&["tar", "-C", &r, "-cf", &t, "."], CMD_TIMEOUT);
        assert!(out.success(), "tar: {}", out.describe());
        self.cli_ok(&["import", "-c", "CMD [\"/bin/sh\"]", &t, IMAGE]);
    }

    /// `docker run -d --name NAME --expose 8000 EXTRA... IMAGE` running
    /// `busybox httpd` on :8000 that answers `NAME`; returns the full id.
    /// httpd is PID 1 and ignores SIGTERM, so `docker stop -t N` leaves the
    /// container stopping for N seconds.
    pub fn run_web(&self, name: &str, extra: &[&str]) -> String {
        let script = format!(
            "echo {name} > /www/index.html; exec /bin/busybox httpd -f -p {WEB_PORT} -h /www"
        );
        let mut args = vec!["run", "-d", "--name", name, "--expose", "8000"];
        args.extend_from_slice(extra);
        args.extend([IMAGE, "/bin/busybox", "sh", "-c", &script]);
        self.cli_ok(&args)
    }

    /// A container's IPv4 address on the default bridge.
    pub fn ip(&self, name: &str) -> String {
        self.cli_ok(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.IPAddress}}",
            name,
        ])
    }

    /// SIGTERM to dockerd (by PID) and wait until it has exited.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.stop(Duration::from_secs(30));
        }
    }

    /// Starts a stopped dockerd again with the same state.
    pub fn start_again(&mut self) {
        assert!(
            !self.proc.as_mut().is_some_and(Proc::is_running),
            "dockerd is still running"
        );
        self.spawn();
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.proc.as_mut().is_some_and(Proc::is_running) {
            let ids = self.cli(&["ps", "-aq"]);
            let ids: Vec<&str> = ids.stdout.split_whitespace().collect();
            if !ids.is_empty() {
                let mut argv = vec!["rm", "-f"];
                argv.extend(ids);
                let out = self.cli(&argv);
                if !out.success() {
                    eprintln!("teardown: {}", out.describe());
                }
            }
        }
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(20));
        }
    }
}
