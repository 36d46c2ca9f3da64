//! Connection-per-request load through the XDP VIP must not collapse, even
//! right after the same client loaded the same backend port directly: wrk
//! (`Connection: close`) straight to the backend, then five back-to-back
//! rounds through the VIP, each with zero errors and at least 0.8x the first
//! VIP round — kernel DNAT collapses here when conntrack entries of the two
//! paths clash. The rates relative to the direct path are printed for the
//! report, not asserted (benchmarks measure speed). Needs root; see
//! `common` for the topology.

mod common;

use std::time::Duration;

use common::*;

const ROUNDS: usize = 5;
const SECS: u32 = 3;
const CONNS: u32 = 16;
const MIN_RATIO: f64 = 0.8;

#[test]
fn vip_connection_per_request_keeps_pace_with_direct() {
    let topo = Topology::new("cpr", TopoOpts { backends: 1 });
    topo.start_nginx();
    topo.warm_up(None);
    topo.xdp_pass_peers();
    let b1 = topo.backend("b1").clone();
    let cfg = topo.write_file(
        "meshlb.toml",
        &config_toml(&[Svc {
            name: "web",
            vip: Some("10.96.0.10"),
            proto: "tcp",
            port: 80,
            target: HTTP_PORT,
            backends: vec![b1.v4.into()],
        }]),
    );
    let mut daemon = topo.start_daemon(&cfg, "native");
    topo.wait_ready(&mut daemon, &["web"], Duration::from_secs(30));

    // The same backend port the VIP translates to: the backend sees the very
    // same 4-tuples from both paths (the client's address and port are kept),
    // which is the mixed case. The backend's own TIME_WAIT sockets from this
    // round may slow the first VIP round (PAWS/ISN checks against another
    // timestamp/sequence offset); what must not happen is a collapse.
    let direct_url = format!("http://{}:{HTTP_PORT}/", b1.v4);
    let direct = topo.wrk(&direct_url, CONNS, SECS, true);
    eprintln!(
        "conn-per-request direct {direct_url}: {:.0} req/s ({} requests, {} socket errors, {} non-2xx)",
        direct.rps,
        direct.requests,
        direct.socket_errors(),
        direct.non_2xx
    );
    assert!(
        direct.socket_errors() == 0 && direct.non_2xx == 0 && direct.requests > 0,
        "direct baseline is broken, nothing to compare with: {direct:?}"
    );

    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        let r = topo.wrk("http://10.96.0.10:80/", CONNS, SECS, true);
        eprintln!(
            "conn-per-request VIP round {round}: {:.0} req/s = {:.2}x direct ({} requests, {} socket errors, {} non-2xx)",
            r.rps,
            r.rps / direct.rps,
            r.requests,
            r.socket_errors(),
            r.non_2xx
        );
        rounds.push(r);
    }
    let first = rounds[0].rps;
    let bad: Vec<String> = rounds
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.socket_errors() > 0 || r.non_2xx > 0 || r.requests == 0 || r.rps < MIN_RATIO * first
        })
        .map(|(i, r)| format!("round {}: {r:?}", i + 1))
        .collect();
    assert!(
        bad.is_empty(),
        "VIP rounds with errors or below {MIN_RATIO}x the first round's {:.0} req/s:\n{}{}",
        first,
        bad.join("\n"),
        topo.ctx()
    );
    assert!(daemon.is_running(), "daemon died{}", topo.ctx());
}
