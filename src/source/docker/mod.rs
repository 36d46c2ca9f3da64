//! Docker auto-registration (`meshlb run --docker[=SOCKET]`): this node's
//! opted-in containers become tasks in etcd, under the node's lease.
//!
//! The watcher subscribes to Docker's container events first, then lists
//! the running containers and resyncs (so no event falls between the list
//! and the stream), then follows the events: `start`, `unpause` and
//! `health_status` re-read the container; a `kill` with a stopping signal
//! (what `docker stop` sends first) marks its tasks draining; `die`,
//! `stop`, `pause` and `destroy` remove them. A broken connection to
//! dockerd is retried with a capped backoff, and every (re)connect resyncs:
//! registrations that match no running opted-in container are removed,
//! missing ones added. Registrations stay as they are while dockerd is
//! unreachable.
//!
//! * [`labels`] — pure: a container's labels/env/state → task records.
//! * [`registrar`] — the etcd side: puts and deletes under the node lease.

pub mod labels;
pub mod registrar;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerInspectResponse, EventMessage, HealthStatusEnum};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use bollard::{Docker, API_DEFAULT_VERSION};
use futures::StreamExt;
use tokio::sync::watch;

use self::labels::{ContainerInfo, Health, Registration};
use self::registrar::Registrar;
use crate::source::etcd::layout::TaskState;
use crate::source::etcd::EtcdOptions;

/// Timeout of one Docker API request (the event stream's body is exempt).
const DOCKER_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A full resync now and then, in case an event was missed.
const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// `kill` signals that stop a container: its tasks drain until it dies.
const STOP_SIGNALS: &[&str] = &[
    "15", "9", "2", "3", "SIGTERM", "SIGKILL", "SIGINT", "SIGQUIT", "TERM", "KILL", "INT", "QUIT",
];

/// What the registrar needs to know of this node.
#[derive(Clone, Debug)]
pub struct DockerOptions {
    /// The Docker API socket (`unix://` prefix allowed).
    pub socket: PathBuf,
    /// This node's name (the `node` of its tasks).
    pub node: String,
    /// This node's address: registered for published ports.
    pub node_addr: Option<IpAddr>,
}

/// Errors talking to dockerd.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("docker {socket}: {message}")]
    Api { socket: String, message: String },
    #[error("docker {socket}: {what} timed out")]
    Timeout { socket: String, what: &'static str },
}

/// The key of `Watcher::warned` for a container reported as reachable
/// from this node only.
fn local_key(id: &str) -> String {
    format!("local:{id}")
}

/// The watcher's memory between events.
struct Watcher {
    opts: DockerOptions,
    docker: Docker,
    /// Containers whose bad labels (key: the id) or node-local address
    /// (key: `local_key`) were already reported (one line each).
    warned: BTreeSet<String>,
    /// Containers being stopped: their tasks stay draining until they die.
    stopping: BTreeSet<String>,
    /// Whether the lease channel still has a sender.
    lease_open: bool,
    /// Running containers' first process, by id: for the socket-level
    /// balancer, which serves their network namespaces.
    pids: watch::Sender<Pids>,
}

/// Running containers' first process (`State.Pid`), by container id.
pub type Pids = BTreeMap<String, u32>;

/// Runs until aborted: keeps this node's container registrations in etcd
/// under the lease published on `lease` (by `etcd::watch::keep_node`),
/// and the running containers' first processes on `pids`.
pub async fn run(
    opts: DockerOptions,
    etcd: EtcdOptions,
    mut lease: watch::Receiver<Option<i64>>,
    pids: watch::Sender<Pids>,
) {
    let mut reg = Registrar::new(etcd, opts.node.clone());
    reg.set_lease(*lease.borrow_and_update());
    let socket = opts.socket.display().to_string();
    let mut backoff = BACKOFF_MIN;
    let mut reported = false;
    let mut warned = BTreeSet::new();
    loop {
        match connect(&opts.socket).await {
            Ok(docker) => {
                log::info!("docker {socket}: connected; resyncing this node's registrations");
                let mut w = Watcher {
                    opts: opts.clone(),
                    docker,
                    warned: std::mem::take(&mut warned),
                    stopping: BTreeSet::new(),
                    lease_open: true,
                    pids: pids.clone(),
                };
                reported = false;
                backoff = BACKOFF_MIN;
                let e = w.follow(&mut reg, &mut lease).await;
                warned = w.warned;
                log::warn!("{e}; reconnecting (registrations kept meanwhile)");
            }
            Err(e) if !reported => {
                log::warn!("{e}; retrying");
                reported = true;
            }
            Err(e) => log::debug!("{e}"),
        }
        // Keep the registrations' lease current while dockerd is away.
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                r = lease.changed() => {
                    if r.is_err() {
                        return;
                    }
                    reg.set_lease(*lease.borrow_and_update());
                }
                () = sleep_until(reg.due()) => reg.converge().await,
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn connect(socket: &std::path::Path) -> Result<Docker, DockerError> {
    let s = socket.display().to_string();
    let api = |e: BollardError| DockerError::Api {
        socket: s.clone(),
        message: e.to_string().replace('\n', " "),
    };
    let docker = Docker::connect_with_unix(&s, DOCKER_TIMEOUT.as_secs(), API_DEFAULT_VERSION)
        .map_err(api)?;
    // dockerd 20.10 speaks API 1.41: talk its version.
    tokio::time::timeout(DOCKER_TIMEOUT, docker.negotiate_version())
        .await
        .map_err(|_| DockerError::Timeout {
            socket: s.clone(),
            what: "version negotiation",
        })?
        .map_err(api)
}

impl Watcher {
    fn err(&self, e: BollardError) -> DockerError {
        DockerError::Api {
            socket: self.opts.socket.display().to_string(),
            message: e.to_string().replace('\n', " "),
        }
    }

    /// Subscribes, resyncs, then follows events until the stream breaks.
    async fn follow(
        &mut self,
        reg: &mut Registrar,
        lease: &mut watch::Receiver<Option<i64>>,
    ) -> DockerError {
        let filters: HashMap<String, Vec<String>> =
            [("type".to_owned(), vec!["container".to_owned()])].into();
        let mut events = self.docker.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }));
        if let Err(e) = self.resync(reg).await {
            return e;
        }
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.tick().await;
        loop {
            tokio::select! {
                ev = events.next() => match ev {
                    Some(Ok(ev)) => {
                        if let Err(e) = self.handle(reg, ev).await {
                            return e;
                        }
                    }
                    Some(Err(e)) => return self.err(e),
                    None => {
                        return DockerError::Api {
                            socket: self.opts.socket.display().to_string(),
                            message: "event stream closed".into(),
                        }
                    }
                },
                r = lease.changed(), if self.lease_open => match r {
                    Ok(()) => reg.set_lease(*lease.borrow_and_update()),
                    // The daemon is stopping.
                    Err(_) => self.lease_open = false,
                },
                () = sleep_until(reg.due()) => reg.converge().await,
                _ = resync.tick() => {
                    if let Err(e) = self.resync(reg).await {
                        return e;
                    }
                }
            }
        }
    }

    /// Lists the running containers and makes etcd hold exactly theirs.
    async fn resync(&mut self, reg: &mut Registrar) -> Result<(), DockerError> {
        let list = tokio::time::timeout(
            DOCKER_TIMEOUT,
            self.docker.list_containers(Some(ListContainersOptions {
                all: false,
                ..Default::default()
            })),
        )
        .await
        .map_err(|_| self.timeout("list containers"))?
        .map_err(|e| self.err(e))?;
        let mut all = Vec::new();
        let mut running = BTreeSet::new();
        let mut pids = Pids::new();
        for c in list {
            let Some(id) = c.id else { continue };
            running.insert(id.clone());
            if let Some(info) = self.inspect(&id).await? {
                if let Some(pid) = info.pid.filter(|_| info.running) {
                    pids.insert(id.clone(), pid);
                }
                let stopping = self.stopping.contains(&id);
                all.extend(self.registrations(&info).into_iter().map(|mut r| {
                    // Still running, but being stopped: it keeps draining.
                    if stopping {
                        r.record.state = TaskState::Draining;
                    }
                    (id.clone(), r)
                }));
            }
        }
        self.stopping.retain(|id| running.contains(id));
        self.pids.send_if_modified(|p| {
            let changed = *p != pids;
            *p = pids;
            changed
        });
        let n = all.len();
        reg.replace_all(all).await;
        log::info!(
            "docker {}: resynced: {} running containers, {n} registrations",
            self.opts.socket.display(),
            running.len()
        );
        Ok(())
    }

    fn timeout(&self, what: &'static str) -> DockerError {
        DockerError::Timeout {
            socket: self.opts.socket.display().to_string(),
            what,
        }
    }

    /// `None` when the container no longer exists.
    async fn inspect(&self, id: &str) -> Result<Option<ContainerInfo>, DockerError> {
        match tokio::time::timeout(DOCKER_TIMEOUT, self.docker.inspect_container(id, None)).await {
            Err(_) => Err(self.timeout("inspect")),
            Ok(Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            })) => Ok(None),
            Ok(Err(e)) => Err(self.err(e)),
            Ok(Ok(r)) => Ok(Some(container_info(id, r))),
        }
    }

    /// The container's registrations; bad labels are reported once per
    /// container and register nothing.
    fn registrations(&mut self, c: &ContainerInfo) -> Vec<Registration> {
        match labels::registrations(c, &self.opts.node, self.opts.node_addr) {
            Ok(r) => {
                let local: Vec<String> = r
                    .iter()
                    .filter(|r| r.record.local)
                    .map(|r| format!("{}:{}", r.record.addr, r.record.port.unwrap_or(0)))
                    .collect();
                if !local.is_empty() && self.warned.insert(local_key(&c.id)) {
                    log::warn!(
                        "docker: container {}: {} only reachable from this node (a Docker bridge network): served by this node only; publish the port (-p) to serve through every node, or label {}=true if other nodes route to it",
                        c.display(),
                        local.join(", "),
                        labels::LABEL_ROUTABLE
                    );
                }
                r
            }
            Err(e) => {
                if self.warned.insert(c.id.clone()) {
                    log::warn!("docker: {e}; container skipped");
                }
                Vec::new()
            }
        }
    }

    async fn refresh(&mut self, reg: &mut Registrar, id: &str) -> Result<(), DockerError> {
        let info = self.inspect(id).await?;
        self.set_pid(id, info.as_ref().and_then(|i| i.pid.filter(|_| i.running)));
        let regs = match info {
            Some(info) => self.registrations(&info),
            None => Vec::new(),
        };
        reg.set_container(id, regs).await;
        Ok(())
    }

    /// Records (or, `None`, forgets) container `id`'s first process.
    fn set_pid(&self, id: &str, pid: Option<u32>) {
        self.pids.send_if_modified(|p| match pid {
            Some(pid) => p.insert(id.to_owned(), pid) != Some(pid),
            None => p.remove(id).is_some(),
        });
    }

    async fn handle(&mut self, reg: &mut Registrar, ev: EventMessage) -> Result<(), DockerError> {
        let Some(actor) = ev.actor else { return Ok(()) };
        let Some(id) = actor.id else { return Ok(()) };
        let action = ev.action.unwrap_or_default();
        let verb = action.split(':').next().unwrap_or("").trim();
        log::debug!("docker event {action} {id}");
        match verb {
            "start" => {
                self.stopping.remove(&id);
                self.refresh(reg, &id).await?;
            }
            // A container being stopped stays draining whatever it reports.
            "unpause" | "health_status" | "update" | "rename" if !self.stopping.contains(&id) => {
                self.refresh(reg, &id).await?;
            }
            "kill" => {
                let signal = actor
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get("signal"))
                    .map_or("", String::as_str);
                if STOP_SIGNALS.contains(&signal) && reg.has_container(&id) {
                    self.stopping.insert(id.clone());
                    reg.drain_container(&id).await;
                }
            }
            "die" | "stop" | "pause" | "destroy" => {
                if verb != "pause" {
                    self.stopping.remove(&id);
                }
                if verb == "destroy" {
                    self.warned.remove(&id);
                    self.warned.remove(&local_key(&id));
                }
                if verb != "pause" {
                    self.set_pid(&id, None);
                }
                reg.set_container(&id, Vec::new()).await;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Docker's inspect answer → what registration looks at.
pub fn container_info(id: &str, r: ContainerInspectResponse) -> ContainerInfo {
    let config = r.config.unwrap_or_default();
    let state = r.state.unwrap_or_default();
    let net = r.network_settings.unwrap_or_default();
    let port_of = |k: &str| k.split('/').next().and_then(|p| p.parse::<u16>().ok());
    let mut exposed: BTreeSet<u16> = config
        .exposed_ports
        .unwrap_or_default()
        .iter()
        .filter_map(|k| port_of(k))
        .collect();
    let mut published = BTreeMap::new();
    for (k, bindings) in net.ports.unwrap_or_default() {
        let Some(p) = port_of(&k) else { continue };
        exposed.insert(p);
        let host = bindings
            .unwrap_or_default()
            .iter()
            .find_map(|b| b.host_port.as_deref().and_then(|h| h.parse::<u16>().ok()))
            .filter(|h| *h != 0);
        if let Some(h) = host {
            published.entry(p).or_insert(h);
        }
    }
    let mut networks: Vec<_> = net.networks.unwrap_or_default().into_iter().collect();
    networks.sort_by(|a, b| a.0.cmp(&b.0));
    let ipv4 = networks.iter().find_map(|(_, e)| {
        e.ip_address
            .as_deref()
            .filter(|s| !s.is_empty())
            .and_then(|s| s.parse().ok())
    });
    let ipv6 = networks.iter().find_map(|(_, e)| {
        e.global_ipv6_address
            .as_deref()
            .filter(|s| !s.is_empty())
            .and_then(|s| s.parse().ok())
    });
    let health = match state.health.and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => Health::Starting,
        Some(HealthStatusEnum::HEALTHY) => Health::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
        _ => Health::None,
    };
    ContainerInfo {
        id: r.id.unwrap_or_else(|| id.to_owned()),
        name: r
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        env: config.env.unwrap_or_default(),
        exposed,
        published,
        ipv4,
        ipv6,
        host_network: r
            .host_config
            .and_then(|h| h.network_mode)
            .is_some_and(|m| m == "host"),
        running: state.running.unwrap_or(false),
        paused: state.paused.unwrap_or(false),
        pid: state
            .pid
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0),
        health,
    }
}
