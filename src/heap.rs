//! Giving freed heap back to the system. A full sync at 10,000 services
//! builds tens of MiB that live only for that sync (the list's records,
//! every ring of the plan); glibc's allocator keeps what is freed in its
//! arenas, so without a trim the daemon's resident size stays at that
//! peak for good. One of the two modules allowed `unsafe` (with
//! `bpfsys`): a call into the C allocator.
#![allow(unsafe_code)]

/// Returns the allocator's free memory to the kernel (glibc's
/// `malloc_trim`, which also releases free pages inside its heaps). Costs
/// a walk of the free lists: for after a full sync, not every event.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` has no preconditions; it only works on the
    // allocator's own free lists, under the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
