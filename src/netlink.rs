//! Interfaces and this node's own addresses, read over rtnetlink. Node-port
//! frontends answer on every address found here. Every request has a
//! timeout.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;

const TIMEOUT: Duration = Duration::from_secs(5);

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
}

fn connect() -> Result<rtnetlink::Handle, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Every address on this node (this network namespace), except loopback
/// and IPv6 link-local ones.
pub async fn local_addrs() -> Result<BTreeSet<IpAddr>, NetlinkError> {
    let handle = connect()?;
    let msgs: Vec<_> =
        tokio::time::timeout(TIMEOUT, handle.address().get().execute().try_collect())
            .await
            .map_err(|_| NetlinkError::Timeout("address dump"))?
            .map_err(|source| NetlinkError::Request {
                what: "address dump",
                source,
            })?;
    let mut out = BTreeSet::new();
    for m in msgs {
        for a in m.attributes {
            let addr = match a {
                AddressAttribute::Local(a) => a,
                AddressAttribute::Address(a) => a,
                _ => continue,
            };
            if addr.is_loopback() || is_link_local_v6(&addr) {
                continue;
            }
            out.insert(addr);
        }
    }
    Ok(out)
}

fn is_link_local_v6(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// Checks that every interface exists, before anything is attached.
pub async fn check_interfaces(names: &[String]) -> Result<(), NetlinkError> {
    let handle = connect()?;
    for name in names {
        let res = tokio::time::timeout(
            TIMEOUT,
            handle
                .link()
                .get()
                .match_name(name.clone())
                .execute()
                .try_next(),
        )
        .await
        .map_err(|_| NetlinkError::Timeout("link get"))?;
        match res {
            Ok(Some(_)) => {}
            _ => return Err(NetlinkError::NoSuchInterface(name.clone())),
        }
    }
    Ok(())
}
