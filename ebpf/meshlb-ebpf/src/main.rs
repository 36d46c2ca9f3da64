//! meshlb data plane (XDP and TC): entry points only. The work is split by
//! role: `maps` (every map, one line each on key/value), `parse`
//! (headers), `frame` (the two hooks behind one trait), `csum`
//! (incremental checksums), `lb` (frontend match, then by role: backend
//! selection, conntrack, SNAT, replies, rewrite, fragments, ICMP errors),
//! `fwd` (XDP: next-hop cache, FIB lookup and redirect), `bench` (the
//! benchmarks' bare forwarder and packet generator), `tc`
//! (TC: checksum helpers, redirect, neighbour handoff), `toobig` (ICMP
//! "fragmentation needed" / "packet too big" built in place), `sock`
//! (the socket-level balancer for node-local clients: cgroup hooks).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod bench;
#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod frame;
#[cfg(target_arch = "bpf")]
mod fwd;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod reset;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod tc;
#[cfg(target_arch = "bpf")]
mod toobig;

#[cfg(target_arch = "bpf")]
#[allow(
    clippy::needless_pass_by_value,
    reason = "aya's program macros hand the context over by value"
)]
mod progs {
    use aya_ebpf::{
        bindings::xdp_action,
        macros::{cgroup_sock_addr, classifier, xdp},
        programs::{SockAddrContext, TcContext, XdpContext},
    };

    use crate::sock::{balance, unbalance, V4, V6};

    /// The load balancer: translate service traffic, pass everything else.
    #[xdp]
    pub fn meshlb_xdp(ctx: XdpContext) -> u32 {
        match crate::lb::process(&ctx) {
            Ok(action) | Err(action) => action,
        }
    }

    /// The load balancer for task-facing interfaces (TC ingress): local
    /// senders' packets, whose checksums may be partial; hairpin flows.
    #[classifier]
    pub fn meshlb_tc(ctx: TcContext) -> i32 {
        crate::tc::run(&ctx)
    }

    /// Beside XDP on an uplink (TC ingress): forwards what XDP translated
    /// but could not transmit.
    #[classifier]
    pub fn meshlb_tc_handoff(ctx: TcContext) -> i32 {
        crate::tc::handoff(&ctx)
    }

    /// Passes every packet. Attached to veth peers so that native-mode
    /// redirects into them are delivered.
    #[xdp]
    pub fn meshlb_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    /// The benchmark baseline ("bare forwarder"): parse like the load
    /// balancer, FIB lookup, TTL decrement, MAC rewrite, `XDP_TX` or
    /// redirect. What the load balancer costs on top of this is its own
    /// work.
    #[xdp]
    pub fn meshlb_bare(ctx: XdpContext) -> u32 {
        crate::bench::bare(&ctx)
    }

    /// The benchmark packet generator (`BPF_PROG_TEST_RUN`, live frames):
    /// `XDP_TX` of each frame, IPv4 UDP spread over a few source ports.
    #[xdp]
    pub fn meshlb_gen(ctx: XdpContext) -> u32 {
        crate::bench::generate(&ctx)
    }

    /// Node-local clients (cgroup hooks, see `sock`): TCP connect and UDP
    /// connect to a frontend go to a backend instead.
    #[cgroup_sock_addr(connect4)]
    pub fn meshlb_connect4(ctx: SockAddrContext) -> i32 {
        balance(&ctx, V4)
    }

    /// Unconnected UDP: a datagram to a frontend goes to a backend.
    #[cgroup_sock_addr(sendmsg4)]
    pub fn meshlb_sendmsg4(ctx: SockAddrContext) -> i32 {
        balance(&ctx, V4)
    }

    /// UDP answers of a balanced socket come from the frontend.
    #[cgroup_sock_addr(recvmsg4)]
    pub fn meshlb_recvmsg4(ctx: SockAddrContext) -> i32 {
        unbalance(&ctx, V4)
    }

    /// A balanced socket's peer is the frontend.
    #[cgroup_sock_addr(getpeername4)]
    pub fn meshlb_getpeername4(ctx: SockAddrContext) -> i32 {
        unbalance(&ctx, V4)
    }

    /// `meshlb_connect4` for IPv6.
    #[cgroup_sock_addr(connect6)]
    pub fn meshlb_connect6(ctx: SockAddrContext) -> i32 {
        balance(&ctx, V6)
    }

    /// `meshlb_sendmsg4` for IPv6.
    #[cgroup_sock_addr(sendmsg6)]
    pub fn meshlb_sendmsg6(ctx: SockAddrContext) -> i32 {
        balance(&ctx, V6)
    }

    /// `meshlb_recvmsg4` for IPv6.
    #[cgroup_sock_addr(recvmsg6)]
    pub fn meshlb_recvmsg6(ctx: SockAddrContext) -> i32 {
        unbalance(&ctx, V6)
    }

    /// `meshlb_getpeername4` for IPv6.
    #[cgroup_sock_addr(getpeername6)]
    pub fn meshlb_getpeername6(ctx: SockAddrContext) -> i32 {
        unbalance(&ctx, V6)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("meshlb-ebpf is built for bpfel-unknown-none: cargo xtask build-ebpf");
}
