//! The `meshlb` binary: parses the command line and calls the library.
//! Exit status: 0 ok, 1 runtime error, 2 usage/validation error.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;
use meshlb::cli::admin::{self, AdminError};
use meshlb::cli::manual;
use meshlb::cli::{AdminCommand, Cli, Command, EtcdArgs, ProtoArg};
use meshlb::daemon::{self, DaemonError};
use meshlb::engine::{
    self,
    xdp::{inspect, socklb},
};
use meshlb::kernel::pinned;
use meshlb::model::Proto;

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("meshlb: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            // One line, like every other error: clap's first line names the
            // argument and the bad value; drop its usage/help trailer.
            _ => {
                let text = e.to_string();
                let line = text
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("invalid arguments");
                return fail(2, line.trim_start_matches("error: "));
            }
        },
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    match cli.command {
        Command::Run(args) => {
            meshlb::kernel::heap::one_arena();
            let (settings, cfg) = match meshlb::cli::settle::settle(&args) {
                Ok(v) => v,
                Err(e) => return fail(2, e),
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                // The daemon loop applies plans synchronously; the node lease,
                // the etcd watch and /metrics must keep running meanwhile.
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(1, format!("tokio runtime: {e}")),
            };
            match rt.block_on(daemon::run(settings, cfg, std::future::pending())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ DaemonError::Usage(_)) => fail(2, e),
                Err(e) => fail(1, e),
            }
        }
        Command::Status(args) => {
            let status = match pinned::Maps::from_pins(&args.bpffs.bpffs) {
                Ok(maps) => inspect::status(&maps, args.node.as_deref())
                    .map(|mut s| {
                        s.interfaces = inspect::interfaces(&args.bpffs.bpffs);
                        s.socket_lb = socklb::status(&args.bpffs.bpffs, &maps);
                        s.sync_latency = inspect::sync_latency(&args.bpffs.bpffs);
                        s.vips = inspect::vips(&args.bpffs.bpffs);
                        s
                    })
                    .map_err(|e| e.to_string()),
                // No XDP pins: the node may run IPVS.
                Err(e) => match ipvs_status(args.node.as_deref()) {
                    Ok(Some(mut s)) => {
                        s.sync_latency = inspect::sync_latency(&args.bpffs.bpffs);
                        s.vips = inspect::vips(&args.bpffs.bpffs);
                        Ok(s)
                    }
                    Ok(None) => Err(e.to_string()),
                    Err(ipvs) => Err(format!("{e}; {ipvs}")),
                },
            };
            match status {
                Ok(s) if args.json => {
                    println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(s) => {
                    print!("{}", meshlb::model::status::status_table(&s));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, e),
            }
        }
        Command::Explain(args) => {
            if args.socket.is_none() && args.src.is_ipv4() != args.dst.is_ipv4() {
                return fail(2, "explain: SRC and DST must be of the same address family");
            }
            let maps = match pinned::Maps::from_pins(&args.bpffs.bpffs) {
                Ok(m) => m,
                Err(e) => return fail(1, e),
            };
            let proto = match args.proto {
                ProtoArg::Tcp => Proto::Tcp,
                ProtoArg::Udp => Proto::Udp,
            };
            let e = match args.socket {
                Some(cookie) => inspect::explain_socket(&maps, proto, cookie, args.dst),
                None => inspect::explain(&maps, proto, args.src, args.dst),
            };
            if args.json {
                println!("{}", serde_json::to_string(&e).unwrap_or_default());
            } else {
                println!("{}", e.line());
            }
            ExitCode::SUCCESS
        }
        Command::Cleanup(args) => {
            match engine::xdp::cleanup(&args.bpffs) {
                Ok(n) => eprintln!(
                    "meshlb: removed {n} pinned objects under {}",
                    args.bpffs.display()
                ),
                Err(e) => return fail(1, e),
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(1, format!("tokio runtime: {e}")),
            };
            let state = std::path::Path::new(engine::ipvs::STATE_DIR);
            match rt.block_on(engine::ipvs::cleanup(state, engine::ipvs::VIP_DEVICE)) {
                Ok(None) => ExitCode::SUCCESS,
                Ok(Some(c)) => {
                    eprintln!(
                        "meshlb: removed {} IPVS services{}{}",
                        c.services,
                        if c.snat_table {
                            ", the nf_tables table inet meshlb"
                        } else {
                            ""
                        },
                        if c.vip_device {
                            ", the device meshlb0"
                        } else {
                            ""
                        },
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(1, format!("cleanup ipvs: {e}")),
            }
        }
        Command::XdpPass(args) => match engine::xdp::attach_pass(&args.bpffs.bpffs, &args.ifaces) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(1, e),
        },
        Command::Service(args) => run_admin(AdminCommand::Service(args.command), &args.etcd),
        Command::Task(args) => run_admin(AdminCommand::Task(args.command), &args.etcd),
        Command::Completions(args) => {
            manual::completions(args.shell, &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Manpages(args) => match manual::manpages(&args.dir) {
            Ok(pages) => {
                for p in pages {
                    println!("{}", p.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(1, format!("manpages {}: {e}", args.dir.display())),
        },
    }
}

/// `meshlb status` of a node in IPVS mode (`None`: no IPVS daemon here).
fn ipvs_status(node: Option<&str>) -> Result<Option<meshlb::model::status::Status>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let dir = std::path::Path::new(engine::ipvs::STATE_DIR);
    rt.block_on(engine::ipvs::status_from_state(dir, node))
        .map_err(|e| e.to_string())
}

/// A client command (`service`, `task`) on a current-thread runtime.
fn run_admin(cmd: AdminCommand, etcd: &EtcdArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("tokio runtime: {e}")),
    };
    match rt.block_on(admin::run(&cmd, etcd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ AdminError::Usage(_)) => fail(2, e),
        Err(e) => fail(1, e),
    }
}
