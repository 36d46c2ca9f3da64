//! `NETLINK_SOCK_DIAG`: the UDP sockets of the calling thread's network
//! namespace (a dump) and `SOCK_DESTROY` of one of them, which aborts it
//! (the owner's next call fails with `ECONNABORTED`, and the socket is no
//! longer connected). The socket-level balancer uses it to end connected
//! UDP sockets whose backend went away (see `engine::xdp::socklb`).
//!
//! Encoding and decoding are pure (tested below); `udp_sockets` and
//! `destroy` are the IO, each request with a receive timeout.
#![allow(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr as NlAddr};

const NETLINK_SOCK_DIAG: isize = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;
/// `TCP_ESTABLISHED`: what a connected UDP socket reports.
pub const STATE_CONNECTED: u8 = 1;
const TIMEOUT: Duration = Duration::from_secs(2);

/// One UDP socket as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpSock {
    /// `bpf_get_socket_cookie` of the same socket.
    pub cookie: u64,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// `STATE_CONNECTED` for a connected socket.
    pub state: u8,
    /// The peer (unspecified for an unconnected socket).
    pub dst: SocketAddr,
    /// The kernel's id of it, for `destroy`.
    id: [u8; SOCKID_LEN],
}

/// A request: netlink header and `inet_diag_req_v2`.
fn encode(kind: u16, flags: u16, seq: u32, family: u8, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = NLMSG_HDR + REQ_LEN;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.push(family);
    b.push(libc::IPPROTO_UDP as u8);
    b.push(0); // no extensions
    b.push(0);
    b.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    b.extend_from_slice(id);
    b
}

/// What one received buffer held.
#[derive(Debug, Default, PartialEq, Eq)]
struct Decoded {
    socks: Vec<UdpSock>,
    /// `NLMSG_DONE` seen (a dump's end).
    done: bool,
    /// An `NLMSG_ERROR`'s errno (0: an acknowledgement).
    error: Option<i32>,
}

/// Decodes the messages of one buffer; malformed ones end the decoding.
fn decode(buf: &[u8]) -> Decoded {
    let mut d = Decoded::default();
    let mut at = 0;
    while at + NLMSG_HDR <= buf.len() {
        let h = &buf[at..at + NLMSG_HDR];
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = u16::from_ne_bytes([h[4], h[5]]);
        if len < NLMSG_HDR || at + len > buf.len() {
            break;
        }
        let body = &buf[at + NLMSG_HDR..at + len];
        match kind {
            NLMSG_DONE => d.done = true,
            NLMSG_ERROR if body.len() >= 4 => {
                d.error = Some(-i32::from_ne_bytes([body[0], body[1], body[2], body[3]]));
            }
            SOCK_DIAG_BY_FAMILY if body.len() >= MSG_LEN => {
                if let Some(s) = sock_of(body) {
                    d.socks.push(s);
                }
            }
            _ => {}
        }
        // Messages are 4-byte aligned.
        at += (len + 3) & !3;
    }
    d
}

/// An `inet_diag_msg`.
fn sock_of(m: &[u8]) -> Option<UdpSock> {
    let (family, state) = (m[0], m[1]);
    let id: [u8; SOCKID_LEN] = m[4..4 + SOCKID_LEN].try_into().ok()?;
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let dst: IpAddr = match i32::from(family) {
        libc::AF_INET => Ipv4Addr::new(id[20], id[21], id[22], id[23]).into(),
        libc::AF_INET6 => Ipv6Addr::from(<[u8; 16]>::try_from(&id[20..36]).ok()?).into(),
        _ => return None,
    };
    let lo = u32::from_ne_bytes([id[40], id[41], id[42], id[43]]);
    let hi = u32::from_ne_bytes([id[44], id[45], id[46], id[47]]);
    Some(UdpSock {
        cookie: u64::from(hi) << 32 | u64::from(lo),
        family,
        state,
        dst: SocketAddr::new(dst, dport),
        id,
    })
}

/// A sock_diag socket with a receive timeout.
fn open() -> io::Result<Socket> {
    let mut s = Socket::new(NETLINK_SOCK_DIAG)?;
    s.bind_auto()?;
    s.connect(&NlAddr::new(0, 0))?;
    let tv = libc::timeval {
        tv_sec: TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt(2) reads `tv`, a valid timeval of the given size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s)
}

/// Every UDP socket of `family` (`AF_INET`/`AF_INET6`) in the calling
/// thread's namespace.
pub fn udp_sockets(family: i32) -> io::Result<Vec<UdpSock>> {
    let s = open()?;
    s.send(
        &encode(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, 1, family as u8, &[0; 48]),
        0,
    )?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.recv(&mut &mut buf[..], 0)?;
        let d = decode(&buf[..n]);
        out.extend(d.socks);
        if let Some(e) = d.error.filter(|e| *e != 0) {
            return Err(io::Error::from_raw_os_error(e));
        }
        if d.done || n == 0 {
            return Ok(out);
        }
    }
}

/// Aborts `sock` (`SOCK_DESTROY`): it is no longer connected, and its
/// owner's next call fails with `ECONNABORTED`.
pub fn destroy(sock: &UdpSock) -> io::Result<()> {
    let s = open()?;
    s.send(
        &encode(SOCK_DESTROY, NLM_F_ACK, 2, sock.family, &sock.id),
        0,
    )?;
    let mut buf = vec![0u8; 4096];
    let n = s.recv(&mut &mut buf[..], 0)?;
    match decode(&buf[..n]).error {
        Some(0) | None => Ok(()),
        Some(e) => Err(io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `SOCK_DIAG_BY_FAMILY` message as the kernel sends it.
    fn message(family: u8, state: u8, dst: [u8; 16], dport: u16, cookie: u64) -> Vec<u8> {
        let mut m = vec![family, state, 0, 0];
        let mut id = [0u8; SOCKID_LEN];
        id[0..2].copy_from_slice(&40000u16.to_be_bytes());
        id[2..4].copy_from_slice(&dport.to_be_bytes());
        id[20..36].copy_from_slice(&dst);
        id[40..44].copy_from_slice(&(cookie as u32).to_ne_bytes());
        id[44..48].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        m.extend_from_slice(&id);
        m.extend_from_slice(&[0; 20]);
        let mut b = ((NLMSG_HDR + m.len()) as u32).to_ne_bytes().to_vec();
        b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        b.extend_from_slice(&[0; 10]);
        b.extend_from_slice(&m);
        b
    }

    #[test]
    fn request_layout() {
        let id = [7u8; SOCKID_LEN];
        let b = encode(SOCK_DESTROY, NLM_F_ACK, 9, libc::AF_INET6 as u8, &id);
        assert_eq!(b.len(), 72);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), SOCK_DESTROY);
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), NLM_F_ACK | NLM_F_REQUEST);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 9);
        assert_eq!(b[16], libc::AF_INET6 as u8);
        assert_eq!(b[17], libc::IPPROTO_UDP as u8);
        assert_eq!(&b[20..24], &[0xff; 4]);
        assert_eq!(&b[24..], &id);
    }

    #[test]
    fn decodes_sockets_done_and_errors() {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[10, 201, 2, 2]);
        let v6: [u8; 16] = "fd00:201:2::2".parse::<Ipv6Addr>().unwrap().octets();
        let mut buf = message(libc::AF_INET as u8, 1, v4, 9000, 0x1_0000_0002);
        buf.extend(message(libc::AF_INET6 as u8, 7, v6, 9001, 5));
        let done = [
            20u32.to_ne_bytes().as_slice(),
            &NLMSG_DONE.to_ne_bytes(),
            &[0; 14],
        ]
        .concat();
        buf.extend(done);
        let d = decode(&buf);
        assert!(d.done);
        assert_eq!(d.error, None);
        assert_eq!(d.socks.len(), 2);
        assert_eq!(d.socks[0].cookie, 0x1_0000_0002);
        assert_eq!(d.socks[0].state, STATE_CONNECTED);
        assert_eq!(d.socks[0].dst, "10.201.2.2:9000".parse().unwrap());
        assert_eq!(d.socks[1].dst, "[fd00:201:2::2]:9001".parse().unwrap());
        assert_eq!(d.socks[1].cookie, 5);

        let mut err = 36u32.to_ne_bytes().to_vec();
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        assert_eq!(decode(&err).error, Some(libc::ENOENT));

        // Truncated: nothing, no panic.
        assert_eq!(decode(&buf[..30]), Decoded::default());
    }
}
