//! Header layouts and the parser. Only plain Ethernet + IPv4 (no options,
//! not fragmented) or IPv6 (no extension headers) + TCP/UDP is parsed;
//! everything else is passed to the stack untouched with a counter saying
//! why. Headers are byte arrays so no access is ever unaligned.

use aya_ebpf::{bindings::xdp_action::XDP_PASS, programs::XdpContext};
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

/// A parsed packet: the facts the load balancer needs. Header offsets, not
/// pointers: writers re-derive bounds-checked pointers with `ptr_at`, so
/// the verifier sees the check on every path (it loses track of which
/// family a spilled struct describes).
pub struct Packet {
    /// Offset of the L4 header (34 for IPv4, 54 for IPv6).
    pub l4_off: usize,
    /// Offset of the L4 checksum field.
    pub check_off: usize,
    /// The flow in the packet's direction (addresses, ports, proto, family).
    pub key: FlowKey,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Bytes on the wire (frame length), for counters.
    pub len: u64,
    /// The interface the packet came in on.
    pub ifindex: u32,
}

/// A bounds-checked pointer to a `T` at `off` bytes into the packet.
#[inline(always)]
pub fn ptr_at<T, C: Frame>(ctx: &C, off: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *mut T)
}

/// Parses a frame. `Err(XDP_PASS)` means: not ours, pass it untouched (the
/// reason is counted).
#[inline(always)]
pub fn parse<C: Frame>(ctx: &C) -> Result<Packet, u32> {
    let pass = |c: Counter| {
        count(c);
        XDP_PASS
    };
    let eth: *mut EthHdr = ptr_at(ctx, 0).map_err(|_| pass(Counter::TruncatedEth))?;
    // SAFETY: bounds-checked by ptr_at.
    let ethertype = unsafe { (*eth).proto };
    let len = ctx.frame_len();

    let (family, proto, src, dst, l4_off) = if ethertype == ETH_P_IP {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_LEN).map_err(|_| pass(Counter::MalformedIp))?;
        // SAFETY: bounds-checked by ptr_at.
        let ip_ref = unsafe { &*ip };
        if ip_ref.vihl >> 4 != 4 || ip_ref.vihl & 0x0f < 5 {
            return Err(pass(Counter::MalformedIp));
        }
        if ip_ref.vihl & 0x0f != 5 {
            return Err(pass(Counter::IpOptions));
        }
        let tot_len = u16::from_be_bytes(ip_ref.tot_len) as u64;
        if tot_len < IPV4_LEN as u64 || tot_len + ETH_LEN as u64 > len {
            return Err(pass(Counter::MalformedIp));
        }
        // More-fragments flag or a fragment offset: not the first (or
        // only) piece of a datagram we could translate.
        if ip_ref.frag[0] & 0x3f != 0 || ip_ref.frag[1] != 0 {
            return Err(pass(Counter::Fragment));
        }
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src[..4].copy_from_slice(&ip_ref.src);
        dst[..4].copy_from_slice(&ip_ref.dst);
        (FAMILY_V4, ip_ref.proto, src, dst, ETH_LEN + IPV4_LEN)
    } else if ethertype == ETH_P_IPV6 {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_LEN).map_err(|_| pass(Counter::MalformedIp))?;
        // SAFETY: bounds-checked by ptr_at.
        let ip_ref = unsafe { &*ip };
        if ip_ref.vtcfl[0] >> 4 != 6 {
            return Err(pass(Counter::MalformedIp));
        }
        let payload = u16::from_be_bytes(ip_ref.payload_len) as u64;
        if payload + (ETH_LEN + IPV6_LEN) as u64 > len {
            return Err(pass(Counter::MalformedIp));
        }
        (
            FAMILY_V6,
            ip_ref.nexthdr,
            ip_ref.src,
            ip_ref.dst,
            ETH_LEN + IPV6_LEN,
        )
    } else if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return Err(pass(Counter::Vlan));
    } else {
        return Err(pass(Counter::NotService));
    };

    let (l4, check_off, tcp_flags) = match proto {
        PROTO_TCP => {
            let l4: *mut [u8; TCP_LEN] =
                ptr_at(ctx, l4_off).map_err(|_| pass(Counter::TruncatedL4))?;
            // SAFETY: bounds-checked by ptr_at.
            let b = unsafe { &*l4 };
            if b[12] >> 4 < 5 {
                return Err(pass(Counter::TruncatedL4));
            }
            (l4 as *mut L4Ports, l4_off + 16, b[13])
        }
        PROTO_UDP => {
            let l4: *mut [u8; UDP_LEN] =
                ptr_at(ctx, l4_off).map_err(|_| pass(Counter::TruncatedL4))?;
            (l4 as *mut L4Ports, l4_off + 6, 0)
        }
        // IPv6 extension headers: hop-by-hop, routing, fragment, ESP, AH,
        // destination options, mobility, HIP, shim6, experimental.
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254 if family == FAMILY_V6 => {
            return Err(pass(Counter::Ipv6ExtHeader));
        }
        _ => return Err(pass(Counter::OtherProto)),
    };
    // SAFETY: bounds-checked above.
    let ports = unsafe { &*l4 };
    Ok(Packet {
        l4_off,
        check_off,
        key: FlowKey {
            src,
            dst,
            sport: u16::from_ne_bytes(ports.sport),
            dport: u16::from_ne_bytes(ports.dport),
            proto,
            family,
            _pad: [0; 2],
        },
        tcp_flags,
        len,
        ifindex: ctx.ifindex(),
    })
}

/// Parses like the load balancer, then bounces the frame back out with the
/// MACs swapped (the microbenchmark's baseline).
#[inline(always)]
pub fn bare_forward(ctx: &XdpContext) -> u32 {
    match parse(ctx) {
        Ok(p) if p.len > 0 => {}
        _ => return XDP_PASS,
    }
    let Ok(eth) = ptr_at::<EthHdr, _>(ctx, 0) else {
        return XDP_PASS;
    };
    // SAFETY: bounds-checked by ptr_at.
    let eth = unsafe { &mut *eth };
    core::mem::swap(&mut eth.dst, &mut eth.src);
    aya_ebpf::bindings::xdp_action::XDP_TX
}
