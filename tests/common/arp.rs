//! Layer 2 as a host on the switch sees it, for the tests of announced
//! VIPs: who answers an ARP request or a neighbour solicitation for an
//! address ([`arp_who_has`], [`ns_who_has`]), which gratuitous ARPs and
//! unsolicited neighbour advertisements go by ([`Capture`]), and the MACs
//! the kernel holds ([`neigh_mac`], [`link_mac`]).
//!
//! Frames are sent and read on raw `AF_PACKET` sockets bound to one
//! interface inside a namespace (a thread that entered it). Every read has
//! a deadline; a frame that is short, truncated or of another kind is
//! skipped, never a panic. Setup failures (no such namespace or interface)
//! panic: they are the harness's, not the product's.
//!
//! A probe from an address the namespace does not hold (the tests use
//! [`PROBE_V4`], [`PROBE_V6`]) is sent from a MAC of its own
//! ([`probe_mac`]): the answers go to that MAC, which the namespace's
//! kernel drops as not its own while the raw socket still reads them, so
//! probing never touches the neighbour entries a test checks.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::ifaddrs::getifaddrs;
use nix::sys::socket::{
    bind, recvfrom, send, setsockopt, socket, sockopt, AddressFamily, LinkAddr, MsgFlags, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::{TimeVal, TimeValLike};
use serde_json::Value;

use super::{enter_netns, in_netns, must, run_cmd};

/// An Ethernet address.
pub type Mac = [u8; 6];

/// A source address on the switch subnet that no namespace holds, for
/// probes that must not disturb the client's own neighbour table.
pub const PROBE_V4: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 200);
/// [`PROBE_V4`] for IPv6 (in fd00:210::/64).
pub const PROBE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 0x200);

/// How long [`Capture`] runs at most when nobody stops it.
const CAPTURE_MAX: Duration = Duration::from_secs(300);

const ETH_ARP: u16 = 0x0806;
const ETH_IPV6: u16 = 0x86dd;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const ICMPV6: u8 = 58;
const ND_SOLICIT: u8 = 135;
const ND_ADVERT: u8 = 136;
/// NA flags (RFC 4861 4.4).
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;
/// `sll_pkttype` of a frame this host sent (`PACKET_OUTGOING`).
const PACKET_OUTGOING: u8 = 4;
const BROADCAST: Mac = [0xff; 6];
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_str(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (any case).
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut m = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// A set of MACs, readable in a failure message.
pub fn macs_str(set: &BTreeSet<Mac>) -> String {
    let v: Vec<String> = set.iter().map(|m| mac_str(*m)).collect();
    format!("{{{}}}", v.join(", "))
}

/// The locally administered MAC a probe from `src` is sent from:
/// `02:00` and the address's last four bytes.
pub fn probe_mac(src: IpAddr) -> Mac {
    let tail: [u8; 4] = match src {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => {
            let o = a.octets();
            [o[12], o[13], o[14], o[15]]
        }
    };
    [0x02, 0x00, tail[0], tail[1], tail[2], tail[3]]
}

/// The MAC of interface `iface` in namespace `ns`.
pub fn link_mac(ns: &str, iface: &str) -> Mac {
    let out = must(&["ip", "-n", ns, "-j", "link", "show", "dev", iface]);
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("ip -j link show dev {iface} in {ns}: {e}: {out}"));
    v[0]["address"]
        .as_str()
        .and_then(parse_mac)
        .unwrap_or_else(|| panic!("no MAC for {iface} in {ns}: {out}"))
}

/// The MAC the kernel of namespace `ns` holds for neighbour `ip` on
/// `iface`, if it holds one (an entry being resolved or failed has none).
pub fn neigh_mac(ns: &str, iface: &str, ip: IpAddr) -> Option<Mac> {
    let text = ip.to_string();
    let out = run_cmd(
        &[
            "ip", "-n", ns, "-j", "neigh", "show", "to", &text, "dev", iface,
        ],
        Duration::from_secs(10),
    );
    if !out.success() {
        return None;
    }
    let v: Value = serde_json::from_str(out.stdout.trim()).ok()?;
    v.as_array()?
        .iter()
        .find(|e| e["dst"].as_str().and_then(|d| d.parse::<IpAddr>().ok()) == Some(ip))
        .and_then(|e| e["lladdr"].as_str())
        .and_then(parse_mac)
}

// ---------------------------------------------------------------------------
// Frames

/// What a frame on the switch says about who holds an address.
#[derive(Clone, Debug, PartialEq, Eq)]
enum L2 {
    Arp {
        op: u16,
        sha: Mac,
        spa: Ipv4Addr,
        tpa: Ipv4Addr,
    },
    Na {
        /// Ethernet source.
        src: Mac,
        dst: Ipv6Addr,
        flags: u8,
        target: Ipv6Addr,
        /// The target link-layer address option.
        tlla: Option<Mac>,
    },
}

impl L2 {
    /// The MAC an NA announces: its option, else its sender.
    fn na_mac(src: Mac, tlla: Option<Mac>) -> Mac {
        tlla.unwrap_or(src)
    }
}

fn mac_at(b: &[u8], at: usize) -> Option<Mac> {
    b.get(at..at + 6)?.try_into().ok()
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn v4_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let o: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(o))
}

fn v6_at(b: &[u8], at: usize) -> Option<Ipv6Addr> {
    let o: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(o))
}

/// An ARP packet or an ICMPv6 neighbour advertisement (without extension
/// headers) in an untagged Ethernet frame; anything else is `None`.
fn parse(f: &[u8]) -> Option<L2> {
    match u16_at(f, 12)? {
        ETH_ARP => {
            // htype Ethernet, ptype IPv4, hlen 6, plen 4.
            if u16_at(f, 14)? != 1 || u16_at(f, 16)? != 0x0800 || f.get(18..20)? != [6, 4] {
                return None;
            }
            Some(L2::Arp {
                op: u16_at(f, 20)?,
                sha: mac_at(f, 22)?,
                spa: v4_at(f, 28)?,
                tpa: v4_at(f, 38)?,
            })
        }
        ETH_IPV6 => {
            let ip = f.get(14..)?;
            let payload = usize::from(u16_at(ip, 4)?);
            if ip.first()? >> 4 != 6 || *ip.get(6)? != ICMPV6 {
                return None;
            }
            let icmp = ip.get(40..40 + payload)?;
            if *icmp.first()? != ND_ADVERT || icmp.len() < 24 {
                return None;
            }
            let mut tlla = None;
            let mut opts = &icmp[24..];
            while opts.len() >= 8 {
                let len = usize::from(opts[1]) * 8;
                if len == 0 || len > opts.len() {
                    break;
                }
                if opts[0] == 2 {
                    tlla = mac_at(opts, 2);
                }
                opts = &opts[len..];
            }
            Some(L2::Na {
                src: mac_at(f, 6)?,
                dst: v6_at(ip, 24)?,
                flags: icmp[4],
                target: v6_at(icmp, 8)?,
                tlla,
            })
        }
        _ => None,
    }
}

/// A broadcast ARP request from `mac`/`src` for `target`, padded to the
/// Ethernet minimum.
fn arp_request(mac: Mac, src: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_ARP.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // htype: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // ptype: IPv4
    f.extend_from_slice(&[6, 4]); // hlen, plen
    f.extend_from_slice(&ARP_REQUEST.to_be_bytes());
    f.extend_from_slice(&mac); // sha
    f.extend_from_slice(&src.octets()); // spa
    f.extend_from_slice(&[0; 6]); // tha: unknown
    f.extend_from_slice(&target.octets()); // tpa
    f.resize(60, 0);
    f
}

/// The solicited-node multicast address of `a` (ff02::1:ffXX:XXXX).
fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The ICMPv6 checksum of `msg` (checksum field zero) from `src` to `dst`
/// (RFC 8200 8.1 pseudo-header).
fn icmp6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(msg.len() as u32).to_be_bytes());
    add(&[0, 0, 0, ICMPV6]);
    add(msg);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A neighbour solicitation from `mac`/`src` for `target`, to its
/// solicited-node group, hop limit 255, with the source link-layer
/// address option.
fn neighbour_solicitation(mac: Mac, src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let dst = solicited_node(target);
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[ND_SOLICIT, 0, 0, 0]); // type, code, checksum
    icmp.extend_from_slice(&[0; 4]); // reserved
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[1, 1]); // option: source link-layer address, 8 bytes
    icmp.extend_from_slice(&mac);
    let sum = icmp6_checksum(src, dst, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let d = dst.octets();
    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&[0x33, 0x33, d[12], d[13], d[14], d[15]]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, class 0, flow 0
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[ICMPV6, 255]); // next header, hop limit
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&d);
    f.extend_from_slice(&icmp);
    f
}

// ---------------------------------------------------------------------------
// Sockets

/// A raw packet socket (all protocols) bound to one interface of the
/// calling thread's namespace.
struct Raw {
    fd: OwnedFd,
    /// The interface's own MAC.
    mac: Mac,
}

impl Raw {
    fn open(iface: &str) -> Result<Raw, String> {
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )
        .map_err(|e| format!("AF_PACKET socket: {e}"))?;
        // The link-layer address getifaddrs reports names the interface
        // (index) and its MAC; binding to it keeps the socket's protocol.
        let link: LinkAddr = getifaddrs()
            .map_err(|e| format!("getifaddrs: {e}"))?
            .filter(|a| a.interface_name == iface)
            .find_map(|a| a.address.and_then(|s| s.as_link_addr().copied()))
            .ok_or_else(|| format!("no interface {iface} (no link-layer address)"))?;
        bind(fd.as_raw_fd(), &link).map_err(|e| format!("bind AF_PACKET to {iface}: {e}"))?;
        let mac = link.addr().ok_or_else(|| format!("{iface} has no MAC"))?;
        Ok(Raw { fd, mac })
    }

    fn send(&self, frame: &[u8]) -> Result<(), String> {
        send(self.fd.as_raw_fd(), frame, MsgFlags::empty())
            .map(drop)
            .map_err(|e| format!("send on AF_PACKET: {e}"))
    }

    /// The next frame the interface received (not one this host sent)
    /// before `deadline`: its length in `buf`.
    fn recv(&self, buf: &mut [u8], deadline: Instant) -> Result<Option<usize>, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // SO_RCVTIMEO of zero would block for ever.
            let us = i64::try_from(left.as_micros()).unwrap_or(i64::MAX).max(1);
            setsockopt(
                &self.fd,
                sockopt::ReceiveTimeout,
                &TimeVal::microseconds(us),
            )
            .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
            match recvfrom::<LinkAddr>(self.fd.as_raw_fd(), buf) {
                Ok((_, Some(from))) if from.pkttype() == PACKET_OUTGOING => {}
                Ok((n, _)) => return Ok(Some(n.min(buf.len()))),
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(e) => return Err(format!("recv on AF_PACKET: {e}")),
            }
        }
    }
}

/// The source MAC for a probe from `src`: the interface's own when `src`
/// is its own address, else [`probe_mac`].
fn probe_source(raw: &Raw, iface: &str, src: IpAddr) -> Mac {
    let own = getifaddrs().is_ok_and(|mut it| {
        it.any(|a| {
            a.interface_name == iface
                && a.address.is_some_and(|s| {
                    s.as_sockaddr_in().map(|x| IpAddr::V4(x.ip())) == Some(src)
                        || s.as_sockaddr_in6().map(|x| IpAddr::V6(x.ip())) == Some(src)
                })
        })
    });
    if own {
        raw.mac
    } else {
        probe_mac(src)
    }
}

/// Sends one broadcast ARP request for `vip` from `src` out of `iface` in
/// namespace `ns`, and returns the sender MACs of every ARP reply about
/// `vip` to that request within `wait`.
pub fn arp_who_has(
    ns: &str,
    iface: &str,
    src: Ipv4Addr,
    vip: Ipv4Addr,
    wait: Duration,
) -> BTreeSet<Mac> {
    in_netns(ns, || {
        let raw = Raw::open(iface).unwrap_or_else(|e| panic!("{ns}: {e}"));
        let mac = probe_source(&raw, iface, src.into());
        raw.send(&arp_request(mac, src, vip))
            .unwrap_or_else(|e| panic!("{ns}: {e}"));
        let deadline = Instant::now() + wait;
        let mut seen = BTreeSet::new();
        let mut buf = [0u8; 2048];
        while let Some(n) = raw
            .recv(&mut buf, deadline)
            .unwrap_or_else(|e| panic!("{ns}: {e}"))
        {
            if let Some(L2::Arp { op, sha, spa, tpa }) = parse(&buf[..n]) {
                if op == ARP_REPLY && spa == vip && tpa == src {
                    seen.insert(sha);
                }
            }
        }
        seen
    })
}

/// Sends one neighbour solicitation for `vip` from `src` out of `iface` in
/// namespace `ns`, and returns the MACs that every neighbour advertisement
/// of `vip` to `src` within `wait` gives (its target link-layer address,
/// else its Ethernet source).
pub fn ns_who_has(
    ns: &str,
    iface: &str,
    src: Ipv6Addr,
    vip: Ipv6Addr,
    wait: Duration,
) -> BTreeSet<Mac> {
    in_netns(ns, || {
        let raw = Raw::open(iface).unwrap_or_else(|e| panic!("{ns}: {e}"));
        let mac = probe_source(&raw, iface, src.into());
        raw.send(&neighbour_solicitation(mac, src, vip))
            .unwrap_or_else(|e| panic!("{ns}: {e}"));
        let deadline = Instant::now() + wait;
        let mut seen = BTreeSet::new();
        let mut buf = [0u8; 2048];
        while let Some(n) = raw
            .recv(&mut buf, deadline)
            .unwrap_or_else(|e| panic!("{ns}: {e}"))
        {
            if let Some(L2::Na {
                src: from,
                dst,
                flags,
                target,
                tlla,
            }) = parse(&buf[..n])
            {
                if target == vip && dst == src && flags & NA_SOLICITED != 0 {
                    seen.insert(L2::na_mac(from, tlla));
                }
            }
        }
        seen
    })
}

// ---------------------------------------------------------------------------
// Capture

/// How an address was announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Announced {
    /// A gratuitous ARP request (sender and target address the same).
    ArpRequest,
    /// A gratuitous ARP reply.
    ArpReply,
    /// An unsolicited neighbour advertisement.
    Na {
        /// The Override flag.
        override_flag: bool,
        /// Sent to ff02::1.
        to_all_nodes: bool,
    },
}

/// One announcement seen on the wire.
#[derive(Clone, Debug)]
pub struct Announcement {
    /// When the capture read it.
    pub at: Instant,
    pub ip: IpAddr,
    /// The MAC announced for `ip`.
    pub mac: Mac,
    pub kind: Announced,
}

/// Records every gratuitous ARP and unsolicited neighbour advertisement
/// an interface receives, on a thread of its own, until stopped or
/// dropped (at most [`CAPTURE_MAX`]).
pub struct Capture {
    seen: Arc<Mutex<Vec<Announcement>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<(), String>>>,
    /// When the capture was listening.
    pub started: Instant,
}

impl Capture {
    /// Starts capturing on `iface` in namespace `ns`; returns once the
    /// socket is bound, so nothing sent afterwards is missed.
    pub fn start(ns: &str, iface: &str) -> Capture {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (s, st, ns2, if2) = (
            seen.clone(),
            stop.clone(),
            ns.to_string(),
            iface.to_string(),
        );
        let handle = thread::spawn(move || {
            enter_netns(&ns2);
            let raw = match Raw::open(&if2) {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.clone()));
                    return Err(e);
                }
            };
            let _ = ready_tx.send(Ok(()));
            let end = Instant::now() + CAPTURE_MAX;
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) && Instant::now() < end {
                let tick = (Instant::now() + Duration::from_millis(100)).min(end);
                let Some(n) = raw.recv(&mut buf, tick)? else {
                    continue;
                };
                if let Some(a) = announcement(&buf[..n]) {
                    s.lock().unwrap().push(a);
                }
            }
            Ok(())
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("capture on {iface} in {ns}: {e}"),
            Err(e) => panic!("capture on {iface} in {ns} did not start: {e}"),
        }
        Capture {
            seen,
            stop,
            handle: Some(handle),
            started: Instant::now(),
        }
    }

    /// The announcements of `ip` seen so far, oldest first.
    pub fn seen(&self, ip: IpAddr) -> Vec<Announcement> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.ip == ip)
            .cloned()
            .collect()
    }

    /// Every announcement seen so far, oldest first.
    pub fn all(&self) -> Vec<Announcement> {
        self.seen.lock().unwrap().clone()
    }

    /// Stops the capture; panics if its thread failed.
    pub fn stop(mut self) -> Vec<Announcement> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("capture failed: {e}"),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        self.all()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The announcement a frame is, if it is one.
fn announcement(f: &[u8]) -> Option<Announcement> {
    let at = Instant::now();
    match parse(f)? {
        L2::Arp { op, sha, spa, tpa } if spa == tpa && !spa.is_unspecified() => {
            let kind = match op {
                ARP_REQUEST => Announced::ArpRequest,
                ARP_REPLY => Announced::ArpReply,
                _ => return None,
            };
            Some(Announcement {
                at,
                ip: spa.into(),
                mac: sha,
                kind,
            })
        }
        L2::Na {
            src,
            dst,
            flags,
            target,
            tlla,
        } if flags & NA_SOLICITED == 0 => Some(Announcement {
            at,
            ip: target.into(),
            mac: L2::na_mac(src, tlla),
            kind: Announced::Na {
                override_flag: flags & NA_OVERRIDE != 0,
                to_all_nodes: dst == ALL_NODES,
            },
        }),
        _ => None,
    }
}
