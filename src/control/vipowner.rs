//! Who should own each announced VIP, and what this node does about it:
//! pure logic, no IO (the etcd election and the kernel addresses are
//! `daemon::announce`).
//!
//! Every node computes the same *preferred* owner of each VIP from the
//! same inputs (the announced VIPs and the candidate nodes): rendezvous
//! hashing ranks the nodes per VIP, and a bounded-load pass gives each
//! node at most `ceil(VIPs / nodes)` VIPs, so 3 nodes and 3 VIPs own one
//! each. The preference only steers who campaigns first and when an
//! owner hands a VIP back; safety (one owner) comes from etcd alone: a
//! node takes a VIP only by creating `vips/<ip>` while it is absent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

/// How long after the preferred owner of a free VIP the next-ranked
/// nodes campaign, per rank: a preferred node that is gone (its lease
/// not yet expired) costs that much, never more.
pub const CAMPAIGN_STEP: Duration = Duration::from_millis(300);

/// How long a node must have been a candidate before an owner hands it
/// a VIP it prefers: a node that comes and goes does not make VIPs flap.
pub const HANDBACK_HOLD: Duration = Duration::from_secs(3);

/// The rendezvous weight of `node` for `vip`: FNV-1a over the VIP's
/// bytes and the node name, then a 64-bit finaliser. Fixed forever: every
/// node and every version must rank alike.
pub fn weight(vip: IpAddr, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = match vip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    for b in bytes.iter().chain([0u8].iter()).chain(node.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser: FNV's low bits alone spread poorly.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The nodes in `vip`'s order of preference (highest weight first, ties
/// by name).
pub fn ranking<'a>(vip: IpAddr, nodes: impl IntoIterator<Item = &'a String>) -> Vec<&'a str> {
    let mut v: Vec<&str> = nodes.into_iter().map(String::as_str).collect();
    v.sort_by(|a, b| weight(vip, b).cmp(&weight(vip, a)).then(a.cmp(b)));
    v
}

/// The preferred owner of every VIP: each VIP, in address order, takes
/// its highest-ranked node that holds fewer than `ceil(vips / nodes)`.
/// Empty when there are no nodes.
pub fn preferred(vips: &BTreeSet<IpAddr>, nodes: &BTreeSet<String>) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    if nodes.is_empty() {
        return out;
    }
    let cap = vips.len().div_ceil(nodes.len());
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    for &vip in vips {
        let pick = ranking(vip, nodes)
            .into_iter()
            .find(|n| load.get(n).copied().unwrap_or(0) < cap);
        if let Some(n) = pick {
            *load.entry(n).or_default() += 1;
            out.insert(vip, n.to_string());
        }
    }
    out
}

/// What this node knows when it decides.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// This node's name.
    pub me: String,
    /// This node may own VIPs now: its announce interface is up and it
    /// holds its lease.
    pub eligible: bool,
    /// The announced VIPs.
    pub vips: BTreeSet<IpAddr>,
    /// The candidates (`vips/candidates/<node>`), each with how long this node
    /// has seen it there without a break.
    pub candidates: BTreeMap<String, Duration>,
    /// Current owners (`vips/<ip>`).
    pub owners: BTreeMap<IpAddr, String>,
}

/// One step towards the preferred ownership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create `vips/<ip>` if it is still absent, after `Duration`.
    Campaign(IpAddr, Duration),
    /// Stop answering for the VIP, then delete `vips/<ip>`: this node is
    /// not eligible, the VIP is no longer announced, or a steadier
    /// candidate prefers it.
    Resign(IpAddr, &'static str),
}

impl View {
    /// The candidates an owner hands VIPs back to: those seen for at
    /// least `HANDBACK_HOLD`, and this node when eligible.
    fn steady(&self) -> BTreeSet<String> {
        let mut s: BTreeSet<String> = self
            .candidates
            .iter()
            .filter(|(_, seen)| **seen >= HANDBACK_HOLD)
            .map(|(n, _)| n.clone())
            .collect();
        if self.eligible {
            s.insert(self.me.clone());
        }
        s
    }

    /// Every candidate, and this node when eligible.
    fn all(&self) -> BTreeSet<String> {
        let mut s: BTreeSet<String> = self.candidates.keys().cloned().collect();
        if self.eligible {
            s.insert(self.me.clone());
        } else {
            s.remove(&self.me);
        }
        s
    }

    /// What to do now, in VIP order.
    pub fn actions(&self) -> Vec<Action> {
        let mut out = Vec::new();
        // VIPs this node owns but should not.
        let steady = preferred(&self.vips, &self.steady());
        for (vip, owner) in &self.owners {
            if *owner != self.me {
                continue;
            }
            if !self.vips.contains(vip) {
                out.push(Action::Resign(*vip, "no longer announced"));
            } else if !self.eligible {
                out.push(Action::Resign(*vip, "this node cannot announce it now"));
            } else if steady.get(vip).is_some_and(|p| *p != self.me) {
                out.push(Action::Resign(*vip, "handed back to its preferred node"));
            }
        }
        if !self.eligible {
            return out;
        }
        // Free VIPs: the preferred node first, then by rank.
        let all = self.all();
        let pref = preferred(&self.vips, &all);
        for vip in &self.vips {
            if self.owners.contains_key(vip) {
                continue;
            }
            let delay = if pref.get(vip) == Some(&self.me) {
                Duration::ZERO
            } else {
                let rank = ranking(*vip, &all)
                    .iter()
                    .position(|n| *n == self.me)
                    .unwrap_or(all.len());
                CAMPAIGN_STEP * (rank as u32 + 1)
            };
            out.push(Action::Campaign(*vip, delay));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nodes(n: &[&str]) -> BTreeSet<String> {
        n.iter().map(|s| (*s).to_string()).collect()
    }

    fn vips(n: usize) -> BTreeSet<IpAddr> {
        (0..n).map(|i| ip(&format!("10.96.0.{}", 10 + i))).collect()
    }

    #[test]
    fn weights_are_fixed_forever() {
        // A change here re-shuffles every cluster's VIPs on upgrade.
        assert_eq!(
            weight(ip("10.96.0.10"), "n1"),
            weight(ip("10.96.0.10"), "n1")
        );
        assert_ne!(
            weight(ip("10.96.0.10"), "n1"),
            weight(ip("10.96.0.10"), "n2")
        );
        assert_ne!(
            weight(ip("10.96.0.10"), "n1"),
            weight(ip("10.96.0.11"), "n1")
        );
        let all = nodes(&["n1", "n2", "n3"]);
        let r = ranking(ip("10.96.0.10"), &all);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn every_node_owns_its_share() {
        for (n, m) in [(3, 3), (3, 1), (3, 7), (5, 12), (2, 9), (4, 4)] {
            let ns: BTreeSet<String> = (1..=n).map(|i| format!("n{i}")).collect();
            let p = preferred(&vips(m), &ns);
            assert_eq!(p.len(), m);
            let mut load: BTreeMap<&String, usize> = BTreeMap::new();
            for o in p.values() {
                *load.entry(o).or_default() += 1;
            }
            let cap = m.div_ceil(n);
            assert!(
                load.values().all(|l| *l <= cap),
                "{n} nodes {m} vips: {load:?}"
            );
            if m >= n {
                assert_eq!(
                    load.len(),
                    n,
                    "{n} nodes {m} vips: a node owns none: {load:?}"
                );
            }
        }
        assert!(preferred(&vips(3), &BTreeSet::new()).is_empty());
    }

    #[test]
    fn a_node_leaving_moves_only_its_vips_when_loads_allow() {
        let all = nodes(&["n1", "n2", "n3"]);
        let before = preferred(&vips(3), &all);
        let gone = before[&ip("10.96.0.10")].clone();
        let rest: BTreeSet<String> = all.iter().filter(|n| **n != gone).cloned().collect();
        let after = preferred(&vips(3), &rest);
        for (v, o) in &before {
            if *o != gone {
                // cap grows to 2 with 2 nodes: nobody else has to move.
                assert_eq!(after[v], *o, "{v} moved off a node that stayed");
            }
        }
    }

    fn view(me: &str, eligible: bool) -> View {
        View {
            me: me.into(),
            eligible,
            vips: vips(3),
            candidates: ["n1", "n2", "n3"]
                .iter()
                .map(|n| (n.to_string(), Duration::from_secs(10)))
                .collect(),
            owners: BTreeMap::new(),
        }
    }

    #[test]
    fn free_vips_are_campaigned_for_preferred_first() {
        let pref = preferred(&vips(3), &nodes(&["n1", "n2", "n3"]));
        for me in ["n1", "n2", "n3"] {
            let acts = view(me, true).actions();
            assert_eq!(acts.len(), 3);
            for a in acts {
                let Action::Campaign(v, d) = a else {
                    panic!("{a:?}")
                };
                if pref[&v] == me {
                    assert_eq!(d, Duration::ZERO);
                } else {
                    assert!(d >= CAMPAIGN_STEP && d <= CAMPAIGN_STEP * 3, "{d:?}");
                }
            }
        }
        // Not eligible: no campaign.
        assert!(view("n1", false).actions().is_empty());
    }

    #[test]
    fn owners_resign_when_ineligible_unannounced_or_handing_back() {
        let pref = preferred(&vips(3), &nodes(&["n1", "n2", "n3"]));
        let mut v = view("n1", true);
        // n1 owns all three: it hands back the two preferring others.
        for x in vips(3) {
            v.owners.insert(x, "n1".into());
        }
        let acts = v.actions();
        let back: Vec<_> = acts
            .iter()
            .filter_map(|a| match a {
                Action::Resign(x, why) => Some((*x, *why)),
                Action::Campaign(..) => None,
            })
            .collect();
        assert_eq!(back.len(), 2, "{acts:?}");
        for (x, why) in back {
            assert_ne!(pref[&x], "n1");
            assert_eq!(why, "handed back to its preferred node");
        }
        // A newcomer seen for less than the hold gets nothing back yet.
        let mut v2 = v.clone();
        for (n, seen) in &mut v2.candidates {
            if n != "n1" {
                *seen = Duration::from_secs(1);
            }
        }
        assert!(v2.actions().is_empty(), "{:?}", v2.actions());
        // Ineligible: resigns everything, campaigns for nothing.
        let mut v3 = v.clone();
        v3.eligible = false;
        assert_eq!(v3.actions().len(), 3);
        // Unannounced.
        let mut v4 = v.clone();
        v4.vips.clear();
        assert!(v4
            .actions()
            .iter()
            .all(|a| matches!(a, Action::Resign(_, "no longer announced"))));
    }
}
