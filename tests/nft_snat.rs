//! meshlb's nf_tables masquerade — the SNAT of IPVS mode for remote
//! backends — in the host kernel (which has nf_tables but no IPVS): the
//! LB namespace of a topology routes the client to a backend directly,
//! and the backend reports the source address it sees. A flow to an
//! (address, protocol, port) in meshlb's set arrives from the LB's
//! address, any other flow from the client's; the set changes
//! incrementally, a second `Masquerade` (a restarted daemon) installs over
//! the first, IPv6 works the same, and `remove` (`meshlb cleanup`)
//! takes the whole table away. Needs root; see `common`.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use common::*;
use meshlb::kernel::nft::{Masquerade, Remote};

const PORT: u16 = 9100;
const OTHER_PORT: u16 = 9101;

/// Listens on `port` (dual-stack) in the backend namespace; every
/// connection is answered with the peer address it came from.
fn peer_echo(ns: &str, port: u16) {
    let l = in_netns(ns, || TcpListener::bind(("::", port)).expect("bind"));
    thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            if let Ok(peer) = s.peer_addr() {
                let _ = s.write_all(peer.ip().to_canonical().to_string().as_bytes());
            }
        }
    });
}

/// The source address `dst` saw for a connection from the client.
fn seen_from_client(topo: &Topology, dst: SocketAddr) -> IpAddr {
    topo.client(|| {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text)
            .unwrap_or_else(|e| panic!("read from {dst}: {e}"));
        text.parse()
            .unwrap_or_else(|_| panic!("{dst} answered {text:?}"))
    })
}

#[test]
fn remote_backends_are_masqueraded_and_nothing_else() {
    let topo = Topology::new("nft", TopoOpts { backends: 1 });
    let b = topo.backend("b1").clone();
    peer_echo(&b.ns, PORT);
    peer_echo(&b.ns, OTHER_PORT);
    let v4 = |p| SocketAddr::new(b.v4.into(), p);
    let v6 = |p| SocketAddr::new(b.v6.into(), p);
    let client4: IpAddr = CLIENT_V4.into();
    let client6: IpAddr = CLIENT_V6.into();
    assert_eq!(
        seen_from_client(&topo, v4(PORT)),
        client4,
        "routed, not masqueraded yet"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let remote = |addr: IpAddr, port| Remote {
        addr,
        proto: 6,
        port,
    };
    let set = |r: &[Remote]| r.iter().copied().collect::<BTreeSet<_>>();
    let mut masq = Masquerade::new();
    // The socket is opened by the first call: in the LB namespace.
    let sync = |m: &mut Masquerade, want: BTreeSet<Remote>| {
        in_netns(&topo.lb_ns, || rt.block_on(m.sync(&want)))
            .unwrap_or_else(|e| panic!("masquerade {want:?}: {e}"))
    };
    let n = sync(&mut masq, set(&[remote(b.v4.into(), PORT)]));
    assert_eq!(
        n, 10,
        "table, chain, 2 sets, flush, 2 rules, 2 set flushes, 1 add"
    );
    assert_eq!(
        sync(&mut masq, set(&[remote(b.v4.into(), PORT)])),
        0,
        "no change, no message"
    );
    assert_eq!(
        seen_from_client(&topo, v4(PORT)),
        IpAddr::from(b.lb_v4),
        "in the set: masqueraded"
    );
    assert_eq!(
        seen_from_client(&topo, v4(OTHER_PORT)),
        client4,
        "other port: untouched"
    );
    assert_eq!(
        seen_from_client(&topo, v6(PORT)),
        client6,
        "other family: untouched"
    );

    // A restarted daemon installs everything again over the same table.
    let mut again = Masquerade::new();
    let both = set(&[remote(b.v4.into(), PORT), remote(b.v6.into(), PORT)]);
    assert_eq!(sync(&mut again, both.clone()), 11);
    assert_eq!(seen_from_client(&topo, v4(PORT)), IpAddr::from(b.lb_v4));
    assert_eq!(
        seen_from_client(&topo, v6(PORT)),
        IpAddr::from(b.lb_v6),
        "IPv6 masqueraded"
    );

    // Incremental: the v4 element goes, the v6 one stays, one message.
    assert_eq!(sync(&mut again, set(&[remote(b.v6.into(), PORT)])), 1);
    assert_eq!(
        seen_from_client(&topo, v4(PORT)),
        client4,
        "removed: untouched again"
    );
    assert_eq!(seen_from_client(&topo, v6(PORT)), IpAddr::from(b.lb_v6));
    // A UDP entry for the same address and port masquerades no TCP.
    let udp = Remote {
        proto: 17,
        ..remote(b.v4.into(), PORT)
    };
    assert_eq!(sync(&mut again, set(&[udp])), 2);
    assert_eq!(
        seen_from_client(&topo, v4(PORT)),
        client4,
        "udp entry, tcp flow"
    );
    assert_eq!(seen_from_client(&topo, v6(PORT)), client6);

    // `meshlb cleanup`: the table goes with everything in it.
    assert_eq!(sync(&mut again, set(&[remote(b.v4.into(), PORT)])), 2);
    assert_eq!(seen_from_client(&topo, v4(PORT)), IpAddr::from(b.lb_v4));
    let remove = |m: &mut Masquerade| {
        in_netns(&topo.lb_ns, || rt.block_on(m.remove())).unwrap_or_else(|e| panic!("remove: {e}"))
    };
    assert!(remove(&mut Masquerade::new()), "the table was there");
    assert_eq!(
        seen_from_client(&topo, v4(PORT)),
        client4,
        "table removed: nothing masqueraded"
    );
    assert!(!remove(&mut Masquerade::new()), "no table left to remove");
}
