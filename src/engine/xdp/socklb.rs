//! The socket-level balancer for node-local clients (`[socket_lb]`): the
//! object's cgroup `sock_addr` programs (`meshlb_common::PROGS_SOCK`)
//! attached to the cgroup v2 root by links (which the kernel attaches as
//! `BPF_F_ALLOW_MULTI`: beside other programs), their links
//! pinned beside the maps (so they outlive the daemon, like the XDP
//! links), and the namespaces they serve (`maps::SOCK_NETNS`).
//!
//! A restart attaches the new programs before it lets go of the old ones
//! (a pin is replaced by renaming the new link's pin over it): for a
//! moment both run, and the second finds a backend address where the
//! first put it, which is not a frontend, so it leaves it alone.
//!
//! The programs see every socket under the root, in every namespace: only
//! those of the namespaces in `SOCK_NETNS` (this node's, its
//! containers') are balanced.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::Ebpf;
use meshlb_common::{SockRevKey, LAYOUT_VERSION, PROGS_SOCK};

use super::{log_verified, program_error, typed_program, XdpError};
use crate::kernel::pinned::{Maps, PinnedError};
use crate::kernel::sockdiag;
pub use crate::model::status::SocketLbStatus;

/// The runtime file (beside the pin lock) that says what the daemon did
/// about `[socket_lb]`, for `meshlb status`.
pub const SOCKLB_EXT: &str = "socklb.json";

/// The pin of program `name`'s link.
pub fn link_pin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{}{name}", pin_prefix()))
}

/// What every socket-LB link pin's name starts with.
pub fn pin_prefix() -> String {
    format!("sock_v{LAYOUT_VERSION}_")
}

/// The mount point of the cgroup v2 hierarchy's root (`None`: not
/// mounted), from `/proc/self/mountinfo`.
pub fn cgroup2_root() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_root_in(&text)
}

/// `cgroup2_root` of a mountinfo text: a `cgroup2` mount of the
/// hierarchy's root (`/`), the first one listed.
fn cgroup2_root_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mut f = left.split_whitespace();
        let (root, mount) = (f.nth(3)?, f.next()?);
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape(mount)))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Attaches every socket-LB program to `cgroup` and pins its link under
/// `dir`, replacing (by rename, so never absent) a link an earlier daemon
/// pinned there.
pub fn attach(ebpf: &mut Ebpf, dir: &Path, cgroup: &Path) -> Result<(), XdpError> {
    let link_err = |path: &Path, msg: String| XdpError::Link {
        iface: format!("cgroup {}", cgroup.display()),
        path: path.to_owned(),
        msg,
    };
    let cg = File::open(cgroup).map_err(|e| link_err(cgroup, format!("open: {e}")))?;
    for name in PROGS_SOCK {
        let prog: &mut CgroupSockAddr = typed_program(ebpf, name)?;
        if prog.fd().is_err() {
            let t = std::time::Instant::now();
            prog.load().map_err(program_error(name))?;
            log_verified(name, t);
        }
        // A cgroup link takes no flags (the kernel refuses any with
        // EINVAL) and always attaches as BPF_F_ALLOW_MULTI: aya creates a
        // link on kernels >= 5.7, so its "single" mode is the link's.
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|e| link_err(cgroup, format!("attach {name}: {}", chain(&e))))?;
        let link = prog.take_link(id).map_err(program_error(name))?;
        let pin = link_pin(dir, name);
        let fd: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| link_err(&pin, e.to_string()))?;
        // bpffs refuses names with a dot.
        let tmp = dir.join(format!("new_{}{name}", pin_prefix()));
        let _ = std::fs::remove_file(&tmp);
        fd.pin(&tmp)
            .map_err(|e| link_err(&tmp, format!("pin: {e}")))?;
        std::fs::rename(&tmp, &pin).map_err(|e| link_err(&pin, format!("rename: {e}")))?;
    }
    Ok(())
}

/// An error and its sources, `: `-separated (aya's syscall errors keep
/// the errno in the source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s = format!("{s}: {c}");
        cur = c.source();
    }
    s
}

/// Removes the socket-LB link pins under `dir` (`[socket_lb] enabled =
/// false`, or cleanup): the hooks are detached. Returns how many went.
pub fn detach(dir: &Path) -> usize {
    let prefix = pin_prefix();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// Whether every socket-LB link is pinned under `dir`.
pub fn attached(dir: &Path) -> bool {
    PROGS_SOCK.iter().all(|n| link_pin(dir, n).exists())
}

/// Makes `maps::SOCK_NETNS` hold exactly `cookies`.
pub fn set_namespaces(maps: &mut Maps, cookies: &BTreeSet<u64>) -> Result<(), PinnedError> {
    let err = |source| PinnedError::Map {
        name: meshlb_common::maps::SOCK_NETNS,
        source,
    };
    let stale: Vec<u64> = maps
        .sock_netns
        .keys()
        .filter_map(Result::ok)
        .filter(|c| !cookies.contains(c))
        .collect();
    for c in stale {
        maps.sock_netns.remove(&c).map_err(err)?;
    }
    for c in cookies {
        maps.sock_netns.insert(c, 1, 0).map_err(err)?;
    }
    Ok(())
}

/// Whether a record's backend (`key`: as the socket reports it, an IPv4
/// backend IPv4-mapped for an IPv6 socket) is backend slot `b`'s address
/// and port.
pub fn is_backend(b: &meshlb_common::Backend, key: &SockRevKey) -> bool {
    let mapped = key.family == meshlb_common::FAMILY_V6
        && key.addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    let addr_matches = if mapped {
        b.family == meshlb_common::FAMILY_V4 && b.addr[..4] == key.addr[12..]
    } else {
        b.family == key.family && b.addr == key.addr
    };
    addr_matches && b.port == key.port
}

/// Aborts the connected UDP sockets of the calling thread's namespace
/// whose cookie is in `targets` and whose peer is the backend recorded
/// for it (`SOCK_DESTROY`); returns how many. Unconnected sockets are
/// left alone.
pub fn end_udp_sockets(targets: &BTreeMap<u64, SocketAddr>) -> usize {
    let mut ended = 0;
    for family in [libc::AF_INET, libc::AF_INET6] {
        let socks = match sockdiag::udp_sockets(family) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("socket-level balancing: sock_diag dump: {e}");
                continue;
            }
        };
        for s in socks.iter().filter(|s| {
            s.state == sockdiag::STATE_CONNECTED && targets.get(&s.cookie) == Some(&s.dst)
        }) {
            match sockdiag::destroy(s) {
                Ok(()) => ended += 1,
                Err(e) => log::warn!(
                    "socket-level balancing: SOCK_DESTROY of the UDP socket to {}: {e}",
                    s.dst
                ),
            }
        }
    }
    ended
}

/// The status of the socket-level balancer under `dir`: the daemon's
/// runtime file, checked against the pins and the namespace map.
pub fn status(dir: &Path, maps: &Maps) -> SocketLbStatus {
    let path = crate::kernel::pinlock::runtime_file(dir, SOCKLB_EXT);
    let mut s: SocketLbStatus = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    s.on = attached(dir);
    s.namespaces = maps.sock_netns.keys().count() as u64;
    if !s.on && s.why.is_empty() {
        s.why = "not attached".into();
    }
    s
}

/// Writes `s` for `meshlb status` (replaced atomically).
pub fn save_status(dir: &Path, s: &SocketLbStatus) {
    let path = crate::kernel::pinlock::runtime_file(dir, SOCKLB_EXT);
    let text = serde_json::to_string_pretty(s).unwrap_or_default();
    if let Err(e) = crate::kernel::pinlock::write_atomic(&path, text.as_bytes()) {
        log::warn!("{}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_names_its_backend_plain_or_mapped() {
        let mut b = meshlb_common::Backend {
            port: 9000u16.to_be(),
            family: meshlb_common::FAMILY_V4,
            ..Default::default()
        };
        b.addr[..4].copy_from_slice(&[10, 201, 2, 2]);
        let mut k = SockRevKey {
            port: 9000u16.to_be(),
            family: meshlb_common::FAMILY_V4,
            ..Default::default()
        };
        k.addr[..4].copy_from_slice(&[10, 201, 2, 2]);
        assert!(is_backend(&b, &k));
        let mut mapped = SockRevKey {
            family: meshlb_common::FAMILY_V6,
            ..k
        };
        mapped.addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 201, 2, 2];
        assert!(is_backend(&b, &mapped));
        mapped.addr[15] = 3;
        assert!(!is_backend(&b, &mapped));
        assert!(!is_backend(&b, &SockRevKey { port: 1, ..k }));
        // An IPv6 backend is never an IPv4 record's.
        let v6 = meshlb_common::Backend {
            family: meshlb_common::FAMILY_V6,
            ..b
        };
        assert!(!is_backend(&v6, &k));
    }

    #[test]
    fn finds_the_cgroup2_root_mount() {
        let hybrid = "\
25 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            cgroup2_root_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "40 30 0:35 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_root_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        // A container's view: a sub-cgroup mounted, not the root.
        let sub = "40 30 0:35 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_root_in(sub), None);
        let none = "25 30 0:22 / /sys rw - sysfs sysfs rw\n";
        assert_eq!(cgroup2_root_in(none), None);
        let spaced = "40 30 0:35 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_root_in(spaced), Some(PathBuf::from("/mnt/cg two")));
    }
}
