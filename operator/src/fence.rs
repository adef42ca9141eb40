//! Taking and holding the writer fence (`m3o_controllers::store::fence`), with or
//! without leader election: a process works only during its own term, a successor
//! waits while the holder is alive, and takes over from a holder that exited at once
//! and from a hung one once its heartbeat is older than its lease.

use std::time::{Duration, Instant};

use m3o_controllers::store::fence::{self, Candidate, Next};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::http::Role;
use crate::leader::{self, Ended, Renew, Timing};

/// How long the fence waits for a previous term's open transactions before looking
/// again at whether their holder is alive.
const LOCK_WAIT: Duration = Duration::from_secs(1);
/// How often a waiting candidate looks at the fence.
const POLL: Duration = Duration::from_millis(250);

/// What one look at the fence came to.
enum Attempt {
    Began(i64),
    /// The holder (named) is alive.
    Wait(String),
    /// The epoch moved, or a previous term's transaction is still open: look again.
    Again,
}

async fn attempt(
    conn: &mut PgConnection,
    candidate: &Candidate<'_>,
) -> Result<Attempt, sqlx::Error> {
    let holder = fence::observe(conn, candidate.fence).await?;
    match fence::decide(&holder, candidate.app) {
        Next::Wait => return Ok(Attempt::Wait(holder.holder)),
        Next::TakeOver => {
            let ended = fence::terminate(conn, &holder.holder_app).await?;
            tracing::warn!(
                previous = %holder.holder, sessions = ended,
                "the previous writer is connected but its heartbeat is older than its lease (hung or partitioned): terminated its database sessions"
            );
        }
        Next::Take => {}
    }
    match fence::bump(conn, candidate, holder.epoch, LOCK_WAIT).await {
        Ok(Some(epoch)) => {
            tracing::info!(epoch, previous = %holder.holder, "began a writer term");
            Ok(Attempt::Began(epoch))
        }
        Ok(None) => Ok(Attempt::Again),
        Err(err) if fence::is_lock_timeout(&err) => Ok(Attempt::Again),
        Err(err) => Err(err),
    }
}

impl Renew for WriterFence {
    const WHAT: &'static str = "the writer fence heartbeat";

    async fn renew(&mut self) -> Result<bool, String> {
        // The previous beat never finished: its round timed out (a half-open
        // connection, a frozen proxy) and the beat was dropped mid-statement, so its
        // session is of no further use. Beat on a new one, inside the lease.
        if std::mem::replace(&mut self.beating, true) {
            tracing::warn!("writer fence heartbeat timed out; reopening its session");
            self.reopen().await?;
        }
        let beat = match fence::beat(&mut self.conn, &self.name, self.epoch).await {
            Ok(held) => Ok(held),
            // The session may be gone (a proxy's idle timeout, a restarted pooler): open
            // another inside the lease and beat on it, rather than lose the term.
            Err(err) => {
                tracing::warn!(%err, "writer fence heartbeat failed; reopening its session");
                self.reopen().await.map_err(|e| format!("{err}; {e}"))?;
                fence::beat(&mut self.conn, &self.name, self.epoch)
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        self.beating = false;
        beat
    }
}

/// This process's term, held on one session kept open for the whole term (its
/// presence tells a successor that the holder is alive).
pub struct WriterFence {
    conn: PgConnection,
    /// Where a new session comes from when the heartbeat's is gone.
    db: PgPool,
    /// The fence (`""` unsharded, one per shard).
    name: String,
    epoch: i64,
    timing: Timing,
    /// A beat is under way on `conn` (still true at the next round: it was cut off).
    beating: bool,
}

impl WriterFence {
    /// Waits for a term; `None` if shutdown came first. `role` says what it waits on.
    /// Database errors are logged and retried on a fresh session: a standby outlives
    /// an outage.
    pub async fn acquire(
        db: &PgPool,
        fence: &str,
        identity: &str,
        timing: Timing,
        role: &Role,
        shutdown: &CancellationToken,
    ) -> Option<Self> {
        let app = db
            .connect_options()
            .get_application_name()
            .unwrap_or_default()
            .to_owned();
        let candidate = Candidate {
            fence,
            identity,
            app: &app,
            lease: timing.lease,
        };
        let mut session: Option<PgConnection> = None;
        let mut logged: Option<Instant> = None;
        loop {
            if session.is_none() {
                match db.acquire().await {
                    Ok(conn) => session = Some(conn.detach()),
                    Err(err) => tracing::warn!(%err, "writer fence: cannot connect; retrying"),
                }
            }
            if let Some(conn) = session.as_mut() {
                match attempt(conn, &candidate).await {
                    Ok(Attempt::Began(epoch)) => {
                        let conn = session.take()?;
                        return Some(Self {
                            conn,
                            db: db.clone(),
                            name: fence.to_owned(),
                            epoch,
                            timing,
                            beating: false,
                        });
                    }
                    Ok(Attempt::Again) => {}
                    Ok(Attempt::Wait(holder)) => {
                        role.wait_for(&holder);
                        if logged.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                            tracing::warn!(
                                %holder,
                                "waiting for the writer fence: another process writes this schema"
                            );
                            logged = Some(Instant::now());
                        }
                    }
                    Err(err) => {
                        tracing::warn!(%err, "writer fence: cannot read or take it; retrying");
                        session = None;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Replaces the heartbeat's session with a new connection (not one of the pool's,
    /// which may be idle on the same dead path), with the pool's settings and
    /// application_name.
    async fn reopen(&mut self) -> Result<(), String> {
        let fresh = sqlx::Connection::connect_with(&*self.db.connect_options())
            .await
            .map_err(|e| format!("reopening the heartbeat's session: {e}"))?;
        // The old session is dropped, not closed: a close would wait on the dead path.
        drop(std::mem::replace(&mut self.conn, fresh));
        Ok(())
    }

    /// Moves this term, before it writes anything, to epoch `to`; false when the term
    /// moved meanwhile.
    pub async fn raise_to(&mut self, to: i64) -> Result<bool, sqlx::Error> {
        let raised = fence::raise(&mut self.conn, &self.name, self.epoch, to).await?;
        if raised {
            self.epoch = to;
        }
        Ok(raised)
    }

    /// Beats every retry period until shutdown or loss: loss when a newer term has
    /// begun, or when no beat succeeded within the renew deadline (so this process
    /// stops before its heartbeat can look stale to a successor).
    pub async fn hold(&mut self, shutdown: &CancellationToken) -> Ended {
        let Timing {
            renew_deadline,
            retry_period,
            ..
        } = self.timing;
        leader::hold(self, renew_deadline, retry_period, shutdown).await
    }

    /// Ends the term so a successor begins at once. Call it only after this process
    /// has stopped writing.
    pub async fn release(mut self) {
        let stale = "a successor takes over when its heartbeat is stale";
        // A session whose last beat never finished is on a dead path: the release
        // would hang there.
        if self.beating {
            tracing::warn!("the writer fence's session is not answering; {stale}");
            return;
        }
        let wait = self.timing.renew_deadline;
        match tokio::time::timeout(wait, fence::release(&mut self.conn, &self.name, self.epoch))
            .await
        {
            Ok(Ok(())) => {
                let _ = sqlx::Connection::close(self.conn).await;
            }
            Ok(Err(err)) => tracing::warn!(%err, "could not release the writer fence; {stale}"),
            Err(_) => tracing::warn!("releasing the writer fence timed out; {stale}"),
        }
    }
}
