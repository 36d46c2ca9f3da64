//! What IPVS mode shows: the view of the kernel's services by meshlb's
//! names (kept in memory for `/metrics`, and in `<node>.view` for `meshlb
//! status`), the owned-set state file's format, and the read model built
//! from a dump of the kernel's table.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::dump;
use super::table::{services, Table};
use super::{DataplaneError, DataplaneKind, ServiceConfigs};
use crate::kernel::ipvs::{Ipvs, IpvsError, ServiceId};
use crate::model::config::Scheduler;
use crate::model::status::{BackendStatus, ServiceStatus, Status};
use crate::model::{BackendState, DesiredState};

/// What `/metrics` needs beside the kernel's counters: which service and
/// state each IPVS service and destination stands for (the kernel knows
/// no names). Updated by every sync; read at scrape time with a fresh
/// dump of the kernel's table and stats.
#[derive(Clone, Debug, Default)]
pub struct IpvsView(pub(super) Arc<Mutex<BTreeMap<ServiceId, Named>>>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Named {
    pub(super) name: String,
    pub(super) scheduler: Scheduler,
    pub(super) vip: bool,
    pub(super) states: BTreeMap<(IpAddr, u16), BackendState>,
}

impl IpvsView {
    pub(super) fn update(
        &self,
        desired: &DesiredState,
        want: &Table,
        configs: &ServiceConfigs<'_>,
    ) {
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
    pub(super) fn save(&self, path: &Path) {
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
pub(super) fn format_view(names: &BTreeMap<ServiceId, Named>) -> String {
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
pub(super) fn parse_view(text: &str) -> BTreeMap<ServiceId, Named> {
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

pub(super) fn status_of(node: &str, names: &BTreeMap<ServiceId, Named>, have: &Table) -> Status {
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
        socket_lb: crate::model::status::SocketLbStatus {
            why: IPVS_LOCAL_CLIENTS.into(),
            ..Default::default()
        },
        vips: Vec::new(),
    }
}

/// What `status` says of node-local clients in IPVS mode: IPVS itself
/// serves connections the node originates (its `LOCAL_OUT` hook) to the
/// VIPs it holds on `meshlb0`, so no socket-level balancer is attached.
pub const IPVS_LOCAL_CLIENTS: &str =
    "IPVS mode: node-local clients reach services through the VIPs on meshlb0 (IPVS serves connections the node originates); no socket hooks";

/// One owned service per line: `proto addr port`.
pub(super) fn format_owned(owned: &BTreeSet<ServiceId>) -> String {
    owned
        .iter()
        .map(|id| format!("{} {} {}\n", id.proto, id.addr, id.port))
        .collect()
}

/// The lines of `format_owned`; malformed lines are skipped.
pub(super) fn parse_owned(text: &str) -> BTreeSet<ServiceId> {
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
