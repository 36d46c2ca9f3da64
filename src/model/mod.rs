//! The desired and observed state of one node's data plane, in the terms
//! the reconciler works in. No IO here; `config` (and later etcd) produce
//! a [`DesiredState`], a `Dataplane` reports an [`Observed`].

pub mod config;
pub mod counters;
pub mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Transport protocol of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => meshlb_common::PROTO_TCP,
            Proto::Udp => meshlb_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            meshlb_common::PROTO_TCP => Some(Proto::Tcp),
            meshlb_common::PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// Identity of a data-plane service: one published port of a named
/// service (a service publishing 80 and 443 is two of these).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub name: String,
    pub proto: Proto,
    /// The published port.
    pub port: u16,
}

/// The keys of two maps walked in key order (one merge walk) that are in
/// one only, or in both with `same` false for their values.
pub fn changed_keys<'a, K: Ord + 'a, A: 'a, B: 'a>(
    a: impl Iterator<Item = (&'a K, &'a A)>,
    b: impl Iterator<Item = (&'a K, &'a B)>,
    mut same: impl FnMut(&K, &A, &B) -> bool,
) -> Vec<&'a K> {
    let mut out = Vec::new();
    let (mut ia, mut ib) = (a.peekable(), b.peekable());
    loop {
        match (ia.peek(), ib.peek()) {
            (None, None) => break,
            (Some(&(ka, _)), None) => {
                out.push(ka);
                ia.next();
            }
            (None, Some(&(kb, _))) => {
                out.push(kb);
                ib.next();
            }
            (Some(&(ka, va)), Some(&(kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.push(ka);
                    ia.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push(kb);
                    ib.next();
                }
                std::cmp::Ordering::Equal => {
                    if !same(ka, va, vb) {
                        out.push(ka);
                    }
                    ia.next();
                    ib.next();
                }
            },
        }
    }
    out
}

/// `services` with the specs unshared: what tests compare.
/// The role of an attached interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Service traffic arrives from the network: XDP (and the TC handoff).
    Uplink,
    /// Local tasks sit behind it: the TC load balancer (local senders'
    /// partial checksums, hairpin).
    Task,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Uplink => "uplink",
            Role::Task => "task",
        }
    }
}

#[cfg(test)]
pub fn plain(
    services: &BTreeMap<ServiceKey, Arc<ServiceSpec>>,
) -> BTreeMap<ServiceKey, ServiceSpec> {
    services
        .iter()
        .map(|(k, s)| (k.clone(), ServiceSpec::clone(s)))
        .collect()
}

impl ServiceKey {
    /// The smallest key of service `name`: the start of a range over
    /// the keys of one service (keys order by name first).
    pub fn first_of(name: &str) -> ServiceKey {
        ServiceKey {
            name: name.to_owned(),
            proto: Proto::Tcp,
            port: 0,
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.name, self.port, self.proto)
    }
}

/// Where clients connect. `addr: None` is a node port: any address of
/// this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: Option<IpAddr>,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(IpAddr::V6(a)) => write!(f, "[{a}]:{}/{}", self.port, self.proto),
            Some(IpAddr::V4(a)) => write!(f, "{a}:{}/{}", self.port, self.proto),
            None => write!(f, "*:{}/{}", self.port, self.proto),
        }
    }
}

/// A service's frontends: a sorted, deduplicated list, not a tree
/// (almost every service has one or two, and a tree's first node alone
/// takes over 200 bytes, twice per service: wanted and held).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frontends(Box<[Frontend]>);

impl Frontends {
    /// Adds `fe`; `false` when it was there.
    pub fn insert(&mut self, fe: Frontend) -> bool {
        match self.0.binary_search(&fe) {
            Ok(_) => false,
            Err(i) => {
                let mut v = std::mem::take(&mut self.0).into_vec();
                v.insert(i, fe);
                self.0 = v.into_boxed_slice();
                true
            }
        }
    }

    /// Removes `fe`; `false` when it was not there.
    pub fn remove(&mut self, fe: &Frontend) -> bool {
        match self.0.binary_search(fe) {
            Ok(i) => {
                let mut v = std::mem::take(&mut self.0).into_vec();
                v.remove(i);
                self.0 = v.into_boxed_slice();
                true
            }
            Err(_) => false,
        }
    }

    /// Keeps the frontends `keep` says yes to.
    pub fn retain(&mut self, keep: impl FnMut(&Frontend) -> bool) {
        let mut v = std::mem::take(&mut self.0).into_vec();
        v.retain(keep);
        self.0 = v.into_boxed_slice();
    }

    pub fn contains(&self, fe: &Frontend) -> bool {
        self.0.binary_search(fe).is_ok()
    }

    /// In order.
    pub fn iter(&self) -> std::slice::Iter<'_, Frontend> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<Frontend> for Frontends {
    fn from_iter<I: IntoIterator<Item = Frontend>>(iter: I) -> Self {
        let mut v: Vec<Frontend> = iter.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        Frontends(v.into_boxed_slice())
    }
}

impl<const N: usize> From<[Frontend; N]> for Frontends {
    fn from(a: [Frontend; N]) -> Self {
        a.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Frontends {
    type Item = &'a Frontend;
    type IntoIter = std::slice::Iter<'a, Frontend>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Health/admin state of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Receives new flows (if its weight is above 0).
    Up,
    /// Failed health checks: no new flows.
    Down,
    /// No new flows; established ones continue.
    Draining,
}

impl BackendState {
    /// As `status` shows it: `up`, `down`, `draining`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of a backend within a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub addr: IpAddr,
    pub port: u16,
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
        }
    }
}

/// A backend as wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub weight: u32,
    pub state: BackendState,
    /// On another node: flows to it are source-translated to this node's
    /// address so its replies come back here (the routing mesh).
    pub remote: bool,
}

impl BackendSpec {
    /// Whether new flows may go to this backend.
    pub fn active(&self) -> bool {
        self.weight > 0 && self.state == BackendState::Up
    }

    /// The state the data plane shows: weight 0 drains.
    pub fn effective_state(&self) -> BackendState {
        if self.weight == 0 && self.state == BackendState::Up {
            BackendState::Draining
        } else {
            self.state
        }
    }
}

/// One data-plane service as wanted.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceSpec {
    pub frontends: Frontends,
    pub backends: BTreeMap<BackendKey, BackendSpec>,
    /// Client-IP session affinity timeout in seconds (0: none).
    pub affinity_secs: u32,
}

/// Everything this node's data plane should do.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DesiredState {
    /// Specs are shared (`Arc`): a desired state is rebuilt per event,
    /// and only the services that changed are new values; comparing an
    /// unchanged one with what was applied is a pointer compare.
    pub services: BTreeMap<ServiceKey, Arc<ServiceSpec>>,
    /// This node's addresses: node-port frontends answer on these.
    pub local_addrs: BTreeSet<IpAddr>,
}

/// A backend as found in the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObservedBackend {
    pub id: u32,
    pub weight: u32,
    pub state: BackendState,
    pub remote: bool,
}

/// A service as found in the data plane.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ObservedService {
    pub id: u32,
    pub frontends: Frontends,
    pub backends: BTreeMap<BackendKey, ObservedBackend>,
    /// `ring_hash` of the backend set the Maglev ring was last written for.
    pub ring_hash: u64,
    pub active_backends: u32,
    /// Session affinity timeout in seconds (0: none).
    pub affinity_secs: u32,
}

/// What the data plane holds now (read back from the kernel, so a
/// restarted daemon adopts it).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Observed {
    pub services: BTreeMap<ServiceKey, ObservedService>,
    pub local_addrs: BTreeSet<IpAddr>,
    /// Ids of backend slots in use whose service slot is not (or that
    /// repeat a key of their service): what an apply interrupted by a
    /// crash leaves behind. The reconciler frees them first, so a service
    /// that takes the id again never inherits them.
    pub orphan_backends: BTreeSet<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_names_keys_in_one_map_only_or_with_other_values() {
        let a: BTreeMap<u8, u8> = [(1, 10), (2, 20), (4, 40), (6, 60)].into();
        let b: BTreeMap<u8, u8> = [(2, 20), (3, 30), (4, 41), (7, 70)].into();
        let got = changed_keys(a.iter(), b.iter(), |_, x, y| x == y);
        assert_eq!(got, vec![&1, &3, &4, &6, &7]);
        assert!(changed_keys(a.iter(), a.iter(), |_, x, y| x == y).is_empty());
    }

    #[test]
    fn frontends_stay_sorted_and_distinct() {
        let fe = |port| Frontend {
            addr: None,
            port,
            proto: Proto::Tcp,
        };
        let mut f: Frontends = [fe(3), fe(1), fe(3), fe(2)].into();
        assert_eq!(f.iter().map(|f| f.port).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(!f.insert(fe(2)), "already there");
        assert!(f.insert(fe(0)));
        assert!(f.remove(&fe(2)));
        assert!(!f.remove(&fe(2)), "gone");
        assert_eq!(f.iter().map(|f| f.port).collect::<Vec<_>>(), [0, 1, 3]);
        assert!(f.contains(&fe(3)) && !f.contains(&fe(2)));
        f.retain(|f| f.port != 1);
        assert_eq!(f.len(), 2);
        assert_eq!(f, [fe(3), fe(0)].into(), "equal whatever the order given");
        f.retain(|_| false);
        assert!(f.is_empty());
    }
}
