//! The DNS server (`--dns ADDR:PORT`, `[dns] listen`): UDP and TCP on each
//! address, every query answered by `control::dns::answer` from the view
//! the daemon loop last published (after each sync: no zone is rebuilt,
//! a query reads the current snapshot). The server runs on its own tasks:
//! a burst of queries never holds up a sync, and a sync never waits for
//! a query. Counted in `meshlb_dns_queries_total{rcode}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};

use crate::control::dns::{answer, DnsView, Outcome, Transport, Zone};
use crate::model::counters::Registry;

/// A TCP client's whole exchange (length, query, answer) must fit in it.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// TCP connections served at once; more wait for a slot.
const TCP_CONNS: usize = 256;

/// The sockets of one listen address.
pub struct Listener {
    pub addr: SocketAddr,
    udp: UdpSocket,
    tcp: TcpListener,
}

/// Binds UDP and TCP on every address of `addrs`; the first failure is
/// the error, naming the address.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<Listener>, String> {
    let mut out = Vec::new();
    for a in addrs {
        let udp = UdpSocket::bind(a)
            .await
            .map_err(|e| format!("--dns {a}: udp: {e}"))?;
        let tcp = TcpListener::bind(a)
            .await
            .map_err(|e| format!("--dns {a}: tcp: {e}"))?;
        out.push(Listener { addr: *a, udp, tcp });
    }
    Ok(out)
}

/// Serves `l` until aborted: the view of `view`, the zone `zone`.
pub async fn serve(
    l: Listener,
    zone: Arc<Zone>,
    view: watch::Receiver<Arc<DnsView>>,
    registry: Arc<Registry>,
) {
    let udp = serve_udp(l.udp, zone.clone(), view.clone(), registry.clone());
    let tcp = serve_tcp(l.tcp, zone, view, registry);
    tokio::join!(udp, tcp);
}

fn count(registry: &Registry, o: &Outcome) {
    registry.dns_query(match o {
        Outcome::Reply(_, code) => rcode_name(*code),
        Outcome::Drop => "dropped",
    });
}

/// The metric label of a response code.
fn rcode_name(c: hickory_proto::op::ResponseCode) -> &'static str {
    use hickory_proto::op::ResponseCode as R;
    match c {
        R::NoError => "NOERROR",
        R::FormErr => "FORMERR",
        R::ServFail => "SERVFAIL",
        R::NXDomain => "NXDOMAIN",
        R::NotImp => "NOTIMP",
        R::Refused => "REFUSED",
        _ => "OTHER",
    }
}

async fn serve_udp(
    sock: UdpSocket,
    zone: Arc<Zone>,
    view: watch::Receiver<Arc<DnsView>>,
    registry: Arc<Registry>,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                log::debug!("dns udp: {e}");
                continue;
            }
        };
        let v = view.borrow().clone();
        let out = answer(&zone, &v, &buf[..n], Transport::Udp);
        count(&registry, &out);
        if let Outcome::Reply(b, _) = out {
            if let Err(e) = sock.send_to(&b, from).await {
                log::debug!("dns udp to {from}: {e}");
            }
        }
    }
}

async fn serve_tcp(
    listener: TcpListener,
    zone: Arc<Zone>,
    view: watch::Receiver<Arc<DnsView>>,
    registry: Arc<Registry>,
) {
    let slots = Arc::new(Semaphore::new(TCP_CONNS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::debug!("dns tcp accept: {e}");
                continue;
            }
        };
        let (zone, view, registry) = (zone.clone(), view.clone(), registry.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ =
                tokio::time::timeout(TCP_IDLE, tcp_client(stream, &zone, &view, &registry)).await;
        });
    }
}

/// Answers the queries of one TCP client (each a 2-byte length and the
/// message) until it closes or sends something that is not DNS.
async fn tcp_client(
    mut s: TcpStream,
    zone: &Zone,
    view: &watch::Receiver<Arc<DnsView>>,
    registry: &Registry,
) -> std::io::Result<()> {
    loop {
        let len = s.read_u16().await?;
        let mut msg = vec![0u8; usize::from(len)];
        s.read_exact(&mut msg).await?;
        let v = view.borrow().clone();
        let out = answer(zone, &v, &msg, Transport::Tcp);
        count(registry, &out);
        let Outcome::Reply(b, _) = out else {
            return Ok(());
        };
        let n = u16::try_from(b.len()).map_err(std::io::Error::other)?;
        let mut framed = Vec::with_capacity(b.len() + 2);
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(&b);
        s.write_all(&framed).await?;
    }
}
