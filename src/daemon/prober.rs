//! The health prober: the tokio [`Checker`] that probes every target of
//! `control::health` (TCP connect, or an HTTP/1.0 GET expecting 2xx/3xx)
//! from this node, with bounded concurrency and jitter, runs each
//! target's rise/fall [`Tracker`], and publishes the set of targets that
//! are down on a `watch` channel. It only reports *changes*: the daemon
//! re-syncs the data plane when the down set changes, never per probe.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::control::health::{
    http_request, http_status_ok, jitter, TargetKey, TargetSpec, Tracker,
};
use crate::model::config::{Health, HealthKind};

/// Probes in flight at once, over all targets: a node with thousands of
/// backends must not open thousands of sockets in the same millisecond.
pub const MAX_CONCURRENT_PROBES: usize = 64;

/// The probing side: one task per target, all sharing a semaphore.
pub struct Checker {
    permits: Arc<Semaphore>,
    targets: BTreeMap<TargetKey, Running>,
    down: Arc<watch::Sender<BTreeSet<TargetKey>>>,
}

struct Running {
    health: Health,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Checker {
    /// A checker with no targets, and the receiver of its down set.
    pub fn new(max_concurrent: usize) -> (Checker, watch::Receiver<BTreeSet<TargetKey>>) {
        let (tx, rx) = watch::channel(BTreeSet::new());
        (
            Checker {
                permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
                targets: BTreeMap::new(),
                down: Arc::new(tx),
            },
            rx,
        )
    }

    /// The targets down now.
    pub fn down(&self) -> BTreeSet<TargetKey> {
        self.down.borrow().clone()
    }

    /// Whether `key` is down now.
    pub fn is_down(&self, key: &TargetKey) -> bool {
        self.down.borrow().contains(key)
    }

    /// Number of targets being checked.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Makes the checked set `want`: stops checking targets no longer
    /// wanted (they leave the down set), restarts those whose settings
    /// changed (keeping their current state), starts new ones. Must be
    /// called inside a tokio runtime.
    pub fn set_targets(&mut self, want: &BTreeMap<TargetKey, TargetSpec>) {
        let gone: Vec<TargetKey> = self
            .targets
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        for k in &gone {
            self.targets.remove(k);
        }
        if !gone.is_empty() {
            self.down.send_if_modified(|set| {
                let before = set.len();
                set.retain(|k| !gone.contains(k));
                set.len() != before
            });
        }
        for (key, spec) in want {
            let initially_up = match self.targets.get(key) {
                Some(r) if r.health == spec.health => continue,
                // Changed settings: start over from the current state.
                Some(_) => !self.is_down(key),
                None => spec.initially_up,
            };
            if !initially_up {
                self.down.send_if_modified(|set| set.insert(key.clone()));
            }
            log::info!(
                "health: checking {key} ({} every {} ms, timeout {} ms, rise {}, fall {}){}",
                describe(&spec.health),
                spec.health.interval_ms,
                spec.health.timeout_ms,
                spec.health.rise,
                spec.health.fall,
                if initially_up { "" } else { ", starting down" }
            );
            let task = tokio::spawn(probe_loop(
                key.clone(),
                spec.health.clone(),
                initially_up,
                self.permits.clone(),
                self.down.clone(),
            ));
            self.targets.insert(
                key.clone(),
                Running {
                    health: spec.health.clone(),
                    task,
                },
            );
        }
    }
}

fn describe(h: &Health) -> String {
    match h.kind {
        HealthKind::Tcp => "tcp connect".into(),
        HealthKind::Http => format!("http GET {}", h.path),
    }
}

/// Probes one target forever. The first probe comes at a random point of
/// the first interval; each next one an interval after the previous one
/// started, minus up to 10% jitter, so `fall` failures never take longer
/// than `interval × fall` (plus the last probe's timeout).
async fn probe_loop(
    key: TargetKey,
    health: Health,
    initially_up: bool,
    permits: Arc<Semaphore>,
    down: Arc<watch::Sender<BTreeSet<TargetKey>>>,
) {
    let seed = RandomState::new();
    let interval = Duration::from_millis(u64::from(health.interval_ms.max(1)));
    let timeout = Duration::from_millis(u64::from(health.timeout_ms.max(1)));
    let mut tracker = Tracker::new(initially_up);
    tokio::time::sleep(interval.mul_f64(jitter(&seed, 0))).await;
    let addr = SocketAddr::new(key.backend.addr, key.backend.port);
    for n in 1u64.. {
        let started = Instant::now();
        let result = {
            let Ok(_permit) = permits.acquire().await else {
                return;
            };
            probe(addr, &health, timeout).await
        };
        let ok = result.is_ok();
        if let Some(up) = tracker.record(ok, health.rise, health.fall) {
            if up {
                log::info!("health: {key} is up ({} successes)", health.rise);
            } else {
                let why = result.err().unwrap_or_default();
                log::warn!(
                    "health: {key} is down ({} failures; last: {why})",
                    health.fall
                );
            }
            down.send_if_modified(|set| {
                if up {
                    set.remove(&key)
                } else {
                    set.insert(key.clone())
                }
            });
        }
        let next = started + interval - interval.mul_f64(0.1 * jitter(&seed, n));
        tokio::time::sleep_until(next).await;
    }
}

/// One probe of `addr` within `timeout`: `Err` says why it failed.
pub async fn probe(addr: SocketAddr, health: &Health, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, probe_inner(addr, health)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

async fn probe_inner(addr: SocketAddr, health: &Health) -> Result<(), String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    if health.kind == HealthKind::Tcp {
        return Ok(());
    }
    let _ = s.set_nodelay(true);
    s.write_all(http_request(addr, &health.path).as_bytes())
        .await
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read from {addr}: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    http_status_ok(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BackendKey;

    fn fast(kind: HealthKind) -> Health {
        Health {
            kind,
            path: "/".into(),
            interval_ms: 20,
            timeout_ms: 10,
            rise: 1,
            fall: 1,
        }
    }

    /// Waits (bounded, not timed) until the down set satisfies `pred`.
    async fn until(
        rx: &mut watch::Receiver<BTreeSet<TargetKey>>,
        pred: impl Fn(&BTreeSet<TargetKey>) -> bool,
    ) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while !pred(&rx.borrow_and_update()) {
                rx.changed().await.expect("checker alive");
            }
        })
        .await
        .expect("down set never reached the expected state");
    }

    #[tokio::test]
    async fn checker_reports_down_and_up_and_forgets_removed_targets() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let key = TargetKey {
            service: "web".into(),
            backend: BackendKey {
                addr: addr.ip(),
                port: addr.port(),
            },
        };
        let (mut checker, mut rx) = Checker::new(4);
        let mut want = BTreeMap::new();
        want.insert(
            key.clone(),
            TargetSpec {
                health: fast(HealthKind::Tcp),
                initially_up: true,
            },
        );
        checker.set_targets(&want);
        assert_eq!(checker.len(), 1);
        // Nothing listens: down.
        until(&mut rx, |s| s.contains(&key)).await;
        // Something listens again (an HTTP server answering 200): up.
        let l = tokio::net::TcpListener::bind(addr).await.unwrap();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nok").await;
            }
        });
        until(&mut rx, |s| !s.contains(&key)).await;
        // An HTTP check of a path the server answers: stays up; a target
        // that is removed while down leaves the down set.
        want.get_mut(&key).unwrap().health = fast(HealthKind::Http);
        checker.set_targets(&want);
        server.abort();
        let _ = server.await;
        until(&mut rx, |s| s.contains(&key)).await;
        checker.set_targets(&BTreeMap::new());
        assert!(checker.is_empty());
        assert!(!checker.is_down(&key));
    }

    #[tokio::test]
    async fn a_target_first_seen_down_starts_down() {
        let key = TargetKey {
            service: "web".into(),
            backend: BackendKey {
                addr: "127.0.0.1".parse().unwrap(),
                port: 9,
            },
        };
        let (mut checker, _rx) = Checker::new(4);
        let mut want = BTreeMap::new();
        let mut h = fast(HealthKind::Tcp);
        h.interval_ms = 60_000;
        h.timeout_ms = 1000;
        want.insert(
            key.clone(),
            TargetSpec {
                health: h,
                initially_up: false,
            },
        );
        checker.set_targets(&want);
        assert!(checker.is_down(&key));
    }
}
