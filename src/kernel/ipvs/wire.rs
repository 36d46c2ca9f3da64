//! Pure encoding and decoding of IPVS generic-netlink messages (attributes
//! and replies through `kernel::nlattr`). No socket
//! here: every request is built, and every reply parsed, from bytes, so
//! both are tested byte for byte without an IPVS-capable kernel.
//!
//! Layouts follow the kernel (`linux/netlink.h`, `linux/genetlink.h`,
//! `linux/ip_vs.h`): headers in host byte order, attributes 4-byte
//! aligned, addresses as 16-byte `nf_inet_addr`, ports and the IPv4
//! netmask in network byte order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[allow(
    clippy::wildcard_imports,
    reason = "the kernel's constants, under the names of its headers"
)]
use super::consts::*;
use crate::kernel::nlattr::{
    attrs, find, fixed, put_attr, put_nested, u16_ne, u32_ne, WireError, GENL_HDR, NLMSG_HDR,
    NLM_F_ACK, NLM_F_REQUEST,
};

/// A whole netlink message: `nlmsghdr` + `genlmsghdr` + attributes.
pub fn message(family: u16, flags: u16, seq: u32, cmd: u8, version: u8, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR + GENL_HDR + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend((len as u32).to_ne_bytes());
    m.extend(family.to_ne_bytes());
    m.extend((flags | NLM_F_REQUEST).to_ne_bytes());
    m.extend(seq.to_ne_bytes());
    m.extend(0u32.to_ne_bytes());
    m.extend([cmd, version, 0, 0]);
    m.extend(attrs);
    m
}

/// The request resolving a generic netlink family's id.
pub fn get_family(name: &str, seq: u32) -> Vec<u8> {
    let mut a = Vec::new();
    let mut z = name.as_bytes().to_vec();
    z.push(0);
    put_attr(&mut a, CTRL_ATTR_FAMILY_NAME, &z);
    message(GENL_ID_CTRL, NLM_F_ACK, seq, CTRL_CMD_GETFAMILY, 1, &a)
}

/// The family id in a `CTRL_CMD_GETFAMILY` answer.
pub fn family_id(attrs_buf: &[u8]) -> Result<u16, WireError> {
    u16_ne(&attrs(attrs_buf)?, CTRL_ATTR_FAMILY_ID)?
        .ok_or(WireError::Missing("CTRL_ATTR_FAMILY_ID"))
}

/// Identity of a virtual service: address, port, protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId {
    pub addr: IpAddr,
    pub port: u16,
    /// IANA protocol number.
    pub proto: u8,
}

/// A virtual service as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub id: ServiceId,
    /// Scheduler: "rr", "wrr", "lc", "wlc", "sh", "mh", ...
    pub sched: String,
    /// `IP_VS_SVC_F_*` (persistence, scheduler flags).
    pub flags: u32,
    /// Persistence timeout in seconds (with `IP_VS_SVC_F_PERSISTENT`).
    pub timeout: u32,
    pub stats: Stats,
}

/// A real server of a virtual service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dest {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// `IP_VS_CONN_F_*` forwarding method.
    pub fwd: u32,
    pub active_conns: u32,
    pub inactive_conns: u32,
    pub stats: Stats,
}

/// Traffic counters of a service or destination (from `*_STATS64`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub conns: u64,
    pub in_packets: u64,
    pub out_packets: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
}

fn family_of(a: &IpAddr) -> u16 {
    if a.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

fn addr16(a: &IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&v4.octets());
            b
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn addr_from(af: u16, v: &[u8]) -> Result<IpAddr, WireError> {
    match af {
        AF_INET => Ok(Ipv4Addr::from(fixed::<4>(IPVS_SVC_ATTR_ADDR, v)?).into()),
        AF_INET6 => Ok(Ipv6Addr::from(fixed::<16>(IPVS_SVC_ATTR_ADDR, v)?).into()),
        f => Err(WireError::Family(f)),
    }
}

fn put_service_id(a: &mut Vec<u8>, id: &ServiceId) {
    put_attr(a, IPVS_SVC_ATTR_AF, &family_of(&id.addr).to_ne_bytes());
    put_attr(
        a,
        IPVS_SVC_ATTR_PROTOCOL,
        &u16::from(id.proto).to_ne_bytes(),
    );
    put_attr(a, IPVS_SVC_ATTR_ADDR, &addr16(&id.addr));
    put_attr(a, IPVS_SVC_ATTR_PORT, &id.port.to_be_bytes());
}

/// `IPVS_CMD_ATTR_SERVICE` naming a service (delete, destination ops).
pub fn service_id_attr(id: &ServiceId) -> Vec<u8> {
    let mut a = Vec::new();
    put_nested(&mut a, IPVS_CMD_ATTR_SERVICE, |b| put_service_id(b, id));
    a
}

/// `IPVS_CMD_ATTR_SERVICE` with every field (create, update).
pub fn service_attr(s: &Service) -> Vec<u8> {
    let mut a = Vec::new();
    put_nested(&mut a, IPVS_CMD_ATTR_SERVICE, |b| {
        put_service_id(b, &s.id);
        let mut z = s.sched.as_bytes().to_vec();
        z.push(0);
        put_attr(b, IPVS_SVC_ATTR_SCHED_NAME, &z);
        // struct ip_vs_flags { flags, mask }: set exactly these flags.
        let mut f = s.flags.to_ne_bytes().to_vec();
        f.extend(u32::MAX.to_ne_bytes());
        put_attr(b, IPVS_SVC_ATTR_FLAGS, &f);
        put_attr(b, IPVS_SVC_ATTR_TIMEOUT, &s.timeout.to_ne_bytes());
        let mask: [u8; 4] = if s.id.addr.is_ipv4() {
            u32::MAX.to_be_bytes()
        } else {
            128u32.to_ne_bytes()
        };
        put_attr(b, IPVS_SVC_ATTR_NETMASK, &mask);
    });
    a
}

/// `IPVS_CMD_ATTR_DEST` with every field (create, update, delete).
pub fn dest_attr(d: &Dest) -> Vec<u8> {
    let mut a = Vec::new();
    put_nested(&mut a, IPVS_CMD_ATTR_DEST, |b| {
        put_attr(b, IPVS_DEST_ATTR_ADDR, &addr16(&d.addr));
        put_attr(b, IPVS_DEST_ATTR_PORT, &d.port.to_be_bytes());
        put_attr(b, IPVS_DEST_ATTR_FWD_METHOD, &d.fwd.to_ne_bytes());
        put_attr(b, IPVS_DEST_ATTR_WEIGHT, &d.weight.to_ne_bytes());
        put_attr(b, IPVS_DEST_ATTR_U_THRESH, &0u32.to_ne_bytes());
        put_attr(b, IPVS_DEST_ATTR_L_THRESH, &0u32.to_ne_bytes());
        put_attr(
            b,
            IPVS_DEST_ATTR_ADDR_FAMILY,
            &family_of(&d.addr).to_ne_bytes(),
        );
    });
    a
}

fn stats(v: Option<&[u8]>) -> Result<Stats, WireError> {
    let Some(v) = v else {
        return Ok(Stats::default());
    };
    let a = attrs(v)?;
    let get = |k| -> Result<u64, WireError> {
        find(&a, k)
            .map(|v| fixed::<8>(k, v).map(u64::from_ne_bytes))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    Ok(Stats {
        conns: get(IPVS_STATS_ATTR_CONNS)?,
        in_packets: get(IPVS_STATS_ATTR_INPKTS)?,
        out_packets: get(IPVS_STATS_ATTR_OUTPKTS)?,
        in_bytes: get(IPVS_STATS_ATTR_INBYTES)?,
        out_bytes: get(IPVS_STATS_ATTR_OUTBYTES)?,
    })
}

/// The service in a `GET_SERVICE` answer (`None`: a firewall-mark service,
/// which meshlb never creates).
pub fn parse_service(attrs_buf: &[u8]) -> Result<Option<Service>, WireError> {
    let top = attrs(attrs_buf)?;
    let inner =
        find(&top, IPVS_CMD_ATTR_SERVICE).ok_or(WireError::Missing("IPVS_CMD_ATTR_SERVICE"))?;
    let a = attrs(inner)?;
    if find(&a, IPVS_SVC_ATTR_FWMARK).is_some_and(|v| v != [0, 0, 0, 0]) {
        return Ok(None);
    }
    let af = u16_ne(&a, IPVS_SVC_ATTR_AF)?.ok_or(WireError::Missing("IPVS_SVC_ATTR_AF"))?;
    let addr = addr_from(
        af,
        find(&a, IPVS_SVC_ATTR_ADDR).ok_or(WireError::Missing("IPVS_SVC_ATTR_ADDR"))?,
    )?;
    let port = find(&a, IPVS_SVC_ATTR_PORT)
        .map(|v| fixed::<2>(IPVS_SVC_ATTR_PORT, v).map(u16::from_be_bytes))
        .transpose()?
        .ok_or(WireError::Missing("IPVS_SVC_ATTR_PORT"))?;
    let proto =
        u16_ne(&a, IPVS_SVC_ATTR_PROTOCOL)?.ok_or(WireError::Missing("IPVS_SVC_ATTR_PROTOCOL"))?;
    let sched = find(&a, IPVS_SVC_ATTR_SCHED_NAME)
        .map(|v| {
            String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
        })
        .unwrap_or_default();
    let flags = find(&a, IPVS_SVC_ATTR_FLAGS)
        .map(|v| fixed::<4>(IPVS_SVC_ATTR_FLAGS, v).map(u32::from_ne_bytes))
        .transpose()?
        .unwrap_or(0);
    Ok(Some(Service {
        id: ServiceId {
            addr,
            port,
            proto: proto as u8,
        },
        sched,
        flags: flags & !IP_VS_SVC_F_HASHED,
        timeout: u32_ne(&a, IPVS_SVC_ATTR_TIMEOUT)?.unwrap_or(0),
        stats: stats(find(&a, IPVS_SVC_ATTR_STATS64))?,
    }))
}

/// The destination in a `GET_DEST` answer of a service of family `af`.
pub fn parse_dest(attrs_buf: &[u8], af: u16) -> Result<Dest, WireError> {
    let top = attrs(attrs_buf)?;
    let inner = find(&top, IPVS_CMD_ATTR_DEST).ok_or(WireError::Missing("IPVS_CMD_ATTR_DEST"))?;
    let a = attrs(inner)?;
    let af = u16_ne(&a, IPVS_DEST_ATTR_ADDR_FAMILY)?.unwrap_or(af);
    let addr = addr_from(
        af,
        find(&a, IPVS_DEST_ATTR_ADDR).ok_or(WireError::Missing("IPVS_DEST_ATTR_ADDR"))?,
    )?;
    let port = find(&a, IPVS_DEST_ATTR_PORT)
        .map(|v| fixed::<2>(IPVS_DEST_ATTR_PORT, v).map(u16::from_be_bytes))
        .transpose()?
        .ok_or(WireError::Missing("IPVS_DEST_ATTR_PORT"))?;
    Ok(Dest {
        addr,
        port,
        weight: u32_ne(&a, IPVS_DEST_ATTR_WEIGHT)?.unwrap_or(0),
        fwd: u32_ne(&a, IPVS_DEST_ATTR_FWD_METHOD)?.unwrap_or(0) & IP_VS_CONN_F_FWD_MASK,
        active_conns: u32_ne(&a, IPVS_DEST_ATTR_ACTIVE_CONNS)?.unwrap_or(0),
        inactive_conns: u32_ne(&a, IPVS_DEST_ATTR_INACT_CONNS)?.unwrap_or(0),
        stats: stats(find(&a, IPVS_DEST_ATTR_STATS64))?,
    })
}

/// The address family constant of `addr`.
pub fn af(addr: &IpAddr) -> u16 {
    family_of(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::nlattr::{replies, Reply, NLMSG_DONE, NLMSG_ERROR, NLM_F_MULTI};

    fn svc(addr: &str, port: u16, sched: &str) -> Service {
        Service {
            id: ServiceId {
                addr: addr.parse().unwrap(),
                port,
                proto: 6,
            },
            sched: sched.into(),
            flags: 0,
            timeout: 0,
            stats: Stats::default(),
        }
    }

    /// Little-endian hosts (the bytes below spell host order).
    #[cfg(target_endian = "little")]
    #[test]
    fn service_attribute_bytes_match_the_kernel_layout() {
        let a = service_attr(&svc("10.96.0.10", 80, "rr"));
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[84, 0, 0x01, 0x80][..],            // nested IPVS_CMD_ATTR_SERVICE, len 84
            &[6, 0, 1, 0, 2, 0, 0, 0],            // AF = AF_INET (padded)
            &[6, 0, 2, 0, 6, 0, 0, 0],            // PROTOCOL = 6
            &[20, 0, 3, 0, 10, 96, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // ADDR
            &[6, 0, 4, 0, 0, 80, 0, 0],           // PORT = 80, network order
            &[7, 0, 6, 0, b'r', b'r', 0, 0],      // SCHED_NAME "rr\0"
            &[12, 0, 7, 0, 0, 0, 0, 0, 255, 255, 255, 255], // FLAGS {0, mask ~0}
            &[8, 0, 8, 0, 0, 0, 0, 0],            // TIMEOUT 0
            &[8, 0, 9, 0, 255, 255, 255, 255],    // NETMASK /32
        ]
        .concat();
        assert_eq!(a, want);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn message_header_and_family_request() {
        let m = get_family("IPVS", 7);
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[32, 0, 0, 0, 0x10, 0, 5, 0, 7, 0, 0, 0, 0, 0, 0, 0][..], // nlmsghdr: len 32, GENL_ID_CTRL, REQUEST|ACK, seq 7
            &[3, 1, 0, 0],                                         // CTRL_CMD_GETFAMILY v1
            &[9, 0, 2, 0, b'I', b'P', b'V', b'S', 0, 0, 0, 0],     // FAMILY_NAME "IPVS\0"
        ]
        .concat();
        assert_eq!(m, want);
    }

    #[test]
    fn services_and_destinations_round_trip() {
        for (addr, sched, flags, timeout) in [
            ("10.96.0.10", "rr", 0, 0),
            ("fd00:96::10", "wrr", 0, 0),
            ("192.168.1.1", "sh", IP_VS_SVC_F_PERSISTENT, 600),
        ] {
            let mut s = svc(addr, 8080, sched);
            s.flags = flags;
            s.timeout = timeout;
            s.id.proto = 17;
            let back = parse_service(&service_attr(&s)).unwrap().unwrap();
            assert_eq!(back, s, "{addr}");
            let id_only = parse_service(&service_id_attr(&s.id)).unwrap().unwrap();
            assert_eq!(id_only.id, s.id);
        }
        for (addr, weight) in [("10.0.1.2", 100), ("fd00::2", 0)] {
            let d = Dest {
                addr: addr.parse().unwrap(),
                port: 8000,
                weight,
                fwd: IP_VS_CONN_F_MASQ,
                active_conns: 0,
                inactive_conns: 0,
                stats: Stats::default(),
            };
            let af = af(&d.addr);
            assert_eq!(parse_dest(&dest_attr(&d), af).unwrap(), d);
        }
    }

    #[test]
    fn replies_split_acks_errors_data_and_done() {
        let mut buf = Vec::new();
        let data = message(
            0x20,
            NLM_F_MULTI,
            3,
            IPVS_CMD_NEW_SERVICE,
            1,
            &service_id_attr(&svc("10.0.0.1", 1, "rr").id),
        );
        buf.extend(&data);
        for (kind, err) in [(NLMSG_ERROR, 0i32), (NLMSG_ERROR, -17), (NLMSG_DONE, 0)] {
            buf.extend(20u32.to_ne_bytes());
            buf.extend(kind.to_ne_bytes());
            buf.extend(0u16.to_ne_bytes());
            buf.extend(3u32.to_ne_bytes());
            buf.extend(0u32.to_ne_bytes());
            buf.extend(err.to_ne_bytes());
        }
        let r = replies(&buf).unwrap();
        assert_eq!(r.len(), 4);
        assert!(matches!(
            &r[0],
            (
                3,
                Reply::Data {
                    cmd: IPVS_CMD_NEW_SERVICE,
                    ..
                }
            )
        ));
        assert_eq!(r[1], (3, Reply::Ack));
        assert_eq!(r[2], (3, Reply::Error(17)));
        assert_eq!(r[3], (3, Reply::Done));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for bad in [
            &[5u8, 0, 1, 0][..],    // attribute longer than the buffer
            &[2, 0, 1, 0],          // attribute shorter than its header
            &[8, 0, 1, 0, 1, 2, 3], // truncated payload
        ] {
            assert!(attrs(bad).is_err(), "{bad:?}");
        }
        assert!(replies(&[40, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        // A service attribute with a 3-byte port.
        let mut a = Vec::new();
        put_nested(&mut a, IPVS_CMD_ATTR_SERVICE, |b| {
            put_attr(b, IPVS_SVC_ATTR_AF, &AF_INET.to_ne_bytes());
            put_attr(b, IPVS_SVC_ATTR_PROTOCOL, &6u16.to_ne_bytes());
            put_attr(b, IPVS_SVC_ATTR_ADDR, &[10, 0, 0, 1]);
            put_attr(b, IPVS_SVC_ATTR_PORT, &[1]);
        });
        assert!(parse_service(&a).is_err());
        assert_eq!(
            parse_service(&[]),
            Err(WireError::Missing("IPVS_CMD_ATTR_SERVICE"))
        );
    }
}
