//! The daemon's open-files limit. Every service's Maglev ring is a BPF map
//! the daemon holds open, one descriptor each, so past about 900 services
//! the common default soft limit of 1024 (also systemd's for services)
//! makes map creation fail (`EMFILE`). At start the daemon raises its soft
//! `RLIMIT_NOFILE` to what [`MAX_SERVICES`](meshlb_common::MAX_SERVICES)
//! rings and everything else need, with the hard limit where it may
//! (`CAP_SYS_RESOURCE`), else as far as the hard limit allows.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Descriptors the daemon may hold: a ring per service, plus the other
/// maps, links, sockets and files.
pub const WANTED_NOFILE: u64 = meshlb_common::MAX_SERVICES as u64 + 4096;

/// The soft limit before and after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoFile {
    pub before: u64,
    pub now: u64,
}

/// `(soft, hard)`, as u64 on every target (`rlim_t` is 32 bits on armv7).
#[allow(
    clippy::useless_conversion,
    reason = "rlim_t is u64 on 64-bit targets, u32 on 32-bit ones"
)]
fn get() -> nix::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok((u64::from(soft), u64::from(hard)))
}

#[allow(
    clippy::unnecessary_fallible_conversions,
    reason = "rlim_t is u64 on 64-bit targets, u32 on 32-bit ones"
)]
fn set(soft: u64, hard: u64) -> nix::Result<()> {
    let lim = |v: u64| libc::rlim_t::try_from(v).unwrap_or(libc::rlim_t::MAX);
    setrlimit(Resource::RLIMIT_NOFILE, lim(soft), lim(hard))
}

/// Raise the soft (and if need be the hard) open-files limit to
/// [`WANTED_NOFILE`]; never lowers either.
pub fn raise_nofile() -> nix::Result<NoFile> {
    let (soft, hard) = get()?;
    if soft >= WANTED_NOFILE {
        return Ok(NoFile {
            before: soft,
            now: soft,
        });
    }
    if set(WANTED_NOFILE, hard.max(WANTED_NOFILE)).is_ok() {
        return Ok(NoFile {
            before: soft,
            now: WANTED_NOFILE,
        });
    }
    let to = hard.clamp(soft, WANTED_NOFILE);
    set(to, hard)?;
    Ok(NoFile {
        before: soft,
        now: to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run by `raised_from_the_common_default` under `prlimit`: a soft
    /// limit of 1024 (most systems' default, systemd's for services) and
    /// the hard limit it names.
    #[test]
    #[ignore = "run by raised_from_the_common_default under prlimit"]
    fn child_under_1024() {
        let (soft, hard) = get().unwrap();
        assert_eq!(soft, 1024, "the parent test sets the soft limit to 1024");
        let n = raise_nofile().unwrap();
        assert_eq!(n.before, 1024);
        // The want where the hard limit allows it or may be raised
        // (CAP_SYS_RESOURCE), else the hard limit.
        let (after, hard_after) = get().unwrap();
        assert_eq!(after, n.now);
        if hard >= WANTED_NOFILE || hard_after >= WANTED_NOFILE {
            assert_eq!(n.now, WANTED_NOFILE, "{n:?}");
        } else {
            assert_eq!(n.now, hard, "{n:?}");
        }
        // Idempotent, never lowered.
        assert_eq!(raise_nofile().unwrap().now, n.now);
    }

    #[test]
    fn raised_from_the_common_default() {
        // Hard limits above the want, and below it (a busybox system's
        // 4096, where only CAP_SYS_RESOURCE reaches the want).
        for hard in [WANTED_NOFILE + 1000, 4096] {
            let out = std::process::Command::new("prlimit")
                .arg(format!("--nofile=1024:{hard}"))
                .arg(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "kernel::rlimit::tests::child_under_1024",
                    "--ignored",
                    "--test-threads=1",
                ])
                .output()
                .expect("prlimit (util-linux)");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("1 passed"),
                "hard limit {hard}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
