//! Forwarding of a translated frame in XDP: the backend's cached next hop
//! when it is fresh (`MLB_NH_V1`: no FIB lookup on a conntrack hit), else
//! a FIB lookup for its (new) destination, which refreshes that cache;
//! then MAC rewrite, TTL/hop-limit decrement, `XDP_TX` or redirect. When the next hop is not resolved yet or the egress device
//! takes no native redirect, the frame goes up with `XdpHandoff` metadata
//! (or, where the kernel refuses XDP metadata, with the same handoff
//! recorded under its flow in `MLB_HANDOFF_V1`) and the TC handoff program
//! sends it through the neighbour subsystem
//! (the stack itself would drop a packet whose source became this node's
//! own address as a martian). Too big for the egress: answered with an
//! ICMP error built in place (`toobig`). No route: the stack answers. A
//! TTL about to expire is never forwarded.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup,
        xdp_action::{XDP_PASS, XDP_REDIRECT, XDP_TX},
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_xdp_adjust_meta},
    programs::XdpContext,
};
use meshlb_common::{
    Counter, FlowKey, NextHop, XdpHandoff, FAMILY_V4, HANDOFF_MAGIC, IF_F_GENERIC, IF_F_NO_XMIT,
    NH_F_NO_XMIT, NH_F_VALID, NH_MAX_AGE, NO_BACKEND,
};

use crate::{
    csum::CsumDelta,
    frame::{Frame, Hop, HOP_BY_ADDR},
    maps::{count, xdp_meta, MLB_HANDOFF_V1, MLB_IFACE_V1, MLB_NHADDR_V1, MLB_NHGEN_V1, MLB_NH_V1},
    parse::{plain_flow, ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, L4Ports, Packet, ETH_LEN, KIND_L4},
    toobig,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The FIB lookup parameters of a translated packet (addresses, ports,
/// length, TOS/flow label from its headers; the ingress interface).
/// `None`: headers out of bounds, or a TTL / hop limit that would expire
/// here (counted): such a packet is never forwarded by the data path.
#[inline(always)]
pub fn fib_params<C: Frame>(ctx: &C, pkt: &Packet) -> Option<bpf_fib_lookup> {
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.ifindex = ctx.ifindex();
    // SAFETY: header pointers are bounds-checked by ptr_at; the union
    // fields written are the ones the kernel reads for this family.
    unsafe {
        // Ports only where the packet has them (not a later fragment, not
        // an ICMP error).
        if pkt.kind == KIND_L4 {
            p.l4_protocol = pkt.key.proto;
            let ports = &*ptr_at::<L4Ports, _>(ctx, pkt.l4_off).ok()?;
            p.sport = u16::from_ne_bytes(ports.sport);
            p.dport = u16::from_ne_bytes(ports.dport);
        }
        if pkt.key.family == FAMILY_V4 {
            let ip = &*ptr_at::<Ipv4Hdr, _>(ctx, ETH_LEN).ok()?;
            if ip.ttl <= 1 {
                count(Counter::TtlExceeded);
                return None;
            }
            p.family = AF_INET;
            p.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
            p.__bindgen_anon_2.tos = ip.tos;
            p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src);
            p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst);
        } else {
            let ip = &*ptr_at::<Ipv6Hdr, _>(ctx, ETH_LEN).ok()?;
            if ip.hop_limit <= 1 {
                count(Counter::TtlExceeded);
                return None;
            }
            p.family = AF_INET6;
            p.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.payload_len) + 40;
            p.__bindgen_anon_2.flowinfo =
                u32::from_ne_bytes(ip.vtcfl) & u32::from_ne_bytes([0x0f, 0xff, 0xff, 0xff]);
            p.__bindgen_anon_3.ipv6_src = words(&ip.src);
            p.__bindgen_anon_4.ipv6_dst = words(&ip.dst);
        }
    }
    Some(p)
}

/// XDP's `Frame::forward`: by the cached next hop of `hop`'s backend when
/// it is fresh, else by the FIB. What it cannot transmit itself (no
/// neighbour entry yet; an egress device without a native XDP transmit
/// path) goes up with `XdpHandoff` metadata, for the TC handoff program on
/// this interface to send through the neighbour subsystem.
#[inline(never)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, done: Counter, hop: Hop) -> u32 {
    if hop.backend_id() != NO_BACKEND {
        let nh = slot(ctx, pkt, hop, false);
        let v = if nh.is_null() {
            NH_MISS
        } else {
            cached(ctx, pkt, hop, nh)
        };
        if v == NH_MISS {
            count(Counter::NextHopMiss);
        } else if v & NH_HANDOFF != 0 {
            count(Counter::RedirectPass);
            return handoff(ctx, v & !NH_HANDOFF);
        } else {
            count(done);
            return v;
        }
    }
    let Some(mut p) = fib_params(ctx, pkt) else {
        return XDP_PASS;
    };
    let mut route_mtu = 0u16;
    let mut rc;
    if hop.backend_id() == NO_BACKEND {
        rc = lookup(ctx, &mut p);
    } else {
        // For the cache, the route's MTU first: the FIB's answer for the
        // same packet at 64 KiB (only `mtu_result` is written then).
        // SAFETY: the union field the kernel reads for this lookup.
        let len = unsafe { p.__bindgen_anon_1.tot_len };
        p.__bindgen_anon_1.tot_len = u16::MAX;
        rc = lookup(ctx, &mut p);
        if rc == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
            // SAFETY: the kernel filled mtu_result for this return code.
            route_mtu = unsafe { p.__bindgen_anon_1.mtu_result };
            p.__bindgen_anon_1.tot_len = len;
            rc = lookup(ctx, &mut p);
        } else if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
            route_mtu = u16::MAX;
        }
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        // SAFETY: the kernel filled mtu_result for this return code.
        let mtu = u32::from(unsafe { p.__bindgen_anon_1.mtu_result });
        return toobig::TOO_BIG | mtu;
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        count(Counter::FibPass);
        return handoff(ctx, p.ifindex);
    }
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        count(Counter::FibPass);
        return XDP_PASS;
    }
    if route_mtu != 0 {
        let nh = slot(ctx, pkt, hop, true);
        if !nh.is_null() {
            // SAFETY: a map value (`slot`), written field by field (a
            // racing writer writes the same answer).
            remember(unsafe { &mut *nh }, pkt, hop, &p, route_mtu);
        }
    }
    let ingress = ctx.ingress_ifindex() as u32;
    if p.ifindex != ingress && !can_redirect(ingress, p.ifindex) {
        count(Counter::RedirectPass);
        return handoff(ctx, p.ifindex);
    }
    count(done);
    emit(ctx, pkt, p.ifindex, &p.smac, &p.dmac)
}

/// `cached`: no fresh next hop for this packet.
const NH_MISS: u32 = u32::MAX;
/// `cached`: set with the egress ifindex in the other bits: to be handed
/// off to the TC program (an egress this ingress may not redirect to).
const NH_HANDOFF: u32 = 1 << 31;

/// Sends the packet by its backend's cached next hop when that is fresh
/// (`NextHop`: this generation, young enough, resolved for this
/// destination) and the packet passes what the FIB lookup would check
/// (TTL / hop limit, the route's MTU). `NH_MISS`: ask the FIB;
/// `NH_HANDOFF | ifindex`: an egress this ingress may not redirect to,
/// for the caller to hand off (`handoff`).
#[inline(never)]
fn cached(ctx: &XdpContext, pkt: &Packet, hop: Hop, nh: *const NextHop) -> u32 {
    // SAFETY: a map value (`slot`), read while this program runs.
    let nh = unsafe { &*nh };
    let generation = MLB_NHGEN_V1.get(0).copied().unwrap_or(0);
    if nh.flags & NH_F_VALID == 0
        || nh.gen != generation
        || nh.family != pkt.key.family
        || hop.now().wrapping_sub(nh.stamp) > NH_MAX_AGE
    {
        return NH_MISS;
    }
    let ingress = ctx.ingress_ifindex() as u32;
    let handoff = nh.ifindex != ingress && nh.flags & NH_F_NO_XMIT != 0 && !generic(ingress);
    // SAFETY: header pointers are bounds-checked by ptr_at.
    let fits = unsafe {
        if pkt.key.family == FAMILY_V4 {
            let Ok(ip) = ptr_at::<Ipv4Hdr, _>(ctx, ETH_LEN) else {
                return NH_MISS;
            };
            (*ip).ttl > 1
                && (*ip).dst == [nh.addr[0], nh.addr[1], nh.addr[2], nh.addr[3]]
                && u16::from_be_bytes((*ip).tot_len) <= nh.mtu
        } else {
            let Ok(ip) = ptr_at::<Ipv6Hdr, _>(ctx, ETH_LEN) else {
                return NH_MISS;
            };
            (*ip).hop_limit > 1
                && (*ip).dst == nh.addr
                && u32::from(u16::from_be_bytes((*ip).payload_len)) + 40 <= u32::from(nh.mtu)
        }
    };
    if !fits || nh.ifindex & NH_HANDOFF != 0 {
        return NH_MISS;
    }
    if handoff {
        return NH_HANDOFF | nh.ifindex;
    }
    emit(ctx, pkt, nh.ifindex, &nh.smac, &nh.dmac)
}

/// Caches what the FIB just answered (`p`) in `nh` (from `slot`, which
/// set its `addr`), with the route's MTU. A packet racing a refresh may
/// see the entry half old, half new: one packet to a next hop that just
/// stopped being right, as with any cache.
#[inline(always)]
fn remember(nh: &mut NextHop, pkt: &Packet, hop: Hop, p: &bpf_fib_lookup, mtu: u16) {
    nh.ifindex = p.ifindex;
    nh.gen = MLB_NHGEN_V1.get(0).copied().unwrap_or(0);
    nh.stamp = hop.now();
    nh.mtu = mtu;
    nh.family = pkt.key.family;
    nh.smac = p.smac;
    nh.dmac = p.dmac;
    nh.flags = NH_F_VALID
        | if iface_flags(p.ifindex) & IF_F_NO_XMIT != 0 {
            NH_F_NO_XMIT
        } else {
            0
        };
}

/// The cache slot of a packet's next hop (`hop`): its backend's in
/// `MLB_NH_V1`, or with `HOP_BY_ADDR` its destination's in
/// `MLB_NHADDR_V1`; null when there is none. `create`: for a FIB answer
/// about to be cached — a missing address entry is made (empty) and the
/// slot's `addr` set to the packet's destination. A subprogram of its
/// own, so that its key is never on the callers' frames.
#[inline(never)]
fn slot(ctx: &XdpContext, pkt: &Packet, hop: Hop, create: bool) -> *mut NextHop {
    if hop.backend_id() != HOP_BY_ADDR {
        let Some(nh) = MLB_NH_V1.get_ptr_mut(hop.backend_id()) else {
            return core::ptr::null_mut();
        };
        if create {
            let Some(key) = destination(ctx, pkt) else {
                return core::ptr::null_mut();
            };
            // SAFETY: array value; a racing writer writes the same.
            unsafe { (*nh).addr = key_addr(&key) };
        }
        return nh;
    }
    let Some(key) = destination(ctx, pkt) else {
        return core::ptr::null_mut();
    };
    if create && MLB_NHADDR_V1.get_ptr(&key).is_none() {
        // From a global: no value on this frame.
        let _ = MLB_NHADDR_V1.insert(&key, &EMPTY_HOP, 0);
    }
    match MLB_NHADDR_V1.get_ptr_mut(&key) {
        Some(nh) => {
            if create {
                // SAFETY: LRU map value.
                unsafe { (*nh).addr = key_addr(&key) };
            }
            nh
        }
        None => core::ptr::null_mut(),
    }
}

/// An unresolved `NextHop`: what a new `MLB_NHADDR_V1` entry starts as.
static EMPTY_HOP: NextHop = NextHop {
    addr: [0; 16],
    ifindex: 0,
    gen: 0,
    stamp: 0,
    mtu: 0,
    flags: 0,
    family: 0,
    smac: [0; 6],
    dmac: [0; 6],
};

/// The packet's destination as it is now (after translation), as the key
/// of `MLB_NHADDR_V1`: the address's four words (IPv4: the first) and the
/// family. Built from scalars, so no `memset` frame joins the chain.
#[inline(always)]
fn destination(ctx: &XdpContext, pkt: &Packet) -> Option<[u32; 5]> {
    let family = u32::from(pkt.key.family);
    // SAFETY: header pointers are bounds-checked by ptr_at.
    unsafe {
        if pkt.key.family == FAMILY_V4 {
            let d = (*ptr_at::<Ipv4Hdr, _>(ctx, ETH_LEN).ok()?).dst;
            Some([u32::from_ne_bytes(d), 0, 0, 0, family])
        } else {
            let d = &(*ptr_at::<Ipv6Hdr, _>(ctx, ETH_LEN).ok()?).dst;
            let w = |i: usize| u32::from_ne_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
            Some([w(0), w(4), w(8), w(12), family])
        }
    }
}

/// The address bytes of a `destination` key.
#[inline(always)]
fn key_addr(key: &[u32; 5]) -> [u8; 16] {
    let word = |i: usize| key[i].to_ne_bytes();
    let (w0, w1, w2, w3) = (word(0), word(1), word(2), word(3));
    [
        w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3], w3[0],
        w3[1], w3[2], w3[3],
    ]
}

/// Sends a frame on to its next hop: TTL / hop limit decremented (the
/// caller checked it would not expire: `fib_params`), MACs rewritten,
/// then `XDP_TX` back out of the ingress or a redirect to `ifindex`.
/// Headers out of bounds or a failed redirect: `XDP_PASS`.
#[inline(always)]
pub fn emit(ctx: &XdpContext, pkt: &Packet, ifindex: u32, smac: &[u8; 6], dmac: &[u8; 6]) -> u32 {
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        let Ok(eth) = ptr_at::<EthHdr, _>(ctx, 0) else {
            return XDP_PASS;
        };
        if pkt.key.family == FAMILY_V4 {
            let Ok(ip) = ptr_at::<Ipv4Hdr, _>(ctx, ETH_LEN) else {
                return XDP_PASS;
            };
            let ip = &mut *ip;
            let mut c = CsumDelta::new(ip.check);
            c.word(
                u16::from_be_bytes([ip.ttl, ip.proto]),
                u16::from_be_bytes([ip.ttl.wrapping_sub(1), ip.proto]),
            );
            ip.ttl = ip.ttl.wrapping_sub(1);
            ip.check = c.finish();
        } else {
            let Ok(ip) = ptr_at::<Ipv6Hdr, _>(ctx, ETH_LEN) else {
                return XDP_PASS;
            };
            (*ip).hop_limit = (*ip).hop_limit.wrapping_sub(1);
        }
        (*eth).dst = *dmac;
        (*eth).src = *smac;
    }
    if ifindex == ctx.ingress_ifindex() as u32 {
        return XDP_TX;
    }
    // SAFETY: plain helper call.
    if unsafe { bpf_redirect(ifindex, 0) } == i64::from(XDP_REDIRECT) {
        XDP_REDIRECT
    } else {
        XDP_PASS
    }
}

/// `bpf_fib_lookup` on `p`: the kernel's return code.
#[inline(always)]
pub fn lookup(ctx: &XdpContext, p: &mut bpf_fib_lookup) -> i64 {
    // SAFETY: ctx and p are valid for the helper's duration.
    unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            core::ptr::from_mut(p),
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    }
}

/// Puts `XdpHandoff` metadata naming `ifindex` in front of the frame and
/// passes it up; without room for metadata it just passes it. Where the
/// kernel refuses XDP metadata (`xdp_meta`), the handoff is recorded under
/// the translated flow in `MLB_HANDOFF_V1` instead.
#[inline(always)]
fn handoff(ctx: &XdpContext, ifindex: u32) -> u32 {
    if !xdp_meta() {
        return handoff_by_flow(ctx, ifindex);
    }
    let size = core::mem::size_of::<XdpHandoff>();
    // SAFETY: plain helper call; the context pointer is valid.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(size as i32)) } != 0 {
        return XDP_PASS;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + size > data {
        return XDP_PASS;
    }
    // SAFETY: bounds-checked just above.
    unsafe {
        *(meta as *mut XdpHandoff) = XdpHandoff {
            magic: HANDOFF_MAGIC,
            ifindex,
            ingress: ctx.ingress_ifindex() as u32,
        };
    }
    count(Counter::Handoff);
    XDP_PASS
}

/// The handoff where the kernel refuses XDP metadata: recorded under the
/// translated flow for the TC handoff program, then passed up. A
/// subprogram of its own: its key stays off the callers' stack frames.
#[inline(never)]
fn handoff_by_flow(ctx: &XdpContext, ifindex: u32) -> u32 {
    let mut key = FlowKey::default();
    if plain_flow(ctx, &mut key) {
        let handoff = XdpHandoff {
            magic: HANDOFF_MAGIC,
            ifindex,
            ingress: ctx.ingress_ifindex() as u32,
        };
        if MLB_HANDOFF_V1.insert(&key, &handoff, 0).is_ok() {
            count(Counter::Handoff);
        }
    }
    XDP_PASS
}

/// Whether a redirect from `ingress` to `egress` is delivered: always in
/// generic mode; in native mode only to a device with an XDP transmit
/// path (userspace flags the others, e.g. bridges, in `MLB_IFACE`).
#[inline(always)]
fn can_redirect(ingress: u32, egress: u32) -> bool {
    generic(ingress) || iface_flags(egress) & IF_F_NO_XMIT == 0
}

/// Whether XDP runs in generic mode on `ifindex` (`IF_F_GENERIC`).
#[inline(always)]
fn generic(ifindex: u32) -> bool {
    iface_flags(ifindex) & IF_F_GENERIC != 0
}

#[inline(always)]
fn iface_flags(ifindex: u32) -> u32 {
    // SAFETY: hash map value, read at once.
    unsafe { MLB_IFACE_V1.get(&ifindex) }.copied().unwrap_or(0)
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}
