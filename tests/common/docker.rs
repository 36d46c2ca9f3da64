//! A real dockerd (Debian's docker.io) for the Docker registration tests,
//! one per test, inside the test's LB namespace: its docker0 bridge and
//! its containers live there, next to the meshlb daemon.
//!
//! dockerd is started with `nsenter --net=...` (`ip netns exec` remounts
//! /sys and dockerd then fails on cgroups), with its own data root, exec
//! root, socket and pid file under the test's temp dir, vfs storage and no
//! iptables. There is no registry: the one image, `mlbt-busybox:1`, is made
//! with `docker import` from a tarball holding busybox-static, plus the
//! host's perl (perl-base, with the libraries `ldd` names) for a UDP echo
//! server, since busybox has no UDP server. Containers run `busybox httpd`
//! on :8000 answering their own name ([`Dockerd::run_web`]), and may also
//! run a UDP echo on :5353 answering the same ([`Dockerd::run_web_udp`]).
//! [`Dockerd::start_in_with`] passes extra daemon flags (e.g. IPv6 on the
//! default bridge). The `docker` CLI (whatever is first in PATH) talks to it
//! through `DOCKER_HOST`.
//!
//! Dropping a [`Dockerd`] removes every container (SIGKILL) and stops
//! dockerd by PID (SIGKILL after a grace period).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{run_cmd, run_cmd_env, wait_for, CmdOutput, Proc};

const DOCKERD: &str = "/usr/sbin/dockerd";
const BUSYBOX: &str = "/bin/busybox";
/// The UDP echo's interpreter (perl-base: Essential in Debian).
const PERL: &str = "/usr/bin/perl";
/// The image every test container runs.
pub const IMAGE: &str = "mlbt-busybox:1";
/// Where the containers' HTTP responder listens.
pub const WEB_PORT: u16 = 8000;
/// Where [`Dockerd::run_web_udp`]'s UDP echo listens (v4 and v6).
pub const UDP_ECHO_PORT: u16 = 5353;
/// The UDP echo, perl with builtins only (no module files in the image):
/// one dual-stack socket on [::]:PORT (plain IPv4 when the container has no
/// IPv6), each datagram answered with `NAME\n` to its sender.
const UDP_ECHO_PL: &str = r#"my ($name, $port) = @ARGV;
my $ok = socket(S, 10, 2, 17) && bind(S, pack("S n N x16 N", 10, $port, 0, 0));
unless ($ok) {
    close S;
    socket(S, 2, 2, 17) or die "socket: $!";
    bind(S, pack("S n x12", 2, $port)) or die "bind udp $port: $!";
}
$| = 1;
print "udp echo $name on $port\n";
while (defined(my $from = recv(S, my $buf, 2048, 0))) {
    send(S, "$name\n", 0, $from) or warn "send: $!";
}
die "recv: $!";
"#;
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// dockerd with vfs starts in a few seconds; on a loaded 2-core machine
/// with parallel tests it may take longer.
const STARTUP: Duration = Duration::from_secs(60);

/// Fails loudly when dockerd, the docker CLI, busybox-static or perl is
/// missing.
pub fn require_docker() {
    for (tool, pkg) in [
        (DOCKERD, "docker.io"),
        ("/usr/bin/containerd", "containerd (docker.io)"),
        ("/usr/sbin/runc", "runc (docker.io)"),
        (BUSYBOX, "busybox-static"),
        (PERL, "perl-base"),
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
    /// Extra dockerd flags, kept for restarts.
    extra: Vec<String>,
    proc: Option<Proc>,
    starts: usize,
}

impl Dockerd {
    /// Starts dockerd in `ns` with its state under `dir` (created), waits
    /// until it answers and imports [`IMAGE`].
    pub fn start_in(ns: &str, dir: &Path) -> Dockerd {
        Self::start_in_with(ns, dir, &[])
    }

    /// [`Dockerd::start_in`] with extra dockerd flags (kept for
    /// [`Dockerd::start_again`]), e.g. `--ipv6 --fixed-cidr-v6=...`.
    pub fn start_in_with(ns: &str, dir: &Path, extra: &[&str]) -> Dockerd {
        require_docker();
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let socket = dir.join("docker.sock");
        let mut d = Dockerd {
            ns: ns.to_owned(),
            dir: dir.to_owned(),
            host: format!("unix://{}", socket.display()),
            socket,
            extra: extra.iter().map(std::string::ToString::to_string).collect(),
            proc: None,
            starts: 0,
        };
        d.spawn();
        d.import_image();
        d
    }

    fn spawn(&mut self) {
        let p = |s: &str| self.dir.join(s).display().to_string();
        let mut argv: Vec<String> = vec![
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
        argv.extend(self.extra.iter().cloned());
        let log = self.dir.join(format!("dockerd-{}.log", self.starts));
        self.starts += 1;
        self.proc = Some(Proc::spawn("dockerd", &argv, &[], log));
        let r = wait_for(STARTUP, "dockerd to answer", || {
            if let Some(st) = self.proc.as_mut().and_then(super::Proc::exit_status) {
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
        self.cli_timeout(args, CMD_TIMEOUT)
    }

    /// `docker ARGS` with a deadline of `timeout` (e.g. a long `exec`).
    /// Never panics.
    pub fn cli_timeout(&self, args: &[&str], timeout: Duration) -> CmdOutput {
        let mut argv = vec!["docker"];
        argv.extend_from_slice(args);
        run_cmd_env(&argv, &[("DOCKER_HOST", &self.host)], timeout)
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
        // perl and the shared objects it loads, at the paths ldd names.
        fs::copy(PERL, root.join("bin/perl")).expect("copy perl");
        let ldd = run_cmd(&["ldd", PERL], CMD_TIMEOUT);
        assert!(ldd.success(), "ldd {PERL}: {}", ldd.describe());
        let libs: Vec<&str> = ldd
            .stdout
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
            .collect();
        assert!(
            libs.iter().any(|l| l.contains("libc.so")),
            "ldd {PERL} names no libc: {}",
            ldd.describe()
        );
        for lib in libs {
            let dst = root.join(lib.trim_start_matches('/'));
            fs::create_dir_all(dst.parent().expect("a library path has a parent"))
                .expect("mkdir image lib dir");
            // fs::copy follows symlinks: the image gets the files themselves.
            fs::copy(lib, &dst).unwrap_or_else(|e| panic!("copy {lib}: {e}"));
        }
        fs::write(root.join("udp-echo.pl"), UDP_ECHO_PL).expect("write udp-echo.pl");
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
        let mut args = vec!["--expose", "8000"];
        args.extend_from_slice(extra);
        self.run_web_unexposed(name, &args)
    }

    /// [`Dockerd::run_web`] without `--expose` (the image has no `EXPOSE`):
    /// the container exposes nothing.
    pub fn run_web_unexposed(&self, name: &str, extra: &[&str]) -> String {
        let script = format!(
            "echo {name} > /www/index.html; exec /bin/busybox httpd -f -p {WEB_PORT} -h /www"
        );
        let mut args = vec!["run", "-d", "--name", name];
        args.extend_from_slice(extra);
        args.extend([IMAGE, "/bin/busybox", "sh", "-c", &script]);
        self.cli_ok(&args)
    }

    /// [`Dockerd::run_web`] plus a UDP echo on :5353 (v4 and v6) answering
    /// `NAME` to every datagram; `--expose 5353/udp` too. Returns the full id.
    pub fn run_web_udp(&self, name: &str, extra: &[&str]) -> String {
        let script = format!(
            "echo {name} > /www/index.html; /bin/perl /udp-echo.pl {name} {UDP_ECHO_PORT} & \
             exec /bin/busybox httpd -f -p {WEB_PORT} -h /www"
        );
        let udp = format!("{UDP_ECHO_PORT}/udp");
        let mut args = vec![
            "run", "-d", "--name", name, "--expose", "8000", "--expose", &udp,
        ];
        args.extend_from_slice(extra);
        args.extend([IMAGE, "/bin/busybox", "sh", "-c", &script]);
        self.cli_ok(&args)
    }

    /// A container's global IPv6 address on the default bridge (empty when
    /// dockerd runs without IPv6).
    pub fn ip6(&self, name: &str) -> String {
        self.cli_ok(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.GlobalIPv6Address}}{{end}}",
            name,
        ])
    }

    /// The PID of a running container's first process (its network
    /// namespace is `/proc/PID/ns/net`).
    pub fn pid(&self, name: &str) -> i32 {
        let out = self.cli_ok(&["inspect", "--format", "{{.State.Pid}}", name]);
        let pid: i32 = out
            .parse()
            .unwrap_or_else(|e| panic!("docker inspect {name}: pid {out:?}: {e}"));
        assert!(pid > 0, "container {name} is not running (pid {pid})");
        pid
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
