//! The two BPF operations aya 0.14 does not offer, as raw system calls:
//! filling a Maglev ring through a shared mapping (one syscall for any
//! ring size, where aya's `Array::set` costs one per slot) and a batch
//! update (one wait for running programs for all of a plan's rings, where
//! each single update of an array of maps waits). The crate's only
//! `unsafe` code.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

/// Writes a fresh inner ring (an mmapable array of `m + 1` `u32`): `[0]` = `m`, `[1 + i]` = `slots[i]`,
/// through one shared mapping of the array (values sit 8 bytes apart: the
/// kernel aligns array values to 8).
pub fn fill_ring(ring: BorrowedFd<'_>, m: u32, slots: &[u32]) -> std::io::Result<()> {
    const STRIDE: usize = 8;
    let len = (slots.len() + 1) * STRIDE;
    // SAFETY: a shared, writable mapping of a BPF_F_MMAPABLE array of
    // `m + 1` values, no longer than the array; unmapped below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            ring.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = base.cast::<u8>();
    for (i, v) in std::iter::once(m).chain(slots.iter().copied()).enumerate() {
        // SAFETY: `i * STRIDE + 4 <= len`, inside the mapping; u32 writes
        // at 8-byte-aligned offsets of a page-aligned mapping.
        unsafe { base.add(i * STRIDE).cast::<u32>().write(v) };
    }
    // SAFETY: the mapping made above, of `len` bytes.
    if unsafe { libc::munmap(base.cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_MAP_UPDATE_BATCH` of `u32` keys and `u32` values (aya has no
/// batch operations): all or an error naming the first that failed.
pub fn update_batch(map: BorrowedFd<'_>, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
    /// The `batch` member of `union bpf_attr`.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    assert_eq!(keys.len(), values.len(), "one value per key");
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as usize as u64,
        values: values.as_ptr() as usize as u64,
        count: u32::try_from(keys.len()).map_err(std::io::Error::other)?,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` batch member of the size
    // passed; `keys` and `values` hold `count` elements each and outlive
    // the call; the kernel writes only `attr.count`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if (attr.count as usize) < keys.len() && attr.count > 0 {
        return Err(std::io::Error::new(
            e.kind(),
            format!(
                "key {} (after {} updated): {e}",
                keys[attr.count as usize], attr.count
            ),
        ));
    }
    Err(e)
}

/// Whether `e` says the kernel lacks the command for this map type.
pub fn unsupported(e: &std::io::Error) -> bool {
    /// `ENOTSUPP`, the kernel-internal "not supported" some commands leak.
    const ENOTSUPP: i32 = 524;
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}
