//! The usage rollup's I/O: paged `SCAN` of the days' usage hashes, `HGETALL` per page
//! (one pipeline), one Postgres transaction per page of counters (the upsert, the
//! thresholds reached and their outbox events), then the closed days' confirmation
//! (`EXPIRE .. LT`). Work is O(hashes with usage on the days read), never the fleet.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use kube::runtime::events::EventType as K8sEventType;
use kube::runtime::reflector::ObjectRef;
use m3o_crds::Subscription;
use m3o_events::customers;
use m3o_events::outbox::{self, OutboxMessage};
use m3o_platform_contract::usage as contract;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::plan::{self, Counter};
use crate::Context;
use crate::pipeline::outbox_events;
use crate::platform::entry::owner_ref;
use crate::runtime::failpoint;
use crate::store::customers as customer_rows;

/// The failpoint that aborts the process right after the first page's commit (a
/// rollup killed midway: the crash-safety test).
pub const PAGE_COMMITTED_FAILPOINT: &str = "usage-rollup-page-committed";

/// A failed rollup: which backend.
#[derive(Debug, thiserror::Error)]
pub enum RollupError {
    #[error("usage Redis (--usage-redis-url): {0}")]
    Redis(#[from] redis::RedisError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A shard rolls up only its own customers, which its Customer cache names: without
    /// it the rollup would skip every counter and still close the day.
    #[error("the Customer cache has not listed yet (a shard rolls up only its own customers)")]
    CustomersUnlisted,
}

/// How the rollup reads the gateways' counters.
#[derive(Clone, Debug)]
pub struct RollupSettings {
    /// `--usage-redis-prefix`: the gateways' `--redis-prefix`.
    pub prefix: String,
    /// `--usage-interval`.
    pub interval: Duration,
    /// Counters per Postgres transaction (`--usage-page-size`).
    pub page_rows: usize,
    /// `SCAN ... COUNT` hint.
    pub scan_count: usize,
    /// `--usage-status-interval`.
    pub status_interval: Duration,
}

/// A threshold reached in this rollup (its event is committed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reached {
    pub customer_id: Uuid,
    pub percent: u8,
    pub period: String,
    pub requests: i64,
    pub monthly: i64,
    /// The Subscription (namespace, name, uid) for its Kubernetes Event.
    pub subscription: (String, String, String),
}

/// What one rollup did.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub hashes: usize,
    pub counters: usize,
    pub rows_written: u64,
    pub skipped: usize,
    pub confirmed: usize,
    pub reached: Vec<Reached>,
    /// Subscription reconciles asked for, to write status.usage.
    pub status_triggers: usize,
}

/// The rollup of one operator (the writer).
pub struct Rollup {
    ctx: Arc<Context>,
    redis: redis::aio::ConnectionManager,
    settings: RollupSettings,
}

/// Where "now" comes from: the wall clock, or a test's (`M3O_TEST_CLOCK_FILE`, an RFC
/// 3339 time in a file, read at every rollup, like the failpoints never set in
/// production) so a test crosses into a new period without waiting for one.
pub fn now() -> DateTime<Utc> {
    std::env::var_os("M3O_TEST_CLOCK_FILE")
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|s| DateTime::parse_from_rfc3339(s.trim()).ok())
        .map_or_else(Utc::now, |t| t.to_utc())
}

impl Rollup {
    pub fn new(
        ctx: Arc<Context>,
        redis: redis::aio::ConnectionManager,
        settings: RollupSettings,
    ) -> Self {
        Self {
            ctx,
            redis,
            settings,
        }
    }

    /// Rolls up every `--usage-interval` until `stop`, keeping the lag metric current
    /// (every few seconds, also while a rollup hangs on a backend).
    pub async fn run(self, stop: CancellationToken) {
        let started = std::time::Instant::now();
        // Milliseconds from `started` to the start of the last completed rollup.
        let last_done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let lag = {
            let (metrics, last_done, stop) =
                (self.ctx.metrics.clone(), last_done.clone(), stop.clone());
            async move {
                let mut every = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = every.tick() => {}
                    }
                    let done =
                        Duration::from_millis(last_done.load(std::sync::atomic::Ordering::Relaxed));
                    let lag = started.elapsed().saturating_sub(done);
                    metrics.usage_rollup_lag.set(lag.as_secs_f64());
                }
            }
        };
        let rollups = async {
            let mut ticks = tokio::time::interval(self.settings.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let begun = std::time::Instant::now();
                match self.run_once(now()).await {
                    Ok(summary) => {
                        let at = begun.duration_since(started).as_millis();
                        last_done.store(
                            u64::try_from(at).unwrap_or(u64::MAX),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        tracing::debug!(
                            hashes = summary.hashes,
                            counters = summary.counters,
                            rows_written = summary.rows_written,
                            confirmed = summary.confirmed,
                            status_triggers = summary.status_triggers,
                            took = ?begun.elapsed(),
                            "usage rolled up"
                        );
                    }
                    Err(err) => {
                        self.ctx.metrics.usage_rollups_failed.inc();
                        tracing::warn!(%err, "usage rollup failed; retrying at the next interval");
                    }
                }
            }
        };
        tokio::join!(lag, rollups);
    }

    /// One rollup of the days [`plan::days_to_roll`] at `now`.
    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<Summary, RollupError> {
        let mut summary = Summary::default();
        let period = plan::period_of(now.date_naive());
        let mut budget = plan::status_budget(self.settings.interval);
        let interval = self.settings.status_interval;
        summary.status_triggers += self
            .ctx
            .usage
            .new_period(&period, now, interval, &mut budget);
        let fence = self.ctx.term.name().to_owned();
        let confirmed: Option<NaiveDate> =
            sqlx::query_scalar("SELECT confirmed_through FROM usage_watermark WHERE fence = $1")
                .bind(&fence)
                .fetch_optional(&self.ctx.db)
                .await?;
        let days = plan::days_to_roll(now, confirmed);
        // Shards of a fleet share the gateways' Redis: each rolls up its own customers
        // only, so no counter has two writers (see `upsert`).
        let mine = match &self.ctx.settings.shard {
            Some(_) => Some(
                self.ctx
                    .customer_ids()
                    .await
                    .ok_or(RollupError::CustomersUnlisted)?,
            ),
            None => None,
        };
        for day in &days {
            self.roll_day(*day, now, &mut summary, &mut budget, mine.as_ref())
                .await?;
        }
        if let Some(closed) = plan::newest_closed(&days, now) {
            let mut tx = self.ctx.begin_write().await?;
            sqlx::query(
                "INSERT INTO usage_watermark (fence, confirmed_through) VALUES ($1, $2) \
                 ON CONFLICT (fence) DO UPDATE SET confirmed_through = \
                   GREATEST(usage_watermark.confirmed_through, EXCLUDED.confirmed_through)",
            )
            .bind(&fence)
            .bind(closed)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        self.ctx
            .metrics
            .usage_rows_written
            .inc_by(summary.rows_written);
        self.ctx
            .metrics
            .usage_threshold_events
            .inc_by(summary.reached.len() as u64);
        Ok(summary)
    }

    async fn roll_day(
        &self,
        day: NaiveDate,
        now: DateTime<Utc>,
        summary: &mut Summary,
        budget: &mut u64,
        mine: Option<&std::collections::HashSet<Uuid>>,
    ) -> Result<(), RollupError> {
        let prefix = &self.settings.prefix;
        let pattern = contract::usage_day_pattern(prefix, &day.format("%Y-%m-%d").to_string());
        let confirm = plan::closed(day, now);
        let mut conn = self.redis.clone();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(self.settings.scan_count)
                .query_async(&mut conn)
                .await?;
            // SCAN may return a key twice; once is enough. Another shard's are not ours.
            let ours = |key: &String| {
                mine.is_none_or(|ids| {
                    contract::parse_usage_key(prefix, key)
                        .and_then(|(c, _)| Uuid::parse_str(c).ok())
                        .is_some_and(|c| ids.contains(&c))
                })
            };
            let keys: Vec<String> = keys
                .into_iter()
                .filter(ours)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.hgetall(key);
                }
                let hashes: Vec<BTreeMap<String, String>> = pipe.query_async(&mut conn).await?;
                let mut counters = Vec::new();
                for (key, fields) in keys.iter().zip(hashes) {
                    let fields = fields
                        .into_iter()
                        .map(|(f, v)| (f, v.parse::<i64>().unwrap_or(-1)));
                    let (mut found, skipped) = plan::counters_of(prefix, key, fields);
                    summary.skipped += skipped;
                    counters.append(&mut found);
                }
                summary.hashes += keys.len();
                summary.counters += counters.len();
                for page in counters.chunks(self.settings.page_rows.max(1)) {
                    let (written, mut reached, usage) = self.commit_page(page, day).await?;
                    // At once: the threshold row now exists, so a rerun after a later
                    // failure would find nothing to announce.
                    self.announce(&reached).await;
                    summary.rows_written += written;
                    summary.reached.append(&mut reached);
                    summary.status_triggers += self.show(usage, day, now, budget);
                    failpoint::hit(PAGE_COMMITTED_FAILPOINT);
                }
                // Committed: a closed day's counters may now go (after a little longer).
                if confirm {
                    let mut pipe = redis::pipe();
                    for key in &keys {
                        pipe.cmd("EXPIRE")
                            .arg(key)
                            .arg(contract::CONFIRMED_RETENTION_SECS)
                            .arg("LT")
                            .ignore();
                    }
                    pipe.query_async::<()>(&mut conn).await?;
                    summary.confirmed += keys.len();
                }
            }
            cursor = next;
            if cursor == 0 {
                return Ok(());
            }
        }
    }

    /// One page of counters of `day` in one transaction: the upsert, then the
    /// thresholds its customers reached, each with its event.
    async fn commit_page(
        &self,
        page: &[Counter],
        day: NaiveDate,
    ) -> Result<(u64, Vec<Reached>, Vec<PeriodUsage>), RollupError> {
        let mut tx = self.ctx.begin_write().await?;
        let written = upsert(&mut tx, page).await?;
        let customers: Vec<Uuid> = page
            .iter()
            .map(|c| c.customer_id)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let period = plan::period_of(day);
        let usage = period_usage(&mut tx, &customers, &period).await?;
        let reached = record_thresholds(&mut tx, &usage, &period).await?;
        tx.commit().await?;
        Ok((written, reached, usage))
    }

    /// Offers the current period's committed usage to status; returns the reconciles
    /// asked for.
    fn show(
        &self,
        usage: Vec<PeriodUsage>,
        day: NaiveDate,
        now: DateTime<Utc>,
        budget: &mut u64,
    ) -> usize {
        let period = plan::period_of(day);
        if period != plan::period_of(now.date_naive()) {
            return 0;
        }
        let mut triggered = 0;
        for u in usage {
            let view = plan::UsageView {
                period: period.clone(),
                requests: u.requests,
                monthly: u.monthly_requests,
            };
            let subscription = ObjectRef::new(&u.k8s_name).within(&u.k8s_namespace);
            let interval = self.settings.status_interval;
            let book = &self.ctx.usage;
            if book.observe(u.customer_id, view, subscription, now, interval, budget) {
                triggered += 1;
            }
        }
        triggered
    }

    /// A Kubernetes Event on each Subscription that reached a threshold.
    async fn announce(&self, reached: &[Reached]) {
        for r in reached {
            let (ns, name, uid) = &r.subscription;
            let object = owner_ref::<Subscription>(ns, name, uid);
            let note = plan::threshold_note(r.percent, &r.period, r.requests, r.monthly);
            let type_ = if r.percent >= 100 {
                K8sEventType::Warning
            } else {
                K8sEventType::Normal
            };
            self.ctx
                .event(&object, type_, "QuotaThresholdReached", "Meter", note)
                .await;
        }
    }
}

/// Upserts counters; returns the rows inserted or changed. Re-reading a counter adds
/// nothing (its delta to `counter` is 0). A hash with another epoch than the one
/// accounted for is a new hash (Redis lost the old one: a flush): its counter is added
/// whole. Under the same epoch a smaller counter is a failover to a lagging replica: it
/// adds nothing and the accounted counter stays. A hash first accounted for without an
/// epoch (written by a gateway older than the epoch) is compared as before: growth, or
/// whole when smaller (see migration 0011).
pub async fn upsert(tx: &mut PgConnection, page: &[Counter]) -> Result<u64, sqlx::Error> {
    let mut page = page.to_vec();
    page.sort();
    page.dedup_by(|a, b| {
        (a.customer_id, a.key_id, &a.api, a.day) == (b.customer_id, b.key_id, &b.api, b.day)
    });
    let (mut customers, mut keys, mut apis, mut days, mut counts, mut epochs) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for c in page {
        epochs.push(c.epoch);
        customers.push(c.customer_id);
        keys.push(c.key_id);
        apis.push(c.api);
        days.push(c.day);
        counts.push(c.requests);
    }
    let done = sqlx::query(
        "INSERT INTO usage_daily AS u (customer_id, key_id, api, day, requests, counter, counter_epoch) \
         SELECT c, k, a, d, n, n, e FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::date[], $5::bigint[], $6::bigint[]) AS t(c, k, a, d, n, e) \
         ON CONFLICT (customer_id, key_id, api, day) DO UPDATE SET \
           requests = u.requests + CASE \
             WHEN u.counter_epoch <> 0 AND EXCLUDED.counter_epoch <> u.counter_epoch THEN EXCLUDED.counter \
             WHEN EXCLUDED.counter >= u.counter THEN EXCLUDED.counter - u.counter \
             WHEN u.counter_epoch <> 0 THEN 0 \
             ELSE EXCLUDED.counter END, \
           counter = CASE WHEN u.counter_epoch <> 0 AND EXCLUDED.counter_epoch = u.counter_epoch \
             THEN GREATEST(u.counter, EXCLUDED.counter) ELSE EXCLUDED.counter END, \
           counter_epoch = EXCLUDED.counter_epoch, updated_at = now() \
         WHERE u.counter <> EXCLUDED.counter OR u.counter_epoch <> EXCLUDED.counter_epoch",
    )
    .bind(customers)
    .bind(keys)
    .bind(apis)
    .bind(days)
    .bind(counts)
    .bind(epochs)
    .execute(tx)
    .await?;
    Ok(done.rows_affected())
}

/// A live subscription of a customer with its usage in a period.
#[derive(sqlx::FromRow, Debug, Clone)]
pub struct PeriodUsage {
    customer_id: Uuid,
    monthly_requests: i64,
    requests: i64,
    k8s_namespace: String,
    k8s_name: String,
    k8s_uid: String,
}

/// `customer`'s requests in `period`, from `usage_daily` (its primary key's prefix).
pub async fn requests_in_period<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    customer: Uuid,
    period: &str,
) -> Result<i64, sqlx::Error> {
    let Some((first, next)) = plan::period_days(period) else {
        return Ok(0);
    };
    sqlx::query_scalar(
        "SELECT COALESCE(sum(requests), 0)::bigint FROM usage_daily \
         WHERE customer_id = $1 AND day >= $2 AND day < $3",
    )
    .bind(customer)
    .bind(first)
    .bind(next)
    .fetch_one(db)
    .await
}

/// The live subscriptions of `customers` with their usage in `period`.
async fn period_usage(
    tx: &mut PgConnection,
    customers: &[Uuid],
    period: &str,
) -> Result<Vec<PeriodUsage>, sqlx::Error> {
    let Some((first, next)) = plan::period_days(period) else {
        return Ok(Vec::new());
    };
    sqlx::query_as(
        "SELECT s.customer_id, s.monthly_requests, s.k8s_namespace, s.k8s_name, s.k8s_uid, \
           (SELECT COALESCE(sum(d.requests), 0)::bigint FROM usage_daily d \
             WHERE d.customer_id = s.customer_id AND d.day >= $2 AND d.day < $3) AS requests \
         FROM subscriptions s WHERE s.customer_id = ANY($1) AND s.cancelled_at IS NULL",
    )
    .bind(customers)
    .bind(first)
    .bind(next)
    .fetch_all(&mut *tx)
    .await
}

/// Records every event threshold reached in `period` that has no row yet, queueing its
/// event in `tx`.
async fn record_thresholds(
    tx: &mut PgConnection,
    usage: &[PeriodUsage],
    period: &str,
) -> Result<Vec<Reached>, sqlx::Error> {
    let mut reached = Vec::new();
    for u in usage {
        for percent in plan::thresholds_reached(u.requests, u.monthly_requests) {
            let inserted = sqlx::query(
                "INSERT INTO usage_thresholds (customer_id, period, percent, requests, monthly_requests) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(u.customer_id)
            .bind(period)
            .bind(i16::from(percent))
            .bind(u.requests)
            .bind(u.monthly_requests)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                continue;
            }
            let row = customer_rows::live_by_id(&mut *tx, u.customer_id).await?;
            let payload = row.as_ref().map_or_else(
                || customers::Customer {
                    id: u.customer_id.to_string(),
                    ..Default::default()
                },
                outbox_events::customer_payload,
            );
            let event =
                plan::threshold_event(payload, percent, period, u.requests, u.monthly_requests);
            let message = OutboxMessage::from_event(u.customer_id.to_string(), &event);
            outbox::enqueue(&mut *tx, &message).await?;
            reached.push(Reached {
                customer_id: u.customer_id,
                percent,
                period: period.to_owned(),
                requests: u.requests,
                monthly: u.monthly_requests,
                subscription: (
                    u.k8s_namespace.clone(),
                    u.k8s_name.clone(),
                    u.k8s_uid.clone(),
                ),
            });
        }
    }
    Ok(reached)
}
