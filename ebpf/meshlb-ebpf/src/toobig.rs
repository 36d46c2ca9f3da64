//! Packets too big for the egress link, answered in place: an ICMP
//! "fragmentation needed" (IPv4) or ICMPv6 "packet too big" built from the
//! packet itself and sent back out the interface it came in on, quoting
//! the packet as its sender sent it.
//!
//! Why here and not by the stack: the packet is already translated when
//! the egress (and its MTU) is known. The stack would quote the translated
//! packet, and address its error to the translated source, which for a
//! source-translated flow is this node itself (and it drops such a
//! packet before that, as a martian). A sender that gets no usable error
//! never learns the path MTU, and its large packets are lost for good.
//!
//! The translation is undone on the quoted headers (`pkt.key` is the
//! tuple as parsed), the frame is cut to the quoted headers (IP header,
//! IPv6 fragment header, and the whole TCP or UDP header), room for the
//! outer IP and ICMP headers is opened behind the Ethernet header, and
//! every checksum is written. The data path cannot fragment: an IPv4
//! packet without DF that does not fit is answered the same way (its
//! sender then fragments to the reported MTU).
//!
//! A partial checksum (a local sender's skb, `tc`) stays marked partial
//! through the helpers used here: if a device ever completes it, it writes
//! the quoted L4 checksum field and sums over the quoted L4 header. That
//! field is set so that completing it changes nothing (the region's
//! one's-complement sum `S + f` equals `~f`: `f = rotr16(~S, 1)`), so the
//! ICMP checksum is right whether or not it is completed.

use aya_ebpf::helpers::bpf_csum_diff;
use meshlb_common::{Counter, IfAddrKey, FAMILY_V4, PROTO_TCP, PROTO_UDP};

use crate::{
    frame::Frame,
    maps::{count, MLB_IFADDR_V1},
    parse::{ptr_at, EthHdr, Packet, ETH_LEN, KIND_FRAG, KIND_L4},
};

/// A `Frame::forward` result that is no verdict: the packet is too big
/// for its egress, whose MTU is in the low bits (the caller answers it
/// with `reply`).
pub const TOO_BIG: u32 = 1 << 31;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// Outer IPv4 + ICMP header.
const GROW_V4: u32 = 20 + 8;
/// Outer IPv6 + ICMPv6 header.
const GROW_V6: u32 = 40 + 8;

/// Answers `pkt` (translated, not forwarded) with an ICMP error carrying
/// `mtu`, sent back out its ingress interface. The verdict is the hook's
/// (XDP's numbering). `Err`: the packet could not be answered (not
/// TCP/UDP, headers out of bounds); it is dropped rather than sent to a
/// link it does not fit.
#[inline(never)]
pub fn reply<C: Frame>(ctx: &C, pkt: &Packet, mtu: u32) -> u32 {
    match build(ctx, pkt, mtu) {
        Some(()) => {
            count(Counter::TooBig);
            ctx.bounce()
        }
        None => aya_ebpf::bindings::xdp_action::XDP_DROP,
    }
}

/// The layout of the answer: quoted IP header length (with an IPv6
/// fragment header), quoted L4 length.
#[inline(always)]
fn quoted(pkt: &Packet) -> Option<(usize, usize)> {
    if pkt.key.proto != PROTO_TCP && pkt.key.proto != PROTO_UDP {
        return None;
    }
    let v4 = pkt.key.family == FAMILY_V4;
    let ip = if v4 {
        20
    } else if pkt.kind == KIND_FRAG || pkt.l4_off == ETH_LEN + 48 {
        48
    } else {
        40
    };
    let l4 = if pkt.kind == KIND_L4 && pkt.key.proto == PROTO_TCP {
        20
    } else {
        8
    };
    if pkt.kind != KIND_L4 && pkt.kind != KIND_FRAG {
        return None;
    }
    Some((ip, l4))
}

#[inline(always)]
fn build<C: Frame>(ctx: &C, pkt: &Packet, mtu: u32) -> Option<()> {
    let (qip, ql4) = quoted(pkt)?;
    let v4 = pkt.key.family == FAMILY_V4;
    untranslate(ctx, pkt, v4)?;
    // SAFETY (all raw accesses below): pointers come from ptr_at, which
    // bounds-checks them against the current packet end.
    let (smac, dmac, proto) = unsafe {
        let eth = &*ptr_at::<EthHdr, _>(ctx, 0).ok()?;
        (eth.src, eth.dst, eth.proto)
    };
    let mut from = pkt.key.dst;
    let k = IfAddrKey {
        ifindex: pkt.ifindex,
        family: pkt.key.family,
        _pad: [0; 3],
    };
    // SAFETY: hash map value, copied out at once.
    if let Some(a) = unsafe { MLB_IFADDR_V1.get(&k) } {
        from = *a;
    }
    let grow = if v4 { GROW_V4 } else { GROW_V6 };
    if !ctx.reshape(pkt.len, (ETH_LEN + qip + ql4) as u32, grow) {
        return None;
    }
    unsafe {
        let eth = &mut *ptr_at::<EthHdr, _>(ctx, 0).ok()?;
        eth.dst = smac;
        eth.src = dmac;
        // (XDP's new head holds no Ethernet header yet.)
        eth.proto = proto;
    }
    // Every offset below is a constant on its path: the verifier checks
    // each access against the bounds test of that very path.
    if v4 {
        headers_v4(ctx, pkt, &from, mtu, ql4)
    } else if qip == 48 {
        headers_v6::<48, C>(ctx, pkt, &from, mtu, ql4)
    } else {
        headers_v6::<40, C>(ctx, pkt, &from, mtu, ql4)
    }
}

/// Outer IPv4 and ICMP headers and their checksums (layout: Ethernet,
/// IPv4 at 14, ICMP at 34, quoted IPv4 header at 42, quoted L4 at 62).
#[inline(always)]
fn headers_v4<C: Frame>(
    ctx: &C,
    pkt: &Packet,
    from: &[u8; 16],
    mtu: u32,
    ql4: usize,
) -> Option<()> {
    const ICMP: usize = ETH_LEN + 20;
    const L4: usize = ICMP + 8 + 20;
    let total = (20 + 8 + 20 + ql4) as u16;
    // SAFETY: pointers from ptr_at, bounds-checked.
    unsafe {
        let ip = &mut *ptr_at::<[u8; 20], _>(ctx, ETH_LEN).ok()?;
        let len = total.to_be_bytes();
        let to = &pkt.key.src;
        *ip = [
            0x45, 0, len[0], len[1], 0, 0, 0, 0, 64, PROTO_ICMP, 0, 0, from[0], from[1], from[2],
            from[3], to[0], to[1], to[2], to[3],
        ];
        let c = fold(sum_at::<20, C>(ctx, ETH_LEN, 0)?);
        *ptr_at::<[u8; 2], _>(ctx, ETH_LEN + 10).ok()? = c;
        let m = (mtu as u16).to_be_bytes();
        *ptr_at::<[u8; 8], _>(ctx, ICMP).ok()? =
            [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, 0, 0, m[0], m[1]];
    }
    let sum = sum_at::<28, C>(ctx, ICMP, 0)?;
    finish::<L4, ICMP, C>(ctx, pkt, ql4, sum)
}

/// Outer IPv6 and ICMPv6 headers and their checksums (layout: Ethernet,
/// IPv6 at 14, ICMPv6 at 54, quoted IPv6 header (`QIP` bytes with a
/// fragment header) at 62, quoted L4 behind it).
#[inline(always)]
fn headers_v6<const QIP: usize, C: Frame>(
    ctx: &C,
    pkt: &Packet,
    from: &[u8; 16],
    mtu: u32,
    ql4: usize,
) -> Option<()> {
    const ICMP: usize = ETH_LEN + 40;
    let icmp_len = (8 + QIP + ql4) as u16;
    // SAFETY: pointers from ptr_at, bounds-checked.
    unsafe {
        let len = icmp_len.to_be_bytes();
        *ptr_at::<[u8; 8], _>(ctx, ETH_LEN).ok()? =
            [0x60, 0, 0, 0, len[0], len[1], PROTO_ICMPV6, 64];
        *ptr_at::<[u8; 16], _>(ctx, ETH_LEN + 8).ok()? = *from;
        *ptr_at::<[u8; 16], _>(ctx, ETH_LEN + 24).ok()? = pkt.key.src;
        let m = mtu.to_be_bytes();
        *ptr_at::<[u8; 8], _>(ctx, ICMP).ok()? =
            [ICMPV6_PKT_TOOBIG, 0, 0, 0, m[0], m[1], m[2], m[3]];
    }
    // Pseudo-header: addresses, upper-layer length, next header
    // (`bpf_csum_diff` sums words as they lie in memory: the two 16-bit
    // fields are added the same way).
    let mut sum = sum_at::<32, C>(ctx, ETH_LEN + 8, 0)?;
    sum += u64::from(u16::from_ne_bytes(icmp_len.to_be_bytes()));
    sum += u64::from(u16::from_ne_bytes([0, PROTO_ICMPV6]));
    if QIP == 48 {
        let sum = sum_at::<56, C>(ctx, ICMP, fold16(sum))?;
        finish::<{ ICMP + 8 + 48 }, ICMP, C>(ctx, pkt, ql4, sum)
    } else {
        let sum = sum_at::<48, C>(ctx, ICMP, fold16(sum))?;
        finish::<{ ICMP + 8 + 40 }, ICMP, C>(ctx, pkt, ql4, sum)
    }
}

/// The quoted L4 header at `L4` (made neutral to a partial checksum's
/// completion), added to `sum`; the ICMP checksum stored at `ICMP + 2`.
#[inline(always)]
fn finish<const L4: usize, const ICMP: usize, C: Frame>(
    ctx: &C,
    pkt: &Packet,
    ql4: usize,
    sum: u64,
) -> Option<()> {
    let sum = if ql4 == 20 {
        partial_neutral::<L4, 16, 20, C>(ctx, pkt)?;
        sum_at::<20, C>(ctx, L4, fold16(sum))?
    } else {
        partial_neutral::<L4, 6, 8, C>(ctx, pkt)?;
        sum_at::<8, C>(ctx, L4, fold16(sum))?
    };
    // SAFETY: pointer from ptr_at, bounds-checked.
    unsafe { *ptr_at::<[u8; 2], _>(ctx, ICMP + 2).ok()? = fold(sum) };
    Some(())
}

/// Restores the addresses and ports the sender used (`pkt.key`) in the
/// translated headers, and the IPv4 header checksum.
#[inline(always)]
fn untranslate<C: Frame>(ctx: &C, pkt: &Packet, v4: bool) -> Option<()> {
    // SAFETY: pointers from ptr_at, bounds-checked.
    unsafe {
        if v4 {
            let ip = &mut *ptr_at::<[u8; 20], _>(ctx, ETH_LEN).ok()?;
            (*ip)[12..16].copy_from_slice(&pkt.key.src[..4]);
            (*ip)[16..20].copy_from_slice(&pkt.key.dst[..4]);
            (*ip)[10] = 0;
            (*ip)[11] = 0;
            let c = fold(sum_at::<20, C>(ctx, ETH_LEN, 0)?);
            *ptr_at::<[u8; 2], _>(ctx, ETH_LEN + 10).ok()? = c;
        } else {
            *ptr_at::<[u8; 16], _>(ctx, ETH_LEN + 8).ok()? = pkt.key.src;
            *ptr_at::<[u8; 16], _>(ctx, ETH_LEN + 24).ok()? = pkt.key.dst;
        }
        if pkt.kind == KIND_L4 {
            let p = &mut *ptr_at::<[u8; 4], _>(ctx, pkt.l4_off).ok()?;
            let (s, d) = (pkt.key.sport.to_ne_bytes(), pkt.key.dport.to_ne_bytes());
            *p = [s[0], s[1], d[0], d[1]];
        }
    }
    Some(())
}

/// Sets the quoted L4 checksum field (at `L4 + FIELD`, in a header of
/// `N` bytes) so that completing a partial checksum over the quoted L4
/// header leaves its sum unchanged (module docs). A later fragment quotes
/// no L4 header: nothing to do.
#[inline(always)]
fn partial_neutral<const L4: usize, const FIELD: usize, const N: usize, C: Frame>(
    ctx: &C,
    pkt: &Packet,
) -> Option<()> {
    if pkt.kind != KIND_L4 {
        return Some(());
    }
    // SAFETY: pointers from ptr_at, bounds-checked.
    unsafe {
        *ptr_at::<[u8; 2], _>(ctx, L4 + FIELD).ok()? = [0, 0];
        let s = u16::from_be_bytes(fold_raw(sum_at::<N, C>(ctx, L4, 0)?));
        *ptr_at::<[u8; 2], _>(ctx, L4 + FIELD).ok()? = (!s).rotate_right(1).to_be_bytes();
    }
    Some(())
}

/// The one's-complement sum of `N` packet bytes at `off` added to `seed`
/// (`bpf_csum_diff`; `N` a multiple of 4).
#[inline(always)]
pub(crate) fn sum_at<const N: usize, C: Frame>(ctx: &C, off: usize, seed: u32) -> Option<u64> {
    let p = ptr_at::<[u8; N], _>(ctx, off).ok()?;
    // SAFETY: p is bounds-checked for N bytes.
    let r = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p.cast::<u32>(), N as u32, seed) };
    if r < 0 {
        return None;
    }
    Some(r as u64 & 0xffff_ffff)
}

/// Folds a one's-complement sum of native-order words to 16 bits.
#[inline(always)]
pub(crate) fn fold16(s: u64) -> u32 {
    let mut s = (s & 0xffff) + ((s >> 16) & 0xffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u32
}

/// The folded sum as the bytes to store (`bpf_csum_diff` sums the
/// packet's bytes as they lie in memory, so the native-order folded value
/// stored natively is in network order).
#[inline(always)]
fn fold_raw(s: u64) -> [u8; 2] {
    (fold16(s) as u16).to_ne_bytes()
}

/// The checksum to store for a sum: its complement.
#[inline(always)]
pub(crate) fn fold(s: u64) -> [u8; 2] {
    let b = fold_raw(s);
    [!b[0], !b[1]]
}
