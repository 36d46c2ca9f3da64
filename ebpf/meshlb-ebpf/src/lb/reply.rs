//! Replies translated back towards the client: reverse NAT of local
//! flows, reverse SNAT of flows to other nodes, their bookkeeping, and
//! the stale reply entry a direct SYN removes.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use meshlb_common::{FlowKey, CT_F_CLOSING, PROTO_TCP, SNAT_E_EST, SNAT_TOUCH_NS};

use super::{
    conntrack::{clock_now, closing_flags, flow_cfg},
    rewrite::translate,
};
use crate::{
    frame::Frame,
    maps::{account, MLB_CT_V2, MLB_RNATSYN_V1, MLB_RNAT_V1, MLB_SNAT_V1},
    parse::{Packet, TCP_SYN},
};

/// A reply of a local (not source-translated) flow: source back to the
/// frontend. `Ok(REPLY_*)`: which kind (`REPLY_NONE`: not one).
#[inline(never)]
pub(super) fn rnat_reply<C: Frame>(ctx: &C, pkt: &Packet) -> Result<u8, u32> {
    // SAFETY: LRU map values, copied out at once. An embryonic flow's
    // replies are any kind of segment: its SYN-ACK, and a bare ACK or RST
    // from a backend that still holds the client's previous connection on
    // the same tuple in TIME_WAIT (the client reused its port towards
    // another frontend): translated, the client's RST ends that
    // TIME_WAIT; untranslated, it never reaches the backend and the
    // connect times out.
    let (r, kind) = match unsafe { MLB_RNAT_V1.get(&pkt.key) } {
        Some(r) => (*r, REPLY_EST),
        None => match unsafe { MLB_RNATSYN_V1.get(&pkt.key) } {
            Some(r) => (*r, REPLY_EMBRYONIC),
            None => return Ok(REPLY_NONE),
        },
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
    Ok(kind)
}

/// A reply of a source-translated flow: source back to the frontend,
/// destination back to the client; refreshes the flow's last-seen time.
/// `Ok(REPLY_*)`: which kind (`REPLY_NONE`: not one).
#[inline(never)]
pub(super) fn snat_reply<C: Frame>(ctx: &C, pkt: &Packet) -> Result<u8, u32> {
    let Some(p) = MLB_SNAT_V1.get_ptr_mut(&pkt.key) else {
        return Ok(REPLY_NONE);
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
    Ok(if e.flags & SNAT_E_EST != 0 {
        REPLY_EST
    } else {
        REPLY_EMBRYONIC
    })
}

/// `rnat_reply`, `snat_reply`: not a reply of a translated flow.
pub(super) const REPLY_NONE: u8 = 0;
/// A reply of a flow not established yet (its SYN-ACK, a first answer).
pub(super) const REPLY_EMBRYONIC: u8 = 1;
/// A reply of an established flow.
pub(super) const REPLY_EST: u8 = 2;

/// A direct TCP SYN (client -> backend, not via a frontend): drop any
/// reply entry left for the same tuple by an earlier load-balanced flow
/// that is closing or gone. A live flow's stays: a SYN forged with its
/// tuple must not take its replies away.
#[inline(never)]
pub(super) fn forget_reply(pkt: &Packet) {
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
