//! The two hooks the load balancer runs in, behind one trait, so the
//! decision spine (`lb`) is written once:
//! * XDP on uplinks: frames from the wire carry complete checksums, which
//!   RFC 1624 updates keep right (`lb::rewrite_xdp`, `fwd::forward`);
//! * TC ingress on task-facing interfaces (bridges, veths toward local
//!   tasks): an skb from a local sender is often `CHECKSUM_PARTIAL` (its L4
//!   checksum field holds only the pseudo-header seed), which only the skb
//!   checksum helpers update correctly (`tc::rewrite`, `tc::forward`).

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        xdp_action::{XDP_DROP, XDP_REDIRECT, XDP_TX},
    },
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
};
use meshlb_common::Counter;

use crate::parse::Packet;

/// A packet buffer the load balancer can parse, translate and forward.
pub trait Frame {
    /// Whether this hook sees local senders: a new flow from one to a
    /// local backend is then a hairpin (source-translated).
    const LOCAL_SENDERS: bool;
    /// Start of the directly readable packet bytes.
    fn data(&self) -> usize;
    /// End of the directly readable packet bytes.
    fn data_end(&self) -> usize;
    /// The interface the packet came in on.
    fn ifindex(&self) -> u32;
    /// The packet's length (all of it, for counters and length checks).
    fn frame_len(&self) -> u64;
    /// Replaces the destination (`src_side == false`) or source address
    /// and port with `new`/`new_port`, checksums included. `false`:
    /// headers out of bounds.
    fn rewrite(&self, pkt: &Packet, new: &[u8; 16], new_port: u16, src_side: bool) -> bool;
    /// Sends the translated packet on towards its (new) destination, or
    /// reports it too big for its egress (`toobig::TOO_BIG` | MTU). `hop`:
    /// the cached next hop it may use (XDP; TC always asks the FIB).
    fn forward(&self, pkt: &Packet, done: Counter, hop: Hop) -> Result<u32, u32>;
    /// Cuts the frame of `len` bytes (`Packet::len`) to its first `keep`
    /// bytes, then opens `grow` bytes (maybe none) behind the Ethernet
    /// header (for an answer built in place: `toobig`, `reset`). Packet pointers must be
    /// re-derived afterwards.
    fn reshape(&self, len: u64, keep: u32, grow: u32) -> bool;
    /// Sends the (rewritten) frame back out the interface it came in on;
    /// the verdict is XDP's.
    fn bounce(&self) -> u32;
}

/// The cached next hop a translated packet may take: that of the backend
/// it now goes to (`maps::MLB_NH_V1`), or with `HOP_BY_ADDR` that of its
/// destination address (`maps::MLB_NHADDR_V1`: replies, whose
/// destination is a client), judged fresh against `now` (the flow clock;
/// for a client packet as its conntrack entry was just stamped, so that a
/// hit reads no clock of its own). `Hop::NONE`: ask the FIB (fragments,
/// ICMP errors). One 64-bit word, so that it travels in one register (BPF
/// calls take five).
#[derive(Clone, Copy)]
pub struct Hop(u64);

/// `Hop::backend_id` of a packet whose next hop is cached by destination
/// address (no backend id is this large).
pub const HOP_BY_ADDR: u32 = meshlb_common::NO_BACKEND - 1;

impl Hop {
    pub const NONE: Hop = Hop::new(meshlb_common::NO_BACKEND, 0);

    #[inline(always)]
    pub const fn new(backend_id: u32, now: u32) -> Hop {
        Hop((backend_id as u64) << 32 | now as u64)
    }

    #[inline(always)]
    pub const fn backend_id(self) -> u32 {
        (self.0 >> 32) as u32
    }

    #[inline(always)]
    pub const fn now(self) -> u32 {
        self.0 as u32
    }
}

// The packet bounds are read with volatile loads: a subprogram that only
// reads them through the context would otherwise get them as promoted
// plain arguments (LLVM's argument promotion), and the verifier refuses
// arithmetic on a packet-end value that was passed that way.

impl Frame for XdpContext {
    const LOCAL_SENDERS: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { core::ptr::read_volatile(&raw const (*self.ctx).data) as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&raw const (*self.ctx).data_end) as usize }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn frame_len(&self) -> u64 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u64
    }

    #[inline(always)]
    fn rewrite(&self, pkt: &Packet, new: &[u8; 16], new_port: u16, src_side: bool) -> bool {
        crate::lb::rewrite_xdp(self, pkt, new, new_port, src_side)
    }

    #[inline(always)]
    fn forward(&self, pkt: &Packet, done: Counter, hop: Hop) -> Result<u32, u32> {
        Ok(crate::fwd::forward(self, pkt, done, hop))
    }

    #[inline(always)]
    fn reshape(&self, len: u64, keep: u32, grow: u32) -> bool {
        // (The length comes from the parser: arithmetic on the packet end
        // here would be refused by the verifier.)
        // SAFETY: plain helper calls on a valid context.
        unsafe {
            bpf_xdp_adjust_tail(self.ctx, keep as i32 - len as i32) == 0
                && (grow == 0 || bpf_xdp_adjust_head(self.ctx, -(grow as i32)) == 0)
        }
    }

    #[inline(always)]
    fn bounce(&self) -> u32 {
        XDP_TX
    }
}

impl Frame for TcContext {
    const LOCAL_SENDERS: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { core::ptr::read_volatile(&raw const (*self.skb.skb).data) as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&raw const (*self.skb.skb).data_end) as usize }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn frame_len(&self) -> u64 {
        u64::from(self.len())
    }

    #[inline(always)]
    fn rewrite(&self, pkt: &Packet, new: &[u8; 16], new_port: u16, src_side: bool) -> bool {
        crate::tc::rewrite(self, pkt, new, new_port, src_side)
    }

    #[inline(always)]
    fn forward(&self, pkt: &Packet, done: Counter, _hop: Hop) -> Result<u32, u32> {
        crate::tc::forward(self, pkt, done)
    }

    #[inline(always)]
    fn reshape(&self, _len: u64, keep: u32, grow: u32) -> bool {
        // SAFETY: plain helper call on a valid context.
        let cut = unsafe { bpf_skb_change_tail(self.skb.skb, keep, 0) } == 0;
        cut && (grow == 0 || self.adjust_room(grow as i32, BPF_ADJ_ROOM_MAC, 0).is_ok())
    }

    #[inline(always)]
    fn bounce(&self) -> u32 {
        // SAFETY: plain helper call.
        let r = unsafe { bpf_redirect(Frame::ifindex(self), 0) };
        if r == i64::from(crate::tc::TC_ACT_REDIRECT) {
            XDP_REDIRECT
        } else {
            XDP_DROP
        }
    }
}
