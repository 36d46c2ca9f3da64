//! The one source of truth shared by the meshlb XDP program and userspace:
//! pinned map names, map key/value layouts, limits, counter indices and the
//! flow hash.
//!
//! # Layout rules
//!
//! * Every struct is `#[repr(C)]` with fixed-width fields and explicit
//!   padding: the BPF side is 64-bit, armv7 userspace is 32-bit, and both
//!   must agree byte for byte. No `bool`, no `usize`.
//! * Addresses are stored as raw network-order bytes in a 16-byte array; an
//!   IPv4 address uses the first four bytes and leaves the rest zero.
//! * Ports are stored in network byte order (the value as it sits in the
//!   packet), so the data path compares them without swapping.
//! * Counter indices and pass/drop reasons are append-only: never renumber.
//! * A layout change gets a new map name (`_V2`), never an in-place change.
#![no_std]

pub mod hash;

/// Version of the pinned map layouts below; part of every map name.
pub const LAYOUT_VERSION: u32 = 1;

/// Pinned map names (also the BPF object's map symbol names).
pub mod maps {
    /// `FrontendKey` -> `FrontendValue`: VIP and node-port frontends.
    pub const FRONTENDS: &str = "MLB_FE_V1";
    /// `AddrKey` -> `u32` (1): this node's own addresses, for node ports.
    pub const LOCAL_ADDRS: &str = "MLB_LOCAL_V1";
    /// array, service id -> `ServiceInfo`.
    pub const SERVICES: &str = "MLB_SVC_V1";
    /// array, service id -> `ServiceName` (userspace only: adoption, status).
    pub const SERVICE_NAMES: &str = "MLB_SVCNAME_V1";
    /// array of maps, service id -> the service's Maglev ring: an inner
    /// array of `u32`, `2 + 2M` entries for a ring of M slots (a
    /// `RING_SIZES` class): `[0]` the header, M with `RING_HALF` set when
    /// the second half is the active one; `[1 + h * M + slot]` the
    /// backend id of `slot` (0..M, `NO_BACKEND`: none) in half h; and
    /// `[1 + 2M]` a count of flips (userspace readers check it did not
    /// move while they read). A ring of another size is a new inner map,
    /// swapped in by one update; one of the same size is written into its
    /// inactive half, then made active by one store of the header, so a
    /// packet sees one whole ring either way.
    pub const RINGS: &str = "MLB_RING_V1";
    /// array, backend id -> `Backend`.
    pub const BACKENDS: &str = "MLB_BE_V1";
    /// LRU hash, client flow `FlowKey` -> `CtEntry`. V2: `last_seen`
    /// (V1 entries are migrated at load, see `CtEntry::from_v1`).
    pub const CONNTRACK: &str = "MLB_CT_V2";
    /// LRU hash, reply flow `FlowKey` (backend -> client) -> `RnatEntry`.
    pub const REVERSE_NAT: &str = "MLB_RNAT_V1";
    /// per-CPU array, backend id -> `Stats`.
    pub const BACKEND_STATS: &str = "MLB_BSTAT_V1";
    /// per-CPU array, service id -> `Stats`.
    pub const SERVICE_STATS: &str = "MLB_SSTAT_V1";
    /// per-CPU array, `Counter` index -> packets (`u64`). V2: room for
    /// `COUNTER_CAPACITY` counters (V1 had exactly 16).
    pub const COUNTERS: &str = "MLB_CNT_V2";
    /// array, index 0 -> `NodeMeta` (userspace only: who programmed this).
    pub const META: &str = "MLB_META_V1";
    /// LRU hash, SNAT reply flow `FlowKey` (backend -> node address and
    /// allocated port) -> `SnatEntry`. Owning an entry is owning the port.
    pub const SNAT: &str = "MLB_SNAT_V1";
    /// array, `SNAT_IDX_V4`/`SNAT_IDX_V6` -> `SnatAddr`: the node address
    /// and port range remote-backend flows are translated to.
    pub const SNAT_ADDRS: &str = "MLB_SNATADR_V1";
    /// hash, ifindex (`u32`) -> `IF_F_*` flags: how to forward via it.
    pub const IFACES: &str = "MLB_IFACE_V1";
    /// array, service id -> `u32` session-affinity timeout in seconds (0:
    /// no affinity). Beside `SERVICES`, whose layout has no room for it.
    pub const SERVICE_AFFINITY: &str = "MLB_SVCAFF_V1";
    /// LRU hash, `AffinityKey` (service id, client address) ->
    /// `AffinityEntry` (backend id, last use): client-IP session affinity.
    pub const AFFINITY: &str = "MLB_AFF_V1";
    /// hash, `IfAddrKey` (ifindex, family) -> `[u8; 16]`: the address of a
    /// task-facing interface, the source a hairpin flow is translated to.
    pub const IFACE_ADDRS: &str = "MLB_IFADDR_V1";
    /// hash, `AddrKey` -> `u32` (1): the VIPs of this node's services, so
    /// a packet to a VIP on a port it does not publish is dropped, not
    /// routed on.
    pub const VIPS: &str = "MLB_VIP_V1";
    /// LRU hash, `FragKey` (the datagram as it arrived: addresses, id,
    /// protocol) -> `FragEntry` (its addresses after translation): the
    /// first fragment's choice, applied to the later ones.
    pub const FRAGMENTS: &str = "MLB_FRAG_V1";
    /// array, index 0 -> `FlowConfig`: flow timeouts and the SNAT port
    /// quarantine (all zero: the defaults).
    pub const FLOW_CONFIG: &str = "MLB_FLOWCFG_V1";
    /// LRU hash, client flow `FlowKey` -> `CtEntry`: flows not yet
    /// established (a SYN, a first datagram). A flood of flow openers
    /// churns only this table and `REVERSE_NAT_EMBRYONIC`; a flow moves to
    /// `CONNTRACK` (and `REVERSE_NAT`) when it is established.
    pub const CONNTRACK_EMBRYONIC: &str = "MLB_CTSYN_V1";
    /// LRU hash, reply `FlowKey` -> `RnatEntry` of embryonic local flows.
    pub const REVERSE_NAT_EMBRYONIC: &str = "MLB_RNATSYN_V1";
    /// per-CPU array, index 0 -> `RateWindow`: new flows in the current
    /// second (the flood state's input).
    pub const NEW_FLOW_RATE: &str = "MLB_RATE_V1";
    /// LRU hash `FlowKey` (a translated packet's, as it leaves) ->
    /// `XdpHandoff`: frames XDP translated but could not transmit, on a
    /// kernel that refuses `bpf_xdp_adjust_meta` to XDP programs (where
    /// the handoff cannot ride in metadata; see `XDP_META_GLOBAL`).
    pub const HANDOFF: &str = "MLB_HANDOFF_V1";
    /// array, backend id -> `NextHop`: the next hop of each backend, cached
    /// by the data path after a FIB lookup, so that a conntrack hit needs
    /// none.
    pub const NEXT_HOPS: &str = "MLB_NH_V1";
    /// array, index 0 -> `u32`: the next-hop generation. The daemon bumps
    /// it on every neighbour, route and link change (rtnetlink events) and
    /// whenever it rewrites backends or interface flags; a `NextHop` of
    /// another generation is stale.
    pub const NEXT_HOP_GEN: &str = "MLB_NHGEN_V1";
    /// LRU hash, a client's address (`[u32; 5]`: the address's four words,
    /// IPv4 in the first, then the family) -> `NextHop`: the next hop of
    /// replies (backend -> client), cached like `NEXT_HOPS`.
    pub const NEXT_HOPS_BY_ADDR: &str = "MLB_NHADDR_V1";
    /// hash, network-namespace cookie (`u64`) -> `u32` (1): the
    /// namespaces whose sockets the socket-level balancer serves (this
    /// node's and its containers'); every other socket is left alone.
    pub const SOCK_NETNS: &str = "MLB_SOCKNS_V1";
    /// LRU hash, `SockRevKey` (socket cookie, backend address and port) ->
    /// `SockRevValue` (the frontend the socket asked for): what
    /// `getpeername` and `recvmsg` of a balanced socket report.
    pub const SOCK_REV: &str = "MLB_SOCKREV_V1";
    /// hash, ifindex (`u32`) -> `[u8; 8]` (the Ethernet address, then 2
    /// zero bytes): the uplinks' own MACs. A flow opener in a unicast
    /// frame for another MAC (flooded by a switch, delivered by a veth or a
    /// promiscuous NIC) is left to the kernel, which drops it.
    pub const IFACE_MACS: &str = "MLB_IFMAC_V1";

    /// Every map, for pin management and consistency checks.
    pub const ALL: [&str; 31] = [
        FRONTENDS,
        LOCAL_ADDRS,
        SERVICES,
        SERVICE_NAMES,
        RINGS,
        BACKENDS,
        CONNTRACK,
        REVERSE_NAT,
        BACKEND_STATS,
        SERVICE_STATS,
        COUNTERS,
        META,
        SNAT,
        SNAT_ADDRS,
        IFACES,
        SERVICE_AFFINITY,
        AFFINITY,
        IFACE_ADDRS,
        VIPS,
        FRAGMENTS,
        FLOW_CONFIG,
        CONNTRACK_EMBRYONIC,
        REVERSE_NAT_EMBRYONIC,
        NEW_FLOW_RATE,
        HANDOFF,
        NEXT_HOPS,
        NEXT_HOP_GEN,
        NEXT_HOPS_BY_ADDR,
        SOCK_NETNS,
        SOCK_REV,
        IFACE_MACS,
    ];

    /// Pin names of maps from earlier layouts: removed when found (their
    /// replacement starts empty; what they held is not state, see each).
    pub const SUPERSEDED: [&str; 3] = [
        // V1 counters: totals only, the V2 map starts at zero.
        "MLB_CNT_V1",
        // One flat array of 1,021-slot rings: copied into `RINGS` first.
        MAGLEV_V1,
        // V1 conntrack: its entries are copied into V2 first.
        CONNTRACK_V1,
    ];
    /// The rings before `RINGS`: one flat array, `id * 1021 + slot`.
    pub const MAGLEV_V1: &str = "MLB_MAGLEV_V1";
    /// The conntrack map before `CtEntry::last_seen` (32-byte entries).
    pub const CONNTRACK_V1: &str = "MLB_CT_V1";
}

/// Name of the XDP load-balancer program in the object.
pub const PROG_XDP_LB: &str = "meshlb_xdp";
/// Name of an XDP program that passes everything (for veth peers: native
/// XDP redirect only delivers to a veth whose peer runs an XDP program).
pub const PROG_XDP_PASS: &str = "meshlb_pass";
/// Name of the benchmark baseline (the bare forwarder): parse, FIB lookup,
/// TTL decrement, MAC rewrite, XDP_TX or redirect.
pub const PROG_XDP_BARE: &str = "meshlb_bare";
/// Name of the benchmark packet generator (BPF_PROG_TEST_RUN in
/// live-frames mode): XDP_TX of every frame, IPv4 UDP spread over 16
/// source ports (the low 4 bits), UDP checksum cleared.
pub const PROG_XDP_GEN: &str = "meshlb_gen";
/// Name of the TC (cls_bpf/tcx ingress) load balancer, for interfaces
/// where local senders are (bridges and veths toward local tasks): an skb
/// may carry a partial checksum there, which only the skb checksum
/// helpers update correctly.
pub const PROG_TC_LB: &str = "meshlb_tc";
/// Name of the TC ingress program beside XDP on an uplink: it forwards,
/// through the neighbour subsystem, what the XDP program translated but
/// could not transmit itself (see `XdpHandoff`).
pub const PROG_TC_HANDOFF: &str = "meshlb_tc_handoff";
/// Names of the socket-level balancer's programs (cgroup v2 `sock_addr`
/// hooks), with the hook each is attached to: connect (TCP, connected
/// UDP), sendmsg (unconnected UDP), recvmsg and getpeername (the frontend
/// reported back), IPv4 then IPv6.
pub const PROGS_SOCK: [&str; 8] = [
    "meshlb_connect4",
    "meshlb_sendmsg4",
    "meshlb_recvmsg4",
    "meshlb_getpeername4",
    "meshlb_connect6",
    "meshlb_sendmsg6",
    "meshlb_recvmsg6",
    "meshlb_getpeername6",
];
/// Ring slots the socket-level balancer tries, from the socket's own
/// (`hash::socket_slot`) on, for a backend that takes new flows (one
/// mid-update, or of the other family, is skipped); `explain` the same.
pub const SOCK_SLOT_TRIES: u32 = 5;
/// Entries of `maps::SOCK_NETNS`.
pub const MAX_SOCK_NETNS: u32 = 1024;
/// Entries of `maps::SOCK_REV` (balanced sockets remembered at once).
pub const MAX_SOCK_REV: u32 = 65_536;

/// Key of `maps::SOCK_REV`: a balanced socket and the backend it was sent
/// to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie`; what `sock_diag` reports as the socket's
    /// cookie.
    pub cookie: u64,
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// Value of `maps::SOCK_REV`: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRevValue {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub proto: u8,
    pub service_id: u32,
    pub backend_id: u32,
    pub _pad: u32,
}

/// A read-only global of the object (`u8`): 1 (the default) where the
/// kernel lets XDP programs call `bpf_xdp_adjust_meta`, so handoffs ride
/// in metadata; the loader sets 0 where it does not (probed), and
/// handoffs go through `maps::HANDOFF` instead. Read-only, so with 0 the
/// verifier never walks the refused call.
pub const XDP_META_GLOBAL: &str = "MESHLB_XDP_META";
/// Entries of `maps::HANDOFF` (flows waiting for a next hop at once).
pub const MAX_HANDOFFS: u32 = 4096;

/// Maglev ring size classes (primes), smallest first: a service's ring
/// has the smallest with enough slots per configured backend (100 on the
/// smallest, the Maglev paper's M >= 100 N; 400 on the middle one, for
/// low disruption), else the largest (userspace `maglev::ring_size`).
/// A ring of M slots is an inner array of 2M + 2 entries
/// (`maps::RINGS`: two halves), 8 bytes each in the kernel (array values
/// are 8-byte aligned): 16 KiB, 256 KiB and 1 MiB.
pub const RING_SIZES: [u32; 3] = [1021, 16381, 65537];
/// Header bit of a ring (`maps::RINGS`): the second half is active.
pub const RING_HALF: u32 = 1 << 31;
/// Flags of every inner ring map (and of the object's template): the
/// rings differ in size (`BPF_F_INNER_MAP`) and are filled through mmap
/// (`BPF_F_MMAPABLE`), one syscall whatever their size.
pub const RING_MAP_FLAGS: u32 = BPF_F_MMAPABLE | BPF_F_INNER_MAP;
/// `BPF_F_MMAPABLE` (uapi/linux/bpf.h).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `BPF_F_INNER_MAP` (uapi/linux/bpf.h).
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// Maximum number of services (ids 0..MAX_SERVICES): one per published port.
pub const MAX_SERVICES: u32 = 10240;
/// Maximum number of backends over all services.
pub const MAX_BACKENDS: u32 = 131_072;
/// Maximum number of frontend keys (a VIP port is one, a node port two).
pub const MAX_FRONTENDS: u32 = 65536;
/// Maximum number of local addresses.
pub const MAX_LOCAL_ADDRS: u32 = 256;
/// Maximum number of interfaces with `IFACES` flags.
pub const MAX_IFACES: u32 = 1024;
/// Connection-tracking capacity (LRU: the oldest flows go first).
pub const MAX_FLOWS: u32 = 262_144;
/// Capacity of the embryonic tables (flows not yet established).
pub const MAX_EMBRYONIC: u32 = 65_536;
/// Entries of `maps::NEXT_HOPS_BY_ADDR` (client addresses whose replies'
/// next hop is cached).
pub const MAX_NH_ADDRS: u32 = 65_536;
/// Client addresses remembered for session affinity, over all services
/// (LRU: the least recently used go first).
pub const MAX_AFFINITY: u32 = 65_536;
/// Ring slot value meaning "no backend".
pub const NO_BACKEND: u32 = u32::MAX;
/// Longest service name (bytes).
pub const MAX_NAME_LEN: usize = 60;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A frontend: where clients connect. `addr` all zero = node port (any
/// address of this node listed in `LOCAL_ADDRS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FrontendKey {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FrontendValue {
    pub service_id: u32,
    pub flags: u32,
}

/// Key of `LOCAL_ADDRS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AddrKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `ServiceInfo::flags`: the slot is in use.
pub const SVC_F_PRESENT: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceInfo {
    pub flags: u32,
    /// Backends that may receive new flows (0: pass new flows to the stack).
    pub active_backends: u32,
    /// Hash of the backend set the ring was last written for; written only
    /// after the ring, so a daemon that died mid-write is detected on adopt.
    pub ring_hash: u64,
}

/// Identity of a data-plane service: one `publish` entry of a named
/// service. Userspace only (adoption after a restart, status output).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    /// Bytes used in `name`.
    pub len: u8,
    pub proto: u8,
    /// Published port, host byte order.
    pub port: u16,
    pub name: [u8; MAX_NAME_LEN],
}

impl ServiceName {
    /// The name's bytes (`len` of them, at most `MAX_NAME_LEN`).
    pub fn bytes(&self) -> &[u8] {
        &self.name[..usize::from(self.len).min(MAX_NAME_LEN)]
    }
}

impl Default for ServiceName {
    fn default() -> Self {
        ServiceName {
            len: 0,
            proto: 0,
            port: 0,
            name: [0; MAX_NAME_LEN],
        }
    }
}

/// `Backend::flags`: the slot is in use.
pub const BE_F_PRESENT: u8 = 1;
/// Draining (weight 0): no new flows, established ones continue.
pub const BE_F_DRAINING: u8 = 2;
/// Failed its health check: no new flows.
pub const BE_F_DOWN: u8 = 4;
/// On another node: flows are also source-translated to this node's
/// address (`SNAT_ADDRS`) so replies come back through this node.
pub const BE_F_SNAT: u8 = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub flags: u8,
    pub service_id: u32,
    /// Configured weight (status output; the ring already reflects it).
    pub weight: u32,
    pub _pad: u32,
}

impl Backend {
    /// Whether this slot takes a new flow of service `service_id` and
    /// address family `family`: present, neither down nor draining, that
    /// service's and that family's. The data path and `explain` ask it
    /// through this one function.
    #[inline(always)]
    pub fn takes_new_flows(&self, service_id: u32, family: u8) -> bool {
        self.flags & BE_F_PRESENT != 0
            && self.flags & (BE_F_DOWN | BE_F_DRAINING) == 0
            && self.service_id == service_id
            && self.family == family
    }
}

/// A flow as seen on the wire, in the direction of the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// `CtEntry::flags` / `RnatEntry::flags`: a FIN was seen from the client.
pub const CT_F_FIN_CLIENT: u16 = 1;
/// A FIN was seen from the backend.
pub const CT_F_FIN_BACKEND: u16 = 2;
/// A RST was seen in either direction.
pub const CT_F_RST: u16 = 4;
/// Closing or closed: a new SYN on this tuple selects a backend afresh.
pub const CT_F_CLOSING: u16 = CT_F_FIN_CLIENT | CT_F_FIN_BACKEND | CT_F_RST;
/// Gone for good (RST, or FIN both ways): its SNAT port may be given to
/// another flow once it has been quiet for the quarantine
/// (`FlowConfig::snat_quarantine_s`).
pub const CT_F_CLOSED: u16 = CT_F_FIN_CLIENT | CT_F_FIN_BACKEND;
/// `CtEntry::flags`: the flow is source-translated (`CtEntry::snat_port`).
pub const CT_F_SNAT: u16 = 8;
/// `CtEntry::flags`: a hairpin flow (a local client to a local backend,
/// seen by the TC program): source-translated to the address of the
/// interface it came in on (`IFACE_ADDRS`), so the backend answers
/// through this node and not straight to the client.
pub const CT_F_HAIRPIN: u16 = 16;
/// `CtEntry::flags`: a TCP flow whose client acknowledged the handshake
/// (a packet with ACK and without SYN after the flow's SYN). Until then
/// the flow is embryonic: its SNAT port goes back to the pool
/// `SNAT_EMBRYONIC_NS` after it was taken, so a SYN flood cannot hold
/// the port space. A UDP flow is established by its second packet.
pub const CT_F_EST: u16 = 32;
/// `CtEntry::flags`: the `CT_F_RST` came from the client's side, so more
/// traffic from the client proves it forged (or lost): it is then cleared.
pub const CT_F_RST_CLIENT: u16 = 64;

/// Conntrack entry for a client flow (client -> frontend).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    pub backend_addr: [u8; 16],
    /// Network byte order.
    pub backend_port: u16,
    pub flags: u16,
    pub backend_id: u32,
    pub service_id: u32,
    /// With `CT_F_SNAT`: the source port allocated on this node (network
    /// byte order); the address is `SNAT_ADDRS` of the family.
    pub snat_port: u16,
    pub _pad: u16,
    /// `flow_clock()` of the flow's last packet (refreshed at most once a
    /// tick, about twice a second, by either direction): the flow has
    /// expired once it is older than its timeout (`FlowConfig`), and is
    /// then treated as absent.
    pub last_seen: u32,
}

impl CtEntry {
    /// A V1 entry (the layout without `last_seen`, 32 bytes), seen `now`.
    pub fn from_v1(b: &[u8; 32], now: u32) -> CtEntry {
        let mut backend_addr = [0; 16];
        backend_addr.copy_from_slice(&b[..16]);
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        CtEntry {
            backend_addr,
            backend_port: u16_at(16),
            flags: u16_at(18),
            backend_id: u32_at(20),
            service_id: u32_at(24),
            snat_port: u16_at(28),
            _pad: 0,
            last_seen: now,
        }
    }

    /// Whether the flow has been idle past its timeout at `now`
    /// (`flow_clock`): `tcp_closing` once a FIN or RST was seen, else
    /// `tcp` or `udp` by protocol. Wrapping arithmetic: the clock is a u32
    /// of ticks (it wraps after 73 years).
    #[inline(always)]
    pub fn expired(&self, now: u32, proto: u8, cfg: &FlowConfig) -> bool {
        idle_past(now, self.last_seen, self.timeout(proto, cfg))
    }

    /// The idle timeout (seconds) of this flow.
    #[inline(always)]
    pub fn timeout(&self, proto: u8, cfg: &FlowConfig) -> u32 {
        if proto != PROTO_TCP {
            cfg.udp()
        } else if self.flags & CT_F_CLOSING != 0 {
            cfg.tcp_closing()
        } else {
            cfg.tcp()
        }
    }
}

/// Flow timeouts (seconds; 0: the default), `FLOW_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowConfig {
    /// An established TCP flow, idle.
    pub tcp_timeout_s: u32,
    /// A TCP flow after a FIN or RST, idle.
    pub tcp_closing_timeout_s: u32,
    /// A UDP flow, idle.
    pub udp_timeout_s: u32,
    /// A SNAT port whose flow closed or vanished is not given to another
    /// client's flow until it has been quiet this long (the peer's
    /// TIME_WAIT).
    pub snat_quarantine_s: u32,
    /// New flows per second over which the node is flooded (0: the
    /// default): reported, the embryonic tables absorb the flood.
    pub flood_threshold: u32,
    pub _pad: u32,
}

/// Default `FlowConfig::flood_threshold` (new flows per second).
pub const DEFAULT_FLOOD_THRESHOLD: u32 = 20_000;

/// One CPU's count of new flows in one second (`NEW_FLOW_RATE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateWindow {
    /// The second (`ns >> 30`, about a second) counted.
    pub window: u32,
    pub count: u32,
}

impl RateWindow {
    /// The window of a monotonic time in ns.
    #[inline(always)]
    pub const fn window_of(ns: u64) -> u32 {
        (ns >> 30) as u32
    }
}

/// Default `FlowConfig::tcp_timeout_s` (1 h).
pub const DEFAULT_TCP_TIMEOUT_S: u32 = 3600;
/// Default `FlowConfig::tcp_closing_timeout_s`.
pub const DEFAULT_TCP_CLOSING_TIMEOUT_S: u32 = 10;
/// Default `FlowConfig::udp_timeout_s` (2 min).
pub const DEFAULT_UDP_TIMEOUT_S: u32 = 120;
/// Default `FlowConfig::snat_quarantine_s`: longer than Linux's TIME_WAIT.
pub const DEFAULT_SNAT_QUARANTINE_S: u32 = 60;

impl FlowConfig {
    #[inline(always)]
    fn or(v: u32, default: u32) -> u32 {
        if v == 0 {
            default
        } else {
            v
        }
    }
    #[inline(always)]
    pub fn tcp(&self) -> u32 {
        Self::or(self.tcp_timeout_s, DEFAULT_TCP_TIMEOUT_S)
    }
    #[inline(always)]
    pub fn tcp_closing(&self) -> u32 {
        Self::or(self.tcp_closing_timeout_s, DEFAULT_TCP_CLOSING_TIMEOUT_S)
    }
    #[inline(always)]
    pub fn udp(&self) -> u32 {
        Self::or(self.udp_timeout_s, DEFAULT_UDP_TIMEOUT_S)
    }
    #[inline(always)]
    pub fn snat_quarantine(&self) -> u32 {
        Self::or(self.snat_quarantine_s, DEFAULT_SNAT_QUARANTINE_S)
    }
    #[inline(always)]
    pub fn flood(&self) -> u32 {
        Self::or(self.flood_threshold, DEFAULT_FLOOD_THRESHOLD)
    }
}

/// `CtEntry::last_seen`'s unit: 2^29 ns (0.54 s). Coarse enough that a
/// flow's entry is written about twice a second at most, fine enough that
/// a flow expires within 0.54 s after its timeout.
pub const FLOW_TICK_NS: u64 = 1 << 29;

/// Ticks (`FLOW_TICK_NS`) of a monotonic clock (`CLOCK_MONOTONIC`, coarse
/// in BPF: `bpf_ktime_get_coarse_ns`), truncated to 32 bits.
#[inline(always)]
pub const fn flow_clock(ns: u64) -> u32 {
    (ns >> 29) as u32
}

/// Whether a flow last seen at tick `last` is idle past `secs` seconds at
/// tick `now`. The difference is signed: a `last` ahead of `now` (written
/// by another CPU, or a packet, after `now` was read) is fresh, never
/// "idle for 136 years".
#[inline(always)]
pub const fn idle_past(now: u32, last: u32, secs: u32) -> bool {
    (now.wrapping_sub(last) as i32) > ticks(secs) as i32
}

/// Whole ticks in `secs` seconds (rounded down: a flow is never expired
/// early by more than a tick's rounding of its timeout, and never late by
/// more than a tick).
#[inline(always)]
pub const fn ticks(secs: u32) -> u32 {
    ((secs as u64 * 1_000_000_000) >> 29) as u32
}

/// Reverse translation for replies (backend -> client): the frontend the
/// client connected to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RnatEntry {
    pub frontend_addr: [u8; 16],
    /// Network byte order.
    pub frontend_port: u16,
    pub flags: u16,
    pub backend_id: u32,
    pub service_id: u32,
    pub _pad: u32,
}

/// A source-translated flow, keyed by its reply tuple (backend -> node
/// address : allocated port): where replies go back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnatEntry {
    pub client_addr: [u8; 16],
    pub frontend_addr: [u8; 16],
    /// Network byte order.
    pub client_port: u16,
    /// Network byte order.
    pub frontend_port: u16,
    /// `SNAT_E_*`.
    pub flags: u32,
    pub backend_id: u32,
    pub service_id: u32,
    /// `bpf_ktime_get_ns` of the last reply (at most a second stale), or
    /// of the flow's start: an idle flow's port can be reclaimed.
    pub last_seen: u64,
}

/// `SnatEntry::flags`: the backend answered past the handshake (a TCP
/// reply without SYN or RST): the flow was real, and its port is
/// quarantined after it ends, where an embryonic flow's goes back at once.
pub const SNAT_E_EST: u32 = 1;

/// Key of `AFFINITY`: one client address of one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub service_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    /// The client's address (network order; IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
}

/// Value of `AFFINITY`: the backend a client's new flows go to while the
/// entry is fresh.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityEntry {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_boot_ns` (CLOCK_BOOTTIME) of the last new flow that
    /// used it: expired `timeout` seconds after that. Boot time, so
    /// `explain` can compare it with `/proc/uptime`.
    pub last_used: u64,
}

impl AffinityEntry {
    /// Whether the entry still holds at `now` (same clock) for a timeout
    /// of `timeout_secs` (0: affinity off).
    #[inline(always)]
    pub fn fresh(&self, now: u64, timeout_secs: u32) -> bool {
        timeout_secs != 0
            && now.saturating_sub(self.last_used) <= u64::from(timeout_secs) * 1_000_000_000
    }
}

/// Key of `IFACE_ADDRS`: an interface and an address family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct IfAddrKey {
    pub ifindex: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Key of `FRAGMENTS`: one fragmented datagram as it arrived.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Identification (IPv4: 16 bits, in host order).
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Value of `FRAGMENTS`: the datagram's addresses after translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragEntry {
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// Size of `FRAGMENTS`: datagrams in reassembly at once.
pub const MAX_FRAGS: u32 = 8192;

/// A backend's next hop as the FIB last resolved it (`maps::NEXT_HOPS`,
/// by backend id), written by the data path after a successful FIB lookup
/// of a packet to that backend and used instead of one while it is fresh:
/// `gen` equals `maps::NEXT_HOP_GEN`, it is younger than `NH_MAX_AGE`
/// flow-clock ticks, and `addr` is the packet's destination. Anything
/// else (missing, stale, another address, a packet over `mtu`, a TTL
/// about to expire, an egress it may not redirect to) falls back to the
/// FIB lookup, which refreshes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    /// The destination it was resolved for (IPv4: the first 4 bytes).
    pub addr: [u8; 16],
    /// Egress interface.
    pub ifindex: u32,
    /// `maps::NEXT_HOP_GEN` when it was resolved.
    pub gen: u32,
    /// `flow_clock` tick when it was resolved.
    pub stamp: u32,
    /// The route's MTU (the FIB's answer for an oversized probe).
    pub mtu: u16,
    /// `NH_F_*`.
    pub flags: u8,
    pub family: u8,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// `NextHop::flags`: resolved (an all-zero slot is not).
pub const NH_F_VALID: u8 = 1;
/// `NextHop::flags`: the egress has no native XDP transmit (`IF_F_NO_XMIT`).
pub const NH_F_NO_XMIT: u8 = 2;
/// A `NextHop` older than this many flow-clock ticks (about 2 s) is
/// resolved again, so that the data path follows a next hop that changed
/// even while no daemon runs to bump the generation.
pub const NH_MAX_AGE: u32 = 4;

/// The metadata the XDP program puts in front of a translated frame it
/// hands to the stack (no neighbour entry yet, or an egress device that
/// takes no native redirect): the TC program on the same interface
/// (`PROG_TC_HANDOFF`) forwards it to `ifindex` through the neighbour
/// subsystem. Without it, a packet whose source became this node's own
/// address would be dropped by the stack as a martian.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct XdpHandoff {
    /// `HANDOFF_MAGIC`; zeroed by the TC program once used.
    pub magic: u32,
    /// Egress interface from the FIB lookup.
    pub ifindex: u32,
    /// The interface XDP saw the frame on: skb metadata survives a veth
    /// crossing, so a frame handed off on one host could otherwise be
    /// taken for a handoff by the next one on the same kernel.
    pub ingress: u32,
}

/// `XdpHandoff::magic`.
pub const HANDOFF_MAGIC: u32 = 0x6d6c_6231;

/// Index of the IPv4 entry of `SNAT_ADDRS`.
pub const SNAT_IDX_V4: u32 = 0;
/// Index of the IPv6 entry of `SNAT_ADDRS`.
pub const SNAT_IDX_V6: u32 = 1;
/// `SnatAddr::flags`: the entry is set.
pub const SNAT_F_PRESENT: u16 = 1;

/// The address and source ports of this node's SNAT, per family: ports
/// `port_min..=port_max` except the hole `hole_min..=hole_max` (the node's
/// own ephemeral range, so its own connections never collide with a
/// translated flow; `hole_min > hole_max`: no hole). Ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnatAddr {
    pub addr: [u8; 16],
    pub port_min: u16,
    pub port_max: u16,
    pub hole_min: u16,
    pub hole_max: u16,
    pub flags: u16,
    pub _pad: [u16; 3],
}

impl SnatAddr {
    /// Ports in the hole (0 when there is none or it lies outside).
    #[inline(always)]
    fn hole_len(&self) -> u32 {
        if self.hole_min > self.hole_max
            || self.hole_min < self.port_min
            || self.hole_max > self.port_max
        {
            0
        } else {
            u32::from(self.hole_max) - u32::from(self.hole_min) + 1
        }
    }

    /// Usable ports (0: SNAT impossible).
    #[inline(always)]
    pub fn usable(&self) -> u32 {
        if self.port_min == 0 || self.port_min > self.port_max {
            return 0;
        }
        (u32::from(self.port_max) - u32::from(self.port_min) + 1) - self.hole_len()
    }

    /// The `try_no`th port to try for a client's source port `client`
    /// (host order). Try 0 keeps the client's port when it is usable (as
    /// netfilter's NAT does), else folds it into the usable ports one to
    /// one (a port of the hole maps to its offset in the hole, others to
    /// themselves modulo the count); later tries walk on by one. So a
    /// client tuple maps to the same port every time it comes back, and a
    /// backend sees the client's own port reuse pattern, which its
    /// TIME_WAIT handling (timestamps are per tuple) accepts. When that
    /// port is taken, the allocator goes on with `walk` instead:
    /// clients that share source ports then take different ports, rather
    /// than all queueing for the next ones.
    #[inline(always)]
    pub fn candidate(&self, client: u16, try_no: u32) -> u16 {
        let n = self.usable();
        if n == 0 {
            return 0;
        }
        let hole = self.hole_len();
        let c = u32::from(client);
        let (min, hmin, hmax) = (
            u32::from(self.port_min),
            u32::from(self.hole_min),
            u32::from(self.hole_max),
        );
        let base =
            if c >= min && c <= u32::from(self.port_max) && !(hole > 0 && c >= hmin && c <= hmax) {
                if hole > 0 && c > hmax {
                    c - min - hole
                } else {
                    c - min
                }
            } else if hole > 0 && c >= hmin && c <= hmax {
                c - hmin
            } else {
                c
            };
        // checked_rem: no panic path in BPF (n == 0 gives index 0).
        self.port_at(base.wrapping_add(try_no).checked_rem(n).unwrap_or(0))
    }

    /// The usable port at `idx` (0-based, below `usable()`): counted from
    /// `port_min`, skipping the hole.
    #[inline(always)]
    fn port_at(&self, idx: u32) -> u16 {
        let p = u32::from(self.port_min) + idx;
        let hole = self.hole_len();
        (if hole > 0 && p >= u32::from(self.hole_min) {
            p + hole
        } else {
            p
        }) as u16
    }

    /// The `i`th port of the walk seeded with `seed` (`walk_seed`), where
    /// the allocator goes when the client's own port (`candidate`) is
    /// taken: each step an independent, uniform pick among the usable
    /// ports, so the ports in use never form runs that a walk must cross
    /// (a linear walk from a salted start clustered: a few hundred held
    /// ports in a row exhausted every walk that started among them).
    /// Deterministic: a client tuple that comes back finds its own port
    /// again at the same step.
    #[inline(always)]
    pub fn walk(&self, seed: u32, i: u32) -> u16 {
        let n = self.usable();
        if n == 0 {
            return 0;
        }
        // checked_rem: no panic path in BPF.
        self.port_at(
            hash::finish(seed.wrapping_add(i.wrapping_mul(0x9e37_79b9)))
                .checked_rem(n)
                .unwrap_or(0),
        )
    }
}

/// The seed of a client tuple's SNAT walk (`SnatAddr::walk`): a hash of
/// its address and source port. Clients that share source ports, and
/// neighbouring ports of one client, walk through unrelated ports.
#[inline(always)]
pub fn walk_seed(client: u16, addr: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    hash::finish(
        w(0) ^ w(4).rotate_left(8)
            ^ w(8).rotate_left(16)
            ^ w(12).rotate_left(24)
            ^ u32::from(client).wrapping_mul(0x9e37_79b1),
    )
}

/// Default SNAT ports: all non-privileged ones (minus the node's
/// ephemeral range, found at run time).
pub const SNAT_PORT_MIN: u16 = 1024;
pub const SNAT_PORT_MAX: u16 = 65535;
/// Ports tried per new flow before it is dropped as exhausted.
pub const SNAT_TRIES: u32 = 8;
/// An embryonic TCP flow's port (neither `CT_F_EST` on its conntrack
/// entry nor `SNAT_E_EST` on its SNAT entry) may be taken by another flow
/// this long after it was taken (a backend's SYN-ACK does not refresh
/// it): spoofed SYNs hold the port space for at most this long. The
/// other limits are `FlowConfig`'s (idle timeouts, quarantine).
pub const SNAT_EMBRYONIC_NS: u64 = 1_000_000_000;
/// `SnatEntry::last_seen` is refreshed when older than this.
pub const SNAT_TOUCH_NS: u64 = 1_000_000_000;

/// `IFACES` flags: XDP runs in generic (skb) mode on this interface, so a
/// redirect from it may target any device.
pub const IF_F_GENERIC: u32 = 1;
/// This device cannot take native XDP redirects (a bridge, dummy, ...):
/// translated packets for it go to the stack, which forwards them.
pub const IF_F_NO_XMIT: u32 = 2;

/// Per-CPU traffic counters of one backend or one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Stats {
    /// Client -> backend.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Backend -> client (replies).
    pub packets_out: u64,
    pub bytes_out: u64,
    /// New flows that selected this backend.
    pub connections: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.packets_in += o.packets_in;
        self.bytes_in += o.bytes_in;
        self.packets_out += o.packets_out;
        self.bytes_out += o.bytes_out;
        self.connections += o.connections;
    }
}

/// Userspace bookkeeping of who programmed the maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeMeta {
    pub layout_version: u32,
    /// `DATAPLANE_*`.
    pub dataplane: u32,
    /// Unix seconds of the last successful apply.
    pub applied_at: u64,
    /// The node name of the daemon that programmed the maps, NUL-padded.
    pub node: [u8; 64],
}

impl Default for NodeMeta {
    fn default() -> Self {
        NodeMeta {
            layout_version: 0,
            dataplane: 0,
            applied_at: 0,
            node: [0; 64],
        }
    }
}

pub const DATAPLANE_NONE: u32 = 0;
pub const DATAPLANE_XDP_NATIVE: u32 = 1;
pub const DATAPLANE_XDP_GENERIC: u32 = 2;
pub const DATAPLANE_IPVS: u32 = 3;

/// Global per-CPU packet counters (index into `COUNTERS`). Append-only.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Not addressed to a service: passed untouched.
    NotService = 0,
    /// Client packet translated and redirected/transmitted.
    ForwardedIn = 1,
    /// Reply translated and redirected/transmitted.
    ForwardedOut = 2,
    /// Translated, but the FIB had no neighbour/route: passed to the stack.
    FibPass = 3,
    /// Service without a usable backend: dropped (before wave 2: passed
    /// to the stack, which routed it on).
    NoBackend = 4,
    /// Too short for an Ethernet header.
    TruncatedEth = 5,
    /// VLAN-tagged: not handled, passed untouched.
    Vlan = 6,
    /// Too short or malformed IPv4/IPv6 header (bad IHL, version, length).
    MalformedIp = 7,
    /// IPv4 options: passed untouched.
    IpOptions = 8,
    /// A non-first IP fragment was seen (translated with its datagram's
    /// first fragment's choice, or passed when it is not ours).
    Fragment = 9,
    /// IPv6 extension header: passed untouched.
    Ipv6ExtHeader = 10,
    /// L4 header truncated: passed untouched.
    TruncatedL4 = 11,
    /// TTL/hop limit would expire: passed to the stack (ICMP from there).
    TtlExceeded = 12,
    /// New flow created in conntrack.
    NewFlow = 13,
    /// Conntrack insert failed.
    CtFull = 14,
    /// Not TCP/UDP: passed untouched.
    OtherProto = 15,
    /// A remote-backend flow got a SNAT port.
    SnatNew = 16,
    /// No free SNAT port after `SNAT_TRIES`: the packet was dropped.
    SnatExhausted = 17,
    /// A SNAT port of a closed or idle flow was taken over.
    SnatReclaimed = 18,
    /// Remote backend but no SNAT address for the family: dropped.
    SnatNoAddr = 19,
    /// Translated, but the egress device cannot take a native redirect:
    /// passed to the stack, which forwards it.
    RedirectPass = 20,
    /// A new flow went to its client's backend by session affinity.
    AffinityHit = 21,
    /// A hairpin flow (local client, local backend) was source-translated
    /// to its interface's address.
    Hairpin = 22,
    /// To a VIP on a port it does not publish: dropped.
    UnknownPort = 23,
    /// Forwarded through the neighbour subsystem (`bpf_redirect_neigh`).
    RedirectNeigh = 24,
    /// Translated by XDP, handed with `XdpHandoff` metadata to the TC
    /// program of the same interface.
    Handoff = 25,
    /// A hairpin flow needs the interface's address but it has none
    /// (`IFACE_ADDRS`): dropped.
    HairpinNoAddr = 26,
    /// A non-first fragment translated like its first fragment.
    FragTranslated = 27,
    /// A non-first fragment to a VIP whose first fragment was not seen:
    /// dropped.
    FragUnknown = 28,
    /// An ICMP error quoting a translated flow, translated back.
    IcmpTranslated = 29,
    /// Translated, but too big for the egress link: answered in place with
    /// an ICMP "fragmentation needed" / ICMPv6 "packet too big" that quotes
    /// the packet as its sender sent it (the packet is not forwarded).
    TooBig = 30,
    /// A TCP packet of no known flow that is not a SYN, to a local
    /// backend: forwarded by Maglev (the same choice its flow had, unless
    /// the backend set changed) without creating any state.
    Stateless = 31,
    /// A TCP packet of no known flow that is not a SYN and would need
    /// translation state (a remote backend's SNAT, a hairpin): dropped,
    /// never given state (ACK floods).
    NoFlow = 32,
    /// A UDP flow whose backend went down or away moved to a live backend
    /// on its next packet.
    Rebalanced = 33,
    /// A known flow's missing reply half (evicted from its LRU table while
    /// the conntrack half survived) was re-created by its next packet.
    Healed = 34,
    /// A packet found its flow idle past its timeout (`FlowConfig`): the
    /// entry was treated as absent and replaced.
    Expired = 35,
    /// A SNAT port was found held by a flow whose conntrack entry is gone
    /// (evicted by the LRU, or swept): it goes back to the pool only after
    /// the quarantine (embryonic flows: `SNAT_EMBRYONIC_NS`).
    Evicted = 36,
    /// A RST on a known flow followed by more traffic of that flow (a
    /// forged or lost RST): the flow is live again, not closing.
    RstIgnored = 37,
    /// Flows removed by the daemon's sweep once idle past their timeout
    /// (written by userspace only, on CPU 0's slot).
    Swept = 38,
    /// A TCP packet of a flow whose backend was removed from its service
    /// (not down, not draining): answered with a reset (XDP), the flow's
    /// state deleted.
    Reset = 39,
    /// The same, where no reset could be sent (the TC hook, or a packet
    /// that cannot be answered): dropped, the flow's state deleted.
    ResetDropped = 40,
    /// A flow was established (TCP: the client's handshake ACK; UDP: its
    /// second datagram) and moved from the embryonic tables to the main
    /// ones, where floods of flow openers cannot evict it.
    Promoted = 41,
    /// An embryonic flow's SNAT port went to another flow before it was
    /// established (its handshake took longer than `SNAT_EMBRYONIC_NS`):
    /// dropped; the client retries.
    PortLost = 42,
    /// A packet to a backend whose cached next hop (`NextHop`) was
    /// missing or stale: forwarded by a FIB lookup, which refreshed it.
    NextHopMiss = 43,
    /// A packet of no known flow in a unicast frame for another host's MAC
    /// (a flooding switch, a veth or a promiscuous NIC delivers those
    /// too): not this node's to balance; passed to the kernel, which
    /// drops it (`PACKET_OTHERHOST`).
    OtherHost = 44,
}

/// Number of `Counter` variants.
pub const COUNTER_COUNT: u32 = 45;
/// Size of the `COUNTERS` map: room to append counters without a new
/// layout.
pub const COUNTER_CAPACITY: u32 = 64;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::NotService,
        Counter::ForwardedIn,
        Counter::ForwardedOut,
        Counter::FibPass,
        Counter::NoBackend,
        Counter::TruncatedEth,
        Counter::Vlan,
        Counter::MalformedIp,
        Counter::IpOptions,
        Counter::Fragment,
        Counter::Ipv6ExtHeader,
        Counter::TruncatedL4,
        Counter::TtlExceeded,
        Counter::NewFlow,
        Counter::CtFull,
        Counter::OtherProto,
        Counter::SnatNew,
        Counter::SnatExhausted,
        Counter::SnatReclaimed,
        Counter::SnatNoAddr,
        Counter::RedirectPass,
        Counter::AffinityHit,
        Counter::Hairpin,
        Counter::UnknownPort,
        Counter::RedirectNeigh,
        Counter::Handoff,
        Counter::HairpinNoAddr,
        Counter::FragTranslated,
        Counter::FragUnknown,
        Counter::IcmpTranslated,
        Counter::TooBig,
        Counter::Stateless,
        Counter::NoFlow,
        Counter::Rebalanced,
        Counter::Healed,
        Counter::Expired,
        Counter::Evicted,
        Counter::RstIgnored,
        Counter::Swept,
        Counter::Reset,
        Counter::ResetDropped,
        Counter::Promoted,
        Counter::PortLost,
        Counter::NextHopMiss,
        Counter::OtherHost,
    ];

    /// Whether the data path dropped the packet this counts (the
    /// `meshlb_dropped_total{reason}` series; the reason is `name`).
    pub fn is_drop(self) -> bool {
        matches!(
            self,
            Counter::NoBackend
                | Counter::SnatExhausted
                | Counter::SnatNoAddr
                | Counter::UnknownPort
                | Counter::HairpinNoAddr
                | Counter::FragUnknown
                | Counter::NoFlow
                | Counter::ResetDropped
                | Counter::PortLost
        )
    }

    /// Stable name used in metrics and status output.
    pub fn name(self) -> &'static str {
        match self {
            Counter::NotService => "not_service",
            Counter::ForwardedIn => "forwarded_in",
            Counter::ForwardedOut => "forwarded_out",
            Counter::FibPass => "fib_pass",
            Counter::NoBackend => "no_backend",
            Counter::TruncatedEth => "truncated_eth",
            Counter::Vlan => "vlan",
            Counter::MalformedIp => "malformed_ip",
            Counter::IpOptions => "ip_options",
            Counter::Fragment => "fragment",
            Counter::Ipv6ExtHeader => "ipv6_ext_header",
            Counter::TruncatedL4 => "truncated_l4",
            Counter::TtlExceeded => "ttl_exceeded",
            Counter::NewFlow => "new_flow",
            Counter::CtFull => "ct_full",
            Counter::OtherProto => "other_proto",
            Counter::SnatNew => "snat_new",
            Counter::SnatExhausted => "snat_exhausted",
            Counter::SnatReclaimed => "snat_reclaimed",
            Counter::SnatNoAddr => "snat_no_addr",
            Counter::RedirectPass => "redirect_pass",
            Counter::AffinityHit => "affinity_hit",
            Counter::Hairpin => "hairpin",
            Counter::UnknownPort => "unknown_port",
            Counter::RedirectNeigh => "redirect_neigh",
            Counter::Handoff => "handoff",
            Counter::HairpinNoAddr => "hairpin_no_addr",
            Counter::FragTranslated => "frag_translated",
            Counter::FragUnknown => "frag_unknown",
            Counter::IcmpTranslated => "icmp_translated",
            Counter::TooBig => "too_big",
            Counter::Stateless => "stateless",
            Counter::NoFlow => "no_flow",
            Counter::Rebalanced => "rebalanced",
            Counter::Healed => "healed",
            Counter::Expired => "expired",
            Counter::Evicted => "evicted",
            Counter::RstIgnored => "rst_ignored",
            Counter::Swept => "swept",
            Counter::Reset => "reset",
            Counter::ResetDropped => "reset_dropped",
            Counter::Promoted => "promoted",
            Counter::PortLost => "port_lost",
            Counter::NextHopMiss => "next_hop_miss",
            Counter::OtherHost => "other_host",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::{
        AddrKey, AffinityEntry, AffinityKey, Backend, CtEntry, FlowConfig, FlowKey, FragEntry,
        FragKey, FrontendKey, FrontendValue, IfAddrKey, NextHop, NodeMeta, RateWindow, RnatEntry,
        ServiceInfo, ServiceName, SnatAddr, SnatEntry, SockRevKey, SockRevValue, Stats, XdpHandoff,
    };
    // SAFETY: all these are #[repr(C)], fixed-width, without implicit
    // padding (padding is explicit), so every bit pattern is valid.
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for FrontendValue {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for FlowConfig {}
    unsafe impl aya::Pod for RateWindow {}
    unsafe impl aya::Pod for RnatEntry {}
    unsafe impl aya::Pod for Stats {}
    unsafe impl aya::Pod for NodeMeta {}
    unsafe impl aya::Pod for SnatEntry {}
    unsafe impl aya::Pod for SnatAddr {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityEntry {}
    unsafe impl aya::Pod for IfAddrKey {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragEntry {}
    unsafe impl aya::Pod for XdpHandoff {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
}

#[cfg(test)]
#[allow(
    clippy::large_stack_arrays,
    reason = "tables of every port, on a test thread's stack"
)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // Sizes are part of the pinned ABI: a change here needs a new map name.
    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<FrontendKey>(), 20);
        assert_eq!(size_of::<FrontendValue>(), 8);
        assert_eq!(size_of::<AddrKey>(), 20);
        assert_eq!(size_of::<ServiceInfo>(), 16);
        assert_eq!(size_of::<ServiceName>(), 64);
        assert_eq!(size_of::<Backend>(), 32);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<CtEntry>(), 36);
        assert_eq!(size_of::<FlowConfig>(), 24);
        assert_eq!(size_of::<RateWindow>(), 8);
        assert_eq!(size_of::<RnatEntry>(), 32);
        assert_eq!(size_of::<Stats>(), 40);
        assert_eq!(size_of::<NodeMeta>(), 80);
        assert_eq!(size_of::<SnatEntry>(), 56);
        assert_eq!(size_of::<SnatAddr>(), 32);
        assert_eq!(size_of::<AffinityKey>(), 24);
        assert_eq!(size_of::<AffinityEntry>(), 16);
        assert_eq!(size_of::<IfAddrKey>(), 8);
        assert_eq!(size_of::<XdpHandoff>(), 12);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<FragEntry>(), 32);
    }

    fn linux_default() -> SnatAddr {
        SnatAddr {
            port_min: 1024,
            port_max: 65535,
            hole_min: 32768,
            hole_max: 60999,
            flags: SNAT_F_PRESENT,
            ..Default::default()
        }
    }

    #[test]
    fn snat_keeps_usable_client_ports_and_folds_the_rest_one_to_one() {
        let a = linux_default();
        assert_eq!(a.usable(), 65535 - 1024 + 1 - (60999 - 32768 + 1));
        for p in [1024u16, 20000, 32767, 61000, 65535] {
            assert_eq!(a.candidate(p, 0), p, "usable port {p} is kept");
        }
        assert_eq!(a.candidate(32768, 0), 1024);
        assert_eq!(a.candidate(32769, 0), 1025);
        // The whole hole maps one to one into usable ports.
        let mut seen = [false; 65536];
        for p in 32768u16..=60999 {
            let q = a.candidate(p, 0);
            assert!(!(32768..=60999).contains(&q) && q >= 1024, "{p} -> {q}");
            assert!(!seen[q as usize], "{p} -> {q} twice");
            seen[q as usize] = true;
        }
        // Later tries walk on and skip the hole.
        assert_eq!(a.candidate(32767, 1), 61000);
        assert_eq!(a.candidate(65535, 1), 1024);
        assert_eq!(a.candidate(80, 0), 80 + 1024);
        // Clients that share a source port walk on from different ports.
        let c1 = [10, 210, 0, 101, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let c2 = [10, 210, 0, 102, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let (p1, p2) = (
            a.walk(walk_seed(40000, &c1), 0),
            a.walk(walk_seed(40000, &c2), 0),
        );
        assert_ne!(p1, p2);
    }

    /// The walk stays in the usable ports and spreads evenly: 8 clients
    /// that share 1,000 source ports, their walks' ports counted per
    /// 1/16th of the range, each within 25 % of the mean; and with a fifth
    /// of the range held (8,000 ports, as by those clients' flows), a walk
    /// of 7 steps fails about 0.2^7 of the time, not in runs.
    #[test]
    fn snat_walk_is_uniform_and_never_clusters() {
        let a = linux_default();
        let n = a.usable();
        let slot = |p: u16| {
            let p = u32::from(p);
            let off = if p > 60999 {
                p - 1024 - (60999 - 32768 + 1)
            } else {
                p - 1024
            };
            (off * 16 / n) as usize
        };
        let mut buckets = [0u32; 16];
        let mut held = [false; 65536];
        let mut total = 0u32;
        let mut failed = 0u32;
        for c in 0..8u8 {
            let addr = [10, 210, 0, 100 + c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            for port in 10000u16..11000 {
                let seed = walk_seed(port, &addr);
                let mut got = false;
                for i in 0..7 {
                    let p = a.walk(seed, i);
                    assert!(p >= 1024 && !(32768..=60999).contains(&p), "{p}");
                    buckets[slot(p)] += 1;
                    total += 1;
                    if !got && !held[p as usize] {
                        held[p as usize] = true;
                        got = true;
                    }
                }
                failed += u32::from(!got);
            }
        }
        let mean = total / 16;
        for (i, b) in buckets.iter().enumerate() {
            assert!(
                b * 4 > mean * 3 && b * 4 < mean * 5,
                "slot {i}: {b} of mean {mean}: {buckets:?}"
            );
        }
        assert_eq!(failed, 0, "walks that found no free port among 8,000 held");
    }

    #[test]
    fn snat_without_a_hole_or_ports() {
        let a = SnatAddr {
            port_min: 61000,
            port_max: 61009,
            hole_min: 1,
            hole_max: 0,
            ..Default::default()
        };
        assert_eq!(a.usable(), 10);
        assert_eq!(a.candidate(61005, 0), 61005);
        assert_eq!(a.candidate(61009, 1), 61000);
        assert_eq!(a.candidate(5, 0), 61005);
        assert_eq!(SnatAddr::default().usable(), 0);
        assert_eq!(SnatAddr::default().candidate(5, 0), 0);
    }

    #[test]
    fn flows_expire_by_protocol_and_state_and_v1_entries_migrate() {
        let cfg = FlowConfig {
            udp_timeout_s: 3,
            ..Default::default()
        };
        assert_eq!((cfg.tcp(), cfg.tcp_closing(), cfg.udp()), (3600, 10, 3));
        assert_eq!(cfg.snat_quarantine(), 60);
        // 3 s and 10 s in 2^29 ns ticks.
        assert_eq!((ticks(3), ticks(10)), (5, 18));
        let mut e = CtEntry {
            last_seen: u32::MAX - 1,
            ..Default::default()
        };
        // Across the clock's wrap: 2 ticks to 0, then on.
        assert!(!e.expired(3, PROTO_UDP, &cfg));
        assert!(!e.expired(4, PROTO_TCP, &cfg));
        assert!(e.expired(4, PROTO_UDP, &cfg));
        e.flags = CT_F_FIN_CLIENT;
        assert!(!e.expired(16, PROTO_TCP, &cfg));
        assert!(e.expired(17, PROTO_TCP, &cfg));
        assert_eq!(flow_clock(3 * FLOW_TICK_NS + 1), 3);
        // Seen "after now" (another CPU refreshed it meanwhile): fresh.
        let e = CtEntry {
            last_seen: 100,
            ..Default::default()
        };
        assert!(!e.expired(99, PROTO_UDP, &cfg));
        assert!(!idle_past(u32::MAX, 2, 3));

        let v2 = CtEntry {
            backend_addr: [7; 16],
            backend_port: 0x1234,
            flags: CT_F_SNAT | CT_F_EST,
            backend_id: 9,
            service_id: 11,
            snat_port: 0x4321,
            _pad: 0,
            last_seen: 77,
        };
        let mut v1 = [0u8; 32];
        // SAFETY: CtEntry is repr(C), its first 32 bytes are the V1 layout.
        let bytes = unsafe { core::slice::from_raw_parts((&raw const v2).cast::<u8>(), 32) };
        v1.copy_from_slice(bytes);
        assert_eq!(CtEntry::from_v1(&v1, 77), v2);
    }

    #[test]
    fn affinity_entries_expire_after_their_timeout() {
        let e = AffinityEntry {
            backend_id: 3,
            _pad: 0,
            last_used: 10_000_000_000,
        };
        assert!(e.fresh(10_000_000_000, 1));
        assert!(e.fresh(11_000_000_000, 1));
        assert!(!e.fresh(11_000_000_001, 1));
        assert!(!e.fresh(10_000_000_000, 0), "timeout 0: affinity off");
        assert!(e.fresh(5, 1), "a clock behind the entry is not expiry");
    }

    #[test]
    fn counters_are_dense_and_named_uniquely() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32);
            for d in &Counter::ALL[i + 1..] {
                assert_ne!(c.name(), d.name());
            }
        }
    }

    #[test]
    fn map_names_fit_the_kernel_limit_and_carry_the_version() {
        for n in maps::ALL {
            assert!(n.len() < 16, "{n} too long for BPF_OBJ_NAME_LEN");
            let v = n.rsplit_once("_V").map(|(_, v)| v);
            assert!(
                v.is_some_and(|v| v.parse::<u32>().is_ok()),
                "{n} not versioned"
            );
            assert!(
                !maps::SUPERSEDED.contains(&n),
                "{n} both live and superseded"
            );
        }
    }
}
