//! Backend selection for a client packet: the known flow's backend
//! (conntrack), else the client's session affinity, else the service's
//! Maglev ring.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_ktime_get_boot_ns,
};
use meshlb_common::{
    hash::flow_slot, AffinityEntry, AffinityKey, Counter, CtEntry, BE_F_PRESENT, BE_F_SNAT,
    CT_F_CLOSING, CT_F_EST, CT_F_SNAT, NO_BACKEND, PROTO_TCP, RING_HALF, SVC_F_PRESENT,
};

use super::{
    conntrack::{
        clock_now, closing_flags, ct_live, embryonic, forget_flow, promote, serves, CT_LIVE,
        CT_RESET, EMB_NONE, EMB_PROMOTE,
    },
    is_syn,
};
use crate::{
    maps::{
        account, count, RingsDef, MLB_AFF_V1, MLB_BE_V1, MLB_CT_V2, MLB_IFMAC_V1, MLB_RING_V1,
        MLB_SVCAFF_V1, MLB_SVC_V1,
    },
    parse::{Packet, TCP_ACK, TCP_SYN},
    reset,
};

/// `CtEntry::flags` of a packet forwarded without state (`pick_backend`);
/// never stored.
pub(super) const CT_F_UNTRACKED: u16 = 0x8000;
/// `CtEntry::flags` of a known flow's first packet in a new flow-clock
/// tick (its `last_seen` was just moved); never stored.
pub(super) const CT_F_TICK: u16 = 0x4000;

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
pub(super) fn pick_backend(pkt: &Packet, service_id: u32, out: &mut CtEntry) -> Result<bool, u32> {
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
        let seen = ct.last_seen;
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
            if ct.last_seen != seen {
                out.flags |= CT_F_TICK;
            }
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
    // No known flow: one in a frame for another host is not ours to open
    // (a known flow's packets are served whatever their frame says: the
    // client may have moved to this node's MAC mid-flow).
    if other_host(pkt) {
        count(Counter::OtherHost);
        return Err(XDP_PASS);
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

/// A unicast frame for another host's MAC on an interface whose own MAC
/// the daemon wrote (`MLB_IFMAC_V1`: the uplinks). A flooding switch (an
/// address whose port went down, a full forwarding table), a veth or a
/// promiscuous NIC hands such frames to every node; balanced by each,
/// one client's flow would reach several backends, and the extra copies'
/// backends would reset it. The kernel drops them (`PACKET_OTHERHOST`).
#[inline(always)]
fn other_host(pkt: &Packet) -> bool {
    if pkt.dmac_tail == 0 {
        // Broadcast or multicast: for every host.
        return false;
    }
    // SAFETY: a hash map value, read only.
    match unsafe { MLB_IFMAC_V1.get(&pkt.ifindex) } {
        Some(mac) => u32::from_ne_bytes([mac[2], mac[3], mac[4], mac[5]]) != pkt.dmac_tail,
        None => false,
    }
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
    matches!(MLB_BE_V1.get(id), Some(b) if b.takes_new_flows(service_id, family))
}
