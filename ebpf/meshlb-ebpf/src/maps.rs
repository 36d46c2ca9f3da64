//! Every map of the data plane. Names, layouts and sizes come from
//! `meshlb-common`; the symbol names here ARE the pinned names (checked by
//! userspace at load time). All maps pin by name under the daemon's bpffs
//! directory so forwarding survives the daemon.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use meshlb_common::*;

/// FrontendKey (addr bytes, port BE) -> FrontendValue.
#[map]
pub static MLB_FE_V1: HashMap<FrontendKey, FrontendValue> = HashMap::pinned(MAX_FRONTENDS, 0);

/// AddrKey -> 1: this node's addresses (node-port frontends).
#[map]
pub static MLB_LOCAL_V1: HashMap<AddrKey, u32> = HashMap::pinned(MAX_LOCAL_ADDRS, 0);

/// service id -> ServiceInfo.
#[map]
pub static MLB_SVC_V1: Array<ServiceInfo> = Array::pinned(MAX_SERVICES, 0);

/// service id -> ServiceName (userspace only).
#[map]
pub static MLB_SVCNAME_V1: Array<ServiceName> = Array::pinned(MAX_SERVICES, 0);

/// service id * RING_SIZE + slot -> backend id (NO_BACKEND = empty).
#[map]
pub static MLB_MAGLEV_V1: Array<u32> = Array::pinned(MAX_SERVICES * RING_SIZE, 0);

/// backend id -> Backend.
#[map]
pub static MLB_BE_V1: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// client flow (client -> frontend) -> CtEntry.
#[map]
pub static MLB_CT_V2: LruHashMap<FlowKey, CtEntry> = LruHashMap::pinned(MAX_FLOWS, 0);

/// reply flow (backend -> client) -> RnatEntry.
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

/// 0 -> NodeMeta (userspace only).
#[map]
pub static MLB_META_V1: Array<NodeMeta> = Array::pinned(1, 0);

/// SNAT reply flow (backend -> node addr:allocated port) -> SnatEntry.
#[map]
pub static MLB_SNAT_V1: LruHashMap<FlowKey, SnatEntry> = LruHashMap::pinned(MAX_FLOWS, 0);

/// SNAT_IDX_V4 / SNAT_IDX_V6 -> SnatAddr (node address, port range).
#[map]
pub static MLB_SNATADR_V1: Array<SnatAddr> = Array::pinned(2, 0);

/// ifindex -> IF_F_* flags (absent = 0: native, redirect-capable).
#[map]
pub static MLB_IFACE_V1: HashMap<u32, u32> = HashMap::pinned(MAX_IFACES, 0);

/// service id -> affinity timeout in seconds (0: none).
#[map]
pub static MLB_SVCAFF_V1: Array<u32> = Array::pinned(MAX_SERVICES, 0);

/// AffinityKey (service id, client addr) -> AffinityEntry (backend id, last use).
#[map]
pub static MLB_AFF_V1: LruHashMap<AffinityKey, AffinityEntry> = LruHashMap::pinned(MAX_AFFINITY, 0);

/// IfAddrKey (ifindex, family) -> address bytes: the source of hairpin flows
/// entering that (task-facing) interface.
#[map]
pub static MLB_IFADDR_V1: HashMap<IfAddrKey, [u8; 16]> = HashMap::pinned(MAX_IFACES, 0);

/// AddrKey -> 1: the VIPs (a VIP port nobody publishes is dropped).
#[map]
pub static MLB_VIP_V1: HashMap<AddrKey, u32> = HashMap::pinned(MAX_FRONTENDS, 0);

/// FragKey (datagram as it arrived) -> FragEntry (its translated addresses).
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

/// 0 -> FlowConfig: flow timeouts, SNAT quarantine (zero: defaults).
#[map]
pub static MLB_FLOWCFG_V1: Array<FlowConfig> = Array::pinned(1, 0);

/// Embryonic client flows (not yet established) -> CtEntry.
#[map]
pub static MLB_CTSYN_V1: LruHashMap<FlowKey, CtEntry> = LruHashMap::pinned(MAX_EMBRYONIC, 0);

/// Reply flows of embryonic local flows -> RnatEntry.
#[map]
pub static MLB_RNATSYN_V1: LruHashMap<FlowKey, RnatEntry> = LruHashMap::pinned(MAX_EMBRYONIC, 0);

/// 0 -> RateWindow, per CPU: new flows in the current second.
#[map]
pub static MLB_RATE_V1: PerCpuArray<RateWindow> = PerCpuArray::pinned(1, 0);
