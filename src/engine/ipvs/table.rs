//! The IPVS table a node should hold for a desired state, and the ordered
//! changes that turn the kernel's table into it (pure: a sync is a diff,
//! never a flush; only owned services are changed or deleted).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use super::BackendOf;
use crate::kernel::ipvs::consts::{
    IP_VS_CONN_F_MASQ, IP_VS_SVC_F_PERSISTENT, IP_VS_SVC_F_SCHED_MH_FALLBACK,
    IP_VS_SVC_F_SCHED_MH_PORT,
};
use crate::kernel::ipvs::{Dest, Service, ServiceId, Stats};
use crate::kernel::nft::Remote;
use crate::model::{DesiredState, ServiceKey, ServiceSpec};

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
pub(super) fn service(id: ServiceId, o: &IpvsOptions) -> Service {
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
pub(super) fn is_foreign(id: &ServiceId, have: &Table, owned: &BTreeSet<ServiceId>) -> bool {
    have.contains_key(id) && !owned.contains(id)
}

/// The virtual services of `desired` that another tool already holds
/// (see `is_foreign`), each with the meshlb service it would implement:
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
pub(super) fn to_delete(owned: &BTreeSet<ServiceId>, live: &BTreeSet<ServiceId>) -> Vec<ServiceId> {
    owned.intersection(live).copied().collect()
}

/// `addr:port/proto` of a virtual service, for log lines.
pub(super) fn endpoint(id: &ServiceId) -> String {
    let proto =
        crate::model::Proto::from_number(id.proto).map_or(id.proto.to_string(), |p| p.to_string());
    format!("{}/{proto}", SocketAddr::new(id.addr, id.port))
}
