//! meshlb: a kernel-offloaded service load balancer for container
//! clusters.
//!
//! # Layout
//!
//! Folders are layers; a module imports only from its own layer and the
//! ones listed before it (`tests/tidy.rs` checks this):
//!
//! 1. [`model`] — the domain: desired and observed state, the service
//!    description, the read model (`status`, `explain`) and the daemon's
//!    own counters.
//! 2. [`control`] — pure decisions: the reconciler, Maglev, drain, health
//!    tracking, node network facts.
//! 3. [`kernel`] — IO adapters: pinned BPF maps and raw `bpf()` commands,
//!    rtnetlink, IPVS and nf_tables over netlink, the pin lock, `/proc/net`
//!    listeners, the heap arena (the only `unsafe` code lives here).
//! 4. [`source`] — the config file, etcd, Docker, and this node's checks
//!    of what they describe.
//! 5. [`engine`] — the `Engine` and `Dataplane` traits; the XDP engine
//!    (tables, pins, `status`/`explain`), the IPVS engine, the in-memory
//!    mirror.
//! 6. [`daemon`] — `meshlb run`: the node daemon's loop and `/metrics`.
//! 7. [`cli`] — the command line: clap types, flag merging, the etcd admin
//!    commands, man pages and completions.
#![deny(unsafe_code)]

pub mod cli;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod kernel;
pub mod model;
pub mod source;

/// The XDP object (built by `cargo xtask build-ebpf`), embedded.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESHLB_EBPF_OBJ"));
