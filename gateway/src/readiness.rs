//! What `/readyz` says besides the index (http.rs): a replica that is shutting down, and
//! a Redis user that may not run the limiter's script, answer 503 with one line.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::limits::{Limiter, Unavailable};

/// Shared by the ops server and the shutdown path.
pub struct Gate {
    draining: AtomicBool,
    limiter: Option<Limiter>,
}

impl Gate {
    pub fn new(limiter: Option<Limiter>) -> Self {
        Self {
            draining: AtomicBool::new(false),
            limiter,
        }
    }

    /// From now on `/readyz` fails, so the replica leaves the Service's endpoints while
    /// it still answers checks.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Why the replica is not ready, beyond the index: `None` when nothing here objects.
    /// Probes the script's permission on every call; a Redis that does not answer
    /// objects to nothing (the fail mode covers it), a refusal does until it is fixed.
    pub async fn objection(&self) -> Option<String> {
        if self.draining() {
            return Some("not ready: shutting down (draining before the listener closes)".into());
        }
        let limiter = self.limiter.as_ref()?;
        let _ = limiter.verify().await;
        limiter
            .forbidden()
            .map(|reason| format!("not ready: {}", Unavailable::Forbidden(reason)))
    }
}

/// Middleware of the ops router: answers `/readyz` itself when [`Gate`] objects.
pub async fn gate(State(gate): State<Arc<Gate>>, request: Request, next: Next) -> Response {
    if request.uri().path() == "/readyz"
        && let Some(reason) = gate.objection().await
    {
        return (StatusCode::SERVICE_UNAVAILABLE, reason).into_response();
    }
    next.run(request).await
}
