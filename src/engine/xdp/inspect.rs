//! `meshlb status` and `meshlb explain`: answers read straight from the
//! pinned maps, so they describe what the kernel does on this node, daemon
//! running or not. `explain` uses the data path's own flow hash.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use meshlb_common::{
    AddrKey, AffinityKey, FlowKey, FrontendKey, BE_F_PRESENT, CT_F_CLOSING, NO_BACKEND,
};

use crate::engine::xdp::{kind_from_meta, tables};
use crate::kernel::pinned::{addr_bytes, addr_from, Maps};
use crate::model::config::Scheduler;
use crate::model::status::{
    BackendStatus, Explanation, IfaceStatus, Reason, ServiceStatus, Status,
};
use crate::model::{Frontend, Proto};

/// Errors of `status`/`explain`.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Pinned(#[from] crate::kernel::pinned::PinnedError),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The interfaces the daemon of `pins` attached, as it last wrote them
/// beside its pin lock (empty when it never did, or in IPVS mode).
pub fn interfaces(pins: &std::path::Path) -> Vec<IfaceStatus> {
    let path = crate::kernel::pinlock::runtime_file(pins, crate::engine::xdp::IFACES_EXT);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
            log::warn!("{}: {e}", path.display());
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

/// The runtime file (beside the pin lock) the daemon keeps its recent
/// sync latencies in, for `status`.
pub const SYNC_EXT: &str = "sync.json";

/// The sync latencies the daemon of `pins` last wrote (`None`: none yet,
/// or no daemon with an etcd source).
pub fn sync_latency(pins: &std::path::Path) -> Option<crate::model::counters::SyncLatency> {
    let path = crate::kernel::pinlock::runtime_file(pins, SYNC_EXT);
    let text = std::fs::read_to_string(&path).ok()?;
    serde_json::from_str(&text)
        .map_err(|e| log::warn!("{}: {e}", path.display()))
        .ok()
}

/// The runtime file the daemon keeps the announced VIPs and their owners
/// in, for `status`.
pub const VIPS_EXT: &str = "vips.json";

/// The announced VIPs the daemon of `pins` last wrote (empty: none, or no
/// daemon with an etcd source).
pub fn vips(pins: &std::path::Path) -> Vec<crate::model::status::VipStatus> {
    let path = crate::kernel::pinlock::runtime_file(pins, VIPS_EXT);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Vec::new();
    };
    serde_json::from_str(&text)
        .map_err(|e| log::warn!("{}: {e}", path.display()))
        .unwrap_or_default()
}

fn fmt_addr(a: IpAddr) -> String {
    a.to_string()
}

/// This node's programmed state. `node`: the name to report; `None`: the
/// name the programming daemon recorded.
pub fn status(maps: &Maps, node: Option<&str>) -> Result<Status, InspectError> {
    let err = |map| move |source| InspectError::Map { map, source };
    let meta = maps
        .meta
        .get(&0, 0)
        .map_err(err(meshlb_common::maps::META))?;
    let recorded = String::from_utf8_lossy(&meta.node)
        .trim_end_matches('\0')
        .to_owned();
    let node = node.unwrap_or(&recorded);
    let mut by_name: BTreeMap<String, ServiceStatus> = BTreeMap::new();
    let mut id_name = BTreeMap::new();
    for slot in tables::services(maps)? {
        let (id, n) = (slot.id, slot.name);
        let name = slot.name_lossy();
        let proto = slot.proto().map_or("?".into(), |p| p.to_string());
        let stats = Maps::sum_stats(&maps.service_stats, id);
        let s = by_name
            .entry(name.clone())
            .or_insert_with(|| ServiceStatus {
                name: name.clone(),
                vip: None,
                ports: vec![],
                scheduler: Scheduler::Maglev,
                backends: vec![],
                packets: 0,
                bytes: 0,
                connections: 0,
            });
        s.ports.push(format!("{}/{proto}", n.port));
        s.packets += stats.packets_in + stats.packets_out;
        s.bytes += stats.bytes_in + stats.bytes_out;
        s.connections += stats.connections;
        id_name.insert(id, name);
    }
    for (k, v) in maps.frontends.iter().flatten() {
        if k.addr == [0; 16] {
            continue;
        }
        if let (Some(name), Some(a)) = (id_name.get(&v.service_id), addr_from(&k.addr, k.family)) {
            if let Some(s) = by_name.get_mut(name) {
                s.vip.get_or_insert_with(|| fmt_addr(a));
            }
        }
    }
    for slot in tables::backends(maps)? {
        let (id, b) = (slot.id, slot.backend);
        let (Some(name), Some(addr)) = (id_name.get(&b.service_id), slot.addr) else {
            continue;
        };
        let st = Maps::sum_stats(&maps.backend_stats, id);
        let state = slot.state;
        if let Some(s) = by_name.get_mut(name) {
            s.backends.push(BackendStatus {
                addr: fmt_addr(addr),
                port: u16::from_be(b.port),
                weight: b.weight,
                state,
                packets: st.packets_in + st.packets_out,
                bytes: st.bytes_in + st.bytes_out,
                connections: st.connections,
                packets_in: st.packets_in,
                packets_out: st.packets_out,
                bytes_in: st.bytes_in,
                bytes_out: st.bytes_out,
            });
        }
    }
    let counters = meshlb_common::Counter::ALL
        .iter()
        .zip(maps.counters())
        .map(|(c, v)| (c.name(), v))
        .collect();
    let new_flows_per_second = new_flow_rate(maps);
    let flood_threshold = u64::from(
        maps.flow_config
            .get(&0, 0)
            .map_or(meshlb_common::DEFAULT_FLOOD_THRESHOLD, |c| c.flood()),
    );
    Ok(Status {
        interfaces: Vec::new(),
        sync_latency: None,
        node: node.to_owned(),
        dataplane: if meta.layout_version == 0 {
            "none"
        } else {
            kind_from_meta(meta.dataplane).as_str()
        },
        services: by_name.into_values().collect(),
        conntrack_entries: maps.conntrack.keys().count() as u64,
        snat_ports_in_use: maps.snat.keys().count() as u64,
        flow_table_size: u64::from(meshlb_common::MAX_FLOWS),
        embryonic_flows: maps.conntrack_embryonic.keys().count() as u64,
        new_flows_per_second,
        flood_threshold,
        flood: new_flows_per_second > flood_threshold,
        counters,
        socket_lb: Default::default(),
        vips: Vec::new(),
    })
}

/// New flows per second: the per-CPU counts of the last full second (or
/// of the current one, if already higher).
fn new_flow_rate(maps: &Maps) -> u64 {
    let now = meshlb_common::RateWindow::window_of(crate::kernel::pinned::monotonic_ns());
    let Ok(per_cpu) = maps.new_flow_rate.get(&0, 0) else {
        return 0;
    };
    let in_window = |w: u32| -> u64 {
        per_cpu
            .iter()
            .filter(|r| r.window == w)
            .map(|r| u64::from(r.count))
            .sum()
    };
    in_window(now.wrapping_sub(1)).max(in_window(now))
}

fn sockaddr(a: IpAddr, port: u16) -> String {
    SocketAddr::new(a, port).to_string()
}

/// CLOCK_BOOTTIME in nanoseconds (what `bpf_ktime_get_boot_ns` reads),
/// from `/proc/uptime` (10 ms resolution: plenty for timeouts in seconds).
fn boot_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1e9) as u64)
}

/// The backend session affinity gives a new flow of `key`'s client, as
/// the data path decides it (`select_backend` in the eBPF `lb`): the
/// service has a timeout, the client's entry is fresh, and its backend is
/// of this service and family, neither down nor draining.
fn affinity_backend(maps: &Maps, service_id: u32, key: &FlowKey) -> Option<String> {
    let timeout = maps.service_affinity.get(&service_id, 0).ok()?;
    if timeout == 0 {
        return None;
    }
    let akey = AffinityKey {
        service_id,
        family: key.family,
        _pad: [0; 3],
        addr: key.src,
    };
    let entry = maps.affinity.get(&akey, 0).ok()?;
    if !entry.fresh(boot_ns()?, timeout) {
        return None;
    }
    let b = maps.backends.get(&entry.backend_id, 0).ok()?;
    if !b.takes_new_flows(service_id, key.family) {
        return None;
    }
    addr_from(&b.addr, b.family).map(|a| sockaddr(a, u16::from_be(b.port)))
}

/// A frontend `match_frontend` found: its entry, how `explain` names it,
/// and its service's name.
struct Matched {
    fe: meshlb_common::FrontendValue,
    frontend: String,
    service: Option<String>,
}

/// The frontend of `dst`, as the data path matches it: the exact address
/// (a VIP) first, then a node port on one of this node's addresses (or,
/// `loopback`: the socket-level balancer's, on loopback too).
fn match_frontend(maps: &Maps, proto: Proto, dst: SocketAddr, loopback: bool) -> Option<Matched> {
    let (d, family) = addr_bytes(dst.ip());
    let mut fk = FrontendKey {
        addr: d,
        port: dst.port().to_be(),
        proto: proto.number(),
        family,
    };
    let local = |d| {
        maps.local_addrs
            .get(
                &AddrKey {
                    addr: d,
                    family,
                    _pad: [0; 3],
                },
                0,
            )
            .is_ok()
    };
    let mut fe = maps.frontends.get(&fk, 0).ok();
    let node_port = fe.is_none() && (local(d) || (loopback && dst.ip().is_loopback()));
    if node_port {
        fk.addr = [0; 16];
        fe = maps.frontends.get(&fk, 0).ok();
    }
    let fe = fe?;
    let frontend = if node_port {
        format!("{}/{proto} (node port)", sockaddr(dst.ip(), dst.port()))
    } else {
        Frontend {
            addr: Some(dst.ip()),
            port: dst.port(),
            proto,
        }
        .to_string()
    };
    let service = maps
        .service_names
        .get(&fe.service_id, 0)
        .ok()
        .map(|n| String::from_utf8_lossy(n.bytes()).into_owned());
    Some(Matched {
        fe,
        frontend,
        service,
    })
}

/// What the socket-level balancer does with a node-local socket of
/// cookie `cookie` (as `ss -e` prints it, `sk:<hex>`) connecting to `dst`:
/// the backend it was balanced to (`Reason::Socket`), else the one its
/// cookie picks now (`Reason::SocketSlot`), by the data path's own
/// `socket_slot` and tries.
pub fn explain_socket(maps: &Maps, proto: Proto, cookie: u64, dst: SocketAddr) -> Explanation {
    // What the socket asked for (its record holds it as asked) and the
    // frontend that is: an IPv4-mapped address is an IPv4 frontend.
    let (asked, _) = addr_bytes(dst.ip());
    let dst = match dst.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(dst, |v4| SocketAddr::new(v4.into(), dst.port())),
        IpAddr::V4(_) => dst,
    };
    let (_, family) = addr_bytes(dst.ip());
    let port = dst.port().to_be();
    let Some(Matched {
        fe,
        frontend,
        service,
    }) = match_frontend(maps, proto, dst, true)
    else {
        return Explanation {
            service: None,
            frontend: None,
            backend: None,
            reason: Reason::NoService,
            slot: None,
        };
    };
    let backend_of = |b: &meshlb_common::Backend| {
        addr_from(&b.addr, b.family).map(|a| sockaddr(a, u16::from_be(b.port)))
    };
    // Balanced already: its record names the backend.
    let recorded = maps.sock_rev.iter().filter_map(Result::ok).find(|(k, v)| {
        k.cookie == cookie
            && v.service_id == fe.service_id
            && v.addr == asked
            && v.port == port
            && v.proto == proto.number()
    });
    if let Some((k, _)) = recorded {
        return Explanation {
            service,
            frontend: Some(frontend),
            backend: addr_from(&k.addr, k.family).map(|a| sockaddr(a, u16::from_be(k.port))),
            reason: Reason::Socket,
            slot: None,
        };
    }
    let run = maps
        .ring_run(fe.service_id, meshlb_common::SOCK_SLOT_TRIES, |m| {
            meshlb_common::hash::socket_slot(cookie, port, m)
        })
        .unwrap_or_default();
    let pick = run.iter().find_map(|(slot, id)| {
        let b = maps.backends.get(id, 0).ok()?;
        b.takes_new_flows(fe.service_id, family)
            .then(|| (*slot, backend_of(&b)))
    });
    match pick {
        Some((slot, backend)) => Explanation {
            service,
            frontend: Some(frontend),
            backend,
            reason: Reason::SocketSlot,
            slot: Some(slot),
        },
        None => Explanation {
            service,
            frontend: Some(frontend),
            backend: None,
            reason: Reason::NoBackend,
            slot: None,
        },
    }
}

/// Which backend the data plane picks for `proto src -> dst`, and why.
pub fn explain(maps: &Maps, proto: Proto, src: SocketAddr, dst: SocketAddr) -> Explanation {
    let (s, family) = addr_bytes(src.ip());
    let (d, _) = addr_bytes(dst.ip());
    let key = FlowKey {
        src: s,
        dst: d,
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto: proto.number(),
        family,
        _pad: [0; 2],
    };
    let Some(Matched {
        fe,
        frontend,
        service,
    }) = match_frontend(maps, proto, dst, false)
    else {
        return Explanation {
            service: None,
            frontend: None,
            backend: None,
            reason: Reason::NoService,
            slot: None,
        };
    };
    if let Ok(ct) = maps.conntrack.get(&key, 0) {
        if ct.flags & CT_F_CLOSING == 0 {
            return Explanation {
                service,
                frontend: Some(frontend),
                backend: addr_from(&ct.backend_addr, family)
                    .map(|a| sockaddr(a, u16::from_be(ct.backend_port))),
                reason: Reason::Conntrack,
                slot: None,
            };
        }
    }
    if let Some(backend) = affinity_backend(maps, fe.service_id, &key) {
        return Explanation {
            service,
            frontend: Some(frontend),
            backend: Some(backend),
            reason: Reason::Affinity,
            slot: None,
        };
    }
    let pick = maps.ring_pick(fe.service_id, &key).ok().flatten();
    let slot = pick.map(|(slot, _)| slot);
    let backend = pick
        .map(|(_, b)| b)
        .filter(|b| *b != NO_BACKEND)
        .and_then(|id| maps.backends.get(&id, 0).ok())
        .filter(|b| b.flags & BE_F_PRESENT != 0 && b.family == family)
        .and_then(|b| addr_from(&b.addr, b.family).map(|a| sockaddr(a, u16::from_be(b.port))));
    let reason = if backend.is_some() {
        Reason::Maglev
    } else {
        Reason::NoBackend
    };
    Explanation {
        service,
        frontend: Some(frontend),
        backend,
        reason,
        slot,
    }
}
