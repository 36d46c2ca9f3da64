//! The daemon's etcd source: list the prefix at revision R, watch from
//! R+1, publish every change as a new snapshot of the cluster state. On
//! compaction (the watch's revision is gone) it lists again; on a broken
//! connection it reconnects with a short capped backoff and resumes from
//! the last revision seen, while the data plane stays as it is.
//!
//! The source keeps no state: it sends the list, then the watch's events,
//! as [`Update`]s through a bounded channel, and the daemon applies them
//! to the one [`Snapshot`] it owns. Nothing is copied per event, and the
//! daemon applies every update waiting before it syncs once, which
//! coalesces bursts without losing the last one. A daemon behind holds
//! the source back (the channel is bounded), never the other way round.
//!
//! Also here: the node's own key `nodes/<node>`, kept under a lease whose
//! id is published for the Docker registrar, so the node's container
//! registrations live and die with the node.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::{mpsc, watch};

use super::layout::{self, ClusterState, RecordError};
use super::{connect, error_chain, EtcdOptions, REQUEST_TIMEOUT};
use crate::model::counters::Registry;

/// Backoff between reconnect attempts: short, so that a returning etcd
/// is noticed within a second.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// TTL of the node lease.
pub const NODE_TTL_SECS: i64 = 10;

/// One consistent view of the cluster, as of `revision`.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub state: ClusterState,
    pub revision: i64,
    /// When the change that produced this snapshot was observed (for the
    /// sync-latency metric).
    pub observed_at: Option<Instant>,
    /// The services whose record or tasks changed since the last
    /// [`take_touched`](Self::take_touched); `None`: any may have.
    touched: Option<BTreeSet<String>>,
}

/// What the source sends the daemon.
#[derive(Debug)]
pub enum Update {
    /// A full list: the snapshot to start from.
    Listed(Snapshot),
    /// One watch response's events, in order, up to `revision`.
    Events {
        events: Vec<Event>,
        revision: i64,
        observed: Instant,
    },
}

/// One watch event, as etcd sent it (parsed when applied).
#[derive(Debug)]
pub enum Event {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

/// Updates waiting for the daemon at most: beyond, the source waits.
pub const UPDATES: usize = 64;

impl Snapshot {
    /// A snapshot of `state` as listed at `revision`.
    pub fn listed(state: ClusterState, revision: i64, observed_at: Instant) -> Snapshot {
        Snapshot {
            state,
            revision,
            observed_at: Some(observed_at),
            touched: None,
        }
    }

    /// The services whose record or tasks changed since the last call
    /// (`None`: any may have, as after a list), for
    /// `ClusterState::desired_cached`.
    pub fn take_touched(&mut self) -> Option<BTreeSet<String>> {
        self.touched.replace(BTreeSet::new())
    }

    /// Applies `update`; a bad record is reported (logged, counted) and
    /// skipped. Returns whether the state changed.
    pub fn apply(&mut self, update: Update, prefix: &str, metrics: &Registry) -> bool {
        match update {
            Update::Listed(s) => {
                *self = s;
                true
            }
            Update::Events {
                events,
                revision,
                observed,
            } => {
                let mut changed = false;
                for ev in events {
                    let (key, c) = match ev {
                        Event::Put { key, value } => {
                            match self.state.apply_put(prefix, &key, &value) {
                                Ok(c) => (key, c),
                                Err(e) => {
                                    report(&[e], metrics);
                                    continue;
                                }
                            }
                        }
                        Event::Delete { key } => {
                            let c = self.state.apply_delete(prefix, &key);
                            (key, c)
                        }
                    };
                    if !c {
                        continue;
                    }
                    changed = true;
                    let service = match layout::parse_key(prefix, &key) {
                        Ok(layout::Key::Service(s) | layout::Key::Task { service: s, .. }) => {
                            Some(s)
                        }
                        _ => None,
                    };
                    if let (Some(t), Some(s)) = (self.touched.as_mut(), service) {
                        t.insert(s);
                    }
                }
                self.revision = revision;
                if changed {
                    self.observed_at = Some(observed);
                }
                changed
            }
        }
    }
}

fn report(errors: &[RecordError], metrics: &Registry) {
    for e in errors {
        log::warn!("{e}: record skipped");
        metrics.config_error(e.kind);
    }
}

enum WatchEnd {
    /// The watch's start revision was compacted: list again.
    Compacted,
    /// The stream broke: reconnect and resume.
    Broken(String),
    /// The daemon no longer listens.
    Closed,
}

/// Records per list page at most. A page must also stay below gRPC's
/// message limit (`MAX_MESSAGE`): records we accept are at most
/// `MAX_VALUE_BYTES`, but the prefix may hold larger ones (etcd takes
/// values up to 1.5 MiB by default), so a page that does not fit is asked
/// again at half the size (`list_page`).
const LIST_PAGE: i64 = 4096;

/// The largest gRPC message the daemon decodes from etcd (list pages and
/// watch responses; the server fragments larger watch responses).
const MAX_MESSAGE: usize = 8 * 1024 * 1024;

/// Whether `e` says a response was larger than the client decodes.
fn too_large(e: &etcd_client::Error) -> bool {
    match e {
        // OutOfRange (tonic: "decoded message length too large") or
        // ResourceExhausted.
        etcd_client::Error::GRpcStatus(s) => matches!(s.code() as i32, 8 | 11),
        _ => false,
    }
}

/// One list page from `key`: at most `limit` records (fewer when they do
/// not fit one message: halved until they do). Returns the response, and
/// `Err(Some(key))` when the single record at `key`'s position is too
/// large on its own (the caller skips it).
async fn list_page(
    client: &mut Client,
    key: &[u8],
    end: &str,
    revision: i64,
    limit: &mut i64,
) -> Result<etcd_client::GetResponse, Result<Vec<u8>, String>> {
    loop {
        let mut opts = GetOptions::new()
            .with_range(end.to_owned())
            .with_limit(*limit);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let got = tokio::time::timeout(REQUEST_TIMEOUT, kv.get(key.to_vec(), Some(opts)))
            .await
            .map_err(|_| Err("list: timed out".to_owned()))?;
        match got {
            Ok(r) => return Ok(r),
            Err(e) if too_large(&e) && *limit > 1 => *limit = (*limit / 2).max(1),
            Err(e) if too_large(&e) => {
                // One record alone is too large: name it by its key.
                let opts = GetOptions::new()
                    .with_range(end.to_owned())
                    .with_limit(1)
                    .with_keys_only()
                    .with_revision(revision);
                let r = tokio::time::timeout(REQUEST_TIMEOUT, kv.get(key.to_vec(), Some(opts)))
                    .await
                    .map_err(|_| Err("list: timed out".to_owned()))?
                    .map_err(|e| Err(format!("list: {}", error_chain(&e))))?;
                return match r.kvs().first() {
                    Some(k) => Err(Ok(k.key().to_vec())),
                    None => Err(Err(format!("list: {}", error_chain(&e)))),
                };
            }
            Err(e) => return Err(Err(format!("list: {}", error_chain(&e)))),
        }
    }
}

/// What one page request returns (see [`list_page`]).
type PageResult = Result<etcd_client::GetResponse, Result<Vec<u8>, String>>;

/// A page request running on its own task, aborted when dropped (a list
/// given up leaves nothing behind).
struct PageFetch(tokio::task::JoinHandle<(PageResult, i64)>);

impl PageFetch {
    /// Starts fetching the page at `key`; `limit` as in [`list_page`].
    fn start(client: &Client, key: Vec<u8>, end: &str, revision: i64, limit: i64) -> PageFetch {
        let mut client = client.clone();
        let end = end.to_owned();
        PageFetch(tokio::spawn(async move {
            let mut limit = limit;
            let r = list_page(&mut client, &key, &end, revision, &mut limit).await;
            (r, limit)
        }))
    }

    /// The page, and the limit to go on with.
    async fn finish(mut self) -> (PageResult, i64) {
        match (&mut self.0).await {
            Ok(r) => r,
            Err(e) => (Err(Err(format!("list: page task: {e}"))), 1),
        }
    }
}

impl Drop for PageFetch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Lists the prefix page by page, every page at the revision of the first,
/// so the result is one consistent snapshot; returns it and its revision.
/// Pages are bounded by count and by size; a record too large for one
/// message is skipped with one line naming its key (and counted). Each
/// page is parsed while etcd serves the next one.
async fn list(
    client: &mut Client,
    prefix: &str,
    metrics: &Registry,
) -> Result<(ClusterState, i64), String> {
    let start = format!("{prefix}/");
    // The end of the prefix range: "<prefix>/" with its last byte + 1.
    let end = format!("{prefix}0");
    let mut state = ClusterState::default();
    // Reported once the whole list is in (a list that fails part-way is
    // retried, and its records would be reported twice).
    let mut errors = Vec::new();
    let mut revision = 0i64;
    let mut limit = LIST_PAGE;
    // The first page on this task: it fixes the revision of the others.
    let mut page = list_page(client, start.as_bytes(), &end, revision, &mut limit).await;
    loop {
        let resp = match page {
            Ok(r) => r,
            Err(Ok(big)) => {
                log::warn!(
                    "etcd key {}: record larger than {MAX_MESSAGE} bytes: skipped",
                    String::from_utf8_lossy(&big)
                );
                metrics.config_error("too_large");
                let mut after = big;
                after.push(0);
                page = list_page(client, &after, &end, revision, &mut limit).await;
                continue;
            }
            Err(Err(e)) => return Err(e),
        };
        if revision == 0 {
            revision = resp
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision);
        }
        // Back towards full pages after a halving.
        limit = (limit * 2).min(LIST_PAGE);
        let next = match resp.kvs().last() {
            Some(last) if resp.more() => {
                let mut after = last.key().to_vec();
                after.push(0);
                Some(PageFetch::start(client, after, &end, revision, limit))
            }
            _ => None,
        };
        for kv in resp.kvs() {
            if let Err(e) = state.apply_put(prefix, kv.key(), kv.value()) {
                errors.push(e);
            }
        }
        drop(resp);
        match next {
            Some(fetch) => (page, limit) = fetch.finish().await,
            None => break,
        }
    }
    report(&errors, metrics);
    Ok((state, revision))
}

/// Follows the prefix from `*revision + 1`, sending each response's
/// events.
async fn follow(
    client: &mut Client,
    prefix: &str,
    revision: &mut i64,
    tx: &mpsc::Sender<Update>,
) -> WatchEnd {
    // Fragmented: a response over the server's limit comes in parts, each
    // under `MAX_MESSAGE`.
    let opts = WatchOptions::new()
        .with_prefix()
        .with_fragment()
        .with_start_revision(*revision + 1);
    let mut watcher = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
    let mut stream = match tokio::time::timeout(
        REQUEST_TIMEOUT,
        watcher.watch(format!("{prefix}/"), Some(opts)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return WatchEnd::Broken(format!("watch: {}", error_chain(&e))),
        Err(_) => return WatchEnd::Broken("watch: timed out".into()),
    };
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return WatchEnd::Broken("watch stream closed".into()),
            Err(e) => return WatchEnd::Broken(format!("watch: {}", error_chain(&e))),
        };
        let observed = Instant::now();
        if resp.compact_revision() > 0 {
            log::warn!(
                "etcd: revision {} was compacted (oldest kept {}): listing again",
                *revision + 1,
                resp.compact_revision()
            );
            return WatchEnd::Compacted;
        }
        if resp.canceled() {
            return WatchEnd::Broken(format!("watch canceled: {}", resp.cancel_reason()));
        }
        *revision = resume_after(
            *revision,
            resp.created(),
            resp.events()
                .iter()
                .filter_map(|ev| ev.kv().map(etcd_client::KeyValue::mod_revision)),
            resp.header().map(etcd_client::ResponseHeader::revision),
        );
        let events: Vec<Event> = resp
            .events()
            .iter()
            .filter_map(|ev| {
                let kv = ev.kv()?;
                Some(match ev.event_type() {
                    EventType::Put => Event::Put {
                        key: kv.key().to_vec(),
                        value: kv.value().to_vec(),
                    },
                    EventType::Delete => Event::Delete {
                        key: kv.key().to_vec(),
                    },
                })
            })
            .collect();
        if events.is_empty() {
            continue;
        }
        let update = Update::Events {
            events,
            revision: *revision,
            observed,
        };
        if tx.send(update).await.is_err() {
            // The daemon is gone.
            return WatchEnd::Closed;
        }
    }
}

/// The revision a watch resumes after, once a response is applied: the
/// newest event's. A progress notification (no events) says every event
/// up to its header revision was sent; the created response does not:
/// its header is the store's revision, and the backlog from the start
/// revision still follows, so resuming from it after a break would skip
/// that backlog.
fn resume_after(
    current: i64,
    created: bool,
    event_revisions: impl Iterator<Item = i64>,
    header: Option<i64>,
) -> i64 {
    let mut r = current;
    let mut events = false;
    for e in event_revisions {
        r = r.max(e);
        events = true;
    }
    match header {
        Some(h) if !events && !created => r.max(h),
        _ => r,
    }
}

/// Runs the source until the task is dropped. The first snapshot is sent
/// after the first successful list; until then the receiver holds the
/// initial empty snapshot with revision 0 (the daemon waits for it rather
/// than wipe state it adopted).
pub async fn run_source(opts: EtcdOptions, tx: mpsc::Sender<Update>, metrics: Arc<Registry>) {
    let prefix = opts.prefix.clone();
    let mut revision = 0i64;
    let mut need_list = true;
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut client = match connect(&opts).await {
            Ok(c) => c,
            Err(e) => {
                log::warn!(
                    "{e}; retrying in {} ms (data plane unchanged)",
                    backoff.as_millis()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        loop {
            if need_list {
                match list(&mut client, &prefix, &metrics).await {
                    Ok((state, rev)) => {
                        let observed = Instant::now();
                        revision = rev;
                        need_list = false;
                        log::info!(
                            "etcd: listed {} services, {} tasks at revision {rev}",
                            state.service_count(),
                            state.task_count()
                        );
                        let listed = Update::Listed(Snapshot::listed(state, revision, observed));
                        if tx.send(listed).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        log::warn!("etcd: {e}; reconnecting");
                        break;
                    }
                }
            }
            backoff = BACKOFF_MIN;
            match follow(&mut client, &prefix, &mut revision, &tx).await {
                WatchEnd::Closed => return,
                WatchEnd::Compacted => need_list = true,
                WatchEnd::Broken(e) => {
                    log::warn!(
                        "etcd: {e}; reconnecting from revision {} (data plane unchanged)",
                        revision + 1
                    );
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Keeps `nodes/<node>` alive under a lease of `NODE_TTL_SECS`, re-creating
/// lease and key whenever etcd comes back. The lease in force is published
/// on `lease` (`None` while there is none), so the node's Docker
/// registrations hang on the very same lease.
pub async fn keep_node(
    opts: EtcdOptions,
    node: String,
    record: layout::NodeRecord,
    lease: watch::Sender<Option<i64>>,
) {
    let key = layout::node_key(&opts.prefix, &node);
    let value = match serde_json::to_vec(&record) {
        Ok(v) => v,
        Err(e) => {
            log::error!("etcd {key}: cannot encode node record: {e}");
            return;
        }
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        if let Err(e) = hold_lease(&opts, &key, &value, &lease).await {
            log::warn!("etcd {key}: {e}; retrying");
        }
        lease.send_replace(None);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn hold_lease(
    opts: &EtcdOptions,
    key: &str,
    value: &[u8],
    published: &watch::Sender<Option<i64>>,
) -> Result<(), String> {
    let mut client = connect(opts).await.map_err(|e| e.to_string())?;
    let t = |what: &str| format!("{what}: timed out");
    let lease = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_grant(NODE_TTL_SECS, None))
        .await
        .map_err(|_| t("lease grant"))?
        .map_err(|e| format!("lease grant: {}", error_chain(&e)))?
        .id();
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.put(key, value, Some(PutOptions::new().with_lease(lease))),
    )
    .await
    .map_err(|_| t("put"))?
    .map_err(|e| format!("put: {}", error_chain(&e)))?;
    log::info!("etcd {key}: registered under lease {lease:x} (ttl {NODE_TTL_SECS} s)");
    published.send_replace(Some(lease));
    let (mut keeper, mut responses) =
        tokio::time::timeout(REQUEST_TIMEOUT, client.lease_keep_alive(lease))
            .await
            .map_err(|_| t("keep-alive"))?
            .map_err(|e| format!("keep-alive: {}", error_chain(&e)))?;
    let mut tick = tokio::time::interval(Duration::from_secs((NODE_TTL_SECS / 3).max(1) as u64));
    loop {
        tick.tick().await;
        keeper
            .keep_alive()
            .await
            .map_err(|e| format!("keep-alive: {}", error_chain(&e)))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, responses.message()).await {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {}
            Ok(Ok(Some(_))) => return Err("lease expired".into()),
            Ok(Ok(None)) => return Err("keep-alive stream closed".into()),
            Ok(Err(e)) => return Err(format!("keep-alive: {}", error_chain(&e))),
            Err(_) => return Err("keep-alive: timed out".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resume_revision_follows_events_and_progress_never_the_created_header() {
        let none = std::iter::empty;
        // Created at store revision 90 while we asked from 51: the backlog
        // 51..=90 is still to come.
        assert_eq!(resume_after(50, true, none(), Some(90)), 50);
        // The backlog's events.
        assert_eq!(
            resume_after(50, false, [51, 52, 60].into_iter(), Some(90)),
            60
        );
        // A progress notification: everything up to 90 was sent.
        assert_eq!(resume_after(60, false, none(), Some(90)), 90);
        // Never backwards.
        assert_eq!(resume_after(95, false, [93].into_iter(), Some(96)), 95);
        assert_eq!(resume_after(95, false, none(), None), 95);
    }
}
