//! The XDP data plane: loads the embedded object, pins its maps and links
//! under `--bpffs`, adopts what a previous daemon pinned (a restart never
//! flushes conntrack, and the program is swapped atomically on the pinned
//! link), and executes reconciler plans as map updates.

pub mod inspect;
pub mod socklb;
pub mod tables;
pub(crate) mod view;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use aya::maps::MapData;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use meshlb_common::{
    flow_clock, idle_past, maps, AddrKey, Backend, Counter, CtEntry, FlowConfig, FlowKey,
    FrontendKey, FrontendValue, IfAddrKey, NodeMeta, ServiceInfo, ServiceName, SnatAddr,
    SockRevKey, SockRevValue, BE_F_DOWN, BE_F_DRAINING, BE_F_PRESENT, BE_F_SNAT, CT_F_SNAT,
    LAYOUT_VERSION, MAX_SERVICES, PROG_TC_HANDOFF, PROG_TC_LB, PROG_XDP_LB, PROG_XDP_PASS,
    PROTO_TCP, SNAT_EMBRYONIC_NS, SNAT_E_EST, SNAT_F_PRESENT, SNAT_IDX_V4, SNAT_IDX_V6,
    SNAT_PORT_MAX, SNAT_PORT_MIN, SVC_F_PRESENT,
};

use crate::control::nodenet::{Attach, NodeNet};
use crate::control::reconcile::{Op, Plan};
use crate::engine::mirror::Mirror;
use crate::engine::{
    BackendOf, Dataplane, DataplaneError, DataplaneKind, Engine, ServiceConfigs, Swept,
};
use crate::kernel::pinned::{addr_bytes, addr_from, monotonic_ns, Maps, PinnedError};
use crate::model::config::ConntrackConfig;
use crate::model::status::IfaceStatus;
use crate::model::Role;
use crate::model::{
    BackendKey, BackendState, DesiredState, Frontend, Observed, ObservedBackend, ObservedService,
    Proto, ServiceKey,
};
use view::View;

pub use crate::model::config::XdpMode as AttachMode;

/// Errors of loading and attaching.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("bpffs {dir}: {source}")]
    Bpffs {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("load eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("iface {iface}: attach {mode}: {source}")]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("iface {iface}: pinned link {path}: {msg}")]
    Link {
        iface: String,
        path: PathBuf,
        msg: String,
    },
    #[error(transparent)]
    Pinned(#[from] PinnedError),
}

fn link_pin(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("link_v{LAYOUT_VERSION}_{iface}"))
}

/// The hooks of one interface, each with its own link pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    /// The XDP load balancer (uplinks).
    Xdp,
    /// The TC load balancer (task interfaces).
    TcLb,
    /// The TC handoff program beside XDP (uplinks).
    TcHandoff,
}

impl Hook {
    const ALL: [Hook; 3] = [Hook::Xdp, Hook::TcLb, Hook::TcHandoff];

    fn pin_prefix(self) -> String {
        match self {
            Hook::Xdp => format!("link_v{LAYOUT_VERSION}_"),
            Hook::TcLb => format!("tclb_v{LAYOUT_VERSION}_"),
            Hook::TcHandoff => format!("tcho_v{LAYOUT_VERSION}_"),
        }
    }

    fn pin(self, dir: &Path, iface: &str) -> PathBuf {
        dir.join(format!("{}{iface}", self.pin_prefix()))
    }
}

/// Netlink (cls_bpf) filters, for kernels without tcx links (< 6.6), sit
/// at this priority and handle on the clsact ingress hook, so a restarted
/// daemon replaces its own filter in place.
const TC_NL_PRIORITY: u16 = 0x6d6c;
const TC_NL_HANDLE_LB: u32 = 0x6d6c_0001;
const TC_NL_HANDLE_HANDOFF: u32 = 0x6d6c_0002;

fn tc_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, XdpError> {
    let prog: &mut SchedClassifier = typed_program(ebpf, name)?;
    if prog.fd().is_err() {
        let t = std::time::Instant::now();
        prog.load().map_err(program_error(name))?;
        log_verified(name, t);
    }
    Ok(prog)
}

/// The program `name` of the object, as its kind `T`.
fn typed_program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, XdpError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| program_error(name)(aya::programs::ProgramError::NotLoaded))?
        .try_into()
        .map_err(program_error(name))
}

fn program_error(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> XdpError {
    move |e| XdpError::Program {
        name,
        source: Box::new(e),
    }
}

/// Attaches a TC program to `iface`'s ingress: adopts its pinned tcx link
/// (atomic program swap), else a tcx link pinned afresh (kernel >= 6.6),
/// else a netlink cls_bpf filter at meshlb's priority and handle (replaced
/// in place when it is there). The attachment outlives the daemon.
fn attach_tc(
    prog: &mut SchedClassifier,
    dir: &Path,
    iface: &str,
    hook: Hook,
) -> Result<(), XdpError> {
    let path = hook.pin(dir, iface);
    let link_err = |msg: String| XdpError::Link {
        iface: iface.to_owned(),
        path: path.clone(),
        msg,
    };
    let attach_err = |e: aya::programs::ProgramError| XdpError::Attach {
        iface: iface.to_owned(),
        mode: "tc",
        source: Box::new(e),
    };
    if path.exists() {
        let pinned = PinnedLink::from_pin(&path).map_err(|e| link_err(e.to_string()))?;
        let fd: FdLink = pinned.into();
        let link = SchedClassifierLink::try_from(fd).map_err(|e| link_err(e.to_string()))?;
        prog.attach_to_link(link)
            .map_err(|e| link_err(format!("swap program: {e}")))?;
        return Ok(());
    }
    let tcx = prog.attach_with_options(
        iface,
        TcAttachType::Ingress,
        TcAttachOptions::TcxOrder(Default::default()),
    );
    match tcx {
        Ok(id) => {
            let link = prog.take_link(id).map_err(attach_err)?;
            let fd: FdLink = link
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| link_err(e.to_string()))?;
            fd.pin(&path).map_err(|e| link_err(format!("pin: {e}")))?;
            Ok(())
        }
        Err(e) => {
            log::info!("iface {iface}: tcx attach failed ({e}); using a cls_bpf filter");
            attach_tc_netlink(prog, iface, hook).map_err(attach_err)?;
            // A netlink filter has no pin: a marker directory (bpffs takes
            // directories, not files) tells `cleanup` to delete it.
            let marker = nl_marker(dir, iface, hook);
            std::fs::create_dir_all(&marker)
                .map_err(|e| link_err(format!("marker {}: {e}", marker.display())))
        }
    }
}

/// The marker of a netlink filter of `hook` on `iface`.
fn nl_marker(dir: &Path, iface: &str, hook: Hook) -> PathBuf {
    let h = if hook == Hook::TcHandoff { "ho" } else { "lb" };
    dir.join(format!("{NL_MARKER_PREFIX}{h}_{iface}"))
}

const NL_MARKER_PREFIX: &str = "tcnl_v1_";

/// Deletes the netlink filter a marker directory names (`cleanup`).
fn detach_nl_marker(name: &str) {
    let Some(rest) = name.strip_prefix(NL_MARKER_PREFIX) else {
        return;
    };
    let (handle, iface) = match rest.split_once('_') {
        Some(("ho", i)) => (TC_NL_HANDLE_HANDOFF, i),
        Some(("lb", i)) => (TC_NL_HANDLE_LB, i),
        _ => return,
    };
    let link = SchedClassifierLink::attached(
        iface,
        TcAttachType::Ingress,
        TC_NL_PRIORITY,
        TcHandle::from(handle),
        None,
    );
    match link.map(aya::programs::Link::detach) {
        Ok(Ok(())) => log::info!("iface {iface}: cls_bpf filter deleted"),
        Ok(Err(e)) => log::warn!("iface {iface}: cls_bpf filter: {e}"),
        Err(e) => log::warn!("iface {iface}: cls_bpf filter: {e}"),
    }
}

/// The netlink (cls_bpf) fallback of `attach_tc`.
fn attach_tc_netlink(
    prog: &mut SchedClassifier,
    iface: &str,
    hook: Hook,
) -> Result<(), aya::programs::ProgramError> {
    let handle = TcHandle::from(match hook {
        Hook::TcHandoff => TC_NL_HANDLE_HANDOFF,
        _ => TC_NL_HANDLE_LB,
    });
    if let Err(e) = aya::programs::tc::qdisc_add_clsact(iface) {
        log::debug!("iface {iface}: clsact: {e} (already there?)");
    }
    // Replace our filter if it is there (a restart), else create it.
    let replaced =
        SchedClassifierLink::attached(iface, TcAttachType::Ingress, TC_NL_PRIORITY, handle, None)
            .ok()
            .and_then(|l| prog.attach_to_link(l).ok());
    let id = match replaced {
        Some(id) => id,
        None => prog.attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(aya::programs::tc::NlOptions {
                priority: TC_NL_PRIORITY,
                handle,
                classid: None,
            }),
        )?,
    };
    // A netlink filter stays until deleted; dropping aya's link object
    // would delete it.
    std::mem::forget(prog.take_link(id)?);
    Ok(())
}

/// Removes the pins of `iface`'s hooks other than `keep` (a role change:
/// an uplink became a task interface or the other way round).
fn unpin_other_hooks(dir: &Path, iface: &str, keep: &[Hook]) {
    for h in Hook::ALL.into_iter().filter(|h| !keep.contains(h)) {
        let p = h.pin(dir, iface);
        if p.exists() {
            match std::fs::remove_file(&p) {
                Ok(()) => log::info!("iface {iface}: {h:?} hook no longer wanted: detached"),
                Err(e) => log::warn!("iface {iface}: {h:?} hook unpin failed: {e}"),
            }
        }
    }
}

/// Makes sure `dir` is a directory on a bpffs.
pub fn ensure_bpffs_dir(dir: &Path) -> Result<(), XdpError> {
    std::fs::create_dir_all(dir).map_err(|source| XdpError::Bpffs {
        dir: dir.to_owned(),
        source,
    })
}

/// The loader of the embedded object for this kernel: where it refuses
/// `bpf_xdp_adjust_meta` to XDP programs (probed once), the object's
/// `XDP_META_GLOBAL` is set to 0, so the XDP program verifies and hands
/// off the frames it cannot transmit through the `HANDOFF` map instead of
/// metadata (said once in the log). Tests and benches load with it too.
pub fn loader() -> EbpfLoader<'static> {
    static OFF: u8 = 0;
    let mut loader = EbpfLoader::new();
    if !crate::kernel::bpfsys::xdp_meta_allowed() {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            log::info!(
                "this kernel refuses bpf_xdp_adjust_meta to XDP programs: frames XDP cannot transmit are handed to TC by flow (map {}) instead of metadata",
                maps::HANDOFF
            );
        });
        loader.override_global(meshlb_common::XDP_META_GLOBAL, &OFF, true);
    }
    loader
}

/// Whether frames XDP cannot transmit are handed to TC in XDP metadata
/// (else by flow, in the `HANDOFF` map): whether this kernel lets XDP
/// programs call `bpf_xdp_adjust_meta`.
pub fn handoff_in_metadata() -> bool {
    crate::kernel::bpfsys::xdp_meta_allowed()
}

/// Loads the object with maps pinned (created or adopted) under `dir`.
fn load(dir: &Path, max_flows: u32) -> Result<Ebpf, XdpError> {
    ensure_bpffs_dir(dir)?;
    let mut loader = loader();
    loader.default_map_pin_directory(dir);
    for name in [maps::CONNTRACK, maps::REVERSE_NAT, maps::SNAT] {
        loader.map_max_entries(name, max_flows);
    }
    loader
        .load(crate::EBPF_OBJECT)
        .map_err(|e| XdpError::Load(Box::new(e)))
}

/// Copies the flows of a conntrack map of the V1 layout (an earlier
/// meshlb's, pinned under `dir`) into the current one, as seen now, so an
/// upgrade keeps established connections; the V1 pin is removed after
/// (`remove_superseded`). Returns how many were copied.
fn migrate_conntrack_v1(
    dir: &Path,
    ct: &mut aya::maps::HashMap<MapData, FlowKey, CtEntry>,
) -> usize {
    let path = dir.join(maps::CONNTRACK_V1);
    if !path.exists() {
        return 0;
    }
    // V1 was an LRU hash of 32-byte values.
    let old = MapData::from_pin(&path)
        .map_err(|e| e.to_string())
        .and_then(|d| {
            aya::maps::HashMap::<MapData, FlowKey, [u8; 32]>::try_from(aya::maps::Map::LruHashMap(
                d,
            ))
            .map_err(|e| e.to_string())
        });
    let old = match old {
        Ok(m) => m,
        Err(e) => {
            log::warn!(
                "map {}: not migrated ({e}); its flows start afresh",
                maps::CONNTRACK_V1
            );
            return 0;
        }
    };
    let now = flow_clock(monotonic_ns());
    let mut n = 0;
    for (k, v) in old.iter().filter_map(Result::ok) {
        if ct.insert(k, CtEntry::from_v1(&v, now), 0).is_ok() {
            n += 1;
        }
    }
    log::info!(
        "map {}: {n} flows copied into {}",
        maps::CONNTRACK_V1,
        maps::CONNTRACK
    );
    n
}

/// Copies the rings of the flat ring array of an earlier meshlb (1,021
/// slots per service at `id * 1021`, pinned under `dir`) into `RINGS`, for
/// every present service without a ring there, so an upgrade keeps
/// balancing new flows before its first sync (which may wait for etcd).
/// The V1 pin is removed after (`remove_superseded`). Returns how many.
fn migrate_rings_v1(dir: &Path, maps: &mut Maps) -> usize {
    const V1_RING: u32 = 1021;
    let path = dir.join(maps::MAGLEV_V1);
    if !path.exists() {
        return 0;
    }
    let old = MapData::from_pin(&path)
        .map_err(|e| e.to_string())
        .and_then(|d| {
            aya::maps::Array::<MapData, u32>::try_from(aya::maps::Map::Array(d))
                .map_err(|e| e.to_string())
        });
    let old = match old {
        Ok(m) => m,
        Err(e) => {
            log::warn!(
                "map {}: not migrated ({e}); rings are written by the first sync",
                maps::MAGLEV_V1
            );
            return 0;
        }
    };
    let mut rings = Vec::new();
    for id in 0..MAX_SERVICES {
        let present = maps
            .services
            .get(&id, 0)
            .is_ok_and(|s| s.flags & SVC_F_PRESENT != 0);
        if !present || maps.has_ring(id) {
            continue;
        }
        let ring: Result<Vec<u32>, _> = (0..V1_RING)
            .map(|slot| old.get(&(id * V1_RING + slot), 0))
            .collect();
        match ring {
            Ok(r) => rings.push((id, r)),
            Err(e) => log::warn!("service slot {id}: ring not migrated ({e})"),
        }
    }
    let n = rings.len();
    let rings: Vec<(u32, &[u32])> = rings.iter().map(|(id, r)| (*id, r.as_slice())).collect();
    if let Err(e) = maps.set_rings(&rings) {
        log::warn!("map {}: rings not migrated ({e})", maps::MAGLEV_V1);
        return 0;
    }
    log::info!(
        "map {}: {n} rings copied into {}",
        maps::MAGLEV_V1,
        maps::RINGS
    );
    n
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, XdpError> {
    let prog: &mut Xdp = typed_program(ebpf, name)?;
    if prog.fd().is_err() {
        let t = std::time::Instant::now();
        prog.load().map_err(program_error(name))?;
        log_verified(name, t);
    }
    Ok(prog)
}

/// Logs how long the kernel took to verify a program: seconds on a small
/// board, and the reason a daemon is slow to start there.
fn log_verified(name: &str, since: std::time::Instant) {
    log::info!(
        "program {name}: loaded and verified in {} ms",
        since.elapsed().as_millis()
    );
}

/// Attaches `prog` to `iface`, adopting the pinned link if there is one
/// (atomic program swap, no packet lost), else attaching afresh and
/// pinning the new link. Returns the mode of a fresh attach (`None` when
/// an existing link was adopted).
fn attach_pinned(
    prog: &mut Xdp,
    dir: &Path,
    iface: &str,
    mode: AttachMode,
) -> Result<Option<DataplaneKind>, XdpError> {
    let path = link_pin(dir, iface);
    let link_err = |msg: String| XdpError::Link {
        iface: iface.to_owned(),
        path: path.clone(),
        msg,
    };
    if path.exists() {
        let pinned = PinnedLink::from_pin(&path).map_err(|e| link_err(e.to_string()))?;
        let fd: FdLink = pinned.into();
        let link =
            aya::programs::xdp::XdpLink::try_from(fd).map_err(|e| link_err(e.to_string()))?;
        prog.attach_to_link(link)
            .map_err(|e| link_err(format!("swap program: {e}")))?;
        return Ok(None);
    }
    let tries: &[(XdpMode, DataplaneKind, &'static str)] = match mode {
        AttachMode::Native => &[(XdpMode::Driver, DataplaneKind::XdpNative, "native")],
        AttachMode::Generic => &[(XdpMode::Skb, DataplaneKind::XdpGeneric, "generic")],
        AttachMode::Auto => &[
            (XdpMode::Driver, DataplaneKind::XdpNative, "native"),
            (XdpMode::Skb, DataplaneKind::XdpGeneric, "generic"),
        ],
    };
    let mut last = None;
    for (xmode, kind, label) in tries {
        match prog.attach(iface, *xmode) {
            Ok(id) => {
                let link = prog.take_link(id).map_err(|e| XdpError::Attach {
                    iface: iface.to_owned(),
                    mode: label,
                    source: Box::new(e),
                })?;
                let fd: FdLink = link
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| link_err(e.to_string()))?;
                fd.pin(&path).map_err(|e| link_err(format!("pin: {e}")))?;
                return Ok(Some(*kind));
            }
            Err(e) => {
                log::info!("iface {iface}: {label} XDP attach failed: {e}");
                last = Some((label, e));
            }
        }
    }
    let (label, e) = last.expect("at least one attach mode is tried");
    Err(XdpError::Attach {
        iface: iface.to_owned(),
        mode: label,
        source: Box::new(e),
    })
}

/// The XDP engine of `meshlb run`.
pub struct XdpDataplane {
    maps: Maps,
    kind: DataplaneKind,
    /// The flow timeouts last written.
    flow_config: FlowConfig,
    /// What the maps hold, kept in memory after the first full read so a
    /// sync costs O(change), not a read of every map slot. Dropped (and
    /// re-read) whenever an apply fails part-way.
    mirror: Option<Mirror>,
    /// What a full sync programmed and what the maps hold since, so the
    /// next syncs plan only the services that changed (`view`). It
    /// replaces the mirror once built; a failed apply or `reread` drops it
    /// (the next full sync reads the maps).
    view: Option<View>,
    /// The node facts last written (`None`: not yet; the maps may hold an
    /// earlier daemon's).
    node_net: Option<NodeNet>,
    /// The pin directory (`/metrics` opens its own handles there).
    dir: PathBuf,
    /// How uplinks get XDP (`--xdp-mode`).
    mode: AttachMode,
    /// Services of the last sync that do not fit the tables, and why.
    rejected: BTreeMap<ServiceKey, String>,
    /// The interfaces attached, by name.
    attached: BTreeMap<String, IfaceStatus>,
    /// Interfaces whose attach failed: the error last logged (logged
    /// again only when it changes) and when it was tried (tried again
    /// after `ATTACH_RETRY`, not at every look).
    failed: BTreeMap<String, (String, std::time::Instant)>,
    /// The socket-level balancer is attached (`set_socket_lb`).
    socket_lb: bool,
    /// A sync since the last look removed a backend or took one down:
    /// connected UDP sockets on it are to be ended
    /// (`end_stale_udp_sockets`).
    backends_lost: bool,
    /// This node's own namespace cookie (once `set_socket_lb` turned it
    /// on).
    sock_netns: BTreeSet<u64>,
    /// The other namespaces served, with a path into each
    /// (`set_socket_namespaces`; `None`: not told yet, and the namespaces
    /// an earlier daemon served are kept meanwhile).
    sock_extra: Option<BTreeMap<u64, PathBuf>>,
    // Keeps the programs loaded while the daemon runs (and attaches the
    // interfaces that appear later); the pinned links keep them attached
    // when the daemon is gone.
    ebpf: Ebpf,
}

impl XdpDataplane {
    /// Loads (or adopts) the data plane under `dir` and attaches it to
    /// the interfaces of `attach` (see `attach_iface`). An uplink where
    /// XDP cannot be attached is an error (the daemon may fall back to
    /// IPVS). Pins of interfaces not in `attach` are kept (adopted): the
    /// first `set_interfaces` with `prune` removes those no longer wanted.
    pub fn open(
        dir: &Path,
        attach: &[Attach],
        mode: AttachMode,
        node: &str,
        conntrack: &ConntrackConfig,
    ) -> Result<Self, XdpError> {
        let mut ebpf = load(dir, conntrack.max_flows)?;
        let mut maps = Maps::from_ebpf(&mut ebpf)?;
        migrate_conntrack_v1(dir, &mut maps.conntrack);
        migrate_rings_v1(dir, &mut maps);
        remove_superseded(dir);
        let size = MapData::from_pin(dir.join(maps::CONNTRACK))
            .and_then(|m| m.info())
            .map_or(0, |i| i.max_entries());
        if size != 0 && size != conntrack.max_flows {
            log::warn!(
                "conntrack.max_flows = {}: the pinned flow tables under {} hold {size}; the new size applies once they are recreated (remove the pins while no meshlb runs)",
                conntrack.max_flows,
                dir.display()
            );
        }
        maps.flow_config
            .set(0, conntrack.flow_config(), 0)
            .map_err(|source| PinnedError::Map {
                name: maps::FLOW_CONFIG,
                source,
            })?;
        let previous = maps.meta.get(&0, 0).ok().filter(|m| m.layout_version != 0);
        // Verified now (up to seconds on a small board), so a task
        // interface that appears later is attached at once.
        tc_program(&mut ebpf, PROG_TC_LB)?;
        let mut kind = None;
        let mut attached = BTreeMap::new();
        for a in attach {
            let (st, fresh) = attach_iface(&mut ebpf, dir, a, mode)?;
            kind = kind.or(fresh);
            attached.insert(a.name.clone(), st);
        }
        rebuild_vips(&mut maps).map_err(|e| XdpError::Link {
            iface: String::new(),
            path: dir.join(maps::VIPS),
            msg: e.to_string(),
        })?;
        let kind = kind
            .or_else(|| previous.map(|m| kind_from_meta(m.dataplane)))
            .unwrap_or(match mode {
                AttachMode::Generic => DataplaneKind::XdpGeneric,
                _ => DataplaneKind::XdpNative,
            });
        let mut meta = NodeMeta {
            layout_version: LAYOUT_VERSION,
            dataplane: kind_to_meta(kind),
            applied_at: now(),
            ..Default::default()
        };
        let n = node.len().min(meta.node.len());
        meta.node[..n].copy_from_slice(&node.as_bytes()[..n]);
        maps.meta
            .set(0, meta, 0)
            .map_err(|source| PinnedError::Map {
                name: maps::META,
                source,
            })?;
        let mut dp = XdpDataplane {
            maps,
            kind,
            flow_config: conntrack.flow_config(),
            mirror: None,
            view: None,
            node_net: None,
            dir: dir.to_owned(),
            mode,
            rejected: BTreeMap::new(),
            attached,
            failed: BTreeMap::new(),
            socket_lb: false,
            backends_lost: false,
            sock_netns: BTreeSet::new(),
            sock_extra: None,
            ebpf,
        };
        for st in dp.attached.values_mut() {
            if st.mode.is_empty() {
                st.mode = kind.as_str().to_owned();
            }
        }
        dp.save_interfaces();
        Ok(dp)
    }

    /// Attaches the interfaces of `want` not attached yet (or attached in
    /// another role); with `prune`, detaches every other interface,
    /// adopted pins included (without it, nothing is detached: the daemon
    /// does not know the whole picture yet). Returns whether anything
    /// changed. A failed attach is logged (once per distinct error) and
    /// tried again after `ATTACH_RETRY`; the others go on.
    pub fn set_interfaces(&mut self, want: &[Attach], prune: bool) -> bool {
        let mut changed = false;
        for a in want {
            if let Some(st) = self.attached.get_mut(&a.name) {
                if st.role == a.role {
                    if st.why != a.why {
                        st.why.clone_from(&a.why);
                        changed = true;
                    }
                    continue;
                }
            }
            if self
                .failed
                .get(&a.name)
                .is_some_and(|(_, at)| at.elapsed() < ATTACH_RETRY)
            {
                continue;
            }
            match attach_iface(&mut self.ebpf, &self.dir, a, self.mode) {
                Ok((mut st, fresh)) => {
                    if st.mode.is_empty() {
                        st.mode = fresh.unwrap_or(self.kind).as_str().to_owned();
                    }
                    log::info!(
                        "iface {}: attached as {} ({}): {}",
                        a.name,
                        st.role.as_str(),
                        st.mode,
                        a.why
                    );
                    self.failed.remove(&a.name);
                    self.attached.insert(a.name.clone(), st);
                    changed = true;
                }
                Err(e) => {
                    let e = e.to_string();
                    if self.failed.get(&a.name).map(|(last, _)| last) != Some(&e) {
                        log::error!(
                            "iface {}: not attached ({}): {e}; tried again every {}s while it is wanted",
                            a.name,
                            a.why,
                            ATTACH_RETRY.as_secs()
                        );
                    }
                    self.failed
                        .insert(a.name.clone(), (e, std::time::Instant::now()));
                }
            }
        }
        if prune {
            let wanted: BTreeSet<&str> = want.iter().map(|a| a.name.as_str()).collect();
            let mut gone: BTreeSet<String> = pinned_ifaces(&self.dir);
            gone.extend(self.attached.keys().cloned());
            gone.retain(|i| !wanted.contains(i.as_str()));
            for iface in gone {
                detach_iface(&self.dir, &iface);
                self.attached.remove(&iface);
                changed = true;
            }
            self.failed.retain(|i, _| wanted.contains(i.as_str()));
        }
        if changed {
            self.save_interfaces();
        }
        changed
    }

    /// The interfaces attached now.
    pub fn interfaces(&self) -> Vec<IfaceStatus> {
        self.attached.values().cloned().collect()
    }

    /// Writes the attached interfaces for `meshlb status` (another
    /// process), replacing the file atomically.
    fn save_interfaces(&self) {
        let path = crate::kernel::pinlock::runtime_file(&self.dir, IFACES_EXT);
        let text = serde_json::to_string_pretty(&self.interfaces()).unwrap_or_default();
        if let Err(e) = crate::kernel::pinlock::write_atomic(&path, text.as_bytes()) {
            log::warn!(
                "{}: {e} (`meshlb status` will not list the interfaces)",
                path.display()
            );
        }
    }

    /// Attaches the socket-level balancer (`[socket_lb] enabled`) to the
    /// cgroup v2 root and has it serve this namespace, or detaches it;
    /// where it cannot be on, says why in one log line. Returns what
    /// `meshlb status` shows (also written for it).
    pub fn set_socket_lb(&mut self, enabled: bool) -> socklb::SocketLbStatus {
        let mut st = socklb::SocketLbStatus::default();
        if !enabled {
            if socklb::detach(&self.dir) > 0 {
                log::info!("socket-level balancing: detached ([socket_lb] enabled = false)");
            }
            st.why = "[socket_lb] enabled = false".into();
        } else if let Some(cg) = socklb::cgroup2_root() {
            let own = crate::kernel::netns::current_cookie();
            match own
                .map_err(|e| format!("network namespace cookie: {e}"))
                .and_then(|c| {
                    socklb::attach(&mut self.ebpf, &self.dir, &cg).map_err(|e| e.to_string())?;
                    Ok(c)
                }) {
                Ok(c) => {
                    self.sock_netns = BTreeSet::from([c]);
                    self.sock_extra = None;
                    // An earlier daemon's containers stay served until
                    // this one is told its own (a restart has no gap);
                    // cookies are never reused, so a stale one is inert.
                    let mut all: BTreeSet<u64> =
                        self.maps.sock_netns.keys().filter_map(Result::ok).collect();
                    all.insert(c);
                    if let Err(e) = socklb::set_namespaces(&mut self.maps, &all) {
                        log::warn!("socket-level balancing: {e}");
                    }
                    log::info!(
                        "socket-level balancing: on (cgroup {}; this node's processes and containers reach services through VIPs, node addresses and loopback)",
                        cg.display()
                    );
                    st.on = true;
                    st.cgroup = Some(cg.display().to_string());
                    st.why = "this node's namespace and its containers'".into();
                }
                Err(e) => {
                    log::warn!("socket-level balancing: off ({e})");
                    st.why = e;
                }
            }
        } else {
            log::info!("socket-level balancing: off (cgroup v2 is not mounted)");
            st.why = "cgroup v2 is not mounted".into();
        }
        st.namespaces = self.sock_netns.len() as u64;
        socklb::save_status(&self.dir, &st);
        self.socket_lb = st.on;
        st
    }

    /// The network namespaces (by cookie, with a path into each) the
    /// socket-level balancer serves besides this node's own: its
    /// containers'. A no-op while it is off.
    pub fn set_socket_namespaces(&mut self, extra: &BTreeMap<u64, PathBuf>) {
        if !self.socket_lb || self.sock_extra.as_ref() == Some(extra) {
            return;
        }
        let own = self.sock_netns.iter().next().copied();
        let all: BTreeSet<u64> = own.into_iter().chain(extra.keys().copied()).collect();
        match socklb::set_namespaces(&mut self.maps, &all) {
            Ok(()) => self.sock_extra = Some(extra.clone()),
            Err(e) => log::warn!("socket-level balancing: {e}"),
        }
    }

    /// Ends the connected UDP sockets balanced to a backend that no longer
    /// takes flows (removed, down, or its slot reused): each is aborted
    /// (`SOCK_DESTROY`), so its owner learns at once instead of sending
    /// into a black hole, and connects again (to a live backend). An
    /// unconnected socket needs none of it: its next datagram is balanced
    /// afresh. Called after a sync that removed a backend or took one down
    /// (it reads every record: never per event otherwise).
    fn end_stale_udp_sockets(&mut self) {
        let udp: Vec<(SockRevKey, SockRevValue)> = self
            .maps
            .sock_rev
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| v.proto == meshlb_common::PROTO_UDP)
            .collect();
        if udp.is_empty() {
            return;
        }
        let backends = match self.maps.all_backends() {
            Ok(b) => b,
            Err(e) => {
                log::warn!("socket-level balancing: {e}");
                return;
            }
        };
        let stale: Vec<(SockRevKey, SocketAddr)> = udp
            .into_iter()
            .filter(|(k, v)| {
                !backends.get(v.backend_id as usize).is_some_and(|b| {
                    b.flags & BE_F_PRESENT != 0
                        && b.flags & BE_F_DOWN == 0
                        && b.service_id == v.service_id
                        && socklb::is_backend(b, k)
                })
            })
            .filter_map(|(k, _)| {
                addr_from(&k.addr, k.family).map(|a| (k, SocketAddr::new(a, u16::from_be(k.port))))
            })
            .collect();
        if stale.is_empty() {
            return;
        }
        let targets: BTreeMap<u64, SocketAddr> =
            stale.iter().map(|(k, a)| (k.cookie, *a)).collect();
        let mut ended = socklb::end_udp_sockets(&targets);
        for (cookie, path) in self.sock_extra.iter().flatten() {
            let t = targets.clone();
            match crate::kernel::netns::run_in(path, move || Ok(socklb::end_udp_sockets(&t))) {
                Ok(n) => ended += n,
                Err(e) => log::debug!("socket-level balancing: namespace {cookie}: {e}"),
            }
        }
        for (k, _) in &stale {
            let _ = self.maps.sock_rev.remove(k);
        }
        if ended > 0 {
            log::info!(
                "socket-level balancing: ended {ended} connected UDP socket(s) of backends that left or went down"
            );
        }
    }

    /// Writes this node's interface flags and SNAT addresses when they
    /// differ from what was last written; returns whether anything did.
    pub fn set_node_net(&mut self, net: &NodeNet) -> Result<bool, DataplaneError> {
        if self.node_net.as_ref() == Some(net) {
            return Ok(false);
        }
        apply_node_net(&mut self.maps, net)?;
        self.node_net = Some(net.clone());
        Ok(true)
    }

    /// Deletes the flow state of backend `backend_id` of service
    /// `service_id` (conntrack, reverse NAT and SNAT entries), so its
    /// established flows end; returns how many conntrack entries went.
    /// The backend must be out of the ring already, or new flows would
    /// come straight back.
    pub fn forget_flows(&mut self, service_id: u32, backend_id: u32) -> usize {
        let owned = |s: u32, b: u32| s == service_id && b == backend_id;
        let ct: Vec<_> = self
            .maps
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| owned(v.service_id, v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for k in &ct {
            let _ = self.maps.conntrack.remove(k);
        }
        let embryonic: Vec<_> = self
            .maps
            .conntrack_embryonic
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| owned(v.service_id, v.backend_id))
            .collect();
        for (k, v) in &embryonic {
            let _ = self.maps.conntrack_embryonic.remove(k);
            let _ = self.maps.reverse_nat_embryonic.remove(&reply_key(k, v));
        }
        let rnat: Vec<_> = self
            .maps
            .reverse_nat
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| owned(v.service_id, v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for k in &rnat {
            let _ = self.maps.reverse_nat.remove(k);
        }
        let snat: Vec<_> = self
            .maps
            .snat
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| owned(v.service_id, v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for k in &snat {
            let _ = self.maps.snat.remove(k);
        }
        ct.len()
    }

    /// The maps, for status and metrics while the daemon runs.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Writes the flow timeouts when they changed; returns whether they did.
    pub fn set_flow_config(&mut self, c: &ConntrackConfig) -> Result<bool, DataplaneError> {
        let want = c.flow_config();
        if want == self.flow_config {
            return Ok(false);
        }
        self.maps
            .flow_config
            .set(0, want, 0)
            .map_err(map_error(maps::FLOW_CONFIG))?;
        self.flow_config = want;
        Ok(true)
    }

    /// Removes what the data path would treat as absent anyway: conntrack
    /// entries idle past their timeout (with a local flow's reverse-NAT
    /// entry), and SNAT entries whose flow is gone once quiet past the
    /// quarantine (`SNAT_EMBRYONIC_NS` for a flow never established). A
    /// translated flow's SNAT entry outlives its conntrack entry by the
    /// quarantine: the port stays its own while the backend may still be
    /// in TIME_WAIT. Counted in `swept`.
    pub fn sweep(&mut self) -> Swept {
        let cfg = self.flow_config;
        let now_ns = monotonic_ns();
        let now = flow_clock(now_ns);
        let mut out = Swept::default();
        let expired: Vec<(FlowKey, CtEntry)> = self
            .maps
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| v.expired(now, k.proto, &cfg))
            .collect();
        for (k, v) in &expired {
            // Refreshed by a packet since it was read: live.
            match self.maps.conntrack.get(k, 0) {
                Ok(cur) if cur.expired(now, k.proto, &cfg) => {}
                _ => continue,
            }
            if self.maps.conntrack.remove(k).is_err() {
                continue;
            }
            out.flows += 1;
            if v.flags & CT_F_SNAT == 0 {
                // Only if the entry is still this flow's: a later flow from
                // the same client port, through another frontend of the
                // same backend, owns that reply tuple by now.
                let reply = reply_key(k, v);
                let ours = self
                    .maps
                    .reverse_nat
                    .get(&reply, 0)
                    .is_ok_and(|r| r.frontend_addr == k.dst && r.frontend_port == k.dport);
                if ours {
                    let _ = self.maps.reverse_nat.remove(&reply);
                }
            }
        }
        // Embryonic flows never established, past their closing or UDP
        // timeout (the data path ignores them already).
        let stale: Vec<(FlowKey, CtEntry)> = self
            .maps
            .conntrack_embryonic
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                let limit = if k.proto == PROTO_TCP {
                    cfg.tcp_closing()
                } else {
                    cfg.udp()
                };
                idle_past(now, v.last_seen, limit)
            })
            .collect();
        for (k, v) in &stale {
            if self.maps.conntrack_embryonic.remove(k).is_ok() {
                out.flows += 1;
            }
            if v.flags & CT_F_SNAT == 0 {
                let _ = self.maps.reverse_nat_embryonic.remove(&reply_key(k, v));
            }
        }
        let orphans: Vec<FlowKey> = self
            .maps
            .snat
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, e)| {
                let client = FlowKey {
                    src: e.client_addr,
                    dst: e.frontend_addr,
                    sport: e.client_port,
                    dport: e.frontend_port,
                    ..*k
                };
                let owned = self.maps.conntrack.get(&client, 0).is_ok_and(|ct| {
                    ct.flags & CT_F_SNAT != 0
                        && ct.snat_port == k.dport
                        && ct.backend_port == k.sport
                        && ct.backend_addr == k.src
                });
                let limit = if e.flags & SNAT_E_EST != 0 {
                    u64::from(cfg.snat_quarantine()) * 1_000_000_000
                } else {
                    SNAT_EMBRYONIC_NS
                };
                !owned && now_ns.saturating_sub(e.last_seen) > limit
            })
            .map(|(k, _)| k)
            .collect();
        for k in &orphans {
            if self.maps.snat.remove(k).is_ok() {
                out.snat_ports += 1;
            }
        }
        if out.flows > 0 {
            add_counter(&mut self.maps, Counter::Swept, out.flows as u64);
        }
        out
    }
}

/// The reply tuple (reverse-NAT key) of client flow `k` to `ct`'s backend.
fn reply_key(k: &FlowKey, ct: &CtEntry) -> FlowKey {
    FlowKey {
        src: ct.backend_addr,
        dst: k.src,
        sport: ct.backend_port,
        dport: k.sport,
        ..*k
    }
}

/// Adds `n` to a counter only userspace writes (CPU 0's slot: no BPF
/// program races this read-modify-write).
fn add_counter(maps: &mut Maps, c: Counter, n: u64) {
    let idx = c as u32;
    let Ok(values) = maps.counters.get(&idx, 0) else {
        return;
    };
    let mut v: Vec<u64> = values.iter().copied().collect();
    if let Some(first) = v.first_mut() {
        *first += n;
    }
    if let Ok(values) = aya::maps::PerCpuValues::try_from(v) {
        let _ = maps.counters.set(idx, values, 0);
    }
}

/// Writes this node's interface flags (`IFACES`) and its uplinks' MACs
/// (`IFACE_MACS`), each replacing what is there, and SNAT addresses
/// (`SNAT_ADDRS`).
pub fn apply_node_net(maps: &mut Maps, net: &NodeNet) -> Result<(), DataplaneError> {
    let before: BTreeMap<u32, u32> = maps.ifaces.iter().filter_map(Result::ok).collect();
    let stale: Vec<u32> = maps
        .ifaces
        .keys()
        .filter_map(Result::ok)
        .filter(|i| !net.iface_flags.contains_key(i))
        .collect();
    for i in stale {
        let _ = maps.ifaces.remove(&i);
    }
    for (i, f) in &net.iface_flags {
        maps.ifaces
            .insert(i, f, 0)
            .map_err(map_error(maps::IFACES))?;
    }
    if before != net.iface_flags {
        // A cached next hop carries its egress's flags: written first,
        // then made stale.
        maps.bump_next_hop_gen().map_err(DataplaneError::Pinned)?;
    }
    let stale: Vec<u32> = maps
        .iface_macs
        .keys()
        .filter_map(Result::ok)
        .filter(|i| !net.iface_macs.contains_key(i))
        .collect();
    for i in stale {
        let _ = maps.iface_macs.remove(&i);
    }
    for (i, m) in &net.iface_macs {
        let v = [m[0], m[1], m[2], m[3], m[4], m[5], 0, 0];
        if maps.iface_macs.get(i, 0).ok() != Some(v) {
            maps.iface_macs
                .insert(i, v, 0)
                .map_err(map_error(maps::IFACE_MACS))?;
        }
    }
    let want: BTreeSet<IfAddrKey> = net
        .iface_addrs
        .iter()
        .flat_map(|(i, (a4, a6))| [(i, a4), (i, a6)])
        .filter_map(|(i, a)| {
            a.map(|a| IfAddrKey {
                ifindex: *i,
                family: addr_bytes(a).1,
                _pad: [0; 3],
            })
        })
        .collect();
    let stale: Vec<IfAddrKey> = maps
        .iface_addrs
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains(k))
        .collect();
    for k in stale {
        let _ = maps.iface_addrs.remove(&k);
    }
    for (i, (a4, a6)) in &net.iface_addrs {
        for a in [a4, a6].into_iter().flatten() {
            let (bytes, family) = addr_bytes(*a);
            let key = IfAddrKey {
                ifindex: *i,
                family,
                _pad: [0; 3],
            };
            maps.iface_addrs
                .insert(key, bytes, 0)
                .map_err(map_error(maps::IFACE_ADDRS))?;
        }
    }
    for (idx, addr) in [(SNAT_IDX_V4, net.snat.0), (SNAT_IDX_V6, net.snat.1)] {
        maps.snat_addrs
            .set(idx, snat_entry(addr, net.ephemeral), 0)
            .map_err(map_error(maps::SNAT_ADDRS))?;
    }
    Ok(())
}

/// Whether `plan` removes a backend or takes one down (not a drain: a
/// draining backend keeps what it has).
fn loses_backends(plan: &Plan) -> bool {
    plan.ops.iter().any(|op| {
        matches!(
            op,
            Op::RemoveBackend { .. }
                | Op::UpsertBackend {
                    state: BackendState::Down,
                    ..
                }
        )
    })
}

/// The `SNAT_ADDRS` entry of one family: the default ports minus the
/// node's ephemeral range.
fn snat_entry(addr: Option<IpAddr>, ephemeral: Option<(u16, u16)>) -> SnatAddr {
    let (hole_min, hole_max) = ephemeral.unwrap_or((1, 0));
    match addr {
        Some(a) => SnatAddr {
            addr: addr_bytes(a).0,
            port_min: SNAT_PORT_MIN,
            port_max: SNAT_PORT_MAX,
            hole_min,
            hole_max,
            flags: SNAT_F_PRESENT,
            _pad: [0; 3],
        },
        None => SnatAddr::default(),
    }
}

/// Unpins maps of earlier layouts (`maps::SUPERSEDED`).
fn remove_superseded(dir: &Path) {
    for name in maps::SUPERSEDED {
        let p = dir.join(name);
        if p.exists() {
            match std::fs::remove_file(&p) {
                Ok(()) => log::info!("map {name}: superseded by a newer layout: unpinned"),
                Err(e) => log::warn!("map {name}: superseded, but unpinning failed: {e}"),
            }
        }
    }
}

/// The interfaces that have a pin (link or netlink filter marker) under
/// `dir`.
fn pinned_ifaces(dir: &Path) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            Hook::ALL
                .iter()
                .find_map(|h| name.strip_prefix(&h.pin_prefix()))
                .or_else(|| {
                    name.strip_prefix(NL_MARKER_PREFIX)
                        .and_then(|r| r.split_once('_'))
                        .map(|(_, i)| i)
                })
                .map(str::to_owned)
        })
        .collect()
}

/// Detaches every meshlb program from `iface`: removing a link pin
/// detaches its link; a netlink filter is deleted and its marker removed.
fn detach_iface(dir: &Path, iface: &str) {
    for h in Hook::ALL {
        let p = h.pin(dir, iface);
        if p.exists() {
            if let Err(e) = std::fs::remove_file(&p) {
                log::warn!("iface {iface}: unpinning {} failed: {e}", p.display());
            }
        }
        let marker = nl_marker(dir, iface, h);
        if marker.exists() {
            if let Some(name) = marker.file_name() {
                detach_nl_marker(&name.to_string_lossy());
            }
            if let Err(e) = std::fs::remove_dir(&marker) {
                log::warn!("iface {iface}: removing {} failed: {e}", marker.display());
            }
        }
    }
    log::info!("iface {iface}: no longer wanted: detached");
}

/// How long an interface whose attach failed waits before the next try.
const ATTACH_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// The file beside the pin lock listing the attached interfaces.
pub const IFACES_EXT: &str = "ifaces.json";

/// Attaches the data plane to one interface in its role: the TC load
/// balancer on a task interface (a task interface where TC cannot be
/// attached gets XDP, with a warning), XDP and the TC handoff program on
/// an uplink. Returns its status (`mode` left empty for an adopted XDP
/// link) and the XDP mode of a fresh XDP attach.
fn attach_iface(
    ebpf: &mut Ebpf,
    dir: &Path,
    a: &Attach,
    mode: AttachMode,
) -> Result<(IfaceStatus, Option<DataplaneKind>), XdpError> {
    let iface = a.name.as_str();
    let status = |role: Role, mode: &str| IfaceStatus {
        name: a.name.clone(),
        role,
        mode: mode.to_owned(),
        why: a.why.clone(),
    };
    if a.role == Role::Task {
        let attached =
            tc_program(ebpf, PROG_TC_LB).and_then(|prog| attach_tc(prog, dir, iface, Hook::TcLb));
        match attached {
            Ok(()) => {
                log::info!("iface {iface}: task interface: TC load balancer attached (ingress)");
                unpin_other_hooks(dir, iface, &[Hook::TcLb]);
                return Ok((status(Role::Task, "tc"), None));
            }
            Err(e) => log::warn!("iface {iface}: task interface, but TC attach failed ({e}): XDP instead (partial checksums of local senders are not handled there)"),
        }
    }
    let prog = program(ebpf, PROG_XDP_LB)?;
    let fresh = attach_pinned(prog, dir, iface, mode)?;
    match fresh {
        Some(k) => log::info!("iface {iface}: attached ({})", k.as_str()),
        None => log::info!("iface {iface}: adopted the pinned XDP link"),
    }
    let mut keep = vec![Hook::Xdp];
    let attached = tc_program(ebpf, PROG_TC_HANDOFF)
        .and_then(|prog| attach_tc(prog, dir, iface, Hook::TcHandoff));
    match attached {
        Ok(()) => keep.push(Hook::TcHandoff),
        Err(e) => log::warn!("iface {iface}: TC handoff program not attached ({e}): frames XDP cannot transmit go to the stack"),
    }
    unpin_other_hooks(dir, iface, &keep);
    let mode = fresh.map_or("", |k| k.as_str());
    Ok((status(Role::Uplink, mode), fresh))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn kind_from_meta(v: u32) -> DataplaneKind {
    match v {
        meshlb_common::DATAPLANE_XDP_GENERIC => DataplaneKind::XdpGeneric,
        meshlb_common::DATAPLANE_IPVS => DataplaneKind::Ipvs,
        _ => DataplaneKind::XdpNative,
    }
}

fn kind_to_meta(k: DataplaneKind) -> u32 {
    match k {
        DataplaneKind::XdpNative => meshlb_common::DATAPLANE_XDP_NATIVE,
        DataplaneKind::XdpGeneric => meshlb_common::DATAPLANE_XDP_GENERIC,
        DataplaneKind::Ipvs => meshlb_common::DATAPLANE_IPVS,
        DataplaneKind::Mirror => meshlb_common::DATAPLANE_NONE,
    }
}

/// Attaches the pass-everything program to `ifaces` in native mode and pins
/// the links under `dir` (for veth peers of native-mode interfaces).
pub fn attach_pass(dir: &Path, ifaces: &[String]) -> Result<(), XdpError> {
    let mut ebpf = load(&dir.join("maps"), meshlb_common::MAX_FLOWS)?;
    let prog = program(&mut ebpf, PROG_XDP_PASS)?;
    for iface in ifaces {
        attach_pinned(prog, dir, iface, AttachMode::Native)?;
    }
    Ok(())
}

/// Detaches and removes everything pinned under `dir`, then `dir` itself:
/// the links first (the interfaces stop running the program), then the
/// maps. Returns how many pins were removed.
pub fn cleanup(dir: &Path) -> Result<usize, XdpError> {
    let n = cleanup_contents(dir)?;
    for ext in [
        IFACES_EXT,
        crate::engine::xdp::inspect::SYNC_EXT,
        socklb::SOCKLB_EXT,
    ] {
        let _ = std::fs::remove_file(crate::kernel::pinlock::runtime_file(dir, ext));
    }
    if dir.exists() {
        std::fs::remove_dir(dir).map_err(|source| XdpError::Bpffs {
            dir: dir.to_owned(),
            source,
        })?;
    }
    Ok(n)
}

fn cleanup_contents(dir: &Path) -> Result<usize, XdpError> {
    let io = |source| XdpError::Bpffs {
        dir: dir.to_owned(),
        source,
    };
    if !dir.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    // Links (and netlink filters) before maps, so no interface runs a
    // program whose maps vanish.
    entries.sort_by_key(|p| {
        !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            n.starts_with(NL_MARKER_PREFIX)
                || n.starts_with(&socklb::pin_prefix())
                || Hook::ALL.iter().any(|h| n.starts_with(&h.pin_prefix()))
        })
    });
    for p in entries {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(NL_MARKER_PREFIX) {
            detach_nl_marker(name);
            std::fs::remove_dir(&p).map_err(io)?;
            removed += 1;
            continue;
        }
        if p.is_dir() {
            removed += cleanup(&p)?;
        } else {
            std::fs::remove_file(&p).map_err(io)?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn map_error(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map: name, source }
}

fn frontend_key(f: &Frontend) -> FrontendKey {
    let (addr, family) = match f.addr {
        Some(a) => addr_bytes(a),
        None => ([0; 16], 0),
    };
    FrontendKey {
        addr,
        port: f.port.to_be(),
        proto: f.proto.number(),
        family,
    }
}

/// Node-port frontends exist once per family in the map (addr all zero).
fn frontend_keys(f: &Frontend) -> Vec<FrontendKey> {
    match f.addr {
        Some(_) => vec![frontend_key(f)],
        None => [meshlb_common::FAMILY_V4, meshlb_common::FAMILY_V6]
            .into_iter()
            .map(|family| FrontendKey {
                family,
                ..frontend_key(f)
            })
            .collect(),
    }
}

fn service_name(key: &ServiceKey) -> ServiceName {
    let mut n = ServiceName {
        len: key.name.len().min(meshlb_common::MAX_NAME_LEN) as u8,
        proto: key.proto.number(),
        port: key.port,
        ..Default::default()
    };
    n.name[..n.len as usize].copy_from_slice(&key.name.as_bytes()[..n.len as usize]);
    n
}

fn state_flags(state: BackendState) -> u8 {
    match state {
        BackendState::Up => 0,
        BackendState::Draining => BE_F_DRAINING,
        BackendState::Down => BE_F_DOWN,
    }
}

/// Reads the service and backend tables back into the reconciler's terms.
pub fn observe_maps(maps: &Maps) -> Result<Observed, DataplaneError> {
    let mut obs = Observed::default();
    let mut by_id = std::collections::BTreeMap::new();
    for slot in tables::services(maps)? {
        let id = slot.id;
        let Some(key) = slot.key() else {
            log::warn!("service slot {id}: unreadable name, ignored");
            continue;
        };
        by_id.insert(id, key.clone());
        obs.services.insert(
            key,
            ObservedService {
                id,
                // No ring (an upgrade from the flat ring array, a ring
                // removed by hand): stale, so the reconcile writes one.
                ring_hash: if maps.has_ring(id) {
                    slot.info.ring_hash
                } else {
                    0
                },
                active_backends: slot.info.active_backends,
                affinity_secs: slot.affinity_secs,
                ..Default::default()
            },
        );
    }
    for item in &maps.frontends {
        let (k, v) = item.map_err(map_error(maps::FRONTENDS))?;
        let Some(key) = by_id.get(&v.service_id) else {
            continue;
        };
        let Some(proto) = Proto::from_number(k.proto) else {
            continue;
        };
        // All-zero address = node port (config rejects unspecified VIPs).
        let addr = if k.addr == [0; 16] {
            None
        } else {
            addr_from(&k.addr, k.family)
        };
        let fe = Frontend {
            addr,
            port: u16::from_be(k.port),
            proto,
        };
        if let Some(s) = obs.services.get_mut(key) {
            s.frontends.insert(fe);
        }
    }
    for slot in tables::backends(maps)? {
        let (id, b, state) = (slot.id, slot.backend, slot.state);
        let (Some(key), Some(addr)) = (by_id.get(&b.service_id), slot.addr) else {
            // Left behind by a daemon that died between removing a service
            // and its backends: the reconciler frees it.
            obs.orphan_backends.insert(id);
            continue;
        };
        let bkey = BackendKey {
            addr,
            port: u16::from_be(b.port),
        };
        if let Some(s) = obs.services.get_mut(key) {
            if s.backends.contains_key(&bkey) {
                // A duplicate slot (lowest id wins): free it.
                obs.orphan_backends.insert(id);
                continue;
            }
            s.backends.insert(
                bkey,
                ObservedBackend {
                    id,
                    weight: b.weight,
                    state,
                    remote: b.flags & BE_F_SNAT != 0,
                },
            );
        }
    }
    let mut locals = BTreeSet::new();
    for k in maps.local_addrs.keys() {
        let k = k.map_err(map_error(maps::LOCAL_ADDRS))?;
        if let Some(a) = addr_from(&k.addr, k.family) {
            locals.insert(a);
        }
    }
    obs.local_addrs = locals;
    Ok(obs)
}

/// Executes one plan on the maps.
///
/// The plan's rings are installed together: each is filled off to the
/// side first, then all are swapped in by one batch update (`RINGS` is an
/// array of maps, and every update of one waits for the programs running
/// meanwhile: once per plan, not once per ring). That happens at the
/// plan's first ring, after every backend the plan upserts (so a new ring
/// never names a missing backend) and before any service entry, frontend
/// or backend removal that follows it. A removed service's ring is
/// replaced by an empty one in the same batch.
pub fn apply_maps(maps: &mut Maps, plan: &Plan) -> Result<(), DataplaneError> {
    let ring_err = DataplaneError::Pinned;
    let mut rings: Vec<(u32, &[u32])> = Vec::new();
    for op in &plan.ops {
        if let Op::WriteRing { service_id, ring } = op {
            rings.push((*service_id, ring));
        }
    }
    for op in &plan.ops {
        if let Op::RemoveService { id } = op {
            if !rings.iter().any(|(s, _)| s == id) {
                rings.push((*id, &[]));
            }
        }
    }
    // Up to the first ring in order; then every backend the rings may
    // name, the rings, and the rest in order.
    let first_ring = plan
        .ops
        .iter()
        .position(|op| matches!(op, Op::WriteRing { .. }))
        .unwrap_or(plan.ops.len());
    let (before, after) = plan.ops.split_at(first_ring);
    apply_ops(maps, before.iter())?;
    apply_ops(
        maps,
        after
            .iter()
            .filter(|op| matches!(op, Op::UpsertBackend { .. })),
    )?;
    maps.set_rings(&rings).map_err(ring_err)?;
    apply_ops(
        maps,
        after
            .iter()
            .filter(|op| !matches!(op, Op::UpsertBackend { .. } | Op::WriteRing { .. })),
    )?;
    let meta = maps.meta.get(&0, 0).unwrap_or_default();
    let _ = maps.meta.set(
        0,
        NodeMeta {
            applied_at: now(),
            ..meta
        },
        0,
    );
    Ok(())
}

/// Executes `ops` in order; a run of consecutive backend, service or
/// frontend writes goes in batch updates, one per map (the same writes in
/// the same order per map; a full sync at 10,000 services makes a few
/// hundred system calls where it made 300,000, and a run of one costs
/// what a single update did).
fn apply_ops<'a>(maps: &mut Maps, ops: impl Iterator<Item = &'a Op>) -> Result<(), DataplaneError> {
    let mut run: Vec<&Op> = Vec::new();
    for op in ops {
        if run
            .first()
            .is_some_and(|r| std::mem::discriminant(*r) != std::mem::discriminant(op))
        {
            apply_run(maps, &run)?;
            run.clear();
        }
        run.push(op);
    }
    apply_run(maps, &run)
}

/// Executes a run of operations of one kind: backend, service and
/// frontend writes in batches (the only way they are written), the others
/// one by one (`apply_op`).
fn apply_run(maps: &mut Maps, run: &[&Op]) -> Result<(), DataplaneError> {
    let pinned = DataplaneError::Pinned;
    let Some(first) = run.first() else {
        return Ok(());
    };
    match first {
        Op::UpsertBackend { .. } => {
            let mut fresh = Vec::new();
            let mut slots = Vec::with_capacity(run.len());
            for op in run {
                if let Op::UpsertBackend {
                    id,
                    service_id,
                    key,
                    weight,
                    state,
                    remote,
                    fresh: f,
                } = op
                {
                    if *f {
                        fresh.push(*id);
                    }
                    slots.push((
                        *id,
                        backend_entry(*service_id, key, *weight, *state, *remote),
                    ));
                }
            }
            maps.zero_backend_stats(&fresh).map_err(pinned)?;
            maps.set_backends(&slots).map_err(pinned)
        }
        Op::UpsertService { .. } => {
            let (mut affinity, mut names, mut infos, mut fresh) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for op in run {
                if let Op::UpsertService {
                    id,
                    key,
                    active_backends,
                    ring_hash,
                    affinity_secs,
                    fresh: f,
                } = op
                {
                    affinity.push((*id, *affinity_secs));
                    if *f {
                        fresh.push(*id);
                    }
                    names.push((*id, service_name(key)));
                    infos.push((*id, service_info(*active_backends, *ring_hash)));
                }
            }
            // Each service's affinity and name before its slot.
            maps.set_service_affinity(&affinity).map_err(pinned)?;
            maps.zero_service_stats(&fresh).map_err(pinned)?;
            maps.set_service_names(&names).map_err(pinned)?;
            maps.set_services(&infos).map_err(pinned)
        }
        Op::AddFrontend { .. } => {
            let mut entries = Vec::with_capacity(run.len());
            for op in run {
                if let Op::AddFrontend {
                    frontend,
                    service_id,
                } = op
                {
                    for k in frontend_keys(frontend) {
                        entries.push((
                            k,
                            FrontendValue {
                                service_id: *service_id,
                                flags: 0,
                            },
                        ));
                    }
                }
            }
            // The VIP references first, counted by the frontends they
            // add (as `apply_op` does one by one).
            let mut refs: std::collections::HashMap<AddrKey, i64> = Default::default();
            for (k, _) in &entries {
                if k.family != 0 && k.addr != [0; 16] && maps.frontends.get(k, 0).is_err() {
                    *refs.entry(vip_key(k)).or_default() += 1;
                }
            }
            for (vip, n) in refs {
                vip_refs_of(maps, vip, n)?;
            }
            maps.set_frontends(&entries).map_err(pinned)
        }
        _ => run.iter().try_for_each(|op| apply_op(maps, op)),
    }
}

/// A backend's slot.
fn backend_entry(
    service_id: u32,
    key: &crate::model::BackendKey,
    weight: u32,
    state: BackendState,
    remote: bool,
) -> Backend {
    let (addr, family) = addr_bytes(key.addr);
    Backend {
        addr,
        port: key.port.to_be(),
        family,
        flags: BE_F_PRESENT | state_flags(state) | if remote { BE_F_SNAT } else { 0 },
        service_id,
        weight,
        _pad: 0,
    }
}

/// A present service's slot.
fn service_info(active_backends: u32, ring_hash: u64) -> ServiceInfo {
    ServiceInfo {
        flags: SVC_F_PRESENT,
        active_backends,
        ring_hash,
    }
}

/// Executes one operation of a plan (`apply_maps` installs the rings;
/// `apply_run` writes backends, services and frontends).
fn apply_op(maps: &mut Maps, op: &Op) -> Result<(), DataplaneError> {
    match op {
        Op::AddLocalAddr(a) => {
            let (addr, family) = addr_bytes(*a);
            maps.local_addrs
                .insert(
                    AddrKey {
                        addr,
                        family,
                        _pad: [0; 3],
                    },
                    1,
                    0,
                )
                .map_err(map_error(maps::LOCAL_ADDRS))?;
        }
        Op::RemoveLocalAddr(a) => {
            let (addr, family) = addr_bytes(*a);
            let _ = maps.local_addrs.remove(&AddrKey {
                addr,
                family,
                _pad: [0; 3],
            });
        }
        // Written in batches, even one alone.
        Op::UpsertBackend { .. } | Op::UpsertService { .. } | Op::AddFrontend { .. } => {
            apply_run(maps, &[op])?;
        }
        Op::RemoveBackend { id } => {
            maps.backends
                .set(*id, Backend::default(), 0)
                .map_err(map_error(maps::BACKENDS))?;
        }
        // `apply_maps` installs a plan's rings, all at once.
        Op::WriteRing { .. } => {}
        Op::RemoveService { id } => {
            maps.services
                .set(*id, ServiceInfo::default(), 0)
                .map_err(map_error(maps::SERVICES))?;
            maps.service_affinity
                .set(*id, 0, 0)
                .map_err(map_error(maps::SERVICE_AFFINITY))?;
            maps.service_names
                .set(*id, ServiceName::default(), 0)
                .map_err(map_error(maps::SERVICE_NAMES))?;
        }
        Op::RemoveFrontend { frontend } => {
            for k in frontend_keys(frontend) {
                if maps.frontends.remove(&k).is_ok() && k.addr != [0; 16] {
                    vip_refs(maps, &k, -1)?;
                }
            }
        }
    }
    Ok(())
}

/// The VIP key of a frontend key.
fn vip_key(k: &FrontendKey) -> AddrKey {
    AddrKey {
        addr: k.addr,
        family: k.family,
        _pad: [0; 3],
    }
}

/// Adds `delta` to the count of frontends using `k`'s VIP in `VIPS` (the
/// entry goes at zero).
fn vip_refs(maps: &mut Maps, k: &FrontendKey, delta: i64) -> Result<(), DataplaneError> {
    vip_refs_of(maps, vip_key(k), delta)
}

/// Adds `delta` to the frontends counted on `key` in `VIPS`.
fn vip_refs_of(maps: &mut Maps, key: AddrKey, delta: i64) -> Result<(), DataplaneError> {
    let n = i64::from(maps.vips.get(&key, 0).unwrap_or(0)) + delta;
    if n <= 0 {
        let _ = maps.vips.remove(&key);
        Ok(())
    } else {
        maps.vips
            .insert(key, n as u32, 0)
            .map_err(map_error(maps::VIPS))
    }
}

/// Rebuilds `VIPS` from the frontends (adoption: maps written by a daemon
/// that kept no VIP counts, or counts left by an interrupted apply).
pub fn rebuild_vips(maps: &mut Maps) -> Result<(), DataplaneError> {
    let mut want: std::collections::BTreeMap<([u8; 16], u8), u32> = Default::default();
    for k in maps.frontends.keys().filter_map(Result::ok) {
        if k.addr != [0; 16] {
            *want.entry((k.addr, k.family)).or_default() += 1;
        }
    }
    let stale: Vec<AddrKey> = maps
        .vips
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains_key(&(k.addr, k.family)))
        .collect();
    for k in stale {
        let _ = maps.vips.remove(&k);
    }
    for ((addr, family), n) in want {
        let key = AddrKey {
            addr,
            family,
            _pad: [0; 3],
        };
        maps.vips.insert(key, n, 0).map_err(map_error(maps::VIPS))?;
    }
    Ok(())
}

impl Dataplane for XdpDataplane {
    fn kind(&self) -> DataplaneKind {
        self.kind
    }

    fn observe(&self) -> Result<Observed, DataplaneError> {
        match (&self.view, &self.mirror) {
            (Some(v), _) => Ok(v.observed().clone()),
            (None, Some(m)) => m.observe(),
            (None, None) => observe_maps(&self.maps),
        }
    }

    fn apply(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        if self.mirror.is_none() {
            self.mirror = Some(Mirror::from_observed(&observe_maps(&self.maps)?));
        }
        self.view = None;
        let res = apply_maps(&mut self.maps, plan);
        let mirrored = self.mirror.as_mut().map(|m| m.apply(plan));
        if res.is_err() || !matches!(mirrored, Some(Ok(()))) {
            self.mirror = None;
            // Part of the plan may be in: recount the VIPs from what is.
            let _ = rebuild_vips(&mut self.maps);
        }
        res
    }
}

impl XdpDataplane {
    /// Plans and applies `desired` against what the maps hold (only the
    /// services changed since the last sync, once a view exists);
    /// returns the number of changes.
    fn sync_tables(
        &mut self,
        desired: &DesiredState,
        expired: &[BackendOf],
    ) -> Result<usize, DataplaneError> {
        let limits = crate::control::reconcile::Limits::default();
        if let Some(view) = &self.view {
            let part = view.part(desired);
            if view.fits_with(&part, limits) {
                return self.sync_part(part, limits, expired);
            }
        }
        let observed = self.observe()?;
        let (desired, rejected) = crate::control::reconcile::admit(
            desired,
            &observed,
            crate::control::reconcile::Limits::default(),
        );
        self.rejected = rejected;
        let plan = crate::control::reconcile::plan(&desired, &observed)?;
        let n = plan.ops.len();
        if n > 0 {
            self.apply(&plan)?;
            self.backends_lost |= loses_backends(&plan);
        }
        if self.rejected.is_empty() {
            // The view replaces the mirror (one copy of the tables, not two).
            if let Some(m) = self.mirror.take() {
                self.view = Some(View::new(desired.into_owned(), m.observe()?));
            }
        }
        self.end_expired(&observed, expired);
        Ok(n)
    }

    /// A sync that plans only the services changed since the last one
    /// (`view`): everything fits, so admission takes every service.
    fn sync_part(
        &mut self,
        part: crate::engine::xdp::view::Part,
        limits: crate::control::reconcile::Limits,
        expired: &[BackendOf],
    ) -> Result<usize, DataplaneError> {
        let Some(view) = self.view.as_mut() else {
            return Err(DataplaneError::Other("no view".into()));
        };
        if part.is_empty() {
            return Ok(0);
        }
        let plan = view.plan(&part, limits)?;
        self.mirror = None;
        if let Err(e) = apply_maps(&mut self.maps, &plan) {
            self.view = None;
            let _ = rebuild_vips(&mut self.maps);
            return Err(e);
        }
        self.backends_lost |= loses_backends(&plan);
        let before = part.observed.clone();
        if let Err(e) = view.commit(part, &plan) {
            log::warn!("the in-memory view refused a plan the maps took ({e}): the next sync reads the maps");
            self.view = None;
        }
        self.end_expired(&before, expired);
        Ok(plan.ops.len())
    }

    /// Ends the flows of backends drained past their timeout, as
    /// `observed` (before the sync that removed them) names them.
    fn end_expired(&mut self, observed: &Observed, expired: &[BackendOf]) {
        for (skey, bk) in expired {
            // Only the sync that takes it out finds it in `observed`.
            let Some(os) = observed.services.get(skey) else {
                continue;
            };
            let Some(ob) = os.backends.get(bk) else {
                continue;
            };
            let ended = self.forget_flows(os.id, ob.id);
            log::info!(
                "{skey}: backend {bk} drained past its timeout: removed, {ended} flows ended"
            );
        }
    }
}

/// The XDP engine of the daemon's loop: the reconciler's plan between
/// what the maps hold and the desired state, applied as map updates.
impl Engine for XdpDataplane {
    fn kind(&self) -> DataplaneKind {
        self.kind
    }

    async fn held_down(
        &mut self,
        _desired: &DesiredState,
    ) -> Result<BTreeSet<BackendOf>, DataplaneError> {
        // The view keeps its down set: every sync asks.
        match &self.view {
            Some(v) => Ok(v.down().clone()),
            None => Ok(self
                .observe()?
                .services
                .iter()
                .flat_map(|(k, s)| {
                    s.backends
                        .iter()
                        .filter(|(_, b)| b.state == BackendState::Down)
                        .map(move |(bk, _)| (k.clone(), *bk))
                })
                .collect()),
        }
    }

    async fn sync(
        &mut self,
        desired: &DesiredState,
        _services: &ServiceConfigs<'_>,
        expired: &[BackendOf],
    ) -> Result<usize, DataplaneError> {
        let n = self.sync_tables(desired, expired)?;
        if std::mem::take(&mut self.backends_lost) && self.socket_lb {
            self.end_stale_udp_sockets();
        }
        Ok(n)
    }

    fn set_node_net(&mut self, net: &NodeNet) -> Result<bool, DataplaneError> {
        XdpDataplane::set_node_net(self, net)
    }

    fn metrics_source(&self) -> Result<crate::engine::StatsSource, DataplaneError> {
        Maps::from_pins(&self.dir)
            .map(|m| crate::engine::StatsSource::Pinned(std::sync::Arc::new(m)))
            .map_err(DataplaneError::Pinned)
    }

    fn set_flow_config(&mut self, c: &ConntrackConfig) -> Result<bool, DataplaneError> {
        XdpDataplane::set_flow_config(self, c)
    }

    fn set_socket_namespaces(&mut self, ns: &BTreeMap<u64, PathBuf>) {
        XdpDataplane::set_socket_namespaces(self, ns);
    }

    fn sweep_flows(&mut self) -> Swept {
        self.sweep()
    }

    fn set_interfaces(&mut self, want: &[Attach], prune: bool) -> bool {
        XdpDataplane::set_interfaces(self, want, prune)
    }

    fn rejected(&self) -> BTreeMap<ServiceKey, String> {
        self.rejected.clone()
    }

    fn reread(&mut self) {
        self.mirror = None;
        self.view = None;
    }
}
