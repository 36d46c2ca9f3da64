//! The IPVS engine's pure half: the IPVS table a node should hold for a
//! [`DesiredState`] (one virtual service per frontend address, node ports
//! on every node address; one masquerading destination per backend,
//! weight 0 for a backend that takes no new flows), and the ordered
//! changes that turn the kernel's table into it. A sync is a diff, never a
//! flush: unchanged services and destinations, and so their connections,
//! are not touched. Only services this node created (its owned set) are
//! ever changed or deleted: a virtual service another tool (ipvsadm,
//! keepalived, kube-proxy) holds at an address, port and protocol meshlb
//! wants is a conflict — that one frontend is skipped, the foreign
//! service and its destinations are left exactly as they are, and it
//! never enters the owned set ([`conflicts`], [`diff`], [`owned_after`]).
//!
//! [`IpvsEngine`] is the IO half and the daemon's [`Engine`] in IPVS mode:
//! it dumps the kernel's table, applies the diff, and remembers (in a
//! state file, replaced atomically) which services it created, so a
//! restarted daemon adopts them — connections and all — and can still
//! delete the ones no longer wanted; it logs a conflict once when it
//! appears and once when it goes; it keeps the VIPs on a dummy device and
//! the remote backends in meshlb's nf_tables masquerade set
//! (`crate::kernel::nft`), and serves `/metrics` from the kernel's IPVS counters
//! ([`IpvsView`]). The host kernel of this project's CI has no IPVS: the
//! engine is exercised in the vm/ guests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{BackendOf, DataplaneError, DataplaneKind, Engine, ServiceConfigs};
use crate::control::nodenet::NodeNet;
use crate::kernel::nft::{Masquerade, Remote};
use crate::model::config::Scheduler;
use crate::model::status::{BackendStatus, ServiceStatus, Status};
use crate::model::{BackendState, ServiceKey, ServiceSpec};

use crate::kernel::ipvs::consts::{
    IP_VS_CONN_F_MASQ, IP_VS_SVC_F_PERSISTENT, IP_VS_SVC_F_SCHED_MH_FALLBACK,
    IP_VS_SVC_F_SCHED_MH_PORT,
};
use crate::kernel::ipvs::{Dest, Ipvs, IpvsError, Service, ServiceId, Stats};
use crate::model::DesiredState;

/// How one service is scheduled in IPVS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsOptions {
    /// IPVS scheduler name ("mh" for maglev, "rr", "wrr", "lc", "sh").
    pub sched: String,
    /// Persistence (client-IP affinity) timeout in seconds.
    pub persistence: Option<u32>,
}

impl Default for IpvsOptions {
    fn default() -> Self {
        IpvsOptions {
            sched: "mh".into(),
            persistence: None,
        }
    }
}

/// The IPVS scheduler implementing a config scheduler.
pub fn sched_name(s: crate::model::config::Scheduler) -> &'static str {
    use crate::model::config::Scheduler::{Lc, Maglev, Rr, Sh, Wrr};
    match s {
        Maglev => "mh",
        Rr => "rr",
        Wrr => "wrr",
        Lc => "lc",
        Sh => "sh",
    }
}

/// Destinations of one virtual service, by (address, port).
pub type Dests = BTreeMap<(IpAddr, u16), Dest>;
/// A whole IPVS table.
pub type Table = BTreeMap<ServiceId, (Service, Dests)>;

/// Every IPVS virtual service of `desired` with the data-plane service it
/// implements: one per VIP frontend, and one per node address for a node
/// port.
pub fn services(
    desired: &DesiredState,
) -> impl Iterator<Item = (ServiceId, &ServiceKey, &ServiceSpec)> {
    desired.services.iter().flat_map(move |(key, spec)| {
        spec.frontends.iter().flat_map(move |fe| {
            let addrs: Vec<IpAddr> = match fe.addr {
                Some(a) => vec![a],
                None => desired.local_addrs.iter().copied().collect(),
            };
            addrs.into_iter().map(move |addr| {
                let id = ServiceId {
                    addr,
                    port: fe.port,
                    proto: key.proto.number(),
                };
                (id, key, spec.as_ref())
            })
        })
    })
}

/// The table for `desired`; `opts` gives each service's scheduling
/// (default: `mh`, no persistence).
pub fn table(desired: &DesiredState, opts: &BTreeMap<String, IpvsOptions>) -> Table {
    let mut t = Table::new();
    for (id, key, spec) in services(desired) {
        let mut o = opts.get(&key.name).cloned().unwrap_or_default();
        if o.persistence.is_none() && spec.affinity_secs > 0 {
            o.persistence = Some(spec.affinity_secs);
        }
        // A service holds backends of its own family only.
        let dests: Dests = spec
            .backends
            .iter()
            .filter(|(bk, _)| bk.addr.is_ipv4() == id.addr.is_ipv4())
            .map(|(bk, bs)| {
                let d = Dest {
                    addr: bk.addr,
                    port: bk.port,
                    weight: if bs.active() { bs.weight } else { 0 },
                    fwd: IP_VS_CONN_F_MASQ,
                    active_conns: 0,
                    inactive_conns: 0,
                    stats: Stats::default(),
                };
                ((bk.addr, bk.port), d)
            })
            .collect();
        t.insert(id, (service(id, &o), dests));
    }
    t
}

/// The remote backends of `desired` (on another node): their flows must
/// leave this node masqueraded, or they would answer the client directly.
pub fn remotes(desired: &DesiredState) -> BTreeSet<Remote> {
    desired
        .services
        .iter()
        .flat_map(|(key, spec)| {
            spec.backends
                .iter()
                .filter(|(_, bs)| bs.remote)
                .map(|(bk, _)| Remote {
                    addr: bk.addr,
                    proto: key.proto.number(),
                    port: bk.port,
                })
        })
        .collect()
}

/// Backends of `desired` that should take new flows but that `have` (the
/// kernel's table) holds at weight 0 in a service meshlb created
/// (`owned`): taken out by an earlier daemon's health checks. Another
/// tool's weights say nothing about meshlb's backends.
pub fn held_down(
    desired: &DesiredState,
    have: &Table,
    owned: &BTreeSet<ServiceId>,
) -> BTreeSet<BackendOf> {
    let mut out = BTreeSet::new();
    for (id, key, spec) in services(desired) {
        let Some((_, dests)) = have.get(&id).filter(|_| owned.contains(&id)) else {
            continue;
        };
        for (bk, bs) in &spec.backends {
            if bs.active()
                && dests
                    .get(&(bk.addr, bk.port))
                    .is_some_and(|d| d.weight == 0)
            {
                out.insert((key.clone(), *bk));
            }
        }
    }
    out
}

/// `mh` hashes address and port (as meshlb's Maglev hashes the flow) and
/// falls back past weight-0 destinations.
fn service(id: ServiceId, o: &IpvsOptions) -> Service {
    let mut flags = 0;
    if o.persistence.is_some() {
        flags |= IP_VS_SVC_F_PERSISTENT;
    }
    if o.sched == "mh" {
        flags |= IP_VS_SVC_F_SCHED_MH_PORT | IP_VS_SVC_F_SCHED_MH_FALLBACK;
    }
    Service {
        id,
        sched: o.sched.clone(),
        flags,
        timeout: o.persistence.unwrap_or(0),
        stats: Stats::default(),
    }
}

/// One change to the kernel's IPVS table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    AddService(Service),
    /// Scheduler, flags or timeout changed (connections are kept).
    SetService(Service),
    AddDest(ServiceId, Dest),
    /// Weight or forwarding method changed (connections are kept).
    SetDest(ServiceId, Dest),
    DelDest(ServiceId, Dest),
    DelService(ServiceId),
}

/// Whether `id` is another tool's virtual service: in the kernel's table
/// (`have`) but not created by meshlb (`owned`).
fn is_foreign(id: &ServiceId, have: &Table, owned: &BTreeSet<ServiceId>) -> bool {
    have.contains_key(id) && !owned.contains(id)
}

/// The virtual services of `desired` that another tool already holds
/// (see [`is_foreign`]), each with the meshlb service it would implement:
/// those frontends are skipped rather than adopted.
pub fn conflicts(
    desired: &DesiredState,
    have: &Table,
    owned: &BTreeSet<ServiceId>,
) -> BTreeMap<ServiceId, String> {
    let mut out = BTreeMap::new();
    for (id, key, _) in services(desired) {
        if is_foreign(&id, have, owned) {
            out.entry(id).or_insert_with(|| key.name.clone());
        }
    }
    out
}

/// The changes turning `have` (the kernel's table) into `want`, in a safe
/// order: services, then destinations added or updated, then destinations
/// deleted, then services deleted. Only services in `owned` (created by
/// meshlb) or not in `have` at all are touched: another tool's service is
/// neither changed, given destinations, stripped of them nor deleted, even
/// where `want` names it.
pub fn diff(want: &Table, have: &Table, owned: &BTreeSet<ServiceId>) -> Vec<Change> {
    let mut svc = Vec::new();
    let mut add = Vec::new();
    let mut del = Vec::new();
    let mut gone = Vec::new();
    for (id, (ws, wd)) in want {
        if is_foreign(id, have, owned) {
            continue;
        }
        let hd = match have.get(id) {
            None => {
                svc.push(Change::AddService(ws.clone()));
                None
            }
            Some((hs, hd)) => {
                if (hs.sched.as_str(), hs.flags, hs.timeout)
                    != (ws.sched.as_str(), ws.flags, ws.timeout)
                {
                    svc.push(Change::SetService(ws.clone()));
                }
                Some(hd)
            }
        };
        for (k, d) in wd {
            match hd.and_then(|hd| hd.get(k)) {
                None => add.push(Change::AddDest(*id, d.clone())),
                Some(h) if (h.weight, h.fwd) != (d.weight, d.fwd) => {
                    add.push(Change::SetDest(*id, d.clone()));
                }
                Some(_) => {}
            }
        }
        if let Some(hd) = hd {
            for (k, d) in hd {
                if !wd.contains_key(k) {
                    del.push(Change::DelDest(*id, d.clone()));
                }
            }
        }
    }
    for id in have.keys() {
        if !want.contains_key(id) && owned.contains(id) {
            gone.push(Change::DelService(*id));
        }
    }
    svc.into_iter().chain(add).chain(del).chain(gone).collect()
}

/// The owned set once `diff(want, have, owned)` is applied: the wanted
/// services, less any another tool holds (it never becomes meshlb's).
pub fn owned_after(want: &Table, have: &Table, owned: &BTreeSet<ServiceId>) -> BTreeSet<ServiceId> {
    want.keys()
        .filter(|id| !is_foreign(id, have, owned))
        .copied()
        .collect()
}

/// The services `meshlb cleanup` deletes: those a state file names
/// (`owned`) that still exist (`live`). Nothing else, so never another
/// tool's.
fn to_delete(owned: &BTreeSet<ServiceId>, live: &BTreeSet<ServiceId>) -> Vec<ServiceId> {
    owned.intersection(live).copied().collect()
}

/// `addr:port/proto` of a virtual service, for log lines.
fn endpoint(id: &ServiceId) -> String {
    let proto =
        crate::model::Proto::from_number(id.proto).map_or(id.proto.to_string(), |p| p.to_string());
    format!("{}/{proto}", SocketAddr::new(id.addr, id.port))
}

/// Where the IPVS engine remembers which services it created
/// (`<node>.ipvs`; kept across daemon restarts, the unit's
/// `RuntimeDirectory`).
pub const STATE_DIR: &str = "/run/meshlb";
/// Name of the dummy device holding the VIPs in IPVS mode.
pub const VIP_DEVICE: &str = "meshlb0";

/// What `meshlb cleanup` removed of IPVS mode.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// IPVS services deleted (those the state files name that still
    /// existed; nobody else's).
    pub services: usize,
    /// meshlb's nf_tables table (the SNAT of remote backends).
    pub snat_table: bool,
    /// The VIP device.
    pub vip_device: bool,
}

/// `meshlb cleanup` for IPVS mode: deletes the IPVS services this node's
/// daemons created (as their state files in `state_dir` record), then the
/// state files, meshlb's nf_tables table and the VIP device. `None` when
/// no daemon ran in IPVS mode here (no state file): IPVS and nf_tables are
/// then not touched at all. Forwarding of those services stops.
pub async fn cleanup(
    state_dir: &std::path::Path,
    vip_device: &str,
) -> Result<Option<Cleaned>, DataplaneError> {
    let files: Vec<PathBuf> = match std::fs::read_dir(state_dir) {
        Ok(d) => d
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "ipvs"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(DataplaneError::context(state_dir.display().to_string())(e)),
    };
    if files.is_empty() {
        return Ok(None);
    }
    let mut ipvs = Ipvs::open()
        .await
        .map_err(DataplaneError::context("ipvs"))?;
    let live: BTreeSet<ServiceId> = ipvs
        .services()
        .await
        .map_err(DataplaneError::context("ipvs services"))?
        .into_iter()
        .map(|s| s.id)
        .collect();
    let mut cleaned = Cleaned::default();
    for f in files {
        let text = std::fs::read_to_string(&f)
            .map_err(DataplaneError::context(f.display().to_string()))?;
        for id in to_delete(&parse_owned(&text), &live) {
            ipvs.del_service(&id)
                .await
                .map_err(DataplaneError::context(format!(
                    "ipvs delete service {}",
                    endpoint(&id)
                )))?;
            cleaned.services += 1;
        }
        std::fs::remove_file(&f).map_err(DataplaneError::context(f.display().to_string()))?;
        let view = f.with_extension("view");
        for leftover in [
            crate::kernel::pinlock::tmp_path(&f),
            crate::kernel::pinlock::tmp_path(&view),
            view,
        ] {
            let _ = std::fs::remove_file(leftover);
        }
    }
    cleaned.snat_table = Masquerade::new()
        .remove()
        .await
        .map_err(DataplaneError::context("nf_tables"))?;
    cleaned.vip_device = crate::kernel::netlink::remove_link(vip_device)
        .await
        .map_err(DataplaneError::context(vip_device))?;
    Ok(Some(cleaned))
}

/// The IPVS engine of `meshlb run --dataplane ipvs`.
pub struct IpvsEngine {
    ipvs: Ipvs,
    /// Services this node created (persisted in `state_file`): the only
    /// ones it ever changes or deletes.
    owned: BTreeSet<ServiceId>,
    state_file: PathBuf,
    /// Wanted services another tool holds (with the meshlb service each
    /// would implement), as of the last sync: logged when they change.
    conflicts: BTreeMap<ServiceId, String>,
    /// The dummy device holding the VIPs.
    vip_device: String,
    /// SNAT of flows to remote backends (nf_tables).
    masq: Masquerade,
    /// Names and states for `/metrics`, as of the last sync.
    view: IpvsView,
    /// The kernel's table as `held_down` read it, for the `sync` that
    /// follows it in the same round.
    last_dump: Option<Table>,
}

impl IpvsEngine {
    /// Connects to IPVS and reads which services an earlier daemon created
    /// (none without a state file). An unreadable state file is an error:
    /// guessing would either adopt another tool's services or abandon
    /// meshlb's own.
    pub async fn open(state_file: PathBuf, vip_device: &str) -> Result<IpvsEngine, IpvsError> {
        let ipvs = Ipvs::open().await?;
        let owned = match std::fs::read_to_string(&state_file) {
            Ok(t) => parse_owned(&t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(source) => {
                return Err(IpvsError::StateFile {
                    path: state_file.display().to_string(),
                    source,
                })
            }
        };
        Ok(IpvsEngine {
            ipvs,
            owned,
            state_file,
            conflicts: BTreeMap::new(),
            vip_device: vip_device.to_owned(),
            masq: Masquerade::new(),
            view: IpvsView::default(),
            last_dump: None,
        })
    }

    /// Makes the kernel's table (`have`) into `want`, another tool's
    /// services aside; returns the number of changes. A service is
    /// recorded as owned (and saved) as soon as it is created, so a crash
    /// mid-sync never forgets one.
    async fn apply_table(&mut self, want: &Table, have: &Table) -> Result<usize, IpvsError> {
        let changes = diff(want, have, &self.owned);
        for c in &changes {
            match c {
                Change::AddService(s) => self.ipvs.new_service(s).await?,
                Change::SetService(s) => self.ipvs.set_service(s).await?,
                Change::AddDest(id, d) => self.ipvs.new_dest(id, d).await?,
                Change::SetDest(id, d) => self.ipvs.set_dest(id, d).await?,
                Change::DelDest(id, d) => self.ipvs.del_dest(id, d).await?,
                Change::DelService(id) => self.ipvs.del_service(id).await?,
            }
            if let Change::AddService(s) = c {
                self.owned.insert(s.id);
                self.save();
            }
        }
        self.owned = owned_after(want, have, &self.owned);
        self.save();
        Ok(changes.len())
    }

    /// Writes the owned set to the state file, atomically.
    fn save(&self) {
        if let Some(d) = self.state_file.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        if let Err(e) = crate::kernel::pinlock::write_atomic(
            &self.state_file,
            format_owned(&self.owned).as_bytes(),
        ) {
            log::warn!("ipvs state {}: {e}", self.state_file.display());
        }
    }

    /// Logs the conflicts with other tools' services that appeared (one
    /// warning each) and went away since the last sync, then remembers
    /// `now`: a standing conflict is not repeated at every sync.
    fn note_conflicts(&mut self, now: BTreeMap<ServiceId, String>) {
        for (id, name) in &now {
            if !self.conflicts.contains_key(id) {
                log::warn!(
                    "service {name}: IPVS virtual service {} belongs to another tool (not created by meshlb): frontend skipped, left untouched",
                    endpoint(id)
                );
            }
        }
        for (id, name) in &self.conflicts {
            if !now.contains_key(id) {
                log::info!(
                    "service {name}: IPVS virtual service {} no longer conflicts with another tool's",
                    endpoint(id)
                );
            }
        }
        self.conflicts = now;
    }
}

/// The kernel's whole table, stats included.
pub async fn dump(ipvs: &mut Ipvs) -> Result<Table, IpvsError> {
    let mut t = Table::new();
    for s in ipvs.services().await? {
        let dests = ipvs
            .dests(&s.id)
            .await?
            .into_iter()
            .map(|d| ((d.addr, d.port), d))
            .collect();
        t.insert(s.id, (s, dests));
    }
    Ok(t)
}

/// The scheduling of every configured service.
fn options(services: &ServiceConfigs<'_>) -> BTreeMap<String, IpvsOptions> {
    services
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                IpvsOptions {
                    sched: sched_name(s.scheduler).into(),
                    persistence: s.affinity.as_ref().map(|a| a.timeout as u32),
                },
            )
        })
        .collect()
}

/// The IPVS engine of the daemon's loop: the desired state as an IPVS
/// table (synced as a diff), its VIPs on the dummy device, and its remote
/// backends in the masquerade set.
impl Engine for IpvsEngine {
    fn kind(&self) -> DataplaneKind {
        DataplaneKind::Ipvs
    }

    async fn held_down(
        &mut self,
        desired: &DesiredState,
    ) -> Result<BTreeSet<BackendOf>, DataplaneError> {
        let have = dump(&mut self.ipvs).await?;
        let down = held_down(desired, &have, &self.owned);
        self.last_dump = Some(have);
        Ok(down)
    }

    async fn sync(
        &mut self,
        desired: &DesiredState,
        services: &ServiceConfigs<'_>,
        expired: &[BackendOf],
    ) -> Result<usize, DataplaneError> {
        let vips: BTreeSet<IpAddr> = desired
            .services
            .values()
            .flat_map(|s| s.frontends.iter().filter_map(|f| f.addr))
            .collect();
        // The VIPs are local once on the device: node ports answer on the
        // other local addresses only.
        let mut d = desired.clone();
        d.local_addrs.retain(|a| !vips.contains(a));
        let mut want = table(&d, &options(services));
        crate::kernel::netlink::ensure_vip_device(&self.vip_device, &vips).await?;
        let have = match self.last_dump.take() {
            Some(t) => t,
            None => dump(&mut self.ipvs).await?,
        };
        // Another tool's services are skipped here, so that neither the
        // diff, the owned set nor the view (`/metrics`, `meshlb status`)
        // takes them for meshlb's.
        let clash = conflicts(&d, &have, &self.owned);
        want.retain(|id, _| !clash.contains_key(id));
        self.note_conflicts(clash);
        let n = self.apply_table(&want, &have).await?;
        for (skey, bk) in expired {
            let conns: u32 = services_of(&have, &d, skey)
                .filter(|(s, _)| self.owned.contains(&s.id))
                .filter_map(|(_, dests)| dests.get(&(bk.addr, bk.port)))
                .map(|dest| dest.active_conns + dest.inactive_conns)
                .sum();
            log::info!("{skey}: backend {bk} drained past its timeout: removed, {conns} IPVS connections end (their packets are dropped)");
        }
        self.view.update(&d, &want, services);
        self.view.save(&self.state_file.with_extension("view"));
        let m = self.masq.sync(&remotes(&d)).await?;
        Ok(n + m)
    }

    fn set_node_net(&mut self, _net: &NodeNet) -> Result<bool, DataplaneError> {
        // Masquerade picks the outgoing interface's address itself.
        Ok(false)
    }

    fn metrics_source(&self) -> Result<crate::engine::StatsSource, DataplaneError> {
        Ok(crate::engine::StatsSource::Ipvs(self.view.clone()))
    }
}

/// The kernel services of `have` implementing data-plane service `skey`.
fn services_of<'a>(
    have: &'a Table,
    desired: &'a DesiredState,
    skey: &'a ServiceKey,
) -> impl Iterator<Item = &'a (Service, Dests)> {
    desired
        .local_addrs
        .iter()
        .map(|a| ServiceId {
            addr: *a,
            port: skey.port,
            proto: skey.proto.number(),
        })
        .chain(
            desired
                .services
                .get(skey)
                .into_iter()
                .flat_map(|s| s.frontends.iter().filter_map(|f| f.addr))
                .map(|a| ServiceId {
                    addr: a,
                    port: skey.port,
                    proto: skey.proto.number(),
                }),
        )
        .filter_map(|id| have.get(&id))
}

/// What `/metrics` needs beside the kernel's counters: which service and
/// state each IPVS service and destination stands for (the kernel knows
/// no names). Updated by every sync; read at scrape time with a fresh
/// dump of the kernel's table and stats.
#[derive(Clone, Debug, Default)]
pub struct IpvsView(Arc<Mutex<BTreeMap<ServiceId, Named>>>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct Named {
    name: String,
    scheduler: Scheduler,
    vip: bool,
    states: BTreeMap<(IpAddr, u16), BackendState>,
}

impl IpvsView {
    fn update(&self, desired: &DesiredState, want: &Table, configs: &ServiceConfigs<'_>) {
        let mut m = BTreeMap::new();
        for (id, key, spec) in services(desired) {
            if !want.contains_key(&id) {
                continue;
            }
            let states = spec
                .backends
                .iter()
                .map(|(bk, bs)| ((bk.addr, bk.port), bs.effective_state()))
                .collect();
            let scheduler = configs
                .get(key.name.as_str())
                .map_or(Scheduler::Maglev, |s| s.scheduler);
            let vip = spec.frontends.iter().any(|f| f.addr == Some(id.addr));
            m.insert(
                id,
                Named {
                    name: key.name.clone(),
                    scheduler,
                    vip,
                    states,
                },
            );
        }
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = m;
    }

    /// This node's status from IPVS: per service and backend, the kernel's
    /// connection, packet and byte counters (summed over the VIP and node
    /// addresses of a port by the metrics renderer).
    pub async fn status(&self, node: &str) -> Result<Status, IpvsError> {
        let mut ipvs = Ipvs::open().await?;
        let have = dump(&mut ipvs).await?;
        let names = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Ok(status_of(node, &names, &have))
    }
}

impl IpvsView {
    /// Writes the names and states for `meshlb status` (another process):
    /// `<node>.view` beside the state file, replaced atomically.
    fn save(&self, path: &Path) {
        let text = format_view(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if let Err(e) = crate::kernel::pinlock::write_atomic(path, text.as_bytes()) {
            log::warn!("ipvs view {}: {e}", path.display());
        }
    }
}

/// One service per `S` line (`S proto addr port vip scheduler name`),
/// followed by its backends (`B addr port state`).
fn format_view(names: &BTreeMap<ServiceId, Named>) -> String {
    let mut out = String::new();
    for (id, n) in names {
        out.push_str(&format!(
            "S {} {} {} {} {} {}\n",
            id.proto,
            id.addr,
            id.port,
            u8::from(n.vip),
            n.scheduler,
            n.name
        ));
        for ((addr, port), st) in &n.states {
            out.push_str(&format!("B {addr} {port} {st}\n"));
        }
    }
    out
}

/// The lines of `format_view`; malformed lines (and backends of a
/// malformed service) are skipped.
fn parse_view(text: &str) -> BTreeMap<ServiceId, Named> {
    const STATES: [BackendState; 3] =
        [BackendState::Up, BackendState::Down, BackendState::Draining];
    let mut out = BTreeMap::new();
    let mut cur: Option<ServiceId> = None;
    for l in text.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["S", proto, addr, port, vip, sched, name] => {
                cur = (|| {
                    let id = ServiceId {
                        proto: proto.parse().ok()?,
                        addr: addr.parse().ok()?,
                        port: port.parse().ok()?,
                    };
                    let scheduler: Scheduler = sched.parse().ok()?;
                    out.insert(
                        id,
                        Named {
                            name: (*name).to_owned(),
                            scheduler,
                            vip: *vip == "1",
                            states: BTreeMap::new(),
                        },
                    );
                    Some(id)
                })();
            }
            ["B", addr, port, st] => {
                let parsed = (addr.parse::<IpAddr>(), port.parse::<u16>());
                let state = STATES.into_iter().find(|s| s.as_str() == *st);
                if let (Some(id), (Ok(a), Ok(p)), Some(state)) = (cur, parsed, state) {
                    if let Some(n) = out.get_mut(&id) {
                        n.states.insert((a, p), state);
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// `meshlb status` in IPVS mode: the kernel's table and counters, named by
/// the view the daemon of `node` (default: the only one here) last wrote
/// under `state_dir`. `None` when no daemon ran in IPVS mode here.
pub async fn status_from_state(
    state_dir: &std::path::Path,
    node: Option<&str>,
) -> Result<Option<Status>, DataplaneError> {
    let mut views: Vec<PathBuf> = match std::fs::read_dir(state_dir) {
        Ok(d) => d
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "view"))
            .collect(),
        Err(_) => return Ok(None),
    };
    views.sort();
    let stem = |p: &PathBuf| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let Some(path) = (match node {
        Some(n) => views.iter().find(|p| stem(p) == n),
        None => views.first(),
    }) else {
        return Ok(None);
    };
    let names =
        parse_view(&std::fs::read_to_string(path).map_err(DataplaneError::context("ipvs status"))?);
    let mut ipvs = Ipvs::open()
        .await
        .map_err(DataplaneError::context("ipvs status"))?;
    let have = dump(&mut ipvs)
        .await
        .map_err(DataplaneError::context("ipvs status"))?;
    Ok(Some(status_of(&stem(path), &names, &have)))
}

fn status_of(node: &str, names: &BTreeMap<ServiceId, Named>, have: &Table) -> Status {
    let mut by_name: BTreeMap<&str, ServiceStatus> = BTreeMap::new();
    for (id, n) in names {
        let Some((svc, dests)) = have.get(id) else {
            continue;
        };
        let s = by_name
            .entry(n.name.as_str())
            .or_insert_with(|| ServiceStatus {
                name: n.name.clone(),
                vip: None,
                ports: vec![],
                scheduler: n.scheduler,
                backends: vec![],
                packets: 0,
                bytes: 0,
                connections: 0,
            });
        if n.vip {
            s.vip.get_or_insert_with(|| id.addr.to_string());
        }
        let proto =
            crate::model::Proto::from_number(id.proto).map_or("?".into(), |p| p.to_string());
        let port = format!("{}/{proto}", id.port);
        if !s.ports.contains(&port) {
            s.ports.push(port);
        }
        let st = svc.stats;
        s.packets += st.in_packets + st.out_packets;
        s.bytes += st.in_bytes + st.out_bytes;
        s.connections += st.conns;
        for (k, d) in dests {
            let st = d.stats;
            s.backends.push(BackendStatus {
                addr: d.addr.to_string(),
                port: d.port,
                weight: d.weight,
                state: n.states.get(k).copied().unwrap_or(BackendState::Up),
                packets: st.in_packets + st.out_packets,
                bytes: st.in_bytes + st.out_bytes,
                connections: st.conns,
                packets_in: st.in_packets,
                packets_out: st.out_packets,
                bytes_in: st.in_bytes,
                bytes_out: st.out_bytes,
            });
        }
    }
    Status {
        interfaces: Vec::new(),
        sync_latency: None,
        node: node.to_owned(),
        dataplane: DataplaneKind::Ipvs.as_str(),
        services: by_name.into_values().collect(),
        conntrack_entries: 0,
        embryonic_flows: 0,
        new_flows_per_second: 0,
        flood_threshold: 0,
        flood: false,
        snat_ports_in_use: 0,
        flow_table_size: 0,
        counters: BTreeMap::new(),
    }
}

/// One owned service per line: `proto addr port`.
fn format_owned(owned: &BTreeSet<ServiceId>) -> String {
    owned
        .iter()
        .map(|id| format!("{} {} {}\n", id.proto, id.addr, id.port))
        .collect()
}

/// The lines of `format_owned`; malformed lines are skipped.
fn parse_owned(text: &str) -> BTreeSet<ServiceId> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some(ServiceId {
                proto: w.next()?.parse().ok()?,
                addr: w.next()?.parse().ok()?,
                port: w.next()?.parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        BackendKey, BackendSpec, BackendState, Frontend, Proto, ServiceKey, ServiceSpec,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn desired(backends: &[(&str, u32, BackendState)]) -> DesiredState {
        let spec = ServiceSpec {
            affinity_secs: 0,
            frontends: [
                Frontend {
                    addr: Some(ip("10.96.0.10")),
                    port: 80,
                    proto: Proto::Tcp,
                },
                Frontend {
                    addr: None,
                    port: 80,
                    proto: Proto::Tcp,
                },
            ]
            .into(),
            backends: backends
                .iter()
                .map(|(a, w, s)| {
                    (
                        BackendKey {
                            addr: ip(a),
                            port: 8000,
                        },
                        BackendSpec {
                            weight: *w,
                            state: *s,
                            remote: false,
                        },
                    )
                })
                .collect(),
        };
        DesiredState {
            services: [(
                ServiceKey {
                    name: "web".into(),
                    proto: Proto::Tcp,
                    port: 80,
                },
                spec.into(),
            )]
            .into(),
            local_addrs: [ip("192.168.1.5"), ip("fd00::5")].into(),
        }
    }

    fn sid(a: &str) -> ServiceId {
        ServiceId {
            addr: ip(a),
            port: 80,
            proto: 6,
        }
    }

    #[test]
    fn the_status_view_round_trips_and_skips_malformed_lines() {
        let id = |port| ServiceId {
            proto: 6,
            addr: "10.96.0.10".parse().unwrap(),
            port,
        };
        let mut names = BTreeMap::new();
        names.insert(
            id(80),
            Named {
                name: "web".into(),
                scheduler: Scheduler::Maglev,
                vip: true,
                states: [
                    (("10.0.1.2".parse().unwrap(), 8000), BackendState::Up),
                    (("fd00::2".parse().unwrap(), 8000), BackendState::Draining),
                ]
                .into_iter()
                .collect(),
            },
        );
        names.insert(
            id(81),
            Named {
                name: "db".into(),
                scheduler: Scheduler::Sh,
                vip: false,
                states: BTreeMap::new(),
            },
        );
        let text = format_view(&names);
        assert_eq!(parse_view(&text), names);
        let noisy = format!(
            "garbage\nS 6 10.96.0.10 82 1 nosuch x\nB 10.0.9.9 1 up\nS 6 not-an-ip 83 1 rr y\n{text}B 10.0.1.3 8000 sideways\n"
        );
        assert_eq!(parse_view(&noisy), names);
    }

    #[test]
    fn owned_services_round_trip_through_the_state_file() {
        let owned: BTreeSet<ServiceId> = [sid("10.96.0.10"), sid("fd00::5")].into();
        assert_eq!(parse_owned(&format_owned(&owned)), owned);
        assert_eq!(parse_owned("6 nope 80\n17 10.0.0.1\n"), BTreeSet::new());
    }

    #[test]
    fn vip_and_every_node_address_get_a_service_with_their_family_of_backends() {
        let t = table(
            &desired(&[
                ("10.0.1.2", 100, BackendState::Up),
                ("10.0.1.3", 100, BackendState::Draining),
                ("10.0.1.4", 100, BackendState::Down),
            ]),
            &BTreeMap::new(),
        );
        assert_eq!(
            t.keys().copied().collect::<Vec<_>>(),
            vec![sid("10.96.0.10"), sid("192.168.1.5"), sid("fd00::5")]
        );
        let (s, d) = &t[&sid("10.96.0.10")];
        assert_eq!(s.sched, "mh");
        let w: Vec<u32> = d.values().map(|d| d.weight).collect();
        assert_eq!(w, vec![100, 0, 0], "draining and down take no new flows");
        assert!(t[&sid("fd00::5")].1.is_empty(), "no IPv6 backends");
    }

    #[test]
    fn sync_is_a_diff_in_a_safe_order_and_leaves_foreign_services_alone() {
        let opts: BTreeMap<String, IpvsOptions> = [(
            "web".to_string(),
            IpvsOptions {
                sched: "wrr".into(),
                persistence: Some(600),
            },
        )]
        .into();
        let before = table(
            &desired(&[("10.0.1.2", 100, BackendState::Up)]),
            &BTreeMap::new(),
        );
        let owned: BTreeSet<ServiceId> = before.keys().copied().collect();
        // Nothing to do when the kernel already holds the table meshlb
        // created (adoption by a restarted daemon).
        assert!(diff(&before, &before, &owned).is_empty());
        let mut have = before.clone();
        let foreign = sid("172.16.0.1");
        have.insert(
            foreign,
            (service(foreign, &IpvsOptions::default()), Dests::new()),
        );
        let want = table(&desired(&[("10.0.1.3", 50, BackendState::Up)]), &opts);
        let changes = diff(&want, &have, &owned);
        let kinds: Vec<&str> = changes
            .iter()
            .map(|c| match c {
                Change::AddService(_) => "add-svc",
                Change::SetService(_) => "set-svc",
                Change::AddDest(..) => "add-dest",
                Change::SetDest(..) => "set-dest",
                Change::DelDest(..) => "del-dest",
                Change::DelService(_) => "del-svc",
            })
            .collect();
        // 3 services rescheduled, 2 IPv4 ones get the new dest and lose
        // the old one; the foreign service is kept.
        assert_eq!(
            kinds,
            vec!["set-svc", "set-svc", "set-svc", "add-dest", "add-dest", "del-dest", "del-dest"]
        );
        assert!(!changes
            .iter()
            .any(|c| matches!(c, Change::DelService(id) if *id == foreign)));
        // An owned service that is no longer wanted goes, last.
        let empty = Table::new();
        let gone = diff(&empty, &before, &owned);
        assert_eq!(gone.len(), 3);
        assert!(gone.iter().all(|c| matches!(c, Change::DelService(_))));
    }

    fn skey() -> ServiceKey {
        ServiceKey {
            name: "web".into(),
            proto: Proto::Tcp,
            port: 80,
        }
    }

    fn bkey(a: &str) -> BackendKey {
        BackendKey {
            addr: ip(a),
            port: 8000,
        }
    }

    #[test]
    fn remote_backends_are_the_masquerade_set() {
        let mut d = desired(&[
            ("10.0.1.2", 100, BackendState::Up),
            ("10.0.2.2", 100, BackendState::Down),
            ("fd00:2::2", 0, BackendState::Up),
        ]);
        let spec = Arc::make_mut(d.services.get_mut(&skey()).unwrap());
        for a in ["10.0.2.2", "fd00:2::2"] {
            spec.backends.get_mut(&bkey(a)).unwrap().remote = true;
        }
        // Down or draining, a remote backend keeps its established flows:
        // they still need the SNAT.
        let want: BTreeSet<Remote> = ["10.0.2.2", "fd00:2::2"]
            .iter()
            .map(|a| Remote {
                addr: ip(a),
                proto: 6,
                port: 8000,
            })
            .collect();
        assert_eq!(remotes(&d), want);
    }

    #[test]
    fn held_down_is_weight_zero_in_the_kernel_for_a_backend_wanted_up() {
        let want = desired(&[
            ("10.0.1.2", 100, BackendState::Up),
            ("10.0.1.3", 100, BackendState::Up),
            ("10.0.1.4", 0, BackendState::Up),
        ]);
        let mut have = table(&want, &BTreeMap::new());
        for (_, dests) in have.values_mut() {
            if let Some(d) = dests.get_mut(&(ip("10.0.1.3"), 8000)) {
                d.weight = 0;
            }
        }
        let owned: BTreeSet<ServiceId> = have.keys().copied().collect();
        // 10.0.1.4 is at weight 0 because it is drained, not held down.
        assert_eq!(
            held_down(&want, &have, &owned),
            [(skey(), bkey("10.0.1.3"))].into()
        );
        assert!(
            held_down(&want, &Table::new(), &owned).is_empty(),
            "nothing in the kernel"
        );
        assert!(
            held_down(&want, &have, &BTreeSet::new()).is_empty(),
            "another tool's weights are not meshlb's health"
        );
    }

    /// `/metrics` in IPVS mode: one service by name over its VIP and node
    /// address services, the kernel's counters per destination, the
    /// state meshlb programmed.
    #[test]
    fn status_names_the_kernel_services_and_keeps_their_counters() {
        let want = desired(&[
            ("10.0.1.2", 100, BackendState::Up),
            ("10.0.1.3", 100, BackendState::Down),
        ]);
        let mut have = table(&want, &BTreeMap::new());
        for (id, (_, dests)) in &mut have {
            // The IPv6 node address's service has no IPv4 destination.
            if let Some(d) = dests.get_mut(&(ip("10.0.1.2"), 8000)) {
                d.stats = Stats {
                    conns: if id.addr == ip("10.96.0.10") { 7 } else { 2 },
                    in_packets: 10,
                    out_packets: 8,
                    in_bytes: 1000,
                    out_bytes: 800,
                };
            }
        }
        let view = IpvsView::default();
        view.update(&want, &have, &ServiceConfigs::default());
        let names = view.0.lock().unwrap().clone();
        let st = status_of("n1", &names, &have);
        assert_eq!(st.dataplane, "ipvs");
        assert_eq!(st.services.len(), 1);
        let svc = &st.services[0];
        assert_eq!(
            (svc.name.as_str(), svc.vip.as_deref(), svc.scheduler),
            ("web", Some("10.96.0.10"), Scheduler::Maglev)
        );
        assert_eq!(svc.ports, vec!["80/tcp"]);
        let text = crate::daemon::metrics::render(&st);
        let line = |p: &str| text.lines().find(|l| l.starts_with(p)).map(str::to_owned);
        assert_eq!(
            line("meshlb_connections_total{service=\"web\",backend=\"10.0.1.2:8000\"}").as_deref(),
            Some("meshlb_connections_total{service=\"web\",backend=\"10.0.1.2:8000\"} 9"),
            "VIP and node-address services summed"
        );
        assert_eq!(
            line("meshlb_backend_up{service=\"web\",backend=\"10.0.1.3:8000\"}").as_deref(),
            Some("meshlb_backend_up{service=\"web\",backend=\"10.0.1.3:8000\"} 0")
        );
        assert_eq!(
            line("meshlb_dataplane_info").as_deref(),
            Some("meshlb_dataplane_info{kind=\"ipvs\"} 1")
        );
    }

    /// The service a change is about.
    fn touched(c: &Change) -> ServiceId {
        match c {
            Change::AddService(s) | Change::SetService(s) => s.id,
            Change::AddDest(id, _)
            | Change::SetDest(id, _)
            | Change::DelDest(id, _)
            | Change::DelService(id) => *id,
        }
    }

    /// Another tool's service (rr, one destination of its own) on web's
    /// VIP, there before meshlb's first sync.
    fn with_foreign(mut have: Table, id: ServiceId) -> Table {
        let opts = IpvsOptions {
            sched: "rr".into(),
            persistence: None,
        };
        let d = Dest {
            addr: ip("10.0.9.9"),
            port: 9000,
            weight: 7,
            fwd: IP_VS_CONN_F_MASQ,
            active_conns: 0,
            inactive_conns: 0,
            stats: Stats::default(),
        };
        have.insert(id, (service(id, &opts), [((d.addr, d.port), d)].into()));
        have
    }

    #[test]
    fn a_foreign_service_at_a_wanted_id_is_never_touched_owned_or_cleaned() {
        let d = desired(&[("10.0.1.2", 100, BackendState::Up)]);
        let want = table(&d, &BTreeMap::new());
        let vip = sid("10.96.0.10");
        let kernel = with_foreign(Table::new(), vip);

        // First sync: the other frontends are created, the VIP's is not.
        let owned = BTreeSet::new();
        assert_eq!(conflicts(&d, &kernel, &owned), [(vip, "web".into())].into());
        let changes = diff(&want, &kernel, &owned);
        assert!(changes.iter().all(|c| touched(c) != vip), "{changes:?}");
        let added: BTreeSet<ServiceId> = changes
            .iter()
            .filter_map(|c| match c {
                Change::AddService(s) => Some(s.id),
                _ => None,
            })
            .collect();
        assert_eq!(added, [sid("192.168.1.5"), sid("fd00::5")].into());
        let owned = owned_after(&want, &kernel, &owned);
        assert_eq!(owned, added, "the foreign service never becomes meshlb's");

        // Later syncs (the kernel now holds both) change nothing, even
        // with new backends, and the owned set stays without it.
        let mut kernel = with_foreign(want.clone(), vip);
        let more = table(
            &desired(&[
                ("10.0.1.2", 100, BackendState::Up),
                ("10.0.1.3", 100, BackendState::Up),
            ]),
            &BTreeMap::new(),
        );
        let changes = diff(&more, &kernel, &owned);
        assert!(!changes.is_empty());
        assert!(changes.iter().all(|c| touched(c) != vip), "{changes:?}");
        assert_eq!(owned_after(&more, &kernel, &owned), owned);

        // meshlb's service gone: only its own are deleted.
        let gone = diff(&Table::new(), &kernel, &owned);
        assert_eq!(gone.iter().map(touched).collect::<BTreeSet<_>>(), owned);

        // `meshlb cleanup` names only what the state file lists.
        let live: BTreeSet<ServiceId> = kernel.keys().copied().collect();
        let state = parse_owned(&format_owned(&owned));
        assert_eq!(
            to_delete(&state, &live),
            owned.iter().copied().collect::<Vec<_>>()
        );

        // The other tool removes its service: meshlb takes the VIP.
        kernel.remove(&vip);
        assert!(conflicts(&d, &kernel, &owned).is_empty());
        assert_eq!(diff(&want, &kernel, &owned).first().map(touched), Some(vip));
        assert!(owned_after(&want, &kernel, &owned).contains(&vip));
    }

    #[test]
    fn endpoints_name_address_port_and_protocol() {
        assert_eq!(endpoint(&sid("10.96.0.10")), "10.96.0.10:80/tcp");
        let udp6 = ServiceId {
            addr: ip("fd00::10"),
            port: 53,
            proto: 17,
        };
        assert_eq!(endpoint(&udp6), "[fd00::10]:53/udp");
    }

    #[test]
    fn state_files_are_replaced_whole_and_leave_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("meshlb-ipvs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("n1.ipvs");
        crate::kernel::pinlock::write_atomic(&path, b"6 10.96.0.10 80\n").unwrap();
        crate::kernel::pinlock::write_atomic(&path, b"17 10.96.0.15 53\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "17 10.96.0.15 53\n"
        );
        assert!(!crate::kernel::pinlock::tmp_path(&path).exists());
        assert!(
            crate::kernel::pinlock::write_atomic(&dir.join("no/such/dir/n1.ipvs"), b"x").is_err(),
            "an unwritable state file is an error, not a panic"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
