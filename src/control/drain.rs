//! Drain timeouts: a draining backend (weight 0, or a task marked
//! draining) keeps its established flows for the service's
//! `drain_timeout` (or `meshlb run --drain-timeout`), then leaves the data
//! plane. Pure: the daemon passes the clock in, removes what this returns
//! from the kernel, and ends the flows still on it.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::{BackendKey, BackendState, DesiredState, ServiceKey};

/// When each draining backend started draining (as this daemon saw it: a
/// restarted daemon starts the clocks again).
#[derive(Debug, Default)]
pub struct DrainTimers {
    since: BTreeMap<(ServiceKey, BackendKey), Instant>,
    /// The earliest deadline not reached yet.
    next: Option<Instant>,
}

impl DrainTimers {
    /// Starts a timer for every draining backend of `desired` not timed
    /// yet, forgets those no longer draining, and removes from `desired`
    /// the backends drained longer than their service's timeout
    /// (`timeout_of(service name)`; `None`: drain forever). Returns the
    /// removed ones (every call, for as long as they stay draining).
    ///
    /// `draining`, when known, names every service of `desired` with a
    /// draining backend (`DesiredCache::draining`): only those are looked
    /// at. Without it, every service is.
    pub fn apply(
        &mut self,
        desired: &mut Cow<'_, DesiredState>,
        draining: Option<&BTreeSet<ServiceKey>>,
        timeout_of: impl Fn(&str) -> Option<Duration>,
        now: Instant,
    ) -> Vec<(ServiceKey, BackendKey)> {
        let mut seen = BTreeMap::new();
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        // The desired state is copied only if a service has a draining
        // backend, and then a spec only where one is (specs are shared).
        let draining: Vec<ServiceKey> = match draining {
            Some(keys) => keys.iter().cloned().collect(),
            None => desired
                .services
                .iter()
                .filter(|(_, s)| {
                    s.backends
                        .values()
                        .any(|b| b.effective_state() == BackendState::Draining)
                })
                .map(|(k, _)| k.clone())
                .collect(),
        };
        for skey in draining {
            if !desired.services.contains_key(&skey) {
                continue;
            }
            let Some(spec) = desired.to_mut().services.get_mut(&skey) else {
                continue;
            };
            let timeout = timeout_of(&skey.name);
            Arc::make_mut(spec).backends.retain(|bk, bs| {
                if bs.effective_state() != BackendState::Draining {
                    return true;
                }
                let key = (skey.clone(), *bk);
                let since = self.since.get(&key).copied().unwrap_or(now);
                seen.insert(key, since);
                let Some(t) = timeout else { return true };
                let deadline = since + t;
                if now >= deadline {
                    expired.push((skey.clone(), *bk));
                    false
                } else {
                    next = Some(next.map_or(deadline, |n| n.min(deadline)));
                    true
                }
            });
        }
        self.since = seen;
        self.next = next;
        expired
    }

    /// When the next draining backend's timeout ends (`None`: none will).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.since.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendSpec, Proto, ServiceSpec};

    fn bk(i: u8) -> BackendKey {
        BackendKey {
            addr: std::net::IpAddr::from([10, 0, 0, i]),
            port: 80,
        }
    }

    fn skey(name: &str) -> ServiceKey {
        ServiceKey {
            name: name.into(),
            proto: Proto::Tcp,
            port: 80,
        }
    }

    /// Services "a" (timeout 10 s) and "b" (none), each with backends
    /// 1..=3 of the given weights/states.
    fn desired(specs: &[(u8, u32, BackendState)]) -> DesiredState {
        let mut d = DesiredState::default();
        for name in ["a", "b"] {
            d.services.insert(
                skey(name),
                ServiceSpec {
                    backends: specs
                        .iter()
                        .map(|&(i, weight, state)| {
                            (
                                bk(i),
                                BackendSpec {
                                    weight,
                                    state,
                                    remote: false,
                                },
                            )
                        })
                        .collect(),
                    ..Default::default()
                }
                .into(),
            );
        }
        d
    }

    fn timeout(name: &str) -> Option<Duration> {
        (name == "a").then_some(Duration::from_secs(10))
    }

    /// (time, backends wanted, expected expired in "a", backends left in "a")
    type Step<'a> = (u64, &'a [(u8, u32, BackendState)], &'a [u8], &'a [u8]);

    #[test]
    fn drained_backends_leave_after_the_timeout_and_return_when_undrained() {
        use BackendState::*;
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let drained = [(1, 100, Up), (2, 0, Up), (3, 100, Draining)];
        let mut timers = DrainTimers::default();
        let steps: &[Step] = &[
            (0, &drained, &[], &[1, 2, 3]),
            (9, &drained, &[], &[1, 2, 3]),
            (10, &drained, &[2, 3], &[1]),
            (30, &drained, &[2, 3], &[1]),
            // 2 takes weight again: back, and a later drain starts afresh.
            (
                31,
                &[(1, 100, Up), (2, 100, Up), (3, 100, Draining)],
                &[3],
                &[1, 2],
            ),
            (32, &drained, &[3], &[1, 2]),
            (41, &drained, &[3], &[1, 2]),
            (42, &drained, &[2, 3], &[1]),
        ];
        for (s, specs, want_expired, want_left) in steps {
            let mut d = Cow::Owned(desired(specs));
            let expired = timers.apply(&mut d, None, timeout, at(*s));
            let exp: Vec<u8> = expired
                .iter()
                .map(|(k, b)| {
                    assert_eq!(k.name, "a", "service b has no timeout");
                    match b.addr {
                        std::net::IpAddr::V4(a) => a.octets()[3],
                        std::net::IpAddr::V6(_) => unreachable!(),
                    }
                })
                .collect();
            assert_eq!(&exp, want_expired, "t={s}");
            let left: Vec<BackendKey> = d.services[&skey("a")].backends.keys().copied().collect();
            let want: Vec<BackendKey> = want_left.iter().map(|&i| bk(i)).collect();
            assert_eq!(left, want, "t={s}");
            assert_eq!(
                d.services[&skey("b")].backends.len(),
                3,
                "t={s}: b drains forever"
            );
        }
    }

    #[test]
    fn next_deadline_is_the_earliest_pending_one() {
        let t0 = Instant::now();
        let mut timers = DrainTimers::default();
        let mut d = Cow::Owned(desired(&[(1, 0, BackendState::Up)]));
        timers.apply(&mut d, None, timeout, t0);
        assert_eq!(timers.next_deadline(), Some(t0 + Duration::from_secs(10)));
        let mut d = Cow::Owned(desired(&[(1, 0, BackendState::Up)]));
        timers.apply(&mut d, None, timeout, t0 + Duration::from_secs(10));
        assert_eq!(timers.next_deadline(), None, "expired: nothing pending");
        let mut d = Cow::Owned(desired(&[(1, 100, BackendState::Up)]));
        timers.apply(&mut d, None, timeout, t0 + Duration::from_secs(11));
        assert!(timers.is_empty());
    }
}
