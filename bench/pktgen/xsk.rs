//! The generator's AF_XDP transmit path (copy mode): frames written once
//! into a UMEM and handed to the kernel through the TX ring, one `sendto`
//! kick per batch, no syscall and no socket buffer per frame.
//!
//! In copy mode (`XDP_COPY`, what a veth offers) each kick makes the
//! kernel's generic xmit build an skb per descriptor (up to its TX batch,
//! 32 frames) and hand it straight to the driver (`__dev_direct_xmit`: no
//! qdisc); the skb's destructor puts the frame's address on the completion
//! ring. The peer of a veth then takes the skb like any other packet.
//!
//! The rings are the kernel's single-producer/single-consumer rings, driven
//! as libxdp's `xsk.h` helpers drive them: indices are free-running `u32`s,
//! the side that reads the other's index does so with acquire ordering and
//! publishes its own with release ordering. All `unsafe` of the generator
//! is in this module: the socket, the mappings and the ring accesses.

#![allow(
    unsafe_code,
    reason = "AF_XDP has no safe binding here: raw socket options, mmap of the kernel's rings, atomics over shared memory"
)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// UMEM frames and their size: 8 MiB, every frame holding the template.
const FRAMES: u32 = 4096;
const FRAME_SIZE: u32 = 2048;
/// Ring sizes (powers of two). The fill ring is required by bind even for
/// a socket that only transmits; it stays empty.
const TX_RING: u32 = 2048;
const COMPLETION_RING: u32 = FRAMES;
const FILL_RING: u32 = 64;
/// Descriptors submitted per kick.
const BATCH: u32 = 64;
/// UDP source ports the frames are spread over (the low bits), as the
/// live-frames program `meshlb_gen` does.
const FLOWS: u16 = 16;
/// Offset of the UDP source port in the template (Ethernet + IPv4 without
/// options).
const SPORT_AT: usize = 14 + 20;

/// What a run did.
pub struct Stats {
    /// Frames whose transmission completed (their addresses came back on
    /// the completion ring), drops at the first device included.
    pub completed: u64,
    /// Descriptors handed to the kernel (completed or not).
    pub submitted: u64,
    /// Seconds from the first kick to the deadline.
    pub elapsed_s: f64,
    /// `sendto` kicks.
    pub kicks: u64,
    /// Kicks answered EAGAIN/ENOBUFS (TX batch used up, queue stopped).
    pub again: u64,
    /// Kicks answered EBUSY: the device dropped a frame.
    pub dropped: u64,
}

/// An anonymous or a socket's mapping, unmapped on drop.
struct Map {
    ptr: NonNull<u8>,
    len: usize,
}

impl Map {
    fn new(fd: Option<&OwnedFd>, len: usize, offset: u64, what: &str) -> Result<Map> {
        let (flags, raw) = match fd {
            Some(f) => (libc::MAP_SHARED | libc::MAP_POPULATE, f.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping at an address the kernel picks; nothing
        // else refers to it until it is returned.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error()).with_context(|| format!("mmap of {what}"));
        }
        let ptr = NonNull::new(p.cast::<u8>()).context("mmap returned null")?;
        Ok(Map { ptr, len })
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing borrowed from it outlives
        // `self` (rings hold raw pointers only while their `Map` lives).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One of the socket's rings, mapped: its two indices and its entries.
/// `cached_*` are this side's view, as in libxdp.
struct Ring {
    map: Map,
    producer: usize,
    consumer: usize,
    desc: usize,
    size: u32,
    cached_prod: u32,
    cached_cons: u32,
}

impl Ring {
    fn new(
        fd: &OwnedFd,
        off: &libc::xdp_ring_offset,
        size: u32,
        entry: usize,
        pgoff: u64,
        what: &str,
    ) -> Result<Ring> {
        let len = off.desc as usize + size as usize * entry;
        let map = Map::new(Some(fd), len, pgoff, what)?;
        let mut r = Ring {
            map,
            producer: off.producer as usize,
            consumer: off.consumer as usize,
            desc: off.desc as usize,
            size,
            cached_prod: 0,
            cached_cons: 0,
        };
        r.cached_prod = r.index(r.producer).load(Ordering::Acquire);
        r.cached_cons = r.index(r.consumer).load(Ordering::Acquire);
        Ok(r)
    }

    #[allow(
        clippy::cast_ptr_alignment,
        reason = "the kernel lays its rings out aligned: page-aligned mapping, offsets of aligned fields"
    )]
    fn index(&self, at: usize) -> &AtomicU32 {
        // SAFETY: `at` is the kernel's offset of a 4-byte aligned `u32`
        // index inside this mapping, which lives as long as `self`; the
        // kernel accesses it atomically too.
        unsafe { AtomicU32::from_ptr(self.map.ptr.as_ptr().add(at).cast::<u32>()) }
    }

    /// Producer side (TX): how many of `n` entries are free, looking at
    /// the kernel's consumer index only when the cached view is short.
    fn free(&mut self, n: u32) -> u32 {
        let mut free = self.cached_cons.wrapping_sub(self.cached_prod);
        if free < n {
            self.cached_cons = self
                .index(self.consumer)
                .load(Ordering::Acquire)
                .wrapping_add(self.size);
            free = self.cached_cons.wrapping_sub(self.cached_prod);
        }
        free.min(n)
    }

    /// Producer side: write descriptor `i` past the cached producer index.
    #[allow(
        clippy::cast_ptr_alignment,
        reason = "the kernel lays its rings out aligned: page-aligned mapping, offsets of aligned fields"
    )]
    fn put_desc(&mut self, i: u32, addr: u64, len: u32) {
        let slot = (self.cached_prod.wrapping_add(i) & (self.size - 1)) as usize;
        // SAFETY: `slot` < `size`, and the TX ring's entries (`xdp_desc`,
        // 16 bytes, 8-aligned) start at `desc` in this mapping; the entry
        // is free (`free` said so), so the kernel does not read it until
        // `submit` publishes it.
        unsafe {
            self.map
                .ptr
                .as_ptr()
                .add(self.desc)
                .cast::<libc::xdp_desc>()
                .add(slot)
                .write(libc::xdp_desc {
                    addr,
                    len,
                    options: 0,
                });
        }
    }

    /// Producer side: publish `n` written entries.
    fn submit(&mut self, n: u32) {
        self.cached_prod = self.cached_prod.wrapping_add(n);
        self.index(self.producer)
            .store(self.cached_prod, Ordering::Release);
    }

    /// Consumer side (completion): how many entries are ready, up to `n`.
    fn ready(&mut self, n: u32) -> u32 {
        let mut ready = self.cached_prod.wrapping_sub(self.cached_cons);
        if ready == 0 {
            self.cached_prod = self.index(self.producer).load(Ordering::Acquire);
            ready = self.cached_prod.wrapping_sub(self.cached_cons);
        }
        ready.min(n)
    }

    /// Consumer side: the address in entry `i` past the cached consumer.
    #[allow(
        clippy::cast_ptr_alignment,
        reason = "the kernel lays its rings out aligned: page-aligned mapping, offsets of aligned fields"
    )]
    fn addr(&self, i: u32) -> u64 {
        let slot = (self.cached_cons.wrapping_add(i) & (self.size - 1)) as usize;
        // SAFETY: `slot` < `size`; the completion ring's entries (`u64`)
        // start at `desc`; `ready` saw the kernel publish this one.
        unsafe {
            self.map
                .ptr
                .as_ptr()
                .add(self.desc)
                .cast::<u64>()
                .add(slot)
                .read()
        }
    }

    /// Consumer side: give `n` read entries back to the kernel.
    fn release(&mut self, n: u32) {
        self.cached_cons = self.cached_cons.wrapping_add(n);
        self.index(self.consumer)
            .store(self.cached_cons, Ordering::Release);
    }
}

/// An AF_XDP socket bound in copy mode to one queue of one interface,
/// with its UMEM full of the template. Fields drop in order: the rings'
/// mappings, the socket, then the UMEM the kernel had pinned.
pub struct Xsk {
    tx: Ring,
    cq: Ring,
    _fq: Ring,
    fd: OwnedFd,
    _umem: Map,
    frame_len: u32,
}

fn setsockopt<T>(fd: &OwnedFd, opt: libc::c_int, v: &T, what: &str) -> Result<()> {
    // SAFETY: `v` is a live `T` of the size passed, as the option expects.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            opt,
            std::ptr::from_ref(v).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setsockopt {what}"));
    }
    Ok(())
}

impl Xsk {
    /// The socket in the calling thread's network namespace, on queue
    /// `queue` of interface `ifindex`; frame `i` of the UMEM is `template`
    /// with UDP source port low bits `i % 16`.
    pub fn open(ifindex: u32, queue: u32, template: &[u8]) -> Result<Xsk> {
        anyhow::ensure!(
            template.len() <= FRAME_SIZE as usize && template.len() >= SPORT_AT + 2,
            "template frame of {} bytes does not fit a {FRAME_SIZE}-byte UMEM frame",
            template.len()
        );
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("socket(AF_XDP)");
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let umem_len = (FRAMES * FRAME_SIZE) as usize;
        let umem = Map::new(None, umem_len, 0, "the UMEM")?;
        let sport = u16::from_be_bytes([template[SPORT_AT], template[SPORT_AT + 1]]);
        for i in 0..FRAMES {
            let low = i as u16 % FLOWS;
            let port = ((sport & !(FLOWS - 1)) | low).to_be_bytes();
            let at = (i * FRAME_SIZE) as usize;
            // SAFETY: frame `i` lies inside the UMEM mapping, which only
            // this thread touches until the socket is bound.
            let frame = unsafe {
                std::slice::from_raw_parts_mut(umem.ptr.as_ptr().add(at), template.len())
            };
            frame.copy_from_slice(template);
            frame[SPORT_AT..SPORT_AT + 2].copy_from_slice(&port);
        }
        let reg = libc::xdp_umem_reg {
            addr: umem.ptr.as_ptr() as u64,
            len: umem_len as u64,
            chunk_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(&fd, libc::XDP_UMEM_REG, &reg, "XDP_UMEM_REG")?;
        setsockopt(
            &fd,
            libc::XDP_UMEM_FILL_RING,
            &FILL_RING,
            "XDP_UMEM_FILL_RING",
        )?;
        setsockopt(
            &fd,
            libc::XDP_UMEM_COMPLETION_RING,
            &COMPLETION_RING,
            "XDP_UMEM_COMPLETION_RING",
        )?;
        setsockopt(&fd, libc::XDP_TX_RING, &TX_RING, "XDP_TX_RING")?;

        // SAFETY: all-zero is a valid `xdp_mmap_offsets` (plain integers).
        let mut off: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
        // SAFETY: `off` is writable for `len` bytes, and `len` is ours.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                std::ptr::from_mut(&mut off).cast(),
                &raw mut len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error()).context("getsockopt XDP_MMAP_OFFSETS");
        }
        anyhow::ensure!(
            len as usize == size_of::<libc::xdp_mmap_offsets>(),
            "XDP_MMAP_OFFSETS of {len} bytes: a kernel without ring flags (before 5.4)"
        );
        let desc = size_of::<libc::xdp_desc>();
        let tx = Ring::new(
            &fd,
            &off.tx,
            TX_RING,
            desc,
            libc::XDP_PGOFF_TX_RING as u64,
            "the TX ring",
        )?;
        let cq = Ring::new(
            &fd,
            &off.cr,
            COMPLETION_RING,
            8,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING,
            "the completion ring",
        )?;
        let fq = Ring::new(
            &fd,
            &off.fr,
            FILL_RING,
            8,
            libc::XDP_UMEM_PGOFF_FILL_RING,
            "the fill ring",
        )?;

        let sa = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: libc::XDP_COPY,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        // SAFETY: `sa` is a complete `sockaddr_xdp` of the length passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&sa).cast(),
                size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error()).with_context(|| {
                format!("bind AF_XDP (copy mode) to ifindex {ifindex} queue {queue}")
            });
        }
        Ok(Xsk {
            tx,
            cq,
            _fq: fq,
            fd,
            _umem: umem,
            frame_len: template.len() as u32,
        })
    }

    /// `sendto(fd, NULL, 0, MSG_DONTWAIT)`: the kernel transmits what the
    /// TX ring holds (copy mode: up to its batch per call). Ok(Some(errno))
    /// for the answers that only mean "not now".
    fn kick(&self) -> Result<Option<i32>> {
        // SAFETY: a zero-length send with no buffer and no address.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null(),
                0,
            )
        };
        if r >= 0 {
            return Ok(None);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(n @ (libc::EAGAIN | libc::ENOBUFS | libc::EBUSY)) => Ok(Some(n)),
            _ => Err(e).context("sendto kick of the AF_XDP socket"),
        }
    }

    /// Completed frames back onto `free`; how many.
    fn reap(&mut self, free: &mut VecDeque<u64>) -> u64 {
        let n = self.cq.ready(COMPLETION_RING);
        for i in 0..n {
            free.push_back(self.cq.addr(i));
        }
        self.cq.release(n);
        u64::from(n)
    }

    /// Transmit until `deadline`, then wait (at most `settle`) for the
    /// frames already transmitted to complete.
    pub fn send_until(&mut self, deadline: Instant, settle: Duration) -> Result<Stats> {
        // Frames are reused in the order they complete, so every source
        // port keeps its share.
        let mut free: VecDeque<u64> = (0..FRAMES)
            .map(|i| u64::from(i) * u64::from(FRAME_SIZE))
            .collect();
        let mut s = Stats {
            completed: 0,
            submitted: 0,
            elapsed_s: 0.0,
            kicks: 0,
            again: 0,
            dropped: 0,
        };
        let start = Instant::now();
        while Instant::now() < deadline {
            s.completed += self.reap(&mut free);
            let want = BATCH.min(u32::try_from(free.len()).unwrap_or(u32::MAX));
            let n = self.tx.free(want);
            for i in 0..n {
                let addr = free.pop_front().context("free frame list out of step")?;
                self.tx.put_desc(i, addr, self.frame_len);
            }
            if n > 0 {
                self.tx.submit(n);
                s.submitted += u64::from(n);
            }
            s.kicks += 1;
            match self.kick()? {
                Some(libc::EBUSY) => s.dropped += 1,
                Some(_) => s.again += 1,
                None => {}
            }
        }
        s.elapsed_s = start.elapsed().as_secs_f64();
        // What is still in the TX ring was never transmitted (no more
        // kicks); what was transmitted completes as its skb is freed.
        let end = Instant::now() + settle;
        let mut quiet = 0;
        while Instant::now() < end && quiet < 1000 {
            let n = self.reap(&mut free);
            s.completed += n;
            quiet = if n == 0 { quiet + 1 } else { 0 };
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(s)
    }
}
