//! The address/port rewrite: `translate` over either hook's
//! `Frame::rewrite`, and XDP's rewrite with RFC 1624 checksum updates.

use aya_ebpf::bindings::xdp_action::XDP_PASS;
use meshlb_common::{FAMILY_V4, PROTO_UDP};

use crate::{
    csum::CsumDelta,
    frame::Frame,
    parse::{ptr_at, Ipv4Hdr, Ipv6Hdr, L4Ports, Packet, ETH_LEN},
};

/// `Frame::rewrite`, failing with `XDP_PASS` (headers out of bounds).
#[inline(always)]
pub(super) fn translate<C: Frame>(
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
