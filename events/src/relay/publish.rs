//! One batch: select, `XADD`, record what Redis said about each row.
//!
//! A batch goes to Redis in one `MULTI`/`EXEC`. If Redis refuses the transaction as a
//! whole (`EXECABORT`: a command was rejected while queueing, e.g. by an ACL) the rows
//! are retried one by one, so only the offending row is blamed. A row Redis refuses
//! has `attempts` counted and `last_error` set; at `max_attempts` it is parked.
//!
//! Ordering decision: later events of the *same aggregate* never pass a refused or
//! parked one. While a row is refused and waiting to be retried, its aggregate's later
//! rows wait too; once it is parked they stay held (unpublished, not parked) until it is
//! re-driven, and then follow it in `seq` order. Consumers therefore always see one
//! resource's events in order (Created before Updated), at the price of that one
//! resource's events waiting for an admin. Rows of other aggregates flow past.

use std::sync::atomic::Ordering;

use chrono::{DateTime, SecondsFormat, Utc};
use redis::Value;
use tokio::time::Instant;
use uuid::Uuid;

use super::error::pg;
use super::plan::{self, Blame};
use super::{Relay, RelayError};
use crate::outbox::EventRef;

/// Key (first half) of the advisory lock a relay holds while publishing a batch; the
/// second half is `hashtext(current_schema())`.
const LOCK_CLASS: i32 = 0x6d33_6f00; // "m3o\0"

/// Holds every relay of the connection's schema back until the transaction on `conn`
/// ends: each batch tries the same lock first and publishes nothing while it is held.
/// Waits for a batch in flight to finish. `outbox replay` runs under it, so no newer
/// event is published between the ones it re-sends.
pub async fn pause_relays(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))")
        .bind(LOCK_CLASS)
        .execute(conn)
        .await?;
    Ok(())
}

/// The relay's queue, in `seq` order with each payload's size: unpublished, not parked,
/// not held behind a parked row of the same aggregate, and not of an aggregate
/// waiting to retry ($2).
const CANDIDATES: &str = "\
    SELECT o.seq, octet_length(o.payload)::int8 FROM outbox o \
    WHERE o.published_at IS NULL AND o.parked_at IS NULL \
      AND NOT (o.aggregate_id = ANY($2)) \
      AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.parked_at IS NOT NULL \
                      AND p.aggregate_id = o.aggregate_id AND p.seq < o.seq) \
    ORDER BY o.seq LIMIT $1";

/// An unpublished outbox row, as the relay reads it.
#[derive(Debug, sqlx::FromRow)]
struct Pending {
    #[sqlx(flatten)]
    event: EventRef,
    payload: Vec<u8>,
    created_at: DateTime<Utc>,
}

/// A row the relay has just parked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedEvent {
    /// Which event.
    pub event: EventRef,
    /// Refusals so far.
    pub attempts: i32,
    /// Redis's last answer.
    pub error: String,
}

/// What one [`Relay::publish_batch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Rows published.
    pub published: usize,
    /// Rows Redis refused (including those parked now).
    pub refused: usize,
    /// Rows parked now.
    pub parked: usize,
    /// Whether more rows were waiting beyond this batch.
    pub more: bool,
}

/// What Redis said about one row.
enum Verdict {
    Added,
    Refused(String),
    /// No answer about this row (Redis unreachable, or not taking writes).
    Unavailable(redis::RedisError),
    /// Not sent: an earlier row of its aggregate was refused in this batch.
    Held,
}

impl Relay {
    /// Publishes the next batch of the queue in `seq` order, in one transaction (nothing
    /// if another relay holds the schema's lock). Rows Redis refuses are counted and
    /// parked at `max_attempts` (see the module documentation); an error means Redis or
    /// Postgres did not answer, and the rows stay as they were.
    pub async fn publish_batch(&mut self) -> Result<BatchOutcome, RelayError> {
        let mut tx = self.pool.begin().await.map_err(pg("BEGIN"))?;
        // First in the transaction: a replaced writer neither sends nor marks a row.
        if let Some((fence, epoch)) = &self.writer_epoch {
            sqlx::query("SELECT writer_fence_check($1, $2)")
                .bind(fence)
                .bind(epoch.load(Ordering::SeqCst))
                .execute(&mut *tx)
                .await
                .map_err(pg("checking the writer fence"))?;
        }
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema()))")
                .bind(LOCK_CLASS)
                .fetch_one(&mut *tx)
                .await
                .map_err(pg("taking the relay lock"))?;
        if !locked {
            return Ok(BatchOutcome::default());
        }
        let now = Instant::now();
        self.cooling.retain(|_, due| *due > now);
        let cooling: Vec<&str> = self.cooling.keys().map(String::as_str).collect();
        let candidates: Vec<(i64, i64)> = sqlx::query_as(CANDIDATES)
            .bind(i64::from(self.config.batch_size))
            .bind(&cooling)
            .fetch_all(&mut *tx)
            .await
            .map_err(pg("selecting pending outbox rows"))?;
        let sizes: Vec<u64> = candidates
            .iter()
            .map(|(_, size)| u64::try_from(*size).unwrap_or(0))
            .collect();
        let max_rows = usize::try_from(self.config.batch_size).unwrap_or(usize::MAX);
        let n = plan::batch_len(&sizes, max_rows, self.config.batch_max_bytes);
        if n == 0 {
            return Ok(BatchOutcome::default());
        }
        let seqs: Vec<i64> = candidates[..n].iter().map(|(seq, _)| *seq).collect();
        let rows: Vec<Pending> = sqlx::query_as(
            "SELECT id, seq, topic, event_type, aggregate_id, payload, created_at FROM outbox \
             WHERE seq = ANY($1) AND published_at IS NULL AND parked_at IS NULL \
             ORDER BY seq FOR UPDATE",
        )
        .bind(&seqs)
        .fetch_all(&mut *tx)
        .await
        .map_err(pg("selecting outbox rows"))?;

        let verdicts = self.send(&rows).await;
        let mut outcome = BatchOutcome {
            more: candidates.len() > n || candidates.len() >= max_rows,
            ..BatchOutcome::default()
        };
        let added: Vec<Uuid> = rows
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| matches!(v, Verdict::Added))
            .map(|(r, _)| r.event.id)
            .collect();
        sqlx::query(
            "UPDATE outbox SET published_at = now(), attempts = attempts + 1 WHERE id = ANY($1)",
        )
        .bind(&added)
        .execute(&mut *tx)
        .await
        .map_err(pg("marking outbox rows published"))?;
        outcome.published = added.len();
        let mut parked = Vec::new();
        let mut unavailable = None;
        for (row, verdict) in rows.iter().zip(verdicts) {
            match verdict {
                Verdict::Refused(error) => {
                    outcome.refused += 1;
                    let attempts = self.record_refusal(&mut tx, row, &error).await?;
                    if plan::park(attempts, self.config.max_attempts) {
                        parked.push(row.parked(attempts, error));
                    }
                }
                Verdict::Unavailable(error) => {
                    unavailable.get_or_insert(error);
                }
                Verdict::Added | Verdict::Held => {}
            }
        }
        tx.commit()
            .await
            .map_err(pg("committing the outcome of an outbox batch"))?;

        outcome.parked = parked.len();
        self.stats.record_published(outcome.published);
        self.stats.record_parked(outcome.parked);
        for row in &rows {
            if added.contains(&row.event.id) {
                self.cooling.remove(&row.event.aggregate_id);
            }
        }
        for parked in parked {
            self.cooling.remove(&parked.event.aggregate_id);
            self.report_parked(parked);
        }
        tracing::debug!(?outcome, first_seq = seqs[0], "outbox batch done");
        match unavailable {
            Some(source) => Err(RelayError::Publish {
                count: rows.len() - outcome.published - outcome.refused,
                first_seq: seqs[0],
                source,
            }),
            None => Ok(outcome),
        }
    }

    /// `XADD`s `rows` in one transaction and returns a verdict per row; retries them
    /// row by row when Redis refused the transaction as a whole.
    async fn send(&mut self, rows: &[Pending]) -> Vec<Verdict> {
        let mut pipe = redis::pipe();
        pipe.atomic().ignore_errors();
        for row in rows {
            pipe.add_command(self.xadd(row));
        }
        match pipe.query_async::<Vec<Value>>(&mut self.redis).await {
            Ok(replies) if replies.len() == rows.len() => {
                let verdicts = replies.into_iter().map(verdict_of_reply).collect();
                hold_after_refusal(rows, verdicts)
            }
            Ok(_) => self.send_one_by_one(rows).await,
            Err(error) => match plan::blame(&error) {
                Blame::Refused => self.send_one_by_one(rows).await,
                Blame::Unavailable => rows
                    .iter()
                    .map(|_| Verdict::Unavailable(error.clone()))
                    .collect(),
            },
        }
    }

    /// One `XADD` per row, in order. After a refusal the aggregate's later rows are
    /// held (not sent); after no answer, nothing more is sent.
    async fn send_one_by_one(&mut self, rows: &[Pending]) -> Vec<Verdict> {
        let mut verdicts = Vec::with_capacity(rows.len());
        let mut refused_aggregates = std::collections::HashSet::new();
        let mut down: Option<redis::RedisError> = None;
        for row in rows {
            if let Some(error) = &down {
                verdicts.push(Verdict::Unavailable(error.clone()));
                continue;
            }
            if refused_aggregates.contains(&row.event.aggregate_id) {
                verdicts.push(Verdict::Held);
                continue;
            }
            let verdict = match self.xadd(row).query_async::<Value>(&mut self.redis).await {
                Ok(_) => Verdict::Added,
                Err(error) => match plan::blame(&error) {
                    Blame::Refused => Verdict::Refused(plan::refusal(&error)),
                    Blame::Unavailable => {
                        down = Some(error.clone());
                        Verdict::Unavailable(error)
                    }
                },
            };
            if matches!(verdict, Verdict::Refused(_)) {
                refused_aggregates.insert(row.event.aggregate_id.clone());
            }
            verdicts.push(verdict);
        }
        verdicts
    }

    fn xadd(&self, row: &Pending) -> redis::Cmd {
        xadd(
            &self.config.stream_prefix,
            self.config.maxlen,
            &row.event,
            &row.payload,
            row.created_at,
        )
    }

    /// Counts a refusal of `row`, parks it at `max_attempts`, and makes its aggregate
    /// wait before the next try; returns the row's attempts.
    async fn record_refusal(
        &mut self,
        tx: &mut sqlx::PgConnection,
        row: &Pending,
        error: &str,
    ) -> Result<i32, RelayError> {
        let attempts: i32 = sqlx::query_scalar(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $2, \
             parked_at = CASE WHEN attempts + 1 >= $3 THEN now() END \
             WHERE id = $1 RETURNING attempts",
        )
        .bind(row.event.id)
        .bind(error)
        .bind(i64::from(self.config.max_attempts))
        .fetch_one(tx)
        .await
        .map_err(pg("recording a refused outbox row"))?;
        let delay = plan::retry_delay(attempts, self.config.backoff_min, self.config.backoff_max);
        self.cooling
            .insert(row.event.aggregate_id.clone(), Instant::now() + delay);
        tracing::debug!(event_id = %row.event.id, seq = row.event.seq, attempts, error, "Redis refused an outbox event");
        Ok(attempts)
    }

    /// Logs a parked row (always) and hands it to the [`Relay::parked_events`] receiver.
    fn report_parked(&self, parked: ParkedEvent) {
        let event = &parked.event;
        tracing::warn!(
            event_id = %event.id,
            seq = event.seq,
            topic = event.topic,
            event_type = event.event_type,
            aggregate_id = event.aggregate_id,
            attempts = parked.attempts,
            error = parked.error,
            "outbox event parked: Redis refused it {} times; later events flow past it \
             (the same aggregate's wait); fix the cause, then `m3o-operator outbox redrive --id {}`",
            parked.attempts,
            event.id,
        );
        if let Some(tx) = &self.parked_tx
            && tx.try_send(parked).is_err()
        {
            tracing::debug!("parked-event receiver full or gone; the log line above stands");
        }
    }
}

impl Pending {
    fn parked(&self, attempts: i32, error: String) -> ParkedEvent {
        ParkedEvent {
            event: self.event.clone(),
            attempts,
            error,
        }
    }
}

/// A refusal of a row whose aggregate already had one in this batch counts as held:
/// only the first refused row of an aggregate is counted (and, later, parked).
fn hold_after_refusal(rows: &[Pending], mut verdicts: Vec<Verdict>) -> Vec<Verdict> {
    let mut refused = std::collections::HashSet::new();
    for (row, verdict) in rows.iter().zip(verdicts.iter_mut()) {
        if matches!(verdict, Verdict::Refused(_))
            && !refused.insert(row.event.aggregate_id.as_str())
        {
            *verdict = Verdict::Held;
        }
    }
    verdicts
}

fn verdict_of_reply(reply: Value) -> Verdict {
    match reply {
        Value::ServerError(error) => {
            let error = redis::RedisError::from(error);
            match plan::blame(&error) {
                Blame::Refused => Verdict::Refused(plan::refusal(&error)),
                Blame::Unavailable => Verdict::Unavailable(error),
            }
        }
        _ => Verdict::Added,
    }
}

/// The `XADD` of one outbox event to its stream (the entry fields of DESIGN section 5):
/// the relay's, and `outbox replay`'s, which re-sends an event with its original id.
pub fn xadd(
    stream_prefix: &str,
    maxlen: usize,
    event: &EventRef,
    payload: &[u8],
    created_at: DateTime<Utc>,
) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(crate::stream_key(stream_prefix, &event.topic))
        .arg("MAXLEN")
        .arg("~")
        .arg(maxlen)
        .arg("*")
        .arg("id")
        .arg(event.id.to_string())
        .arg("type")
        .arg(&event.event_type)
        .arg("content-type")
        .arg(crate::CONTENT_TYPE)
        .arg("payload")
        .arg(payload)
        .arg("created")
        .arg(created_at.to_rfc3339_opts(SecondsFormat::Micros, true));
    cmd
}
