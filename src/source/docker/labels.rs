//! Which tasks a container stands for: its opt-in labels (`meshlb.service`,
//! `meshlb.port`, `meshlb.weight`) or registrator-style variables
//! (`SERVICE_NAME`, `SERVICE_<port>_NAME`, `SERVICE_IGNORE`, in labels or
//! env), its state (running, not paused, healthy when it has a HEALTHCHECK)
//! and its addresses → task records (SPEC.md, "Docker registration"). Pure:
//! the watcher fills a [`ContainerInfo`] from Docker's inspect answer.
//!
//! Nothing is registered by default. A container whose labels cannot be
//! used yields one [`LabelError`] naming the container and the label, and no
//! task at all (never half of its ports).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::source::config;
use crate::source::etcd::layout::{TaskDef, TaskRecord, TaskSource, TaskState};

/// `meshlb.service=<name>`: opts the container in.
pub const LABEL_SERVICE: &str = "meshlb.service";
/// `meshlb.port=<container port>`: any port, exposed or not (optional when
/// exactly one port is exposed).
pub const LABEL_PORT: &str = "meshlb.port";
/// `meshlb.weight=<0..=10000>` (optional, default 100).
pub const LABEL_WEIGHT: &str = "meshlb.weight";
/// `meshlb.routable=true`: other nodes route to the container's own
/// address (a macvlan network, or routes the operator set up); without
/// it, a container registered by its own address (no published port, no
/// host network) is served by this node only (`TaskRecord::local`).
pub const LABEL_ROUTABLE: &str = "meshlb.routable";

/// A container's health as Docker reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Health {
    /// No HEALTHCHECK.
    #[default]
    None,
    Starting,
    Healthy,
    Unhealthy,
}

/// What registration needs to know of a container (from `docker inspect`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    /// The full container id.
    pub id: String,
    /// Its name, without Docker's leading `/`.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// Container ports it exposes (`EXPOSE`, `--expose`, `-p`), any protocol.
    pub exposed: BTreeSet<u16>,
    /// Container port → host port, for ports published on the host.
    pub published: BTreeMap<u16, u16>,
    /// Its IPv4 address on its network (the first network by name that has one).
    pub ipv4: Option<Ipv4Addr>,
    /// Its global IPv6 address, when its network has IPv6.
    pub ipv6: Option<Ipv6Addr>,
    /// `--network host`: it listens on the node's own addresses.
    pub host_network: bool,
    pub running: bool,
    pub paused: bool,
    pub health: Health,
    /// Its first process (`State.Pid`) while it runs: the way into its
    /// network namespace (`/proc/<pid>/ns/net`).
    pub pid: Option<u32>,
}

impl ContainerInfo {
    /// `name (id12)`, how errors and logs name a container.
    pub fn display(&self) -> String {
        let short = &self.id[..self.id.len().min(12)];
        if self.name.is_empty() {
            short.to_owned()
        } else {
            format!("{} ({short})", self.name)
        }
    }

    /// Whether it may take traffic now: running, not paused, and healthy
    /// if it has a HEALTHCHECK.
    pub fn serving(&self) -> bool {
        self.running && !self.paused && matches!(self.health, Health::None | Health::Healthy)
    }
}

/// One task a container stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub service: String,
    /// The container id, plus `-<port>` when it registers several ports.
    pub id: String,
    pub record: TaskRecord,
}

/// Why a container's opt-in could not be used. `Display` is one line naming
/// the container and the label (or variable) at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("container {container}: label {label}: {message}")]
    Label {
        container: String,
        label: String,
        message: String,
    },
    #[error("container {container}: no address to register (no IP on its networks)")]
    NoAddress { container: String },
}

impl LabelError {
    /// The container as named in the message.
    #[cfg(test)]
    pub fn container(&self) -> &str {
        match self {
            LabelError::Label { container, .. } | LabelError::NoAddress { container } => container,
        }
    }
}

/// Labels and env merged the way registrator reads them: env wins.
fn variables(c: &ContainerInfo) -> BTreeMap<String, String> {
    let mut v: BTreeMap<String, String> = c
        .labels
        .iter()
        .filter(|(k, _)| k.starts_with("SERVICE_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for e in &c.env {
        if let Some((k, val)) = e.split_once('=') {
            if k.starts_with("SERVICE_") {
                v.insert(k.to_owned(), val.to_owned());
            }
        }
    }
    v
}

/// The tasks `c` stands for right now: none when it has not opted in, has
/// opted out (`SERVICE_IGNORE`) or is not serving (stopped, paused,
/// starting or unhealthy). `node_addr` is this node's address, used for
/// published ports and host networking.
pub fn registrations(
    c: &ContainerInfo,
    node: &str,
    node_addr: Option<IpAddr>,
) -> Result<Vec<Registration>, LabelError> {
    if !c.serving() {
        return Ok(Vec::new());
    }
    let vars = variables(c);
    if vars.get("SERVICE_IGNORE").is_some_and(|v| !v.is_empty()) {
        return Ok(Vec::new());
    }
    let err = |label: &str, message: String| LabelError::Label {
        container: c.display(),
        label: label.to_owned(),
        message,
    };
    let field = |label: &str| {
        let label = label.to_owned();
        move |e: config::FieldError| err(&label, e.message)
    };
    let number = |label: &str, v: &str| {
        v.trim()
            .parse::<i64>()
            .map_err(|_| err(label, format!("{v:?} is not a number")))
    };
    let exposed_list = || {
        if c.exposed.is_empty() {
            "it exposes none: use EXPOSE, --expose or -p".to_owned()
        } else {
            let l: Vec<String> = c.exposed.iter().map(u16::to_string).collect();
            format!("it exposes {}", l.join(", "))
        }
    };
    let check_name = |label: &str, name: &str| {
        config::validate_name(name).map_err(|m| err(label, format!("service name {name:?}: {m}")))
    };

    // (service, container port, weight)
    let mut wanted: Vec<(String, u16, u32)> = Vec::new();
    if let Some(service) = c.labels.get(LABEL_SERVICE) {
        check_name(LABEL_SERVICE, service)?;
        let port = match c.labels.get(LABEL_PORT) {
            // The label names the port: no EXPOSE needed (as Traefik's
            // labels); registrator's SERVICE_<port>_NAME keeps needing it.
            Some(p) => {
                config::port(LABEL_PORT, number(LABEL_PORT, p)?).map_err(field(LABEL_PORT))?
            }
            None if c.exposed.len() == 1 => *c.exposed.iter().next().unwrap_or(&0),
            None => {
                return Err(err(
                    LABEL_PORT,
                    format!(
                        "missing, and the container does not expose exactly one port ({})",
                        exposed_list()
                    ),
                ))
            }
        };
        let weight = match c.labels.get(LABEL_WEIGHT) {
            Some(w) => config::weight(LABEL_WEIGHT, number(LABEL_WEIGHT, w)?)
                .map_err(field(LABEL_WEIGHT))?,
            None => config::DEFAULT_WEIGHT,
        };
        wanted.push((service.clone(), port, weight));
    } else if let Some(l) = [LABEL_PORT, LABEL_WEIGHT]
        .into_iter()
        .find(|l| c.labels.contains_key(*l))
    {
        return Err(err(
            LABEL_SERVICE,
            format!("missing ({l} is set; meshlb.service names the service)"),
        ));
    } else {
        // Registrator style: SERVICE_<port>_NAME per port, else SERVICE_NAME
        // for every exposed port (`<name>-<port>` when there are several).
        let mut per_port: BTreeMap<u16, (String, String)> = BTreeMap::new();
        let mut ignored: BTreeSet<u16> = BTreeSet::new();
        for (k, v) in &vars {
            let Some(mid) = k.strip_prefix("SERVICE_") else {
                continue;
            };
            let (p, what) = match mid.split_once('_') {
                Some((p, w)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (p, w),
                _ => continue,
            };
            let port = p
                .parse::<i64>()
                .map_err(|_| err(k, format!("port {p:?} is out of range")))
                .and_then(|n| config::port(k, n).map_err(field(k)))?;
            match what {
                "NAME" => {
                    if !c.exposed.contains(&port) {
                        return Err(err(
                            k,
                            format!(
                                "port {port} is not exposed by the container ({})",
                                exposed_list()
                            ),
                        ));
                    }
                    per_port.insert(port, (k.clone(), v.clone()));
                }
                "IGNORE" if !v.is_empty() => {
                    ignored.insert(port);
                }
                _ => {}
            }
        }
        let default = vars.get("SERVICE_NAME");
        if default.is_some() && c.exposed.is_empty() {
            return Err(err(
                "SERVICE_NAME",
                format!("no port to register ({})", exposed_list()),
            ));
        }
        let several = c.exposed.len() > 1;
        for &port in &c.exposed {
            if ignored.contains(&port) {
                continue;
            }
            let (label, name) = match (per_port.get(&port), default) {
                (Some((k, n)), _) => (k.clone(), n.clone()),
                (None, Some(n)) if several => ("SERVICE_NAME".to_owned(), format!("{n}-{port}")),
                (None, Some(n)) => ("SERVICE_NAME".to_owned(), n.clone()),
                (None, None) => continue,
            };
            check_name(&label, &name)?;
            wanted.push((name, port, config::DEFAULT_WEIGHT));
        }
    }
    if wanted.is_empty() {
        return Ok(Vec::new());
    }

    let container_addr: Option<IpAddr> = c
        .ipv4
        .map(IpAddr::V4)
        .or(c.ipv6.map(IpAddr::V6))
        .or(if c.host_network { node_addr } else { None });
    let routable = match c.labels.get(LABEL_ROUTABLE).map(|v| v.trim()) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => return Err(err(LABEL_ROUTABLE, format!("{v:?}: must be true or false"))),
    };
    let several = wanted.len() > 1;
    let mut out = Vec::with_capacity(wanted.len());
    for (service, cport, weight) in wanted {
        // Other nodes reach a published port at this node's address, and
        // a host-networked container there too; the container's own
        // address (a Docker bridge: the same 172.17.0.0/16 on every node)
        // only from this node, unless labelled routable.
        let (addr, port, local) = match (c.published.get(&cport), node_addr) {
            (Some(&host_port), Some(a)) if !c.host_network => (a, host_port, false),
            _ => (
                container_addr.ok_or_else(|| LabelError::NoAddress {
                    container: c.display(),
                })?,
                cport,
                !c.host_network && !routable,
            ),
        };
        let def = TaskDef {
            addr: addr.to_string(),
            port: Some(i64::from(port)),
            weight: Some(i64::from(weight)),
            node: Some(node.to_owned()),
            state: Some(TaskState::Running),
            source: Some(TaskSource::Docker),
            local,
        };
        let record = def.validate().map_err(|e| err(&e.path, e.message))?;
        let id = if several {
            format!("{}-{cport}", c.id)
        } else {
            c.id.clone()
        };
        out.push(Registration {
            service,
            id,
            record,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const NODE_ADDR: &str = "192.168.1.10";

    /// A running container named "c1" at 172.17.0.2 exposing `ports`.
    fn container(ports: &[u16]) -> ContainerInfo {
        ContainerInfo {
            id: ID.into(),
            name: "c1".into(),
            exposed: ports.iter().copied().collect(),
            ipv4: Some(Ipv4Addr::new(172, 17, 0, 2)),
            running: true,
            ..Default::default()
        }
    }

    fn labels(c: ContainerInfo, l: &[(&str, &str)]) -> ContainerInfo {
        ContainerInfo {
            labels: l
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..c
        }
    }

    fn env(c: ContainerInfo, e: &[&str]) -> ContainerInfo {
        ContainerInfo {
            env: e.iter().map(std::string::ToString::to_string).collect(),
            ..c
        }
    }

    /// (service, id suffix after the container id, addr, port, weight)
    type Want = Vec<(&'static str, &'static str, &'static str, u16, u32)>;

    fn run(c: &ContainerInfo) -> Result<Vec<Registration>, LabelError> {
        registrations(c, "n1", Some(NODE_ADDR.parse().unwrap()))
    }

    #[test]
    fn a_bridge_address_is_local_to_this_node_unless_published_or_routable() {
        let web = labels(container(&[8000]), &[(LABEL_SERVICE, "web")]);
        let local = |c: &ContainerInfo| {
            run(c).map(|r| r.iter().map(|r| r.record.local).collect::<Vec<_>>())
        };
        assert_eq!(local(&web), Ok(vec![true]));
        let published = ContainerInfo {
            published: [(8000, 18000)].into(),
            ..web.clone()
        };
        assert_eq!(local(&published), Ok(vec![false]));
        let host = ContainerInfo {
            host_network: true,
            ipv4: None,
            ..web.clone()
        };
        assert_eq!(local(&host), Ok(vec![false]));
        let routable = labels(
            container(&[8000]),
            &[(LABEL_SERVICE, "web"), (LABEL_ROUTABLE, "true")],
        );
        assert_eq!(local(&routable), Ok(vec![false]));
        let bad = labels(
            container(&[8000]),
            &[(LABEL_SERVICE, "web"), (LABEL_ROUTABLE, "yes")],
        );
        let e = run(&bad).expect_err("bad label").to_string();
        assert!(e.contains(LABEL_ROUTABLE), "{e}");
    }

    #[test]
    fn opted_in_containers_become_tasks() {
        let published = ContainerInfo {
            published: [(8000, 18000)].into(),
            ..container(&[8000])
        };
        let v6_only = ContainerInfo {
            ipv4: None,
            ipv6: Some("fd00:17::2".parse().unwrap()),
            ..container(&[8000])
        };
        let host_net = ContainerInfo {
            ipv4: None,
            host_network: true,
            ..container(&[8000])
        };
        let healthy = ContainerInfo {
            health: Health::Healthy,
            ..container(&[8000])
        };
        let cases: Vec<(&str, ContainerInfo, Want)> = vec![
            ("no labels", container(&[8000]), vec![]),
            (
                "unrelated labels and env",
                env(
                    labels(container(&[8000]), &[("a", "b")]),
                    &["PATH=/bin", "X"],
                ),
                vec![],
            ),
            (
                "service + port",
                labels(
                    container(&[8000, 9000]),
                    &[("meshlb.service", "web"), ("meshlb.port", "9000")],
                ),
                vec![("web", "", "172.17.0.2", 9000, 100)],
            ),
            (
                "an explicit port needs no EXPOSE (Traefik's convention)",
                labels(
                    container(&[8000]),
                    &[("meshlb.service", "web"), ("meshlb.port", "9000")],
                ),
                vec![("web", "", "172.17.0.2", 9000, 100)],
            ),
            (
                "an explicit port of a container that exposes none",
                labels(
                    container(&[]),
                    &[("meshlb.service", "web"), ("meshlb.port", "8000")],
                ),
                vec![("web", "", "172.17.0.2", 8000, 100)],
            ),
            (
                "port defaults to the only exposed one",
                labels(container(&[8000]), &[("meshlb.service", "web")]),
                vec![("web", "", "172.17.0.2", 8000, 100)],
            ),
            (
                "weight",
                labels(
                    container(&[8000]),
                    &[("meshlb.service", "web"), ("meshlb.weight", "0")],
                ),
                vec![("web", "", "172.17.0.2", 8000, 0)],
            ),
            (
                "published port: node address and host port",
                labels(
                    published.clone(),
                    &[("meshlb.service", "web"), ("meshlb.port", "8000")],
                ),
                vec![("web", "", NODE_ADDR, 18000, 100)],
            ),
            (
                "IPv6 when that is the container's address",
                labels(v6_only, &[("meshlb.service", "web")]),
                vec![("web", "", "fd00:17::2", 8000, 100)],
            ),
            (
                "host network: the node's address",
                labels(host_net, &[("meshlb.service", "web")]),
                vec![("web", "", NODE_ADDR, 8000, 100)],
            ),
            (
                "healthy",
                labels(healthy, &[("meshlb.service", "web")]),
                vec![("web", "", "172.17.0.2", 8000, 100)],
            ),
            (
                "registrator SERVICE_NAME, one port",
                env(container(&[8000]), &["SERVICE_NAME=api"]),
                vec![("api", "", "172.17.0.2", 8000, 100)],
            ),
            (
                "registrator SERVICE_NAME, two ports: name-port, id-port",
                env(container(&[8000, 8001]), &["SERVICE_NAME=api"]),
                vec![
                    ("api-8000", "-8000", "172.17.0.2", 8000, 100),
                    ("api-8001", "-8001", "172.17.0.2", 8001, 100),
                ],
            ),
            (
                "registrator SERVICE_<port>_NAME wins, SERVICE_<port>_IGNORE skips",
                env(
                    container(&[8000, 8001, 8002]),
                    &[
                        "SERVICE_NAME=api",
                        "SERVICE_8001_NAME=admin",
                        "SERVICE_8002_IGNORE=1",
                    ],
                ),
                vec![
                    ("api-8000", "-8000", "172.17.0.2", 8000, 100),
                    ("admin", "-8001", "172.17.0.2", 8001, 100),
                ],
            ),
            (
                "registrator SERVICE_<port>_NAME only",
                env(container(&[8000, 8001]), &["SERVICE_8001_NAME=admin"]),
                vec![("admin", "", "172.17.0.2", 8001, 100)],
            ),
            (
                "registrator variables as labels, env wins",
                env(
                    labels(container(&[8000]), &[("SERVICE_NAME", "fromlabel")]),
                    &["SERVICE_NAME=fromenv"],
                ),
                vec![("fromenv", "", "172.17.0.2", 8000, 100)],
            ),
            (
                "registrator's other variables are not ports",
                env(
                    container(&[8000]),
                    &["SERVICE_NAME=api", "SERVICE_CHECK_HTTP=/", "SERVICE_TAGS=x"],
                ),
                vec![("api", "", "172.17.0.2", 8000, 100)],
            ),
            (
                "SERVICE_IGNORE opts out, labels too",
                env(
                    labels(container(&[8000]), &[("meshlb.service", "web")]),
                    &["SERVICE_NAME=api", "SERVICE_IGNORE=1"],
                ),
                vec![],
            ),
            (
                "meshlb labels win over registrator variables",
                env(
                    labels(container(&[8000]), &[("meshlb.service", "web")]),
                    &["SERVICE_NAME=api"],
                ),
                vec![("web", "", "172.17.0.2", 8000, 100)],
            ),
        ];
        for (what, c, want) in cases {
            let got = run(&c).unwrap_or_else(|e| panic!("{what}: {e}"));
            let got: Vec<(String, String, String, u16, u32)> = got
                .iter()
                .map(|r| {
                    assert_eq!(r.record.node.as_deref(), Some("n1"), "{what}");
                    assert_eq!(r.record.source, TaskSource::Docker, "{what}");
                    assert_eq!(r.record.state, TaskState::Running, "{what}");
                    (
                        r.service.clone(),
                        r.id.strip_prefix(ID).unwrap_or("?").to_owned(),
                        r.record.addr.to_string(),
                        r.record.port.unwrap_or(0),
                        r.record.weight,
                    )
                })
                .collect();
            let want: Vec<(String, String, String, u16, u32)> = want
                .into_iter()
                .map(|(s, i, a, p, w)| (s.into(), i.into(), a.into(), p, w))
                .collect();
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn containers_not_serving_register_nothing() {
        let web = labels(container(&[8000]), &[("meshlb.service", "web")]);
        for (what, c) in [
            (
                "stopped",
                ContainerInfo {
                    running: false,
                    ..web.clone()
                },
            ),
            (
                "paused",
                ContainerInfo {
                    paused: true,
                    ..web.clone()
                },
            ),
            (
                "health starting",
                ContainerInfo {
                    health: Health::Starting,
                    ..web.clone()
                },
            ),
            (
                "unhealthy",
                ContainerInfo {
                    health: Health::Unhealthy,
                    ..web.clone()
                },
            ),
        ] {
            assert_eq!(run(&c), Ok(vec![]), "{what}");
        }
        // Not serving: bad labels are not even looked at (no log noise for
        // a container that is going away).
        let bad = labels(
            container(&[8000]),
            &[("meshlb.service", "web"), ("meshlb.port", "x")],
        );
        assert_eq!(
            run(&ContainerInfo {
                running: false,
                ..bad
            }),
            Ok(vec![])
        );
    }

    #[test]
    fn bad_labels_give_one_line_naming_container_and_label() {
        let cases: Vec<(&str, ContainerInfo, &str, &str)> = vec![
            // (what, container, label, expected substring)
            (
                "non-numeric port",
                labels(
                    container(&[8000]),
                    &[("meshlb.service", "web"), ("meshlb.port", "http")],
                ),
                "meshlb.port",
                "\"http\" is not a number",
            ),
            (
                "port 0",
                labels(
                    container(&[8000]),
                    &[("meshlb.service", "web"), ("meshlb.port", "0")],
                ),
                "meshlb.port",
                "must be 1..=65535, got 0",
            ),
            (
                "port 70000",
                labels(
                    container(&[8000]),
                    &[("meshlb.service", "web"), ("meshlb.port", "70000")],
                ),
                "meshlb.port",
                "must be 1..=65535, got 70000",
            ),
            (
                "port ambiguous",
                labels(container(&[8000, 8001]), &[("meshlb.service", "web")]),
                "meshlb.port",
                "missing",
            ),
            (
                "weight not a number",
                labels(
                    container(&[8000]),
                    &[("meshlb.service", "web"), ("meshlb.weight", "heavy")],
                ),
                "meshlb.weight",
                "\"heavy\" is not a number",
            ),
            (
                "weight too big",
                labels(
                    container(&[8000]),
                    &[("meshlb.service", "web"), ("meshlb.weight", "10001")],
                ),
                "meshlb.weight",
                "must be 0..=10000, got 10001",
            ),
            (
                "negative weight",
                labels(
                    container(&[8000]),
                    &[("meshlb.service", "web"), ("meshlb.weight", "-1")],
                ),
                "meshlb.weight",
                "got -1",
            ),
            (
                "bad service name",
                labels(container(&[8000]), &[("meshlb.service", "Web App")]),
                "meshlb.service",
                "service name \"Web App\"",
            ),
            (
                "port without service",
                labels(container(&[8000]), &[("meshlb.port", "8000")]),
                "meshlb.service",
                "missing (meshlb.port is set",
            ),
            (
                "registrator port not exposed",
                env(container(&[8000]), &["SERVICE_9000_NAME=api"]),
                "SERVICE_9000_NAME",
                "port 9000 is not exposed",
            ),
            (
                "registrator port out of range",
                env(container(&[8000]), &["SERVICE_99999_NAME=api"]),
                "SERVICE_99999_NAME",
                "must be 1..=65535, got 99999",
            ),
            (
                "registrator name without a port",
                env(container(&[]), &["SERVICE_NAME=api"]),
                "SERVICE_NAME",
                "no port to register",
            ),
            (
                "registrator bad name",
                env(container(&[8000]), &["SERVICE_NAME=API!"]),
                "SERVICE_NAME",
                "service name \"API!\"",
            ),
        ];
        for (what, c, label, want) in cases {
            let e = run(&c).expect_err(what);
            let line = e.to_string();
            assert!(
                line.starts_with(&format!("container c1 ({}): label {label}: ", &ID[..12])),
                "{what}: {line}"
            );
            assert!(line.contains(want), "{what}: {line:?} lacks {want:?}");
            assert!(
                !line.contains('\n') && !line.ends_with('.'),
                "{what}: {line:?}"
            );
            assert_eq!(e.container(), format!("c1 ({})", &ID[..12]), "{what}");
        }
        let nowhere = ContainerInfo {
            ipv4: None,
            ..labels(container(&[8000]), &[("meshlb.service", "web")])
        };
        let e = run(&nowhere).unwrap_err();
        assert!(matches!(e, LabelError::NoAddress { .. }), "{e}");
        assert!(e.to_string().contains("c1"), "{e}");
    }
}
