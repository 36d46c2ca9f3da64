//! Source translation of flows to backends on other nodes (and hairpin
//! flows): the source address, and SNAT port allocation with takeover of
//! idle, closed or embryonic owners.

use aya_ebpf::{
    bindings::{xdp_action::XDP_DROP, BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
};
use meshlb_common::{
    walk_seed, Counter, CtEntry, FlowKey, IfAddrKey, SnatAddr, SnatEntry, CT_F_CLOSING, CT_F_EST,
    CT_F_HAIRPIN, CT_F_SNAT, FAMILY_V4, SNAT_EMBRYONIC_NS, SNAT_E_EST, SNAT_F_PRESENT, SNAT_IDX_V4,
    SNAT_IDX_V6, SNAT_TRIES,
};

use crate::{
    maps::{count, MLB_CT_V2, MLB_FLOWCFG_V1, MLB_IFADDR_V1, MLB_SNATADR_V1, MLB_SNAT_V1},
    parse::Packet,
};

/// The source address a translated flow gets: the node's SNAT address
/// (remote backend), or the address of the interface the packet came in
/// on (hairpin). `false` (counted): there is none, drop.
#[inline(never)]
pub(super) fn snat_source(pkt: &Packet, ct_flags: u16, out: &mut [u8; 16]) -> bool {
    if ct_flags & CT_F_HAIRPIN != 0 {
        let k = IfAddrKey {
            ifindex: pkt.ifindex,
            family: pkt.key.family,
            _pad: [0; 3],
        };
        // SAFETY: hash map value, copied out at once.
        return if let Some(a) = unsafe { MLB_IFADDR_V1.get(&k) } {
            *out = *a;
            true
        } else {
            count(Counter::HairpinNoAddr);
            false
        };
    }
    if let Some(a) = snat_addr(pkt.key.family) {
        *out = a.addr;
        true
    } else {
        count(Counter::SnatNoAddr);
        false
    }
}

/// The SNAT entry of a translated flow `ct` (where its replies go back
/// to), taken or last seen at `now`.
#[inline(always)]
pub(super) fn snat_entry_of(pkt: &Packet, ct: &CtEntry, now: u64) -> SnatEntry {
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

/// This node's SNAT address and port range for a family.
#[inline(always)]
pub(super) fn snat_addr(family: u8) -> Option<&'static SnatAddr> {
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
pub(super) fn snat_alloc(pkt: &Packet, ct: &CtEntry) -> Result<u16, u32> {
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
    if MLB_SNAT_V1
        .insert(key, entry, u64::from(BPF_NOEXIST))
        .is_ok()
    {
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
        let limit = if est {
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
        } else {
            SNAT_EMBRYONIC_NS
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
    if MLB_SNAT_V1.insert(key, entry, u64::from(BPF_ANY)).is_err() {
        return false;
    }
    count(Counter::SnatReclaimed);
    true
}

/// Address equality without a `bcmp` call (a subprogram of its own, one
/// more frame on the deepest call chain).
#[inline(always)]
pub(super) fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
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
