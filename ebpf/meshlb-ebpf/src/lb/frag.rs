//! Fragments: a datagram's first fragment records its translated
//! addresses (`MLB_FRAG_V1`), and its later fragments, which carry no
//! ports, are translated alike.

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use meshlb_common::{Counter, FragEntry, FragKey, FAMILY_V4};

use super::{is_vip, rewrite::translate};
use crate::{
    frame::Frame,
    maps::{count, MLB_FRAG_V1},
    parse::{ptr_at, Ipv4Hdr, Ipv6Hdr, Packet, ETH_LEN},
};

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
pub(super) fn record_frag_of<C: Frame>(ctx: &C, pkt: &Packet) {
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
pub(super) fn frag_path<C: Frame>(ctx: &C, pkt: &Packet) -> Result<(), u32> {
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
