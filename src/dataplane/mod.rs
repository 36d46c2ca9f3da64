//! The `Dataplane` trait: the one door from the reconciler's plans to a
//! kernel forwarding engine. Implementations: `xdp` (aya) and `fake` (in
//! memory, for tests of pure logic). `ipvs` holds the IPVS engine's pure
//! table and diff (not yet driving a kernel).

pub mod fake;
pub mod ipvs;
pub mod xdp;

use crate::model::Observed;
use crate::reconcile::Plan;

/// Which engine forwards packets on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataplaneKind {
    XdpNative,
    XdpGeneric,
    Ipvs,
    Fake,
}

impl DataplaneKind {
    /// The name used in `status`, metrics and etcd.
    pub fn as_str(self) -> &'static str {
        match self {
            DataplaneKind::XdpNative => "xdp-native",
            DataplaneKind::XdpGeneric => "xdp-generic",
            DataplaneKind::Ipvs => "ipvs",
            DataplaneKind::Fake => "fake",
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
    #[error("{0}")]
    Other(String),
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
