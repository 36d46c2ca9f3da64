//! Network namespaces by cookie: the kernel's 64-bit id of a namespace
//! (`SO_NETNS_COOKIE`, Linux >= 5.14), what the socket-level balancer's
//! programs compare (`bpf_get_netns_cookie`), and the way into another
//! process's namespace for a short job (a thread that `setns` into it and
//! ends).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The cookie of the network namespace the calling thread is in.
pub fn current_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cookie`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The network namespace of process `pid` (`/proc/<pid>/ns/net`).
pub fn of_pid(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// Runs `f` in the network namespace `ns` (a `/proc/<pid>/ns/net` or
/// `/run/netns/<name>` path) on a thread of its own, which ends with it:
/// no other thread changes namespace.
pub fn run_in<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let file = File::open(ns)?;
    std::thread::Builder::new()
        .name("meshlb-netns".into())
        .spawn(move || {
            // SAFETY: setns(2) on an open namespace file; it moves only
            // this thread, which ends after `f`.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// The cookie of the network namespace `ns` (a path as for `run_in`).
pub fn cookie_of(ns: &Path) -> io::Result<u64> {
    run_in(ns, current_cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_has_a_cookie_and_keeps_it() {
        let a = current_cookie().expect("SO_NETNS_COOKIE");
        assert_ne!(a, 0);
        assert_eq!(current_cookie().unwrap(), a);
        // Through /proc: the same namespace, the same cookie.
        assert_eq!(cookie_of(&of_pid(std::process::id())).unwrap(), a);
    }
}
