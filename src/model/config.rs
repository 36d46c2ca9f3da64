//! The validated configuration: what `meshlb run` is told to do, whatever
//! the source — the node's settings and its services ([`ServiceConfig`],
//! from the config file or from etcd), and their data-plane form
//! ([`ServiceConfig::specs`], [`desired_state_of`]). `source::config`
//! parses and checks the text into these types.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{
    BackendKey, BackendSpec, BackendState, DesiredState, Frontend, Proto, ServiceKey, ServiceSpec,
};

// ---------------------------------------------------------------------
// Typed, validated configuration
// ---------------------------------------------------------------------

/// Which forwarding engine `run` uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneChoice {
    /// XDP native, then XDP generic, then IPVS: the first that works.
    #[default]
    Auto,
    Xdp,
    Ipvs,
}

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    #[default]
    Auto,
    Native,
    Generic,
}

/// How a service picks a backend for a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    #[default]
    Maglev,
    Rr,
    Wrr,
    Lc,
    Sh,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    #[default]
    Tcp,
    Http,
}

macro_rules! str_enum {
    ($t:ty, $what:literal, $($v:ident => $s:literal),+) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $s),+ }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok(<$t>::$v),)+
                    _ => Err(format!(
                        concat!("unknown ", $what, " {:?}, expected one of: {}"),
                        s,
                        [$($s),+].join(", ")
                    )),
                }
            }
        }
    };
}

str_enum!(DataplaneChoice, "data plane", Auto => "auto", Xdp => "xdp", Ipvs => "ipvs");
str_enum!(XdpMode, "xdp mode", Auto => "auto", Native => "native", Generic => "generic");
str_enum!(Scheduler, "scheduler", Maglev => "maglev", Rr => "rr", Wrr => "wrr", Lc => "lc", Sh => "sh");
str_enum!(HealthKind, "health check kind", Tcp => "tcp", Http => "http");

/// A validated configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `None`: the CLI flag or the hostname decides.
    pub node: Option<String>,
    /// This node's address for SNAT and `nodes/<node>` (`None`: the
    /// default-route interface's, see `nodenet::node_address`).
    pub advertise_addr: Option<IpAddr>,
    /// Interfaces that receive service traffic (empty: from the CLI).
    pub interfaces: Vec<String>,
    /// Interfaces where local tasks live (TC instead of XDP; bridges in
    /// `interfaces` are task interfaces anyway).
    pub task_interfaces: Vec<String>,
    /// Where this node answers ARP/NDP for the announced VIPs it owns
    /// (empty: the uplink holding the node address, else the first).
    pub announce_interfaces: Vec<String>,
    pub dataplane: DataplaneChoice,
    pub xdp_mode: XdpMode,
    /// Where pinned maps and links live.
    pub bpffs: PathBuf,
    /// `None`: static services only.
    pub etcd: Option<EtcdConfig>,
    /// `None`: do not register this node's containers.
    pub docker: Option<DockerConfig>,
    pub metrics: MetricsConfig,
    /// `[conntrack]`: the XDP data plane's flow table.
    pub conntrack: ConntrackConfig,
    /// `[dns]`: the DNS view of services and tasks.
    pub dns: DnsConfig,
    /// `[socket_lb] enabled`: node-local clients balanced at the socket
    /// (cgroup hooks; XDP data plane, where cgroup v2 is mounted).
    pub socket_lb: bool,
    /// Seconds between full comparisons of the kernel's tables with the
    /// desired state (`reconcile_interval`): drift is repaired.
    pub reconcile_interval: u32,
    pub services: Vec<ServiceConfig>,
}

/// `[dns]`: where DNS is served (nowhere by default) and its zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    pub listen: Vec<SocketAddr>,
    /// Validated (`control::dns::Zone::new`).
    pub zone: String,
}

/// The zone DNS answers for unless `[dns] zone` says otherwise.
pub const DEFAULT_DNS_ZONE: &str = "meshlb";

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: Vec::new(),
            zone: DEFAULT_DNS_ZONE.into(),
        }
    }
}

/// Default `reconcile_interval`: 5 minutes.
pub const DEFAULT_RECONCILE_INTERVAL: u32 = 300;

/// `[conntrack]`: flow-table size and timeouts (seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackConfig {
    /// Entries of each flow table (conntrack, reverse NAT, SNAT); takes
    /// effect when the tables are created (a fresh `--bpffs`).
    pub max_flows: u32,
    pub tcp_timeout: u32,
    pub tcp_closing_timeout: u32,
    pub udp_timeout: u32,
    /// A SNAT port whose flow closed or vanished waits this long before
    /// another client's flow may take it.
    pub snat_quarantine: u32,
    /// New flows per second over which `status` reports a flood.
    pub flood_threshold: u32,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        ConntrackConfig {
            max_flows: meshlb_common::MAX_FLOWS,
            tcp_timeout: meshlb_common::DEFAULT_TCP_TIMEOUT_S,
            tcp_closing_timeout: meshlb_common::DEFAULT_TCP_CLOSING_TIMEOUT_S,
            udp_timeout: meshlb_common::DEFAULT_UDP_TIMEOUT_S,
            snat_quarantine: meshlb_common::DEFAULT_SNAT_QUARANTINE_S,
            flood_threshold: meshlb_common::DEFAULT_FLOOD_THRESHOLD,
        }
    }
}

impl ConntrackConfig {
    /// The data path's view (`MLB_FLOWCFG_V1`).
    pub fn flow_config(&self) -> meshlb_common::FlowConfig {
        meshlb_common::FlowConfig {
            tcp_timeout_s: self.tcp_timeout,
            tcp_closing_timeout_s: self.tcp_closing_timeout,
            udp_timeout_s: self.udp_timeout,
            snat_quarantine_s: self.snat_quarantine,
            flood_threshold: self.flood_threshold,
            _pad: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub username: Option<String>,
    /// A file rather than the password itself, so the config file can be
    /// world-readable.
    pub password_file: Option<PathBuf>,
    /// Credentials may cross `http://` endpoints in clear (`insecure`,
    /// `--etcd-insecure`); refused otherwise.
    pub insecure: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerConfig {
    pub socket: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

/// A validated service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: Option<IpAddr>,
    /// Never empty; no two entries share port and protocol.
    pub publish: Vec<Publish>,
    pub scheduler: Scheduler,
    pub affinity: Option<Affinity>,
    pub health: Option<Health>,
    /// Seconds a drained backend keeps its established flows.
    pub drain_timeout: Option<u64>,
    /// Publish a port that a process on the node already listens on
    /// (the service takes the port's traffic from it); refused otherwise.
    pub allow_port_conflict: bool,
    /// One node at a time owns the VIP on its segment (elected through
    /// etcd) and answers ARP/NDP for it; needs `vip`.
    pub announce: bool,
    pub backends: Vec<BackendConfig>,
}

/// One published port: clients connect to `port`, backends listen on
/// `target` (unless a backend names its own port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Publish {
    pub proto: Proto,
    pub port: u16,
    pub target: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Affinity {
    pub client_ip: bool,
    /// Seconds.
    pub timeout: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub kind: HealthKind,
    /// HTTP path (`kind = http`).
    pub path: String,
    pub interval_ms: u32,
    /// Always below `interval_ms`, so checks never overlap.
    pub timeout_ms: u32,
    /// Consecutive successes that bring a backend up.
    pub rise: u32,
    /// Consecutive failures that take it down.
    pub fall: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub addr: IpAddr,
    /// `None`: the `target` of each publish entry.
    pub port: Option<u16>,
    /// 0 drains.
    pub weight: u32,
    /// The node the backend runs on. A backend of another node gets SNAT.
    pub node: Option<String>,
    /// Without `node`: reached through a gateway (or not at all), so
    /// another node's, as the daemon found in the routing table
    /// (`daemon::localise`); `false`: on a link of this node.
    pub routed: bool,
}

impl BackendConfig {
    /// The data-plane identity of this backend for one publish entry.
    pub fn key(&self, publish: &Publish) -> BackendKey {
        BackendKey {
            addr: self.addr,
            port: self.port.unwrap_or(publish.target),
        }
    }
}

impl ServiceConfig {
    /// The frontends of one publish entry: the VIP (if any) and the node
    /// port, which every node answers on.
    pub fn frontends(&self, p: &Publish) -> Vec<Frontend> {
        let mut v = Vec::with_capacity(2);
        if let Some(vip) = self.vip {
            v.push(Frontend {
                addr: Some(vip),
                port: p.port,
                proto: p.proto,
            });
        }
        v.push(Frontend {
            addr: None,
            port: p.port,
            proto: p.proto,
        });
        v
    }
}

impl Config {
    /// The settings that differ between `self` (running) and `new` and
    /// that only take effect at the next start (SIGHUP applies services,
    /// `[conntrack]` timeouts, the flood threshold and the interface lists
    /// live), by their
    /// config key.
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut differs = |key, d: bool| {
            if d {
                v.push(key);
            }
        };
        differs("node", self.node != new.node);
        differs("advertise_addr", self.advertise_addr != new.advertise_addr);
        differs("dataplane", self.dataplane != new.dataplane);
        differs("xdp_mode", self.xdp_mode != new.xdp_mode);
        differs("bpffs", self.bpffs != new.bpffs);
        differs("etcd", self.etcd != new.etcd);
        differs("docker", self.docker != new.docker);
        differs("metrics.listen", self.metrics != new.metrics);
        differs("socket_lb.enabled", self.socket_lb != new.socket_lb);
        differs("dns", self.dns != new.dns);
        differs(
            "conntrack.max_flows",
            self.conntrack.max_flows != new.conntrack.max_flows,
        );
        v
    }

    /// Takes `running`'s values of the settings `restart_needed` names,
    /// so that the config in use says what actually runs.
    pub fn keep_restart_settings(&mut self, running: &Config) {
        self.node.clone_from(&running.node);
        self.advertise_addr = running.advertise_addr;
        self.dataplane = running.dataplane;
        self.xdp_mode = running.xdp_mode;
        self.bpffs.clone_from(&running.bpffs);
        self.etcd.clone_from(&running.etcd);
        self.docker.clone_from(&running.docker);
        self.metrics = running.metrics.clone();
        self.socket_lb = running.socket_lb;
        self.dns.clone_from(&running.dns);
        self.conntrack.max_flows = running.conntrack.max_flows;
    }
}

impl Config {
    /// The data-plane services of the static `[[service]]` tables, as
    /// node `node` forwards them: one [`ServiceKey`] per publish entry,
    /// all backends up.
    pub fn desired_state(&self, local_addrs: BTreeSet<IpAddr>, node: &str) -> DesiredState {
        desired_state_of(&self.services, local_addrs, node)
    }
}

/// The data-plane services of validated services with all backends up
/// (static services; etcd builds its own with [`ServiceConfig::specs`]),
/// as node `node` forwards them.
pub fn desired_state_of(
    services: &[ServiceConfig],
    local_addrs: BTreeSet<IpAddr>,
    node: &str,
) -> DesiredState {
    DesiredState {
        services: services
            .iter()
            .flat_map(|svc| svc.specs(node, |_| BackendState::Up))
            .collect(),
        local_addrs,
    }
}

impl ServiceConfig {
    /// One data-plane service per publish entry, as node `node` forwards
    /// it (backends of other nodes are remote); `state` gives each
    /// backend's state (a static backend is always up, an etcd task may
    /// be draining).
    pub fn specs(
        &self,
        node: &str,
        state: impl Fn(&BackendConfig) -> BackendState,
    ) -> Vec<(ServiceKey, Arc<ServiceSpec>)> {
        self.publish
            .iter()
            .map(|p| {
                let key = ServiceKey {
                    name: self.name.clone(),
                    proto: p.proto,
                    port: p.port,
                };
                let spec = ServiceSpec {
                    frontends: self.frontends(p).into_iter().collect(),
                    affinity_secs: self
                        .affinity
                        .filter(|a| a.client_ip)
                        .map_or(0, |a| u32::try_from(a.timeout).unwrap_or(u32::MAX)),
                    backends: self
                        .backends
                        .iter()
                        .map(|b| {
                            (
                                b.key(p),
                                BackendSpec {
                                    weight: b.weight,
                                    state: state(b),
                                    remote: b.node.as_deref().map_or(b.routed, |n| n != node),
                                },
                            )
                        })
                        .collect(),
                };
                (key, Arc::new(spec))
            })
            .collect()
    }
}
