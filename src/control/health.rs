//! Active health checks of backends (`health = {...}` of a service): the
//! pure rise/fall state machine ([`Tracker`]) and the tokio [`Checker`]
//! that probes every target (TCP connect, or an HTTP/1.0 GET expecting
//! 2xx/3xx) from this node, with bounded concurrency and jitter, and
//! publishes the set of targets that are down on a `watch` channel.
//!
//! The checker only reports *changes*: the daemon re-syncs the data plane
//! when the down set changes, never on every probe. A down backend stays in
//! the data plane as `BackendState::Down`: no new flows, established flows
//! keep their conntrack entry.

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use crate::model::config::{Health, HealthKind};
use crate::model::{BackendKey, BackendState, DesiredState, Proto, ServiceKey};

/// Probes in flight at once, over all targets: a node with thousands of
/// backends must not open thousands of sockets in the same millisecond.
pub const MAX_CONCURRENT_PROBES: usize = 64;

/// What is checked: one backend of one named service (a backend in two
/// services is checked once per service, each with its own settings).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetKey {
    pub service: String,
    pub backend: BackendKey,
}

impl std::fmt::Display for TargetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "service {} backend {}", self.service, self.backend)
    }
}

/// A target as the daemon wants it checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    pub health: Health,
    /// Its state when first seen: a restarted daemon starts a backend the
    /// data plane holds as down still down, so it is not flapped up.
    pub initially_up: bool,
}

/// The targets of a desired state: every backend of every service port
/// whose service has a health check (`health_of` gives it by service
/// name). UDP ports are not probed (a TCP or HTTP probe says nothing about
/// them); a UDP port whose backend address and port are also a checked TCP
/// target follows that target's state (see [`mark_down`]). `held_down`
/// (what the data plane holds as down now) gives each new target its
/// initial state.
pub fn targets(
    desired: &DesiredState,
    checked: &[(&str, &Health)],
    held_down: &BTreeSet<(ServiceKey, BackendKey)>,
) -> BTreeMap<TargetKey, TargetSpec> {
    let mut out = BTreeMap::new();
    // The services with a check, not every service: their keys are
    // found by name (keys order by name first).
    for &(name, health) in checked {
        let named = desired
            .services
            .range(ServiceKey::first_of(name)..)
            .take_while(|(k, _)| k.name == name)
            .filter(|(k, _)| k.proto == Proto::Tcp);
        for (key, spec) in named {
            for bk in spec.backends.keys() {
                let initially_up = !held_down.contains(&(key.clone(), *bk));
                out.insert(
                    TargetKey {
                        service: key.name.clone(),
                        backend: *bk,
                    },
                    TargetSpec {
                        health: health.clone(),
                        initially_up,
                    },
                );
            }
        }
    }
    out
}

/// Marks the backends of `down` targets `Down` in `desired` (an up
/// backend only: draining stays draining).
pub fn mark_down(desired: &mut Cow<'_, DesiredState>, down: &BTreeSet<TargetKey>) {
    // Walk the (few) down targets, not every backend. The desired state
    // is copied only if a backend is to be marked, and then a spec only
    // where one is (specs are shared).
    for t in down {
        let marked: Vec<ServiceKey> = desired
            .services
            .range(ServiceKey::first_of(&t.service)..)
            .take_while(|(k, _)| k.name == t.service)
            .filter(|(_, s)| s.backends.get(&t.backend).map(|b| b.state) == Some(BackendState::Up))
            .map(|(k, _)| k.clone())
            .collect();
        for key in marked {
            if let Some(spec) = desired.to_mut().services.get_mut(&key) {
                if let Some(b) = Arc::make_mut(spec).backends.get_mut(&t.backend) {
                    b.state = BackendState::Down;
                }
            }
        }
    }
}

/// Rise/fall counting of one target. Pure: no clock, no IO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracker {
    up: bool,
    /// Consecutive results contradicting `up`.
    streak: u32,
}

impl Tracker {
    pub fn new(up: bool) -> Self {
        Tracker { up, streak: 0 }
    }

    #[cfg(test)]
    pub fn is_up(self) -> bool {
        self.up
    }

    /// Records one probe result; returns the new state when it flips: an
    /// up target goes down after `fall` consecutive failures, a down one
    /// comes up after `rise` consecutive successes (0 counts as 1).
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let need = if self.up { fall } else { rise }.max(1);
        if self.streak >= need {
            self.up = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

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

/// A pseudo-random fraction in [0, 1) per (target, probe number), so
/// targets spread over the interval and do not probe in lockstep.
fn jitter(seed: &RandomState, n: u64) -> f64 {
    let mut h = seed.build_hasher();
    h.write_u64(n);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
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

/// The probe's request: HTTP/1.0, so the server closes after answering.
pub fn http_request(addr: SocketAddr, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: meshlb-health/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// Whether an HTTP answer (at least its status line) says 2xx or 3xx.
pub fn http_status_ok(answer: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(answer);
    let line = text.lines().next().unwrap_or("").trim_end();
    let mut parts = line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(format!("not an HTTP answer: {line:?}"));
    };
    if !version.starts_with("HTTP/") {
        return Err(format!("not an HTTP answer: {line:?}"));
    }
    match code.parse::<u16>() {
        Ok(c) if (200..400).contains(&c) => Ok(()),
        Ok(_) => Err(format!("status {line:?}")),
        Err(_) => Err(format!("not an HTTP answer: {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (description, initial state, rise, fall, results, state after each)
    type Case = (&'static str, bool, u32, u32, &'static str, &'static str);

    #[test]
    fn rise_and_fall_table() {
        // results: '+' success, '-' failure; states: 'U' up, 'D' down.
        let cases: &[Case] = &[
            ("up stays up on success", true, 2, 3, "+++", "UUU"),
            ("falls after 3 failures", true, 2, 3, "---", "UUD"),
            (
                "a success resets the fall count",
                true,
                2,
                3,
                "--+--",
                "UUUUU",
            ),
            ("fall 1 goes down at once", true, 2, 1, "-", "D"),
            ("rises after 2 successes", false, 2, 3, "++", "DU"),
            (
                "a failure resets the rise count",
                false,
                2,
                3,
                "+-++",
                "DDDU",
            ),
            ("down stays down on failure", false, 2, 3, "---", "DDD"),
            ("full cycle", true, 2, 2, "--++-+", "UDDUUU"),
            ("rise 0 counts as 1", false, 0, 3, "+", "U"),
            ("fall 0 counts as 1", true, 2, 0, "-", "D"),
        ];
        for (what, init, rise, fall, results, states) in cases {
            let mut t = Tracker::new(*init);
            let mut prev = *init;
            for (i, (r, s)) in results.chars().zip(states.chars()).enumerate() {
                let change = t.record(r == '+', *rise, *fall);
                let want = s == 'U';
                assert_eq!(t.is_up(), want, "{what}: step {i}");
                assert_eq!(
                    change,
                    (want != prev).then_some(want),
                    "{what}: step {i}: a change is reported exactly when the state flips"
                );
                prev = want;
            }
        }
    }

    #[test]
    fn http_status_table() {
        let cases: &[(&[u8], bool)] = &[
            (b"HTTP/1.1 200 OK\r\n\r\nb1", true),
            (b"HTTP/1.0 204 No Content\r\n", true),
            (b"HTTP/1.1 301 Moved\r\nLocation: /x\r\n", true),
            (b"HTTP/1.1 399 Odd\r\n", true),
            (b"HTTP/1.1 404 Not Found\r\n", false),
            (b"HTTP/1.1 500 Internal Server Error\r\n", false),
            (b"HTTP/1.1 199 Early\r\n", false),
            (b"SSH-2.0-OpenSSH\r\n", false),
            (b"", false),
            (b"HTTP/1.1\r\n", false),
            (b"HTTP/1.1 abc\r\n", false),
            (b"\xff\xfe\x00garbage", false),
        ];
        for (answer, ok) in cases {
            assert_eq!(
                http_status_ok(answer).is_ok(),
                *ok,
                "{:?}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[test]
    fn http_request_is_one_complete_http10_request() {
        let r = http_request("10.0.0.1:8000".parse().unwrap(), "/healthz");
        assert!(r.starts_with("GET /healthz HTTP/1.0\r\n"), "{r}");
        assert!(r.contains("\r\nHost: 10.0.0.1:8000\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n"), "{r}");
    }

    #[test]
    fn jitter_is_a_fraction() {
        let s = RandomState::new();
        for n in 0..1000 {
            let j = jitter(&s, n);
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }

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

    #[test]
    fn targets_and_mark_down() {
        use crate::model::{BackendSpec, ServiceSpec};
        let bk = |i: u8| BackendKey {
            addr: std::net::IpAddr::from([10, 0, 0, i]),
            port: 8000,
        };
        let up = BackendSpec {
            weight: 100,
            state: BackendState::Up,
            remote: false,
        };
        let draining = BackendSpec {
            state: BackendState::Draining,
            ..up
        };
        let skey = |name: &str, proto| ServiceKey {
            name: name.into(),
            proto,
            port: 80,
        };
        let svc = |backends: Vec<(BackendKey, BackendSpec)>| {
            Arc::new(ServiceSpec {
                affinity_secs: 0,
                frontends: Default::default(),
                backends: backends.into_iter().collect(),
            })
        };
        let mut desired = DesiredState::default();
        desired.services.insert(
            skey("web", Proto::Tcp),
            svc(vec![(bk(1), up), (bk(2), up), (bk(3), draining)]),
        );
        desired
            .services
            .insert(skey("web", Proto::Udp), svc(vec![(bk(1), up)]));
        desired
            .services
            .insert(skey("plain", Proto::Tcp), svc(vec![(bk(1), up)]));
        let held_down = [(skey("web", Proto::Tcp), bk(2))].into();
        let h = fast(HealthKind::Tcp);
        let t = targets(&desired, &[("web", &h)], &held_down);
        let tk = |s: &str, i| TargetKey {
            service: s.into(),
            backend: bk(i),
        };
        assert_eq!(
            t.keys().cloned().collect::<Vec<_>>(),
            vec![tk("web", 1), tk("web", 2), tk("web", 3)],
            "only services with a check; UDP ports are not probed"
        );
        assert!(t[&tk("web", 1)].initially_up);
        assert!(!t[&tk("web", 2)].initially_up, "held down stays down");

        let down: BTreeSet<TargetKey> = [tk("web", 1), tk("web", 3)].into();
        let mut desired = Cow::Owned(desired);
        mark_down(&mut desired, &down);
        let state = |s: &str, p, i| desired.services[&skey(s, p)].backends[&bk(i)].state;
        assert_eq!(state("web", Proto::Tcp, 1), BackendState::Down);
        assert_eq!(
            state("web", Proto::Udp, 1),
            BackendState::Down,
            "same address and port"
        );
        assert_eq!(state("web", Proto::Tcp, 2), BackendState::Up);
        assert_eq!(state("web", Proto::Tcp, 3), BackendState::Draining);
        assert_eq!(
            state("plain", Proto::Tcp, 1),
            BackendState::Up,
            "other service"
        );
    }
}
