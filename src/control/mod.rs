//! Pure decisions: the reconciler and its Maglev tables, drain timers,
//! health tracking, this node's network facts, the answers of the DNS
//! view, and who should own each announced VIP. No IO happens here.

pub mod dns;
pub(crate) mod drain;
pub(crate) mod health;
pub(crate) mod maglev;
pub mod nodenet;
pub mod reconcile;
pub mod vipowner;
