//! The writer fence (migration `0005_writer_fence.sql`): one writing process per
//! schema, and none after it has been replaced, even one that wakes up from a hang
//! with its connections and transactions still open.
//!
//! - A process starts its term by bumping the schema's epoch ([`bump`]); [`Term`]
//!   carries the epoch it won.
//! - Every write transaction begins with [`check`] (use [`begin_write`]): it fails once
//!   a newer term has begun, and it holds a lock that keeps a newer term from beginning
//!   while the transaction is open. etcd writes happen inside such a transaction.
//! - The holder keeps a heartbeat ([`beat`]) on one session it keeps open for the
//!   whole term. A successor takes over at once when that session is gone (the holder
//!   exited or was killed), and after terminating the holder's sessions
//!   ([`terminate`]) when the heartbeat is older than the holder's lease (a hung or
//!   partitioned host, whose TCP connections Postgres would keep for hours). Until
//!   then it waits ([`decide`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

/// SQLSTATE of a check against a term that is not the current one.
const NOT_CURRENT_TERM: &str = "M3OF1";
/// SQLSTATE of a write that did not pass the check.
const UNCHECKED_WRITE: &str = "M3OF2";
/// SQLSTATE `lock_not_available`: the bump's lock wait timed out.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// This process's term as the writer of its fence's scope; epoch 0 until it has one,
/// and every write fails until then.
#[derive(Default)]
pub struct Term {
    /// The fence (row of `writer_fence`): `""` unsharded, see [`fence_name`].
    name: String,
    epoch: Arc<AtomicI64>,
    superseded: CancellationToken,
}

/// The fence of a shard: one per `--shard-selector` (a short hash of its canonical
/// form, so spellings of one selector share a fence), `""` without
/// one. Shards write disjoint customers of one schema, each under its own fence.
pub fn fence_name(shard_selector: Option<&str>) -> String {
    use sha2::{Digest, Sha256};
    match shard_selector {
        Some(selector) => hex::encode(&Sha256::digest(selector.as_bytes())[..8]),
        None => String::new(),
    }
}

impl Term {
    /// A term of fence `name`, not begun.
    pub fn of(name: String) -> Self {
        Self {
            name,
            ..Self::default()
        }
    }

    /// The fence this term is of.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The epoch won, 0 before.
    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The epoch, shared (the outbox relay checks it in its own transactions).
    pub fn shared_epoch(&self) -> Arc<AtomicI64> {
        self.epoch.clone()
    }

    /// Records the epoch won by [`bump`].
    pub fn begin(&self, epoch: i64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    /// Cancelled when a check finds that a newer term has begun: this process must
    /// stop writing and exit.
    pub fn superseded(&self) -> &CancellationToken {
        &self.superseded
    }
}

/// True when `err` is a write that skipped the fence check (a bug in a write path).
pub fn is_unchecked_write(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == UNCHECKED_WRITE)
}

/// True when `err` is the fence refusing a write.
pub fn is_fenced(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == NOT_CURRENT_TERM || code == UNCHECKED_WRITE)
}

/// Fails unless `term` is the current term, and keeps a newer term from beginning
/// until the transaction on `conn` ends. Call it first in every write transaction.
pub async fn check(conn: &mut PgConnection, term: &Term) -> Result<(), sqlx::Error> {
    let epoch = term.epoch();
    let checked = sqlx::query("SELECT writer_fence_check($1, $2)")
        .bind(term.name())
        .bind(epoch)
        .execute(conn)
        .await;
    if let Err(err) = &checked
        && epoch > 0
        && is_fenced(err)
        && !term.superseded.is_cancelled()
    {
        tracing::error!(
            epoch,
            "another process has become the writer of this schema"
        );
        term.superseded.cancel();
    }
    checked.map(|_| ())
}

/// Begins a write transaction: every transaction that writes rows, the outbox, or
/// (while it is open) etcd starts here.
pub async fn begin_write(
    db: &PgPool,
    term: &Term,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = db.begin().await?;
    check(&mut tx, term).await?;
    Ok(tx)
}

/// The current term as a candidate sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Holder {
    pub epoch: i64,
    /// Identity of the holder; empty when released.
    pub holder: String,
    /// The application_name of the holder's sessions.
    pub holder_app: String,
    /// The heartbeat is older than the holder's lease (by the database's clock, the
    /// one clock every replica shares).
    pub stale: bool,
    /// A session of the holder is connected.
    pub live: bool,
}

/// What a candidate does about the current term.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Nobody holds it (released, exited, or this process): begin a term.
    Take,
    /// The holder is connected but silent for longer than its lease: terminate its
    /// sessions, then begin a term.
    TakeOver,
    /// The holder is alive: wait.
    Wait,
}

/// The takeover rule (pure).
pub fn decide(holder: &Holder, my_app: &str) -> Next {
    if holder.holder_app.is_empty() || holder.holder_app == my_app || !holder.live {
        Next::Take
    } else if holder.stale {
        Next::TakeOver
    } else {
        Next::Wait
    }
}

/// Reads the current term of fence `name` (creating the fence on first use).
pub async fn observe(conn: &mut PgConnection, name: &str) -> Result<Holder, sqlx::Error> {
    sqlx::query("INSERT INTO writer_fence (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(name)
        .execute(&mut *conn)
        .await?;
    sqlx::query_as(
        "SELECT epoch, holder, holder_app, \
                clock_timestamp() - beat_at > lease_ms * interval '1 millisecond' AS stale, \
                EXISTS (SELECT 1 FROM pg_stat_activity \
                        WHERE application_name = holder_app AND holder_app <> '' \
                          AND pid <> pg_backend_pid()) AS live \
         FROM writer_fence WHERE name = $1",
    )
    .bind(name)
    .fetch_one(conn)
    .await
}

/// Terminates every session named `app` (the previous holder's); returns how many.
/// Open transactions of those sessions are rolled back, releasing their locks.
pub async fn terminate(conn: &mut PgConnection, app: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = $1 AND $1 <> '' AND pid <> pg_backend_pid()",
    )
    .bind(app)
    .fetch_one(conn)
    .await
}

/// Who begins a term of which fence, and how long its heartbeat stays fresh.
pub struct Candidate<'a> {
    pub fence: &'a str,
    pub identity: &'a str,
    pub app: &'a str,
    pub lease: Duration,
}

/// Begins a term after `seen` (the epoch observed); `None` if the epoch moved
/// meanwhile. Waits at most `lock_wait` for open write transactions of the previous
/// term; `Err` with [`is_lock_timeout`] when they are still open.
pub async fn bump(
    conn: &mut PgConnection,
    candidate: &Candidate<'_>,
    seen: i64,
    lock_wait: Duration,
) -> Result<Option<i64>, sqlx::Error> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query(&format!(
        "SET LOCAL lock_timeout = {}",
        lock_wait.as_millis().max(1)
    ))
    .execute(&mut *tx)
    .await?;
    let epoch: i64 =
        sqlx::query_scalar("SELECT epoch FROM writer_fence WHERE name = $1 FOR UPDATE")
            .bind(candidate.fence)
            .fetch_one(&mut *tx)
            .await?;
    if epoch != seen {
        return Ok(None);
    }
    let lease_ms = i32::try_from(candidate.lease.as_millis()).unwrap_or(i32::MAX);
    let epoch: i64 = sqlx::query_scalar(
        "UPDATE writer_fence SET epoch = epoch + 1, holder = $1, holder_app = $2, \
         beat_at = clock_timestamp(), lease_ms = $3 WHERE name = $4 RETURNING epoch",
    )
    .bind(candidate.identity)
    .bind(candidate.app)
    .bind(lease_ms)
    .bind(candidate.fence)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(epoch))
}

/// True when `err` is a lock wait that timed out.
pub fn is_lock_timeout(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == LOCK_NOT_AVAILABLE)
}

/// Refreshes the heartbeat of term `epoch` of fence `name`; false when a newer term
/// has begun.
pub async fn beat(conn: &mut PgConnection, name: &str, epoch: i64) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE writer_fence SET beat_at = clock_timestamp() WHERE name = $1 AND epoch = $2",
    )
    .bind(name)
    .bind(epoch)
    .execute(conn)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// The current epoch of fence `name` (`None` before the fence exists): what an
/// etcd-side refusal re-checks before re-establishing the term in etcd.
pub async fn current_epoch(db: &PgPool, name: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT epoch FROM writer_fence WHERE name = $1")
        .bind(name)
        .fetch_optional(db)
        .await
}

/// This database's identity (migration `0014_database_identity.sql`): what etcd records
/// beside the prefix, so that two databases never write one prefix.
pub async fn database_id(db: &PgPool) -> Result<uuid::Uuid, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM database_identity")
        .fetch_one(db)
        .await
}

/// Moves term `epoch` of fence `name`, just begun and not yet writing, to epoch `to`
/// (above one that etcd records: Postgres restored from an older backup); false when
/// the term is no longer `epoch`.
pub async fn raise(
    conn: &mut PgConnection,
    name: &str,
    epoch: i64,
    to: i64,
) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE writer_fence SET epoch = $3, beat_at = clock_timestamp() \
         WHERE name = $1 AND epoch = $2 AND $3 > $2",
    )
    .bind(name)
    .bind(epoch)
    .bind(to)
    .execute(conn)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Ends term `epoch` of fence `name` so a successor begins at once (after this process
/// stopped writing).
pub async fn release(conn: &mut PgConnection, name: &str, epoch: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE writer_fence SET holder = '', holder_app = '' WHERE name = $1 AND epoch = $2",
    )
    .bind(name)
    .bind(epoch)
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(app: &str, stale: bool, live: bool) -> Holder {
        Holder {
            epoch: 3,
            holder: "other".into(),
            holder_app: app.into(),
            stale,
            live,
        }
    }

    #[test]
    fn takeover_rule() {
        let me = "m3o-operator:me";
        assert_eq!(decide(&holder("", false, false), me), Next::Take);
        assert_eq!(decide(&holder(me, false, true), me), Next::Take);
        assert_eq!(decide(&holder("x", false, false), me), Next::Take, "exited");
        assert_eq!(decide(&holder("x", true, false), me), Next::Take);
        assert_eq!(decide(&holder("x", true, true), me), Next::TakeOver, "hung");
        assert_eq!(decide(&holder("x", false, true), me), Next::Wait, "alive");
    }
}
