//! The XDP program on crafted frames through BPF_PROG_TEST_RUN: a table of
//! {description, map setup, input frame, expected verdict, expected output
//! frame, expected counter deltas}. Maps are programmed by the daemon's own
//! path (config -> desired state -> reconciler -> `apply_maps`), and every
//! translated frame is compared byte for byte with one built from scratch,
//! so the incremental checksum updates are checked against a full
//! recomputation.
//!
//! Runs in its own network namespace (`mlbt-fx-<pid>`) holding the routes
//! and static neighbours the program's FIB lookups see. The namespace, the
//! services and the frame builders are shared with the packet fuzzer
//! (`fuzz.rs`) in `common/fixture.rs`.

#[path = "common/fixture.rs"]
mod fixture;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use meshlb::kernel::pinned::{addr_bytes, Maps};
use meshlb_common::{
    flow_clock, ticks, Counter, CtEntry, FlowKey, RnatEntry, SnatEntry, CT_F_EST, CT_F_FIN_CLIENT,
    CT_F_RST, CT_F_SNAT, IF_F_NO_XMIT, PROTO_TCP, PROTO_UDP, SNAT_E_EST,
};

use fixture::{
    assert_checksums, first_frag4, fix_ip4, fold, hex, icmp4, icmp6, later_frag4, later_frag6,
    load, mangle, program, quote, quote_as, sum16, with_frag6, Frame, Netns, ACK, BE1_MAC, BE3_MAC,
    CLIENT_MAC, EPHEMERAL, FIN, FXA_MAC, FXB_MAC, L4, LB_MAC, RST, SNAT4, SNAT6, SYN, XDP_DROP,
    XDP_PASS, XDP_REDIRECT, XDP_TX,
};

/// The route MTU towards the remote backend in the fixture namespace.
const NARROW_MTU: u32 = 1280;

/// What meshlb answers a frame too big for its egress with: an ICMP
/// "fragmentation needed" / ICMPv6 "packet too big" from `from` back to
/// the sender (MACs swapped), quoting the frame as it was sent: its IP
/// header and whole L4 header (20 bytes of TCP, 8 of UDP), the quoted L4
/// checksum field set so that completing a partial checksum over the
/// quoted L4 header changes nothing (`toobig` module docs).
fn too_big_answer(frame: &[u8], from: &str, mtu: u32) -> Vec<u8> {
    let v4 = [frame[12], frame[13]] == [0x08, 0x00];
    let (hdr, proto) = if v4 { (20, frame[23]) } else { (40, frame[20]) };
    let (l4, field) = if proto == 6 { (20, 16) } else { (8, 6) };
    let mut q = frame[14..14 + hdr + l4].to_vec();
    q[hdr + field] = 0;
    q[hdr + field + 1] = 0;
    let neutral = fold(sum16(&q[hdr..])).rotate_right(1);
    q[hdr + field..hdr + field + 2].copy_from_slice(&neutral.to_be_bytes());
    let to = if v4 {
        Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]).to_string()
    } else {
        let a: [u8; 16] = frame[22..38].try_into().unwrap();
        Ipv6Addr::from(a).to_string()
    };
    let smac: [u8; 6] = frame[0..6].try_into().unwrap();
    let dmac: [u8; 6] = frame[6..12].try_into().unwrap();
    if v4 {
        // IP identification 0 (icmp4 writes a fixed one).
        fix_ip4(mangle(
            icmp4(smac, dmac, from, &to, 64, 3, 4, mtu, &q),
            |b| {
                b[18] = 0;
                b[19] = 0;
            },
        ))
    } else {
        icmp6(smac, dmac, from, &to, 64, 2, 0, mtu, &q)
    }
}

// ---------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------

/// What a step expects back.
enum Expect {
    /// Passed with not one byte changed.
    Untouched,
    /// This verdict and exactly these bytes.
    Frame(u32, Vec<u8>),
    /// The kernel refuses to run the program on this input.
    Refused,
    /// XDP_DROP.
    Dropped,
    /// This verdict, with valid checksums (the bytes depend on a choice
    /// the case does not pin down, e.g. Maglev's for a new client).
    Verdict(u32),
}

/// Extra map state a case needs before its first step.
enum Seed {
    None,
    /// A conntrack entry for (client flow) pointing at a backend, with flags.
    Ct(FlowKeySpec, &'static str, u16, u16),
    /// The same, last seen that many seconds ago.
    CtAged(FlowKeySpec, &'static str, u16, u16, u32),
    /// An embryonic flow (a SYN seen, no handshake ACK yet) pointing at a
    /// backend: `MLB_CTSYN_V1`.
    CtSyn(FlowKeySpec, &'static str, u16),
    /// A reply entry for (backend -> client) naming a frontend.
    Rnat(FlowKeySpec, &'static str, u16),
    /// SNAT port `port` to backend 10.201.1.3:8000 held by client flow
    /// `flow`, last seen `age_ms` ago; `live`: that flow is in conntrack
    /// (else it is gone), with `CT_F_SNAT` and `ct_flags`; `snat_est`: the
    /// SNAT entry saw the flow established (`SNAT_E_EST`).
    SnatHeld {
        flow: FlowKeySpec,
        port: u16,
        live: bool,
        ct_flags: u16,
        age_ms: u64,
        snat_est: bool,
    },
    /// The interface is flagged as unable to take native redirects.
    NoXmit(&'static str),
}

#[derive(Clone, Copy)]
struct FlowKeySpec {
    src: &'static str,
    sport: u16,
    dst: &'static str,
    dport: u16,
    proto: u8,
}

impl FlowKeySpec {
    fn key(&self) -> FlowKey {
        let (src, family) = addr_bytes(self.src.parse().unwrap());
        let (dst, _) = addr_bytes(self.dst.parse().unwrap());
        FlowKey {
            src,
            dst,
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: self.proto,
            family,
            _pad: [0; 2],
        }
    }
}

struct Step {
    input: Vec<u8>,
    expect: Expect,
    /// Counter deltas that must hold (others may move only if listed).
    counters: &'static [(Counter, u64)],
}

/// A check on the maps after the last step.
type AfterCheck = Box<dyn Fn(&Maps) -> Result<(), String> + Send + Sync>;

struct Case {
    name: &'static str,
    seed: Seed,
    steps: Vec<Step>,
    /// Checked after the last step.
    after: Option<AfterCheck>,
}

fn step(input: Vec<u8>, expect: Expect, counters: &'static [(Counter, u64)]) -> Step {
    Step {
        input,
        expect,
        counters,
    }
}

impl Case {
    /// The same case, with a check on the maps after its last step.
    fn after(self, f: impl Fn(&Maps) -> Result<(), String> + Send + Sync + 'static) -> Case {
        Case {
            after: Some(Box::new(f)),
            ..self
        }
    }
}

fn case(name: &'static str, steps: Vec<Step>) -> Case {
    Case {
        name,
        seed: Seed::None,
        steps,
        after: None,
    }
}

/// `fxa`'s ifindex in the fixture namespace (its peer `fxb` is created
/// first, after `lo`).
const FXA_IFINDEX: u32 = 3;

/// A frame as XDP hands it up for the TC handoff program: the
/// `XdpHandoff` metadata (magic, egress ifindex, ingress ifindex; host
/// order) in front.
fn handoff(ifindex: u32, frame: Vec<u8>) -> Vec<u8> {
    let mut v = meshlb_common::HANDOFF_MAGIC.to_ne_bytes().to_vec();
    v.extend(ifindex.to_ne_bytes());
    // BPF_PROG_TEST_RUN's frames arrive on the loopback device.
    v.extend(1u32.to_ne_bytes());
    v.extend(frame);
    v
}

/// A one-step case: the frame must be dropped, counted under `c`.
fn dropped(name: &'static str, input: Vec<u8>, c: Counter) -> Case {
    let counters: &'static [(Counter, u64)] = Box::leak(Box::new([(c, 1)]));
    case(name, vec![step(input, Expect::Dropped, counters)])
}

/// A one-step case: the frame must pass untouched, counted under `c`.
fn untouched(name: &'static str, input: Vec<u8>, c: Counter) -> Case {
    let counters: &'static [(Counter, u64)] = Box::leak(Box::new([(c, 1)]));
    case(name, vec![step(input, Expect::Untouched, counters)])
}

fn fwd(f: &Frame) -> Expect {
    Expect::Frame(XDP_REDIRECT, f.bytes())
}

const NEW_IN: &[(Counter, u64)] = &[(Counter::NewFlow, 1), (Counter::ForwardedIn, 1)];
const HIT_IN: &[(Counter, u64)] = &[(Counter::NewFlow, 0), (Counter::ForwardedIn, 1)];
const OUT: &[(Counter, u64)] = &[(Counter::ForwardedOut, 1)];
const NOT_SVC: &[(Counter, u64)] = &[(Counter::NotService, 1), (Counter::NewFlow, 0)];
const SNAT_IN: &[(Counter, u64)] = &[
    (Counter::NewFlow, 1),
    (Counter::SnatNew, 1),
    (Counter::ForwardedIn, 1),
];
/// The SNAT port of client port 40000 (in the ephemeral range): its offset
/// in the range, from 1024.
const SNAT_PORT: u16 = 1024 + 40000 - EPHEMERAL.0;
/// The SNAT port of client port 50000.
const SNAT_PORT_UDP: u16 = 1024 + 50000 - EPHEMERAL.0;

fn cases() -> Vec<Case> {
    let c4 = "10.200.0.2";
    let c6 = "fd00:200::2";
    let syn4 = Frame::tcp(c4, 40000, "10.96.0.10", 80, SYN);
    let syn4_out = syn4.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC);
    let ack4 = Frame::tcp(c4, 40000, "10.96.0.10", 80, ACK);
    let reply4 = Frame {
        smac: BE1_MAC,
        dmac: FXA_MAC,
        ..Frame::tcp("10.201.1.2", 8000, c4, 40000, SYN | ACK)
    };
    let reply4_out = reply4.translated(None, Some(("10.96.0.10", 80)), FXB_MAC, CLIENT_MAC);
    let syn6 = Frame::tcp(c6, 40000, "fd00:96::10", 8080, SYN);
    let syn6_out = syn6.translated(Some(("fd00:201:1::2", 8000)), None, FXA_MAC, BE1_MAC);
    let reply6 = Frame {
        smac: BE1_MAC,
        dmac: FXA_MAC,
        ..Frame::tcp("fd00:201:1::2", 8000, c6, 40000, SYN | ACK)
    };
    let reply6_out = reply6.translated(None, Some(("fd00:96::10", 8080)), FXB_MAC, CLIENT_MAC);
    let udp4 = Frame::udp(c4, 50000, "10.96.0.10", 53);
    let udp4_out = udp4.translated(Some(("10.201.1.2", 5353)), None, FXA_MAC, BE1_MAC);
    let udp6 = Frame::udp(c6, 50000, "fd00:96::10", 5300);
    let udp6_out = udp6.translated(Some(("fd00:201:1::2", 5353)), None, FXA_MAC, BE1_MAC);
    let syn_r = Frame::tcp(c4, 40000, "10.96.0.40", 81, SYN);
    let syn_r_out = syn_r.translated(
        Some(("10.201.1.3", 8000)),
        Some((SNAT4, SNAT_PORT)),
        FXA_MAC,
        BE3_MAC,
    );
    let syn_r2 = Frame::tcp(c4, 40001, "10.96.0.40", 81, SYN);
    let ack_r = Frame::tcp(c4, 40000, "10.96.0.40", 81, ACK);
    let reply_r = Frame {
        smac: BE3_MAC,
        dmac: FXA_MAC,
        ..Frame::tcp("10.201.1.3", 8000, SNAT4, SNAT_PORT, SYN | ACK)
    };
    let reply_r_out = reply_r.translated(
        Some((c4, 40000)),
        Some(("10.96.0.40", 81)),
        FXB_MAC,
        CLIENT_MAC,
    );
    let udp_r = Frame::udp(c4, 50000, "10.96.0.40", 54);
    let rst_r = Frame::tcp(c4, 40000, "10.96.0.40", 81, RST | ACK);
    let data_back_r = Frame {
        smac: BE3_MAC,
        dmac: FXA_MAC,
        ..Frame::tcp("10.201.1.3", 8000, SNAT4, SNAT_PORT, ACK)
    };
    // Another client, the same source port.
    let syn_r_other = Frame::tcp("10.200.0.9", 40000, "10.96.0.40", 81, SYN);
    // Client port 8081 is usable as it is: SNAT keeps it.
    let syn_np = Frame::tcp(c4, 8081, "10.96.0.40", 81, SYN);
    let reply_np = Frame {
        smac: BE3_MAC,
        dmac: FXA_MAC,
        ..Frame::tcp("10.201.1.3", 8000, SNAT4, 8081, SYN | ACK)
    };
    let syn6_r = Frame::tcp(c6, 40000, "fd00:96::40", 82, SYN);
    let syn6_r_out = syn6_r.translated(
        Some(("fd00:201:1::3", 8000)),
        Some((SNAT6, SNAT_PORT)),
        FXA_MAC,
        BE3_MAC,
    );
    let reply6_r = Frame {
        smac: BE3_MAC,
        dmac: FXA_MAC,
        ..Frame::tcp("fd00:201:1::3", 8000, SNAT6, SNAT_PORT, SYN | ACK)
    };
    let reply6_r_out = reply6_r.translated(
        Some((c6, 40000)),
        Some(("fd00:96::40", 82)),
        FXB_MAC,
        CLIENT_MAC,
    );
    let other_flow = FlowKeySpec {
        src: "10.200.0.9",
        sport: 41000,
        dst: "10.96.0.40",
        dport: 81,
        proto: PROTO_TCP,
    };
    let flow4 = FlowKeySpec {
        src: c4,
        sport: 40000,
        dst: "10.96.0.10",
        dport: 80,
        proto: PROTO_TCP,
    };

    vec![
        case(
            "ipv4 tcp SYN to the VIP: new flow, DNAT to the backend, redirected",
            vec![step(syn4.bytes(), fwd(&syn4_out), NEW_IN)],
        ),
        case(
            "ipv4 tcp: the next packet of the flow hits conntrack",
            vec![
                step(syn4.bytes(), fwd(&syn4_out), NEW_IN),
                step(
                    ack4.bytes(),
                    fwd(&ack4.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                    HIT_IN,
                ),
            ],
        ),
        case(
            "ipv4 tcp reply from the backend: source translated back to the VIP",
            vec![
                step(syn4.bytes(), fwd(&syn4_out), NEW_IN),
                step(reply4.bytes(), fwd(&reply4_out), OUT),
            ],
        ),
        case(
            "ipv4 tcp SYN to a node port (this node's address)",
            vec![{
                let f = Frame::tcp(c4, 40001, "10.200.0.1", 80, SYN);
                step(
                    f.bytes(),
                    fwd(&f.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                    NEW_IN,
                )
            }],
        ),
        case(
            "ipv4 tcp to an address that is no frontend: untouched",
            vec![step(
                Frame::tcp(c4, 40000, "10.201.1.2", 8000, SYN).bytes(),
                Expect::Untouched,
                NOT_SVC,
            )],
        ),
        case(
            "ipv4 tcp to a node port on a non-local address: untouched",
            vec![step(
                Frame::tcp(c4, 40000, "10.200.0.9", 80, SYN).bytes(),
                Expect::Untouched,
                NOT_SVC,
            )],
        ),
        case(
            "ipv4 reply with no conntrack entry: untouched",
            vec![step(reply4.bytes(), Expect::Untouched, NOT_SVC)],
        ),
        Case {
            name: "SYN on a closing tuple selects afresh (conntrack said another backend)",
            seed: Seed::Ct(flow4, "10.201.1.3", 8000, CT_F_FIN_CLIENT),
            steps: vec![step(syn4.bytes(), fwd(&syn4_out), NEW_IN)],
            after: None,
        },
        Case {
            name: "UDP flow whose backend is no longer in its slot (removed, or down): moved to a live backend on its next datagram",
            seed: Seed::Ct(
                FlowKeySpec {
                    src: c4,
                    sport: 50000,
                    dst: "10.96.0.10",
                    dport: 53,
                    proto: PROTO_UDP,
                },
                "10.201.1.99",
                5353,
                0,
            ),
            steps: vec![step(
                udp4.bytes(),
                fwd(&udp4_out),
                &[(Counter::Rebalanced, 1), (Counter::NewFlow, 1), (Counter::ForwardedIn, 1)],
            )],
            after: None,
        },
        Case {
            name: "a flow whose reverse-NAT half was evicted (conntrack half left): its next packet in a new flow-clock tick (here: after two seconds idle; one could fall in the tick the kernel's coarse clock still reads) re-creates it, and the backend's reply is translated again",
            seed: Seed::CtAged(flow4, "10.201.1.2", 8000, CT_F_EST, 2),
            steps: vec![
                step(
                    ack4.bytes(),
                    fwd(&ack4.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                    &[(Counter::Healed, 1), (Counter::NewFlow, 0), (Counter::ForwardedIn, 1)],
                ),
                step(reply4.bytes(), fwd(&reply4_out), OUT),
                step(
                    ack4.bytes(),
                    fwd(&ack4.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                    &[(Counter::Healed, 0), (Counter::ForwardedIn, 1)],
                ),
            ],
            after: None,
        },
        Case {
            name: "a SYN on the tuple of an embryonic flow whose backend no longer serves (refused, then removed or down) selects afresh",
            seed: Seed::CtSyn(flow4, "10.201.1.99", 8000),
            steps: vec![step(syn4.bytes(), fwd(&syn4_out), NEW_IN)],
            after: None,
        },
        Case {
            name: "a SYN retransmit on the tuple of an embryonic flow keeps its backend",
            seed: Seed::CtSyn(flow4, "10.201.1.3", 8000),
            steps: vec![step(
                syn4.bytes(),
                fwd(&syn4.translated(Some(("10.201.1.3", 8000)), None, FXA_MAC, BE3_MAC)),
                &[(Counter::NewFlow, 0), (Counter::ForwardedIn, 1)],
            )],
            after: None,
        },
        Case {
            name: "SYN retransmit on an open tuple keeps the conntrack backend",
            seed: Seed::Ct(flow4, "10.201.1.3", 8000, 0),
            steps: vec![step(
                syn4.bytes(),
                fwd(&syn4.translated(Some(("10.201.1.3", 8000)), None, FXA_MAC, BE3_MAC)),
                HIT_IN,
            )],
            after: None,
        },
        case(
            "FIN from the backend marks the flow closing; a new SYN re-selects",
            vec![
                step(syn4.bytes(), fwd(&syn4_out), NEW_IN),
                step(
                    ack4.bytes(),
                    fwd(&ack4.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                    &[(Counter::Promoted, 1), (Counter::ForwardedIn, 1)],
                ),
                {
                    let fin = Frame {
                        l4: L4::Tcp { flags: FIN | ACK },
                        ..reply4.clone()
                    };
                    step(
                        fin.bytes(),
                        fwd(&fin.translated(None, Some(("10.96.0.10", 80)), FXB_MAC, CLIENT_MAC)),
                        OUT,
                    )
                },
                step(syn4.bytes(), fwd(&syn4_out), NEW_IN),
            ],
        ),
        Case {
            name: "a direct SYN client->backend drops a stale reply entry of the same tuple",
            seed: Seed::Rnat(
                FlowKeySpec {
                    src: "10.201.1.2",
                    sport: 8000,
                    dst: c4,
                    dport: 40000,
                    proto: PROTO_TCP,
                },
                "10.96.0.10",
                80,
            ),
            steps: vec![
                step(
                    Frame::tcp(c4, 40000, "10.201.1.2", 8000, SYN).bytes(),
                    Expect::Untouched,
                    NOT_SVC,
                ),
                step(reply4.bytes(), Expect::Untouched, NOT_SVC),
            ],
            after: None,
        },
        dropped(
            "ipv4 tcp SYN to a service with no backends: dropped, never routed on",
            Frame::tcp(c4, 40000, "10.96.0.20", 8081, SYN).bytes(),
            Counter::NoBackend,
        ),
        dropped(
            "ipv4 udp to a VIP on a port it does not publish: dropped",
            Frame::udp(c4, 40000, "10.96.0.10", 9999).bytes(),
            Counter::UnknownPort,
        ),
        dropped(
            "ipv4 tcp SYN to a VIP on a port it does not publish: dropped",
            Frame::tcp(c4, 40000, "10.96.0.10", 9999, SYN).bytes(),
            Counter::UnknownPort,
        ),
        dropped(
            "ipv6 udp to a VIP on a port it does not publish: dropped",
            Frame::udp(c6, 40000, "fd00:96::10", 9999).bytes(),
            Counter::UnknownPort,
        ),
        case(
            "backend without a neighbour entry: translated, handed up with its handoff (metadata, or by flow)",
            vec![{
                let f = Frame::tcp(c4, 40000, "10.96.0.30", 8082, SYN);
                let mut out = f.translated(Some(("10.201.9.2", 8000)), None, LB_MAC, CLIENT_MAC);
                out.ttl += 1;
                out.smac = CLIENT_MAC;
                out.dmac = LB_MAC;
                step(
                    f.bytes(),
                    Expect::Frame(XDP_PASS, handoff(FXA_IFINDEX, out.bytes())),
                    &[
                        (Counter::FibPass, 1),
                        (Counter::Handoff, 1),
                        (Counter::NewFlow, 1),
                    ],
                )
            }],
        ),
        case(
            "ipv4 TTL 1 to the VIP: passed for the stack to answer",
            vec![{
                let f = Frame {
                    ttl: 1,
                    ..syn4.clone()
                };
                let mut out = f.translated(Some(("10.201.1.2", 8000)), None, LB_MAC, CLIENT_MAC);
                out.ttl = 1;
                out.smac = CLIENT_MAC;
                out.dmac = LB_MAC;
                step(
                    f.bytes(),
                    Expect::Frame(XDP_PASS, out.bytes()),
                    &[(Counter::TtlExceeded, 1)],
                )
            }],
        ),
        case(
            "ipv4 udp to the VIP: DNAT with checksum",
            vec![step(udp4.bytes(), fwd(&udp4_out), NEW_IN)],
        ),
        case(
            "ipv4 udp without checksum: stays without checksum",
            vec![{
                let f = Frame {
                    l4: L4::Udp { zero_csum: true },
                    ..udp4.clone()
                };
                let out = Frame {
                    l4: L4::Udp { zero_csum: true },
                    ..udp4_out.clone()
                };
                step(f.bytes(), fwd(&out), NEW_IN)
            }],
        ),
        case(
            "ipv4 udp reply: source translated back",
            vec![step(udp4.bytes(), fwd(&udp4_out), NEW_IN), {
                let r = Frame {
                    smac: BE1_MAC,
                    dmac: FXA_MAC,
                    ..Frame::udp("10.201.1.2", 5353, c4, 50000)
                };
                step(
                    r.bytes(),
                    fwd(&r.translated(None, Some(("10.96.0.10", 53)), FXB_MAC, CLIENT_MAC)),
                    OUT,
                )
            }],
        ),
        case(
            "ipv4 udp second datagram of a flow hits conntrack",
            vec![
                step(udp4.bytes(), fwd(&udp4_out), NEW_IN),
                step(udp4.bytes(), fwd(&udp4_out), HIT_IN),
            ],
        ),
        case(
            "ipv6 tcp SYN to the VIP",
            vec![step(syn6.bytes(), fwd(&syn6_out), NEW_IN)],
        ),
        case(
            "ipv6 tcp reply: source translated back",
            vec![
                step(syn6.bytes(), fwd(&syn6_out), NEW_IN),
                step(reply6.bytes(), fwd(&reply6_out), OUT),
            ],
        ),
        case(
            "ipv6 tcp SYN to a node port",
            vec![{
                let f = Frame::tcp(c6, 40001, "fd00:200::1", 8080, SYN);
                step(
                    f.bytes(),
                    fwd(&f.translated(Some(("fd00:201:1::2", 8000)), None, FXA_MAC, BE1_MAC)),
                    NEW_IN,
                )
            }],
        ),
        case(
            "ipv6 udp to the VIP",
            vec![step(udp6.bytes(), fwd(&udp6_out), NEW_IN)],
        ),
        case(
            "ipv6 udp reply",
            vec![step(udp6.bytes(), fwd(&udp6_out), NEW_IN), {
                let r = Frame {
                    smac: BE1_MAC,
                    dmac: FXA_MAC,
                    ..Frame::udp("fd00:201:1::2", 5353, c6, 50000)
                };
                step(
                    r.bytes(),
                    fwd(&r.translated(None, Some(("fd00:96::10", 5300)), FXB_MAC, CLIENT_MAC)),
                    OUT,
                )
            }],
        ),
        case(
            "ipv6 to a non-service address: untouched",
            vec![step(
                Frame::tcp(c6, 40000, "fd00:96::11", 80, SYN).bytes(),
                Expect::Untouched,
                NOT_SVC,
            )],
        ),
        case(
            "ipv6 hop limit 1: passed for the stack to answer",
            vec![{
                let f = Frame {
                    ttl: 1,
                    ..syn6.clone()
                };
                let mut out = f.translated(Some(("fd00:201:1::2", 8000)), None, LB_MAC, CLIENT_MAC);
                out.ttl = 1;
                out.smac = CLIENT_MAC;
                out.dmac = LB_MAC;
                step(
                    f.bytes(),
                    Expect::Frame(XDP_PASS, out.bytes()),
                    &[(Counter::TtlExceeded, 1)],
                )
            }],
        ),
        // Malformed input: never translated, never forwarded.
        case(
            "empty frame: refused by the kernel",
            vec![step(vec![], Expect::Refused, &[])],
        ),
        case(
            "truncated ethernet header (13 bytes): never forwarded",
            vec![step(syn4.bytes()[..13].to_vec(), Expect::Refused, &[])],
        ),
        untouched(
            "truncated IPv4 header: untouched",
            syn4.bytes()[..24].to_vec(),
            Counter::MalformedIp,
        ),
        untouched(
            "IPv4 header length 4 (bad IHL): untouched",
            mangle(syn4.bytes(), |b| b[14] = 0x44),
            Counter::MalformedIp,
        ),
        untouched(
            "IPv4 version 6 in an IPv4 ethertype: untouched",
            mangle(syn4.bytes(), |b| b[14] = 0x65),
            Counter::MalformedIp,
        ),
        untouched(
            "IPv4 with options (IHL 6) to the VIP: untouched",
            mangle(syn4.bytes(), |b| {
                b[14] = 0x46;
                b.splice(34..34, [1, 1, 1, 1]);
                let tl = u16::from_be_bytes([b[16], b[17]]) + 4;
                b[16..18].copy_from_slice(&tl.to_be_bytes());
            }),
            Counter::IpOptions,
        ),
        untouched(
            "IPv4 total length beyond the frame: untouched",
            mangle(syn4.bytes(), |b| {
                b[16..18].copy_from_slice(&1500u16.to_be_bytes());
            }),
            Counter::MalformedIp,
        ),
        case(
            "IPv4 fragmented UDP to the VIP: the first fragment picks, a later one follows it",
            vec![
                step(
                    first_frag4(udp4.bytes()),
                    Expect::Frame(XDP_REDIRECT, first_frag4(udp4_out.bytes())),
                    NEW_IN,
                ),
                step(
                    later_frag4(CLIENT_MAC, LB_MAC, c4, "10.96.0.10", 64, b"abcdefgh"),
                    Expect::Frame(
                        XDP_REDIRECT,
                        later_frag4(FXA_MAC, BE1_MAC, c4, "10.201.1.2", 63, b"abcdefgh"),
                    ),
                    &[(Counter::FragTranslated, 1), (Counter::ForwardedIn, 1)],
                ),
            ],
        ),
        dropped(
            "IPv4 later fragment to the VIP whose first was not seen: dropped",
            later_frag4(CLIENT_MAC, LB_MAC, c4, "10.96.0.10", 64, b"abcdefgh"),
            Counter::FragUnknown,
        ),
        untouched(
            "IPv4 later fragment to another address: untouched",
            later_frag4(CLIENT_MAC, LB_MAC, c4, "10.200.0.1", 64, b"abcdefgh"),
            Counter::Fragment,
        ),
        case(
            "IPv6 fragmented UDP to the VIP: first fragment behind a fragment header, then a later one",
            vec![
                step(
                    with_frag6(udp6.bytes(), 0, true),
                    Expect::Frame(XDP_REDIRECT, with_frag6(udp6_out.bytes(), 0, true)),
                    NEW_IN,
                ),
                step(
                    later_frag6(CLIENT_MAC, LB_MAC, c6, "fd00:96::10", 64, b"abcdefgh"),
                    Expect::Frame(
                        XDP_REDIRECT,
                        later_frag6(FXA_MAC, BE1_MAC, c6, "fd00:201:1::2", 63, b"abcdefgh"),
                    ),
                    &[(Counter::FragTranslated, 1)],
                ),
            ],
        ),
        case(
            "ICMP fragmentation needed for a reply, sent to the VIP: to the backend, quoting its own packet",
            vec![step(syn4.bytes(), fwd(&syn4_out), NEW_IN), {
                // A router on the client's side could not forward the
                // translated reply (VIP:80 -> client).
                let sent = Frame::tcp("10.96.0.10", 80, c4, 40000, SYN | ACK).bytes();
                let orig = reply4.bytes();
                step(
                    icmp4(CLIENT_MAC, LB_MAC, "10.200.0.254", "10.96.0.10", 64, 3, 4, 1400, &quote(&sent)),
                    Expect::Frame(
                        XDP_REDIRECT,
                        icmp4(FXA_MAC, BE1_MAC, "10.200.0.254", "10.201.1.2", 63, 3, 4, 1400, &quote_as(&orig, &sent)),
                    ),
                    &[(Counter::IcmpTranslated, 1), (Counter::ForwardedOut, 1)],
                )
            }],
        ),
        case(
            "ICMP port unreachable from a local backend: from the VIP, quoting the client's packet to the VIP",
            vec![step(udp4.bytes(), fwd(&udp4_out), NEW_IN), {
                let to_backend = udp4_out.bytes();
                step(
                    icmp4(BE1_MAC, FXA_MAC, "10.201.1.2", c4, 64, 3, 3, 0, &quote(&to_backend)),
                    Expect::Frame(
                        XDP_REDIRECT,
                        icmp4(FXB_MAC, CLIENT_MAC, "10.96.0.10", c4, 63, 3, 3, 0, &quote_as(&udp4.bytes(), &to_backend)),
                    ),
                    &[(Counter::IcmpTranslated, 1), (Counter::ForwardedOut, 1)],
                )
            }],
        ),
        case(
            "ICMPv6 packet too big for a SNATed flow, sent to the node: to the client, quoting its packet to the VIP",
            vec![step(syn6_r.bytes(), fwd(&syn6_r_out), SNAT_IN), {
                let sent = syn6_r_out.bytes();
                step(
                    icmp6(BE3_MAC, FXA_MAC, "fd00:201:1::fe", SNAT6, 64, 2, 0, 1280, &quote(&sent)),
                    Expect::Frame(
                        XDP_REDIRECT,
                        icmp6(FXB_MAC, CLIENT_MAC, "fd00:201:1::fe", c6, 63, 2, 0, 1280, &quote_as(&syn6_r.bytes(), &sent)),
                    ),
                    &[(Counter::IcmpTranslated, 1), (Counter::ForwardedOut, 1)],
                )
            }],
        ),
        untouched(
            "ICMP error about no translated flow: untouched",
            icmp4(CLIENT_MAC, LB_MAC, "10.200.0.254", "10.200.0.1", 64, 3, 4, 1400, &quote(&Frame::tcp("10.200.0.1", 22, c4, 40000, ACK).bytes())),
            Counter::NotService,
        ),
        untouched(
            "truncated TCP header to the VIP: untouched",
            mangle(syn4.bytes()[..44].to_vec(), |b| {
                b[16..18].copy_from_slice(&30u16.to_be_bytes());
            }),
            Counter::TruncatedL4,
        ),
        untouched(
            "TCP data offset below 5 to the VIP: untouched",
            mangle(syn4.bytes(), |b| b[46] = 0x40),
            Counter::TruncatedL4,
        ),
        untouched(
            "truncated UDP header to the VIP: untouched",
            mangle(udp4.bytes()[..38].to_vec(), |b| {
                b[16..18].copy_from_slice(&24u16.to_be_bytes());
            }),
            Counter::TruncatedL4,
        ),
        untouched(
            "ICMP to the VIP: untouched",
            mangle(syn4.bytes(), |b| b[23] = 1),
            Counter::OtherProto,
        ),
        untouched(
            "IPv6 hop-by-hop extension header to the VIP: untouched",
            mangle(syn6.bytes(), |b| b[20] = 0),
            Counter::Ipv6ExtHeader,
        ),
        untouched(
            "IPv6 routing header to the VIP: untouched",
            mangle(udp6.bytes(), |b| b[20] = 43),
            Counter::Ipv6ExtHeader,
        ),
        untouched(
            "IPv6 payload length beyond the frame: untouched",
            mangle(syn6.bytes(), |b| {
                b[18..20].copy_from_slice(&1400u16.to_be_bytes());
            }),
            Counter::MalformedIp,
        ),
        untouched(
            "truncated IPv6 header: untouched",
            syn6.bytes()[..40].to_vec(),
            Counter::MalformedIp,
        ),
        untouched(
            "802.1Q VLAN-tagged frame to the VIP: untouched",
            mangle(syn4.bytes(), |b| {
                b.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
            }),
            Counter::Vlan,
        ),
        Case {
            name: "per-backend and per-service counters: packets, bytes, connections",
            seed: Seed::None,
            steps: vec![
                step(syn4.bytes(), fwd(&syn4_out), NEW_IN),
                step(
                    ack4.bytes(),
                    fwd(&ack4.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                    HIT_IN,
                ),
                step(reply4.bytes(), fwd(&reply4_out), OUT),
            ],
            after: Some(Box::new({
                let want_in = (syn4.bytes().len() + ack4.bytes().len()) as u64;
                let want_out = reply4.bytes().len() as u64;
                move |maps: &Maps| {
                    let st = meshlb::engine::xdp::inspect::status(maps, Some("fixture"))
                        .map_err(|e| e.to_string())?;
                    let web = st
                        .services
                        .iter()
                        .find(|s| s.name == "web")
                        .ok_or("no service web")?;
                    let b = web
                        .backends
                        .iter()
                        .find(|b| b.port == 8000)
                        .ok_or("no backend :8000")?;
                    let got = (b.connections, b.packets_in, b.packets_out, b.bytes);
                    let want = (1, 2, 1, want_in + want_out);
                    if got != want || web.connections != 1 || st.conntrack_entries != 1 {
                        return Err(format!("backend (conns, in, out, bytes) {got:?} want {want:?}; service conns {}; ct {}", web.connections, st.conntrack_entries));
                    }
                    Ok(())
                }
            })),
        },
        case(
            "ipv4 tcp SYN to a remote backend: DNAT, and SNAT to the node address, the client port (ephemeral on the node) folded into the usable ports",
            vec![step(syn_r.bytes(), fwd(&syn_r_out), SNAT_IN)],
        ),
        case(
            "ipv4 tcp remote backend: its reply is translated back to the client (source = the VIP)",
            vec![
                step(syn_r.bytes(), fwd(&syn_r_out), SNAT_IN),
                step(reply_r.bytes(), fwd(&reply_r_out), OUT),
                step(
                    ack_r.bytes(),
                    fwd(&ack_r.translated(
                        Some(("10.201.1.3", 8000)),
                        Some((SNAT4, SNAT_PORT)),
                        FXA_MAC,
                        BE3_MAC,
                    )),
                    &[(Counter::NewFlow, 0), (Counter::SnatNew, 0), (Counter::ForwardedIn, 1)],
                ),
            ],
        ),
        case(
            "ipv4 tcp remote backend: two flows, two ports",
            vec![
                step(syn_r.bytes(), fwd(&syn_r_out), SNAT_IN),
                step(
                    syn_r2.bytes(),
                    fwd(&syn_r2.translated(
                        Some(("10.201.1.3", 8000)),
                        Some((SNAT4, SNAT_PORT + 1)),
                        FXA_MAC,
                        BE3_MAC,
                    )),
                    SNAT_IN,
                ),
            ],
        ),
        Case {
            name: "ipv4 remote backend: a port held by a live (established) flow is skipped",
            seed: Seed::SnatHeld {
                flow: other_flow,
                port: SNAT_PORT,
                live: true,
                ct_flags: CT_F_EST,
                age_ms: 5_000,
                snat_est: false,
            },
            steps: vec![step(
                syn_r.bytes(),
                fwd(&syn_r.translated(
                    Some(("10.201.1.3", 8000)),
                    Some((SNAT4, next_port(c4, 40000))),
                    FXA_MAC,
                    BE3_MAC,
                )),
                &[(Counter::SnatNew, 1), (Counter::SnatReclaimed, 0), (Counter::ForwardedIn, 1)],
            )],
            after: None,
        },
        Case {
            name: "ipv4 remote backend: a port of an embryonic flow (no handshake ACK yet) taken 0.2 s ago is skipped",
            seed: Seed::SnatHeld {
                flow: other_flow,
                port: SNAT_PORT,
                live: true,
                ct_flags: 0,
                age_ms: 200,
                snat_est: false,
            },
            steps: vec![step(
                syn_r.bytes(),
                fwd(&syn_r.translated(
                    Some(("10.201.1.3", 8000)),
                    Some((SNAT4, next_port(c4, 40000))),
                    FXA_MAC,
                    BE3_MAC,
                )),
                &[(Counter::SnatNew, 1), (Counter::SnatReclaimed, 0)],
            )],
            after: None,
        },
        Case {
            name: "ipv4 remote backend: a port of an embryonic flow taken 2 s ago (a spoofed SYN) goes to the new flow",
            seed: Seed::SnatHeld {
                flow: other_flow,
                port: SNAT_PORT,
                live: true,
                ct_flags: 0,
                age_ms: 2_000,
                snat_est: false,
            },
            steps: vec![step(
                syn_r.bytes(),
                fwd(&syn_r_out),
                &[(Counter::SnatNew, 0), (Counter::SnatReclaimed, 1), (Counter::ForwardedIn, 1)],
            )],
            after: None,
        },
        case(
            "ipv4 tcp ACK of no known flow to a local backend: forwarded by Maglev, no state created",
            vec![step(
                ack4.bytes(),
                fwd(&ack4.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                &[(Counter::Stateless, 1), (Counter::NewFlow, 0), (Counter::ForwardedIn, 1)],
            )],
        )
        .after(|maps: &Maps| {
            let (ct, rnat) = (maps.conntrack.keys().count(), maps.reverse_nat.keys().count());
            if ct == 0 && rnat == 0 {
                Ok(())
            } else {
                Err(format!("conntrack {ct}, reverse NAT {rnat} entries; want none"))
            }
        }),
        case(
            "ipv4 tcp ACK of no known flow to a remote backend: dropped (it would need a SNAT port), no state",
            vec![step(
                ack_r.bytes(),
                Expect::Dropped,
                &[(Counter::NoFlow, 1), (Counter::SnatNew, 0), (Counter::NewFlow, 0)],
            )],
        )
        .after(|maps: &Maps| {
            let (ct, snat) = (maps.conntrack.keys().count(), maps.snat.keys().count());
            if ct == 0 && snat == 0 {
                Ok(())
            } else {
                Err(format!("conntrack {ct}, SNAT {snat} entries; want none"))
            }
        }),
        case(
            "ipv4 tcp handshake ACK marks the flow established (its SNAT port is kept past the embryonic limit)",
            vec![
                step(syn_r.bytes(), fwd(&syn_r_out), SNAT_IN),
                step(
                    ack_r.bytes(),
                    fwd(&ack_r.translated(
                        Some(("10.201.1.3", 8000)),
                        Some((SNAT4, SNAT_PORT)),
                        FXA_MAC,
                        BE3_MAC,
                    )),
                    &[(Counter::NewFlow, 0), (Counter::ForwardedIn, 1)],
                ),
            ],
        )
        .after(|maps: &Maps| {
            let est = maps
                .conntrack
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, v)| v.flags & CT_F_EST != 0)
                .count();
            if est == 1 {
                Ok(())
            } else {
                Err(format!("{est} established conntrack entries; want 1"))
            }
        }),
        Case {
            name: "ipv4 remote backend: a port whose embryonic flow left conntrack is reclaimed after the embryonic limit, and the old reply entry is replaced",
            seed: Seed::SnatHeld {
                flow: other_flow,
                port: SNAT_PORT,
                live: false,
                ct_flags: 0,
                age_ms: 2_000,
                snat_est: false,
            },
            steps: vec![step(
                syn_r.bytes(),
                fwd(&syn_r_out),
                &[(Counter::SnatNew, 0), (Counter::SnatReclaimed, 1), (Counter::ForwardedIn, 1)],
            )],
            after: Some(Box::new(|maps: &Maps| {
                let n = maps.snat.keys().count();
                // The new flow is embryonic (a SYN so far).
                let ct = maps
                    .conntrack_embryonic
                    .iter()
                    .filter_map(Result::ok)
                    .filter(|(_, v)| v.flags & CT_F_SNAT != 0)
                    .count();
                if n == 1 && ct == 1 {
                    Ok(())
                } else {
                    Err(format!("snat entries {n}, snat conntrack entries {ct}; want 1 and 1"))
                }
            })),
        },
        // Ports are owned: quarantine, eviction, re-opening.
        Case {
            name: "ipv4 remote backend: a port whose established flow closed (RST) 5 s ago is quarantined: the new client gets the next one",
            seed: Seed::SnatHeld {
                flow: other_flow,
                port: SNAT_PORT,
                live: true,
                ct_flags: CT_F_EST | CT_F_RST,
                age_ms: 5_000,
                snat_est: true,
            },
            steps: vec![step(
                syn_r.bytes(),
                fwd(&syn_r.translated(Some(("10.201.1.3", 8000)), Some((SNAT4, next_port(c4, 40000))), FXA_MAC, BE3_MAC)),
                &[(Counter::SnatNew, 1), (Counter::SnatReclaimed, 0)],
            )],
            after: None,
        },
        Case {
            name: "ipv4 remote backend: a port whose established flow closed 61 s ago (past the 60 s quarantine) goes to the new flow",
            seed: Seed::SnatHeld {
                flow: other_flow,
                port: SNAT_PORT,
                live: true,
                ct_flags: CT_F_EST | CT_F_RST,
                age_ms: 61_000,
                snat_est: true,
            },
            steps: vec![step(
                syn_r.bytes(),
                fwd(&syn_r_out),
                &[(Counter::SnatNew, 0), (Counter::SnatReclaimed, 1)],
            )],
            after: None,
        },
        Case {
            name: "ipv4 remote backend: a port whose established flow's conntrack entry vanished (evicted) 5 s ago is not handed to another client within the quarantine",
            seed: Seed::SnatHeld {
                flow: other_flow,
                port: SNAT_PORT,
                live: false,
                ct_flags: 0,
                age_ms: 5_000,
                snat_est: true,
            },
            steps: vec![step(
                syn_r.bytes(),
                fwd(&syn_r.translated(Some(("10.201.1.3", 8000)), Some((SNAT4, next_port(c4, 40000))), FXA_MAC, BE3_MAC)),
                &[(Counter::SnatNew, 1), (Counter::SnatReclaimed, 0), (Counter::Evicted, 1)],
            )],
            after: None,
        },
        Case {
            name: "ipv4 remote backend: a port whose established flow vanished 61 s ago goes to the new flow",
            seed: Seed::SnatHeld {
                flow: other_flow,
                port: SNAT_PORT,
                live: false,
                ct_flags: 0,
                age_ms: 61_000,
                snat_est: true,
            },
            steps: vec![step(
                syn_r.bytes(),
                fwd(&syn_r_out),
                &[(Counter::SnatNew, 0), (Counter::SnatReclaimed, 1)],
            )],
            after: None,
        },
        Case {
            name: "ipv4 remote backend: the same client tuple re-opening (its old flow gone) takes its own port again at once",
            seed: Seed::SnatHeld {
                flow: FlowKeySpec {
                    src: c4,
                    sport: 40000,
                    dst: "10.96.0.40",
                    dport: 81,
                    proto: PROTO_TCP,
                },
                port: SNAT_PORT,
                live: false,
                ct_flags: 0,
                age_ms: 0,
                snat_est: true,
            },
            steps: vec![step(
                syn_r.bytes(),
                fwd(&syn_r_out),
                &[(Counter::SnatNew, 0), (Counter::SnatReclaimed, 1), (Counter::ForwardedIn, 1)],
            )],
            after: None,
        },
        // Forged packets never take a live flow's state away.
        case(
            "a forged RST from the client's side on a live remote flow: the reply translation and the SNAT port stay, another client with the same source port gets another port, and the flow's next packet makes it live again",
            vec![
                step(syn_r.bytes(), fwd(&syn_r_out), SNAT_IN),
                step(reply_r.bytes(), fwd(&reply_r_out), OUT),
                step(
                    ack_r.bytes(),
                    fwd(&ack_r.translated(Some(("10.201.1.3", 8000)), Some((SNAT4, SNAT_PORT)), FXA_MAC, BE3_MAC)),
                    HIT_IN,
                ),
                step(
                    rst_r.bytes(),
                    fwd(&rst_r.translated(Some(("10.201.1.3", 8000)), Some((SNAT4, SNAT_PORT)), FXA_MAC, BE3_MAC)),
                    HIT_IN,
                ),
                step(
                    data_back_r.bytes(),
                    fwd(&data_back_r.translated(Some((c4, 40000)), Some(("10.96.0.40", 81)), FXB_MAC, CLIENT_MAC)),
                    OUT,
                ),
                step(
                    syn_r_other.bytes(),
                    fwd(&syn_r_other.translated(Some(("10.201.1.3", 8000)), Some((SNAT4, next_port("10.200.0.9", 40000))), FXA_MAC, BE3_MAC)),
                    &[(Counter::SnatNew, 1), (Counter::SnatReclaimed, 0)],
                ),
                step(
                    ack_r.bytes(),
                    fwd(&ack_r.translated(Some(("10.201.1.3", 8000)), Some((SNAT4, SNAT_PORT)), FXA_MAC, BE3_MAC)),
                    &[(Counter::RstIgnored, 1), (Counter::NewFlow, 0), (Counter::ForwardedIn, 1)],
                ),
            ],
        )
        .after(|maps: &Maps| {
            let rst = maps
                .conntrack
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, v)| v.flags & CT_F_RST != 0)
                .count();
            let snat = maps.snat.keys().count();
            if rst == 0 && snat == 2 {
                Ok(())
            } else {
                Err(format!("{rst} conntrack entries marked RST (want 0), {snat} SNAT entries (want 2)"))
            }
        }),
        case(
            "a forged SYN with a live local flow's tuple sent straight to the backend: the flow's reply translation stays",
            vec![
                step(syn4.bytes(), fwd(&syn4_out), NEW_IN),
                step(
                    ack4.bytes(),
                    fwd(&ack4.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                    HIT_IN,
                ),
                step(
                    Frame::tcp(c4, 40000, "10.201.1.2", 8000, SYN).bytes(),
                    Expect::Untouched,
                    NOT_SVC,
                ),
                step(reply4.bytes(), fwd(&reply4_out), OUT),
            ],
        ),
        case(
            "a forged SYN with a live flow's tuple to the VIP is part of that flow: same backend, no new flow",
            vec![
                step(syn4.bytes(), fwd(&syn4_out), NEW_IN),
                step(
                    ack4.bytes(),
                    fwd(&ack4.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                    HIT_IN,
                ),
                step(syn4.bytes(), fwd(&syn4_out), HIT_IN),
                step(reply4.bytes(), fwd(&reply4_out), OUT),
            ],
        ),
        // Embryonic flows live apart: floods of openers never evict
        // established flows.
        case(
            "a SYN makes state only in the embryonic tables (its SYN-ACK is translated from there); the handshake ACK moves the flow to the main ones",
            vec![
                step(syn4.bytes(), fwd(&syn4_out), NEW_IN),
                step(reply4.bytes(), fwd(&reply4_out), OUT),
                step(
                    ack4.bytes(),
                    fwd(&ack4.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                    &[(Counter::Promoted, 1), (Counter::NewFlow, 0), (Counter::ForwardedIn, 1)],
                ),
            ],
        )
        .after(|maps: &Maps| {
            let n = |m: &aya::maps::HashMap<aya::maps::MapData, FlowKey, CtEntry>| m.keys().count();
            let got = (
                n(&maps.conntrack),
                n(&maps.conntrack_embryonic),
                maps.reverse_nat.keys().count(),
                maps.reverse_nat_embryonic.keys().count(),
            );
            if got == (1, 0, 1, 0) {
                Ok(())
            } else {
                Err(format!("(conntrack, embryonic, reverse NAT, embryonic reverse NAT) = {got:?}; want (1, 0, 1, 0)"))
            }
        }),
        // A client reuses its port towards another frontend of the same
        // backend (which still holds the old connection in TIME_WAIT).
        case(
            "a client port reused towards another frontend of the same backend: the new flow's replies (the backend's bare TIME_WAIT ACK, then its SYN-ACK) come back from the new frontend",
            {
                let np = Frame::tcp(c4, 40000, "10.200.0.1", 80, SYN);
                let np_ack = Frame::tcp(c4, 40000, "10.200.0.1", 80, ACK);
                let tw_ack = Frame {
                    smac: BE1_MAC,
                    dmac: FXA_MAC,
                    ..Frame::tcp("10.201.1.2", 8000, c4, 40000, ACK)
                };
                vec![
                    step(
                        np.bytes(),
                        fwd(&np.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                        NEW_IN,
                    ),
                    step(
                        reply4.bytes(),
                        fwd(&reply4.translated(None, Some(("10.200.0.1", 80)), FXB_MAC, CLIENT_MAC)),
                        OUT,
                    ),
                    step(
                        np_ack.bytes(),
                        fwd(&np_ack.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                        &[(Counter::Promoted, 1), (Counter::ForwardedIn, 1)],
                    ),
                    step(syn4.bytes(), fwd(&syn4_out), NEW_IN),
                    step(
                        tw_ack.bytes(),
                        fwd(&tw_ack.translated(None, Some(("10.96.0.10", 80)), FXB_MAC, CLIENT_MAC)),
                        OUT,
                    ),
                    step(reply4.bytes(), fwd(&reply4_out), OUT),
                ]
            },
        ),
        case(
            "SYNs of three new flows and a lone UDP datagram leave the main tables untouched; a second datagram establishes the UDP flow",
            vec![
                step(syn4.bytes(), fwd(&syn4_out), NEW_IN),
                step(
                    Frame::tcp("10.200.0.3", 40000, "10.96.0.10", 80, SYN).bytes(),
                    Expect::Verdict(XDP_REDIRECT),
                    NEW_IN,
                ),
                step(
                    Frame::tcp("10.200.0.4", 40000, "10.96.0.10", 80, SYN).bytes(),
                    Expect::Verdict(XDP_REDIRECT),
                    NEW_IN,
                ),
                step(udp4.bytes(), fwd(&udp4_out), NEW_IN),
                step(
                    udp4.bytes(),
                    fwd(&udp4_out),
                    &[(Counter::Promoted, 1), (Counter::NewFlow, 0), (Counter::ForwardedIn, 1)],
                ),
            ],
        )
        .after(|maps: &Maps| {
            let got = (
                maps.conntrack.keys().count(),
                maps.conntrack_embryonic.keys().count(),
            );
            if got == (1, 3) {
                Ok(())
            } else {
                Err(format!("(conntrack, embryonic) = {got:?}; want (1, 3): the UDP flow established, the SYNs embryonic"))
            }
        }),
        // A removed backend's TCP flows are reset.
        Case {
            name: "ipv4 tcp flow whose backend was removed: its next packet is answered with a reset from the VIP (sent back), its state goes, and the packet after it is forwarded by Maglev",
            seed: Seed::Ct(flow4, "10.201.1.99", 8000, CT_F_EST),
            steps: vec![
                step(
                    ack4.bytes(),
                    Expect::Frame(XDP_TX, reset_for(&ack4)),
                    &[(Counter::Reset, 1), (Counter::ForwardedIn, 0), (Counter::NewFlow, 0)],
                ),
                step(
                    ack4.bytes(),
                    fwd(&ack4.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                    &[(Counter::Reset, 0), (Counter::Stateless, 1), (Counter::ForwardedIn, 1)],
                ),
            ],
            after: None,
        },
        Case {
            name: "ipv6: a SYN on the tuple of a flow whose backend was removed opens a new flow (a reused client port is never reset)",
            seed: Seed::Ct(
                FlowKeySpec {
                    src: c6,
                    sport: 40000,
                    dst: "fd00:96::10",
                    dport: 8080,
                    proto: PROTO_TCP,
                },
                "fd00:201:1::99",
                8000,
                0,
            ),
            steps: vec![step(
                syn6.bytes(),
                fwd(&syn6_out),
                &[(Counter::Reset, 0), (Counter::NewFlow, 1), (Counter::ForwardedIn, 1)],
            )],
            after: None,
        },
        Case {
            name: "a tcp flow whose backend is still listed (down or draining keeps its flows) is not reset",
            seed: Seed::Ct(flow4, "10.201.1.2", 8000, CT_F_EST),
            steps: vec![step(
                ack4.bytes(),
                fwd(&ack4.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                &[(Counter::Reset, 0), (Counter::ForwardedIn, 1)],
            )],
            after: None,
        },
        // Timeouts: an expired flow is absent.
        Case {
            name: "an established tcp flow idle past tcp_timeout (1 h) is absent: a SYN on its tuple selects afresh",
            seed: Seed::CtAged(flow4, "10.201.1.3", 8000, CT_F_EST, 3_700),
            steps: vec![step(
                syn4.bytes(),
                fwd(&syn4_out),
                &[(Counter::Expired, 1), (Counter::NewFlow, 1), (Counter::ForwardedIn, 1)],
            )],
            after: None,
        },
        Case {
            name: "an established tcp flow idle for 59 min is live: a SYN on its tuple keeps its backend",
            seed: Seed::CtAged(flow4, "10.201.1.3", 8000, CT_F_EST, 3_540),
            steps: vec![step(
                syn4.bytes(),
                fwd(&syn4.translated(Some(("10.201.1.3", 8000)), None, FXA_MAC, BE3_MAC)),
                &[(Counter::Expired, 0), (Counter::NewFlow, 0), (Counter::ForwardedIn, 1)],
            )],
            after: None,
        },
        Case {
            name: "a closing tcp flow idle past tcp_closing_timeout (10 s) is absent: its late ACK is forwarded by Maglev without state",
            seed: Seed::CtAged(flow4, "10.201.1.3", 8000, CT_F_EST | CT_F_FIN_CLIENT, 12),
            steps: vec![step(
                ack4.bytes(),
                fwd(&ack4.translated(Some(("10.201.1.2", 8000)), None, FXA_MAC, BE1_MAC)),
                &[(Counter::Expired, 1), (Counter::Stateless, 1), (Counter::NewFlow, 0)],
            )],
            after: None,
        },
        Case {
            name: "a udp flow idle past udp_timeout (2 min) is absent: its next datagram is a new flow",
            seed: Seed::CtAged(
                FlowKeySpec {
                    src: c4,
                    sport: 50000,
                    dst: "10.96.0.10",
                    dport: 53,
                    proto: PROTO_UDP,
                },
                "10.201.1.3",
                5353,
                CT_F_EST,
                125,
            ),
            steps: vec![step(
                udp4.bytes(),
                fwd(&udp4_out),
                &[(Counter::Expired, 1), (Counter::NewFlow, 1), (Counter::Rebalanced, 0)],
            )],
            after: None,
        },
        case(
            "ipv4 remote backend: a SNAT port equal to a published node port (8081, `empty`): the reply is the flow's, not a new client's",
            vec![
                step(
                    syn_np.bytes(),
                    fwd(&syn_np.translated(
                        Some(("10.201.1.3", 8000)),
                        Some((SNAT4, 8081)),
                        FXA_MAC,
                        BE3_MAC,
                    )),
                    SNAT_IN,
                ),
                step(
                    reply_np.bytes(),
                    fwd(&reply_np.translated(
                        Some((c4, 8081)),
                        Some(("10.96.0.40", 81)),
                        FXB_MAC,
                        CLIENT_MAC,
                    )),
                    &[(Counter::ForwardedOut, 1), (Counter::NewFlow, 0), (Counter::NoBackend, 0)],
                ),
            ],
        ),
        case(
            "ipv4 tcp too big for the path to the remote backend (route MTU 1280): answered with ICMP fragmentation needed quoting the packet as sent, sent back (XDP_TX)",
            vec![
                step(syn_r.bytes(), fwd(&syn_r_out), SNAT_IN),
                {
                    let f = Frame {
                        payload: vec![b'x'; 1400],
                        ..Frame::tcp(c4, 40000, "10.96.0.40", 81, ACK)
                    };
                    let b = f.bytes();
                    step(
                        b.clone(),
                        Expect::Frame(XDP_TX, too_big_answer(&b, "10.96.0.40", NARROW_MTU)),
                        &[(Counter::TooBig, 1), (Counter::ForwardedIn, 0)],
                    )
                },
            ],
        ),
        case(
            "ipv4 udp too big for the path to the remote backend: ICMP fragmentation needed quoting the 8-byte UDP header",
            vec![{
                let f = Frame {
                    payload: vec![b'x'; 1400],
                    ..Frame::udp(c4, 50000, "10.96.0.40", 54)
                };
                let b = f.bytes();
                step(
                    b.clone(),
                    Expect::Frame(XDP_TX, too_big_answer(&b, "10.96.0.40", NARROW_MTU)),
                    &[(Counter::TooBig, 1), (Counter::ForwardedIn, 0)],
                )
            }],
        ),
        case(
            "ipv6 tcp too big for the path to the remote backend: ICMPv6 packet too big quoting the packet as sent",
            vec![
                step(syn6_r.bytes(), fwd(&syn6_r_out), SNAT_IN),
                {
                    let f = Frame {
                        payload: vec![b'x'; 1400],
                        ..Frame::tcp(c6, 40000, "fd00:96::40", 82, ACK)
                    };
                    let b = f.bytes();
                    step(
                        b.clone(),
                        Expect::Frame(XDP_TX, too_big_answer(&b, "fd00:96::40", NARROW_MTU)),
                        &[(Counter::TooBig, 1), (Counter::ForwardedIn, 0)],
                    )
                },
            ],
        ),
        case(
            "ipv4 tcp that fits the narrow path (1280 bytes): forwarded",
            vec![{
                let f = Frame {
                    payload: vec![b'x'; 1280 - 40],
                    ..Frame::tcp(c4, 40000, "10.96.0.40", 81, SYN)
                };
                step(
                    f.bytes(),
                    fwd(&f.translated(
                        Some(("10.201.1.3", 8000)),
                        Some((SNAT4, SNAT_PORT)),
                        FXA_MAC,
                        BE3_MAC,
                    )),
                    &[(Counter::TooBig, 0), (Counter::ForwardedIn, 1)],
                )
            }],
        ),
        case(
            "ipv4 udp to a remote backend: DNAT + SNAT",
            vec![step(
                udp_r.bytes(),
                fwd(&udp_r.translated(
                    Some(("10.201.1.3", 5353)),
                    Some((SNAT4, SNAT_PORT_UDP)),
                    FXA_MAC,
                    BE3_MAC,
                )),
                SNAT_IN,
            )],
        ),
        case(
            "ipv6 tcp SYN to a remote backend and its reply: DNAT + SNAT, then back",
            vec![
                step(syn6_r.bytes(), fwd(&syn6_r_out), SNAT_IN),
                step(reply6_r.bytes(), fwd(&reply6_r_out), OUT),
            ],
        ),
        Case {
            name: "egress device without native XDP transmit (bridge): translated, handed up with its handoff (metadata, or by flow)",
            seed: Seed::NoXmit("fxa"),
            steps: vec![step(
                syn4.bytes(),
                Expect::Frame(
                    XDP_PASS,
                    handoff(
                        FXA_IFINDEX,
                        Frame {
                            dst: "10.201.1.2".parse().unwrap(),
                            dport: 8000,
                            ..syn4.clone()
                        }
                        .bytes(),
                    ),
                ),
                &[
                    (Counter::RedirectPass, 1),
                    (Counter::Handoff, 1),
                    (Counter::ForwardedIn, 0),
                ],
            )],
            after: None,
        },
        untouched(
            "ARP: untouched",
            mangle(syn4.bytes()[..42].to_vec(), |b| {
                b[12] = 0x08;
                b[13] = 0x06;
            }),
            Counter::NotService,
        ),
    ]
}

// ---------------------------------------------------------------------
// Running it
// ---------------------------------------------------------------------

/// The SNAT port a flow from `client`:`port` gets when the port its own
/// source port maps to (`SNAT_PORT` for 40000) is taken: the first of
/// its walk (`SnatAddr::walk`).
fn next_port(client: &str, port: u16) -> u16 {
    let (addr, _) = addr_bytes(client.parse().unwrap());
    let a = meshlb_common::SnatAddr {
        port_min: meshlb_common::SNAT_PORT_MIN,
        port_max: meshlb_common::SNAT_PORT_MAX,
        hole_min: EPHEMERAL.0,
        hole_max: EPHEMERAL.1,
        ..Default::default()
    };
    a.walk(meshlb_common::walk_seed(port, &addr), 0)
}

/// The TCP reset the load balancer answers client packet `f` with when its
/// flow's backend was removed (RFC 9293: an ACK's number as sequence, else
/// RST|ACK acknowledging the segment), built independently of the BPF code.
fn reset_for(f: &Frame) -> Vec<u8> {
    let L4::Tcp { flags } = f.l4 else {
        panic!("reset_for: not tcp")
    };
    // `Frame::l4_bytes`: seq 1000, ack 2000 when ACK is set.
    let (seq, ack, rflags) = if flags & ACK != 0 {
        (2000u32, 0u32, RST)
    } else {
        let len =
            f.payload.len() as u32 + u32::from(flags & SYN != 0) + u32::from(flags & FIN != 0);
        (0, 1000 + len, RST | ACK)
    };
    let mut tcp = Vec::new();
    tcp.extend(f.dport.to_be_bytes());
    tcp.extend(f.sport.to_be_bytes());
    tcp.extend(seq.to_be_bytes());
    tcp.extend(ack.to_be_bytes());
    tcp.extend([0x50, rflags, 0, 0, 0, 0, 0, 0]);
    let mut all = fixture::pseudo(f.dst, f.src, 6, 20);
    all.extend(&tcp);
    let c = fold(sum16(&all));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut b = Vec::new();
    b.extend(f.smac);
    b.extend(f.dmac);
    match (f.dst, f.src) {
        (std::net::IpAddr::V4(from), std::net::IpAddr::V4(to)) => {
            b.extend([0x08, 0x00]);
            let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
            ip.extend(from.octets());
            ip.extend(to.octets());
            let c = fold(sum16(&ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            b.extend(ip);
        }
        (std::net::IpAddr::V6(from), std::net::IpAddr::V6(to)) => {
            b.extend([0x86, 0xdd]);
            b.extend([0x60, 0, 0, 0, 0, 20, 6, 64]);
            b.extend(from.octets());
            b.extend(to.octets());
        }
        _ => panic!("mixed families"),
    }
    b.extend(tcp);
    b
}

/// CLOCK_MONOTONIC in ns: `bpf_ktime_get_ns` (and, coarse, the clock of
/// `CtEntry::last_seen`).
fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn seed(maps: &mut Maps, s: &Seed) {
    match s {
        Seed::None => {}
        Seed::Ct(flow, backend, port, flags) => {
            seed(maps, &Seed::CtAged(*flow, backend, *port, *flags, 0));
        }
        Seed::CtSyn(flow, backend, port) => {
            seed(maps, &Seed::CtAged(*flow, backend, *port, 0, 0));
            let e = maps.conntrack.get(&flow.key(), 0).unwrap();
            maps.conntrack.remove(&flow.key()).unwrap();
            maps.conntrack_embryonic.insert(flow.key(), e, 0).unwrap();
        }
        Seed::CtAged(flow, backend, port, flags, age_s) => {
            let (addr, _) = addr_bytes(backend.parse().unwrap());
            // The slot that holds this backend (none: a removed one).
            let backend_id = (0..meshlb_common::MAX_BACKENDS)
                .find(|i| {
                    maps.backends
                        .get(i, 0)
                        .is_ok_and(|b| b.addr == addr && b.port == port.to_be())
                })
                .unwrap_or(meshlb_common::MAX_BACKENDS - 1);
            let e = CtEntry {
                backend_addr: addr,
                backend_port: port.to_be(),
                flags: *flags,
                backend_id,
                service_id: 0,
                snat_port: 0,
                _pad: 0,
                last_seen: flow_clock(mono_ns()).wrapping_sub(ticks(*age_s)),
            };
            maps.conntrack.insert(flow.key(), e, 0).unwrap();
        }
        Seed::SnatHeld {
            flow,
            port,
            live,
            ct_flags,
            age_ms,
            snat_est,
        } => {
            let k = flow.key();
            let (backend, _) = addr_bytes("10.201.1.3".parse().unwrap());
            let (snat, _) = addr_bytes(SNAT4.parse().unwrap());
            let reply = FlowKey {
                src: backend,
                dst: snat,
                sport: 8000u16.to_be(),
                dport: port.to_be(),
                ..k
            };
            let e = SnatEntry {
                client_addr: k.src,
                frontend_addr: k.dst,
                client_port: k.sport,
                frontend_port: k.dport,
                last_seen: mono_ns().saturating_sub(age_ms * 1_000_000),
                flags: if *snat_est { SNAT_E_EST } else { 0 },
                ..Default::default()
            };
            maps.snat.insert(reply, e, 0).unwrap();
            if *live {
                let ct = CtEntry {
                    backend_addr: backend,
                    backend_port: 8000u16.to_be(),
                    flags: CT_F_SNAT | ct_flags,
                    snat_port: port.to_be(),
                    last_seen: flow_clock(mono_ns()),
                    ..Default::default()
                };
                maps.conntrack.insert(k, ct, 0).unwrap();
            }
        }
        Seed::NoXmit(iface) => {
            let index = nix::net::if_::if_nametoindex(*iface).expect("fixture iface");
            maps.ifaces.insert(index, IF_F_NO_XMIT, 0).unwrap();
        }
        Seed::Rnat(flow, fe, port) => {
            let (addr, _) = addr_bytes(fe.parse().unwrap());
            let e = RnatEntry {
                frontend_addr: addr,
                frontend_port: port.to_be(),
                ..Default::default()
            };
            maps.reverse_nat.insert(flow.key(), e, 0).unwrap();
        }
    }
}

/// Checks a handoff where the kernel refuses XDP metadata: the frame went
/// up plain, `MLB_HANDOFF_V1` holds `header` (the `XdpHandoff` the
/// metadata would have carried) under the frame's own flow, and the TC
/// handoff program takes the frame (`TC_ACT_REDIRECT`, to the egress
/// through the neighbour subsystem).
fn check_flow_handoff(
    ebpf: &mut aya::Ebpf,
    pins: &std::path::Path,
    frame: &[u8],
    header: &[u8],
) -> Result<(), String> {
    const TC_ACT_REDIRECT: u32 = 7;
    let want: meshlb_common::XdpHandoff =
        unsafe_free_read(header).ok_or("handoff header too short")?;
    let key = flow_of(frame).ok_or("handed-off frame is not plain TCP/UDP")?;
    let data = aya::maps::MapData::from_pin(pins.join(meshlb_common::maps::HANDOFF))
        .map_err(|e| format!("handoff map: {e}"))?;
    let map: aya::maps::HashMap<_, meshlb_common::FlowKey, meshlb_common::XdpHandoff> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))
            .map_err(|e| format!("handoff map: {e}"))?;
    let got = map
        .get(&key, 0)
        .map_err(|e| format!("no handoff entry for the translated flow {key:?}: {e}"))?;
    if got != want {
        return Err(format!("handoff entry {got:?}, want {want:?}"));
    }
    let tc: &mut SchedClassifier = ebpf
        .program_mut(meshlb_common::PROG_TC_HANDOFF)
        .ok_or("no TC handoff program")?
        .try_into()
        .map_err(|e| format!("TC handoff program: {e}"))?;
    if tc.fd().is_err() {
        tc.load().map_err(|e| format!("TC handoff program: {e}"))?;
    }
    let mut out = vec![0u8; 4096];
    let r = tc
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .map_err(|e| format!("TC handoff test run: {e}"))?;
    if r.return_value != TC_ACT_REDIRECT {
        return Err(format!(
            "TC handoff program returned {}, want TC_ACT_REDIRECT",
            r.return_value
        ));
    }
    Ok(())
}

/// `XdpHandoff` from its bytes (native order, as the kernel lays it out).
fn unsafe_free_read(b: &[u8]) -> Option<meshlb_common::XdpHandoff> {
    let w = |i: usize| Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?));
    Some(meshlb_common::XdpHandoff {
        magic: w(0)?,
        ifindex: w(4)?,
        ingress: w(8)?,
    })
}

/// The flow of a plain IPv4/IPv6 TCP or UDP frame, as the data path keys it.
fn flow_of(f: &[u8]) -> Option<meshlb_common::FlowKey> {
    let mut key = meshlb_common::FlowKey::default();
    let l4 = match f.get(12..14)? {
        [0x08, 0x00] => {
            key.src[..4].copy_from_slice(f.get(26..30)?);
            key.dst[..4].copy_from_slice(f.get(30..34)?);
            key.family = meshlb_common::FAMILY_V4;
            key.proto = *f.get(23)?;
            34
        }
        [0x86, 0xdd] => {
            key.src.copy_from_slice(f.get(22..38)?);
            key.dst.copy_from_slice(f.get(38..54)?);
            key.family = meshlb_common::FAMILY_V6;
            key.proto = *f.get(20)?;
            54
        }
        _ => return None,
    };
    key.sport = u16::from_ne_bytes(f.get(l4..l4 + 2)?.try_into().ok()?);
    key.dport = u16::from_ne_bytes(f.get(l4 + 2..l4 + 4)?.try_into().ok()?);
    Some(key)
}

fn run_case(ns: &Netns, c: &Case) -> Result<(), String> {
    let (mut ebpf, mut maps) = load(&ns.pins);
    let meta = meshlb::engine::xdp::handoff_in_metadata();
    // The SNAT addresses are node addresses too (node ports answer there).
    program(&["10.200.0.1", "fd00:200::1", SNAT4, SNAT6], &mut maps);
    seed(&mut maps, &c.seed);
    for (i, s) in c.steps.iter().enumerate() {
        let prog: &Xdp = ebpf
            .program(meshlb_common::PROG_XDP_LB)
            .unwrap()
            .try_into()
            .unwrap();
        let before = maps.counters();
        let mut out = vec![0u8; 4096];
        let res = prog.test_run(TestRunOptions {
            data_in: Some(&s.input),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        });
        let after = maps.counters();
        let at = format!("step {i}");
        match (&s.expect, res) {
            (Expect::Refused, Err(_)) => {}
            (Expect::Refused, Ok(r)) => {
                // Some kernels run it anyway: then it must not be forwarded.
                if r.return_value != XDP_PASS && r.return_value != 1 {
                    return Err(format!("{at}: tiny frame got verdict {}", r.return_value));
                }
            }
            (_, Err(e)) => return Err(format!("{at}: test run failed: {e}")),
            (Expect::Dropped, Ok(r)) => {
                if r.return_value != XDP_DROP {
                    return Err(format!("{at}: verdict {} want XDP_DROP", r.return_value));
                }
            }
            (Expect::Untouched, Ok(r)) => {
                let got = &out[..r.data_size_out as usize];
                if r.return_value != XDP_PASS || got != s.input.as_slice() {
                    return Err(format!(
                        "{at}: expected untouched XDP_PASS, got verdict {} bytes {}",
                        r.return_value,
                        hex(got)
                    ));
                }
            }
            (Expect::Verdict(v), Ok(r)) => {
                if r.return_value != *v {
                    return Err(format!("{at}: verdict {} want {v}", r.return_value));
                }
                assert_checksums(
                    &out[..r.data_size_out as usize],
                    &format!("{}: {at}", c.name),
                );
            }
            (Expect::Frame(v, want), Ok(r)) => {
                let got = &out[..r.data_size_out as usize];
                if r.return_value != *v {
                    return Err(format!("{at}: verdict {} want {v}", r.return_value));
                }
                // Where the kernel refuses XDP metadata, a handoff goes up
                // plain and is recorded by flow instead (checked below).
                let header_len = std::mem::size_of::<meshlb_common::XdpHandoff>();
                let by_flow =
                    !meta && want.starts_with(&meshlb_common::HANDOFF_MAGIC.to_ne_bytes());
                let want = if by_flow {
                    &want[header_len..]
                } else {
                    &want[..]
                };
                if got != want {
                    return Err(format!(
                        "{at}: output differs\n got  {}\n want {}",
                        hex(got),
                        hex(want)
                    ));
                }
                let magic = meshlb_common::HANDOFF_MAGIC.to_ne_bytes();
                let frame = if got.starts_with(&magic) {
                    &got[header_len..]
                } else {
                    got
                };
                assert_checksums(frame, &format!("{}: {at}", c.name));
                if by_flow {
                    let Expect::Frame(_, full) = &s.expect else {
                        unreachable!()
                    };
                    let frame = frame.to_vec();
                    check_flow_handoff(&mut ebpf, &ns.pins, &frame, &full[..header_len])
                        .map_err(|e| format!("{at}: {e}"))?;
                }
            }
        }
        for (counter, delta) in s.counters {
            let d = after[*counter as usize] - before[*counter as usize];
            if d != *delta {
                return Err(format!(
                    "{at}: counter {} moved by {d}, want {delta}",
                    counter.name()
                ));
            }
        }
    }
    if let Some(f) = &c.after {
        f(&maps)?;
    }
    Ok(())
}

#[test]
fn datapath_fixture_table() {
    let ns = Netns::new_named("mlbt-fx");
    let table = cases();
    assert!(table.len() >= 30, "the table must hold at least 30 cases");
    let failures = in_netns(&ns, || {
        let mut failures = BTreeMap::new();
        for c in &table {
            if let Err(e) = run_case(&ns, c) {
                failures.insert(c.name, e);
            }
        }
        failures
    });
    eprintln!("{} cases, {} failed", cases().len(), failures.len());
    for (name, e) in &failures {
        eprintln!("FAIL {name}: {e}");
    }
    assert!(
        failures.is_empty(),
        "{} datapath cases failed (see above)",
        failures.len()
    );
}

/// Runs `f` on a thread inside the fixture namespace `ns` (the FIB
/// lookups of BPF_PROG_TEST_RUN use the calling thread's namespace).
fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    let name = ns.name.clone();
    std::thread::scope(|s| {
        s.spawn(move || {
            let file = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// Runs `prog` on `frame`: (verdict, output frame).
fn run_on(prog: &Xdp, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; 4096];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .unwrap();
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// The bare forwarder (the benchmarks' reference) routes like any XDP
/// router: FIB lookup, TTL decremented (IPv4 checksum updated), MACs of
/// the next hop, redirect; a destination without a route goes up.
#[test]
fn bare_forwarder_routes_by_the_fib() {
    let ns = Netns::new_named("mlbt-fxb");
    let (mut ebpf, _maps) = load(&ns.pins);
    let prog: &mut Xdp = ebpf
        .program_mut(meshlb_common::PROG_XDP_BARE)
        .expect("bare program")
        .try_into()
        .unwrap();
    prog.load().expect("verifier accepts the bare forwarder");
    let prog: &Xdp = prog;
    in_netns(&ns, || {
        for (src, dst) in [
            ("10.200.0.2", "10.201.1.2"),
            ("fd00:200::2", "fd00:201:1::2"),
        ] {
            let f = Frame::tcp(src, 40000, dst, 8000, SYN);
            let (verdict, out) = run_on(prog, &f.bytes());
            let want = Frame {
                smac: FXA_MAC,
                dmac: BE1_MAC,
                ttl: f.ttl - 1,
                ..f.clone()
            };
            assert_eq!(verdict, XDP_REDIRECT, "{dst}: redirected to fxa");
            assert_eq!(hex(&out), hex(&want.bytes()), "{dst}: routed frame");
            assert_checksums(&out, dst);
        }
        let f = Frame::tcp("10.200.0.2", 40000, "192.0.2.1", 80, SYN);
        let (verdict, out) = run_on(prog, &f.bytes());
        assert_eq!(verdict, XDP_PASS, "no route: up to the stack");
        assert_eq!(out, f.bytes(), "no route: untouched");
    });
}

/// A flow opener (a SYN, a first datagram, a mid-flow segment of no
/// known flow) in a unicast frame for another host's MAC is left to the
/// kernel (a flooding switch hands such frames to every node; balanced by
/// each, one client's flow would reach several backends). The check is
/// made only for interfaces whose MAC the daemon wrote (the uplinks); a
/// known flow's packets are served whatever their frame says, and
/// broadcast frames are not filtered. Checked to fail without the check
/// (the SYN was redirected).
#[test]
fn flow_openers_framed_for_another_host_are_left_to_the_kernel() {
    let ns = Netns::new_named("mlbt-fxo");
    let (ebpf, mut maps) = load(&ns.pins);
    program(&["10.200.0.1", "fd00:200::1", SNAT4, SNAT6], &mut maps);
    let prog: &Xdp = ebpf
        .program(meshlb_common::PROG_XDP_LB)
        .unwrap()
        .try_into()
        .unwrap();
    // BPF_PROG_TEST_RUN's frames arrive on the namespace's loopback.
    let lo = 1u32;
    let other = [0x02, 0, 0, 0, 0, 0x77];
    in_netns(&ns, || {
        let other_host = |m: &Maps| m.counters()[Counter::OtherHost as usize];
        // No MAC written for the interface: not checked.
        let syn = Frame {
            dmac: other,
            ..Frame::tcp("10.200.0.2", 42000, "10.96.0.10", 80, SYN)
        };
        let (verdict, _) = run_on(prog, &syn.bytes());
        assert_eq!(verdict, XDP_REDIRECT, "no MAC known: balanced");
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&LB_MAC);
        maps.iface_macs.insert(lo, mac, 0).unwrap();
        for (what, f) in [
            (
                "SYN",
                Frame::tcp("10.200.0.2", 42001, "10.96.0.10", 80, SYN),
            ),
            (
                "ACK of no flow",
                Frame::tcp("10.200.0.2", 42002, "10.96.0.10", 80, ACK),
            ),
            (
                "datagram",
                Frame::udp("10.200.0.2", 42003, "10.96.0.10", 53),
            ),
            (
                "IPv6 SYN",
                Frame::tcp("fd00:200::2", 42004, "fd00:96::10", 8080, SYN),
            ),
        ] {
            let f = Frame { dmac: other, ..f };
            let before = other_host(&maps);
            let (verdict, out) = run_on(prog, &f.bytes());
            assert_eq!(verdict, XDP_PASS, "{what} for another host: to the kernel");
            assert_eq!(out, f.bytes(), "{what}: untouched");
            assert_eq!(other_host(&maps), before + 1, "{what}: counted other_host");
        }
        // Our MAC: balanced; then the same flow framed for another host
        // is still served (known flow).
        let syn = Frame::tcp("10.200.0.2", 42010, "10.96.0.10", 80, SYN);
        let (verdict, _) = run_on(prog, &syn.bytes());
        assert_eq!(verdict, XDP_REDIRECT, "our MAC: balanced");
        let ack = Frame {
            dmac: other,
            ..Frame::tcp("10.200.0.2", 42010, "10.96.0.10", 80, ACK)
        };
        let (verdict, _) = run_on(prog, &ack.bytes());
        assert_eq!(verdict, XDP_REDIRECT, "a known flow: served");
        // Broadcast: for every host.
        let bcast = Frame {
            dmac: [0xff; 6],
            ..Frame::tcp("10.200.0.2", 42011, "10.96.0.10", 80, SYN)
        };
        let (verdict, _) = run_on(prog, &bcast.bytes());
        assert_eq!(verdict, XDP_REDIRECT, "broadcast: balanced");
    });
}

/// Issue 19: the next-hop cache. A flow's first packet asks the FIB and
/// caches the backend's next hop (egress, MACs, route MTU, generation);
/// a hit uses it without a FIB lookup (shown by a neighbour changed in
/// the kernel behind its back: the cached MAC is still used); a bumped
/// generation (what the daemon does on an rtnetlink event), an entry too
/// old, a missing entry, or a packet over the cached MTU falls back to
/// the FIB, which refreshes the entry. Replies are cached by the
/// client's address the same way.
#[test]
fn next_hop_cache_hit_stale_missing_fall_back_to_the_fib() {
    use meshlb_common::{NextHop, NH_F_VALID, NH_MAX_AGE};
    let ns = Netns::new_named("mlbt-fxn");
    let (ebpf, mut maps) = load(&ns.pins);
    program(&["10.200.0.1", "fd00:200::1", SNAT4, SNAT6], &mut maps);
    let prog: &Xdp = ebpf
        .program(meshlb_common::PROG_XDP_LB)
        .unwrap()
        .try_into()
        .unwrap();
    let new_mac = [0x02, 0, 0, 0, 0x01, 0x99];
    let ns_name = ns.name.clone();
    let set_neigh = |mac: &str| {
        let out = std::process::Command::new("ip")
            .args([
                "-n",
                &ns_name,
                "neigh",
                "replace",
                "10.201.1.2",
                "lladdr",
                mac,
            ])
            .args(["dev", "fxa", "nud", "permanent"])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip neigh replace: {out:?}");
    };
    in_netns(&ns, || {
        let misses = |m: &Maps| m.counters()[Counter::NextHopMiss as usize];
        // The first packet of a flow: a miss, then cached.
        let syn = Frame::tcp("10.200.0.2", 41000, "10.96.0.10", 80, SYN);
        let (verdict, out) = run_on(prog, &syn.bytes());
        assert_eq!(verdict, XDP_REDIRECT, "first packet forwarded");
        assert_eq!(out[0..6], BE1_MAC, "first packet: the FIB's MAC");
        assert_eq!(misses(&maps), 1, "first packet: a miss");
        let be = u16::from_be_bytes([out[36], out[37]]);
        assert_eq!(be, 8000);
        let (id, nh) = (0..meshlb_common::MAX_BACKENDS)
            .find_map(|i| {
                let nh: NextHop = maps.next_hops.get(&i, 0).ok()?;
                (nh.flags & NH_F_VALID != 0).then_some((i, nh))
            })
            .expect("a cached next hop");
        let generation = maps.next_hop_gen.get(&0, 0).unwrap();
        assert_eq!(nh.addr[..4], [10, 201, 1, 2], "cached for the backend");
        assert_eq!(nh.ifindex, FXA_IFINDEX, "egress fxa");
        assert_eq!((nh.smac, nh.dmac), (FXA_MAC, BE1_MAC), "MACs");
        assert_eq!(nh.mtu, 1500, "the route's MTU");
        assert_eq!(nh.gen, generation, "this generation");

        // Hit: the kernel's neighbour changed, the generation did not:
        // the cache answers (no FIB lookup saw the new MAC).
        set_neigh("02:00:00:00:01:99");
        let ack = Frame::tcp("10.200.0.2", 41000, "10.96.0.10", 80, ACK);
        let (verdict, out) = run_on(prog, &ack.bytes());
        assert_eq!(verdict, XDP_REDIRECT);
        assert_eq!(out[0..6], BE1_MAC, "hit: the cached MAC");
        assert_eq!(misses(&maps), 1, "hit: no miss");
        assert_checksums(&out, "hit");

        // Stale: a new generation; the FIB answers, the cache follows.
        maps.bump_next_hop_gen().unwrap();
        let (_, out) = run_on(prog, &ack.bytes());
        assert_eq!(out[0..6], new_mac, "stale: the FIB's new MAC");
        assert_eq!(misses(&maps), 2, "stale: a miss");
        let nh: NextHop = maps.next_hops.get(&id, 0).unwrap();
        assert_eq!(nh.dmac, new_mac, "refreshed");
        assert_eq!(
            nh.gen,
            generation.wrapping_add(1),
            "refreshed: new generation"
        );
        let (_, out) = run_on(prog, &ack.bytes());
        assert_eq!(out[0..6], new_mac);
        assert_eq!(misses(&maps), 2, "refreshed entry hits");

        // Too old (no daemon to bump the generation): the FIB again.
        set_neigh("02:00:00:00:01:02");
        let old = NextHop {
            stamp: nh.stamp.wrapping_sub(NH_MAX_AGE + 1),
            ..nh
        };
        maps.next_hops.set(id, old, 0).unwrap();
        let (_, out) = run_on(prog, &ack.bytes());
        assert_eq!(out[0..6], BE1_MAC, "too old: the FIB's MAC");
        assert_eq!(misses(&maps), 3, "too old: a miss");

        // Missing: the FIB again, and cached again.
        maps.next_hops.set(id, NextHop::default(), 0).unwrap();
        let (verdict, out) = run_on(prog, &ack.bytes());
        assert_eq!(
            (verdict, &out[0..6]),
            (XDP_REDIRECT, &BE1_MAC[..]),
            "missing: FIB"
        );
        assert_eq!(misses(&maps), 4, "missing: a miss");
        let nh: NextHop = maps.next_hops.get(&id, 0).unwrap();
        assert_eq!(nh.flags & NH_F_VALID, NH_F_VALID, "cached again");

        // A packet over the cached MTU: the FIB decides (here it fits).
        maps.next_hops
            .set(id, NextHop { mtu: 30, ..nh }, 0)
            .unwrap();
        let (verdict, _) = run_on(prog, &ack.bytes());
        assert_eq!(verdict, XDP_REDIRECT, "over the cached MTU: FIB");
        assert_eq!(misses(&maps), 5, "over the cached MTU: a miss");

        // Replies: cached by the client's address (MLB_NHADDR_V1). The
        // first asks the FIB, the next ones take the cache, until the
        // generation moves.
        let reply = Frame::tcp("10.201.1.2", 8000, "10.200.0.2", 41000, ACK);
        let client_mac = [0x02, 0, 0, 0, 0, 0x02];
        let (verdict, out) = run_on(prog, &reply.bytes());
        assert_eq!(verdict, XDP_REDIRECT, "reply forwarded");
        assert_eq!(out[0..6], client_mac, "reply: the client's MAC");
        assert_eq!(misses(&maps), 6, "first reply: a miss");
        let (verdict, out) = run_on(prog, &reply.bytes());
        assert_eq!((verdict, &out[0..6]), (XDP_REDIRECT, &client_mac[..]));
        assert_eq!(misses(&maps), 6, "second reply: a hit");
        maps.bump_next_hop_gen().unwrap();
        run_on(prog, &reply.bytes());
        assert_eq!(misses(&maps), 7, "reply after a new generation: a miss");

        // The reply of a flow not established yet (a SYN-ACK: what a
        // flood of spoofed SYNs draws) neither uses nor fills the cache.
        let syn2 = Frame::tcp("10.200.0.2", 41001, "10.96.0.10", 80, SYN);
        let (verdict, out) = run_on(prog, &syn2.bytes());
        assert_eq!(verdict, XDP_REDIRECT, "second flow forwarded");
        let backend = Ipv4Addr::new(out[30], out[31], out[32], out[33]).to_string();
        // A new generation: a reply that consulted the cache would miss.
        maps.bump_next_hop_gen().unwrap();
        let before = misses(&maps);
        let synack = Frame::tcp(&backend, 8000, "10.200.0.2", 41001, SYN | ACK);
        let (verdict, out) = run_on(prog, &synack.bytes());
        assert_eq!(verdict, XDP_REDIRECT, "SYN-ACK translated and forwarded");
        assert_eq!(out[0..6], client_mac, "SYN-ACK: the FIB's MAC");
        assert_eq!(misses(&maps), before, "SYN-ACK: the cache not consulted");
    });
}

/// The backend port a forwarded frame carries (after a handoff header, if
/// any); `None` for a frame that is not IPv4 TCP.
fn forwarded_dport(out: &[u8]) -> Option<u16> {
    let magic = meshlb_common::HANDOFF_MAGIC.to_ne_bytes();
    let f = if out.starts_with(&magic) {
        &out[std::mem::size_of::<meshlb_common::XdpHandoff>()..]
    } else {
        out
    };
    (f.len() >= 38 && f[12..14] == [0x08, 0x00] && f[23] == 6)
        .then(|| u16::from_be_bytes([f[36], f[37]]))
}

/// Issue 18: a service's ring is replaced whole. One thread replaces the
/// ring of `web` in turn with 1,021 slots all naming backend Y (port
/// 8001), then X (port 8000), then 16,381 slots naming Y, then X, as fast
/// as it can (a change of size swaps in a new inner map, a same-size one
/// rewrites the inactive half in place and flips); meanwhile every read of the ring through the pins must
/// be wholly one or the other (size and slots), and every new flow the
/// program sees must go to X or Y. A packet that read the size of one ring
/// and a slot of the other would find no backend (most slots of the large
/// ring are beyond the small one), and a userspace read of a ring written
/// in place would see both backends.
#[test]
fn rings_are_replaced_whole_never_seen_mixed() {
    use meshlb_common::{Backend, BE_F_PRESENT, FAMILY_V4, RING_SIZES};
    let ns = Netns::new_named("mlbt-fxr");
    let (ebpf, mut maps) = load(&ns.pins);
    program(&["10.200.0.1", "fd00:200::1", SNAT4, SNAT6], &mut maps);
    let vip = meshlb_common::FrontendKey {
        addr: addr_bytes("10.96.0.10".parse().unwrap()).0,
        port: 80u16.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
    };
    let sid = maps
        .frontends
        .get(&vip, 0)
        .expect("web's VIP frontend")
        .service_id;
    let x = (0..meshlb_common::MAX_BACKENDS)
        .find(|&i| {
            maps.backends
                .get(&i, 0)
                .is_ok_and(|b| b.service_id == sid && b.flags & BE_F_PRESENT != 0)
        })
        .expect("web's backend");
    let bx = maps.backends.get(&x, 0).unwrap();
    let y = (0..meshlb_common::MAX_BACKENDS)
        .find(|&i| {
            maps.backends
                .get(&i, 0)
                .is_ok_and(|b| b.flags & BE_F_PRESENT == 0)
        })
        .expect("a free backend slot");
    maps.backends
        .set(
            y,
            Backend {
                port: 8001u16.to_be(),
                ..bx
            },
            0,
        )
        .unwrap();
    let small = |b: u32| vec![b; RING_SIZES[0] as usize];
    let big = |b: u32| vec![b; RING_SIZES[1] as usize];
    // In turn: x small -> y small (size change: a new inner map), -> x
    // small (same size: rewritten in place), -> y big (new), -> x big (in
    // place).
    let rings = [small(y), small(x), big(y), big(x)];
    let reader = Maps::from_pins(&ns.pins).expect("pins");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let swapped = std::sync::atomic::AtomicU32::new(0);
    let read_whole = std::sync::atomic::AtomicU32::new(0);
    let ns_name = ns.name.clone();
    let (swaps, reads, packets) = std::thread::scope(|s| {
        let swapper = s.spawn(|| {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ring = &rings[n as usize % rings.len()];
                maps.swap_ring(sid, ring)
                    .unwrap_or_else(|e| panic!("swap {n}: {e}"));
                n += 1;
                swapped.store(n, std::sync::atomic::Ordering::Relaxed);
                // Each ring serves a while: a ring rewritten in place
                // is active from its flip, and the next new ring is in
                // at the start of its install (whose wait follows), so
                // without a pause the in-place rings would serve
                // microseconds against the new ones' milliseconds.
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
            n
        });
        let read = s.spawn(|| {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = reader.ring(sid).expect("read").expect("a ring");
                let whole = rings.contains(&r);
                assert!(whole, "read {n}: a mixed ring of {} slots", r.len());
                n += 1;
                read_whole.store(n, std::sync::atomic::Ordering::Relaxed);
            }
            n
        });
        // New flows through the program, in the fixture namespace (its
        // FIB lookups run in the calling thread's).
        let send = s.spawn(|| {
            let f = std::fs::File::open(format!("/run/netns/{ns_name}")).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let prog: &Xdp = ebpf
                .program(meshlb_common::PROG_XDP_LB)
                .unwrap()
                .try_into()
                .unwrap();
            let mut seen = BTreeMap::new();
            // Until 40 swaps (half of them wait for running programs,
            // milliseconds) and 10 whole reads (a read of the large ring
            // is CPU-bound: slower under load) happened meanwhile, within
            // 20 s.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let mut i = 0u32;
            while (swapped.load(std::sync::atomic::Ordering::Relaxed) < 40
                || read_whole.load(std::sync::atomic::Ordering::Relaxed) < 10)
                && std::time::Instant::now() < deadline
            {
                i += 1;
                let sport = 20000 + (i % 40000) as u16;
                let client = format!("10.200.{}.{}", 1 + (i / 40000) % 250, 2 + i % 200);
                let frame = Frame::tcp(&client, sport, "10.96.0.10", 80, SYN).bytes();
                let mut out = vec![0u8; 4096];
                let r = prog
                    .test_run(TestRunOptions {
                        data_in: Some(&frame),
                        data_out: Some(&mut out),
                        ..TestRunOptions::new()
                    })
                    .expect("test run");
                let port = forwarded_dport(&out[..r.data_size_out as usize]);
                assert!(
                    matches!(port, Some(8000 | 8001)) && r.return_value != XDP_PASS,
                    "flow {i}: verdict {} port {port:?}: neither ring's backend",
                    r.return_value
                );
                *seen.entry(port).or_insert(0u32) += 1;
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            seen
        });
        let seen = send.join().unwrap_or_else(|e| {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            std::panic::resume_unwind(e)
        });
        (swapper.join().unwrap(), read.join().unwrap(), seen)
    });
    eprintln!("{swaps} swaps, {reads} whole reads, new flows by backend port: {packets:?}");
    assert!(
        swaps >= 40 && reads >= 10,
        "too little overlap: {swaps} swaps, {reads} reads"
    );
    assert_eq!(packets.len(), 2, "both rings served flows: {packets:?}");
    let st = maps.ring_stats;
    eprintln!("ring writes: {st:?}");
    assert!(
        st.flipped >= 15 && st.created >= 15,
        "both ways of replacing a ring were used: {st:?}"
    );
}

/// An upgrade from the flat ring array (`MLB_MAGLEV_V1`, 1,021 slots per
/// service at `id * 1021`) keeps every present service's ring: opening the
/// data plane copies them into `RINGS` before any sync, and unpins the old
/// array.
#[test]
fn rings_of_the_flat_v1_array_are_copied_on_upgrade() {
    use aya::maps::{Array, IterableMap, MapData};
    use meshlb_common::maps;
    let ns = Netns::new_named("mlbt-fxu");
    let (ebpf, mut maps) = load(&ns.pins);
    program(&["10.200.0.1", "fd00:200::1", SNAT4, SNAT6], &mut maps);
    let present: Vec<u32> = (0..16)
        .filter(|&id| {
            maps.services
                .get(&id, 0)
                .is_ok_and(|s| s.flags & meshlb_common::SVC_F_PRESENT != 0)
        })
        .collect();
    assert!(present.len() >= 3, "fixture services: {present:?}");
    // What an earlier meshlb left: no RINGS, a flat array with a
    // recognisable ring per service (slot i -> 1000 * id + i % 7).
    drop((ebpf, maps));
    std::fs::remove_file(ns.pins.join(maps::RINGS)).expect("unpin RINGS");
    let mut flat = Array::<MapData, u32>::create(16 * 1021, 0).expect("flat array");
    let want = |id: u32| -> Vec<u32> { (0..1021).map(|i| 1000 * id + i % 7).collect() };
    for &id in &present {
        for (i, b) in want(id).into_iter().enumerate() {
            flat.set(id * 1021 + i as u32, b, 0).unwrap();
        }
    }
    flat.map()
        .pin(ns.pins.join(maps::MAGLEV_V1))
        .expect("pin the V1 array");
    drop(flat);

    let dp = meshlb::engine::xdp::XdpDataplane::open(
        &ns.pins,
        &[],
        Default::default(),
        "fixture",
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("open over the V1 pins: {e}"));
    let maps = Maps::from_pins(&ns.pins).expect("pins");
    for &id in &present {
        let got = maps
            .ring(id)
            .expect("read")
            .expect("a ring after the upgrade");
        assert_eq!(got, want(id), "service slot {id}: the ring copied from V1");
    }
    assert!(
        !ns.pins.join(maps::MAGLEV_V1).exists(),
        "the V1 array is still pinned"
    );
    drop(dp);
}

/// A plan writes each ring once. The fixture's full sync creates every
/// service's ring and installs them in one batch (one wait for running
/// programs); a later plan that rewrites one ring of the same size flips
/// it in place with no wait; a second rewrite of that ring waits once,
/// before its other half is written again.
#[test]
fn a_plan_writes_each_ring_once_and_a_rewrite_waits_only_when_it_must() {
    use meshlb::engine::xdp::{apply_maps, observe_maps};
    use std::sync::Arc;
    let ns = Netns::new_named("mlbt-fxw");
    let (_ebpf, mut maps) = load(&ns.pins);
    let locals = ["10.200.0.1", "fd00:200::1", SNAT4, SNAT6];
    program(&locals, &mut maps);
    let rings = observe_maps(&maps).unwrap().services.len() as u64;
    let st = maps.ring_stats;
    assert_eq!(
        (st.created, st.flipped, st.barriers),
        (rings, 0, 1),
        "the full sync: {st:?}"
    );
    let cfg = meshlb::source::config::parse(fixture::CONFIG).unwrap();
    let mut desired = cfg.desired_state(
        locals.iter().map(|a| a.parse().unwrap()).collect(),
        "fixture",
    );
    let key = desired
        .services
        .iter()
        .find(|(_, s)| !s.backends.is_empty())
        .map(|(k, _)| k.clone())
        .expect("a service with a backend");
    for (round, weight) in [(1u64, 7u32), (2, 9)] {
        let spec = desired.services.get_mut(&key).unwrap();
        let b = Arc::make_mut(spec).backends.values_mut().next().unwrap();
        b.weight = weight;
        let plan =
            meshlb::control::reconcile::plan(&desired, &observe_maps(&maps).unwrap()).unwrap();
        apply_maps(&mut maps, &plan).unwrap();
        let st = maps.ring_stats;
        // The first rewrite writes the half no program has used; the
        // second must first wait for programs that may still read the
        // half the first one left.
        assert_eq!(
            (st.created, st.flipped, st.barriers),
            (rings, round, round),
            "{key} weight {weight}: {st:?}"
        );
    }
}

/// The arrays `observe` reads whole (one batch lookup per 4,096 slots)
/// read exactly what slot-by-slot lookups read.
#[test]
fn arrays_read_whole_equal_their_slots() {
    let ns = Netns::new_named("mlbt-fxa");
    let (_ebpf, mut maps) = load(&ns.pins);
    program(&["10.200.0.1", "fd00:200::1", SNAT4, SNAT6], &mut maps);
    let backends = maps.all_backends().unwrap();
    assert_eq!(backends.len() as u32, maps.backends.len());
    for (i, b) in backends.iter().enumerate() {
        assert_eq!(
            *b,
            maps.backends.get(&(i as u32), 0).unwrap(),
            "backend slot {i}"
        );
    }
    assert!(
        backends.iter().any(|b| b.flags != 0),
        "the fixture's backends"
    );
    let services = maps.all_services().unwrap();
    assert_eq!(services.len() as u32, maps.services.len());
    for (i, s) in services.iter().enumerate() {
        assert_eq!(
            *s,
            maps.services.get(&(i as u32), 0).unwrap(),
            "service slot {i}"
        );
    }
    let affinity = maps.all_service_affinity().unwrap();
    for (i, a) in affinity.iter().enumerate() {
        assert_eq!(
            *a,
            maps.service_affinity.get(&(i as u32), 0).unwrap(),
            "affinity slot {i}"
        );
    }
}

/// A plan large enough for batch writes (runs of backends, services and
/// frontends) leaves exactly what the reconciler wants: nothing left to
/// do, the counters of every fresh slot zero and of every kept one
/// untouched, every frontend naming its service and every VIP counted
/// once per frontend on it. Then a second plan (new weights and states,
/// ten services gone, ten new ones on their ids) the same.
#[test]
fn a_large_plan_is_written_in_batches_exactly() {
    use meshlb::engine::xdp::{apply_maps, observe_maps};
    use meshlb::model::{
        BackendKey, BackendSpec, BackendState, DesiredState, Frontend, Proto, ServiceKey,
        ServiceSpec,
    };
    use meshlb_common::{AddrKey, Stats};
    use std::collections::BTreeSet;
    use std::net::IpAddr;
    use std::sync::Arc;

    fn service(i: u32, weight_bump: u32) -> (ServiceKey, Arc<ServiceSpec>) {
        let port = 8000 + i as u16;
        let vip = IpAddr::from(Ipv4Addr::new(10, 77, (i / 4) as u8, 1));
        let mut frontends = meshlb::model::Frontends::from([Frontend {
            addr: Some(vip),
            port,
            proto: Proto::Tcp,
        }]);
        if i.is_multiple_of(5) {
            frontends.insert(Frontend {
                addr: None,
                port: 30000 + i as u16,
                proto: Proto::Tcp,
            });
        }
        let backends = (0..10u8)
            .map(|k| {
                let key = BackendKey {
                    addr: IpAddr::from(Ipv4Addr::new(10, 78, i as u8, k + 1)),
                    port: 80,
                };
                let spec = BackendSpec {
                    weight: 1 + u32::from(k % 3) + weight_bump,
                    state: if k == 9 || (weight_bump > 0 && k == 8) {
                        BackendState::Down
                    } else {
                        BackendState::Up
                    },
                    remote: k % 2 == 0,
                };
                (key, spec)
            })
            .collect();
        let key = ServiceKey {
            name: format!("b{i:02}"),
            proto: Proto::Tcp,
            port,
        };
        let spec = ServiceSpec {
            frontends,
            backends,
            affinity_secs: if i.is_multiple_of(3) { 300 } else { 0 },
        };
        (key, Arc::new(spec))
    }

    fn stats(maps: &Maps, backend: bool, id: u32) -> u64 {
        let arr = if backend {
            &maps.backend_stats
        } else {
            &maps.service_stats
        };
        Maps::sum_stats(arr, id).packets_in
    }

    /// Traffic counted in every slot, as if all had carried some.
    fn dirty(maps: &mut Maps) {
        let cpus = aya::util::nr_cpus().unwrap();
        let seen = Stats {
            packets_in: 7,
            ..Default::default()
        };
        let values = || aya::maps::PerCpuValues::try_from(vec![seen; cpus]).unwrap();
        for id in 0..600 {
            maps.backend_stats.set(id, values(), 0).unwrap();
        }
        for id in 0..60 {
            maps.service_stats.set(id, values(), 0).unwrap();
        }
    }

    fn check(maps: &Maps, desired: &DesiredState, before: &meshlb::model::Observed) {
        let observed = observe_maps(maps).unwrap();
        let left = meshlb::control::reconcile::plan(desired, &observed).unwrap();
        assert!(left.ops.is_empty(), "left to do: {:?}", left.ops);
        let mut per_vip: BTreeMap<IpAddr, u32> = BTreeMap::new();
        for (key, os) in &observed.services {
            let kept = before.services.get(key).map(|b| b.id) == Some(os.id);
            let want = if kept {
                7 * aya::util::nr_cpus().unwrap() as u64
            } else {
                0
            };
            assert_eq!(stats(maps, false, os.id), want, "{key} counters");
            for (bk, ob) in &os.backends {
                let kept = before
                    .services
                    .get(key)
                    .and_then(|b| b.backends.get(bk))
                    .map(|b| b.id)
                    == Some(ob.id);
                let want = if kept {
                    7 * aya::util::nr_cpus().unwrap() as u64
                } else {
                    0
                };
                assert_eq!(stats(maps, true, ob.id), want, "{key} {bk} counters");
            }
            for f in &os.frontends {
                if let Some(vip) = f.addr {
                    *per_vip.entry(vip).or_default() += 1;
                }
            }
        }
        assert!(per_vip.values().any(|n| *n > 1), "VIPs shared by services");
        for (vip, n) in &per_vip {
            let (addr, family) = addr_bytes(*vip);
            let k = AddrKey {
                addr,
                family,
                _pad: [0; 3],
            };
            assert_eq!(maps.vips.get(&k, 0).ok(), Some(*n), "VIP {vip} references");
        }
        let counted = maps.vips.keys().count();
        assert_eq!(counted, per_vip.len(), "VIPs counted: exactly those in use");
    }

    let ns = Netns::new_named("mlbt-fxb");
    let (_ebpf, mut maps) = load(&ns.pins);
    dirty(&mut maps);
    let mut desired = DesiredState {
        local_addrs: BTreeSet::from(["10.200.0.1".parse().unwrap()]),
        ..Default::default()
    };
    desired.services = (0..40).map(|i| service(i, 0)).collect();
    let before = observe_maps(&maps).unwrap();
    let plan = meshlb::control::reconcile::plan(&desired, &before).unwrap();
    let backends = plan
        .ops
        .iter()
        .filter(|op| matches!(op, meshlb::control::reconcile::Op::UpsertBackend { .. }))
        .count();
    assert_eq!(backends, 400, "one plan writes every backend");
    apply_maps(&mut maps, &plan).unwrap();
    check(&maps, &desired, &before);

    // Round two: counters running in every slot.
    dirty(&mut maps);
    desired.services = (0..20)
        .map(|i| service(i, 1))
        .chain((20..30).map(|i| service(i, 0)))
        .chain((40..50).map(|i| service(i, 0)))
        .collect();
    let before = observe_maps(&maps).unwrap();
    let plan = meshlb::control::reconcile::plan(&desired, &before).unwrap();
    apply_maps(&mut maps, &plan).unwrap();
    check(&maps, &desired, &before);
}

/// Issue 18's Maglev properties on the kernel's rings, read as `meshlb
/// explain` reads them: one service with 100, then 1,000 equal-weight
/// backends, programmed by the daemon's own path. Every backend holds
/// floor(M/N) or ceil(M/N) slots of the ring the kernel holds, and after
/// one backend is removed, `explain` sends at most 0.5 % of 10,000
/// random flows that were not on it elsewhere.
#[test]
fn kernel_rings_balance_exactly_and_a_removal_moves_few_flows_by_explain() {
    use meshlb::engine::xdp::{apply_maps, observe_maps};
    use meshlb::model::{
        BackendKey, BackendSpec, BackendState, DesiredState, Frontend, Proto, ServiceKey,
        ServiceSpec,
    };
    use std::net::{IpAddr, SocketAddr};
    use std::sync::Arc;

    let ns = Netns::new_named("mlbt-fxm");
    let (_ebpf, mut maps) = load(&ns.pins);
    let vip: IpAddr = "10.79.0.1".parse().unwrap();
    let key = ServiceKey {
        name: "pool".into(),
        proto: Proto::Tcp,
        port: 80,
    };
    let backend = |i: usize| BackendKey {
        addr: IpAddr::from(Ipv4Addr::new(10, 80, (i >> 8) as u8, i as u8)),
        port: 8080,
    };
    let up = BackendSpec {
        weight: 1,
        state: BackendState::Up,
        remote: false,
    };
    let program = |maps: &mut Maps, n: usize, without: Option<usize>| {
        let spec = ServiceSpec {
            frontends: [Frontend {
                addr: Some(vip),
                port: 80,
                proto: Proto::Tcp,
            }]
            .into(),
            backends: (0..n)
                .filter(|i| Some(*i) != without)
                .map(|i| (backend(i), up))
                .collect(),
            affinity_secs: 0,
        };
        let desired = DesiredState {
            services: [(key.clone(), Arc::new(spec))].into(),
            local_addrs: Default::default(),
        };
        let plan =
            meshlb::control::reconcile::plan(&desired, &observe_maps(maps).unwrap()).unwrap();
        apply_maps(maps, &plan).unwrap();
    };
    // xorshift64*: the same flows every run.
    let mut state = 0x6d61_676c_6576_3231u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let flows: Vec<SocketAddr> = (0..10_000)
        .map(|_| {
            let r = next();
            let ip = Ipv4Addr::new(10, 81, (r >> 8) as u8, r as u8);
            SocketAddr::new(ip.into(), 1024 + (r >> 16) as u16 % 60000)
        })
        .collect();
    let dst = SocketAddr::new(vip, 80);
    let picks = |maps: &Maps| -> Vec<String> {
        flows
            .iter()
            .map(|src| {
                let e = meshlb::engine::xdp::inspect::explain(maps, Proto::Tcp, *src, dst);
                assert_eq!(
                    e.reason,
                    meshlb::model::status::Reason::Maglev,
                    "{src}: {}",
                    e.line()
                );
                e.backend.expect("a backend")
            })
            .collect()
    };
    for n in [100usize, 1000] {
        program(&mut maps, n, None);
        let sid = observe_maps(&maps).unwrap().services[&key].id;
        let ring = maps.ring(sid).unwrap().expect("a ring");
        let m = ring.len();
        let mut slots: BTreeMap<u32, usize> = BTreeMap::new();
        for b in &ring {
            *slots.entry(*b).or_default() += 1;
        }
        assert_eq!(slots.len(), n, "{n} backends: every one on the ring");
        let (lo, hi) = (m / n, m.div_ceil(n));
        for (id, count) in &slots {
            assert!(
                (lo..=hi).contains(count),
                "{n} backends on {m} slots: backend {id} holds {count}, not {lo} or {hi}"
            );
        }
        let before = picks(&maps);
        let gone = n / 2;
        program(&mut maps, n, Some(gone));
        let after = picks(&maps);
        let gone = SocketAddr::new(backend(gone).addr, 8080).to_string();
        let others = before.iter().filter(|b| **b != gone).count();
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != gone && b != a)
            .count();
        let share = moved as f64 / others as f64;
        eprintln!(
            "{n} backends, {m} slots: removing {gone} moved {moved} of {others} other flows ({:.2} %)",
            share * 100.0
        );
        assert!(
            share <= 0.005,
            "{n} backends: {moved} of {others} other flows moved"
        );
        assert!(
            after.iter().all(|b| *b != gone),
            "no flow left on the removed backend"
        );
    }
}
