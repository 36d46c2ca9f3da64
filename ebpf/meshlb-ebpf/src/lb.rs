//! The load-balancing decision and the translation: frontend match,
//! conntrack, Maglev selection, DNAT of client packets and reverse
//! translation of replies.
//!
//! Invariants:
//! * a packet that matches no frontend and no reply entry leaves exactly
//!   as it came (XDP_PASS, no byte changed);
//! * an established flow keeps its backend whatever the backend set does;
//!   only a SYN on a closing/closed tuple, or any packet after the flow's
//!   idle timeout (`FlowConfig`, on a coarse clock of 0.54 s ticks, so a
//!   flow's entry is written at most twice a second), selects afresh;
//! * a direct (non-service) TCP SYN from a client to a backend removes a
//!   stale reply entry for the same tuple (one whose flow is closing or
//!   gone, never a live flow's), so a client that reaches a backend both
//!   directly and via the load balancer never has its direct replies
//!   rewritten;
//! * a flow to a backend on another node (`BE_F_SNAT`) is also translated
//!   to this node's address and a port it owns: the port is owned by the
//!   `MLB_SNAT` entry keyed by the reply tuple, taken with an atomic
//!   insert-if-absent, so two flows never share one. Another client's flow
//!   takes it over only when its flow is idle past its timeout, or closed
//!   or gone (evicted, expired) and quiet for the quarantine (the peer's
//!   TIME_WAIT); an embryonic flow's port (no handshake ACK, or one UDP
//!   datagram) goes back after `SNAT_EMBRYONIC_NS`. The same client tuple
//!   re-opening keeps its port;
//! * no packet deletes a live flow's translations: a RST only marks the
//!   flow closing (and a client RST followed by more client traffic is
//!   ignored), a SYN on a live tuple is part of that flow.
//!
//! Stack: BPF allows 512 bytes over the whole call chain, so the decision
//! functions are separate subprograms that return to `process`, and only
//! `forward` is called below it.

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS},
        BPF_ANY, BPF_NOEXIST,
    },
    helpers::{bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};
use meshlb_common::{
    flow_clock, hash::flow_slot, idle_past, walk_seed, AddrKey, AffinityEntry, AffinityKey,
    Counter, CtEntry, FlowConfig, FlowKey, FragEntry, FragKey, FrontendKey, FrontendValue,
    IfAddrKey, RateWindow, RnatEntry, SnatAddr, SnatEntry, BE_F_DOWN, BE_F_DRAINING, BE_F_PRESENT,
    BE_F_SNAT, CT_F_CLOSING, CT_F_EST, CT_F_FIN_BACKEND, CT_F_FIN_CLIENT, CT_F_HAIRPIN, CT_F_RST,
    CT_F_RST_CLIENT, CT_F_SNAT, FAMILY_V4, NO_BACKEND, PROTO_TCP, PROTO_UDP, RING_HALF,
    SNAT_EMBRYONIC_NS, SNAT_E_EST, SNAT_F_PRESENT, SNAT_IDX_V4, SNAT_IDX_V6, SNAT_TOUCH_NS,
    SNAT_TRIES, SVC_F_PRESENT,
};

use crate::{
    csum::CsumDelta,
    frame::Frame,
    maps::*,
    parse::{
        parse, ptr_at, Ipv4Hdr, Ipv6Hdr, L4Ports, Packet, ETH_LEN, IPV4_LEN, IPV6_LEN, KIND_FRAG,
        KIND_ICMP_ERR, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    },
    reset, toobig,
};

#[inline(always)]
fn is_syn(pkt: &Packet) -> bool {
    pkt.key.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// `CtEntry::last_seen`'s clock: ticks of the coarse monotonic clock.
#[inline(always)]
fn clock_now() -> u32 {
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    flow_clock(unsafe { bpf_ktime_get_coarse_ns() })
}

/// The flow timeouts (`MLB_FLOWCFG_V1`; zero fields: defaults).
#[inline(always)]
fn flow_cfg() -> FlowConfig {
    MLB_FLOWCFG_V1.get(0).copied().unwrap_or_default()
}

/// The decision spine, the same for both hooks (`Frame`: XDP on uplinks,
/// TC on task-facing interfaces). Verdicts are XDP's; the TC entry point
/// maps them.
#[inline(always)]
pub fn process<C: Frame>(ctx: &C) -> Result<u32, u32> {
    let pkt = parse(ctx)?;
    if pkt.kind == KIND_FRAG {
        // Forwarded from here, not from within: the call chain stays
        // short enough for older verifiers' stack accounting.
        frag_path(ctx, &pkt)?;
        return send(ctx, &pkt, Counter::ForwardedIn);
    }
    if pkt.kind == KIND_ICMP_ERR {
        icmp_path(ctx, &pkt)?;
        return send(ctx, &pkt, Counter::ForwardedOut);
    }
    let mut fe = FrontendValue::default();
    let found = lookup_frontend(&pkt, &mut fe);
    // A SNAT port may equal a published node port: the backend's reply
    // to `node address:port` is then the flow's, not a new client's.
    if found == FE_NODE_PORT && snat_reply(ctx, &pkt)? {
        if pkt.frag_first != 0 {
            record_frag_of(ctx, &pkt);
        }
        return send(ctx, &pkt, Counter::ForwardedOut);
    }
    if found != FE_NONE {
        client_path(ctx, &pkt, fe.service_id)?;
        if pkt.frag_first != 0 {
            record_frag_of(ctx, &pkt);
        }
        return send(ctx, &pkt, Counter::ForwardedIn);
    }
    if rnat_reply(ctx, &pkt)? || snat_reply(ctx, &pkt)? {
        if pkt.frag_first != 0 {
            record_frag_of(ctx, &pkt);
        }
        return send(ctx, &pkt, Counter::ForwardedOut);
    }
    if is_vip(&pkt) {
        // A VIP is nobody's address: routed on, the packet would follow
        // the default route (and maybe come back).
        count(Counter::UnknownPort);
        return Ok(XDP_DROP);
    }
    if is_syn(&pkt) {
        forget_reply(&pkt);
    }
    count(Counter::NotService);
    Ok(XDP_PASS)
}

/// `Frame::forward`, and the ICMP answer (`toobig`) when it reports the
/// packet too big for its egress. Called from here, not from within
/// `forward`, so that the two frames never stack up (older verifiers
/// allow 512 bytes of stack along any chain of calls).
#[inline(always)]
fn send<C: Frame>(ctx: &C, pkt: &Packet, done: Counter) -> Result<u32, u32> {
    match ctx.forward(pkt, done) {
        Ok(v) if v & toobig::TOO_BIG != 0 => Ok(toobig::reply(ctx, pkt, v & !toobig::TOO_BIG)),
        r => r,
    }
}

/// The key of a fragmented datagram as it arrived.
#[inline(always)]
fn frag_key(pkt: &Packet) -> FragKey {
    FragKey {
        src: pkt.key.src,
        dst: pkt.key.dst,
        id: pkt.frag_id,
        proto: pkt.key.proto,
        family: pkt.key.family,
        _pad: [0; 2],
    }
}

/// Records the translated addresses of a datagram's first fragment (read
/// back from the rewritten IP header) for its later fragments. One
/// subprogram per family, each given a header pointer checked for its
/// size (the verifier does not relate `family` to a pointer's range).
#[inline(never)]
fn record_frag_of<C: Frame>(ctx: &C, pkt: &Packet) {
    let mut e = FragEntry::default();
    if pkt.key.family == FAMILY_V4 {
        if let Ok(ip) = ptr_at::<Ipv4Hdr, _>(ctx, ETH_LEN) {
            frag_addrs_v4(ip, &mut e);
        }
    } else if let Ok(ip) = ptr_at::<Ipv6Hdr, _>(ctx, ETH_LEN) {
        frag_addrs_v6(ip, &mut e);
    }
    let _ = MLB_FRAG_V1.insert(&frag_key(pkt), &e, 0);
}

#[inline(never)]
fn frag_addrs_v4(ip: *const Ipv4Hdr, e: &mut FragEntry) {
    // SAFETY: bounds-checked by the caller (ptr_at).
    let ip = unsafe { &*ip };
    e.src[..4].copy_from_slice(&ip.src);
    e.dst[..4].copy_from_slice(&ip.dst);
}

#[inline(never)]
fn frag_addrs_v6(ip: *const Ipv6Hdr, e: &mut FragEntry) {
    // SAFETY: bounds-checked by the caller (ptr_at).
    let ip = unsafe { &*ip };
    e.src = ip.src;
    e.dst = ip.dst;
}

/// A later fragment: translated like its datagram's first fragment (the
/// addresses; it has no ports), to be forwarded. One of a datagram to a
/// VIP whose first fragment was not seen is dropped (counted); others are
/// not ours (`Err(XDP_PASS)`, untouched).
#[inline(never)]
fn frag_path<C: Frame>(ctx: &C, pkt: &Packet) -> Result<(), u32> {
    // SAFETY: LRU map value, copied out at once.
    let Some(e) = (unsafe { MLB_FRAG_V1.get(&frag_key(pkt)) }).copied() else {
        if is_vip(pkt) {
            count(Counter::FragUnknown);
            return Err(XDP_DROP);
        }
        return Err(XDP_PASS);
    };
    if e.dst != pkt.key.dst {
        translate(ctx, pkt, &e.dst, 0, false)?;
    }
    if e.src != pkt.key.src {
        translate(ctx, pkt, &e.src, 0, true)?;
    }
    count(Counter::FragTranslated);
    Ok(())
}

/// What an ICMP error's translation writes: the quoted packet's addresses
/// and ports and the outer addresses (unchanged fields keep their value).
struct IcmpXlate {
    inner_src: [u8; 16],
    inner_dst: [u8; 16],
    outer_src: [u8; 16],
    outer_dst: [u8; 16],
    inner_sport: u16,
    inner_dport: u16,
}

/// An ICMP error quoting a packet of a translated flow, translated back so
/// the endpoint that sent the quoted packet recognises its own flow (path
/// MTU discovery across the mesh needs this). The quoted packet was one
/// of: ours to a remote (or hairpin) backend, source-translated (SNAT
/// entry); ours to a local backend (reverse-NAT entry); a reply we
/// translated towards the client (conntrack entry). An error generated by
/// the backend itself gets the frontend as its source. `Ok`: translated,
/// to be forwarded; an error about no translated flow is not ours
/// (`Err(XDP_PASS)`, untouched).
#[inline(never)]
fn icmp_path<C: Frame>(ctx: &C, pkt: &Packet) -> Result<(), u32> {
    let rev = FlowKey {
        src: pkt.key.dst,
        dst: pkt.key.src,
        sport: pkt.key.dport,
        dport: pkt.key.sport,
        ..pkt.key
    };
    let mut x = IcmpXlate {
        inner_src: pkt.key.src,
        inner_dst: pkt.key.dst,
        outer_src: [0; 16],
        outer_dst: [0; 16],
        inner_sport: pkt.key.sport,
        inner_dport: pkt.key.dport,
    };
    if !outer_addrs(ctx, pkt, &mut x) {
        return Err(XDP_PASS);
    }
    // SAFETY (all three lookups): LRU map values, read at once (a racing
    // update can only make the translation as stale as a lookup would).
    if let Some(e) = unsafe { MLB_SNAT_V1.get(&rev) } {
        if x.outer_src == pkt.key.dst {
            x.outer_src = e.frontend_addr;
        }
        x.outer_dst = e.client_addr;
        x.inner_src = e.client_addr;
        x.inner_sport = e.client_port;
        x.inner_dst = e.frontend_addr;
        x.inner_dport = e.frontend_port;
    } else if let Some(r) = unsafe { MLB_RNAT_V1.get(&rev).or_else(|| MLB_RNATSYN_V1.get(&rev)) } {
        if x.outer_src == pkt.key.dst {
            x.outer_src = r.frontend_addr;
        }
        x.inner_dst = r.frontend_addr;
        x.inner_dport = r.frontend_port;
    } else if let Some(ct) = unsafe { MLB_CT_V2.get(&rev).or_else(|| MLB_CTSYN_V1.get(&rev)) } {
        if ct.flags & CT_F_HAIRPIN != 0 {
            // Its source address depends on the interface it entered by.
            count(Counter::NotService);
            return Err(XDP_PASS);
        }
        x.outer_dst = ct.backend_addr;
        x.inner_src = ct.backend_addr;
        x.inner_sport = ct.backend_port;
        if ct.flags & CT_F_SNAT != 0 {
            let Some(a) = snat_addr(pkt.key.family) else {
                count(Counter::NotService);
                return Err(XDP_PASS);
            };
            x.inner_dst = a.addr;
            x.inner_dport = ct.snat_port;
        }
    } else {
        count(Counter::NotService);
        return Err(XDP_PASS);
    }
    if !icmp_rewrite(ctx, pkt, &x) {
        return Err(XDP_PASS);
    }
    count(Counter::IcmpTranslated);
    Ok(())
}

/// Reads the outer addresses into `x.outer_src`/`x.outer_dst`.
#[inline(always)]
fn outer_addrs<C: Frame>(ctx: &C, pkt: &Packet, x: &mut IcmpXlate) -> bool {
    if pkt.key.family == FAMILY_V4 {
        let Ok(ip) = ptr_at::<Ipv4Hdr, _>(ctx, ETH_LEN) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &*ip };
        x.outer_src[..4].copy_from_slice(&ip.src);
        x.outer_dst[..4].copy_from_slice(&ip.dst);
    } else {
        let Ok(ip) = ptr_at::<Ipv6Hdr, _>(ctx, ETH_LEN) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &*ip };
        x.outer_src = ip.src;
        x.outer_dst = ip.dst;
    }
    true
}

/// Writes an ICMP error's translation with incremental checksum updates:
/// the outer IPv4 header checksum, the quoted IPv4 header's checksum, and
/// the ICMP checksum over everything quoted (ICMPv6: also the outer
/// addresses of its pseudo-header). ICMP is never sent with a partial
/// checksum, so the same arithmetic serves both hooks. The quoted L4
/// checksum is left alone, as receivers of ICMP errors do not check it.
#[inline(always)]
fn icmp_rewrite<C: Frame>(ctx: &C, pkt: &Packet, x: &IcmpXlate) -> bool {
    let Ok(icmp) = ptr_at::<[u8; 4], _>(ctx, pkt.l4_off) else {
        return false;
    };
    // SAFETY: bounds-checked by ptr_at.
    let mut ic = CsumDelta::new(unsafe { [(*icmp)[2], (*icmp)[3]] });
    // The header pointers are checked here and handed down: a subprogram
    // given the context only for its two packet pointers gets them as
    // plain values (LLVM promotes the argument), which the verifier
    // refuses.
    if pkt.key.family == FAMILY_V4 {
        let (Ok(ip), Ok(iip)) = (
            ptr_at::<Ipv4Hdr, _>(ctx, ETH_LEN),
            ptr_at::<Ipv4Hdr, _>(ctx, pkt.l4_off + 8),
        ) else {
            return false;
        };
        icmp_addrs_v4(ip, iip, pkt, x, &mut ic);
    } else {
        let (Ok(ip), Ok(iip)) = (
            ptr_at::<Ipv6Hdr, _>(ctx, ETH_LEN),
            ptr_at::<Ipv6Hdr, _>(ctx, pkt.l4_off + 8),
        ) else {
            return false;
        };
        icmp_addrs_v6(ip, iip, pkt, x, &mut ic);
    }
    let ports_off = pkt.l4_off
        + 8
        + if pkt.key.family == FAMILY_V4 {
            IPV4_LEN
        } else {
            IPV6_LEN
        };
    let Ok(ports) = ptr_at::<L4Ports, _>(ctx, ports_off) else {
        return false;
    };
    // SAFETY: bounds-checked by ptr_at.
    let ports = unsafe { &mut *ports };
    ic.word(u16::from_be(pkt.key.sport), u16::from_be(x.inner_sport));
    ic.word(u16::from_be(pkt.key.dport), u16::from_be(x.inner_dport));
    ports.sport = x.inner_sport.to_ne_bytes();
    ports.dport = x.inner_dport.to_ne_bytes();
    let Ok(icmp) = ptr_at::<[u8; 4], _>(ctx, pkt.l4_off) else {
        return false;
    };
    let c = ic.finish();
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        (*icmp)[2] = c[0];
        (*icmp)[3] = c[1];
    }
    true
}

/// `icmp_rewrite`'s addresses, IPv4: the outer header and its checksum,
/// the quoted header and its checksum, and their share of the ICMP
/// checksum (`ic`).
#[inline(never)]
fn icmp_addrs_v4(
    ip: *mut Ipv4Hdr,
    iip: *mut Ipv4Hdr,
    pkt: &Packet,
    x: &IcmpXlate,
    ic: &mut CsumDelta,
) {
    // SAFETY: bounds-checked by the caller (ptr_at).
    let (ip, iip) = unsafe { (&mut *ip, &mut *iip) };
    let w = |a: &[u8], i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
    let mut l3 = CsumDelta::new(ip.check);
    l3.word(w(&ip.src, 0), w(&x.outer_src, 0));
    l3.word(w(&ip.src, 2), w(&x.outer_src, 2));
    l3.word(w(&ip.dst, 0), w(&x.outer_dst, 0));
    l3.word(w(&ip.dst, 2), w(&x.outer_dst, 2));
    ip.check = l3.finish();
    ip.src = [
        x.outer_src[0],
        x.outer_src[1],
        x.outer_src[2],
        x.outer_src[3],
    ];
    ip.dst = [
        x.outer_dst[0],
        x.outer_dst[1],
        x.outer_dst[2],
        x.outer_dst[3],
    ];
    let old_check = iip.check;
    let mut il3 = CsumDelta::new(old_check);
    il3.bytes4(&pkt.key.src, &x.inner_src);
    il3.bytes4(&pkt.key.dst, &x.inner_dst);
    let new_check = il3.finish();
    ic.bytes4(&pkt.key.src, &x.inner_src);
    ic.bytes4(&pkt.key.dst, &x.inner_dst);
    ic.word(u16::from_be_bytes(old_check), u16::from_be_bytes(new_check));
    iip.check = new_check;
    iip.src = [
        x.inner_src[0],
        x.inner_src[1],
        x.inner_src[2],
        x.inner_src[3],
    ];
    iip.dst = [
        x.inner_dst[0],
        x.inner_dst[1],
        x.inner_dst[2],
        x.inner_dst[3],
    ];
}

/// `icmp_rewrite`'s addresses, IPv6: outer (they are in the ICMPv6
/// pseudo-header) and quoted, with their share of the ICMP checksum.
#[inline(never)]
fn icmp_addrs_v6(
    ip: *mut Ipv6Hdr,
    iip: *mut Ipv6Hdr,
    _pkt: &Packet,
    x: &IcmpXlate,
    ic: &mut CsumDelta,
) {
    // SAFETY: bounds-checked by the caller (ptr_at).
    unsafe {
        swap_addr16(&mut (*ip).src, &x.outer_src, ic);
        swap_addr16(&mut (*ip).dst, &x.outer_dst, ic);
        swap_addr16(&mut (*iip).src, &x.inner_src, ic);
        swap_addr16(&mut (*iip).dst, &x.inner_dst, ic);
    }
}

/// Replaces the 16-byte address at `at` (in the packet) with `new`,
/// recording the change in `ic`, a word per call of `swap_word`: unrolled
/// in one frame, the loop spills registers into a stack frame the older
/// verifiers' 512-byte budget (over the whole call chain) cannot spare.
#[inline(never)]
fn swap_addr16(at: &mut [u8; 16], new: &[u8; 16], ic: &mut CsumDelta) {
    let (at, new) = (at.as_mut_ptr(), new.as_ptr());
    let mut i = 0;
    while i < 16 {
        // SAFETY: i + 1 < 16: within both 16-byte arrays.
        unsafe { swap_word(at.add(i), new.add(i), ic) };
        i += 2;
    }
}

/// One 16-bit word of `swap_addr16`.
///
/// # Safety
/// `at` and `new` point to two readable bytes each, `at` writable.
#[inline(never)]
unsafe fn swap_word(at: *mut u8, new: *const u8, ic: &mut CsumDelta) {
    // SAFETY: per the contract.
    unsafe {
        ic.word(
            u16::from_be_bytes([*at, *at.add(1)]),
            u16::from_be_bytes([*new, *new.add(1)]),
        );
        *at = *new;
        *at.add(1) = *new.add(1);
    }
}

/// Whether the packet's destination is one of the VIPs (`MLB_VIP_V1`).
#[inline(never)]
fn is_vip(pkt: &Packet) -> bool {
    let ak = AddrKey {
        addr: pkt.key.dst,
        family: pkt.key.family,
        _pad: [0; 3],
    };
    MLB_VIP_V1.get_ptr(&ak).is_some()
}

/// A client packet to a frontend: picks (or recalls) its backend and
/// translates the packet in place. `Err(action)`: leave it with that
/// verdict (no backend: pass untouched; no SNAT port: drop).
///
/// Each of the paths below `process` is its own subprogram so that their
/// stack frames are not all live at once (BPF allows 512 bytes in all).
#[inline(never)]
fn client_path<C: Frame>(ctx: &C, pkt: &Packet, service_id: u32) -> Result<(), u32> {
    let mut ct = CtEntry::default();
    let new = match pick_backend(pkt, service_id, &mut ct) {
        Ok(new) => new,
        Err(reset::RESET) => return Err(reset::reply(ctx, pkt)),
        Err(v) => return Err(v),
    };
    if ct.flags & CT_F_UNTRACKED != 0 && (ct.flags & CT_F_SNAT != 0 || C::LOCAL_SENDERS) {
        // Untracked, it would need SNAT or hairpin state it may not make.
        count(Counter::NoFlow);
        return Err(XDP_DROP);
    }
    if new {
        if C::LOCAL_SENDERS && ct.flags & CT_F_SNAT == 0 {
            // A local client and a local backend: without a source
            // translation the backend would answer the client directly
            // (same bridge), from its own address.
            ct.flags |= CT_F_SNAT | CT_F_HAIRPIN;
            count(Counter::Hairpin);
        }
        if ct.flags & CT_F_SNAT != 0 {
            ct.snat_port = snat_alloc(pkt, &ct)?;
        }
        record_flow(pkt, &ct);
    }
    let mut src = [0u8; 16];
    if ct.flags & CT_F_SNAT != 0 && !snat_source(pkt, ct.flags, &mut src) {
        return Err(XDP_DROP);
    }
    // Only an established flow's reply half is healed: an embryonic one's
    // lives in the embryonic tables (never healed into the main ones).
    if !new && ct.flags & (CT_F_UNTRACKED | CT_F_EST) == CT_F_EST && !heal_reply(pkt, &ct, &src) {
        return Err(XDP_DROP);
    }
    translate(ctx, pkt, &ct.backend_addr, ct.backend_port, false)?;
    if ct.flags & CT_F_SNAT != 0 {
        translate(ctx, pkt, &src, ct.snat_port, true)?;
    }
    Ok(())
}

/// The source address a translated flow gets: the node's SNAT address
/// (remote backend), or the address of the interface the packet came in
/// on (hairpin). `false` (counted): there is none, drop.
#[inline(never)]
fn snat_source(pkt: &Packet, ct_flags: u16, out: &mut [u8; 16]) -> bool {
    if ct_flags & CT_F_HAIRPIN != 0 {
        let k = IfAddrKey {
            ifindex: pkt.ifindex,
            family: pkt.key.family,
            _pad: [0; 3],
        };
        // SAFETY: hash map value, copied out at once.
        return match unsafe { MLB_IFADDR_V1.get(&k) } {
            Some(a) => {
                *out = *a;
                true
            }
            None => {
                count(Counter::HairpinNoAddr);
                false
            }
        };
    }
    match snat_addr(pkt.key.family) {
        Some(a) => {
            *out = a.addr;
            true
        }
        None => {
            count(Counter::SnatNoAddr);
            false
        }
    }
}

/// A reply of a local (not source-translated) flow: source back to the
/// frontend. `Ok(false)`: not one.
#[inline(never)]
fn rnat_reply<C: Frame>(ctx: &C, pkt: &Packet) -> Result<bool, u32> {
    // SAFETY: LRU map values, copied out at once. An embryonic flow's
    // replies are any kind of segment: its SYN-ACK, and a bare ACK or RST
    // from a backend that still holds the client's previous connection on
    // the same tuple in TIME_WAIT (the client reused its port towards
    // another frontend): translated, the client's RST ends that
    // TIME_WAIT; untranslated, it never reaches the backend and the
    // connect times out.
    let Some(r) = (unsafe { MLB_RNAT_V1.get(&pkt.key) })
        .or_else(|| unsafe { MLB_RNATSYN_V1.get(&pkt.key) })
        .copied()
    else {
        return Ok(false);
    };
    let client = FlowKey {
        src: pkt.key.dst,
        dst: r.frontend_addr,
        sport: pkt.key.dport,
        dport: r.frontend_port,
        ..pkt.key
    };
    reply_seen(pkt, &client, r.service_id, r.backend_id);
    translate(ctx, pkt, &r.frontend_addr, r.frontend_port, true)?;
    Ok(true)
}

/// A reply of a source-translated flow: source back to the frontend,
/// destination back to the client; refreshes the flow's last-seen time.
/// `Ok(false)`: not one.
#[inline(never)]
fn snat_reply<C: Frame>(ctx: &C, pkt: &Packet) -> Result<bool, u32> {
    let Some(p) = MLB_SNAT_V1.get_ptr_mut(&pkt.key) else {
        return Ok(false);
    };
    // SAFETY: LRU map value; a racing refresh of last_seen is harmless.
    // A SYN-ACK leaves the port's age alone: an embryonic flow's port goes
    // back to the pool counted from when it was taken (`try_port`).
    let e = unsafe {
        let now = bpf_ktime_get_ns();
        if pkt.tcp_flags & TCP_SYN == 0 && now.saturating_sub((*p).last_seen) > SNAT_TOUCH_NS {
            (*p).last_seen = now;
        }
        *p
    };
    let client = FlowKey {
        src: e.client_addr,
        dst: e.frontend_addr,
        sport: e.client_port,
        dport: e.frontend_port,
        ..pkt.key
    };
    reply_seen(pkt, &client, e.service_id, e.backend_id);
    translate(ctx, pkt, &e.frontend_addr, e.frontend_port, true)?;
    translate(ctx, pkt, &e.client_addr, e.client_port, false)?;
    Ok(true)
}

/// `CtEntry::flags` of a packet forwarded without state (`pick_backend`);
/// never stored.
const CT_F_UNTRACKED: u16 = 0x8000;

/// `lookup_frontend`: no frontend.
const FE_NONE: u8 = 0;
/// `lookup_frontend`: a VIP (exact address) frontend.
const FE_VIP: u8 = 1;
/// `lookup_frontend`: a node port on one of this node's addresses.
const FE_NODE_PORT: u8 = 2;

/// Finds the frontend of a packet: exact (VIP) first, then node port when
/// the destination is one of this node's addresses. Returns `FE_*`.
#[inline(never)]
fn lookup_frontend(pkt: &Packet, out: &mut FrontendValue) -> u8 {
    let mut fk = FrontendKey {
        addr: pkt.key.dst,
        port: pkt.key.dport,
        proto: pkt.key.proto,
        family: pkt.key.family,
    };
    // SAFETY: hash map value, copied out at once.
    if let Some(v) = unsafe { MLB_FE_V1.get(&fk) } {
        *out = *v;
        return FE_VIP;
    }
    let ak = AddrKey {
        addr: pkt.key.dst,
        family: pkt.key.family,
        _pad: [0; 3],
    };
    if MLB_LOCAL_V1.get_ptr(&ak).is_none() {
        return FE_NONE;
    }
    fk.addr = [0; 16];
    // SAFETY: as above.
    match unsafe { MLB_FE_V1.get(&fk) } {
        Some(v) => {
            *out = *v;
            FE_NODE_PORT
        }
        None => FE_NONE,
    }
}

/// A direct TCP SYN (client -> backend, not via a frontend): drop any
/// reply entry left for the same tuple by an earlier load-balanced flow
/// that is closing or gone. A live flow's stays: a SYN forged with its
/// tuple must not take its replies away.
#[inline(never)]
fn forget_reply(pkt: &Packet) {
    let reply = FlowKey {
        src: pkt.key.dst,
        dst: pkt.key.src,
        sport: pkt.key.dport,
        dport: pkt.key.sport,
        ..pkt.key
    };
    // SAFETY: LRU map value, copied out at once.
    let Some(r) = (unsafe { MLB_RNAT_V1.get(&reply) }).copied() else {
        return;
    };
    let client = FlowKey {
        dst: r.frontend_addr,
        dport: r.frontend_port,
        ..pkt.key
    };
    // SAFETY: as above.
    if let Some(ct) = unsafe { MLB_CT_V2.get(&client) } {
        if ct.flags & CT_F_CLOSING == 0 && !ct.expired(clock_now(), PROTO_TCP, &flow_cfg()) {
            return;
        }
    }
    let _ = MLB_RNAT_V1.remove(&reply);
}

#[inline(always)]
fn closing_flags(tcp_flags: u8, from_client: bool) -> u16 {
    let mut f = 0;
    if tcp_flags & TCP_RST != 0 {
        f |= if from_client {
            CT_F_RST | CT_F_RST_CLIENT
        } else {
            CT_F_RST
        };
    }
    if tcp_flags & TCP_FIN != 0 {
        f |= if from_client {
            CT_F_FIN_CLIENT
        } else {
            CT_F_FIN_BACKEND
        };
    }
    f
}

/// The backend of a client packet: conntrack when the flow is known (and
/// not a SYN reusing a closed tuple), else Maglev. `Ok(true)`: a new flow,
/// which the caller records (`record_flow`) once it has its SNAT port.
/// `Err(XDP_DROP)`: no usable backend (counted).
///
/// Only packets that open flows create state: a TCP packet of no known
/// flow that is not a SYN gets its Maglev backend untracked
/// (`Ok(false)`, `CT_F_UNTRACKED`); the caller forwards it when that
/// backend is local and the sender is not, and drops it otherwise (it
/// would need SNAT state: `no_flow`). A flood of ACKs with random sources
/// then leaves no trace in the tables.
#[inline(never)]
fn pick_backend(pkt: &Packet, service_id: u32, out: &mut CtEntry) -> Result<bool, u32> {
    let mut flags = closing_flags(pkt.tcp_flags, true);
    let tcp = pkt.key.proto == PROTO_TCP;
    // Established: TCP by the handshake's ACK, UDP by a second datagram
    // (a new flow's entry never has it).
    if !tcp || pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_ACK {
        flags |= CT_F_EST;
    }
    let mut hit = false;
    if let Some(ct) = MLB_CT_V2.get_ptr_mut(&pkt.key) {
        // SAFETY: LRU map value; a concurrent update of `flags` only loses
        // a flag bit, which the next FIN/RST sets again.
        let ct = unsafe { &mut *ct };
        let state = ct_live(ct, pkt);
        if state == CT_RESET {
            // Its backend was removed: the client learns at once.
            forget_flow(pkt, ct);
            let _ = MLB_CT_V2.remove(&pkt.key);
            return Err(reset::RESET);
        }
        let live = state == CT_LIVE;
        let moved = live && !tcp && !serves(ct);
        if live && !moved && !(is_syn(pkt) && ct.flags & CT_F_CLOSING != 0) {
            if flags & !ct.flags != 0 {
                ct.flags |= flags;
            }
            *out = *ct;
            hit = true;
        } else {
            // The tuple's previous flow is over (or, UDP, its backend went
            // down or away: the flow moves): forget its replies.
            // In place, not copied (this frame is on the deepest call chain).
            forget_flow(pkt, ct);
            let _ = MLB_CT_V2.remove(&pkt.key);
            if moved {
                count(Counter::Rebalanced);
            }
        }
    } else {
        let e = embryonic(pkt, flags, out);
        if e == EMB_PROMOTE {
            // From here, not from `embryonic`: the deepest chain.
            promote(pkt, out);
        }
        hit = e != EMB_NONE;
    }
    // One exit for every known flow: the verifier walks what follows
    // (in the caller) once, not once per way of finding the flow.
    if hit {
        account(out.service_id, out.backend_id, pkt.len, false, false);
        return Ok(false);
    }
    let stateless = tcp && !is_syn(pkt);

    // No usable backend: drop. Passed on, a packet to a VIP would follow
    // the default route.
    match MLB_SVC_V1.get(service_id) {
        Some(s) if s.flags & SVC_F_PRESENT != 0 && s.active_backends > 0 => {}
        _ => {
            count(Counter::NoBackend);
            return Err(XDP_DROP);
        }
    }
    // Affinity first (not for a stateless packet), else the ring.
    let mut backend_id = if stateless {
        NO_BACKEND
    } else {
        affinity_backend(pkt, service_id)
    };
    if backend_id == NO_BACKEND {
        backend_id = maglev_backend(pkt, service_id);
        if !stateless {
            remember_affinity(pkt, service_id, backend_id);
        }
    }
    if backend_id == NO_BACKEND {
        count(Counter::NoBackend);
        return Err(XDP_DROP);
    }
    let be = match MLB_BE_V1.get(backend_id) {
        Some(b) if b.flags & BE_F_PRESENT != 0 && b.family == pkt.key.family => b,
        _ => {
            count(Counter::NoBackend);
            return Err(XDP_DROP);
        }
    };
    // Field by field (`out` starts zeroed): a struct literal would be
    // built in this frame first, on the deepest call chain.
    out.backend_addr = be.addr;
    out.backend_port = be.port;
    out.flags = (flags & !CT_F_EST)
        | if be.flags & BE_F_SNAT != 0 {
            CT_F_SNAT
        } else {
            0
        };
    out.backend_id = backend_id;
    out.service_id = service_id;
    out.last_seen = clock_now();
    if stateless {
        // The caller drops it if it needs SNAT or a hairpin (`no_flow`).
        out.flags |= CT_F_UNTRACKED;
        if out.flags & CT_F_SNAT == 0 {
            count(Counter::Stateless);
            account(service_id, backend_id, pkt.len, false, false);
        }
        return Ok(false);
    }
    Ok(true)
}

/// `embryonic`: no embryonic flow.
const EMB_NONE: u8 = 0;
/// `embryonic`: one, which stays embryonic.
const EMB_HIT: u8 = 1;
/// `embryonic`: one this packet establishes: to be promoted.
const EMB_PROMOTE: u8 = 2;

/// A packet of an embryonic flow (`MLB_CTSYN_V1`, younger than its
/// closing or UDP timeout): its entry in `out`, and `EMB_*`. One that
/// establishes it (`flags` has `CT_F_EST`: TCP's handshake ACK, UDP's
/// second datagram) is to be moved to the main tables (`promote`); another
/// (a SYN retransmit) leaves it embryonic (not established: no reply half
/// is healed into the main tables for it).
#[inline(never)]
fn embryonic(pkt: &Packet, flags: u16, out: &mut CtEntry) -> u8 {
    let Some(e) = MLB_CTSYN_V1.get_ptr(&pkt.key) else {
        return EMB_NONE;
    };
    let Some(cfg) = MLB_FLOWCFG_V1.get(0) else {
        return EMB_NONE;
    };
    let limit = if pkt.key.proto == PROTO_TCP {
        cfg.tcp_closing()
    } else {
        cfg.udp()
    };
    let now = clock_now();
    // SAFETY: LRU map value; read, then copied out only when it is used
    // (every miss leaves `out` as it was: one state for the verifier).
    if idle_past(now, unsafe { (*e).last_seen }, limit) {
        return EMB_NONE;
    }
    // SAFETY: as above.
    *out = unsafe { *e };
    if flags & CT_F_EST == 0 {
        return EMB_HIT;
    }
    out.flags |= flags;
    out.last_seen = now;
    EMB_PROMOTE
}

/// Moves an established flow from the embryonic tables to the main ones.
#[inline(never)]
fn promote(pkt: &Packet, ct: &CtEntry) {
    let _ = MLB_CT_V2.insert(&pkt.key, ct, 0);
    if ct.flags & CT_F_SNAT == 0 {
        let (key, rnat) = rnat_of(pkt, ct);
        let _ = MLB_RNAT_V1.insert(&key, &rnat, 0);
        let _ = MLB_RNATSYN_V1.remove(&key);
    }
    let _ = MLB_CTSYN_V1.remove(&pkt.key);
    count(Counter::Promoted);
}

/// `ct_live`: the flow goes on.
const CT_LIVE: u8 = 0;
/// `ct_live`: idle past its timeout, to be treated as absent.
const CT_EXPIRED: u8 = 1;
/// `ct_live`: a TCP flow whose backend was removed, to be reset.
const CT_RESET: u8 = 2;

/// The state of a known flow at this packet (`CT_*`), refreshing its
/// last-seen time (at most once a tick) when it goes on. A RST from the
/// client's side followed by more of the client's traffic was forged (or
/// lost): the flow is live, not closing (counted).
#[inline(never)]
fn ct_live(ct: &mut CtEntry, pkt: &Packet) -> u8 {
    let now = clock_now();
    if ct.expired(now, pkt.key.proto, &flow_cfg()) {
        count(Counter::Expired);
        return CT_EXPIRED;
    }
    if pkt.key.proto == PROTO_TCP && pkt.tcp_flags & TCP_RST == 0 && !still_listed(ct) {
        // A SYN opens a new flow on the tuple (its client reused the
        // port): it is balanced afresh, never reset.
        if pkt.tcp_flags & TCP_SYN != 0 {
            return CT_EXPIRED;
        }
        return CT_RESET;
    }
    if ct.last_seen != now {
        ct.last_seen = now;
    }
    if ct.flags & CT_F_RST_CLIENT != 0 && pkt.tcp_flags & (TCP_RST | TCP_SYN) == 0 {
        ct.flags &= !(CT_F_RST | CT_F_RST_CLIENT);
        count(Counter::RstIgnored);
    }
    CT_LIVE
}

/// Whether a flow's backend is still in its slot (maybe down or
/// draining): a TCP flow whose backend was removed is reset.
#[inline(always)]
fn still_listed(ct: &CtEntry) -> bool {
    matches!(MLB_BE_V1.get(ct.backend_id), Some(b) if b.flags & BE_F_PRESENT != 0
        && b.port == ct.backend_port
        && b.addr == ct.backend_addr)
}

/// Whether a flow's backend still serves it: the slot holds the same
/// address and port, present and not down (a draining backend keeps its
/// flows).
#[inline(always)]
fn serves(ct: &CtEntry) -> bool {
    matches!(MLB_BE_V1.get(ct.backend_id), Some(b) if b.flags & BE_F_PRESENT != 0
        && b.flags & BE_F_DOWN == 0
        && b.port == ct.backend_port
        && b.addr == ct.backend_addr)
}

/// The backend of a new flow with client-IP session affinity (a non-zero
/// timeout in `MLB_SVCAFF_V1`): the client address's entry when it is
/// fresh and names a backend of this service that still takes new flows
/// (refreshed on use). `NO_BACKEND`: none (no affinity, or no usable
/// entry: the caller asks the ring, then `remember_affinity`). Its own
/// subprogram beside `maglev_backend`, not above it: the deepest call
/// chain stays within older verifiers' stack budget.
#[inline(never)]
fn affinity_backend(pkt: &Packet, service_id: u32) -> u32 {
    let timeout = MLB_SVCAFF_V1.get(service_id).copied().unwrap_or(0);
    if timeout == 0 {
        return NO_BACKEND;
    }
    let key = AffinityKey {
        service_id,
        family: pkt.key.family,
        _pad: [0; 3],
        addr: pkt.key.src,
    };
    // SAFETY: bpf_ktime_get_boot_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if let Some(e) = MLB_AFF_V1.get_ptr_mut(&key) {
        // SAFETY: LRU map value; a racing refresh of last_used is harmless.
        let e = unsafe { &mut *e };
        if e.fresh(now, timeout) && takes_new_flows(e.backend_id, service_id, pkt.key.family) {
            e.last_used = now;
            count(Counter::AffinityHit);
            return e.backend_id;
        }
    }
    NO_BACKEND
}

/// Makes `backend_id` (the ring's answer) the client address's affinity
/// entry, when the service has affinity.
#[inline(never)]
fn remember_affinity(pkt: &Packet, service_id: u32, backend_id: u32) {
    if backend_id == NO_BACKEND || MLB_SVCAFF_V1.get(service_id).copied().unwrap_or(0) == 0 {
        return;
    }
    let key = AffinityKey {
        service_id,
        family: pkt.key.family,
        _pad: [0; 3],
        addr: pkt.key.src,
    };
    let entry = AffinityEntry {
        backend_id,
        _pad: 0,
        // SAFETY: bpf_ktime_get_boot_ns has no preconditions.
        last_used: unsafe { bpf_ktime_get_boot_ns() },
    };
    let _ = MLB_AFF_V1.insert(&key, &entry, 0);
}

/// The Maglev ring's backend for a flow (`NO_BACKEND`: none). One lookup
/// of the service's ring, one read of its header: size, half and slot
/// come from the same ring, however often userspace swaps or flips it.
#[inline(never)]
fn maglev_backend(pkt: &Packet, service_id: u32) -> u32 {
    let Some((ring, header)) = MLB_RING_V1.ring(service_id) else {
        return NO_BACKEND;
    };
    let m = header & !RING_HALF;
    if m == 0 {
        return NO_BACKEND;
    }
    RingsDef::backend(ring, header, flow_slot(&pkt.key, m)).unwrap_or(NO_BACKEND)
}

/// Whether backend `id` is in use by `service_id`, of the flow's family,
/// and neither down nor draining.
#[inline(always)]
fn takes_new_flows(id: u32, service_id: u32, family: u8) -> bool {
    matches!(MLB_BE_V1.get(id), Some(b) if b.flags & BE_F_PRESENT != 0
        && b.flags & (BE_F_DOWN | BE_F_DRAINING) == 0
        && b.service_id == service_id
        && b.family == family)
}

/// Records a new flow in the embryonic tables (`embryonic` moves it to
/// the main ones once established): its conntrack entry, and for a flow
/// that is not source-translated the reverse-NAT entry of its replies (a
/// translated one's is its SNAT entry, written when the port was taken).
#[inline(never)]
fn record_flow(pkt: &Packet, ct: &CtEntry) {
    let mut ok = MLB_CTSYN_V1.insert(&pkt.key, ct, 0).is_ok();
    if ct.flags & CT_F_SNAT == 0 {
        let (key, rnat) = rnat_of(pkt, ct);
        ok &= MLB_RNATSYN_V1.insert(&key, &rnat, 0).is_ok();
        // A main entry for the same reply tuple is an earlier flow's (the
        // client reused its port, e.g. towards another frontend of the
        // same backend): looked up first, it would translate this flow's
        // replies to that frontend.
        let _ = MLB_RNAT_V1.remove(&key);
    }
    if let Some(w) = MLB_RATE_V1.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        let w = unsafe { &mut *w };
        // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
        let now = RateWindow::window_of(unsafe { bpf_ktime_get_coarse_ns() });
        if w.window != now {
            w.window = now;
            w.count = 0;
        }
        w.count += 1;
    }
    // On failure forward anyway: Maglev gives the same answer next time.
    count(if ok {
        Counter::NewFlow
    } else {
        Counter::CtFull
    });
    account(ct.service_id, ct.backend_id, pkt.len, false, true);
}

/// The reverse-NAT entry of a flow that is not source-translated, and its
/// key (the reply tuple).
#[inline(always)]
fn rnat_of(pkt: &Packet, ct: &CtEntry) -> (FlowKey, RnatEntry) {
    let key = FlowKey {
        src: ct.backend_addr,
        dst: pkt.key.src,
        sport: ct.backend_port,
        dport: pkt.key.sport,
        ..pkt.key
    };
    let rnat = RnatEntry {
        frontend_addr: pkt.key.dst,
        frontend_port: pkt.key.dport,
        flags: 0,
        backend_id: ct.backend_id,
        service_id: ct.service_id,
        _pad: 0,
    };
    (key, rnat)
}

/// A known flow's reply half, re-created when an LRU eviction took it and
/// its conntrack half survived (a flood churns both tables): the
/// reverse-NAT entry of a local flow, or the SNAT entry of a translated
/// one — the latter only while its port is still free (a port whose
/// owner is gone may belong to another flow by now, which is never
/// overwritten). `snat_src`: the flow's SNAT source address.
#[inline(never)]
fn heal_reply(pkt: &Packet, ct: &CtEntry, snat_src: &[u8; 16]) -> bool {
    if ct.flags & CT_F_SNAT == 0 {
        let (key, rnat) = rnat_of(pkt, ct);
        if MLB_RNAT_V1.get_ptr(&key).is_none()
            && MLB_RNAT_V1.insert(&key, &rnat, BPF_NOEXIST as u64).is_ok()
        {
            count(Counter::Healed);
        }
        return true;
    }
    let key = FlowKey {
        src: ct.backend_addr,
        dst: *snat_src,
        sport: ct.backend_port,
        dport: ct.snat_port,
        ..pkt.key
    };
    if let Some(e) = MLB_SNAT_V1.get_ptr_mut(&key) {
        // SAFETY: LRU map value; flags only ever gain this bit.
        let e = unsafe { &mut *e };
        if e.client_port != pkt.key.sport || !eq16(&e.client_addr, &pkt.key.src) {
            // The port went to another flow (this one's entry was lost):
            // never send on it.
            count(Counter::PortLost);
            return false;
        }
        if ct.flags & CT_F_EST != 0 && e.flags & SNAT_E_EST == 0 {
            e.flags |= SNAT_E_EST;
        }
        return true;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let entry = snat_entry_of(pkt, ct, unsafe { bpf_ktime_get_ns() });
    if MLB_SNAT_V1.insert(&key, &entry, BPF_NOEXIST as u64).is_ok() {
        count(Counter::Healed);
        return true;
    }
    false
}

/// The SNAT entry of a translated flow `ct` (where its replies go back
/// to), taken or last seen at `now`.
#[inline(always)]
fn snat_entry_of(pkt: &Packet, ct: &CtEntry, now: u64) -> SnatEntry {
    SnatEntry {
        client_addr: pkt.key.src,
        frontend_addr: pkt.key.dst,
        client_port: pkt.key.sport,
        frontend_port: pkt.key.dport,
        flags: 0,
        backend_id: ct.backend_id,
        service_id: ct.service_id,
        last_seen: now,
    }
}

/// Removes the reply-side state of a finished flow (`old`, the conntrack
/// entry of the tuple `pkt` reuses): its reverse-NAT entry. A translated
/// flow's SNAT entry stays: its port is quarantined (`try_port`; the same
/// client tuple may take it again at once).
#[inline(never)]
fn forget_flow(pkt: &Packet, old: &CtEntry) {
    if old.flags & CT_F_SNAT != 0 {
        return;
    }
    let key = FlowKey {
        src: old.backend_addr,
        dst: pkt.key.src,
        sport: old.backend_port,
        dport: pkt.key.sport,
        ..pkt.key
    };
    let _ = MLB_RNAT_V1.remove(&key);
}

/// This node's SNAT address and port range for a family.
#[inline(always)]
fn snat_addr(family: u8) -> Option<&'static SnatAddr> {
    let idx = if family == FAMILY_V4 {
        SNAT_IDX_V4
    } else {
        SNAT_IDX_V6
    };
    MLB_SNATADR_V1
        .get(idx)
        .filter(|a| a.flags & SNAT_F_PRESENT != 0 && a.usable() > 0)
}

/// Takes a SNAT port for a new flow `ct` to a remote backend: the
/// client's own port when it is usable, else its one-to-one fold into the
/// usable ports (`SnatAddr::candidate`), then `SNAT_TRIES - 1` steps of
/// the client tuple's walk (`SnatAddr::walk`); each with an atomic
/// insert-if-absent of the reply tuple.
#[inline(never)]
fn snat_alloc(pkt: &Packet, ct: &CtEntry) -> Result<u16, u32> {
    // The port range is the node's (hairpin flows share it).
    let Some(a) = snat_addr(pkt.key.family) else {
        count(Counter::SnatNoAddr);
        return Err(XDP_DROP);
    };
    let mut key = FlowKey {
        src: ct.backend_addr,
        dst: [0; 16],
        sport: ct.backend_port,
        dport: 0,
        ..pkt.key
    };
    // Straight into the key: this frame is on the deepest call chain.
    if !snat_source(pkt, ct.flags, &mut key.dst) {
        return Err(XDP_DROP);
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let entry = snat_entry_of(pkt, ct, now);
    // The client's own port first; taken, the walk seeded by the client's
    // address and port. One value live across the calls: this frame is on
    // the deepest call chain.
    key.dport = a.candidate(u16::from_be(pkt.key.sport), 0).to_be();
    if try_port(&key, &entry) {
        return Ok(key.dport);
    }
    let seed = walk_seed(u16::from_be(pkt.key.sport), &pkt.key.src);
    for i in 0..SNAT_TRIES - 1 {
        key.dport = a.walk(seed, i).to_be();
        if try_port(&key, &entry) {
            return Ok(key.dport);
        }
    }
    count(Counter::SnatExhausted);
    Err(XDP_DROP)
}

/// Takes the port in `key.dport` for `entry` if it is free, if it was
/// this very client tuple's (re-opened), or if the flow holding it may
/// lose it (its conntrack entry then goes too). An embryonic flow
/// (neither side saw it established) lets go `SNAT_EMBRYONIC_NS` after it
/// was taken; a live one after its idle timeout; a closed one, or one
/// whose conntrack entry is gone (evicted, expired: counted), after the
/// quarantine.
///
/// The old entry, the owner's and the timeouts are read in place, not
/// copied: this is the deepest frame of the deepest call chain.
#[inline(never)]
fn try_port(key: &FlowKey, entry: &SnatEntry) -> bool {
    // The new entry's time is now (one less value kept live by the caller).
    let now = entry.last_seen;
    if MLB_SNAT_V1.insert(key, entry, BPF_NOEXIST as u64).is_ok() {
        count(Counter::SnatNew);
        return true;
    }
    let Some(old) = MLB_SNAT_V1.get_ptr(key) else {
        return false;
    };
    // SAFETY: LRU map value, read in place (a racing update can only make
    // the decision as stale as a copy would).
    let old = unsafe { &*old };
    let client = FlowKey {
        src: old.client_addr,
        dst: old.frontend_addr,
        sport: old.client_port,
        dport: old.frontend_port,
        ..*key
    };
    if !eq16(&client.src, &entry.client_addr)
        || client.sport != entry.client_port
        || !eq16(&client.dst, &entry.frontend_addr)
        || client.dport != entry.frontend_port
    {
        let idle = now.saturating_sub(old.last_seen);
        let snat_est = old.flags & SNAT_E_EST != 0;
        // SAFETY: as above.
        let owner = MLB_CT_V2
            .get_ptr(&client)
            .map(|p| unsafe { &*p })
            .filter(|ct| {
                ct.flags & CT_F_SNAT != 0
                    && ct.snat_port == key.dport
                    && ct.backend_port == key.sport
                    && eq16(&ct.backend_addr, &key.src)
            });
        let est = snat_est || owner.is_some_and(|ct| ct.flags & CT_F_EST != 0);
        let limit = if !est {
            SNAT_EMBRYONIC_NS
        } else {
            let Some(cfg) = MLB_FLOWCFG_V1.get(0) else {
                return false;
            };
            let secs = match owner {
                None => {
                    count(Counter::Evicted);
                    cfg.snat_quarantine()
                }
                Some(ct) if ct.flags & CT_F_CLOSING != 0 => cfg.snat_quarantine(),
                Some(ct) => ct.timeout(key.proto, cfg),
            };
            u64::from(secs) * 1_000_000_000
        };
        if idle <= limit {
            return false;
        }
        if owner.is_some() {
            let _ = MLB_CT_V2.remove(&client);
        }
        // An embryonic owner that gets established later finds its port
        // taken (`heal_reply`: `port_lost`) and never sends on it.
    }
    if MLB_SNAT_V1.insert(key, entry, BPF_ANY as u64).is_err() {
        return false;
    }
    count(Counter::SnatReclaimed);
    true
}

/// Address equality without a `bcmp` call (a subprogram of its own, one
/// more frame on the deepest call chain).
#[inline(always)]
fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let w = |x: &[u8; 16], i: usize| {
        u64::from_ne_bytes([
            x[i],
            x[i + 1],
            x[i + 2],
            x[i + 3],
            x[i + 4],
            x[i + 5],
            x[i + 6],
            x[i + 7],
        ])
    };
    w(a, 0) == w(b, 0) && w(a, 8) == w(b, 8)
}

/// Bookkeeping of a reply: counters, the client flow's (`client`)
/// last-seen time (a reply keeps its flow alive too), and FIN/RST from
/// the backend marks it closing.
#[inline(never)]
fn reply_seen(pkt: &Packet, client: &FlowKey, service_id: u32, backend_id: u32) {
    let flags = closing_flags(pkt.tcp_flags, false);
    if let Some(ct) = MLB_CT_V2.get_ptr_mut(client) {
        // SAFETY: as in pick_backend.
        let ct = unsafe { &mut *ct };
        if flags & !ct.flags != 0 {
            ct.flags |= flags;
        }
        let now = clock_now();
        if ct.last_seen != now {
            ct.last_seen = now;
        }
    }
    account(service_id, backend_id, pkt.len, true, false);
}

/// `Frame::rewrite`, failing with XDP_PASS (headers out of bounds).
#[inline(always)]
fn translate<C: Frame>(
    ctx: &C,
    pkt: &Packet,
    new: &[u8; 16],
    new_port: u16,
    src_side: bool,
) -> Result<(), u32> {
    if ctx.rewrite(pkt, new, new_port, src_side) {
        Ok(())
    } else {
        Err(XDP_PASS)
    }
}

/// XDP's `Frame::rewrite`: replaces the destination (`src_side == false`)
/// or source address and port, fixing the IPv4 header checksum and the L4
/// checksum incrementally (RFC 1624). Right for complete checksums only,
/// which is what frames from the wire carry (XDP cannot see a partial
/// one; local senders are served by the TC program). The old values are
/// the parsed ones (`pkt.key`): each side is rewritten at most once per
/// packet. A subprogram, so its frame is not repeated per caller.
#[inline(never)]
pub fn rewrite_xdp(
    ctx: &aya_ebpf::programs::XdpContext,
    pkt: &Packet,
    new: &[u8; 16],
    new_port: u16,
    src_side: bool,
) -> bool {
    let (old, old_port) = if src_side {
        (&pkt.key.src, pkt.key.sport)
    } else {
        (&pkt.key.dst, pkt.key.dport)
    };
    let v4 = pkt.key.family == FAMILY_V4;
    // No L4 header (a later fragment): the addresses alone.
    let l4 = pkt.check_off != 0;
    let mut check = [0u8; 2];
    if l4 {
        let Ok(check_ptr) = ptr_at::<[u8; 2], _>(ctx, pkt.check_off) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        check = unsafe { *check_ptr };
    }
    let udp_no_csum = pkt.key.proto == PROTO_UDP && v4 && check == [0, 0];
    let mut l4c = CsumDelta::new(check);
    if v4 {
        let Ok(ip) = ptr_at::<Ipv4Hdr, _>(ctx, ETH_LEN) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let mut l3 = CsumDelta::new(ip.check);
        l3.bytes4(old, new);
        ip.check = l3.finish();
        l4c.bytes4(old, new);
        let a = [new[0], new[1], new[2], new[3]];
        if src_side {
            ip.src = a;
        } else {
            ip.dst = a;
        }
    } else {
        let Ok(ip) = ptr_at::<Ipv6Hdr, _>(ctx, ETH_LEN) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &mut *ip };
        l4c.bytes16(old, new);
        if src_side {
            ip.src = *new;
        } else {
            ip.dst = *new;
        }
    }
    if !l4 {
        return true;
    }
    l4c.word(u16::from_be(old_port), u16::from_be(new_port));
    let Ok(l4_ptr) = ptr_at::<L4Ports, _>(ctx, pkt.l4_off) else {
        return false;
    };
    // SAFETY: bounds-checked by ptr_at.
    let ports = unsafe { &mut *l4_ptr };
    if src_side {
        ports.sport = new_port.to_ne_bytes();
    } else {
        ports.dport = new_port.to_ne_bytes();
    }
    if !udp_no_csum {
        let mut c = l4c.finish();
        if pkt.key.proto == PROTO_UDP && c == [0, 0] {
            c = [0xff, 0xff];
        }
        let Ok(check_ptr) = ptr_at::<[u8; 2], _>(ctx, pkt.check_off) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        unsafe { *check_ptr = c };
    }
    true
}
