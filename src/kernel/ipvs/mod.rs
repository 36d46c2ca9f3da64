//! IPVS over generic netlink, without `ipvsadm`: kernel constants
//! ([`consts`]), pure message encoding and decoding ([`wire`], tested byte
//! for byte), and the async handle with a timeout on every request
//! ([`client`]).

pub mod client;
pub mod consts;
pub mod wire;

pub use client::Ipvs;
pub use wire::{Dest, Service, ServiceId, Stats};

/// Errors talking to IPVS.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    #[error("generic netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("the kernel has no IPVS (load the ip_vs module)")]
    Unavailable,
    #[error("IPVS command {cmd}: {}", std::io::Error::from_raw_os_error(*errno))]
    Kernel { cmd: u8, errno: i32 },
    #[error("IPVS command {cmd}: no answer within {:?}", client::TIMEOUT)]
    Timeout { cmd: u8 },
    #[error("generic netlink: empty answer")]
    NoAnswer,
    #[error(transparent)]
    Wire(#[from] crate::kernel::nlattr::WireError),
    /// The file naming the services this node created could not be read:
    /// without it every service would look like another tool's.
    #[error("IPVS state file {path}: {source}")]
    StateFile {
        path: String,
        source: std::io::Error,
    },
}
