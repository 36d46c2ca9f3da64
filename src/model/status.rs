//! The read model: what `meshlb status` and `meshlb explain` answer (and
//! `/metrics` renders), whichever engine produced it — the XDP engine from
//! its pinned maps, the IPVS engine from the kernel's IPVS table. Its JSON
//! is the contract of `--json`; [`status_table`] and [`Explanation::line`]
//! are the human forms.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::config::Scheduler;
use crate::model::counters::SyncLatency;
use crate::model::{BackendState, Role};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackendStatus {
    pub addr: String,
    pub port: u16,
    pub weight: u32,
    pub state: BackendState,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: Option<String>,
    pub ports: Vec<String>,
    pub scheduler: Scheduler,
    pub backends: Vec<BackendStatus>,
    pub packets: u64,
    pub bytes: u64,
    pub connections: u64,
}

/// One interface the data plane is attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IfaceStatus {
    pub name: String,
    /// `uplink` (XDP) or `task` (TC: local tasks sit behind it).
    pub role: Role,
    /// `xdp-native`, `xdp-generic` or `tc`.
    pub mode: String,
    /// Why it is attached: "listed", "IPv4 default route", "local backend
    /// 10.0.1.2 of service web", "Docker bridge".
    pub why: String,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub node: String,
    pub dataplane: &'static str,
    /// From an etcd event observed to the kernel applied, over the
    /// daemon's recent syncs (`None` without an etcd source).
    pub sync_latency: Option<SyncLatency>,
    /// The attached interfaces, their role and why (XDP engine).
    pub interfaces: Vec<IfaceStatus>,
    pub services: Vec<ServiceStatus>,
    pub conntrack_entries: u64,
    /// SNAT entries: ports held by translated flows (all addresses).
    pub snat_ports_in_use: u64,
    /// Capacity of each flow table (conntrack, reverse NAT, SNAT).
    pub flow_table_size: u64,
    /// Flows not established yet (their own tables: a flood of flow
    /// openers churns only those).
    pub embryonic_flows: u64,
    /// New flows in the last full second (all CPUs).
    pub new_flows_per_second: u64,
    /// `[conntrack] flood_threshold`.
    pub flood_threshold: u64,
    /// The new-flow rate is over the threshold.
    pub flood: bool,
    /// The socket-level balancer for node-local clients (`[socket_lb]`).
    pub socket_lb: SocketLbStatus,
    /// Announced VIPs and their owners (SPEC "Highly available VIPs"),
    /// as this node's daemon last saw them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<VipStatus>,
    pub counters: BTreeMap<&'static str, u64>,
}

/// One announced VIP in `meshlb status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct VipStatus {
    pub vip: std::net::IpAddr,
    /// The node holding `vips/<ip>` (`None`: nobody right now).
    pub owner: Option<String>,
    /// This node owns it and answers ARP/NDP for it.
    pub mine: bool,
    /// Where this node answers for it (when `mine`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
}

/// What `meshlb status` shows of the socket-level balancer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SocketLbStatus {
    /// The hooks are attached (their links pinned).
    pub on: bool,
    /// The cgroup v2 directory they are attached to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Network namespaces served (this node's and its containers').
    pub namespaces: u64,
    /// Why it is off (or what it serves), in one line.
    pub why: String,
}

/// The answer of `explain`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Explanation {
    pub service: Option<String>,
    pub frontend: Option<String>,
    pub backend: Option<String>,
    pub reason: Reason,
    pub slot: Option<u32>,
}

/// Why `explain` names the backend it names (or none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// An established flow: its conntrack entry.
    Conntrack,
    /// Session affinity of the client address.
    Affinity,
    /// A new flow: the Maglev ring's slot.
    Maglev,
    /// No frontend matches: the data plane passes the packet untouched.
    NoService,
    /// The service has no backend that takes new flows.
    NoBackend,
    /// A node-local socket (`explain --socket COOKIE`) the socket-level
    /// balancer sent to this backend (its record, `MLB_SOCKREV_V1`).
    Socket,
    /// A node-local socket not balanced yet: the ring slot its cookie
    /// picks (or the first of the next ones whose backend takes flows).
    SocketSlot,
}

impl Explanation {
    /// One human line.
    pub fn line(&self) -> String {
        match self.reason {
            Reason::NoService => {
                "no service matches this flow: the data plane passes it to the stack untouched"
                    .into()
            }
            Reason::NoBackend => format!(
                "service {} (frontend {}) has no active backend: new flows go to the stack",
                self.service.as_deref().unwrap_or("?"),
                self.frontend.as_deref().unwrap_or("?")
            ),
            Reason::Conntrack => format!(
                "service {} (frontend {}) -> backend {}: established flow (conntrack)",
                self.service.as_deref().unwrap_or("?"),
                self.frontend.as_deref().unwrap_or("?"),
                self.backend.as_deref().unwrap_or("?")
            ),
            Reason::Affinity => format!(
                "service {} (frontend {}) -> backend {}: session affinity of the client address",
                self.service.as_deref().unwrap_or("?"),
                self.frontend.as_deref().unwrap_or("?"),
                self.backend.as_deref().unwrap_or("?")
            ),
            Reason::Socket => format!(
                "service {} (frontend {}) -> backend {}: this node-local socket was balanced to it (socket-level balancer)",
                self.service.as_deref().unwrap_or("?"),
                self.frontend.as_deref().unwrap_or("?"),
                self.backend.as_deref().unwrap_or("?")
            ),
            Reason::SocketSlot => format!(
                "service {} (frontend {}) -> backend {}: a node-local socket with this cookie connecting now, maglev slot {}",
                self.service.as_deref().unwrap_or("?"),
                self.frontend.as_deref().unwrap_or("?"),
                self.backend.as_deref().unwrap_or("?"),
                self.slot.unwrap_or(0)
            ),
            Reason::Maglev => format!(
                "service {} (frontend {}) -> backend {}: maglev slot {}",
                self.service.as_deref().unwrap_or("?"),
                self.frontend.as_deref().unwrap_or("?"),
                self.backend.as_deref().unwrap_or("?"),
                self.slot.unwrap_or(0)
            ),
        }
    }
}

/// Human-readable table of a status.
pub fn status_table(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "node {}  dataplane {}  conntrack entries {}\n",
        s.node, s.dataplane, s.conntrack_entries
    );
    if let Some(l) = &s.sync_latency {
        let _ = writeln!(
            out,
            "sync latency (etcd event -> kernel)  p50 {} ms  p99 {} ms  max {} ms  last {} ms  over the latest {} of {} syncs",
            l.p50_ms, l.p99_ms, l.max_ms, l.last_ms, l.recent, l.count
        );
    }
    for i in &s.interfaces {
        let _ = writeln!(
            out,
            "iface {}  {} ({})  {}",
            i.name,
            i.role.as_str(),
            i.mode,
            i.why
        );
    }
    let sl = &s.socket_lb;
    let _ = if sl.on {
        writeln!(
            out,
            "socket lb  on (cgroup {}, {} namespace(s)): {}",
            sl.cgroup.as_deref().unwrap_or("?"),
            sl.namespaces,
            sl.why
        )
    } else {
        writeln!(out, "socket lb  off: {}", sl.why)
    };
    for v in &s.vips {
        let _ = writeln!(
            out,
            "vip {}  owner {}{}",
            v.vip,
            v.owner.as_deref().unwrap_or("none"),
            if v.mine {
                format!(" (this node, answering on {})", v.interfaces.join(", "))
            } else {
                String::new()
            }
        );
    }
    if s.flow_table_size > 0 {
        let _ = writeln!(
            out,
            "flow table {}/{} ({:.1}% full)  embryonic {}  SNAT ports in use {}  snat_exhausted {}",
            s.conntrack_entries,
            s.flow_table_size,
            100.0 * s.conntrack_entries as f64 / s.flow_table_size as f64,
            s.embryonic_flows,
            s.snat_ports_in_use,
            s.counters.get("snat_exhausted").copied().unwrap_or(0)
        );
        let _ = writeln!(
            out,
            "new flows/s {} (flood threshold {}): {}",
            s.new_flows_per_second,
            s.flood_threshold,
            if s.flood {
                "FLOOD (embryonic flows are kept apart; established ones are not evicted)"
            } else {
                "no flood"
            }
        );
    }
    for svc in &s.services {
        let _ = writeln!(
            out,
            "\nSERVICE {}  vip {}  ports {}  scheduler {}  packets {}  connections {}",
            svc.name,
            svc.vip.as_deref().unwrap_or("-"),
            svc.ports.join(","),
            svc.scheduler,
            svc.packets,
            svc.connections
        );
        let _ = writeln!(
            out,
            "  {:<40} {:>6} {:<9} {:>12} {:>14} {:>12}",
            "BACKEND", "WEIGHT", "STATE", "PACKETS", "BYTES", "CONNECTIONS"
        );
        for b in &svc.backends {
            let addr = match b.addr.parse::<IpAddr>() {
                Ok(IpAddr::V6(_)) => format!("[{}]:{}", b.addr, b.port),
                _ => format!("{}:{}", b.addr, b.port),
            };
            let _ = writeln!(
                out,
                "  {:<40} {:>6} {:<9} {:>12} {:>14} {:>12}",
                addr,
                b.weight,
                b.state.as_str(),
                b.packets,
                b.bytes,
                b.connections
            );
        }
    }
    out
}
