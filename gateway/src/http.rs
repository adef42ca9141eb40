//! The two HTTP servers: forward-auth checks on every path of `--listen`, and
//! `/metrics`, `/healthz`, `/readyz` on `--metrics-addr`.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::Utc;

use crate::decision::{self, Allowed, Denial};
use crate::follow::IndexState;
use crate::limits::{self, Exceeded, Limiter};
use crate::metrics::{Metrics, OutcomeLabels};

/// Headers the upstream receives on an allowed request (contract).
pub const CUSTOMER_HEADER: &str = "X-M3O-Customer-Id";
pub const KEY_HEADER: &str = "X-M3O-Key-Id";

/// What a check reads.
pub struct Checker {
    pub index: Arc<IndexState>,
    /// `None` with `--no-limits`.
    pub limiter: Option<Limiter>,
    pub metrics: Arc<Metrics>,
    pub path_prefix: String,
    pub fail_open: bool,
}

/// The forward-auth router: every method and path is a check.
pub fn check_router(checker: Arc<Checker>) -> Router {
    Router::new().fallback(check).with_state(checker)
}

/// The operations router.
pub fn ops_router(index: Arc<IndexState>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state((index, metrics))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn check(State(checker): State<Arc<Checker>>, request: Request) -> Response {
    let started = Instant::now();
    let now = Utc::now();
    let response = match verdict(&checker, &request, now) {
        None => {
            checker.metrics.check("unavailable", "index_not_loaded");
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the gateway has not loaded its configuration yet",
            )
        }
        Some(Err(denial)) => deny(&checker, &denial),
        Some(Ok(allowed)) => limit(&checker, &allowed, now).await,
    };
    checker
        .metrics
        .check_duration
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The index's decision on a request (`None` before the index has loaded).
fn verdict(
    checker: &Checker,
    request: &Request,
    now: chrono::DateTime<Utc>,
) -> Option<decision::Verdict> {
    if !checker.index.loaded() {
        return None;
    }
    let headers = request.headers();
    let key = decision::presented_key(
        header_str(headers, "authorization"),
        header_str(headers, "x-api-key"),
    );
    let path = decision::original_path(
        header_str(headers, "x-original-uri"),
        header_str(headers, "x-forwarded-uri"),
        request.uri().path(),
        &checker.path_prefix,
    );
    Some(decision::decide(
        &checker.index.read(),
        key,
        path,
        now.timestamp(),
    ))
}

fn deny(checker: &Checker, denial: &Denial) -> Response {
    let decision = if denial.status == 401 {
        "unauthorized"
    } else {
        "forbidden"
    };
    checker.metrics.check(decision, denial.reason);
    let status = StatusCode::from_u16(denial.status).unwrap_or(StatusCode::FORBIDDEN);
    let mut response = plain(status, denial.reason, &denial.message);
    if denial.status == 401 {
        // RFC 6750; nginx passes this header of a 401 on to the client.
        let challenge = if denial.reason == "missing_key" {
            r#"Bearer realm="m3o""#.to_owned()
        } else {
            format!(
                r#"Bearer realm="m3o", error="invalid_token", error_description="{}""#,
                quoted_safe(&denial.message)
            )
        };
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
    }
    response
}

async fn limit(checker: &Checker, allowed: &Allowed, now: chrono::DateTime<Utc>) -> Response {
    let Some(limiter) = &checker.limiter else {
        checker.metrics.check("allowed", "ok");
        return allow(allowed, Vec::new());
    };
    let outcome = match limiter.check(allowed, now).await {
        Ok(outcome) => outcome,
        Err(err) => {
            tracing::warn!(%err, fail_open = checker.fail_open, "rate limiter unavailable");
            let outcome = if checker.fail_open {
                "allowed"
            } else {
                "denied"
            };
            checker
                .metrics
                .limiter_unavailable
                .get_or_create(&OutcomeLabels { outcome })
                .inc();
            if !checker.fail_open {
                checker.metrics.check("unavailable", "limiter");
                let mut r = plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "limiter_unavailable",
                    "rate limiter unavailable; retry shortly",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return r;
            }
            checker.metrics.check("allowed", "limiter_unavailable");
            return allow(allowed, Vec::new());
        }
    };
    let headers = limits::headers(allowed.quota, &outcome, now);
    match outcome.exceeded {
        None => {
            checker.metrics.check("allowed", "ok");
            allow(allowed, headers)
        }
        Some(which) => {
            let (reason, message) = match which {
                Exceeded::Rate => ("rate", "requests per second exceeded"),
                Exceeded::Monthly => ("monthly", "monthly requests exceeded"),
            };
            checker.metrics.check("rate_limited", reason);
            let mut r = plain(StatusCode::TOO_MANY_REQUESTS, reason, message);
            add_headers(&mut r, headers);
            r
        }
    }
}

fn allow(allowed: &Allowed, headers: Vec<(&'static str, String)>) -> Response {
    let mut r = StatusCode::OK.into_response();
    add_headers(&mut r, headers);
    let ids = [
        (CUSTOMER_HEADER, &allowed.customer_id),
        (KEY_HEADER, &allowed.key_id),
    ];
    for (name, value) in ids {
        if let Ok(v) = HeaderValue::from_str(value) {
            r.headers_mut().insert(name, v);
        }
    }
    r
}

fn add_headers(response: &mut Response, headers: Vec<(&'static str, String)>) {
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, v);
        }
    }
}

/// A JSON error body `{"error": reason, "message": message}`.
fn plain(status: StatusCode, reason: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": reason, "message": message}).to_string();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| status.into_response())
}

/// Printable ASCII without quotes or backslashes, for a quoted header parameter.
fn quoted_safe(message: &str) -> String {
    message
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .take(200)
        .collect()
}

/// Ready once the first list has loaded; afterwards always ready (a stale snapshot
/// beats refusing everything), saying how stale.
async fn readyz(State((index, _)): State<(Arc<IndexState>, Arc<Metrics>)>) -> Response {
    match index.staleness() {
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: platform config not loaded from etcd yet",
        )
            .into_response(),
        Some(stale) if stale.as_secs() >= 5 => (
            StatusCode::OK,
            format!(
                "ready (serving a snapshot at revision {}: etcd has not confirmed it for {}s)",
                index.revision(),
                stale.as_secs()
            ),
        )
            .into_response(),
        Some(stale) => (
            StatusCode::OK,
            format!(
                "ready (revision {}, confirmed {}ms ago)",
                index.revision(),
                stale.as_millis()
            ),
        )
            .into_response(),
    }
}

async fn metrics_text(State((index, metrics)): State<(Arc<IndexState>, Arc<Metrics>)>) -> Response {
    if let Some(stale) = index.staleness() {
        metrics.index_staleness.set(stale.as_secs_f64());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_safe_in_a_quoted_header() {
        assert_eq!(quoted_safe("say \"hi\"\n\\ é"), "say _hi___ _");
        assert!(HeaderValue::from_str(&quoted_safe("\u{7f}\r\n")).is_ok());
    }
}
