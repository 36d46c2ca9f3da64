//! Every map of the data plane. Names, layouts and sizes come from
//! `meshlb-common`; the symbol names here ARE the pinned names (checked by
//! userspace at load time). All maps pin by name under the daemon's bpffs
//! directory so forwarding survives the daemon.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::bpf_map_lookup_elem,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use meshlb_common::{
    AddrKey, AffinityEntry, AffinityKey, Backend, Counter, CtEntry, FlowConfig, FlowKey, FragEntry,
    FragKey, FrontendKey, FrontendValue, IfAddrKey, NextHop, NodeMeta, RateWindow, RnatEntry,
    ServiceInfo, ServiceName, SnatAddr, SnatEntry, SockRevKey, SockRevValue, Stats, XdpHandoff,
    COUNTER_CAPACITY, MAX_AFFINITY, MAX_BACKENDS, MAX_EMBRYONIC, MAX_FLOWS, MAX_FRAGS,
    MAX_FRONTENDS, MAX_HANDOFFS, MAX_IFACES, MAX_LOCAL_ADDRS, MAX_NH_ADDRS, MAX_SERVICES,
    MAX_SOCK_NETNS, MAX_SOCK_REV, RING_HALF, RING_MAP_FLAGS, RING_SIZES,
};

/// `FrontendKey` (addr bytes, port BE) -> `FrontendValue`.
#[map]
pub static MLB_FE_V1: HashMap<FrontendKey, FrontendValue> = HashMap::pinned(MAX_FRONTENDS, 0);

/// `AddrKey` -> 1: this node's addresses (node-port frontends).
#[map]
pub static MLB_LOCAL_V1: HashMap<AddrKey, u32> = HashMap::pinned(MAX_LOCAL_ADDRS, 0);

/// service id -> `ServiceInfo`.
#[map]
pub static MLB_SVC_V1: Array<ServiceInfo> = Array::pinned(MAX_SERVICES, 0);

/// service id -> `ServiceName` (userspace only).
#[map]
pub static MLB_SVCNAME_V1: Array<ServiceName> = Array::pinned(MAX_SERVICES, 0);

/// service id -> the service's Maglev ring (an inner array: `[0]` the
/// ring size M, `[1 + slot]` a backend id, `NO_BACKEND` = empty). Swapped
/// whole by userspace, never written in place.
#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "MLB_RING_V1")]
pub static MLB_RING_V1: RingsDef = RingsDef::new();

/// `LIBBPF_PIN_BY_NAME`: pinned under the loader's pin directory.
const PIN_BY_NAME: usize = 1;

/// BTF definition of `MLB_RING_V1` (aya-ebpf's `ArrayOfMaps` has no
/// `pinning` member, and every map here must pin by name). The loader
/// reads only the member names and the types behind the pointers:
/// `[i32; N]` encodes the number N, `values` the inner map's template.
#[repr(C)]
pub struct RingsDef {
    r#type: *const [i32; BPF_MAP_TYPE_ARRAY_OF_MAPS],
    key: *const u32,
    value: *const u32,
    max_entries: *const [i32; MAX_SERVICES as usize],
    map_flags: *const [i32; 0],
    pinning: *const [i32; PIN_BY_NAME],
    values: [*const RingDef; 0],
}

/// BTF template of the inner rings: the smallest class; the real rings
/// differ in size, which `BPF_F_INNER_MAP` allows.
#[repr(C)]
pub struct RingDef {
    r#type: *const [i32; BPF_MAP_TYPE_ARRAY],
    key: *const u32,
    value: *const u32,
    max_entries: *const [i32; RING_SIZES[0] as usize + 1],
    map_flags: *const [i32; RING_MAP_FLAGS as usize],
}

const BPF_MAP_TYPE_ARRAY: usize = aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_ARRAY as usize;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: usize =
    aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_ARRAY_OF_MAPS as usize;

// SAFETY: a placeholder the loader replaces; never read or written.
unsafe impl Sync for RingsDef {}

impl RingsDef {
    const fn new() -> Self {
        RingsDef {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
            values: [],
        }
    }

    /// `service_id`'s ring and its header (size M, `RING_HALF`: which
    /// half is active); `None` without a ring.
    #[inline(always)]
    pub fn ring(&self, service_id: u32) -> Option<(*mut c_void, u32)> {
        let ring = lookup(
            core::ptr::from_ref::<Self>(self) as *mut c_void,
            &service_id,
        )?;
        // SAFETY: an inner array of u32; entries stay valid while the
        // program runs (RCU), even if the ring is swapped meanwhile. One
        // aligned 32-bit load: the header userspace stores in one piece.
        let header = unsafe { core::ptr::read_volatile(lookup(ring, &0u32)? as *const u32) };
        Some((ring, header))
    }

    /// The backend id in `slot` (0..M) of the half of a ring its header
    /// (from `ring`) names.
    #[inline(always)]
    pub fn backend(ring: *mut c_void, header: u32, slot: u32) -> Option<u32> {
        let m = header & !RING_HALF;
        let base = if header & RING_HALF != 0 { 1 + m } else { 1 };
        // SAFETY: as above.
        lookup(ring, &(base + slot)).map(|p| unsafe { *(p as *const u32) })
    }
}

/// `bpf_map_lookup_elem`; `None` when absent.
#[inline(always)]
fn lookup(map: *mut c_void, key: &u32) -> Option<*mut c_void> {
    // SAFETY: `map` is a map (the outer definition or an inner map the
    // outer lookup returned); the key is a u32 as both maps declare.
    let p = unsafe { bpf_map_lookup_elem(map, core::ptr::from_ref::<u32>(key).cast::<c_void>()) };
    (!p.is_null()).then_some(p)
}

/// backend id -> Backend.
#[map]
pub static MLB_BE_V1: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// client flow (client -> frontend) -> `CtEntry`.
#[map]
pub static MLB_CT_V2: LruHashMap<FlowKey, CtEntry> = LruHashMap::pinned(MAX_FLOWS, 0);

/// reply flow (backend -> client) -> `RnatEntry`.
#[map]
pub static MLB_RNAT_V1: LruHashMap<FlowKey, RnatEntry> = LruHashMap::pinned(MAX_FLOWS, 0);

/// backend id -> Stats, per CPU.
#[map]
pub static MLB_BSTAT_V1: PerCpuArray<Stats> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// service id -> Stats, per CPU.
#[map]
pub static MLB_SSTAT_V1: PerCpuArray<Stats> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// Counter index -> packets, per CPU.
#[map]
pub static MLB_CNT_V2: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_CAPACITY, 0);

/// 0 -> `NodeMeta` (userspace only).
#[map]
pub static MLB_META_V1: Array<NodeMeta> = Array::pinned(1, 0);

/// SNAT reply flow (backend -> node addr:allocated port) -> `SnatEntry`.
#[map]
pub static MLB_SNAT_V1: LruHashMap<FlowKey, SnatEntry> = LruHashMap::pinned(MAX_FLOWS, 0);

/// `SNAT_IDX_V4` / `SNAT_IDX_V6` -> `SnatAddr` (node address, port range).
#[map]
pub static MLB_SNATADR_V1: Array<SnatAddr> = Array::pinned(2, 0);

/// ifindex -> `IF_F_*` flags (absent = 0: native, redirect-capable).
#[map]
pub static MLB_IFACE_V1: HashMap<u32, u32> = HashMap::pinned(MAX_IFACES, 0);

/// service id -> affinity timeout in seconds (0: none).
#[map]
pub static MLB_SVCAFF_V1: Array<u32> = Array::pinned(MAX_SERVICES, 0);

/// `AffinityKey` (service id, client addr) -> `AffinityEntry` (backend id, last use).
#[map]
pub static MLB_AFF_V1: LruHashMap<AffinityKey, AffinityEntry> = LruHashMap::pinned(MAX_AFFINITY, 0);

/// `IfAddrKey` (ifindex, family) -> address bytes: the source of hairpin flows
/// entering that (task-facing) interface.
#[map]
pub static MLB_IFADDR_V1: HashMap<IfAddrKey, [u8; 16]> = HashMap::pinned(MAX_IFACES, 0);

/// `AddrKey` -> 1: the VIPs (a VIP port nobody publishes is dropped).
#[map]
pub static MLB_VIP_V1: HashMap<AddrKey, u32> = HashMap::pinned(MAX_FRONTENDS, 0);

/// `FragKey` (datagram as it arrived) -> `FragEntry` (its translated addresses).
#[map]
pub static MLB_FRAG_V1: LruHashMap<FragKey, FragEntry> = LruHashMap::pinned(MAX_FRAGS, 0);

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = MLB_CNT_V2.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Adds one packet of `bytes` to a backend's and its service's counters.
#[inline(always)]
pub fn account(service_id: u32, backend_id: u32, bytes: u64, reply: bool, new_flow: bool) {
    for p in [
        MLB_BSTAT_V1.get_ptr_mut(backend_id),
        MLB_SSTAT_V1.get_ptr_mut(service_id),
    ]
    .into_iter()
    .flatten()
    {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        let s = unsafe { &mut *p };
        if reply {
            s.packets_out += 1;
            s.bytes_out += bytes;
        } else {
            s.packets_in += 1;
            s.bytes_in += bytes;
        }
        if new_flow {
            s.connections += 1;
        }
    }
}

/// 0 -> `FlowConfig`: flow timeouts, SNAT quarantine (zero: defaults).
#[map]
pub static MLB_FLOWCFG_V1: Array<FlowConfig> = Array::pinned(1, 0);

/// Embryonic client flows (not yet established) -> `CtEntry`.
#[map]
pub static MLB_CTSYN_V1: LruHashMap<FlowKey, CtEntry> = LruHashMap::pinned(MAX_EMBRYONIC, 0);

/// Reply flows of embryonic local flows -> `RnatEntry`.
#[map]
pub static MLB_RNATSYN_V1: LruHashMap<FlowKey, RnatEntry> = LruHashMap::pinned(MAX_EMBRYONIC, 0);

/// 0 -> `RateWindow`, per CPU: new flows in the current second.
#[map]
pub static MLB_RATE_V1: PerCpuArray<RateWindow> = PerCpuArray::pinned(1, 0);

/// Translated flow (as it leaves) -> `XdpHandoff`: the handoff of a frame
/// XDP could not transmit, where the kernel refuses XDP metadata
/// (`xdp_meta`).
#[map]
pub static MLB_HANDOFF_V1: LruHashMap<FlowKey, XdpHandoff> = LruHashMap::pinned(MAX_HANDOFFS, 0);

/// backend id -> `NextHop`: what the FIB last said about the way to it.
#[map]
pub static MLB_NH_V1: Array<NextHop> = Array::pinned(MAX_BACKENDS, 0);

/// A client's address (`[u32; 5]`: the address's words, then the family)
/// -> `NextHop`: the next hop of replies.
#[map]
pub static MLB_NHADDR_V1: LruHashMap<[u32; 5], NextHop> = LruHashMap::pinned(MAX_NH_ADDRS, 0);

/// 0 -> the next-hop generation (`NextHop::gen`), bumped by the daemon.
#[map]
pub static MLB_NHGEN_V1: Array<u32> = Array::pinned(1, 0);

/// Network-namespace cookie -> 1: whose sockets are balanced.
#[map]
pub static MLB_SOCKNS_V1: HashMap<u64, u32> = HashMap::pinned(MAX_SOCK_NETNS, 0);

/// (socket cookie, backend) -> the frontend the socket asked for.
#[map]
pub static MLB_SOCKREV_V1: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::pinned(MAX_SOCK_REV, 0);

/// ifindex -> the uplink's MAC (then 2 zero bytes): a flow opener in a
/// unicast frame for another MAC is not this node's.
#[map]
pub static MLB_IFMAC_V1: HashMap<u32, [u8; 8]> = HashMap::pinned(MAX_IFACES, 0);

/// 1 where the kernel lets XDP programs call `bpf_xdp_adjust_meta`; the
/// loader writes 0 where it does not (`meshlb_common::XDP_META_GLOBAL`).
/// A read-only global: with 0, the verifier never walks the call.
#[unsafe(no_mangle)]
static MESHLB_XDP_META: u8 = 1;

/// Whether handoffs ride in XDP metadata (else in `MLB_HANDOFF_V1`).
#[inline(always)]
pub fn xdp_meta() -> bool {
    // SAFETY: a volatile read of a global the loader set before loading
    // (volatile: the compiler must not fold the default in).
    unsafe { core::ptr::read_volatile(&raw const MESHLB_XDP_META) != 0 }
}
