//! Prometheus text exposition on `/metrics`, rendered from the pinned maps
//! at scrape time (the kernel's per-CPU counters are the only source).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::inspect;
use crate::pinned::Maps;

/// Upper bounds (seconds) of the sync-latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The daemon's own metrics (the data path's live in the maps).
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Cumulative counts per bucket of `LATENCY_BUCKETS`.
    buckets: [u64; LATENCY_BUCKETS.len()],
    sum: f64,
    count: u64,
    config_errors: BTreeMap<String, u64>,
}

impl Registry {
    /// Records one "etcd event observed -> kernel applied" latency.
    pub fn observe_sync(&self, secs: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *le {
                g.buckets[i] += 1;
            }
        }
        g.sum += secs;
        g.count += 1;
    }

    /// Counts one rejected config item (`kind`: what was wrong).
    pub fn config_error(&self, kind: &str) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *g.config_errors.entry(kind.to_owned()).or_default() += 1;
    }

    /// Total config errors so far (all kinds).
    pub fn config_errors_total(&self) -> u64 {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.config_errors.values().sum()
    }

    fn render(&self, out: &mut String) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP meshlb_sync_latency_seconds From an etcd event observed to the kernel state applied.");
        let _ = writeln!(out, "# TYPE meshlb_sync_latency_seconds histogram");
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "meshlb_sync_latency_seconds_bucket{{le=\"{le}\"}} {}",
                g.buckets[i]
            );
        }
        let _ = writeln!(
            out,
            "meshlb_sync_latency_seconds_bucket{{le=\"+Inf\"}} {}",
            g.count
        );
        let _ = writeln!(out, "meshlb_sync_latency_seconds_sum {}", g.sum);
        let _ = writeln!(out, "meshlb_sync_latency_seconds_count {}", g.count);
        let _ = writeln!(
            out,
            "# HELP meshlb_config_errors_total Config items rejected, by kind."
        );
        let _ = writeln!(out, "# TYPE meshlb_config_errors_total counter");
        for (k, v) in &g.config_errors {
            let _ = writeln!(out, "meshlb_config_errors_total{{kind=\"{k}\"}} {v}");
        }
    }
}

/// Renders the metrics text from a status snapshot.
pub fn render(status: &inspect::Status) -> String {
    let mut out = String::new();
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let _ = writeln!(
        out,
        "# HELP meshlb_packets_total Packets forwarded, per service, backend and direction."
    );
    let _ = writeln!(out, "# TYPE meshlb_packets_total counter");
    for s in &status.services {
        for b in &s.backends {
            let be = format!("{}:{}", b.addr, b.port);
            let _ = writeln!(
                out,
                "meshlb_packets_total{{service=\"{}\",backend=\"{}\",direction=\"in\"}} {}",
                esc(&s.name),
                esc(&be),
                b.packets_in
            );
            let _ = writeln!(
                out,
                "meshlb_packets_total{{service=\"{}\",backend=\"{}\",direction=\"out\"}} {}",
                esc(&s.name),
                esc(&be),
                b.packets_out
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP meshlb_bytes_total Bytes forwarded, per service and backend."
    );
    let _ = writeln!(out, "# TYPE meshlb_bytes_total counter");
    for s in &status.services {
        for b in &s.backends {
            let _ = writeln!(
                out,
                "meshlb_bytes_total{{service=\"{}\",backend=\"{}:{}\"}} {}",
                esc(&s.name),
                esc(&b.addr),
                b.port,
                b.bytes
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP meshlb_connections_total New flows, per service and backend."
    );
    let _ = writeln!(out, "# TYPE meshlb_connections_total counter");
    for s in &status.services {
        for b in &s.backends {
            let _ = writeln!(
                out,
                "meshlb_connections_total{{service=\"{}\",backend=\"{}:{}\"}} {}",
                esc(&s.name),
                esc(&b.addr),
                b.port,
                b.connections
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP meshlb_backend_up Whether a backend takes new flows."
    );
    let _ = writeln!(out, "# TYPE meshlb_backend_up gauge");
    for s in &status.services {
        for b in &s.backends {
            let _ = writeln!(
                out,
                "meshlb_backend_up{{service=\"{}\",backend=\"{}:{}\"}} {}",
                esc(&s.name),
                esc(&b.addr),
                b.port,
                u8::from(b.state == "up")
            );
        }
    }
    let _ = writeln!(out, "# HELP meshlb_backends Backends per service.");
    let _ = writeln!(out, "# TYPE meshlb_backends gauge");
    for s in &status.services {
        let _ = writeln!(
            out,
            "meshlb_backends{{service=\"{}\"}} {}",
            esc(&s.name),
            s.backends.len()
        );
    }
    let _ = writeln!(out, "# HELP meshlb_datapath_packets_total Data-path events by kind (passes, translations, malformed input).");
    let _ = writeln!(out, "# TYPE meshlb_datapath_packets_total counter");
    for (k, v) in &status.counters {
        let _ = writeln!(out, "meshlb_datapath_packets_total{{kind=\"{k}\"}} {v}");
    }
    let _ = writeln!(
        out,
        "# HELP meshlb_dataplane_info The forwarding engine in use."
    );
    let _ = writeln!(out, "# TYPE meshlb_dataplane_info gauge");
    let _ = writeln!(
        out,
        "meshlb_dataplane_info{{kind=\"{}\"}} 1",
        status.dataplane
    );
    out
}

/// Serves `/metrics` until the task is dropped, reading the maps (its own
/// handles on the pins) at each scrape.
pub async fn serve(listener: TcpListener, maps: Arc<Maps>, node: String, registry: Arc<Registry>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let maps = maps.clone();
        let node = node.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let req = String::from_utf8_lossy(&buf[..n]);
            let (code, body) = if req.starts_with("GET /metrics") {
                match inspect::status(&maps, Some(node.as_str())) {
                    Ok(s) => {
                        let mut text = render(&s);
                        registry.render(&mut text);
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
