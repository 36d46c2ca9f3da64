//! The in-memory mirror of the XDP tables: the same tables the kernel maps
//! hold, executing the reconciler's plans and read back. The XDP engine
//! keeps one as its copy of what the kernel holds (and checks each plan's
//! order on a scratch one); tests run plans against it without a kernel.
//!
//! It refuses what the kernel would refuse (an id beyond a table, deleting
//! an absent key) and, to make ordering bugs visible, what would leave
//! the tables inconsistent for a packet in flight: a ring naming a backend
//! that is absent or belongs to another service, a service written before
//! its ring, a service removed while frontends still name it, a backend
//! removed while a ring still names it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use meshlb_common::{NO_BACKEND, RING_SIZES};

#[cfg(test)]
const RING_SIZE: u32 = RING_SIZES[0];

use super::{Dataplane, DataplaneError, DataplaneKind};
use crate::control::reconcile::{Limits, Op, Plan};
use crate::model::{
    BackendKey, BackendState, Frontend, Observed, ObservedBackend, ObservedService, ServiceKey,
};

/// A service slot (`SERVICES` + `SERVICE_NAMES`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorService {
    pub key: ServiceKey,
    pub active_backends: u32,
    pub ring_hash: u64,
    pub affinity_secs: u32,
}

/// A backend slot (`BACKENDS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MirrorBackend {
    pub service_id: u32,
    pub key: BackendKey,
    pub weight: u32,
    pub state: BackendState,
    pub remote: bool,
}

/// See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    limits: Limits,
    services: BTreeMap<u32, MirrorService>,
    /// Service id -> ring (`RINGS`), removed with its service.
    rings: BTreeMap<u32, Vec<u32>>,
    backends: BTreeMap<u32, MirrorBackend>,
    frontends: BTreeMap<Frontend, u32>,
    local_addrs: BTreeSet<IpAddr>,
    /// Keep only the distinct backend ids of each ring (a mirror needs no
    /// more, and 10,000 full rings would cost 160 MiB).
    compact_rings: bool,
    /// Operations applied successfully over the mirror's life.
    applied: usize,
    /// Fail the operation with this index (counted like `applied`).
    fail_at: Option<usize>,
}

fn err(msg: String) -> DataplaneError {
    DataplaneError::Other(msg)
}

impl Mirror {
    /// Tables of the pinned maps' sizes.
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    pub fn with_limits(limits: Limits) -> Self {
        Mirror {
            limits,
            ..Default::default()
        }
    }

    /// Tables holding what `obs` describes, so later plans can be applied
    /// to them: the XDP data plane keeps one as its in-memory mirror of the
    /// kernel, and reads it instead of every map slot on each sync. Rings
    /// of existing services are unknown and start empty; rings are kept
    /// compact (the distinct backend ids only).
    pub fn from_observed(obs: &Observed) -> Self {
        let mut f = Mirror {
            compact_rings: true,
            ..Mirror::new()
        };
        for (key, s) in &obs.services {
            f.services.insert(
                s.id,
                MirrorService {
                    key: key.clone(),
                    active_backends: s.active_backends,
                    ring_hash: s.ring_hash,
                    affinity_secs: s.affinity_secs,
                },
            );
            f.rings.insert(s.id, Vec::new());
            for fe in &s.frontends {
                f.frontends.insert(*fe, s.id);
            }
            for (bk, b) in &s.backends {
                f.backends.insert(
                    b.id,
                    MirrorBackend {
                        service_id: s.id,
                        key: *bk,
                        weight: b.weight,
                        state: b.state,
                        remote: b.remote,
                    },
                );
            }
        }
        for id in &obs.orphan_backends {
            f.backends.insert(
                *id,
                MirrorBackend {
                    service_id: u32::MAX,
                    key: BackendKey {
                        addr: IpAddr::from([0, 0, 0, 0]),
                        port: 0,
                    },
                    weight: 0,
                    state: BackendState::Down,
                    remote: false,
                },
            );
        }
        f.local_addrs = obs.local_addrs.clone();
        f
    }

    /// Make the `n`th operation from now fail (0: the next one), as a
    /// kernel call can, to test recovery from a partly applied plan.
    #[cfg(test)]
    pub fn fail_after(&mut self, n: usize) {
        self.fail_at = Some(self.applied + n);
    }

    /// Operations applied so far.
    #[cfg(test)]
    pub fn applied(&self) -> usize {
        self.applied
    }

    /// The ring of a present service.
    #[cfg(test)]
    pub fn ring(&self, service_id: u32) -> Option<&[u32]> {
        self.services
            .contains_key(&service_id)
            .then(|| self.rings.get(&service_id).map(Vec::as_slice))
            .flatten()
    }

    #[cfg(test)]
    pub fn service(&self, id: u32) -> Option<&MirrorService> {
        self.services.get(&id)
    }

    #[cfg(test)]
    pub fn backend(&self, id: u32) -> Option<&MirrorBackend> {
        self.backends.get(&id)
    }

    /// Every backend slot in use, orphans included.
    #[cfg(test)]
    pub fn backends(&self) -> &BTreeMap<u32, MirrorBackend> {
        &self.backends
    }

    fn apply_op(&mut self, op: &Op) -> Result<(), DataplaneError> {
        let limits = self.limits;
        match op {
            Op::AddLocalAddr(addr) => {
                if !self.local_addrs.contains(addr)
                    && self.local_addrs.len() >= limits.local_addrs as usize
                {
                    return Err(err(format!("local address {addr}: table full")));
                }
                self.local_addrs.insert(*addr);
            }
            Op::RemoveLocalAddr(addr) => {
                if !self.local_addrs.remove(addr) {
                    return Err(err(format!("local address {addr}: not present")));
                }
            }
            Op::UpsertBackend {
                id,
                service_id,
                key,
                weight,
                state,
                remote,
                fresh,
            } => {
                if *id >= limits.backends {
                    return Err(err(format!("backend id {id}: beyond the table")));
                }
                match self.backends.get(id) {
                    Some(b) if *fresh => {
                        return Err(err(format!(
                            "backend id {id}: fresh, but in use by service {} ({})",
                            b.service_id, b.key
                        )))
                    }
                    Some(b) if !*fresh && (b.service_id != *service_id || b.key != *key) => {
                        return Err(err(format!(
                            "backend id {id}: update changes its identity ({} of service {} -> {key} of service {service_id})",
                            b.key, b.service_id
                        )))
                    }
                    None if !*fresh => {
                        return Err(err(format!("backend id {id}: update, but not present")))
                    }
                    _ => {}
                }
                self.backends.insert(
                    *id,
                    MirrorBackend {
                        service_id: *service_id,
                        key: *key,
                        weight: *weight,
                        state: *state,
                        remote: *remote,
                    },
                );
            }
            Op::RemoveBackend { id } => {
                if !self.backends.contains_key(id) {
                    return Err(err(format!("backend id {id}: not present")));
                }
                // A ring holds only its own service's backends (checked
                // when written): that ring, if its service is present, is
                // the one to look in.
                let owner = self.backends.get(id).map(|b| b.service_id);
                let held = |s: &u32| {
                    self.services.contains_key(s)
                        && self.rings.get(s).is_some_and(|r| r.contains(id))
                };
                if let Some(s) = owner.filter(held) {
                    return Err(err(format!(
                        "backend id {id}: still in the ring of service {s}"
                    )));
                }
                self.backends.remove(id);
            }
            Op::WriteRing { service_id, ring } => {
                if *service_id >= limits.services {
                    return Err(err(format!("service id {service_id}: beyond the table")));
                }
                if !RING_SIZES.contains(&(ring.len() as u32)) {
                    return Err(err(format!(
                        "ring of service {service_id}: {} slots, not one of {RING_SIZES:?}",
                        ring.len()
                    )));
                }
                // Each backend once, not each slot (a ring has thousands
                // of slots, and a few distinct ids).
                let mut ids: Vec<u32> = Vec::new();
                for &b in ring {
                    if let Err(at) = ids.binary_search(&b) {
                        ids.insert(at, b);
                    }
                }
                for &b in ids.iter().filter(|&&b| b != NO_BACKEND) {
                    match self.backends.get(&b) {
                        Some(be) if be.service_id == *service_id => {}
                        Some(be) => {
                            return Err(err(format!(
                            "ring of service {service_id}: backend id {b} belongs to service {}",
                            be.service_id
                        )))
                        }
                        None => {
                            return Err(err(format!(
                                "ring of service {service_id}: backend id {b} not present"
                            )))
                        }
                    }
                }
                let r = if self.compact_rings {
                    ids
                } else {
                    ring.clone()
                };
                self.rings.insert(*service_id, r);
            }
            Op::UpsertService {
                id,
                key,
                active_backends,
                ring_hash,
                affinity_secs,
                fresh,
            } => {
                if *id >= limits.services {
                    return Err(err(format!("service id {id}: beyond the table")));
                }
                match self.services.get(id) {
                    Some(s) if *fresh => {
                        return Err(err(format!(
                            "service id {id}: fresh, but in use by {}",
                            s.key
                        )))
                    }
                    Some(s) if s.key != *key => {
                        return Err(err(format!(
                            "service id {id}: update changes its key ({} -> {key})",
                            s.key
                        )))
                    }
                    None if !*fresh => {
                        return Err(err(format!("service id {id}: update, but not present")))
                    }
                    _ => {}
                }
                if !self.rings.contains_key(id) {
                    return Err(err(format!("service id {id}: written before its ring")));
                }
                self.services.insert(
                    *id,
                    MirrorService {
                        key: key.clone(),
                        active_backends: *active_backends,
                        ring_hash: *ring_hash,
                        affinity_secs: *affinity_secs,
                    },
                );
            }
            Op::RemoveService { id } => {
                if !self.services.contains_key(id) {
                    return Err(err(format!("service id {id}: not present")));
                }
                if let Some((fe, _)) = self.frontends.iter().find(|(_, s)| *s == id) {
                    return Err(err(format!(
                        "service id {id}: frontend {fe} still names it"
                    )));
                }
                self.services.remove(id);
                self.rings.remove(id);
            }
            Op::AddFrontend {
                frontend,
                service_id,
            } => {
                if !self.services.contains_key(service_id) {
                    return Err(err(format!(
                        "frontend {frontend}: service id {service_id} not present"
                    )));
                }
                if !self.frontends.contains_key(frontend)
                    && self.frontends.len() >= limits.frontends as usize
                {
                    return Err(err(format!("frontend {frontend}: table full")));
                }
                // A hash map update: replaces an existing entry.
                self.frontends.insert(*frontend, *service_id);
            }
            Op::RemoveFrontend { frontend } => {
                if self.frontends.remove(frontend).is_none() {
                    return Err(err(format!("frontend {frontend}: not present")));
                }
            }
        }
        Ok(())
    }
}

impl Dataplane for Mirror {
    fn kind(&self) -> DataplaneKind {
        DataplaneKind::Mirror
    }

    /// Rebuilt from the tables the way the XDP data plane reads its maps:
    /// present service slots, the frontends and backends naming them, and
    /// the backend slots naming no present service as orphans.
    fn observe(&self) -> Result<Observed, DataplaneError> {
        let mut services: BTreeMap<u32, ObservedService> = self
            .services
            .iter()
            .map(|(id, s)| {
                (
                    *id,
                    ObservedService {
                        id: *id,
                        ring_hash: s.ring_hash,
                        active_backends: s.active_backends,
                        affinity_secs: s.affinity_secs,
                        ..Default::default()
                    },
                )
            })
            .collect();
        for (fe, sid) in &self.frontends {
            if let Some(s) = services.get_mut(sid) {
                s.frontends.insert(*fe);
            }
        }
        let mut orphan_backends = BTreeSet::new();
        // In id order, so of two slots with one key the lower id wins.
        for (id, b) in &self.backends {
            let Some(s) = services.get_mut(&b.service_id) else {
                orphan_backends.insert(*id);
                continue;
            };
            if s.backends.contains_key(&b.key) {
                orphan_backends.insert(*id);
                continue;
            }
            s.backends.insert(
                b.key,
                ObservedBackend {
                    id: *id,
                    weight: b.weight,
                    state: b.state,
                    remote: b.remote,
                },
            );
        }
        Ok(Observed {
            services: services
                .into_iter()
                .map(|(id, s)| (self.services[&id].key.clone(), s))
                .collect(),
            local_addrs: self.local_addrs.clone(),
            orphan_backends,
        })
    }

    fn apply(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        for (i, op) in plan.ops.iter().enumerate() {
            if self.fail_at == Some(self.applied) {
                self.fail_at = None;
                return Err(err(format!("injected failure at op {i}: {op:?}")));
            }
            self.apply_op(op).map_err(|e| err(format!("op {i}: {e}")))?;
            self.applied += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proto;
    use std::net::Ipv4Addr;

    fn key(i: u8) -> BackendKey {
        BackendKey {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)),
            port: 80,
        }
    }

    fn svc() -> ServiceKey {
        ServiceKey {
            name: "web".into(),
            proto: Proto::Tcp,
            port: 80,
        }
    }

    fn upsert_be(id: u32, service_id: u32, fresh: bool) -> Op {
        Op::UpsertBackend {
            id,
            service_id,
            key: key(id as u8),
            weight: 100,
            state: BackendState::Up,
            remote: false,
            fresh,
        }
    }

    fn ring_of(id: u32) -> Op {
        Op::WriteRing {
            service_id: 0,
            ring: vec![id; RING_SIZE as usize],
        }
    }

    fn upsert_svc(fresh: bool) -> Op {
        Op::UpsertService {
            id: 0,
            key: svc(),
            active_backends: 1,
            ring_hash: 7,
            affinity_secs: 0,
            fresh,
        }
    }

    fn fe() -> Frontend {
        Frontend {
            addr: None,
            port: 80,
            proto: Proto::Tcp,
        }
    }

    /// A service 0 with backend 1 in its ring and a frontend.
    fn base() -> Vec<Op> {
        vec![
            upsert_be(1, 0, true),
            ring_of(1),
            upsert_svc(true),
            Op::AddFrontend {
                frontend: fe(),
                service_id: 0,
            },
        ]
    }

    #[test]
    fn refuses_plans_the_kernel_or_consistency_would() {
        let cases: Vec<(&str, Vec<Op>, &str)> = vec![
            (
                "ring before its backend",
                vec![ring_of(2)],
                "backend id 2 not present",
            ),
            (
                "service before its ring",
                vec![Op::UpsertService {
                    id: 1,
                    key: ServiceKey {
                        name: "api".into(),
                        proto: Proto::Tcp,
                        port: 81,
                    },
                    active_backends: 0,
                    ring_hash: 0,
                    affinity_secs: 0,
                    fresh: true,
                }],
                "written before its ring",
            ),
            (
                "frontend before its service",
                vec![Op::AddFrontend {
                    frontend: fe(),
                    service_id: 1,
                }],
                "service id 1 not present",
            ),
            (
                "backend still in a ring",
                vec![Op::RemoveBackend { id: 1 }],
                "still in the ring",
            ),
            (
                "service with frontends",
                vec![Op::RemoveService { id: 0 }],
                "still names it",
            ),
            (
                "fresh over a live backend",
                vec![upsert_be(1, 0, true)],
                "in use",
            ),
            (
                "update of an absent backend",
                vec![upsert_be(2, 0, false)],
                "not present",
            ),
            (
                "fresh over a live service",
                vec![upsert_svc(true)],
                "in use",
            ),
            (
                "ring naming another service's backend",
                vec![
                    upsert_be(2, 5, true),
                    Op::WriteRing {
                        service_id: 0,
                        ring: vec![2; RING_SIZE as usize],
                    },
                ],
                "belongs to service 5",
            ),
            (
                "short ring",
                vec![Op::WriteRing {
                    service_id: 0,
                    ring: vec![1; 10],
                }],
                "10 slots",
            ),
            (
                "service id beyond the table",
                vec![Op::RemoveService {
                    id: meshlb_common::MAX_SERVICES,
                }],
                "not present",
            ),
            (
                "backend id beyond the table",
                vec![upsert_be(meshlb_common::MAX_BACKENDS, 0, true)],
                "beyond the table",
            ),
            (
                "absent frontend",
                vec![
                    Op::RemoveFrontend { frontend: fe() },
                    Op::RemoveFrontend { frontend: fe() },
                ],
                "op 1: frontend *:80/tcp: not present",
            ),
            (
                "absent local address",
                vec![Op::RemoveLocalAddr(IpAddr::V4(Ipv4Addr::LOCALHOST))],
                "not present",
            ),
        ];
        for (what, ops, want) in cases {
            let mut dp = Mirror::new();
            dp.apply(&Plan { ops: base() }).unwrap();
            let e = dp.apply(&Plan { ops }).expect_err(what).to_string();
            assert!(e.contains(want), "{what}: {e}");
        }
    }

    #[test]
    fn observe_reads_back_the_tables() {
        let mut dp = Mirror::new();
        dp.apply(&Plan { ops: base() }).unwrap();
        // A backend whose service was never written is an orphan.
        dp.apply(&Plan {
            ops: vec![upsert_be(9, 3, true)],
        })
        .unwrap();
        let o = dp.observe().unwrap();
        let s = &o.services[&svc()];
        assert_eq!(s.id, 0);
        assert_eq!(s.ring_hash, 7);
        assert_eq!(s.frontends, [fe()].into());
        assert_eq!(
            s.backends,
            [(
                key(1),
                ObservedBackend {
                    id: 1,
                    weight: 100,
                    state: BackendState::Up,
                    remote: false,
                }
            )]
            .into()
        );
        assert_eq!(o.orphan_backends, [9].into());
        assert_eq!(dp.ring(0).unwrap()[0], 1);
        assert_eq!(dp.ring(3), None);
    }

    #[test]
    fn injected_failure_leaves_earlier_steps_applied() {
        let mut dp = Mirror::new();
        dp.fail_after(2);
        assert!(dp.apply(&Plan { ops: base() }).is_err());
        assert_eq!(dp.applied(), 2);
        assert!(dp.backend(1).is_some() && dp.service(0).is_none());
        // The failure is one-shot.
        dp.apply(&Plan {
            ops: base()[2..].to_vec(),
        })
        .unwrap();
        assert!(dp.service(0).is_some());
    }
}
