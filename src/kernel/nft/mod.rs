//! SNAT for remote backends in IPVS mode, through nf_tables over
//! nfnetlink (no `nft`, no iptables): IPVS masquerading rewrites only the
//! destination, so a backend on another node would answer the client
//! directly; the masquerade rule of meshlb's own table `inet meshlb`
//! makes such flows leave with this node's address, and conntrack takes
//! the replies back through IPVS (`net.ipv4.vs.conntrack=1`, as
//! kube-proxy does). [`consts`]: kernel constants; [`wire`]: the pure
//! encoder (tested byte for byte); [`Masquerade`]: the socket side, one
//! transaction per change, each with a timeout.

pub mod consts;
pub mod wire;

use std::collections::BTreeSet;
use std::time::Duration;

use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};

use crate::kernel::nlattr::{replies, Reply};
pub use wire::Remote;

/// Time allowed for one transaction and its acks.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Where IPVS is told to keep conntrack entries for its connections
/// (without them the masquerade rule never sees IPVS flows).
pub const IPVS_CONNTRACK_SYSCTL: &str = "/proc/sys/net/ipv4/vs/conntrack";

/// Errors talking to nf_tables.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nfnetlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("nf_tables table {}: message {index} of the transaction: {}", wire::TABLE, std::io::Error::from_raw_os_error(*errno))]
    Kernel { index: usize, errno: i32 },
    #[error("nf_tables table {}: no answer within {TIMEOUT:?}", wire::TABLE)]
    Timeout,
    #[error("{IPVS_CONNTRACK_SYSCTL}: {0}")]
    Sysctl(#[source] std::io::Error),
    #[error(transparent)]
    Wire(#[from] crate::kernel::nlattr::WireError),
}

/// meshlb's masquerade table, kept equal to a set of remote backends.
/// Nothing is created before the first remote backend; after that, each
/// change is the element difference. A failed transaction changes
/// nothing (nf_tables is all or nothing) and makes the next call install
/// everything again.
pub struct Masquerade {
    sock: Option<TokioSocket>,
    seq: u32,
    /// What the kernel holds (`None`: unknown, install everything).
    installed: Option<BTreeSet<Remote>>,
}

impl Default for Masquerade {
    fn default() -> Self {
        Self::new()
    }
}

impl Masquerade {
    pub fn new() -> Masquerade {
        Masquerade {
            sock: None,
            seq: 0,
            installed: None,
        }
    }

    /// Makes the kernel masquerade flows to exactly `want`; returns the
    /// number of nf_tables messages sent.
    pub async fn sync(&mut self, want: &BTreeSet<Remote>) -> Result<usize, NftError> {
        let msgs = match &self.installed {
            None if want.is_empty() => return Ok(0),
            None => {
                enable_ipvs_conntrack()?;
                wire::install(want)
            }
            Some(have) => wire::update(have, want),
        };
        if msgs.is_empty() {
            return Ok(0);
        }
        self.installed = None;
        self.transact(&msgs).await?;
        self.installed = Some(want.clone());
        Ok(msgs.len())
    }

    /// Deletes meshlb's table, chain, sets and rules (`meshlb cleanup`);
    /// `false` when there was none. Flows already masqueraded keep their
    /// conntrack binding until they end.
    pub async fn remove(&mut self) -> Result<bool, NftError> {
        self.installed = None;
        match self.transact(&[wire::del_table()]).await {
            Ok(()) => Ok(true),
            Err(NftError::Kernel { errno, .. }) if errno == libc::ENOENT => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn transact(&mut self, msgs: &[wire::Msg]) -> Result<(), NftError> {
        if self.sock.is_none() {
            let mut s = TokioSocket::new(consts::NETLINK_NETFILTER).map_err(NftError::Socket)?;
            s.socket_mut().bind_auto().map_err(NftError::Socket)?;
            s.socket_mut()
                .connect(&SocketAddr::new(0, 0))
                .map_err(NftError::Socket)?;
            self.sock = Some(s);
        }
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(msgs.len() as u32 + 2);
        let (bytes, seqs) = wire::batch(msgs, seq);
        let sock = self.sock.as_mut().expect("opened above");
        let res = tokio::time::timeout(TIMEOUT, exchange(sock, &bytes, &seqs))
            .await
            .unwrap_or(Err(NftError::Timeout));
        if res.is_err() {
            // Late answers must not be read as the next transaction's.
            self.sock = None;
        }
        res
    }
}

/// Sends a batch and waits for one answer per message; the first error
/// is the transaction's (the kernel then applied none of it).
async fn exchange(sock: &mut TokioSocket, bytes: &[u8], seqs: &[u32]) -> Result<(), NftError> {
    sock.send(bytes).await.map_err(NftError::Socket)?;
    let mut pending: BTreeSet<u32> = seqs.iter().copied().collect();
    let mut first_err = None;
    while !pending.is_empty() {
        let (buf, _) = sock.recv_from_full().await.map_err(NftError::Socket)?;
        for (seq, r) in replies(&buf)? {
            if !pending.remove(&seq) {
                continue;
            }
            if let Reply::Error(errno) = r {
                let index = seqs.iter().position(|s| *s == seq).unwrap_or(0);
                first_err.get_or_insert(NftError::Kernel { index, errno });
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// `net.ipv4.vs.conntrack=1`, written only when it is not already.
fn enable_ipvs_conntrack() -> Result<(), NftError> {
    match std::fs::read_to_string(IPVS_CONNTRACK_SYSCTL) {
        Ok(v) if v.trim() == "1" => Ok(()),
        Ok(_) => {
            std::fs::write(IPVS_CONNTRACK_SYSCTL, "1").map_err(NftError::Sysctl)?;
            log::info!("{IPVS_CONNTRACK_SYSCTL}=1: IPVS flows get conntrack entries, so remote backends can be masqueraded");
            Ok(())
        }
        // No IPVS in this kernel (the host's tests): nothing to enable.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NftError::Sysctl(e)),
    }
}
