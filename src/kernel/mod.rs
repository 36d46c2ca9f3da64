//! Kernel adapters (IO only): the pinned BPF maps and the raw `bpf()`
//! commands aya lacks, rtnetlink, IPVS and nf_tables over netlink, the pin
//! lock, the listening sockets (`/proc/net`) and the heap arena.

pub mod bpfsys;
pub mod heap;
pub mod ipvs;
pub mod listeners;
pub mod netlink;
pub mod nft;
pub mod pinlock;
pub mod pinned;
