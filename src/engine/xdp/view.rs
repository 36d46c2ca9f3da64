//! Syncs whose work follows what changed, not how much is programmed.
//!
//! After a full sync (every service planned against the tables as read),
//! a [`View`] keeps what the tables hold and the desired state they were
//! programmed for. The next desired state is compared with it service by
//! service; only the services that differ (and, transitively, any
//! sharing a frontend with one of them: who owns a contested frontend is
//! decided among all that want it) are planned, against their part of the view, with the
//! ids held by every other service reserved. After the part's plan is
//! applied, the part of the view is replaced by what a scratch copy of
//! the part's tables reads after the same plan. The comparison walks the
//! services once; everything else costs in proportion to the change.
//!
//! The view is dropped (the caller falls back to a full sync) whenever it
//! could be wrong or incomplete: an apply failed, something did not fit
//! the tables (admission decides among all services), or a periodic
//! reconcile re-reads the kernel.

use std::collections::{BTreeMap, BTreeSet};

use crate::control::reconcile::{self, Limits, Plan, Taken};
use crate::engine::mirror::Mirror;
use crate::engine::BackendOf;
use crate::engine::{Dataplane, DataplaneError};
use crate::model::{BackendState, DesiredState, Frontend, Observed, ObservedService, ServiceKey};

/// See the module documentation.
#[derive(Debug)]
pub struct View {
    /// The desired state the tables were last programmed for (admitted:
    /// every service in it fits).
    desired: DesiredState,
    /// What the tables hold, as `observe` reads them.
    observed: Observed,
    /// Frontend -> the services of `desired` that want it.
    wanted: BTreeMap<Frontend, Owners>,
    /// Ids held in `observed` (and by its orphans).
    service_ids: Ids,
    backend_ids: Ids,
    /// Backends of `desired`, counted.
    backends: usize,
    /// The backends `observed` holds down.
    down: BTreeSet<BackendOf>,
}

/// The services that want one frontend: almost always one, so a short
/// list, not a set (a set's first node alone is half a kilobyte, once per
/// frontend of every service).
#[derive(Debug, Default)]
struct Owners(Vec<ServiceKey>);

impl Owners {
    fn add(&mut self, key: &ServiceKey) {
        if !self.0.contains(key) {
            self.0.push(key.clone());
        }
    }

    fn drop_key(&mut self, key: &ServiceKey) {
        self.0.retain(|k| k != key);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> std::slice::Iter<'_, ServiceKey> {
        self.0.iter()
    }
}

impl<'a> IntoIterator for &'a Owners {
    type Item = &'a ServiceKey;
    type IntoIter = std::slice::Iter<'a, ServiceKey>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A set of held ids that finds the lowest free one at or above any id:
/// one bit per id below the highest held (16 KiB for every backend slot,
/// where a set of 100,000 ids took over a MiB), searched a word at a time.
#[derive(Debug, Default)]
struct Ids {
    /// Bit `i % 64` of word `i / 64`: id `i` is held.
    words: Vec<u64>,
}

impl Ids {
    fn new(ids: impl IntoIterator<Item = u32>) -> Ids {
        let mut out = Ids::default();
        for id in ids {
            out.insert(id);
        }
        out
    }

    fn insert(&mut self, id: u32) {
        let w = id as usize / 64;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (id % 64);
    }

    fn remove(&mut self, id: u32) {
        if let Some(w) = self.words.get_mut(id as usize / 64) {
            *w &= !(1 << (id % 64));
        }
    }

    #[cfg(test)]
    fn holds(&self, id: u32) -> bool {
        self.words
            .get(id as usize / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }

    /// The smallest id at or above `from` not held, or held by `part`
    /// (the part's own ids are its planner's to reuse).
    fn first_free(&self, from: u32, part: &BTreeSet<u32>) -> u32 {
        let mut w = from as usize / 64;
        // Ids below `from` in its word count as held.
        let mut taken = self.words.get(w).copied().unwrap_or(0) | ((1u64 << (from % 64)) - 1);
        let unheld = loop {
            if taken != u64::MAX {
                break (w * 64) as u32 + (!taken).trailing_zeros();
            }
            w += 1;
            taken = self.words.get(w).copied().unwrap_or(0);
        };
        part.range(from..).next().map_or(unheld, |&p| p.min(unheld))
    }
}

/// The services one sync plans: their desired and observed parts.
#[derive(Debug, Default)]
pub struct Part {
    pub keys: BTreeSet<ServiceKey>,
    pub desired: DesiredState,
    pub observed: Observed,
}

impl Part {
    /// Nothing to plan: no service changed, nor the local addresses.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.desired.local_addrs == self.observed.local_addrs
    }
}

impl View {
    /// The view after a full sync: `desired` as admitted and programmed,
    /// `observed` what the tables hold now.
    pub fn new(desired: DesiredState, observed: Observed) -> View {
        let mut wanted: BTreeMap<Frontend, Owners> = BTreeMap::new();
        for (key, spec) in &desired.services {
            for fe in &spec.frontends {
                wanted.entry(*fe).or_default().add(key);
            }
        }
        let backends = desired.services.values().map(|s| s.backends.len()).sum();
        let down = observed
            .services
            .iter()
            .flat_map(|(k, s)| down_of(k, s))
            .collect();
        let service_ids = Ids::new(observed.services.values().map(|s| s.id));
        let backend_ids = Ids::new(
            observed
                .services
                .values()
                .flat_map(|s| s.backends.values().map(|b| b.id))
                .chain(observed.orphan_backends.iter().copied()),
        );
        View {
            desired,
            observed,
            wanted,
            service_ids,
            backend_ids,
            backends,
            down,
        }
    }

    /// The backends the tables hold down.
    pub fn down(&self) -> &BTreeSet<BackendOf> {
        &self.down
    }

    /// Whether the desired state whose `part` this is fits tables of
    /// `limits`, as `reconcile::fits` says of the whole; counted from the
    /// view's totals and the part, not over every service.
    pub fn fits_with(&self, part: &Part, limits: Limits) -> bool {
        let old = || {
            part.keys
                .iter()
                .filter_map(|k| self.desired.services.get(k))
        };
        let new = || part.desired.services.values();
        let services = self.desired.services.len() - old().count() + new().count();
        let backends = self.backends - old().map(|s| s.backends.len()).sum::<usize>()
            + new().map(|s| s.backends.len()).sum::<usize>();
        // Distinct frontends: those the part touches are counted again.
        let touched: BTreeSet<&Frontend> = old()
            .chain(new())
            .flat_map(|s| s.frontends.iter())
            .collect();
        let before = touched
            .iter()
            .filter(|fe| self.wanted.contains_key(fe))
            .count();
        let after = touched
            .iter()
            .filter(|fe| {
                new().any(|s| s.frontends.contains(fe))
                    || self
                        .wanted
                        .get(fe)
                        .is_some_and(|owners| owners.iter().any(|k| !part.keys.contains(k)))
            })
            .count();
        let frontends = self.wanted.len() - before + after;
        services <= limits.services as usize
            && backends <= limits.backends as usize
            && frontends <= limits.frontends as usize
            && part.desired.local_addrs.len() <= limits.local_addrs as usize
    }

    /// What the tables hold.
    pub fn observed(&self) -> &Observed {
        &self.observed
    }

    /// The part of the tables a sync to `desired` changes.
    pub fn part(&self, desired: &DesiredState) -> Part {
        // The changed services, and transitively every service sharing a
        // frontend with one in the part: each frontend's owner is decided
        // among all that want it.
        let mut keys = changed_keys(&self.desired, desired);
        let mut todo: Vec<ServiceKey> = keys.iter().cloned().collect();
        while let Some(key) = todo.pop() {
            let fronts = self
                .desired
                .services
                .get(&key)
                .into_iter()
                .chain(desired.services.get(&key))
                .flat_map(|s| s.frontends.iter());
            for fe in fronts {
                for other in self.wanted.get(fe).into_iter().flatten() {
                    if keys.insert(other.clone()) {
                        todo.push(other.clone());
                    }
                }
            }
        }
        let pick = |key: &ServiceKey| desired.services.get(key).map(|s| (key.clone(), s.clone()));
        let seen = |key: &ServiceKey| {
            self.observed
                .services
                .get(key)
                .map(|s| (key.clone(), s.clone()))
        };
        Part {
            desired: DesiredState {
                services: keys.iter().filter_map(pick).collect(),
                local_addrs: desired.local_addrs.clone(),
            },
            observed: Observed {
                services: keys.iter().filter_map(seen).collect(),
                local_addrs: self.observed.local_addrs.clone(),
                orphan_backends: BTreeSet::new(),
            },
            keys,
        }
    }

    /// The plan of a part: ids held outside it are reserved (those of the
    /// part are the planner's to keep or free, as in a full plan).
    pub fn plan(&self, part: &Part, limits: Limits) -> Result<Plan, reconcile::ReconcileError> {
        let part_services: BTreeSet<u32> = part.observed.services.values().map(|s| s.id).collect();
        let part_backends: BTreeSet<u32> = part
            .observed
            .services
            .values()
            .flat_map(|s| s.backends.values().map(|b| b.id))
            .collect();
        let service = |from: u32| self.service_ids.first_free(from, &part_services);
        let backend = |from: u32| self.backend_ids.first_free(from, &part_backends);
        reconcile::plan_part(
            &part.desired,
            &part.observed,
            limits,
            &Taken {
                service: Some(&service),
                backend: Some(&backend),
            },
        )
    }

    /// Takes in a part whose plan was applied: its services are now what
    /// a scratch copy of their tables reads after the same plan (which
    /// also checks the plan's order, as the mirror of a full sync does).
    pub fn commit(&mut self, part: Part, plan: &Plan) -> Result<(), DataplaneError> {
        let mut scratch = Mirror::from_observed(&part.observed);
        scratch.apply(plan)?;
        let now = scratch.observe()?;
        for key in &part.keys {
            if let Some(spec) = self.desired.services.get(key) {
                self.backends -= spec.backends.len();
            }
            if let Some(old) = self.observed.services.remove(key) {
                for d in down_of(key, &old) {
                    self.down.remove(&d);
                }
                self.service_ids.remove(old.id);
                for b in old.backends.values() {
                    self.backend_ids.remove(b.id);
                }
            }
            if let Some(old) = self.desired.services.remove(key) {
                for fe in &old.frontends {
                    if let Some(owners) = self.wanted.get_mut(fe) {
                        owners.drop_key(key);
                        if owners.is_empty() {
                            self.wanted.remove(fe);
                        }
                    }
                }
            }
        }
        for (key, s) in now.services {
            self.down.extend(down_of(&key, &s));
            self.service_ids.insert(s.id);
            for b in s.backends.values() {
                self.backend_ids.insert(b.id);
            }
            self.observed.services.insert(key, s);
        }
        for (key, spec) in part.desired.services {
            self.backends += spec.backends.len();
            for fe in &spec.frontends {
                self.wanted.entry(*fe).or_default().add(&key);
            }
            self.desired.services.insert(key, spec);
        }
        self.observed.local_addrs = now.local_addrs;
        self.desired.local_addrs = part.desired.local_addrs;
        Ok(())
    }
}

/// The backends of service `key` that `s` holds down.
fn down_of<'a>(
    key: &'a ServiceKey,
    s: &'a ObservedService,
) -> impl Iterator<Item = BackendOf> + 'a {
    s.backends
        .iter()
        .filter(|(_, b)| b.state == BackendState::Down)
        .map(move |(bk, _)| (key.clone(), *bk))
}

/// The services added, removed or changed from `a` to `b`.
fn changed_keys(a: &DesiredState, b: &DesiredState) -> BTreeSet<ServiceKey> {
    crate::model::changed_keys(a.services.iter(), b.services.iter(), |_, sa, sb| sa == sb)
        .into_iter()
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::reconcile::{admit, fits, plan_with_limits};
    use crate::model::{BackendKey, BackendSpec, BackendState, Proto, ServiceSpec};
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    /// Mostly small edits of `prev` (one service's backends, a service
    /// added or removed, a local address), sometimes a new state; VIPs
    /// are shared between services now and then (a contested frontend).
    fn next_desired(rng: &mut Rng, prev: &DesiredState) -> DesiredState {
        let mut d = if rng.chance(10) {
            DesiredState::default()
        } else {
            prev.clone()
        };
        for _ in 0..=rng.below(3) {
            let i = rng.below(10) as u8;
            let key = ServiceKey {
                name: format!("svc{i}"),
                proto: if i.is_multiple_of(2) {
                    Proto::Tcp
                } else {
                    Proto::Udp
                },
                port: 8000 + u16::from(i),
            };
            if rng.chance(20) {
                d.services.remove(&key);
                continue;
            }
            let spec = Arc::make_mut(d.services.entry(key.clone()).or_default());
            spec.frontends.insert(Frontend {
                addr: None,
                port: key.port,
                proto: key.proto,
            });
            if rng.chance(30) {
                // One of three VIPs on one port: services may contest it.
                spec.frontends.insert(Frontend {
                    addr: Some(ip(10, 96, 0, rng.below(3) as u8)),
                    port: 80,
                    proto: key.proto,
                });
            } else if rng.chance(20) {
                spec.frontends.retain(|f| f.addr.is_none());
            }
            for _ in 0..rng.below(4) {
                let bk = BackendKey {
                    addr: ip(10, 0, i, 1 + rng.below(12) as u8),
                    port: 80,
                };
                if rng.chance(25) {
                    spec.backends.remove(&bk);
                    continue;
                }
                let state = match rng.below(10) {
                    0 => BackendState::Down,
                    1 => BackendState::Draining,
                    _ => BackendState::Up,
                };
                spec.backends.insert(
                    bk,
                    BackendSpec {
                        weight: if rng.chance(10) {
                            0
                        } else {
                            1 + rng.below(200) as u32
                        },
                        state,
                        remote: rng.chance(30),
                    },
                );
            }
            spec.affinity_secs = if rng.chance(10) { 60 } else { 0 };
        }
        if rng.chance(20) {
            let a = ip(192, 168, 0, 1 + rng.below(4) as u8);
            if !d.local_addrs.remove(&a) {
                d.local_addrs.insert(a);
            }
        }
        d
    }

    fn down_in(o: &Observed) -> BTreeSet<BackendOf> {
        o.services.iter().flat_map(|(k, s)| down_of(k, s)).collect()
    }

    /// The XDP engine's choice between a partial and a full sync, over a
    /// mirror standing in for the kernel.
    fn sync(
        view: &mut Option<View>,
        k: &mut Mirror,
        want: &DesiredState,
        limits: Limits,
    ) -> Result<(), DataplaneError> {
        if let Some(v) = view.as_mut() {
            let part = v.part(want);
            assert_eq!(v.fits_with(&part, limits), fits(want, limits));
            assert_eq!(*v.down(), down_in(&v.observed), "the view's down set");
            if !fits(want, limits) {
                *view = None;
                return sync(view, k, want, limits);
            }
            if part.is_empty() {
                return Ok(());
            }
            let plan = v.plan(&part, limits)?;
            if let Err(e) = k.apply(&plan) {
                *view = None;
                return Err(e);
            }
            return v.commit(part, &plan);
        }
        let obs = k.observe()?;
        let (d, rejected) = admit(want, &obs, limits);
        let plan = plan_with_limits(&d, &obs, limits)?;
        *view = None;
        k.apply(&plan)?;
        if rejected.is_empty() {
            *view = Some(View::new(d.into_owned(), k.observe()?));
        }
        Ok(())
    }

    /// Against a plain walk, across word boundaries too.
    #[test]
    fn ids_find_the_lowest_free_one_at_or_above_any_id() {
        let mut ids = Ids::new([0, 1, 2, 5, 6]);
        let none = BTreeSet::new();
        assert_eq!(ids.first_free(0, &none), 3);
        assert_eq!(ids.first_free(4, &none), 4);
        assert_eq!(ids.first_free(5, &none), 7);
        assert_eq!(ids.first_free(100, &none), 100);
        // The part's own ids are free to it.
        assert_eq!(ids.first_free(0, &[1].into()), 1);
        ids.remove(1);
        ids.remove(9); // never held: no change
        assert_eq!(ids.first_free(0, &none), 1);
        ids.insert(1);
        ids.insert(3);
        ids.insert(4);
        assert_eq!(ids.first_free(0, &none), 7);
        ids.insert(10);
        assert_eq!(ids.first_free(7, &none), 7);
        assert_eq!(ids.first_free(10, &none), 11);
        // Against a plain walk of the held set.
        #[allow(
            clippy::maybe_infinite_iter,
            reason = "a finite set of held ids: a free one is found"
        )]
        let walk = |ids: &Ids, from: u32| (from..).find(|i| !ids.holds(*i)).unwrap();
        for from in 0..15 {
            assert_eq!(ids.first_free(from, &none), walk(&ids, from), "from {from}");
        }
        // Whole words held, and holes just past them.
        let mut ids = Ids::new((0..200).filter(|i| *i != 64 && *i != 130));
        ids.insert(300);
        for from in [0, 63, 64, 65, 127, 128, 130, 131, 199, 200, 299, 300, 301] {
            assert_eq!(ids.first_free(from, &none), walk(&ids, from), "from {from}");
        }
        ids.insert(64);
        ids.insert(130);
        assert_eq!(ids.first_free(0, &none), 200);
        assert_eq!(ids.first_free(0, &[150].into()), 150);
    }

    /// Issue 18: the reconciler's property test on the partial path.
    /// Random sequences of edits, with applies failing part-way now and
    /// then and tables too small now and then: after every round the
    /// kernel holds exactly what a from-scratch plan wants (it finds
    /// nothing to do), and the view holds exactly what the kernel does.
    #[test]
    fn partial_syncs_match_a_from_scratch_rebuild() {
        let mut rng = Rng(0x7669_6577_0000_0001);
        for run in 0..20 {
            let small = run % 4 == 3;
            let limits = if small {
                Limits {
                    services: 6,
                    backends: 40,
                    ..Limits::default()
                }
            } else {
                Limits::default()
            };
            let mut k = Mirror::with_limits(limits);
            let mut view = None;
            let mut want = DesiredState::default();
            let mut partial = 0;
            for round in 0..150 {
                want = next_desired(&mut rng, &want);
                let at = format!("run {run} round {round}");
                if rng.chance(8) {
                    k.fail_after(rng.below(6) as usize);
                    let _ = sync(&mut view, &mut k, &want, limits);
                    k.fail_after(usize::MAX / 2);
                }
                partial += usize::from(view.is_some() && fits(&want, limits));
                sync(&mut view, &mut k, &want, limits).unwrap_or_else(|e| panic!("{at}: {e}"));
                let obs = k.observe().unwrap();
                let (admitted, _) = admit(&want, &obs, limits);
                let rest = plan_with_limits(&admitted, &obs, limits).unwrap();
                assert!(
                    rest.is_empty(),
                    "{at}: a full plan still finds {:?}",
                    rest.ops
                );
                if let Some(v) = &view {
                    assert_eq!(v.observed(), &obs, "{at}: the view differs from the kernel");
                }
            }
            assert!(
                small || partial > 100,
                "run {run}: only {partial} partial syncs"
            );
        }
    }

    #[test]
    fn one_changed_service_among_many_is_the_whole_part() {
        let mut want = DesiredState::default();
        for i in 0..1000u16 {
            let mut spec = ServiceSpec::default();
            spec.frontends.insert(Frontend {
                addr: None,
                port: 10_000 + i,
                proto: Proto::Tcp,
            });
            spec.backends.insert(
                BackendKey {
                    addr: ip(10, 1, (i / 250) as u8, (i % 250) as u8 + 1),
                    port: 80,
                },
                BackendSpec {
                    weight: 100,
                    state: BackendState::Up,
                    remote: false,
                },
            );
            want.services.insert(
                ServiceKey {
                    name: format!("s{i:04}"),
                    proto: Proto::Tcp,
                    port: 10_000 + i,
                },
                spec.into(),
            );
        }
        let mut k = Mirror::new();
        let mut view = None;
        sync(&mut view, &mut k, &want, Limits::default()).unwrap();
        let key = want.services.keys().nth(321).unwrap().clone();
        Arc::make_mut(want.services.get_mut(&key).unwrap()).affinity_secs = 30;
        let part = view.as_ref().unwrap().part(&want);
        assert_eq!(part.keys, [key.clone()].into());
        assert_eq!(part.desired.services.len(), 1);
        assert_eq!(part.observed.services.len(), 1);
        let plan = view
            .as_ref()
            .unwrap()
            .plan(&part, Limits::default())
            .unwrap();
        assert_eq!(plan.ops.len(), 1, "{:?}", plan.ops);
    }
}
