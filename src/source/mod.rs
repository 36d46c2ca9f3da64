//! Where the desired state comes from: the config file, etcd (list and
//! watch, the node lease), Docker (this node's containers registered as
//! tasks) and this node's checks of what they describe (`guard`).

pub mod config;
pub(crate) mod docker;
pub mod etcd;
pub(crate) mod guard;
