//! Keeps the index equal to `<prefix>/` in etcd: a paginated list at one revision,
//! then a watch from the next; a full re-list when the watch is compacted away or
//! breaks. Checks read the index and never wait on etcd: while etcd is unreachable the
//! last snapshot keeps serving and its staleness is reported.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::entries::{self, Slot};
use crate::index::{Applied, Index};
use crate::metrics::{CauseLabels, KindLabels, Metrics};

/// Keys per list page.
const PAGE: i64 = 1000;
/// How often the watch asks etcd to confirm it is current.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A watch without any answer for this long is treated as broken.
const SILENCE_LIMIT: Duration = Duration::from_secs(5);
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The index and what is known about its freshness, shared by checks and the follower.
pub struct IndexState {
    index: RwLock<Index>,
    loaded: AtomicBool,
    /// Milliseconds since `start` when etcd last confirmed the index.
    confirmed_ms: AtomicU64,
    revision: AtomicI64,
    start: Instant,
    /// The revision applied from the platform config (not other replicas' reports).
    applied: watch::Sender<i64>,
}

impl Default for IndexState {
    fn default() -> Self {
        Self {
            index: RwLock::default(),
            loaded: AtomicBool::new(false),
            confirmed_ms: AtomicU64::new(0),
            revision: AtomicI64::new(0),
            start: Instant::now(),
            applied: watch::Sender::new(0),
        }
    }
}

impl IndexState {
    /// The index for reading (a poisoned lock still holds a consistent index: every
    /// write replaces or applies whole entries).
    pub fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Applied etcd revision.
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Time since etcd last confirmed the index (`None` before the first list).
    pub fn staleness(&self) -> Option<Duration> {
        self.loaded().then(|| {
            let confirmed = Duration::from_millis(self.confirmed_ms.load(Ordering::Acquire));
            self.start.elapsed().saturating_sub(confirmed)
        })
    }

    /// Follows the revision applied from the platform config.
    pub fn applied(&self) -> watch::Receiver<i64> {
        self.applied.subscribe()
    }

    fn confirm(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.confirmed_ms.store(ms, Ordering::Release);
    }

    fn advance(&self, revision: i64) {
        self.revision.fetch_max(revision, Ordering::AcqRel);
        self.applied.send_if_modified(|r| {
            let newer = revision > *r;
            if newer {
                *r = revision;
            }
            newer
        });
    }

    /// Installs a freshly listed index at `revision`.
    pub fn replace(&self, index: Index, revision: i64) {
        *self.index.write().unwrap_or_else(|e| e.into_inner()) = index;
        // A re-list may be older than what watch events applied before it broke
        // (never newer than etcd): it is the truth at `revision`.
        self.revision.store(revision, Ordering::Release);
        self.applied.send_replace(revision);
        self.loaded.store(true, Ordering::Release);
        self.confirm();
    }
}

/// Why a watch ended.
#[derive(Debug)]
enum Ended {
    Compacted,
    Broken(String),
    Shutdown,
}

/// Follows `prefix` (no trailing slash) into `state` until `shutdown`.
pub async fn run(
    client: Client,
    prefix: String,
    state: Arc<IndexState>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let dir = format!("{prefix}/");
    let mut retry = RETRY_MIN;
    let mut cause = "start";
    while !shutdown.is_cancelled() {
        let listed = list(&client, &dir, &metrics).await;
        match listed {
            Ok((index, revision)) => {
                metrics
                    .index_relists
                    .get_or_create(&CauseLabels { cause })
                    .inc();
                publish_sizes(&index, &metrics);
                state.replace(index, revision);
                metrics.index_revision.set(revision);
                tracing::info!(revision, "platform config listed; watching");
                retry = RETRY_MIN;
                match watch(&client, &dir, revision, &state, &metrics, &shutdown).await {
                    Ended::Shutdown => return,
                    Ended::Compacted => {
                        tracing::warn!("watch revision compacted; re-listing");
                        cause = "compacted";
                        continue;
                    }
                    Ended::Broken(err) => {
                        tracing::warn!(%err, "etcd watch broken; serving the last snapshot and re-listing");
                        cause = "reconnect";
                    }
                }
            }
            Err(err) => {
                tracing::warn!(%err, "cannot list the platform config from etcd; serving the last snapshot")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// Lists everything under `dir` page by page at one revision.
async fn list(
    client: &Client,
    dir: &str,
    metrics: &Metrics,
) -> Result<(Index, i64), etcd_client::Error> {
    let mut kv = client.kv_client();
    let end = m3o_connect::etcd::prefix_range_end(dir.as_bytes());
    let mut index = Index::default();
    let mut from = dir.as_bytes().to_vec();
    let mut revision = 0;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let resp = kv.get(from.clone(), Some(options)).await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        for item in resp.kvs() {
            apply(&mut index, dir, item.key(), Some(item.value()), metrics);
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((index, revision)),
        }
    }
}

/// Applies one change; true when it concerned the platform config (not a replica report).
fn apply(
    index: &mut Index,
    dir: &str,
    key: &[u8],
    value: Option<&[u8]>,
    metrics: &Metrics,
) -> bool {
    let Some(relative) = std::str::from_utf8(key)
        .ok()
        .and_then(|k| k.strip_prefix(dir))
    else {
        return false;
    };
    match index.apply(relative, value) {
        Applied::Invalid => {
            metrics.index_invalid_values.inc();
            tracing::warn!(
                key = relative,
                "unreadable value in the platform config; treated as absent"
            );
            true
        }
        Applied::Changed => true,
        Applied::Ignored => entries::slot(relative) != Slot::Gateway,
    }
}

fn publish_sizes(index: &Index, metrics: &Metrics) {
    let (keys, customers, quotas) = index.sizes();
    for (kind, n) in [
        ("apikeys", keys),
        ("customers", customers),
        ("quotas", quotas),
    ] {
        metrics
            .index_entries
            .get_or_create(&KindLabels { kind })
            .set(n as i64);
    }
}

/// Applies watch events after `revision` until the watch ends.
async fn watch(
    client: &Client,
    dir: &str,
    revision: i64,
    state: &IndexState,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Ended {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1)
        .with_progress_notify();
    let mut stream = match client.watch_client().watch(dir, Some(options)).await {
        Ok(stream) => stream,
        Err(e) => return Ended::Broken(e.to_string()),
    };
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    let mut last_answer = Instant::now();
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ended::Shutdown,
            _ = progress.tick() => {
                if last_answer.elapsed() > SILENCE_LIMIT {
                    return Ended::Broken(format!("no answer from etcd for {SILENCE_LIMIT:?}"));
                }
                if let Err(e) = stream.request_progress().await {
                    return Ended::Broken(e.to_string());
                }
                continue;
            }
            message = stream.message() => message,
        };
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => return Ended::Broken("watch stream closed".into()),
            Err(e) => return Ended::Broken(e.to_string()),
        };
        last_answer = Instant::now();
        if response.compact_revision() > 0 {
            return Ended::Compacted;
        }
        if response.canceled() {
            return Ended::Broken(format!("watch canceled: {}", response.cancel_reason()));
        }
        let mut applied = 0;
        if !response.events().is_empty() {
            let mut index = state.index.write().unwrap_or_else(|e| e.into_inner());
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let value = (event.event_type() == EventType::Put).then(|| kv.value());
                if apply(&mut index, dir, kv.key(), value, metrics) {
                    applied = applied.max(kv.mod_revision());
                }
            }
            publish_sizes(&index, metrics);
        }
        state.confirm();
        if applied > 0 {
            state.advance(applied);
            metrics.index_revision.set(state.revision());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replace_is_loaded_and_confirmed() {
        let state = IndexState::default();
        assert_eq!(state.staleness(), None);
        state.replace(Index::default(), 7);
        assert!(state.loaded());
        assert_eq!(*state.applied().borrow(), 7);
        state.advance(5);
        assert_eq!(
            state.revision(),
            7,
            "revisions only move forward between lists"
        );
        assert!(
            state
                .staleness()
                .is_some_and(|s| s < Duration::from_secs(1))
        );
    }
}
