//! The IPVS engine. `table` is its pure half: the IPVS table a node should hold for a
//! [`DesiredState`] (one virtual service per frontend address, node ports
//! on every node address; one masquerading destination per backend,
//! weight 0 for a backend that takes no new flows), and the ordered
//! changes that turn the kernel's table into it. A sync is a diff, never a
//! flush: unchanged services and destinations, and so their connections,
//! are not touched. Only services this node created (its owned set) are
//! ever changed or deleted: a virtual service another tool (ipvsadm,
//! keepalived, kube-proxy) holds at an address, port and protocol meshlb
//! wants is a conflict — that one frontend is skipped, the foreign
//! service and its destinations are left exactly as they are, and it
//! never enters the owned set ([`conflicts`], [`diff`], [`owned_after`]).
//!
//! [`IpvsEngine`] (here) is the IO half and the daemon's [`Engine`] in IPVS mode:
//! it dumps the kernel's table, applies the diff, and remembers (in a
//! state file, replaced atomically) which services it created, so a
//! restarted daemon adopts them — connections and all — and can still
//! delete the ones no longer wanted; it logs a conflict once when it
//! appears and once when it goes; it keeps the VIPs on a dummy device and
//! the remote backends in meshlb's nf_tables masquerade set
//! (`crate::kernel::nft`), and serves `/metrics` from the kernel's IPVS counters
//! ([`IpvsView`]). The host kernel of this project's CI has no IPVS: the
//! engine is exercised in the vm/ guests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

mod cleanup;
mod table;
mod view;

use super::{BackendOf, DataplaneError, DataplaneKind, Engine, ServiceConfigs};
use crate::control::nodenet::NodeNet;
use crate::kernel::ipvs::{Ipvs, IpvsError, Service, ServiceId};
use crate::kernel::nft::Masquerade;
use crate::model::{DesiredState, ServiceKey};
use view::{format_owned, parse_owned};

pub use cleanup::{cleanup, Cleaned};
pub use table::*;
pub use view::{status_from_state, IpvsView, IPVS_LOCAL_CLIENTS};

/// Where the IPVS engine remembers which services it created
/// (`<node>.ipvs`; kept across daemon restarts, the unit's
/// `RuntimeDirectory`).
pub const STATE_DIR: &str = "/run/meshlb";
/// Name of the dummy device holding the VIPs in IPVS mode.
pub const VIP_DEVICE: &str = "meshlb0";

/// The IPVS engine of `meshlb run --dataplane ipvs`.
pub struct IpvsEngine {
    ipvs: Ipvs,
    /// Services this node created (persisted in `state_file`): the only
    /// ones it ever changes or deletes.
    owned: BTreeSet<ServiceId>,
    state_file: PathBuf,
    /// Wanted services another tool holds (with the meshlb service each
    /// would implement), as of the last sync: logged when they change.
    conflicts: BTreeMap<ServiceId, String>,
    /// The dummy device holding the VIPs.
    vip_device: String,
    /// SNAT of flows to remote backends (nf_tables).
    masq: Masquerade,
    /// Names and states for `/metrics`, as of the last sync.
    view: IpvsView,
    /// The kernel's table as `held_down` read it, for the `sync` that
    /// follows it in the same round.
    last_dump: Option<Table>,
}

impl IpvsEngine {
    /// Connects to IPVS and reads which services an earlier daemon created
    /// (none without a state file). An unreadable state file is an error:
    /// guessing would either adopt another tool's services or abandon
    /// meshlb's own.
    pub async fn open(state_file: PathBuf, vip_device: &str) -> Result<IpvsEngine, IpvsError> {
        let ipvs = Ipvs::open().await?;
        let owned = match std::fs::read_to_string(&state_file) {
            Ok(t) => parse_owned(&t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(source) => {
                return Err(IpvsError::StateFile {
                    path: state_file.display().to_string(),
                    source,
                })
            }
        };
        Ok(IpvsEngine {
            ipvs,
            owned,
            state_file,
            conflicts: BTreeMap::new(),
            vip_device: vip_device.to_owned(),
            masq: Masquerade::new(),
            view: IpvsView::default(),
            last_dump: None,
        })
    }

    /// Makes the kernel's table (`have`) into `want`, another tool's
    /// services aside; returns the number of changes. A service is
    /// recorded as owned (and saved) as soon as it is created, so a crash
    /// mid-sync never forgets one.
    async fn apply_table(&mut self, want: &Table, have: &Table) -> Result<usize, IpvsError> {
        let changes = diff(want, have, &self.owned);
        for c in &changes {
            match c {
                Change::AddService(s) => self.ipvs.new_service(s).await?,
                Change::SetService(s) => self.ipvs.set_service(s).await?,
                Change::AddDest(id, d) => self.ipvs.new_dest(id, d).await?,
                Change::SetDest(id, d) => self.ipvs.set_dest(id, d).await?,
                Change::DelDest(id, d) => self.ipvs.del_dest(id, d).await?,
                Change::DelService(id) => self.ipvs.del_service(id).await?,
            }
            if let Change::AddService(s) = c {
                self.owned.insert(s.id);
                self.save();
            }
        }
        self.owned = owned_after(want, have, &self.owned);
        self.save();
        Ok(changes.len())
    }

    /// Writes the owned set to the state file, atomically.
    fn save(&self) {
        if let Some(d) = self.state_file.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        if let Err(e) = crate::kernel::pinlock::write_atomic(
            &self.state_file,
            format_owned(&self.owned).as_bytes(),
        ) {
            log::warn!("ipvs state {}: {e}", self.state_file.display());
        }
    }

    /// Logs the conflicts with other tools' services that appeared (one
    /// warning each) and went away since the last sync, then remembers
    /// `now`: a standing conflict is not repeated at every sync.
    fn note_conflicts(&mut self, now: BTreeMap<ServiceId, String>) {
        for (id, name) in &now {
            if !self.conflicts.contains_key(id) {
                log::warn!(
                    "service {name}: IPVS virtual service {} belongs to another tool (not created by meshlb): frontend skipped, left untouched",
                    endpoint(id)
                );
            }
        }
        for (id, name) in &self.conflicts {
            if !now.contains_key(id) {
                log::info!(
                    "service {name}: IPVS virtual service {} no longer conflicts with another tool's",
                    endpoint(id)
                );
            }
        }
        self.conflicts = now;
    }
}

/// The kernel's whole table, stats included.
pub async fn dump(ipvs: &mut Ipvs) -> Result<Table, IpvsError> {
    let mut t = Table::new();
    for s in ipvs.services().await? {
        let dests = ipvs
            .dests(&s.id)
            .await?
            .into_iter()
            .map(|d| ((d.addr, d.port), d))
            .collect();
        t.insert(s.id, (s, dests));
    }
    Ok(t)
}

/// The scheduling of every configured service.
fn options(services: &ServiceConfigs<'_>) -> BTreeMap<String, IpvsOptions> {
    services
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                IpvsOptions {
                    sched: sched_name(s.scheduler).into(),
                    persistence: s.affinity.as_ref().map(|a| a.timeout as u32),
                },
            )
        })
        .collect()
}

/// The IPVS engine of the daemon's loop: the desired state as an IPVS
/// table (synced as a diff), its VIPs on the dummy device, and its remote
/// backends in the masquerade set.
impl Engine for IpvsEngine {
    fn kind(&self) -> DataplaneKind {
        DataplaneKind::Ipvs
    }

    async fn held_down(
        &mut self,
        desired: &DesiredState,
    ) -> Result<BTreeSet<BackendOf>, DataplaneError> {
        let have = dump(&mut self.ipvs).await?;
        let down = held_down(desired, &have, &self.owned);
        self.last_dump = Some(have);
        Ok(down)
    }

    async fn sync(
        &mut self,
        desired: &DesiredState,
        services: &ServiceConfigs<'_>,
        expired: &[BackendOf],
    ) -> Result<usize, DataplaneError> {
        let vips: BTreeSet<IpAddr> = desired
            .services
            .values()
            .flat_map(|s| s.frontends.iter().filter_map(|f| f.addr))
            .collect();
        // The VIPs are local once on the device: node ports answer on the
        // other local addresses only.
        let mut d = desired.clone();
        d.local_addrs.retain(|a| !vips.contains(a));
        let mut want = table(&d, &options(services));
        crate::kernel::netlink::ensure_vip_device(&self.vip_device, &vips).await?;
        let have = match self.last_dump.take() {
            Some(t) => t,
            None => dump(&mut self.ipvs).await?,
        };
        // Another tool's services are skipped here, so that neither the
        // diff, the owned set nor the view (`/metrics`, `meshlb status`)
        // takes them for meshlb's.
        let clash = conflicts(&d, &have, &self.owned);
        want.retain(|id, _| !clash.contains_key(id));
        self.note_conflicts(clash);
        let n = self.apply_table(&want, &have).await?;
        for (skey, bk) in expired {
            let conns: u32 = services_of(&have, &d, skey)
                .filter(|(s, _)| self.owned.contains(&s.id))
                .filter_map(|(_, dests)| dests.get(&(bk.addr, bk.port)))
                .map(|dest| dest.active_conns + dest.inactive_conns)
                .sum();
            log::info!("{skey}: backend {bk} drained past its timeout: removed, {conns} IPVS connections end (their packets are dropped)");
        }
        self.view.update(&d, &want, services);
        self.view.save(&self.state_file.with_extension("view"));
        let m = self.masq.sync(&remotes(&d)).await?;
        Ok(n + m)
    }

    fn set_node_net(&mut self, _net: &NodeNet) -> Result<bool, DataplaneError> {
        // Masquerade picks the outgoing interface's address itself.
        Ok(false)
    }

    fn metrics_source(&self) -> Result<crate::engine::StatsSource, DataplaneError> {
        Ok(crate::engine::StatsSource::Ipvs(self.view.clone()))
    }
}

/// The kernel services of `have` implementing data-plane service `skey`.
fn services_of<'a>(
    have: &'a Table,
    desired: &'a DesiredState,
    skey: &'a ServiceKey,
) -> impl Iterator<Item = &'a (Service, Dests)> {
    desired
        .local_addrs
        .iter()
        .map(|a| ServiceId {
            addr: *a,
            port: skey.port,
            proto: skey.proto.number(),
        })
        .chain(
            desired
                .services
                .get(skey)
                .into_iter()
                .flat_map(|s| s.frontends.iter().filter_map(|f| f.addr))
                .map(|a| ServiceId {
                    addr: a,
                    port: skey.port,
                    proto: skey.proto.number(),
                }),
        )
        .filter_map(|id| have.get(&id))
}

#[cfg(test)]
mod tests {
    use super::view::{format_view, parse_view, status_of, Named};
    use super::*;
    use crate::kernel::ipvs::consts::IP_VS_CONN_F_MASQ;
    use crate::kernel::ipvs::{Dest, Stats};
    use crate::kernel::nft::Remote;
    use crate::model::config::Scheduler;
    use crate::model::{
        BackendKey, BackendSpec, BackendState, Frontend, Proto, ServiceKey, ServiceSpec,
    };
    use std::sync::Arc;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn desired(backends: &[(&str, u32, BackendState)]) -> DesiredState {
        let spec = ServiceSpec {
            affinity_secs: 0,
            frontends: [
                Frontend {
                    addr: Some(ip("10.96.0.10")),
                    port: 80,
                    proto: Proto::Tcp,
                },
                Frontend {
                    addr: None,
                    port: 80,
                    proto: Proto::Tcp,
                },
            ]
            .into(),
            backends: backends
                .iter()
                .map(|(a, w, s)| {
                    (
                        BackendKey {
                            addr: ip(a),
                            port: 8000,
                        },
                        BackendSpec {
                            weight: *w,
                            state: *s,
                            remote: false,
                        },
                    )
                })
                .collect(),
        };
        DesiredState {
            services: [(
                ServiceKey {
                    name: "web".into(),
                    proto: Proto::Tcp,
                    port: 80,
                },
                spec.into(),
            )]
            .into(),
            local_addrs: [ip("192.168.1.5"), ip("fd00::5")].into(),
        }
    }

    fn sid(a: &str) -> ServiceId {
        ServiceId {
            addr: ip(a),
            port: 80,
            proto: 6,
        }
    }

    #[test]
    fn the_status_view_round_trips_and_skips_malformed_lines() {
        let id = |port| ServiceId {
            proto: 6,
            addr: "10.96.0.10".parse().unwrap(),
            port,
        };
        let mut names = BTreeMap::new();
        names.insert(
            id(80),
            Named {
                name: "web".into(),
                scheduler: Scheduler::Maglev,
                vip: true,
                states: [
                    (("10.0.1.2".parse().unwrap(), 8000), BackendState::Up),
                    (("fd00::2".parse().unwrap(), 8000), BackendState::Draining),
                ]
                .into_iter()
                .collect(),
            },
        );
        names.insert(
            id(81),
            Named {
                name: "db".into(),
                scheduler: Scheduler::Sh,
                vip: false,
                states: BTreeMap::new(),
            },
        );
        let text = format_view(&names);
        assert_eq!(parse_view(&text), names);
        let noisy = format!(
            "garbage\nS 6 10.96.0.10 82 1 nosuch x\nB 10.0.9.9 1 up\nS 6 not-an-ip 83 1 rr y\n{text}B 10.0.1.3 8000 sideways\n"
        );
        assert_eq!(parse_view(&noisy), names);
    }

    #[test]
    fn owned_services_round_trip_through_the_state_file() {
        let owned: BTreeSet<ServiceId> = [sid("10.96.0.10"), sid("fd00::5")].into();
        assert_eq!(parse_owned(&format_owned(&owned)), owned);
        assert_eq!(parse_owned("6 nope 80\n17 10.0.0.1\n"), BTreeSet::new());
    }

    #[test]
    fn vip_and_every_node_address_get_a_service_with_their_family_of_backends() {
        let t = table(
            &desired(&[
                ("10.0.1.2", 100, BackendState::Up),
                ("10.0.1.3", 100, BackendState::Draining),
                ("10.0.1.4", 100, BackendState::Down),
            ]),
            &BTreeMap::new(),
        );
        assert_eq!(
            t.keys().copied().collect::<Vec<_>>(),
            vec![sid("10.96.0.10"), sid("192.168.1.5"), sid("fd00::5")]
        );
        let (s, d) = &t[&sid("10.96.0.10")];
        assert_eq!(s.sched, "mh");
        let w: Vec<u32> = d.values().map(|d| d.weight).collect();
        assert_eq!(w, vec![100, 0, 0], "draining and down take no new flows");
        assert!(t[&sid("fd00::5")].1.is_empty(), "no IPv6 backends");
    }

    #[test]
    fn sync_is_a_diff_in_a_safe_order_and_leaves_foreign_services_alone() {
        let opts: BTreeMap<String, IpvsOptions> = [(
            "web".to_string(),
            IpvsOptions {
                sched: "wrr".into(),
                persistence: Some(600),
            },
        )]
        .into();
        let before = table(
            &desired(&[("10.0.1.2", 100, BackendState::Up)]),
            &BTreeMap::new(),
        );
        let owned: BTreeSet<ServiceId> = before.keys().copied().collect();
        // Nothing to do when the kernel already holds the table meshlb
        // created (adoption by a restarted daemon).
        assert!(diff(&before, &before, &owned).is_empty());
        let mut have = before.clone();
        let foreign = sid("172.16.0.1");
        have.insert(
            foreign,
            (service(foreign, &IpvsOptions::default()), Dests::new()),
        );
        let want = table(&desired(&[("10.0.1.3", 50, BackendState::Up)]), &opts);
        let changes = diff(&want, &have, &owned);
        let kinds: Vec<&str> = changes
            .iter()
            .map(|c| match c {
                Change::AddService(_) => "add-svc",
                Change::SetService(_) => "set-svc",
                Change::AddDest(..) => "add-dest",
                Change::SetDest(..) => "set-dest",
                Change::DelDest(..) => "del-dest",
                Change::DelService(_) => "del-svc",
            })
            .collect();
        // 3 services rescheduled, 2 IPv4 ones get the new dest and lose
        // the old one; the foreign service is kept.
        assert_eq!(
            kinds,
            vec!["set-svc", "set-svc", "set-svc", "add-dest", "add-dest", "del-dest", "del-dest"]
        );
        assert!(!changes
            .iter()
            .any(|c| matches!(c, Change::DelService(id) if *id == foreign)));
        // An owned service that is no longer wanted goes, last.
        let empty = Table::new();
        let gone = diff(&empty, &before, &owned);
        assert_eq!(gone.len(), 3);
        assert!(gone.iter().all(|c| matches!(c, Change::DelService(_))));
    }

    fn skey() -> ServiceKey {
        ServiceKey {
            name: "web".into(),
            proto: Proto::Tcp,
            port: 80,
        }
    }

    fn bkey(a: &str) -> BackendKey {
        BackendKey {
            addr: ip(a),
            port: 8000,
        }
    }

    #[test]
    fn remote_backends_are_the_masquerade_set() {
        let mut d = desired(&[
            ("10.0.1.2", 100, BackendState::Up),
            ("10.0.2.2", 100, BackendState::Down),
            ("fd00:2::2", 0, BackendState::Up),
        ]);
        let spec = Arc::make_mut(d.services.get_mut(&skey()).unwrap());
        for a in ["10.0.2.2", "fd00:2::2"] {
            spec.backends.get_mut(&bkey(a)).unwrap().remote = true;
        }
        // Down or draining, a remote backend keeps its established flows:
        // they still need the SNAT.
        let want: BTreeSet<Remote> = ["10.0.2.2", "fd00:2::2"]
            .iter()
            .map(|a| Remote {
                addr: ip(a),
                proto: 6,
                port: 8000,
            })
            .collect();
        assert_eq!(remotes(&d), want);
    }

    #[test]
    fn held_down_is_weight_zero_in_the_kernel_for_a_backend_wanted_up() {
        let want = desired(&[
            ("10.0.1.2", 100, BackendState::Up),
            ("10.0.1.3", 100, BackendState::Up),
            ("10.0.1.4", 0, BackendState::Up),
        ]);
        let mut have = table(&want, &BTreeMap::new());
        for (_, dests) in have.values_mut() {
            if let Some(d) = dests.get_mut(&(ip("10.0.1.3"), 8000)) {
                d.weight = 0;
            }
        }
        let owned: BTreeSet<ServiceId> = have.keys().copied().collect();
        // 10.0.1.4 is at weight 0 because it is drained, not held down.
        assert_eq!(
            held_down(&want, &have, &owned),
            [(skey(), bkey("10.0.1.3"))].into()
        );
        assert!(
            held_down(&want, &Table::new(), &owned).is_empty(),
            "nothing in the kernel"
        );
        assert!(
            held_down(&want, &have, &BTreeSet::new()).is_empty(),
            "another tool's weights are not meshlb's health"
        );
    }

    /// `/metrics` in IPVS mode: one service by name over its VIP and node
    /// address services, the kernel's counters per destination, the
    /// state meshlb programmed.
    #[test]
    fn status_names_the_kernel_services_and_keeps_their_counters() {
        let want = desired(&[
            ("10.0.1.2", 100, BackendState::Up),
            ("10.0.1.3", 100, BackendState::Down),
        ]);
        let mut have = table(&want, &BTreeMap::new());
        for (id, (_, dests)) in &mut have {
            // The IPv6 node address's service has no IPv4 destination.
            if let Some(d) = dests.get_mut(&(ip("10.0.1.2"), 8000)) {
                d.stats = Stats {
                    conns: if id.addr == ip("10.96.0.10") { 7 } else { 2 },
                    in_packets: 10,
                    out_packets: 8,
                    in_bytes: 1000,
                    out_bytes: 800,
                };
            }
        }
        let view = IpvsView::default();
        view.update(&want, &have, &ServiceConfigs::default());
        let names = view.0.lock().unwrap().clone();
        let st = status_of("n1", &names, &have);
        assert_eq!(st.dataplane, "ipvs");
        assert_eq!(st.services.len(), 1);
        let svc = &st.services[0];
        assert_eq!(
            (svc.name.as_str(), svc.vip.as_deref(), svc.scheduler),
            ("web", Some("10.96.0.10"), Scheduler::Maglev)
        );
        assert_eq!(svc.ports, vec!["80/tcp"]);
        let text = crate::daemon::metrics::render(&st);
        let line = |p: &str| text.lines().find(|l| l.starts_with(p)).map(str::to_owned);
        assert_eq!(
            line("meshlb_connections_total{service=\"web\",backend=\"10.0.1.2:8000\"}").as_deref(),
            Some("meshlb_connections_total{service=\"web\",backend=\"10.0.1.2:8000\"} 9"),
            "VIP and node-address services summed"
        );
        assert_eq!(
            line("meshlb_backend_up{service=\"web\",backend=\"10.0.1.3:8000\"}").as_deref(),
            Some("meshlb_backend_up{service=\"web\",backend=\"10.0.1.3:8000\"} 0")
        );
        assert_eq!(
            line("meshlb_dataplane_info").as_deref(),
            Some("meshlb_dataplane_info{kind=\"ipvs\"} 1")
        );
    }

    /// The service a change is about.
    fn touched(c: &Change) -> ServiceId {
        match c {
            Change::AddService(s) | Change::SetService(s) => s.id,
            Change::AddDest(id, _)
            | Change::SetDest(id, _)
            | Change::DelDest(id, _)
            | Change::DelService(id) => *id,
        }
    }

    /// Another tool's service (rr, one destination of its own) on web's
    /// VIP, there before meshlb's first sync.
    fn with_foreign(mut have: Table, id: ServiceId) -> Table {
        let opts = IpvsOptions {
            sched: "rr".into(),
            persistence: None,
        };
        let d = Dest {
            addr: ip("10.0.9.9"),
            port: 9000,
            weight: 7,
            fwd: IP_VS_CONN_F_MASQ,
            active_conns: 0,
            inactive_conns: 0,
            stats: Stats::default(),
        };
        have.insert(id, (service(id, &opts), [((d.addr, d.port), d)].into()));
        have
    }

    #[test]
    fn a_foreign_service_at_a_wanted_id_is_never_touched_owned_or_cleaned() {
        let d = desired(&[("10.0.1.2", 100, BackendState::Up)]);
        let want = table(&d, &BTreeMap::new());
        let vip = sid("10.96.0.10");
        let kernel = with_foreign(Table::new(), vip);

        // First sync: the other frontends are created, the VIP's is not.
        let owned = BTreeSet::new();
        assert_eq!(conflicts(&d, &kernel, &owned), [(vip, "web".into())].into());
        let changes = diff(&want, &kernel, &owned);
        assert!(changes.iter().all(|c| touched(c) != vip), "{changes:?}");
        let added: BTreeSet<ServiceId> = changes
            .iter()
            .filter_map(|c| match c {
                Change::AddService(s) => Some(s.id),
                _ => None,
            })
            .collect();
        assert_eq!(added, [sid("192.168.1.5"), sid("fd00::5")].into());
        let owned = owned_after(&want, &kernel, &owned);
        assert_eq!(owned, added, "the foreign service never becomes meshlb's");

        // Later syncs (the kernel now holds both) change nothing, even
        // with new backends, and the owned set stays without it.
        let mut kernel = with_foreign(want.clone(), vip);
        let more = table(
            &desired(&[
                ("10.0.1.2", 100, BackendState::Up),
                ("10.0.1.3", 100, BackendState::Up),
            ]),
            &BTreeMap::new(),
        );
        let changes = diff(&more, &kernel, &owned);
        assert!(!changes.is_empty());
        assert!(changes.iter().all(|c| touched(c) != vip), "{changes:?}");
        assert_eq!(owned_after(&more, &kernel, &owned), owned);

        // meshlb's service gone: only its own are deleted.
        let gone = diff(&Table::new(), &kernel, &owned);
        assert_eq!(gone.iter().map(touched).collect::<BTreeSet<_>>(), owned);

        // `meshlb cleanup` names only what the state file lists.
        let live: BTreeSet<ServiceId> = kernel.keys().copied().collect();
        let state = parse_owned(&format_owned(&owned));
        assert_eq!(
            to_delete(&state, &live),
            owned.iter().copied().collect::<Vec<_>>()
        );

        // The other tool removes its service: meshlb takes the VIP.
        kernel.remove(&vip);
        assert!(conflicts(&d, &kernel, &owned).is_empty());
        assert_eq!(diff(&want, &kernel, &owned).first().map(touched), Some(vip));
        assert!(owned_after(&want, &kernel, &owned).contains(&vip));
    }

    #[test]
    fn endpoints_name_address_port_and_protocol() {
        assert_eq!(endpoint(&sid("10.96.0.10")), "10.96.0.10:80/tcp");
        let udp6 = ServiceId {
            addr: ip("fd00::10"),
            port: 53,
            proto: 17,
        };
        assert_eq!(endpoint(&udp6), "[fd00::10]:53/udp");
    }

    #[test]
    fn state_files_are_replaced_whole_and_leave_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("meshlb-ipvs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("n1.ipvs");
        crate::kernel::pinlock::write_atomic(&path, b"6 10.96.0.10 80\n").unwrap();
        crate::kernel::pinlock::write_atomic(&path, b"17 10.96.0.15 53\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "17 10.96.0.15 53\n"
        );
        assert!(!crate::kernel::pinlock::tmp_path(&path).exists());
        assert!(
            crate::kernel::pinlock::write_atomic(&dir.join("no/such/dir/n1.ipvs"), b"x").is_err(),
            "an unwritable state file is an error, not a panic"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
