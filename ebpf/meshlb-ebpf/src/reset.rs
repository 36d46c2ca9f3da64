//! A TCP reset for a client whose flow's backend was removed from its
//! service (not one that is down or draining: those keep their flows):
//! answered at once from the frontend's address, so the client learns in
//! one round trip instead of retransmitting into a void until it gives up.
//!
//! Built in place from the client's packet (not yet translated: `pkt.key`
//! is the packet as it is): the frame is cut to the Ethernet, IP and a
//! bare TCP header, addresses and ports are swapped, and the segment is
//! an RFC 9293 reset for it (the packet's ACK number as sequence number;
//! without an ACK, RST|ACK acknowledging the segment). Only the XDP hook
//! answers: a local sender's skb may carry a partial checksum whose later
//! completion would corrupt a full one, so the TC hook drops the packet
//! (the flow's state is gone all the same, and its next packet goes to a
//! live backend).

use aya_ebpf::bindings::xdp_action::XDP_DROP;
use meshlb_common::{Counter, FAMILY_V4, PROTO_TCP};

use crate::{
    frame::Frame,
    maps::count,
    parse::{ptr_at, EthHdr, Packet, ETH_LEN, KIND_L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    toobig::{fold, fold16, sum_at},
};

/// A `client_path` error that is no verdict: the flow's backend is gone,
/// answer the packet with `reply`.
pub const RESET: u32 = 1 << 30;

/// Answers `pkt` with a TCP reset sent back out its ingress interface
/// (XDP), or drops it (TC, or a packet that cannot be answered). The
/// verdict is XDP's.
#[inline(never)]
pub fn reply<C: Frame>(ctx: &C, pkt: &Packet) -> u32 {
    if !C::LOCAL_SENDERS && build(ctx, pkt).is_some() {
        count(Counter::Reset);
        return ctx.bounce();
    }
    count(Counter::ResetDropped);
    XDP_DROP
}

#[inline(always)]
#[allow(
    clippy::too_many_lines,
    reason = "the reset is built in one pass over the frame; split, it would need more frames"
)]
fn build<C: Frame>(ctx: &C, pkt: &Packet) -> Option<()> {
    let v4 = pkt.key.family == FAMILY_V4;
    let ip_len = if v4 { 20 } else { 40 };
    if pkt.key.proto != PROTO_TCP
        || pkt.kind != KIND_L4
        || pkt.tcp_flags & TCP_RST != 0
        || pkt.l4_off != ETH_LEN + ip_len
    {
        return None;
    }
    // SAFETY (all raw accesses below): pointers come from ptr_at, which
    // bounds-checks them against the current packet end.
    let (smac, dmac, proto, seq, ack, seg_len) = unsafe {
        let eth = &*ptr_at::<EthHdr, _>(ctx, 0).ok()?;
        let tcp = &*ptr_at::<[u8; 20], _>(ctx, pkt.l4_off).ok()?;
        let doff = u32::from(tcp[12] >> 4) * 4;
        let ip_payload = if v4 {
            let ip = &*ptr_at::<[u8; 20], _>(ctx, ETH_LEN).ok()?;
            u32::from(u16::from_be_bytes([ip[2], ip[3]])).checked_sub(20)?
        } else {
            let ip = &*ptr_at::<[u8; 8], _>(ctx, ETH_LEN).ok()?;
            u32::from(u16::from_be_bytes([ip[4], ip[5]]))
        };
        let mut seg_len = ip_payload.checked_sub(doff)?;
        if pkt.tcp_flags & TCP_SYN != 0 {
            seg_len += 1;
        }
        if pkt.tcp_flags & TCP_FIN != 0 {
            seg_len += 1;
        }
        (
            eth.src,
            eth.dst,
            eth.proto,
            [tcp[4], tcp[5], tcp[6], tcp[7]],
            [tcp[8], tcp[9], tcp[10], tcp[11]],
            seg_len,
        )
    };
    let (r_seq, r_ack, flags) = if pkt.tcp_flags & TCP_ACK != 0 {
        (ack, [0; 4], TCP_RST)
    } else {
        let a = u32::from_be_bytes(seq).wrapping_add(seg_len).to_be_bytes();
        ([0; 4], a, TCP_RST | TCP_ACK)
    };
    if !ctx.reshape(pkt.len, (ETH_LEN + ip_len + 20) as u32, 0) {
        return None;
    }
    let (sp, dp) = (pkt.key.dport.to_ne_bytes(), pkt.key.sport.to_ne_bytes());
    let tcp_hdr = [
        sp[0],
        sp[1],
        dp[0],
        dp[1],
        r_seq[0],
        r_seq[1],
        r_seq[2],
        r_seq[3],
        r_ack[0],
        r_ack[1],
        r_ack[2],
        r_ack[3],
        5 << 4,
        flags,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    // SAFETY: as above.
    unsafe {
        let eth = &mut *ptr_at::<EthHdr, _>(ctx, 0).ok()?;
        eth.dst = smac;
        eth.src = dmac;
        eth.proto = proto;
    }
    // Every offset below is a constant on its path (the verifier checks
    // each access against that path's bounds test).
    let (from, to) = (&pkt.key.dst, &pkt.key.src);
    // Pseudo-header: addresses (summed in place below), protocol, length
    // (`bpf_csum_diff` sums words as they lie in memory).
    let pseudo = u64::from(u16::from_ne_bytes([0, PROTO_TCP]))
        + u64::from(u16::from_ne_bytes(20u16.to_be_bytes()));
    let sum = if v4 {
        // SAFETY: as above.
        unsafe {
            *ptr_at::<[u8; 20], _>(ctx, ETH_LEN).ok()? = [
                0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, PROTO_TCP, 0, 0, from[0], from[1], from[2],
                from[3], to[0], to[1], to[2], to[3],
            ];
            let c = fold(sum_at::<20, C>(ctx, ETH_LEN, 0)?);
            *ptr_at::<[u8; 2], _>(ctx, ETH_LEN + 10).ok()? = c;
            *ptr_at::<[u8; 20], _>(ctx, ETH_LEN + 20).ok()? = tcp_hdr;
        }
        let addrs = sum_at::<8, C>(ctx, ETH_LEN + 12, 0)?;
        sum_at::<20, C>(ctx, ETH_LEN + 20, fold16(addrs + pseudo))?
    } else {
        // SAFETY: as above.
        unsafe {
            *ptr_at::<[u8; 8], _>(ctx, ETH_LEN).ok()? = [0x60, 0, 0, 0, 0, 20, PROTO_TCP, 64];
            *ptr_at::<[u8; 16], _>(ctx, ETH_LEN + 8).ok()? = *from;
            *ptr_at::<[u8; 16], _>(ctx, ETH_LEN + 24).ok()? = *to;
            *ptr_at::<[u8; 20], _>(ctx, ETH_LEN + 40).ok()? = tcp_hdr;
        }
        let addrs = sum_at::<32, C>(ctx, ETH_LEN + 8, 0)?;
        sum_at::<20, C>(ctx, ETH_LEN + 40, fold16(addrs + pseudo))?
    };
    let off = ETH_LEN + ip_len + 16;
    // SAFETY: as above.
    unsafe { *ptr_at::<[u8; 2], _>(ctx, off).ok()? = fold(sum) };
    Some(())
}
