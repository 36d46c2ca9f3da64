//! This node's network facts the data plane needs besides services, as
//! pure functions of what rtnetlink reports: per-interface forwarding
//! flags (`MLB_IFACE`), the SNAT address per family (`MLB_SNATADR`), how
//! a backend address is reached (locality of static backends), and which
//! interfaces the data plane is attached to, in which role and why
//! (`wanted_ifaces`).
//!
//! **Invariant:** no IO here; `netlink` reads the facts, `engine::xdp`
//! writes the result.

use crate::model::Role;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use meshlb_common::{IF_F_GENERIC, IF_F_NO_XMIT};

/// What the data plane is told about this node's network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeNet {
    /// ifindex -> `IF_F_*` flags (absent: none).
    pub iface_flags: BTreeMap<u32, u32>,
    /// SNAT source address per family (IPv4, IPv6).
    pub snat: (Option<IpAddr>, Option<IpAddr>),
    /// The node's own ephemeral port range (`ip_local_port_range`): SNAT
    /// never uses these ports, so the node's own connections (health
    /// checks, ...) never collide with a translated flow.
    pub ephemeral: Option<(u16, u16)>,
    /// ifindex -> its first IPv4 and first non-link-local IPv6 address,
    /// for every listed interface: the source of hairpin flows entering
    /// it (`MLB_IFADDR`).
    pub iface_addrs: BTreeMap<u32, (Option<IpAddr>, Option<IpAddr>)>,
    /// This node's address for other nodes (`nodes/<node>`, published
    /// ports of its containers): `node_address`.
    pub node_addr: Option<IpAddr>,
    /// ifindex -> MAC of each uplink (`MLB_IFMAC_V1`): a flow opener in a
    /// unicast frame for another MAC is left to the kernel.
    pub iface_macs: BTreeMap<u32, [u8; 6]>,
}

impl NodeNet {
    /// The facts of `links`/`addrs`/`routes` for a daemon attached to
    /// `ifaces`; `advertise`: `--advertise-addr`, the SNAT address of its
    /// family and the node address.
    pub fn new(
        ifaces: &[String],
        links: &[LinkFacts],
        addrs: &[(u32, IpAddr)],
        routes: &[RouteFact],
        ephemeral: Option<(u16, u16)>,
        advertise: Option<IpAddr>,
    ) -> NodeNet {
        let mut snat = snat_addrs(ifaces, links, addrs);
        match advertise {
            Some(a @ IpAddr::V4(_)) => snat.0 = Some(a),
            Some(a @ IpAddr::V6(_)) => snat.1 = Some(a),
            None => {}
        }
        NodeNet {
            iface_flags: iface_flags(links),
            snat,
            ephemeral,
            iface_addrs: iface_addrs(ifaces, links, addrs),
            node_addr: node_address(advertise, routes, addrs, snat),
            iface_macs: BTreeMap::new(),
        }
    }
}

/// This node's address for other nodes: the advertised one; else the
/// first (primary) address of the IPv4 default route's interface, then
/// the IPv6 one's; else the SNAT address (first listed interface), IPv4
/// first. Never the lowest address of the node (often a Docker bridge's
/// 172.17.0.1, which other nodes cannot reach).
pub fn node_address(
    advertise: Option<IpAddr>,
    routes: &[RouteFact],
    addrs: &[(u32, IpAddr)],
    snat: (Option<IpAddr>, Option<IpAddr>),
) -> Option<IpAddr> {
    if advertise.is_some() {
        return advertise;
    }
    for v4 in [true, false] {
        if let Some(oif) = default_route_oif(routes, v4) {
            if let Some((_, a)) = addrs.iter().find(|(i, a)| *i == oif && a.is_ipv4() == v4) {
                return Some(*a);
            }
        }
    }
    snat.0.or(snat.1)
}

/// One interface the data plane should be attached to, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attach {
    pub name: String,
    pub role: Role,
    /// Said by `meshlb status` and the log ("listed", "default route", ...).
    pub why: String,
}

/// What decides the interfaces: `listed` (`--iface` or `interfaces`, in
/// order), `named_tasks` (`--task-iface`), whether Docker's bridges are
/// taken (`--docker`), the local backends (address -> a service of
/// theirs) and interfaces never attached (the IPVS VIP device).
#[derive(Clone, Copy, Debug)]
pub struct IfaceInputs<'a> {
    pub listed: &'a [String],
    pub named_tasks: &'a [String],
    pub docker: bool,
    pub local_backends: &'a BTreeMap<IpAddr, std::sync::Arc<str>>,
    pub never: &'a [&'a str],
}

/// The interfaces to attach, uplinks first (the first one with an address
/// of a family gives the SNAT address), each once:
/// 1. every listed interface that exists (a bridge or named task
///    interface is a task interface: local tasks sit behind bridges, a
///    bridge never receives frames straight from a wire);
/// 2. without a listed uplink, the interfaces of the default routes;
/// 3. the interface each local backend is reached through (its longest
///    matching route, without a gateway);
/// 4. with Docker, Docker's bridges (`docker0`, `br-<12 hex>`).
///
/// Loopback and `never` are never attached.
pub fn wanted_ifaces(
    inp: &IfaceInputs<'_>,
    links: &[LinkFacts],
    routes: &[RouteFact],
) -> Vec<Attach> {
    let mut out: Vec<Attach> = Vec::new();
    let add = |out: &mut Vec<Attach>, l: &LinkFacts, role: Role, why: String| {
        let taken = l.loopback || inp.never.contains(&l.name.as_str());
        if !taken && !out.iter().any(|a| a.name == l.name) {
            out.push(Attach {
                name: l.name.clone(),
                role,
                why,
            });
        }
    };
    let is_bridge = |l: &LinkFacts| l.kind.as_deref() == Some("bridge");
    for name in inp.listed {
        let Some(l) = links.iter().find(|l| &l.name == name) else {
            continue;
        };
        if inp.named_tasks.contains(name) {
            add(&mut out, l, Role::Task, "listed as a task interface".into());
        } else if is_bridge(l) {
            add(
                &mut out,
                l,
                Role::Task,
                "listed (a bridge: a task interface)".into(),
            );
        } else {
            add(&mut out, l, Role::Uplink, "listed".into());
        }
    }
    if !out.iter().any(|a| a.role == Role::Uplink) {
        for v4 in [true, false] {
            let oifs: BTreeSet<u32> = routes
                .iter()
                .filter(|r| r.prefix_len == 0 && r.dst.is_ipv4() == v4)
                .filter_map(|r| r.oif)
                .collect();
            let family = if v4 { "IPv4" } else { "IPv6" };
            for l in links.iter().filter(|l| oifs.contains(&l.index)) {
                add(&mut out, l, Role::Uplink, format!("{family} default route"));
            }
        }
    }
    for (addr, service) in inp.local_backends {
        let Some(l) = link_of(*addr, routes).and_then(|i| links.iter().find(|l| l.index == i))
        else {
            continue;
        };
        add(
            &mut out,
            l,
            Role::Task,
            format!("local backend {addr} of service {service}"),
        );
    }
    if inp.docker {
        for l in links
            .iter()
            .filter(|l| is_bridge(l) && is_docker_bridge(&l.name))
        {
            add(&mut out, l, Role::Task, "Docker bridge".into());
        }
    }
    out
}

/// Docker's names for its bridges: `docker0`, and `br-` with the first 12
/// hex digits of the network id for user-defined networks.
fn is_docker_bridge(name: &str) -> bool {
    name == "docker0"
        || name.strip_prefix("br-").is_some_and(|id| {
            id.len() == 12
                && id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// The interface `addr` is on: the output interface of its longest
/// matching route when that route has no gateway.
pub fn link_of(addr: IpAddr, routes: &[RouteFact]) -> Option<u32> {
    routes
        .iter()
        .filter(|r| in_prefix(addr, r.dst, r.prefix_len))
        .max_by_key(|r| r.prefix_len)
        .filter(|r| r.gateway.is_none())
        .and_then(|r| r.oif)
}

/// The first IPv4 and first global IPv6 address of each listed interface.
pub fn iface_addrs(
    ifaces: &[String],
    links: &[LinkFacts],
    addrs: &[(u32, IpAddr)],
) -> BTreeMap<u32, (Option<IpAddr>, Option<IpAddr>)> {
    let mut out = BTreeMap::new();
    for l in links.iter().filter(|l| ifaces.contains(&l.name)) {
        let mut v4 = None;
        let mut v6 = None;
        for (_, a) in addrs.iter().filter(|(i, _)| *i == l.index) {
            match a {
                IpAddr::V4(_) if v4.is_none() => v4 = Some(*a),
                IpAddr::V6(b) if v6.is_none() && (b.segments()[0] & 0xffc0) != 0xfe80 => {
                    v6 = Some(*a);
                }
                _ => {}
            }
        }
        if v4.is_some() || v6.is_some() {
            out.insert(l.index, (v4, v6));
        }
    }
    out
}

/// One route of the main table as rtnetlink reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteFact {
    /// Destination network (its address and prefix length).
    pub dst: IpAddr,
    pub prefix_len: u8,
    /// Next hop; `None`: the destination is on the link itself.
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub oif: Option<u32>,
}

/// How this node reaches a backend address, by its routing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// One of this node's own addresses.
    Own,
    /// On a link of this node (no gateway): a local task.
    Direct,
    /// Through this gateway: another node's task.
    Gateway(IpAddr),
    /// No route at all.
    NoRoute,
}

/// How `addr` is reached: the longest matching route of `routes` (the main
/// table) decides; `locals` are this node's own addresses. A route with
/// several next hops (no single gateway) counts as a gateway route only
/// when it names one.
pub fn reach(addr: IpAddr, routes: &[RouteFact], locals: &[IpAddr]) -> Reach {
    if locals.contains(&addr) {
        return Reach::Own;
    }
    routes
        .iter()
        .filter(|r| in_prefix(addr, r.dst, r.prefix_len))
        .max_by_key(|r| r.prefix_len)
        .map_or(Reach::NoRoute, |r| match r.gateway {
            Some(g) => Reach::Gateway(g),
            None => Reach::Direct,
        })
}

/// Whether `addr` lies in `net/len` (same family only).
fn in_prefix(addr: IpAddr, net: IpAddr, len: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if len <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// The interface of the default route of a family (`v4`: IPv4), the
/// lowest index when there are several: the uplink.
pub fn default_route_oif(routes: &[RouteFact], v4: bool) -> Option<u32> {
    routes
        .iter()
        .filter(|r| r.prefix_len == 0 && r.dst.is_ipv4() == v4)
        .filter_map(|r| r.oif)
        .min()
}

/// Parses `/proc/sys/net/ipv4/ip_local_port_range` ("32768\t60999").
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b)), None) if a <= b => Some((a, b)),
        _ => None,
    }
}

/// One interface as rtnetlink reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkFacts {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` ("veth", "bridge", ...); `None` for physical NICs
    /// (and loopback).
    pub kind: Option<String>,
    pub loopback: bool,
    /// An XDP program is attached in generic (skb) mode.
    pub xdp_generic: bool,
    /// The Ethernet address, when it has one (not all zero).
    pub mac: Option<[u8; 6]>,
    /// Operationally up: it can carry packets now (carrier).
    pub oper_up: bool,
}

/// Kinds of virtual device that implement `ndo_xdp_xmit`, i.e. accept a
/// native XDP redirect. Physical NICs (no kind) are assumed to, as native
/// XDP drivers do; every other virtual kind (bridge, dummy, vxlan, vlan,
/// macvlan, wireguard, ...) does not.
const XMIT_KINDS: [&str; 3] = ["veth", "tun", "bond"];

/// The `IF_F_*` flags of every interface that has any.
pub fn iface_flags(links: &[LinkFacts]) -> BTreeMap<u32, u32> {
    links
        .iter()
        .filter_map(|l| {
            let mut f = 0;
            if l.xdp_generic {
                f |= IF_F_GENERIC;
            }
            let xmit = match &l.kind {
                Some(k) => XMIT_KINDS.contains(&k.as_str()),
                None => !l.loopback,
            };
            if !xmit {
                f |= IF_F_NO_XMIT;
            }
            (f != 0).then_some((l.index, f))
        })
        .collect()
}

/// This node's SNAT source address per family: the first address of that
/// family on the first interface of `ifaces` (in the order given) that has
/// one; remote nodes must route it back to this node, which holds for the
/// address of the interface the cluster network is on.
pub fn snat_addrs(
    ifaces: &[String],
    links: &[LinkFacts],
    addrs: &[(u32, IpAddr)],
) -> (Option<IpAddr>, Option<IpAddr>) {
    let mut v4 = None;
    let mut v6 = None;
    for name in ifaces {
        let Some(l) = links.iter().find(|l| &l.name == name) else {
            continue;
        };
        for (_, a) in addrs.iter().filter(|(i, _)| *i == l.index) {
            match a {
                IpAddr::V4(_) if v4.is_none() => v4 = Some(*a),
                IpAddr::V6(_) if v6.is_none() => v6 = Some(*a),
                _ => {}
            }
        }
    }
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: Option<&str>) -> LinkFacts {
        LinkFacts {
            index,
            name: name.into(),
            kind: kind.map(Into::into),
            loopback: false,
            ..Default::default()
        }
    }

    #[test]
    fn bridges_and_other_virtual_devices_take_no_native_redirect() {
        let mut lo = link(1, "lo", None);
        lo.loopback = true;
        let mut br = link(4, "br0", Some("bridge"));
        br.xdp_generic = true;
        let links = [
            lo,
            link(2, "eth0", None),
            link(3, "veth0", Some("veth")),
            br,
            link(5, "dummy0", Some("dummy")),
            link(6, "vx0", Some("vxlan")),
            link(7, "bond0", Some("bond")),
        ];
        let f = iface_flags(&links);
        assert_eq!(f.get(&1), Some(&IF_F_NO_XMIT));
        assert_eq!(f.get(&2), None);
        assert_eq!(f.get(&3), None);
        assert_eq!(f.get(&4), Some(&(IF_F_NO_XMIT | IF_F_GENERIC)));
        assert_eq!(f.get(&5), Some(&IF_F_NO_XMIT));
        assert_eq!(f.get(&6), Some(&IF_F_NO_XMIT));
        assert_eq!(f.get(&7), None);
    }

    #[test]
    fn listed_default_route_local_backend_and_docker_interfaces_are_attached() {
        let mut lo = link(1, "lo", None);
        lo.loopback = true;
        let links = [
            lo,
            link(2, "eth0", None),
            link(3, "br0", Some("bridge")),
            link(4, "veth9", Some("veth")),
            link(5, "docker0", Some("bridge")),
            link(6, "br-0123456789ab", Some("bridge")),
            link(7, "br-lan", Some("bridge")),
            link(8, "meshlb0", Some("dummy")),
            link(9, "eth1", None),
        ];
        let routes = [
            route("0.0.0.0", 0, Some("10.0.0.254"), 2),
            route("::", 0, Some("fd00::1"), 9),
            route("10.0.0.0", 24, None, 2),
            route("10.9.0.0", 24, None, 3),
            route("10.8.0.2", 32, None, 4),
            route("10.7.0.0", 24, Some("10.0.0.7"), 2),
            route("127.0.0.0", 8, None, 1),
        ];
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let v = |x: &[&str]| {
            x.iter()
                .map(std::string::ToString::to_string)
                .collect::<Vec<_>>()
        };
        let backends: BTreeMap<IpAddr, std::sync::Arc<str>> = [
            (ip("10.9.0.5"), "web".into()),
            (ip("10.8.0.2"), "api".into()),
            // Behind a gateway, on loopback, on the uplink: no new interface.
            (ip("10.7.0.5"), "far".into()),
            (ip("127.0.0.2"), "lo".into()),
            (ip("10.0.0.9"), "lan".into()),
        ]
        .into();
        let none = BTreeMap::new();
        let got = |inp: &IfaceInputs<'_>| {
            wanted_ifaces(inp, &links, &routes)
                .into_iter()
                .map(|a| (a.name, a.role))
                .collect::<Vec<_>>()
        };
        let never = ["meshlb0"];
        let listed = v(&["eth0", "br0", "veth9"]);
        let tasks = v(&["veth9"]);
        let inp = IfaceInputs {
            listed: &listed,
            named_tasks: &tasks,
            docker: false,
            local_backends: &none,
            never: &never,
        };
        let owned = |x: &[(&str, Role)]| {
            x.iter()
                .map(|(n, r)| (n.to_string(), *r))
                .collect::<Vec<_>>()
        };
        // Listed, with an uplink: no defaults.
        assert_eq!(
            got(&inp),
            owned(&[
                ("eth0", Role::Uplink),
                ("br0", Role::Task),
                ("veth9", Role::Task)
            ])
        );
        // Nothing listed: both default routes' interfaces, then the local
        // backends' interfaces, then Docker's bridges (not br-lan, nor
        // meshlb0).
        let inp = IfaceInputs {
            listed: &[],
            named_tasks: &[],
            docker: true,
            local_backends: &backends,
            never: &never,
        };
        assert_eq!(
            got(&inp),
            owned(&[
                ("eth0", Role::Uplink),
                ("eth1", Role::Uplink),
                ("veth9", Role::Task),
                ("br0", Role::Task),
                ("docker0", Role::Task),
                ("br-0123456789ab", Role::Task),
            ])
        );
        let whys: Vec<String> = wanted_ifaces(&inp, &links, &routes)
            .into_iter()
            .map(|a| a.why)
            .collect();
        assert_eq!(whys[0], "IPv4 default route");
        assert_eq!(whys[2], "local backend 10.8.0.2 of service api");
        // Only a bridge listed (no uplink): the default routes' too; a
        // listed interface that does not exist is left out.
        let listed = v(&["br0", "nope0"]);
        let inp = IfaceInputs {
            listed: &listed,
            named_tasks: &[],
            docker: false,
            local_backends: &none,
            never: &never,
        };
        assert_eq!(
            got(&inp),
            owned(&[
                ("br0", Role::Task),
                ("eth0", Role::Uplink),
                ("eth1", Role::Uplink)
            ])
        );
    }

    #[test]
    fn docker_bridge_names() {
        for ok in ["docker0", "br-0123456789ab", "br-abcdefabcdef"] {
            assert!(is_docker_bridge(ok), "{ok}");
        }
        for bad in [
            "docker1",
            "br-lan",
            "br-0123456789AB",
            "br-0123456789abc",
            "br0",
        ] {
            assert!(!is_docker_bridge(bad), "{bad}");
        }
    }

    #[test]
    fn interface_addresses_skip_link_local_ipv6() {
        let links = [link(2, "eth0", None), link(3, "br0", Some("bridge"))];
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let addrs = [
            (3, a("fe80::1")),
            (3, a("10.9.0.1")),
            (3, a("fd00:9::1")),
            (3, a("10.9.0.2")),
            (4, a("10.1.1.1")),
        ];
        let m = iface_addrs(&["br0".to_string()], &links, &addrs);
        assert_eq!(m.len(), 1);
        assert_eq!(m[&3], (Some(a("10.9.0.1")), Some(a("fd00:9::1"))));
    }

    #[test]
    fn port_range_parses_or_is_none() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("61000 61000"), Some((61000, 61000)));
        for bad in ["", "1", "2 1", "1 2 3", "a b", "1 70000"] {
            assert_eq!(parse_port_range(bad), None, "{bad:?}");
        }
    }

    fn route(dst: &str, len: u8, gw: Option<&str>, oif: u32) -> RouteFact {
        RouteFact {
            dst: dst.parse().unwrap(),
            prefix_len: len,
            gateway: gw.map(|g| g.parse().unwrap()),
            oif: Some(oif),
        }
    }

    #[test]
    fn backends_are_reached_directly_by_gateway_or_not_at_all() {
        let routes = [
            route("0.0.0.0", 0, Some("10.0.0.254"), 2),
            route("10.0.0.0", 24, None, 2),
            route("10.220.0.0", 24, None, 5),
            route("10.221.0.0", 24, Some("10.0.0.2"), 2),
            route("10.221.0.128", 25, None, 6),
            route("fd00:220::", 64, None, 5),
            route("fd00:221::", 64, Some("fd00:210::2"), 2),
        ];
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let locals = [ip("10.0.0.1"), ip("10.220.0.1")];
        let cases = [
            ("10.220.0.5", Reach::Direct),
            ("10.221.0.5", Reach::Gateway(ip("10.0.0.2"))),
            // The longest prefix wins.
            ("10.221.0.200", Reach::Direct),
            ("10.0.0.7", Reach::Direct),
            ("10.220.0.1", Reach::Own),
            ("192.0.2.1", Reach::Gateway(ip("10.0.0.254"))),
            ("fd00:220::9", Reach::Direct),
            ("fd00:221::9", Reach::Gateway(ip("fd00:210::2"))),
            // No IPv6 default route.
            ("2001:db8::1", Reach::NoRoute),
        ];
        for (a, want) in cases {
            assert_eq!(reach(ip(a), &routes, &locals), want, "{a}");
        }
        assert_eq!(default_route_oif(&routes, true), Some(2));
        assert_eq!(default_route_oif(&routes, false), None);
    }

    #[test]
    fn node_address_is_advertised_else_the_default_route_interfaces() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        // docker0 (index 3) has the numerically lowest address.
        let addrs = [
            (3, ip("172.17.0.1")),
            (2, ip("192.168.1.10")),
            (2, ip("192.168.1.11")),
            (2, ip("fd00:1::10")),
        ];
        let routes = [
            route("0.0.0.0", 0, Some("192.168.1.1"), 2),
            route("172.17.0.0", 16, None, 3),
        ];
        let snat = (Some(ip("172.17.0.1")), None);
        assert_eq!(
            node_address(None, &routes, &addrs, snat),
            Some(ip("192.168.1.10"))
        );
        assert_eq!(
            node_address(Some(ip("192.168.1.11")), &routes, &addrs, snat),
            Some(ip("192.168.1.11"))
        );
        // No default route: the SNAT address.
        assert_eq!(node_address(None, &routes[1..], &addrs, snat), snat.0);
        // An IPv6-only default route.
        let v6 = [route("::", 0, Some("fd00:1::1"), 2)];
        assert_eq!(
            node_address(None, &v6, &addrs, (None, None)),
            Some(ip("fd00:1::10"))
        );
    }

    #[test]
    fn snat_address_is_the_first_listed_interface_with_the_family() {
        let links = [link(2, "eth0", None), link(3, "br0", Some("bridge"))];
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let addrs = [
            (3, a("10.9.0.1")),
            (2, a("10.0.0.5")),
            (2, a("10.0.0.6")),
            (3, a("fd00:9::1")),
        ];
        let order = |v: &[&str]| {
            v.iter()
                .map(std::string::ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            snat_addrs(&order(&["eth0", "br0"]), &links, &addrs),
            (Some(a("10.0.0.5")), Some(a("fd00:9::1")))
        );
        assert_eq!(
            snat_addrs(&order(&["br0", "eth0"]), &links, &addrs),
            (Some(a("10.9.0.1")), Some(a("fd00:9::1")))
        );
        assert_eq!(snat_addrs(&order(&["nope"]), &links, &addrs), (None, None));
    }
}
