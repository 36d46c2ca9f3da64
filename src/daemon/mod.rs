//! `meshlb run`: the node daemon. Loads the config, attaches (or adopts)
//! the data plane, reconciles, then keeps it in sync: SIGHUP reloads the
//! config, etcd snapshots (when `--etcd` is given) are applied as they
//! come, this node's addresses are re-read periodically, this node's
//! opted-in Docker containers are registered in etcd (`--docker`), health
//! checks take failing backends out for new flows (`health`), drained
//! backends leave after their drain timeout (`drain`), SIGTERM/SIGINT
//! stop the daemon. Stopping never detaches forwarding: the pinned maps and
//! links (or the IPVS table) keep working, and the next daemon adopts them.
//!
//! One loop serves every engine (`run_engine`, generic over
//! [`Engine`]): XDP, or IPVS when asked for or when XDP cannot load.

pub(crate) mod announce;
pub(crate) mod dns;
pub(crate) mod metrics;
pub(crate) mod prober;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::control::drain::DrainTimers;
use crate::control::health;
use crate::control::nodenet;
use crate::control::nodenet::{Attach, NodeNet};
use crate::engine::ipvs::IpvsEngine;
use crate::engine::xdp::XdpDataplane;
use crate::engine::{DataplaneError, DataplaneKind, Engine, ServiceConfigs};
use crate::kernel::{listeners, netlink};
use crate::model::config::{Config, DataplaneChoice, ServiceConfig, XdpMode};
use crate::model::counters::Registry;
use crate::model::Role;
use crate::model::{DesiredState, ServiceKey};
use crate::source::config::{self};
use crate::source::docker::{self, DockerOptions};
use crate::source::etcd::layout::NodeRecord;
use crate::source::etcd::layout::{Changes, DesiredCache};
use crate::source::etcd::watch::{keep_node, run_source, Snapshot, Update, UPDATES};
use crate::source::etcd::EtcdOptions;
use crate::source::guard::{self, NodeGuard, PortKey};
use prober::Checker;

/// How often this node's links, addresses and routes are re-read: node
/// ports follow the addresses, attached interfaces the links (a bridge
/// created later is attached within this period).
const NET_REFRESH: Duration = Duration::from_secs(1);

/// Why the daemon stopped with an error. `Usage` maps to exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The command line or the config is wrong (exit status 2).
    #[error("{0}")]
    Usage(String),
    /// The data plane failed while the daemon was doing `what`.
    #[error("{what}: {source}")]
    Engine {
        what: &'static str,
        #[source]
        source: DataplaneError,
    },
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Xdp(#[from] crate::engine::xdp::XdpError),
    #[error(transparent)]
    Netlink(#[from] crate::kernel::netlink::NetlinkError),
    #[error(transparent)]
    Ipvs(#[from] crate::kernel::ipvs::IpvsError),
    #[error("metrics listen: {0}")]
    MetricsListen(#[source] std::io::Error),
    /// Signal handlers, sockets.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The settled options of one daemon: config file merged with flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config_path: Option<PathBuf>,
    pub node: String,
    /// `--advertise-addr` (or the config's `advertise_addr`).
    pub advertise_addr: Option<IpAddr>,
    /// The listed interfaces (`--iface`, else the config's `interfaces`),
    /// named task interfaces included; more are attached automatically
    /// (`nodenet::wanted_ifaces`).
    pub ifaces: Vec<String>,
    /// Named task interfaces (`--task-iface`, else `task_interfaces`).
    pub task_ifaces: Vec<String>,
    /// `--announce-iface`, else `announce_interfaces` (empty: chosen by
    /// `announce_ifaces`).
    pub announce_ifaces: Vec<String>,
    /// The interface lists came from the command line: a reloaded config
    /// does not change them.
    pub ifaces_from_cli: bool,
    pub xdp_mode: XdpMode,
    pub bpffs: PathBuf,
    pub metrics: Option<SocketAddr>,
    /// The etcd source, when configured.
    pub etcd: Option<EtcdOptions>,
    /// The Docker API socket whose containers are registered (needs etcd).
    pub docker: Option<PathBuf>,
    /// Drain timeout of services without their own (`None`: drain forever).
    pub drain_timeout: Option<Duration>,
    /// XDP, IPVS, or XDP falling back to IPVS.
    pub dataplane: DataplaneChoice,
    /// `--socket-lb` / `[socket_lb] enabled`.
    pub socket_lb: bool,
    /// `--dns` / `[dns] listen`: where the DNS view is served.
    pub dns: Vec<SocketAddr>,
    /// `[dns] zone`.
    pub dns_zone: String,
}

/// The config file; without one, an empty config when etcd is the source
/// (etcd alone says what to forward). With neither, a usage error: a node
/// never programs services nobody asked for.
pub fn load_config(path: Option<&PathBuf>, with_etcd: bool) -> Result<Config, DaemonError> {
    let usage = |e: config::ConfigError| DaemonError::Usage(e.to_string());
    match path {
        Some(p) => config::load(p).map_err(usage),
        None if with_etcd => config::parse("").map_err(usage),
        None => Err(DaemonError::Usage(
            "run: needs --config FILE or --etcd URL (or [etcd] in a config): nothing says what to forward"
                .into(),
        )),
    }
}

/// The listed interfaces (`ifaces`, then the named task interfaces not
/// among them) and the named task interfaces.
pub fn listed(ifaces: &[String], tasks: &[String]) -> (Vec<String>, Vec<String>) {
    let mut all = ifaces.to_vec();
    for t in tasks {
        if !all.contains(t) {
            all.push(t.clone());
        }
    }
    (all, tasks.to_vec())
}

/// What the daemon keeps beside the data plane between syncs: health
/// checks and drain timers (they decide backend states), and the local
/// backends of the last desired state (their interfaces are attached).
struct Liveness {
    checker: Checker,
    drains: DrainTimers,
    /// `--drain-timeout`: for services without their own.
    drain_default: Option<Duration>,
    /// Local backend address -> a service of theirs.
    local_backends: BTreeMap<IpAddr, Arc<str>>,
    /// Local backend addresses the last syncs added to `local_backends`
    /// alone: their interfaces may need attaching (`Node::sync`).
    local_joined: Vec<IpAddr>,
    /// The last sync changed `local_backends` (compared in place: at 10k
    /// services a copy per sync cost more than the rest of the sync).
    local_changed: bool,
    /// This node's facts that etcd services are checked against
    /// (`guard`), refreshed with the node's network.
    guard: NodeGuard,
    /// The published ports programmed by the last sync: not checked
    /// against listeners again (meshlb's data plane holds them now).
    programmed_ports: BTreeSet<PortKey>,
    /// etcd services refused on this node, with why (logged and counted
    /// once, when refused).
    refused: BTreeMap<String, String>,
    /// Socket inode -> the process holding it, as found (`listeners::owner`).
    owners: BTreeMap<u64, String>,
    /// When `guard.listeners` was read.
    listeners_at: Option<std::time::Instant>,
    registry: Arc<Registry>,
    /// Every etcd service must be checked against this node again at the
    /// next sync (`refuse_etcd`): its addresses or gateways changed.
    recheck: bool,
    /// With `--dns`: where each sync's desired state goes.
    dns: Option<DnsPublisher>,
    /// With etcd: the announced VIPs of each sync go to the announcer,
    /// and the interfaces to announce on.
    announce: Option<AnnounceFeed>,
}

/// What the loop tells the VIP announcer (`announce::run`).
struct AnnounceFeed {
    vips: watch::Sender<BTreeSet<IpAddr>>,
    ifaces: watch::Sender<Vec<String>>,
}

impl AnnounceFeed {
    /// The VIPs of the announced services this node serves (not those it
    /// refuses).
    fn publish(&self, services: &ServiceConfigs<'_>, refused: &BTreeMap<String, String>) {
        let vips: BTreeSet<IpAddr> = services
            .iter()
            .filter(|s| s.announce && !refused.contains_key(&s.name))
            .filter_map(|s| s.vip)
            .collect();
        self.vips.send_if_modified(|v| {
            let changed = *v != vips;
            *v = vips;
            changed
        });
    }
}

/// Where the announced VIPs this node owns are held: the listed announce
/// interfaces, else the uplink holding the node address, else the first
/// uplink.
fn announce_ifaces(
    settings: &Settings,
    attach: &[Attach],
    addrs: &[(u32, IpAddr)],
    links: &[nodenet::LinkFacts],
    node_addr: Option<IpAddr>,
) -> Vec<String> {
    if !settings.announce_ifaces.is_empty() {
        return settings.announce_ifaces.clone();
    }
    let uplinks: Vec<&Attach> = attach.iter().filter(|a| a.role == Role::Uplink).collect();
    let holder = node_addr.and_then(|na| {
        let index = addrs.iter().find(|(_, a)| *a == na)?.0;
        let name = &links.iter().find(|l| l.index == index)?.name;
        uplinks
            .iter()
            .find(|a| &a.name == name)
            .map(|a| a.name.clone())
    });
    holder
        .or_else(|| uplinks.first().map(|a| a.name.clone()))
        .into_iter()
        .collect()
}

/// Resolves at `t`; never without one.
async fn until(t: Option<std::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Makes the engine hold the desired state; returns the number of
/// changes. With an etcd source, nothing is applied before its first
/// list: a restarted daemon must not wipe the state it adopted because
/// etcd is down at that moment. The health checker is pointed at the
/// backends of the desired state first, and those it reports down are
/// programmed `Down` (no new flows; established flows are kept).
/// Backends draining longer than their drain timeout are left out, and
/// the engine ends the flows still on them; so are etcd services this node
/// refuses (`refuse_etcd`).
///
/// With etcd, the desired state is the one `DesiredCache` keeps up to
/// date, borrowed: it is copied only when this sync must change it (a
/// refused service, an expired drain, a backend down), and each step
/// below looks only at what the last etcd change touched.
async fn sync<E: Engine>(
    engine: &mut E,
    cfg: &Config,
    cluster: &mut Cluster,
    locals: &BTreeSet<IpAddr>,
    node: &str,
    live: &mut Liveness,
    cache: &mut DesiredCache,
) -> Result<usize, DaemonError> {
    let touched = match cluster {
        Cluster::Etcd(snap) => snap.take_touched(),
        _ => None,
    };
    let cluster = &*cluster;
    let (mut desired, changes, etcd) = match cluster {
        Cluster::Waiting => return Ok(0),
        Cluster::Static => (
            Cow::Owned(cfg.desired_state(locals.clone(), node)),
            None,
            None,
        ),
        Cluster::Etcd(snap) => {
            snap.state
                .desired_cached(&cfg.services, locals.clone(), node, cache, touched.as_ref());
            let changes = cache.changes().clone();
            (
                Cow::Borrowed(cache.desired()),
                Some(changes),
                Some(snap.state.services()),
            )
        }
    };
    let services = ServiceConfigs::new(&cfg.services, etcd);
    let mut refused_changed = false;
    if let (Cluster::Etcd(snap), Some(changes)) = (cluster, &changes) {
        refused_changed = refuse_etcd(&mut desired, cfg, snap, changes, live);
    }
    // The ports programmed, as of this sync: recounted only when the
    // services or the refused ones changed.
    let keys_changed = changes.as_ref().is_none_or(|c| c.full || c.keys) || refused_changed;
    if keys_changed {
        live.programmed_ports = desired.services.keys().map(|k| (k.proto, k.port)).collect();
    }
    // Before anything can fail, so a passed deadline is never left armed.
    let draining = changes.as_ref().map(|_| cache.draining());
    let expired = live.drains.apply(
        &mut desired,
        draining,
        |name| {
            services
                .get(name)
                .and_then(|s| s.drain_timeout)
                .map(Duration::from_secs)
                .or(live.drain_default)
        },
        std::time::Instant::now(),
    );
    let rt = |what: &'static str, source: DataplaneError| DaemonError::Engine { what, source };
    let held_down = engine
        .held_down(&desired)
        .await
        .map_err(|e| rt("observe data plane", e))?;
    // The services with a health check: with etcd, the ones the cache
    // knows of, not a walk over every service.
    let checked: Vec<(&str, &crate::model::config::Health)> = match changes {
        Some(_) => cfg
            .services
            .iter()
            .map(|s| s.name.as_str())
            .chain(cache.checked().iter().map(String::as_str))
            .filter_map(|n| services.get(n))
            .filter_map(|s| s.health.as_ref().map(|h| (s.name.as_str(), h)))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect(),
        None => services
            .iter()
            .filter_map(|s| s.health.as_ref().map(|h| (s.name.as_str(), h)))
            .collect(),
    };
    live.checker
        .set_targets(&health::targets(&desired, &checked, &held_down));
    health::mark_down(&mut desired, &live.checker.down());
    // The local backends: after an etcd change alone, updated by the
    // addresses that `DesiredCache` says left or joined; recomputed when
    // anything else may have changed them.
    match changes.as_ref() {
        Some(c) if !c.full && !refused_changed && expired.is_empty() => {
            for a in &c.local_gone {
                live.local_backends.remove(a);
            }
            for (a, name) in &c.local_joined {
                if live.local_backends.insert(*a, name.clone()).is_none() {
                    live.local_joined.push(*a);
                }
            }
        }
        _ => {
            let local = local_backends(&desired);
            if local != live.local_backends {
                live.local_backends = local;
                live.local_changed = true;
            }
        }
    }
    if let Some(d) = live.dns.as_mut() {
        d.publish(&desired);
    }
    // The announced VIPs change only with the services (or the refused
    // ones): not looked for after an etcd event that touched tasks alone.
    let services_changed = changes
        .as_ref()
        .is_none_or(|c| c.full || !c.names.is_empty());
    if let Some(a) = live
        .announce
        .as_ref()
        .filter(|_| services_changed || refused_changed)
    {
        a.publish(&services, &live.refused);
    }
    engine
        .sync(&desired, &services, &expired)
        .await
        .map_err(|e| rt("apply", e))
}

/// Binds and starts the DNS server when `--dns` names addresses: the
/// publisher the loop feeds it through, and its tasks.
async fn start_dns(
    settings: &Settings,
    registry: &Arc<Registry>,
) -> Result<(Option<DnsPublisher>, Vec<AbortOnDrop<()>>), DaemonError> {
    if settings.dns.is_empty() {
        return Ok((None, Vec::new()));
    }
    let zone = crate::control::dns::Zone::new(&settings.dns_zone).map_err(DaemonError::Usage)?;
    let zone = Arc::new(zone);
    let listeners = dns::bind(&settings.dns)
        .await
        .map_err(|e| DaemonError::Io(std::io::Error::other(e)))?;
    let (tx, rx) = watch::channel(Arc::new(crate::control::dns::DnsView::default()));
    let mut tasks = Vec::new();
    for l in listeners {
        log::info!("dns: zone {} on {} (udp and tcp)", zone.name(), l.addr);
        tasks.push(AbortOnDrop(tokio::spawn(dns::serve(
            l,
            zone.clone(),
            rx.clone(),
            registry.clone(),
        ))));
    }
    Ok((Some(DnsPublisher { tx, serial: 0 }), tasks))
}

/// Hands the DNS server (`dns`) each desired state as it is programmed,
/// health and drain applied: a snapshot per sync, numbered (the SOA
/// serial).
struct DnsPublisher {
    tx: watch::Sender<Arc<crate::control::dns::DnsView>>,
    serial: u32,
}

impl DnsPublisher {
    fn publish(&mut self, desired: &DesiredState) {
        self.serial = self.serial.wrapping_add(1);
        let view = crate::control::dns::DnsView::new(desired.clone(), self.serial);
        self.tx.send_replace(Arc::new(view));
    }
}

/// Writes the recent sync latencies beside the pin lock, for `status`.
fn write_sync_latency(pins: &std::path::Path, registry: &Registry) {
    let Some(l) = registry.sync_latency() else {
        return;
    };
    let path = crate::kernel::pinlock::runtime_file(pins, crate::engine::xdp::inspect::SYNC_EXT);
    let text = serde_json::to_string(&l).unwrap_or_default();
    if let Err(e) = crate::kernel::pinlock::write_atomic(&path, text.as_bytes()) {
        log::debug!("{}: {e}", path.display());
    }
}

/// Writes the announced VIPs and their owners beside the pin lock, for
/// `status`.
fn write_vips(pins: &std::path::Path, list: &[crate::model::status::VipStatus]) {
    let path = crate::kernel::pinlock::runtime_file(pins, crate::engine::xdp::inspect::VIPS_EXT);
    let text = serde_json::to_string(list).unwrap_or_default();
    if let Err(e) = crate::kernel::pinlock::write_atomic(&path, text.as_bytes()) {
        log::debug!("{}: {e}", path.display());
    }
}

/// How long a read of this node's listeners serves etcd syncs.
const LISTENERS_FRESH: Duration = Duration::from_secs(1);

/// Leaves out of `desired` the etcd services this node refuses
/// (`guard::refusal`: a VIP on a node address or gateway, a published port
/// something here listens on); each is logged and counted when refused,
/// and logged again when it no longer is. The others are served. Only
/// the services `changes` names and those refused before are checked,
/// unless the desired state was rebuilt or this node's addresses changed
/// (`live.recheck`). Returns whether the refused set changed.
fn refuse_etcd(
    desired: &mut Cow<'_, DesiredState>,
    cfg: &Config,
    snap: &Snapshot,
    changes: &Changes,
    live: &mut Liveness,
) -> bool {
    let all = changes.full || live.recheck;
    live.recheck = false;
    let is_static = |n: &str| cfg.services.iter().any(|s| s.name == n);
    let etcd: Vec<&ServiceConfig> = if all {
        snap.state
            .services()
            .values()
            .map(std::convert::AsRef::as_ref)
            .filter(|s| !is_static(&s.name))
            .collect()
    } else {
        changes
            .names
            .iter()
            .chain(live.refused.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|n| snap.state.services().get(n))
            .map(std::convert::AsRef::as_ref)
            .filter(|s| !is_static(&s.name))
            .collect()
    };
    let unchecked = |s: &&ServiceConfig| {
        !s.allow_port_conflict
            && s.publish
                .iter()
                .any(|p| !live.programmed_ports.contains(&(p.proto, p.port)))
    };
    // Read at most once per LISTENERS_FRESH: a burst of etcd events with
    // a refused service among them reads /proc/net once.
    let stale = live
        .listeners_at
        .is_none_or(|t| t.elapsed() >= LISTENERS_FRESH);
    if stale && etcd.iter().any(unchecked) {
        live.guard.listeners = listeners::read();
        live.listeners_at = Some(std::time::Instant::now());
    }
    let mut refused = if all {
        BTreeMap::new()
    } else {
        let mut r = live.refused.clone();
        for s in &etcd {
            r.remove(&s.name);
        }
        r.retain(|n, _| snap.state.services().contains_key(n));
        r
    };
    // One /proc walk per socket, not per sync.
    let owners = &mut live.owners;
    let mut owner = |inode| {
        owners
            .entry(inode)
            .or_insert_with(|| listeners::owner(inode))
            .clone()
    };
    for s in etcd {
        if let Some(why) = guard::refusal(s, &live.guard, &live.programmed_ports, &mut owner) {
            refused.insert(s.name.clone(), why);
        }
    }
    let held: BTreeSet<u64> = live.guard.listeners.iter().map(|l| l.inode).collect();
    live.owners.retain(|i, _| held.contains(i));
    for name in refused.keys() {
        let keys: Vec<ServiceKey> = desired
            .services
            .range(ServiceKey::first_of(name)..)
            .take_while(|(k, _)| &k.name == name)
            .map(|(k, _)| k.clone())
            .collect();
        if !keys.is_empty() {
            let d = desired.to_mut();
            for k in &keys {
                d.services.remove(k);
            }
        }
    }
    for (name, why) in &refused {
        if live.refused.get(name) != Some(why) {
            log::warn!("etcd services/{name}: {why}: not programmed on this node");
            live.registry.config_error("node_policy");
        }
    }
    for name in live.refused.keys().filter(|n| !refused.contains_key(*n)) {
        log::info!("etcd services/{name}: no longer refused on this node");
    }
    let changed = refused != live.refused;
    live.refused = refused;
    changed
}

/// The local backends of `desired` (address -> the first service naming
/// it): their interfaces are task interfaces.
fn local_backends(desired: &DesiredState) -> BTreeMap<IpAddr, Arc<str>> {
    let mut out = BTreeMap::new();
    for (key, spec) in &desired.services {
        // One shared name per service, not one per address.
        let mut name: Option<Arc<str>> = None;
        for (bk, b) in &spec.backends {
            if !b.remote {
                out.entry(bk.addr).or_insert_with(|| {
                    name.get_or_insert_with(|| key.name.as_str().into()).clone()
                });
            }
        }
    }
    out
}

/// Where services come from now.
enum Cluster {
    /// Static config only.
    Static,
    /// An etcd source that has not listed yet.
    Waiting,
    /// The cluster as etcd's updates built it (`Snapshot::apply`).
    Etcd(Snapshot),
}

/// Waits for the next update from etcd; never resolves without a source
/// (or once it is gone).
async fn next_update(rx: &mut Option<mpsc::Receiver<Update>>) -> Update {
    match rx {
        Some(r) => match r.recv().await {
            Some(u) => u,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

impl<E: Engine> Node<E> {
    /// Applies `first` and the updates already waiting behind it, up to
    /// a channel's worth (a burst becomes one sync, and a source that
    /// never stops still lets syncs happen); returns whether the cluster
    /// changed.
    fn take_updates(
        &mut self,
        first: Update,
        rx: &mut Option<mpsc::Receiver<Update>>,
        prefix: &str,
    ) -> bool {
        let mut changed = false;
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(u) = next {
            taken += 1;
            changed |= match (&mut self.cluster, u) {
                (Cluster::Etcd(snap), u) => snap.apply(u, prefix, &self.live.registry),
                (_, Update::Listed(snap)) => {
                    self.cluster = Cluster::Etcd(snap);
                    true
                }
                // Nothing is listed yet: events cannot come first.
                (_, Update::Events { .. }) => false,
            };
            next = rx
                .as_mut()
                .filter(|_| taken < UPDATES)
                .and_then(|r| r.try_recv().ok());
        }
        changed
    }
}

/// Runs the daemon until `shutdown` resolves or SIGTERM/SIGINT arrives:
/// opens the engine (`--dataplane`: XDP, IPVS, or XDP falling back to
/// IPVS) and runs the one loop with it.
/// One BPF map (descriptor) per service ring: raise the open-files limit
/// before anything is opened, and say what it is.
fn raise_open_files() {
    use crate::kernel::rlimit::{raise_nofile, WANTED_NOFILE};
    match raise_nofile() {
        Ok(n) if n.now >= WANTED_NOFILE && n.now > n.before => {
            log::info!("open-files limit raised from {} to {}", n.before, n.now);
        }
        Ok(n) if n.now < WANTED_NOFILE => log::warn!(
            "open-files limit {} (the hard limit; {} wanted): each service's Maglev ring holds a descriptor, so past about {} services rings cannot be created; raise LimitNOFILE",
            n.now,
            WANTED_NOFILE,
            n.now.saturating_sub(256)
        ),
        Ok(_) => {}
        Err(e) => log::warn!("open-files limit: could not raise it: {e}"),
    }
}

pub async fn run(
    settings: Settings,
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    // Held until this function returns (the kernel drops it if we die).
    let lock = crate::kernel::pinlock::acquire(&settings.bpffs)
        .map_err(|e| DaemonError::Usage(e.to_string()))?;
    log::debug!("pin directory lock {}", lock.path().display());
    raise_open_files();
    tokio::pin!(shutdown);
    if !wait_for_interfaces(&settings.ifaces, &mut shutdown).await? {
        log::info!("stopped while waiting for interfaces: nothing was attached");
        return Ok(());
    }
    let locals = netlink::local_addrs().await?;
    if let Some(a) = settings.advertise_addr {
        if !locals.contains(&a) {
            return Err(DaemonError::Usage(format!(
                "--advertise-addr: {a} is not an address of this node"
            )));
        }
    }
    check_static(&cfg, None).await.map_err(DaemonError::Usage)?;
    let metrics_listener = metrics::bind(settings.metrics)
        .await
        .map_err(DaemonError::MetricsListen)?;
    let ipvs = async || {
        let state = PathBuf::from(IPVS_STATE_DIR).join(format!("{}.ipvs", settings.node));
        let engine = IpvsEngine::open(state, VIP_DEVICE).await?;
        log::info!(
            "node {}: data plane ipvs (VIPs on {VIP_DEVICE})",
            settings.node
        );
        if settings.socket_lb {
            log::info!(
                "socket-level balancing: off ({})",
                crate::engine::ipvs::IPVS_LOCAL_CLIENTS
            );
        }
        Ok::<_, DaemonError>(engine)
    };
    if settings.dataplane == DataplaneChoice::Ipvs {
        let engine = ipvs().await?;
        return run_engine(engine, settings, cfg, shutdown, metrics_listener).await;
    }
    // The local backends' interfaces follow at the first sync.
    let facts = Facts::read().await?;
    let attach = wanted(&settings, &BTreeMap::new(), &facts);
    if !attach.iter().any(|a| a.role == Role::Uplink) {
        log::warn!(
            "no uplink: no interface listed and no default route; one is attached when it appears"
        );
    }
    match XdpDataplane::open(
        &settings.bpffs,
        &attach,
        settings.xdp_mode,
        &settings.node,
        &cfg.conntrack,
    ) {
        Ok(mut dp) => {
            dp.set_socket_lb(settings.socket_lb);
            if settings.docker.is_none() {
                // No containers to serve: an earlier daemon's go.
                dp.set_socket_namespaces(&BTreeMap::new());
            }
            log::info!(
                "node {}: data plane {} on {} (pinned under {})",
                settings.node,
                Engine::kind(&dp).as_str(),
                names(&attach).join(","),
                settings.bpffs.display()
            );
            for a in &attach {
                log::info!("iface {}: {} ({})", a.name, a.role.as_str(), a.why);
            }
            allow_local_source(&names(&attach));
            let _next_hops = AbortOnDrop(tokio::spawn(follow_next_hops(settings.bpffs.clone())));
            Box::pin(run_engine(dp, settings, cfg, shutdown, metrics_listener)).await
        }
        Err(e) if settings.dataplane == DataplaneChoice::Auto => {
            log::warn!("XDP unavailable ({e}); dataplane auto: falling back to IPVS");
            let engine = ipvs().await?;
            run_engine(engine, settings, cfg, shutdown, metrics_listener).await
        }
        Err(e) => Err(e.into()),
    }
}

/// Keeps the data path's next-hop cache true while the daemon runs: each
/// burst of neighbour, route or link changes of this namespace makes every
/// cached next hop stale (`maps::NEXT_HOP_GEN`), so the next packet to
/// each backend asks the FIB. Without it (no rtnetlink events, or the
/// daemon gone) cached next hops still expire by age (`NH_MAX_AGE`).
async fn follow_next_hops(bpffs: PathBuf) {
    use futures::{FutureExt, StreamExt};
    let mut generation = match crate::kernel::pinned::next_hop_gen(&bpffs) {
        Ok(g) => g,
        Err(e) => {
            log::warn!("next-hop cache: {e}; cached next hops expire by age only (~2 s)");
            return;
        }
    };
    let mut changes = match netlink::next_hop_changes() {
        Ok(c) => c,
        Err(e) => {
            log::warn!("next-hop cache: {e}; cached next hops expire by age only (~2 s)");
            return;
        }
    };
    while changes.next().await.is_some() {
        // One bump for what is already queued.
        while let Some(Some(_)) = changes.next().now_or_never() {}
        if let Err(e) = crate::kernel::pinned::bump_next_hop_gen(&mut generation) {
            log::warn!("next-hop cache: {e}");
        }
    }
    log::warn!(
        "next-hop cache: rtnetlink events ended; cached next hops expire by age only (~2 s)"
    );
}

/// The network namespaces of running containers, by cookie, each with a
/// path into it (its first process's); one line for a container whose
/// namespace cannot be read (it may have just ended).
fn container_namespaces(pids: &docker::Pids) -> BTreeMap<u64, PathBuf> {
    pids.iter()
        .filter_map(|(id, pid)| {
            let path = crate::kernel::netns::of_pid(*pid);
            match crate::kernel::netns::cookie_of(&path) {
                Ok(c) => Some((c, path)),
                Err(e) => {
                    let short = &id[..id.len().min(12)];
                    log::debug!(
                        "container {short}: network namespace {}: {e}",
                        path.display()
                    );
                    None
                }
            }
        })
        .collect()
}

/// The names of `attach`, in order.
fn names(attach: &[Attach]) -> Vec<String> {
    attach.iter().map(|a| a.name.clone()).collect()
}

/// The interfaces this node's data plane should be attached to now.
fn wanted(
    settings: &Settings,
    local_backends: &BTreeMap<IpAddr, Arc<str>>,
    f: &Facts,
) -> Vec<Attach> {
    let inputs = nodenet::IfaceInputs {
        listed: &settings.ifaces,
        named_tasks: &settings.task_ifaces,
        docker: settings.docker.is_some(),
        local_backends,
        never: &[VIP_DEVICE],
    };
    nodenet::wanted_ifaces(&inputs, &f.links, &f.routes)
}

/// One daemon's state in its loop: the engine and what it is told.
struct Node<E: Engine> {
    engine: E,
    settings: Settings,
    cfg: Config,
    cluster: Cluster,
    /// This node's addresses.
    locals: BTreeSet<IpAddr>,
    live: Liveness,
    /// The desired state from etcd of the last sync, kept up to date
    /// service by service.
    desired_cache: DesiredCache,
    /// The interfaces wanted at the last look, in order.
    attach: Vec<Attach>,
    /// What the last look at the node's network found.
    facts: Option<Facts>,
    /// Services the engine could not fit in its tables, and why (logged
    /// and counted once, when rejected).
    rejected: BTreeMap<ServiceKey, String>,
    /// When a failed sync is tried again, and the wait after the next
    /// failure (doubling up to `RETRY_MAX`; reset by a sync that works).
    retry_at: Option<std::time::Instant>,
    backoff: Duration,
}

/// The first and the longest wait before a failed sync is tried again.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

impl<E: Engine> Node<E> {
    /// `sync`, then the interfaces of local backends that changed with it.
    /// A failure is tried again after a backoff (`retry_at`); services
    /// that do not fit the engine's tables are logged and counted.
    async fn sync(&mut self) -> Result<usize, DaemonError> {
        self.live.local_changed = false;
        let res = sync(
            &mut self.engine,
            &self.cfg,
            &mut self.cluster,
            &self.locals,
            &self.settings.node,
            &mut self.live,
            &mut self.desired_cache,
        )
        .await;
        match &res {
            Ok(_) => {
                self.retry_at = None;
                self.backoff = RETRY_MIN;
            }
            Err(e) => {
                log::warn!("sync failed ({e}): tried again in {:?}", self.backoff);
                self.retry_at = Some(std::time::Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(RETRY_MAX);
            }
        }
        self.report_rejected();
        // A full sync's transient memory (the list, every ring) goes back
        // to the system, or the daemon would stay at that peak.
        if matches!(self.cluster, Cluster::Etcd(_)) && self.desired_cache.changes().full {
            crate::kernel::heap::trim();
        }
        let joined = std::mem::take(&mut self.live.local_joined);
        // Addresses that left keep their interface attached until the
        // next look at the node's network; one that joined needs a look
        // only if its interface is not attached yet.
        if self.live.local_changed || !self.attached(&joined) {
            if let Err(e) = self.follow_net(false).await {
                log::warn!("{e}");
            }
        }
        res
    }

    /// Whether every address of `addrs` is reached through an interface
    /// attached now (or through none: via a gateway), by the routes of
    /// the last look at the node's network.
    fn attached(&self, addrs: &[IpAddr]) -> bool {
        if addrs.is_empty() {
            return true;
        }
        let Some(f) = &self.facts else {
            return false;
        };
        addrs.iter().all(|a| {
            nodenet::link_of(*a, &f.routes).is_none_or(|i| {
                f.links
                    .iter()
                    .find(|l| l.index == i)
                    .is_some_and(|l| self.attach.iter().any(|at| at.name == l.name))
            })
        })
    }

    /// Logs (and counts) each service newly rejected by the engine's
    /// table limits, and each that fits again.
    fn report_rejected(&mut self) {
        let now = self.engine.rejected();
        for (key, why) in &now {
            if self.rejected.get(key) != Some(why) {
                log::warn!("service {key}: {why}: not programmed; every other service is");
                self.live.registry.config_error("table_limit");
            }
        }
        for key in self.rejected.keys().filter(|k| !now.contains_key(*k)) {
            log::info!("service {key}: fits the tables now");
        }
        self.rejected = now;
    }

    /// The periodic reconcile: the engine forgets what it remembers of
    /// the kernel, and the sync repairs whatever differs (an entry deleted
    /// or changed behind the daemon's back).
    async fn reconcile(&mut self) {
        if matches!(self.cluster, Cluster::Waiting) {
            return;
        }
        self.engine.reread();
        match self.sync().await {
            Ok(0) => log::debug!("reconcile: the kernel holds the desired state"),
            Ok(n) => log::warn!(
                "reconcile: the kernel differed from the desired state: {n} changes applied"
            ),
            Err(e) => log::error!("reconcile: {e}"),
        }
    }

    /// Re-reads this node's network and follows it: attaches the wanted
    /// interfaces (detaching the others once the desired state is known),
    /// rewrites the node facts, re-decides the locality of static
    /// backends without `node`, and syncs when addresses or locality
    /// changed (`resync`: sync anyway).
    async fn follow_net(&mut self, resync: bool) -> Result<(), netlink::NetlinkError> {
        let f = Facts::read().await?;
        let g = node_guard(&f);
        let guard_moved = self.live.guard.own != g.own || self.live.guard.gateways != g.gateways;
        // Every etcd service is checked against the new addresses.
        self.live.recheck |= guard_moved;
        let recheck = guard_moved && matches!(self.cluster, Cluster::Etcd(_));
        self.live.guard.own = g.own;
        self.live.guard.gateways = g.gateways;
        let attach = wanted(&self.settings, &self.live.local_backends, &f);
        let prune = !matches!(self.cluster, Cluster::Waiting);
        if self.engine.set_interfaces(&attach, prune) || attach != self.attach {
            allow_local_source(&names(&attach));
            self.attach = attach;
        }
        let (locals, net) = f.node_net(&self.settings, &self.attach);
        apply_node_net(&mut self.engine, &net);
        if let Some(a) = &self.live.announce {
            let ifaces = announce_ifaces(
                &self.settings,
                &self.attach,
                &f.addrs,
                &f.links,
                net.node_addr,
            );
            a.ifaces.send_if_modified(|v| {
                let changed = *v != ifaces;
                *v = ifaces;
                changed
            });
        }
        let moved = localise(&mut self.cfg, &locals, &f.routes, false);
        self.facts = Some(f);
        if resync || moved || recheck || locals != self.locals {
            self.locals = locals;
            match Box::pin(self.sync()).await {
                Ok(n) => log::info!("node network changed: {n} changes applied"),
                Err(e) => log::error!("{e}"),
            }
        }
        Ok(())
    }
}

/// The daemon's loop, the same for every engine.
async fn run_engine<E: Engine>(
    mut engine: E,
    settings: Settings,
    mut cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
    metrics_listener: Option<tokio::net::TcpListener>,
) -> Result<(), DaemonError> {
    let kind = engine.kind();
    if matches!(kind, DataplaneKind::XdpNative | DataplaneKind::XdpGeneric) {
        for s in &cfg.services {
            if s.scheduler != crate::model::config::Scheduler::Maglev {
                log::warn!(
                    "service {}: scheduler {} is not implemented by the XDP data plane yet: maglev is used",
                    s.name,
                    s.scheduler.as_str()
                );
            }
        }
    }
    let facts = Facts::read().await?;
    let attach = wanted(&settings, &BTreeMap::new(), &facts);
    let (locals, net) = facts.node_net(&settings, &attach);
    apply_node_net(&mut engine, &net);
    localise(&mut cfg, &locals, &facts.routes, true);
    let registry = Arc::new(Registry::default());
    // This node's running containers (with `--docker`): the socket-level
    // balancer serves their network namespaces.
    let (pids_tx, mut pids_rx) = watch::channel(docker::Pids::new());
    let (mut etcd_rx, cluster, _etcd_tasks) = match &settings.etcd {
        Some(o) => {
            let (tx, rx) = mpsc::channel(UPDATES);
            match net.node_addr {
                Some(a) => log::info!(
                    "node address (nodes/{}, published container ports): {a}",
                    settings.node
                ),
                None => log::warn!(
                    "node {}: no address for other nodes to reach it",
                    settings.node
                ),
            }
            let record = NodeRecord {
                addr: net.node_addr,
                dataplane: kind.as_str().to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            };
            let node_addr = record.addr;
            let (lease_tx, lease_rx) = watch::channel(None);
            let mut tasks = vec![
                AbortOnDrop(tokio::spawn(run_source(o.clone(), tx, registry.clone()))),
                AbortOnDrop(tokio::spawn(keep_node(
                    o.clone(),
                    settings.node.clone(),
                    record,
                    lease_tx,
                ))),
            ];
            if let Some(socket) = &settings.docker {
                log::info!(
                    "docker {}: registering this node's opted-in containers",
                    socket.display()
                );
                let opts = DockerOptions {
                    socket: socket.clone(),
                    node: settings.node.clone(),
                    node_addr,
                };
                tasks.push(AbortOnDrop(tokio::spawn(docker::run(
                    opts,
                    o.clone(),
                    lease_rx,
                    pids_tx.clone(),
                ))));
            }
            log::info!(
                "etcd {} prefix {}: waiting for the first list before programming (adopted state kept)",
                o.endpoints.join(","),
                o.prefix
            );
            (Some(rx), Cluster::Waiting, tasks)
        }
        None => (None, Cluster::Static, Vec::new()),
    };
    let (dns_publisher, _dns_tasks) = start_dns(&settings, &registry).await?;
    // With etcd: the VIP announcer (SPEC "Highly available VIPs").
    let (vip_status_tx, mut vip_status_rx) = watch::channel(Arc::new(Vec::new()));
    let (announce_feed, mut announce_task) = if let Some(o) = &settings.etcd {
        let (vips_tx, vips_rx) = watch::channel(BTreeSet::new());
        let ifaces = announce_ifaces(
            &settings,
            &attach,
            &facts.addrs,
            &facts.links,
            net.node_addr,
        );
        let (ifaces_tx, ifaces_rx) = watch::channel(ifaces);
        let opts = announce::AnnounceOptions {
            etcd: o.clone(),
            node: settings.node.clone(),
            strict_arp: kind == DataplaneKind::Ipvs,
        };
        let task = AbortOnDrop(tokio::spawn(announce::run(
            opts,
            vips_rx,
            ifaces_rx,
            vip_status_tx,
            registry.clone(),
        )));
        (
            Some(AnnounceFeed {
                vips: vips_tx,
                ifaces: ifaces_tx,
            }),
            Some(task),
        )
    } else {
        if cfg.services.iter().any(|s| s.announce) {
            log::warn!("announce = true needs --etcd (the owner of a VIP is elected there): no VIP is announced");
        }
        (None, None)
    };
    let (checker, mut health_rx) = Checker::new(prober::MAX_CONCURRENT_PROBES);
    let live = Liveness {
        checker,
        drains: DrainTimers::default(),
        drain_default: settings.drain_timeout,
        local_backends: BTreeMap::new(),
        local_changed: false,
        local_joined: Vec::new(),
        guard: node_guard(&facts),
        programmed_ports: BTreeSet::new(),
        refused: BTreeMap::new(),
        owners: BTreeMap::new(),
        listeners_at: None,
        registry: registry.clone(),
        recheck: false,
        dns: dns_publisher,
        announce: announce_feed,
    };
    let mut node = Node {
        engine,
        settings,
        cfg,
        cluster,
        locals,
        live,
        desired_cache: DesiredCache::default(),
        attach,
        facts: None,
        rejected: BTreeMap::new(),
        retry_at: None,
        backoff: RETRY_MIN,
    };
    let n = node.sync().await?;
    // Static services are known: the interfaces of their local backends
    // are attached, and pins no longer wanted are detached.
    if let Err(e) = node.follow_net(false).await {
        log::warn!("{e}");
    }
    if matches!(node.cluster, Cluster::Static) {
        log::info!("applied {n} changes; {} services", node.cfg.services.len());
    }

    let _metrics_task = match metrics_listener {
        Some(l) => {
            let source = node.engine.metrics_source()?;
            log::info!("metrics on http://{}/metrics", l.local_addr()?);
            Some(AbortOnDrop(tokio::spawn(metrics::serve(
                l,
                source,
                node.settings.node.clone(),
                registry.clone(),
            ))))
        }
        None => None,
    };

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(NET_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(sweep_period(&node.cfg.conntrack));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconcile = reconcile_timer(node.cfg.reconcile_interval);
    let mut sync_written: Option<std::time::Instant> = None;
    let etcd_prefix = node
        .settings
        .etcd
        .as_ref()
        .map(|o| o.prefix.clone())
        .unwrap_or_default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = term.recv() => break,
            _ = int.recv() => break,
            update = next_update(&mut etcd_rx) => {
                if !node.take_updates(update, &mut etcd_rx, &etcd_prefix) {
                    continue;
                }
                let Cluster::Etcd(snap) = &node.cluster else { continue };
                let (observed, rev) = (snap.observed_at, snap.revision);
                match node.sync().await {
                    Ok(n) => {
                        if let Some(t) = observed {
                            registry.observe_sync(t.elapsed().as_secs_f64());
                            // For `status`, at most once a second.
                            if sync_written.is_none_or(|w| w.elapsed() >= Duration::from_secs(1)) {
                                write_sync_latency(&node.settings.bpffs, &registry);
                                sync_written = Some(std::time::Instant::now());
                            }
                        }
                        log::info!("etcd revision {rev}: {n} changes applied");
                    }
                    Err(e) => log::error!("etcd revision {rev}: {e}"),
                }
            }
            Ok(()) = vip_status_rx.changed() => {
                let list = vip_status_rx.borrow_and_update().clone();
                write_vips(&node.settings.bpffs, &list);
            }
            Ok(()) = pids_rx.changed() => {
                let pids = pids_rx.borrow_and_update().clone();
                node.engine.set_socket_namespaces(&container_namespaces(&pids));
            }
            Ok(()) = health_rx.changed() => {
                match node.sync().await {
                    Ok(n) => {
                        if n > 0 {
                            log::info!("health changed: {n} changes applied");
                        }
                    }
                    Err(e) => log::error!("health changed: {e}"),
                }
            }
            () = until(node.live.drains.next_deadline()) => {
                if let Err(e) = node.sync().await {
                    log::error!("drain timeout: {e}");
                }
            }
            _ = hup.recv() => {
                let period = node.cfg.reconcile_interval;
                if reload(&mut node).await {
                    sweep = tokio::time::interval(sweep_period(&node.cfg.conntrack));
                    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    if node.cfg.reconcile_interval != period {
                        reconcile = reconcile_timer(node.cfg.reconcile_interval);
                    }
                }
            }
            () = until(node.retry_at) => {
                match node.sync().await {
                    Ok(n) => log::info!("retried sync: {n} changes applied"),
                    Err(e) => log::error!("retried sync: {e}"),
                }
            }
            _ = reconcile.tick() => node.reconcile().await,
            _ = sweep.tick() => {
                let s = node.engine.sweep_flows();
                if s.flows > 0 || s.snat_ports > 0 {
                    log::debug!("flow sweep: {} expired flows, {} SNAT ports freed", s.flows, s.snat_ports);
                }
            }
            _ = tick.tick() => {
                if let Err(e) = node.follow_net(false).await {
                    log::warn!("{e}");
                }
            }
        }
    }
    // The announcer hands its VIPs over at once (address removed, lease
    // revoked) rather than let them lapse with the lease.
    if let (Some(feed), Some(task)) = (node.live.announce.take(), announce_task.as_mut()) {
        drop(feed);
        if tokio::time::timeout(announce::RESIGN_WITHIN, &mut task.0)
            .await
            .is_err()
        {
            log::warn!(
                "stopping: the VIP announcer did not resign in time; its VIPs lapse with its lease"
            );
        }
    }
    match kind {
        DataplaneKind::Ipvs => log::info!("stopping; IPVS keeps forwarding"),
        _ => log::info!(
            "stopping; forwarding continues from the pinned state under {}",
            node.settings.bpffs.display()
        ),
    }
    Ok(())
}

/// SIGHUP: reloads the config file and applies what can change live
/// (services, `[conntrack]` timeouts, the interface lists unless given on
/// the command line); logs by name each changed setting that needs a
/// restart. A config that does not load or check leaves the running one.
/// Returns whether the new config was taken.
async fn reload<E: Engine>(node: &mut Node<E>) -> bool {
    let mut new = match load_config(
        node.settings.config_path.as_ref(),
        node.settings.etcd.is_some(),
    ) {
        Ok(c) => c,
        Err(e) => {
            log::error!("SIGHUP: keeping the running config: {e}");
            return false;
        }
    };
    if let Err(e) = check_static(&new, Some(&node.cfg)).await {
        log::error!("SIGHUP: keeping the running config: {e}");
        return false;
    }
    for key in node.cfg.restart_needed(&new) {
        log::warn!("SIGHUP: {key} changed in the config: takes effect at the next start (running with the old value)");
    }
    new.keep_restart_settings(&node.cfg);
    if node.settings.ifaces_from_cli {
        if new.interfaces != node.cfg.interfaces || new.task_interfaces != node.cfg.task_interfaces
        {
            log::warn!("SIGHUP: interfaces changed in the config, but --iface/--task-iface on the command line win");
        }
    } else {
        let (ifaces, tasks) = listed(&new.interfaces, &new.task_interfaces);
        if ifaces != node.settings.ifaces || tasks != node.settings.task_ifaces {
            log::info!("SIGHUP: listed interfaces now {ifaces:?} (task interfaces {tasks:?})");
        }
        node.settings.ifaces = ifaces;
        node.settings.task_ifaces = tasks;
    }
    node.cfg = new;
    apply_flow_config(&mut node.engine, &node.cfg.conntrack);
    match Facts::read().await {
        Ok(f) => {
            localise(&mut node.cfg, &node.locals, &f.routes, true);
        }
        Err(e) => log::warn!("{e}: backends without `node` are taken as local"),
    }
    match node.sync().await {
        Ok(n) => log::info!("SIGHUP: config reloaded, {n} changes applied"),
        Err(e) => log::error!("SIGHUP: {e}"),
    }
    if let Err(e) = node.follow_net(false).await {
        log::warn!("{e}");
    }
    true
}

/// The periodic reconcile's timer: every `secs`, the first one period
/// from now.
fn reconcile_timer(secs: u32) -> tokio::time::Interval {
    let period = Duration::from_secs(u64::from(secs.max(1)));
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// How often expired flows are swept: a sixth of the shortest timeout,
/// 0.25 to 30 s (the data path already treats them as absent; the sweep
/// frees their table slots and SNAT ports, and makes the tables show the
/// truth within a fraction of a timeout).
fn sweep_period(c: &crate::model::config::ConntrackConfig) -> Duration {
    let shortest = c.udp_timeout.min(c.tcp_closing_timeout).min(c.tcp_timeout);
    Duration::from_millis((u64::from(shortest) * 1000 / 6).clamp(250, 30_000))
}

/// Writes the flow timeouts to the data plane, logging a change.
fn apply_flow_config<E: Engine>(engine: &mut E, c: &crate::model::config::ConntrackConfig) {
    match engine.set_flow_config(c) {
        Ok(true) => log::info!(
            "conntrack: tcp_timeout {}s, tcp_closing_timeout {}s, udp_timeout {}s, snat_quarantine {}s",
            c.tcp_timeout,
            c.tcp_closing_timeout,
            c.udp_timeout,
            c.snat_quarantine
        ),
        Ok(false) => {}
        Err(e) => log::error!("conntrack timeouts: {e}"),
    }
}

/// This node's links, addresses and routes (main table), read together
/// over rtnetlink.
struct Facts {
    links: Vec<nodenet::LinkFacts>,
    addrs: Vec<(u32, IpAddr)>,
    routes: Vec<nodenet::RouteFact>,
}

impl Facts {
    async fn read() -> Result<Facts, netlink::NetlinkError> {
        Ok(Facts {
            links: netlink::links().await?,
            addrs: netlink::addresses().await?,
            routes: netlink::routes().await?,
        })
    }

    /// This node's addresses and what the data plane is told about its
    /// network, with the data plane on `ifaces` (in order).
    fn node_net(&self, settings: &Settings, attach: &[Attach]) -> (BTreeSet<IpAddr>, NodeNet) {
        let ifaces = names(attach);
        let locals = self.addrs.iter().map(|(_, a)| *a).collect();
        let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| nodenet::parse_port_range(&t));
        let mut net = NodeNet::new(
            &ifaces,
            &self.links,
            &self.addrs,
            &self.routes,
            ephemeral,
            settings.advertise_addr,
        );
        // The uplinks' own MACs: a flow opener framed for another host is
        // not theirs (task interfaces' frames are addressed to gateways
        // whose MAC may be another device's: not checked).
        net.iface_macs = attach
            .iter()
            .filter(|a| a.role == Role::Uplink)
            .filter_map(|a| self.links.iter().find(|l| l.name == a.name))
            .filter_map(|l| Some((l.index, l.mac?)))
            .collect();
        (locals, net)
    }
}

/// How often a missing listed interface is looked for.
const IFACE_WAIT: Duration = Duration::from_millis(500);

/// Waits until every listed interface exists: one that does not yet (a
/// bridge dockerd creates after the daemon started at boot) is waited for
/// and logged once, not an error. `Ok(false)`: stopped (`shutdown`,
/// SIGTERM, SIGINT) while waiting.
async fn wait_for_interfaces<F: std::future::Future<Output = ()>>(
    ifaces: &[String],
    shutdown: &mut std::pin::Pin<&mut F>,
) -> Result<bool, DaemonError> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut waited = false;
    let mut logged: BTreeSet<String> = BTreeSet::new();
    loop {
        let missing = netlink::missing_interfaces(ifaces).await?;
        if missing.is_empty() {
            if waited {
                log::info!("every listed interface exists now: starting");
            }
            return Ok(true);
        }
        for m in missing {
            if logged.insert(m.clone()) {
                log::warn!("iface {m}: does not exist yet; waiting for it (nothing is attached until every listed interface exists)");
            }
        }
        waited = true;
        tokio::select! {
            () = shutdown.as_mut() => return Ok(false),
            _ = term.recv() => return Ok(false),
            _ = int.recv() => return Ok(false),
            () = tokio::time::sleep(IFACE_WAIT) => {}
        }
    }
}

/// This node's addresses (those on the IPVS engine's own VIP device
/// excepted: meshlb put the VIPs there) and gateways, for `guard`.
fn node_guard(f: &Facts) -> NodeGuard {
    let vip_dev = f
        .links
        .iter()
        .find(|l| l.name == VIP_DEVICE)
        .map(|l| l.index);
    NodeGuard {
        own: f
            .addrs
            .iter()
            .filter(|(i, _)| Some(*i) != vip_dev)
            .map(|(_, a)| *a)
            .collect(),
        gateways: f.routes.iter().filter_map(|r| r.gateway).collect(),
        listeners: Vec::new(),
    }
}

/// The static services against this node (`guard::refusal`): the first
/// refused one as one line naming the field (`service[i].vip`,
/// `service[i].publish[j].port`). Published ports of `running` (the
/// config in use, on SIGHUP) are not checked against listeners again.
async fn check_static(cfg: &Config, running: Option<&Config>) -> Result<(), String> {
    let mut g = match Facts::read().await {
        Ok(f) => node_guard(&f),
        Err(e) => {
            log::warn!("{e}: VIPs are not checked against this node's addresses");
            NodeGuard::default()
        }
    };
    g.listeners = listeners::read();
    let checked: BTreeSet<PortKey> = running
        .map(|r| {
            r.services
                .iter()
                .flat_map(|s| s.publish.iter().map(|p| (p.proto, p.port)))
                .collect()
        })
        .unwrap_or_default();
    for (i, s) in cfg.services.iter().enumerate() {
        if let Some(why) = guard::refusal(s, &g, &checked, listeners::owner) {
            return Err(format!("service[{i}].{why}"));
        }
    }
    Ok(())
}

/// Static backends without `node`: local when this node reaches them
/// without a gateway (on one of its links, or its own address), another
/// node's (source-translated) otherwise. One line per backend says which
/// and why: for every such backend with `announce`, else for those whose
/// locality changed (a route came or went). Returns whether any changed.
fn localise(
    cfg: &mut Config,
    locals: &BTreeSet<IpAddr>,
    routes: &[nodenet::RouteFact],
    announce: bool,
) -> bool {
    let locals: Vec<IpAddr> = locals.iter().copied().collect();
    let mut changed = false;
    for s in &mut cfg.services {
        for b in s.backends.iter_mut().filter(|b| b.node.is_none()) {
            let r = nodenet::reach(b.addr, routes, &locals);
            let routed = !matches!(r, nodenet::Reach::Own | nodenet::Reach::Direct);
            if routed == b.routed && !announce {
                continue;
            }
            changed |= routed != b.routed;
            b.routed = routed;
            let why = match r {
                nodenet::Reach::Own => "one of this node's addresses: local".to_owned(),
                nodenet::Reach::Direct => "on a link of this node: local".to_owned(),
                nodenet::Reach::Gateway(g) => {
                    format!("reached via gateway {g}: another node's, source-translated")
                }
                nodenet::Reach::NoRoute => {
                    "no route to it: taken as another node's, source-translated".to_owned()
                }
            };
            log::info!(
                "service {}: backend {} (no node given): {why}",
                s.name,
                b.addr
            );
        }
    }
    changed
}

/// Writes the node facts to the data plane, logging what changed.
fn apply_node_net<E: Engine>(engine: &mut E, net: &NodeNet) {
    match engine.set_node_net(net) {
        Ok(true) => {
            let show = |a: Option<IpAddr>| a.map_or("none".to_string(), |a| a.to_string());
            log::info!(
                "SNAT address for remote backends: {} / {}; {} interfaces flagged",
                show(net.snat.0),
                show(net.snat.1),
                net.iface_flags.len()
            );
        }
        Ok(false) => {}
        Err(e) => log::error!("node network facts: {e}"),
    }
}

/// Lets the listed interfaces take packets with this node's own source
/// address (`accept_local`): a SNATed packet the XDP program hands to the
/// stack (neighbour not resolved yet) carries it, and would otherwise be
/// dropped as a martian.
fn allow_local_source(ifaces: &[String]) {
    for i in ifaces {
        let p = format!("/proc/sys/net/ipv4/conf/{i}/accept_local");
        match std::fs::read_to_string(&p) {
            Ok(v) if v.trim() == "1" => {}
            _ => match std::fs::write(&p, "1") {
                Ok(()) => log::info!("iface {i}: accept_local=1 (SNATed packets may pass through the stack)"),
                Err(e) => log::warn!("iface {i}: cannot set accept_local: {e}; SNATed packets whose neighbour is unresolved are dropped"),
            },
        }
    }
}

pub use crate::engine::ipvs::{STATE_DIR as IPVS_STATE_DIR, VIP_DEVICE};

/// Aborts a spawned task when dropped: every task has an owner.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{BackendOf, ServiceConfigs};
    use crate::model::{BackendKey, BackendState, Proto, ServiceKey};

    /// An engine that records what the loop asks of it.
    #[derive(Default)]
    struct Recorder {
        held: BTreeSet<BackendOf>,
        synced: Vec<(DesiredState, Vec<BackendOf>)>,
    }

    impl Engine for Recorder {
        fn kind(&self) -> DataplaneKind {
            DataplaneKind::Mirror
        }
        async fn held_down(
            &mut self,
            _desired: &DesiredState,
        ) -> Result<BTreeSet<BackendOf>, DataplaneError> {
            Ok(self.held.clone())
        }
        async fn sync(
            &mut self,
            desired: &DesiredState,
            _services: &ServiceConfigs<'_>,
            expired: &[BackendOf],
        ) -> Result<usize, DataplaneError> {
            self.synced.push((desired.clone(), expired.to_vec()));
            Ok(1)
        }
        fn set_node_net(&mut self, _net: &NodeNet) -> Result<bool, DataplaneError> {
            Ok(false)
        }
        fn metrics_source(&self) -> Result<crate::engine::StatsSource, DataplaneError> {
            Err(DataplaneError::Other("none".into()))
        }
    }

    /// Health and drain are decided above the engine, the same for XDP
    /// and IPVS: a backend the engine holds down starts down (its probes
    /// to a closed port keep it so), a drained backend past its timeout
    /// leaves the desired state and is handed over as expired.
    #[tokio::test]
    async fn any_engine_gets_health_and_drain_applied() {
        let cfg = config::parse(
            r#"
[[service]]
name = "web"
publish = [{ proto = "tcp", port = 80, target = 1 }]
health = { kind = "tcp", interval_ms = 60000, timeout_ms = 100 }
[[service.backend]]
addr = "192.0.2.1"
[[service.backend]]
addr = "192.0.2.2"
weight = 0
[[service.backend]]
addr = "192.0.2.3"
"#,
        )
        .expect("config");
        let skey = ServiceKey {
            name: "web".into(),
            proto: Proto::Tcp,
            port: 80,
        };
        let bk = |a: [u8; 4]| BackendKey {
            addr: IpAddr::from(a),
            port: 1,
        };
        let mut engine = Recorder {
            held: [(skey.clone(), bk([192, 0, 2, 1]))].into(),
            ..Default::default()
        };
        let (checker, _rx) = Checker::new(4);
        let mut live = Liveness {
            checker,
            drains: DrainTimers::default(),
            drain_default: Some(Duration::ZERO),
            local_backends: BTreeMap::new(),
            local_changed: false,
            local_joined: Vec::new(),
            guard: NodeGuard::default(),
            programmed_ports: BTreeSet::new(),
            refused: BTreeMap::new(),
            owners: BTreeMap::new(),
            listeners_at: None,
            registry: Arc::new(Registry::default()),
            recheck: false,
            dns: None,
            announce: None,
        };
        let locals = [IpAddr::from([192, 168, 1, 5])].into();
        let (tx, rx) = watch::channel(Arc::new(crate::control::dns::DnsView::default()));
        live.dns = Some(DnsPublisher { tx, serial: 0 });
        let n = sync(
            &mut engine,
            &cfg,
            &mut Cluster::Static,
            &locals,
            "n1",
            &mut live,
            &mut DesiredCache::default(),
        )
        .await
        .expect("sync");
        assert_eq!(n, 1);
        let (desired, expired) = &engine.synced[0];
        // DNS answers from exactly what the engine was given: health and
        // drain applied.
        assert_eq!(rx.borrow().desired(), desired);
        let backends = &desired.services[&skey].backends;
        assert_eq!(backends[&bk([192, 0, 2, 1])].state, BackendState::Down);
        assert_eq!(backends[&bk([192, 0, 2, 3])].state, BackendState::Up);
        assert!(!backends.contains_key(&bk([192, 0, 2, 2])), "drained out");
        assert_eq!(expired, &vec![(skey.clone(), bk([192, 0, 2, 2]))]);
        // Waiting for etcd's first list: nothing reaches the engine.
        let n = sync(
            &mut engine,
            &cfg,
            &mut Cluster::Waiting,
            &locals,
            "n1",
            &mut live,
            &mut DesiredCache::default(),
        )
        .await
        .expect("sync");
        assert_eq!((n, engine.synced.len()), (0, 1));
    }
}
