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
use m3o_controllers::metrics::Metrics;
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
    }
    let published = state.relay.published_total();
    let counted = state.metrics.events_published.get();
    if published > counted {
        state.metrics.events_published.inc_by(published - counted);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    )
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
