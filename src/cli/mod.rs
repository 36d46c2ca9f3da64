//! The command line (SPEC.md "One binary"), as clap types. `main` parses
//! it and calls the library; nothing here does IO.

pub mod admin;
pub mod manual;
pub mod settle;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::model::config::{HealthKind, Scheduler};
use crate::model::Proto;
use crate::source::config::{self, AffinityDef, HealthDef, PublishDef};

use crate::source::config::DEFAULT_BPFFS;

#[derive(Debug, Parser)]
#[command(
    name = "meshlb",
    version,
    about = "Kernel-offloaded service load balancer for container clusters"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The node daemon: programs this node's data plane and keeps it in sync.
    Run(RunArgs),
    /// This node's programmed state: services, backends, counters.
    Status(StatusArgs),
    /// Which backend this node's data plane picks for a flow, and why.
    Explain(ExplainArgs),
    /// Remove the data plane's state on purpose (forwarding stops): the
    /// pinned XDP maps and links, and after IPVS mode the IPVS services
    /// meshlb created, its nf_tables table and the device meshlb0.
    Cleanup(BpffsArg),
    /// Attach a pass-everything XDP program in native mode (for veth peers:
    /// native XDP redirect only delivers into a veth whose peer runs XDP).
    XdpPass(XdpPassArgs),
    /// Manage services in etcd.
    Service(ServiceArgs),
    /// Manage tasks (backends) in etcd.
    Task(TaskArgs),
    /// Print a shell completion script to stdout.
    Completions(CompletionsArgs),
    /// Write the man pages (meshlb.1, meshlb-SUBCOMMAND.1) into a directory.
    Manpages(ManpagesArgs),
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell the script is for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManpagesArgs {
    /// Directory the pages are written into (created if missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct BpffsArg {
    /// Directory on a bpffs holding the pinned maps and links.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Config file (TOML). `run` needs it or --etcd (or both).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Node name (default: from the config, else the hostname).
    #[arg(long)]
    pub node: Option<String>,
    /// This node's address for SNAT and its etcd record (default: the
    /// primary address of the default-route interface). Must be one of
    /// this node's addresses.
    #[arg(long, value_name = "IP")]
    pub advertise_addr: Option<String>,
    /// Interface that receives service traffic (repeatable).
    #[arg(long = "iface", value_name = "IF")]
    pub ifaces: Vec<String>,
    /// Interface where local tasks live (repeatable): served by the TC
    /// program (partial checksums of local senders, hairpin calls)
    /// instead of XDP. Bridges given with --iface are task interfaces
    /// without being named here.
    #[arg(long = "task-iface", value_name = "IF")]
    pub task_ifaces: Vec<String>,
    /// Answer ARP/NDP for the announced VIPs this node owns on this
    /// interface (repeatable; `announce_interfaces`; default: the uplink
    /// holding the node address).
    #[arg(long = "announce-iface", value_name = "IF")]
    pub announce_ifaces: Vec<String>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Forwarding engine.
    #[arg(long, value_enum)]
    pub dataplane: Option<DataplaneArg>,
    /// How the XDP program is attached.
    #[arg(long, value_enum)]
    pub xdp_mode: Option<XdpModeArg>,
    /// Register this node's opted-in Docker containers as tasks in etcd
    /// (labels meshlb.service/port/weight or registrator's SERVICE_NAME);
    /// needs --etcd.
    #[arg(long, value_name = "SOCKET", num_args = 0..=1, default_missing_value = "/var/run/docker.sock")]
    pub docker: Option<String>,
    /// Prometheus metrics listen address, or "none".
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Seconds a draining backend (weight 0 or a draining task) keeps its
    /// established flows before it is removed and they are ended, for
    /// services without their own drain_timeout (default: never removed).
    #[arg(long, value_name = "SECS")]
    pub drain_timeout: Option<i64>,
    /// Directory on a bpffs for the pinned maps and links.
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
    /// Serve the DNS view of services and tasks on this address (UDP and
    /// TCP; repeatable; `[dns] listen`).
    #[arg(long = "dns", value_name = "ADDR:PORT")]
    pub dns: Vec<String>,
    /// Balance this node's own processes and containers at the socket
    /// (cgroup v2 hooks; `[socket_lb] enabled`, default true).
    #[arg(long, value_name = "BOOL")]
    pub socket_lb: Option<bool>,
}

/// How to reach etcd (daemon and client commands alike). Global, so the
/// client commands take them before or after their subcommand.
#[derive(Debug, Clone, Default, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated. Client commands default to
    /// http://127.0.0.1:2379; `run` without it uses static config only.
    #[arg(long, value_name = "URL,...", env = "MESHLB_ETCD", global = true)]
    pub etcd: Option<String>,
    /// Key prefix of meshlb's records.
    #[arg(long, value_name = "PREFIX", global = true)]
    pub prefix: Option<String>,
    /// CA certificate (PEM) that signed the etcd servers' certificates.
    #[arg(long, value_name = "FILE", global = true)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd client-cert auth.
    #[arg(long, value_name = "FILE", global = true)]
    pub etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd client-cert auth.
    #[arg(long, value_name = "FILE", global = true)]
    pub etcd_key: Option<PathBuf>,
    /// etcd user name (password from --etcd-password-file).
    #[arg(long, value_name = "NAME", global = true)]
    pub etcd_user: Option<String>,
    /// File holding the etcd password.
    #[arg(long, value_name = "FILE", global = true)]
    pub etcd_password_file: Option<PathBuf>,
    /// Allow --etcd-user over http:// endpoints (the password then
    /// crosses the network in clear); refused without it.
    #[arg(long, global = true)]
    pub etcd_insecure: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DataplaneArg {
    Auto,
    Xdp,
    Ipvs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum XdpModeArg {
    Auto,
    Native,
    Generic,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub bpffs: BpffsArg,
    /// Node name to report (default: the one the daemon recorded).
    #[arg(long)]
    pub node: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    pub proto: ProtoArg,
    /// Client address and port, e.g. 10.0.0.2:40000 or [fd00::2]:40000.
    pub src: SocketAddr,
    /// Destination (VIP or node address) and port.
    pub dst: SocketAddr,
    /// Explain a node-local socket instead (the socket-level balancer):
    /// its cookie, decimal or 0x-hex (`ss -e` prints it as `sk:<hex>`).
    /// SRC is then ignored.
    #[arg(long, value_name = "COOKIE", value_parser = parse_cookie)]
    pub socket: Option<u64>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub bpffs: BpffsArg,
}

/// A socket cookie: decimal, or hexadecimal with `0x`.
fn parse_cookie(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("socket cookie {s:?}: {e}"))
}

#[derive(Debug, Args)]
pub struct XdpPassArgs {
    /// Interface to attach to (repeatable).
    #[arg(long = "iface", value_name = "IF", required = true)]
    pub ifaces: Vec<String>,
    #[command(flatten)]
    pub bpffs: BpffsArg,
}

// ---------------------------------------------------------------------
// Client commands: services and tasks in etcd
// ---------------------------------------------------------------------

#[derive(Debug, Args)]
pub struct ServiceArgs {
    #[command(subcommand)]
    pub command: ServiceCommand,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ServiceCommand {
    /// Define a service.
    Create(ServiceSpecArgs),
    /// Change a service: the flags given replace those fields (--publish
    /// replaces the whole list; `none` clears --vip, --affinity, --health).
    Update(ServiceSpecArgs),
    /// Remove a service and its tasks.
    #[command(alias = "remove")]
    Rm(NameArg),
    /// List services: name, VIP, ports, tasks running/total.
    #[command(alias = "list")]
    Ls,
    /// Print a service and its tasks as JSON.
    Inspect(NameArg),
}

#[derive(Debug, Clone, Args)]
pub struct NameArg {
    /// Service name.
    pub name: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServiceSpecArgs {
    /// Service name (a-z, 0-9, _ . -; at most 60 characters).
    pub name: String,
    /// Published port: clients connect to PORT, tasks listen on TARGET
    /// (default: PORT). Repeatable. Also PORT:TARGET/udp.
    #[arg(long, short = 'p', value_name = "[tcp|udp:]PORT[:TARGET]", value_parser = parse_publish)]
    pub publish: Vec<PublishDef>,
    /// Virtual IP of the service (`none`: no VIP, node ports only).
    #[arg(long, value_name = "IP")]
    pub vip: Option<String>,
    /// How a backend is picked for a new flow.
    #[arg(long, value_name = "maglev|rr|wrr|lc|sh", value_parser = parse_scheduler)]
    pub scheduler: Option<Scheduler>,
    /// Client-IP affinity, with its timeout in seconds (`none`: off).
    #[arg(long, value_name = "client-ip[:SECS]", value_parser = parse_affinity)]
    pub affinity: Option<Clear<AffinityDef>>,
    /// Health check of the tasks (`none`: off).
    #[arg(long, value_name = "tcp|http:PATH", value_parser = parse_health)]
    pub health: Option<Clear<HealthDef>>,
    /// Seconds a drained task keeps its established flows.
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    pub drain_timeout: Option<i64>,
    /// One node at a time owns the VIP on its segment and answers ARP/NDP
    /// for it (`--announce=false`: off again). Needs `--vip`.
    #[arg(long, value_name = "true|false", num_args = 0..=1, default_missing_value = "true")]
    pub announce: Option<bool>,
}

/// A flag value that may also be `none`, which clears the field on update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clear<T>(pub Option<T>);

#[derive(Debug, Args)]
pub struct TaskArgs {
    #[command(subcommand)]
    pub command: TaskCommand,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum TaskCommand {
    /// Register a task by hand; prints its id.
    Add(TaskAddArgs),
    /// Remove a task.
    #[command(alias = "remove")]
    Rm(TaskIdArgs),
    /// List tasks, one per line: ID SERVICE ADDR[:PORT] WEIGHT STATE NODE.
    #[command(alias = "list")]
    Ls(TaskLsArgs),
    /// Stop sending new flows to a task (established ones continue).
    Drain(TaskIdArgs),
}

#[derive(Debug, Clone, Args)]
pub struct TaskAddArgs {
    /// Service name.
    pub service: String,
    /// Task address, with its port when it differs from the publish
    /// targets: 10.0.1.2, 10.0.1.2:8000, [fd00::2]:8000.
    #[arg(value_name = "ADDR[:PORT]")]
    pub addr: String,
    /// Weight, 0..=10000 (0 drains).
    #[arg(long, value_name = "W", allow_negative_numbers = true)]
    pub weight: Option<i64>,
    /// Node the task runs on.
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Bind the task to a lease of this many seconds: it disappears when
    /// the lease expires.
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    pub ttl: Option<i64>,
    /// Task id (default: a random 12-hex-digit id).
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct TaskIdArgs {
    /// Service name.
    pub service: String,
    /// Task id (from `task ls`).
    pub task_id: String,
}

#[derive(Debug, Clone, Args)]
pub struct TaskLsArgs {
    /// Only this service's tasks.
    pub service: Option<String>,
}

/// What `admin::run` executes.
#[derive(Debug, Clone)]
pub enum AdminCommand {
    Service(ServiceCommand),
    Task(TaskCommand),
}

fn number(what: &str, s: &str) -> Result<i64, String> {
    s.parse()
        .map_err(|_| format!("{what}: expected a number, got {s:?}"))
}

/// `[tcp|udp:]PORT[:TARGET]` or `PORT[:TARGET][/tcp|/udp]`.
pub fn parse_publish(s: &str) -> Result<PublishDef, String> {
    let (proto, rest) = if let Some(r) = s.strip_prefix("tcp:") {
        (Some(Proto::Tcp), r)
    } else if let Some(r) = s.strip_prefix("udp:") {
        (Some(Proto::Udp), r)
    } else if let Some(r) = s.strip_suffix("/tcp") {
        (Some(Proto::Tcp), r)
    } else if let Some(r) = s.strip_suffix("/udp") {
        (Some(Proto::Udp), r)
    } else {
        (None, s)
    };
    let (port, target) = match rest.split_once(':') {
        Some((p, t)) => (p, Some(t)),
        None => (rest, None),
    };
    let port = config::port("port", number("port", port)?).map_err(|e| e.to_string())?;
    let target = target
        .map(|t| config::port("target", number("target", t)?).map_err(|e| e.to_string()))
        .transpose()?;
    Ok(PublishDef {
        proto,
        port: port.into(),
        target: target.map(i64::from),
    })
}

pub fn parse_scheduler(s: &str) -> Result<Scheduler, String> {
    s.parse()
}

/// `client-ip[:SECS]` or `none`.
pub fn parse_affinity(s: &str) -> Result<Clear<AffinityDef>, String> {
    if s == "none" {
        return Ok(Clear(None));
    }
    let (kind, secs) = match s.split_once(':') {
        Some((k, t)) => (k, Some(t)),
        None => (s, None),
    };
    if kind != "client-ip" {
        return Err(format!("expected client-ip[:SECS] or none, got {s:?}"));
    }
    // The range is checked with the rest of the service (`ServiceDef::validate`).
    let timeout = secs.map(|t| number("timeout", t)).transpose()?;
    Ok(Clear(Some(AffinityDef {
        client_ip: true,
        timeout,
    })))
}

/// `tcp`, `http:PATH` (or `http`, path `/`) or `none`.
pub fn parse_health(s: &str) -> Result<Clear<HealthDef>, String> {
    let (kind, path) = match s {
        "none" => return Ok(Clear(None)),
        "tcp" => (HealthKind::Tcp, None),
        "http" => (HealthKind::Http, Some("/".to_owned())),
        _ => match s.strip_prefix("http:") {
            Some(p) if p.starts_with('/') => (HealthKind::Http, Some(p.to_owned())),
            Some(p) => return Err(format!("path: must start with '/', got {p:?}")),
            None => return Err(format!("expected tcp, http:PATH or none, got {s:?}")),
        },
    };
    Ok(Clear(Some(HealthDef {
        kind: Some(kind),
        path,
        ..Default::default()
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn explain_rejects_a_bad_address() {
        let e = Cli::try_parse_from(["meshlb", "explain", "tcp", "10.0.0.300:1", "10.96.0.10:80"])
            .unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("meshlb").chain(args.iter().copied()))
    }

    #[test]
    fn publish_flags_parse() {
        let cases: Vec<(&str, Option<Proto>, i64, Option<i64>)> = vec![
            ("udp:53:5353", Some(Proto::Udp), 53, Some(5353)),
            ("tcp:80:8000", Some(Proto::Tcp), 80, Some(8000)),
            ("80:8000", None, 80, Some(8000)),
            ("443", None, 443, None),
            ("53:5353/udp", Some(Proto::Udp), 53, Some(5353)),
        ];
        for (text, proto, port, target) in cases {
            let cli = parse(&["service", "create", "web", "--publish", text]).unwrap();
            let Command::Service(ServiceArgs {
                command: ServiceCommand::Create(a),
                ..
            }) = cli.command
            else {
                panic!("{text}: not service create");
            };
            assert_eq!(
                a.publish,
                vec![PublishDef {
                    proto,
                    port,
                    target
                }],
                "{text}"
            );
        }
    }

    #[test]
    fn bad_client_flags_exit_2() {
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (
                vec!["service", "create", "web", "-p", "70000:80"],
                "port: must be 1..=65535, got 70000",
            ),
            (
                vec!["service", "create", "web", "-p", "80:0"],
                "target: must be 1..=65535, got 0",
            ),
            (
                vec!["service", "create", "web", "-p", "sctp:80:80"],
                "port: expected a number",
            ),
            (
                vec!["service", "create", "web", "-p", "udp:"],
                "port: expected a number",
            ),
            (
                vec![
                    "service",
                    "create",
                    "web",
                    "-p",
                    "80",
                    "--scheduler",
                    "random",
                ],
                "unknown scheduler \"random\"",
            ),
            (
                vec![
                    "service",
                    "create",
                    "web",
                    "-p",
                    "80",
                    "--affinity",
                    "cookie",
                ],
                "expected client-ip[:SECS]",
            ),
            (
                vec![
                    "service",
                    "create",
                    "web",
                    "-p",
                    "80",
                    "--affinity",
                    "client-ip:x",
                ],
                "timeout: expected a number",
            ),
            (
                vec!["service", "create", "web", "-p", "80", "--health", "ftp"],
                "expected tcp, http:PATH",
            ),
            (
                vec!["service", "create", "web", "-p", "80", "--health", "http:x"],
                "must start with '/'",
            ),
            (vec!["service", "create", "-p", "80"], "NAME"),
            (vec!["task", "add", "web"], "ADDR"),
            (
                vec!["task", "add", "web", "10.0.0.1", "--weight", "x"],
                "--weight",
            ),
            (vec!["task", "rm", "web"], "TASK_ID"),
            (vec!["service", "frob"], "frob"),
        ];
        for (args, want) in cases {
            let e = parse(&args).expect_err(&format!("{args:?}"));
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(e.to_string().contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn etcd_flags_go_before_or_after_the_subcommand() {
        for args in [
            vec!["service", "--etcd", "http://e:2379", "--prefix", "/x", "ls"],
            vec!["service", "ls", "--etcd", "http://e:2379", "--prefix", "/x"],
        ] {
            let Command::Service(s) = parse(&args).unwrap().command else {
                panic!("{args:?}");
            };
            assert_eq!(s.etcd.etcd.as_deref(), Some("http://e:2379"), "{args:?}");
            assert_eq!(s.etcd.prefix.as_deref(), Some("/x"), "{args:?}");
        }
        let Command::Task(t) = parse(&["task", "ls", "web", "--etcd-user", "u"])
            .unwrap()
            .command
        else {
            panic!("task ls");
        };
        assert_eq!(t.etcd.etcd_user.as_deref(), Some("u"));
        assert!(
            matches!(t.command, TaskCommand::Ls(TaskLsArgs { service: Some(ref s) }) if s == "web")
        );
        let Command::Run(r) = parse(&["run", "--etcd", "http://e:2379,http://f:2379"])
            .unwrap()
            .command
        else {
            panic!("run");
        };
        assert_eq!(r.etcd.etcd.as_deref(), Some("http://e:2379,http://f:2379"));
    }
}
