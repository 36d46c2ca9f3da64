//! This node's own checks of a service before it is programmed (SPEC
//! "Node setup without surprises"): a VIP that is one of this node's
//! addresses or one of its gateways would take that address's traffic,
//! and a published port that a process here already listens on would
//! take that port's (sshd on 22, etcd on 2379). The same checks serve the
//! config file (exit 2 at start, the old config kept on SIGHUP) and etcd
//! (the service skipped, counted, the others served).
//!
//! Pure: the facts come from `netlink` and `listeners`.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::kernel::listeners::{self, Listener};
use crate::model::config::ServiceConfig;
use crate::model::Proto;

/// What a service is checked against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeGuard {
    /// This node's addresses (those meshlb itself put on the IPVS VIP
    /// device excepted).
    pub own: BTreeSet<IpAddr>,
    /// Its gateways (next hops of its routes).
    pub gateways: BTreeSet<IpAddr>,
    /// The sockets listening here.
    pub listeners: Vec<Listener>,
}

/// A published port already taken: (protocol, port).
pub type PortKey = (Proto, u16);

/// Why service `s` may not be programmed on this node, as one line naming
/// the field; `None` when it may. Published ports in `checked` (already
/// programmed: meshlb's own data plane now takes their traffic) are not
/// checked against listeners again; `owner` names the process of a socket
/// inode.
pub fn refusal(
    s: &ServiceConfig,
    g: &NodeGuard,
    checked: &BTreeSet<PortKey>,
    mut owner: impl FnMut(u64) -> String,
) -> Option<String> {
    if let Some(v) = s.vip {
        let what = if g.own.contains(&v) {
            Some("an address of this node")
        } else if g.gateways.contains(&v) {
            Some("a gateway of this node")
        } else {
            None
        };
        if let Some(what) = what {
            return Some(format!(
                "vip: {v} is {what} (service {:?} would take its traffic)",
                s.name
            ));
        }
    }
    if s.allow_port_conflict {
        return None;
    }
    for (j, p) in s.publish.iter().enumerate() {
        if checked.contains(&(p.proto, p.port)) {
            continue;
        }
        if let Some(l) = listeners::taken(&g.listeners, p.proto, p.port) {
            return Some(format!(
                "publish[{j}].port: {}/{} is already listened on by {} on {} (service {:?} would take its traffic; allow_port_conflict = true takes it anyway)",
                p.port,
                p.proto,
                owner(l.inode),
                std::net::SocketAddr::new(l.addr, l.port),
                s.name
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::config;

    fn svc(extra: &str) -> ServiceConfig {
        let text = format!(
            r#"
[[service]]
name = "web"
vip = "10.96.0.10"
publish = [{{ proto = "tcp", port = 80, target = 8000 }}, {{ proto = "udp", port = 53, target = 53 }}]
{extra}
[[service.backend]]
addr = "10.0.1.2"
"#
        );
        config::parse(&text).expect("config").services.remove(0)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn guard() -> NodeGuard {
        NodeGuard {
            own: [ip("192.168.1.10"), ip("172.17.0.1")].into(),
            gateways: [ip("192.168.1.1")].into(),
            listeners: vec![
                Listener {
                    proto: Proto::Tcp,
                    addr: ip("0.0.0.0"),
                    port: 22,
                    inode: 7,
                },
                Listener {
                    proto: Proto::Udp,
                    addr: ip("192.168.1.10"),
                    port: 53,
                    inode: 8,
                },
            ],
        }
    }

    fn owner(inode: u64) -> String {
        format!("pid {inode} (test)")
    }

    #[test]
    fn vip_on_a_node_address_or_gateway_is_refused() {
        let none = BTreeSet::new();
        let mut g = guard();
        g.listeners.clear();
        assert_eq!(refusal(&svc(""), &g, &none, owner), None);
        for (vip, what) in [
            ("192.168.1.10", "an address of this node"),
            ("172.17.0.1", "an address of this node"),
            ("192.168.1.1", "a gateway of this node"),
        ] {
            let mut s = svc("");
            s.vip = Some(ip(vip));
            let r = refusal(&s, &g, &none, owner).expect("refused");
            assert!(r.starts_with(&format!("vip: {vip} is {what}")), "{r}");
        }
    }

    #[test]
    fn a_published_port_with_a_listener_is_refused_unless_allowed_or_programmed() {
        let none = BTreeSet::new();
        let r = refusal(&svc(""), &guard(), &none, owner).expect("udp 53 is taken");
        assert_eq!(
            r,
            "publish[1].port: 53/udp is already listened on by pid 8 (test) on 192.168.1.10:53 (service \"web\" would take its traffic; allow_port_conflict = true takes it anyway)"
        );
        assert_eq!(
            refusal(&svc("allow_port_conflict = true"), &guard(), &none, owner),
            None
        );
        // Programmed already: our own data plane holds the port now.
        let checked = [(Proto::Udp, 53)].into();
        assert_eq!(refusal(&svc(""), &guard(), &checked, owner), None);
        // TCP 22 (sshd on every address).
        let mut s = svc("");
        s.publish[0].port = 22;
        let r = refusal(&s, &guard(), &checked, owner).expect("22 is taken");
        assert!(
            r.starts_with(
                "publish[0].port: 22/tcp is already listened on by pid 7 (test) on 0.0.0.0:22"
            ),
            "{r}"
        );
    }
}
