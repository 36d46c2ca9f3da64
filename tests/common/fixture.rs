//! Shared fixture of the tests that drive the XDP program through
//! BPF_PROG_TEST_RUN (`datapath.rs`, the fixture table; `fuzz.rs`, the
//! packet fuzzer): the services both program into the maps (`CONFIG`,
//! through the daemon's own path), the network namespace the program's FIB
//! lookups see (`Netns`, removed again on drop), and frame builders with
//! their checksum arithmetic.
//!
//! Included by path from each of those test crates (`#[path]`), not from
//! `common/mod.rs`, so the other integration tests do not compile it.
#![allow(dead_code)] // each including test uses a different subset

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;

use aya::programs::Xdp;
use aya::Ebpf;
use meshlb::engine::xdp::{apply_maps, apply_node_net, observe_maps};
use meshlb::kernel::pinned::Maps;

// ---------------------------------------------------------------------
// Verdicts, addresses, the services
// ---------------------------------------------------------------------

pub const XDP_PASS: u32 = 2;
pub const XDP_DROP: u32 = 1;
pub const XDP_REDIRECT: u32 = 4;
pub const XDP_TX: u32 = 3;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const FXA_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const FXB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
pub const BE1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
pub const BE3_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x03];

pub const CONFIG: &str = r#"
node = "fixture"
[[service]]
name = "web"
vip = "10.96.0.10"
publish = [{ proto = "tcp", port = 80, target = 8000 }, { proto = "udp", port = 53, target = 5353 }]
[[service.backend]]
addr = "10.201.1.2"

[[service]]
name = "web6"
vip = "fd00:96::10"
publish = [{ proto = "tcp", port = 8080, target = 8000 }, { proto = "udp", port = 5300, target = 5353 }]
[[service.backend]]
addr = "fd00:201:1::2"

[[service]]
name = "empty"
vip = "10.96.0.20"
publish = [{ proto = "tcp", port = 8081, target = 8000 }]

[[service]]
name = "remote"
vip = "10.96.0.40"
publish = [{ proto = "tcp", port = 81, target = 8000 }, { proto = "udp", port = 54, target = 5353 }]
[[service.backend]]
addr = "10.201.1.3"
node = "other"

[[service]]
name = "remote6"
vip = "fd00:96::40"
publish = [{ proto = "tcp", port = 82, target = 8000 }]
[[service.backend]]
addr = "fd00:201:1::3"
node = "other"

[[service]]
name = "noneigh"
vip = "10.96.0.30"
publish = [{ proto = "tcp", port = 8082, target = 8000 }]
[[service.backend]]
addr = "10.201.9.2"
"#;

// ---------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
pub enum L4 {
    Tcp { flags: u8 },
    Udp { zero_csum: bool },
}

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;

/// A well-formed frame, described by its fields; `bytes()` builds it with
/// correct checksums.
#[derive(Clone)]
pub struct Frame {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub l4: L4,
    pub payload: Vec<u8>,
}

pub fn sum16(data: &[u8]) -> u32 {
    let mut s = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += u32::from(w);
    }
    s
}

pub fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

pub fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend([0, proto]);
            p.extend((len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend((len as u32).to_be_bytes());
            p.extend([0, 0, 0, proto]);
        }
        _ => panic!("mixed families"),
    }
    p
}

impl Frame {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Frame {
        Frame {
            dmac: LB_MAC,
            smac: CLIENT_MAC,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport,
            dport,
            ttl: 64,
            l4: L4::Tcp { flags },
            payload: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        }
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Frame {
        Frame {
            l4: L4::Udp { zero_csum: false },
            payload: b"ping".to_vec(),
            ..Frame::tcp(src, sport, dst, dport, 0)
        }
    }

    pub fn l4_bytes(&self) -> Vec<u8> {
        let proto = match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
        };
        let mut h = Vec::new();
        h.extend(self.sport.to_be_bytes());
        h.extend(self.dport.to_be_bytes());
        match self.l4 {
            L4::Tcp { flags } => {
                h.extend(1000u32.to_be_bytes());
                h.extend(if flags & ACK != 0 { 2000u32 } else { 0 }.to_be_bytes());
                h.extend([0x50, flags]);
                h.extend(65535u16.to_be_bytes());
                h.extend([0, 0, 0, 0]);
            }
            L4::Udp { .. } => {
                h.extend(((8 + self.payload.len()) as u16).to_be_bytes());
                h.extend([0, 0]);
            }
        }
        h.extend(&self.payload);
        let zero = matches!(self.l4, L4::Udp { zero_csum: true });
        if !zero {
            let mut all = pseudo(self.src, self.dst, proto, h.len());
            all.extend(&h);
            let mut c = fold(sum16(&all));
            if proto == 17 && c == 0 {
                c = 0xffff;
            }
            let off = if proto == 6 { 16 } else { 6 };
            h[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
        h
    }

    pub fn bytes(&self) -> Vec<u8> {
        let proto = match self.l4 {
            L4::Tcp { .. } => 6u8,
            L4::Udp { .. } => 17,
        };
        let l4 = self.l4_bytes();
        let mut f = Vec::new();
        f.extend(self.dmac);
        f.extend(self.smac);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend([0x08, 0x00]);
                let mut ip = vec![0x45, 0];
                ip.extend(((20 + l4.len()) as u16).to_be_bytes());
                ip.extend([0x12, 0x34, 0x40, 0x00, self.ttl, proto, 0, 0]);
                ip.extend(s.octets());
                ip.extend(d.octets());
                let c = fold(sum16(&ip));
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                f.extend(ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend([0x86, 0xdd]);
                f.extend([0x60, 0, 0, 0]);
                f.extend((l4.len() as u16).to_be_bytes());
                f.extend([proto, self.ttl]);
                f.extend(s.octets());
                f.extend(d.octets());
            }
            _ => panic!("mixed families"),
        }
        f.extend(l4);
        f
    }

    /// The same frame after the load balancer forwarded it: new L3/L4
    /// destination (or source), TTL - 1, MACs from the FIB.
    pub fn translated(
        &self,
        dst: Option<(&str, u16)>,
        src: Option<(&str, u16)>,
        smac: [u8; 6],
        dmac: [u8; 6],
    ) -> Frame {
        let mut f = self.clone();
        if let Some((a, p)) = dst {
            f.dst = a.parse().unwrap();
            f.dport = p;
        }
        if let Some((a, p)) = src {
            f.src = a.parse().unwrap();
            f.sport = p;
        }
        f.ttl -= 1;
        f.smac = smac;
        f.dmac = dmac;
        f
    }
}

/// Checks every checksum in a frame by recomputation.
pub fn assert_checksums(frame: &[u8], what: &str) {
    let et = [frame[12], frame[13]];
    let (src, dst, proto, l4) = if et == [0x08, 0x00] {
        let ip = &frame[14..34];
        assert_eq!(fold(sum16(ip)), 0, "{what}: IPv4 header checksum");
        if ip[6] & 0x3f != 0 || ip[7] != 0 {
            // A fragment: its L4 checksum covers the whole datagram (the
            // fixtures' exact bytes check it).
            return;
        }
        let s = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let d = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        (IpAddr::V4(s), IpAddr::V4(d), ip[9], &frame[34..])
    } else {
        let ip = &frame[14..54];
        let s: [u8; 16] = ip[8..24].try_into().unwrap();
        let d: [u8; 16] = ip[24..40].try_into().unwrap();
        (
            IpAddr::V6(Ipv6Addr::from(s)),
            IpAddr::V6(Ipv6Addr::from(d)),
            ip[6],
            &frame[54..],
        )
    };
    if proto != 6 && proto != 17 || proto == 17 && l4[6..8] == [0, 0] {
        // ICMP and IPv6 fragments: compared byte for byte instead.
        return;
    }
    let mut all = pseudo(src, dst, proto, l4.len());
    all.extend(l4);
    assert_eq!(fold(sum16(&all)), 0, "{what}: L4 checksum");
}

// ---------------------------------------------------------------------
// Fragments and ICMP errors (raw builders; checksums computed here)
// ---------------------------------------------------------------------

/// Recomputes the IPv4 header checksum of a frame in place.
pub fn fix_ip4(mut b: Vec<u8>) -> Vec<u8> {
    b[24] = 0;
    b[25] = 0;
    let c = fold(sum16(&b[14..34]));
    b[24..26].copy_from_slice(&c.to_be_bytes());
    b
}

/// Sets the IPv4 more-fragments flag (a first fragment).
pub fn first_frag4(b: Vec<u8>) -> Vec<u8> {
    fix_ip4(mangle(b, |b| b[20] = 0x20))
}

/// A later IPv4 fragment (offset 8 bytes) of datagram 0x1234 (the id
/// `Frame` uses) carrying `data`.
pub fn later_frag4(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: &str,
    dst: &str,
    ttl: u8,
    data: &[u8],
) -> Vec<u8> {
    let (s, d): (Ipv4Addr, Ipv4Addr) = (src.parse().unwrap(), dst.parse().unwrap());
    let mut f = Vec::new();
    f.extend(dmac);
    f.extend(smac);
    f.extend([0x08, 0x00, 0x45, 0]);
    f.extend(((20 + data.len()) as u16).to_be_bytes());
    f.extend([0x12, 0x34, 0x00, 0x01, ttl, 17, 0, 0]);
    f.extend(s.octets());
    f.extend(d.octets());
    f.extend(data);
    fix_ip4(f)
}

/// Inserts an IPv6 fragment header (offset in 8-byte units, M flag,
/// id 0x1234) after the IPv6 header of a frame.
pub fn with_frag6(b: Vec<u8>, offset: u16, more: bool) -> Vec<u8> {
    let next = b[20];
    let mut f = b[..54].to_vec();
    f[20] = 44;
    let plen = u16::from_be_bytes([f[18], f[19]]) + 8;
    f[18..20].copy_from_slice(&plen.to_be_bytes());
    f.push(next);
    f.push(0);
    f.extend((offset << 3 | u16::from(more)).to_be_bytes());
    f.extend(0x1234u32.to_be_bytes());
    f.extend(&b[54..]);
    f
}

/// A later IPv6 fragment (offset 8 bytes, last) of UDP datagram 0x1234.
pub fn later_frag6(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: &str,
    dst: &str,
    hop: u8,
    data: &[u8],
) -> Vec<u8> {
    let (s, d): (Ipv6Addr, Ipv6Addr) = (src.parse().unwrap(), dst.parse().unwrap());
    let mut f = Vec::new();
    f.extend(dmac);
    f.extend(smac);
    f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend(((8 + data.len()) as u16).to_be_bytes());
    f.extend([44, hop]);
    f.extend(s.octets());
    f.extend(d.octets());
    f.extend([17, 0, 0, 8]);
    f.extend(0x1234u32.to_be_bytes());
    f.extend(data);
    f
}

/// The ICMP quote of a frame: its IP header and the first 8 L4 bytes.
pub fn quote(frame: &[u8]) -> Vec<u8> {
    let hdr = if [frame[12], frame[13]] == [0x08, 0x00] {
        20
    } else {
        40
    };
    frame[14..14 + hdr + 8].to_vec()
}

/// `quote` of `translated`, keeping the quoted TTL and UDP checksum of
/// `orig` (the load balancer translates addresses and ports only; receivers
/// of ICMP errors do not check the quoted L4 checksum).
pub fn quote_as(translated: &[u8], orig: &[u8]) -> Vec<u8> {
    let mut q = quote(translated);
    let o = quote(orig);
    let l4 = q.len() - 8;
    let v4 = l4 == 20;
    if q[if v4 { 9 } else { 6 }] == 17 {
        q[l4 + 6..l4 + 8].copy_from_slice(&o[l4 + 6..l4 + 8]);
    }
    if v4 {
        q[8] = o[8];
        q[10] = 0;
        q[11] = 0;
        let c = fold(sum16(&q[..20]));
        q[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        q[7] = o[7];
    }
    q
}

/// An ICMP (IPv4) error frame quoting `quoted`; `rest` is the word after
/// the checksum (the next-hop MTU of "fragmentation needed").
#[allow(clippy::too_many_arguments)]
pub fn icmp4(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: &str,
    dst: &str,
    ttl: u8,
    ty: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let (s, d): (Ipv4Addr, Ipv4Addr) = (src.parse().unwrap(), dst.parse().unwrap());
    let mut icmp = vec![ty, code, 0, 0];
    icmp.extend(rest.to_be_bytes());
    icmp.extend(quoted);
    let c = fold(sum16(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend(dmac);
    f.extend(smac);
    f.extend([0x08, 0x00, 0x45, 0]);
    f.extend(((20 + icmp.len()) as u16).to_be_bytes());
    f.extend([0x56, 0x78, 0x00, 0x00, ttl, 1, 0, 0]);
    f.extend(s.octets());
    f.extend(d.octets());
    f.extend(icmp);
    fix_ip4(f)
}

/// An ICMPv6 error frame quoting `quoted`.
#[allow(clippy::too_many_arguments)]
pub fn icmp6(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: &str,
    dst: &str,
    hop: u8,
    ty: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let (s, d): (Ipv6Addr, Ipv6Addr) = (src.parse().unwrap(), dst.parse().unwrap());
    let mut icmp = vec![ty, code, 0, 0];
    icmp.extend(rest.to_be_bytes());
    icmp.extend(quoted);
    let mut all = pseudo(IpAddr::V6(s), IpAddr::V6(d), 58, icmp.len());
    all.extend(&icmp);
    let c = fold(sum16(&all));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend(dmac);
    f.extend(smac);
    f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend((icmp.len() as u16).to_be_bytes());
    f.extend([58, hop]);
    f.extend(s.octets());
    f.extend(d.octets());
    f.extend(icmp);
    f
}

// ---------------------------------------------------------------------
// The node, the namespace, the program
// ---------------------------------------------------------------------

/// The fixture node's ephemeral range: SNAT folds client ports in it into
/// the usable ports one to one.
pub const EPHEMERAL: (u16, u16) = (32768, 60999);
/// The node's SNAT addresses in the fixture (the backend-side addresses).
pub const SNAT4: &str = "10.201.1.1";
pub const SNAT6: &str = "fd00:201:1::1";

pub fn mangle(mut b: Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    f(&mut b);
    b
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespace the FIB lookups run in: fxa faces the backends, fxb the
/// clients, with static neighbours so lookups succeed deterministically.
pub struct Netns {
    pub name: String,
    pub pins: PathBuf,
}

impl Netns {
    pub fn new_named(prefix: &str) -> Netns {
        if std::fs::read_to_string("/proc/self/status").map_or(true, |st| {
            !st.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        }) {
            panic!("BPF_PROG_TEST_RUN fixtures need root (BPF_PROG_TEST_RUN, network namespaces); run `cargo xtask test` as root");
        }
        let name = format!("{prefix}-{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        let ip = |a: &str| {
            let mut v = vec!["ip", "-n", &name];
            v.extend(a.split_whitespace());
            sh(&v);
        };
        ip("link add fxa type veth peer name fxb");
        ip("link set fxa address 02:00:00:00:01:01");
        ip("link set fxb address 02:00:00:00:02:01");
        ip("link set lo up");
        ip("link set fxa up");
        ip("link set fxb up");
        ip("addr add 10.201.1.1/24 dev fxa");
        ip("addr add 10.201.9.1/24 dev fxa");
        ip("addr add 10.200.0.1/24 dev fxb");
        ip("addr add fd00:201:1::1/64 dev fxa nodad");
        ip("addr add fd00:200::1/64 dev fxb nodad");
        ip("neigh replace 10.201.1.2 lladdr 02:00:00:00:01:02 dev fxa nud permanent");
        ip("neigh replace 10.201.1.3 lladdr 02:00:00:00:01:03 dev fxa nud permanent");
        ip("neigh replace fd00:201:1::2 lladdr 02:00:00:00:01:02 dev fxa nud permanent");
        ip("neigh replace fd00:201:1::3 lladdr 02:00:00:00:01:03 dev fxa nud permanent");
        ip("neigh replace 10.200.0.2 lladdr 02:00:00:00:00:02 dev fxb nud permanent");
        // The path to the remote backend is narrower than the client's
        // link: frames over 1280 bytes do not fit (`too_big` cases; a
        // forwarding lookup honours a route MTU only when locked).
        ip("route add 10.201.1.3/32 dev fxa mtu lock 1280");
        ip("route add fd00:201:1::3/128 dev fxa mtu lock 1280");
        ip("neigh replace fd00:200::2 lladdr 02:00:00:00:00:02 dev fxb nud permanent");
        sh(&[
            "ip",
            "netns",
            "exec",
            &name,
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.forwarding=1",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &name,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        if !std::path::Path::new("/sys/fs/bpf").join(".").exists()
            || !String::from_utf8_lossy(&std::fs::read("/proc/mounts").unwrap_or_default())
                .contains("/sys/fs/bpf bpf")
        {
            sh(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]);
        }
        let pins = PathBuf::from(format!("/sys/fs/bpf/{name}"));
        Netns { name, pins }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = meshlb::engine::xdp::cleanup(&self.pins);
        let _ = std::fs::remove_dir(&self.pins);
    }
}

pub fn load(pins: &std::path::Path) -> (Ebpf, Maps) {
    let _ = meshlb::engine::xdp::cleanup(pins);
    std::fs::create_dir_all(pins).unwrap();
    let mut ebpf = meshlb::engine::xdp::loader()
        .default_map_pin_directory(pins)
        .load(meshlb::EBPF_OBJECT)
        .expect("load eBPF object");
    let maps = Maps::from_ebpf(&mut ebpf).expect("every map of meshlb-common is in the object");
    let prog: &mut Xdp = ebpf
        .program_mut(meshlb_common::PROG_XDP_LB)
        .expect("program")
        .try_into()
        .unwrap();
    prog.load().expect("verifier accepts the program");
    (ebpf, maps)
}

pub fn program(desired_locals: &[&str], maps: &mut Maps) {
    let cfg = meshlb::source::config::parse(CONFIG).expect("fixture config");
    let locals = desired_locals.iter().map(|a| a.parse().unwrap()).collect();
    let desired = cfg.desired_state(locals, "fixture");
    let plan = meshlb::control::reconcile::plan(&desired, &observe_maps(maps).unwrap()).unwrap();
    apply_maps(maps, &plan).unwrap();
    let net = meshlb::control::nodenet::NodeNet {
        iface_flags: Default::default(),
        snat: (Some(SNAT4.parse().unwrap()), Some(SNAT6.parse().unwrap())),
        ephemeral: Some(EPHEMERAL),
        iface_addrs: Default::default(),
        node_addr: None,
        iface_macs: Default::default(),
    };
    apply_node_net(maps, &net).unwrap();
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<String>()
}
