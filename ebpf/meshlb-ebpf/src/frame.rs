//! The two hooks the load balancer runs in, behind one trait, so the
//! decision spine (`lb`) is written once:
//! * XDP on uplinks: frames from the wire carry complete checksums, which
//!   RFC 1624 updates keep right (`lb::rewrite_xdp`, `fwd::forward`);
//! * TC ingress on task-facing interfaces (bridges, veths toward local
//!   tasks): an skb from a local sender is often CHECKSUM_PARTIAL (its L4
//!   checksum field holds only the pseudo-header seed), which only the skb
//!   checksum helpers update correctly (`tc::rewrite`, `tc::forward`).

use aya_ebpf::programs::{TcContext, XdpContext};
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
    /// Sends the translated packet on towards its (new) destination.
    fn forward(&self, pkt: &Packet, done: Counter) -> Result<u32, u32>;
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
        unsafe { core::ptr::read_volatile(&(*self.ctx).data) as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&(*self.ctx).data_end) as usize }
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
    fn forward(&self, pkt: &Packet, done: Counter) -> Result<u32, u32> {
        crate::fwd::forward(self, pkt, done)
    }
}

impl Frame for TcContext {
    const LOCAL_SENDERS: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { core::ptr::read_volatile(&(*self.skb.skb).data) as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&(*self.skb.skb).data_end) as usize }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn frame_len(&self) -> u64 {
        self.len() as u64
    }

    #[inline(always)]
    fn rewrite(&self, pkt: &Packet, new: &[u8; 16], new_port: u16, src_side: bool) -> bool {
        crate::tc::rewrite(self, pkt, new, new_port, src_side)
    }

    #[inline(always)]
    fn forward(&self, pkt: &Packet, done: Counter) -> Result<u32, u32> {
        crate::tc::forward(self, pkt, done)
    }
}
