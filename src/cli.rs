//! The command line (SPEC.md "One binary"), as clap types. `main` parses
//! it and calls the library; nothing here does IO.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/meshlb";

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
    /// Detach the data plane and remove its pinned state (forwarding stops).
    Cleanup(BpffsArg),
    /// Attach a pass-everything XDP program in native mode (for veth peers:
    /// native XDP redirect only delivers into a veth whose peer runs XDP).
    XdpPass(XdpPassArgs),
}

#[derive(Debug, Args)]
pub struct BpffsArg {
    /// Directory on a bpffs holding the pinned maps and links.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Config file (TOML). Without it (and without --etcd) the embedded
    /// default (a demo service) is used.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Node name (default: from the config, else the hostname).
    #[arg(long)]
    pub node: Option<String>,
    /// Interface that receives service traffic (repeatable).
    #[arg(long = "iface", value_name = "IF")]
    pub ifaces: Vec<String>,
    /// etcd endpoints (not in this version: static config only).
    #[arg(long, value_name = "URL,...", env = "MESHLB_ETCD")]
    pub etcd: Option<String>,
    /// Forwarding engine.
    #[arg(long, value_enum)]
    pub dataplane: Option<DataplaneArg>,
    /// How the XDP program is attached.
    #[arg(long, value_enum)]
    pub xdp_mode: Option<XdpModeArg>,
    /// Register this node's Docker containers (not in this version).
    #[arg(long, value_name = "SOCKET", num_args = 0..=1, default_missing_value = "/var/run/docker.sock")]
    pub docker: Option<String>,
    /// Prometheus metrics listen address, or "none".
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Directory on a bpffs for the pinned maps and links.
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
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
    /// Node name to report (default: the hostname).
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
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub bpffs: BpffsArg,
}

#[derive(Debug, Args)]
pub struct XdpPassArgs {
    /// Interface to attach to (repeatable).
    #[arg(long = "iface", value_name = "IF", required = true)]
    pub ifaces: Vec<String>,
    #[command(flatten)]
    pub bpffs: BpffsArg,
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
}
