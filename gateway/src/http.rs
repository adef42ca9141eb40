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
use crate::limits::{self, Exceeded, Limiter, RareLog, Unavailable};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::report::Bound;
use crate::settings::{StaleMode, UriSource};

/// Headers the upstream receives on an allowed request (contract).
pub const CUSTOMER_HEADER: &str = "X-M3O-Customer-Id";
pub const KEY_HEADER: &str = "X-M3O-Key-Id";

/// What a check reads.
pub struct Checker {
    pub index: Arc<IndexState>,
    /// `None` with `--no-limits`.
    pub limiter: Option<Limiter>,
    pub metrics: Arc<Metrics>,
    /// The one place the original URI is read from.
    pub uri_source: UriSource,
    pub path_prefix: String,
    pub fail_open: bool,
    /// "Redis unavailable" at most every few seconds.
    pub limiter_log: RareLog,
    /// `--max-staleness` and `--stale-mode`.
    pub bound: Bound,
}

/// True when checks must be refused: etcd has not vouched for this replica for longer
/// than its bound, under `--stale-mode=fail`.
pub fn too_stale(index: &IndexState, bound: Bound) -> bool {
    bound.mode == StaleMode::Fail
        && index
            .unconfirmed_for()
            .is_some_and(|d| d > bound.max_staleness)
}

/// The forward-auth router: every method and path is a check.
pub fn check_router(checker: Arc<Checker>) -> Router {
    Router::new().fallback(check).with_state(checker)
}

/// The operations router.
pub fn ops_router(index: Arc<IndexState>, metrics: Arc<Metrics>, bound: Bound) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Ops {
            index,
            metrics,
            bound,
        })
}

#[derive(Clone)]
struct Ops {
    index: Arc<IndexState>,
    metrics: Arc<Metrics>,
    bound: Bound,
}

/// A header as text: `Ok(None)` when absent, `Err` when present but not visible ASCII
/// (never read as absent: a header that cannot be read is a 400, not a fallback).
fn header_str<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, Denial> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| Denial {
            status: 400,
            reason: "bad_header",
            message: format!("the {name} header is not readable"),
        }),
    }
}

async fn check(State(checker): State<Arc<Checker>>, request: Request) -> Response {
    let started = Instant::now();
    let now = Utc::now();
    let response = match verdict(&checker, &request, now) {
        None => not_loaded(&checker),
        // Decided from a snapshot etcd no longer vouches for: the operator may already
        // have stopped counting this replica (`GatewaySynced`).
        Some(_) if too_stale(&checker.index, checker.bound) => index_stale(&checker),
        Some(Err(denial)) => deny(&checker, &denial),
        Some(Ok(allowed)) => match limit(&checker, &allowed, now).await {
            // The index may have changed while Redis answered (a key blocked, a
            // customer banned): a 200 goes out only if it still allows the request.
            Limits::Through(allow_headers) => match verdict(&checker, &request, Utc::now()) {
                Some(_) if too_stale(&checker.index, checker.bound) => index_stale(&checker),
                Some(Ok(_)) => allow(&checker, &allowed, allow_headers),
                Some(Err(denial)) => deny(&checker, &denial),
                None => not_loaded(&checker),
            },
            Limits::Refused(refused) => refused,
        },
    };
    checker
        .metrics
        .check_duration
        .observe(started.elapsed().as_secs_f64());
    response
}

fn not_loaded(checker: &Checker) -> Response {
    checker.metrics.check("unavailable", "index_not_loaded");
    plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        "the gateway has not loaded its configuration yet",
    )
}

fn index_stale(checker: &Checker) -> Response {
    checker.metrics.check("unavailable", "index_stale");
    retry_soon(
        "index_stale",
        "etcd has not confirmed this gateway's configuration for longer than --max-staleness; retry shortly",
    )
}

/// The index's decision on a request (`None` before the index has loaded).
fn verdict(
    checker: &Checker,
    request: &Request,
    now: chrono::DateTime<Utc>,
) -> Option<decision::Decision> {
    if !checker.index.loaded() {
        return None;
    }
    let headers = request.headers();
    let read = || -> Result<_, Denial> {
        let key = decision::presented_key(
            header_str(headers, "authorization")?,
            header_str(headers, "x-api-key")?,
        );
        let source = match decision::uri_header(checker.uri_source) {
            Some(name) => {
                let mut values = headers.get_all(name).iter();
                let first = values.next();
                if values.next().is_some() {
                    return Err(Denial {
                        status: 400,
                        reason: "bad_uri",
                        message: format!("the {name} header is sent more than once"),
                    });
                }
                first.map(HeaderValue::as_bytes)
            }
            None => None,
        };
        let path = decision::original_path(
            checker.uri_source,
            source,
            request.uri().path(),
            &checker.path_prefix,
        )?;
        Ok((key, path))
    };
    Some(read().and_then(|(key, path)| {
        checker
            .index
            .read(|index| decision::decide(index, key, path, now.timestamp()))
    }))
}

fn deny(checker: &Checker, denial: &Denial) -> Response {
    let decision = match denial.status {
        400 => "bad_request",
        401 => "unauthorized",
        _ => "forbidden",
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

/// What the limits let through: the headers of the 200 and the metric's reason.
type Limited = (Vec<(&'static str, String)>, &'static str);

/// What the limits decided.
enum Limits {
    Through(Limited),
    Refused(Response),
}

/// Limits and usage: `Ok` for a 200, or the refusal.
async fn limit(checker: &Checker, allowed: &Allowed, now: chrono::DateTime<Utc>) -> Limits {
    let Some(limiter) = &checker.limiter else {
        return Limits::Through((Vec::new(), "ok"));
    };
    if allowed.quota_unreadable {
        // Fail closed: an unreadable quota must not make the customer unlimited. The
        // follower logged the entry's key when it read it.
        checker.metrics.check("unavailable", "quota_unreadable");
        return Limits::Refused(retry_soon(
            "quota_unreadable",
            "the customer's quota cannot be read; retry shortly",
        ));
    }
    let outcome = match limiter.check(allowed, now).await {
        Ok(outcome) => outcome,
        // A refusal of the script (now, or remembered while Redis is away) is a
        // configuration error, not an outage: never let it make limits vanish. Every
        // check still asks Redis, so fixing the ACL clears it without a restart.
        Err(err) => match limiter.forbidden() {
            Some(reason) => return unlimited(checker, &Unavailable::Forbidden(reason)),
            None => return unlimited(checker, &err),
        },
    };
    let headers = limits::headers(allowed.quota, &outcome, now);
    match outcome.exceeded {
        None => Limits::Through((headers, "ok")),
        Some(which) => {
            let (reason, message) = match which {
                Exceeded::Rate => ("rate", "requests per second exceeded"),
                Exceeded::Monthly => ("monthly", "monthly requests exceeded"),
            };
            checker.metrics.check("rate_limited", reason);
            let mut r = plain(StatusCode::TOO_MANY_REQUESTS, reason, message);
            add_headers(&mut r, headers);
            Limits::Refused(r)
        }
    }
}

/// The fail mode's answer when the limiter has none.
fn unlimited(checker: &Checker, err: &Unavailable) -> Limits {
    // The fail mode covers Redis being away, never Redis refusing the script.
    let fail_open = checker.fail_open && !matches!(err, Unavailable::Forbidden(_));
    let outcome = if fail_open { "allowed" } else { "denied" };
    checker
        .metrics
        .limiter_unavailable
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    if let Some(skipped) = checker.limiter_log.due() {
        tracing::warn!(%err, fail_open, skipped, "rate limiter unavailable (further occurrences are counted in m3o_gateway_limiter_unavailable_total)");
    }
    if let Unavailable::Forbidden(_) = err {
        checker.metrics.check("unavailable", "limiter_forbidden");
        Limits::Refused(retry_soon(
            "limiter_forbidden",
            "the gateway's Redis user may not run the rate limiter; see its /readyz",
        ))
    } else if fail_open {
        Limits::Through((Vec::new(), "limiter_unavailable"))
    } else {
        checker.metrics.check("unavailable", "limiter");
        Limits::Refused(retry_soon(
            "limiter_unavailable",
            "rate limiter unavailable; retry shortly",
        ))
    }
}

fn retry_soon(reason: &str, message: &str) -> Response {
    let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, reason, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// A 200 carries both identity headers, or it is not a 200.
fn allow(checker: &Checker, allowed: &Allowed, (headers, reason): Limited) -> Response {
    let (Ok(customer), Ok(key)) = (
        HeaderValue::from_str(&allowed.customer_id),
        HeaderValue::from_str(&allowed.key_id),
    ) else {
        checker.metrics.check("unavailable", "bad_identity");
        tracing::error!(
            key_id = allowed.key_id.escape_debug().to_string(),
            "an entry's customerId or keyId cannot be sent as a header; refused"
        );
        return retry_soon("bad_identity", "the key's entry cannot be sent upstream");
    };
    checker.metrics.check("allowed", reason);
    let mut r = StatusCode::OK.into_response();
    add_headers(&mut r, headers);
    r.headers_mut().insert(CUSTOMER_HEADER, customer);
    r.headers_mut().insert(KEY_HEADER, key);
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

/// Ready once the first list has loaded and while etcd vouches for the index (within
/// `--max-staleness`); under `--stale-mode=serve` ready on a stale snapshot too, saying
/// how stale.
async fn readyz(State(ops): State<Ops>) -> Response {
    let index = &ops.index;
    if too_stale(index, ops.bound) {
        let unconfirmed = index.unconfirmed_for().unwrap_or_default();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: index_stale: etcd has not confirmed the index at revision {} (or this replica's report lease) for {}s, over --max-staleness {}s",
                index.revision(),
                unconfirmed.as_secs(),
                ops.bound.max_staleness.as_secs_f64()
            ),
        )
            .into_response();
    }
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

async fn metrics_text(State(ops): State<Ops>) -> Response {
    let Ops {
        index,
        metrics,
        bound,
    } = &ops;
    if let Some(stale) = index.staleness() {
        metrics.index_staleness.set(stale.as_secs_f64());
    }
    metrics.index_stale.set(i64::from(too_stale(index, *bound)));
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
    use std::time::Duration;

    use super::*;

    #[test]
    fn only_the_fail_mode_refuses_past_the_bound() {
        let index = IndexState::default();
        let bound = |mode| Bound {
            max_staleness: Duration::from_millis(20),
            mode,
        };
        assert!(
            !too_stale(&index, bound(StaleMode::Fail)),
            "not loaded: not_ready, not stale"
        );
        drop(index.replace(crate::index::Index::default(), 1));
        index.report_renewed(std::time::Instant::now());
        assert!(!too_stale(&index, bound(StaleMode::Fail)));
        std::thread::sleep(Duration::from_millis(40));
        assert!(too_stale(&index, bound(StaleMode::Fail)));
        assert!(!too_stale(&index, bound(StaleMode::Serve)));
    }

    #[test]
    fn messages_are_safe_in_a_quoted_header() {
        assert_eq!(quoted_safe("say \"hi\"\n\\ é"), "say _hi___ _");
        assert!(HeaderValue::from_str(&quoted_safe("\u{7f}\r\n")).is_ok());
    }
}
