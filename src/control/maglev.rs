//! Maglev-style lookup tables (weighted) with exact shares and low
//! disruption: builds the per-service table the XDP program indexes with
//! `meshlb_common::hash::flow_slot`.
//!
//! **Construction.** As in Maglev (Eisenbud et al., NSDI 2016, §3.4),
//! each backend has a permutation of the M slots (M prime), `offset,
//! offset + skip, offset + 2 skip, ...` mod M, from two hashes of its key.
//! Every backend also has a quota: its weight's share of M, rounded by
//! largest remainder (Hamilton's method), so equal weights give every
//! backend exactly floor(M/N) or ceil(M/N) slots. The table is then a
//! race: round by round, every backend visits the next slot of its
//! permutation (a backend of weight w on its k-th visit in round
//! floor(k * w_max / w)) and takes it if it is still free; a backend stops
//! once it holds its quota. Unlike classic Maglev, a backend that finds a
//! slot taken does not go on to its next free slot in the same round: it
//! has simply lost that slot, and tries its next one a round later.
//!
//! That is the stable assignment of slots to backends with capacities
//! (Gale and Shapley's college admissions, 1962) where a slot prefers
//! the backend whose permutation reaches it first: rendezvous hashing
//! (Thaler and Ravishankar, 1996) with a load cap, as in consistent
//! hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, SODA
//! 2018), the cap here being the exact quota.
//!
//! **Why: disruption.** In classic Maglev every backend takes one *free*
//! slot per round, so when a backend leaves, the slots it held are free
//! earlier in the others' permutations, they take those instead, and
//! every later pick shifts: about 1.2 % of the *other* flows moved at 100
//! backends on 16,381 slots. In the race, the leaver's slots simply go to
//! the backends that reach them next; another flow moves only where a
//! backend receives more of them than its quota grows by (it then gives
//! up the slot it took last, which goes to the next backend that wants
//! it, and so on) or fewer (it then takes one it lost to another before).
//! That mismatch is random (each backend's intake is about Poisson, its
//! quota's growth fixed), and grows like sqrt(M) while the table grows
//! like M, so the share of other flows moved falls like 1/sqrt(M),
//! whatever the backend count: about 0.3 % at 65,537 slots and 0.5 to
//! 0.7 % at 16,381 (hence `ring_size` puts pools of more than 40
//! backends on the largest ring). Adding a backend is the mirror image.
//! The loads stay exact whatever the set.
//!
//! Every node must build the very same table from the same backend set,
//! whatever its architecture or Rust version, or a flow that moves between
//! nodes (ECMP, failover) would land on another backend. Hence the hash is
//! spelled out here (FNV-1a 64 over a fixed byte encoding, then a 64-bit
//! finaliser) instead of std's `DefaultHasher`, whose output may change
//! between releases, the input order is canonicalised by sorting, and
//! the construction uses integer arithmetic only.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::IpAddr;

use crate::model::BackendKey;

/// Bumped when the table construction changes, so that `ring_hash`
/// changes too and every ring is rewritten by the next reconcile.
const ALGORITHM_VERSION: u8 = 2;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Seeds that turn one hash function into the paper's two independent
/// ones (`offset` and `skip`), and a third that ranks backends whose
/// quotas tie for a rounded-up slot.
const SEED_OFFSET: u8 = 0x6f; // 'o'
const SEED_SKIP: u8 = 0x73; // 's'
const SEED_QUOTA: u8 = 0x71; // 'q'
const SEED_RING: u8 = 0x72; // 'r'

fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// murmur3's fmix64: FNV's low bits are weak for short inputs, and the
/// table reduces modulo a small prime.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Canonical encoding of a backend: family, 16 address bytes (IPv4 in
/// the first four, the rest zero, as in the shared map layouts) and the
/// port in network byte order.
fn encode(key: &BackendKey) -> [u8; 19] {
    let mut out = [0u8; 19];
    match key.addr {
        IpAddr::V4(a) => {
            out[0] = meshlb_common::FAMILY_V4;
            out[1..5].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out[0] = meshlb_common::FAMILY_V6;
            out[1..17].copy_from_slice(&a.octets());
        }
    }
    out[17..19].copy_from_slice(&key.port.to_be_bytes());
    out
}

/// The stable hash of a backend under one seed.
fn backend_hash(seed: u8, key: &BackendKey) -> u64 {
    fmix64(fnv1a(fnv1a(FNV_OFFSET, &[seed]), &encode(key)))
}

#[allow(
    clippy::maybe_infinite_iter,
    reason = "take_while ends it at the square root of n"
)]
fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d: &u32| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// Build a weighted lookup table of `size` slots (see the module doc).
///
/// `backends` are `(key, weight)` pairs with unique keys. Slot `i` of the
/// result is `Some(j)`, an index into the **caller's** `backends` slice,
/// or `None` when no backend has a weight above 0 (then every slot is
/// `None`). Backends of weight 0 get no slots. The result does not depend
/// on the order of `backends`: it is sorted by key internally.
///
/// A backend of weight w holds its share `size * w / W` (W the total
/// weight) rounded down or up: exactly `size / N` or one more when all N
/// weights are equal. A backend whose share is below one slot still
/// holds one (if there are no more backends than slots), taken from the
/// largest, so that every backend with a weight is in the table.
///
/// # Panics
///
/// If `size` is not prime: the permutations (`offset + j * skip`) only
/// visit every slot when `size` is prime.
pub fn table(backends: &[(BackendKey, u32)], size: u32) -> Vec<Option<usize>> {
    assert!(is_prime(size), "maglev table size {size} is not prime");
    let m = u64::from(size);
    let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].1 > 0).collect();
    order.sort_by_key(|&i| (backends[i].0, i));
    let mut slots = vec![None; size as usize];
    if order.is_empty() {
        return slots;
    }

    let quotas = quotas(backends, &order, m);
    let max_weight = order
        .iter()
        .map(|&i| u64::from(backends[i].1))
        .max()
        .unwrap_or(1);
    // In key order, which also settles a slot two backends reach in the
    // same round.
    let mut racers: Vec<Racer> = order
        .iter()
        .zip(quotas)
        .filter(|&(_, quota)| quota > 0)
        .map(|(&i, quota)| {
            let (key, weight) = &backends[i];
            let weight = u64::from(*weight);
            Racer {
                index: i,
                next: backend_hash(SEED_OFFSET, key) % m,
                skip: backend_hash(SEED_SKIP, key) % (m - 1) + 1,
                left: quota,
                round: 0,
                weight,
                stride: max_weight / weight,
                stride_rem: max_weight % weight,
                carry: 0,
            }
        })
        .collect();

    // The quotas add up to M, so while a racer still wants a slot, some
    // slot is free; as every permutation covers the table, the race ends
    // with the table full.
    let mut round = 0u64;
    while !racers.is_empty() {
        let mut next_round = u64::MAX;
        racers.retain_mut(|r| {
            if r.round == round {
                let slot = &mut slots[r.next as usize];
                if slot.is_none() {
                    *slot = Some(r.index);
                    r.left -= 1;
                }
                r.advance(m);
            }
            let racing = r.left > 0;
            if racing {
                next_round = next_round.min(r.round);
            }
            racing
        });
        // Skip the rounds where nobody visits (light backends only).
        round = next_round;
    }
    slots
}

/// A backend in the race of `table`.
struct Racer {
    /// Into the caller's slice.
    index: usize,
    /// The slot it visits next: its permutation is `next, next + skip,
    /// ...` mod M.
    next: u64,
    skip: u64,
    /// How many more slots it takes: its quota less what it holds.
    left: u64,
    /// The round of its next visit: its k-th is in round
    /// floor(k * max_weight / weight), kept as `round` plus `carry /
    /// weight` so that nothing overflows.
    round: u64,
    weight: u64,
    /// `max_weight / weight` and its remainder.
    stride: u64,
    stride_rem: u64,
    carry: u64,
}

impl Racer {
    fn advance(&mut self, m: u64) {
        self.next += self.skip;
        if self.next >= m {
            self.next -= m;
        }
        self.round = self.round.saturating_add(self.stride);
        self.carry += self.stride_rem;
        if self.carry >= self.weight {
            self.carry -= self.weight;
            self.round = self.round.saturating_add(1);
        }
    }
}

/// The number of slots of each backend of `order` (indices into
/// `backends`, all of a weight above 0): its share of `m` by weight,
/// rounded down, and the slots this leaves over one each to the largest
/// remainders (ties: a hash of the key, so that no address range is
/// favoured). A backend whose share rounds down to 0 still gets one slot,
/// from the largest quota. They add up to `m`.
fn quotas(backends: &[(BackendKey, u32)], order: &[usize], m: u64) -> Vec<u64> {
    // u128: a sum of u32 weights times a u32 size cannot overflow it.
    let total: u128 = order.iter().map(|&i| u128::from(backends[i].1)).sum();
    let share = |i: usize| u128::from(m) * u128::from(backends[i].1);
    let mut quotas: Vec<u64> = order.iter().map(|&i| (share(i) / total) as u64).collect();
    let left_over = m - quotas.iter().sum::<u64>();
    if left_over == 0 {
        // Every share was whole (so none was 0).
        return quotas;
    }
    let mut by_remainder: Vec<usize> = (0..order.len()).collect();
    by_remainder.sort_by_cached_key(|&j| {
        let i = order[j];
        (
            Reverse(share(i) % total),
            backend_hash(SEED_QUOTA, &backends[i].0),
            j,
        )
    });
    // Fewer than `order.len()`: the remainders are each below 1 slot.
    for &j in &by_remainder[..left_over as usize] {
        quotas[j] += 1;
    }
    if quotas.contains(&0) {
        // Every backend with a weight keeps a slot, as in classic Maglev:
        // the reconciler and the data plane take the backends of a ring
        // for the service's active ones. Each such slot comes from the
        // largest quota, while one has two (M slots hold at most M
        // backends), in remainder order again.
        let mut largest: BinaryHeap<(u64, Reverse<usize>)> = by_remainder
            .iter()
            .enumerate()
            .filter(|&(_, &j)| quotas[j] >= 2)
            .map(|(rank, &j)| (quotas[j], Reverse(rank)))
            .collect();
        for &j in &by_remainder {
            if quotas[j] > 0 {
                continue;
            }
            let Some((quota, Reverse(rank))) = largest.pop() else {
                break;
            };
            quotas[by_remainder[rank]] = quota - 1;
            quotas[j] = 1;
            if quota > 2 {
                largest.push((quota - 1, Reverse(rank)));
            }
        }
    }
    quotas
}

/// Slots per configured backend a ring class must offer to be chosen,
/// for every class but the largest (which takes the rest).
///
/// The smallest class keeps the Maglev paper's `M >= 100 N`: it holds the
/// many small services, at 16 KiB of kernel memory each. The middle one
/// asks for 400: the share of other flows a removal moves depends on M,
/// not N (module doc), and is about 0.5 % from 40 backends up on 16,381
/// slots, but 0.3 % on 65,537; issue 18 wants at most 0.5 % for large
/// pools. Pools of 41 to 163 backends thus take 1 MiB instead of 256 KiB
/// of kernel memory; the worst case (every service on the largest ring)
/// does not change.
const MIN_SLOTS_PER_BACKEND: [usize; 2] = [100, 400];

/// The ring size (a `meshlb_common::RING_SIZES` class) for a service with
/// `backends` configured backends: the smallest that has
/// `MIN_SLOTS_PER_BACKEND` slots per backend (at most 10 backends on
/// 1,021 slots, at most 40 on 16,381), else the largest.
///
/// It counts the configured backends, not the healthy ones: every node
/// sees the same set in etcd, so every node picks the same size (a flow
/// that moves between nodes keeps its backend), and a backend failing
/// its health check never resizes, and so reshuffles, the whole ring.
pub fn ring_size(backends: usize) -> u32 {
    let classes = meshlb_common::RING_SIZES;
    classes
        .iter()
        .zip(MIN_SLOTS_PER_BACKEND)
        .find(|&(&m, per)| m as usize >= backends.saturating_mul(per))
        .map_or(classes[classes.len() - 1], |(&m, _)| m)
}

/// Stable hash of the backend set a table of `size` slots is built from:
/// the size, and the keys and weights of the backends with a weight above
/// 0, in any input order. The data plane stores it next to the ring, so a
/// reconcile can tell whether the ring it finds was built for the
/// backends it wants.
pub fn ring_hash(backends: &[(BackendKey, u32)], size: u32) -> u64 {
    let mut active: Vec<(BackendKey, u32)> =
        backends.iter().copied().filter(|(_, w)| *w > 0).collect();
    active.sort();
    let mut h = fnv1a(FNV_OFFSET, &[SEED_RING, ALGORITHM_VERSION]);
    h = fnv1a(h, &size.to_be_bytes());
    for (key, weight) in &active {
        h = fnv1a(h, &encode(key));
        h = fnv1a(h, &weight.to_be_bytes());
    }
    fmix64(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlb_common::RING_SIZES;
    const RING_SIZE: u32 = RING_SIZES[0];
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn be(i: u8) -> BackendKey {
        BackendKey {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 1, i)),
            port: 8000,
        }
    }

    fn shares(t: &[Option<usize>], n: usize) -> Vec<f64> {
        let mut c = vec![0usize; n];
        for s in t.iter().flatten() {
            c[*s] += 1;
        }
        c.iter().map(|&x| x as f64 / t.len() as f64).collect()
    }

    #[test]
    fn hashes_are_pinned() {
        // A change of these values moves flows on every deployment: it must
        // be deliberate, with ALGORITHM_VERSION bumped. (Checked against an
        // independent Python implementation of the same definition, at
        // ring size 4099; re-pinned here for 1021.) The ring hash and the
        // tables are re-pinned for ALGORITHM_VERSION 2 (the quota race,
        // issue 18), again checked against an independent Python
        // implementation; the backend hash, and so the permutations, did
        // not change.
        assert_eq!(backend_hash(SEED_OFFSET, &be(2)), 0xf9b8_46fb_9c98_26cc);
        assert_eq!(ring_hash(&[(be(2), 100)], RING_SIZE), 0xc6ea_4a66_2355_66a2);
        let t = table(&[(be(1), 1), (be(2), 1), (be(3), 1)], RING_SIZE);
        assert_eq!(
            t[..6],
            [Some(1), Some(0), Some(2), Some(1), Some(0), Some(0)]
        );
        assert_eq!(
            t[1015..],
            [Some(2), Some(0), Some(2), Some(2), Some(1), Some(2)]
        );
        // Weights pace the race.
        let t = table(&[(be(1), 1), (be(2), 2), (be(3), 3)], RING_SIZE);
        assert_eq!(
            t[..6],
            [Some(1), Some(2), Some(2), Some(1), Some(2), Some(1)]
        );
        assert_eq!(
            t[1015..],
            [Some(2), Some(0), Some(2), Some(2), Some(1), Some(2)]
        );
    }

    #[test]
    fn no_active_backend_gives_empty_table() {
        for input in [vec![], vec![(be(1), 0), (be(2), 0)]] {
            let t = table(&input, RING_SIZE);
            assert_eq!(t.len(), RING_SIZE as usize);
            assert!(t.iter().all(Option::is_none));
        }
    }

    #[test]
    fn every_slot_is_filled_and_zero_weight_gets_none() {
        for n in 1..=12u8 {
            let mut input: Vec<_> = (0..n).map(|i| (be(i), 100)).collect();
            input.push((be(200), 0));
            let t = table(&input, RING_SIZE);
            assert!(t.iter().all(Option::is_some), "{n} backends");
            assert!(!t.contains(&Some(n as usize)), "weight 0 got a slot");
        }
        // A small prime works too.
        assert!(table(&[(be(1), 5)], 7).iter().all(|s| *s == Some(0)));
    }

    #[test]
    fn equal_weights_share_evenly() {
        for n in 3..=10u8 {
            let input: Vec<_> = (0..n).map(|i| (be(i), 100)).collect();
            let even = 1.0 / f64::from(n);
            for (i, s) in shares(&table(&input, RING_SIZE), n as usize)
                .iter()
                .enumerate()
            {
                assert!((s - even).abs() <= 0.02, "n={n} backend {i}: {s}");
            }
        }
    }

    #[test]
    fn equal_weights_get_floor_or_ceil_slots_at_any_count() {
        let key = |i: u32| BackendKey {
            addr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
            port: 8000,
        };
        for n in (1..=12).chain([37, 100, 1000]) {
            let input: Vec<_> = (0..n).map(|i| (key(i), 7)).collect();
            let mut sizes = vec![ring_size(n as usize)];
            if n <= 12 {
                sizes.push(RING_SIZES[1]);
            }
            for m in sizes {
                let mut held = vec![0u32; n as usize];
                for s in table(&input, m) {
                    held[s.expect("a full ring")] += 1;
                }
                let (lo, hi) = (m / n, m.div_ceil(n));
                assert!(
                    held.iter().all(|&h| h == lo || h == hi),
                    "n={n} M={m}: {held:?}, want {lo} or {hi}"
                );
            }
        }
    }

    fn held(t: &[Option<usize>], n: usize) -> Vec<u64> {
        let mut held = vec![0u64; n];
        for s in t {
            held[s.expect("a full ring")] += 1;
        }
        held
    }

    #[test]
    fn weighted_shares_are_exact_to_one_slot() {
        for weights in [
            vec![300u32, 100],
            vec![1, 2, 3, 4, 5, 6, 7],
            vec![100, 100, 200, 50, 9999],
            vec![u32::MAX; 5],
        ] {
            let input: Vec<_> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| (be(i as u8), w))
                .collect();
            let total: u128 = weights.iter().copied().map(u128::from).sum();
            for m in [RING_SIZE, RING_SIZES[1]] {
                let held = held(&table(&input, m), weights.len());
                for (&h, &w) in held.iter().zip(&weights) {
                    // m * w / total, rounded either way.
                    let exact = u128::from(m) * u128::from(w);
                    assert!(
                        (exact / total..=exact.div_ceil(total)).contains(&u128::from(h)),
                        "weights {weights:?} M={m}: {held:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_weighted_backend_gets_a_slot() {
        for weights in [
            vec![10_000u32, 1],
            vec![u32::MAX, 1, u32::MAX - 1],
            vec![10_000, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        ] {
            let input: Vec<_> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| (be(i as u8), w))
                .collect();
            let held = held(&table(&input, RING_SIZE), weights.len());
            for (&h, &w) in held.iter().zip(&weights) {
                if w < 2 {
                    assert_eq!(h, 1, "weights {weights:?}: {held:?}");
                }
            }
        }
        // More backends than slots: some get none, and nothing breaks.
        let input: Vec<_> = (0..10).map(|i| (be(i), 100)).collect();
        let held = held(&table(&input, 7), input.len());
        assert_eq!(held.iter().filter(|&&h| h == 1).count(), 7, "{held:?}");
    }

    #[test]
    fn weights_set_the_share() {
        for (weights, want) in [
            (vec![300, 100], vec![0.75, 0.25]),
            (vec![1, 3], vec![0.25, 0.75]),
            (vec![100, 100, 200], vec![0.25, 0.25, 0.5]),
            (vec![10000, 1], vec![0.9999, 0.0001]),
        ] {
            let input: Vec<_> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| (be(i as u8), w))
                .collect();
            let got = shares(&table(&input, RING_SIZE), input.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 0.02, "weights {weights:?}: {got:?}");
            }
        }
    }

    #[test]
    fn removing_one_backend_disrupts_little() {
        let input: Vec<_> = (0..10).map(|i| (be(i), 100)).collect();
        let before = table(&input, RING_SIZE);
        let after = table(&input[..9], RING_SIZE);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != Some(9) && b != a)
            .count();
        assert!(
            (moved as f64) < 0.15 * f64::from(RING_SIZE),
            "{moved} slots of surviving backends moved"
        );
        // The removed backend's slots all went somewhere.
        assert!(after.iter().all(Option::is_some));
    }

    #[test]
    fn input_order_does_not_matter() {
        let input: Vec<_> = (0..7).map(|i| (be(i), 50 + u32::from(i) * 10)).collect();
        let mut rev = input.clone();
        rev.reverse();
        let a = table(&input, RING_SIZE);
        let b = table(&rev, RING_SIZE);
        // Indices refer to the caller's slice: map both back to keys.
        let ka: Vec<_> = a.iter().map(|s| s.map(|i| input[i].0)).collect();
        let kb: Vec<_> = b.iter().map(|s| s.map(|i| rev[i].0)).collect();
        assert_eq!(ka, kb);
        assert_eq!(ring_hash(&input, RING_SIZE), ring_hash(&rev, RING_SIZE));
    }

    #[test]
    fn ring_hash_tracks_the_active_set() {
        let base = vec![(be(1), 100), (be(2), 100)];
        let h = ring_hash(&base, RING_SIZE);
        // Zero-weight backends do not change the ring.
        assert_eq!(
            h,
            ring_hash(&[(be(1), 100), (be(2), 100), (be(3), 0)], RING_SIZE)
        );
        assert_ne!(h, ring_hash(&[(be(1), 100), (be(2), 50)], RING_SIZE));
        assert_ne!(h, ring_hash(&[(be(1), 100)], RING_SIZE));
        let v6 = BackendKey {
            addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
            port: 8000,
        };
        assert_ne!(h, ring_hash(&[(be(1), 100), (v6, 100)], RING_SIZE));
        assert_ne!(
            ring_hash(&[], RING_SIZE),
            ring_hash(&[(be(1), 100)], RING_SIZE)
        );
        // The same backends on a ring of another size: another ring.
        assert_ne!(h, ring_hash(&base, RING_SIZES[1]));
    }

    #[test]
    fn ring_size_keeps_enough_slots_per_backend_up_to_the_largest_class() {
        for &m in &RING_SIZES {
            assert!(is_prime(m), "{m}");
        }
        assert_eq!(ring_size(0), RING_SIZES[0]);
        assert_eq!(ring_size(10), RING_SIZES[0]);
        assert_eq!(ring_size(11), RING_SIZES[1]);
        assert_eq!(ring_size(40), RING_SIZES[1]);
        assert_eq!(ring_size(41), RING_SIZES[2]);
        assert_eq!(ring_size(100), RING_SIZES[2]);
        assert_eq!(ring_size(100_000), RING_SIZES[2]);
        assert_eq!(ring_size(usize::MAX), RING_SIZES[2]);
    }

    /// Issue 18's Maglev properties at 100 and 1,000 equal-weight backends
    /// on the ring `ring_size` gives them: every backend holds floor(M/N)
    /// or ceil(M/N) slots, and removing one (any one) or adding one moves
    /// at most 0.5 % of the other flows (10,000 pseudo-random flows, slot
    /// by the data path's `flow_slot`).
    #[test]
    fn large_pools_balance_exactly_and_removal_moves_few_other_flows() {
        use meshlb_common::{hash::flow_slot, FlowKey, FAMILY_V4, PROTO_TCP};
        let key = |i: u32| BackendKey {
            addr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
            port: 8000,
        };
        let flows: Vec<FlowKey> = (0..10_000u32)
            .map(|i| {
                let x = i.wrapping_mul(2_654_435_761);
                let mut src = [0u8; 16];
                src[..4].copy_from_slice(&(0x0b00_0000 | (x >> 8)).to_be_bytes());
                FlowKey {
                    src,
                    sport: ((x & 0xffff) as u16 | 1024).to_be(),
                    dport: 80u16.to_be(),
                    proto: PROTO_TCP,
                    family: FAMILY_V4,
                    ..Default::default()
                }
            })
            .collect();
        // Issue 18 asks for at most 0.5 % of the other flows. Measured here
        // (version 2), removing backend 0, n/2, n-1 / adding one:
        // n=100, M=65537: 0.39, 0.31, 0.30 / 0.31 %;
        // n=1000, M=65537: 0.32, 0.35, 0.27 / 0.32 %.
        // Over all slots rather than these flows, 0.30 to 0.37 % for any
        // removed backend: the margin is not this sample's luck.
        // (Version 1, classic Maglev, removing backend 0: 1.17 % at n=100
        // on the 16,381 slots it had then, 0.43 % at n=1000.)
        let moved_share = |before: &[Option<usize>],
                           from: &[(BackendKey, u32)],
                           after: &[Option<usize>],
                           to: &[(BackendKey, u32)],
                           changed: BackendKey| {
            let (mut others, mut moved) = (0u32, 0u32);
            for f in &flows {
                let slot = flow_slot(f, before.len() as u32) as usize;
                let b = from[before[slot].expect("a full ring")].0;
                let a = to[after[slot].expect("a full ring")].0;
                // Flows of a removed backend must move, and an added one
                // must take some: count the others.
                if b == changed || a == changed {
                    continue;
                }
                others += 1;
                if a != b {
                    moved += 1;
                }
            }
            f64::from(moved) / f64::from(others)
        };
        for n in [100u32, 1000] {
            let m = ring_size(n as usize);
            let input: Vec<_> = (0..n).map(|i| (key(i), 100)).collect();
            let before = table(&input, m);
            let mut held = vec![0u32; n as usize];
            for s in before.iter().flatten() {
                held[*s] += 1;
            }
            let (lo, hi) = (m / n, m.div_ceil(n));
            assert!(
                held.iter().all(|&h| h == lo || h == hi),
                "n={n} M={m}: slots per backend {:?}..{:?}, want {lo} or {hi}",
                held.iter().min(),
                held.iter().max()
            );
            for gone in [0, n / 2, n - 1] {
                let rest: Vec<_> = input
                    .iter()
                    .copied()
                    .filter(|(k, _)| *k != key(gone))
                    .collect();
                assert_eq!(ring_size(rest.len()), m, "the ring keeps its size");
                let share = moved_share(&before, &input, &table(&rest, m), &rest, key(gone));
                eprintln!(
                    "n={n} M={m}: removing backend {gone} moved {:.3} % of the other flows",
                    share * 100.0
                );
                assert!(share <= 0.005, "n={n} M={m}: removing {gone}: {share}");
            }
            let mut more = input.clone();
            more.push((key(n), 100));
            assert_eq!(ring_size(more.len()), m, "the ring keeps its size");
            let share = moved_share(&before, &input, &table(&more, m), &more, key(n));
            eprintln!(
                "n={n} M={m}: adding a backend moved {:.3} % of the other flows",
                share * 100.0
            );
            assert!(share <= 0.005, "n={n} M={m}: adding one: {share}");
        }
    }

    #[test]
    #[should_panic(expected = "not prime")]
    fn non_prime_size_is_refused() {
        table(&[(be(1), 1)], 4096);
    }
}
