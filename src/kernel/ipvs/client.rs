//! The IPVS handle: one generic-netlink socket, the family id resolved
//! once, and one request at a time, each with a timeout. Requests are
//! built and replies parsed by [`super::wire`].

use std::time::Duration;

use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};

#[allow(
    clippy::wildcard_imports,
    reason = "the kernel's constants, under the names of its headers"
)]
use super::consts::*;
use super::wire::{self, Dest, Service, ServiceId};
use super::IpvsError;
use crate::kernel::nlattr::{replies, Reply, NLM_F_ACK, NLM_F_DUMP};

/// Time allowed for one request and all of its replies.
pub const TIMEOUT: Duration = Duration::from_secs(5);
const NETLINK_GENERIC: isize = 16;

/// A connection to the kernel's IPVS (in this network namespace).
pub struct Ipvs {
    sock: TokioSocket,
    family: u16,
    seq: u32,
}

impl Ipvs {
    /// Opens the socket and resolves the IPVS family; fails with
    /// [`IpvsError::Unavailable`] when the kernel has no IPVS.
    pub async fn open() -> Result<Ipvs, IpvsError> {
        let mut g = Genl::open().await?;
        let family = g.family(IPVS_GENL_NAME).await.map_err(|e| match e {
            IpvsError::Kernel { errno: 2, .. } => IpvsError::Unavailable,
            e => e,
        })?;
        Ok(Ipvs {
            sock: g.sock,
            family,
            seq: g.seq,
        })
    }

    async fn request(
        &mut self,
        cmd: u8,
        attrs: &[u8],
        dump: bool,
    ) -> Result<Vec<Vec<u8>>, IpvsError> {
        self.seq = self.seq.wrapping_add(1);
        let flags = if dump { NLM_F_DUMP } else { NLM_F_ACK };
        let msg = wire::message(self.family, flags, self.seq, cmd, IPVS_GENL_VERSION, attrs);
        exchange(&mut self.sock, &msg, self.seq, dump, cmd).await
    }

    /// Every virtual service (firewall-mark services are left out).
    pub async fn services(&mut self) -> Result<Vec<Service>, IpvsError> {
        let mut out = Vec::new();
        for a in self.request(IPVS_CMD_GET_SERVICE, &[], true).await? {
            if let Some(s) = wire::parse_service(&a)? {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// The destinations of a service.
    pub async fn dests(&mut self, id: &ServiceId) -> Result<Vec<Dest>, IpvsError> {
        let af = wire::af(&id.addr);
        self.request(IPVS_CMD_GET_DEST, &wire::service_id_attr(id), true)
            .await?
            .iter()
            .map(|a| wire::parse_dest(a, af).map_err(IpvsError::from))
            .collect()
    }

    pub async fn new_service(&mut self, s: &Service) -> Result<(), IpvsError> {
        self.request(IPVS_CMD_NEW_SERVICE, &wire::service_attr(s), false)
            .await
            .map(drop)
    }

    /// Changes scheduler, flags or timeout of an existing service.
    pub async fn set_service(&mut self, s: &Service) -> Result<(), IpvsError> {
        self.request(IPVS_CMD_SET_SERVICE, &wire::service_attr(s), false)
            .await
            .map(drop)
    }

    pub async fn del_service(&mut self, id: &ServiceId) -> Result<(), IpvsError> {
        self.request(IPVS_CMD_DEL_SERVICE, &wire::service_id_attr(id), false)
            .await
            .map(drop)
    }

    pub async fn new_dest(&mut self, id: &ServiceId, d: &Dest) -> Result<(), IpvsError> {
        let mut a = wire::service_id_attr(id);
        a.extend(wire::dest_attr(d));
        self.request(IPVS_CMD_NEW_DEST, &a, false).await.map(drop)
    }

    /// Changes a destination's weight (or forwarding method).
    pub async fn set_dest(&mut self, id: &ServiceId, d: &Dest) -> Result<(), IpvsError> {
        let mut a = wire::service_id_attr(id);
        a.extend(wire::dest_attr(d));
        self.request(IPVS_CMD_SET_DEST, &a, false).await.map(drop)
    }

    pub async fn del_dest(&mut self, id: &ServiceId, d: &Dest) -> Result<(), IpvsError> {
        let mut a = wire::service_id_attr(id);
        a.extend(wire::dest_attr(d));
        self.request(IPVS_CMD_DEL_DEST, &a, false).await.map(drop)
    }
}

/// A bare generic-netlink socket (family resolution).
pub struct Genl {
    sock: TokioSocket,
    seq: u32,
}

impl Genl {
    #[allow(
        clippy::unused_async,
        reason = "async like every other request of the handle; callers await it"
    )]
    pub async fn open() -> Result<Genl, IpvsError> {
        let mut sock = TokioSocket::new(NETLINK_GENERIC).map_err(IpvsError::Socket)?;
        sock.socket_mut().bind_auto().map_err(IpvsError::Socket)?;
        sock.socket_mut()
            .connect(&SocketAddr::new(0, 0))
            .map_err(IpvsError::Socket)?;
        Ok(Genl { sock, seq: 0 })
    }

    /// The id of generic netlink family `name`.
    pub async fn family(&mut self, name: &str) -> Result<u16, IpvsError> {
        self.seq = self.seq.wrapping_add(1);
        let msg = wire::get_family(name, self.seq);
        let answers = exchange(&mut self.sock, &msg, self.seq, false, CTRL_CMD_GETFAMILY).await?;
        let first = answers.first().ok_or(IpvsError::NoAnswer)?;
        Ok(wire::family_id(first)?)
    }
}

/// Sends `msg` and collects the attribute payloads of the data messages
/// answering `seq`, until the ack (request) or the end of the dump.
async fn exchange(
    sock: &mut TokioSocket,
    msg: &[u8],
    seq: u32,
    dump: bool,
    cmd: u8,
) -> Result<Vec<Vec<u8>>, IpvsError> {
    let work = async {
        sock.send(msg).await.map_err(IpvsError::Socket)?;
        let mut data = Vec::new();
        loop {
            let (buf, _) = sock.recv_from_full().await.map_err(IpvsError::Socket)?;
            for (s, r) in replies(&buf)? {
                if s != seq {
                    continue;
                }
                match r {
                    Reply::Data { attrs, .. } => data.push(attrs),
                    Reply::Error(errno) => return Err(IpvsError::Kernel { cmd, errno }),
                    Reply::Ack if !dump => return Ok(data),
                    Reply::Done if dump => return Ok(data),
                    Reply::Ack | Reply::Done => {}
                }
            }
        }
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| IpvsError::Timeout { cmd })?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generic netlink controller always exists: resolves itself.
    #[tokio::test]
    async fn resolves_the_controller_family() {
        let mut g = Genl::open().await.expect("generic netlink socket");
        assert_eq!(g.family("nlctrl").await.expect("nlctrl"), GENL_ID_CTRL);
        match g.family("nosuchfamily").await {
            Err(IpvsError::Kernel { errno: 2, .. }) => {}
            other => panic!("unknown family: {other:?}"),
        }
    }
}
