//! Active health checks of backends (`health = {...}` of a service), the
//! pure part: what to check ([`targets`]), the rise/fall state machine
//! ([`Tracker`]), the probe's HTTP request and answer, and how a down set
//! marks backends down ([`mark_down`]). The prober that runs the checks
//! is `daemon::prober`.
//!
//! A down backend stays in the data plane as `BackendState::Down`: no new
//! flows, established flows keep their conntrack entry.

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::model::config::Health;
use crate::model::{BackendKey, BackendState, DesiredState, Proto, ServiceKey};

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

/// A pseudo-random fraction in [0, 1) per (target, probe number), so
/// targets spread over the interval and do not probe in lockstep.
pub(crate) fn jitter(seed: &RandomState, n: u64) -> f64 {
    let mut h = seed.build_hasher();
    h.write_u64(n);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
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
        let h = Health {
            kind: crate::model::config::HealthKind::Tcp,
            path: "/".into(),
            interval_ms: 20,
            timeout_ms: 10,
            rise: 1,
            fall: 1,
        };
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
