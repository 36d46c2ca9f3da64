//! The load-balancing decision and the translation: frontend match,
//! conntrack, Maglev selection, DNAT of client packets and reverse
//! translation of replies.
//!
//! Invariants:
//! * a packet that matches no frontend and no reply entry leaves exactly
//!   as it came (XDP_PASS, no byte changed);
//! * an established flow keeps its backend whatever the backend set does;
//!   only a SYN on a closing/closed tuple selects afresh;
//! * a direct (non-service) TCP SYN from a client to a backend removes a
//!   stale reply entry for the same tuple, so a client that reaches a
//!   backend both directly and via the load balancer never has its direct
//!   replies rewritten.
//!
//! Stack: BPF allows 512 bytes over the whole call chain, so the decision
//! functions are separate subprograms that return to `process`, and only
//! `forward` is called below it.

use aya_ebpf::{bindings::xdp_action::XDP_PASS, programs::XdpContext};
use meshlb_common::{
    hash::flow_slot, AddrKey, Counter, CtEntry, FlowKey, FrontendKey, FrontendValue, RnatEntry,
    BE_F_PRESENT, CT_F_CLOSING, CT_F_FIN_BACKEND, CT_F_FIN_CLIENT, CT_F_RST, FAMILY_V4, NO_BACKEND,
    PROTO_TCP, PROTO_UDP, RING_SIZE, SVC_F_PRESENT,
};

use crate::{
    csum::CsumDelta,
    fwd::forward,
    maps::*,
    parse::{
        parse, ptr_at, Ipv4Hdr, Ipv6Hdr, L4Ports, Packet, ETH_LEN, TCP_ACK, TCP_FIN, TCP_RST,
        TCP_SYN,
    },
};

#[inline(always)]
fn is_syn(pkt: &Packet) -> bool {
    pkt.key.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

#[inline(always)]
pub fn process(ctx: &XdpContext) -> Result<u32, u32> {
    let pkt = parse(ctx)?;
    let mut fe = FrontendValue::default();
    if lookup_frontend(&pkt, &mut fe) {
        let mut ct = CtEntry::default();
        if !pick_backend(&pkt, fe.service_id, &mut ct) {
            return Ok(XDP_PASS);
        }
        rewrite(
            ctx,
            &pkt,
            &pkt.key.dst,
            &ct.backend_addr,
            pkt.key.dport,
            ct.backend_port,
            false,
        )?;
        return forward(ctx, &pkt, &ct.backend_addr, Counter::ForwardedIn);
    }
    // SAFETY: LRU map value, copied out at once.
    if let Some(r) = unsafe { MLB_RNAT_V1.get(&pkt.key) } {
        let r = *r;
        reply_seen(&pkt, &r);
        rewrite(
            ctx,
            &pkt,
            &pkt.key.src,
            &r.frontend_addr,
            pkt.key.sport,
            r.frontend_port,
            true,
        )?;
        return forward(ctx, &pkt, &pkt.key.dst, Counter::ForwardedOut);
    }
    if is_syn(&pkt) {
        forget_reply(&pkt);
    }
    count(Counter::NotService);
    Ok(XDP_PASS)
}

/// Finds the frontend of a packet: exact (VIP) first, then node port when
/// the destination is one of this node's addresses.
#[inline(never)]
fn lookup_frontend(pkt: &Packet, out: &mut FrontendValue) -> bool {
    let mut fk = FrontendKey {
        addr: pkt.key.dst,
        port: pkt.key.dport,
        proto: pkt.key.proto,
        family: pkt.key.family,
    };
    // SAFETY: hash map value, copied out at once.
    if let Some(v) = unsafe { MLB_FE_V1.get(&fk) } {
        *out = *v;
        return true;
    }
    let ak = AddrKey {
        addr: pkt.key.dst,
        family: pkt.key.family,
        _pad: [0; 3],
    };
    if MLB_LOCAL_V1.get_ptr(&ak).is_none() {
        return false;
    }
    fk.addr = [0; 16];
    // SAFETY: as above.
    match unsafe { MLB_FE_V1.get(&fk) } {
        Some(v) => {
            *out = *v;
            true
        }
        None => false,
    }
}

/// A direct TCP SYN (client -> backend, not via a frontend): drop any
/// reply entry left for the same tuple by an earlier load-balanced flow.
#[inline(never)]
fn forget_reply(pkt: &Packet) {
    let reply = FlowKey {
        src: pkt.key.dst,
        dst: pkt.key.src,
        sport: pkt.key.dport,
        dport: pkt.key.sport,
        ..pkt.key
    };
    let _ = MLB_RNAT_V1.remove(&reply);
}

#[inline(always)]
fn closing_flags(tcp_flags: u8, from_client: bool) -> u16 {
    let mut f = 0;
    if tcp_flags & TCP_RST != 0 {
        f |= CT_F_RST;
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
/// not a SYN reusing a closed tuple), else Maglev, recording the new flow.
/// `false`: no backend (counted), pass the packet untouched.
#[inline(never)]
fn pick_backend(pkt: &Packet, service_id: u32, out: &mut CtEntry) -> bool {
    let flags = closing_flags(pkt.tcp_flags, true);
    let mut stale: Option<(u16, [u8; 16])> = None;
    if let Some(ct) = MLB_CT_V1.get_ptr_mut(&pkt.key) {
        // SAFETY: LRU map value; a concurrent update of `flags` only loses
        // a flag bit, which the next FIN/RST sets again.
        let ct = unsafe { &mut *ct };
        if !(is_syn(pkt) && ct.flags & CT_F_CLOSING != 0) {
            if flags & !ct.flags != 0 {
                ct.flags |= flags;
            }
            *out = *ct;
            account(out.service_id, out.backend_id, pkt.len, false, false);
            return true;
        }
        stale = Some((ct.backend_port, ct.backend_addr));
    }

    match MLB_SVC_V1.get(service_id) {
        Some(s) if s.flags & SVC_F_PRESENT != 0 && s.active_backends > 0 => {}
        _ => {
            count(Counter::NoBackend);
            return false;
        }
    }
    let backend_id = match MLB_MAGLEV_V1.get(service_id * RING_SIZE + flow_slot(&pkt.key)) {
        Some(b) if *b != NO_BACKEND => *b,
        _ => {
            count(Counter::NoBackend);
            return false;
        }
    };
    let be = match MLB_BE_V1.get(backend_id) {
        Some(b) if b.flags & BE_F_PRESENT != 0 && b.family == pkt.key.family => b,
        _ => {
            count(Counter::NoBackend);
            return false;
        }
    };
    let mut reply_key = FlowKey {
        src: be.addr,
        dst: pkt.key.src,
        sport: be.port,
        dport: pkt.key.sport,
        ..pkt.key
    };
    if let Some((port, addr)) = stale {
        // The tuple's previous flow went elsewhere: forget its replies.
        let new = (reply_key.sport, reply_key.src);
        reply_key.sport = port;
        reply_key.src = addr;
        let _ = MLB_RNAT_V1.remove(&reply_key);
        reply_key.sport = new.0;
        reply_key.src = new.1;
    }
    *out = CtEntry {
        backend_addr: be.addr,
        backend_port: be.port,
        flags,
        backend_id,
        service_id,
        _pad: 0,
    };
    let rnat = RnatEntry {
        frontend_addr: pkt.key.dst,
        frontend_port: pkt.key.dport,
        flags: 0,
        backend_id,
        service_id,
        _pad: 0,
    };
    if MLB_RNAT_V1.insert(&reply_key, &rnat, 0).is_err()
        || MLB_CT_V1.insert(&pkt.key, &*out, 0).is_err()
    {
        // Forward anyway: Maglev gives the same answer for the next packet.
        count(Counter::CtFull);
    } else {
        count(Counter::NewFlow);
    }
    account(service_id, backend_id, pkt.len, false, true);
    true
}

/// Bookkeeping of a reply: counters, and FIN/RST from the backend marks
/// the client flow closing.
#[inline(never)]
fn reply_seen(pkt: &Packet, r: &RnatEntry) {
    let flags = closing_flags(pkt.tcp_flags, false);
    if flags != 0 {
        let client_key = FlowKey {
            src: pkt.key.dst,
            dst: r.frontend_addr,
            sport: pkt.key.dport,
            dport: r.frontend_port,
            ..pkt.key
        };
        if let Some(ct) = MLB_CT_V1.get_ptr_mut(&client_key) {
            // SAFETY: as in pick_backend.
            unsafe { (*ct).flags |= flags };
        }
    }
    account(r.service_id, r.backend_id, pkt.len, true, false);
}

/// Replaces the destination (`src_side == false`) or source address and
/// port, fixing the IPv4 header checksum and the L4 checksum.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    old: &[u8; 16],
    new: &[u8; 16],
    old_port: u16,
    new_port: u16,
    src_side: bool,
) -> Result<(), u32> {
    let v4 = pkt.key.family == FAMILY_V4;
    let check_ptr: *mut [u8; 2] = ptr_at(ctx, pkt.check_off).map_err(|_| XDP_PASS)?;
    let l4_ptr: *mut L4Ports = ptr_at(ctx, pkt.l4_off).map_err(|_| XDP_PASS)?;
    // SAFETY: bounds-checked by ptr_at.
    let check = unsafe { *check_ptr };
    let udp_no_csum = pkt.key.proto == PROTO_UDP && v4 && check == [0, 0];
    let mut l4 = CsumDelta::new(check);
    if v4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_LEN).map_err(|_| XDP_PASS)?;
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &mut *ip };
        let mut l3 = CsumDelta::new(ip.check);
        l3.bytes4(old, new);
        ip.check = l3.finish();
        l4.bytes4(old, new);
        let a = [new[0], new[1], new[2], new[3]];
        if src_side {
            ip.src = a;
        } else {
            ip.dst = a;
        }
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_LEN).map_err(|_| XDP_PASS)?;
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &mut *ip };
        l4.bytes16(old, new);
        if src_side {
            ip.src = *new;
        } else {
            ip.dst = *new;
        }
    }
    l4.word(u16::from_be(old_port), u16::from_be(new_port));
    // SAFETY: bounds-checked by ptr_at.
    let ports = unsafe { &mut *l4_ptr };
    if src_side {
        ports.sport = new_port.to_ne_bytes();
    } else {
        ports.dport = new_port.to_ne_bytes();
    }
    if !udp_no_csum {
        let mut c = l4.finish();
        if pkt.key.proto == PROTO_UDP && c == [0, 0] {
            c = [0xff, 0xff];
        }
        // SAFETY: as above.
        unsafe { *check_ptr = c };
    }
    Ok(())
}
