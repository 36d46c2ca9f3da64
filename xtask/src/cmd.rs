//! Running external commands: echoing, exit-status checks, deadlines, and
//! the Ctrl-C flag that turns a signal into an error so drop guards clean up.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Echo every command, probes included (`-v`, or `CI` set).
static VERBOSE: AtomicBool = AtomicBool::new(false);
/// Set by SIGINT/SIGTERM/SIGHUP; the default action (die at once) is replaced
/// so that netns, nginx and daemon guards get to run.
static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

pub fn install_signal_handlers() -> Result<()> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, flag.clone()).context("installing signal handler")?;
    }
    let _ = INTERRUPTED.set(flag);
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleep that wakes up early (with an error) when interrupted.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// A command line to run, with optional environment, directory and deadline.
#[derive(Clone, Debug)]
pub struct Cmd {
    program: String,
    args: Vec<String>,
    envs: Vec<(String, Option<String>)>,
    dir: Option<PathBuf>,
    timeout: Option<Duration>,
    /// Cleanup commands must finish even after Ctrl-C.
    interruptible: bool,
}

impl Cmd {
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            envs: Vec::new(),
            dir: None,
            timeout: None,
            interruptible: true,
        }
    }

    /// `ip netns exec NS program ...` (fine for tools; not for anything that
    /// needs bpffs, because it remounts /sys).
    pub fn in_netns(ns: &str, program: impl Into<String>) -> Self {
        Self::new("ip").args(["netns", "exec", ns]).arg(program)
    }

    /// `nsenter --net=/run/netns/NS program ...`: keeps the host's /sys, so
    /// pinned BPF objects stay visible.
    pub fn nsenter(ns: &str, program: impl Into<String>) -> Self {
        Self::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(program)
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn args<I, S>(mut self, it: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(it.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.envs.push((k.into(), Some(v.into())));
        self
    }

    pub fn env_remove(mut self, k: impl Into<String>) -> Self {
        self.envs.push((k.into(), None));
        self
    }

    pub fn dir(mut self, d: impl AsRef<Path>) -> Self {
        self.dir = Some(d.as_ref().to_path_buf());
        self
    }

    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// Keep running when interrupted (for cleanup); give it a timeout.
    pub fn cleanup(mut self) -> Self {
        self.interruptible = false;
        self
    }

    /// The same command run by `prefix` (e.g. `ip netns exec NS`).
    pub fn wrap<I, S>(self, prefix: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut pre: Vec<String> = prefix.into_iter().map(Into::into).collect();
        if pre.is_empty() {
            return self;
        }
        let program = pre.remove(0);
        pre.push(self.program);
        pre.extend(self.args);
        Self {
            program,
            args: pre,
            ..self
        }
    }

    /// Program and arguments.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.program.clone())
            .chain(self.args.iter().cloned())
            .collect()
    }

    /// The command as a shell-like line, for echoing and error messages.
    pub fn display(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.envs {
            if let Some(v) = v {
                let _ = write!(s, "{k}={} ", quote(v));
            }
        }
        s.push_str(&quote(&self.program));
        for a in &self.args {
            s.push(' ');
            s.push_str(&quote(a));
        }
        s
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        for (k, v) in &self.envs {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = &self.dir {
            c.current_dir(d);
        }
        c
    }

    fn spawn_err(&self, e: std::io::Error) -> anyhow::Error {
        anyhow::anyhow!("cannot start `{}`: {e}", self.display())
    }

    /// Run with inherited stdio (a visible step); always echoed.
    pub fn run(&self) -> Result<()> {
        println!("$ {}", self.display());
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| self.spawn_err(e))?;
        let status = self.wait(&mut child)?;
        if !status.success() {
            bail!("`{}` failed: {status}", self.display());
        }
        Ok(())
    }

    /// Run, capture output, and fail (with stderr) unless it exits 0.
    pub fn output(&self) -> Result<Output> {
        let out = self.output_unchecked()?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!(
                "`{}` failed: {}{}",
                self.display(),
                out.status,
                if err.trim().is_empty() {
                    String::new()
                } else {
                    format!(": {}", err.trim())
                }
            );
        }
        Ok(out)
    }

    /// Captured stdout of a successful run, as a string.
    pub fn stdout(&self) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.output()?.stdout).into_owned())
    }

    /// Run and capture output whatever the exit status (spawn failure and
    /// deadline are still errors).
    pub fn output_unchecked(&self) -> Result<Output> {
        if verbose() {
            println!("$ {}", self.display());
        }
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.spawn_err(e))?;
        // Readers on threads so a chatty child can't fill a pipe and stall.
        let mut so = child.stdout.take().expect("piped");
        let mut se = child.stderr.take().expect("piped");
        let t_out = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = so.read_to_end(&mut b);
            b
        });
        let t_err = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = se.read_to_end(&mut b);
            b
        });
        let status = self.wait(&mut child)?;
        Ok(Output {
            status,
            stdout: t_out.join().unwrap_or_default(),
            stderr: t_err.join().unwrap_or_default(),
        })
    }

    /// Start a long-running process in its own process group (so a
    /// terminal's Ctrl-C reaches only us, and we stop it in order), with
    /// stdout and stderr appended to `log`.
    pub fn spawn_background(&self, name: &str, log: &Path) -> Result<Background> {
        use std::os::unix::process::CommandExt;
        println!("$ {} > {}", self.display(), log.display());
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .process_group(0)
            .spawn()
            .map_err(|e| self.spawn_err(e))?;
        Ok(Background {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            stopped: false,
        })
    }

    fn wait(&self, child: &mut Child) -> Result<ExitStatus> {
        let deadline = self.timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(st) = child.try_wait()? {
                if self.interruptible && interrupted() {
                    bail!("interrupted while running `{}`", self.display());
                }
                return Ok(st);
            }
            if self.interruptible && interrupted() {
                let _ = child.kill();
                let _ = child.wait();
                bail!("interrupted while running `{}`", self.display());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "`{}` timed out after {:?}",
                    self.display(),
                    self.timeout.unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Send a signal (by name, e.g. `TERM`) to one process we started.
pub fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A process we started and must stop: stopped (TERM, grace, KILL) on drop.
pub struct Background {
    name: String,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Background {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of its log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let v: Vec<&str> = text.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Idempotent.
    pub fn stop(&mut self, grace: Duration) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if self.exited().is_some() {
            return;
        }
        let pid = self.pid();
        println!("stopping {} (pid {pid})", self.name);
        signal(pid, "TERM");
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} (pid {pid}) ignored SIGTERM for {grace:?}; killing",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}
