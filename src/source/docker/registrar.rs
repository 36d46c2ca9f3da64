//! The etcd side of Docker registration: keeps this node's docker-sourced
//! `tasks/<service>/<id>` keys equal to what the node's containers stand
//! for, every key bound to the node's lease (the one `nodes/<node>` is held
//! under), so a node that dies loses its tasks when the lease expires.
//!
//! Single changes (a container started, stopping, gone) are written at once.
//! A full converge — list this node's docker tasks, put what is missing or
//! different or under another lease, delete what no container stands for —
//! runs after every resync with Docker, when the lease is re-granted, and
//! after any failed write, retried with a capped backoff. Nothing is written
//! without a lease.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};
use tokio::time::Instant;

use super::labels::Registration;
use crate::source::etcd::layout::{self, Key, TaskRecord, TaskSource, TaskState};
use crate::source::etcd::{connect, error_chain, EtcdOptions, REQUEST_TIMEOUT};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A registration as this node wants it: which container, which record.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Wanted {
    container: String,
    record: TaskRecord,
}

/// What a full converge must write: puts (key, record) and deletes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub puts: Vec<(String, TaskRecord)>,
    pub deletes: Vec<String>,
}

/// Compares what this node wants (`want`: key → record) with this node's
/// docker tasks in etcd (`have`: key → (record, lease id)). Pure.
pub fn changes(
    want: &BTreeMap<String, TaskRecord>,
    have: &BTreeMap<String, (TaskRecord, i64)>,
    lease: i64,
) -> Changes {
    let mut c = Changes::default();
    for (k, rec) in want {
        match have.get(k) {
            Some((r, l)) if r == rec && *l == lease => {}
            _ => c.puts.push((k.clone(), rec.clone())),
        }
    }
    c.deletes = have
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    c
}

/// This node's registrations and the etcd connection that writes them.
pub struct Registrar {
    opts: EtcdOptions,
    node: String,
    client: Option<Client>,
    lease: Option<i64>,
    /// Full etcd key → registration.
    desired: BTreeMap<String, Wanted>,
    /// A full converge is due (at `retry_at`).
    dirty: bool,
    retry_at: Instant,
    backoff: Duration,
}

impl Registrar {
    pub fn new(opts: EtcdOptions, node: String) -> Registrar {
        Registrar {
            opts,
            node,
            client: None,
            lease: None,
            desired: BTreeMap::new(),
            dirty: true,
            retry_at: Instant::now(),
            backoff: BACKOFF_MIN,
        }
    }

    /// When the next full converge is due, if one is.
    pub fn due(&self) -> Option<Instant> {
        (self.dirty && self.lease.is_some()).then_some(self.retry_at)
    }

    /// The node lease changed (granted again after an etcd outage, or
    /// lost): everything is put again under the new one.
    pub fn set_lease(&mut self, lease: Option<i64>) {
        if lease != self.lease {
            self.lease = lease;
            self.schedule_now();
        }
    }

    fn schedule_now(&mut self) {
        self.dirty = true;
        self.retry_at = Instant::now();
        self.backoff = BACKOFF_MIN;
    }

    fn key(&self, r: &Registration) -> String {
        layout::task_key(&self.opts.prefix, &r.service, &r.id)
    }

    /// Replaces every registration (a resync with Docker) and converges.
    pub async fn replace_all(&mut self, regs: Vec<(String, Registration)>) {
        self.desired = regs
            .into_iter()
            .map(|(container, r)| {
                (
                    self.key(&r),
                    Wanted {
                        container,
                        record: r.record,
                    },
                )
            })
            .collect();
        self.schedule_now();
        self.converge().await;
    }

    /// Sets what one container stands for now (possibly nothing).
    pub async fn set_container(&mut self, container: &str, regs: Vec<Registration>) {
        let new: BTreeMap<String, TaskRecord> =
            regs.into_iter().map(|r| (self.key(&r), r.record)).collect();
        let old: Vec<String> = self
            .desired
            .iter()
            .filter(|(k, w)| w.container == container && !new.contains_key(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in old {
            self.desired.remove(&k);
            self.delete(&k).await;
        }
        for (k, record) in new {
            let w = Wanted {
                container: container.to_owned(),
                record,
            };
            if self.desired.get(&k) != Some(&w) {
                let rec = w.record.clone();
                self.desired.insert(k.clone(), w);
                self.put(&k, &rec).await;
            }
        }
    }

    /// Marks a container's tasks draining (it is being stopped).
    pub async fn drain_container(&mut self, container: &str) {
        let keys: Vec<String> = self
            .desired
            .iter()
            .filter(|(_, w)| w.container == container && w.record.state != TaskState::Draining)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            let rec = match self.desired.get_mut(&k) {
                Some(w) => {
                    w.record.state = TaskState::Draining;
                    w.record.clone()
                }
                None => continue,
            };
            self.put(&k, &rec).await;
        }
    }

    /// Whether the container has any registration.
    pub fn has_container(&self, container: &str) -> bool {
        self.desired.values().any(|w| w.container == container)
    }

    async fn client(&mut self) -> Result<&mut Client, String> {
        if self.client.is_none() {
            self.client = Some(connect(&self.opts).await.map_err(|e| e.to_string())?);
        }
        self.client.as_mut().ok_or_else(|| "no client".to_owned())
    }

    /// Notes a failed write: reconnect and converge later.
    fn failed(&mut self, what: &str, e: String) {
        log::warn!("docker registration: etcd {what}: {e}; retrying");
        self.client = None;
        if !self.dirty {
            self.dirty = true;
            self.backoff = BACKOFF_MIN;
        }
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    async fn put(&mut self, key: &str, rec: &TaskRecord) {
        // Pending a full converge (or a lease), single writes wait for it.
        let Some(lease) = self.lease.filter(|_| !self.dirty) else {
            self.dirty = true;
            return;
        };
        match self.try_put(key, rec, lease).await {
            Ok(()) => log::info!(
                "docker registration: put {key} {} {}",
                addr_port(rec),
                rec.state
            ),
            Err(e) => self.failed(&format!("put {key}"), e),
        }
    }

    async fn try_put(&mut self, key: &str, rec: &TaskRecord, lease: i64) -> Result<(), String> {
        let value = serde_json::to_vec(rec).map_err(|e| e.to_string())?;
        let c = self.client().await?;
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            c.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| error_chain(&e))?;
        Ok(())
    }

    async fn delete(&mut self, key: &str) {
        if self.dirty || self.lease.is_none() {
            self.dirty = true;
            return;
        }
        match self.try_delete(key).await {
            Ok(()) => log::info!("docker registration: deleted {key}"),
            Err(e) => self.failed(&format!("delete {key}"), e),
        }
    }

    async fn try_delete(&mut self, key: &str) -> Result<(), String> {
        let c = self.client().await?;
        tokio::time::timeout(REQUEST_TIMEOUT, c.delete(key, None))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| error_chain(&e))?;
        Ok(())
    }

    /// This node's docker-sourced tasks in etcd: key → (record, lease).
    async fn list_own(&mut self) -> Result<BTreeMap<String, (TaskRecord, i64)>, String> {
        let prefix = self.opts.prefix.clone();
        let node = self.node.clone();
        let c = self.client().await?;
        let resp = tokio::time::timeout(
            REQUEST_TIMEOUT,
            c.get(
                layout::tasks_prefix(&prefix, None),
                Some(GetOptions::new().with_prefix()),
            ),
        )
        .await
        .map_err(|_| "list: timed out".to_owned())?
        .map_err(|e| format!("list: {}", error_chain(&e)))?;
        let mut out = BTreeMap::new();
        for kv in resp.kvs() {
            // Malformed records are the watch loop's to report.
            let Ok(Key::Task { .. }) = layout::parse_key(&prefix, kv.key()) else {
                continue;
            };
            let Ok(key) = kv.key_str() else { continue };
            let Ok(rec) = layout::parse_task(key, kv.value()) else {
                continue;
            };
            if rec.source == TaskSource::Docker && rec.node.as_deref() == Some(node.as_str()) {
                out.insert(key.to_owned(), (rec, kv.lease()));
            }
        }
        Ok(out)
    }

    /// Makes etcd hold exactly this node's registrations, under the lease.
    pub async fn converge(&mut self) {
        let Some(lease) = self.lease else {
            self.dirty = true;
            return;
        };
        let have = match self.list_own().await {
            Ok(h) => h,
            Err(e) => return self.failed("converge", e),
        };
        let want: BTreeMap<String, TaskRecord> = self
            .desired
            .iter()
            .map(|(k, w)| (k.clone(), w.record.clone()))
            .collect();
        let c = changes(&want, &have, lease);
        for k in &c.deletes {
            if let Err(e) = self.try_delete(k).await {
                return self.failed(&format!("delete {k}"), e);
            }
            log::info!("docker registration: deleted stale {k}");
        }
        for (k, rec) in &c.puts {
            if let Err(e) = self.try_put(k, rec, lease).await {
                return self.failed(&format!("put {k}"), e);
            }
            log::info!(
                "docker registration: put {k} {} {}",
                addr_port(rec),
                rec.state
            );
        }
        log::info!(
            "docker registration: {} tasks of node {} in etcd under lease {lease:x} ({} put, {} stale deleted)",
            want.len(),
            self.node,
            c.puts.len(),
            c.deletes.len()
        );
        self.dirty = false;
        self.backoff = BACKOFF_MIN;
    }
}

fn addr_port(r: &TaskRecord) -> String {
    let port = r.port.map_or(String::new(), |p| format!(":{p}"));
    match r.addr {
        std::net::IpAddr::V6(a) => format!("[{a}]{port}"),
        a @ std::net::IpAddr::V4(_) => format!("{a}{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(addr: &str, state: TaskState) -> TaskRecord {
        TaskRecord {
            addr: addr.parse().unwrap(),
            port: Some(8000),
            weight: 100,
            node: Some("n1".into()),
            state,
            source: TaskSource::Docker,
            local: false,
        }
    }

    #[test]
    fn changes_put_missing_different_and_re_leased_and_delete_stale() {
        let run = TaskState::Running;
        let want: BTreeMap<String, TaskRecord> = [
            ("same".to_string(), rec("10.0.0.1", run)),
            ("missing".to_string(), rec("10.0.0.2", run)),
            ("draining".to_string(), rec("10.0.0.3", TaskState::Draining)),
            ("old-lease".to_string(), rec("10.0.0.4", run)),
        ]
        .into();
        let have: BTreeMap<String, (TaskRecord, i64)> = [
            ("same".to_string(), (rec("10.0.0.1", run), 7)),
            ("draining".to_string(), (rec("10.0.0.3", run), 7)),
            ("old-lease".to_string(), (rec("10.0.0.4", run), 6)),
            ("stale".to_string(), (rec("10.0.0.9", run), 7)),
        ]
        .into();
        let c = changes(&want, &have, 7);
        let puts: Vec<&str> = c.puts.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(puts, ["draining", "missing", "old-lease"]);
        assert_eq!(c.deletes, ["stale"]);
        // Converged: nothing to do.
        let have: BTreeMap<String, (TaskRecord, i64)> = want
            .iter()
            .map(|(k, r)| (k.clone(), (r.clone(), 7)))
            .collect();
        assert_eq!(changes(&want, &have, 7), Changes::default());
        // Nothing wanted: everything of this node goes.
        assert_eq!(changes(&BTreeMap::new(), &have, 7).deletes.len(), 4);
    }
}
