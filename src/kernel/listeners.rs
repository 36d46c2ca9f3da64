//! Sockets listening on this node, from `/proc/net/{tcp,tcp6,udp,udp6}`
//! of the daemon's network namespace, and the process holding one (by its
//! socket inode under `/proc/<pid>/fd`): a published port must not take
//! the traffic of a port something on the node already serves (sshd on
//! 22, etcd on 2379) unless the service says so.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::Proto;

/// One listening TCP socket, or one bound, unconnected UDP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
    /// The socket's inode (finds its process).
    pub inode: u64,
}

/// TCP_LISTEN and TCP_CLOSE as `/proc/net/tcp` prints them (`st`).
const ST_LISTEN: &str = "0A";
const ST_CLOSE: &str = "07";

/// The listeners of one `/proc/net/{tcp,udp}[6]` text; lines that do not
/// parse are skipped.
pub fn parse(text: &str, proto: Proto) -> Vec<Listener> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, st, inode) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(9)?);
            let listening = match proto {
                Proto::Tcp => *st == ST_LISTEN,
                // Bound and not connected: no remote port.
                Proto::Udp => *st == ST_CLOSE && remote.ends_with(":0000"),
            };
            if !listening {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            Some(Listener {
                proto,
                addr: hex_addr(addr)?,
                port: u16::from_str_radix(port, 16).ok()?,
                inode: inode.parse().ok()?,
            })
        })
        .collect()
}

/// An address as `/proc/net` prints it: 32-bit words in hex, each in the
/// host's byte order.
fn hex_addr(s: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = s.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(w, 16).ok()?.to_ne_bytes())
    };
    match s.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Every listener of this network namespace (a file that cannot be read,
/// such as `tcp6` without IPv6, contributes none).
pub fn read() -> Vec<Listener> {
    let mut out = Vec::new();
    for (file, proto) in [
        ("tcp", Proto::Tcp),
        ("tcp6", Proto::Tcp),
        ("udp", Proto::Udp),
        ("udp6", Proto::Udp),
    ] {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/net/{file}")) {
            out.extend(parse(&text, proto));
        }
    }
    out
}

/// The listener a published `port` would take traffic from: one bound to
/// every address, or to an address other than loopback (the data plane
/// does not sit on loopback).
pub fn taken(listeners: &[Listener], proto: Proto, port: u16) -> Option<&Listener> {
    listeners
        .iter()
        .find(|l| l.proto == proto && l.port == port && !l.addr.is_loopback())
}

/// "pid 812 (sshd)": the process holding socket `inode`, found by its file
/// descriptors; "an unknown process" when none is visible.
pub fn owner(inode: u64) -> String {
    let target = format!("socket:[{inode}]");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return "an unknown process".into();
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str())
        });
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            return format!("pid {pid} ({})", comm.trim());
        }
    }
    "an unknown process".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:262E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1002 1 0000000000000000 100 0 0 10 0
   2: 0A00000A:0050 0200000A:D431 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 20 4 0 10 -1
   3: garbage
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0000000000000000 100 0 0 10 0
   1: 000080FD000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2002 1 0000000000000000 100 0 0 10 0
";

    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3001 2 0000000000000000 0
  2: 0A00000A:9C40 0200000A:0035 01 00000000:00000000 00:00000000 00000000     0        0 3002 2 0000000000000000 0
";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn listening_sockets_parse_and_others_do_not() {
        let l = parse(TCP, Proto::Tcp);
        assert_eq!(
            l,
            [
                Listener {
                    proto: Proto::Tcp,
                    addr: ip("0.0.0.0"),
                    port: 22,
                    inode: 1001
                },
                Listener {
                    proto: Proto::Tcp,
                    addr: ip("127.0.0.1"),
                    port: 9774,
                    inode: 1002
                },
            ]
        );
        let l6 = parse(TCP6, Proto::Tcp);
        assert_eq!(l6.len(), 2);
        assert_eq!((l6[0].addr, l6[0].port), (ip("::"), 8000));
        assert_eq!((l6[1].addr, l6[1].port), (ip("fd80::1"), 80));
        let u = parse(UDP, Proto::Udp);
        assert_eq!(u.len(), 1, "a connected UDP socket is no listener");
        assert_eq!((u[0].addr, u[0].port), (ip("0.0.0.0"), 5353));
    }

    #[test]
    fn a_port_is_taken_by_a_listener_off_loopback() {
        let mut all = parse(TCP, Proto::Tcp);
        all.extend(parse(UDP, Proto::Udp));
        assert_eq!(taken(&all, Proto::Tcp, 22).map(|l| l.inode), Some(1001));
        assert_eq!(taken(&all, Proto::Tcp, 9774), None, "loopback only");
        assert_eq!(taken(&all, Proto::Udp, 22), None, "other protocol");
        assert_eq!(taken(&all, Proto::Udp, 5353).map(|l| l.inode), Some(3001));
    }

    #[test]
    fn the_owner_of_a_socket_of_this_process_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let me = read()
            .into_iter()
            .find(|x| x.proto == Proto::Tcp && x.port == port)
            .expect("our listener in /proc/net/tcp");
        let who = owner(me.inode);
        assert!(
            who.starts_with(&format!("pid {} (", std::process::id())),
            "{who}"
        );
    }
}
