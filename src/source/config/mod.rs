//! The TOML configuration file of `meshlb run` (SPEC.md, "Config file"):
//! parsing and validation, with one-line errors that name the field, into
//! the validated model (`model::config`, which also turns the static
//! services into the desired state).
//!
//! Parsing is two-step: serde reads the text into plain `*Def` structs
//! (which `etcd` can reuse for its JSON values), then `validate` checks
//! meaning and builds the typed [`Config`]. Errors of either step are
//! located by a small scan of the text (`scan`) that maps every key path
//! (such as `service[1].publish[0].port`) to its position.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::config::{
    Affinity, BackendConfig, Config, ConntrackConfig, DataplaneChoice, DnsConfig, DockerConfig,
    EtcdConfig, Health, HealthKind, MetricsConfig, Publish, Scheduler, ServiceConfig, XdpMode,
    DEFAULT_DNS_ZONE, DEFAULT_RECONCILE_INTERVAL,
};
use crate::model::{Frontend, Proto};

mod scan;

use scan::{line_of, KeyIndex};

/// The demo's configuration (`cargo xtask demo` passes it with `--config`;
/// here so that the unit tests hold it valid).
pub const DEMO_CONFIG: &str = include_str!("../../demo.toml");

/// Default directory of pinned maps and links.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/meshlb";
/// Default metrics listener.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9742";
/// Default etcd key prefix (the layout version is part of it).
pub const DEFAULT_ETCD_PREFIX: &str = "/meshlb/v1";
/// Default Docker API socket.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Default backend weight.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Largest backend weight (keeps the weighted Maglev fill loop short).
pub const MAX_WEIGHT: u32 = 10_000;

/// Why a configuration was refused. `Display` is one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A syntax, type or validation error. `path` is the key path
    /// (`service[1].publish[0].port`), empty when unknown; `line` is
    /// 1-based.
    #[error("config: {}{message}", location(*.line, .path))]
    Invalid {
        line: Option<usize>,
        path: String,
        message: String,
    },
}

fn location(line: Option<usize>, path: &str) -> String {
    let mut s = String::new();
    if let Some(l) = line {
        s.push_str(&format!("line {l}: "));
    }
    if !path.is_empty() {
        s.push_str(path);
        s.push_str(": ");
    }
    s
}

/// A validation failure before it is located in the text: the key path
/// relative to where validation started, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }

    fn within(mut self, prefix: &str) -> Self {
        self.path = if self.path.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{}", self.path)
        };
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

// ---------------------------------------------------------------------
// Serde definitions (the text as written)
// ---------------------------------------------------------------------

/// The file as written. Numbers are `i64` so out-of-range values get
/// this module's messages rather than serde's.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigDef {
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_addr: Option<String>,
    #[serde(default)]
    pub interfaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub task_interfaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub announce_interfaces: Vec<String>,
    pub dataplane: Option<DataplaneChoice>,
    pub xdp_mode: Option<XdpMode>,
    pub bpffs: Option<String>,
    pub etcd: Option<EtcdDef>,
    pub docker: Option<DockerDef>,
    pub metrics: Option<MetricsDef>,
    pub conntrack: Option<ConntrackDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_lb: Option<SocketLbDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconcile_interval: Option<String>,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceDef>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdDef {
    pub endpoints: Vec<String>,
    pub prefix: Option<String>,
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<String>,
    /// Allow credentials over `http://` endpoints.
    pub insecure: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DockerDef {
    pub socket: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsDef {
    pub listen: Option<String>,
}

/// `[dns]` as written.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsDef {
    /// `IP:PORT` addresses to serve DNS on (none: no DNS).
    pub listen: Option<Vec<String>>,
    /// The zone answered for (default `meshlb`).
    pub zone: Option<String>,
}

impl DnsDef {
    fn validate(&self) -> Result<DnsConfig, FieldError> {
        let listen = self
            .listen
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, a)| {
                a.parse().map_err(|_| {
                    FieldError::new(
                        format!("dns.listen[{i}]"),
                        format!("invalid socket address {a:?}, expected IP:PORT"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let zone = self.zone.clone().unwrap_or_else(|| DEFAULT_DNS_ZONE.into());
        crate::control::dns::Zone::new(&zone).map_err(|e| FieldError::new("dns.zone", e))?;
        Ok(DnsConfig { listen, zone })
    }
}

/// `[socket_lb]` as written.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SocketLbDef {
    /// Node-local clients balanced at the socket (default: true where
    /// cgroup v2 is mounted).
    pub enabled: Option<bool>,
}

/// `[conntrack]` as written: durations as `"90s"`, `"2m"`, `"1h"`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConntrackDef {
    pub max_flows: Option<i64>,
    pub tcp_timeout: Option<String>,
    pub tcp_closing_timeout: Option<String>,
    pub udp_timeout: Option<String>,
    pub snat_quarantine: Option<String>,
    pub flood_threshold: Option<i64>,
}

/// Smallest and largest `conntrack.max_flows`.
const MAX_FLOWS_RANGE: (i64, i64) = (1024, 16 << 20);

impl ConntrackDef {
    fn validate(&self) -> Result<ConntrackConfig, FieldError> {
        let d = ConntrackConfig::default();
        let max_flows = match self.max_flows {
            None => d.max_flows,
            Some(n) if (MAX_FLOWS_RANGE.0..=MAX_FLOWS_RANGE.1).contains(&n) => n as u32,
            Some(n) => {
                return Err(FieldError::new(
                    "conntrack.max_flows",
                    format!(
                        "must be {} to {}, got {n}",
                        MAX_FLOWS_RANGE.0, MAX_FLOWS_RANGE.1
                    ),
                ))
            }
        };
        let flood_threshold = match self.flood_threshold {
            None => d.flood_threshold,
            Some(n) if (1..=100_000_000).contains(&n) => n as u32,
            Some(n) => {
                return Err(FieldError::new(
                    "conntrack.flood_threshold",
                    format!("must be 1 to 100000000 new flows per second, got {n}"),
                ))
            }
        };
        let dur = |key: &str, v: &Option<String>, default: u32| match v {
            None => Ok(default),
            Some(s) => duration_secs(s).map_err(|e| FieldError::new(format!("conntrack.{key}"), e)),
        };
        Ok(ConntrackConfig {
            max_flows,
            tcp_timeout: dur("tcp_timeout", &self.tcp_timeout, d.tcp_timeout)?,
            tcp_closing_timeout: dur(
                "tcp_closing_timeout",
                &self.tcp_closing_timeout,
                d.tcp_closing_timeout,
            )?,
            udp_timeout: dur("udp_timeout", &self.udp_timeout, d.udp_timeout)?,
            snat_quarantine: dur("snat_quarantine", &self.snat_quarantine, d.snat_quarantine)?,
            flood_threshold,
        })
    }
}

/// A duration of whole seconds, 1 s to 7 days: a number with a unit
/// (`s`, `m`, `h`, `d`), e.g. `"90s"`, `"2m"`, `"1h"`.
pub fn duration_secs(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "invalid duration {s:?}: expected a number with a unit s, m, h or d (e.g. \"90s\", \"2m\")"
            ))
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected digits before the unit"))?;
    let secs = n.saturating_mul(mult);
    if !(1..=7 * 86_400).contains(&secs) {
        return Err(format!("duration {s:?} out of range: 1s to 7d"));
    }
    Ok(secs as u32)
}

/// A service as written: a `[[service]]` table, or (without `backend`)
/// the JSON value of an etcd `services/<name>` key.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
    pub publish: Vec<PublishDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<Scheduler>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<AffinityDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_port_conflict: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub announce: bool,
    #[serde(default, rename = "backend", skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendDef>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PublishDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<Proto>,
    pub port: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AffinityDef {
    #[serde(default = "yes")]
    pub client_ip: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<HealthKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendDef {
    pub addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Default affinity timeout (seconds), as IPVS persistence.
pub const DEFAULT_AFFINITY_TIMEOUT: u64 = 300;

// ---------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------

/// A port number, 1..=65535 (`i64` so 70000 gets this message).
pub fn port(path: &str, v: i64) -> Result<u16, FieldError> {
    match u16::try_from(v) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(FieldError::new(path, format!("must be 1..=65535, got {v}"))),
    }
}

fn positive(path: &str, v: i64) -> Result<u32, FieldError> {
    match u32::try_from(v) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(FieldError::new(
            path,
            format!("must be a positive number, got {v}"),
        )),
    }
}

/// A VIP, backend or task address: unicast and routable between nodes
/// (SPEC "Node setup without surprises"). One rule for the config file,
/// etcd records and the CLI: not unspecified, loopback, multicast,
/// broadcast or link-local (169.254.0.0/16 holds cloud metadata services
/// such as 169.254.169.254; fe80::/10).
pub fn ip(path: &str, s: &str) -> Result<IpAddr, FieldError> {
    let a: IpAddr = s
        .parse()
        .map_err(|_| FieldError::new(path, format!("invalid IP address {s:?}")))?;
    let kind = match a {
        _ if a.is_unspecified() => Some("unspecified"),
        _ if a.is_loopback() => Some("loopback"),
        _ if a.is_multicast() => Some("multicast"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => Some("link-local"),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().and_then(|v4| {
            (v4.is_loopback() || v4.is_link_local() || v4.is_unspecified())
                .then_some("an IPv4-mapped loopback, link-local or unspecified")
        }),
        IpAddr::V4(_) => None,
    };
    match kind {
        Some(k) => Err(FieldError::new(
            path,
            format!("{s} is {k}: must be a unicast address other nodes can route to"),
        )),
        None => Ok(a),
    }
}

/// A backend weight, 0..=`MAX_WEIGHT`.
pub fn weight(path: &str, w: i64) -> Result<u32, FieldError> {
    match u32::try_from(w) {
        Ok(w) if w <= MAX_WEIGHT => Ok(w),
        _ => Err(FieldError::new(
            path,
            format!("must be 0..={MAX_WEIGHT}, got {w}"),
        )),
    }
}

/// Check a service name: it becomes an etcd key, a metrics label and a
/// pinned map entry of at most `MAX_NAME_LEN` bytes.
pub fn validate_name(name: &str) -> Result<(), String> {
    let n = name.len();
    if n == 0 || n > meshlb_common::MAX_NAME_LEN {
        return Err(format!(
            "must be 1..={} characters, got {n}",
            meshlb_common::MAX_NAME_LEN
        ));
    }
    let ok_first = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok_rest = |c: u8| ok_first(c) || matches!(c, b'_' | b'.' | b'-');
    let b = name.as_bytes();
    if !ok_first(b[0]) || !b[1..].iter().all(|&c| ok_rest(c)) {
        return Err(format!(
            "invalid name {name:?}: use a-z, 0-9 and _ . - (starting with a letter or digit)"
        ));
    }
    Ok(())
}

fn family(a: IpAddr) -> &'static str {
    if a.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

impl ServiceDef {
    /// Check this service on its own (duplicates across services are the
    /// caller's concern). Error paths are relative to the service.
    pub fn validate(&self) -> Result<ServiceConfig, FieldError> {
        validate_name(&self.name).map_err(|m| FieldError::new("name", m))?;
        let vip = self.vip.as_deref().map(|v| ip("vip", v)).transpose()?;

        if self.publish.is_empty() {
            return Err(FieldError::new("publish", "must list at least one port"));
        }
        let mut publish = Vec::with_capacity(self.publish.len());
        let mut seen = BTreeMap::new();
        for (i, p) in self.publish.iter().enumerate() {
            let at = format!("publish[{i}]");
            let port_ = port(&format!("{at}.port"), p.port)?;
            let target = match p.target {
                Some(t) => port(&format!("{at}.target"), t)?,
                None => port_,
            };
            let proto = p.proto.unwrap_or(Proto::Tcp);
            if let Some(j) = seen.insert((proto, port_), i) {
                return Err(FieldError::new(
                    at,
                    format!("{port_}/{proto} is already published by publish[{j}]"),
                ));
            }
            publish.push(Publish {
                proto,
                port: port_,
                target,
            });
        }

        let affinity = self
            .affinity
            .as_ref()
            .map(|a| -> Result<Affinity, FieldError> {
                Ok(Affinity {
                    client_ip: a.client_ip,
                    timeout: match a.timeout {
                        Some(t) => u64::from(positive("affinity.timeout", t)?),
                        None => DEFAULT_AFFINITY_TIMEOUT,
                    },
                })
            })
            .transpose()?;

        let health = self.health.as_ref().map(validate_health).transpose()?;

        let drain_timeout = match self.drain_timeout {
            Some(t) if t < 0 => {
                return Err(FieldError::new(
                    "drain_timeout",
                    format!("must be 0 or more seconds, got {t}"),
                ))
            }
            t => t.map(|t| t as u64),
        };

        if self.announce && vip.is_none() {
            return Err(FieldError::new(
                "announce",
                "needs a vip: only a VIP is announced (ARP/NDP)",
            ));
        }

        let mut backends: Vec<BackendConfig> = Vec::with_capacity(self.backends.len());
        for (i, b) in self.backends.iter().enumerate() {
            let at = format!("backend[{i}]");
            let addr = ip(&format!("{at}.addr"), &b.addr)?;
            // In-place NAT rewrites addresses without changing the header
            // format, so a service is one address family.
            let (other, what) = match (vip, backends.first()) {
                (Some(v), _) => (Some(v), "vip".to_string()),
                (None, Some(first)) => (Some(first.addr), "backend[0].addr".to_string()),
                (None, None) => (None, String::new()),
            };
            if let Some(o) = other {
                if o.is_ipv4() != addr.is_ipv4() {
                    return Err(FieldError::new(
                        format!("{at}.addr"),
                        format!(
                            "address family differs from {what} ({} vs {}): mixed address families in one service are not supported in this version",
                            family(addr),
                            family(o)
                        ),
                    ));
                }
            }
            let port_ = b.port.map(|p| port(&format!("{at}.port"), p)).transpose()?;
            let weight = match b.weight {
                None => DEFAULT_WEIGHT,
                Some(w) => weight(&format!("{at}.weight"), w)?,
            };
            if let Some(n) = &b.node {
                if n.is_empty() || n.len() > 128 || n.chars().any(char::is_whitespace) {
                    return Err(FieldError::new(
                        format!("{at}.node"),
                        format!("must be a node name (1..=128 characters, no spaces), got {n:?}"),
                    ));
                }
            }
            let cfg = BackendConfig {
                addr,
                port: port_,
                weight,
                node: b.node.clone(),
                routed: false,
            };
            for p in &publish {
                let key = cfg.key(p);
                if let Some(j) = backends
                    .iter()
                    .position(|o: &BackendConfig| o.key(p) == key)
                {
                    return Err(FieldError::new(
                        at,
                        format!("{key} is already listed as backend[{j}]"),
                    ));
                }
            }
            backends.push(cfg);
        }

        Ok(ServiceConfig {
            name: self.name.clone(),
            vip,
            publish,
            scheduler: self.scheduler.unwrap_or_default(),
            affinity,
            health,
            drain_timeout,
            allow_port_conflict: self.allow_port_conflict,
            announce: self.announce,
            backends,
        })
    }
}

fn validate_health(h: &HealthDef) -> Result<Health, FieldError> {
    let get = |name: &str, v: Option<i64>, default: u32| match v {
        Some(v) => positive(&format!("health.{name}"), v),
        None => Ok(default),
    };
    let interval_ms = get("interval_ms", h.interval_ms, 1000)?;
    let timeout_ms = get("timeout_ms", h.timeout_ms, 500.min(interval_ms / 2).max(1))?;
    if timeout_ms >= interval_ms {
        return Err(FieldError::new(
            "health.timeout_ms",
            format!("must be below interval_ms ({interval_ms}), got {timeout_ms}"),
        ));
    }
    let kind = h.kind.unwrap_or_default();
    let path = h.path.clone().unwrap_or_else(|| "/".to_string());
    if kind == HealthKind::Http && !path.starts_with('/') {
        return Err(FieldError::new(
            "health.path",
            format!("must start with '/', got {path:?}"),
        ));
    }
    Ok(Health {
        kind,
        path,
        interval_ms,
        timeout_ms,
        rise: get("rise", h.rise, 2)?,
        fall: get("fall", h.fall, 3)?,
    })
}

impl ConfigDef {
    /// Check the whole file. Error paths are absolute
    /// (`service[1].publish[0].port`).
    pub fn validate(&self) -> Result<Config, FieldError> {
        if let Some(n) = &self.node {
            if n.is_empty() {
                return Err(FieldError::new("node", "must not be empty"));
            }
        }
        for (key, list) in [
            ("interfaces", &self.interfaces),
            ("task_interfaces", &self.task_interfaces),
            ("announce_interfaces", &self.announce_interfaces),
        ] {
            for (i, ifname) in list.iter().enumerate() {
                if !valid_ifname(ifname) {
                    return Err(FieldError::new(
                        format!("{key}[{i}]"),
                        format!("invalid interface name {ifname:?}"),
                    ));
                }
            }
        }

        let advertise_addr = self
            .advertise_addr
            .as_deref()
            .map(|a| advertise_addr(a).map_err(|m| FieldError::new("advertise_addr", m)))
            .transpose()?;
        let etcd = self.etcd.as_ref().map(validate_etcd).transpose()?;
        let listen = self
            .metrics
            .as_ref()
            .and_then(|m| m.listen.as_deref())
            .unwrap_or(DEFAULT_METRICS_LISTEN);
        let listen = listen.parse().map_err(|_| {
            FieldError::new(
                "metrics.listen",
                format!("invalid socket address {listen:?}, expected IP:PORT"),
            )
        })?;

        let mut services = Vec::with_capacity(self.services.len());
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        let mut frontends: BTreeMap<Frontend, (usize, usize)> = BTreeMap::new();
        for (i, def) in self.services.iter().enumerate() {
            let at = format!("service[{i}]");
            let svc = def.validate().map_err(|e| e.within(&at))?;
            if let Some(j) = names.insert(&def.name, i) {
                return Err(FieldError::new(
                    format!("{at}.name"),
                    format!("duplicate service name {:?} (also service[{j}])", def.name),
                ));
            }
            for (k, p) in svc.publish.iter().enumerate() {
                for fe in svc.frontends(p) {
                    if let Some((j, l)) = frontends.insert(fe, (i, k)) {
                        return Err(FieldError::new(
                            format!("{at}.publish[{k}]"),
                            format!(
                                "frontend {fe} is already used by service[{j}] {:?} (publish[{l}])",
                                self.services[j].name
                            ),
                        ));
                    }
                }
            }
            services.push(svc);
        }

        Ok(Config {
            node: self.node.clone(),
            advertise_addr,
            interfaces: self.interfaces.clone(),
            task_interfaces: self.task_interfaces.clone(),
            announce_interfaces: self.announce_interfaces.clone(),
            dataplane: self.dataplane.unwrap_or_default(),
            xdp_mode: self.xdp_mode.unwrap_or_default(),
            bpffs: PathBuf::from(self.bpffs.as_deref().unwrap_or(DEFAULT_BPFFS)),
            etcd,
            docker: self.docker.as_ref().map(|d| DockerConfig {
                socket: PathBuf::from(d.socket.as_deref().unwrap_or(DEFAULT_DOCKER_SOCKET)),
            }),
            metrics: MetricsConfig { listen },
            conntrack: self
                .conntrack
                .as_ref()
                .map(ConntrackDef::validate)
                .transpose()?
                .unwrap_or_default(),
            dns: self
                .dns
                .as_ref()
                .map(DnsDef::validate)
                .transpose()?
                .unwrap_or_default(),
            socket_lb: self
                .socket_lb
                .as_ref()
                .and_then(|s| s.enabled)
                .unwrap_or(true),
            reconcile_interval: self
                .reconcile_interval
                .as_deref()
                .map(|d| duration_secs(d).map_err(|e| FieldError::new("reconcile_interval", e)))
                .transpose()?
                .unwrap_or(DEFAULT_RECONCILE_INTERVAL),
            services,
        })
    }
}

/// An advertised node address: a unicast address other nodes can route to
/// (not unspecified, loopback, multicast, broadcast or link-local).
pub fn advertise_addr(text: &str) -> Result<IpAddr, String> {
    let a: IpAddr = text
        .parse()
        .map_err(|_| format!("invalid IP address {text:?}"))?;
    let bad = match a {
        IpAddr::V4(v4) => {
            v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local()
        }
        IpAddr::V6(v6) => {
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    if bad {
        return Err(format!(
            "{a} is not an address other nodes can reach (unspecified, loopback, multicast, broadcast or link-local)"
        ));
    }
    Ok(a)
}

fn validate_etcd(e: &EtcdDef) -> Result<EtcdConfig, FieldError> {
    if e.endpoints.is_empty() {
        return Err(FieldError::new(
            "etcd.endpoints",
            "must list at least one URL",
        ));
    }
    for (i, url) in e.endpoints.iter().enumerate() {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(FieldError::new(
                format!("etcd.endpoints[{i}]"),
                format!("expected an http:// or https:// URL, got {url:?}"),
            ));
        }
    }
    let prefix = e.prefix.as_deref().unwrap_or(DEFAULT_ETCD_PREFIX);
    if !prefix.starts_with('/') || prefix.ends_with('/') {
        return Err(FieldError::new(
            "etcd.prefix",
            format!("must start with '/' and not end with '/', got {prefix:?}"),
        ));
    }
    let path = |s: &Option<String>| s.as_ref().map(PathBuf::from);
    Ok(EtcdConfig {
        endpoints: e.endpoints.clone(),
        prefix: prefix.to_string(),
        ca: path(&e.ca),
        cert: path(&e.cert),
        key: path(&e.key),
        username: e.username.clone(),
        password_file: path(&e.password_file),
        insecure: e.insecure.unwrap_or(false),
    })
}

// ---------------------------------------------------------------------
// Parsing and error location
// ---------------------------------------------------------------------

/// Parse and validate a configuration text.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let def: ConfigDef = toml::from_str(text).map_err(|e| {
        let index = KeyIndex::scan(text);
        let (line, path) = match e.span() {
            Some(span) => (
                Some(line_of(text, span.start)),
                index.path_at(span.start).unwrap_or_default(),
            ),
            None => (None, String::new()),
        };
        ConfigError::Invalid {
            line,
            path,
            message: one_line(e.message()),
        }
    })?;
    def.validate().map_err(|e| {
        let index = KeyIndex::scan(text);
        ConfigError::Invalid {
            line: index.offset_of(&e.path).map(|o| line_of(text, o)),
            path: e.path,
            message: one_line(&e.message),
        }
    })
}

/// Read, parse and validate a configuration file.
pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text)
}

/// An interface name the kernel accepts: 1 to 15 bytes (IFNAMSIZ is 16
/// with the terminating NUL), no `/`, no whitespace. The one rule for the
/// config file and `--iface`/`--task-iface`.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty() && name.len() <= 15 && !name.contains(|c: char| c == '/' || c.is_whitespace())
}

/// serde's messages name Rust types; say what the user writes instead.
fn one_line(s: &str) -> String {
    s.trim()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
        .replace("expected i64", "expected an integer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::plain;
    use crate::model::{BackendKey, BackendSpec, BackendState, ServiceKey, ServiceSpec};
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;

    const GOOD: &str = r#"
node = "node-1"
interfaces = ["eth0", "eth1"]
dataplane = "xdp"
xdp_mode = "generic"
bpffs = "/sys/fs/bpf/test"

[etcd]
endpoints = ["http://127.0.0.1:2379"]
# ca = "..."
username = "meshlb"

[docker]

[metrics]
listen = "0.0.0.0:9999"

[[service]]
name = "web"
vip = "10.96.0.10"
publish = [{ proto = "tcp", port = 80, target = 8000 }, { proto = "udp", port = 53 }]
scheduler = "maglev"
affinity = { client_ip = true, timeout = 600 }
health = { kind = "http", path = "/healthz", interval_ms = 1000, timeout_ms = 500, rise = 2, fall = 3 }
drain_timeout = 30

[[service.backend]]
addr = "10.0.1.2"

[[service.backend]]
addr = "10.0.2.2"
port = 9000
weight = 0

[[service]]
name = "db.v6"
vip = "fd00::10"
publish = [{ port = 5432 }]

[[service.backend]]
addr = "fd00::2"
weight = 300
"#;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    fn good_config_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.node.as_deref(), Some("node-1"));
        assert_eq!(c.interfaces, ["eth0", "eth1"]);
        assert_eq!(c.dataplane, DataplaneChoice::Xdp);
        assert_eq!(c.xdp_mode, XdpMode::Generic);
        assert_eq!(c.bpffs, PathBuf::from("/sys/fs/bpf/test"));
        let etcd = c.etcd.as_ref().unwrap();
        assert_eq!(etcd.prefix, DEFAULT_ETCD_PREFIX);
        assert_eq!(etcd.username.as_deref(), Some("meshlb"));
        assert_eq!(
            c.docker.as_ref().unwrap().socket,
            PathBuf::from(DEFAULT_DOCKER_SOCKET)
        );
        assert_eq!(c.metrics.listen, "0.0.0.0:9999".parse().unwrap());
        let web = &c.services[0];
        assert_eq!(web.scheduler, Scheduler::Maglev);
        assert_eq!(
            web.affinity,
            Some(Affinity {
                client_ip: true,
                timeout: 600
            })
        );
        assert_eq!(web.health.as_ref().unwrap().path, "/healthz");
        assert_eq!(web.drain_timeout, Some(30));
        assert_eq!(
            web.publish[1],
            Publish {
                proto: Proto::Udp,
                port: 53,
                target: 53
            }
        );
        assert_eq!(c.services[1].backends[0].weight, 300);
    }

    #[test]
    fn good_config_gives_desired_state() {
        let c = parse(GOOD).unwrap();
        let local: BTreeSet<IpAddr> = [v4(192, 168, 1, 10)].into();
        let d = c.desired_state(local.clone(), "node-1");
        assert_eq!(d.local_addrs, local);

        let up = |weight| BackendSpec {
            remote: false,
            weight,
            state: BackendState::Up,
        };
        let fe = |addr, port, proto| Frontend { addr, port, proto };
        let be = |addr, port| BackendKey { addr, port };
        let vip = Some(v4(10, 96, 0, 10));
        let v6: IpAddr = "fd00::10".parse().unwrap();
        let want: BTreeMap<ServiceKey, ServiceSpec> = [
            (
                ServiceKey {
                    name: "web".into(),
                    proto: Proto::Tcp,
                    port: 80,
                },
                ServiceSpec {
                    affinity_secs: 600,
                    frontends: [fe(vip, 80, Proto::Tcp), fe(None, 80, Proto::Tcp)].into(),
                    backends: [
                        (be(v4(10, 0, 1, 2), 8000), up(100)),
                        (be(v4(10, 0, 2, 2), 9000), up(0)),
                    ]
                    .into(),
                },
            ),
            (
                ServiceKey {
                    name: "web".into(),
                    proto: Proto::Udp,
                    port: 53,
                },
                ServiceSpec {
                    affinity_secs: 600,
                    frontends: [fe(vip, 53, Proto::Udp), fe(None, 53, Proto::Udp)].into(),
                    backends: [
                        (be(v4(10, 0, 1, 2), 53), up(100)),
                        (be(v4(10, 0, 2, 2), 9000), up(0)),
                    ]
                    .into(),
                },
            ),
            (
                ServiceKey {
                    name: "db.v6".into(),
                    proto: Proto::Tcp,
                    port: 5432,
                },
                ServiceSpec {
                    affinity_secs: 0,
                    frontends: [fe(Some(v6), 5432, Proto::Tcp), fe(None, 5432, Proto::Tcp)].into(),
                    backends: [(be("fd00::2".parse().unwrap(), 5432), up(300))].into(),
                },
            ),
        ]
        .into();
        assert_eq!(plain(&d.services), want);
    }

    #[test]
    fn defaults_apply() {
        let c = parse("").unwrap();
        assert_eq!(c.node, None);
        assert_eq!(c.dataplane, DataplaneChoice::Auto);
        assert_eq!(c.xdp_mode, XdpMode::Auto);
        assert_eq!(c.bpffs, PathBuf::from(DEFAULT_BPFFS));
        assert_eq!(c.metrics.listen, DEFAULT_METRICS_LISTEN.parse().unwrap());
        assert!(c.etcd.is_none() && c.docker.is_none() && c.services.is_empty());

        let c = parse(
            "[[service]]\nname = \"a\"\npublish = [{ port = 1 }]\nhealth = {}\n[[service.backend]]\naddr = \"10.0.0.1\"\n",
        )
        .unwrap();
        let s = &c.services[0];
        assert_eq!(s.scheduler, Scheduler::Maglev);
        assert_eq!(s.backends[0].weight, DEFAULT_WEIGHT);
        assert_eq!(s.backends[0].port, None);
        let h = s.health.as_ref().unwrap();
        assert_eq!(
            (h.kind, h.interval_ms, h.timeout_ms),
            (HealthKind::Tcp, 1000, 500)
        );
    }

    /// The .deb's /etc/meshlb/meshlb.toml: as shipped (all comments) it is
    /// the defaults; with every setting uncommented it is still valid and
    /// its values are the documented defaults.
    #[test]
    fn packaged_conffile_shows_the_defaults() {
        let shipped = include_str!("../../../xtask/package/meshlb.toml");
        assert_eq!(parse(shipped).unwrap(), parse("").unwrap());
        let uncommented: String = shipped
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.starts_with('[') || rest.contains(" = ") => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c = parse(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        let d = parse("").unwrap();
        assert_eq!(c.dataplane, d.dataplane);
        assert_eq!(c.xdp_mode, d.xdp_mode);
        assert_eq!(c.bpffs, d.bpffs);
        assert_eq!(c.metrics, d.metrics);
        assert_eq!(c.etcd.unwrap().prefix, DEFAULT_ETCD_PREFIX);
        assert_eq!(c.docker.unwrap().socket, Path::new(DEFAULT_DOCKER_SOCKET));
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.services[0].backends[0].weight, DEFAULT_WEIGHT);
    }

    #[test]
    fn reload_names_the_settings_that_need_a_restart() {
        let old =
            parse("interfaces = [\"eth0\"]\n[metrics]\nlisten = \"127.0.0.1:9742\"\n").unwrap();
        let same_services = parse(&format!(
            "interfaces = [\"eth0\"]\n[metrics]\nlisten = \"127.0.0.1:9742\"\n[conntrack]\nudp_timeout = \"5s\"\n{}",
            svc("")
        ))
        .unwrap();
        assert!(old.restart_needed(&same_services).is_empty());
        let changed = parse(
            "node = \"n9\"\ninterfaces = [\"eth1\"]\n[metrics]\nlisten = \"127.0.0.1:9743\"\n[conntrack]\nmax_flows = 1024\n",
        )
        .unwrap();
        assert_eq!(
            old.restart_needed(&changed),
            ["node", "metrics.listen", "conntrack.max_flows"]
        );
        let mut kept = changed.clone();
        kept.keep_restart_settings(&old);
        assert!(old.restart_needed(&kept).is_empty());
        // Interfaces change live: the reloaded list is kept.
        assert_eq!(kept.interfaces, ["eth1"]);
    }

    #[test]
    fn demo_config_is_valid() {
        let c = parse(DEMO_CONFIG).unwrap();
        assert_eq!(c.node, None);
        assert!(c.interfaces.is_empty());
        let whoami = &c.services[0];
        assert_eq!(whoami.name, "whoami");
        assert_eq!(whoami.vip, Some(v4(10, 96, 0, 10)));
        assert_eq!(whoami.backends.len(), 3);
        let d = c.desired_state(BTreeSet::new(), "node-1");
        assert_eq!(d.services.len(), 2);
    }

    /// One `[[service]]` with the given extra lines.
    fn svc(extra: &str) -> String {
        format!("[[service]]\nname = \"web\"\npublish = [{{ port = 80 }}]\n{extra}\n")
    }

    #[test]
    fn bad_configs_give_one_line_naming_the_field() {
        let two = |a: &str, b: &str| format!("{}{}", svc(a), b);
        let cases: Vec<(&str, String, &str, Option<usize>)> = vec![
            // (what, text, expected substring, expected line)
            ("syntax", "node = \"a\nx = 1\n".into(), "line 1", Some(1)),
            ("syntax in value", svc("vip = 10.0.0.1"), "service[0].vip", Some(4)),
            ("unknown top key", "nodes = \"a\"\n".into(), "unknown field `nodes`", Some(1)),
            ("unknown service key", svc("colour = \"red\""), "service[0].colour", Some(4)),
            (
                "unknown backend key",
                svc("[[service.backend]]\naddr = \"10.0.0.1\"\nprt = 1"),
                "service[0].backend[0].prt",
                Some(6),
            ),
            (
                "unknown key in inline table",
                svc("affinity = { client_ip = true, timout = 5 }"),
                "service[0].affinity.timout",
                Some(4),
            ),
            (
                "wrong type",
                "[[service]]\nname = \"web\"\npublish = [{ port = \"80\" }]\n".into(),
                "service[0].publish[0].port: invalid type: string \"80\", expected an integer",
                Some(3),
            ),
            (
                "port 0",
                "[[service]]\nname = \"web\"\npublish = [{ port = 0 }]\n".into(),
                "service[0].publish[0].port: must be 1..=65535, got 0",
                Some(3),
            ),
            (
                "port 70000",
                "[[service]]\nname = \"web\"\npublish = [{ port = 70000 }]\n".into(),
                "service[0].publish[0].port: must be 1..=65535, got 70000",
                Some(3),
            ),
            (
                "target 70000",
                "[[service]]\nname = \"web\"\npublish = [{ port = 80, target = 70000 }]\n".into(),
                "service[0].publish[0].target",
                Some(3),
            ),
            (
                "backend port",
                svc("[[service.backend]]\naddr = \"10.0.0.1\"\nport = -1"),
                "service[0].backend[0].port: must be 1..=65535",
                Some(6),
            ),
            (
                "bad vip",
                svc("vip = \"10.0.0.300\""),
                "service[0].vip: invalid IP address \"10.0.0.300\"",
                Some(4),
            ),
            (
                "loopback vip",
                svc("vip = \"127.0.0.5\""),
                "service[0].vip: 127.0.0.5 is loopback",
                Some(4),
            ),
            (
                "announce without a vip",
                svc("announce = true"),
                "service[0].announce: needs a vip",
                Some(4),
            ),
            (
                "broadcast vip",
                svc("vip = \"255.255.255.255\""),
                "service[0].vip: 255.255.255.255 is broadcast",
                Some(4),
            ),
            (
                "cloud metadata backend",
                svc("[[service.backend]]\naddr = \"169.254.169.254\""),
                "service[0].backend[0].addr: 169.254.169.254 is link-local",
                Some(5),
            ),
            (
                "IPv6 link-local backend",
                svc("[[service.backend]]\naddr = \"fe80::1\""),
                "service[0].backend[0].addr: fe80::1 is link-local",
                Some(5),
            ),
            (
                "IPv4-mapped loopback backend",
                svc("[[service.backend]]\naddr = \"::ffff:127.0.0.1\""),
                "service[0].backend[0].addr: ::ffff:127.0.0.1 is an IPv4-mapped",
                Some(5),
            ),
            (
                "bad backend address",
                svc("[[service.backend]]\naddr = \"node-3\""),
                "service[0].backend[0].addr: invalid IP address",
                Some(5),
            ),
            (
                "empty backend node",
                svc("[[service.backend]]\naddr = \"10.0.0.9\"\nnode = \"\""),
                "service[0].backend[0].node: must be a node name",
                Some(6),
            ),
            (
                "unknown scheduler",
                svc("scheduler = \"random\""),
                "service[0].scheduler",
                Some(4),
            ),
            (
                "61-char name",
                format!("[[service]]\nname = \"{}\"\npublish = [{{ port = 80 }}]\n", "a".repeat(61)),
                "service[0].name: must be 1..=60 characters, got 61",
                Some(2),
            ),
            (
                "empty name",
                "[[service]]\nname = \"\"\npublish = [{ port = 80 }]\n".into(),
                "service[0].name",
                Some(2),
            ),
            (
                "bad name chars",
                "[[service]]\nname = \"Web App\"\npublish = [{ port = 80 }]\n".into(),
                "service[0].name: invalid name \"Web App\"",
                Some(2),
            ),
            (
                "duplicate name",
                two("", "[[service]]\nname = \"web\"\npublish = [{ port = 81 }]\n"),
                "service[1].name: duplicate service name \"web\"",
                Some(6),
            ),
            (
                "duplicate node port",
                two("", "[[service]]\nname = \"api\"\npublish = [{ port = 80 }]\n"),
                "service[1].publish[0]: frontend *:80/tcp is already used by service[0] \"web\"",
                Some(7),
            ),
            (
                "duplicate publish in a service",
                "[[service]]\nname = \"web\"\npublish = [{ port = 80 }, { port = 80, target = 81 }]\n".into(),
                "service[0].publish[1]",
                Some(3),
            ),
            (
                "empty publish",
                "[[service]]\nname = \"web\"\npublish = []\n".into(),
                "service[0].publish: must list at least one port",
                Some(3),
            ),
            (
                "missing publish",
                "[[service]]\nname = \"web\"\n".into(),
                "missing field `publish`",
                None,
            ),
            (
                "negative weight",
                svc("[[service.backend]]\naddr = \"10.0.0.1\"\nweight = -1"),
                "service[0].backend[0].weight: must be 0..=10000, got -1",
                Some(6),
            ),
            (
                "too-big weight",
                svc("[[service.backend]]\naddr = \"10.0.0.1\"\nweight = 10001"),
                "service[0].backend[0].weight: must be 0..=10000, got 10001",
                Some(6),
            ),
            (
                "health timeout = interval",
                svc("health = { interval_ms = 500, timeout_ms = 500 }"),
                "service[0].health.timeout_ms: must be below interval_ms (500), got 500",
                Some(4),
            ),
            (
                "health zero rise",
                svc("health = { rise = 0 }"),
                "service[0].health.rise: must be a positive number",
                Some(4),
            ),
            (
                "mixed families with vip",
                svc("vip = \"10.96.0.1\"\n[[service.backend]]\naddr = \"fd00::1\""),
                "service[0].backend[0].addr: address family differs from vip",
                Some(6),
            ),
            (
                "mixed families without vip",
                svc("[[service.backend]]\naddr = \"10.0.0.1\"\n[[service.backend]]\naddr = \"fd00::1\""),
                "service[0].backend[1].addr: address family differs from backend[0].addr",
                Some(7),
            ),
            (
                "duplicate backend",
                svc("[[service.backend]]\naddr = \"10.0.0.1\"\n[[service.backend]]\naddr = \"10.0.0.1\"\nport = 80"),
                "service[0].backend[1]: 10.0.0.1:80 is already listed as backend[0]",
                Some(6),
            ),
            (
                "bad metrics listen",
                "[metrics]\nlisten = \"localhost\"\n".into(),
                "metrics.listen: invalid socket address",
                Some(2),
            ),
            (
                "etcd without endpoints list",
                "[etcd]\nendpoints = []\n".into(),
                "etcd.endpoints: must list at least one URL",
                Some(2),
            ),
            (
                "etcd bad URL",
                "[etcd]\nendpoints = [\"127.0.0.1:2379\"]\n".into(),
                "etcd.endpoints[0]: expected an http:// or https:// URL",
                Some(2),
            ),
            (
                "unknown dataplane",
                "dataplane = \"dpdk\"\n".into(),
                "dataplane",
                Some(1),
            ),
            (
                "bad interface",
                "interfaces = [\"eth0\", \"a-very-long-interface-name\"]\n".into(),
                "interfaces[1]: invalid interface name",
                Some(1),
            ),
            (
                "bad announce interface",
                "announce_interfaces = [\"eth/0\"]\n".into(),
                "announce_interfaces[0]: invalid interface name",
                Some(1),
            ),
            (
                "conntrack timeout without unit",
                "[conntrack]\nudp_timeout = \"30\"\n".into(),
                "conntrack.udp_timeout: invalid duration \"30\"",
                Some(2),
            ),
            (
                "conntrack timeout zero",
                "[conntrack]\ntcp_closing_timeout = \"0s\"\n".into(),
                "conntrack.tcp_closing_timeout: duration \"0s\" out of range",
                Some(2),
            ),
            (
                "conntrack max_flows too small",
                "[conntrack]\nmax_flows = 10\n".into(),
                "conntrack.max_flows: must be 1024 to",
                Some(2),
            ),
        ];
        for (what, text, want, line) in cases {
            let e = parse(&text).expect_err(what).to_string();
            assert!(!e.contains('\n'), "{what}: not one line: {e}");
            assert!(e.starts_with("config: "), "{what}: {e}");
            assert!(e.contains(want), "{what}: {e:?} lacks {want:?}");
            if let Some(l) = line {
                assert!(
                    e.contains(&format!("line {l}: ")),
                    "{what}: {e:?} not at line {l}"
                );
            }
            assert!(!e.ends_with('.'), "{what}: trailing period: {e}");
        }
    }

    #[test]
    fn conntrack_section_sets_timeouts_and_defaults_the_rest() {
        let c =
            parse("[conntrack]\nudp_timeout = \"3s\"\ntcp_timeout = \"2h\"\nmax_flows = 4096\n")
                .unwrap();
        assert_eq!(
            c.conntrack,
            ConntrackConfig {
                max_flows: 4096,
                tcp_timeout: 7200,
                tcp_closing_timeout: 10,
                udp_timeout: 3,
                snat_quarantine: 60,
                flood_threshold: 20_000,
            }
        );
        assert_eq!(parse("").unwrap().conntrack, ConntrackConfig::default());
        assert_eq!(duration_secs("90s"), Ok(90));
        assert_eq!(duration_secs("2m"), Ok(120));
        assert_eq!(duration_secs("1d"), Ok(86_400));
        for bad in [
            "",
            "s",
            "5",
            "-5s",
            "1.5m",
            "8d",
            "5 s",
            "99999999999999999999s",
        ] {
            assert!(duration_secs(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn scanner_locates_nested_keys() {
        let text = "a = 1\n[t]\nb = [1, { c = \"x,]\" , d = [2, 3] }]\n[[s]]\nn = '''\nx'''\n[[s]]\n[s.q]\nm.k = 5\n";
        let idx = KeyIndex::scan(text);
        let paths: Vec<&str> = idx.entries.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "a",
                "t",
                "t.b",
                "t.b[0]",
                "t.b[1]",
                "t.b[1].c",
                "t.b[1].d",
                "t.b[1].d[0]",
                "t.b[1].d[1]",
                "s[0]",
                "s[0].n",
                "s[1]",
                "s[1].q",
                "s[1].q.m.k"
            ]
        );
        let at = |p: &str| line_of(text, idx.offset_of(p).unwrap());
        assert_eq!(at("s[1].q.m.k"), 9);
        assert_eq!(at("t.b[1].d[1]"), 3);
        // Unknown paths fall back to their nearest written ancestor.
        assert_eq!(at("s[0].nope.deeper"), 4);
    }

    #[test]
    fn every_truncation_fails_cleanly() {
        // Each prefix of a good file is either valid or one error line;
        // the scanner that locates errors must never panic.
        let text = format!("{GOOD}x = \"\"\"a\\\"\"\"\"\ny = 'q'\n");
        for end in 0..text.len() {
            if let Err(e) = parse(&text[..end]) {
                let e = e.to_string();
                assert!(!e.contains('\n'), "prefix {end}: {e}");
            }
        }
    }

    #[test]
    fn load_reports_the_file() {
        let e = load("/nonexistent/meshlb.toml").unwrap_err().to_string();
        assert!(e.starts_with("config: /nonexistent/meshlb.toml: "), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn service_def_round_trips_through_json() {
        let c = parse(GOOD).unwrap();
        let def: ConfigDef = toml::from_str(GOOD).unwrap();
        let mut web = def.services[0].clone();
        web.backends.clear();
        let json = serde_json::to_string(&web).unwrap();
        assert!(!json.contains("backend"), "{json}");
        let back: ServiceDef = serde_json::from_str(&json).unwrap();
        assert_eq!(back, web);
        let mut want = c.services[0].clone();
        want.backends.clear();
        assert_eq!(back.validate().unwrap(), want);
    }
}
