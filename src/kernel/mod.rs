//! Kernel adapters (IO only): the pinned BPF maps and the raw `bpf()`
//! commands aya lacks, rtnetlink, IPVS and nf_tables over netlink, the pin
//! lock, the listening sockets (`/proc/net`) and the heap arena; one
//! netlink attribute codec (`nlattr`) for IPVS and nf_tables; an owned
//! VIP held on the uplink and announced (gratuitous ARP, unsolicited
//! neighbour advertisements); the daemon's open-files limit (`rlimit`).

pub mod announce;
pub(crate) mod bpfsys;
pub mod heap;
pub(crate) mod ipvs;
pub(crate) mod listeners;
pub(crate) mod netlink;
pub mod netns;
pub mod nft;
pub(crate) mod nlattr;
pub(crate) mod pinlock;
pub mod pinned;
pub mod rlimit;
pub mod sockdiag;
