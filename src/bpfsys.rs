//! The two BPF operations aya 0.14 does not offer, as raw system calls:
//! filling a Maglev ring through a shared mapping (one syscall for any
//! ring size, where aya's `Array::set` costs one per slot) and deleting
//! an entry of an array of maps. The crate's only `unsafe` code.
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

/// `BPF_MAP_DELETE_ELEM` of a `u32` key (aya's `ArrayOfMaps` has no
/// remove). A missing entry is not an error.
pub fn delete_elem(map: BorrowedFd<'_>, key: u32) -> std::io::Result<()> {
    /// The `map_fd`, `key` prefix of `union bpf_attr` for element commands.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    let attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: 0,
        flags: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; `key`
    // outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    match r {
        0 => Ok(()),
        _ => match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            e => Err(e),
        },
    }
}
