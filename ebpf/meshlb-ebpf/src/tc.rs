//! The TC (`cls_bpf` / tcx ingress) side: translation with the skb checksum
//! helpers, forwarding by FIB lookup and redirect (or the neighbour
//! subsystem when the next hop is not resolved yet), and the handoff of
//! frames the XDP program translated but could not transmit.
//!
//! Why TC for local senders: a packet from a container or a local process
//! is usually `CHECKSUM_PARTIAL`, its L4 checksum field holding only the
//! pseudo-header seed that the egress device completes. An address change
//! must then move the seed the other way than an RFC 1624 update of a full
//! checksum, and a port change must not touch it at all.
//! `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` does the right thing for
//! partial and complete checksums alike; XDP cannot even tell them apart.

use aya_ebpf::{
    bindings::{
        bpf_check_mtu_flags::BPF_MTU_CHK_SEGS,
        bpf_check_mtu_ret::{BPF_MTU_CHK_RET_FRAG_NEEDED, BPF_MTU_CHK_RET_SEGS_TOOBIG},
        bpf_fib_lookup,
        xdp_action::XDP_PASS,
        xdp_action::XDP_REDIRECT,
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR,
    },
    helpers::{bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use meshlb_common::{Counter, FlowKey, XdpHandoff, FAMILY_V4, FAMILY_V6, HANDOFF_MAGIC, PROTO_UDP};

use crate::{
    frame::Frame,
    fwd::fib_params,
    maps::{count, xdp_meta, MLB_HANDOFF_V1},
    parse::{plain_flow, ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, Packet, ETH_LEN, IPV6_LEN, TCP_LEN},
    toobig,
};

/// `TC_ACT_UNSPEC`: not ours, let the next filter (or the stack) have it.
pub const TC_ACT_UNSPEC: i32 = -1;
/// `TC_ACT_SHOT`: drop.
pub const TC_ACT_SHOT: i32 = 2;
/// `TC_ACT_REDIRECT`: a redirect helper took the packet.
pub const TC_ACT_REDIRECT: i32 = 7;
/// `PACKET_HOST`: addressed to this host's MAC (not bridged past it).
const PACKET_HOST: u32 = 0;

/// The load balancer on an skb: pulls the headers into the linear part,
/// leaves frames not addressed to this host alone, and maps the XDP
/// verdicts `lb::process` returns to TC's.
#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        return TC_ACT_UNSPEC;
    }
    let want = (ETH_LEN + IPV6_LEN + TCP_LEN) as u32;
    let len = ctx.len();
    let _ = ctx.pull_data(if len < want { len } else { want });
    let v = match crate::lb::process(ctx) {
        Ok(v) | Err(v) => v,
    };
    match v {
        aya_ebpf::bindings::xdp_action::XDP_DROP => TC_ACT_SHOT,
        XDP_REDIRECT => TC_ACT_REDIRECT,
        _ => TC_ACT_UNSPEC,
    }
}

/// `Frame::rewrite` for TC: the skb checksum helpers update the IPv4
/// header checksum and the L4 checksum (pseudo-header words with
/// `BPF_F_PSEUDO_HDR`, so a partial checksum's seed moves correctly; port
/// words without it), then the new bytes are stored.
#[inline(never)]
pub fn rewrite(
    ctx: &TcContext,
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
    let mangled = if pkt.key.proto == PROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    // No L4 header (a later fragment): the addresses alone.
    let l4 = pkt.check_off != 0;
    let words = if v4 { 1 } else { 4 };
    let mut i = 0;
    while i < 4 {
        if i >= words {
            break;
        }
        let o = u32::from_ne_bytes([old[i * 4], old[i * 4 + 1], old[i * 4 + 2], old[i * 4 + 3]]);
        let n = u32::from_ne_bytes([new[i * 4], new[i * 4 + 1], new[i * 4 + 2], new[i * 4 + 3]]);
        if v4
            && ctx
                .l3_csum_replace(ETH_LEN + 10, u64::from(o), u64::from(n), 4)
                .is_err()
        {
            return false;
        }
        if l4
            && ctx
                .l4_csum_replace(
                    pkt.check_off,
                    u64::from(o),
                    u64::from(n),
                    u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
                )
                .is_err()
        {
            return false;
        }
        i += 1;
    }
    if l4 {
        if ctx
            .l4_csum_replace(
                pkt.check_off,
                u64::from(old_port),
                u64::from(new_port),
                mangled | 2,
            )
            .is_err()
        {
            return false;
        }
        let port_off = pkt.l4_off + if src_side { 0 } else { 2 };
        if ctx.store(port_off, &new_port, 0).is_err() {
            return false;
        }
    }
    if v4 {
        let off = ETH_LEN + if src_side { 12 } else { 16 };
        let a = [new[0], new[1], new[2], new[3]];
        ctx.store(off, &a, 0).is_ok()
    } else {
        let off = ETH_LEN + if src_side { 8 } else { 24 };
        ctx.store(off, new, 0).is_ok()
    }
}

/// `Frame::forward` for TC: FIB lookup for the new destination, then a
/// redirect to the egress device with the MACs rewritten, or, when the
/// next hop's neighbour entry is not resolved yet, through the neighbour
/// subsystem (`bpf_redirect_neigh`), which resolves it. A packet too big
/// for the egress is answered with an ICMP error (`toobig`). The stack
/// gets only what the FIB cannot route (and a TTL about to expire).
#[inline(never)]
#[allow(
    clippy::unnecessary_wraps,
    reason = "the shape of `Frame::forward`, whose XDP side can fail"
)]
pub fn forward(ctx: &TcContext, pkt: &Packet, done: Counter) -> Result<u32, u32> {
    let Some(mut p) = fib_params(ctx, pkt) else {
        return Ok(XDP_PASS);
    };
    // A GSO skb (a local sender's TSO packet, up to 64 KiB) is checked
    // per segment below, against the egress device; any other packet by
    // the FIB, against the route's MTU.
    // SAFETY: the context pointer is valid for the program's run.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    if gso {
        p.__bindgen_anon_1.tot_len = 0;
    }
    p.ifindex = Frame::ifindex(ctx);
    // SAFETY: ctx and p are valid for the helper's duration.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &raw mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        // SAFETY: the kernel filled mtu_result for this return code.
        let mtu = u32::from(unsafe { p.__bindgen_anon_1.mtu_result });
        return Ok(toobig::TOO_BIG | mtu);
    }
    if gso
        && (rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) || rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH))
    {
        let mut mtu = 0u32;
        // SAFETY: plain helper call; mtu is valid for its duration.
        let r = unsafe {
            bpf_check_mtu(
                ctx.skb.skb.cast(),
                p.ifindex,
                &raw mut mtu,
                0,
                u64::from(BPF_MTU_CHK_SEGS),
            )
        };
        if r == i64::from(BPF_MTU_CHK_RET_FRAG_NEEDED)
            || r == i64::from(BPF_MTU_CHK_RET_SEGS_TOOBIG)
        {
            return Ok(toobig::TOO_BIG | mtu);
        }
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        if !decrement_ttl(ctx, pkt.key.family) {
            return Ok(XDP_PASS);
        }
        if ctx.store(0, &p.dmac, 0).is_err() || ctx.store(6, &p.smac, 0).is_err() {
            return Ok(XDP_PASS);
        }
        count(done);
        // SAFETY: plain helper call.
        let r = unsafe { bpf_redirect(p.ifindex, 0) };
        return Ok(if r == i64::from(TC_ACT_REDIRECT) {
            XDP_REDIRECT
        } else {
            XDP_PASS
        });
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        if !decrement_ttl(ctx, pkt.key.family) {
            return Ok(XDP_PASS);
        }
        count(done);
        return Ok(redirect_neigh(p.ifindex));
    }
    count(Counter::FibPass);
    Ok(XDP_PASS)
}

/// Hands the packet to `ifindex` through the neighbour subsystem.
#[inline(always)]
fn redirect_neigh(ifindex: u32) -> u32 {
    count(Counter::RedirectNeigh);
    // SAFETY: plain helper call; no next-hop parameters (the kernel looks
    // the route up itself).
    let r = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
    if r == i64::from(TC_ACT_REDIRECT) {
        XDP_REDIRECT
    } else {
        XDP_PASS
    }
}

/// Decrements the TTL / hop limit of a packet this node forwards (the FIB
/// lookup already refused those about to expire: `fib_params`).
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, family: u8) -> bool {
    if family == FAMILY_V4 {
        let Ok(ip) = ptr_at::<Ipv4Hdr, _>(ctx, ETH_LEN) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let (ttl, proto) = unsafe { ((*ip).ttl, (*ip).proto) };
        let old = u16::from_ne_bytes([ttl, proto]);
        let new = u16::from_ne_bytes([ttl - 1, proto]);
        if ctx
            .l3_csum_replace(ETH_LEN + 10, u64::from(old), u64::from(new), 2)
            .is_err()
        {
            return false;
        }
        ctx.store(ETH_LEN + 8, &(ttl - 1), 0).is_ok()
    } else {
        let Ok(ip) = ptr_at::<Ipv6Hdr, _>(ctx, ETH_LEN) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        let hl = unsafe { (*ip).hop_limit };
        ctx.store(ETH_LEN + 7, &(hl - 1), 0).is_ok()
    }
}

/// The handoff program beside XDP on an uplink: a frame the XDP program
/// translated but could not transmit carries `XdpHandoff` metadata naming
/// the egress device; it leaves through the neighbour subsystem (which
/// resolves the next hop) after its TTL is decremented. Everything else is
/// not ours.
///
/// Where the kernel refuses XDP metadata (`xdp_meta`), XDP recorded the
/// handoff under the translated flow in `MLB_HANDOFF_V1` instead: the
/// packet's own flow is looked up there.
#[inline(always)]
pub fn handoff(ctx: &TcContext) -> i32 {
    let egress = if xdp_meta() {
        // SAFETY: the context pointer is valid for the program's run.
        let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta as usize, ctx.data()) };
        if meta + core::mem::size_of::<XdpHandoff>() > data {
            return TC_ACT_UNSPEC;
        }
        // SAFETY: bounds-checked against data just above.
        let h = unsafe { *(meta as *const XdpHandoff) };
        if h.magic != HANDOFF_MAGIC || h.ingress != crate::frame::Frame::ifindex(ctx) {
            return TC_ACT_UNSPEC;
        }
        // Used up: metadata travels with the skb (across a veth, too), and
        // must not be taken for a handoff anywhere else.
        // SAFETY: bounds-checked as above.
        unsafe { (*(meta as *mut XdpHandoff)).magic = 0 };
        h.ifindex
    } else {
        0
    };
    let want = (ETH_LEN + IPV6_LEN + TCP_LEN) as u32;
    let len = ctx.len();
    let _ = ctx.pull_data(if len < want { len } else { want });
    let egress = if egress != 0 {
        egress
    } else {
        // The map is this host's own: a frame handed off here is never
        // taken by another host on the same kernel.
        let mut key = FlowKey::default();
        if !plain_flow(ctx, &mut key) {
            return TC_ACT_UNSPEC;
        }
        // SAFETY: hash map value, read at once.
        match unsafe { MLB_HANDOFF_V1.get(&key) } {
            Some(h) if h.ingress == crate::frame::Frame::ifindex(ctx) => h.ifindex,
            _ => return TC_ACT_UNSPEC,
        }
    };
    // XDP parsed and translated it: only the family is needed here.
    let Ok(eth) = ptr_at::<EthHdr, _>(ctx, 0) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: bounds-checked by ptr_at.
    let family = match unsafe { (*eth).proto } {
        [0x08, 0x00] => FAMILY_V4,
        [0x86, 0xdd] => FAMILY_V6,
        _ => return TC_ACT_UNSPEC,
    };
    if !decrement_ttl(ctx, family) {
        return TC_ACT_UNSPEC;
    }
    match redirect_neigh(egress) {
        XDP_REDIRECT => TC_ACT_REDIRECT,
        _ => TC_ACT_UNSPEC,
    }
}
