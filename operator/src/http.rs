//! The HTTP server: `/healthz` (the process serves), `/readyz` (connected and
//! watching), `/metrics` (Prometheus text format).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use m3o_controllers::context::Watching;
use m3o_controllers::metrics::{Metrics, StreamGroupLabels};
use m3o_events::relay::RelayStats;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    /// Connected to every backend (set after the start-up checks).
    pub ready: Arc<AtomicBool>,
    /// Which controllers have listed their objects and are watching.
    pub watching: Arc<Watching>,
    pub metrics: Arc<Metrics>,
    pub relay: Arc<RelayStats>,
    pub db: PgPool,
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready once connected and, on the leader, once every controller is watching; a
/// standby is ready as soon as it is connected, since it can take over at any time.
async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    let connected = state.ready.load(Ordering::Relaxed);
    let leader = state.metrics.leader.get() == 1;
    match (connected, leader) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not ready: connecting"),
        (true, true) if !state.watching.all() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting watches",
        ),
        (true, true) => (StatusCode::OK, "ready (leader)"),
        (true, false) => (StatusCode::OK, "ready (standby)"),
    }
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    // Outbox figures are read at scrape time so they are never stale.
    if let Ok(backlog) = m3o_events::outbox::backlog(&state.db).await {
        state.metrics.outbox_backlog.set(backlog.count);
        let age = backlog.age(chrono::Utc::now()).num_milliseconds().max(0) as f64 / 1000.0;
        state.metrics.outbox_oldest_age.set(age);
        state.metrics.outbox_parked.set(backlog.parked);
    }
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
