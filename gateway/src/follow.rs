//! Keeps the index equal to `<prefix>/` in etcd: a paginated list at one revision,
//! then a watch from the next; a full re-list when the watch is compacted away or
//! breaks. Checks read the index and never wait on etcd. While etcd does not confirm
//! the index (no watch progress from a member with a leader, or this replica's report
//! lease not renewed) its staleness grows; past `--max-staleness` the replica refuses
//! checks (`--stale-mode=fail`, the default) or keeps serving the snapshot and says so
//! in its report (`serve`, which voids `GatewaySynced`).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::index::{Applied, Change, Index};
use crate::metrics::{CauseLabels, KindLabels, Metrics};

/// Keys per list page.
const PAGE: i64 = 1000;
/// How often the watch asks etcd to confirm it is current.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A watch without any answer for this long is treated as broken.
const SILENCE_LIMIT: Duration = Duration::from_secs(5);
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A watch that ran this long was healthy: the next failure re-lists after
/// `RETRY_MIN` again. Before that, the backoff keeps growing, so a watch that keeps
/// breaking (or keeps being compacted away) cannot make the replica re-list in a loop.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// The delay before each re-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: RETRY_MIN }
    }
}

impl Backoff {
    /// A watch ended after running for `lasted`: only a healthy one resets the backoff.
    pub fn watch_ended(&mut self, lasted: Duration) {
        if lasted >= HEALTHY_AFTER {
            self.next = RETRY_MIN;
        }
    }

    /// The delay before the next attempt; each one doubles it, up to `RETRY_MAX`.
    pub fn delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(RETRY_MAX);
        delay
    }
}

/// The index and what is known about its freshness, shared by checks and the follower.
/// A re-list swaps the whole index in atomically ([`ArcSwap`]): a check never waits
/// for it, and the old index is freed off the check path ([`retire`]). Watch events
/// take the inner write lock only to store entries already parsed.
pub struct IndexState {
    index: ArcSwap<RwLock<Index>>,
    loaded: AtomicBool,
    /// Milliseconds since `start` when etcd last confirmed the index.
    confirmed_ms: AtomicU64,
    /// Milliseconds since `start` (plus one; 0: never) when a request that renewed this
    /// replica's report lease was sent.
    report_renewed_ms: AtomicU64,
    revision: AtomicI64,
    start: Instant,
    /// The revision applied from the platform config (not other replicas' reports).
    applied: watch::Sender<i64>,
}

impl Default for IndexState {
    fn default() -> Self {
        Self {
            index: ArcSwap::from_pointee(RwLock::default()),
            loaded: AtomicBool::new(false),
            confirmed_ms: AtomicU64::new(0),
            report_renewed_ms: AtomicU64::new(0),
            revision: AtomicI64::new(0),
            start: Instant::now(),
            applied: watch::Sender::new(0),
        }
    }
}

impl IndexState {
    /// Runs `f` on the current index (a poisoned lock still holds a consistent index:
    /// every write stores whole entries).
    pub fn read<R>(&self, f: impl FnOnce(&Index) -> R) -> R {
        let current = self.index.load();
        let index = current.read().unwrap_or_else(|e| e.into_inner());
        f(&index)
    }

    fn write<R>(&self, f: impl FnOnce(&mut Index) -> R) -> R {
        let current = self.index.load();
        let mut index = current.write().unwrap_or_else(|e| e.into_inner());
        f(&mut index)
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

    /// Time since etcd last vouched for this replica as a whole: the older of the
    /// index's confirmation and the renewal of its report lease (`None` before the
    /// first list). The operator stops counting a replica only a bound after its
    /// report's lease expired, so a replica must stop serving within that bound of its
    /// last renewal too, even if its watch still answered after it.
    pub fn unconfirmed_for(&self) -> Option<Duration> {
        let index = self.staleness()?;
        let renewed = self.report_renewed_ms.load(Ordering::Acquire);
        let report = match renewed.checked_sub(1) {
            Some(ms) => self
                .start
                .elapsed()
                .saturating_sub(Duration::from_millis(ms)),
            // Not registered yet: the operator does not count this replica.
            None => self.start.elapsed(),
        };
        Some(index.max(report))
    }

    /// The report lease was renewed by a request sent at `sent`.
    pub fn report_renewed(&self, sent: Instant) {
        let ms = sent.saturating_duration_since(self.start).as_millis() as u64 + 1;
        self.report_renewed_ms.fetch_max(ms, Ordering::AcqRel);
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

    /// Installs a freshly listed index at `revision`; returns the old one, for
    /// [`retire`] (dropping it here could free hundreds of MB on the caller's thread).
    #[must_use = "the old index: retire it off the check path"]
    pub fn replace(&self, index: Index, revision: i64) -> Arc<RwLock<Index>> {
        let old = self.index.swap(Arc::new(RwLock::new(index)));
        // A re-list may be older than what watch events applied before it broke
        // (never newer than etcd): it is the truth at `revision`.
        self.revision.store(revision, Ordering::Release);
        self.applied.send_replace(revision);
        self.loaded.store(true, Ordering::Release);
        self.confirm();
        old
    }
}

/// Frees a replaced index once no check holds it any more, on a blocking thread: a
/// check never pays for it, and neither does the follower's runtime thread.
pub fn retire(old: Arc<RwLock<Index>>) {
    tokio::spawn(async move {
        // Checks hold the index for microseconds; this waits them out.
        while Arc::strong_count(&old) > 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
    });
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
    let mut backoff = Backoff::default();
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
                retire(state.replace(index, revision));
                metrics.index_revision.set(revision);
                tracing::info!(revision, "platform config listed; watching");
                let started = Instant::now();
                let ended = watch(&client, &dir, revision, &state, &metrics, &shutdown).await;
                backoff.watch_ended(started.elapsed());
                match ended {
                    Ended::Shutdown => return,
                    Ended::Compacted => {
                        tracing::warn!("watch revision compacted; re-listing");
                        cause = "compacted";
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
            _ = tokio::time::sleep(backoff.delay()) => {}
        }
    }
}

/// Lists everything under `dir` page by page at one revision. Each page is parsed on
/// a blocking thread: a re-list of a million keys never holds a runtime thread that
/// checks need.
async fn list(
    client: &Client,
    dir: &str,
    metrics: &Arc<Metrics>,
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
        let mut resp = kv.get(from.clone(), Some(options)).await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        let more = resp.more();
        let page = resp.take_kvs();
        let next = page.last().map(|last| {
            let mut next = last.key().to_vec();
            next.push(0);
            next
        });
        let (dir_owned, metrics_owned) = (dir.to_owned(), metrics.clone());
        index = tokio::task::spawn_blocking(move || {
            for item in &page {
                apply(
                    &mut index,
                    &dir_owned,
                    item.key(),
                    Some(item.value()),
                    &metrics_owned,
                );
            }
            index
        })
        .await
        .map_err(|e| etcd_client::Error::Internal(format!("parsing a list page: {e}")))?;
        match next {
            Some(next) if more => from = next,
            _ => return Ok((index, revision)),
        }
    }
}

/// A change under `dir`, parsed (no lock held), with its key relative to `dir`.
fn parse<'k>(dir: &str, key: &'k [u8], value: Option<&[u8]>) -> Option<(&'k str, Change)> {
    let relative = std::str::from_utf8(key).ok()?.strip_prefix(dir)?;
    Some((relative, Change::parse(relative, value)))
}

/// Counts and logs an unreadable value; true when the change concerned the platform
/// config (not a replica report).
fn note(relative: &str, applied: Applied, gateway: bool, metrics: &Metrics) -> bool {
    match applied {
        Applied::Invalid => {
            metrics.index_invalid_values.inc();
            tracing::warn!(
                key = relative,
                "unreadable value in the platform config; treated as absent (a quota: its customer is refused)"
            );
            true
        }
        Applied::Changed => true,
        Applied::Ignored => !gateway,
    }
}

/// Applies one change to an index being built; true when it concerned the platform config.
fn apply(
    index: &mut Index,
    dir: &str,
    key: &[u8],
    value: Option<&[u8]>,
    metrics: &Metrics,
) -> bool {
    let Some((relative, change)) = parse(dir, key, value) else {
        return false;
    };
    let gateway = matches!(change, Change::Gateway);
    note(relative, index.store(change), gateway, metrics)
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
            // Parsed before the lock; the lock only stores entries.
            let changes: Vec<_> = response
                .events()
                .iter()
                .filter_map(|event| {
                    let kv = event.kv()?;
                    let value = (event.event_type() == EventType::Put).then(|| kv.value());
                    let (relative, change) = parse(dir, kv.key(), value)?;
                    let gateway = matches!(change, Change::Gateway);
                    Some((relative, change, gateway, kv.mod_revision()))
                })
                .collect();
            let mut stored = Vec::with_capacity(changes.len());
            state.write(|index| {
                for (relative, change, gateway, revision) in changes {
                    stored.push((relative, index.store(change), gateway, revision));
                }
                publish_sizes(index, metrics);
            });
            for (relative, result, gateway, revision) in stored {
                if note(relative, result, gateway, metrics) {
                    applied = applied.max(revision);
                }
            }
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
        let old = state.replace(Index::default(), 7);
        assert_eq!(Arc::strong_count(&old), 1, "the old index is handed back");
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

    #[test]
    fn a_replica_is_unconfirmed_since_the_older_of_its_index_and_its_report_lease() {
        let state = IndexState::default();
        assert_eq!(state.unconfirmed_for(), None, "nothing loaded");
        std::thread::sleep(Duration::from_millis(30));
        drop(state.replace(Index::default(), 3));
        // Listed but not registered: unconfirmed since start.
        assert!(
            state
                .unconfirmed_for()
                .is_some_and(|d| d >= Duration::from_millis(30))
        );
        state.report_renewed(Instant::now());
        assert!(
            state
                .unconfirmed_for()
                .is_some_and(|d| d < Duration::from_millis(30))
        );
        // An older renewal never moves it back.
        state.report_renewed(state.start);
        assert!(
            state
                .unconfirmed_for()
                .is_some_and(|d| d < Duration::from_millis(30))
        );
    }

    #[test]
    fn a_replace_waits_for_no_check_and_no_check_waits_for_it() {
        use std::sync::mpsc;
        let state = Arc::new(IndexState::default());
        drop(state.replace(Index::default(), 1));
        // A check holds the index...
        let (held_tx, held) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let reader = {
            let state = state.clone();
            std::thread::spawn(move || {
                state.read(|_| {
                    held_tx.send(()).expect("held");
                    release_rx.recv().ok();
                })
            })
        };
        held.recv().expect("a check holds the index");
        // ... while a re-list swaps in a new one: the swap does not wait for it.
        let mut fresh = Index::default();
        fresh.apply("customers/c", Some(br#"{"status":"active"}"#));
        let (done_tx, done) = mpsc::channel();
        let writer = {
            let state = state.clone();
            std::thread::spawn(move || done_tx.send(state.replace(fresh, 2)).ok())
        };
        let old = done
            .recv_timeout(Duration::from_secs(5))
            .expect("the swap waited for a check");
        // New checks read the new index at once; the old one lives on for the check
        // that holds it, and is freed by whoever drops it last (`retire`: not a check).
        assert_eq!(state.read(|i| i.sizes().1), 1);
        assert_eq!(
            Arc::strong_count(&old),
            2,
            "the check still holds the old index"
        );
        release.send(()).expect("release");
        reader.join().expect("reader");
        writer.join().expect("writer");
        assert_eq!(Arc::strong_count(&old), 1);
    }

    #[test]
    fn the_backoff_resets_only_after_a_healthy_watch() {
        let mut backoff = Backoff::default();
        // A watch that keeps breaking at once: 200 ms, 400 ms, ... up to 5 s.
        let mut delays = Vec::new();
        for _ in 0..7 {
            backoff.watch_ended(Duration::from_millis(50));
            delays.push(backoff.delay().as_millis());
        }
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 5000, 5000]);
        backoff.watch_ended(HEALTHY_AFTER - Duration::from_millis(1));
        assert_eq!(backoff.delay(), RETRY_MAX, "not healthy for long enough");
        backoff.watch_ended(HEALTHY_AFTER);
        assert_eq!(backoff.delay(), RETRY_MIN);
    }
}
