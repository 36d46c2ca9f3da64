//! Header layouts and the parser. Plain Ethernet + IPv4 (no options) or
//! IPv6 (no extension headers but a fragment header) + TCP/UDP is parsed,
//! fragments included (a later fragment carries no ports: `KIND_FRAG`),
//! and ICMP errors quoting such a packet (`KIND_ICMP_ERR`); everything
//! else is passed to the stack untouched with a counter saying why. Every
//! header read lies inside the IP datagram (its total / payload length),
//! not merely inside the frame.
//! Headers are byte arrays so no access is ever unaligned.

use aya_ebpf::bindings::xdp_action::XDP_PASS;
use meshlb_common::{Counter, FlowKey, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

use crate::{frame::Frame, maps::count};

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;

const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
const ETH_P_8021Q: [u8; 2] = [0x81, 0x00];
const ETH_P_8021AD: [u8; 2] = [0x88, 0xa8];

const IPPROTO_FRAGMENT: u8 = 44;
/// The furthest header offset read (an ICMPv6 error's quoted ports behind
/// an IPv6 fragment header is 110).
const MAX_HDR_OFF: usize = 255;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtcfl: [u8; 4],
    pub payload_len: [u8; 2],
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// The first 20 bytes of TCP and the 8 of UDP share the port layout; the
/// checksum sits at offset 16 (TCP) or 6 (UDP).
#[repr(C)]
pub struct L4Ports {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

/// `Packet::kind`: TCP or UDP with its ports (perhaps the first fragment
/// of a datagram).
pub const KIND_L4: u8 = 0;
/// `Packet::kind`: a fragment other than the first: no L4 header; `key`
/// has the addresses and protocol, ports 0.
pub const KIND_FRAG: u8 = 1;
/// `Packet::kind`: an ICMP/ICMPv6 error; `key` is the quoted packet's
/// tuple as it was sent (inner source, inner destination).
pub const KIND_ICMP_ERR: u8 = 2;

/// A parsed packet: the facts the load balancer needs. Header offsets, not
/// pointers: writers re-derive bounds-checked pointers with `ptr_at`, so
/// the verifier sees the check on every path (it loses track of which
/// family a spilled struct describes).
pub struct Packet {
    /// Offset of the L4 header (34 for IPv4, 54 for IPv6, 62 behind an
    /// IPv6 fragment header; the ICMP header for `KIND_ICMP_ERR`; 0 for
    /// `KIND_FRAG`).
    pub l4_off: usize,
    /// Offset of the L4 checksum field (0: none to update).
    pub check_off: usize,
    /// The flow in the packet's direction (addresses, ports, proto, family).
    pub key: FlowKey,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// `KIND_*`.
    pub kind: u8,
    /// The first fragment of a fragmented datagram (its choice is recorded
    /// for the others).
    pub frag_first: u8,
    /// The fragment identification (IPv4: 16 bits), when fragmented.
    pub frag_id: u32,
    /// Bytes on the wire (frame length), for counters.
    pub len: u64,
    /// The interface the packet came in on.
    pub ifindex: u32,
    /// The frame's destination MAC's last 4 bytes, 0 for a group
    /// (broadcast, multicast) address: a flow opener framed for another
    /// host is not balanced (`select::other_host`). Not the whole MAC:
    /// this struct sits in the deepest stack frames; 4 bytes fit its
    /// padding, and two MACs of one segment that differ only in their
    /// first 2 bytes (OUI) are not a case worth 8 more bytes.
    pub dmac_tail: u32,
}

/// A bounds-checked pointer to a `T` at `off` bytes into the packet.
#[inline(always)]
pub fn ptr_at<T, C: Frame>(ctx: &C, off: usize) -> Result<*mut T, ()> {
    // Offsets travel through memory (the parsed `Packet`): bound them so
    // the verifier accepts the pointer arithmetic. No header we read lies
    // further in.
    if off > MAX_HDR_OFF {
        return Err(());
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *mut T)
}

/// Parses a frame. `Err(XDP_PASS)` means: not ours, pass it untouched (the
/// reason is counted). A subprogram: its locals are gone before the
/// load balancer's paths run (BPF allows 512 bytes of stack in all).
#[inline(never)]
#[allow(
    clippy::too_many_lines,
    reason = "one subprogram on purpose: split, its parts would be more frames on the call chain"
)]
pub fn parse<C: Frame>(ctx: &C) -> Result<Packet, u32> {
    let pass = |c: Counter| {
        count(c);
        XDP_PASS
    };
    let eth: *mut EthHdr = ptr_at(ctx, 0).map_err(|()| pass(Counter::TruncatedEth))?;
    // SAFETY: bounds-checked by ptr_at.
    let (ethertype, dmac) = unsafe { ((*eth).proto, (*eth).dst) };
    let dmac_tail = if dmac[0] & 1 != 0 {
        0
    } else {
        u32::from_ne_bytes([dmac[2], dmac[3], dmac[4], dmac[5]])
    };
    let len = ctx.frame_len();
    let mut pkt = Packet {
        l4_off: 0,
        check_off: 0,
        key: FlowKey::default(),
        tcp_flags: 0,
        kind: KIND_L4,
        frag_first: 0,
        frag_id: 0,
        len,
        ifindex: ctx.ifindex(),
        dmac_tail,
    };
    let mut more_frags = false;
    let mut frag_off = 0u16;
    // Where the IP datagram ends: every header read must lie before it
    // (bytes past it are Ethernet padding or garbage that no checksum
    // covers, never a header to translate).
    let ip_end: u64;

    if ethertype == ETH_P_IP {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_LEN).map_err(|()| pass(Counter::MalformedIp))?;
        // SAFETY: bounds-checked by ptr_at.
        let ip_ref = unsafe { &*ip };
        if ip_ref.vihl >> 4 != 4 || ip_ref.vihl & 0x0f < 5 {
            return Err(pass(Counter::MalformedIp));
        }
        if ip_ref.vihl & 0x0f != 5 {
            return Err(pass(Counter::IpOptions));
        }
        let tot_len = u64::from(u16::from_be_bytes(ip_ref.tot_len));
        if tot_len < IPV4_LEN as u64 || tot_len + ETH_LEN as u64 > len {
            return Err(pass(Counter::MalformedIp));
        }
        ip_end = ETH_LEN as u64 + tot_len;
        more_frags = ip_ref.frag[0] & 0x20 != 0;
        frag_off = u16::from_be_bytes([ip_ref.frag[0] & 0x1f, ip_ref.frag[1]]);
        pkt.frag_id = u32::from(u16::from_be_bytes(ip_ref.id));
        pkt.key.src[..4].copy_from_slice(&ip_ref.src);
        pkt.key.dst[..4].copy_from_slice(&ip_ref.dst);
        pkt.key.family = FAMILY_V4;
        pkt.key.proto = ip_ref.proto;
        pkt.l4_off = ETH_LEN + IPV4_LEN;
    } else if ethertype == ETH_P_IPV6 {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_LEN).map_err(|()| pass(Counter::MalformedIp))?;
        // SAFETY: bounds-checked by ptr_at.
        let ip_ref = unsafe { &*ip };
        if ip_ref.vtcfl[0] >> 4 != 6 {
            return Err(pass(Counter::MalformedIp));
        }
        let payload = u64::from(u16::from_be_bytes(ip_ref.payload_len));
        if payload + (ETH_LEN + IPV6_LEN) as u64 > len {
            return Err(pass(Counter::MalformedIp));
        }
        ip_end = (ETH_LEN + IPV6_LEN) as u64 + payload;
        pkt.key.src = ip_ref.src;
        pkt.key.dst = ip_ref.dst;
        pkt.key.family = FAMILY_V6;
        pkt.key.proto = ip_ref.nexthdr;
        pkt.l4_off = ETH_LEN + IPV6_LEN;
        if ip_ref.nexthdr == IPPROTO_FRAGMENT {
            if pkt.l4_off as u64 + 8 > ip_end {
                return Err(pass(Counter::TruncatedL4));
            }
            let fh: *mut [u8; 8] =
                ptr_at(ctx, pkt.l4_off).map_err(|()| pass(Counter::TruncatedL4))?;
            // SAFETY: bounds-checked by ptr_at.
            let fh = unsafe { &*fh };
            pkt.key.proto = fh[0];
            frag_off = u16::from_be_bytes([fh[2], fh[3]]) >> 3;
            more_frags = fh[3] & 1 != 0;
            pkt.frag_id = u32::from_be_bytes([fh[4], fh[5], fh[6], fh[7]]);
            pkt.l4_off += 8;
        }
    } else if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return Err(pass(Counter::Vlan));
    } else {
        return Err(pass(Counter::NotService));
    }

    if frag_off != 0 {
        // A later piece of a fragmented datagram: what follows the IP
        // header is payload, never ports.
        if pkt.key.proto != PROTO_TCP && pkt.key.proto != PROTO_UDP {
            return Err(pass(Counter::OtherProto));
        }
        count(Counter::Fragment);
        pkt.kind = KIND_FRAG;
        pkt.l4_off = 0;
        return Ok(pkt);
    }
    if more_frags {
        pkt.frag_first = 1;
    }

    let proto = pkt.key.proto;
    let l4_off = pkt.l4_off;
    let room = ip_end.saturating_sub(l4_off as u64);
    let need = if proto == PROTO_TCP {
        TCP_LEN as u64
    } else {
        UDP_LEN as u64
    };
    if (proto == PROTO_TCP || proto == PROTO_UDP) && room < need {
        return Err(pass(Counter::TruncatedL4));
    }
    let (l4, check_off, tcp_flags) = match proto {
        PROTO_TCP => {
            let l4: *mut [u8; TCP_LEN] =
                ptr_at(ctx, l4_off).map_err(|()| pass(Counter::TruncatedL4))?;
            // SAFETY: bounds-checked by ptr_at.
            let b = unsafe { &*l4 };
            if b[12] >> 4 < 5 {
                return Err(pass(Counter::TruncatedL4));
            }
            (l4.cast::<L4Ports>(), l4_off + 16, b[13])
        }
        PROTO_UDP => {
            let l4: *mut [u8; UDP_LEN] =
                ptr_at(ctx, l4_off).map_err(|()| pass(Counter::TruncatedL4))?;
            (l4.cast::<L4Ports>(), l4_off + 6, 0)
        }
        PROTO_ICMP if pkt.key.family == FAMILY_V4 && pkt.frag_first == 0 => {
            return parse_icmp_error(ctx, pkt, false, ip_end);
        }
        PROTO_ICMPV6 if pkt.key.family == FAMILY_V6 && pkt.frag_first == 0 => {
            return parse_icmp_error(ctx, pkt, true, ip_end);
        }
        // IPv6 extension headers: hop-by-hop, routing, fragment, ESP, AH,
        // destination options, mobility, HIP, shim6, experimental.
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254 if pkt.key.family == FAMILY_V6 => {
            return Err(pass(Counter::Ipv6ExtHeader));
        }
        _ => return Err(pass(Counter::OtherProto)),
    };
    // SAFETY: bounds-checked above.
    let ports = unsafe { &*l4 };
    pkt.check_off = check_off;
    pkt.tcp_flags = tcp_flags;
    pkt.key.sport = u16::from_ne_bytes(ports.sport);
    pkt.key.dport = u16::from_ne_bytes(ports.dport);
    Ok(pkt)
}

/// An ICMP (`v6 == false`) or ICMPv6 error quoting a TCP or UDP packet of
/// the same family with a plain header: `key` becomes the quoted tuple.
/// The quoted header and ports must lie inside the datagram (`ip_end`).
/// Anything else ICMP is not ours (passed untouched).
#[inline(always)]
fn parse_icmp_error<C: Frame>(
    ctx: &C,
    mut pkt: Packet,
    v6: bool,
    ip_end: u64,
) -> Result<Packet, u32> {
    let not_ours = || {
        count(Counter::OtherProto);
        XDP_PASS
    };
    let icmp: *mut [u8; 8] = ptr_at(ctx, pkt.l4_off).map_err(|()| not_ours())?;
    // SAFETY: bounds-checked by ptr_at.
    let ty = unsafe { (*icmp)[0] };
    let error = if v6 {
        // Destination unreachable, packet too big, time exceeded,
        // parameter problem.
        (1..=4).contains(&ty)
    } else {
        // Destination unreachable, time exceeded, parameter problem.
        ty == 3 || ty == 11 || ty == 12
    };
    if !error {
        return Err(not_ours());
    }
    let inner = pkt.l4_off + 8;
    let (proto, ports_off) = if v6 {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, inner).map_err(|()| not_ours())?;
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &*ip };
        pkt.key.src = ip.src;
        pkt.key.dst = ip.dst;
        (ip.nexthdr, inner + IPV6_LEN)
    } else {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, inner).map_err(|()| not_ours())?;
        // SAFETY: bounds-checked by ptr_at.
        let ip = unsafe { &*ip };
        if ip.vihl != 0x45 {
            return Err(not_ours());
        }
        pkt.key.src = [0; 16];
        pkt.key.dst = [0; 16];
        pkt.key.src[..4].copy_from_slice(&ip.src);
        pkt.key.dst[..4].copy_from_slice(&ip.dst);
        (ip.proto, inner + IPV4_LEN)
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(not_ours());
    }
    if ports_off as u64 + 4 > ip_end {
        return Err(not_ours());
    }
    let ports: *mut L4Ports = ptr_at(ctx, ports_off).map_err(|()| not_ours())?;
    // SAFETY: bounds-checked by ptr_at.
    let ports = unsafe { &*ports };
    pkt.key.sport = u16::from_ne_bytes(ports.sport);
    pkt.key.dport = u16::from_ne_bytes(ports.dport);
    pkt.key.proto = proto;
    pkt.kind = KIND_ICMP_ERR;
    pkt.check_off = pkt.l4_off + 2;
    Ok(pkt)
}

/// The flow of a plain TCP or UDP packet (IPv4 without options, IPv6
/// without extension headers), read straight from its headers as they
/// are now, into `key` (whole: every field is written): what XDP keys a
/// handoff by once it has translated a frame, and what the TC handoff
/// program looks up (the same function, so the same key). Anything else:
/// `false`. Counts nothing.
#[inline(always)]
pub fn plain_flow<C: Frame>(ctx: &C, key: &mut FlowKey) -> bool {
    let Ok(eth) = ptr_at::<EthHdr, _>(ctx, 0) else {
        return false;
    };
    // SAFETY: every header pointer is bounds-checked by ptr_at.
    let l4_off = unsafe {
        match (*eth).proto {
            [0x08, 0x00] => {
                let Ok(ip) = ptr_at::<Ipv4Hdr, _>(ctx, ETH_LEN) else {
                    return false;
                };
                let ip = &*ip;
                if ip.vihl != 0x45 || ip.frag[0] & 0x3f != 0 || ip.frag[1] != 0 {
                    return false;
                }
                key.src = [0; 16];
                key.dst = [0; 16];
                key.src[..4].copy_from_slice(&ip.src);
                key.dst[..4].copy_from_slice(&ip.dst);
                key.family = FAMILY_V4;
                key.proto = ip.proto;
                ETH_LEN + IPV4_LEN
            }
            [0x86, 0xdd] => {
                let Ok(ip) = ptr_at::<Ipv6Hdr, _>(ctx, ETH_LEN) else {
                    return false;
                };
                let ip = &*ip;
                key.src = ip.src;
                key.dst = ip.dst;
                key.family = FAMILY_V6;
                key.proto = ip.nexthdr;
                ETH_LEN + IPV6_LEN
            }
            _ => return false,
        }
    };
    if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        return false;
    }
    let Ok(ports) = ptr_at::<L4Ports, _>(ctx, l4_off) else {
        return false;
    };
    // SAFETY: bounds-checked by ptr_at.
    let ports = unsafe { &*ports };
    key.sport = u16::from_ne_bytes(ports.sport);
    key.dport = u16::from_ne_bytes(ports.dport);
    key._pad = [0; 2];
    true
}
