//! Flow entries: the coarse flow clock, a known flow's state at a packet,
//! embryonic flows and their promotion, recording a new flow, healing a
//! lost reply half, forgetting a finished flow.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};
use meshlb_common::{
    flow_clock, idle_past, Counter, CtEntry, FlowConfig, FlowKey, RateWindow, RnatEntry, BE_F_DOWN,
    BE_F_PRESENT, CT_F_EST, CT_F_FIN_BACKEND, CT_F_FIN_CLIENT, CT_F_RST, CT_F_RST_CLIENT,
    CT_F_SNAT, PROTO_TCP, SNAT_E_EST,
};

use super::snat::{eq16, snat_entry_of};
use crate::{
    maps::{
        account, count, MLB_BE_V1, MLB_CTSYN_V1, MLB_CT_V2, MLB_FLOWCFG_V1, MLB_RATE_V1,
        MLB_RNATSYN_V1, MLB_RNAT_V1, MLB_SNAT_V1,
    },
    parse::{Packet, TCP_FIN, TCP_RST, TCP_SYN},
};

/// `CtEntry::last_seen`'s clock: ticks of the coarse monotonic clock.
#[inline(always)]
pub(super) fn clock_now() -> u32 {
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    flow_clock(unsafe { bpf_ktime_get_coarse_ns() })
}

/// The flow timeouts (`MLB_FLOWCFG_V1`; zero fields: defaults).
#[inline(always)]
pub(super) fn flow_cfg() -> FlowConfig {
    MLB_FLOWCFG_V1.get(0).copied().unwrap_or_default()
}

#[inline(always)]
pub(super) fn closing_flags(tcp_flags: u8, from_client: bool) -> u16 {
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

/// `embryonic`: no embryonic flow.
pub(super) const EMB_NONE: u8 = 0;
/// `embryonic`: one, which stays embryonic.
const EMB_HIT: u8 = 1;
/// `embryonic`: one this packet establishes: to be promoted.
pub(super) const EMB_PROMOTE: u8 = 2;

/// A packet of an embryonic flow (`MLB_CTSYN_V1`, younger than its
/// closing or UDP timeout): its entry in `out`, and `EMB_*`. One that
/// establishes it (`flags` has `CT_F_EST`: TCP's handshake ACK, UDP's
/// second datagram) is to be moved to the main tables (`promote`); another
/// (a SYN retransmit) leaves it embryonic (not established: no reply half
/// is healed into the main tables for it). A flow opener (a SYN, a UDP
/// datagram) whose embryonic flow's backend no longer serves (it refused
/// the connection and went down, or left) finds none: it is balanced
/// afresh. Its client reused the tuple, or retransmits to a backend that
/// never answered: either way no connection to the old one exists.
#[inline(never)]
pub(super) fn embryonic(pkt: &Packet, flags: u16, out: &mut CtEntry) -> u8 {
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
    let opener = pkt.key.proto != PROTO_TCP || pkt.tcp_flags & TCP_SYN != 0;
    // SAFETY: as above.
    if opener && !serves(unsafe { &*e }) {
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
pub(super) fn promote(pkt: &Packet, ct: &CtEntry) {
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
pub(super) const CT_LIVE: u8 = 0;
/// `ct_live`: idle past its timeout, to be treated as absent.
const CT_EXPIRED: u8 = 1;
/// `ct_live`: a TCP flow whose backend was removed, to be reset.
pub(super) const CT_RESET: u8 = 2;

/// The state of a known flow at this packet (`CT_*`), refreshing its
/// last-seen time (at most once a tick) when it goes on. A RST from the
/// client's side followed by more of the client's traffic was forged (or
/// lost): the flow is live, not closing (counted).
#[inline(never)]
pub(super) fn ct_live(ct: &mut CtEntry, pkt: &Packet) -> u8 {
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
pub(super) fn serves(ct: &CtEntry) -> bool {
    matches!(MLB_BE_V1.get(ct.backend_id), Some(b) if b.flags & BE_F_PRESENT != 0
        && b.flags & BE_F_DOWN == 0
        && b.port == ct.backend_port
        && b.addr == ct.backend_addr)
}

/// Records a new flow in the embryonic tables (`embryonic` moves it to
/// the main ones once established): its conntrack entry, and for a flow
/// that is not source-translated the reverse-NAT entry of its replies (a
/// translated one's is its SNAT entry, written when the port was taken).
#[inline(never)]
pub(super) fn record_flow(pkt: &Packet, ct: &CtEntry) {
    let mut ok = MLB_CTSYN_V1.insert(&pkt.key, ct, 0).is_ok();
    if ct.flags & CT_F_SNAT == 0 {
        let (key, rnat) = rnat_of(pkt, ct);
        ok &= MLB_RNATSYN_V1.insert(&key, &rnat, 0).is_ok();
        // A main entry for the same reply tuple is an earlier flow's (the
        // client reused its port, e.g. towards another frontend of the
        // same backend): looked up first, it would translate this flow's
        // replies to that frontend. Looked up before it is removed: a
        // lookup takes no lock, a delete does (and there rarely is one).
        if MLB_RNAT_V1.get_ptr(&key).is_some() {
            let _ = MLB_RNAT_V1.remove(&key);
        }
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
pub(super) fn heal_reply(pkt: &Packet, ct: &CtEntry, snat_src: &[u8; 16]) -> bool {
    if ct.flags & CT_F_SNAT == 0 {
        let (key, rnat) = rnat_of(pkt, ct);
        if MLB_RNAT_V1.get_ptr(&key).is_none()
            && MLB_RNAT_V1
                .insert(&key, &rnat, u64::from(BPF_NOEXIST))
                .is_ok()
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
    if MLB_SNAT_V1
        .insert(&key, &entry, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        count(Counter::Healed);
        return true;
    }
    false
}

/// Removes the reply-side state of a finished flow (`old`, the conntrack
/// entry of the tuple `pkt` reuses): its reverse-NAT entry. A translated
/// flow's SNAT entry stays: its port is quarantined (`try_port`; the same
/// client tuple may take it again at once).
#[inline(never)]
pub(super) fn forget_flow(pkt: &Packet, old: &CtEntry) {
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
