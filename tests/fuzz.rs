//! A packet fuzzer for the XDP load balancer: at least a million random and
//! mutated frames through the real program (BPF_PROG_TEST_RUN), with an
//! invariant checked on every output. The fixture table (`datapath.rs`)
//! pins down what the program does to frames someone thought of; this
//! looks for what it does to the ones nobody did: truncated and padded
//! headers, bad lengths, options, VLAN tags, fragments, extension headers,
//! ICMP errors with short quotes, flipped bytes.
//!
//! The maps persist from frame to frame, and replies and ICMP errors are
//! made from frames the program forwarded, so conntrack, reverse-NAT, SNAT
//! and fragment state builds up as on a node. The oracle knows no state:
//! it decides from a frame's bytes alone what the program may do to it
//! (what is surely not ours must pass untouched, a malformed frame is
//! never forwarded, checksums valid in stay valid out, a frontend's
//! packets only go to that service's backends on the target port).
//!
//! Seeded: `MESHLB_FUZZ_SEED` (decimal or 0x-hex) replays a run; the seed
//! is printed at the start and in every failure. The seed fixes every
//! choice the generator makes, but frames made from the program's outputs
//! follow what it did, and some of that depends on the clock (SNAT ports
//! of embryonic flows age in a second): a replay makes the same frames
//! only as long as the program answers the same. So every failure also
//! shows the frame itself, in hex. Frames that once broke an invariant are
//! kept in `REGRESSIONS` and run first.
//! Runs in its own network namespace (`mlbt-fz-<pid>`, pins under
//! `/sys/fs/bpf/mlbt-fz-<pid>`), removed by a guard even on panic.

#[path = "common/fixture.rs"]
mod fixture;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya::Ebpf;
use meshlb::kernel::pinned::Maps;
use meshlb_common::Counter;

use fixture::{
    fold, hex, load, mangle, program, sum16, with_frag6, Frame, Netns, BE1_MAC, BE3_MAC,
    CLIENT_MAC, CONFIG, FXA_MAC, L4, LB_MAC, SNAT4, SNAT6, SYN, XDP_DROP, XDP_PASS, XDP_REDIRECT,
    XDP_TX,
};

/// Frames per run, at least.
const MIN_FRAMES: u64 = 1_000_000;
/// Wall-clock budget: a run that has not reached `MIN_FRAMES` by then
/// stops and fails.
const TIME_BUDGET: Duration = Duration::from_secs(150);
/// Fresh program and maps this often. The flow maps are LRU (they never
/// refuse an insert), but a long run would otherwise only ever see a
/// crowded table; this way it sees empty ones too.
const RELOAD_EVERY: u64 = 200_000;
const MAX_FRAME: usize = 1500;
const OUT_BUF: usize = 4096;
/// The node's addresses: node ports answer on them (the SNAT addresses
/// included, as in `datapath.rs`).
const LOCALS: [&str; 4] = ["10.200.0.1", "fd00:200::1", SNAT4, SNAT6];
const XDP_ABORTED: u32 = 0;
/// `XdpHandoff` in front of a frame XDP hands up for TC to send.
const HANDOFF_LEN: usize = 12;

/// An input that once broke an invariant, replayed before the random
/// frames of every run: its frames in order, on the run's first maps.
struct Regression {
    found: &'static str,
    frames: &'static [&'static str],
}

/// Found by the first runs (seed 0x66eda9022503f1ac and every seed since),
/// all breaking invariant 3: a malformed frame translated and forwarded
/// (or translated and passed up). One cause: the parser checks that a
/// header lies within the frame, not within the IP datagram (IPv4 total
/// length, IPv6 payload length), so the bytes after the datagram (Ethernet
/// padding, or what a short length field leaves out) are read as its
/// TCP/UDP header, IPv6 fragment header or ICMP quote and rewritten, the
/// checksum updates counting bytes no checksum covers. One minimal frame
/// per header it happens with; the random frames that found it were
/// client packets, replies, fragments and ICMP errors whose IP length was
/// shortened, truncated or flipped.
const REGRESSIONS: &[Regression] = &[
    Regression {
        found: "IPv4 TCP SYN to 10.96.0.10:80, total length 30: 10 of the 20 bytes of TCP header in the datagram; DNATed and redirected",
        frames: &["02000000000102000000000208004500001e12344000400613730ac800020a60000a9c400050000003e8000000005002ffff1b850000474554202f20485454502f312e300d0a0d0a"],
    },
    Regression {
        found: "IPv4 UDP to 10.96.0.10:53, total length 24: 4 of the 8 bytes of UDP header in the datagram; DNATed and redirected",
        frames: &["020000000001020000000002080045000018123440004011136e0ac800020a60000ac3500035000c484c70696e67"],
    },
    Regression {
        found: "IPv6 TCP SYN to [fd00:96::10]:8080, payload length 10: half a TCP header; DNATed and redirected",
        frames: &["02000000000102000000000286dd60000000000a0640fd000200000000000000000000000002fd0000960000000000000000000000109c401f90000003e8000000005002ffff14cf0000474554202f20485454502f312e300d0a0d0a"],
    },
    Regression {
        found: "IPv6 first fragment of UDP to [fd00:96::10]:5300, payload length 4: half the fragment header, none of the UDP header; DNATed and redirected",
        frames: &["02000000000102000000000286dd6000000000042c40fd000200000000000000000000000002fd0000960000000000000000000000101100000100001234c35014b4000c4c5770696e67"],
    },
    Regression {
        found: "after a flow to 10.96.0.10:80, an ICMP fragmentation-needed to the VIP quoting its reply, the IPv4 total length ending in the quoted ports (30-byte ICMP message); quote translated past the datagram, redirected to the backend",
        frames: &[
            "02000000000102000000000208004500003a12344000400613570ac800020a60000a9c400050000003e8000000005002ffff1b850000474554202f20485454502f312e300d0a0d0a",
            "0200000000010200000000020800450000325678000040010e240ac800fe0a60000a0304f733000005784500003a12344000400613570a60000a0ac8000200509c40000003e8",
        ],
    },
    Regression {
        found: "after a flow to [fd00:96::10]:8080, an ICMPv6 packet-too-big to the VIP quoting its reply, the payload length ending in the quoted ports; quote translated past the datagram, redirected to the backend",
        frames: &[
            "02000000000102000000000286dd6000000000260640fd000200000000000000000000000002fd0000960000000000000000000000109c401f90000003e8000000005002ffff14cf0000474554202f20485454502f312e300d0a0d0a",
            "02000000000102000000000286dd6000000000323a40fd0002000000000000000000000000fefd0000960000000000000000000000100200784d000005006000000000260640fd000096000000000000000000000010fd0002000000000000000000000000021f909c40000003e8",
        ],
    },
];

// ---------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------

/// SplitMix64: tiny, fast, and good enough to drive a fuzzer; its whole
/// state is one `u64`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn upto(&mut self, n: usize) -> usize {
        self.below(n as u64 + 1) as usize
    }

    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn u8(&mut self) -> u8 {
        self.next() as u8
    }

    fn u16(&mut self) -> u16 {
        self.next() as u16
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend(self.next().to_ne_bytes());
        }
        v.truncate(n);
        v
    }
}

fn seed() -> u64 {
    if let Ok(s) = std::env::var("MESHLB_FUZZ_SEED") {
        let s = s.trim();
        let parsed = match s.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => s.parse(),
        };
        parsed.unwrap_or_else(|_| panic!("MESHLB_FUZZ_SEED={s}: not a u64"))
    } else {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 48)
    }
}

// ---------------------------------------------------------------------
// What the program was given (from CONFIG, through the daemon's model)
// ---------------------------------------------------------------------

/// One published port of a service as the data plane has it.
struct Service {
    proto: u8,
    port: u16,
    vip: Option<IpAddr>,
    /// Address and target port of each backend.
    backends: Vec<(IpAddr, u16)>,
}

struct Model {
    services: Vec<Service>,
    locals: Vec<IpAddr>,
    backend_addrs: Vec<IpAddr>,
}

impl Model {
    fn new() -> Model {
        let cfg = meshlb::source::config::parse(CONFIG).expect("fixture config");
        let locals: BTreeSet<IpAddr> = LOCALS.iter().map(|a| a.parse().unwrap()).collect();
        let desired = cfg.desired_state(locals.clone(), "fixture");
        let services: Vec<Service> = desired
            .services
            .iter()
            .map(|(k, spec)| Service {
                proto: k.proto.number(),
                port: k.port,
                vip: spec.frontends.iter().find_map(|f| f.addr),
                backends: spec.backends.keys().map(|b| (b.addr, b.port)).collect(),
            })
            .collect();
        let backend_addrs: BTreeSet<IpAddr> = services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.0))
            .collect();
        let m = Model {
            services,
            locals: locals.into_iter().collect(),
            backend_addrs: backend_addrs.into_iter().collect(),
        };
        // The oracle's "surely not ours" rests on these ranges: a CONFIG
        // edit that leaves them must fail here, not make the oracle lie.
        for s in &m.services {
            if let Some(v) = s.vip {
                assert!(m.frontend_space(v), "VIP {v} outside the frontend ranges");
            }
        }
        for b in &m.backend_addrs {
            assert!(backend_space(*b), "backend {b} outside the backend ranges");
        }
        m
    }

    /// The service a packet to `dst:dport` is for, looked up as the
    /// program does: the VIP first, then a node port on a local address
    /// (`true`).
    fn frontend(&self, dst: IpAddr, proto: u8, dport: u16) -> Option<(&Service, bool)> {
        let port_proto = |s: &&Service| s.proto == proto && s.port == dport;
        if let Some(s) = self
            .services
            .iter()
            .filter(port_proto)
            .find(|s| s.vip == Some(dst))
        {
            return Some((s, false));
        }
        if !self.locals.contains(&dst) {
            return None;
        }
        self.services.iter().find(port_proto).map(|s| (s, true))
    }

    /// Addresses the program may take for a frontend: the VIP ranges and
    /// this node's addresses.
    fn frontend_space(&self, a: IpAddr) -> bool {
        self.locals.contains(&a)
            || match a {
                IpAddr::V4(a) => u32::from(a) >> 16 == u32::from(Ipv4Addr::new(10, 96, 0, 0)) >> 16,
                IpAddr::V6(a) => u128::from(a) >> 64 == 0xfd00_0096_0000_0000,
            }
    }
}

/// Addresses that may be a backend's: the backend-side ranges of the
/// fixture (10.201.0.0/16, fd00:201::/32). Every reply and SNAT entry the
/// program keeps is keyed by a backend source address.
fn backend_space(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => u32::from(a) >> 16 == u32::from(Ipv4Addr::new(10, 201, 0, 0)) >> 16,
        IpAddr::V6(a) => u128::from(a) >> 96 == 0xfd00_0201,
    }
}

// ---------------------------------------------------------------------
// The oracle: frames read strictly, from their bytes alone
// ---------------------------------------------------------------------

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn addr_at(f: &[u8], at: usize, v4: bool) -> IpAddr {
    if v4 {
        let a: [u8; 4] = f[at..at + 4].try_into().unwrap();
        IpAddr::V4(Ipv4Addr::from(a))
    } else {
        let a: [u8; 16] = f[at..at + 16].try_into().unwrap();
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

const ETH_IP: [u8; 2] = [0x08, 0x00];
const ETH_IP6: [u8; 2] = [0x86, 0xdd];
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMP6: u8 = 58;

/// An IP packet as the oracle reads it.
#[allow(
    clippy::struct_excessive_bools,
    reason = "the header flags the oracle checks"
)]
struct Ip {
    v4: bool,
    src: IpAddr,
    dst: IpAddr,
    /// End of the IPv4 header (what its checksum covers).
    l3_end: usize,
    /// Offset of the upper-layer header.
    l4: usize,
    /// End of the datagram (the frame may be longer: Ethernet padding).
    end: usize,
    /// The upper-layer protocol.
    proto: u8,
    /// A piece of a fragmented datagram (the first or a later one).
    fragment: bool,
    /// A later piece: no upper-layer header.
    later: bool,
    /// No IPv4 options, no IPv6 extension header but one fragment header
    /// right behind the IPv6 header: what the program translates.
    plain: bool,
}

impl Ip {
    fn ports(&self, f: &[u8]) -> Option<(u16, u16)> {
        ((self.proto == TCP || self.proto == UDP) && !self.later)
            .then(|| (be16(f, self.l4), be16(f, self.l4 + 2)))
    }

    fn icmp_error(&self, f: &[u8]) -> bool {
        !self.later
            && match (self.proto, self.v4) {
                (ICMP, true) => matches!(f[self.l4], 3 | 11 | 12),
                (ICMP6, false) => (1..=4).contains(&f[self.l4]),
                _ => false,
            }
    }
}

enum Parsed {
    /// Not IPv4/IPv6 (ARP, VLAN-tagged, runts, anything else).
    NotIp,
    /// An IP frame whose headers are invalid or do not lie within the
    /// datagram: no forwarder may act on it.
    Malformed(&'static str),
    Ip(Ip),
}

/// Reads a frame strictly. Malformed: an IP header field that is invalid
/// (version, IHL, a length that does not fit), or a header the load
/// balancer must read to translate the packet (IPv6 extension/fragment
/// header, the 20 bytes of TCP with a data offset of at least 5, the 8 of
/// UDP, an ICMP error's quoted IP header and ports) that does not lie
/// within the datagram as its IP length says. Bytes past the datagram are
/// Ethernet padding, not packet.
fn parse(f: &[u8]) -> Parsed {
    if f.len() < 14 {
        return Parsed::NotIp;
    }
    let et = [f[12], f[13]];
    let ip = if et == ETH_IP {
        if f.len() < 34 {
            return Parsed::Malformed("truncated IPv4 header");
        }
        if f[14] >> 4 != 4 {
            return Parsed::Malformed("IPv4 version");
        }
        let ihl = (f[14] & 0x0f) as usize * 4;
        if ihl < 20 {
            return Parsed::Malformed("IPv4 header length below 20");
        }
        let tot = be16(f, 16) as usize;
        if tot < ihl {
            return Parsed::Malformed("IPv4 total length below the header");
        }
        if 14 + tot > f.len() {
            return Parsed::Malformed("IPv4 total length beyond the frame");
        }
        let frag = be16(f, 20);
        Ip {
            v4: true,
            src: addr_at(f, 26, true),
            dst: addr_at(f, 30, true),
            l3_end: 14 + ihl,
            l4: 14 + ihl,
            end: 14 + tot,
            proto: f[23],
            fragment: frag & 0x3fff != 0,
            later: frag & 0x1fff != 0,
            plain: ihl == 20,
        }
    } else if et == ETH_IP6 {
        if f.len() < 54 {
            return Parsed::Malformed("truncated IPv6 header");
        }
        if f[14] >> 4 != 6 {
            return Parsed::Malformed("IPv6 version");
        }
        let end = 54 + be16(f, 18) as usize;
        if end > f.len() {
            return Parsed::Malformed("IPv6 payload length beyond the frame");
        }
        let mut ip = Ip {
            v4: false,
            src: addr_at(f, 22, false),
            dst: addr_at(f, 38, false),
            l3_end: 54,
            l4: 54,
            end,
            proto: f[20],
            fragment: false,
            later: false,
            plain: true,
        };
        // A bounded walk: a chain longer than this is not plain anyway.
        for _ in 0..8 {
            let at = ip.l4;
            match ip.proto {
                0 | 43 | 60 | 51 | 135 | 139 | 140 => {
                    if at + 8 > end {
                        return Parsed::Malformed("truncated IPv6 extension header");
                    }
                    let len = if ip.proto == 51 {
                        (f[at + 1] as usize + 2) * 4
                    } else {
                        (f[at + 1] as usize + 1) * 8
                    };
                    if at + len > end {
                        return Parsed::Malformed("truncated IPv6 extension header");
                    }
                    ip.proto = f[at];
                    ip.l4 += len;
                    ip.plain = false;
                }
                44 => {
                    if at + 8 > end {
                        return Parsed::Malformed("truncated IPv6 fragment header");
                    }
                    ip.plain &= at == 54;
                    let off = be16(f, at + 2);
                    ip.fragment = off & 0xfff9 != 0;
                    ip.later = off >> 3 != 0;
                    ip.proto = f[at];
                    ip.l4 += 8;
                    if ip.later {
                        break;
                    }
                }
                _ => break,
            }
        }
        if matches!(ip.proto, 0 | 43 | 44 | 60 | 51 | 135 | 139 | 140) {
            ip.plain = false;
        }
        ip
    } else {
        return Parsed::NotIp;
    };
    if ip.later {
        return Parsed::Ip(ip);
    }
    let len = ip.end - ip.l4;
    let l4 = &f[ip.l4..ip.end];
    match ip.proto {
        TCP if len < 20 => return Parsed::Malformed("truncated TCP header"),
        TCP if l4[12] >> 4 < 5 => return Parsed::Malformed("TCP data offset below 5"),
        UDP if len < 8 => return Parsed::Malformed("truncated UDP header"),
        ICMP | ICMP6 if len < 8 && (ip.proto == ICMP) == ip.v4 => {
            return Parsed::Malformed("truncated ICMP header")
        }
        _ => {}
    }
    if ip.icmp_error(f) && len < 8 + if ip.v4 { 20 } else { 40 } + 4 {
        return Parsed::Malformed("ICMP error quoting less than an IP header and ports");
    }
    Parsed::Ip(ip)
}

/// The one's-complement sum over a pseudo-header and `data`, folded (0:
/// the checksum in `data` is right).
fn l4_sum(src: IpAddr, dst: IpAddr, proto: u8, data: &[u8]) -> u16 {
    let len = data.len() as u32;
    let s = sum16(data)
        + u32::from(proto)
        + (len >> 16)
        + (len & 0xffff)
        + match (src, dst) {
            (IpAddr::V4(a), IpAddr::V4(b)) => sum16(&a.octets()) + sum16(&b.octets()),
            (IpAddr::V6(a), IpAddr::V6(b)) => sum16(&a.octets()) + sum16(&b.octets()),
            _ => unreachable!("one family per packet"),
        };
    fold(s)
}

/// The first wrong checksum of an IP packet, if any: the IPv4 header's,
/// TCP/UDP (not for fragments: theirs covers the whole datagram; UDP
/// without checksum is fine over IPv4 only), ICMP/ICMPv6, and an ICMP
/// error's quoted IPv4 header.
fn checksum_fault(f: &[u8], ip: &Ip) -> Option<&'static str> {
    if ip.v4 && fold(sum16(&f[14..ip.l3_end])) != 0 {
        return Some("IPv4 header checksum");
    }
    // An IPv6 routing header changes the pseudo-header's destination:
    // such packets are passed untouched anyway, so not checked here.
    if ip.fragment || !ip.v4 && !ip.plain {
        return None;
    }
    let l4 = &f[ip.l4..ip.end];
    match ip.proto {
        TCP if l4_sum(ip.src, ip.dst, TCP, l4) != 0 => Some("TCP checksum"),
        UDP if l4[6..8] == [0, 0] => (!ip.v4).then_some("IPv6 UDP without checksum"),
        UDP if l4_sum(ip.src, ip.dst, UDP, l4) != 0 => Some("UDP checksum"),
        ICMP if ip.v4 => {
            if fold(sum16(l4)) != 0 {
                return Some("ICMP checksum");
            }
            if ip.icmp_error(f) && l4[8] >> 4 == 4 {
                let ihl = (l4[8] & 0x0f) as usize * 4;
                if ihl >= 20 && l4.len() >= 8 + ihl && fold(sum16(&l4[8..8 + ihl])) != 0 {
                    return Some("quoted IPv4 header checksum");
                }
            }
            None
        }
        ICMP6 if !ip.v4 && l4_sum(ip.src, ip.dst, ICMP6, l4) != 0 => Some("ICMPv6 checksum"),
        _ => None,
    }
}

/// Whether the program may do anything to this frame at all, read from
/// the bytes where the program reads them, conservatively: it acts only on
/// packets to a frontend (a VIP or a local address), replies keyed by a
/// backend source, and ICMP errors quoting such a packet's reverse (a
/// packet from a frontend, or to a backend).
fn maybe_ours(f: &[u8], m: &Model) -> bool {
    if f.len() < 14 {
        return false;
    }
    let et = [f[12], f[13]];
    let (v4, alen, src_at, icmp_at) = if et == ETH_IP && f.len() >= 34 {
        (true, 4, 26, (f[23] == ICMP).then_some(34))
    } else if et == ETH_IP6 && f.len() >= 54 {
        let icmp = match f[20] {
            ICMP6 => Some(54),
            44 if f.len() > 54 && f[54] == ICMP6 => Some(62),
            _ => None,
        };
        (false, 16, 22, icmp)
    } else {
        return false;
    };
    let touches = |src_at: usize| {
        m.frontend_space(addr_at(f, src_at + alen, v4)) || backend_space(addr_at(f, src_at, v4))
    };
    let quoted = |icmp: usize| {
        // The quoted header's source and destination.
        let q = icmp + 8 + if v4 { 12 } else { 8 };
        f.len() >= q + 2 * alen
            && (m.frontend_space(addr_at(f, q, v4)) || backend_space(addr_at(f, q + alen, v4)))
    };
    touches(src_at) || icmp_at.is_some_and(quoted)
}

// ---------------------------------------------------------------------
// Checking one frame
// ---------------------------------------------------------------------

const INVARIANTS: [&str; 5] = [
    "1 run succeeds, never XDP_ABORTED",
    "2 not ours: untouched XDP_PASS",
    "3 malformed: never forwarded",
    "4 checksums valid in, valid out",
    "5 frontend packets only to its backends",
];

fn verdict_name(v: u32) -> &'static str {
    match v {
        XDP_ABORTED => "ABORTED",
        XDP_DROP => "DROP",
        XDP_PASS => "PASS",
        XDP_TX => "TX",
        XDP_REDIRECT => "REDIRECT",
        _ => "unknown",
    }
}

/// A broken invariant: which, and what went wrong in words that do not
/// vary from frame to frame (failures are grouped by them).
struct Broken {
    inv: usize,
    what: String,
}

#[allow(
    clippy::unnecessary_wraps,
    reason = "the shape of every check: none, or one broken invariant"
)]
fn broken(inv: usize, what: impl Into<String>) -> Option<Broken> {
    Some(Broken {
        inv,
        what: what.into(),
    })
}

#[derive(Default)]
struct Stats {
    frames: u64,
    refused: u64,
    verdicts: [u64; 5],
    checked: [u64; 5],
}

struct Oracle<'m> {
    m: &'m Model,
    stats: Stats,
}

impl Oracle<'_> {
    /// Checks every invariant that applies to one test run.
    fn check(&mut self, input: &[u8], run: Result<(u32, &[u8]), String>) -> Vec<Broken> {
        let mut out = Vec::new();
        self.stats.frames += 1;
        self.stats.checked[0] += 1;
        // The kernel refuses frames shorter than an Ethernet header.
        if input.len() < 14 {
            match run {
                Err(_) => self.stats.refused += 1,
                Ok((v, _)) if v == XDP_PASS || v == XDP_DROP => {
                    self.stats.verdicts[v as usize] += 1;
                }
                Ok((v, _)) => out.extend(broken(
                    1,
                    format!("runt frame got verdict {}", verdict_name(v)),
                )),
            }
            return out;
        }
        let (v, got) = match run {
            Ok(r) => r,
            Err(e) => {
                out.extend(broken(1, format!("test run failed: {e}")));
                return out;
            }
        };
        if let Some(n) = self.stats.verdicts.get_mut(v as usize) {
            *n += 1;
        }
        if v == XDP_ABORTED || v > XDP_REDIRECT {
            out.extend(broken(1, format!("verdict {v} ({})", verdict_name(v))));
            return out;
        }
        let untouched = v == XDP_PASS && got == input;
        let parsed = parse(input);

        if !maybe_ours(input, self.m) {
            self.stats.checked[1] += 1;
            if !untouched {
                out.extend(broken(
                    2,
                    format!(
                        "a frame that is not ours got verdict {} {}",
                        verdict_name(v),
                        if got == input { "unchanged" } else { "changed" }
                    ),
                ));
            }
        }
        if let Parsed::Malformed(why) = parsed {
            self.stats.checked[2] += 1;
            if !(untouched || v == XDP_DROP) {
                out.extend(broken(
                    3,
                    format!(
                        "malformed ({why}) got verdict {} {}",
                        verdict_name(v),
                        if got == input { "unchanged" } else { "changed" }
                    ),
                ));
            }
        }
        let Parsed::Ip(ip) = parsed else {
            return out;
        };
        let sent = v == XDP_TX || v == XDP_REDIRECT || v == XDP_PASS && got != input;
        if !sent {
            return out;
        }
        // A frame handed up for TC to send carries `XdpHandoff` in front.
        let magic = meshlb_common::HANDOFF_MAGIC.to_ne_bytes();
        let handoff = v == XDP_PASS && got.len() == input.len() + HANDOFF_LEN && got[..4] == magic;
        let frame = if handoff { &got[HANDOFF_LEN..] } else { got };
        let out_ip = match parse(frame) {
            Parsed::Ip(o) => Some(o),
            _ => None,
        };

        if checksum_fault(input, &ip).is_none() {
            self.stats.checked[3] += 1;
            match &out_ip {
                None => out.extend(broken(
                    4,
                    format!("valid in, {} out is no well-formed packet", verdict_name(v)),
                )),
                Some(o) => {
                    if let Some(c) = checksum_fault(frame, o) {
                        out.extend(broken(
                            4,
                            format!("valid in, {} out with a wrong {c}", verdict_name(v)),
                        ));
                    }
                }
            }
        }

        // Frontend packets: translated to one of the service's backends on
        // its target port, or answered (too big) back to their sender. A
        // node-port packet from a backend may be the reply of a flow whose
        // SNAT port equals the node port: not checked.
        let forwarded = v == XDP_TX || v == XDP_REDIRECT || handoff;
        let (Some((_, dport)), Some(o), true) = (ip.ports(input), &out_ip, forwarded) else {
            return out;
        };
        let Some((svc, node_port)) = self.m.frontend(ip.dst, ip.proto, dport) else {
            return out;
        };
        if !ip.plain || node_port && self.m.backend_addrs.contains(&ip.src) {
            return out;
        }
        self.stats.checked[4] += 1;
        if o.proto == ICMP || o.proto == ICMP6 {
            if v != XDP_TX || o.dst != ip.src {
                out.extend(broken(
                    5,
                    format!("{} ICMP answer not to the sender", verdict_name(v)),
                ));
            }
            return out;
        }
        let to = o.ports(frame).map(|(_, p)| (o.dst, p));
        if o.proto != ip.proto || !to.is_some_and(|t| svc.backends.contains(&t)) {
            out.extend(broken(
                5,
                format!(
                    "{} {} packet sent to {:?}, not one of {:?}",
                    if node_port { "node-port" } else { "VIP" },
                    verdict_name(v),
                    to,
                    svc.backends
                ),
            ));
        }
        out
    }
}

// ---------------------------------------------------------------------
// The generator
// ---------------------------------------------------------------------

/// A frame to run, and what it was made as (kind, mutation), for the
/// report.
struct Input {
    bytes: Vec<u8>,
    kind: &'static str,
    mutation: &'static str,
}

/// Recomputes the IPv4 header checksum and the upper-layer checksum of a
/// frame where its headers allow it (a mutation then leaves a frame that
/// is wrong only in what was mutated, not in its checksums).
fn refix(f: &mut [u8]) {
    if f.len() < 34 || [f[12], f[13]] != ETH_IP && [f[12], f[13]] != ETH_IP6 {
        return;
    }
    if [f[12], f[13]] == ETH_IP {
        let ihl = (f[14] & 0x0f) as usize * 4;
        if ihl >= 20 && 14 + ihl <= f.len() {
            f[24] = 0;
            f[25] = 0;
            let c = fold(sum16(&f[14..14 + ihl]));
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
    }
    let Parsed::Ip(ip) = parse(f) else {
        return;
    };
    if ip.fragment || !ip.v4 && !ip.plain {
        return;
    }
    let at = match ip.proto {
        TCP => 16,
        UDP => 6,
        ICMP if ip.v4 => 2,
        ICMP6 if !ip.v4 => 2,
        _ => return,
    };
    let field = ip.l4 + at;
    if field + 2 > ip.end {
        return;
    }
    f[field] = 0;
    f[field + 1] = 0;
    let l4 = &f[ip.l4..ip.end];
    let mut c = if ip.proto == ICMP {
        fold(sum16(l4))
    } else {
        l4_sum(ip.src, ip.dst, ip.proto, l4)
    };
    if ip.proto == UDP && c == 0 {
        c = 0xffff;
    }
    f[field..field + 2].copy_from_slice(&c.to_be_bytes());
}

/// An IP frame around an upper-layer payload whose checksum (if any) the
/// caller has written.
fn ip_frame(v4: bool, src: IpAddr, dst: IpAddr, proto: u8, id: u16, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60 + body.len());
    f.extend(LB_MAC);
    f.extend(CLIENT_MAC);
    match (v4, src, dst) {
        (true, IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend(ETH_IP);
            f.extend([0x45, 0]);
            f.extend(((20 + body.len()) as u16).to_be_bytes());
            f.extend(id.to_be_bytes());
            f.extend([0x40, 0, 64, proto, 0, 0]);
            f.extend(s.octets());
            f.extend(d.octets());
            let c = fold(sum16(&f[14..34]));
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
        (false, IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend(ETH_IP6);
            f.extend([0x60, 0, 0, 0]);
            f.extend((body.len() as u16).to_be_bytes());
            f.extend([proto, 64]);
            f.extend(s.octets());
            f.extend(d.octets());
        }
        _ => unreachable!("addresses of the frame's family"),
    }
    f.extend(body);
    f
}

/// An ICMP or ICMPv6 message (per `v4`) with its checksum.
fn icmp_frame(v4: bool, src: IpAddr, dst: IpAddr, head: [u8; 8], body: &[u8]) -> Vec<u8> {
    let mut msg = head.to_vec();
    msg.extend(body);
    msg[2] = 0;
    msg[3] = 0;
    let c = if v4 {
        fold(sum16(&msg))
    } else {
        l4_sum(src, dst, ICMP6, &msg)
    };
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    ip_frame(v4, src, dst, if v4 { ICMP } else { ICMP6 }, 0x5678, &msg)
}

struct Gen<'m> {
    /// This frame's randomness: drawn afresh from (seed, frame number) for
    /// every frame, so that a frame made from a program output (whose
    /// shape may vary, see `learn`) shifts no later frame's choices.
    rng: Rng,
    seed: u64,
    made: u64,
    m: &'m Model,
    /// TCP/UDP frames the program forwarded lately, as it sent them:
    /// replies and ICMP errors are made from them, so that they meet flows
    /// the program knows.
    sent: VecDeque<Vec<u8>>,
    /// Truncations of one frame at every length, queued.
    sweep: Vec<Input>,
}

/// Fragment ids drawn mostly from a few, so later fragments meet the
/// first fragments the program recorded.
const FRAG_IDS: [u16; 4] = [0x1234, 0x1235, 0x4242, 7];
/// Client ports drawn mostly from a few, so flows repeat (conntrack hits,
/// FIN/RST on known flows, SYNs on closing tuples).
const CLIENT_PORTS: u16 = 16;

impl<'m> Gen<'m> {
    fn new(seed: u64, m: &'m Model) -> Gen<'m> {
        Gen {
            rng: Rng(seed),
            seed,
            made: 0,
            m,
            sent: VecDeque::new(),
            sweep: Vec::new(),
        }
    }

    /// Remembers a frame the program forwarded (its shape depends on the
    /// program's state, which is not all the seed's doing).
    fn learn(&mut self, frame: &[u8]) {
        if let Parsed::Ip(ip) = parse(frame) {
            if ip.ports(frame).is_some() && ip.plain {
                if self.sent.len() == 256 {
                    self.sent.pop_front();
                }
                self.sent.push_back(frame.to_vec());
            }
        }
    }

    fn next(&mut self) -> Input {
        if let Some(i) = self.sweep.pop() {
            return i;
        }
        self.made += 1;
        let mut mix = Rng(self.seed ^ self.made.wrapping_mul(0xd1b5_4a32_d192_ed03));
        self.rng = Rng(mix.next());
        if self.rng.chance(1, 2500) {
            let f = if self.rng.chance(1, 2) {
                self.client()
            } else {
                self.reply()
            };
            self.sweep = (0..f.len())
                .map(|n| Input {
                    bytes: f[..n].to_vec(),
                    kind: "truncation sweep",
                    mutation: "",
                })
                .collect();
        }
        let (kind, mut f) = match self.rng.below(100) {
            0..=29 => ("client to a frontend", self.client()),
            30..=41 => ("reply", self.reply()),
            42..=55 => ("not ours", self.not_ours()),
            56..=67 => ("ICMP error", self.icmp_error()),
            68..=75 => ("fragment", self.fragment()),
            76..=79 => ("IPv6 extension headers", self.ext6()),
            80..=82 => ("IPv4 options", self.options4()),
            83..=85 => ("VLAN", self.vlan()),
            86..=88 => ("not IP", self.non_ip()),
            _ => ("random bytes", self.random_frame()),
        };
        let mutation = if kind == "random bytes" {
            ""
        } else {
            self.mutate(&mut f, 0)
        };
        f.truncate(MAX_FRAME);
        Input {
            bytes: f,
            kind,
            mutation,
        }
    }

    // --- addresses and ports

    fn client_addr(&mut self, v4: bool) -> IpAddr {
        match (self.rng.below(20), v4) {
            (0..=11, true) => IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2)),
            (0..=11, false) => "fd00:200::2".parse().unwrap(),
            (12..=16, true) => IpAddr::V4(Ipv4Addr::new(10, 200, 0, 3 + self.rng.below(250) as u8)),
            (12..=16, false) => {
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, self.rng.u16()))
            }
            (_, true) => IpAddr::V4(Ipv4Addr::from(self.rng.next() as u32)),
            (_, false) => IpAddr::V6(Ipv6Addr::from(
                u128::from(self.rng.next()) << 64 | u128::from(self.rng.next()),
            )),
        }
    }

    /// A source surely not a backend's, a destination surely not a
    /// frontend (the oracle decides anyway; this keeps them frequent).
    fn stranger(&mut self, v4: bool, dst: bool) -> IpAddr {
        for _ in 0..8 {
            let a = match (self.rng.below(4), v4, dst) {
                // Straight to a backend, or to the client's own subnet.
                (0, true, true) => IpAddr::V4(Ipv4Addr::new(10, 201, 1, 2)),
                (0, false, true) => "fd00:201:1::2".parse().unwrap(),
                (1, _, _) => self.client_addr(v4),
                (_, true, _) => IpAddr::V4(Ipv4Addr::from(self.rng.next() as u32)),
                (_, false, _) => IpAddr::V6(Ipv6Addr::from(
                    u128::from(self.rng.next()) << 64 | u128::from(self.rng.next()),
                )),
            };
            if dst && !self.m.frontend_space(a) || !dst && !backend_space(a) {
                return a;
            }
        }
        if v4 {
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))
        } else {
            "2001:db8::1".parse().unwrap()
        }
    }

    fn client_port(&mut self) -> u16 {
        match self.rng.below(20) {
            0..=7 => 40000 + self.rng.below(u64::from(CLIENT_PORTS)) as u16,
            8..=11 => 32768 + self.rng.below(60999 - 32768 + 1) as u16,
            12..=14 => 50000,
            _ => self.rng.u16(),
        }
    }

    /// A frontend of this family and protocol: mostly a VIP's published
    /// port, else a node port on a local address, else an unpublished
    /// port.
    fn frontend(&mut self, v4: bool, proto: u8) -> (IpAddr, u16) {
        let m = self.m;
        let vips: Vec<(IpAddr, u16)> = m
            .services
            .iter()
            .filter(|s| s.proto == proto)
            .filter_map(|s| s.vip.filter(|a| a.is_ipv4() == v4).map(|a| (a, s.port)))
            .collect();
        let locals: Vec<IpAddr> = m
            .locals
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == v4)
            .collect();
        let ports: Vec<u16> = m
            .services
            .iter()
            .filter(|s| s.proto == proto)
            .map(|s| s.port)
            .collect();
        match self.rng.below(20) {
            0..=11 if !vips.is_empty() => self.rng.pick(&vips),
            0..=16 => (self.rng.pick(&locals), self.rng.pick(&ports)),
            17..=18 if !vips.is_empty() => (self.rng.pick(&vips).0, self.rng.u16()),
            _ => (self.rng.pick(&locals), self.rng.u16()),
        }
    }

    // --- frames

    fn tcp_flags(&mut self) -> u8 {
        match self.rng.below(20) {
            0..=6 => 0x02,
            7..=11 => 0x10,
            12..=13 => 0x18,
            14 => 0x11,
            15 => 0x04,
            16 => 0x12,
            _ => self.rng.u8(),
        }
    }

    /// A well-formed TCP/UDP frame of `proto`, random payload and TTL.
    #[allow(clippy::too_many_arguments)]
    fn l4_frame(
        &mut self,
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
        proto: u8,
        smac: [u8; 6],
        dmac: [u8; 6],
    ) -> Vec<u8> {
        let overhead = 14 + if src.is_ipv4() { 20 } else { 40 } + if proto == UDP { 8 } else { 20 };
        let len = match self.rng.below(20) {
            0..=10 => self.rng.upto(32),
            11..=16 => self.rng.upto(600),
            // Near the maximum: too big for the narrow path to the remote
            // backends (route MTU 1280), or just fitting.
            _ => MAX_FRAME - overhead - self.rng.upto(40),
        };
        let l4 = if proto == UDP {
            L4::Udp {
                zero_csum: self.rng.chance(1, 10),
            }
        } else {
            L4::Tcp {
                flags: self.tcp_flags(),
            }
        };
        let ttl = match self.rng.below(50) {
            0 => 0,
            1 => 1,
            2 => 2,
            3 => 255,
            _ => 64,
        };
        Frame {
            dmac,
            smac,
            src,
            dst,
            sport,
            dport,
            ttl,
            l4,
            payload: self.rng.bytes(len),
        }
        .bytes()
    }

    fn proto(&mut self) -> u8 {
        if self.rng.chance(3, 5) {
            TCP
        } else {
            UDP
        }
    }

    /// A client's packet to a frontend.
    fn client(&mut self) -> Vec<u8> {
        let v4 = self.rng.chance(1, 2);
        let proto = self.proto();
        let (dst, dport) = self.frontend(v4, proto);
        let src = self.client_addr(v4);
        let sport = self.client_port();
        self.l4_frame(src, sport, dst, dport, proto, CLIENT_MAC, LB_MAC)
    }

    fn recent(&mut self) -> Option<Vec<u8>> {
        if self.sent.is_empty() {
            return None;
        }
        let i = self.rng.below(self.sent.len() as u64) as usize;
        Some(self.sent[i].clone())
    }

    /// The answer to a frame the program sent (a backend's reply to a
    /// client's packet, a client's next packet after a reply), or a
    /// backend's packet to a random client or SNAT port.
    fn reply(&mut self) -> Vec<u8> {
        if self.rng.chance(3, 4) {
            if let Some(o) = self.recent() {
                if let Parsed::Ip(ip) = parse(&o) {
                    let (sport, dport) = ip.ports(&o).unwrap();
                    return self.l4_frame(ip.dst, dport, ip.src, sport, ip.proto, BE1_MAC, FXA_MAC);
                }
            }
        }
        let m = self.m;
        let s = &m.services[self.rng.below(m.services.len() as u64) as usize];
        let Some(&(be, port)) = s.backends.first() else {
            return self.client();
        };
        let v4 = be.is_ipv4();
        let (dst, dport) = if self.rng.chance(1, 2) {
            (self.client_addr(v4), self.client_port())
        } else {
            let snat = if v4 { SNAT4 } else { SNAT6 };
            (snat.parse().unwrap(), 1024 + self.rng.below(32000) as u16)
        };
        self.l4_frame(be, port, dst, dport, s.proto, BE3_MAC, FXA_MAC)
    }

    /// Traffic the load balancer has nothing to do with.
    fn not_ours(&mut self) -> Vec<u8> {
        let v4 = self.rng.chance(1, 2);
        let src = self.stranger(v4, false);
        let dst = self.stranger(v4, true);
        match self.rng.below(10) {
            0..=3 => {
                let (sp, dp) = (
                    self.client_port(),
                    self.rng.pick(&[80, 53, 8000, 8080, 5300]),
                );
                self.l4_frame(src, sp, dst, dp, TCP, CLIENT_MAC, LB_MAC)
            }
            4..=6 => {
                let (sp, dp) = (self.client_port(), self.rng.u16());
                self.l4_frame(src, sp, dst, dp, UDP, CLIENT_MAC, LB_MAC)
            }
            7 => {
                // Echo request.
                let len = self.rng.upto(56);
                let body = self.rng.bytes(len);
                let ty = if v4 { 8 } else { 128 };
                icmp_frame(v4, src, dst, [ty, 0, 0, 0, 0, 1, 0, 1], &body)
            }
            8 => {
                let quoted = {
                    let (a, b) = (self.stranger(v4, false), self.stranger(v4, true));
                    let (sp, dp) = (self.client_port(), self.client_port());
                    self.l4_frame(a, sp, b, dp, TCP, CLIENT_MAC, LB_MAC)
                };
                self.icmp_about(&quoted, src, dst)
            }
            _ => {
                let proto = self.rng.pick(&[0, 2, 4, 41, 47, 50, 89, 132, 255]);
                let len = self.rng.upto(80);
                let body = self.rng.bytes(len);
                let id = self.rng.u16();
                ip_frame(v4, src, dst, proto, id, &body)
            }
        }
    }

    /// An ICMP error from `src` to `dst` quoting (a cut of) `quoted`.
    fn icmp_about(&mut self, quoted: &[u8], src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let v4 = src.is_ipv4();
        let qv4 = quoted.len() > 14 && [quoted[12], quoted[13]] == ETH_IP;
        let hdr = if qv4 { 20 } else { 40 };
        let body = &quoted[14.min(quoted.len())..];
        let cut = match self.rng.below(10) {
            0..=4 => hdr + 8,
            5..=6 => body.len(),
            // Short quotes: no room for the ports, half of them, ...
            _ => self.rng.upto(hdr + 8),
        };
        let q = &body[..cut.min(body.len()).min(if v4 { 548 } else { 1232 })];
        let (ty, code, rest) = match (v4, self.rng.below(10)) {
            (true, 0..=3) => (3, 4, self.rng.pick(&[1280u32, 1400, 1500, 68, 0])),
            (true, 4..=5) => (3, self.rng.pick(&[0, 1, 3, 13]), 0),
            (true, 6) => (11, 0, 0),
            (true, 7) => (12, 0, 0x1400_0000),
            (true, _) => (
                self.rng.pick(&[0, 5, 8, 3]),
                self.rng.u8(),
                self.rng.next() as u32,
            ),
            (false, 0..=3) => (2, 0, self.rng.pick(&[1280u32, 1400, 1500, 0])),
            (false, 4..=5) => (1, self.rng.below(7) as u8, 0),
            (false, 6) => (3, 0, 0),
            (false, 7) => (4, self.rng.below(3) as u8, 40),
            (false, _) => (
                self.rng.pick(&[128, 129, 135, 2]),
                self.rng.u8(),
                self.rng.next() as u32,
            ),
        };
        let r = rest.to_be_bytes();
        icmp_frame(v4, src, dst, [ty, code, 0, 0, r[0], r[1], r[2], r[3]], q)
    }

    /// ICMP errors about packets the program sent, about replies of
    /// client flows, and about strangers' packets.
    fn icmp_error(&mut self) -> Vec<u8> {
        let quoted = match self.rng.below(10) {
            0..=4 => self.recent(),
            5..=7 => {
                // A reply as the load balancer sends it to a client (from
                // the frontend): an error about it comes to the frontend.
                let v4 = self.rng.chance(1, 2);
                let proto = self.proto();
                let (fe, fport) = self.frontend(v4, proto);
                let (c, cport) = (self.client_addr(v4), self.client_port());
                Some(self.l4_frame(fe, fport, c, cport, proto, LB_MAC, CLIENT_MAC))
            }
            _ => None,
        };
        let quoted = match quoted {
            Some(q) => q,
            None => self.not_ours(),
        };
        let Parsed::Ip(q) = parse(&quoted) else {
            return quoted;
        };
        // From the quoted packet's destination (port unreachable) or a
        // router on its way; to its source (mostly).
        let v4 = if self.rng.chance(1, 20) { !q.v4 } else { q.v4 };
        let src = if self.rng.chance(2, 5) && v4 == q.v4 {
            q.dst
        } else if v4 {
            IpAddr::V4(Ipv4Addr::new(10, self.rng.pick(&[200, 201]), 1, 254))
        } else {
            IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                self.rng.pick(&[0x200, 0x201]),
                1,
                0,
                0,
                0,
                0,
                0xfe,
            ))
        };
        let dst = if self.rng.chance(4, 5) && v4 == q.v4 {
            q.src
        } else if self.rng.chance(1, 2) {
            let proto = self.proto();
            self.frontend(v4, proto).0
        } else {
            self.stranger(v4, true)
        };
        self.icmp_about(&quoted, src, dst)
    }

    fn frag_id(&mut self) -> u16 {
        if self.rng.chance(3, 5) {
            self.rng.pick(&FRAG_IDS)
        } else {
            self.rng.u16()
        }
    }

    /// First and later fragments, IPv4 and IPv6, of client packets to
    /// frontends (mostly) and of others.
    fn fragment(&mut self) -> Vec<u8> {
        let id = self.frag_id();
        let base = |g: &mut Gen| {
            if g.rng.chance(4, 5) {
                g.client()
            } else {
                g.reply()
            }
        };
        let mut f = base(self);
        let v4 = [f[12], f[13]] == ETH_IP;
        let first = self.rng.chance(1, 2);
        if v4 {
            let off: u16 = if first {
                0
            } else {
                let any = self.rng.below(8192) as u16;
                self.rng.pick(&[1, 2, 3, 185, 8191, any])
            };
            let more = first || self.rng.chance(1, 2);
            f[18..20].copy_from_slice(&id.to_be_bytes());
            let flags = if more { 0x2000 } else { 0 } | off;
            f[20..22].copy_from_slice(&flags.to_be_bytes());
            if !first {
                // A later piece carries payload, not an L4 header.
                let len = self.rng.pick(&[8, 16, 0, 1, 600]);
                let body = self.rng.bytes(len);
                f.truncate(34);
                f.extend(body);
                let tot = (f.len() - 14) as u16;
                f[16..18].copy_from_slice(&tot.to_be_bytes());
                if self.rng.chance(1, 8) {
                    f[23] = self.rng.pick(&[ICMP, 47, 0]);
                }
            }
            refix(&mut f);
            return f;
        }
        let off = if first {
            0
        } else {
            self.rng.pick(&[1, 2, 185, 8191])
        };
        let more = first || self.rng.chance(1, 2);
        let mut f = with_frag6(f, off, more);
        f[58..62].copy_from_slice(&u32::from(id).to_be_bytes());
        if !first {
            let len = self.rng.pick(&[8, 16, 0, 1, 600]);
            let body = self.rng.bytes(len);
            f.truncate(62);
            f.extend(body);
            let pl = (f.len() - 54) as u16;
            f[18..20].copy_from_slice(&pl.to_be_bytes());
        }
        f
    }

    /// IPv6 packets behind a chain of extension headers.
    fn ext6(&mut self) -> Vec<u8> {
        let mut f = loop {
            let f = if self.rng.chance(1, 2) {
                self.client()
            } else {
                self.not_ours()
            };
            if [f[12], f[13]] == ETH_IP6 {
                break f;
            }
        };
        let n = 1 + self.rng.below(3) as usize;
        let types: Vec<u8> = (0..n)
            .map(|_| self.rng.pick(&[0, 43, 60, 44, 51, 135]))
            .collect();
        let mut chain = Vec::new();
        for (i, &t) in types.iter().enumerate() {
            let next = types.get(i + 1).copied().unwrap_or(f[20]);
            let mut h = match t {
                44 => {
                    let mut h = vec![next, 0];
                    let off = if self.rng.chance(1, 2) {
                        0
                    } else {
                        self.rng.u16()
                    };
                    h.extend(off.to_be_bytes());
                    h.extend(u32::from(self.frag_id()).to_be_bytes());
                    h
                }
                51 => {
                    let words = self.rng.pick(&[2u8, 4]);
                    let mut h = vec![next, words];
                    h.extend(self.rng.bytes((words as usize + 2) * 4 - 2));
                    h
                }
                _ => {
                    let units = self.rng.below(3) as u8;
                    let mut h = vec![next, units];
                    let pad = (units as usize + 1) * 8 - 2;
                    if self.rng.chance(1, 2) {
                        // PadN: the options are valid.
                        h.extend([1, pad as u8 - 2]);
                        h.extend(vec![0; pad - 2]);
                    } else {
                        h.extend(self.rng.bytes(pad));
                    }
                    h
                }
            };
            chain.append(&mut h);
        }
        f[20] = types[0];
        let pl = be16(&f, 18) + chain.len() as u16;
        f[18..20].copy_from_slice(&pl.to_be_bytes());
        f.splice(54..54, chain);
        f
    }

    /// IPv4 packets with options.
    fn options4(&mut self) -> Vec<u8> {
        let mut f = loop {
            let f = if self.rng.chance(2, 3) {
                self.client()
            } else {
                self.not_ours()
            };
            if [f[12], f[13]] == ETH_IP {
                break f;
            }
        };
        let words = 1 + self.rng.below(10) as usize;
        let opts = match self.rng.below(3) {
            0 => vec![1; words * 4],
            // Record route, as long as the room allows.
            1 => {
                let mut o = vec![7, (words * 4 - 1) as u8, 4];
                o.resize(words * 4, 0);
                o
            }
            _ => self.rng.bytes(words * 4),
        };
        f[14] = 0x40 | (5 + words) as u8;
        let tot = be16(&f, 16) + (words * 4) as u16;
        f[16..18].copy_from_slice(&tot.to_be_bytes());
        f.splice(34..34, opts);
        refix(&mut f);
        f
    }

    /// 802.1Q and 802.1ad (QinQ) tagged frames.
    fn vlan(&mut self) -> Vec<u8> {
        let mut f = self.client();
        let tci = self.rng.u16().to_be_bytes();
        let tags: Vec<u8> = if self.rng.chance(1, 2) {
            vec![0x81, 0x00, tci[0], tci[1]]
        } else {
            vec![0x88, 0xa8, tci[0], tci[1], 0x81, 0x00, 0, 100]
        };
        f.splice(12..12, tags);
        f
    }

    fn non_ip(&mut self) -> Vec<u8> {
        let any = self.rng.u16();
        let et = self
            .rng
            .pick(&[0x0806u16, 0x88cc, 0x8847, 0x0842, 0x86de, any]);
        let mut f = self.client();
        f[12..14].copy_from_slice(&et.to_be_bytes());
        if self.rng.chance(1, 2) {
            f.truncate(14 + 28);
        }
        f
    }

    /// Random bytes, often with an IP ethertype and version so that the
    /// parser gets past the first checks.
    fn random_frame(&mut self) -> Vec<u8> {
        let len = match self.rng.below(10) {
            0..=4 => self.rng.upto(80),
            5..=8 => self.rng.upto(200),
            _ => self.rng.upto(MAX_FRAME),
        };
        let mut f = self.rng.bytes(len);
        if len >= 15 && self.rng.chance(3, 5) {
            let v4 = self.rng.chance(1, 2);
            f[12..14].copy_from_slice(if v4 { &ETH_IP } else { &ETH_IP6 });
            if self.rng.chance(1, 2) {
                f[14] = if v4 { 0x45 } else { 0x60 };
                if v4 && len >= 34 {
                    f[16..18].copy_from_slice(&((len - 14) as u16).to_be_bytes());
                    if self.rng.chance(1, 2) {
                        f[23] = self.rng.pick(&[TCP, UDP, ICMP]);
                    }
                } else if !v4 && len >= 54 {
                    f[18..20].copy_from_slice(&((len - 54) as u16).to_be_bytes());
                    if self.rng.chance(1, 2) {
                        f[20] = self.rng.pick(&[TCP, UDP, ICMP6, 44]);
                    }
                }
                if self.rng.chance(1, 2) {
                    refix(&mut f);
                }
            }
        }
        f
    }

    // --- mutations

    #[allow(
        clippy::match_same_arms,
        reason = "one arm per mutation class, even where two do the same"
    )]
    fn mutate(&mut self, f: &mut Vec<u8>, depth: u8) -> &'static str {
        let v4 = f.len() >= 34 && [f[12], f[13]] == ETH_IP;
        let v6 = f.len() >= 54 && [f[12], f[13]] == ETH_IP6;
        match self.rng.below(100) {
            0..=47 => "",
            48..=57 => {
                let n = self.rng.upto(f.len());
                f.truncate(n);
                "truncated"
            }
            58..=62 => {
                let n = 1 + self.rng.upto(60);
                let pad = self.rng.bytes(n);
                f.extend(pad);
                "padded"
            }
            63..=68 if v4 || v6 => {
                // Shorter than the frame: the rest reads as padding, and
                // may cut the L4 header.
                let at = if v4 { 16 } else { 18 };
                let old = be16(f, at) as usize;
                let new = match self.rng.below(3) {
                    0 => self.rng.upto(old),
                    1 => old.saturating_sub(1 + self.rng.upto(12)),
                    _ => self.rng.upto(48),
                };
                f[at..at + 2].copy_from_slice(&(new as u16).to_be_bytes());
                if self.rng.chance(1, 2) {
                    refix(f);
                }
                "short IP length"
            }
            69..=71 if v4 || v6 => {
                let at = if v4 { 16 } else { 18 };
                let new = be16(f, at).saturating_add(1 + self.rng.below(64) as u16);
                f[at..at + 2].copy_from_slice(&new.to_be_bytes());
                refix(f);
                "long IP length"
            }
            72..=74 if v4 => {
                f[14] = 0x40 | (self.rng.u8() & 0x0f);
                if self.rng.chance(1, 2) {
                    refix(f);
                }
                "IHL"
            }
            75..=76 if v4 || v6 => {
                f[14] = (self.rng.u8() & 0xf0) | (f[14] & 0x0f);
                refix(f);
                "IP version"
            }
            77..=90 if !f.is_empty() => {
                for _ in 0..=self.rng.below(4) {
                    // Mostly in the headers, where it matters.
                    let span = if self.rng.chance(7, 10) {
                        f.len().min(110)
                    } else {
                        f.len()
                    };
                    let at = self.rng.below(span as u64) as usize;
                    f[at] ^= 1 + self.rng.below(255) as u8;
                }
                if self.rng.chance(2, 5) {
                    refix(f);
                    "flipped, checksums fixed"
                } else {
                    "flipped"
                }
            }
            91..=94 if v4 || v6 => {
                let at = if v4 && self.rng.chance(1, 2) {
                    24
                } else {
                    f.len() - 1
                };
                f[at] ^= 0x55;
                "bad checksum"
            }
            95.. if depth == 0 => {
                self.mutate(f, 1);
                self.mutate(f, 1);
                "mixed"
            }
            _ => "",
        }
    }
}

// ---------------------------------------------------------------------
// Running it
// ---------------------------------------------------------------------

/// Failures grouped by invariant and what went wrong: how often, and the
/// first few examples (of different frame kinds).
#[derive(Default)]
struct Failures(BTreeMap<(usize, String), (u64, Vec<String>)>);

impl Failures {
    fn add(&mut self, b: &Broken, kind: &str, example: impl FnOnce() -> String) {
        let e = self.0.entry((b.inv, b.what.clone())).or_default();
        e.0 += 1;
        if e.1.len() < 3 && !e.1.iter().any(|x| x.contains(kind)) {
            e.1.push(example());
        }
    }
}

fn verdict_of(prog: &Xdp, frame: &[u8], out: &mut [u8]) -> Result<(u32, usize), String> {
    prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        ..TestRunOptions::new()
    })
    .map(|r| (r.return_value, r.data_size_out as usize))
    .map_err(|e| e.to_string())
}

struct Loaded {
    ebpf: Ebpf,
    maps: Maps,
}

fn fresh(pins: &std::path::Path) -> Loaded {
    let (ebpf, mut maps) = load(pins);
    program(&LOCALS, &mut maps);
    Loaded { ebpf, maps }
}

/// Adds the program's own counters (why it passed, dropped, translated)
/// to `total`: they show which paths the frames reached.
fn tally(l: &Loaded, total: &mut [u64]) {
    for (t, n) in total.iter_mut().zip(l.maps.counters()) {
        *t += n;
    }
}

struct Report {
    stats: Stats,
    failures: Failures,
    elapsed: Duration,
    kinds: BTreeMap<&'static str, u64>,
    counters: Vec<u64>,
}

fn run(seed: u64, pins: &std::path::Path) -> Report {
    let m = Model::new();
    let mut oracle = Oracle {
        m: &m,
        stats: Stats::default(),
    };
    let mut gen = Gen::new(seed, &m);
    let mut failures = Failures::default();
    let mut kinds = BTreeMap::new();
    let mut out = vec![0u8; OUT_BUF];
    let start = Instant::now();
    let mut loaded = fresh(pins);
    let mut since_reload = 0u64;
    let mut counters = vec![0u64; Counter::ALL.len()];

    let regressions = REGRESSIONS.iter().flat_map(|r| {
        r.frames.iter().map(|h| Input {
            bytes: (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("regression hex"))
                .collect(),
            kind: "regression",
            mutation: r.found,
        })
    });
    let mut regressions = regressions.collect::<Vec<_>>().into_iter();

    let mut n = 0u64;
    while n < MIN_FRAMES && start.elapsed() < TIME_BUDGET {
        if since_reload == RELOAD_EVERY {
            tally(&loaded, &mut counters);
            drop(loaded);
            loaded = fresh(pins);
            since_reload = 0;
        }
        let prog: &Xdp = loaded
            .ebpf
            .program(meshlb_common::PROG_XDP_LB)
            .unwrap()
            .try_into()
            .unwrap();
        // Between reloads the program handle is the same: run a batch on it.
        for _ in 0..1000 {
            let input = regressions.next().unwrap_or_else(|| gen.next());
            let res = verdict_of(prog, &input.bytes, &mut out);
            let got = res.as_ref().ok().map(|&(v, len)| (v, &out[..len]));
            let broken = oracle.check(&input.bytes, res.clone().map(|(v, len)| (v, &out[..len])));
            if let Some((v, frame)) = got {
                let magic = meshlb_common::HANDOFF_MAGIC.to_ne_bytes();
                if v == XDP_REDIRECT || v == XDP_TX {
                    gen.learn(frame);
                } else if v == XDP_PASS && frame.len() > HANDOFF_LEN && frame[..4] == magic {
                    gen.learn(&frame[HANDOFF_LEN..]);
                }
            }
            for mut b in broken {
                if input.kind == "regression" {
                    // Each regression is its own line in the report.
                    b.what = format!("{}: {}", input.mutation, b.what);
                }
                let outhex = match &res {
                    Ok((v, len)) => format!("{} {}", verdict_name(*v), hex(&out[..*len])),
                    Err(e) => format!("error {e}"),
                };
                let made = match (input.kind, input.mutation) {
                    ("regression", _) | (_, "") => input.kind.to_string(),
                    (k, m) => format!("{k}, {m}"),
                };
                let example = || {
                    format!(
                        "seed {seed:#x} frame #{n} ({made}): invariant {}: {}\n      in  {}\n      out {}",
                        INVARIANTS[b.inv - 1],
                        b.what,
                        hex(&input.bytes),
                        outhex
                    )
                };
                failures.add(&b, input.kind, example);
            }
            *kinds.entry(input.kind).or_insert(0) += 1;
            n += 1;
            since_reload += 1;
            if n == MIN_FRAMES || since_reload == RELOAD_EVERY {
                break;
            }
        }
    }
    tally(&loaded, &mut counters);
    Report {
        stats: oracle.stats,
        failures,
        elapsed: start.elapsed(),
        kinds,
        counters,
    }
}

#[test]
fn fuzz_xdp_program_invariants() {
    let seed = seed();
    eprintln!("fuzz: seed {seed:#x} (replay with MESHLB_FUZZ_SEED={seed:#x})");
    let ns = Netns::new_named("mlbt-fz");
    let ns_name = ns.name.clone();
    let pins = ns.pins.clone();
    // The program's FIB lookups use the namespace of the thread that runs
    // it; the guard (`ns`) stays here and removes it however that ends.
    let report = std::thread::scope(|s| {
        s.spawn(move || {
            let f = std::fs::File::open(format!("/run/netns/{ns_name}")).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            // One CPU: the LRU maps evict per CPU, and a run that stays on
            // one evicts the same entries when replayed.
            let mut cpus = nix::sched::CpuSet::new();
            cpus.set(0).unwrap();
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).unwrap();
            run(seed, &pins)
        })
        .join()
    });
    let r = match report {
        Ok(r) => r,
        Err(panic) => {
            eprintln!("fuzz: seed {seed:#x}: the run panicked");
            std::panic::resume_unwind(panic)
        }
    };
    let st = &r.stats;
    let secs = r.elapsed.as_secs_f64();
    let rate = st.frames as f64 / secs;
    let verdicts: Vec<String> = (0..5)
        .map(|v| format!("{} {}", verdict_name(v as u32), st.verdicts[v]))
        .chain([format!("refused {}", st.refused)])
        .collect();
    let checked: Vec<String> = INVARIANTS
        .iter()
        .zip(st.checked)
        .map(|(name, n)| format!("({name}) {n}"))
        .collect();
    let kinds: Vec<String> = r.kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let counters: Vec<String> = Counter::ALL
        .iter()
        .filter(|c| r.counters[**c as usize] > 0)
        .map(|c| format!("{} {}", c.name(), r.counters[*c as usize]))
        .collect();
    eprintln!(
        "fuzz: {} frames with seed {seed:#x} in {secs:.1} s ({rate:.0} frames/s); verdicts: {}; \
         invariants checked: {}; frame kinds: {}; program counters: {}; {} distinct failures.",
        st.frames,
        verdicts.join(", "),
        checked.join(", "),
        kinds.join(", "),
        counters.join(", "),
        r.failures.0.len()
    );
    for ((inv, what), (count, examples)) in &r.failures.0 {
        eprintln!("FAIL invariant {inv}: {what} ({count} frames)");
        for e in examples {
            eprintln!("    {e}");
        }
    }
    assert!(
        st.frames >= MIN_FRAMES,
        "seed {seed:#x}: only {} frames in the {} s budget ({rate:.0} frames/s); {MIN_FRAMES} wanted",
        st.frames,
        TIME_BUDGET.as_secs()
    );
    assert!(
        r.failures.0.is_empty(),
        "seed {seed:#x}: {} distinct invariant failures (see above)",
        r.failures.0.len()
    );
}

/// The oracle itself, on frames whose fate is known (no root needed): each
/// invariant must fire on a wrong answer, or a fuzzing run that passes
/// proves nothing.
#[test]
fn oracle_catches_wrong_answers() {
    let m = Model::new();
    let syn = Frame::tcp("10.200.0.2", 40000, "10.96.0.10", 80, SYN);
    let input = syn.bytes();
    let Parsed::Ip(ip) = parse(&input) else {
        panic!("a SYN is an IP packet");
    };
    assert_eq!(checksum_fault(&input, &ip), None);
    assert!(maybe_ours(&input, &m));
    let stranger = Frame::tcp("10.200.0.2", 40000, "10.201.1.2", 8000, SYN).bytes();
    assert!(!maybe_ours(&stranger, &m), "client straight to a backend");
    assert!(maybe_ours(
        &Frame::tcp("10.201.1.2", 8000, "10.200.0.2", 40000, SYN).bytes(),
        &m
    ));
    let vip: IpAddr = "10.96.0.10".parse().unwrap();
    let be: IpAddr = "10.201.1.2".parse().unwrap();
    assert!(matches!(m.frontend(vip, TCP, 80), Some((s, false)) if s.backends == [(be, 8000)]));
    assert!(matches!(
        m.frontend(SNAT4.parse().unwrap(), UDP, 53),
        Some((_, true))
    ));
    assert!(m.frontend("10.200.0.9".parse().unwrap(), TCP, 80).is_none());

    let dnat = syn.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC);
    let good = dnat.bytes();
    let to_other = syn
        .translated(Some(("10.201.1.3", 8000)), None, FXA_MAC, BE1_MAC)
        .bytes();
    let bad_csum = mangle(good.clone(), |b| b[60] ^= 1);
    let short = mangle(input.clone(), |b| {
        b[16..18].copy_from_slice(&30u16.to_be_bytes());
    });
    assert!(matches!(
        parse(&short),
        Parsed::Malformed("truncated TCP header")
    ));
    let stranger_changed = mangle(stranger.clone(), |b| b[0] ^= 1);

    let mut o = Oracle {
        m: &m,
        stats: Stats::default(),
    };
    let mut fired = |input: &[u8], v: u32, out: &[u8]| -> Vec<usize> {
        o.check(input, Ok((v, out))).iter().map(|b| b.inv).collect()
    };
    assert_eq!(fired(&input, XDP_REDIRECT, &good), Vec::<usize>::new());
    assert_eq!(fired(&stranger, XDP_PASS, &stranger), Vec::<usize>::new());
    assert_eq!(fired(&input, XDP_ABORTED, &input), [1]);
    assert_eq!(fired(&stranger, XDP_PASS, &stranger_changed), [2]);
    assert_eq!(fired(&stranger, XDP_DROP, &stranger), [2]);
    assert_eq!(fired(&short, XDP_REDIRECT, &good), [3]);
    assert_eq!(fired(&input, XDP_REDIRECT, &bad_csum), [4]);
    assert_eq!(fired(&input, XDP_REDIRECT, &to_other), [5]);
    assert_eq!(fired(&input, XDP_TX, &input), [5]);
}
