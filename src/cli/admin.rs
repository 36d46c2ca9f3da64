//! The client commands `meshlb service ...` and `meshlb task ...`: check
//! the command line (with the same validation as the config file and the
//! daemon's etcd reader), then read and write the records of
//! `etcd::layout`. Every etcd call has a timeout.
//!
//! Exit statuses (SPEC.md): [`AdminError::Usage`] (2) when the command
//! line itself is wrong — found before etcd is contacted, or when an
//! update would make the stored record invalid; [`AdminError::Runtime`]
//! (1) for etcd errors and for what depends on the cluster's state (no
//! such service, a name or port already taken).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};

use crate::cli::{
    AdminCommand, Clear, EtcdArgs, ServiceCommand, ServiceSpecArgs, TaskAddArgs, TaskCommand,
    TaskIdArgs,
};
use crate::model::config::ServiceConfig;
use crate::source::config::{self, FieldError, ServiceDef};
use crate::source::etcd::layout::{self, ClusterState, TaskDef, TaskRecord, TaskSource, TaskState};
use crate::source::etcd::{connect, error_chain, EtcdError, EtcdOptions, REQUEST_TIMEOUT};

/// Why a client command failed. `Display` is one line.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The command line is wrong (exit status 2).
    #[error("{0}")]
    Usage(String),
    /// The cluster's state refuses the command (exit 1).
    #[error("{0}")]
    Runtime(String),
    /// etcd could not be reached (exit 1).
    #[error(transparent)]
    Etcd(EtcdError),
    /// An etcd request failed (exit 1).
    #[error("etcd: {what}: {}", error_chain(.source))]
    Request {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    /// A record in etcd does not parse (exit 1).
    #[error(transparent)]
    Record(#[from] layout::RecordError),
    /// A stored service does not parse, so it cannot be changed (exit 1).
    #[error("{source} (remove and create the service again)")]
    Unchangeable {
        #[source]
        source: layout::RecordError,
    },
}

use AdminError::{Runtime, Usage};

impl From<EtcdError> for AdminError {
    fn from(e: EtcdError) -> AdminError {
        match e {
            EtcdError::Usage(_) => Usage(e.to_string()),
            _ => AdminError::Etcd(e),
        }
    }
}

/// Runs one client command against the etcd of `etcd`.
pub async fn run(cmd: &AdminCommand, etcd: &EtcdArgs) -> Result<(), AdminError> {
    let opts = crate::cli::settle::etcd_client_options(etcd);
    opts.validate()?;
    match cmd {
        AdminCommand::Service(c) => match c {
            ServiceCommand::Create(a) => service_create(&opts, a).await,
            ServiceCommand::Update(a) => service_update(&opts, a).await,
            ServiceCommand::Rm(a) => service_rm(&opts, &a.name).await,
            ServiceCommand::Ls => service_ls(&opts).await,
            ServiceCommand::Inspect(a) => service_inspect(&opts, &a.name).await,
        },
        AdminCommand::Task(c) => match c {
            TaskCommand::Add(a) => task_add(&opts, a).await,
            TaskCommand::Rm(a) => task_rm(&opts, a).await,
            TaskCommand::Ls(a) => task_ls(&opts, a.service.as_deref()).await,
            TaskCommand::Drain(a) => task_drain(&opts, a).await,
        },
    }
}

// ---------------------------------------------------------------------
// Validation of the command line (no IO)
// ---------------------------------------------------------------------

fn check_name(what: &str, name: &str) -> Result<(), AdminError> {
    config::validate_name(name).map_err(|m| Usage(format!("{what}: {m}")))
}

fn check_id(id: &str) -> Result<(), AdminError> {
    layout::validate_id(id).map_err(|m| Usage(format!("TASK_ID: {m}")))
}

/// Names the flag a service field comes from.
fn service_flag_error(e: FieldError) -> AdminError {
    let head = e.path.split(['.', '[']).next().unwrap_or("");
    let flag = match head {
        "name" => "NAME",
        "publish" => "--publish",
        "vip" => "--vip",
        "scheduler" => "--scheduler",
        "affinity" => "--affinity",
        "health" => "--health",
        "drain_timeout" => "--drain-timeout",
        "announce" => "--announce",
        _ => return Usage(e.to_string()),
    };
    if e.path == head {
        Usage(format!("{flag}: {}", e.message))
    } else {
        Usage(format!("{flag}: {e}"))
    }
}

/// Whether any field-setting flag was given (an update needs one).
fn any_flag(a: &ServiceSpecArgs) -> bool {
    !a.publish.is_empty()
        || a.vip.is_some()
        || a.scheduler.is_some()
        || a.affinity.is_some()
        || a.health.is_some()
        || a.drain_timeout.is_some()
        || a.announce.is_some()
}

/// The service the flags describe: a new one (`base: None`), or the
/// stored one with the given flags replacing its fields. Validated by
/// `ServiceDef::validate`, errors naming the flag.
pub fn merge_service(
    a: &ServiceSpecArgs,
    base: Option<ServiceDef>,
) -> Result<(ServiceDef, ServiceConfig), AdminError> {
    check_name("NAME", &a.name)?;
    let mut d = base.unwrap_or_else(|| ServiceDef {
        name: a.name.clone(),
        ..Default::default()
    });
    if !a.publish.is_empty() {
        d.publish = a.publish.clone();
    }
    if let Some(v) = &a.vip {
        d.vip = (v != "none").then(|| v.clone());
    }
    if let Some(s) = a.scheduler {
        d.scheduler = Some(s);
    }
    if let Some(Clear(aff)) = &a.affinity {
        d.affinity = aff.clone();
    }
    if let Some(Clear(h)) = &a.health {
        // Only kind and path have flags: keep the stored intervals.
        d.health = match (h, d.health.take()) {
            (Some(new), Some(old)) => Some(config::HealthDef {
                kind: new.kind,
                path: new.path.clone(),
                ..old
            }),
            (new, _) => new.clone(),
        };
    }
    if let Some(t) = a.drain_timeout {
        d.drain_timeout = Some(t);
    }
    if let Some(on) = a.announce {
        d.announce = on;
    }
    let cfg = d.validate().map_err(service_flag_error)?;
    Ok((d, cfg))
}

/// Splits `ADDR[:PORT]`: `10.0.0.1`, `10.0.0.1:80`, `fd00::1`, `[fd00::1]:80`.
pub fn split_addr(s: &str) -> Result<(String, Option<i64>), AdminError> {
    let bad_port = |p: &str| Usage(format!("ADDR[:PORT]: invalid port {p:?} in {s:?}"));
    let (addr, port) = if let Some(rest) = s.strip_prefix('[') {
        match rest.split_once(']') {
            Some((a, "")) => (a, None),
            Some((a, p)) => match p.strip_prefix(':') {
                Some(p) => (a, Some(p)),
                None => return Err(bad_port(p)),
            },
            None => return Err(Usage(format!("ADDR[:PORT]: missing ']' in {s:?}"))),
        }
    } else {
        match s.split_once(':') {
            // One colon: IPv4 with a port; more: a bare IPv6 address.
            Some((a, p)) if !p.contains(':') => (a, Some(p)),
            _ => (s, None),
        }
    };
    let port = port
        .map(|p| p.parse::<i64>().map_err(|_| bad_port(p)))
        .transpose()?;
    Ok((addr.to_owned(), port))
}

/// The task the flags describe and its id, validated like a task record.
pub fn task_from_flags(a: &TaskAddArgs) -> Result<(String, TaskRecord), AdminError> {
    check_name("SERVICE", &a.service)?;
    let id = match &a.id {
        Some(id) => {
            layout::validate_id(id).map_err(|m| Usage(format!("--id: {m}")))?;
            id.clone()
        }
        None => new_task_id(),
    };
    if let Some(t) = a.ttl {
        if t <= 0 {
            return Err(Usage(format!(
                "--ttl: must be a positive number of seconds, got {t}"
            )));
        }
    }
    let (addr, port) = split_addr(&a.addr)?;
    let def = TaskDef {
        addr,
        port,
        weight: a.weight,
        node: a.node.clone(),
        state: None,
        source: Some(TaskSource::Manual),
        local: false,
    };
    let task = def.validate().map_err(|e| {
        let flag = match e.path.as_str() {
            "addr" | "port" => "ADDR[:PORT]",
            "weight" => "--weight",
            "node" => "--node",
            _ => return Usage(e.to_string()),
        };
        Usage(format!("{flag}: {}: {}", e.path, e.message))
    })?;
    Ok((id, task))
}

/// A fresh task id: 12 hex digits from the time, the pid and the
/// process's random hash seed.
fn new_task_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
}

// ---------------------------------------------------------------------
// etcd calls
// ---------------------------------------------------------------------

/// One etcd request, bounded by `REQUEST_TIMEOUT`.
async fn call<T>(
    what: &str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, AdminError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(AdminError::Request {
            what: what.to_owned(),
            source,
        }),
        Err(_) => Err(Runtime(format!(
            "etcd: {what}: timed out after {} s",
            REQUEST_TIMEOUT.as_secs()
        ))),
    }
}

async fn get_one(c: &mut Client, key: &str) -> Result<Option<KeyValue>, AdminError> {
    let resp = call(&format!("get {key}"), c.get(key, None)).await?;
    Ok(resp.kvs().first().cloned())
}

/// The valid records under `prefix` (`services/`, `tasks/` or all);
/// invalid ones are reported on stderr, as the daemon would log them.
async fn load(c: &mut Client, root: &str, prefix: &str) -> Result<ClusterState, AdminError> {
    let resp = call(
        &format!("list {prefix}"),
        c.get(prefix, Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let (state, errors) =
        ClusterState::from_kvs(root, resp.kvs().iter().map(|kv| (kv.key(), kv.value())));
    for e in errors {
        eprintln!("meshlb: warning: {e} (skipped)");
    }
    Ok(state)
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Refuses a service whose frontends another service already uses.
fn check_frontends(state: &ClusterState, svc: &ServiceConfig) -> Result<(), AdminError> {
    for (name, other) in state.services() {
        if *name == svc.name {
            continue;
        }
        for p in &svc.publish {
            for fe in svc.frontends(p) {
                if other
                    .publish
                    .iter()
                    .any(|q| other.frontends(q).contains(&fe))
                {
                    return Err(Runtime(format!(
                        "--publish: frontend {fe} is already used by service {name:?}"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Puts `value` at `key` if the key's mod revision is still `rev` (0:
/// absent), keeping `lease`. `false` when someone else changed it.
async fn put_if(
    c: &mut Client,
    key: &str,
    value: Vec<u8>,
    rev: i64,
    lease: i64,
) -> Result<bool, AdminError> {
    let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
    let txn = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
        .and_then([TxnOp::put(key, value, opts)]);
    Ok(call(&format!("put {key}"), c.txn(txn)).await?.succeeded())
}

// ---------------------------------------------------------------------
// service
// ---------------------------------------------------------------------

async fn service_create(opts: &EtcdOptions, a: &ServiceSpecArgs) -> Result<(), AdminError> {
    let (def, svc) = merge_service(a, None)?;
    let mut c = connect(opts).await?;
    let root = &opts.prefix;
    let key = layout::service_key(root, &a.name);
    let state = load(&mut c, root, &layout::services_prefix(root)).await?;
    check_frontends(&state, &svc)?;
    if !put_if(&mut c, &key, to_json(&def), 0, 0).await? {
        return Err(Runtime(format!("service {:?} already exists", a.name)));
    }
    println!("{}", a.name);
    Ok(())
}

async fn service_update(opts: &EtcdOptions, a: &ServiceSpecArgs) -> Result<(), AdminError> {
    check_name("NAME", &a.name)?;
    if !any_flag(a) {
        return Err(Usage(
            "nothing to update: give --publish, --vip, --scheduler, --affinity, --health, --drain-timeout or --announce".into(),
        ));
    }
    let mut c = connect(opts).await?;
    let root = &opts.prefix;
    let key = layout::service_key(root, &a.name);
    // Read-modify-write; retried when another writer gets in between.
    for _ in 0..5 {
        let kv = get_one(&mut c, &key)
            .await?
            .ok_or_else(|| Runtime(format!("no such service {:?}", a.name)))?;
        let base = layout::service_def(&key, &a.name, kv.value())
            .map_err(|source| AdminError::Unchangeable { source })?;
        let (def, svc) = merge_service(a, Some(base))?;
        let state = load(&mut c, root, &layout::services_prefix(root)).await?;
        check_frontends(&state, &svc)?;
        if put_if(&mut c, &key, to_json(&def), kv.mod_revision(), kv.lease()).await? {
            println!("{}", a.name);
            return Ok(());
        }
    }
    Err(Runtime(format!(
        "etcd key {key}: changed by another writer while updating; try again"
    )))
}

async fn service_rm(opts: &EtcdOptions, name: &str) -> Result<(), AdminError> {
    check_name("NAME", name)?;
    let mut c = connect(opts).await?;
    let root = &opts.prefix;
    let key = layout::service_key(root, name);
    let txn = Txn::new().and_then([
        TxnOp::delete(key.as_str(), None),
        TxnOp::delete(
            layout::tasks_prefix(root, Some(name)),
            Some(DeleteOptions::new().with_prefix()),
        ),
    ]);
    let resp = call(&format!("delete {key}"), c.txn(txn)).await?;
    let deleted: Vec<i64> = resp
        .op_responses()
        .iter()
        .map(|r| match r {
            TxnOpResponse::Delete(d) => d.deleted(),
            _ => 0,
        })
        .collect();
    match deleted.as_slice() {
        [0, 0] => Err(Runtime(format!("no such service {name:?}"))),
        [0, n] => {
            eprintln!("meshlb: service {name:?} was not defined; removed its {n} tasks");
            Ok(())
        }
        _ => {
            println!("{name}");
            Ok(())
        }
    }
}

/// `*:80->8000/tcp,*:53->5353/udp` (comma without space: one column).
fn ports_column(svc: &ServiceConfig) -> String {
    svc.publish
        .iter()
        .map(|p| format!("*:{}->{}/{}", p.port, p.target, p.proto))
        .collect::<Vec<_>>()
        .join(",")
}

/// Left-aligned columns two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 < r.len() {
                line.push_str(&format!("{cell:<w$}  ", w = width[i]));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `service ls` table: NAME VIP PORTS TASKS (running/total).
pub fn services_table(state: &ClusterState) -> String {
    let mut rows = vec![vec![
        "NAME".to_owned(),
        "VIP".to_owned(),
        "PORTS".to_owned(),
        "TASKS".to_owned(),
    ]];
    for (name, svc) in state.services() {
        let (mut running, mut total) = (0, 0);
        for (_, t) in state.tasks_of(name) {
            total += 1;
            if t.state == TaskState::Running && t.weight > 0 {
                running += 1;
            }
        }
        rows.push(vec![
            name.clone(),
            svc.vip.map_or("-".to_owned(), |v| v.to_string()),
            ports_column(svc),
            format!("{running}/{total}"),
        ]);
    }
    table(&rows)
}

async fn service_ls(opts: &EtcdOptions) -> Result<(), AdminError> {
    let mut c = connect(opts).await?;
    let root = &opts.prefix;
    let state = load(&mut c, root, &format!("{root}/")).await?;
    print!("{}", services_table(&state));
    Ok(())
}

fn task_json(id: &str, t: &TaskRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(t).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("id".into(), id.into());
    }
    v
}

async fn service_inspect(opts: &EtcdOptions, name: &str) -> Result<(), AdminError> {
    check_name("NAME", name)?;
    let mut c = connect(opts).await?;
    let root = &opts.prefix;
    let key = layout::service_key(root, name);
    let kv = get_one(&mut c, &key)
        .await?
        .ok_or_else(|| Runtime(format!("no such service {name:?}")))?;
    let def = layout::service_def(&key, name, kv.value())?;
    if let Err(e) = layout::parse_service(&key, name, kv.value()) {
        eprintln!("meshlb: warning: {e} (the daemons skip this service)");
    }
    let tasks = load(&mut c, root, &layout::tasks_prefix(root, Some(name))).await?;
    let mut v = serde_json::to_value(&def).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        let list: Vec<serde_json::Value> = tasks
            .tasks_of(name)
            .map(|(id, t)| task_json(id, t))
            .collect();
        o.insert("tasks".into(), list.into());
    }
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    Ok(())
}

// ---------------------------------------------------------------------
// task
// ---------------------------------------------------------------------

async fn task_add(opts: &EtcdOptions, a: &TaskAddArgs) -> Result<(), AdminError> {
    let (id, task) = task_from_flags(a)?;
    let mut c = connect(opts).await?;
    let root = &opts.prefix;
    let skey = layout::service_key(root, &a.service);
    match get_one(&mut c, &skey).await? {
        None => eprintln!(
            "meshlb: warning: service {:?} is not defined: the task is ignored until it is",
            a.service
        ),
        Some(kv) => {
            if let Ok(Some(vip)) =
                layout::parse_service(&skey, &a.service, kv.value()).map(|s| s.vip)
            {
                if vip.is_ipv4() != task.addr.is_ipv4() {
                    return Err(Runtime(format!(
                        "ADDR[:PORT]: {} is of another address family than the vip {vip} of service {:?}",
                        task.addr, a.service
                    )));
                }
            }
        }
    }
    let lease = match a.ttl {
        Some(ttl) => call("lease grant", c.lease_grant(ttl, None)).await?.id(),
        None => 0,
    };
    let key = layout::task_key(root, &a.service, &id);
    if !put_if(&mut c, &key, to_json(&task), 0, lease).await? {
        if lease != 0 {
            let _ = call("lease revoke", c.lease_revoke(lease)).await;
        }
        return Err(Runtime(format!(
            "task {id:?} of service {:?} already exists",
            a.service
        )));
    }
    println!("{id}");
    Ok(())
}

async fn task_rm(opts: &EtcdOptions, a: &TaskIdArgs) -> Result<(), AdminError> {
    check_name("SERVICE", &a.service)?;
    check_id(&a.task_id)?;
    let mut c = connect(opts).await?;
    let key = layout::task_key(&opts.prefix, &a.service, &a.task_id);
    let resp = call(&format!("delete {key}"), c.delete(key.as_str(), None)).await?;
    if resp.deleted() == 0 {
        return Err(Runtime(format!(
            "no such task {:?} of service {:?}",
            a.task_id, a.service
        )));
    }
    println!("{}", a.task_id);
    Ok(())
}

fn addr_port(addr: IpAddr, port: Option<u16>) -> String {
    match (addr, port) {
        (a, None) => a.to_string(),
        (IpAddr::V4(a), Some(p)) => format!("{a}:{p}"),
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
    }
}

/// `task ls` lines: ID SERVICE ADDR[:PORT] WEIGHT STATE NODE, no header
/// (scripts read the id from the first column).
pub fn task_lines(
    tasks: &BTreeMap<String, std::sync::Arc<crate::source::etcd::layout::TaskMap>>,
) -> String {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .flat_map(|(service, ts)| {
            ts.iter().map(move |(id, t)| {
                vec![
                    id.clone(),
                    service.clone(),
                    addr_port(t.addr, t.port),
                    t.weight.to_string(),
                    t.state.to_string(),
                    t.node.clone().unwrap_or_else(|| "-".into()),
                ]
            })
        })
        .collect();
    table(&rows)
}

async fn task_ls(opts: &EtcdOptions, service: Option<&str>) -> Result<(), AdminError> {
    if let Some(s) = service {
        check_name("SERVICE", s)?;
    }
    let mut c = connect(opts).await?;
    let root = &opts.prefix;
    let state = load(&mut c, root, &layout::tasks_prefix(root, service)).await?;
    print!("{}", task_lines(state.tasks()));
    Ok(())
}

async fn task_drain(opts: &EtcdOptions, a: &TaskIdArgs) -> Result<(), AdminError> {
    check_name("SERVICE", &a.service)?;
    check_id(&a.task_id)?;
    let mut c = connect(opts).await?;
    let key = layout::task_key(&opts.prefix, &a.service, &a.task_id);
    for _ in 0..5 {
        let kv = get_one(&mut c, &key).await?.ok_or_else(|| {
            Runtime(format!(
                "no such task {:?} of service {:?}",
                a.task_id, a.service
            ))
        })?;
        let mut task = layout::parse_task(&key, kv.value())?;
        if task.state == TaskState::Draining {
            println!("{}", a.task_id);
            return Ok(());
        }
        task.state = TaskState::Draining;
        // The task keeps its lease: a leased task still expires.
        if put_if(&mut c, &key, to_json(&task), kv.mod_revision(), kv.lease()).await? {
            println!("{}", a.task_id);
            return Ok(());
        }
    }
    Err(Runtime(format!(
        "etcd key {key}: changed by another writer while draining; try again"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn service_args(args: &[&str]) -> ServiceSpecArgs {
        let argv: Vec<&str> = ["meshlb", "service"].iter().chain(args).copied().collect();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Service(s) => match s.command {
                ServiceCommand::Create(a) | ServiceCommand::Update(a) => a,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    fn task_args(args: &[&str]) -> TaskAddArgs {
        let argv: Vec<&str> = ["meshlb", "task", "add"]
            .iter()
            .chain(args)
            .copied()
            .collect();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Task(t) => match t.command {
                TaskCommand::Add(a) => a,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_service_from_flags_is_validated_like_the_config() {
        let (def, svc) = merge_service(
            &service_args(&[
                "create",
                "web",
                "-p",
                "80:8000",
                "--publish",
                "udp:53:5353",
                "--vip",
                "10.96.0.10",
                "--scheduler",
                "rr",
                "--affinity",
                "client-ip:60",
                "--health",
                "http:/healthz",
                "--drain-timeout",
                "30",
                "--announce",
            ]),
            None,
        )
        .unwrap();
        assert_eq!(def.name, "web");
        assert!(svc.announce);
        assert_eq!(svc.publish.len(), 2);
        assert_eq!(svc.publish[1].target, 5353);
        assert_eq!(svc.scheduler, crate::model::config::Scheduler::Rr);
        assert_eq!(svc.affinity.unwrap().timeout, 60);
        assert_eq!(svc.health.as_ref().unwrap().path, "/healthz");
        assert_eq!(svc.drain_timeout, Some(30));
        // What is stored reads back as the same service.
        let json = to_json(&def);
        assert!(String::from_utf8_lossy(&json).contains("\"announce\":true"));
        assert_eq!(layout::parse_service("k", "web", &json).unwrap(), svc);
        // --announce=false on update; --announce without a VIP is refused.
        let (_, off) = merge_service(
            &service_args(&["update", "web", "--announce=false"]),
            Some(def),
        )
        .unwrap();
        assert!(!off.announce);
        let e = merge_service(
            &service_args(&["create", "api", "-p", "80", "--announce"]),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("--announce: needs a vip"), "{e}");
    }

    #[test]
    fn an_update_replaces_only_the_given_fields() {
        let (base, _) = merge_service(
            &service_args(&[
                "create",
                "web",
                "-p",
                "80:8000",
                "--vip",
                "10.96.0.10",
                "--health",
                "http:/",
            ]),
            None,
        )
        .unwrap();
        let base = ServiceDef {
            health: Some(config::HealthDef {
                interval_ms: Some(2000),
                ..base.health.clone().unwrap()
            }),
            ..base
        };
        let (_, svc) = merge_service(
            &service_args(&[
                "update",
                "web",
                "--vip",
                "none",
                "--health",
                "tcp",
                "--scheduler",
                "sh",
            ]),
            Some(base.clone()),
        )
        .unwrap();
        assert_eq!(svc.vip, None);
        assert_eq!(svc.publish[0].target, 8000);
        assert_eq!(svc.scheduler, crate::model::config::Scheduler::Sh);
        let h = svc.health.unwrap();
        assert_eq!(
            (h.kind, h.interval_ms),
            (crate::model::config::HealthKind::Tcp, 2000)
        );
        assert!(!any_flag(&service_args(&["update", "web"])));
    }

    #[test]
    fn bad_service_flags_are_usage_errors_naming_the_flag() {
        let long = "a".repeat(61);
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (
                vec!["create", "web"],
                "--publish: must list at least one port",
            ),
            (
                vec!["create", "Web", "-p", "80"],
                "NAME: invalid name \"Web\"",
            ),
            (
                vec!["create", &long, "-p", "80"],
                "NAME: must be 1..=60 characters, got 61",
            ),
            (
                vec!["create", "web", "-p", "80", "--vip", "10.0.0.300"],
                "--vip: invalid IP address",
            ),
            (
                vec!["create", "web", "-p", "80", "-p", "80:81"],
                "--publish: publish[1]",
            ),
            (
                vec!["create", "web", "-p", "80", "--affinity", "client-ip:0"],
                "--affinity: affinity.timeout",
            ),
            (
                vec!["create", "web", "-p", "80", "--drain-timeout", "-1"],
                "--drain-timeout: must be 0 or more",
            ),
        ];
        for (args, want) in cases {
            match merge_service(&service_args(&args), None) {
                Err(Usage(m)) => {
                    assert!(m.contains(want), "{args:?}: {m:?} lacks {want:?}");
                    assert!(!m.contains('\n'));
                }
                other => panic!("{args:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_task_from_flags_is_validated_like_a_record() {
        let (id, t) = task_from_flags(&task_args(&[
            "web",
            "10.0.1.2:8000",
            "--weight",
            "50",
            "--node",
            "n1",
        ]))
        .unwrap();
        assert_eq!(id.len(), 12);
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            (t.addr, t.port, t.weight),
            ("10.0.1.2".parse().unwrap(), Some(8000), 50)
        );
        assert_eq!(t.node.as_deref(), Some("n1"));
        assert_eq!(t.source, TaskSource::Manual);
        let (id, t) =
            task_from_flags(&task_args(&["web", "[fd00::2]:80", "--id", "c1:80"])).unwrap();
        assert_eq!((id.as_str(), t.port), ("c1:80", Some(80)));
        let (_, t) = task_from_flags(&task_args(&["web", "fd00::2"])).unwrap();
        assert_eq!((t.port, t.weight), (None, 100));

        let cases: Vec<(Vec<&str>, &str)> = vec![
            (
                vec!["web", "10.0.0.300"],
                "ADDR[:PORT]: addr: invalid IP address",
            ),
            (
                vec!["web", "10.0.0.1:0"],
                "ADDR[:PORT]: port: must be 1..=65535, got 0",
            ),
            (
                vec!["web", "10.0.0.1:70000"],
                "ADDR[:PORT]: port: must be 1..=65535, got 70000",
            ),
            (
                vec!["web", "10.0.0.1:http"],
                "ADDR[:PORT]: invalid port \"http\"",
            ),
            (vec!["web", "[fd00::1"], "missing ']'"),
            (
                vec!["web", "10.0.0.1", "--weight", "10001"],
                "--weight: weight: must be 0..=10000",
            ),
            (vec!["web", "10.0.0.1", "--weight", "-1"], "--weight"),
            (
                vec!["web", "10.0.0.1", "--ttl", "0"],
                "--ttl: must be a positive number",
            ),
            (vec!["web", "10.0.0.1", "--id", "a/b"], "--id: invalid id"),
            (vec!["web", "10.0.0.1", "--node", "a b"], "--node"),
            (vec!["Web", "10.0.0.1"], "SERVICE: invalid name"),
        ];
        for (args, want) in cases {
            match task_from_flags(&task_args(&args)) {
                Err(Usage(m)) => assert!(m.contains(want), "{args:?}: {m:?} lacks {want:?}"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn validation_comes_before_connecting() {
        // Nothing listens on port 1: a usage error proves etcd was not asked.
        let etcd = EtcdArgs {
            etcd: Some("http://127.0.0.1:1".into()),
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cmds = [
            AdminCommand::Service(ServiceCommand::Create(service_args(&[
                "create", "web", "-p", "80", "--vip", "x",
            ]))),
            AdminCommand::Service(ServiceCommand::Update(service_args(&["update", "web"]))),
            AdminCommand::Task(TaskCommand::Add(task_args(&["web", "10.0.0.1:0"]))),
            AdminCommand::Task(TaskCommand::Drain(TaskIdArgs {
                service: "web".into(),
                task_id: "a b".into(),
            })),
        ];
        for cmd in cmds {
            match rt.block_on(run(&cmd, &etcd)) {
                Err(Usage(_)) => {}
                other => panic!("{cmd:?}: {other:?}"),
            }
        }
        let bad_url = EtcdArgs {
            etcd: Some("127.0.0.1:2379".into()),
            ..Default::default()
        };
        let ls = AdminCommand::Service(ServiceCommand::Ls);
        assert!(matches!(rt.block_on(run(&ls, &bad_url)), Err(Usage(_))));
    }

    #[test]
    fn tables() {
        let p = "/meshlb/v1";
        let mut s = ClusterState::default();
        for (k, v) in [
            (
                layout::service_key(p, "web"),
                r#"{"vip": "10.96.0.10", "publish": [{"port": 80, "target": 8000}, {"proto": "udp", "port": 53}]}"#,
            ),
            (
                layout::service_key(p, "api"),
                r#"{"publish": [{"port": 81}]}"#,
            ),
            (
                layout::task_key(p, "web", "t1"),
                r#"{"addr": "10.0.1.2", "port": 8000, "node": "n1"}"#,
            ),
            (
                layout::task_key(p, "web", "t2"),
                r#"{"addr": "10.0.1.3", "state": "draining"}"#,
            ),
        ] {
            s.apply_put(p, k.as_bytes(), v.as_bytes()).unwrap();
        }
        assert_eq!(
            services_table(&s),
            "NAME  VIP         PORTS                        TASKS\n\
             api   -           *:81->81/tcp                 0/0\n\
             web   10.96.0.10  *:80->8000/tcp,*:53->53/udp  1/2\n"
        );
        assert_eq!(
            task_lines(s.tasks()),
            "t1  web  10.0.1.2:8000  100  running   n1\n\
             t2  web  10.0.1.3       100  draining  -\n"
        );
    }
}
