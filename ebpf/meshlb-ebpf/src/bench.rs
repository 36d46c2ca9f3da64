//! Programs of the benchmarks, never attached by the daemon: the bare
//! forwarder (`meshlb_bare`, the reference every ratio of the data-path
//! benchmarks is taken against) and the packet generator (`meshlb_gen`,
//! run through `BPF_PROG_TEST_RUN` in live-frames mode).

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_PASS, XDP_TX},
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::bpf_get_prandom_u32,
    programs::XdpContext,
};

use crate::{
    fwd::{emit, fib_params, lookup},
    parse::{parse, ptr_at, EthHdr, Ipv4Hdr, L4Ports, Packet, ETH_LEN, IPV4_LEN},
};

/// What any routing XDP program must do, and nothing more: parse the
/// headers (the load balancer's parser), look the destination up in the
/// FIB, decrement the TTL / hop limit, rewrite the MACs and transmit
/// (`XDP_TX` back out of the ingress, else a redirect). What the FIB
/// cannot resolve goes up (`XDP_PASS`). No map is touched.
#[inline(always)]
pub fn bare(ctx: &XdpContext) -> u32 {
    let Ok(pkt) = parse(ctx) else {
        return XDP_PASS;
    };
    route(ctx, &pkt)
}

/// The bare forwarder's FIB lookup and transmit: a subprogram of its own,
/// so that its lookup parameters and the parser's frame are never on the
/// stack together.
#[inline(never)]
fn route(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let Some(mut p) = fib_params(ctx, pkt) else {
        return XDP_PASS;
    };
    if lookup(ctx, &mut p) != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return XDP_PASS;
    }
    emit(ctx, pkt, p.ifindex, &p.smac, &p.dmac)
}

/// UDP source ports the generator spreads its frames over (low bits).
const GEN_FLOWS: u32 = 16;

/// The packet generator: each frame leaves by `XDP_TX` (in live-frames
/// mode: transmitted out of the test run's ingress interface). An IPv4
/// UDP frame first gets one of `GEN_FLOWS` source ports (the low bits of
/// the one it carries, chosen at random) and its UDP checksum cleared
/// (optional in IPv4), so that one template frame makes a few flows.
#[inline(always)]
pub fn generate(ctx: &XdpContext) -> u32 {
    // SAFETY: every header pointer is bounds-checked by ptr_at.
    unsafe {
        let Ok(eth) = ptr_at::<EthHdr, _>(ctx, 0) else {
            return XDP_TX;
        };
        let Ok(ip) = ptr_at::<Ipv4Hdr, _>(ctx, ETH_LEN) else {
            return XDP_TX;
        };
        if (*eth).proto != [0x08, 0x00] || (*ip).vihl != 0x45 || (*ip).proto != 17 {
            return XDP_TX;
        }
        let Ok(udp) = ptr_at::<[u8; 8], _>(ctx, ETH_LEN + IPV4_LEN) else {
            return XDP_TX;
        };
        let ports = udp.cast::<L4Ports>();
        let low = (bpf_get_prandom_u32() % GEN_FLOWS) as u16;
        let sport = u16::from_be_bytes((*ports).sport);
        (*ports).sport = ((sport & !(GEN_FLOWS as u16 - 1)) | low).to_be_bytes();
        (*udp)[6] = 0;
        (*udp)[7] = 0;
    }
    XDP_TX
}
