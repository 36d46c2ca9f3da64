//! Highly available VIPs: the election of one owner per announced VIP in
//! etcd, and what the owner does on its segment (SPEC "Highly available
//! VIPs").
//!
//! * A short lease of its own (`VIP_TTL_SECS`, renewed every
//!   `RENEW_EVERY`) holds `vips/candidates/<node>` while this node can
//!   announce (an announce interface is up) and `vips/<ip>` for each VIP
//!   it owns. A VIP is taken only by creating its key while it is absent
//!   (an etcd transaction), so there is one owner at a time.
//! * Owning a VIP means holding it as a /32 (/128) on the announce
//!   interfaces with a kernel lifetime of `ADDRESS_LIFETIME_SECS`
//!   (`kernel::announce`), refreshed at each acknowledged renewal: the
//!   kernel answers ARP/NDP for it, and removes it by itself if this
//!   daemon dies or hangs. On takeover gratuitous ARPs (unsolicited NAs)
//!   go out at once and `GARP_AFTER` later (0.2 s, 0.4 s, and 1.5 s, past
//!   any moment the previous owner might still have answered a probe),
//!   then one every `GARP_EVERY`.
//! * Self-fencing: if no renewal sent in the last `FENCE_AFTER` was
//!   acknowledged, the addresses are removed and the session ends, well
//!   before etcd can expire the lease and let another node in.
//! * A stopping daemon removes its addresses and revokes its lease, so
//!   its VIPs move at once instead of when the lease lapses.
//! * Who campaigns first and when an owner hands a VIP back is
//!   `control::vipowner` (rendezvous + bounded load, with a hold against
//!   flapping).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::watch;

use crate::control::vipowner::{Action, View};
use crate::kernel::{announce as kann, netlink};
use crate::model::counters::Registry;
use crate::model::status::VipStatus;
use crate::source::etcd::{connect, error_chain, EtcdOptions, REQUEST_TIMEOUT};

/// TTL asked for the VIP lease: etcd's floor with its default election
/// timeout (a smaller TTL is raised to it). A dead owner's VIPs are free
/// after this (plus etcd's expiry check, up to 0.5 s).
pub const VIP_TTL_SECS: i64 = 2;
/// How often the lease is renewed.
const RENEW_EVERY: Duration = Duration::from_millis(500);
/// A renewal acknowledged later than this after it was sent does not
/// refresh the addresses (the lease may have been close to expiring).
const ACK_WITHIN: Duration = Duration::from_millis(400);
/// With no acknowledged renewal sent within this, the owner stops
/// answering: well inside `VIP_TTL_SECS`, so no other node can have
/// taken the VIP yet.
pub const FENCE_AFTER: Duration = Duration::from_millis(1500);
/// Kernel lifetime of a held VIP address, refreshed at each renewal.
const ADDRESS_LIFETIME_SECS: u32 = 1;
/// Gratuitous ARPs on takeover after the first: the wait before each.
const GARP_AFTER: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_millis(200),
    Duration::from_millis(1100),
];
const GARP_ON_TAKEOVER: u32 = GARP_AFTER.len() as u32 + 1;
/// A gratuitous ARP per owned VIP this often after takeover.
pub const GARP_EVERY: Duration = Duration::from_secs(30);
/// How long a stopping daemon waits for the announcer to resign (remove
/// its addresses, revoke its lease).
pub const RESIGN_WITHIN: Duration = Duration::from_secs(2);
/// How often the announce interfaces' state is read.
const LINK_POLL: Duration = Duration::from_millis(250);

/// What the announcer needs from the daemon.
#[derive(Clone, Debug)]
pub struct AnnounceOptions {
    pub etcd: EtcdOptions,
    pub node: String,
    /// Set `arp_ignore`/`arp_announce` on the announce interfaces (IPVS
    /// mode: the VIPs also sit on `meshlb0`, which the kernel would
    /// otherwise answer ARP for on every interface).
    pub strict_arp: bool,
}

/// `vips/<ip>`'s value.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct OwnerRecord {
    node: String,
    #[serde(default)]
    since: String,
}

/// `<prefix>/vips/`
pub fn vips_prefix(prefix: &str) -> String {
    format!("{}/vips/", prefix.trim_end_matches('/'))
}

/// `<prefix>/vips/candidates/`: under `vips/`, so one watch sees a
/// revision's owner and candidate changes together (an expired lease
/// deletes both at once: with separate watches, the owner's deletion
/// could be acted on while its node still looked like a candidate).
pub fn candidates_prefix(prefix: &str) -> String {
    format!("{}candidates/", vips_prefix(prefix))
}

/// An interface this node announces on, as last read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Uplink {
    name: String,
    index: u32,
    mac: [u8; 6],
}

/// A VIP this node holds: the interfaces it is on and its next GARP.
#[derive(Debug)]
struct Held {
    on: Vec<Uplink>,
    garps_left: u32,
    next_garp: Instant,
}

/// The announcer's state across etcd sessions.
struct Announcer {
    opts: AnnounceOptions,
    vips: BTreeSet<IpAddr>,
    ifaces: Vec<String>,
    uplinks: Vec<Uplink>,
    held: BTreeMap<IpAddr, Held>,
    owners: BTreeMap<IpAddr, String>,
    candidates: BTreeMap<String, Instant>,
    status: watch::Sender<Arc<Vec<VipStatus>>>,
    registry: Arc<Registry>,
    strict_done: BTreeSet<String>,
}

/// Runs until the daemon stops: elects, holds, fences, hands back.
/// `vips`: the announced VIPs of the current desired state; `ifaces`: the
/// interfaces to announce on.
pub async fn run(
    opts: AnnounceOptions,
    mut vips: watch::Receiver<BTreeSet<IpAddr>>,
    mut ifaces: watch::Receiver<Vec<String>>,
    status: watch::Sender<Arc<Vec<VipStatus>>>,
    registry: Arc<Registry>,
) {
    let mut a = Announcer {
        opts,
        vips: vips.borrow_and_update().clone(),
        ifaces: ifaces.borrow_and_update().clone(),
        uplinks: Vec::new(),
        held: BTreeMap::new(),
        owners: BTreeMap::new(),
        candidates: BTreeMap::new(),
        status,
        registry,
        strict_done: BTreeSet::new(),
    };
    a.release_stale().await;
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        match a.session(&mut vips, &mut ifaces).await {
            Ok(()) => return,
            Err(e) => log::warn!("vip election: {e}; stopped answering for owned VIPs, retrying"),
        }
        a.release_all("session ended").await;
        a.owners.clear();
        a.candidates.clear();
        a.publish();
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(200);
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            // The daemon is stopping: nothing is held between sessions.
            Err(_) = vips.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// A pending lease renewal: when it was sent.
type Outstanding = Option<Instant>;

impl Announcer {
    /// Removes VIP addresses an earlier daemon left (this one owns
    /// nothing yet: its predecessor's lease is not ours).
    async fn release_stale(&mut self) {
        match kann::held_vips().await {
            Ok(list) => {
                for (index, vip) in list {
                    log::info!(
                        "vip {vip}: removing the address an earlier daemon held (ifindex {index})"
                    );
                    if let Err(e) = kann::release_vip(index, vip).await {
                        log::warn!("vip {vip}: {e}");
                    }
                }
            }
            Err(e) => log::warn!("vip addresses: {e}"),
        }
    }

    fn eligible(&self) -> bool {
        !self.uplinks.is_empty()
    }

    /// Re-reads the announce interfaces: those that exist and are up.
    async fn read_links(&mut self) {
        let links = match netlink::links().await {
            Ok(l) => l,
            Err(e) => {
                log::warn!("vip announce interfaces: {e}");
                return;
            }
        };
        let mut up = Vec::new();
        for name in &self.ifaces {
            let Some(l) = links.iter().find(|l| &l.name == name) else {
                continue;
            };
            if !l.oper_up {
                continue;
            }
            let Some(mac) = l.mac else { continue };
            up.push(Uplink {
                name: name.clone(),
                index: l.index,
                mac,
            });
        }
        if up != self.uplinks {
            let names: Vec<&str> = up.iter().map(|u| u.name.as_str()).collect();
            log::info!(
                "vip announce interfaces up: {}",
                if names.is_empty() {
                    "none (this node cannot own VIPs)".to_string()
                } else {
                    names.join(", ")
                }
            );
            self.uplinks = up;
        }
    }

    /// IPVS mode, once VIPs are announced: the announce interfaces answer
    /// ARP only for their own addresses, so only the owner (which holds
    /// the VIP there) answers, not every node holding it on `meshlb0`.
    fn ensure_strict(&mut self) {
        if !self.opts.strict_arp || self.vips.is_empty() {
            return;
        }
        for u in &self.uplinks {
            if !self.strict_done.insert(u.name.clone()) {
                continue;
            }
            match kann::set_arp_strict(&u.name) {
                Ok(true) => log::info!(
                    "{}: set arp_ignore=1 arp_announce=2: only a VIP's owner answers ARP for it (every IPVS node holds the VIPs on meshlb0)",
                    u.name
                ),
                Ok(false) => {}
                Err(e) => log::warn!("{}: arp_ignore/arp_announce: {e}", u.name),
            }
        }
    }

    /// One lease: campaigns, holds, renews, until etcd is lost or the
    /// daemon stops (`Ok`).
    async fn session(
        &mut self,
        vips_rx: &mut watch::Receiver<BTreeSet<IpAddr>>,
        ifaces_rx: &mut watch::Receiver<Vec<String>>,
    ) -> Result<(), String> {
        self.read_links().await;
        let prefix = self.opts.etcd.prefix.clone();
        let me = self.opts.node.clone();
        let mut client = connect(&self.opts.etcd).await.map_err(|e| e.to_string())?;
        let t = |what: &str| format!("{what}: timed out");
        let granted = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_grant(VIP_TTL_SECS, None))
            .await
            .map_err(|_| t("lease grant"))?
            .map_err(|e| format!("lease grant: {}", error_chain(&e)))?;
        let lease = granted.id();
        let (mut keeper, mut acks) =
            tokio::time::timeout(REQUEST_TIMEOUT, client.lease_keep_alive(lease))
                .await
                .map_err(|_| t("keep-alive"))?
                .map_err(|e| format!("keep-alive: {}", error_chain(&e)))?;
        let mut renewed = Instant::now();
        log::info!(
            "vip election: lease {lease:x} (ttl {} s) for node {me}",
            granted.ttl()
        );
        let vprefix = vips_prefix(&prefix);
        let aprefix = candidates_prefix(&prefix);
        let my_key = format!("{aprefix}{me}");
        let listed = tokio::time::timeout(
            REQUEST_TIMEOUT,
            client.get(vprefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await
        .map_err(|_| t("list"))?
        .map_err(|e| format!("list {vprefix}: {}", error_chain(&e)))?;
        let revision = listed
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        for kv in listed.kvs() {
            self.apply(&vprefix, &aprefix, kv.key(), Some(kv.value()));
        }
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut vw =
            tokio::time::timeout(REQUEST_TIMEOUT, client.watch(vprefix.as_str(), Some(opts)))
                .await
                .map_err(|_| t("watch"))?
                .map_err(|e| format!("watch {vprefix}: {}", error_chain(&e)))?;
        // A VIP this node owned under an earlier lease is not its own now.
        self.owners.retain(|_, o| *o != me);
        let mut registered = false;
        let mut pending: BTreeMap<IpAddr, Instant> = BTreeMap::new();
        let mut outstanding: Outstanding = None;
        let mut renew = tokio::time::interval(RENEW_EVERY);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut links = tokio::time::interval(LINK_POLL);
        links.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // No etcd request may outlive the fence: past it this node
            // must have stopped answering.
            let fence_at = renewed + FENCE_AFTER;
            let by_fence = |what: &str| format!("{what}: no answer before the fence");
            if !self.eligible() {
                // Before any etcd request, which may hang until the fence.
                self.release_all("no announce interface is up").await;
            }
            self.ensure_strict();
            // Candidacy follows the interfaces.
            if self.eligible() != registered {
                let op = if self.eligible() {
                    tokio::time::timeout_at(
                        fence_at.into(),
                        client.put(
                            my_key.as_str(),
                            me.as_str(),
                            Some(PutOptions::new().with_lease(lease)),
                        ),
                    )
                    .await
                    .map(|r| r.map(|_| ()))
                } else {
                    tokio::time::timeout_at(fence_at.into(), client.delete(my_key.as_str(), None))
                        .await
                        .map(|r| r.map(|_| ()))
                };
                op.map_err(|_| by_fence(&my_key))?
                    .map_err(|e| format!("{my_key}: {}", error_chain(&e)))?;
                registered = self.eligible();
            }
            self.step(&mut client, lease, &vprefix, &mut pending, fence_at)
                .await?;
            self.publish();
            let next_pending = pending.values().min().copied();
            let next_garp = self.held.values().map(|h| h.next_garp).min();
            tokio::select! {
                _ = renew.tick() => {
                    if outstanding.is_none() {
                        tokio::time::timeout_at(fence_at.into(), keeper.keep_alive())
                            .await
                            .map_err(|_| by_fence("keep-alive"))?
                            .map_err(|e| format!("keep-alive: {}", error_chain(&e)))?;
                        outstanding = Some(Instant::now());
                    }
                }
                ack = acks.message() => {
                    match ack {
                        Ok(Some(r)) if r.ttl() > 0 => {
                            if let Some(sent) = outstanding.take() {
                                if sent.elapsed() <= ACK_WITHIN {
                                    renewed = sent;
                                    self.refresh().await;
                                }
                            }
                        }
                        Ok(Some(_)) => return Err("lease expired".into()),
                        Ok(None) => return Err("keep-alive stream closed".into()),
                        Err(e) => return Err(format!("keep-alive: {}", error_chain(&e))),
                    }
                }
                () = tokio::time::sleep_until(fence_at.into()) => {
                    return Err(format!(
                        "lease {lease:x} not renewed for {} ms",
                        FENCE_AFTER.as_millis()
                    ));
                }
                ev = vw.message() => {
                    let resp = ev.map_err(|e| format!("watch: {}", error_chain(&e)))?
                        .ok_or("watch stream closed")?;
                    for e in resp.events() {
                        if let Some(kv) = e.kv() {
                            let v = (e.event_type() == EventType::Put).then(|| kv.value());
                            self.apply(&vprefix, &aprefix, kv.key(), v);
                        }
                    }
                }
                () = until(next_pending) => {}
                () = until(next_garp) => self.garp(),
                _ = links.tick() => self.read_links().await,
                r = vips_rx.changed() => {
                    if r.is_err() {
                        self.resign_all(&mut client, lease).await;
                        return Ok(());
                    }
                    self.vips = vips_rx.borrow_and_update().clone();
                }
                r = ifaces_rx.changed() => {
                    if r.is_err() {
                        self.resign_all(&mut client, lease).await;
                        return Ok(());
                    }
                    self.ifaces = ifaces_rx.borrow_and_update().clone();
                    self.read_links().await;
                }
            }
        }
    }

    /// Takes one watched key (`None`: deleted) into `owners`/`candidates`.
    fn apply(&mut self, vprefix: &str, aprefix: &str, key: &[u8], value: Option<&[u8]>) {
        let Ok(key) = std::str::from_utf8(key) else {
            return;
        };
        if let Some(node) = key.strip_prefix(aprefix) {
            if value.is_some() {
                self.candidates
                    .entry(node.to_string())
                    .or_insert_with(Instant::now);
            } else {
                self.candidates.remove(node);
            }
        } else if let Some(ip) = key.strip_prefix(vprefix) {
            let Ok(vip) = ip.parse::<IpAddr>() else {
                log::warn!("{key}: not an IP address: ignored");
                return;
            };
            match value.map(serde_json::from_slice::<OwnerRecord>) {
                Some(Ok(r)) => {
                    self.owners.insert(vip, r.node);
                }
                Some(Err(e)) => {
                    // Someone holds it; we cannot tell who.
                    log::warn!("{key}: {e}: treated as owned by an unknown node");
                    self.owners.insert(vip, String::from("?"));
                }
                None => {
                    self.owners.remove(&vip);
                }
            }
        }
    }

    fn view(&self) -> View {
        View {
            me: self.opts.node.clone(),
            eligible: self.eligible(),
            vips: self.vips.clone(),
            candidates: self
                .candidates
                .iter()
                .map(|(n, t)| (n.clone(), t.elapsed()))
                .collect(),
            owners: self.owners.clone(),
        }
    }

    /// Applies the decisions of `control::vipowner` once.
    async fn step(
        &mut self,
        client: &mut Client,
        lease: i64,
        vprefix: &str,
        pending: &mut BTreeMap<IpAddr, Instant>,
        fence_at: Instant,
    ) -> Result<(), String> {
        let now = Instant::now();
        let actions = self.view().actions();
        let wanted: BTreeSet<IpAddr> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Campaign(v, _) => Some(*v),
                Action::Resign(..) => None,
            })
            .collect();
        pending.retain(|v, _| wanted.contains(v));
        for a in actions {
            match a {
                Action::Resign(vip, why) => {
                    self.release(vip, why).await;
                    let key = format!("{vprefix}{vip}");
                    let txn = Txn::new()
                        .when([Compare::lease(key.as_str(), CompareOp::Equal, lease)])
                        .and_then([TxnOp::delete(key.as_str(), None)]);
                    tokio::time::timeout_at(fence_at.into(), client.txn(txn))
                        .await
                        .map_err(|_| format!("{key}: resign: no answer before the fence"))?
                        .map_err(|e| format!("{key}: resign: {}", error_chain(&e)))?;
                    self.owners.remove(&vip);
                    log::info!("vip {vip}: resigned ({why})");
                }
                Action::Campaign(vip, delay) => {
                    let due = *pending.entry(vip).or_insert(now + delay);
                    if due > now {
                        continue;
                    }
                    pending.remove(&vip);
                    let key = format!("{vprefix}{vip}");
                    let value = serde_json::to_vec(&OwnerRecord {
                        node: self.opts.node.clone(),
                        since: rfc3339(SystemTime::now()),
                    })
                    .map_err(|e| e.to_string())?;
                    let txn = Txn::new()
                        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            key.as_str(),
                            value,
                            Some(PutOptions::new().with_lease(lease)),
                        )]);
                    let won = tokio::time::timeout_at(fence_at.into(), client.txn(txn))
                        .await
                        .map_err(|_| format!("{key}: campaign: no answer before the fence"))?
                        .map_err(|e| format!("{key}: campaign: {}", error_chain(&e)))?
                        .succeeded();
                    if won {
                        self.owners.insert(vip, self.opts.node.clone());
                        self.take(vip).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts answering for `vip` on every up announce interface.
    async fn take(&mut self, vip: IpAddr) {
        let mut on = Vec::new();
        for u in &self.uplinks {
            match kann::hold_vip(u.index, vip, ADDRESS_LIFETIME_SECS).await {
                Ok(()) => on.push(u.clone()),
                Err(e) => log::warn!("vip {vip} on {}: {e}", u.name),
            }
        }
        let names: Vec<&str> = on.iter().map(|u| u.name.as_str()).collect();
        log::info!(
            "vip {vip}: owned by this node, answering on {}",
            names.join(", ")
        );
        self.held.insert(
            vip,
            Held {
                on,
                garps_left: GARP_ON_TAKEOVER,
                next_garp: Instant::now(),
            },
        );
        self.garp();
    }

    /// Renews the kernel lifetime of every held address (after an
    /// acknowledged lease renewal), and puts held VIPs on interfaces that
    /// came up.
    async fn refresh(&mut self) {
        let uplinks = self.uplinks.clone();
        for (vip, h) in &mut self.held {
            h.on.retain(|u| uplinks.contains(u));
            for u in &uplinks {
                match kann::hold_vip(u.index, *vip, ADDRESS_LIFETIME_SECS).await {
                    Ok(()) => {
                        if !h.on.contains(u) {
                            h.on.push(u.clone());
                            h.garps_left = GARP_ON_TAKEOVER;
                            h.next_garp = Instant::now();
                        }
                    }
                    Err(e) => log::warn!("vip {vip} on {}: {e}", u.name),
                }
            }
        }
    }

    /// Sends the gratuitous ARPs (unsolicited NAs) that are due.
    fn garp(&mut self) {
        let now = Instant::now();
        for (vip, h) in &mut self.held {
            if h.next_garp > now {
                continue;
            }
            for u in &h.on {
                if let Err(e) = kann::announce(u.index, u.mac, *vip) {
                    log::warn!("vip {vip}: gratuitous announcement on {}: {e}", u.name);
                }
            }
            if h.garps_left > 1 {
                h.next_garp = now + GARP_AFTER[(GARP_ON_TAKEOVER - h.garps_left) as usize];
                h.garps_left -= 1;
            } else {
                h.garps_left = 0;
                h.next_garp = now + GARP_EVERY;
            }
        }
    }

    /// Stops answering for `vip`.
    async fn release(&mut self, vip: IpAddr, why: &str) {
        if let Some(h) = self.held.remove(&vip) {
            for u in &h.on {
                if let Err(e) = kann::release_vip(u.index, vip).await {
                    log::warn!("vip {vip} on {}: {e}", u.name);
                }
            }
            log::info!("vip {vip}: stopped answering ({why})");
        }
    }

    /// The daemon is stopping: stops answering, then revokes the lease,
    /// which deletes its `vips/<ip>` and candidate keys at once, so
    /// another node takes over without waiting for the lease to lapse.
    async fn resign_all(&mut self, client: &mut Client, lease: i64) {
        self.release_all("daemon stopping").await;
        match tokio::time::timeout(RESIGN_WITHIN / 2, client.lease_revoke(lease)).await {
            Ok(Ok(_)) => {
                log::info!("vip election: lease {lease:x} revoked: this node's VIPs are free");
            }
            Ok(Err(e)) => log::warn!(
                "vip election: revoking lease {lease:x}: {}",
                error_chain(&e)
            ),
            Err(_) => log::warn!("vip election: revoking lease {lease:x}: timed out"),
        }
    }

    async fn release_all(&mut self, why: &str) {
        let vips: Vec<IpAddr> = self.held.keys().copied().collect();
        for v in vips {
            self.release(v, why).await;
        }
    }

    /// Tells `status` and `/metrics` who owns each announced VIP.
    fn publish(&self) {
        let list: Vec<VipStatus> = self
            .vips
            .iter()
            .map(|v| {
                let owner = self.owners.get(v).cloned();
                VipStatus {
                    vip: *v,
                    mine: owner.as_deref() == Some(self.opts.node.as_str())
                        && self.held.contains_key(v),
                    interfaces: self
                        .held
                        .get(v)
                        .map(|h| h.on.iter().map(|u| u.name.clone()).collect())
                        .unwrap_or_default(),
                    owner,
                }
            })
            .collect();
        if self.status.borrow().as_slice() != list.as_slice() {
            self.registry
                .set_vip_owners(list.iter().map(|s| (s.vip, s.owner.clone())).collect());
            self.status.send_replace(Arc::new(list));
        }
    }
}

async fn until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// `t` as RFC 3339 UTC, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_utc_civil_time() {
        let at = |s: u64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_796_601_599), "2026-12-06T23:59:59Z");
    }

    #[test]
    fn fencing_comes_before_the_lease_can_expire() {
        // A live daemon removes its addresses at FENCE_AFTER, before etcd
        // can expire the lease. The kernel's own removal of an unrefreshed
        // address (the backstop for a dead daemon) came 1.0-1.3 s after
        // the last refresh on a quiet host (up to 2.2 s under netlink
        // load: its lifetime check runs about once a second).
        let ttl = Duration::from_secs(VIP_TTL_SECS as u64);
        assert!(FENCE_AFTER < ttl);
        assert!(
            ACK_WITHIN
                + Duration::from_secs(u64::from(ADDRESS_LIFETIME_SECS))
                + Duration::from_millis(250)
                < ttl
        );
        assert!(RENEW_EVERY * 2 < FENCE_AFTER);
    }

    #[test]
    fn keys() {
        assert_eq!(vips_prefix("/meshlb/v1"), "/meshlb/v1/vips/");
        assert_eq!(
            candidates_prefix("/meshlb/v1/"),
            "/meshlb/v1/vips/candidates/"
        );
    }
}
