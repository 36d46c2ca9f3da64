//! meshlb: a kernel-offloaded service load balancer for container
//! clusters.
//!
//! # Layout
//!
//! * [`config`] — the TOML config and its validation → [`model::DesiredState`].
//! * [`model`] — desired/observed state in the reconciler's terms.
//! * [`maglev`] — the Maglev lookup table (weighted, deterministic).
//! * [`reconcile`] — the pure reconciler: desired + observed → plan.
//! * [`dataplane`] — the `Dataplane` (plans) and `Engine` (the daemon's loop)
//!   traits; the XDP, IPVS and fake engines.
//! * [`pinned`] — typed access to the pinned BPF maps (daemon, status, explain).
//! * [`bpfsys`] — the two BPF commands aya lacks (ring fill by mmap, delete
//!   in an array of maps) and [`heap`] (one allocator arena; freed heap
//!   back to the system after a full sync): the only `unsafe` code.
//! * [`inspect`] — `status` and `explain`, read from the pinned maps.
//! * [`ipvs`] — IPVS over generic netlink (constants, wire format, handle).
//! * [`etcd`] — services and tasks from etcd (list+watch, node lease).
//! * [`docker`] — this node's opted-in containers registered as tasks in etcd.
//! * [`health`] — active health checks (rise/fall state machine, prober).
//! * [`drain`] — drain timeouts: draining backends leave after `drain_timeout`.
//! * [`netlink`] — interfaces and this node's addresses (rtnetlink).
//! * [`nft`] — nf_tables over nfnetlink: masquerade for remote backends (IPVS mode).
//! * [`nodenet`] — interface forwarding flags, the SNAT address and which
//!   interfaces to attach, and why (pure).
//! * [`guard`] — this node's checks of a service: VIP on a node address or
//!   gateway, a published port something here listens on (pure).
//! * [`listeners`] — the sockets listening on this node (`/proc/net`).
//! * [`daemon`] — `meshlb run`: the node daemon's loop and shutdown.
//! * [`pinlock`] — one daemon per pin directory (a `flock` naming the holder).
//! * [`metrics`] — Prometheus text on `/metrics`.
//! * [`admin`] — the `service`/`task` client commands (etcd).
//! * [`cli`] — the command line (clap), parsed in `main`.
//! * [`manual`] — shell completions and man pages generated from [`cli`].
#![deny(unsafe_code)]

pub mod bpfsys;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod docker;
pub mod drain;
pub mod etcd;
pub mod guard;
pub mod health;
pub mod heap;
pub mod inspect;
pub mod ipvs;
pub mod listeners;
pub mod maglev;
pub mod manual;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod nft;
pub mod nodenet;
pub mod pinlock;
pub mod pinned;
pub mod reconcile;

/// The XDP object (built by `cargo xtask build-ebpf`), embedded.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESHLB_EBPF_OBJ"));

/// `meshlb service ...` and `meshlb task ...`: the etcd client commands.
pub mod admin;
