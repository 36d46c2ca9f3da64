//! Typed handles on the data plane's BPF maps, opened either from a freshly
//! loaded object (the daemon) or from their pins under `--bpffs` (`status`,
//! `explain`, and anything else that must work while the daemon is down).

use std::path::{Path, PathBuf};

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use aya::maps::{
    Array, ArrayOfMaps, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, PerCpuValues,
};
use aya::Ebpf;
use meshlb_common::{
    maps, AddrKey, AffinityEntry, AffinityKey, Backend, CtEntry, FlowConfig, FlowKey, FrontendKey,
    FrontendValue, IfAddrKey, NextHop, NodeMeta, RateWindow, RnatEntry, ServiceInfo, ServiceName,
    SnatAddr, SnatEntry, SockRevKey, SockRevValue, Stats,
};

/// `CLOCK_MONOTONIC` in nanoseconds: the data path's `bpf_ktime_get_ns`
/// (and, coarse, `bpf_ktime_get_coarse_ns`).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// Errors opening or using the pinned maps.
#[derive(Debug, thiserror::Error)]
pub enum PinnedError {
    #[error(
        "map {name}: not pinned under {dir} (is `meshlb run --bpffs {dir}` programming this node?)"
    )]
    NotPinned { name: &'static str, dir: PathBuf },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {name}: missing from the eBPF object")]
    Missing { name: &'static str },
    #[error("cpu count: {0}")]
    Cpus(String),
    #[error("ring of service {id}: {msg}")]
    Ring { id: u32, msg: String },
}

/// One service's Maglev ring as the kernel holds it (see `maps::RINGS`).
pub type Ring = Array<MapData, u32>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> PinnedError {
    move |source| PinnedError::Map { name, source }
}

/// Every map of the data plane, typed.
pub struct Maps {
    pub frontends: HashMap<MapData, FrontendKey, FrontendValue>,
    pub local_addrs: HashMap<MapData, AddrKey, u32>,
    pub services: Array<MapData, ServiceInfo>,
    pub service_names: Array<MapData, ServiceName>,
    /// Service id -> its Maglev ring (`install_rings`, `ring`).
    pub rings: ArrayOfMaps<MapData, Ring>,
    /// `rings`' descriptor, for the one command aya lacks (batch update).
    rings_fd: OwnedFd,
    /// Descriptors of the maps read or written in batches (aya has no
    /// batch operations).
    whole: WholeMaps,
    /// The rings this handle wrote (`set_rings`).
    ring_states: std::collections::BTreeMap<u32, RingState>,
    /// How they were written.
    pub ring_stats: RingStats,
    pub backends: Array<MapData, Backend>,
    pub conntrack: HashMap<MapData, FlowKey, CtEntry>,
    pub reverse_nat: HashMap<MapData, FlowKey, RnatEntry>,
    pub backend_stats: PerCpuArray<MapData, Stats>,
    pub service_stats: PerCpuArray<MapData, Stats>,
    pub counters: PerCpuArray<MapData, u64>,
    pub meta: Array<MapData, NodeMeta>,
    pub snat: HashMap<MapData, FlowKey, SnatEntry>,
    pub snat_addrs: Array<MapData, SnatAddr>,
    pub ifaces: HashMap<MapData, u32, u32>,
    pub service_affinity: Array<MapData, u32>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub iface_addrs: HashMap<MapData, IfAddrKey, [u8; 16]>,
    /// VIP -> how many frontends use it.
    pub vips: HashMap<MapData, AddrKey, u32>,
    /// 0 -> the flow timeouts.
    pub flow_config: Array<MapData, FlowConfig>,
    /// Flows not yet established (`conntrack` once they are).
    pub conntrack_embryonic: HashMap<MapData, FlowKey, CtEntry>,
    /// Reply entries of embryonic local flows.
    pub reverse_nat_embryonic: HashMap<MapData, FlowKey, RnatEntry>,
    /// New flows in the current second, per CPU.
    pub new_flow_rate: PerCpuArray<MapData, RateWindow>,
    /// Backend id -> its cached next hop (written by the data path).
    pub next_hops: Array<MapData, NextHop>,
    /// 0 -> the next-hop generation (`bump_next_hop_gen`).
    pub next_hop_gen: Array<MapData, u32>,
    /// Network-namespace cookie -> 1: whose sockets the socket-level
    /// balancer serves.
    pub sock_netns: HashMap<MapData, u64, u32>,
    /// (socket cookie, backend) -> the frontend it asked for.
    pub sock_rev: HashMap<MapData, SockRevKey, SockRevValue>,
    /// ifindex -> the uplink's MAC (and 2 zero bytes): flow openers for
    /// another MAC are left to the kernel.
    pub iface_macs: HashMap<MapData, u32, [u8; 8]>,
}

impl Maps {
    /// Opens the maps pinned under `dir`.
    pub fn from_pins(dir: &Path) -> Result<Maps, PinnedError> {
        Self::build(|name| {
            let path = dir.join(name);
            if !path.exists() {
                return Err(PinnedError::NotPinned {
                    name,
                    dir: dir.to_owned(),
                });
            }
            let data = MapData::from_pin(&path).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        })
    }

    /// Takes the maps out of a loaded object (they are pinned by the loader).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Maps, PinnedError> {
        Self::build(|name| ebpf.take_map(name).ok_or(PinnedError::Missing { name }))
    }

    fn build(
        mut take: impl FnMut(&'static str) -> Result<Map, PinnedError>,
    ) -> Result<Maps, PinnedError> {
        macro_rules! typed {
            ($name:expr) => {
                take($name)?.try_into().map_err(map_err($name))?
            };
        }
        let mut whole_fd = |name: &'static str| -> Result<(Map, OwnedFd), PinnedError> {
            let m = take(name)?;
            let fd = match &m {
                Map::Array(d) | Map::PerCpuArray(d) | Map::HashMap(d) => {
                    d.fd().as_fd().try_clone_to_owned()
                }
                _ => Err(std::io::Error::other("not an array or hash")),
            }
            .map_err(|e| PinnedError::Map {
                name,
                source: MapError::IoError(e),
            })?;
            Ok((m, fd))
        };
        let (services, services_fd) = whole_fd(maps::SERVICES)?;
        let (service_names, names_fd) = whole_fd(maps::SERVICE_NAMES)?;
        let (backends, backends_fd) = whole_fd(maps::BACKENDS)?;
        let (service_affinity, affinity_fd) = whole_fd(maps::SERVICE_AFFINITY)?;
        let (backend_stats, backend_stats_fd) = whole_fd(maps::BACKEND_STATS)?;
        let (service_stats, service_stats_fd) = whole_fd(maps::SERVICE_STATS)?;
        let (frontends, frontends_fd) = whole_fd(maps::FRONTENDS)?;
        let rings = take(maps::RINGS)?;
        let rings_fd = match &rings {
            Map::ArrayOfMaps(d) => d.fd().as_fd().try_clone_to_owned(),
            _ => Err(std::io::Error::other("not an array of maps")),
        }
        .map_err(|e| PinnedError::Map {
            name: maps::RINGS,
            source: MapError::IoError(e),
        })?;
        Ok(Maps {
            frontends: frontends.try_into().map_err(map_err(maps::FRONTENDS))?,
            local_addrs: typed!(maps::LOCAL_ADDRS),
            services: services.try_into().map_err(map_err(maps::SERVICES))?,
            service_names: service_names
                .try_into()
                .map_err(map_err(maps::SERVICE_NAMES))?,
            rings_fd,
            whole: WholeMaps {
                services: services_fd,
                service_names: names_fd,
                backends: backends_fd,
                service_affinity: affinity_fd,
                backend_stats: backend_stats_fd,
                service_stats: service_stats_fd,
                frontends: frontends_fd,
            },
            rings: rings.try_into().map_err(map_err(maps::RINGS))?,
            ring_states: Default::default(),
            ring_stats: RingStats::default(),
            backends: backends.try_into().map_err(map_err(maps::BACKENDS))?,
            conntrack: typed!(maps::CONNTRACK),
            reverse_nat: typed!(maps::REVERSE_NAT),
            backend_stats: backend_stats
                .try_into()
                .map_err(map_err(maps::BACKEND_STATS))?,
            service_stats: service_stats
                .try_into()
                .map_err(map_err(maps::SERVICE_STATS))?,
            counters: typed!(maps::COUNTERS),
            meta: typed!(maps::META),
            snat: typed!(maps::SNAT),
            snat_addrs: typed!(maps::SNAT_ADDRS),
            ifaces: typed!(maps::IFACES),
            service_affinity: service_affinity
                .try_into()
                .map_err(map_err(maps::SERVICE_AFFINITY))?,
            affinity: typed!(maps::AFFINITY),
            iface_addrs: typed!(maps::IFACE_ADDRS),
            vips: typed!(maps::VIPS),
            flow_config: typed!(maps::FLOW_CONFIG),
            conntrack_embryonic: typed!(maps::CONNTRACK_EMBRYONIC),
            reverse_nat_embryonic: typed!(maps::REVERSE_NAT_EMBRYONIC),
            new_flow_rate: typed!(maps::NEW_FLOW_RATE),
            next_hops: typed!(maps::NEXT_HOPS),
            next_hop_gen: typed!(maps::NEXT_HOP_GEN),
            sock_netns: typed!(maps::SOCK_NETNS),
            sock_rev: typed!(maps::SOCK_REV),
            iface_macs: typed!(maps::IFACE_MACS),
        })
    }

    /// Every service entry, by id.
    pub fn all_services(&self) -> Result<Vec<ServiceInfo>, PinnedError> {
        read_array(&self.services, &self.whole.services, maps::SERVICES)
    }

    /// Every service name entry, by id.
    pub fn all_service_names(&self) -> Result<Vec<ServiceName>, PinnedError> {
        read_array(
            &self.service_names,
            &self.whole.service_names,
            maps::SERVICE_NAMES,
        )
    }

    /// Every backend entry, by id.
    pub fn all_backends(&self) -> Result<Vec<Backend>, PinnedError> {
        read_array(&self.backends, &self.whole.backends, maps::BACKENDS)
    }

    /// Every service's affinity timeout, by id.
    pub fn all_service_affinity(&self) -> Result<Vec<u32>, PinnedError> {
        read_array(
            &self.service_affinity,
            &self.whole.service_affinity,
            maps::SERVICE_AFFINITY,
        )
    }

    /// Sum of a per-CPU stats slot over all CPUs.
    pub fn sum_stats(arr: &PerCpuArray<MapData, Stats>, index: u32) -> Stats {
        let mut total = Stats::default();
        if let Ok(values) = arr.get(&index, 0) {
            for v in values.iter() {
                total.add(v);
            }
        }
        total
    }

    /// Zeroes a per-CPU stats slot (a reused id starts from zero).
    pub fn zero_stats(
        arr: &mut PerCpuArray<MapData, Stats>,
        index: u32,
        name: &'static str,
    ) -> Result<(), PinnedError> {
        let n = aya::util::nr_cpus().map_err(|(m, e)| PinnedError::Cpus(format!("{m}: {e}")))?;
        let zeros =
            PerCpuValues::try_from(vec![Stats::default(); n]).map_err(|e| PinnedError::Map {
                name,
                source: MapError::IoError(e),
            })?;
        arr.set(index, zeros, 0).map_err(map_err(name))
    }

    /// Zeroes the per-CPU stats slots `ids` of `arr` (`fd`, `name`): in
    /// batch updates, where the kernel has them.
    fn zero_stats_all(
        arr: &mut PerCpuArray<MapData, Stats>,
        fd: &OwnedFd,
        ids: &[u32],
        name: &'static str,
    ) -> Result<(), PinnedError> {
        let n = aya::util::nr_cpus().map_err(|(m, e)| PinnedError::Cpus(format!("{m}: {e}")))?;
        // A `Stats` is a multiple of 8 bytes: its per-CPU values lie
        // packed, as the kernel lays them out.
        const _: () = assert!(std::mem::size_of::<Stats>().is_multiple_of(8));
        let zeros = vec![Stats::default(); ids.len().min(WRITE_BATCH) * n];
        for chunk in ids.chunks(WRITE_BATCH) {
            match crate::kernel::bpfsys::update_batch(
                fd.as_fd(),
                chunk,
                &zeros[..chunk.len() * n],
                n,
            ) {
                Ok(()) => {}
                Err(e) if crate::kernel::bpfsys::unsupported(&e) => {
                    for id in chunk {
                        Self::zero_stats(arr, *id, name)?;
                    }
                }
                Err(e) => {
                    return Err(PinnedError::Map {
                        name,
                        source: MapError::IoError(e),
                    })
                }
            }
        }
        Ok(())
    }

    /// Zeroes the traffic counters of backends `ids` (fresh ones).
    pub fn zero_backend_stats(&mut self, ids: &[u32]) -> Result<(), PinnedError> {
        Self::zero_stats_all(
            &mut self.backend_stats,
            &self.whole.backend_stats,
            ids,
            maps::BACKEND_STATS,
        )
    }

    /// Zeroes the traffic counters of services `ids` (fresh ones).
    pub fn zero_service_stats(&mut self, ids: &[u32]) -> Result<(), PinnedError> {
        Self::zero_stats_all(
            &mut self.service_stats,
            &self.whole.service_stats,
            ids,
            maps::SERVICE_STATS,
        )
    }

    /// Writes backend slots, in order.
    pub fn set_backends(&mut self, items: &[(u32, Backend)]) -> Result<(), PinnedError> {
        let arr = &mut self.backends;
        write_batched(&self.whole.backends, maps::BACKENDS, items, |k, v| {
            arr.set(*k, v, 0)
        })
    }

    /// Writes service slots, in order.
    pub fn set_services(&mut self, items: &[(u32, ServiceInfo)]) -> Result<(), PinnedError> {
        let arr = &mut self.services;
        write_batched(&self.whole.services, maps::SERVICES, items, |k, v| {
            arr.set(*k, v, 0)
        })
    }

    /// Writes service names, in order.
    pub fn set_service_names(&mut self, items: &[(u32, ServiceName)]) -> Result<(), PinnedError> {
        let arr = &mut self.service_names;
        write_batched(
            &self.whole.service_names,
            maps::SERVICE_NAMES,
            items,
            |k, v| arr.set(*k, v, 0),
        )
    }

    /// Writes services' affinity timeouts, in order.
    pub fn set_service_affinity(&mut self, items: &[(u32, u32)]) -> Result<(), PinnedError> {
        let arr = &mut self.service_affinity;
        write_batched(
            &self.whole.service_affinity,
            maps::SERVICE_AFFINITY,
            items,
            |k, v| arr.set(*k, v, 0),
        )
    }

    /// Inserts or replaces frontends, in order.
    pub fn set_frontends(
        &mut self,
        items: &[(FrontendKey, FrontendValue)],
    ) -> Result<(), PinnedError> {
        let map = &mut self.frontends;
        write_batched(&self.whole.frontends, maps::FRONTENDS, items, |k, v| {
            map.insert(k, v, 0)
        })
    }

    /// Makes each service's ring (service id, a backend id or
    /// `NO_BACKEND` per slot, the length a `RING_SIZES` class; empty: the
    /// service is gone) hold its slots; a packet sees a service's old ring
    /// or its new one, never a mix (see `maps::RINGS`).
    ///
    /// A ring this handle wrote before, of the same size, is rewritten in
    /// place: its inactive half filled through mmap, then made active by
    /// one store, no wait. That half must be unused by any program: if it
    /// was active since the last wait for running programs, one such wait
    /// (an RCU grace period, milliseconds) comes first, one for the whole
    /// call. Any other ring is a new inner map, filled the same way and
    /// swapped in by one update of `RINGS`; the new ones of a call go in
    /// one batch update, which waits once. The kernel frees a replaced
    /// ring once no program holds it.
    pub fn set_rings(&mut self, rings: &[(u32, &[u32])]) -> Result<(), PinnedError> {
        let (flip, fresh): (Vec<_>, Vec<_>) = rings.iter().partition(|(id, slots)| {
            !slots.is_empty()
                && self
                    .ring_states
                    .get(id)
                    .is_some_and(|st| st.m as usize == slots.len())
        });
        if !fresh.is_empty() {
            let made = fresh
                .iter()
                .map(|(id, slots)| Ok((*id, new_ring(*id, slots)?)))
                .collect::<Result<Vec<_>, PinnedError>>()?;
            self.install(&made)?;
            for ((id, ring), (_, slots)) in made.into_iter().zip(&fresh) {
                if slots.is_empty() {
                    self.ring_states.remove(&id);
                    continue;
                }
                // Its descriptor, not aya's handle (a tenth of the size,
                // once per service).
                let fd = ring.map().fd().as_fd().try_clone_to_owned().map_err(|e| {
                    PinnedError::Ring {
                        id,
                        msg: format!("dup: {e}"),
                    }
                })?;
                self.ring_states.insert(
                    id,
                    RingState {
                        fd,
                        m: slots.len() as u32,
                        last_flip: None,
                    },
                );
            }
        }
        let barriers = self.ring_stats.barriers;
        let busy = flip.iter().find(|(id, _)| {
            self.ring_states[id]
                .last_flip
                .is_some_and(|f| f >= barriers)
        });
        if let Some((id, _)) = busy {
            // Re-installing a ring as it is: the kernel waits for the
            // programs running meanwhile.
            let st = &self.ring_states[id];
            crate::kernel::bpfsys::update_elem(
                self.rings_fd.as_fd(),
                id,
                &(st.fd.as_raw_fd() as u32),
            )
            .map_err(|e| PinnedError::Map {
                name: maps::RINGS,
                source: MapError::IoError(e),
            })?;
            self.ring_stats.barriers += 1;
        }
        for (id, slots) in flip {
            let st = self.ring_states.get_mut(&id).ok_or(PinnedError::Ring {
                id,
                msg: "no state".into(),
            })?;
            crate::kernel::bpfsys::flip_ring(st.fd.as_fd(), slots).map_err(|e| {
                PinnedError::Ring {
                    id,
                    msg: format!("flip: {e}"),
                }
            })?;
            st.last_flip = Some(self.ring_stats.barriers);
            self.ring_stats.flipped += 1;
        }
        Ok(())
    }

    /// Puts new rings in place, in one batch update of `RINGS` (one wait
    /// for running programs); one update each where the kernel has no
    /// batch update for arrays of maps.
    fn install(&mut self, rings: &[(u32, Ring)]) -> Result<(), PinnedError> {
        if rings.is_empty() {
            return Ok(());
        }
        let keys: Vec<u32> = rings.iter().map(|(id, _)| *id).collect();
        let fds: Vec<u32> = rings
            .iter()
            .map(|(_, r)| r.map().fd().as_fd().as_raw_fd() as u32)
            .collect();
        match crate::kernel::bpfsys::update_batch(self.rings_fd.as_fd(), &keys, &fds, 1) {
            Ok(()) => {}
            Err(e) if crate::kernel::bpfsys::unsupported(&e) => {
                for (id, ring) in rings {
                    self.rings.set(*id, ring, 0).map_err(map_err(maps::RINGS))?;
                }
            }
            Err(e) => {
                return Err(PinnedError::Map {
                    name: maps::RINGS,
                    source: MapError::IoError(e),
                })
            }
        }
        self.ring_stats.created += rings.len() as u64;
        self.ring_stats.barriers += 1;
        Ok(())
    }

    /// Replaces service `id`'s ring (`set_rings`).
    pub fn swap_ring(&mut self, id: u32, ring: &[u32]) -> Result<(), PinnedError> {
        self.set_rings(&[(id, ring)])
    }

    /// Service `id`'s ring as its slots (backend ids) in the active half,
    /// `None` without one: one consistent ring, read again if it flipped
    /// meanwhile.
    pub fn ring(&self, id: u32) -> Result<Option<Vec<u32>>, PinnedError> {
        let Some(ring) = self.ring_handle(id)? else {
            return Ok(None);
        };
        read_consistent(&ring, id, |ring, m, base| {
            (0..m).map(|i| ring_get(ring, id, base + i)).collect()
        })
        .map(Some)
    }

    /// The slot of flow `key` on service `id`'s ring and the backend id in
    /// it, as the data path picks them; `None` without a ring.
    pub fn ring_pick(&self, id: u32, key: &FlowKey) -> Result<Option<(u32, u32)>, PinnedError> {
        let Some(ring) = self.ring_handle(id)? else {
            return Ok(None);
        };
        read_consistent(&ring, id, |ring, m, base| {
            if m == 0 {
                return Ok(None);
            }
            let slot = meshlb_common::hash::flow_slot(key, m);
            Ok(Some((slot, ring_get(ring, id, base + slot)?)))
        })
    }

    /// `n` slots of service `id`'s ring of M slots, from the one
    /// `first(M)` picks on (wrapping), each with its backend id: as the
    /// socket-level balancer tries them. Empty without a ring.
    pub fn ring_run(
        &self,
        id: u32,
        n: u32,
        first: impl Fn(u32) -> u32,
    ) -> Result<Vec<(u32, u32)>, PinnedError> {
        let Some(ring) = self.ring_handle(id)? else {
            return Ok(Vec::new());
        };
        read_consistent(&ring, id, |ring, m, base| {
            if m == 0 {
                return Ok(Vec::new());
            }
            let start = first(m);
            (0..n)
                .map(|i| {
                    let slot = (start + i) % m;
                    Ok((slot, ring_get(ring, id, base + slot)?))
                })
                .collect()
        })
    }

    /// Whether service `id` has a ring.
    pub fn has_ring(&self, id: u32) -> bool {
        matches!(self.ring_handle(id), Ok(Some(_)))
    }

    fn ring_handle(&self, id: u32) -> Result<Option<Ring>, PinnedError> {
        match self.rings.get(&id, 0) {
            Ok(r) => Ok(Some(r)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(maps::RINGS)(e)),
        }
    }

    /// Makes every cached next hop stale (`bump_next_hop_gen`).
    pub fn bump_next_hop_gen(&mut self) -> Result<(), PinnedError> {
        bump_next_hop_gen(&mut self.next_hop_gen)
    }

    /// Global counters summed over CPUs, by `Counter` index.
    pub fn counters(&self) -> Vec<u64> {
        (0..meshlb_common::COUNTER_COUNT)
            .map(|i| self.counters.get(&i, 0).map_or(0, |v| v.iter().sum()))
            .collect()
    }
}

/// Makes every cached next hop stale (`maps::NEXT_HOP_GEN`): the data
/// path asks the FIB again for each backend's next packet. For a
/// neighbour, route or link change, and for changed interface flags.
/// Only the daemon writes the generation.
pub fn bump_next_hop_gen(generation: &mut Array<MapData, u32>) -> Result<(), PinnedError> {
    let name = maps::NEXT_HOP_GEN;
    let cur = generation.get(&0, 0).map_err(map_err(name))?;
    generation
        .set(0, cur.wrapping_add(1), 0)
        .map_err(map_err(name))
}

/// The next-hop generation map pinned under `dir`, on its own (for the
/// daemon's task that follows rtnetlink).
pub fn next_hop_gen(dir: &Path) -> Result<Array<MapData, u32>, PinnedError> {
    let name = maps::NEXT_HOP_GEN;
    let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
    Array::try_from(Map::Array(data)).map_err(map_err(name))
}

/// Descriptors of the maps `Maps` reads whole or writes in batches.
struct WholeMaps {
    services: OwnedFd,
    service_names: OwnedFd,
    backends: OwnedFd,
    service_affinity: OwnedFd,
    backend_stats: OwnedFd,
    service_stats: OwnedFd,
    frontends: OwnedFd,
}

/// Entries per batch update: a bounded buffer whatever the plan's size.
const WRITE_BATCH: usize = 4096;

/// Writes `items` (key, value) into the map behind `fd` (`name`), in
/// batch updates, in order; one update each (`one`) where the kernel has
/// no batch update for the map.
fn write_batched<K: aya::Pod + std::fmt::Debug, V: aya::Pod>(
    fd: &OwnedFd,
    name: &'static str,
    items: &[(K, V)],
    mut one: impl FnMut(&K, V) -> Result<(), MapError>,
) -> Result<(), PinnedError> {
    let mut batched = true;
    for chunk in items.chunks(WRITE_BATCH) {
        if batched {
            let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
            let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
            match crate::kernel::bpfsys::update_batch(fd.as_fd(), &keys, &values, 1) {
                Ok(()) => continue,
                Err(e) if crate::kernel::bpfsys::unsupported(&e) => batched = false,
                Err(e) => {
                    return Err(PinnedError::Map {
                        name,
                        source: MapError::IoError(e),
                    })
                }
            }
        }
        for (k, v) in chunk {
            one(k, *v).map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// Every value of `array` in index order: one batch read where the kernel
/// has it, else slot by slot.
fn read_array<V: aya::Pod>(
    array: &Array<MapData, V>,
    fd: &OwnedFd,
    name: &'static str,
) -> Result<Vec<V>, PinnedError> {
    let len = array.len();
    match crate::kernel::bpfsys::lookup_array::<V>(fd.as_fd(), len) {
        Ok(v) => Ok(v),
        Err(e) if crate::kernel::bpfsys::unsupported(&e) => (0..len)
            .map(|i| array.get(&i, 0).map_err(map_err(name)))
            .collect(),
        Err(e) => Err(PinnedError::Map {
            name,
            source: MapError::IoError(e),
        }),
    }
}

/// What a `Maps` handle wrote into a ring, so it may rewrite it in place.
struct RingState {
    fd: OwnedFd,
    /// Its size (fixed for an inner map).
    m: u32,
    /// `RingStats::barriers` when its active half last changed: the other
    /// half may be written once a wait for running programs came after.
    last_flip: Option<u64>,
}

/// How the rings written through a handle were written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// New inner maps swapped in.
    pub created: u64,
    /// Rings rewritten in place (half flipped).
    pub flipped: u64,
    /// Waits for running programs (batch installs and barriers).
    pub barriers: u64,
}

/// A new inner ring holding `slots` in half 0, not in place yet.
fn new_ring(id: u32, slots: &[u32]) -> Result<Ring, PinnedError> {
    let ring_err = |msg: String| PinnedError::Ring { id, msg };
    let m = u32::try_from(slots.len()).map_err(|_| ring_err("too long".into()))?;
    let new = Ring::create(2 + 2 * m, meshlb_common::RING_MAP_FLAGS)
        .map_err(|e| ring_err(format!("create: {e}")))?;
    crate::kernel::bpfsys::fill_ring(new.map().fd().as_fd(), m, slots)
        .map_err(|e| ring_err(format!("fill: {e}")))?;
    Ok(new)
}

fn ring_m(ring: &Ring, id: u32) -> Result<u32, PinnedError> {
    Ok(ring_get(ring, id, 0)? & !meshlb_common::RING_HALF)
}

/// Runs `read` (given the ring, its size and where its active half
/// starts) until the ring did not flip meanwhile: the flip count and
/// header read before and after agree. Gives up after 100 tries.
fn read_consistent<T>(
    ring: &Ring,
    id: u32,
    read: impl Fn(&Ring, u32, u32) -> Result<T, PinnedError>,
) -> Result<T, PinnedError> {
    let m = ring_m(ring, id)?;
    for _ in 0..100 {
        let flips = ring_get(ring, id, 1 + 2 * m)?;
        let header = ring_get(ring, id, 0)?;
        let base = if header & meshlb_common::RING_HALF != 0 {
            1 + m
        } else {
            1
        };
        let value = read(ring, m, base)?;
        if ring_get(ring, id, 1 + 2 * m)? == flips && ring_get(ring, id, 0)? == header {
            return Ok(value);
        }
    }
    Err(PinnedError::Ring {
        id,
        msg: "rewritten during every one of 100 reads".into(),
    })
}

fn ring_get(ring: &Ring, id: u32, index: u32) -> Result<u32, PinnedError> {
    ring.get(&index, 0).map_err(|e| PinnedError::Ring {
        id,
        msg: format!("entry {index}: {e}"),
    })
}

/// An address in the maps' layout: 16 network-order bytes + family.
pub fn addr_bytes(addr: std::net::IpAddr) -> ([u8; 16], u8) {
    let mut b = [0u8; 16];
    match addr {
        std::net::IpAddr::V4(a) => {
            b[..4].copy_from_slice(&a.octets());
            (b, meshlb_common::FAMILY_V4)
        }
        std::net::IpAddr::V6(a) => (a.octets(), meshlb_common::FAMILY_V6),
    }
}

/// The address stored in the maps' layout, if the family is known.
pub fn addr_from(b: &[u8; 16], family: u8) -> Option<std::net::IpAddr> {
    match family {
        meshlb_common::FAMILY_V4 => Some(std::net::IpAddr::from([b[0], b[1], b[2], b[3]])),
        meshlb_common::FAMILY_V6 => Some(std::net::IpAddr::from(*b)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_map_layout() {
        for a in ["10.1.2.3", "fd00::1", "0.0.0.0", "::ffff:1.2.3.4"] {
            let ip: std::net::IpAddr = a.parse().unwrap();
            let (b, f) = addr_bytes(ip);
            assert_eq!(addr_from(&b, f), Some(ip), "{a}");
        }
        assert_eq!(addr_from(&[0; 16], 9), None);
    }
}
