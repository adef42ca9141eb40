//! The HTTP server: `/healthz` (every long-running task is up), `/readyz` (connected
//! and watching, or a standby able to take over), `/metrics` (Prometheus text format).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use m3o_controllers::platform::divergence::Divergence;
use m3o_controllers::report::metrics::{Metrics, StreamGroupLabels};
use m3o_controllers::runtime::context::Watching;
use m3o_events::relay::RelayStats;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Where the process is on its way to writing, for `/readyz`.
#[derive(Clone, Debug)]
enum Phase {
    Connecting,
    /// Waiting for the lease (with leader election).
    Standby,
    /// Waiting for the writer fence held by `holder`.
    Waiting {
        holder: String,
        since: Instant,
    },
    Leading,
}

/// What `/readyz` reports; set by the run loop.
pub struct Role {
    phase: Mutex<Phase>,
    /// Holding the lease (a wait on the fence is then a wait that should end soon).
    elected: std::sync::atomic::AtomicBool,
    /// How long an elected replica may wait on the fence and still call itself ready.
    patience: Duration,
}

impl Role {
    pub fn new(patience: Duration) -> Self {
        Self {
            phase: Mutex::new(Phase::Connecting),
            elected: Default::default(),
            patience,
        }
    }

    fn set(&self, phase: Phase) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase;
        }
    }

    pub fn standby(&self) {
        self.set(Phase::Standby);
    }

    pub fn elected(&self) {
        self.elected
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waiting on the fence held by `holder` (keeps the start of the wait).
    pub fn wait_for(&self, holder: &str) {
        if let Ok(mut p) = self.phase.lock()
            && !matches!(&*p, Phase::Waiting { holder: h, .. } if h == holder)
        {
            *p = Phase::Waiting {
                holder: holder.to_owned(),
                since: Instant::now(),
            };
        }
    }

    pub fn leading(&self) {
        self.set(Phase::Leading);
    }

    pub fn is_leading(&self) -> bool {
        self.phase
            .lock()
            .is_ok_and(|p| matches!(*p, Phase::Leading))
    }

    pub fn stopped(&self) {
        self.set(Phase::Connecting);
    }

    fn answer(&self, watching: bool) -> (StatusCode, String) {
        let phase = self
            .phase
            .lock()
            .map(|p| p.clone())
            .unwrap_or(Phase::Connecting);
        let elected = self.elected.load(std::sync::atomic::Ordering::Relaxed);
        let ok = |s: String| (StatusCode::OK, s);
        let not = |s: String| (StatusCode::SERVICE_UNAVAILABLE, s);
        match phase {
            Phase::Connecting => not("not ready: connecting".into()),
            Phase::Standby => ok("ready (standby)".into()),
            Phase::Waiting { holder, since } if elected => {
                let waited = since.elapsed().as_secs();
                if since.elapsed() < self.patience {
                    ok(format!(
                        "ready (standby: elected, waiting for the previous writer {holder} to stop)"
                    ))
                } else {
                    not(format!(
                        "not ready: elected, but waiting {waited}s for the writer fence held by {holder}"
                    ))
                }
            }
            Phase::Waiting { holder, .. } => ok(format!(
                "ready (standby: {holder} holds the writer fence; waiting for it)"
            )),
            Phase::Leading if !watching => not("not ready: starting watches".into()),
            Phase::Leading => ok("ready (leader)".into()),
        }
    }
}

/// Which long-running task is down, for `/healthz`.
#[derive(Default)]
pub struct Health(Mutex<Option<String>>);

impl Health {
    pub fn task_down(&self, what: String) {
        if let Ok(mut h) = self.0.lock() {
            h.get_or_insert(what);
        }
    }

    fn down(&self) -> Option<String> {
        self.0.lock().ok().and_then(|h| h.clone())
    }
}

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub role: Arc<Role>,
    pub health: Arc<Health>,
    /// Which controllers have listed their objects and are watching.
    pub watching: Arc<Watching>,
    /// A writer-term divergence being healed (the leader is not ready until then).
    pub divergence: Arc<Divergence>,
    pub metrics: Arc<Metrics>,
    pub relay: Arc<RelayStats>,
    /// The outbox figures, read from Postgres at most every [`BACKLOG_MAX_AGE`].
    pub backlog: Arc<BacklogReading>,
}

/// How old the outbox figures on `/metrics` may be: several Prometheus replicas (or a
/// scrape storm) cost one query per interval, not one per scrape.
pub const BACKLOG_MAX_AGE: Duration = Duration::from_secs(5);
/// A backlog query slower than this is skipped (the figures keep their last value), so a
/// slow database never stalls a scrape.
const BACKLOG_TIMEOUT: Duration = Duration::from_secs(2);

/// The outbox backlog query behind `/metrics`, rate-limited: one caller at a time
/// queries, the others reuse its reading.
pub struct BacklogReading {
    db: PgPool,
    last: tokio::sync::Mutex<Option<Instant>>,
}

impl BacklogReading {
    pub fn new(db: PgPool) -> Self {
        Self {
            db,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Refreshes the outbox gauges when the last reading is older than
    /// [`BACKLOG_MAX_AGE`].
    async fn refresh(&self, metrics: &Metrics) {
        let mut last = self.last.lock().await;
        if !reading_due(*last, Instant::now()) {
            return;
        }
        let read = tokio::time::timeout(BACKLOG_TIMEOUT, m3o_events::outbox::backlog(&self.db));
        if let Ok(Ok(backlog)) = read.await {
            metrics.outbox_backlog.set(backlog.count);
            let age = backlog.age(chrono::Utc::now()).num_milliseconds().max(0) as f64 / 1000.0;
            metrics.outbox_oldest_age.set(age);
            metrics.outbox_parked.set(backlog.parked);
            *last = Some(Instant::now());
        }
    }
}

/// Whether a reading taken at `last` is too old at `now` (none yet: due).
fn reading_due(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|at| now.saturating_duration_since(at) >= BACKLOG_MAX_AGE)
}

/// Fails while a long-running task is down (the process then exits non-zero).
async fn healthz(State(state): State<HttpState>) -> impl IntoResponse {
    match state.health.down() {
        None => (StatusCode::OK, "ok".to_owned()),
        Some(what) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {what}"),
        ),
    }
}

/// Ready once connected and, on the leader, once every controller is watching; a
/// standby is ready as soon as it is connected, since it can take over at any time,
/// except an elected one that has waited too long on the writer fence (it says on what).
/// A leader healing a writer-term divergence is not ready until it has converged the
/// etcd prefix again.
async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    readiness(&state.role, state.watching.all(), &state.divergence)
}

fn readiness(role: &Role, watching: bool, divergence: &Divergence) -> (StatusCode, String) {
    let (code, body) = role.answer(watching);
    match divergence.unhealed() {
        Some(what) if code == StatusCode::OK && role.is_leading() => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: healing a divergence of the writer term: {what}"),
        ),
        _ => (code, body),
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    // Outbox figures are read at scrape time, at most every BACKLOG_MAX_AGE.
    state.backlog.refresh(&state.metrics).await;
    catch_up(
        &state.metrics.events_published,
        state.relay.published_total(),
    );
    catch_up(
        &state.metrics.outbox_rows_parked,
        state.relay.parked_total(),
    );
    relay_lags(&state.metrics, &state.relay);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// Raises `counter` to the relay's `total` (the relay counts; the registry exports).
fn catch_up(counter: &prometheus_client::metrics::counter::Counter, total: u64) {
    let counted = counter.get();
    if total > counted {
        counter.inc_by(total - counted);
    }
}

/// Replaces the consumer-group series with the relay's last reading, so that a deleted
/// group's series goes away. Groups whose lag Redis cannot tell have no lag series.
fn relay_lags(metrics: &Metrics, relay: &RelayStats) {
    metrics.stream_group_lag.clear();
    metrics.stream_group_pending.clear();
    for g in relay.group_lags() {
        let labels = StreamGroupLabels {
            stream: g.stream,
            group: g.group,
        };
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        if let Some(lag) = g.lag {
            metrics
                .stream_group_lag
                .get_or_create(&labels)
                .set(gauge(lag));
        }
        metrics
            .stream_group_pending
            .get_or_create(&labels)
            .set(gauge(g.pending));
    }
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_is_read_at_most_every_max_age() {
        let now = Instant::now();
        assert!(reading_due(None, now), "no reading yet");
        assert!(!reading_due(Some(now), now));
        assert!(!reading_due(Some(now), now + BACKLOG_MAX_AGE / 2));
        assert!(reading_due(Some(now), now + BACKLOG_MAX_AGE));
    }

    #[test]
    fn a_leader_healing_a_divergence_is_not_ready_until_healed() {
        let role = Role::new(Duration::from_secs(60));
        role.leading();
        let divergence = Divergence::default();
        assert_eq!(
            readiness(&role, true, &divergence),
            (StatusCode::OK, "ready (leader)".into())
        );
        divergence.found("etcd recorded writer term none".into());
        let (code, text) = readiness(&role, true, &divergence);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            text.contains("healing a divergence of the writer term: etcd recorded"),
            "{text}"
        );
        let healing = divergence.pending_number().expect("pending");
        divergence.healed(healing);
        assert_eq!(readiness(&role, true, &divergence).0, StatusCode::OK);
    }

    #[test]
    fn readiness_says_what_it_waits_on() {
        let role = Role::new(Duration::from_secs(60));
        assert_eq!(role.answer(false).0, StatusCode::SERVICE_UNAVAILABLE);
        role.standby();
        assert_eq!(
            role.answer(false),
            (StatusCode::OK, "ready (standby)".into())
        );
        role.wait_for("op-a");
        let (code, text) = role.answer(false);
        assert_eq!(
            code,
            StatusCode::OK,
            "an unelected replica waiting is a standby"
        );
        assert!(text.contains("op-a holds the writer fence"), "{text}");
        role.elected();
        assert!(
            role.answer(false)
                .1
                .contains("elected, waiting for the previous writer op-a")
        );
        let impatient = Role::new(Duration::ZERO);
        impatient.elected();
        impatient.wait_for("op-a");
        let (code, text) = impatient.answer(false);
        assert_eq!(
            code,
            StatusCode::SERVICE_UNAVAILABLE,
            "elected and waiting too long"
        );
        assert!(text.contains("held by op-a"), "{text}");
        role.leading();
        assert_eq!(role.answer(false).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(role.answer(true), (StatusCode::OK, "ready (leader)".into()));
    }

    #[test]
    fn health_names_the_task_down() {
        let health = Health::default();
        assert_eq!(health.down(), None);
        health.task_down("task relay ended".into());
        health.task_down("task other ended".into());
        assert_eq!(health.down().as_deref(), Some("task relay ended"));
    }
}
