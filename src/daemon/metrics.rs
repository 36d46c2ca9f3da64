//! Prometheus text exposition on `/metrics`, rendered at scrape time from
//! the kernel's own counters: the pinned maps (XDP: per-CPU counters) or
//! the IPVS services' and destinations' statistics (IPVS), see [`Source`].

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::engine::StatsSource;
use crate::model::counters::Registry;
use crate::model::status::Status;
use crate::model::BackendState;

/// Per-backend numbers of one (service, backend) label set. A backend
/// that serves several published ports of a service is one slot per port
/// in the data plane, but one series here: its slots are summed.
#[derive(Default)]
struct BackendSeries {
    packets_in: u64,
    packets_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    connections: u64,
    /// Up in at least one of its slots.
    up: bool,
}
/// The daemon's own metrics (sync latency, config errors) as text.
fn render_registry(registry: &Registry, out: &mut String) {
    let g = registry.snapshot();
    family(
        out,
        "meshlb_sync_latency_seconds",
        "histogram",
        "From an etcd event observed to the kernel state applied.",
    );
    for (le, n) in &g.buckets {
        let _ = writeln!(out, "meshlb_sync_latency_seconds_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "meshlb_sync_latency_seconds_bucket{{le=\"+Inf\"}} {}",
        g.count
    );
    let _ = writeln!(out, "meshlb_sync_latency_seconds_sum {}", g.sum);
    let _ = writeln!(out, "meshlb_sync_latency_seconds_count {}", g.count);
    family(
        out,
        "meshlb_config_errors_total",
        "counter",
        "Config items rejected, by kind.",
    );
    for (k, v) in &g.config_errors {
        let _ = writeln!(out, "meshlb_config_errors_total{{kind=\"{}\"}} {v}", esc(k));
    }
    if !g.dns_queries.is_empty() {
        family(
            out,
            "meshlb_dns_queries_total",
            "counter",
            "DNS queries, by the response code they got (dropped: none).",
        );
        for (k, v) in &g.dns_queries {
            let _ = writeln!(out, "meshlb_dns_queries_total{{rcode=\"{k}\"}} {v}");
        }
    }
    if !g.vip_owners.is_empty() {
        family(
            out,
            "meshlb_vip_owner",
            "gauge",
            "1 for the node that owns each announced VIP, as this node sees it (none: no owner now).",
        );
        for (vip, owner) in &g.vip_owners {
            let node = owner.as_deref().unwrap_or("");
            let _ = writeln!(
                out,
                "meshlb_vip_owner{{vip=\"{vip}\",node=\"{}\"}} {}",
                esc(node),
                u8::from(owner.is_some())
            );
        }
    }
}

/// Starts a metric family: its `# HELP` and `# TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value (text format: backslash, quote, newline).
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the metrics text from a status snapshot.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let mut series: BTreeMap<(String, String), BackendSeries> = BTreeMap::new();
    for s in &status.services {
        for b in &s.backends {
            let be = match b.addr.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V6(_)) => format!("[{}]:{}", b.addr, b.port),
                _ => format!("{}:{}", b.addr, b.port),
            };
            let e = series.entry((esc(&s.name), esc(&be))).or_default();
            e.packets_in += b.packets_in;
            e.packets_out += b.packets_out;
            e.bytes_in += b.bytes_in;
            e.bytes_out += b.bytes_out;
            e.connections += b.connections;
            e.up |= b.state == BackendState::Up;
        }
    }
    type Field = fn(&BackendSeries) -> u64;
    let directed: [(&str, &str, &str, Field, Field); 2] = [
        (
            "meshlb_packets_total",
            "Packets forwarded, per service, backend and direction (in: client to backend).",
            "counter",
            |b| b.packets_in,
            |b| b.packets_out,
        ),
        (
            "meshlb_bytes_total",
            "Bytes forwarded (L2 frame length), per service, backend and direction.",
            "counter",
            |b| b.bytes_in,
            |b| b.bytes_out,
        ),
    ];
    for (name, help, kind, fin, fout) in directed {
        family(&mut out, name, kind, help);
        for ((svc, be), b) in &series {
            for (dir, v) in [("in", fin(b)), ("out", fout(b))] {
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{svc}\",backend=\"{be}\",direction=\"{dir}\"}} {v}"
                );
            }
        }
    }
    let plain: [(&str, &str, &str, Field); 2] = [
        (
            "meshlb_connections_total",
            "New flows, per service and backend.",
            "counter",
            |b| b.connections,
        ),
        (
            "meshlb_backend_up",
            "Whether a backend takes new flows (0: down by health checks, draining or weight 0).",
            "gauge",
            |b| u64::from(b.up),
        ),
    ];
    for (name, help, kind, f) in plain {
        family(&mut out, name, kind, help);
        for ((svc, be), b) in &series {
            let _ = writeln!(out, "{name}{{service=\"{svc}\",backend=\"{be}\"}} {}", f(b));
        }
    }
    family(
        &mut out,
        "meshlb_backends",
        "gauge",
        "Backends per service.",
    );
    let mut per_service: BTreeMap<String, usize> = BTreeMap::new();
    for (svc, _) in series.keys() {
        *per_service.entry(svc.clone()).or_default() += 1;
    }
    for s in &status.services {
        per_service.entry(esc(&s.name)).or_default();
    }
    for (svc, n) in &per_service {
        let _ = writeln!(out, "meshlb_backends{{service=\"{svc}\"}} {n}");
    }
    family(
        &mut out,
        "meshlb_datapath_packets_total",
        "counter",
        "Data-path events by kind (passes, translations, malformed input).",
    );
    for (k, v) in &status.counters {
        let _ = writeln!(out, "meshlb_datapath_packets_total{{kind=\"{k}\"}} {v}");
    }
    let drops: Vec<(&str, u64)> = meshlb_common::Counter::ALL
        .iter()
        .filter(|c| c.is_drop())
        .filter_map(|c| status.counters.get(c.name()).map(|v| (c.name(), *v)))
        .collect();
    if !drops.is_empty() {
        family(&mut out, "meshlb_dropped_total", "counter", "Packets the data path dropped, by reason (a VIP port nobody publishes, no usable backend, no SNAT port, a later fragment whose first was not seen, ...).");
        for (reason, v) in drops {
            let _ = writeln!(out, "meshlb_dropped_total{{reason=\"{reason}\"}} {v}");
        }
    }
    if status.flow_table_size > 0 {
        flow_metrics(status, &mut out);
    }
    family(
        &mut out,
        "meshlb_dataplane_info",
        "gauge",
        "The forwarding engine in use.",
    );
    let _ = writeln!(
        out,
        "meshlb_dataplane_info{{kind=\"{}\"}} 1",
        esc(status.dataplane)
    );
    out
}

/// The flow table's series (XDP): its fill, the SNAT ports held, and the
/// flow events the data path counts. `created`: new flows; `rebalanced`:
/// UDP flows moved off a backend that went down or away; `healed`: flows
/// whose evicted reply half was re-created; `untracked`: TCP packets of no
/// known flow forwarded without state; `expired`: idle past the timeout
/// (found by a packet, or swept); `evicted`: a SNAT port found whose flow's
/// conntrack entry was gone. The new-flow rate and the flood state too.
fn flow_metrics(status: &Status, out: &mut String) {
    let counter = |name: &str| status.counters.get(name).copied().unwrap_or(0);
    let gauges = [
        (
            "meshlb_flows",
            "Flows in the conntrack table.",
            status.conntrack_entries,
        ),
        (
            "meshlb_flow_table_size",
            "Capacity of each flow table.",
            status.flow_table_size,
        ),
        (
            "meshlb_embryonic_flows",
            "Flows not established yet (kept apart from established ones).",
            status.embryonic_flows,
        ),
        (
            "meshlb_new_flows_per_second",
            "New flows in the last full second.",
            status.new_flows_per_second,
        ),
        (
            "meshlb_flood",
            "1 while the new-flow rate is over [conntrack] flood_threshold.",
            u64::from(status.flood),
        ),
        (
            "meshlb_snat_ports_in_use",
            "SNAT ports held by translated flows.",
            status.snat_ports_in_use,
        ),
    ];
    for (name, help, v) in gauges {
        family(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    }
    family(
        out,
        "meshlb_snat_exhausted_total",
        "counter",
        "New flows dropped for want of a free SNAT port.",
    );
    let _ = writeln!(
        out,
        "meshlb_snat_exhausted_total {}",
        counter("snat_exhausted")
    );
    family(
        out,
        "meshlb_flow_events_total",
        "counter",
        "Flow table events (created, expired, evicted, rebalanced, healed, untracked).",
    );
    for (event, cs) in [
        ("created", &["new_flow"][..]),
        // Found expired by a packet, or swept by the daemon.
        ("expired", &["expired", "swept"][..]),
        ("evicted", &["evicted"][..]),
        ("rebalanced", &["rebalanced"][..]),
        ("healed", &["healed"][..]),
        ("untracked", &["stateless"][..]),
    ] {
        let n: u64 = cs.iter().map(|c| counter(c)).sum();
        let _ = writeln!(out, "meshlb_flow_events_total{{event=\"{event}\"}} {n}");
    }
}

/// Serves `/metrics` until the task is dropped, reading `source` at each
/// scrape.
pub async fn serve(
    listener: TcpListener,
    source: StatsSource,
    node: String,
    registry: Arc<Registry>,
) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let source = source.clone();
        let node = node.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let Ok(Ok(n)) =
                tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf)).await
            else {
                return;
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let (code, body) = if req.starts_with("GET /metrics") {
                match source.status(&node).await {
                    Ok(s) => {
                        let mut text = render(&s);
                        render_registry(&registry, &mut text);
                        ("200 OK", text)
                    }
                    Err(e) => ("500 Internal Server Error", format!("{e}\n")),
                }
            } else {
                ("404 Not Found", "try /metrics\n".to_owned())
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

/// Binds the metrics listener (`None` when disabled).
pub async fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<TcpListener>> {
    match addr {
        Some(a) => TcpListener::bind(a).await.map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::status::{BackendStatus, ServiceStatus, Status};

    fn backend(addr: &str, port: u16, state: BackendState, n: u64) -> BackendStatus {
        BackendStatus {
            addr: addr.into(),
            port,
            weight: 100,
            state,
            packets: 2 * n,
            bytes: 200 * n,
            connections: n,
            packets_in: n,
            packets_out: n,
            bytes_in: 100 * n,
            bytes_out: 100 * n,
        }
    }

    #[test]
    fn vip_owners_are_one_series_per_announced_vip() {
        let r = Registry::default();
        let mut out = String::new();
        render_registry(&r, &mut out);
        assert!(!out.contains("meshlb_vip_owner"), "{out}");
        r.set_vip_owners(
            [
                ("10.96.0.10".parse().unwrap(), Some("n2".to_string())),
                ("fd00:96::20".parse().unwrap(), None),
            ]
            .into(),
        );
        let mut out = String::new();
        render_registry(&r, &mut out);
        assert!(out.contains("# TYPE meshlb_vip_owner gauge"), "{out}");
        assert!(
            out.contains("meshlb_vip_owner{vip=\"10.96.0.10\",node=\"n2\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("meshlb_vip_owner{vip=\"fd00:96::20\",node=\"\"} 0\n"),
            "{out}"
        );
    }

    #[test]
    fn sync_latency_percentiles_are_nearest_rank_over_the_recent_syncs() {
        let r = Registry::default();
        assert_eq!(r.sync_latency(), None);
        // 1..=100 ms, in a shuffled order, then the last one 7 ms.
        for i in (0..100u32).map(|i| (i * 37) % 100 + 1) {
            r.observe_sync(f64::from(i) / 1000.0);
        }
        r.observe_sync(0.007);
        let l = r.sync_latency().unwrap();
        assert_eq!((l.count, l.recent), (101, 101));
        // 101 samples: rank ceil(0.99 * 101) = 100 is 99 ms (7 ms is there twice).
        assert_eq!(
            (l.p50_ms, l.p99_ms, l.max_ms, l.last_ms),
            (50.0, 99.0, 100.0, 7.0)
        );
        // Only the latest 1,024 count.
        for _ in 0..2000 {
            r.observe_sync(0.001);
        }
        let l = r.sync_latency().unwrap();
        assert_eq!((l.count, l.recent), (2101, 1024));
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (1.0, 1.0, 1.0));
    }

    #[test]
    fn drop_counters_become_dropped_total_by_reason() {
        let mut counters = BTreeMap::new();
        counters.insert("unknown_port", 3u64);
        counters.insert("no_backend", 1);
        counters.insert("forwarded_in", 9);
        let status = Status {
            interfaces: Vec::new(),
            sync_latency: None,
            node: "n".into(),
            dataplane: "xdp-native",
            services: vec![],
            conntrack_entries: 0,
            embryonic_flows: 0,
            new_flows_per_second: 0,
            flood_threshold: 0,
            flood: false,
            snat_ports_in_use: 0,
            flow_table_size: 0,
            vips: Vec::new(),
            counters,
            socket_lb: Default::default(),
        };
        let text = render(&status);
        let dropped: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("meshlb_dropped_total{"))
            .collect();
        assert_eq!(
            dropped,
            vec![
                "meshlb_dropped_total{reason=\"no_backend\"} 1",
                "meshlb_dropped_total{reason=\"unknown_port\"} 3",
            ]
        );
        assert!(text.contains("# TYPE meshlb_dropped_total counter"));
    }

    #[test]
    fn flow_table_series_from_the_counters_and_the_table_fill() {
        let mut counters = BTreeMap::new();
        for (k, v) in [
            ("new_flow", 5u64),
            ("rebalanced", 2),
            ("healed", 1),
            ("stateless", 4),
            ("snat_exhausted", 3),
            ("expired", 2),
            ("swept", 5),
            ("evicted", 9),
        ] {
            counters.insert(k, v);
        }
        let status = Status {
            interfaces: Vec::new(),
            sync_latency: None,
            node: "n".into(),
            dataplane: "xdp-native",
            services: vec![],
            conntrack_entries: 7,
            embryonic_flows: 0,
            new_flows_per_second: 0,
            flood_threshold: 0,
            flood: false,
            snat_ports_in_use: 6,
            flow_table_size: 262_144,
            vips: Vec::new(),
            counters,
            socket_lb: Default::default(),
        };
        let text = render(&status);
        for want in [
            "meshlb_flows 7",
            "meshlb_flow_table_size 262144",
            "meshlb_snat_ports_in_use 6",
            "meshlb_snat_exhausted_total 3",
            "meshlb_flow_events_total{event=\"created\"} 5",
            "meshlb_flow_events_total{event=\"rebalanced\"} 2",
            "meshlb_flow_events_total{event=\"healed\"} 1",
            "meshlb_flow_events_total{event=\"untracked\"} 4",
            "meshlb_flow_events_total{event=\"expired\"} 7",
            "meshlb_flow_events_total{event=\"evicted\"} 9",
            "# TYPE meshlb_flows gauge",
            "# TYPE meshlb_flow_events_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in:\n{text}"
            );
        }
        // IPVS has no flow table of meshlb's: no such series.
        let ipvs = Status {
            flow_table_size: 0,
            dataplane: "ipvs",
            ..status
        };
        assert!(!render(&ipvs).contains("meshlb_flows"));
    }

    #[test]
    fn one_series_per_label_set_with_escaped_values() {
        let status = Status {
            interfaces: Vec::new(),
            sync_latency: None,
            node: "n".into(),
            dataplane: "xdp-generic",
            services: vec![ServiceStatus {
                name: "we\"b".into(),
                vip: None,
                ports: vec!["80/tcp".into(), "8080/tcp".into()],
                scheduler: crate::model::config::Scheduler::Maglev,
                // The same backend behind two published ports: two slots.
                backends: vec![
                    backend("10.0.0.1", 8000, BackendState::Up, 3),
                    backend("10.0.0.1", 8000, BackendState::Up, 4),
                    backend("fd00::1", 8000, BackendState::Down, 1),
                ],
                packets: 0,
                bytes: 0,
                connections: 0,
            }],
            conntrack_entries: 0,
            embryonic_flows: 0,
            new_flows_per_second: 0,
            flood_threshold: 0,
            flood: false,
            snat_ports_in_use: 0,
            flow_table_size: 0,
            vips: Vec::new(),
            counters: BTreeMap::new(),
            socket_lb: Default::default(),
        };
        let text = render(&status);
        let line = |prefix: &str| -> Vec<&str> {
            text.lines().filter(|l| l.starts_with(prefix)).collect()
        };
        assert_eq!(
            line("meshlb_connections_total{"),
            vec![
                "meshlb_connections_total{service=\"we\\\"b\",backend=\"10.0.0.1:8000\"} 7",
                "meshlb_connections_total{service=\"we\\\"b\",backend=\"[fd00::1]:8000\"} 1",
            ]
        );
        assert_eq!(
            line("meshlb_backend_up{"),
            vec![
                "meshlb_backend_up{service=\"we\\\"b\",backend=\"10.0.0.1:8000\"} 1",
                "meshlb_backend_up{service=\"we\\\"b\",backend=\"[fd00::1]:8000\"} 0",
            ]
        );
        assert_eq!(
            line("meshlb_bytes_total{").len(),
            4,
            "in and out per backend"
        );
        assert_eq!(
            line("meshlb_backends{"),
            vec!["meshlb_backends{service=\"we\\\"b\"} 2"]
        );
        assert_eq!(
            line("meshlb_dataplane_info{"),
            vec!["meshlb_dataplane_info{kind=\"xdp-generic\"} 1"]
        );
    }
}
