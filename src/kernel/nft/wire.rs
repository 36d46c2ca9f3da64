//! Pure encoding of the nf_tables batches meshlb sends: its own table
//! `inet meshlb`, a nat chain on postrouting, one set per family of
//! remote backends (address . protocol . port), one masquerade rule per
//! family, and set element changes. No socket here; tested byte for byte.
//!
//! What the kernel ends up holding, in `nft` syntax:
//!
//! ```text
//! table inet meshlb {
//!     set remote4 { type ipv4_addr . inet_proto . inet_service }
//!     set remote6 { type ipv6_addr . inet_proto . inet_service }
//!     chain snat {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         meta nfproto ipv4 ip daddr . meta l4proto . th dport @remote4 counter masquerade
//!         meta nfproto ipv6 ip6 daddr . meta l4proto . th dport @remote6 counter masquerade
//!     }
//! }
//! ```
//!
//! Layouts follow `linux/netfilter/nfnetlink.h` and `nf_tables.h`: the
//! netlink header in host byte order, then `struct nfgenmsg` (family,
//! version, big-endian resource id); every nf_tables integer attribute is
//! big-endian.

use std::collections::BTreeSet;
use std::net::IpAddr;

#[allow(
    clippy::wildcard_imports,
    reason = "the kernel's constants, under the names of its headers"
)]
use super::consts::*;
use crate::kernel::nlattr::{put_attr, put_nested, NLM_F_ACK, NLM_F_REQUEST};

/// meshlb's table (family inet): nothing else is ever touched.
pub const TABLE: &str = "meshlb";
/// The nat chain on postrouting.
pub const CHAIN: &str = "snat";

/// A remote backend whose flows leave this node masqueraded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Remote {
    pub addr: IpAddr,
    /// IANA protocol number.
    pub proto: u8,
    pub port: u16,
}

/// The set of a family.
pub fn set_name(v6: bool) -> &'static str {
    if v6 {
        "remote6"
    } else {
        "remote4"
    }
}

/// One nf_tables message of a batch, before it is numbered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    /// `NFT_MSG_*`.
    pub kind: u8,
    /// Netlink flags beside `NLM_F_REQUEST | NLM_F_ACK`.
    pub flags: u16,
    /// `nfgenmsg.nfgen_family`.
    pub family: u8,
    pub attrs: Vec<u8>,
}

fn nlmsg(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend((len as u32).to_ne_bytes());
    m.extend(kind.to_ne_bytes());
    m.extend(flags.to_ne_bytes());
    m.extend(seq.to_ne_bytes());
    m.extend(0u32.to_ne_bytes());
    m.extend([family, NFNETLINK_V0]);
    m.extend(res_id.to_be_bytes());
    m.extend(attrs);
    m
}

/// `msgs` wrapped in `BATCH_BEGIN`/`BATCH_END` (one transaction: all or
/// nothing), numbered from `seq`; every message asks for an ack, so
/// each gets exactly one answer. Returns the bytes and the sequence
/// numbers that will be answered.
pub fn batch(msgs: &[Msg], seq: u32) -> (Vec<u8>, Vec<u32>) {
    let mut out = nlmsg(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    let mut seqs = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let s = seq.wrapping_add(1 + i as u32);
        out.extend(nlmsg(
            NFNL_SUBSYS_NFTABLES << 8 | u16::from(m.kind),
            NLM_F_REQUEST | NLM_F_ACK | m.flags,
            s,
            m.family,
            0,
            &m.attrs,
        ));
        seqs.push(s);
    }
    out.extend(nlmsg(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq.wrapping_add(1 + msgs.len() as u32),
        0,
        NFNL_SUBSYS_NFTABLES,
        &[],
    ));
    (out, seqs)
}

fn put_str(buf: &mut Vec<u8>, kind: u16, s: &str) {
    let mut z = s.as_bytes().to_vec();
    z.push(0);
    put_attr(buf, kind, &z);
}

fn put_be32(buf: &mut Vec<u8>, kind: u16, v: u32) {
    put_attr(buf, kind, &v.to_be_bytes());
}

fn msg(kind: u8, flags: u16, attrs: Vec<u8>) -> Msg {
    Msg {
        kind,
        flags,
        family: NFPROTO_INET,
        attrs,
    }
}

/// Creates the table, or leaves it as it is (no `NLM_F_EXCL`).
pub fn new_table() -> Msg {
    let mut a = Vec::new();
    put_str(&mut a, NFTA_TABLE_NAME, TABLE);
    msg(NFT_MSG_NEWTABLE, NLM_F_CREATE, a)
}

/// Deletes the table with everything in it (`meshlb cleanup`).
pub fn del_table() -> Msg {
    let mut a = Vec::new();
    put_str(&mut a, NFTA_TABLE_NAME, TABLE);
    msg(NFT_MSG_DELTABLE, 0, a)
}

/// Creates the nat postrouting chain (priority srcnat, policy accept), or
/// leaves it as it is.
pub fn new_chain() -> Msg {
    let mut a = Vec::new();
    put_str(&mut a, NFTA_CHAIN_TABLE, TABLE);
    put_str(&mut a, NFTA_CHAIN_NAME, CHAIN);
    put_nested(&mut a, NFTA_CHAIN_HOOK, |h| {
        put_be32(h, NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING);
        put_be32(h, NFTA_HOOK_PRIORITY, NF_IP_PRI_NAT_SRC as u32);
    });
    put_be32(&mut a, NFTA_CHAIN_POLICY, NF_ACCEPT);
    put_str(&mut a, NFTA_CHAIN_TYPE, "nat");
    msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE, a)
}

/// Key length of a family's set: address, protocol and port, each in
/// whole 4-byte registers.
pub fn key_len(v6: bool) -> u32 {
    if v6 {
        16 + 4 + 4
    } else {
        4 + 4 + 4
    }
}

/// Creates a family's set of remote backends, or leaves it as it is.
pub fn new_set(v6: bool) -> Msg {
    let addr_type = if v6 { TYPE_IP6ADDR } else { TYPE_IPADDR };
    let key_type = ((addr_type << TYPE_BITS | TYPE_INET_PROTOCOL) << TYPE_BITS) | TYPE_INET_SERVICE;
    let mut a = Vec::new();
    put_str(&mut a, NFTA_SET_TABLE, TABLE);
    put_str(&mut a, NFTA_SET_NAME, set_name(v6));
    put_be32(&mut a, NFTA_SET_FLAGS, 0);
    put_be32(&mut a, NFTA_SET_KEY_TYPE, key_type);
    put_be32(&mut a, NFTA_SET_KEY_LEN, key_len(v6));
    put_be32(&mut a, NFTA_SET_ID, u32::from(v6) + 1);
    msg(NFT_MSG_NEWSET, NLM_F_CREATE, a)
}

/// Deletes every rule of the chain (a rule cannot be created
/// idempotently: it is flushed and re-added in the same transaction).
pub fn flush_chain() -> Msg {
    let mut a = Vec::new();
    put_str(&mut a, NFTA_RULE_TABLE, TABLE);
    put_str(&mut a, NFTA_RULE_CHAIN, CHAIN);
    msg(NFT_MSG_DELRULE, 0, a)
}

/// One expression of a rule: `NFTA_LIST_ELEM { NAME, DATA }`.
pub fn expr(buf: &mut Vec<u8>, name: &str, data: impl FnOnce(&mut Vec<u8>)) {
    put_nested(buf, NFTA_LIST_ELEM, |e| {
        put_str(e, NFTA_EXPR_NAME, name);
        put_nested(e, NFTA_EXPR_DATA, data);
    });
}

/// `meta KEY` loaded into register `dreg`.
pub fn meta(buf: &mut Vec<u8>, key: u32, dreg: u32) {
    expr(buf, "meta", |d| {
        put_be32(d, NFTA_META_DREG, dreg);
        put_be32(d, NFTA_META_KEY, key);
    });
}

/// `sreg == value`, else the rule stops.
pub fn cmp_eq(buf: &mut Vec<u8>, sreg: u32, value: &[u8]) {
    expr(buf, "cmp", |d| {
        put_be32(d, NFTA_CMP_SREG, sreg);
        put_be32(d, NFTA_CMP_OP, NFT_CMP_EQ);
        put_nested(d, NFTA_CMP_DATA, |v| put_attr(v, NFTA_DATA_VALUE, value));
    });
}

/// `len` bytes at `offset` of header `base` loaded into register `dreg`.
pub fn payload(buf: &mut Vec<u8>, base: u32, offset: u32, len: u32, dreg: u32) {
    expr(buf, "payload", |d| {
        put_be32(d, NFTA_PAYLOAD_DREG, dreg);
        put_be32(d, NFTA_PAYLOAD_BASE, base);
        put_be32(d, NFTA_PAYLOAD_OFFSET, offset);
        put_be32(d, NFTA_PAYLOAD_LEN, len);
    });
}

/// The key starting at register `sreg` is in set `set`, else the rule stops.
pub fn lookup(buf: &mut Vec<u8>, set: &str, sreg: u32) {
    expr(buf, "lookup", |d| {
        put_str(d, NFTA_LOOKUP_SET, set);
        put_be32(d, NFTA_LOOKUP_SREG, sreg);
    });
}

/// A family's rule: packets to a remote backend (after IPVS rewrote the
/// destination) leave with this node's address.
pub fn masq_rule(v6: bool) -> Msg {
    let (nfproto, daddr_off, addr_len) = if v6 {
        (NFPROTO_IPV6, 24, 16)
    } else {
        (NFPROTO_IPV4, 16, 4)
    };
    let proto_reg = NFT_REG32_00 + addr_len / 4;
    let mut e = Vec::new();
    meta(&mut e, NFT_META_NFPROTO, NFT_REG_1);
    cmp_eq(&mut e, NFT_REG_1, &[nfproto]);
    payload(
        &mut e,
        NFT_PAYLOAD_NETWORK_HEADER,
        daddr_off,
        addr_len,
        NFT_REG32_00,
    );
    meta(&mut e, NFT_META_L4PROTO, proto_reg);
    payload(&mut e, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, proto_reg + 1);
    lookup(&mut e, set_name(v6), NFT_REG32_00);
    expr(&mut e, "counter", |_| {});
    expr(&mut e, "masq", |_| {});
    let mut a = Vec::new();
    put_str(&mut a, NFTA_RULE_TABLE, TABLE);
    put_str(&mut a, NFTA_RULE_CHAIN, CHAIN);
    put_nested(&mut a, NFTA_RULE_EXPRESSIONS, |x| x.extend(e));
    msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, a)
}

/// A set element's key, as the rule's registers hold it: address,
/// protocol (1 byte, zero-padded to 4), port (big-endian, zero-padded to 4).
pub fn element_key(r: &Remote) -> Vec<u8> {
    let mut k = match r.addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    k.extend([r.proto, 0, 0, 0]);
    k.extend(r.port.to_be_bytes());
    k.extend([0, 0]);
    k
}

/// Adds (`add`) or deletes `elems`, all of one family, in its set. With
/// no elements a delete empties the set.
pub fn set_elems(add: bool, v6: bool, elems: &[Remote]) -> Msg {
    let mut a = Vec::new();
    put_str(&mut a, NFTA_SET_ELEM_LIST_TABLE, TABLE);
    put_str(&mut a, NFTA_SET_ELEM_LIST_SET, set_name(v6));
    if !elems.is_empty() {
        put_nested(&mut a, NFTA_SET_ELEM_LIST_ELEMENTS, |l| {
            for r in elems {
                put_nested(l, NFTA_LIST_ELEM, |e| {
                    put_nested(e, NFTA_SET_ELEM_KEY, |k| {
                        put_attr(k, NFTA_DATA_VALUE, &element_key(r));
                    });
                });
            }
        });
    }
    if add {
        msg(NFT_MSG_NEWSETELEM, NLM_F_CREATE, a)
    } else {
        msg(NFT_MSG_DELSETELEM, 0, a)
    }
}

/// Everything, in one transaction: table, chain and sets created if
/// missing, the chain's rules and the sets' elements replaced by exactly
/// the masquerade rules and `all`. A daemon runs it once (at its first
/// remote backend, or after a failed update); established flows keep
/// their NAT binding in conntrack whatever the transaction does.
pub fn install(all: &BTreeSet<Remote>) -> Vec<Msg> {
    let mut m = vec![
        new_table(),
        new_chain(),
        new_set(false),
        new_set(true),
        flush_chain(),
        masq_rule(false),
        masq_rule(true),
    ];
    for v6 in [false, true] {
        m.push(set_elems(false, v6, &[]));
        let fam: Vec<Remote> = all
            .iter()
            .filter(|r| r.addr.is_ipv6() == v6)
            .copied()
            .collect();
        if !fam.is_empty() {
            m.push(set_elems(true, v6, &fam));
        }
    }
    m
}

/// The element changes from `have` to `want`: additions first, then
/// deletions (nothing when they are equal).
pub fn update(have: &BTreeSet<Remote>, want: &BTreeSet<Remote>) -> Vec<Msg> {
    let mut m = Vec::new();
    for add in [true, false] {
        let (from, to) = if add { (want, have) } else { (have, want) };
        for v6 in [false, true] {
            let fam: Vec<Remote> = from
                .difference(to)
                .filter(|r| r.addr.is_ipv6() == v6)
                .copied()
                .collect();
            if !fam.is_empty() {
                m.push(set_elems(add, v6, &fam));
            }
        }
    }
    m
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn r(addr: &str, proto: u8, port: u16) -> Remote {
        Remote {
            addr: addr.parse().unwrap(),
            proto,
            port,
        }
    }

    /// Every fixed message, byte for byte: attribute = len u16, type u16
    /// (host order; nested ones carry 0x8000), value padded to 4;
    /// integers big-endian.
    #[test]
    fn messages_encode_as_the_kernel_reads_them() {
        // NFTA_*_TABLE (1) "meshlb\0" + 1 byte of padding.
        let table = "0b0001006d6573686c620000";
        let cases: Vec<(&str, Msg, u8, u16, &str)> = vec![
            ("table", new_table(), NFT_MSG_NEWTABLE, NLM_F_CREATE, ""),
            ("delete table", del_table(), NFT_MSG_DELTABLE, 0, ""),
            (
                "chain snat: type nat hook postrouting (4) priority 100 policy accept",
                new_chain(),
                NFT_MSG_NEWCHAIN,
                NLM_F_CREATE,
                "09000300 736e6174 00000000
                 14000480 08000100 00000004 08000200 00000064
                 08000500 00000001
                 08000700 6e617400",
            ),
            (
                "set remote4: ipv4_addr . inet_proto . inet_service (0x730d), 12 bytes, id 1",
                new_set(false),
                NFT_MSG_NEWSET,
                NLM_F_CREATE,
                "0c000200 72656d6f 74653400
                 08000300 00000000
                 08000400 0000730d
                 08000500 0000000c
                 08000a00 00000001",
            ),
            (
                "set remote6: ipv6_addr . inet_proto . inet_service (0x830d), 24 bytes, id 2",
                new_set(true),
                NFT_MSG_NEWSET,
                NLM_F_CREATE,
                "0c000200 72656d6f 74653600
                 08000300 00000000
                 08000400 0000830d
                 08000500 00000018
                 08000a00 00000002",
            ),
            (
                "flush the chain: table and chain, no handle",
                flush_chain(),
                NFT_MSG_DELRULE,
                0,
                "09000200 736e6174 00000000",
            ),
            (
                "add 10.0.0.2 tcp 8000 to remote4",
                set_elems(true, false, &[r("10.0.0.2", 6, 8000)]),
                NFT_MSG_NEWSETELEM,
                NLM_F_CREATE,
                "0c000200 72656d6f 74653400
                 1c000380 18000180 14000180 10000100
                 0a000002 06000000 1f400000",
            ),
            (
                "delete fd00::1 udp 53 from remote6",
                set_elems(false, true, &[r("fd00::1", 17, 53)]),
                NFT_MSG_DELSETELEM,
                0,
                "0c000200 72656d6f 74653600
                 28000380 24000180 20000180 1c000100
                 fd000000 00000000 00000000 00000001 11000000 00350000",
            ),
            (
                "flush remote6: no elements",
                set_elems(false, true, &[]),
                NFT_MSG_DELSETELEM,
                0,
                "0c000200 72656d6f 74653600",
            ),
        ];
        for (what, m, kind, flags, rest) in cases {
            let want: String = format!("{table}{rest}").split_whitespace().collect();
            assert_eq!(
                (m.kind, m.flags, m.family),
                (kind, flags, NFPROTO_INET),
                "{what}"
            );
            assert_eq!(hex(&m.attrs), want, "{what}");
        }
    }

    /// The rule's expressions, one by one, and the register plan of each
    /// family: the key fills consecutive 4-byte registers from NFT_REG32_00.
    #[test]
    fn masquerade_rules_load_the_set_key_into_consecutive_registers() {
        let one = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = Vec::new();
            f(&mut b);
            hex(&b)
        };
        let exprs: [(&str, String, &str); 4] = [
            (
                "meta nfproto -> reg 1",
                one(&|b| meta(b, NFT_META_NFPROTO, NFT_REG_1)),
                "24000180 09000100 6d657461 00000000
                 14000280 08000100 00000001 08000200 0000000f",
            ),
            (
                "cmp reg 1 == 2 (ipv4)",
                one(&|b| cmp_eq(b, NFT_REG_1, &[NFPROTO_IPV4])),
                "2c000180 08000100 636d7000
                 20000280 08000100 00000001 08000200 00000000
                 0c000380 05000100 02000000",
            ),
            (
                "payload network +16 len 4 -> reg32 00 (8)",
                one(&|b| payload(b, NFT_PAYLOAD_NETWORK_HEADER, 16, 4, NFT_REG32_00)),
                "34000180 0c000100 7061796c 6f616400
                 24000280 08000100 00000008 08000200 00000001
                 08000300 00000010 08000400 00000004",
            ),
            (
                "lookup @remote4 from reg 8",
                one(&|b| lookup(b, "remote4", NFT_REG32_00)),
                "28000180 0b000100 6c6f6f6b 75700000
                 18000280 0c000100 72656d6f 74653400 08000200 00000008",
            ),
        ];
        for (what, got, want) in exprs {
            let want: String = want.split_whitespace().collect();
            assert_eq!(got, want, "{what}");
        }
        // v4: addr in reg 8, l4proto in 9, port in 10; v6: 8..11, 12, 13.
        for (v6, regs) in [(false, [8u32, 9, 10]), (true, [8, 12, 13])] {
            let rule = hex(&masq_rule(v6).attrs);
            let mut want = Vec::new();
            meta(&mut want, NFT_META_L4PROTO, regs[1]);
            payload(&mut want, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, regs[2]);
            lookup(&mut want, set_name(v6), regs[0]);
            expr(&mut want, "counter", |_| {});
            expr(&mut want, "masq", |_| {});
            assert!(rule.ends_with(&hex(&want)), "v6={v6}: {rule}");
            assert_eq!(masq_rule(v6).flags, NLM_F_CREATE | NLM_F_APPEND);
        }
    }

    #[test]
    fn element_keys_fill_whole_registers() {
        let table = [
            (r("10.0.0.2", 6, 8000), "0a000002 06000000 1f400000"),
            (r("192.168.1.1", 17, 53), "c0a80101 11000000 00350000"),
            (
                r("fd00::1", 6, 443),
                "fd000000 00000000 00000000 00000001 06000000 01bb0000",
            ),
        ];
        for (remote, want) in table {
            let want: String = want.split_whitespace().collect();
            let key = element_key(&remote);
            assert_eq!(hex(&key), want, "{remote:?}");
            assert_eq!(key.len() as u32, key_len(remote.addr.is_ipv6()));
        }
    }

    /// Begin (subsystem nftables as resource id), messages with their own
    /// sequence numbers and `NLM_F_REQUEST | NLM_F_ACK | flags`, end.
    #[test]
    fn a_batch_is_one_transaction_with_an_ack_per_message() {
        let (bytes, seqs) = batch(&[new_table()], 7);
        assert_eq!(seqs, vec![8]);
        let want: String = "14000000 1000 0100 07000000 00000000 00 00 000a
             20000000 000a 0504 08000000 00000000 01 00 0000
             0b000100 6d657368 6c620000
             14000000 1100 0100 09000000 00000000 00 00 000a"
            .split_whitespace()
            .collect();
        assert_eq!(hex(&bytes), want);
    }

    #[test]
    fn install_replaces_everything_and_update_is_the_difference() {
        let a = r("10.0.0.2", 6, 8000);
        let b = r("10.0.0.3", 17, 53);
        let c = r("fd00::3", 6, 80);
        let kinds = |m: &[Msg]| m.iter().map(|m| m.kind).collect::<Vec<_>>();
        assert_eq!(
            kinds(&install(&[a, c].into())),
            vec![
                NFT_MSG_NEWTABLE,
                NFT_MSG_NEWCHAIN,
                NFT_MSG_NEWSET,
                NFT_MSG_NEWSET,
                NFT_MSG_DELRULE,
                NFT_MSG_NEWRULE,
                NFT_MSG_NEWRULE,
                NFT_MSG_DELSETELEM,
                NFT_MSG_NEWSETELEM,
                NFT_MSG_DELSETELEM,
                NFT_MSG_NEWSETELEM,
            ]
        );
        assert!(update(&[a, b].into(), &[a, b].into()).is_empty());
        let u = update(&[a, b].into(), &[a, c].into());
        assert_eq!(
            u,
            vec![set_elems(true, true, &[c]), set_elems(false, false, &[b])]
        );
    }
}
