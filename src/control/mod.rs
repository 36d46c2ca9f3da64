//! Pure decisions: the reconciler and its Maglev tables, drain timers,
//! health tracking, and this node's network facts. No IO happens here.

pub mod drain;
pub mod health;
pub mod maglev;
pub mod nodenet;
pub mod reconcile;
