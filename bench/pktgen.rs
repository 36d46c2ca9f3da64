//! The packet generator of `cargo xtask bench dataplane` (its UDP
//! scenario) and the bare forwarder's attacher: frames that no socket
//! sends, so the load balancers, not a sender's syscalls, are the limit.
//!
//! * `send`: one IPv4 UDP template frame (UDP checksum 0), spread over 16
//!   UDP source ports, out of an interface, by one of two paths (`--via`):
//!   * `live-frames`: handed to `meshlb_gen` through BPF_PROG_TEST_RUN in
//!     live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`): the kernel runs
//!     the program on a copy of the frame `repeat` times, in batches, and
//!     each `XDP_TX` transmits the frame out of the interface named by the
//!     context's `ingress_ifindex` (for a veth: into its peer, which must
//!     have NAPI — an XDP program or GRO — to take it). `meshlb_gen` sets
//!     the source port;
//!   * `af-xdp`: an AF_XDP socket in copy mode on the interface's queue 0
//!     ([`xsk`]): the frames sit in a UMEM, the TX ring takes their
//!     descriptors and one `sendto` per batch makes the kernel transmit
//!     them (an skb each, straight to the driver). For kernels that refuse
//!     live frames.
//!
//!   Prints one JSON line: frames and seconds.
//! * `attach-bare`: `meshlb_bare` (parse, FIB lookup, TTL, MACs,
//!   XDP_TX/redirect) attached natively to an interface until this process
//!   is stopped (the link dies with its file descriptor) or its parent
//!   exits.
//!
//! Both enter the namespace given by `--netns` first (the interface index
//! of the test run is resolved in the calling thread's namespace; threads
//! spawned afterwards inherit it). The eBPF object's maps are pinned in a
//! private directory (`/sys/fs/bpf/mlbp-gen-<pid>`) while it loads, and
//! that directory is removed at once. Without a subcommand (as `cargo
//! test --all-targets` runs it) it does nothing.

// Only the AF_XDP module ([`xsk`]) may allow it, saying why.
#![deny(unsafe_code)]

#[path = "pktgen/xsk.rs"]
mod xsk;

#[path = "common/ipv4.rs"]
mod ipv4;

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::programs::{xdp::XdpMode, TestRun, TestRunAttrs, TestRunOptions, Xdp};
use aya::Ebpf;
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Command>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Transmit UDP frames out of an interface for a while.
    Send(SendArgs),
    /// Attach `meshlb_bare` natively to an interface until stopped.
    AttachBare {
        #[arg(long)]
        netns: String,
        #[arg(long)]
        iface: String,
        /// Detach after this long even if nobody stops us.
        #[arg(long, default_value_t = 3600)]
        max_seconds: u64,
    },
}

/// How `send` transmits.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Via {
    /// BPF_PROG_TEST_RUN in live-frames mode (`meshlb_gen`, `XDP_TX`).
    LiveFrames,
    /// An AF_XDP socket in copy mode on queue 0 (one thread).
    AfXdp,
}

#[derive(clap::Args)]
struct SendArgs {
    #[arg(long, value_enum, default_value_t = Via::LiveFrames)]
    via: Via,
    #[arg(long)]
    netns: String,
    /// The interface the frames leave by.
    #[arg(long)]
    iface: String,
    #[arg(long)]
    src_mac: String,
    /// The next hop's MAC (the peer of `--iface`).
    #[arg(long)]
    dst_mac: String,
    #[arg(long)]
    src: SocketAddrV4,
    #[arg(long)]
    dst: SocketAddrV4,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Frames per batch of the live-frames run (the kernel's default: 64).
    #[arg(long, default_value_t = 64)]
    batch: u32,
    /// Frames per BPF_PROG_TEST_RUN call.
    #[arg(long, default_value_t = 1 << 16)]
    repeat: u32,
    /// Sending threads (live frames; AF_XDP sends from one socket, a veth
    /// having one TX queue).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Pin sending thread `i` to CPU `cpu + i`.
    #[arg(long)]
    cpu: Option<usize>,
    /// UDP payload bytes (18: a 60-byte frame, Ethernet's minimum without
    /// the FCS).
    #[arg(long, default_value_t = 18)]
    payload: usize,
}

fn mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s:?}"))?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC {s:?}: not 6 bytes"))
}

/// The template: Ethernet, IPv4 (checksum set, TTL 64, DF), UDP (checksum
/// 0: `meshlb_gen` changes the source port anyway).
fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: usize,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42 + payload);
    f.extend(dst_mac);
    f.extend(src_mac);
    f.extend([0x08, 0x00]);
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + 8 + payload) as u16).to_be_bytes());
    ip.extend([0x12, 0x34, 0x40, 0x00, 64, 17, 0, 0]);
    ip.extend(src.ip().octets());
    ip.extend(dst.ip().octets());
    ipv4::set_header_checksum(&mut ip);
    f.extend(ip);
    f.extend(src.port().to_be_bytes());
    f.extend(dst.port().to_be_bytes());
    f.extend(((8 + payload) as u16).to_be_bytes());
    f.extend([0, 0]);
    f.extend(std::iter::repeat_n(0x5a, payload));
    f
}

/// `struct xdp_md` as BPF_PROG_TEST_RUN takes it: no metadata
/// (`data` = 0), `data_end` = the frame's length, the ingress interface
/// (in live-frames mode, where `XDP_TX` sends), queue 0.
fn xdp_md(len: usize, ifindex: u32) -> Vec<u8> {
    [0, len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v: &u32| v.to_ne_bytes())
        .collect()
}

fn enter_netns(ns: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("network namespace {ns}"))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {ns}"))
}

/// The object with `prog` loaded; its map pins are gone when this returns.
fn load(prog: &str) -> Result<Ebpf> {
    let pins = PathBuf::from(format!("/sys/fs/bpf/mlbp-gen-{}", std::process::id()));
    let r = load_pinned(prog, &pins);
    let _ = meshlb::engine::xdp::cleanup(&pins);
    r
}

fn load_pinned(prog: &str, pins: &Path) -> Result<Ebpf> {
    let _ = meshlb::engine::xdp::cleanup(pins);
    std::fs::create_dir_all(pins)?;
    let mut ebpf = meshlb::engine::xdp::loader()
        .default_map_pin_directory(pins)
        .load(meshlb::EBPF_OBJECT)
        .context("loading the eBPF object")?;
    let p: &mut Xdp = ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog} missing from the object"))?
        .try_into()?;
    p.load()
        .with_context(|| format!("verifier rejects {prog}"))?;
    Ok(ebpf)
}

fn send(a: &SendArgs) -> Result<serde_json::Value> {
    enter_netns(&a.netns)?;
    let ifindex = nix::net::if_::if_nametoindex(a.iface.as_str())
        .with_context(|| format!("no interface {} in {}", a.iface, a.netns))?;
    match a.via {
        Via::LiveFrames => send_live(a, ifindex),
        Via::AfXdp => send_xsk(a, ifindex),
    }
}

/// One AF_XDP socket on queue 0 of `ifindex`, from one thread (pinned to
/// `--cpu` if given).
fn send_xsk(a: &SendArgs, ifindex: u32) -> Result<serde_json::Value> {
    let data = frame(mac(&a.src_mac)?, mac(&a.dst_mac)?, a.src, a.dst, a.payload);
    if let Some(cpu) = a.cpu {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    }
    let mut sock = xsk::Xsk::open(ifindex, 0, &data)
        .with_context(|| format!("AF_XDP socket on {}/{}", a.netns, a.iface))?;
    let deadline = Instant::now() + Duration::from_secs_f64(a.seconds);
    let s = sock.send_until(deadline, Duration::from_millis(500))?;
    Ok(json!({
        "via": "af-xdp",
        "frames": s.completed,
        "submitted": s.submitted,
        "elapsed_s": s.elapsed_s,
        "fps": s.completed as f64 / s.elapsed_s,
        "threads": 1,
        "kicks": s.kicks,
        "kicks_again": s.again,
        "kicks_dropped": s.dropped,
        "frame_len": data.len(),
        "iface": a.iface,
        "ifindex": ifindex,
        "queue": 0,
        "mode": "copy",
    }))
}

/// BPF_PROG_TEST_RUN of `meshlb_gen` in live-frames mode, `--threads`
/// threads.
fn send_live(a: &SendArgs, ifindex: u32) -> Result<serde_json::Value> {
    let ebpf = load(meshlb_common::PROG_XDP_GEN)?;
    let prog: &Xdp = ebpf
        .program(meshlb_common::PROG_XDP_GEN)
        .context("program")?
        .try_into()?;
    let data = frame(mac(&a.src_mac)?, mac(&a.dst_mac)?, a.src, a.dst, a.payload);
    let ctx = xdp_md(data.len(), ifindex);
    let deadline = Duration::from_secs_f64(a.seconds);
    let failed = AtomicBool::new(false);
    let start = Instant::now();
    let per_thread: Vec<Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..a.threads.max(1))
            .map(|i| {
                let (data, ctx, failed) = (&data, &ctx, &failed);
                s.spawn(move || -> Result<u64> {
                    if let Some(cpu) = a.cpu {
                        let mut set = nix::sched::CpuSet::new();
                        set.set(cpu + i)?;
                        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
                    }
                    let mut frames = 0u64;
                    while start.elapsed() < deadline && !failed.load(Ordering::Relaxed) {
                        let r = prog.test_run(TestRunOptions {
                            data_in: Some(data),
                            ctx_in: Some(ctx),
                            repeat: a.repeat,
                            attrs: TestRunAttrs::new().xdp_live_frames(a.batch),
                            ..TestRunOptions::new()
                        });
                        if let Err(e) = r {
                            failed.store(true, Ordering::Relaxed);
                            // The kernel's errno is the source's source.
                            return Err(anyhow::Error::new(e).context(format!(
                                "live-frames BPF_PROG_TEST_RUN of {} out of {}",
                                meshlb_common::PROG_XDP_GEN,
                                a.iface
                            )));
                        }
                        frames += u64::from(a.repeat);
                    }
                    Ok(frames)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("sender panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut frames = 0;
    for r in per_thread {
        frames += r?;
    }
    Ok(json!({
        "via": "live-frames",
        "frames": frames,
        "elapsed_s": elapsed,
        "fps": frames as f64 / elapsed,
        "threads": a.threads.max(1),
        "batch": a.batch,
        "repeat": a.repeat,
        "frame_len": data.len(),
        "iface": a.iface,
        "ifindex": ifindex,
    }))
}

fn attach_bare(ns: &str, iface: &str, max: Duration) -> Result<()> {
    enter_netns(ns)?;
    let mut ebpf = load(meshlb_common::PROG_XDP_BARE)?;
    let prog: &mut Xdp = ebpf
        .program_mut(meshlb_common::PROG_XDP_BARE)
        .context("program")?
        .try_into()?;
    prog.attach(iface, XdpMode::Driver).with_context(|| {
        format!(
            "attaching {} natively to {ns}/{iface}",
            meshlb_common::PROG_XDP_BARE
        )
    })?;
    println!(
        "{}",
        json!({ "attached": meshlb_common::PROG_XDP_BARE, "netns": ns, "iface": iface, "mode": "native" })
    );
    let parent = nix::unistd::getppid();
    let start = Instant::now();
    // Stopped by a signal (its default action: the link goes with the
    // process); a parent gone, or the deadline, ends it too.
    while start.elapsed() < max && nix::unistd::getppid() == parent {
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(ebpf);
    Ok(())
}

fn main() {
    let args = Args::parse();
    let r = match &args.cmd {
        None => {
            println!("pktgen: run by `cargo xtask bench dataplane` (needs root and a subcommand); nothing to do");
            return;
        }
        Some(Command::Send(a)) => send(a).map(|v| println!("{v}")),
        Some(Command::AttachBare {
            netns,
            iface,
            max_seconds,
        }) => attach_bare(netns, iface, Duration::from_secs(*max_seconds)),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
