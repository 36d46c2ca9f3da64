//! Socket-level balancing for node-local clients (cgroup v2 `sock_addr`
//! hooks): a process of this node (or of one of its containers) that
//! connects or sends to a frontend (a VIP:port, or a published port on a
//! node address or on loopback) has the destination rewritten to a backend
//! before the kernel routes anything, so no packet of it needs NAT. The
//! frontend is remembered per socket (`MLB_SOCKREV_V1`) and reported back
//! by `getpeername` and `recvmsg`.
//!
//! The programs run for every socket under the cgroup they are attached
//! to, in every network namespace: they act only for namespaces the
//! daemon listed in `MLB_SOCKNS_V1` and return 1 ("go on") for all else.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
    EbpfContext,
};
use meshlb_common::{
    hash::socket_slot, AddrKey, FrontendKey, SockRevKey, SockRevValue, FAMILY_V4, FAMILY_V6,
    NO_BACKEND, PROTO_TCP, PROTO_UDP, RING_HALF, SOCK_SLOT_TRIES,
};

use crate::maps::{
    RingsDef, MLB_BE_V1, MLB_BSTAT_V1, MLB_FE_V1, MLB_LOCAL_V1, MLB_RING_V1, MLB_SOCKNS_V1,
    MLB_SOCKREV_V1, MLB_SSTAT_V1,
};

/// What every hook returns: let the call go on (0 would fail it).
const GO_ON: i32 = 1;

/// The socket's address as the hook sees it: destination (connect,
/// sendmsg) or peer (recvmsg, getpeername).
struct SockAddr {
    addr: [u8; 16],
    /// Network byte order.
    port: u16,
    family: u8,
    proto: u8,
}

/// Whether this socket's namespace is one the daemon serves.
#[inline(always)]
fn served(ctx: &SockAddrContext) -> bool {
    // SAFETY: a helper of sock_addr programs, on their context.
    let ns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    MLB_SOCKNS_V1.get_ptr(&ns).is_some()
}

/// Reads the address of the context (`family` says which fields). Each
/// field by one aligned 32-bit load: the verifier refuses wider loads of
/// the context's address words.
#[inline(always)]
fn read(sa: *const bpf_sock_addr, family: u8) -> Option<SockAddr> {
    // SAFETY (each read): `sa` is the program's context; every field is a
    // u32 the kernel lets sock_addr programs read.
    let proto = match unsafe { read_volatile(&raw const (*sa).protocol) } {
        6 => PROTO_TCP,
        17 => PROTO_UDP,
        _ => return None,
    };
    let mut addr = [0u8; 16];
    if family == FAMILY_V4 {
        let w = unsafe { read_volatile(&raw const (*sa).user_ip4) };
        addr[..4].copy_from_slice(&w.to_ne_bytes());
    } else {
        for i in 0..4 {
            let w = unsafe { read_volatile(&raw const (*sa).user_ip6[i]) };
            addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
    }
    // The kernel keeps the port's two bytes, network order, in the low
    // half of the word.
    let port = unsafe { read_volatile(&raw const (*sa).user_port) } as u16;
    Some(SockAddr {
        addr,
        port,
        family,
        proto,
    })
}

/// Writes `addr`/`port` into the context (the family's fields), one
/// aligned 32-bit store each, as the verifier requires.
#[inline(always)]
fn write(sa: *mut bpf_sock_addr, addr: &[u8; 16], port: u16, family: u8) {
    // SAFETY (each write): `sa` is the program's context; these fields
    // are writable in every hook the programs attach to.
    if family == FAMILY_V4 {
        let w = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
        unsafe { write_volatile(&raw mut (*sa).user_ip4, w) };
    } else {
        for i in 0..4 {
            let w = u32::from_ne_bytes([
                addr[i * 4],
                addr[i * 4 + 1],
                addr[i * 4 + 2],
                addr[i * 4 + 3],
            ]);
            unsafe { write_volatile(&raw mut (*sa).user_ip6[i], w) };
        }
    }
    unsafe { write_volatile(&raw mut (*sa).user_port, u32::from(port)) };
}

/// `127.0.0.0/8` or `::1`: a published port on loopback.
#[inline(always)]
fn is_loopback(a: &SockAddr) -> bool {
    if a.family == FAMILY_V4 {
        a.addr[0] == 127
    } else {
        a.addr[..15] == [0; 15] && a.addr[15] == 1
    }
}

/// `::ffff:0:0/96`.
#[inline(always)]
fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..10] == [0; 10] && a[10] == 0xff && a[11] == 0xff
}

/// The service of a frontend: exact (VIP) first, then a published port
/// on one of this node's addresses or on loopback.
#[inline(always)]
fn service_of(a: &SockAddr) -> Option<u32> {
    let mut fk = FrontendKey {
        addr: a.addr,
        port: a.port,
        proto: a.proto,
        family: a.family,
    };
    if let Some(v) = MLB_FE_V1.get_ptr(&fk) {
        // SAFETY: hash map value, read at once.
        return Some(unsafe { (*v).service_id });
    }
    let ak = AddrKey {
        addr: a.addr,
        family: a.family,
        _pad: [0; 3],
    };
    if !is_loopback(a) && MLB_LOCAL_V1.get_ptr(&ak).is_none() {
        return None;
    }
    fk.addr = [0; 16];
    // SAFETY: as above.
    MLB_FE_V1.get_ptr(&fk).map(|v| unsafe { (*v).service_id })
}

/// connect and sendmsg: a frontend becomes one of its backends, chosen on
/// the service's Maglev ring by the socket's cookie (one socket keeps its
/// backend while the ring keeps it), and the frontend is remembered for
/// the answers. A frontend without a usable backend is left alone.
#[inline(always)]
pub fn balance(ctx: &SockAddrContext, family: u8) -> i32 {
    if !served(ctx) {
        return GO_ON;
    }
    let sa = ctx.sock_addr;
    let Some(a) = read(sa, family) else {
        return GO_ON;
    };
    // An IPv6 socket to an IPv4-mapped address (`::ffff:a.b.c.d`) talks
    // IPv4: the frontend and the backend are IPv4 ones, the backend
    // written back mapped (what the socket then reports, and is keyed by).
    let mapped = family == FAMILY_V6 && is_v4_mapped(&a.addr);
    let mut fa = SockAddr {
        addr: a.addr,
        port: a.port,
        family,
        proto: a.proto,
    };
    if mapped {
        fa.addr = [0; 16];
        fa.addr[..4].copy_from_slice(&a.addr[12..]);
        fa.family = FAMILY_V4;
    }
    let Some(service_id) = service_of(&fa) else {
        return GO_ON;
    };
    let Some((ring, header)) = MLB_RING_V1.ring(service_id) else {
        return GO_ON;
    };
    let m = header & !RING_HALF;
    if m == 0 {
        return GO_ON;
    }
    // SAFETY: a helper of sock_addr programs, on their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let first = socket_slot(cookie, a.port, m);
    let mut chosen = NO_BACKEND;
    for i in 0..SOCK_SLOT_TRIES {
        let slot = (first + i) % m;
        let Some(id) = RingsDef::backend(ring, header, slot) else {
            break;
        };
        if matches!(MLB_BE_V1.get(id), Some(b) if b.takes_new_flows(service_id, fa.family)) {
            chosen = id;
            break;
        }
    }
    let Some(be) = MLB_BE_V1.get(chosen) else {
        return GO_ON;
    };
    let mut to = be.addr;
    if mapped {
        to = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0];
        to[12..].copy_from_slice(&be.addr[..4]);
    }
    let key = SockRevKey {
        cookie,
        addr: to,
        port: be.port,
        family,
        _pad: [0; 5],
    };
    let value = SockRevValue {
        addr: a.addr,
        port: a.port,
        family,
        proto: a.proto,
        service_id,
        backend_id: chosen,
        _pad: 0,
    };
    // A connection: the socket's first use of this backend (an
    // unconnected socket's later datagrams to it are not new ones).
    let fresh = MLB_SOCKREV_V1.get_ptr(&key).is_none();
    if MLB_SOCKREV_V1.insert(&key, &value, 0).is_err() {
        // Without the entry the answers would name the backend: better
        // not balanced than misreported.
        return GO_ON;
    }
    write(sa, &to, be.port, family);
    if fresh {
        count_connection(service_id, chosen);
    }
    GO_ON
}

/// One more connection (no packet: the socket's packets are the
/// kernel's own) on the backend's and the service's counters. One map
/// at a time: `maps::account`'s loop over both lets LLVM merge the two
/// null checks into a pointer OR, which the verifier refuses here.
#[inline(never)]
fn count_connection(service_id: u32, backend_id: u32) {
    if let Some(p) = MLB_BSTAT_V1.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { (*p).connections += 1 };
    }
    if let Some(p) = MLB_SSTAT_V1.get_ptr_mut(service_id) {
        // SAFETY: as above.
        unsafe { (*p).connections += 1 };
    }
}

/// recvmsg and getpeername: a backend this socket was balanced to is
/// reported as the frontend the socket asked for.
#[inline(always)]
pub fn unbalance(ctx: &SockAddrContext, family: u8) -> i32 {
    if !served(ctx) {
        return GO_ON;
    }
    let sa = ctx.sock_addr;
    let Some(a) = read(sa, family) else {
        return GO_ON;
    };
    // SAFETY: a helper of sock_addr programs, on their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut key = SockRevKey {
        cookie,
        addr: a.addr,
        port: a.port,
        family,
        _pad: [0; 5],
    };
    let mut found = MLB_SOCKREV_V1.get_ptr(&key);
    // An IPv6 socket's unconnected datagram to an IPv4-mapped address
    // went through the IPv4 send hook (the kernel hands it to IPv4
    // first), so it was recorded as IPv4: its answers arrive mapped.
    if found.is_none() && family == FAMILY_V6 && is_v4_mapped(&a.addr) {
        key.addr = [0; 16];
        key.addr[..4].copy_from_slice(&a.addr[12..]);
        key.family = FAMILY_V4;
        found = MLB_SOCKREV_V1.get_ptr(&key);
    }
    if let Some(v) = found {
        // SAFETY: LRU map value, copied out at once.
        let v = unsafe { *v };
        let mut back = v.addr;
        if v.family == FAMILY_V4 && family == FAMILY_V6 {
            back = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0];
            back[12..].copy_from_slice(&v.addr[..4]);
        }
        write(sa, &back, v.port, family);
    }
    GO_ON
}

/// The families, for the entry points.
pub const V4: u8 = FAMILY_V4;
pub const V6: u8 = FAMILY_V6;
