//! Quotas shared by every replica, and usage metering, in Redis: one atomic script per
//! allowed request (GCRA for `requestsPerSecond` per customer across its keys, a count
//! per customer per UTC calendar month for `monthlyRequests`, a usage count per
//! customer, key, API and day). The pure parts (key layout, time windows, headers) are
//! here; [`Limiter`] does the I/O.

use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use redis::aio::ConnectionManager;

use crate::decision::Allowed;
use crate::entries::Quota;

/// Usage counts are kept this long.
const USAGE_TTL_SECS: i64 = 400 * 24 * 3600;

/// Redis keys of one customer. The `{customer}` hash tag keeps them in one cluster slot,
/// as a script's keys must be.
pub fn rate_key(prefix: &str, customer: &str) -> String {
    format!("{prefix}rate:{{{customer}}}")
}

pub fn month_key(prefix: &str, customer: &str, now: DateTime<Utc>) -> String {
    format!("{prefix}month:{{{customer}}}:{}", now.format("%Y-%m"))
}

pub fn usage_key(prefix: &str, customer: &str, day: NaiveDate) -> String {
    format!("{prefix}usage:{{{customer}}}:{}", day.format("%Y-%m-%d"))
}

/// The pattern of every usage key of a customer (for `usage`).
pub fn usage_pattern(prefix: &str, customer: &str) -> String {
    format!("{prefix}usage:{{{customer}}}:*")
}

/// The usage hash field of a key and API (`-` for a path outside `/v1/<api>`).
pub fn usage_field(key_id: &str, api: Option<&str>) -> String {
    format!("{key_id} {}", api.unwrap_or("-"))
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

/// The Redis side of limits and usage.
#[derive(Clone)]
pub struct Limiter {
    conn: ConnectionManager,
    prefix: String,
    script: redis::Script,
    timeout: Duration,
}

impl Limiter {
    /// A limiter on `client` that connects lazily (a gateway starts while Redis is down).
    pub fn new(client: redis::Client, prefix: &str, timeout: Duration) -> redis::RedisResult<Self> {
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
        })
    }

    /// Checks and counts one allowed request; `Err` when Redis did not answer in time.
    pub async fn check(&self, allowed: &Allowed, now: DateTime<Utc>) -> Result<Outcome, String> {
        let customer = &allowed.customer_id;
        let (rps, monthly) = allowed.quota.map_or((-1, -1), |q| {
            (
                i64::try_from(q.requests_per_second).unwrap_or(i64::MAX),
                i64::try_from(q.monthly_requests).unwrap_or(i64::MAX),
            )
        });
        let month_ttl = (next_month(now) - now).num_seconds() + 7 * 24 * 3600;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(rate_key(&self.prefix, customer))
            .key(month_key(&self.prefix, customer, now))
            .key(usage_key(&self.prefix, customer, now.date_naive()))
            .arg(rps)
            .arg(monthly)
            .arg(month_ttl)
            .arg(usage_field(&allowed.key_id, allowed.api.as_deref()))
            .arg(USAGE_TTL_SECS);
        let mut conn = self.conn.clone();
        let reply = tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
            .map_err(|e| e.to_string())?;
        Ok(Outcome::from_reply(reply))
    }
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
        assert_eq!(usage_field("k", None), "k -");
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
}
