//! The etcd layout (SPEC.md, "etcd layout"): keys under the prefix, the
//! JSON records they hold, their validation with one-line errors naming
//! the key, and the [`ClusterState`] they add up to — and from it, this
//! node's [`DesiredState`]. No IO here: the daemon's watch loop and the
//! CLI feed bytes in.
//!
//! Services are validated by the very code that validates `[[service]]`
//! tables (`config::ServiceDef::validate`); a task is a `[[service.backend]]`
//! with a state, validated by the same field checks.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::model::config::{BackendConfig, Scheduler, ServiceConfig};
use crate::model::{BackendState, DesiredState, Frontend, ServiceKey, ServiceSpec};
use crate::source::config::{self, FieldError, ServiceDef, DEFAULT_WEIGHT};

/// Largest value meshlb reads: anything bigger is refused unparsed (a
/// record is a few hundred bytes; a huge one is a mistake or an attack).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Longest task id (a Docker container id plus a port fits easily).
pub const MAX_ID_LEN: usize = 128;

// ---------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------

fn base(prefix: &str) -> &str {
    prefix.trim_end_matches('/')
}

/// `<prefix>/services/<name>`
pub fn service_key(prefix: &str, name: &str) -> String {
    format!("{}/services/{name}", base(prefix))
}

/// `<prefix>/tasks/<service>/<id>`
pub fn task_key(prefix: &str, service: &str, id: &str) -> String {
    format!("{}/tasks/{service}/{id}", base(prefix))
}

/// `<prefix>/nodes/<node>`
pub fn node_key(prefix: &str, node: &str) -> String {
    format!("{}/nodes/{node}", base(prefix))
}

/// `<prefix>/services/`: every service key starts with it.
pub fn services_prefix(prefix: &str) -> String {
    format!("{}/services/", base(prefix))
}

/// `<prefix>/tasks/`, or `<prefix>/tasks/<service>/` for one service's
/// tasks (the trailing slash keeps `web` from matching `web2`).
pub fn tasks_prefix(prefix: &str, service: Option<&str>) -> String {
    match service {
        Some(s) => format!("{}/tasks/{s}/", base(prefix)),
        None => format!("{}/tasks/", base(prefix)),
    }
}

/// `<prefix>/nodes/`
pub fn nodes_prefix(prefix: &str) -> String {
    format!("{}/nodes/", base(prefix))
}

/// What a key under the prefix names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Service(String),
    Task {
        service: String,
        id: String,
    },
    Node(String),
    /// `vips/...` (the rest of the key): the announced VIPs' election
    /// (`daemon::announce` follows it; not part of the desired state).
    Election(String),
}

impl Key {
    /// The key's full text under `prefix`.
    pub fn to_key(&self, prefix: &str) -> String {
        match self {
            Key::Service(n) => service_key(prefix, n),
            Key::Task { service, id } => task_key(prefix, service, id),
            Key::Node(n) => node_key(prefix, n),
            Key::Election(rest) => format!("{}/vips/{rest}", base(prefix)),
        }
    }
}

/// Check a task id or node name: 1..=128 characters of `A-Za-z0-9_.:-`
/// (container ids, `id:port`, host names).
pub fn validate_id(id: &str) -> Result<(), String> {
    let n = id.len();
    if n == 0 || n > MAX_ID_LEN {
        return Err(format!("must be 1..={MAX_ID_LEN} characters, got {n}"));
    }
    if !id
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'-'))
    {
        return Err(format!("invalid id {id:?}: use A-Z, a-z, 0-9 and _ . : -"));
    }
    Ok(())
}

/// Parses a key under `prefix`. Service names follow
/// `config::validate_name`; task ids and node names [`validate_id`].
pub fn parse_key(prefix: &str, key: &[u8]) -> Result<Key, RecordError> {
    let shown = printable(key);
    let err = |kind, message: String| RecordError::new(&shown, kind, message);
    let Ok(text) = std::str::from_utf8(key) else {
        return Err(err("key", "key is not UTF-8".into()));
    };
    let rest = text
        .strip_prefix(base(prefix))
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| err("key", format!("not under the prefix {}", base(prefix))))?;
    let parts: Vec<&str> = rest.split('/').collect();
    let name = |n: &str| config::validate_name(n).map_err(|m| err("name", format!("name: {m}")));
    let id = |what: &str, n: &str| validate_id(n).map_err(|m| err("key", format!("{what}: {m}")));
    match parts.as_slice() {
        ["services", n] => {
            name(n)?;
            Ok(Key::Service((*n).to_owned()))
        }
        ["tasks", s, i] => {
            name(s)?;
            id("task id", i)?;
            Ok(Key::Task {
                service: (*s).to_owned(),
                id: (*i).to_owned(),
            })
        }
        ["nodes", n] => {
            id("node name", n)?;
            Ok(Key::Node((*n).to_owned()))
        }
        ["vips", rest @ ..] if !rest.is_empty() => Ok(Key::Election(rest.join("/"))),
        _ => Err(err(
            "key",
            "unknown key: expected services/NAME, tasks/SERVICE/ID or nodes/NODE under the prefix"
                .into(),
        )),
    }
}

/// A key (or any bytes) as one printable line.
fn printable(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .chars()
        .flat_map(|c| {
            let e: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            e
        })
        .collect()
}

// ---------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------

/// A key or value that was refused. `Display` is one line naming the key;
/// `kind` is the `meshlb_config_errors_total{kind}` label: one of "key",
/// "json", "address", "port", "scheduler", "name", "too_large", "invalid".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("etcd key {key}: {message}")]
pub struct RecordError {
    pub key: String,
    pub kind: &'static str,
    pub message: String,
}

impl RecordError {
    fn new(key: &str, kind: &'static str, message: impl Into<String>) -> RecordError {
        RecordError {
            key: key.to_owned(),
            kind,
            message: message.into().replace(['\n', '\r'], " "),
        }
    }

    fn from_field(key: &str, e: FieldError) -> RecordError {
        let kind = field_kind(&e.path);
        let message = if e.path.is_empty() {
            e.message
        } else {
            format!("{}: {}", e.path, e.message)
        };
        RecordError::new(key, kind, message)
    }
}

/// The error kind of a field path such as `publish[0].target`.
pub fn field_kind(path: &str) -> &'static str {
    let last = path.rsplit('.').next().unwrap_or(path);
    if last.contains("port") || last.contains("target") {
        "port"
    } else if last.contains("vip") || last.contains("addr") {
        "address"
    } else if last.contains("scheduler") {
        "scheduler"
    } else if last.contains("name") {
        "name"
    } else {
        "invalid"
    }
}

// ---------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------

/// Whether a task takes new flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    #[default]
    Running,
    /// No new flows; established ones continue.
    Draining,
}

/// Who registered a task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskSource {
    Docker,
    #[default]
    Manual,
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskState::Running => "running",
            TaskState::Draining => "draining",
        })
    }
}

impl fmt::Display for TaskSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskSource::Docker => "docker",
            TaskSource::Manual => "manual",
        })
    }
}

/// A validated `tasks/<service>/<id>` value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TaskDef")]
pub struct TaskRecord {
    pub addr: IpAddr,
    /// `None`: the `target` of each of the service's publish entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 0..=`config::MAX_WEIGHT`; 0 drains.
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub state: TaskState,
    pub source: TaskSource,
    /// Reachable only from its own node (a container on a Docker bridge
    /// network without a published port: every node has its own
    /// 172.17.0.0/16): other nodes do not balance to it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
}

/// A task value as written. Numbers are `i64` so out-of-range values get
/// the config module's messages (`port: must be 1..=65535, got 70000`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDef {
    pub addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<TaskState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<TaskSource>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
}

impl TaskDef {
    /// Checks the fields; error paths are `addr`, `port`, `weight`, `node`.
    pub fn validate(&self) -> Result<TaskRecord, FieldError> {
        let field = |path: &str, message: String| FieldError {
            path: path.into(),
            message,
        };
        let addr = config::ip("addr", &self.addr)?;
        let port = self.port.map(|p| config::port("port", p)).transpose()?;
        let weight = match self.weight {
            Some(w) => config::weight("weight", w)?,
            None => DEFAULT_WEIGHT,
        };
        if let Some(n) = &self.node {
            validate_id(n).map_err(|m| field("node", m))?;
        }
        Ok(TaskRecord {
            addr,
            port,
            weight,
            node: self.node.clone(),
            state: self.state.unwrap_or_default(),
            source: self.source.unwrap_or_default(),
            local: self.local,
        })
    }
}

impl TryFrom<TaskDef> for TaskRecord {
    type Error = FieldError;
    fn try_from(d: TaskDef) -> Result<TaskRecord, FieldError> {
        d.validate()
    }
}

impl TaskRecord {
    /// The record as written (for merging an update).
    pub fn to_def(&self) -> TaskDef {
        TaskDef {
            addr: self.addr.to_string(),
            port: self.port.map(i64::from),
            weight: Some(i64::from(self.weight)),
            node: self.node.clone(),
            state: Some(self.state),
            source: Some(self.source),
            local: self.local,
        }
    }
}

/// A `nodes/<node>` value: a daemon announcing itself under its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<IpAddr>,
    /// `xdp-native`, `xdp-generic` or `ipvs`.
    pub dataplane: String,
    pub version: String,
}

fn check_size(key: &str, value: &[u8]) -> Result<(), RecordError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(RecordError::new(
            key,
            "too_large",
            format!(
                "value is {} bytes, more than the limit of {MAX_VALUE_BYTES}",
                value.len()
            ),
        ));
    }
    Ok(())
}

fn json_error(key: &str, e: serde_json::Error) -> RecordError {
    RecordError::new(key, "json", format!("invalid JSON: {e}"))
}

/// Reads a `services/<name>` value as written, without validating it: the
/// name is filled in from the key when absent and must match it when
/// present; `backend` is refused (an etcd service's backends are its
/// tasks). `key` is only used in errors.
pub fn service_def(key: &str, name: &str, value: &[u8]) -> Result<ServiceDef, RecordError> {
    check_size(key, value)?;
    let mut v: serde_json::Value = serde_json::from_slice(value).map_err(|e| json_error(key, e))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(RecordError::new(key, "json", "value must be a JSON object"));
    };
    match obj.get("name") {
        None => {
            obj.insert("name".into(), name.into());
        }
        Some(serde_json::Value::String(n)) if n == name => {}
        Some(other) => {
            return Err(RecordError::new(
                key,
                "name",
                format!("name: {other} differs from the key's name {name:?}"),
            ))
        }
    }
    // serde's "unknown variant" would count as a JSON error: check it here
    // so it is reported as what it is.
    if let Some(serde_json::Value::String(s)) = obj.get("scheduler") {
        s.parse::<Scheduler>()
            .map_err(|m| RecordError::new(key, "scheduler", format!("scheduler: {m}")))?;
    }
    if obj.contains_key("backend") {
        return Err(RecordError::new(
            key,
            "invalid",
            "backend: not allowed in etcd: register tasks under tasks/<service>/ instead",
        ));
    }
    serde_json::from_value(v).map_err(|e| json_error(key, e))
}

/// Reads and validates a `services/<name>` value.
pub fn parse_service(key: &str, name: &str, value: &[u8]) -> Result<ServiceConfig, RecordError> {
    let def = service_def(key, name, value)?;
    def.validate().map_err(|e| RecordError::from_field(key, e))
}

/// Reads and validates a `tasks/<service>/<id>` value.
pub fn parse_task(key: &str, value: &[u8]) -> Result<TaskRecord, RecordError> {
    check_size(key, value)?;
    let def: TaskDef = serde_json::from_slice(value).map_err(|e| json_error(key, e))?;
    def.validate().map_err(|e| RecordError::from_field(key, e))
}

/// Reads a `nodes/<node>` value.
pub fn parse_node(key: &str, value: &[u8]) -> Result<NodeRecord, RecordError> {
    check_size(key, value)?;
    serde_json::from_slice(value).map_err(|e| json_error(key, e))
}

// ---------------------------------------------------------------------
// Cluster state
// ---------------------------------------------------------------------

/// Every valid record under the prefix. Invalid ones are not here: a bad
/// put is reported and the previous valid value stays.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    /// Records are shared (`Arc`): a snapshot per etcd event copies
    /// pointers, and a change copies only the service it touches.
    services: BTreeMap<String, Arc<ServiceConfig>>,
    /// Service name → task id → task. Tasks of services not (yet) defined
    /// are kept, and ignored until the service appears.
    tasks: BTreeMap<String, Arc<TaskMap>>,
    nodes: BTreeMap<String, NodeRecord>,
}

/// One service's tasks by id.
pub type TaskMap = BTreeMap<String, TaskRecord>;

/// What `ClusterState::desired_cached` built: the desired state it
/// keeps up to date, and per etcd service the specs it was built from,
/// reused while the service's record and tasks are the very same shared
/// values (an etcd event replaces only what it touches).
#[derive(Debug, Default)]
pub struct DesiredCache {
    node: String,
    entries: BTreeMap<String, CacheEntry>,
    /// Services built so far (not taken from the cache).
    built: u64,
    /// Whole rebuilds so far.
    rebuilds: u64,
    /// The static services `out` was built with.
    statics: Vec<ServiceConfig>,
    /// The desired state as of the last call.
    out: DesiredState,
    /// Frontend -> how many specs (static or etcd, given it or not) want
    /// it: a change touching a frontend wanted twice is contested.
    wanted: BTreeMap<Frontend, u32>,
    /// Local (not remote) backend address -> how many specs of `out`
    /// name it.
    local: BTreeMap<IpAddr, u32>,
    /// The keys of `out` with a draining backend (where drain timers
    /// look).
    draining: BTreeSet<ServiceKey>,
    /// The etcd services with a health check.
    checked: BTreeSet<String>,
    /// `out` is complete (a failed patch leaves it for a rebuild).
    valid: bool,
    changes: Changes,
}

/// What one `desired_cached` call changed in its desired state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Rebuilt from scratch: anything may have changed.
    pub full: bool,
    /// The etcd services replaced (when not `full`).
    pub names: Vec<String>,
    /// Services (keys) were added or removed.
    pub keys: bool,
    /// The set of local backend addresses changed.
    pub local: bool,
    /// When not `full`: the local backend addresses that left the set,
    /// then those that joined it (with the service that brought each),
    /// in this order (an address may leave and join again).
    pub local_gone: Vec<IpAddr>,
    pub local_joined: Vec<(IpAddr, Arc<str>)>,
}

impl DesiredCache {
    /// The desired state as of the last `desired_cached` call.
    pub fn desired(&self) -> &DesiredState {
        &self.out
    }

    /// The etcd services with a health check (static ones are in the
    /// config).
    pub fn checked(&self) -> &BTreeSet<String> {
        &self.checked
    }

    /// The services of the desired state with a draining backend.
    pub fn draining(&self) -> &BTreeSet<ServiceKey> {
        &self.draining
    }

    /// What the last `desired_cached` call changed.
    pub fn changes(&self) -> &Changes {
        &self.changes
    }

    /// One more spec wants `fe`; true when another already did.
    fn want(&mut self, fe: &Frontend) -> bool {
        let n = self.wanted.entry(*fe).or_default();
        *n += 1;
        *n > 1
    }

    /// One spec less wants `fe`; true when another still does.
    fn unwant(&mut self, fe: &Frontend) -> bool {
        match self.wanted.get_mut(fe) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            _ => {
                self.wanted.remove(fe);
                false
            }
        }
    }
}

/// Whether a static service of `statics` shadows the etcd service `name`.
fn shadowed(statics: &[ServiceConfig], name: &str) -> bool {
    statics.iter().any(|s| s.name == name)
}

impl CacheEntry {
    /// Built from these very records (shared values: a pointer compare).
    fn built_from(&self, svc: &Arc<ServiceConfig>, tasks: Option<&Arc<TaskMap>>) -> bool {
        Arc::ptr_eq(&self.svc, svc)
            && match (&self.tasks, tasks) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

/// Whether `spec` has a draining backend.
fn drains(spec: &ServiceSpec) -> bool {
    spec.backends
        .values()
        .any(|b| b.effective_state() == BackendState::Draining)
}

/// Counts the local backends of `spec` (of service `name`) into `local`,
/// noting in `changes` each address that joins the set.
fn count_in(
    local: &mut BTreeMap<IpAddr, u32>,
    spec: &ServiceSpec,
    name: &str,
    changes: &mut Changes,
) {
    // One shared name per spec, not one per address.
    let mut shared: Option<Arc<str>> = None;
    for (bk, _) in spec.backends.iter().filter(|(_, b)| !b.remote) {
        let n = local.entry(bk.addr).or_default();
        if *n == 0 {
            changes.local = true;
            let name = shared.get_or_insert_with(|| name.into()).clone();
            changes.local_joined.push((bk.addr, name));
        }
        *n += 1;
    }
}

/// Counts the local backends of `spec` out of `local`, noting in
/// `changes` each address that leaves the set.
fn count_out(local: &mut BTreeMap<IpAddr, u32>, spec: &ServiceSpec, changes: &mut Changes) {
    for (bk, _) in spec.backends.iter().filter(|(_, b)| !b.remote) {
        if let Some(n) = local.get_mut(&bk.addr) {
            *n -= 1;
            if *n == 0 {
                local.remove(&bk.addr);
                changes.local = true;
                changes.local_gone.push(bk.addr);
            }
        }
    }
}

#[derive(Debug)]
struct CacheEntry {
    svc: Arc<ServiceConfig>,
    tasks: Option<Arc<TaskMap>>,
    specs: Vec<(ServiceKey, Arc<ServiceSpec>)>,
}

impl ClusterState {
    /// Every valid service definition in etcd.
    pub fn service_configs(&self) -> impl Iterator<Item = &ServiceConfig> {
        self.services.values().map(std::convert::AsRef::as_ref)
    }

    /// Builds the state from a listing; returns the records it skipped.
    pub fn from_kvs<'a>(
        prefix: &str,
        kvs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> (ClusterState, Vec<RecordError>) {
        let mut s = ClusterState::default();
        let mut errors = Vec::new();
        for (k, v) in kvs {
            if let Err(e) = s.apply_put(prefix, k, v) {
                errors.push(e);
            }
        }
        (s, errors)
    }

    /// Applies a put; `Ok(true)` when the state changed. A refused value
    /// leaves the key's previous valid value in place.
    pub fn apply_put(
        &mut self,
        prefix: &str,
        key: &[u8],
        value: &[u8],
    ) -> Result<bool, RecordError> {
        let parsed = parse_key(prefix, key)?;
        let shown = printable(key);
        fn put<T: PartialEq>(map: &mut BTreeMap<String, T>, k: &str, v: T) -> bool {
            if map.get(k) == Some(&v) {
                return false;
            }
            map.insert(k.to_owned(), v);
            true
        }
        Ok(match parsed {
            Key::Service(name) => {
                let svc = Arc::new(parse_service(&shown, &name, value)?);
                put(&mut self.services, &name, svc)
            }
            Key::Task { service, id } => {
                let task = parse_task(&shown, value)?;
                let tasks = self.tasks.entry(service).or_default();
                if tasks.get(&id) == Some(&task) {
                    return Ok(false);
                }
                Arc::make_mut(tasks).insert(id, task);
                true
            }
            Key::Node(name) => {
                let node = parse_node(&shown, value)?;
                put(&mut self.nodes, &name, node)
            }
            Key::Election(_) => false,
        })
    }

    /// Applies a delete; `true` when the state changed.
    pub fn apply_delete(&mut self, prefix: &str, key: &[u8]) -> bool {
        match parse_key(prefix, key) {
            Ok(Key::Service(name)) => self.services.remove(&name).is_some(),
            Ok(Key::Task { service, id }) => {
                let Some(tasks) = self.tasks.get_mut(&service) else {
                    return false;
                };
                if !tasks.contains_key(&id) {
                    return false;
                }
                let removed = Arc::make_mut(tasks).remove(&id).is_some();
                if tasks.is_empty() {
                    self.tasks.remove(&service);
                }
                removed
            }
            Ok(Key::Node(name)) => self.nodes.remove(&name).is_some(),
            Ok(Key::Election(_)) | Err(_) => false,
        }
    }

    pub fn services(&self) -> &BTreeMap<String, Arc<ServiceConfig>> {
        &self.services
    }

    /// Service name → task id → task, services without tasks absent.
    pub fn tasks(&self) -> &BTreeMap<String, Arc<TaskMap>> {
        &self.tasks
    }

    /// One service's tasks by id (empty when it has none).
    pub fn tasks_of(&self, service: &str) -> impl Iterator<Item = (&String, &TaskRecord)> {
        self.tasks.get(service).into_iter().flat_map(|t| t.iter())
    }

    pub fn nodes(&self) -> &BTreeMap<String, NodeRecord> {
        &self.nodes
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn task_count(&self) -> usize {
        self.tasks.values().map(|t| t.len()).sum()
    }

    /// This node's desired state: the static services as
    /// `crate::model::config::desired_state_of` builds them, plus every etcd service
    /// whose backends are its tasks (draining tasks drain).
    ///
    /// Static services win over an etcd service of the same name, and a
    /// frontend already taken (by a static service, or an etcd service
    /// earlier by name) is not given to another; a task of the other
    /// address family than its service, or repeating another task's
    /// address and port, is skipped. Each is logged once per process.
    pub fn desired(
        &self,
        static_services: &[ServiceConfig],
        local_addrs: BTreeSet<IpAddr>,
        node: &str,
    ) -> DesiredState {
        let mut cache = DesiredCache::default();
        self.desired_cached(static_services, local_addrs, node, &mut cache, None);
        cache.out
    }

    /// [`desired`](Self::desired), kept in `cache` and updated in place.
    ///
    /// Only the etcd services whose record or tasks changed since the
    /// last call are rebuilt: records are shared (`Arc`), so "changed" is
    /// a pointer compare. Who owns a contested frontend is decided among
    /// all services in order, so a change touching a frontend that
    /// another service also wants rebuilds the whole state, as do other
    /// static services or another node name. [`DesiredCache::changes`]
    /// says what this call changed.
    ///
    /// `touched`, when given, names every service whose record or tasks
    /// changed since the last call with this cache (an etcd event names
    /// the service it touches): only those are compared. Without it,
    /// every service is.
    pub fn desired_cached<'c>(
        &self,
        static_services: &[ServiceConfig],
        local_addrs: BTreeSet<IpAddr>,
        node: &str,
        cache: &'c mut DesiredCache,
        touched: Option<&BTreeSet<String>>,
    ) -> &'c DesiredState {
        cache.changes = Changes::default();
        let patched = cache.valid
            && cache.node == node
            && cache.statics == static_services
            && self.patch(static_services, node, cache, touched);
        if !patched {
            self.rebuild(static_services, node, cache);
        }
        cache.out.local_addrs = local_addrs;
        &cache.out
    }

    /// The etcd services added, removed or changed since `cache` was last
    /// brought up to date (a merge walk over both, by name; services a
    /// static one shadows are not etcd's).
    fn dirty(&self, statics: &[ServiceConfig], cache: &DesiredCache) -> Vec<String> {
        let etcd = self.services.iter().filter(|(n, _)| !shadowed(statics, n));
        crate::model::changed_keys(etcd, cache.entries.iter(), |name, svc, e| {
            e.built_from(svc, self.tasks.get(name))
        })
        .into_iter()
        .cloned()
        .collect()
    }

    /// Brings `cache` up to date by replacing the dirty services' specs
    /// alone; false (and `cache` left for a rebuild) when one of them
    /// shares a frontend with another service, before or after.
    fn patch(
        &self,
        statics: &[ServiceConfig],
        node: &str,
        cache: &mut DesiredCache,
        touched: Option<&BTreeSet<String>>,
    ) -> bool {
        let dirty = match touched {
            Some(names) => names
                .iter()
                .filter(|n| !shadowed(statics, n))
                .filter(|n| {
                    // Still there, or gone from both.
                    self.services.contains_key(*n) || cache.entries.contains_key(*n)
                })
                .cloned()
                .collect(),
            None => self.dirty(statics, cache),
        };
        let mut contested = false;
        // Keys taken out, to tell whether the set of keys changed.
        let mut removed: BTreeSet<ServiceKey> = BTreeSet::new();
        for name in &dirty {
            let Some(old) = cache.entries.remove(name) else {
                continue;
            };
            for (key, spec) in &old.specs {
                for fe in &spec.frontends {
                    contested |= cache.unwant(fe);
                }
                match cache.out.services.get(key) {
                    Some(s) if Arc::ptr_eq(s, spec) => {
                        cache.out.services.remove(key);
                        cache.draining.remove(key);
                        removed.insert(key.clone());
                        count_out(&mut cache.local, spec, &mut cache.changes);
                    }
                    // It had lost a frontend to another service.
                    _ => contested = true,
                }
            }
        }
        if contested {
            return false;
        }
        for name in &dirty {
            let Some(svc) = self.services.get(name) else {
                continue;
            };
            let entry = self.entry(name, svc, node, cache);
            for (_, spec) in &entry.specs {
                for fe in &spec.frontends {
                    contested |= cache.want(fe);
                }
            }
            cache.entries.insert(name.clone(), entry);
        }
        if contested {
            return false;
        }
        for name in &dirty {
            cache.checked.remove(name);
            let Some(entry) = cache.entries.get(name) else {
                continue;
            };
            if entry.svc.health.is_some() {
                cache.checked.insert(name.clone());
            }
            for (key, spec) in &entry.specs {
                count_in(&mut cache.local, spec, name, &mut cache.changes);
                cache.out.services.insert(key.clone(), spec.clone());
                if drains(spec) {
                    cache.draining.insert(key.clone());
                }
                cache.changes.keys |= !removed.remove(key);
            }
        }
        cache.changes.keys |= !removed.is_empty();
        cache.changes.names = dirty;
        true
    }

    /// Builds `cache` from scratch, reusing the specs of services whose
    /// record and tasks are the very ones it was built from.
    fn rebuild(&self, static_services: &[ServiceConfig], node: &str, cache: &mut DesiredCache) {
        if cache.node != node {
            cache.entries.clear();
            cache.node = node.to_owned();
        }
        cache.valid = false;
        cache.rebuilds += 1;
        cache
            .entries
            .retain(|name, _| self.services.contains_key(name) && !shadowed(static_services, name));
        let mut desired =
            crate::model::config::desired_state_of(static_services, BTreeSet::new(), node);
        let mut wanted: BTreeMap<Frontend, u32> = BTreeMap::new();
        let mut taken: BTreeMap<Frontend, String> = BTreeMap::new();
        for (k, s) in &desired.services {
            for fe in &s.frontends {
                *wanted.entry(*fe).or_default() += 1;
                taken.insert(*fe, k.name.clone());
            }
        }
        for (name, svc) in &self.services {
            if shadowed(static_services, name) {
                warn_once(format!(
                    "etcd service {name:?} ignored: the config file defines a static service of that name"
                ));
                continue;
            }
            let fresh = cache
                .entries
                .get(name)
                .is_some_and(|e| e.built_from(svc, self.tasks.get(name)));
            if !fresh {
                let entry = self.entry(name, svc, node, cache);
                cache.entries.insert(name.clone(), entry);
            }
            let Some(entry) = cache.entries.get(name) else {
                continue;
            };
            for (key, spec) in &entry.specs {
                for fe in &spec.frontends {
                    *wanted.entry(*fe).or_default() += 1;
                }
                if let Some(fe) = spec.frontends.iter().find(|fe| taken.contains_key(fe)) {
                    warn_once(format!(
                        "etcd service {name:?}: frontend {fe} is already used by service {:?}; {key} ignored",
                        taken[fe]
                    ));
                    continue;
                }
                for fe in &spec.frontends {
                    taken.insert(*fe, name.clone());
                }
                desired.services.insert(key.clone(), spec.clone());
            }
        }
        let mut local = BTreeMap::new();
        let mut ignored = Changes::default();
        for (key, spec) in &desired.services {
            count_in(&mut local, spec, &key.name, &mut ignored);
        }
        cache.changes = Changes {
            full: true,
            keys: !desired.services.keys().eq(cache.out.services.keys()),
            local: !local.keys().eq(cache.local.keys()),
            ..Default::default()
        };
        cache.draining = desired
            .services
            .iter()
            .filter(|(_, s)| drains(s))
            .map(|(k, _)| k.clone())
            .collect();
        cache.checked = cache
            .entries
            .iter()
            .filter(|(_, e)| e.svc.health.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        cache.out = desired;
        cache.wanted = wanted;
        cache.local = local;
        cache.statics = static_services.to_vec();
        cache.valid = true;
    }

    /// The specs of etcd service `name` (counted in `cache.built`).
    fn entry(
        &self,
        name: &str,
        svc: &Arc<ServiceConfig>,
        node: &str,
        cache: &mut DesiredCache,
    ) -> CacheEntry {
        let (full, states) = self.with_tasks(svc, node);
        let specs = full.specs(node, |b| states[&(b.addr, b.port)]);
        cache.built += 1;
        CacheEntry {
            svc: svc.clone(),
            tasks: self.tasks.get(name).cloned(),
            specs,
        }
    }

    /// `svc` with its tasks as backends, and each backend's state; on node
    /// `node`, other nodes' local-only tasks (`TaskRecord::local`) are left
    /// out: only their own node reaches them.
    fn with_tasks(
        &self,
        svc: &ServiceConfig,
        node: &str,
    ) -> (ServiceConfig, BTreeMap<(IpAddr, Option<u16>), BackendState>) {
        let mut svc = svc.clone();
        let mut states = BTreeMap::new();
        let mut family: Option<(bool, String)> =
            svc.vip.map(|v| (v.is_ipv4(), "the service vip".into()));
        for (id, t) in self.tasks_of(&svc.name) {
            let key = task_key("", &svc.name, id);
            let key = key.trim_start_matches('/');
            match &family {
                Some((v4, what)) if *v4 != t.addr.is_ipv4() => {
                    warn_once(format!(
                        "etcd key {key}: task skipped: address {} is of another family than {what}",
                        t.addr
                    ));
                    continue;
                }
                Some(_) => {}
                None => family = Some((t.addr.is_ipv4(), format!("task {id:?}"))),
            }
            if t.local && t.node.as_deref() != Some(node) {
                // Another node's container on its own bridge: only that
                // node reaches it.
                continue;
            }
            let b = BackendConfig {
                addr: t.addr,
                port: t.port,
                weight: t.weight,
                node: t.node.clone(),
                routed: false,
            };
            if let Some(p) = svc
                .publish
                .iter()
                .find(|p| svc.backends.iter().any(|o| o.key(p) == b.key(p)))
            {
                warn_once(format!(
                    "etcd key {key}: task skipped: {} is already a backend of service {:?}",
                    b.key(p),
                    svc.name
                ));
                continue;
            }
            let state = match t.state {
                TaskState::Running => BackendState::Up,
                TaskState::Draining => BackendState::Draining,
            };
            states.insert((b.addr, b.port), state);
            svc.backends.push(b);
        }
        (svc, states)
    }
}

/// Logs a warning the first time it is seen: `desired` runs on every
/// change, and one bad task must not repeat its line on each of them.
fn warn_once(message: String) {
    static SEEN: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut seen = SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if seen.len() < 10_000 && seen.insert(message.clone()) {
        log::warn!("{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{plain, BackendKey, BackendSpec, Proto, ServiceKey, ServiceSpec};

    const P: &str = "/meshlb/v1";

    #[test]
    fn keys_round_trip() {
        let keys = [
            Key::Service("web".into()),
            Key::Service("db.v6".into()),
            Key::Task {
                service: "web".into(),
                id: "3f2a9c:8000".into(),
            },
            Key::Node("Node-1.example".into()),
            Key::Election("10.96.0.10".into()),
            Key::Election("candidates/n1".into()),
        ];
        for k in keys {
            for prefix in [P, "/meshlb/v1/", "/x"] {
                let text = k.to_key(prefix);
                assert!(!text.contains("//"), "{text}");
                assert_eq!(parse_key(prefix, text.as_bytes()).unwrap(), k, "{text}");
            }
        }
        assert_eq!(service_key(P, "web"), "/meshlb/v1/services/web");
        assert_eq!(task_key(P, "web", "a1"), "/meshlb/v1/tasks/web/a1");
        assert_eq!(node_key(P, "n1"), "/meshlb/v1/nodes/n1");
        assert_eq!(services_prefix(P), "/meshlb/v1/services/");
        assert_eq!(tasks_prefix(P, None), "/meshlb/v1/tasks/");
        assert_eq!(tasks_prefix(P, Some("web")), "/meshlb/v1/tasks/web/");
        assert_eq!(nodes_prefix(P), "/meshlb/v1/nodes/");
        assert!(service_key(P, "a").starts_with(&services_prefix(P)));
        assert!(task_key(P, "a", "1").starts_with(&tasks_prefix(P, Some("a"))));
        assert!(!task_key(P, "ab", "1").starts_with(&tasks_prefix(P, Some("a"))));
        assert!(node_key(P, "n").starts_with(&nodes_prefix(P)));
    }

    #[test]
    fn bad_keys_are_refused() {
        let cases = [
            ("/other/services/web", "key", "not under the prefix"),
            ("/meshlb/v1/services/Web", "name", "invalid name"),
            ("/meshlb/v1/services/web/x", "key", "unknown key"),
            ("/meshlb/v1/tasks/web", "key", "unknown key"),
            ("/meshlb/v1/tasks/web/", "key", "task id: must be 1..=128"),
            ("/meshlb/v1/tasks/web/a b", "key", "task id: invalid id"),
            ("/meshlb/v1/nodes/", "key", "node name"),
            ("/meshlb/v1/frobs/x", "key", "unknown key"),
        ];
        for (key, kind, want) in cases {
            let e = parse_key(P, key.as_bytes()).unwrap_err();
            assert_eq!(e.kind, kind, "{key}: {e}");
            assert!(e.to_string().contains(want), "{key}: {e}");
            assert!(
                e.to_string().starts_with(&format!("etcd key {key}: ")),
                "{e}"
            );
        }
        let long = format!("/meshlb/v1/tasks/web/{}", "a".repeat(129));
        assert_eq!(parse_key(P, long.as_bytes()).unwrap_err().kind, "key");
        let e = parse_key(P, b"/meshlb/v1/services/a\nb").unwrap_err();
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    const WEB: &str = r#"{"vip": "10.96.0.10", "publish": [{"port": 80, "target": 8000}, {"proto": "udp", "port": 53, "target": 5353}], "scheduler": "maglev"}"#;

    #[test]
    fn malformed_records_give_one_line_naming_the_key() {
        let big = format!(
            r#"{{"publish": [{{"port": 80}}], "x": "{}"}}"#,
            "a".repeat(1 << 20)
        );
        let long_name = "a".repeat(61);
        let long_key = format!("/meshlb/v1/services/{long_name}");
        let cases: Vec<(&str, String, &[u8], &str, &str)> = vec![
            // (what, key, value, kind, expected substring)
            (
                "bad json",
                service_key(P, "web"),
                b"{\"publish\": [",
                "json",
                "invalid JSON",
            ),
            (
                "not an object",
                service_key(P, "web"),
                b"[1]",
                "json",
                "JSON object",
            ),
            (
                "unknown field",
                service_key(P, "web"),
                br#"{"publish": [{"port": 80}], "colour": 1}"#,
                "json",
                "unknown field `colour`",
            ),
            (
                "bad vip",
                service_key(P, "web"),
                br#"{"vip": "10.0.0.300", "publish": [{"port": 80}]}"#,
                "address",
                "vip: invalid IP address",
            ),
            (
                "port 0",
                service_key(P, "web"),
                br#"{"publish": [{"port": 0}]}"#,
                "port",
                "publish[0].port: must be 1..=65535, got 0",
            ),
            (
                "port 70000",
                service_key(P, "web"),
                br#"{"publish": [{"port": 70000}]}"#,
                "port",
                "publish[0].port: must be 1..=65535, got 70000",
            ),
            (
                "target 70000",
                service_key(P, "web"),
                br#"{"publish": [{"port": 80, "target": 70000}]}"#,
                "port",
                "publish[0].target",
            ),
            (
                "unknown scheduler",
                service_key(P, "web"),
                br#"{"publish": [{"port": 80}], "scheduler": "random"}"#,
                "scheduler",
                "scheduler: unknown scheduler \"random\"",
            ),
            (
                "61-char name",
                long_key.clone(),
                br#"{"publish": [{"port": 80}]}"#,
                "name",
                "must be 1..=60 characters, got 61",
            ),
            (
                "name mismatch",
                service_key(P, "web"),
                br#"{"name": "api", "publish": [{"port": 80}]}"#,
                "name",
                "differs from the key's name \"web\"",
            ),
            (
                "backends in etcd",
                service_key(P, "web"),
                br#"{"publish": [{"port": 80}], "backend": []}"#,
                "invalid",
                "backend: not allowed",
            ),
            (
                "1 MiB value",
                service_key(P, "web"),
                big.as_bytes(),
                "too_large",
                "more than the limit of 65536",
            ),
            (
                "task bad json",
                task_key(P, "web", "t1"),
                b"addr=10.0.0.1",
                "json",
                "invalid JSON",
            ),
            (
                "task bad address",
                task_key(P, "web", "t1"),
                br#"{"addr": "node-3"}"#,
                "address",
                "addr: invalid IP address \"node-3\"",
            ),
            (
                "task port 0",
                task_key(P, "web", "t1"),
                br#"{"addr": "10.0.0.1", "port": 0}"#,
                "port",
                "port: must be 1..=65535, got 0",
            ),
            (
                "task port 70000",
                task_key(P, "web", "t1"),
                br#"{"addr": "10.0.0.1", "port": 70000}"#,
                "port",
                "port: must be 1..=65535, got 70000",
            ),
            (
                "task weight",
                task_key(P, "web", "t1"),
                br#"{"addr": "10.0.0.1", "weight": 10001}"#,
                "invalid",
                "weight: must be 0..=10000, got 10001",
            ),
            (
                "task state",
                task_key(P, "web", "t1"),
                br#"{"addr": "10.0.0.1", "state": "gone"}"#,
                "json",
                "unknown variant `gone`",
            ),
            (
                "task bad id",
                format!("{P}/tasks/web/bad id"),
                br#"{"addr": "10.0.0.1"}"#,
                "key",
                "task id: invalid id",
            ),
            (
                "task 1 MiB",
                task_key(P, "web", "t1"),
                big.as_bytes(),
                "too_large",
                "bytes",
            ),
            (
                "node bad json",
                node_key(P, "n1"),
                b"{",
                "json",
                "invalid JSON",
            ),
        ];
        for (what, key, value, kind, want) in cases {
            let mut s = ClusterState::default();
            let e = s.apply_put(P, key.as_bytes(), value).expect_err(what);
            let line = e.to_string();
            assert_eq!(e.kind, kind, "{what}: {line}");
            assert!(
                line.starts_with(&format!("etcd key {key}: ")),
                "{what}: {line}"
            );
            assert!(line.contains(want), "{what}: {line:?} lacks {want:?}");
            assert!(
                !line.contains('\n') && !line.ends_with('.'),
                "{what}: {line:?}"
            );
            assert!(line.len() < 400, "{what}: too long: {line}");
            assert_eq!(s, ClusterState::default(), "{what}");
        }
    }

    #[test]
    fn a_malformed_update_keeps_the_old_value() {
        let mut s = ClusterState::default();
        let web = service_key(P, "web");
        let t1 = task_key(P, "web", "t1");
        let n1 = node_key(P, "n1");
        assert!(s.apply_put(P, web.as_bytes(), WEB.as_bytes()).unwrap());
        assert!(s
            .apply_put(P, t1.as_bytes(), br#"{"addr": "10.0.1.2"}"#)
            .unwrap());
        assert!(s
            .apply_put(
                P,
                n1.as_bytes(),
                br#"{"dataplane": "ipvs", "version": "0.1.0"}"#
            )
            .unwrap());
        // The same value again changes nothing.
        assert!(!s.apply_put(P, web.as_bytes(), WEB.as_bytes()).unwrap());
        let before = s.clone();
        s.apply_put(P, web.as_bytes(), br#"{"publish": [{"port": 0}]}"#)
            .unwrap_err();
        s.apply_put(P, t1.as_bytes(), br#"{"addr": "10.0.1.2", "port": 70000}"#)
            .unwrap_err();
        s.apply_put(P, n1.as_bytes(), b"{}").unwrap_err();
        assert_eq!(s, before);
        assert_eq!(s.services()["web"].vip, Some("10.96.0.10".parse().unwrap()));
        assert_eq!((s.service_count(), s.task_count()), (1, 1));

        assert!(s.apply_delete(P, t1.as_bytes()));
        assert!(!s.apply_delete(P, t1.as_bytes()));
        assert!(s.tasks().is_empty());
        assert!(!s.apply_delete(P, b"/meshlb/v1/bogus"));
        assert!(s.apply_delete(P, web.as_bytes()));
        assert!(s.apply_delete(P, n1.as_bytes()));
        assert_eq!(s, ClusterState::default());
    }

    #[test]
    fn records_fill_defaults_and_round_trip() {
        let t = parse_task("k", br#"{"addr": "fd00::2"}"#).unwrap();
        assert_eq!(
            t,
            TaskRecord {
                addr: "fd00::2".parse().unwrap(),
                port: None,
                weight: DEFAULT_WEIGHT,
                node: None,
                state: TaskState::Running,
                source: TaskSource::Manual,
                local: false,
            }
        );
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(
            json,
            r#"{"addr":"fd00::2","weight":100,"state":"running","source":"manual"}"#
        );
        assert_eq!(serde_json::from_str::<TaskRecord>(&json).unwrap(), t);
        assert!(serde_json::from_str::<TaskRecord>(r#"{"addr":"10.0.0.1","port":0}"#).is_err());
        assert_eq!(t.to_def().validate().unwrap(), t);

        // The name comes from the key when absent.
        let def = service_def("k", "web", WEB.as_bytes()).unwrap();
        assert_eq!(def.name, "web");
        let svc = parse_service("k", "web", WEB.as_bytes()).unwrap();
        assert_eq!(svc.publish.len(), 2);
        assert!(svc.backends.is_empty());
    }

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cached_desired_equals_a_fresh_build_through_random_events() {
        // xorshift64*: deterministic.
        let mut x = 0x6361_6368_6500_0001u64;
        let mut below = |n: u64| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        };
        let mut s = ClusterState::default();
        let mut cache = DesiredCache::default();
        // Told which service each event touched, as the daemon is.
        let mut told = DesiredCache::default();
        for round in 0..2000 {
            let svc = format!("s{}", below(12));
            match below(10) {
                0 => {
                    s.apply_delete(P, service_key(P, &svc).as_bytes());
                }
                1..=2 => {
                    // Node ports 7000..7003 (first half) or 7000..7039:
                    // services contest them often, or now and then.
                    let ports = if round < 1000 { 4 } else { 40 };
                    let v = format!(
                        r#"{{"vip": "10.96.0.{}", "publish": [{{"port": {}}}]}}"#,
                        below(4) + 1,
                        7000 + below(ports)
                    );
                    let _ = s.apply_put(P, service_key(P, &svc).as_bytes(), v.as_bytes());
                }
                3 => {
                    let id = format!("t{}", below(6));
                    s.apply_delete(P, task_key(P, &svc, &id).as_bytes());
                }
                _ => {
                    let id = format!("t{}", below(6));
                    let v = format!(
                        r#"{{"addr": "10.0.{}.{}", "weight": {}, "state": "{}", "node": "n{}"}}"#,
                        below(3),
                        below(5) + 1,
                        below(3) * 50,
                        if below(5) == 0 { "draining" } else { "running" },
                        below(2) + 1
                    );
                    let _ = s.apply_put(P, task_key(P, &svc, &id).as_bytes(), v.as_bytes());
                }
            }
            let fresh = s.desired(&[], BTreeSet::new(), "n1");
            let local_before: Vec<IpAddr> = cache.local.keys().copied().collect();
            let keys_before: Vec<ServiceKey> = cache.out.services.keys().cloned().collect();
            s.desired_cached(
                &[],
                BTreeSet::new(),
                "n1",
                &mut told,
                Some(&[svc.clone()].into()),
            );
            assert_eq!(*told.desired(), fresh, "round {round}, told");
            s.desired_cached(&[], BTreeSet::new(), "n1", &mut cache, None);
            let cached = cache.desired();
            assert_eq!(*cached, fresh, "round {round}");
            // The local addresses it counts, and whether they changed.
            let local: BTreeSet<IpAddr> = fresh
                .services
                .values()
                .flat_map(|s| s.backends.iter())
                .filter(|(_, b)| !b.remote)
                .map(|(k, _)| k.addr)
                .collect();
            assert!(local.iter().eq(cache.local.keys()), "round {round}");
            let c = cache.changes();
            // (It may say so when an address left and came back.)
            if !local.iter().eq(local_before.iter()) {
                assert!(
                    c.full || c.local,
                    "round {round}: local addresses changed unsaid"
                );
            }
            let draining: BTreeSet<&ServiceKey> = fresh
                .services
                .iter()
                .filter(|(_, s)| drains(s))
                .map(|(k, _)| k)
                .collect();
            assert!(
                draining.iter().copied().eq(cache.draining.iter()),
                "round {round}"
            );
            if !fresh.services.keys().eq(keys_before.iter()) {
                assert!(c.full || c.keys, "round {round}: keys changed unsaid");
            }
            if !c.full {
                // Replaying what left, then what joined, gives the set.
                let mut replay: BTreeSet<IpAddr> = local_before.iter().copied().collect();
                for a in &c.local_gone {
                    assert!(replay.remove(a), "round {round}: {a} left twice");
                }
                for (a, _) in &c.local_joined {
                    assert!(replay.insert(*a), "round {round}: {a} joined twice");
                }
                assert_eq!(replay, local, "round {round}");
            }
        }
        // Uncontested changes were patched in, not rebuilt.
        assert!(
            cache.rebuilds < 1500,
            "{} of 2,000 rounds rebuilt everything",
            cache.rebuilds
        );
        // One event touches one service: at most one build per round.
        assert!(
            cache.built <= 2000,
            "{} builds in 2,000 rounds",
            cache.built
        );
    }

    #[test]
    fn desired_state_from_etcd_and_static_services() {
        let put = |s: &mut ClusterState, k: String, v: &str| {
            s.apply_put(P, k.as_bytes(), v.as_bytes()).unwrap();
        };
        let mut s = ClusterState::default();
        put(&mut s, service_key(P, "web"), WEB);
        put(
            &mut s,
            task_key(P, "web", "a"),
            r#"{"addr": "10.0.1.2", "weight": 50}"#,
        );
        put(
            &mut s,
            task_key(P, "web", "b"),
            r#"{"addr": "10.0.2.2", "port": 9000, "state": "draining", "source": "docker", "node": "n2"}"#,
        );
        // Another family than the VIP: skipped.
        put(&mut s, task_key(P, "web", "c"), r#"{"addr": "fd00::2"}"#);
        // Same address and port as task a: skipped.
        put(
            &mut s,
            task_key(P, "web", "d"),
            r#"{"addr": "10.0.1.2", "port": 8000}"#,
        );
        // A task of an unknown service: kept, ignored.
        put(&mut s, task_key(P, "ghost", "g"), r#"{"addr": "10.0.9.9"}"#);
        // Shadowed by the static service "static".
        put(
            &mut s,
            service_key(P, "static"),
            r#"{"publish": [{"port": 81}]}"#,
        );
        // Its node port is the static service's: not programmed.
        put(
            &mut s,
            service_key(P, "clash"),
            r#"{"publish": [{"port": 7000}]}"#,
        );
        assert_eq!(s.task_count(), 5);

        let stat = ServiceDef {
            name: "static".into(),
            publish: vec![config::PublishDef {
                proto: None,
                port: 7000,
                target: None,
            }],
            backends: vec![config::BackendDef {
                addr: "10.0.3.3".into(),
                port: None,
                weight: None,
                node: None,
            }],
            ..Default::default()
        }
        .validate()
        .unwrap();
        let locals: BTreeSet<IpAddr> = [v4("192.168.1.10")].into();
        let d = s.desired(std::slice::from_ref(&stat), locals.clone(), "n1");
        assert_eq!(d.local_addrs, locals);

        let fe = |addr: Option<&str>, port, proto| Frontend {
            addr: addr.map(v4),
            port,
            proto,
        };
        let be = |a: &str, port| BackendKey { addr: v4(a), port };
        let spec = |weight, state| BackendSpec {
            weight,
            state,
            remote: false,
        };
        // The draining task runs on node n2: remote from n1, so SNATed.
        let on_n2 = |weight, state| BackendSpec {
            remote: true,
            ..spec(weight, state)
        };
        let skey = |name: &str, proto, port| ServiceKey {
            name: name.into(),
            proto,
            port,
        };
        let want: BTreeMap<ServiceKey, ServiceSpec> = [
            (
                skey("static", Proto::Tcp, 7000),
                ServiceSpec {
                    affinity_secs: 0,
                    frontends: [fe(None, 7000, Proto::Tcp)].into(),
                    backends: [(be("10.0.3.3", 7000), spec(100, BackendState::Up))].into(),
                },
            ),
            (
                skey("web", Proto::Tcp, 80),
                ServiceSpec {
                    affinity_secs: 0,
                    frontends: [
                        fe(Some("10.96.0.10"), 80, Proto::Tcp),
                        fe(None, 80, Proto::Tcp),
                    ]
                    .into(),
                    backends: [
                        (be("10.0.1.2", 8000), spec(50, BackendState::Up)),
                        (be("10.0.2.2", 9000), on_n2(100, BackendState::Draining)),
                    ]
                    .into(),
                },
            ),
            (
                skey("web", Proto::Udp, 53),
                ServiceSpec {
                    affinity_secs: 0,
                    frontends: [
                        fe(Some("10.96.0.10"), 53, Proto::Udp),
                        fe(None, 53, Proto::Udp),
                    ]
                    .into(),
                    backends: [
                        (be("10.0.1.2", 5353), spec(50, BackendState::Up)),
                        (be("10.0.2.2", 9000), on_n2(100, BackendState::Draining)),
                    ]
                    .into(),
                },
            ),
        ]
        .into();
        assert_eq!(plain(&d.services), want);

        // A local-only task (a container on node n2's own bridge) is a
        // backend on n2 only.
        put(
            &mut s,
            task_key(P, "web", "e"),
            r#"{"addr": "172.17.0.2", "node": "n2", "local": true}"#,
        );
        let backs = |node: &str| -> Vec<IpAddr> {
            s.desired(&[], BTreeSet::new(), node).services[&skey("web", Proto::Tcp, 80)]
                .backends
                .keys()
                .map(|b| b.addr)
                .collect()
        };
        assert!(!backs("n1").contains(&v4("172.17.0.2")));
        assert!(backs("n2").contains(&v4("172.17.0.2")));
        s.apply_delete(P, task_key(P, "web", "e").as_bytes());

        // Without static services, etcd's "static" (port 81) and "clash"
        // (port 7000) are programmed too.
        let d = s.desired(&[], BTreeSet::new(), "n1");
        let names: BTreeSet<&str> = d.services.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["clash", "static", "web"].into());
        // Static services alone: exactly what the config builds.
        assert_eq!(
            ClusterState::default().desired(std::slice::from_ref(&stat), locals.clone(), "n1"),
            crate::model::config::desired_state_of(&[stat], locals, "n1")
        );
    }

    #[test]
    fn a_service_without_vip_takes_the_family_of_its_first_task() {
        let mut s = ClusterState::default();
        for (k, v) in [
            (service_key(P, "v6"), r#"{"publish": [{"port": 80}]}"#),
            (task_key(P, "v6", "a"), r#"{"addr": "fd00::1"}"#),
            (task_key(P, "v6", "b"), r#"{"addr": "10.0.0.1"}"#),
        ] {
            s.apply_put(P, k.as_bytes(), v.as_bytes()).unwrap();
        }
        let d = s.desired(&[], BTreeSet::new(), "n1");
        let spec = d.services.values().next().unwrap();
        let addrs: Vec<IpAddr> = spec.backends.keys().map(|b| b.addr).collect();
        assert_eq!(addrs, vec!["fd00::1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn from_kvs_reports_bad_records_and_keeps_the_rest() {
        let web = service_key(P, "web");
        let t1 = task_key(P, "web", "t1");
        let bad = task_key(P, "web", "t2");
        let kvs: Vec<(&[u8], &[u8])> = vec![
            (web.as_bytes(), WEB.as_bytes()),
            (t1.as_bytes(), br#"{"addr": "10.0.1.2"}"#),
            (bad.as_bytes(), br#"{"addr": "10.0.1.3", "port": 0}"#),
            (b"/meshlb/v1/junk", b"1"),
            // The VIP election's keys are not records: no error.
            (b"/meshlb/v1/vips/10.96.0.10", br#"{"node": "n1"}"#),
            (b"/meshlb/v1/vips/candidates/n1", b"n1"),
        ];
        let (s, errors) = ClusterState::from_kvs(P, kvs);
        assert_eq!((s.service_count(), s.task_count()), (1, 1));
        let kinds: Vec<&str> = errors.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["port", "key"]);
        assert!(errors[0].to_string().contains(&bad));
    }
}
