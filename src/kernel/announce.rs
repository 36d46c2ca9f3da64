//! Holding a highly available VIP on this node's uplink: the VIP as a
//! /32 or /128 address with a short valid lifetime that the owner keeps
//! refreshing (so the kernel answers ARP / neighbour solicitations for it,
//! and removes it by itself within about a lifetime if the daemon dies or
//! hangs: self-fencing), gratuitous ARP and unsolicited neighbour
//! advertisements that move the segment's neighbour entries to this node,
//! and the ARP sysctls that keep other addresses from being answered for.
//! Who owns a VIP is decided elsewhere; this module only does what the
//! owner must.
#![allow(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use futures::TryStreamExt;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressMessage, AddressProtocol, CacheInfo,
};

use super::netlink::{connect, NetlinkError, TIMEOUT};

/// The `IFA_PROTO` stamped on every address meshlb adds for a VIP it
/// owns, telling them apart from the node's own addresses (which the
/// kernel and other tools leave at 0 or at the kernel's own values 1-3).
pub const ANNOUNCE_PROTO: u8 = 0x4d;

/// Whether an address (its attributes as rtnetlink reports them) is one
/// meshlb holds for an owned VIP.
pub(super) fn is_held(attributes: &[AddressAttribute]) -> bool {
    proto(attributes) == ANNOUNCE_PROTO
}

/// The address's `IFA_PROTO`, 0 (unspecified) when absent.
fn proto(attributes: &[AddressAttribute]) -> u8 {
    attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Protocol(p) => Some(u8::from(*p)),
            _ => None,
        })
        .unwrap_or(0)
}

/// The address itself: `IFA_LOCAL` where there is one (IPv4, and IPv6
/// with a peer), else `IFA_ADDRESS`.
fn local(attributes: &[AddressAttribute]) -> Option<IpAddr> {
    let find = |local: bool| {
        attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if local => Some(*ip),
            AddressAttribute::Address(ip) if !local => Some(*ip),
            _ => None,
        })
    };
    find(true).or_else(|| find(false))
}

fn host_prefix(vip: IpAddr) -> u8 {
    if vip.is_ipv4() {
        32
    } else {
        128
    }
}

/// The attributes `hold_vip` adds to rtnetlink's address message: meshlb's
/// protocol; the lifetimes, preferred 0 (deprecated: IPv6 source address
/// selection passes it over; IPv4's ignores the flag, but picks an
/// interface's earlier addresses first, and the VIP comes after the
/// node's own; the kernel still answers ARP and solicitations for it);
/// and for IPv6 no duplicate address detection (the address must answer
/// at once, and the previous owner may still hold it for up to a
/// lifetime) and no prefix route (a /128 needs none).
fn hold_attributes(vip: IpAddr, valid_secs: u32) -> Vec<AddressAttribute> {
    let mut lifetimes = CacheInfo::default();
    lifetimes.ifa_valid = valid_secs;
    lifetimes.ifa_preferred = 0;
    let mut out = vec![
        AddressAttribute::Protocol(AddressProtocol::from(ANNOUNCE_PROTO)),
        AddressAttribute::CacheInfo(lifetimes),
    ];
    if vip.is_ipv6() {
        out.push(AddressAttribute::Flags(
            AddressFlags::Nodad | AddressFlags::Noprefixroute,
        ));
    }
    out
}

async fn timed<T>(
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, rtnetlink::Error>>,
) -> Result<T, NetlinkError> {
    tokio::time::timeout(TIMEOUT, f)
        .await
        .map_err(|_| NetlinkError::Timeout(what))?
        .map_err(|source| NetlinkError::Request { what, source })
}

/// The address `vip` on interface `ifindex`, as the kernel reports it.
async fn find(
    handle: &rtnetlink::Handle,
    ifindex: u32,
    vip: IpAddr,
) -> Result<Option<AddressMessage>, NetlinkError> {
    let msgs: Vec<AddressMessage> = timed(
        "address dump",
        handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .set_address_filter(vip)
            .execute()
            .try_collect(),
    )
    .await?;
    Ok(msgs
        .into_iter()
        .find(|m| m.header.index == ifindex && local(&m.attributes) == Some(vip)))
}

fn not_ours(ifindex: u32, vip: IpAddr, found: &AddressMessage) -> Option<NetlinkError> {
    let proto = proto(&found.attributes);
    (proto != ANNOUNCE_PROTO).then_some(NetlinkError::NotOurs {
        ifindex,
        addr: vip,
        proto,
    })
}

/// Adds `vip` (/32 or /128) to interface `ifindex`, or refreshes it:
/// valid for `valid_secs` seconds from now (at least 1: the kernel refuses
/// 0; `u32::MAX` is forever), after which the kernel removes it unless
/// this is called again. An address `vip` on `ifindex` that meshlb did not
/// add (another `IFA_PROTO`) is left alone: replacing it would give the
/// node's own address a lifetime.
pub async fn hold_vip(ifindex: u32, vip: IpAddr, valid_secs: u32) -> Result<(), NetlinkError> {
    let handle = connect()?;
    if let Some(e) = find(&handle, ifindex, vip)
        .await?
        .and_then(|m| not_ours(ifindex, vip, &m))
    {
        return Err(e);
    }
    let mut req = handle
        .address()
        .add(ifindex, vip, host_prefix(vip))
        .replace();
    req.message_mut()
        .attributes
        .extend(hold_attributes(vip, valid_secs));
    timed("address add", req.execute()).await
}

/// Removes `vip` from interface `ifindex`. Success when it is absent (or
/// the interface is gone); an address `vip` that meshlb did not add is
/// left alone (an error).
pub async fn release_vip(ifindex: u32, vip: IpAddr) -> Result<(), NetlinkError> {
    let handle = connect()?;
    let Some(found) = find(&handle, ifindex, vip).await? else {
        return Ok(());
    };
    if let Some(e) = not_ours(ifindex, vip, &found) {
        return Err(e);
    }
    match timed("address del", handle.address().del(found).execute()).await {
        Err(e) if is_absent(&e) => Ok(()),
        r => r,
    }
}

/// The kernel's answer when the address (or its interface) is no longer
/// there: expired, or removed with its interface, since the dump.
fn is_absent(e: &NetlinkError) -> bool {
    let NetlinkError::Request {
        source: rtnetlink::Error::NetlinkError(m),
        ..
    } = e
    else {
        return false;
    };
    m.code
        .is_some_and(|c| [libc::ENOENT, libc::EADDRNOTAVAIL, libc::ENODEV].contains(&-c.get()))
}

/// Every address, on any interface, that meshlb holds for an owned VIP
/// (`IFA_PROTO` = `ANNOUNCE_PROTO`), with its interface's index: what a
/// restarted daemon adopts or releases.
pub async fn held_vips() -> Result<Vec<(u32, IpAddr)>, NetlinkError> {
    let handle = connect()?;
    let msgs: Vec<AddressMessage> = timed(
        "address dump",
        handle.address().get().execute().try_collect(),
    )
    .await?;
    Ok(msgs
        .iter()
        .filter(|m| is_held(&m.attributes))
        .filter_map(|m| Some((m.header.index, local(&m.attributes)?)))
        .collect())
}

const ETH_HLEN: usize = 14;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMPV6: u8 = 58;
const ND_NEIGHBOR_ADVERT: u8 = 136;
/// The Override flag of a neighbour advertisement (RFC 4861 4.4); Router
/// (0x80) and Solicited (0x40) stay clear.
const NA_OVERRIDE: u8 = 0x20;
/// The Target Link-Layer Address option, one 8-byte unit long.
const ND_OPT_TARGET_LL_ADDR: u8 = 2;

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + 72);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// A gratuitous ARP request for `vip` from `mac`, broadcast: sender and
/// target protocol address both `vip`, target hardware address zero. A
/// request rather than a reply because every Linux neighbour that already
/// has an entry for `vip` updates it from one even with `arp_accept` 0.
pub fn garp_frame(mac: [u8; 6], vip: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet([0xff; 6], mac, ETH_P_ARP);
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]); // address lengths
    f.extend_from_slice(&1u16.to_be_bytes()); // operation: request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&vip.octets());
    f
}

/// An unsolicited neighbour advertisement for `vip` from `mac` to all
/// nodes (ff02::1), with the Override flag, so neighbours replace the
/// link-layer address they have for `vip`.
pub fn unsolicited_na_frame(mac: [u8; 6], vip: Ipv6Addr) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[ND_NEIGHBOR_ADVERT, 0, 0, 0]); // type, code, checksum
    icmp.extend_from_slice(&[NA_OVERRIDE, 0, 0, 0]);
    icmp.extend_from_slice(&vip.octets());
    icmp.extend_from_slice(&[ND_OPT_TARGET_LL_ADDR, 1]);
    icmp.extend_from_slice(&mac);
    let sum = icmpv6_checksum(vip, all_nodes, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut f = ethernet([0x33, 0x33, 0, 0, 0, 1], mac, ETH_P_IPV6);
    f.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, no class, no flow
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[IPPROTO_ICMPV6, 255]); // next header, hop limit
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&all_nodes.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The ICMPv6 checksum of `body` (its checksum field zero) over the IPv6
/// pseudo-header (RFC 8200 8.1).
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, body: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + body.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(body.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_ICMPV6]);
    pseudo.extend_from_slice(body);
    !ones_complement_sum(&pseudo)
}

fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Sends one Ethernet `frame` (header included) out of interface
/// `ifindex`, as is, through a packet socket opened for it.
pub fn send_frame(ifindex: u32, frame: &[u8]) -> io::Result<()> {
    if frame.len() < ETH_HLEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "frame of {} bytes: shorter than its Ethernet header",
                frame.len()
            ),
        ));
    }
    let index = i32::try_from(ifindex).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface index {ifindex} out of range"),
        )
    })?;
    // Protocol 0: the socket receives nothing, it only sends.
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns; dropping it
    // closes it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut dst = [0u8; 8];
    dst[..6].copy_from_slice(&frame[..6]);
    let addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        // Network byte order, as the frame carries it.
        sll_protocol: u16::from_ne_bytes([frame[12], frame[13]]),
        sll_ifindex: index,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: dst,
    };
    // SAFETY: sendto(2) reads `frame.len()` bytes of `frame` and the
    // `sockaddr_ll` it is given the size of.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != frame.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("interface {ifindex}: sent {sent} of {} bytes", frame.len()),
        ));
    }
    Ok(())
}

/// Tells interface `ifindex`'s segment that `vip` is at `mac`: a
/// gratuitous ARP request (IPv4) or an unsolicited neighbour
/// advertisement (IPv6).
pub fn announce(ifindex: u32, mac: [u8; 6], vip: IpAddr) -> io::Result<()> {
    let frame = match vip {
        IpAddr::V4(v4) => garp_frame(mac, v4),
        IpAddr::V6(v6) => unsolicited_na_frame(mac, v6),
    };
    send_frame(ifindex, &frame)
}

/// Makes interface `iface` answer ARP only for addresses configured on it
/// (`arp_ignore` 1, so VIPs held elsewhere, such as IPVS's dummy device,
/// are not claimed on the segment) and use its best local address as the
/// source of its ARP requests (`arp_announce` 2, never a VIP it may soon
/// lose). A value already at least as strict is kept. Whether anything
/// changed.
pub fn set_arp_strict(iface: &str) -> io::Result<bool> {
    set_arp_strict_in(Path::new("/proc/sys/net/ipv4/conf"), iface)
}

fn set_arp_strict_in(conf: &Path, iface: &str) -> io::Result<bool> {
    valid_iface(iface)?;
    let dir = conf.join(iface);
    let ignore = raise(&dir.join("arp_ignore"), 1)?;
    let announce = raise(&dir.join("arp_announce"), 2)?;
    Ok(ignore || announce)
}

/// Interface names as the kernel allows them (`dev_valid_name`), so the
/// name is one path component under the sysctl directory.
fn valid_iface(iface: &str) -> io::Result<()> {
    let bad = iface.is_empty()
        || iface.len() > 15
        || iface == "."
        || iface == ".."
        || iface.contains(['/', '\0'])
        || iface.chars().any(char::is_whitespace);
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("iface {iface:?}: not a valid interface name"),
        ));
    }
    Ok(())
}

/// Writes `wanted` to the sysctl file `path` if it holds less; whether it
/// wrote.
fn raise(path: &Path, wanted: i64) -> io::Result<bool> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let current: i64 = text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a number: {:?}", path.display(), text.trim()),
        )
    })?;
    if current >= wanted {
        return Ok(false);
    }
    std::fs::write(path, format!("{wanted}\n"))
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];

    #[test]
    fn gratuitous_arp_is_a_broadcast_request_for_the_vip_from_the_vip() {
        let f = garp_frame(MAC, Ipv4Addr::new(192, 0, 2, 10));
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // destination: broadcast
            0x02, 0x00, 0x5e, 0x10, 0x20, 0x30, // source: mac
            0x08, 0x06,                         // ARP
            0x00, 0x01,                         // hardware type: Ethernet
            0x08, 0x00,                         // protocol type: IPv4
            6, 4,                               // address lengths
            0x00, 0x01,                         // request
            0x02, 0x00, 0x5e, 0x10, 0x20, 0x30, // sender hardware: mac
            192, 0, 2, 10,                      // sender protocol: vip
            0, 0, 0, 0, 0, 0,                   // target hardware: zero
            192, 0, 2, 10,                      // target protocol: vip
        ];
        assert_eq!(f, want);
    }

    #[test]
    fn unsolicited_na_overrides_to_all_nodes_from_the_vip() {
        let vip: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let f = unsolicited_na_frame(MAC, vip);
        assert_eq!(f.len(), 14 + 40 + 32);
        #[rustfmt::skip]
        let eth: [u8; 14] = [
            0x33, 0x33, 0, 0, 0, 1,             // destination: all-nodes multicast
            0x02, 0x00, 0x5e, 0x10, 0x20, 0x30, // source: mac
            0x86, 0xdd,                         // IPv6
        ];
        assert_eq!(f[..14], eth);
        #[rustfmt::skip]
        let ip: [u8; 8] = [
            0x60, 0, 0, 0, // version 6, class 0, flow 0
            0, 32,         // payload length
            58,            // next header: ICMPv6
            255,           // hop limit: 255, or neighbours drop it
        ];
        assert_eq!(f[14..22], ip);
        assert_eq!(f[22..38], vip.octets());
        assert_eq!(f[38..54], "ff02::1".parse::<Ipv6Addr>().unwrap().octets());
        let icmp = &f[54..];
        assert_eq!(icmp[..2], [136, 0]); // neighbour advertisement, code 0
        assert_eq!(icmp[4..8], [0x20, 0, 0, 0]); // Override only
        assert_eq!(icmp[8..24], vip.octets()); // target
        assert_eq!(icmp[24..26], [2, 1]); // target link-layer address, 8 bytes
        assert_eq!(icmp[26..32], MAC);
    }

    #[test]
    fn na_checksum_sums_to_all_ones_over_the_pseudo_header() {
        for vip in ["2001:db8::10", "fe80::1", "fd00:ffff:ffff::ffff"] {
            let vip: Ipv6Addr = vip.parse().unwrap();
            let f = unsolicited_na_frame(MAC, vip);
            let icmp = &f[54..];
            assert_ne!(icmp[2..4], [0, 0], "{vip}");
            // Independent of `icmpv6_checksum`: RFC 1071 summed by 16-bit
            // words in a u64, the pseudo-header laid out field by field.
            let mut words = Vec::new();
            words.extend_from_slice(&f[22..38]); // source
            words.extend_from_slice(&f[38..54]); // destination
            words.extend_from_slice(&[0, 0, 0, 32]); // upper-layer length
            words.extend_from_slice(&[0, 0, 0, 58]); // zero, next header
            words.extend_from_slice(icmp);
            let mut sum: u64 = words
                .chunks_exact(2)
                .map(|w| u64::from(w[0]) << 8 | u64::from(w[1]))
                .sum();
            while sum >> 16 != 0 {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            assert_eq!(sum, 0xffff, "{vip}");
        }
    }

    #[test]
    fn a_known_checksum() {
        // RFC 1071's example words 0001 f203 f4f5 f6f7 sum to ddf2.
        assert_eq!(
            ones_complement_sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
        // An odd length pads with a zero byte.
        assert_eq!(ones_complement_sum(&[0x12, 0x34, 0x56]), 0x6834);
    }

    #[test]
    fn hold_attributes_stamp_protocol_lifetimes_and_v6_flags() {
        let v4 = hold_attributes(Ipv4Addr::new(192, 0, 2, 10).into(), 1);
        let v6 = hold_attributes("2001:db8::10".parse().unwrap(), 3);
        for (attrs, valid) in [(&v4, 1), (&v6, 3)] {
            assert!(is_held(attrs));
            let ci = attrs
                .iter()
                .find_map(|a| match a {
                    AddressAttribute::CacheInfo(c) => Some(*c),
                    _ => None,
                })
                .expect("lifetimes");
            assert_eq!((ci.ifa_valid, ci.ifa_preferred), (valid, 0));
        }
        let flags = |attrs: &[AddressAttribute]| {
            attrs.iter().find_map(|a| match a {
                AddressAttribute::Flags(f) => Some(f.bits()),
                _ => None,
            })
        };
        assert_eq!(flags(&v4), None);
        assert_eq!(flags(&v6), Some(0x02 | 0x200)); // IFA_F_NODAD | IFA_F_NOPREFIXROUTE
    }

    #[test]
    fn held_means_our_protocol_only() {
        let addr = AddressAttribute::Address(Ipv4Addr::new(10, 0, 0, 1).into());
        let with = |p: u8| vec![addr.clone(), AddressAttribute::Protocol(p.into())];
        assert!(is_held(&with(ANNOUNCE_PROTO)));
        assert!(!is_held(&with(0)));
        assert!(!is_held(&with(2))); // kernel_ra
        assert!(!is_held(std::slice::from_ref(&addr)));
    }

    #[test]
    fn local_prefers_ifa_local() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(local(&[AddressAttribute::Address(a)]), Some(a));
        assert_eq!(
            local(&[AddressAttribute::Address(b), AddressAttribute::Local(a)]),
            Some(a)
        );
        assert_eq!(local(&[]), None);
    }

    #[test]
    fn short_frames_are_refused_before_any_socket() {
        let e = send_frame(1, &[0; 13]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn interface_names_that_leave_the_sysctl_directory_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../all",
            "eth0/x",
            "a\0b",
            "eth 0",
            "sixteen-chars-xx",
        ] {
            let e = set_arp_strict_in(Path::new("/nonexistent"), bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn arp_sysctls_are_raised_never_lowered() {
        let conf = std::env::temp_dir().join(format!("mlbk-arp-{}", std::process::id()));
        let dir = conf.join("eth0");
        std::fs::create_dir_all(&dir).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        // (arp_ignore, arp_announce) before -> changed, after
        let cases = [
            (("0", "0"), true, ("1", "2")),
            (("1", "2"), false, ("1", "2")),
            (("2", "1"), true, ("2", "2")),
            (("8", "2"), false, ("8", "2")),
            (("0", "2"), true, ("1", "2")),
        ];
        for ((ignore, ann), changed, (want_ignore, want_ann)) in cases {
            std::fs::write(dir.join("arp_ignore"), format!("{ignore}\n")).unwrap();
            std::fs::write(dir.join("arp_announce"), format!("{ann}\n")).unwrap();
            assert_eq!(set_arp_strict_in(&conf, "eth0").unwrap(), changed);
            assert_eq!(read("arp_ignore").trim(), want_ignore);
            assert_eq!(read("arp_announce").trim(), want_ann);
        }
        std::fs::write(dir.join("arp_ignore"), "x\n").unwrap();
        let e = set_arp_strict_in(&conf, "eth0").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("arp_ignore"), "{e}");
        let e = set_arp_strict_in(&conf, "eth1").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&conf).unwrap();
    }
}
