//! Connection-per-request throughput through the XDP VIP must keep pace with
//! the direct path: wrk (`Connection: close`) straight to the backend once,
//! then five back-to-back rounds through the VIP, each with zero errors and
//! at least 0.8x the direct rate. Needs root; see `common` for the topology.

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
    let bad: Vec<String> = rounds
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.socket_errors() > 0
                || r.non_2xx > 0
                || r.requests == 0
                || r.rps < MIN_RATIO * direct.rps
        })
        .map(|(i, r)| format!("round {}: {r:?}", i + 1))
        .collect();
    assert!(
        bad.is_empty(),
        "VIP rounds with errors or below {MIN_RATIO}x the direct {:.0} req/s:\n{}{}",
        direct.rps,
        bad.join("\n"),
        topo.ctx()
    );
    assert!(daemon.is_running(), "daemon died{}", topo.ctx());
}
