//! Admin queries over the outbox (`m3o-operator outbox`): rows that do not flow, the
//! backlog per topic, and re-driving parked rows. Read-only except [`redrive`].

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::EventRef;

/// Why an unpublished row is listed by [`stuck_rows`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StuckState {
    /// Refused `max_attempts` times; waits for a re-drive.
    Parked,
    /// Behind a parked row of the same aggregate; follows it once it is re-driven.
    Held,
    /// Refused at least once, not parked yet; the relay retries it.
    Retrying,
    /// Never refused, but older than the threshold (Redis unreachable, relay stopped).
    Waiting,
}

impl StuckState {
    /// The lowercase name shown by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Parked => "parked",
            Self::Held => "held",
            Self::Retrying => "retrying",
            Self::Waiting => "waiting",
        }
    }
}

impl TryFrom<String> for StuckState {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "parked" => Ok(Self::Parked),
            "held" => Ok(Self::Held),
            "retrying" => Ok(Self::Retrying),
            "waiting" => Ok(Self::Waiting),
            other => Err(format!("unknown outbox row state {other:?}")),
        }
    }
}

/// An unpublished row that does not flow.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StuckRow {
    #[sqlx(flatten)]
    pub event: EventRef,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub parked_at: Option<DateTime<Utc>>,
    #[sqlx(try_from = "String")]
    pub state: StuckState,
}

/// Parked, held and retrying rows, and rows unpublished for longer than `older_than`,
/// in `seq` order, at most `limit`.
pub async fn stuck_rows<'e, E: PgExecutor<'e>>(
    executor: E,
    older_than: std::time::Duration,
    limit: i64,
) -> Result<Vec<StuckRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, seq, topic, event_type, aggregate_id, attempts, last_error, created_at, \
                parked_at, state FROM ( \
           SELECT o.*, CASE \
             WHEN o.parked_at IS NOT NULL THEN 'parked' \
             WHEN EXISTS (SELECT 1 FROM outbox p WHERE p.parked_at IS NOT NULL \
                          AND p.aggregate_id = o.aggregate_id AND p.seq < o.seq) THEN 'held' \
             WHEN o.attempts > 0 THEN 'retrying' \
             ELSE 'waiting' END AS state \
           FROM outbox o WHERE o.published_at IS NULL) r \
         WHERE state <> 'waiting' OR created_at < now() - make_interval(secs => $1) \
         ORDER BY seq LIMIT $2",
    )
    .bind(older_than.as_secs_f64())
    .bind(limit)
    .fetch_all(executor)
    .await
}

/// Unpublished rows of one topic.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TopicBacklog {
    pub topic: String,
    /// Rows waiting to be published (not parked).
    pub pending: i64,
    /// `created_at` of the oldest of them.
    pub oldest_pending: Option<DateTime<Utc>>,
    /// Parked rows.
    pub parked: i64,
}

/// The backlog of every topic with unpublished rows, by topic name.
pub async fn topic_backlog<'e, E: PgExecutor<'e>>(
    executor: E,
) -> Result<Vec<TopicBacklog>, sqlx::Error> {
    sqlx::query_as(
        "SELECT topic, count(*) FILTER (WHERE parked_at IS NULL) AS pending, \
                min(created_at) FILTER (WHERE parked_at IS NULL) AS oldest_pending, \
                count(*) FILTER (WHERE parked_at IS NOT NULL) AS parked \
         FROM outbox WHERE published_at IS NULL GROUP BY topic ORDER BY topic",
    )
    .fetch_all(executor)
    .await
}

/// Which parked rows to re-drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    All,
    Ids(Vec<Uuid>),
}

/// Un-parks the selected parked rows (clears `parked_at` and `attempts`, keeps
/// `last_error`) and wakes the relay when `conn`'s transaction commits. Rows that are
/// not parked are left alone. Returns the re-driven rows in `seq` order.
pub async fn redrive(
    conn: &mut PgConnection,
    which: &Redrive,
) -> Result<Vec<EventRef>, sqlx::Error> {
    let (all, ids) = match which {
        Redrive::All => (true, Vec::new()),
        Redrive::Ids(ids) => (false, ids.clone()),
    };
    let mut rows: Vec<EventRef> = sqlx::query_as(
        "UPDATE outbox SET parked_at = NULL, attempts = 0 \
         WHERE parked_at IS NOT NULL AND ($1 OR id = ANY($2)) \
         RETURNING id, seq, topic, event_type, aggregate_id",
    )
    .bind(all)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    rows.sort_by_key(|r| r.seq);
    if !rows.is_empty() {
        sqlx::query("SELECT pg_notify($1, current_schema())")
            .bind(crate::relay::NOTIFY_CHANNEL)
            .execute(&mut *conn)
            .await?;
    }
    Ok(rows)
}

/// A published event still retained in the outbox, as `outbox replay` re-sends it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Retained {
    #[sqlx(flatten)]
    pub event: EventRef,
    pub payload: Vec<u8>,
    pub created_at: DateTime<Utc>,
}

/// Events replayed per statement and per Redis round trip.
pub const REPLAY_PAGE: i64 = 500;

/// Up to [`REPLAY_PAGE`] published events created at or after `since`, after `seq`
/// `after`, in `seq` order (published rows are kept until the relay's retention).
pub async fn retained_page<'e, E: PgExecutor<'e>>(
    executor: E,
    since: DateTime<Utc>,
    after: i64,
) -> Result<Vec<Retained>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, seq, topic, event_type, aggregate_id, payload, created_at FROM outbox \
         WHERE published_at IS NOT NULL AND created_at >= $1 AND seq > $2 \
         ORDER BY seq LIMIT $3",
    )
    .bind(since)
    .bind(after)
    .bind(REPLAY_PAGE)
    .fetch_all(executor)
    .await
}
