//! The pure reconciler: desired state + observed state -> an ordered plan
//! of data-plane operations. **No IO**: it is tested without a kernel, and
//! every data plane (XDP, IPVS, the in-memory mirror) executes the same plans.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use meshlb_common::NO_BACKEND;

use crate::control::maglev;
use crate::model::{BackendKey, BackendState, DesiredState, Frontend, Observed, ServiceKey};

/// One step of a plan. Ids are dense indices into the data plane's tables,
/// allocated by the reconciler (lowest free first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Add a local address (node-port frontends answer on it).
    AddLocalAddr(IpAddr),
    RemoveLocalAddr(IpAddr),
    /// Create or update a backend slot (counters are zeroed when `fresh`).
    UpsertBackend {
        id: u32,
        service_id: u32,
        key: BackendKey,
        weight: u32,
        state: BackendState,
        /// Source-translate its flows (`BackendSpec::remote`).
        remote: bool,
        fresh: bool,
    },
    /// Free a backend slot. Established flows keep their backend (conntrack
    /// holds its address), they only stop being counted.
    RemoveBackend {
        id: u32,
    },
    /// Write a service's Maglev ring: `ring[slot]` is a backend id or
    /// `meshlb_common::NO_BACKEND`; `ring.len()` is the service's
    /// `maglev::ring_size`.
    WriteRing {
        service_id: u32,
        ring: Vec<u32>,
    },
    /// Create or update a service slot. Comes after its ring is written.
    UpsertService {
        id: u32,
        key: ServiceKey,
        active_backends: u32,
        ring_hash: u64,
        /// Session affinity timeout in seconds (0: none).
        affinity_secs: u32,
        fresh: bool,
    },
    RemoveService {
        id: u32,
    },
    AddFrontend {
        frontend: Frontend,
        service_id: u32,
    },
    RemoveFrontend {
        frontend: Frontend,
    },
}

/// An ordered list of operations. Order matters: new backends before the
/// ring that names them, the ring before the service, the service before
/// its frontends; removals in the reverse order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReconcileError {
    #[error("too many services: limit {0}")]
    TooManyServices(u32),
    #[error("too many backends: limit {0}")]
    TooManyBackends(u32),
    #[error("too many frontends: limit {0}")]
    TooManyFrontends(u32),
    #[error("too many local addresses: limit {0}")]
    TooManyLocalAddrs(u32),
}

/// Table sizes of a data plane. Ids are allocated below these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub services: u32,
    pub backends: u32,
    pub frontends: u32,
    pub local_addrs: u32,
}

impl Default for Limits {
    /// The sizes of the pinned maps.
    fn default() -> Self {
        Limits {
            services: meshlb_common::MAX_SERVICES,
            backends: meshlb_common::MAX_BACKENDS,
            frontends: meshlb_common::MAX_FRONTENDS,
            local_addrs: meshlb_common::MAX_LOCAL_ADDRS,
        }
    }
}

/// Whether all of `desired` fits tables of `limits` (then `admit` takes
/// every service).
pub fn fits(desired: &DesiredState, limits: Limits) -> bool {
    let backends: usize = desired.services.values().map(|s| s.backends.len()).sum();
    // Frontends counted with repeats bound the distinct ones: the set is
    // built only when that bound is over the limit (it runs every sync).
    let fits_frontends = || {
        let with_repeats: usize = desired.services.values().map(|s| s.frontends.len()).sum();
        with_repeats <= limits.frontends as usize
            || desired
                .services
                .values()
                .flat_map(|s| s.frontends.iter())
                .collect::<BTreeSet<&Frontend>>()
                .len()
                <= limits.frontends as usize
    };
    desired.services.len() <= limits.services as usize
        && backends <= limits.backends as usize
        && desired.local_addrs.len() <= limits.local_addrs as usize
        && fits_frontends()
}

/// The services of `desired` that fit tables of `limits`, and why each
/// other one does not: services the data plane holds already keep their
/// place (and ids), then new ones are taken in key order while there is
/// room for the service, its backends and its frontends. One service too
/// many is refused alone; every other one keeps being programmed. Borrows
/// `desired` when everything fits.
pub fn admit<'a>(
    desired: &'a DesiredState,
    observed: &Observed,
    limits: Limits,
) -> (Cow<'a, DesiredState>, BTreeMap<ServiceKey, String>) {
    if fits(desired, limits) {
        return (Cow::Borrowed(desired), BTreeMap::new());
    }
    let mut out = DesiredState {
        services: BTreeMap::new(),
        local_addrs: desired.local_addrs.clone(),
    };
    let mut rejected = BTreeMap::new();
    let (held, new): (Vec<_>, Vec<_>) = desired
        .services
        .iter()
        .partition(|(k, _)| observed.services.contains_key(*k));
    let mut n_backends = 0usize;
    let mut fes: BTreeSet<Frontend> = BTreeSet::new();
    for (key, spec) in held.into_iter().chain(new) {
        let new_fes = spec.frontends.iter().filter(|f| !fes.contains(f)).count();
        let full = if out.services.len() >= limits.services as usize {
            Some(format!("{} services", limits.services))
        } else if n_backends + spec.backends.len() > limits.backends as usize {
            Some(format!("{} backends", limits.backends))
        } else if fes.len() + new_fes > limits.frontends as usize {
            Some(format!("{} frontends", limits.frontends))
        } else {
            None
        };
        if let Some(what) = full {
            rejected.insert(
                key.clone(),
                format!("does not fit the data plane's tables ({what} at most)"),
            );
        } else {
            n_backends += spec.backends.len();
            fes.extend(spec.frontends.iter().copied());
            out.services.insert(key.clone(), spec.clone());
        }
    }
    (Cow::Owned(out), rejected)
}

/// Compute the plan that turns `observed` into `desired`, for the pinned
/// map sizes.
pub fn plan(desired: &DesiredState, observed: &Observed) -> Result<Plan, ReconcileError> {
    plan_with_limits(desired, observed, Limits::default())
}

/// [`plan`] for data plane tables of the given sizes.
///
/// The plan runs in this order, so that the data plane is consistent
/// after every single step (a packet never meets a ring naming a missing
/// backend, nor a frontend naming a missing service):
///
/// 1. add new local addresses;
/// 2. remove frontends that are no longer wanted or change service;
/// 3. remove services no longer wanted, then their backends, then orphan
///    backends (left by an interrupted apply);
/// 4. per wanted service, in key order: create/update backends, write
///    the ring and then the service (only when the active backend set
///    differs from the one the observed ring was built for), then remove
///    the service's departed backends;
/// 5. add frontends;
/// 6. remove departed local addresses.
///
/// Existing services and backends keep their ids (a restarted daemon
/// adopts what it finds); new ones take the lowest free id. Ids freed in
/// step 3 may be reused in step 4 of the same plan; those of backends
/// removed in step 4 are free only from the next plan.
///
/// A frontend wanted by two services goes to the first by key order:
/// sources should not produce that, and one bad service must not stop the
/// others from being programmed.
pub fn plan_with_limits(
    desired: &DesiredState,
    observed: &Observed,
    limits: Limits,
) -> Result<Plan, ReconcileError> {
    plan_part(desired, observed, limits, &Taken::default())
}

/// Ids held by services outside a partial plan's view (`plan_part`):
/// each function gives the smallest id at or above its argument that
/// those services do not hold (so a free id is found without walking
/// the held ones).
#[derive(Default)]
pub struct Taken<'a> {
    pub service: Option<&'a dyn Fn(u32) -> u32>,
    pub backend: Option<&'a dyn Fn(u32) -> u32>,
}

/// [`plan_with_limits`] over a part of the data plane: `desired` and
/// `observed` hold only some services (with every service that shares a
/// frontend with one of them, or frontend ownership would be decided
/// among too few), and `taken` says which ids the others hold, so new
/// services and backends get free ids. Services outside the part are
/// neither seen nor touched. The limits apply to the part: the caller
/// checks the whole (`fits`).
pub fn plan_part(
    desired: &DesiredState,
    observed: &Observed,
    limits: Limits,
    taken: &Taken<'_>,
) -> Result<Plan, ReconcileError> {
    if desired.services.len() > limits.services as usize {
        return Err(ReconcileError::TooManyServices(limits.services));
    }
    let backend_count: usize = desired.services.values().map(|s| s.backends.len()).sum();
    if backend_count > limits.backends as usize {
        return Err(ReconcileError::TooManyBackends(limits.backends));
    }
    if desired.local_addrs.len() > limits.local_addrs as usize {
        return Err(ReconcileError::TooManyLocalAddrs(limits.local_addrs));
    }
    let mut wanted_fe: BTreeMap<Frontend, &ServiceKey> = BTreeMap::new();
    for (key, spec) in &desired.services {
        for fe in &spec.frontends {
            wanted_fe.entry(*fe).or_insert(key);
        }
    }
    if wanted_fe.len() > limits.frontends as usize {
        return Err(ReconcileError::TooManyFrontends(limits.frontends));
    }
    let observed_fe: BTreeMap<Frontend, &ServiceKey> = observed
        .services
        .iter()
        .flat_map(|(key, os)| os.frontends.iter().map(move |fe| (*fe, key)))
        .collect();

    let mut ops = Vec::new();
    let mut rings: Vec<RingJob> = Vec::new();

    // 1.
    for addr in desired.local_addrs.difference(&observed.local_addrs) {
        ops.push(Op::AddLocalAddr(*addr));
    }

    // 2.
    for (fe, owner) in &observed_fe {
        if wanted_fe.get(fe) != Some(owner) {
            ops.push(Op::RemoveFrontend { frontend: *fe });
        }
    }

    // 3.
    for (key, os) in &observed.services {
        if !desired.services.contains_key(key) {
            ops.push(Op::RemoveService { id: os.id });
            for ob in os.backends.values() {
                ops.push(Op::RemoveBackend { id: ob.id });
            }
        }
    }
    for id in &observed.orphan_backends {
        ops.push(Op::RemoveBackend { id: *id });
    }

    // 4.
    let kept = || {
        observed
            .services
            .iter()
            .filter(|(key, _)| desired.services.contains_key(key))
            .map(|(_, os)| os)
    };
    let mut service_ids = IdPool::new(limits.services, kept().map(|os| os.id), taken.service);
    let mut backend_ids = IdPool::new(
        limits.backends,
        kept().flat_map(|os| os.backends.values().map(|ob| ob.id)),
        taken.backend,
    );
    let mut ids_of_services = BTreeMap::new();
    for (key, spec) in &desired.services {
        let os = observed.services.get(key);
        let service_id = match os {
            Some(os) => os.id,
            None => service_ids
                .take()
                .ok_or(ReconcileError::TooManyServices(limits.services))?,
        };
        ids_of_services.insert(key, service_id);

        let mut ids = BTreeMap::new();
        for (bk, bs) in &spec.backends {
            let state = bs.effective_state();
            let found = os.and_then(|os| os.backends.get(bk));
            let (id, fresh) = match found {
                Some(ob)
                    if ob.weight == bs.weight && ob.state == state && ob.remote == bs.remote =>
                {
                    ids.insert(*bk, ob.id);
                    continue;
                }
                Some(ob) => (ob.id, false),
                None => (
                    backend_ids
                        .take()
                        .ok_or(ReconcileError::TooManyBackends(limits.backends))?,
                    true,
                ),
            };
            ids.insert(*bk, id);
            ops.push(Op::UpsertBackend {
                id,
                service_id,
                key: *bk,
                weight: bs.weight,
                state,
                remote: bs.remote,
                fresh,
            });
        }

        let active: Vec<(BackendKey, u32)> = spec
            .backends
            .iter()
            .filter(|(_, bs)| bs.active())
            .map(|(bk, bs)| (*bk, bs.weight))
            .collect();
        let size = maglev::ring_size(spec.backends.len());
        let ring_hash = maglev::ring_hash(&active, size);
        let active_backends = active.len() as u32;
        let stale = match os {
            None => true,
            Some(os) => os.ring_hash != ring_hash || os.active_backends != active_backends,
        };
        if stale {
            // Built below, all rings of the plan at once.
            let active_ids = active.iter().map(|(bk, _)| ids[bk]).collect();
            rings.push(RingJob {
                op: ops.len(),
                active,
                size,
                active_ids,
            });
            ops.push(Op::WriteRing {
                service_id,
                ring: Vec::new(),
            });
        }
        if stale || os.is_some_and(|os| os.affinity_secs != spec.affinity_secs) {
            ops.push(Op::UpsertService {
                id: service_id,
                key: key.clone(),
                active_backends,
                ring_hash,
                affinity_secs: spec.affinity_secs,
                fresh: os.is_none(),
            });
        }

        if let Some(os) = os {
            for (bk, ob) in &os.backends {
                if !spec.backends.contains_key(bk) {
                    ops.push(Op::RemoveBackend { id: ob.id });
                }
            }
        }
    }

    for (job, ring) in rings.iter().zip(build_rings(&rings)) {
        if let Op::WriteRing { ring: r, .. } = &mut ops[job.op] {
            *r = ring;
        }
    }

    // 5.
    for (fe, owner) in &wanted_fe {
        if observed_fe.get(fe) != Some(owner) {
            ops.push(Op::AddFrontend {
                frontend: *fe,
                service_id: ids_of_services[owner],
            });
        }
    }

    // 6.
    for addr in observed.local_addrs.difference(&desired.local_addrs) {
        ops.push(Op::RemoveLocalAddr(*addr));
    }

    Ok(Plan { ops })
}

/// A ring a plan writes: the table of `active` on `size` slots, its
/// slots naming `active_ids`, for the `WriteRing` at `ops[op]`.
struct RingJob {
    op: usize,
    active: Vec<(BackendKey, u32)>,
    size: u32,
    active_ids: Vec<u32>,
}

/// Plans with more rings than this build them on several threads (a
/// full sync at 10,000 services builds 10,000).
const PARALLEL_RINGS: usize = 64;

/// The rings of `jobs`, in order; on up to four threads when there are
/// many (each ring is independent, and the result does not depend on the
/// threads).
fn build_rings(jobs: &[RingJob]) -> Vec<Vec<u32>> {
    let build = |job: &RingJob| -> Vec<u32> {
        maglev::table(&job.active, job.size)
            .into_iter()
            .map(|slot| slot.map_or(NO_BACKEND, |i| job.active_ids[i]))
            .collect()
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if jobs.len() < PARALLEL_RINGS || threads < 2 {
        return jobs.iter().map(build).collect();
    }
    let chunk = jobs.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(build).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// Lowest-free-first allocation of ids below a limit.
struct IdPool<'a> {
    limit: u32,
    used: BTreeSet<u32>,
    /// The smallest id at or above its argument not used outside the
    /// plan's view.
    taken: Option<&'a dyn Fn(u32) -> u32>,
    next: u32,
}

impl<'a> IdPool<'a> {
    fn new(
        limit: u32,
        used: impl IntoIterator<Item = u32>,
        taken: Option<&'a dyn Fn(u32) -> u32>,
    ) -> Self {
        IdPool {
            limit,
            used: used.into_iter().collect(),
            taken,
            next: 0,
        }
    }

    fn take(&mut self) -> Option<u32> {
        loop {
            let free = self.taken.map_or(self.next, |t| t(self.next));
            self.next = free;
            if !self.used.contains(&free) {
                break;
            }
            self.next += 1;
        }
        if self.next >= self.limit {
            return None;
        }
        self.used.insert(self.next);
        Some(self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::mirror::Mirror;
    use crate::engine::Dataplane;
    use crate::model::{BackendSpec, Proto, ServiceSpec};
    use std::net::Ipv4Addr;
    use std::sync::Arc;
    const RING_SIZE: u32 = meshlb_common::RING_SIZES[0];

    fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn skey(name: &str, port: u16) -> ServiceKey {
        ServiceKey {
            name: name.into(),
            proto: Proto::Tcp,
            port,
        }
    }

    fn bkey(i: u8) -> BackendKey {
        BackendKey {
            addr: ip(10, 0, 0, i),
            port: 8000,
        }
    }

    fn node_port(port: u16) -> Frontend {
        Frontend {
            addr: None,
            port,
            proto: Proto::Tcp,
        }
    }

    fn vip(i: u8, port: u16) -> Frontend {
        Frontend {
            addr: Some(ip(10, 96, 0, i)),
            port,
            proto: Proto::Tcp,
        }
    }

    fn up(weight: u32) -> BackendSpec {
        BackendSpec {
            weight,
            state: BackendState::Up,
            remote: false,
        }
    }

    /// A service on node port `port` with backends `(i, weight)`.
    fn spec(port: u16, backends: &[(u8, u32)]) -> ServiceSpec {
        ServiceSpec {
            frontends: [node_port(port)].into(),
            backends: backends.iter().map(|&(i, w)| (bkey(i), up(w))).collect(),
            affinity_secs: 0,
        }
    }

    fn desired(services: Vec<(ServiceKey, ServiceSpec)>) -> DesiredState {
        DesiredState {
            services: services
                .into_iter()
                .map(|(k, s)| (k, Arc::new(s)))
                .collect(),
            local_addrs: [ip(192, 168, 0, 1)].into(),
        }
    }

    /// Plan against what `dp` holds and apply it; return the plan.
    fn sync(dp: &mut Mirror, want: &DesiredState) -> Plan {
        let p = plan(want, &dp.observe().unwrap()).unwrap();
        dp.apply(&p).unwrap();
        p
    }

    fn backend_ids(dp: &Mirror, key: &ServiceKey) -> BTreeMap<BackendKey, u32> {
        dp.observe().unwrap().services[key]
            .backends
            .iter()
            .map(|(k, b)| (*k, b.id))
            .collect()
    }

    /// Everything `want` asks for is what `dp` holds, and each ring names
    /// exactly the active backends.
    fn assert_programmed(dp: &Mirror, want: &DesiredState) {
        let obs = dp.observe().unwrap();
        assert_eq!(obs.local_addrs, want.local_addrs);
        // No slot leaked.
        assert!(obs.orphan_backends.is_empty());
        let total: usize = want.services.values().map(|s| s.backends.len()).sum();
        assert_eq!(dp.backends().len(), total);
        assert_eq!(
            obs.services.keys().collect::<Vec<_>>(),
            want.services.keys().collect::<Vec<_>>()
        );
        for (key, spec) in &want.services {
            let os = &obs.services[key];
            assert_eq!(os.frontends, spec.frontends, "{key}");
            let got: BTreeMap<_, _> = os
                .backends
                .iter()
                .map(|(k, b)| (*k, (b.weight, b.state, b.remote)))
                .collect();
            let wanted: BTreeMap<_, _> = spec
                .backends
                .iter()
                .map(|(k, b)| (*k, (b.weight, b.effective_state(), b.remote)))
                .collect();
            assert_eq!(got, wanted, "{key}");
            let ring = dp.ring(os.id).expect("ring");
            let in_ring: BTreeSet<u32> =
                ring.iter().copied().filter(|&b| b != NO_BACKEND).collect();
            let active: BTreeSet<u32> = spec
                .backends
                .iter()
                .filter(|(_, b)| b.active())
                .map(|(k, _)| os.backends[k].id)
                .collect();
            assert_eq!(in_ring, active, "{key}: ring");
            if !active.is_empty() {
                assert!(!ring.contains(&NO_BACKEND), "{key}: ring has holes");
            }
            assert_eq!(os.active_backends as usize, active.len());
        }
    }

    #[test]
    fn empty_gives_empty() {
        let p = plan(&DesiredState::default(), &Observed::default()).unwrap();
        assert!(p.is_empty());
    }

    #[test]
    fn new_service_gives_exact_ops() {
        let key = skey("web", 80);
        let mut s = spec(80, &[(1, 100), (2, 300)]);
        s.frontends.insert(vip(10, 80));
        let want = desired(vec![(key.clone(), s)]);
        let p = plan(&want, &Observed::default()).unwrap();

        let active = [(bkey(1), 100), (bkey(2), 300)];
        let ring: Vec<u32> = maglev::table(&active, RING_SIZE)
            .into_iter()
            .map(|s| s.unwrap() as u32)
            .collect();
        let be = |id: u32, weight| Op::UpsertBackend {
            id,
            service_id: 0,
            key: bkey(id as u8 + 1),
            weight,
            state: BackendState::Up,
            remote: false,
            fresh: true,
        };
        assert_eq!(
            p.ops,
            vec![
                Op::AddLocalAddr(ip(192, 168, 0, 1)),
                be(0, 100),
                be(1, 300),
                Op::WriteRing {
                    service_id: 0,
                    ring,
                },
                Op::UpsertService {
                    id: 0,
                    key,
                    active_backends: 2,
                    ring_hash: maglev::ring_hash(&active, RING_SIZE),
                    affinity_secs: 0,
                    fresh: true,
                },
                Op::AddFrontend {
                    frontend: node_port(80),
                    service_id: 0,
                },
                Op::AddFrontend {
                    frontend: vip(10, 80),
                    service_id: 0,
                },
            ]
        );
    }

    #[test]
    fn applied_plan_is_idempotent() {
        let mut dp = Mirror::new();
        let want = desired(vec![
            (skey("a", 80), spec(80, &[(1, 100), (2, 0), (3, 50)])),
            (skey("b", 81), spec(81, &[])),
        ]);
        assert!(!sync(&mut dp, &want).is_empty());
        assert_programmed(&dp, &want);
        // A restarted daemon sees the same tables and has nothing to do.
        assert_eq!(
            plan(&want, &dp.observe().unwrap()).unwrap(),
            Plan::default()
        );
    }

    #[test]
    fn affinity_change_updates_the_service_without_rewriting_the_ring() {
        let key = skey("web", 80);
        let mut dp = Mirror::new();
        let mut want = desired(vec![(key.clone(), spec(80, &[(1, 100), (2, 100)]))]);
        sync(&mut dp, &want);
        Arc::make_mut(want.services.get_mut(&key).unwrap()).affinity_secs = 600;
        let p = sync(&mut dp, &want);
        assert!(
            matches!(
                p.ops[..],
                [Op::UpsertService {
                    affinity_secs: 600,
                    fresh: false,
                    ..
                }]
            ),
            "{p:?}"
        );
        assert_eq!(dp.observe().unwrap().services[&key].affinity_secs, 600);
        assert!(sync(&mut dp, &want).is_empty(), "converged");
    }

    #[test]
    fn removed_backend_leaves_the_ring_first_and_others_keep_ids() {
        let key = skey("web", 80);
        let mut dp = Mirror::new();
        sync(
            &mut dp,
            &desired(vec![(
                key.clone(),
                spec(80, &[(1, 100), (2, 100), (3, 100)]),
            )]),
        );
        let before = backend_ids(&dp, &key);

        let want = desired(vec![(key.clone(), spec(80, &[(1, 100), (3, 100)]))]);
        let p = sync(&mut dp, &want);
        let kinds: Vec<&str> = p.ops.iter().map(op_kind).collect();
        assert_eq!(kinds, ["WriteRing", "UpsertService", "RemoveBackend"]);
        assert_eq!(
            p.ops[2],
            Op::RemoveBackend {
                id: before[&bkey(2)]
            }
        );
        assert!(matches!(p.ops[1], Op::UpsertService { fresh: false, .. }));

        let after = backend_ids(&dp, &key);
        assert_eq!(after[&bkey(1)], before[&bkey(1)]);
        assert_eq!(after[&bkey(3)], before[&bkey(3)]);
        assert_programmed(&dp, &want);
    }

    #[test]
    fn weight_zero_drains() {
        let key = skey("web", 80);
        let mut dp = Mirror::new();
        sync(
            &mut dp,
            &desired(vec![(key.clone(), spec(80, &[(1, 100), (2, 100)]))]),
        );
        let id2 = backend_ids(&dp, &key)[&bkey(2)];

        let want = desired(vec![(key.clone(), spec(80, &[(1, 100), (2, 0)]))]);
        let p = sync(&mut dp, &want);
        assert_eq!(
            p.ops[0],
            Op::UpsertBackend {
                id: id2,
                service_id: 0,
                key: bkey(2),
                weight: 0,
                state: BackendState::Draining,
                remote: false,
                fresh: false,
            }
        );
        assert!(matches!(p.ops[1], Op::WriteRing { .. }));
        assert_eq!(dp.backend(id2).unwrap().state, BackendState::Draining);
        assert!(!dp.ring(0).unwrap().contains(&id2));
        assert_programmed(&dp, &want);

        // A backend that is down is kept but out of the ring too.
        let mut down = want.clone();
        Arc::make_mut(down.services.get_mut(&key).unwrap())
            .backends
            .insert(
                bkey(1),
                BackendSpec {
                    weight: 100,
                    state: BackendState::Down,
                    remote: false,
                },
            );
        sync(&mut dp, &down);
        assert!(dp.ring(0).unwrap().iter().all(|&b| b == NO_BACKEND));
        assert_programmed(&dp, &down);
    }

    #[test]
    fn removed_service_loses_frontends_first() {
        let mut dp = Mirror::new();
        let mut web = spec(80, &[(1, 100)]);
        web.frontends.insert(vip(10, 80));
        sync(
            &mut dp,
            &desired(vec![
                (skey("web", 80), web),
                (skey("api", 81), spec(81, &[(2, 100)])),
            ]),
        );
        let want = desired(vec![(skey("api", 81), spec(81, &[(2, 100)]))]);
        let p = sync(&mut dp, &want);
        let kinds: Vec<&str> = p.ops.iter().map(op_kind).collect();
        assert_eq!(
            kinds,
            [
                "RemoveFrontend",
                "RemoveFrontend",
                "RemoveService",
                "RemoveBackend"
            ]
        );
        assert_programmed(&dp, &want);
    }

    #[test]
    fn frontend_moving_between_services_is_removed_then_added() {
        let mut dp = Mirror::new();
        let mut a = spec(80, &[(1, 100)]);
        a.frontends.insert(vip(10, 80));
        let b = spec(81, &[(2, 100)]);
        sync(
            &mut dp,
            &desired(vec![(skey("a", 80), a.clone()), (skey("b", 81), b.clone())]),
        );
        let mut b2 = b;
        a.frontends.remove(&vip(10, 80));
        b2.frontends.insert(vip(10, 80));
        let want = desired(vec![(skey("a", 80), a), (skey("b", 81), b2)]);
        let p = sync(&mut dp, &want);
        assert_eq!(
            p.ops,
            [
                Op::RemoveFrontend {
                    frontend: vip(10, 80)
                },
                Op::AddFrontend {
                    frontend: vip(10, 80),
                    service_id: 1
                }
            ]
        );
        assert_programmed(&dp, &want);
    }

    #[test]
    fn ids_are_reused_lowest_first() {
        let mut dp = Mirror::new();
        let svc = |n: &str, p, b: &[(u8, u32)]| (skey(n, p), spec(p, b));
        sync(
            &mut dp,
            &desired(vec![
                svc("a", 80, &[(1, 100), (2, 100)]),
                svc("b", 81, &[(3, 100)]),
                svc("c", 82, &[(4, 100)]),
            ]),
        );
        let ids = |dp: &Mirror| -> BTreeMap<String, u32> {
            dp.observe()
                .unwrap()
                .services
                .iter()
                .map(|(k, s)| (k.name.clone(), s.id))
                .collect()
        };
        assert_eq!(
            ids(&dp),
            [("a".into(), 0), ("b".into(), 1), ("c".into(), 2)].into()
        );
        assert_eq!(backend_ids(&dp, &skey("a", 80))[&bkey(1)], 0);

        // Removing "a" frees service 0 and backends 0 and 1 in the same
        // plan, before "d" takes them.
        sync(
            &mut dp,
            &desired(vec![
                svc("b", 81, &[(3, 100)]),
                svc("c", 82, &[(4, 100)]),
                svc("d", 83, &[(5, 100), (6, 100)]),
            ]),
        );
        assert_eq!(
            ids(&dp),
            [("b".into(), 1), ("c".into(), 2), ("d".into(), 0)].into()
        );
        assert_eq!(
            backend_ids(&dp, &skey("d", 83)),
            [(bkey(5), 0), (bkey(6), 1)].into()
        );

        // A backend removed from a live service frees its id for the next
        // plan (its ring is rewritten first).
        let want = desired(vec![
            svc("b", 81, &[]),
            svc("c", 82, &[(4, 100)]),
            svc("d", 83, &[(5, 100), (6, 100)]),
        ]);
        sync(&mut dp, &want);
        let mut more = want.clone();
        Arc::make_mut(more.services.get_mut(&skey("c", 82)).unwrap())
            .backends
            .insert(bkey(7), up(100));
        sync(&mut dp, &more);
        assert_eq!(backend_ids(&dp, &skey("c", 82))[&bkey(7)], 2);
        assert_programmed(&dp, &more);
    }

    #[test]
    fn a_service_too_many_is_refused_alone_and_held_ones_keep_their_place() {
        let lim = |services, backends, frontends| Limits {
            services,
            backends,
            frontends,
            local_addrs: 10,
        };
        let mut dp = Mirror::with_limits(lim(2, 10, 10));
        let held = desired(vec![
            (skey("b", 81), spec(81, &[(2, 100)])),
            (skey("c", 82), spec(82, &[(3, 100)])),
        ]);
        sync(&mut dp, &held);
        // "a" sorts first, but "b" and "c" are programmed: "a" waits.
        let mut more = held.clone();
        more.services
            .insert(skey("a", 80), spec(80, &[(1, 100)]).into());
        let (admitted, rejected) = admit(&more, &dp.observe().unwrap(), lim(2, 10, 10));
        assert_eq!(admitted.as_ref(), &held);
        assert_eq!(
            rejected.into_iter().collect::<Vec<_>>(),
            [(
                skey("a", 80),
                "does not fit the data plane's tables (2 services at most)".to_string()
            )]
        );
        // Later changes of the others still apply.
        let mut changed = more.clone();
        Arc::make_mut(changed.services.get_mut(&skey("c", 82)).unwrap())
            .backends
            .insert(bkey(4), up(100));
        let observed = dp.observe().unwrap();
        let (admitted, rejected) = admit(&changed, &observed, lim(2, 10, 10));
        assert_eq!(rejected.len(), 1);
        let p = plan_with_limits(&admitted, &observed, lim(2, 10, 10)).expect("plan");
        dp.apply(&p).unwrap();
        assert_eq!(backend_ids(&dp, &skey("c", 82)).len(), 2);
        // Too many backends or frontends: the service that brings them.
        let (_, rejected) = admit(&changed, &Observed::default(), lim(10, 3, 10));
        assert_eq!(rejected.keys().collect::<Vec<_>>(), [&skey("c", 82)]);
        let (_, rejected) = admit(&changed, &Observed::default(), lim(10, 10, 2));
        assert_eq!(rejected.keys().collect::<Vec<_>>(), [&skey("c", 82)]);
        // Everything fits: borrowed, nothing refused.
        let (admitted, rejected) = admit(&held, &Observed::default(), lim(2, 10, 10));
        assert!(matches!(admitted, Cow::Borrowed(_)) && rejected.is_empty());
    }

    #[test]
    fn limits_are_enforced() {
        let lim = |services, backends, frontends, local_addrs| Limits {
            services,
            backends,
            frontends,
            local_addrs,
        };
        let three = desired(vec![
            (skey("a", 80), spec(80, &[(1, 100)])),
            (skey("b", 81), spec(81, &[(2, 100)])),
            (skey("c", 82), spec(82, &[(3, 100)])),
        ]);
        let cases = [
            (
                "services",
                lim(2, 10, 10, 10),
                ReconcileError::TooManyServices(2),
            ),
            (
                "backends",
                lim(10, 2, 10, 10),
                ReconcileError::TooManyBackends(2),
            ),
            (
                "frontends",
                lim(10, 10, 2, 10),
                ReconcileError::TooManyFrontends(2),
            ),
            (
                "local addrs",
                lim(10, 10, 10, 0),
                ReconcileError::TooManyLocalAddrs(0),
            ),
        ];
        for (what, limits, want) in cases {
            let got = plan_with_limits(&three, &Observed::default(), limits);
            assert_eq!(got, Err(want), "{what}");
        }
        assert!(plan_with_limits(&three, &Observed::default(), lim(3, 3, 3, 1)).is_ok());

        // Ids held by backends that leave only at the end of the plan
        // count against the limit.
        let mut dp = Mirror::with_limits(lim(3, 3, 3, 1));
        let key = skey("a", 80);
        sync(
            &mut dp,
            &desired(vec![(key.clone(), spec(80, &[(1, 100), (2, 100)]))]),
        );
        let swap = desired(vec![(key, spec(80, &[(3, 100), (4, 100)]))]);
        let got = plan_with_limits(&swap, &dp.observe().unwrap(), lim(3, 3, 3, 1));
        assert_eq!(got, Err(ReconcileError::TooManyBackends(3)));
    }

    #[test]
    fn interrupted_apply_is_repaired() {
        // A daemon that dies between writing a ring and its service leaves
        // a stale ring_hash behind; the next plan rewrites the ring.
        let key = skey("web", 80);
        let mut dp = Mirror::new();
        sync(
            &mut dp,
            &desired(vec![(key.clone(), spec(80, &[(1, 100)]))]),
        );
        let want = desired(vec![(key.clone(), spec(80, &[(1, 100), (2, 100)]))]);
        let p = plan(&want, &dp.observe().unwrap()).unwrap();
        let kinds: Vec<&str> = p.ops.iter().map(op_kind).collect();
        assert_eq!(kinds, ["UpsertBackend", "WriteRing", "UpsertService"]);
        dp.fail_after(2);
        assert!(dp.apply(&p).is_err());

        let repair = sync(&mut dp, &want);
        let kinds: Vec<&str> = repair.ops.iter().map(op_kind).collect();
        assert_eq!(kinds, ["WriteRing", "UpsertService"]);
        assert_programmed(&dp, &want);
    }

    #[test]
    fn orphans_of_an_interrupted_removal_are_freed_first() {
        let key = skey("web", 80);
        let one = desired(vec![(key.clone(), spec(80, &[(1, 100), (2, 100)]))]);
        let mut dp = Mirror::new();
        sync(&mut dp, &one);
        // Crash right after RemoveService: both backends are orphans.
        let p = plan(&desired(vec![]), &dp.observe().unwrap()).unwrap();
        let at = p
            .ops
            .iter()
            .position(|o| op_kind(o) == "RemoveService")
            .unwrap();
        dp.fail_after(at + 1);
        assert!(dp.apply(&p).is_err());
        assert_eq!(dp.observe().unwrap().orphan_backends, [0, 1].into());

        // The service comes back before anyone cleaned up: it must not
        // inherit the orphans, and their ids are reused.
        let p = sync(&mut dp, &one);
        let kinds: Vec<&str> = p.ops.iter().map(op_kind).collect();
        assert_eq!(
            kinds[..4],
            [
                "RemoveBackend",
                "RemoveBackend",
                "UpsertBackend",
                "UpsertBackend"
            ]
        );
        assert_programmed(&dp, &one);
        assert_eq!(backend_ids(&dp, &key), [(bkey(1), 0), (bkey(2), 1)].into());
    }

    fn op_kind(op: &Op) -> &'static str {
        match op {
            Op::AddLocalAddr(_) => "AddLocalAddr",
            Op::RemoveLocalAddr(_) => "RemoveLocalAddr",
            Op::UpsertBackend { .. } => "UpsertBackend",
            Op::RemoveBackend { .. } => "RemoveBackend",
            Op::WriteRing { .. } => "WriteRing",
            Op::UpsertService { .. } => "UpsertService",
            Op::RemoveService { .. } => "RemoveService",
            Op::AddFrontend { .. } => "AddFrontend",
            Op::RemoveFrontend { .. } => "RemoveFrontend",
        }
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    fn random_desired(rng: &mut Rng) -> DesiredState {
        let mut services = BTreeMap::new();
        for i in 0..8u8 {
            if !rng.chance(60) {
                continue;
            }
            // Ports are per service, so frontends never collide; the VIP
            // comes and goes.
            let port = 8000 + u16::from(i);
            let mut frontends: crate::model::Frontends = [node_port(port)].into();
            if rng.chance(50) {
                frontends.insert(vip(i, port));
            }
            let mut backends = BTreeMap::new();
            for b in 1..=10u8 {
                if rng.chance(50) {
                    let weight = match rng.below(10) {
                        0 => 0,
                        1 => 10_000,
                        _ => 1 + rng.below(200) as u32,
                    };
                    let state = match rng.below(10) {
                        0 => BackendState::Down,
                        1 => BackendState::Draining,
                        _ => BackendState::Up,
                    };
                    let key = BackendKey {
                        addr: ip(10, 0, i, b),
                        port: 80 + rng.below(2) as u16,
                    };
                    let remote = rng.chance(30);
                    backends.insert(
                        key,
                        BackendSpec {
                            weight,
                            state,
                            remote,
                        },
                    );
                }
            }
            let key = ServiceKey {
                name: format!("svc{i}"),
                proto: if i % 2 == 0 { Proto::Tcp } else { Proto::Udp },
                port,
            };
            services.insert(
                key,
                ServiceSpec {
                    frontends,
                    backends,
                    affinity_secs: 0,
                }
                .into(),
            );
        }
        let local_addrs = (1..=4u8)
            .filter(|_| rng.chance(50))
            .map(|i| ip(192, 168, 0, i))
            .collect();
        DesiredState {
            services,
            local_addrs,
        }
    }

    #[test]
    fn one_task_change_among_10k_services_touches_only_its_service() {
        let services: Vec<_> = (0..10_000u16)
            .map(|i| {
                (
                    skey(&format!("s{i}"), 10_000 + i),
                    spec(10_000 + i, &(1..=10).map(|b| (b, 100)).collect::<Vec<_>>()),
                )
            })
            .collect();
        let mut want = desired(services);
        // The compact tables the XDP data plane mirrors the kernel with.
        let mut dp = Mirror::from_observed(&Observed::default());
        sync(&mut dp, &want);
        let key = skey("s4321", 14_321);
        Arc::make_mut(want.services.get_mut(&key).unwrap())
            .backends
            .insert(bkey(7), up(50));
        let p = sync(&mut dp, &want);
        let id = dp.observe().unwrap().services[&key].id;
        let kinds: Vec<_> = p.ops.iter().map(op_kind).collect();
        assert_eq!(kinds, ["UpsertBackend", "WriteRing", "UpsertService"]);
        for op in &p.ops {
            match op {
                Op::WriteRing { service_id, .. } | Op::UpsertService { id: service_id, .. } => {
                    assert_eq!(*service_id, id);
                }
                Op::UpsertBackend { service_id, .. } => assert_eq!(*service_id, id),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn random_sequences_converge() {
        let mut rng = Rng(0x6d65_7368_6c62_0001);
        let mut dp = Mirror::new();
        let mut prev: Option<Observed> = None;
        for round in 0..200 {
            let want = random_desired(&mut rng);
            let p = plan(&want, &dp.observe().unwrap()).unwrap();
            // Every few rounds the apply fails part-way, as a crash or a
            // failed syscall would; the next plan must repair it.
            if round % 5 == 4 && p.ops.len() > 1 {
                dp.fail_after(rng.below(p.ops.len() as u64) as usize);
                assert!(dp.apply(&p).is_err(), "round {round}");
                sync(&mut dp, &want);
            } else {
                // A mirror seeded from what was observed follows the plan
                // to the same state (the XDP data plane relies on this).
                let mut mirror = Mirror::from_observed(&dp.observe().unwrap());
                dp.apply(&p)
                    .unwrap_or_else(|e| panic!("round {round}: {e}"));
                mirror
                    .apply(&p)
                    .unwrap_or_else(|e| panic!("round {round}: mirror: {e}"));
                assert_eq!(
                    mirror.observe().unwrap(),
                    dp.observe().unwrap(),
                    "round {round}: mirror diverged"
                );
            }
            assert_programmed(&dp, &want);
            let obs = dp.observe().unwrap();
            assert!(
                plan(&want, &obs).unwrap().is_empty(),
                "round {round}: not idempotent"
            );

            // Backends that stayed kept their ids.
            if let Some(prev) = &prev {
                for (key, os) in &obs.services {
                    let Some(ps) = prev.services.get(key) else {
                        continue;
                    };
                    assert_eq!(os.id, ps.id, "round {round}: {key} changed id");
                    for (bk, ob) in &os.backends {
                        if let Some(pb) = ps.backends.get(bk) {
                            assert_eq!(ob.id, pb.id, "round {round}: {key} {bk} changed id");
                        }
                    }
                }
            }
            prev = Some(obs);
        }
    }
}
