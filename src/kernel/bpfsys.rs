//! The BPF operations aya 0.14 does not offer, as raw system calls:
//! writing a Maglev ring through a shared mapping (a few syscalls for any
//! ring size, where aya's `Array::set` costs one per slot; and a ring
//! rewritten in place flips halves with one store, no syscall, no wait),
//! batch updates (the outer ring map: one wait for running programs for
//! all of a plan's new rings, where each single update of an array of
//! maps waits; the backend, service and frontend tables: one syscall per
//! 4,096 entries of a large plan), batch lookups (arrays read whole) and
//! one feature probe (`xdp_meta_allowed`).
//! The crate's only `unsafe` code.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Where a ring's entries sit in its mapping: array values are 8 bytes
/// apart (the kernel aligns them to 8).
const STRIDE: usize = 8;

/// A shared, writable mapping of a `BPF_F_MMAPABLE` array of `u32`.
struct Mapping {
    base: *mut u8,
    len: usize,
}

impl Mapping {
    /// Maps the first `entries` values of the array `fd`.
    fn new(fd: BorrowedFd<'_>, entries: usize) -> std::io::Result<Mapping> {
        let len = entries * STRIDE;
        // SAFETY: a fresh shared mapping, no longer than the array (the
        // caller's `entries` is at most its size); unmapped on drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            base: base.cast(),
            len,
        })
    }

    /// The value at `index`, as an atomic (the data path reads it
    /// concurrently).
    fn at(&self, index: usize) -> &AtomicU32 {
        assert!(
            index * STRIDE + 4 <= self.len,
            "ring entry {index} out of the mapping"
        );
        // SAFETY: inside the mapping (checked), 8-byte aligned in a
        // page-aligned mapping, valid while `self` lives.
        unsafe { AtomicU32::from_ptr(self.base.add(index * STRIDE).cast()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of `len` bytes.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Writes a fresh inner ring of `m` slots (`2 + 2m` entries, see
/// `meshlb_common::maps::RINGS`): half 0 holds `slots`, the header says
/// half 0 and `m`, the flip count is 0.
pub fn fill_ring(ring: BorrowedFd<'_>, m: u32, slots: &[u32]) -> std::io::Result<()> {
    let map = Mapping::new(ring, 2 + 2 * slots.len())?;
    for (i, v) in slots.iter().enumerate() {
        map.at(1 + i).store(*v, Ordering::Relaxed);
    }
    map.at(1 + 2 * slots.len()).store(0, Ordering::Relaxed);
    map.at(0).store(m, Ordering::Release);
    Ok(())
}

/// Writes `slots` into the inactive half of a ring in place, then makes
/// it the active one: the flip count first (userspace readers compare it
/// before and after), then the header, one aligned 32-bit store after the
/// half (release). The caller makes sure no program still reads the
/// inactive half (an RCU grace period since it was last active).
pub fn flip_ring(ring: BorrowedFd<'_>, slots: &[u32]) -> std::io::Result<()> {
    let m = slots.len();
    let map = Mapping::new(ring, 2 + 2 * m)?;
    let header = map.at(0).load(Ordering::Relaxed);
    if (header & !meshlb_common::RING_HALF) as usize != m {
        return Err(std::io::Error::other(format!(
            "ring of {} slots, not {m}",
            header & !meshlb_common::RING_HALF
        )));
    }
    let next = (header & meshlb_common::RING_HALF) ^ meshlb_common::RING_HALF;
    let base = if next != 0 { 1 + m } else { 1 };
    for (i, v) in slots.iter().enumerate() {
        map.at(base + i).store(*v, Ordering::Relaxed);
    }
    let flips = map.at(1 + 2 * m);
    flips.store(
        flips.load(Ordering::Relaxed).wrapping_add(1),
        Ordering::Release,
    );
    map.at(0).store(m as u32 | next, Ordering::Release);
    Ok(())
}

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

/// Runs the batch command `cmd` on `attr`.
///
/// # Safety
///
/// The buffers `attr` points at (keys, values, batch tokens) must be
/// valid for what `cmd` reads and writes there, for `attr.count`
/// elements, during the call.
unsafe fn batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` batch member of the size
    // passed; its buffers are the caller's to vouch for.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut::<BatchAttr>(attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `BPF_MAP_UPDATE_BATCH` (aya has no batch operations): `keys[i]` gets
/// the `i`-th run of `per_key` values (1, or the CPU count of a per-CPU
/// map), in order; all, or an error naming the first key that failed.
/// `K` and `V` must be the map's key and value types (a per-CPU value
/// padded to 8 bytes, as the kernel lays them out).
pub fn update_batch<K: aya::Pod + std::fmt::Debug, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
    per_key: usize,
) -> std::io::Result<()> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    assert_eq!(keys.len() * per_key, values.len(), "per_key values per key");
    if keys.is_empty() {
        return Ok(());
    }
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
    // SAFETY: `keys` holds `count` keys and `values` `count * per_key`
    // values, of the map's types, outliving the call; the kernel reads
    // them and writes only `attr.count`.
    let Err(e) = (unsafe { batch(BPF_MAP_UPDATE_BATCH, &mut attr) }) else {
        return Ok(());
    };
    if (attr.count as usize) < keys.len() && attr.count > 0 {
        return Err(std::io::Error::new(
            e.kind(),
            format!(
                "key {:?} (after {} updated): {e}",
                keys[attr.count as usize], attr.count
            ),
        ));
    }
    Err(e)
}

/// `BPF_MAP_UPDATE_ELEM` of one `key` to `value` (`K` and `V` the map's
/// key and value types), for a map held by descriptor only.
pub fn update_elem<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &V,
) -> std::io::Result<()> {
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    /// The `elem` member of `union bpf_attr`.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref::<K>(key) as usize as u64,
        value: std::ptr::from_ref::<V>(value) as usize as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` elem member of the size
    // passed; `key` and `value` are of the map's types and outlive the
    // call, which only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_ELEM,
            &raw mut attr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
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

/// Every value of an array map of `entries` values of `T`, in index
/// order, by `BPF_MAP_LOOKUP_BATCH` (a few syscalls for the whole map,
/// where reading slot by slot costs one each: 131,072 for the backends).
/// `T` must be the map's value type (its size the map's value size).
pub fn lookup_array<T: aya::Pod>(map: BorrowedFd<'_>, entries: u32) -> std::io::Result<Vec<T>> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const CHUNK: u32 = 4096;
    let total = entries as usize;
    let mut out: Vec<T> = Vec::with_capacity(total);
    let mut keys = vec![0u32; CHUNK as usize];
    // The batch token of an array is a key: the last one read.
    let (mut token_in, mut token_out) = (0u32, 0u32);
    while out.len() < total {
        let want = CHUNK.min((total - out.len()) as u32);
        let mut attr = BatchAttr {
            in_batch: if out.is_empty() {
                0
            } else {
                &raw const token_in as usize as u64
            },
            out_batch: &raw mut token_out as usize as u64,
            keys: keys.as_mut_ptr() as usize as u64,
            // SAFETY (pointer arithmetic): within the capacity reserved
            // above, `want` values past the ones read.
            values: unsafe { out.as_mut_ptr().add(out.len()) } as usize as u64,
            count: want,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `keys` holds `want` keys and `out` room for `want` more
        // values of the map's value size (`T`), both outliving the call;
        // the kernel writes at most `want` of each, `token_out` and
        // `attr.count`.
        let err = unsafe { batch(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        let got = (attr.count as usize).min(want as usize);
        if keys[..got]
            .iter()
            .enumerate()
            .any(|(i, k)| *k as usize != out.len() + i)
        {
            return Err(std::io::Error::other("batch read out of index order"));
        }
        // SAFETY: the kernel wrote `got` values (checked by their keys)
        // after the `out.len()` already there; `T: Pod` takes any bytes.
        unsafe { out.set_len(out.len() + got) };
        match err {
            None => token_in = token_out,
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Some(e) => return Err(e),
        }
        if got == 0 {
            break;
        }
    }
    if out.len() != total {
        return Err(std::io::Error::other(format!(
            "batch read {} of {total} values",
            out.len()
        )));
    }
    Ok(out)
}

/// The leading members of `union bpf_attr` for `BPF_PROG_LOAD` (the kernel
/// takes a shorter attribute whose missing tail would be zero).
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
}

/// Whether this kernel lets XDP programs call `bpf_xdp_adjust_meta`
/// (some builds refuse the helper to every XDP program: "program of this
/// type cannot use helper"). Probed once by loading a four-instruction
/// XDP program that calls it; the answer is kept for the process.
pub fn xdp_meta_allowed() -> bool {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    *ALLOWED.get_or_init(|| {
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_PROG_TYPE_XDP: u32 = 6;
        const BPF_FUNC_XDP_ADJUST_META: i32 = 54;
        const XDP_PASS: i32 = 2;
        // code, dst | src << 4, offset, immediate.
        let insn = |code: u8, dst: u8, imm: i32| -> u64 {
            u64::from(code) | u64::from(dst) << 8 | u64::from(imm as u32) << 32
        };
        let prog = [
            insn(0xb7, 2, -8),                       // r2 = -8 (r1: the context)
            insn(0x85, 0, BPF_FUNC_XDP_ADJUST_META), // call bpf_xdp_adjust_meta
            insn(0xb7, 0, XDP_PASS),                 // r0 = XDP_PASS
            insn(0x95, 0, 0),                        // exit
        ];
        let license = c"GPL";
        let attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: prog.len() as u32,
            insns: prog.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
        };
        // SAFETY: `attr` is a valid prefix of `bpf_attr` for BPF_PROG_LOAD
        // whose pointers (instructions, license) outlive the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &raw const attr,
                std::mem::size_of::<ProgLoadAttr>(),
            )
        };
        if fd < 0 {
            return false;
        }
        // SAFETY: the kernel just returned this descriptor to us alone.
        drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        true
    })
}
