//! Interfaces, this node's own addresses and its routes, read over
//! rtnetlink. Node-port frontends answer on every address found here;
//! `nodenet` turns the interface facts into forwarding flags and the SNAT
//! address, and the routes into backend locality. Every request has a
//! timeout.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkXdp, State, XdpAttached};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};

use super::announce;
use crate::control::nodenet::{LinkFacts, RouteFact};

pub(super) const TIMEOUT: Duration = Duration::from_secs(5);

/// Errors talking to rtnetlink.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("rtnetlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("rtnetlink {what}: {source}")]
    Request {
        what: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("rtnetlink {0}: timed out")]
    Timeout(&'static str),
    #[error("iface {0}: no such interface")]
    NoSuchInterface(String),
    #[error(
        "address {addr} on interface {ifindex} is not meshlb's (IFA_PROTO {proto}): left alone"
    )]
    NotOurs {
        ifindex: u32,
        addr: IpAddr,
        proto: u8,
    },
}

/// rtnetlink notifications, one item per message.
pub type Notifications = futures::channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<netlink_packet_route::RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// Every neighbour, route and link change of this network namespace, as
/// the kernel announces it (rtnetlink multicast groups): what can move a
/// next hop. The stream ends if the socket fails.
pub fn next_hop_changes() -> Result<Notifications, NetlinkError> {
    use rtnetlink::constants::{RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH};
    let (mut conn, _handle, messages) =
        rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    let groups = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE;
    use rtnetlink::sys::AsyncSocket;
    conn.socket_mut()
        .socket_mut()
        .bind(&rtnetlink::sys::SocketAddr::new(0, groups))
        .map_err(NetlinkError::Socket)?;
    tokio::spawn(conn);
    Ok(messages)
}

pub(super) fn connect() -> Result<rtnetlink::Handle, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Every address on this node (this network namespace), except loopback
/// and IPv6 link-local ones.
pub async fn local_addrs() -> Result<BTreeSet<IpAddr>, NetlinkError> {
    Ok(addresses().await?.into_iter().map(|(_, a)| a).collect())
}

/// Every address with the index of its interface, in dump order (primary
/// addresses first), except loopback and IPv6 link-local ones and the VIPs
/// this node holds as their owner (`announce`: not node addresses).
pub async fn addresses() -> Result<Vec<(u32, IpAddr)>, NetlinkError> {
    let handle = connect()?;
    let msgs: Vec<_> =
        tokio::time::timeout(TIMEOUT, handle.address().get().execute().try_collect())
            .await
            .map_err(|_| NetlinkError::Timeout("address dump"))?
            .map_err(|source| NetlinkError::Request {
                what: "address dump",
                source,
            })?;
    let mut out = Vec::new();
    for m in msgs {
        if announce::is_held(&m.attributes) {
            continue;
        }
        let index = m.header.index;
        for a in m.attributes {
            let (AddressAttribute::Local(addr) | AddressAttribute::Address(addr)) = a else {
                continue;
            };
            if addr.is_loopback() || is_link_local_v6(&addr) || out.contains(&(index, addr)) {
                continue;
            }
            out.push((index, addr));
        }
    }
    Ok(out)
}

/// Every interface of this node: index, name, kind, XDP attach mode,
/// Ethernet address and operational state.
pub async fn links() -> Result<Vec<LinkFacts>, NetlinkError> {
    let handle = connect()?;
    let msgs: Vec<_> = tokio::time::timeout(TIMEOUT, handle.link().get().execute().try_collect())
        .await
        .map_err(|_| NetlinkError::Timeout("link dump"))?
        .map_err(|source| NetlinkError::Request {
            what: "link dump",
            source,
        })?;
    Ok(msgs
        .into_iter()
        .map(|m| {
            let flags = m.header.flags;
            let mut f = LinkFacts {
                index: m.header.index,
                loopback: flags.contains(LinkFlags::Loopback),
                ..Default::default()
            };
            let mut oper = State::Unknown;
            for a in m.attributes {
                match a {
                    LinkAttribute::IfName(n) => f.name = n,
                    LinkAttribute::Address(a) => f.mac = ethernet_address(&a),
                    LinkAttribute::OperState(s) => oper = s,
                    LinkAttribute::LinkInfo(infos) => {
                        for i in infos {
                            if let LinkInfo::Kind(k) = i {
                                f.kind = Some(k.to_string());
                            }
                        }
                    }
                    LinkAttribute::Xdp(xs) => {
                        for x in xs {
                            if let LinkXdp::Attached(XdpAttached::SocketBuffer) = x {
                                f.xdp_generic = true;
                            }
                        }
                    }
                    _ => {}
                }
            }
            f.oper_up = oper_up(oper, flags);
            f
        })
        .collect())
}

/// A 6-byte link-layer address other than all zeros (loopback's).
fn ethernet_address(bytes: &[u8]) -> Option<[u8; 6]> {
    <[u8; 6]>::try_from(bytes).ok().filter(|mac| *mac != [0; 6])
}

/// Whether a link can carry packets: RFC 2863's operational state, and
/// for the drivers that leave it unknown (dummy, loopback, some NICs),
/// administratively up with a carrier (`IFF_LOWER_UP`).
fn oper_up(oper: State, flags: LinkFlags) -> bool {
    match oper {
        State::Up => true,
        State::Unknown => flags.contains(LinkFlags::Up | LinkFlags::LowerUp),
        _ => false,
    }
}

/// The unicast routes of the main table, IPv4 and IPv6 (local, broadcast
/// and other tables' routes left out).
pub async fn routes() -> Result<Vec<RouteFact>, NetlinkError> {
    let handle = connect()?;
    let mut out = Vec::new();
    for msg in [
        rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let v4 = msg.header.address_family == netlink_packet_route::AddressFamily::Inet;
        let msgs: Vec<RouteMessage> =
            tokio::time::timeout(TIMEOUT, handle.route().get(msg).execute().try_collect())
                .await
                .map_err(|_| NetlinkError::Timeout("route dump"))?
                .map_err(|source| NetlinkError::Request {
                    what: "route dump",
                    source,
                })?;
        for m in msgs {
            if m.header.kind != RouteType::Unicast {
                continue;
            }
            let mut table = u32::from(m.header.table);
            let mut f = RouteFact {
                dst: if v4 {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                },
                prefix_len: m.header.destination_prefix_length,
                gateway: None,
                oif: None,
            };
            for a in m.attributes {
                match a {
                    RouteAttribute::Destination(d) => {
                        if let Some(ip) = route_ip(d) {
                            f.dst = ip;
                        }
                    }
                    RouteAttribute::Gateway(g) => f.gateway = route_ip(g),
                    RouteAttribute::Oif(i) => f.oif = Some(i),
                    RouteAttribute::Table(t) => table = t,
                    _ => {}
                }
            }
            if table == u32::from(RouteHeader::RT_TABLE_MAIN) {
                out.push(f);
            }
        }
    }
    Ok(out)
}

fn route_ip(a: RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(v4.into()),
        RouteAddress::Inet6(v6) => Some(v6.into()),
        _ => None,
    }
}

fn is_link_local_v6(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// The interfaces of `names` that do not exist (yet), in order.
pub async fn missing_interfaces(names: &[String]) -> Result<Vec<String>, NetlinkError> {
    let links = links().await?;
    Ok(names
        .iter()
        .filter(|n| !links.iter().any(|l| &l.name == *n))
        .cloned()
        .collect())
}

/// The index of the link `name` (`None`: no such link).
async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Result<Option<u32>, NetlinkError> {
    let mut s = handle.link().get().match_name(name.to_string()).execute();
    let found = tokio::time::timeout(TIMEOUT, s.try_next())
        .await
        .map_err(|_| NetlinkError::Timeout("link get"))?;
    Ok(match found {
        Ok(Some(m)) => Some(m.header.index),
        _ => None,
    })
}

/// Deletes the link `name`; `false` when there is none.
pub async fn remove_link(name: &str) -> Result<bool, NetlinkError> {
    let handle = connect()?;
    let Some(index) = link_index(&handle, name).await? else {
        return Ok(false);
    };
    tokio::time::timeout(TIMEOUT, handle.link().del(index).execute())
        .await
        .map_err(|_| NetlinkError::Timeout("link del"))?
        .map_err(|source| NetlinkError::Request {
            what: "link del",
            source,
        })?;
    Ok(true)
}

/// Makes interface `name` a dummy device that is up and holds exactly
/// `vips` (as /32 and /128): where IPVS virtual services' addresses live,
/// so the node accepts their packets.
pub async fn ensure_vip_device(name: &str, vips: &BTreeSet<IpAddr>) -> Result<(), NetlinkError> {
    let handle = connect()?;
    let req = |what: &'static str| move |source| NetlinkError::Request { what, source };
    let index = if let Some(index) = link_index(&handle, name).await? {
        index
    } else {
        tokio::time::timeout(
            TIMEOUT,
            handle
                .link()
                .add(rtnetlink::LinkDummy::new(name).up().build())
                .execute(),
        )
        .await
        .map_err(|_| NetlinkError::Timeout("link add"))?
        .map_err(req("link add"))?;
        link_index(&handle, name)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchInterface(name.to_string()))?
    };
    let msgs: Vec<_> = tokio::time::timeout(
        TIMEOUT,
        handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect(),
    )
    .await
    .map_err(|_| NetlinkError::Timeout("address dump"))?
    .map_err(req("address dump"))?;
    let mut have = BTreeSet::new();
    for m in msgs {
        let addr = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(a) | AddressAttribute::Local(a) => Some(*a),
            _ => None,
        });
        match addr {
            Some(a) if vips.contains(&a) => {
                have.insert(a);
            }
            Some(_) => {
                tokio::time::timeout(TIMEOUT, handle.address().del(m).execute())
                    .await
                    .map_err(|_| NetlinkError::Timeout("address del"))?
                    .map_err(req("address del"))?;
            }
            None => {}
        }
    }
    for a in vips.difference(&have) {
        let plen = if a.is_ipv4() { 32 } else { 128 };
        tokio::time::timeout(TIMEOUT, handle.address().add(index, *a, plen).execute())
            .await
            .map_err(|_| NetlinkError::Timeout("address add"))?
            .map_err(req("address add"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operational_state_with_unknown_read_from_the_flags() {
        let up = LinkFlags::Up | LinkFlags::LowerUp | LinkFlags::Running;
        // (operstate, flags) -> up
        let cases = [
            (State::Up, up, true),
            (State::Up, LinkFlags::empty(), true),
            (State::Down, up, false),
            (State::LowerLayerDown, LinkFlags::Up, false),
            (State::Dormant, up, false),
            (State::Unknown, up, true), // dummy, loopback
            (State::Unknown, LinkFlags::Up | LinkFlags::LowerUp, true),
            (State::Unknown, LinkFlags::Up, false), // no carrier
            (State::Unknown, LinkFlags::LowerUp, false), // admin down
        ];
        for (oper, flags, want) in cases {
            assert_eq!(oper_up(oper, flags), want, "{oper:?} {flags:?}");
        }
    }

    #[test]
    fn ethernet_addresses_are_six_nonzero_bytes() {
        let mac = [0x02, 0, 0x5e, 0, 0, 1];
        assert_eq!(ethernet_address(&mac), Some(mac));
        assert_eq!(ethernet_address(&[0; 6]), None); // loopback
        assert_eq!(ethernet_address(&[]), None); // wireguard, tun
        assert_eq!(ethernet_address(&[10, 0, 0, 1]), None); // ipip, gre
        assert_eq!(ethernet_address(&[0xff; 20]), None); // infiniband
    }
}
