//! Pure decisions: the reconciler and its Maglev tables, drain timers,
//! health tracking, and this node's network facts. No IO happens here.

pub(crate) mod drain;
pub(crate) mod health;
pub(crate) mod maglev;
pub mod nodenet;
pub mod reconcile;
