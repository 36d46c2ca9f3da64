//! One daemon per pin directory. Two daemons programming the same pinned
//! maps would each take the other's entries for drift and delete them, and
//! each adopt the other's links; the second one must refuse to start, and
//! say who holds the directory.
//!
//! bpffs holds only pinned objects and directories, so the lock is a
//! regular file under the runtime directory, named after the pin
//! directory, locked with `flock` (`File::try_lock`; released by the kernel when the holder
//! dies, however it dies) and holding the holder's pid for the message.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Where the lock files live (the unit's `RuntimeDirectory`).
pub const LOCK_DIR: &str = "/run/meshlb/pins";

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct PinLock {
    _file: File,
    path: PathBuf,
}

impl PinLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("pin directory {dir} is in use by another meshlb (pid {pid}; lock {lock})")]
    Held {
        dir: String,
        pid: String,
        lock: String,
    },
    #[error("lock for pin directory {dir} ({lock}): {err}")]
    Io {
        dir: String,
        lock: String,
        err: std::io::Error,
    },
}

/// The lock file of a pin directory: its path with every `/` as `_`
/// (`/sys/fs/bpf/meshlb` -> `_sys_fs_bpf_meshlb.lock`).
pub fn lock_path(pins: &Path) -> PathBuf {
    runtime_file(pins, "lock")
}

/// A regular file the daemon of `pins` keeps beside its lock (bpffs holds
/// no regular files): `<name>.<ext>`, e.g. the attached interfaces for
/// `meshlb status` (`ifaces.json`).
pub fn runtime_file(pins: &Path, ext: &str) -> PathBuf {
    let name: String = pins
        .to_string_lossy()
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    Path::new(LOCK_DIR).join(format!("{name}.{ext}"))
}

/// Replaces `path` by `bytes` atomically (a temporary file in the same
/// directory, synced, then renamed over it): a reader — the next daemon,
/// `meshlb status`, `meshlb cleanup` — sees the old file or the new one,
/// never a torn one, even after a crash mid-write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename is durable once the directory is.
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// `<path>.tmp`: where [`write_atomic`] writes before the rename.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Takes the lock of `pins` without waiting, and writes this process's
/// pid into it.
pub fn acquire(pins: &Path) -> Result<PinLock, LockError> {
    let path = lock_path(pins);
    let io = |err| LockError::Io {
        dir: pins.display().to_string(),
        lock: path.display().to_string(),
        err,
    };
    std::fs::create_dir_all(LOCK_DIR).map_err(io)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(LockError::Held {
                dir: pins.display().to_string(),
                pid: if pid.is_empty() { "unknown" } else { pid }.to_string(),
                lock: path.display().to_string(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(PinLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_file_is_named_after_the_pin_directory() {
        assert_eq!(
            lock_path(Path::new("/sys/fs/bpf/meshlb")),
            Path::new("/run/meshlb/pins/_sys_fs_bpf_meshlb.lock")
        );
    }
}
