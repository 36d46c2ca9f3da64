//! The daemon's own counters, bumped by every layer that meets the event:
//! sync latency (an etcd event observed to the kernel applied) and config
//! items rejected, by kind. `/metrics` and `meshlb status` read them.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

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
    /// The latest `RECENT_SYNCS` latencies (seconds), oldest first.
    recent: std::collections::VecDeque<f64>,
    config_errors: BTreeMap<String, u64>,
    /// DNS queries answered (or dropped), by response code.
    dns_queries: BTreeMap<&'static str, u64>,
    /// Announced VIPs and the owner this node sees (`None`: none).
    vip_owners: BTreeMap<std::net::IpAddr, Option<String>>,
}

/// Latencies kept for `SyncLatency`'s percentiles.
const RECENT_SYNCS: usize = 1024;

/// Sync latency as `meshlb status` shows it: the daemon's recent syncs
/// (etcd event observed -> kernel applied), written beside its pin lock.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncLatency {
    /// Syncs since the daemon started.
    pub count: u64,
    /// Over the latest `recent` syncs (up to 1,024), in milliseconds.
    pub recent: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub last_ms: f64,
}

impl Registry {
    /// Records one "etcd event observed -> kernel applied" latency.
    pub fn observe_sync(&self, secs: f64) {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *le {
                g.buckets[i] += 1;
            }
        }
        g.sum += secs;
        g.count += 1;
        if g.recent.len() == RECENT_SYNCS {
            g.recent.pop_front();
        }
        g.recent.push_back(secs);
    }

    /// The sync latencies so far (`None` before the first).
    pub fn sync_latency(&self) -> Option<SyncLatency> {
        let g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let last = *g.recent.back()?;
        let mut sorted: Vec<f64> = g.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        // Nearest rank.
        let rank =
            |p: f64| sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
        let ms = |s: f64| (s * 1e6).round() / 1e3;
        Some(SyncLatency {
            count: g.count,
            recent: sorted.len(),
            p50_ms: ms(rank(0.50)),
            p99_ms: ms(rank(0.99)),
            max_ms: ms(sorted[sorted.len() - 1]),
            last_ms: ms(last),
        })
    }

    /// Counts one rejected config item (`kind`: what was wrong).
    pub fn config_error(&self, kind: &str) {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *g.config_errors.entry(kind.to_owned()).or_default() += 1;
    }

    /// Total config errors so far (all kinds).
    pub fn config_errors_total(&self) -> u64 {
        let g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.config_errors.values().sum()
    }

    /// Counts one DNS query by the response code it got (`"dropped"`:
    /// none).
    pub fn dns_query(&self, rcode: &'static str) {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *g.dns_queries.entry(rcode).or_default() += 1;
    }

    /// Replaces the announced VIPs and their owners.
    pub fn set_vip_owners(&self, owners: BTreeMap<std::net::IpAddr, Option<String>>) {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.vip_owners = owners;
    }

    /// A copy of the histogram and the config error counts, for rendering.
    pub fn snapshot(&self) -> Snapshot {
        let g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Snapshot {
            buckets: LATENCY_BUCKETS.iter().copied().zip(g.buckets).collect(),
            sum: g.sum,
            count: g.count,
            config_errors: g.config_errors.clone(),
            dns_queries: g.dns_queries.clone(),
            vip_owners: g.vip_owners.clone(),
        }
    }
}

/// What [`Registry::snapshot`] returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// (upper bound in seconds, cumulative count) per histogram bucket.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
    pub config_errors: BTreeMap<String, u64>,
    pub dns_queries: BTreeMap<&'static str, u64>,
    pub vip_owners: BTreeMap<std::net::IpAddr, Option<String>>,
}
