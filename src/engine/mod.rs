//! The data plane seen from the daemon. Two layers:
//!
//! * [`Dataplane`]: the one door from the reconciler's plans (dense ids,
//!   Maglev rings) to map-shaped tables. Implementations: `xdp` (aya) and
//!   `mirror` (the same tables in memory: the XDP engine's copy of the
//!   kernel's, and the reconciler's tests).
//! * [`Engine`]: what the daemon's single loop drives — make the kernel
//!   hold a [`DesiredState`] (health and drain already applied to it),
//!   report which backends it holds down, and show the daemon's counters.
//!   Implementations: [`xdp::XdpDataplane`] (reconciler plans over
//!   `Dataplane`) and [`ipvs::IpvsEngine`] (the same desired state as an
//!   IPVS table diff, plus nf_tables SNAT for remote backends).
//!
//! Everything about services, tasks, health, drain and schedulers sits
//! above `Engine`, written once.

pub mod ipvs;
pub(crate) mod mirror;
pub mod xdp;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::control::nodenet::NodeNet;
use crate::control::reconcile::Plan;
use crate::model::config::ServiceConfig;
use crate::model::{BackendKey, DesiredState, Observed, ServiceKey};

/// Which engine forwards packets on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataplaneKind {
    XdpNative,
    XdpGeneric,
    Ipvs,
    Mirror,
}

impl DataplaneKind {
    /// The name used in `status`, metrics and etcd.
    pub fn as_str(self) -> &'static str {
        match self {
            DataplaneKind::XdpNative => "xdp-native",
            DataplaneKind::XdpGeneric => "xdp-generic",
            DataplaneKind::Ipvs => "ipvs",
            DataplaneKind::Mirror => "mirror",
        }
    }
}

/// Errors of a data plane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Ipvs(#[from] crate::kernel::ipvs::IpvsError),
    #[error(transparent)]
    Nft(#[from] crate::kernel::nft::NftError),
    #[error(transparent)]
    Netlink(#[from] crate::kernel::netlink::NetlinkError),
    #[error(transparent)]
    Pinned(#[from] crate::kernel::pinned::PinnedError),
    #[error(transparent)]
    Inspect(#[from] xdp::inspect::InspectError),
    #[error("reconcile: {0}")]
    Reconcile(#[from] crate::control::reconcile::ReconcileError),
    /// What the engine was working on (a state file, a kernel table) and
    /// what failed there.
    #[error("{what}: {source}")]
    Context {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An engine's own refusal (no cause below it).
    #[error("{0}")]
    Other(String),
}

impl DataplaneError {
    /// Wraps an error met while working on `what`.
    pub fn context<E: std::error::Error + Send + Sync + 'static>(
        what: impl Into<String>,
    ) -> impl FnOnce(E) -> DataplaneError {
        let what = what.into();
        move |e| DataplaneError::Context {
            what,
            source: Box::new(e),
        }
    }
}

/// A forwarding engine programmed by plans.
pub trait Dataplane {
    fn kind(&self) -> DataplaneKind;
    /// Read back what the engine holds now.
    fn observe(&self) -> Result<Observed, DataplaneError>;
    /// Carry out a plan, in order. A failure leaves earlier steps applied;
    /// the next observe/reconcile round repairs the rest.
    fn apply(&mut self, plan: &Plan) -> Result<(), DataplaneError>;
}

/// The services as configured, by name: schedulers and affinity, which
/// only some engines need beyond the desired state; health checks and
/// drain timeouts. Static services win over an etcd service of the same
/// name. A view of the two sources, not a copy: built per sync.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServiceConfigs<'a> {
    statics: &'a [ServiceConfig],
    etcd: Option<&'a BTreeMap<String, Arc<ServiceConfig>>>,
}

impl<'a> ServiceConfigs<'a> {
    pub fn new(
        statics: &'a [ServiceConfig],
        etcd: Option<&'a BTreeMap<String, Arc<ServiceConfig>>>,
    ) -> Self {
        ServiceConfigs { statics, etcd }
    }

    /// The service named `name`.
    pub fn get(&self, name: &str) -> Option<&'a ServiceConfig> {
        self.statics
            .iter()
            .find(|s| s.name == name)
            .or_else(|| self.etcd.and_then(|e| e.get(name)).map(Arc::as_ref))
    }

    /// Every service, each name once.
    pub fn iter(&self) -> impl Iterator<Item = &'a ServiceConfig> + '_ {
        let statics = self.statics;
        self.etcd
            .into_iter()
            .flat_map(|e| e.values())
            .map(Arc::as_ref)
            .filter(move |s| !statics.iter().any(|t| t.name == s.name))
            .chain(statics.iter())
    }
}

/// One backend of one data-plane service.
pub type BackendOf = (ServiceKey, BackendKey);

/// What the daemon's loop drives (see the module docs). Its futures run on
/// the daemon's own task, never spawned, so they need not be `Send`.
#[allow(async_fn_in_trait)]
pub trait Engine {
    fn kind(&self) -> DataplaneKind;

    /// Backends of `desired` the kernel holds as down now (no new flows
    /// for health): a restarted daemon starts their checks down, so they
    /// are not flapped up.
    async fn held_down(
        &mut self,
        desired: &DesiredState,
    ) -> Result<BTreeSet<BackendOf>, DataplaneError>;

    /// Makes the kernel hold `desired`; returns the number of changes.
    /// `expired`: backends drained past their timeout, already left out of
    /// `desired`: their established flows end too.
    async fn sync(
        &mut self,
        desired: &DesiredState,
        services: &ServiceConfigs<'_>,
        expired: &[BackendOf],
    ) -> Result<usize, DataplaneError>;

    /// This node's interface facts and SNAT addresses, re-read
    /// periodically; returns whether anything was written.
    fn set_node_net(&mut self, net: &NodeNet) -> Result<bool, DataplaneError>;

    /// Where `/metrics` reads per-service and per-backend numbers from.
    fn metrics_source(&self) -> Result<StatsSource, DataplaneError>;

    /// The flow timeouts of `[conntrack]`; returns whether anything was
    /// written. An engine without a flow table of meshlb's keeps none.
    fn set_flow_config(
        &mut self,
        _c: &crate::model::config::ConntrackConfig,
    ) -> Result<bool, DataplaneError> {
        Ok(false)
    }

    /// The services of the last sync that do not fit the engine's tables,
    /// with why (every other service was programmed).
    fn rejected(&self) -> BTreeMap<ServiceKey, String> {
        BTreeMap::new()
    }

    /// Forgets what the engine remembers of the kernel's tables, so the
    /// next sync compares with what the kernel holds (the periodic
    /// reconcile: drift is repaired).
    fn reread(&mut self) {}

    /// Attaches the interfaces of `want`, and with `prune` detaches the
    /// others; returns whether anything changed. An engine that attaches
    /// to no interface (IPVS) ignores it.
    fn set_interfaces(&mut self, _want: &[crate::control::nodenet::Attach], _prune: bool) -> bool {
        false
    }

    /// The network namespaces (by cookie, with a path into each) of this
    /// node's containers, which the socket-level balancer serves besides
    /// the node's own. An engine without one (IPVS) ignores it.
    fn set_socket_namespaces(&mut self, _ns: &BTreeMap<u64, std::path::PathBuf>) {}

    /// Removes flow state idle past its timeout (see
    /// `XdpDataplane::sweep`).
    fn sweep_flows(&mut self) -> Swept {
        Swept::default()
    }
}

/// What one flow-table sweep removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Conntrack entries idle past their timeout.
    pub flows: usize,
    /// SNAT ports whose flow was gone, freed after the quarantine.
    pub snat_ports: usize,
}

/// Where the per-service and per-backend numbers come from.
#[derive(Clone)]
pub enum StatsSource {
    /// XDP: the pinned maps (the server's own handles on the pins).
    Pinned(Arc<crate::kernel::pinned::Maps>),
    /// IPVS: the kernel's IPVS statistics, named by the engine.
    Ipvs(ipvs::IpvsView),
}

impl StatsSource {
    pub async fn status(&self, node: &str) -> Result<crate::model::status::Status, DataplaneError> {
        match self {
            StatsSource::Pinned(maps) => Ok(xdp::inspect::status(maps, Some(node))?),
            StatsSource::Ipvs(view) => Ok(view.status(node).await?),
        }
    }
}
