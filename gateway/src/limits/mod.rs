//! Quotas shared by every replica, and usage metering, in Redis: one atomic script per
//! allowed request (GCRA for `requestsPerSecond` per customer across its keys, a count
//! per customer per UTC calendar month for `monthlyRequests`, a usage count per
//! customer, key, API and day). The pure parts (key layout, time windows, headers) are
//! here; [`Limiter`] does the I/O.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use redis::aio::ConnectionManager;

use crate::decision::Allowed;
use crate::entries::Quota;

/// A day's usage hash is kept this long unless the operator confirms it sooner
/// (the contract's retention, see [`crate::usage`]).
const USAGE_TTL_SECS: i64 = m3o_platform_contract::usage::UNCONFIRMED_RETENTION_SECS;
/// Longest API name metered as such; a longer one counts under `-`.
pub const MAX_USAGE_API_LEN: usize = 64;
/// At most one "Redis unavailable" log line per this long (the rest are counted in it).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The API a request is metered under: its API when a scope of some key of the
/// customer names it or `--usage-apis` lists it (and it is at most
/// [`MAX_USAGE_API_LEN`] long), else `-`. So a client cannot add hash fields at will by
/// calling made-up `/v1/<x>` paths.
pub fn usage_api<'a>(allowed: &'a Allowed, listed: &HashSet<String>) -> &'a str {
    match allowed.api.as_deref() {
        Some(api)
            if api.len() <= MAX_USAGE_API_LEN && (allowed.known_api || listed.contains(api)) =>
        {
            api
        }
        _ => "-",
    }
}

/// Redis keys of one customer. The `{customer}` hash tag keeps them in one cluster slot,
/// as a script's keys must be.
pub fn rate_key(prefix: &str, customer: &str) -> String {
    format!("{prefix}rate:{{{customer}}}")
}

pub fn month_key(prefix: &str, customer: &str, now: DateTime<Utc>) -> String {
    format!("{prefix}month:{{{customer}}}:{}", now.format("%Y-%m"))
}

pub fn usage_key(prefix: &str, customer: &str, day: NaiveDate) -> String {
    let day = day.format("%Y-%m-%d").to_string();
    m3o_platform_contract::usage::usage_key(prefix, customer, &day)
}

/// The pattern of every usage key of a customer (for `usage`).
pub fn usage_pattern(prefix: &str, customer: &str) -> String {
    m3o_platform_contract::usage::usage_customer_pattern(prefix, customer)
}

/// The usage hash field of a key and API (`-` for a path outside `/v1/<api>` or an
/// API not metered, see [`usage_api`]).
pub fn usage_field(key_id: &str, api: &str) -> String {
    m3o_platform_contract::usage::usage_field(key_id, api)
}

/// Start of the next UTC calendar month.
pub fn next_month(now: DateTime<Utc>) -> DateTime<Utc> {
    let (y, m) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .single()
        .unwrap_or(now + chrono::Duration::days(31))
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Rate,
    Monthly,
}

/// The script's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub exceeded: Option<Exceeded>,
    /// How long until a refused request may succeed.
    pub retry_after: Duration,
    /// Requests left in the current second's burst (when a rate applies).
    pub rate_remaining: Option<u64>,
    /// Requests counted this month, this one included when allowed.
    pub month_used: u64,
    /// When the rate burst is whole again.
    pub rate_reset: Duration,
}

impl Outcome {
    /// Decodes `{allowed, exceeded, retry_after_us, rate_remaining, month_used, rate_reset_us}`.
    fn from_reply(reply: (i64, String, i64, i64, i64, i64)) -> Self {
        let (allowed, exceeded, retry_us, remaining, used, reset_us) = reply;
        let exceeded = match (allowed, exceeded.as_str()) {
            (1, _) => None,
            (_, "monthly") => Some(Exceeded::Monthly),
            _ => Some(Exceeded::Rate),
        };
        Self {
            exceeded,
            retry_after: Duration::from_micros(retry_us.max(0) as u64),
            rate_remaining: (remaining >= 0).then_some(remaining as u64),
            month_used: used.max(0) as u64,
            rate_reset: Duration::from_micros(reset_us.max(0) as u64),
        }
    }
}

/// Whole seconds, rounded up, at least 1 (Retry-After and RateLimit-Reset are integers).
fn ceil_secs(d: Duration) -> u64 {
    d.as_micros().div_ceil(1_000_000).max(1) as u64
}

/// `Retry-After` and `RateLimit-*` headers for a decision with `quota` at `now`:
/// the limit that refused the request, else the per-second limit, else the monthly one.
pub fn headers(
    quota: Option<Quota>,
    outcome: &Outcome,
    now: DateTime<Utc>,
) -> Vec<(&'static str, String)> {
    let Some(quota) = quota else {
        return Vec::new();
    };
    let month_reset = (next_month(now) - now).to_std().unwrap_or_default();
    let mut out = Vec::new();
    let policy = format!(
        "{};w=1, {};w={}",
        quota.requests_per_second,
        quota.monthly_requests,
        month_reset.as_secs()
    );
    let monthly = || {
        let left = quota.monthly_requests.saturating_sub(outcome.month_used);
        (quota.monthly_requests, left, month_reset)
    };
    let (limit, remaining, reset) = match outcome.exceeded {
        Some(Exceeded::Monthly) => {
            out.push(("Retry-After", ceil_secs(month_reset).to_string()));
            (quota.monthly_requests, 0, month_reset)
        }
        Some(Exceeded::Rate) => {
            out.push(("Retry-After", ceil_secs(outcome.retry_after).to_string()));
            (quota.requests_per_second, 0, outcome.rate_reset)
        }
        None => match outcome.rate_remaining {
            Some(left) => (quota.requests_per_second, left, outcome.rate_reset),
            None => monthly(),
        },
    };
    out.push(("RateLimit-Limit", limit.to_string()));
    out.push(("RateLimit-Remaining", remaining.to_string()));
    out.push(("RateLimit-Reset", ceil_secs(reset).to_string()));
    out.push(("RateLimit-Policy", policy));
    out
}

/// Why the limiter has no answer: the fail mode decides.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// The breaker is open: Redis was not asked.
    #[error("Redis skipped: the circuit breaker is open after repeated failures")]
    Open,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Redis ran the script after its deadline and counted nothing.
    #[error("Redis answered too late; the request was not counted")]
    Late,
    #[error("{0}")]
    Failed(String),
    /// Redis refused the script to this user (an ACL): a configuration error, never
    /// covered by the fail mode.
    #[error(
        "the Redis user may not run the limiter's script ({0}); grant it the gateway's ACL (README: Secure connections)"
    )]
    Forbidden(String),
}

/// Customer id of the permission probe's keys (never a real customer: ids are UUIDs).
pub const PROBE_CUSTOMER: &str = "m3o-permission-probe";

/// Whether Redis refused a command to this user: an ACL (`NOPERM`, or a script's call
/// of a command the user may not run).
pub fn is_permission_error(err: &redis::RedisError) -> bool {
    let text = err.to_string();
    err.code() == Some("NOPERM") || text.contains("NOPERM") || text.contains("no permissions")
}

/// A circuit breaker on Redis: after `threshold` failures in a row, checks skip Redis
/// (the fail mode decides at once) until a background probe finds it answering again,
/// at most every `cooldown`.
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: AtomicU32,
    open: AtomicBool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Release);
    }

    /// Records a failure; true for the one that opened the breaker.
    fn failed(&self) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        failures >= self.threshold
            && self
                .open
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    fn close(&self) {
        self.failures.store(0, Ordering::Release);
        self.open.store(false, Ordering::Release);
    }
}

/// Logs at most once per [`LOG_EVERY`], saying how many were left out.
#[derive(Default)]
pub struct RareLog {
    last: Mutex<Option<Instant>>,
    skipped: AtomicU32,
}

impl RareLog {
    /// True when this occurrence should be logged; `skipped` then says how many were not.
    pub fn due(&self) -> Option<u32> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(Instant::now());
        Some(self.skipped.swap(0, Ordering::Relaxed))
    }
}

/// The Redis side of limits and usage.
#[derive(Clone)]
pub struct Limiter {
    conn: ConnectionManager,
    prefix: String,
    script: redis::Script,
    timeout: Duration,
    usage_apis: Arc<HashSet<String>>,
    pub breaker: Arc<Breaker>,
    /// Redis's clock minus ours (µs), learnt from replies: the script's deadline is on
    /// Redis's clock. `i64::MIN` until the first reply.
    offset_us: Arc<AtomicI64>,
    /// Why Redis refuses this user the script, from the last check or probe that met
    /// an ACL; cleared when the script runs again.
    forbidden: Arc<Mutex<Option<String>>>,
}

fn unix_micros() -> i64 {
    Utc::now().timestamp_micros()
}

impl Limiter {
    /// A limiter on `client` that connects lazily (a gateway starts while Redis is down).
    pub fn new(
        client: redis::Client,
        prefix: &str,
        timeout: Duration,
        usage_apis: &[String],
        breaker: Breaker,
    ) -> redis::RedisResult<Self> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        Ok(Self {
            conn: ConnectionManager::new_lazy_with_config(client, config)?,
            prefix: prefix.to_owned(),
            script: redis::Script::new(include_str!("script.lua")),
            timeout,
            usage_apis: Arc::new(usage_apis.iter().cloned().collect()),
            breaker: Arc::new(breaker),
            offset_us: Arc::new(AtomicI64::new(i64::MIN)),
            forbidden: Arc::new(Mutex::new(None)),
        })
    }

    /// Checks and counts one allowed request. `Err` when the breaker is open, or Redis
    /// did not answer in time; a request it did not answer is not counted (the script
    /// refuses to count after a deadline before ours).
    pub async fn check(
        &self,
        allowed: &Allowed,
        now: DateTime<Utc>,
    ) -> Result<Outcome, Unavailable> {
        if self.breaker.is_open() {
            return Err(Unavailable::Open);
        }
        let result = self.invoke(allowed, now).await;
        match &result {
            Ok(_) => self.breaker.succeeded(),
            // Not an outage: the breaker stays closed, the refusal is remembered.
            Err(Unavailable::Forbidden(_)) => {}
            Err(err) => {
                if self.breaker.failed() {
                    tracing::warn!(
                        %err,
                        failures = self.breaker.threshold,
                        cooldown = ?self.breaker.cooldown,
                        "Redis failed repeatedly: the rate limiter skips it (the fail mode decides) until it answers again"
                    );
                    self.probe();
                }
            }
        }
        result
    }

    async fn invoke(&self, allowed: &Allowed, now: DateTime<Utc>) -> Result<Outcome, Unavailable> {
        let customer = &allowed.customer_id;
        let (rps, monthly) = allowed.quota.map_or((-1, -1), |q| {
            (
                i64::try_from(q.requests_per_second).unwrap_or(i64::MAX),
                i64::try_from(q.monthly_requests).unwrap_or(i64::MAX),
            )
        });
        let month_ttl = (next_month(now) - now).num_seconds() + 7 * 24 * 3600;
        let timeout_us = i64::try_from(self.timeout.as_micros()).unwrap_or(i64::MAX);
        let sent = unix_micros();
        // Half our timeout on Redis's clock: the other half covers the offset's error
        // (at most half a round trip of at most half the timeout) and the reply's trip.
        let offset = self.offset_us.load(Ordering::Relaxed);
        let deadline = if offset == i64::MIN {
            -1
        } else {
            sent.saturating_add(offset).saturating_add(timeout_us / 2)
        };
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(rate_key(&self.prefix, customer))
            .key(month_key(&self.prefix, customer, now))
            .key(usage_key(&self.prefix, customer, now.date_naive()))
            .arg(rps)
            .arg(monthly)
            .arg(month_ttl)
            .arg(usage_field(
                &allowed.key_id,
                usage_api(allowed, &self.usage_apis),
            ))
            .arg(USAGE_TTL_SECS)
            .arg(deadline);
        let mut conn = self.conn.clone();
        let reply: (i64, String, i64, i64, i64, i64, i64) =
            tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn))
                .await
                .map_err(|_| Unavailable::Timeout(self.timeout))?
                .map_err(|e| self.refused(e))?;
        self.set_forbidden(None);
        let received = unix_micros();
        let (allowed, exceeded, retry_us, remaining, used, reset_us, redis_now) = reply;
        let rtt = received - sent;
        if rtt <= timeout_us / 2 {
            self.offset_us
                .store(redis_now - (sent + rtt / 2), Ordering::Relaxed);
        }
        if allowed < 0 {
            return Err(Unavailable::Late);
        }
        Ok(Outcome::from_reply((
            allowed, exceeded, retry_us, remaining, used, reset_us,
        )))
    }

    /// Why Redis refuses this user the limiter's script, when the last check or probe
    /// met an ACL.
    pub fn forbidden(&self) -> Option<String> {
        self.forbidden
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_forbidden(&self, reason: Option<String>) {
        *self.forbidden.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }

    /// A Redis error as the limiter's answer, remembering an ACL refusal.
    fn refused(&self, err: redis::RedisError) -> Unavailable {
        if is_permission_error(&err) {
            let reason = one_line(&err.to_string());
            self.set_forbidden(Some(reason.clone()));
            Unavailable::Forbidden(reason)
        } else {
            Unavailable::Failed(err.to_string())
        }
    }

    /// Proves this Redis user may run the limiter's script on its keys, counting
    /// nothing (the script's probe mode, run by EVALSHA and loaded by SCRIPT LOAD as a
    /// check is). `Forbidden` is remembered until a probe or check succeeds; any other
    /// error (Redis down, slow) says nothing about permissions.
    pub async fn verify(&self) -> Result<(), Unavailable> {
        let now = Utc::now();
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(rate_key(&self.prefix, PROBE_CUSTOMER))
            .key(month_key(&self.prefix, PROBE_CUSTOMER, now))
            .key(usage_key(&self.prefix, PROBE_CUSTOMER, now.date_naive()))
            .arg(-1)
            .arg(-1)
            .arg(1)
            .arg(usage_field("probe", "-"))
            .arg(1)
            .arg(-2);
        let mut conn = self.conn.clone();
        let reply: (i64, String, i64, i64, i64, i64, i64) = tokio::time::timeout(
            self.timeout.max(Duration::from_secs(1)),
            invocation.invoke_async(&mut conn),
        )
        .await
        .map_err(|_| Unavailable::Timeout(self.timeout))?
        .map_err(|e| self.refused(e))?;
        if reply.0 != -2 {
            return Err(Unavailable::Failed(format!(
                "the limiter's script answered its permission probe with {}",
                reply.0
            )));
        }
        self.set_forbidden(None);
        Ok(())
    }

    /// Closes the breaker once Redis answers a PING, trying every cooldown.
    fn probe(&self) {
        let (mut conn, breaker, timeout) = (self.conn.clone(), self.breaker.clone(), self.timeout);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(breaker.cooldown).await;
                let ping = redis::cmd("PING");
                let answered = tokio::time::timeout(timeout, ping.query_async::<String>(&mut conn));
                if let Ok(Ok(_)) = answered.await {
                    breaker.close();
                    tracing::info!("Redis answers again: the rate limiter uses it again");
                    return;
                }
            }
        });
    }
}

/// The first line of a server's error, bounded (a readiness body, a log field).
fn one_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn keys_share_the_customer_hash_tag_and_windows_are_utc() {
        let now = at("2026-12-31T23:59:59Z");
        assert_eq!(rate_key("p:", "c"), "p:rate:{c}");
        assert_eq!(month_key("p:", "c", now), "p:month:{c}:2026-12");
        assert_eq!(
            usage_key("p:", "c", now.date_naive()),
            "p:usage:{c}:2026-12-31"
        );
        assert_eq!(next_month(now), at("2027-01-01T00:00:00Z"));
        assert_eq!(
            next_month(at("2026-02-10T00:00:00Z")),
            at("2026-03-01T00:00:00Z")
        );
        assert_eq!(usage_field("k", "-"), "k -");
    }

    #[test]
    fn headers_name_the_limit_that_refused() {
        let quota = Some(Quota {
            monthly_requests: 100,
            requests_per_second: 5,
        });
        let now = at("2026-11-30T23:59:00Z");
        let rate = Outcome::from_reply((0, "rate".into(), 150_000, 0, 10, 900_000));
        let h = headers(quota, &rate, now);
        assert!(h.contains(&("Retry-After", "1".into())));
        assert!(h.contains(&("RateLimit-Limit", "5".into())));
        assert!(h.contains(&("RateLimit-Remaining", "0".into())));
        let month = Outcome::from_reply((0, "monthly".into(), 0, 0, 100, 0));
        let h = headers(quota, &month, now);
        assert!(h.contains(&("Retry-After", "60".into())));
        assert!(h.contains(&("RateLimit-Limit", "100".into())));
        let ok = Outcome::from_reply((1, String::new(), 0, 3, 11, 400_000));
        assert_eq!(ok.exceeded, None);
        let h = headers(quota, &ok, now);
        assert!(h.contains(&("RateLimit-Remaining", "3".into())));
        assert!(!h.iter().any(|(n, _)| *n == "Retry-After"));
        assert!(headers(None, &ok, now).is_empty());
    }

    #[test]
    fn acl_refusals_are_permission_errors_and_outages_are_not() {
        let noperm = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm),
            "this user has no permissions to run the 'evalsha' command",
        ));
        assert!(is_permission_error(&noperm));
        let io =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!is_permission_error(&io));
        assert_eq!(one_line("a\nb"), "a");
    }
}
