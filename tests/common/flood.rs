//! A random-source packet flood for the data path tests: IPv4 TCP SYNs,
//! TCP ACKs and UDP datagrams from random addresses of a prefix and random
//! ports, sent to one destination from inside a network namespace for a
//! fixed time, through raw sockets (`IPPROTO_RAW`, i.e. `IP_HDRINCL`) on
//! one or more threads.
//!
//! It plays `hping3 --flood --rand-source` (the tool of the bug reports)
//! without the dependency and with exact counts: what a test asserts about
//! the product under a flood is only meaningful next to how many packets
//! were offered, and at what rate.
//!
//! The hot loop allocates nothing and makes one `sendmmsg` per batch:
//! every packet is a copy of a pre-built template whose checksums are
//! pre-summed over the constant fields, so only the random fields (source
//! address and port, IP id, sequence numbers) are added per packet. The
//! random numbers come from a wyrand generator per thread.
#![allow(dead_code)] // a reusable generator: each test uses a subset

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, Socket, Type};

/// Relative weights of the packet kinds (not necessarily summing to
/// anything; a zero weight disables a kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    pub syn: u32,
    pub ack: u32,
    pub udp: u32,
}

impl Default for Mix {
    /// A third each.
    fn default() -> Self {
        Mix {
            syn: 1,
            ack: 1,
            udp: 1,
        }
    }
}

/// What to send, from where, for how long.
#[derive(Clone, Debug)]
pub struct FloodSpec {
    /// Network namespace (a name under /run/netns) the senders run in.
    pub ns: String,
    pub dst: Ipv4Addr,
    /// Destination port of the SYNs and ACKs.
    pub tcp_port: u16,
    /// Destination port of the UDP datagrams.
    pub udp_port: u16,
    /// Source addresses are random hosts of `src_net/src_prefix`.
    pub src_net: Ipv4Addr,
    pub src_prefix: u8,
    pub mix: Mix,
    /// Sender threads (each with its own raw socket).
    pub threads: usize,
    pub duration: Duration,
}

impl FloodSpec {
    /// A third each of SYN/ACK/UDP from 10.250.0.0/16 on one thread.
    pub fn new(ns: &str, dst: Ipv4Addr, tcp_port: u16, udp_port: u16, duration: Duration) -> Self {
        FloodSpec {
            ns: ns.to_string(),
            dst,
            tcp_port,
            udp_port,
            src_net: Ipv4Addr::new(10, 250, 0, 0),
            src_prefix: 16,
            mix: Mix::default(),
            threads: 1,
            duration,
        }
    }
}

/// Packets the kernel accepted, by kind, and how long sending took.
#[derive(Clone, Debug, Default)]
pub struct FloodReport {
    pub syn: u64,
    pub ack: u64,
    pub udp: u64,
    /// Batches the kernel refused for lack of buffer space (retried with
    /// fresh packets, not counted as sent).
    pub busy: u64,
    /// The longest time one batch took (building it and the `sendmmsg`),
    /// over all senders: a sender that stalls (descheduled, or held in
    /// the kernel's packet processing) shows here.
    pub longest_batch: Duration,
    /// From the start until the last sender stopped.
    pub elapsed: Duration,
    /// The first hard error of any sender (it stopped there).
    pub error: Option<String>,
}

impl FloodReport {
    pub fn sent(&self) -> u64 {
        self.syn + self.ack + self.udp
    }

    /// Achieved rate, packets per second.
    pub fn pps(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.sent() as f64 / s
        } else {
            0.0
        }
    }
}

/// Counters the senders add to once per batch.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    syn: AtomicU64,
    ack: AtomicU64,
    udp: AtomicU64,
    busy: AtomicU64,
    longest_batch_ns: AtomicU64,
}

/// A running flood; dropping it stops the senders and joins them.
pub struct Flood {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Result<(), String>>>,
    started: Instant,
    duration: Duration,
}

/// Packets per `sendmmsg`.
const BATCH: usize = 64;
/// Room for the largest template.
const BUF: usize = 64;
/// A sender blocked this long on a full socket buffer gives up the batch
/// and checks its deadline again.
const SEND_TIMEOUT: Duration = Duration::from_millis(100);
/// How long a sender may take to notice its deadline or the stop flag.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long `start` waits for every sender to have its socket.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);

impl Flood {
    /// Starts the senders; returns once each has entered the namespace
    /// and opened its socket, or the first setup error.
    pub fn start(spec: &FloodSpec) -> Result<Flood, String> {
        if !(1..=64).contains(&spec.threads) {
            return Err(format!("threads = {}: want 1..=64", spec.threads));
        }
        if !(1..=30).contains(&spec.src_prefix) {
            return Err(format!("source prefix /{}: want /1../30", spec.src_prefix));
        }
        if u64::from(spec.mix.syn) + u64::from(spec.mix.ack) + u64::from(spec.mix.udp) == 0 {
            return Err("mix: every weight is zero".into());
        }
        let shared = Arc::new(Shared::default());
        let started = Instant::now();
        let deadline = started + spec.duration;
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        let mut flood = Flood {
            shared: shared.clone(),
            threads: Vec::with_capacity(spec.threads),
            started,
            duration: spec.duration,
        };
        for i in 0..spec.threads {
            let spec = spec.clone();
            let shared = shared.clone();
            let tx = tx.clone();
            let h = thread::Builder::new()
                .name(format!("flood-{i}"))
                .spawn(move || {
                    let seed = seed(i);
                    let sender = match Sender::new(&spec, seed) {
                        Ok(s) => {
                            let _ = tx.send(Ok(()));
                            s
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.clone()));
                            return Err(e);
                        }
                    };
                    sender.run(&shared, deadline)
                })
                .map_err(|e| format!("spawn flood thread: {e}"))?;
            flood.threads.push(h);
        }
        let setup_deadline = Instant::now() + SETUP_TIMEOUT;
        for _ in 0..spec.threads {
            let left = setup_deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(format!("flood senders not ready in {SETUP_TIMEOUT:?}: {e}")),
            }
        }
        Ok(flood)
    }

    /// Packets sent so far (all kinds).
    pub fn sent(&self) -> u64 {
        let s = &self.shared;
        s.syn.load(Ordering::Relaxed)
            + s.ack.load(Ordering::Relaxed)
            + s.udp.load(Ordering::Relaxed)
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Waits until the senders reach the end of the duration (they stop by
    /// themselves), then reports.
    pub fn wait(self) -> FloodReport {
        let end = self.started + self.duration;
        self.finish(end)
    }

    /// Stops the senders now and reports.
    pub fn stop(self) -> FloodReport {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.finish(Instant::now())
    }

    fn finish(mut self, end: Instant) -> FloodReport {
        // A sender checks its deadline and the stop flag after every batch,
        // and a batch blocks for at most SEND_TIMEOUT: this is plenty.
        let mut error = self.reap(end + STOP_GRACE);
        let elapsed = self.started.elapsed();
        let s = &self.shared;
        if error.is_none() && !self.threads.is_empty() {
            error = Some(format!(
                "{} flood sender(s) did not stop within {STOP_GRACE:?} of their deadline",
                self.threads.len()
            ));
        }
        FloodReport {
            syn: s.syn.load(Ordering::Relaxed),
            ack: s.ack.load(Ordering::Relaxed),
            udp: s.udp.load(Ordering::Relaxed),
            busy: s.busy.load(Ordering::Relaxed),
            longest_batch: Duration::from_nanos(s.longest_batch_ns.load(Ordering::Relaxed)),
            elapsed,
            error,
        }
    }

    /// Waits until `limit` for the senders to end (after that, stops them),
    /// joins those that ended and returns the first error of any. A
    /// sender still running is left in `threads`.
    fn reap(&mut self, limit: Instant) -> Option<String> {
        while !self.threads.iter().all(JoinHandle::is_finished) && Instant::now() < limit {
            thread::sleep(Duration::from_millis(5));
        }
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut error = None;
        let (done, running): (Vec<_>, Vec<_>) =
            self.threads.drain(..).partition(JoinHandle::is_finished);
        self.threads = running;
        for h in done {
            let e = match h.join() {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => "a flood sender panicked".to_string(),
            };
            error.get_or_insert(e);
        }
        error
    }
}

impl Drop for Flood {
    /// Stops the senders; one that does not end within `STOP_GRACE` is
    /// left detached rather than waited for without a bound.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.reap(Instant::now() + STOP_GRACE);
    }
}

/// A different stream per thread and per run.
fn seed(thread: usize) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ ((thread as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) ^ u64::from(std::process::id())
}

/// wyrand: one multiply per 64 random bits, statistically fine for
/// spreading flows over hash buckets and port ranges.
pub struct WyRand(u64);

impl WyRand {
    pub fn new(seed: u64) -> Self {
        WyRand(seed)
    }

    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }

    /// Uniform in `0..n` (multiply-shift, no division).
    #[inline(always)]
    pub fn below(&mut self, n: u32) -> u32 {
        ((u64::from(self.next_u64() as u32) * u64::from(n)) >> 32) as u32
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Syn,
    Ack,
    Udp,
}

const IP_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// The SYN's only option: MSS 1460, as a real client's SYN carries one.
const SYN_OPTS: [u8; 4] = [2, 4, 0x05, 0xb4];
const UDP_PAYLOAD: &[u8; 16] = b"meshlb-flood-udp";
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// One kind of packet, complete but for its random fields, with both
/// checksums pre-summed over everything else.
#[derive(Clone)]
pub struct Template {
    pub kind: Kind,
    bytes: [u8; BUF],
    len: usize,
    /// One's-complement sum of the IP header with id, source and checksum
    /// zero.
    ip_sum: u32,
    /// The same for the pseudo-header and L4 segment with source address,
    /// source port, sequence numbers and checksum zero.
    l4_sum: u32,
}

/// Sum of big-endian 16-bit words (an odd last byte is padded with zero).
fn sum16(b: &[u8]) -> u32 {
    let mut s = 0u32;
    let mut it = b.chunks_exact(2);
    for w in &mut it {
        s += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = it.remainder() {
        s += u32::from(*last) << 8;
    }
    s
}

/// Folds the carries of a one's-complement sum into 16 bits.
#[inline(always)]
fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

impl Template {
    pub fn new(kind: Kind, dst: Ipv4Addr, dport: u16) -> Template {
        let mut b = [0u8; BUF];
        let (proto, l4_len) = match kind {
            Kind::Syn => (libc::IPPROTO_TCP as u8, TCP_HLEN + SYN_OPTS.len()),
            Kind::Ack => (libc::IPPROTO_TCP as u8, TCP_HLEN),
            Kind::Udp => (libc::IPPROTO_UDP as u8, UDP_HLEN + UDP_PAYLOAD.len()),
        };
        let len = IP_HLEN + l4_len;
        b[0] = 0x45;
        b[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        b[6] = 0x40; // DF, as a real stack sets it
        b[8] = 64;
        b[9] = proto;
        b[16..20].copy_from_slice(&dst.octets());
        let l4 = &mut b[IP_HLEN..len];
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        match kind {
            Kind::Syn | Kind::Ack => {
                let opts = if kind == Kind::Syn { SYN_OPTS.len() } else { 0 };
                l4[12] = (((TCP_HLEN + opts) / 4) as u8) << 4;
                l4[13] = if kind == Kind::Syn { TCP_SYN } else { TCP_ACK };
                l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
                l4[TCP_HLEN..TCP_HLEN + opts].copy_from_slice(&SYN_OPTS[..opts]);
            }
            Kind::Udp => {
                l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                l4[UDP_HLEN..].copy_from_slice(UDP_PAYLOAD);
            }
        }
        let ip_sum = sum16(&b[..IP_HLEN]);
        // Pseudo-header: source (added per packet), destination, protocol,
        // L4 length.
        let l4_sum =
            sum16(&dst.octets()) + u32::from(proto) + l4_len as u32 + sum16(&b[IP_HLEN..len]);
        Template {
            kind,
            bytes: b,
            len,
            ip_sum,
            l4_sum,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Writes the packet with these random fields into `buf`, checksums
    /// included; returns its length.
    #[inline(always)]
    pub fn fill(
        &self,
        buf: &mut [u8; BUF],
        src: u32,
        sport: u16,
        id: u16,
        seq: u32,
        ack: u32,
    ) -> usize {
        *buf = self.bytes;
        let (src_hi, src_lo) = (src >> 16, src & 0xffff);
        buf[4..6].copy_from_slice(&id.to_be_bytes());
        buf[12..16].copy_from_slice(&src.to_be_bytes());
        let ip = fold(self.ip_sum + u32::from(id) + src_hi + src_lo);
        buf[10..12].copy_from_slice(&(!ip).to_be_bytes());
        let l4 = &mut buf[IP_HLEN..];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        let mut sum = self.l4_sum + src_hi + src_lo + u32::from(sport);
        match self.kind {
            Kind::Syn | Kind::Ack => {
                // A SYN acknowledges nothing.
                let ack = if self.kind == Kind::Ack { ack } else { 0 };
                l4[4..8].copy_from_slice(&seq.to_be_bytes());
                l4[8..12].copy_from_slice(&ack.to_be_bytes());
                sum += (seq >> 16) + (seq & 0xffff) + (ack >> 16) + (ack & 0xffff);
                l4[16..18].copy_from_slice(&(!fold(sum)).to_be_bytes());
            }
            Kind::Udp => {
                // Zero means "no checksum" in UDP: its complement stands in.
                let c = match !fold(sum) {
                    0 => 0xffff,
                    c => c,
                };
                l4[6..8].copy_from_slice(&c.to_be_bytes());
            }
        }
        self.len
    }
}

/// The packet stream of one sender: kinds by the mix, random sources.
pub struct Generator {
    templates: [Template; 3],
    /// Cumulative weights of SYN, ACK, UDP.
    cut: [u32; 3],
    net: u32,
    host_mask: u32,
    rng: WyRand,
}

impl Generator {
    pub fn new(spec: &FloodSpec, seed: u64) -> Generator {
        let m = spec.mix;
        let host_mask = u32::MAX >> spec.src_prefix;
        Generator {
            templates: [
                Template::new(Kind::Syn, spec.dst, spec.tcp_port),
                Template::new(Kind::Ack, spec.dst, spec.tcp_port),
                Template::new(Kind::Udp, spec.dst, spec.udp_port),
            ],
            cut: [m.syn, m.syn + m.ack, m.syn + m.ack + m.udp],
            net: u32::from(spec.src_net) & !host_mask,
            host_mask,
            rng: WyRand::new(seed),
        }
    }

    /// Writes the next packet into `buf`: its kind and length.
    #[inline(always)]
    pub fn next(&mut self, buf: &mut [u8; BUF]) -> (Kind, usize) {
        let i = self.pick();
        let r1 = self.rng.next_u64();
        let r2 = self.rng.next_u64();
        let src = self.source(r1 as u32);
        // Source ports 1024..=65535.
        let sport = 1024 + ((((r1 >> 32) & 0xffff) * 64512) >> 16) as u16;
        let id = (r1 >> 48) as u16;
        let t = &self.templates[i];
        let len = t.fill(buf, src, sport, id, r2 as u32, (r2 >> 32) as u32);
        (t.kind, len)
    }

    /// Index into `templates`, by the mix.
    #[inline(always)]
    fn pick(&mut self) -> usize {
        let r = self.rng.below(self.cut[2]);
        if r < self.cut[0] {
            0
        } else if r < self.cut[1] {
            1
        } else {
            2
        }
    }

    /// A host of the source prefix: never its all-zeros or all-ones
    /// address, which a router may treat as the subnet's own.
    #[inline(always)]
    fn source(&self, r: u32) -> u32 {
        let mut host = r & self.host_mask;
        if host == 0 || host == self.host_mask {
            host ^= 1;
        }
        self.net | host
    }
}

/// One sender thread: its raw socket and packet stream.
struct Sender {
    sock: Socket,
    dst: libc::sockaddr_in,
    gen: Generator,
}

impl Sender {
    /// Enters the namespace (this thread only) and opens the raw socket.
    fn new(spec: &FloodSpec, seed: u64) -> Result<Sender, String> {
        let path = format!("/run/netns/{}", spec.ns);
        let f = File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
        setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns({path}): {e}"))?;
        // IPPROTO_RAW implies IP_HDRINCL: the kernel sends our header as
        // is, the spoofed source included.
        let sock = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .map_err(|e| format!("raw socket in {}: {e}", spec.ns))?;
        // A full buffer blocks a batch briefly rather than failing it.
        let _ = sock.set_send_buffer_size(4 << 20);
        sock.set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
        let dst = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(spec.dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        Ok(Sender {
            sock,
            dst,
            gen: Generator::new(spec, seed),
        })
    }

    /// Sends batches until the deadline or the stop flag.
    fn run(mut self, shared: &Shared, deadline: Instant) -> Result<(), String> {
        let fd = self.sock.as_raw_fd();
        let mut bufs = vec![[0u8; BUF]; BATCH];
        let mut kinds = [Kind::Syn; BATCH];
        let mut lens = [0usize; BATCH];
        // SAFETY: iovec and mmsghdr are plain C structs for which all-zero
        // (null pointers, zero lengths) is valid; every pointer is set
        // before each call.
        let mut iov: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; BATCH];
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
        let mut last = Instant::now();
        let mut longest = Duration::ZERO;
        loop {
            let now = Instant::now();
            longest = longest.max(now - last);
            last = now;
            if shared.stop.load(Ordering::Relaxed) || now >= deadline {
                shared
                    .longest_batch_ns
                    .fetch_max(longest.as_nanos() as u64, Ordering::Relaxed);
                return Ok(());
            }
            for i in 0..BATCH {
                (kinds[i], lens[i]) = self.gen.next(&mut bufs[i]);
            }
            // The pointers are taken afresh for every call, from the
            // buffers as they are now.
            for i in 0..BATCH {
                iov[i] = libc::iovec {
                    iov_base: bufs[i].as_mut_ptr().cast(),
                    iov_len: lens[i],
                };
                let h = &mut msgs[i].msg_hdr;
                h.msg_name = std::ptr::addr_of_mut!(self.dst).cast();
                h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                h.msg_iov = &raw mut iov[i];
                h.msg_iovlen = 1;
            }
            // SAFETY: `msgs` holds BATCH headers, each pointing at one
            // live iovec over a live buffer and at `self.dst`; nothing
            // moves or is freed during the call.
            let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as libc::c_uint, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    // A full socket buffer or device: fresh packets next time.
                    Some(libc::EAGAIN | libc::ENOBUFS | libc::EINTR) => {
                        shared.busy.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    _ => return Err(format!("sendmmsg: {e}")),
                }
            }
            let mut per = [0u64; 3];
            for k in &kinds[..n as usize] {
                per[*k as usize] += 1;
            }
            shared
                .syn
                .fetch_add(per[Kind::Syn as usize], Ordering::Relaxed);
            shared
                .ack
                .fetch_add(per[Kind::Ack as usize], Ordering::Relaxed);
            shared
                .udp
                .fetch_add(per[Kind::Udp as usize], Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum of a complete header/segment (pseudo-header included
    /// for L4) sums to 0xffff when it is right.
    fn verify(pkt: &[u8]) {
        assert_eq!(fold(sum16(&pkt[..IP_HLEN])), 0xffff, "IP header checksum");
        let len = u16::from_be_bytes([pkt[2], pkt[3]]) as usize;
        assert_eq!(len, pkt.len(), "IP total length");
        let l4 = &pkt[IP_HLEN..];
        let pseudo = sum16(&pkt[12..20]) + u32::from(pkt[9]) + l4.len() as u32;
        assert_eq!(
            fold(pseudo + sum16(l4)),
            0xffff,
            "L4 checksum of {pkt:02x?}"
        );
    }

    #[test]
    fn generated_packets_have_correct_checksums() {
        let dst = Ipv4Addr::new(10, 96, 0, 10);
        let mut rng = WyRand::new(42);
        let mut buf = [0u8; BUF];
        for kind in [Kind::Syn, Kind::Ack, Kind::Udp] {
            let t = Template::new(kind, dst, 80);
            for _ in 0..10_000 {
                let (a, b) = (rng.next_u64(), rng.next_u64());
                let n = t.fill(
                    &mut buf,
                    a as u32,
                    (a >> 32) as u16,
                    (a >> 48) as u16,
                    b as u32,
                    (b >> 32) as u32,
                );
                verify(&buf[..n]);
            }
            // Extremes: all-ones fields make the most carries.
            let n = t.fill(&mut buf, u32::MAX, u16::MAX, u16::MAX, u32::MAX, u32::MAX);
            verify(&buf[..n]);
            let n = t.fill(&mut buf, 0, 0, 0, 0, 0);
            verify(&buf[..n]);
        }
    }

    #[test]
    fn sources_stay_in_the_prefix_and_kinds_follow_the_mix() {
        let dst = Ipv4Addr::new(10, 96, 0, 10);
        let mut spec = FloodSpec::new("unused", dst, 80, 53, Duration::ZERO);
        spec.mix = Mix {
            syn: 2,
            ack: 1,
            udp: 1,
        };
        let host_mask = u32::MAX >> spec.src_prefix;
        let net = u32::from(spec.src_net);
        let mut g = Generator::new(&spec, 7);
        let mut buf = [0u8; BUF];
        let mut per = [0u32; 3];
        for _ in 0..40_000 {
            let (kind, n) = g.next(&mut buf);
            per[kind as usize] += 1;
            let pkt = &buf[..n];
            let src = u32::from_be_bytes([pkt[12], pkt[13], pkt[14], pkt[15]]);
            assert_eq!(src & !host_mask, net, "{}", Ipv4Addr::from(src));
            assert!(src & host_mask != 0 && src & host_mask != host_mask);
            let sport = u16::from_be_bytes([pkt[20], pkt[21]]);
            assert!(sport >= 1024, "source port {sport}");
            verify(pkt);
        }
        // 20000 / 10000 / 10000 expected; 5% slack.
        assert!((19_000..21_000).contains(&per[0]), "{per:?}");
        assert!((9_500..10_500).contains(&per[1]), "{per:?}");
        assert!((9_500..10_500).contains(&per[2]), "{per:?}");
    }
}
