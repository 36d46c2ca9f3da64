//! The load-balancing decision and the translation: frontend match,
//! conntrack, Maglev selection, DNAT of client packets and reverse
//! translation of replies.
//!
//! Here: the entry (`process`), the frontend match and the client path
//! that ties the parts together. Split by role: `select` (which backend:
//! the known flow's, else affinity, else Maglev), `conntrack` (flow
//! entries: lookup, creation, promotion, healing, closing), `snat` (source
//! translation: the address, port allocation), `reply` (replies translated
//! back: reverse NAT of local flows, SNAT of remote ones), `rewrite`
//! (address/port/checksum rewrite), `frag` (later fragments), `icmp` (ICMP
//! errors about translated flows).
//!
//! Invariants:
//! * a packet that matches no frontend and no reply entry leaves exactly
//!   as it came (`XDP_PASS`, no byte changed);
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
//!   `TIME_WAIT`); an embryonic flow's port (no handshake ACK, or one UDP
//!   datagram) goes back after `SNAT_EMBRYONIC_NS`. The same client tuple
//!   re-opening keeps its port;
//! * no packet deletes a live flow's translations: a RST only marks the
//!   flow closing (and a client RST followed by more client traffic is
//!   ignored), a SYN on a live tuple is part of that flow.
//!
//! Stack: BPF allows 512 bytes over the whole call chain, so the decision
//! functions are separate subprograms that return to `process`, and only
//! `forward` is called below it.

mod conntrack;
mod frag;
mod icmp;
mod reply;
mod rewrite;
mod select;
mod snat;

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use meshlb_common::{
    AddrKey, Counter, CtEntry, FrontendKey, FrontendValue, CT_F_EST, CT_F_HAIRPIN, CT_F_SNAT,
    PROTO_TCP,
};

pub use self::rewrite::rewrite_xdp;
use self::{
    conntrack::{clock_now, heal_reply, record_flow},
    frag::{frag_path, record_frag_of},
    icmp::icmp_path,
    reply::{forget_reply, rnat_reply, snat_reply, REPLY_EST, REPLY_NONE},
    rewrite::translate,
    select::{pick_backend, CT_F_TICK, CT_F_UNTRACKED},
    snat::{snat_alloc, snat_source},
};
use crate::{
    frame::{Frame, Hop, HOP_BY_ADDR},
    maps::{count, MLB_FE_V1, MLB_LOCAL_V1, MLB_VIP_V1},
    parse::{parse, Packet, KIND_FRAG, KIND_ICMP_ERR, TCP_ACK, TCP_SYN},
    reset, toobig,
};

#[inline(always)]
pub(super) fn is_syn(pkt: &Packet) -> bool {
    pkt.key.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
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
        return send(ctx, &pkt, Counter::ForwardedIn, Hop::NONE);
    }
    if pkt.kind == KIND_ICMP_ERR {
        icmp_path(ctx, &pkt)?;
        return send(ctx, &pkt, Counter::ForwardedOut, Hop::NONE);
    }
    let mut fe = FrontendValue::default();
    let found = lookup_frontend(&pkt, &mut fe);
    // A SNAT port may equal a published node port: the backend's reply
    // to `node address:port` is then the flow's, not a new client's.
    if found == FE_NODE_PORT {
        let r = snat_reply(ctx, &pkt)?;
        if r != REPLY_NONE {
            if pkt.frag_first != 0 {
                record_frag_of(ctx, &pkt);
            }
            return send(ctx, &pkt, Counter::ForwardedOut, reply_hop(r));
        }
    }
    if found != FE_NONE {
        let hop = client_path(ctx, &pkt, fe.service_id)?;
        if pkt.frag_first != 0 {
            record_frag_of(ctx, &pkt);
        }
        return send(ctx, &pkt, Counter::ForwardedIn, hop);
    }
    let mut r = rnat_reply(ctx, &pkt)?;
    if r == REPLY_NONE {
        r = snat_reply(ctx, &pkt)?;
    }
    if r != REPLY_NONE {
        if pkt.frag_first != 0 {
            record_frag_of(ctx, &pkt);
        }
        return send(ctx, &pkt, Counter::ForwardedOut, reply_hop(r));
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
fn send<C: Frame>(ctx: &C, pkt: &Packet, done: Counter, hop: Hop) -> Result<u32, u32> {
    match ctx.forward(pkt, done, hop) {
        Ok(v) if v & toobig::TOO_BIG != 0 => Ok(toobig::reply(ctx, pkt, v & !toobig::TOO_BIG)),
        r => r,
    }
}

/// A translated reply's cached next hop: by its destination (a client),
/// for established flows only — the answers to a flood of spoofed flow
/// openers neither use nor churn the cache (they ask the FIB).
#[inline(always)]
fn reply_hop(kind: u8) -> Hop {
    if kind == REPLY_EST {
        Hop::new(HOP_BY_ADDR, clock_now())
    } else {
        Hop::NONE
    }
}

/// Whether the packet's destination is one of the VIPs (`MLB_VIP_V1`).
#[inline(never)]
pub(super) fn is_vip(pkt: &Packet) -> bool {
    let ak = AddrKey {
        addr: pkt.key.dst,
        family: pkt.key.family,
        _pad: [0; 3],
    };
    MLB_VIP_V1.get_ptr(&ak).is_some()
}

/// A client packet to a frontend: picks (or recalls) its backend and
/// translates the packet in place; `Ok`: the backend's cached next hop to
/// try. `Err(action)`: leave it with that verdict (no backend: pass
/// untouched; no SNAT port: drop).
///
/// Each of the paths below `process` is its own subprogram so that their
/// stack frames are not all live at once (BPF allows 512 bytes in all).
#[inline(never)]
fn client_path<C: Frame>(ctx: &C, pkt: &Packet, service_id: u32) -> Result<Hop, u32> {
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
    // lives in the embryonic tables (never healed into the main ones). A
    // translated flow's SNAT port is checked on every packet (it must
    // never send on a port another flow took); a local flow's reply half
    // only on its first packet of each flow-clock tick (about twice a
    // second, and always after an idle spell), which keeps that lookup
    // off the hit path.
    let heal = ct.flags & CT_F_SNAT != 0 || ct.flags & CT_F_TICK != 0;
    if heal
        && !new
        && ct.flags & (CT_F_UNTRACKED | CT_F_EST) == CT_F_EST
        && !heal_reply(pkt, &ct, &src)
    {
        return Err(XDP_DROP);
    }
    translate(ctx, pkt, &ct.backend_addr, ct.backend_port, false)?;
    if ct.flags & CT_F_SNAT != 0 {
        translate(ctx, pkt, &src, ct.snat_port, true)?;
    }
    Ok(Hop::new(ct.backend_id, ct.last_seen))
}

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
