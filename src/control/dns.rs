//! The DNS view of services and tasks (SPEC.md "DNS"): one authoritative
//! zone (default `meshlb`) answered from the desired state the daemon
//! last programmed, health and drain included. Pure: a query's bytes in,
//! the answer's bytes out (`answer`); the sockets are `daemon::dns`'s.
//!
//! Names (`<zone>` the zone):
//! - `<service>.<zone>` A/AAAA: the VIP (TTL 30 s); a service without a
//!   VIP: its healthy tasks (TTL 5 s);
//! - `tasks.<service>.<zone>` A/AAAA: healthy, non-draining tasks (5 s);
//! - `<task>.tasks.<service>.<zone>` A/AAAA: one such task, its address
//!   with `-` for `.` and `:` (`10-0-1-2`): the targets of SRV records;
//! - `_<port>._<tcp|udp>.<service>.<zone>` SRV: the published port on the
//!   VIP, or each healthy task's port with its weight;
//! - the apex: SOA (minimum 5 s).
//!
//! An unknown name is NXDOMAIN, a known name without the type asked NODATA
//! (both with the SOA); a name outside the zone is REFUSED; a query that
//! does not parse, asks several questions or another class than IN is
//! FORMERR; a response, or fewer bytes than a header, gets nothing.

use std::collections::BTreeMap;
use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::model::{BackendKey, BackendSpec, DesiredState, Proto, ServiceKey};

/// TTL of a VIP answer.
pub const VIP_TTL: u32 = 30;
/// TTL of task answers (they follow health).
pub const TASK_TTL: u32 = 5;
/// The SOA's minimum (negative answers' TTL) and its own TTL.
pub const SOA_MINIMUM: u32 = 5;
/// The largest UDP answer without EDNS (RFC 1035).
const UDP_PLAIN: usize = 512;
/// The largest UDP answer this server offers with EDNS (the DNS flag day
/// 2020 value: no fragmentation on common paths).
const UDP_EDNS: u16 = 1232;

/// The zone answered for.
#[derive(Clone, Debug)]
pub struct Zone {
    /// Lower case, fully qualified.
    name: Name,
}

impl Zone {
    /// The zone `name` (`meshlb`, `svc.example.`); an error names what is
    /// wrong with it.
    pub fn new(name: &str) -> Result<Zone, String> {
        let mut n = Name::from_ascii(name.trim_end_matches('.'))
            .map_err(|e| format!("zone {name:?}: {e}"))?
            .to_lowercase();
        if n.num_labels() == 0 {
            return Err(format!("zone {name:?}: the root zone is not served"));
        }
        n.set_fqdn(true);
        Ok(Zone { name: n })
    }

    /// The zone's name, fully qualified.
    pub fn name(&self) -> &Name {
        &self.name
    }

    fn child(&self, labels: &[&str]) -> Name {
        labels
            .iter()
            .rev()
            .fold(self.name.clone(), |n, l| n.prepend_label(*l).unwrap_or(n))
    }

    fn soa(&self, serial: u32) -> Record {
        Record::from_rdata(
            self.name.clone(),
            SOA_MINIMUM,
            RData::SOA(SOA::new(
                self.child(&["ns"]),
                self.child(&["hostmaster"]),
                serial,
                60,
                10,
                3600,
                SOA_MINIMUM,
            )),
        )
    }
}

/// What DNS answers from: a snapshot of the desired state as programmed
/// (health and drain applied), a serial that moves with it, and its
/// service names by their lower case (service names keep their case; DNS
/// does not).
#[derive(Clone, Debug, Default)]
pub struct DnsView {
    desired: DesiredState,
    serial: u32,
    names: BTreeMap<String, String>,
}

impl DnsView {
    /// The view of `desired`, the `serial`-th one.
    pub fn new(desired: DesiredState, serial: u32) -> DnsView {
        let names = desired
            .services
            .keys()
            .map(|k| (k.name.to_ascii_lowercase(), k.name.clone()))
            .collect();
        DnsView {
            desired,
            serial,
            names,
        }
    }

    /// The desired state it answers from.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The services named `name` (any case): one entry per published
    /// port; empty for an unknown name.
    fn service(&self, name: &str) -> Vec<(&ServiceKey, &crate::model::ServiceSpec)> {
        let Some(name) = self.names.get(name) else {
            return Vec::new();
        };
        let lo = ServiceKey {
            name: name.clone(),
            proto: Proto::Tcp,
            port: 0,
        };
        self.desired
            .services
            .range(lo..)
            .take_while(|(k, _)| k.name == *name)
            .map(|(k, s)| (k, &**s))
            .collect()
    }
}

/// The service's VIP, if its frontends have one.
fn vip(entries: &[(&ServiceKey, &crate::model::ServiceSpec)]) -> Option<IpAddr> {
    entries
        .iter()
        .flat_map(|(_, s)| s.frontends.iter())
        .find_map(|f| f.addr)
}

/// The healthy, non-draining tasks of a service (over all its ports: an
/// address once, with the largest weight seen).
fn tasks(entries: &[(&ServiceKey, &crate::model::ServiceSpec)]) -> BTreeMap<IpAddr, u32> {
    let mut out = BTreeMap::new();
    for (_, s) in entries {
        for (k, b) in &s.backends {
            if b.active() {
                let w = out.entry(k.addr).or_insert(0);
                *w = (*w).max(b.weight);
            }
        }
    }
    out
}

/// The healthy tasks of one published port, with their ports.
fn port_tasks(spec: &crate::model::ServiceSpec) -> Vec<(&BackendKey, &BackendSpec)> {
    spec.backends.iter().filter(|(_, b)| b.active()).collect()
}

/// A task's label: its address with `-` for `.` and `:`.
pub fn task_label(a: IpAddr) -> String {
    a.to_string().replace(['.', ':'], "-")
}

fn addr_record(name: &Name, a: IpAddr, ttl: u32) -> Record {
    let data = match a {
        IpAddr::V4(a) => RData::A(A(a)),
        IpAddr::V6(a) => RData::AAAA(AAAA(a)),
    };
    Record::from_rdata(name.clone(), ttl, data)
}

/// Whether `a` is of the family record type `t` asks for (ANY: both).
fn of_type(a: IpAddr, t: RecordType) -> bool {
    matches!(
        (a, t),
        (_, RecordType::ANY) | (IpAddr::V4(_), RecordType::A) | (IpAddr::V6(_), RecordType::AAAA)
    )
}

/// What a name resolved to.
enum Found {
    /// The name exists: these records answer (none: NODATA), and these
    /// go to the additional section.
    Records(Vec<Record>, Vec<Record>),
    NxDomain,
}

/// The records of `qname` (lower case, in the zone) for type `qtype`.
fn lookup(zone: &Zone, view: &DnsView, qname: &Name, qtype: RecordType) -> Found {
    let rel = qname.num_labels() - zone.name.num_labels();
    let labels: Vec<String> = qname
        .iter()
        .take(rel as usize)
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    let l: Vec<&str> = labels.iter().map(String::as_str).collect();
    let addrs = |name: &Name, list: &mut dyn Iterator<Item = IpAddr>, ttl: u32| -> Vec<Record> {
        list.filter(|a| of_type(*a, qtype))
            .map(|a| addr_record(name, a, ttl))
            .collect()
    };
    match l.as_slice() {
        [] => {
            let soa = matches!(qtype, RecordType::SOA | RecordType::ANY);
            Found::Records(
                if soa {
                    vec![zone.soa(view.serial)]
                } else {
                    Vec::new()
                },
                Vec::new(),
            )
        }
        [svc] => {
            let entries = view.service(svc);
            if entries.is_empty() {
                return Found::NxDomain;
            }
            let answers = match vip(&entries) {
                Some(v) => addrs(qname, &mut std::iter::once(v), VIP_TTL),
                None => addrs(qname, &mut tasks(&entries).into_keys(), TASK_TTL),
            };
            Found::Records(answers, Vec::new())
        }
        ["tasks", svc] => {
            let entries = view.service(svc);
            if entries.is_empty() {
                return Found::NxDomain;
            }
            Found::Records(
                addrs(qname, &mut tasks(&entries).into_keys(), TASK_TTL),
                Vec::new(),
            )
        }
        [task, "tasks", svc] => {
            let entries = view.service(svc);
            match tasks(&entries)
                .into_keys()
                .find(|a| task_label(*a) == *task)
            {
                Some(a) => {
                    Found::Records(addrs(qname, &mut std::iter::once(a), TASK_TTL), Vec::new())
                }
                None => Found::NxDomain,
            }
        }
        [proto, svc] if proto.starts_with('_') => {
            // `_tcp.<service>`: a name only where a port of that protocol
            // has SRV records below it (an empty non-terminal: NODATA).
            let entries = view.service(svc);
            let p = &proto[1..];
            if entries.iter().any(|(k, _)| k.proto.to_string() == p) {
                Found::Records(Vec::new(), Vec::new())
            } else {
                Found::NxDomain
            }
        }
        [port, proto, svc] if port.starts_with('_') && proto.starts_with('_') => {
            let entries = view.service(svc);
            let (port, p) = (&port[1..], &proto[1..]);
            let Some((key, spec)) = entries
                .iter()
                .find(|(k, _)| k.proto.to_string() == p && k.port.to_string() == port)
            else {
                return Found::NxDomain;
            };
            if !matches!(qtype, RecordType::SRV | RecordType::ANY) {
                return Found::Records(Vec::new(), Vec::new());
            }
            let svc_name = zone.child(&[key.name.to_ascii_lowercase().as_str()]);
            let mut answers = Vec::new();
            let mut extra = Vec::new();
            match vip(&entries) {
                Some(v) => {
                    answers.push(Record::from_rdata(
                        qname.clone(),
                        VIP_TTL,
                        RData::SRV(SRV::new(0, 100, key.port, svc_name.clone())),
                    ));
                    extra.push(addr_record(&svc_name, v, VIP_TTL));
                }
                None => {
                    for (bk, b) in port_tasks(spec) {
                        let target = zone.child(&[
                            task_label(bk.addr).as_str(),
                            "tasks",
                            key.name.to_ascii_lowercase().as_str(),
                        ]);
                        let weight = u16::try_from(b.weight).unwrap_or(u16::MAX);
                        answers.push(Record::from_rdata(
                            qname.clone(),
                            TASK_TTL,
                            RData::SRV(SRV::new(0, weight, bk.port, target.clone())),
                        ));
                        extra.push(addr_record(&target, bk.addr, TASK_TTL));
                    }
                }
            }
            Found::Records(answers, extra)
        }
        _ => Found::NxDomain,
    }
}

/// What to send back for one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// These bytes, of this response code.
    Reply(Vec<u8>, ResponseCode),
    /// Nothing (a response, or not even a header).
    Drop,
}

/// The transport a query came over: UDP answers are kept within the
/// size the client can take (else truncated, TC set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The answer to the query `request` (its bytes).
pub fn answer(zone: &Zone, view: &DnsView, request: &[u8], transport: Transport) -> Outcome {
    if request.len() < 12 || request[2] & 0x80 != 0 {
        return Outcome::Drop;
    }
    let id = u16::from_be_bytes([request[0], request[1]]);
    let Ok(req) = Message::from_vec(request) else {
        return error(id, OpCode::Query, ResponseCode::FormErr, None);
    };
    let md = req.metadata;
    if md.message_type != MessageType::Query {
        return Outcome::Drop;
    }
    if md.op_code != OpCode::Query {
        return error(id, md.op_code, ResponseCode::NotImp, None);
    }
    let [q] = req.queries.as_slice() else {
        return error(id, md.op_code, ResponseCode::FormErr, None);
    };
    if q.query_class() != DNSClass::IN {
        return error(id, md.op_code, ResponseCode::FormErr, Some(q));
    }
    let mut resp = Message::response(id, OpCode::Query);
    resp.metadata.recursion_desired = md.recursion_desired;
    resp.add_query(q.clone());
    let limit = match (&req.edns, transport) {
        (_, Transport::Tcp) => usize::from(u16::MAX),
        (Some(e), Transport::Udp) => usize::from(e.max_payload().clamp(512, UDP_EDNS)),
        (None, Transport::Udp) => UDP_PLAIN,
    };
    if req.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(UDP_EDNS);
        resp.set_edns(e);
    }
    let qname = q.name().to_lowercase();
    let code = if zone.name.zone_of(&qname) {
        resp.metadata.authoritative = true;
        match lookup(zone, view, &qname, q.query_type()) {
            Found::Records(answers, extra) => {
                if answers.is_empty() {
                    resp.add_authority(zone.soa(view.serial));
                }
                resp.add_answers(answers);
                resp.add_additionals(extra);
                ResponseCode::NoError
            }
            Found::NxDomain => {
                resp.add_authority(zone.soa(view.serial));
                ResponseCode::NXDomain
            }
        }
    } else {
        ResponseCode::Refused
    };
    resp.metadata.response_code = code;
    match resp.to_vec() {
        Ok(b) if b.len() <= limit => Outcome::Reply(b, code),
        Ok(_) => {
            let t = resp.truncate();
            match t.to_vec() {
                Ok(b) => Outcome::Reply(b, code),
                Err(_) => error(id, OpCode::Query, ResponseCode::ServFail, Some(q)),
            }
        }
        Err(_) => error(id, OpCode::Query, ResponseCode::ServFail, Some(q)),
    }
}

fn error(id: u16, op: OpCode, code: ResponseCode, q: Option<&Query>) -> Outcome {
    let mut m = Message::error_msg(id, op, code);
    if let Some(q) = q {
        m.add_query(q.clone());
    }
    match m.to_vec() {
        Ok(b) => Outcome::Reply(b, code),
        Err(_) => Outcome::Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendState, Frontend, Frontends, ServiceSpec};
    use std::sync::Arc;

    fn spec(
        vip: Option<&str>,
        port: u16,
        proto: Proto,
        tasks: &[(&str, u16, u32, BackendState)],
    ) -> ServiceSpec {
        let mut frontends = Frontends::default();
        frontends.insert(Frontend {
            addr: vip.map(|v| v.parse().unwrap()),
            port,
            proto,
        });
        ServiceSpec {
            frontends,
            backends: tasks
                .iter()
                .map(|(a, p, w, s)| {
                    (
                        BackendKey {
                            addr: a.parse().unwrap(),
                            port: *p,
                        },
                        BackendSpec {
                            weight: *w,
                            state: *s,
                            remote: false,
                        },
                    )
                })
                .collect(),
            affinity_secs: 0,
        }
    }

    fn view() -> DnsView {
        use BackendState::{Down, Draining, Up};
        let mut d = DesiredState::default();
        let key = |n: &str, proto, port| ServiceKey {
            name: n.into(),
            proto,
            port,
        };
        d.services.insert(
            key("web", Proto::Tcp, 80),
            Arc::new(spec(
                Some("10.96.0.10"),
                80,
                Proto::Tcp,
                &[
                    ("10.0.1.2", 8000, 100, Up),
                    ("10.0.1.3", 8000, 50, Up),
                    ("10.0.1.4", 8000, 100, Down),
                    ("10.0.1.5", 8000, 100, Draining),
                    ("10.0.1.6", 8000, 0, Up),
                ],
            )),
        );
        d.services.insert(
            key("api", Proto::Udp, 53),
            Arc::new(spec(
                None,
                53,
                Proto::Udp,
                &[("10.0.2.2", 5353, 30, Up), ("fd00::2", 5353, 70, Up)],
            )),
        );
        DnsView::new(d, 7)
    }

    fn ask(name: &str, t: RecordType) -> Message {
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        let zone = Zone::new("meshlb").unwrap();
        match answer(&zone, &view(), &q.to_vec().unwrap(), Transport::Udp) {
            Outcome::Reply(b, _) => Message::from_vec(&b).unwrap(),
            Outcome::Drop => panic!("{name}: dropped"),
        }
    }

    fn addrs(m: &Message) -> Vec<String> {
        let mut v: Vec<String> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                RData::AAAA(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn records_by_name_and_type() {
        let m = ask("web.meshlb.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(addrs(&m), ["10.96.0.10"]);
        assert_eq!(m.answers[0].ttl, VIP_TTL);
        // Healthy, non-draining tasks only.
        let m = ask("tasks.web.meshlb.", RecordType::A);
        assert_eq!(addrs(&m), ["10.0.1.2", "10.0.1.3"]);
        assert_eq!(m.answers[0].ttl, TASK_TTL);
        // Without a VIP: the tasks, by family.
        assert_eq!(addrs(&ask("api.meshlb.", RecordType::A)), ["10.0.2.2"]);
        assert_eq!(addrs(&ask("API.Meshlb.", RecordType::AAAA)), ["fd00::2"]);
        // SRV on the VIP, and per task with weights.
        let m = ask("_80._tcp.web.meshlb.", RecordType::SRV);
        let RData::SRV(s) = &m.answers[0].data else {
            panic!("{m:?}")
        };
        assert_eq!((s.port, s.weight), (80, 100));
        assert_eq!(s.target.to_ascii(), "web.meshlb.");
        let mut extra = m.clone();
        extra.answers.clone_from(&m.additionals);
        assert_eq!(addrs(&extra), ["10.96.0.10"]);
        let m = ask("_53._udp.api.meshlb.", RecordType::SRV);
        let mut srv: Vec<(u16, u16, String)> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) => Some((s.weight, s.port, s.target.to_ascii())),
                _ => None,
            })
            .collect();
        srv.sort();
        assert_eq!(
            srv,
            [
                (30, 5353, "10-0-2-2.tasks.api.meshlb.".to_string()),
                (70, 5353, "fd00--2.tasks.api.meshlb.".to_string())
            ]
        );
        assert_eq!(
            addrs(&ask("10-0-2-2.tasks.api.meshlb.", RecordType::A)),
            ["10.0.2.2"]
        );
    }

    #[test]
    fn nxdomain_nodata_refused_and_soa() {
        let m = ask("nope.meshlb.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let RData::SOA(soa) = &m.authorities[0].data else {
            panic!("{m:?}")
        };
        assert_eq!((soa.minimum, soa.serial), (SOA_MINIMUM, 7));
        // Known name, no such type: NODATA with the SOA.
        let m = ask("web.meshlb.", RecordType::AAAA);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty() && m.authorities.len() == 1);
        let m = ask("_81._tcp.web.meshlb.", RecordType::SRV);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = ask("_tcp.web.meshlb.", RecordType::SRV);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        let m = ask("10-0-1-4.tasks.web.meshlb.", RecordType::A);
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::NXDomain,
            "a down task"
        );
        let m = ask("meshlb.", RecordType::SOA);
        assert!(matches!(m.answers[0].data, RData::SOA(_)));
        let m = ask("example.com.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert!(!m.metadata.authoritative);
    }

    #[test]
    fn malformed_queries_get_formerr_or_nothing() {
        let zone = Zone::new("meshlb").unwrap();
        let v = view();
        let code = |b: &[u8]| match answer(&zone, &v, b, Transport::Udp) {
            Outcome::Reply(_, c) => Some(c),
            Outcome::Drop => None,
        };
        // Shorter than a header: nothing.
        assert_eq!(code(&[1, 2, 3]), None);
        // A header promising a question that is not there.
        let mut trunc = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        assert_eq!(code(&trunc), Some(ResponseCode::FormErr));
        // A name whose compression pointer points at itself.
        trunc.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(code(&trunc), Some(ResponseCode::FormErr));
        // Class CH.
        let mut q = Message::query();
        let mut query = Query::query(Name::from_ascii("web.meshlb.").unwrap(), RecordType::A);
        query.set_query_class(DNSClass::CH);
        q.add_query(query);
        assert_eq!(code(&q.to_vec().unwrap()), Some(ResponseCode::FormErr));
        // Two questions.
        let mut q = Message::query();
        for n in ["web.meshlb.", "api.meshlb."] {
            q.add_query(Query::query(Name::from_ascii(n).unwrap(), RecordType::A));
        }
        assert_eq!(code(&q.to_vec().unwrap()), Some(ResponseCode::FormErr));
        // A response is never answered.
        let mut r = Message::query().to_vec().unwrap();
        r[2] |= 0x80;
        assert_eq!(code(&r), None);
    }

    #[test]
    fn zone_names() {
        assert_eq!(Zone::new("meshlb").unwrap().name().to_ascii(), "meshlb.");
        assert_eq!(
            Zone::new("Svc.Example.").unwrap().name().to_ascii(),
            "svc.example."
        );
        assert!(Zone::new("").is_err());
        assert!(Zone::new("a..b").is_err());
    }
}
