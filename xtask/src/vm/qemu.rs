//! One QEMU (TCG) guest: its command line, the run under a host-side
//! deadline (QEMU killed by PID when it passes), and the result line parsed
//! from its console.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cmd::{self, Background, Cmd};
use crate::compile::Target;

use super::tree::Tree;

/// The line a guest prints last: `MESHLB-VM-RESULT <scenario> PASS|FAIL <detail>`.
pub const RESULT_TAG: &str = "MESHLB-VM-RESULT ";

/// A NIC on a virtual L2 segment: a QEMU socket netdev on a multicast
/// group (QEMU must run in a namespace whose loopback routes 224.0.0.0/4).
#[derive(Clone, Debug)]
pub struct Nic {
    pub mcast: String,
    pub mac: String,
}

/// What to boot.
pub struct Guest<'a> {
    pub arch: Target,
    pub tree: &'a Tree,
    /// Shared read-only as 9p tag `host`: `meshlb` and `vm/`.
    pub share: &'a Path,
    pub scenario: &'a str,
    /// `vm/scenarios/<script>.sh`, or `shell`.
    pub script: &'a str,
    pub node: String,
    pub args: &'a [&'a str],
    pub mem_mb: u32,
    /// Virtual CPUs (the scenarios: 1; the benchmark: 2).
    pub smp: u32,
    pub nics: Vec<Nic>,
    /// A writable share (9p tag `out`) for what the guest reports in files
    /// (`cargo xtask bench vm`); the guest mounts it itself.
    pub out: Option<&'a Path>,
    /// Host-side limit; the guest gets a little less for its own.
    pub deadline: Duration,
}

/// How a guest ended.
#[derive(Debug)]
pub struct Outcome {
    pub pass: bool,
    /// The result line's detail, or why there was none.
    pub detail: String,
    pub console: PathBuf,
    pub took: Duration,
}

impl Guest<'_> {
    fn console_dev(&self) -> &'static str {
        match self.arch {
            Target::X86_64 => "ttyS0",
            Target::Aarch64 | Target::Armv7 => "ttyAMA0",
        }
    }

    /// The guest side's deadline: 20 s under the host's, so a hung scenario
    /// still prints its diagnostics and result line.
    fn guest_deadline(&self) -> u64 {
        self.deadline.as_secs().saturating_sub(20).max(10)
    }

    /// The QEMU command line; `serial` is `-serial`'s chardev
    /// (`file:PATH` for tests, `mon:stdio` for a shell).
    pub fn command(&self, serial: &str) -> Cmd {
        let (program, machine): (&str, &[&str]) = match self.arch {
            Target::X86_64 => ("qemu-system-x86_64", &["-M", "pc", "-cpu", "max"]),
            Target::Aarch64 => ("qemu-system-aarch64", &["-M", "virt", "-cpu", "cortex-a72"]),
            Target::Armv7 => (
                "qemu-system-arm",
                &["-M", "virt,highmem=off", "-cpu", "cortex-a15"],
            ),
        };
        // 32-bit ARM: the default vmalloc area (240 MB) cannot hold
        // meshlb's BPF maps.
        let vmalloc = match self.arch {
            Target::Armv7 => " vmalloc=768M",
            _ => "",
        };
        let append = format!(
            "console={}{vmalloc} panic=-1 quiet loglevel=4 meshlb.scenario={} meshlb.script={} \
             meshlb.node={} meshlb.deadline={} meshlb.args={}",
            self.console_dev(),
            self.scenario,
            self.script,
            self.node,
            self.guest_deadline(),
            self.args.join(","),
        );
        let virtfs = |path: &Path, tag: &str| {
            format!(
                "local,path={},mount_tag={tag},security_model=none,readonly=on,multidevs=remap",
                path.display()
            )
        };
        let mut c = Cmd::new(program)
            .args(["-accel", "tcg", "-nodefaults", "-no-user-config"])
            .args(machine.iter().copied())
            .args([
                "-smp",
                &self.smp.to_string(),
                "-m",
                &self.mem_mb.to_string(),
            ])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .args(["-serial", serial])
            .arg("-kernel")
            .arg(self.tree.kernel.to_string_lossy())
            .arg("-initrd")
            .arg(self.tree.initrd.to_string_lossy())
            .args(["-append", &append])
            .args(["-virtfs", &virtfs(&self.tree.root, "root")])
            .args(["-virtfs", &virtfs(self.share, "host")]);
        if let Some(out) = self.out {
            c = c.arg("-virtfs").arg(format!(
                "local,path={},mount_tag=out,security_model=none",
                out.display()
            ));
        }
        for (i, n) in self.nics.iter().enumerate() {
            c = c
                .arg("-netdev")
                .arg(format!(
                    "socket,id=n{i},mcast={},localaddr=127.0.0.1",
                    n.mcast
                ))
                .arg("-device")
                .arg(format!("virtio-net-pci,netdev=n{i},mac={}", n.mac));
        }
        c
    }
}

/// A booted guest, its console going to a file.
pub struct Running {
    name: String,
    proc: Background,
    console: PathBuf,
    started: Instant,
    deadline: Duration,
}

impl Running {
    /// Boot `g`; `prefix` wraps QEMU (e.g. `ip netns exec NS`). Console and
    /// QEMU's own output go to `<logdir>/<name>.console` / `.qemu`.
    pub fn start(g: &Guest, name: &str, logdir: &Path, netns: Option<&str>) -> Result<Self> {
        let console = logdir.join(format!("{name}.console"));
        let _ = std::fs::remove_file(&console);
        let qemu_log = logdir.join(format!("{name}.qemu"));
        let _ = std::fs::remove_file(&qemu_log);
        let mut c = g.command(&format!("file:{}", console.display()));
        if let Some(ns) = netns {
            c = c.wrap(["ip", "netns", "exec", ns]);
        }
        let proc = c.spawn_background(&format!("qemu {name}"), &qemu_log)?;
        Ok(Self {
            name: name.to_string(),
            proc,
            console,
            started: Instant::now(),
            deadline: g.deadline,
        })
    }

    /// The result line, if the guest has printed it.
    fn result(&self) -> Option<(bool, String)> {
        let text = std::fs::read(&self.console).ok()?;
        parse_result(&String::from_utf8_lossy(&text))
    }

    /// Exited, printed its result, or past its deadline: `wait` returns
    /// promptly.
    pub fn finished(&mut self) -> bool {
        !self.alive() || self.result().is_some() || self.started.elapsed() >= self.deadline
    }

    /// Whether QEMU is still running.
    pub fn alive(&mut self) -> bool {
        self.proc.exited().is_none()
    }

    /// Wait for QEMU to exit (guests power off after their result line) or
    /// for the deadline, then kill it by PID; the outcome from the console.
    pub fn wait(mut self) -> Result<Outcome> {
        let end = self.started + self.deadline;
        let mut late = None;
        while self.alive() {
            cmd::check_interrupted()?;
            if Instant::now() >= end {
                late = Some(self.proc.pid());
                break;
            }
            // A printed result with QEMU still up: power-off is under way;
            // give it a moment, then stop it ourselves.
            if self.result().is_some() && late.is_none() {
                let t = Instant::now();
                while self.alive() && t.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.proc.stop(Duration::from_secs(2));
        let took = self.started.elapsed();
        let (pass, detail) = match (self.result(), late) {
            (Some(r), _) => r,
            (None, Some(pid)) => (
                false,
                format!(
                    "no result within the host deadline of {:?}: qemu (pid {pid}) killed",
                    self.deadline
                ),
            ),
            (None, None) => (
                false,
                format!(
                    "qemu exited without a result line; its log: {}",
                    self.proc.log_tail(5).replace('\n', " | ")
                ),
            ),
        };
        Ok(Outcome {
            pass,
            detail,
            console: self.console,
            took,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stop it now (another guest of the scenario failed).
    pub fn kill(mut self) {
        self.proc.stop(Duration::from_secs(2));
    }
}

/// `(pass, detail)` from the last result line of a console log.
pub fn parse_result(console: &str) -> Option<(bool, String)> {
    let line = console
        .lines()
        .map(|l| l.trim_matches(|c: char| c == '\r' || c.is_whitespace()))
        .filter_map(|l| l.find(RESULT_TAG).map(|i| &l[i + RESULT_TAG.len()..]))
        .next_back()?;
    let mut w = line.splitn(3, ' ');
    let _scenario = w.next()?;
    let verdict = w.next()?;
    let detail = w.next().unwrap_or("").to_string();
    match verdict {
        "PASS" => Some((true, detail)),
        "FAIL" => Some((false, detail)),
        _ => None,
    }
}

/// The last `n` lines of a console log, without carriage returns.
pub fn console_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// Interactive: QEMU on this terminal (`Ctrl-A x` quits); no deadline.
pub fn interactive(g: &Guest) -> Result<()> {
    let c = g.command("mon:stdio");
    println!("$ {}", c.display());
    println!("(Ctrl-A x quits QEMU; exiting the guest shell powers it off)");
    let argv = c.argv();
    let st = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .status()
        .context("starting qemu")?;
    anyhow::ensure!(st.success(), "qemu: {st}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines() {
        let cases: &[(&str, Option<(bool, &str)>)] = &[
            ("boot\r\nMESHLB-VM-RESULT x PASS all good (guest 1.0s)\r\n[ 3.1] reboot: Power down\r\n",
             Some((true, "all good (guest 1.0s)"))),
            ("MESHLB-VM-RESULT stage1 FAIL mount 9p root\n", Some((false, "mount 9p root"))),
            // kernel noise before the tag on the same line; the last line wins
            ("MESHLB-VM-RESULT a FAIL early\n[ 1.0] xMESHLB-VM-RESULT a PASS late\n", Some((true, "late"))),
            ("MESHLB-VM-RESULT a MAYBE x\n", None),
            ("no result at all\n", None),
        ];
        for (console, want) in cases {
            let got = parse_result(console);
            assert_eq!(
                got.as_ref().map(|(p, d)| (*p, d.as_str())),
                *want,
                "{console:?}"
            );
        }
    }
}
