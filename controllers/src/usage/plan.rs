//! The pure decisions of the usage rollup.

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use m3o_events::customers::{self, EventType};
use m3o_platform_contract::usage as contract;
use uuid::Uuid;

/// Thresholds (percent of `monthlyRequests`) announced by `QuotaThresholdReached`.
pub const EVENT_THRESHOLDS: [u8; 2] = [80, 100];

/// One gateway counter: a key's allowed requests to an API on a UTC day.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Counter {
    pub customer_id: Uuid,
    pub key_id: Uuid,
    pub api: String,
    pub day: NaiveDate,
    pub requests: i64,
}

/// The counters of one usage hash (`key`, its `fields`), and how many fields were not
/// the gateway's (not `<uuid> <api>` with a non-negative count): those are skipped.
pub fn counters_of(
    prefix: &str,
    key: &str,
    fields: impl IntoIterator<Item = (String, i64)>,
) -> (Vec<Counter>, usize) {
    let parsed = contract::parse_usage_key(prefix, key).and_then(|(customer, day)| {
        Some((
            Uuid::parse_str(customer).ok()?,
            NaiveDate::parse_from_str(day, "%Y-%m-%d").ok()?,
        ))
    });
    let mut out = Vec::new();
    let mut skipped = 0;
    for (field, requests) in fields {
        let counter = parsed.and_then(|(customer_id, day)| {
            let (key_id, api) = contract::parse_usage_field(&field)?;
            (requests >= 0).then_some(())?;
            Some(Counter {
                customer_id,
                key_id: Uuid::parse_str(key_id).ok()?,
                api: api.to_owned(),
                day,
                requests,
            })
        });
        match counter {
            Some(c) => out.push(c),
            None => skipped += 1,
        }
    }
    (out, skipped)
}

/// The days a rollup at `now` reads: today, and yesterday (its last requests, and its
/// confirmation once closed).
pub fn days_to_roll(now: DateTime<Utc>) -> [NaiveDate; 2] {
    let today = now.date_naive();
    [today.pred_opt().unwrap_or(today), today]
}

/// True once `day` is over for every gateway (its end plus the grace): its counters
/// are final, and the rollup that commits them confirms them.
pub fn closed(day: NaiveDate, now: DateTime<Utc>) -> bool {
    let end = day
        .succ_opt()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc());
    end.is_some_and(|end| now >= end + Duration::seconds(contract::CLOSE_GRACE_SECS))
}

/// The billing period (`YYYY-MM`, UTC) of a day.
pub fn period_of(day: NaiveDate) -> String {
    day.format("%Y-%m").to_string()
}

/// First day of a period and first day of the next one, or `None` for a malformed period.
pub fn period_days(period: &str) -> Option<(NaiveDate, NaiveDate)> {
    let first = NaiveDate::parse_from_str(&format!("{period}-01"), "%Y-%m-%d").ok()?;
    let next = if first.month() == 12 {
        NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)?
    } else {
        NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)?
    };
    Some((first, next))
}

/// The event thresholds `requests` of `monthly` has reached. A quota of 0 (or less)
/// has none: there is nothing to run out of gradually.
pub fn thresholds_reached(requests: i64, monthly: i64) -> Vec<u8> {
    if monthly <= 0 {
        return Vec::new();
    }
    EVENT_THRESHOLDS
        .into_iter()
        .filter(|p| i128::from(requests) * 100 >= i128::from(monthly) * i128::from(*p))
        .collect()
}

/// The `QuotaThresholdReached` event.
pub fn threshold_event(
    customer: customers::Customer,
    percent: u8,
    period: &str,
    requests: i64,
    monthly: i64,
) -> customers::Event {
    let mut event = customers::Event {
        customer: Some(customer),
        quota_threshold_reached: Some(customers::QuotaThresholdReached {
            percent: u32::from(percent),
            period: period.to_owned(),
            requests: requests.max(0) as u64,
            monthly_requests: monthly.max(0) as u64,
        }),
        ..Default::default()
    };
    event.set_type(EventType::QuotaThresholdReached);
    event
}

/// The note of the Kubernetes Event beside it.
pub fn threshold_note(percent: u8, period: &str, requests: i64, monthly: i64) -> String {
    format!(
        "{requests} of {monthly} monthly requests used in {period}: {percent}% of the quota reached"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("time").to_utc()
    }

    const C: &str = "0191e5a0-0000-7000-8000-000000000001";
    const K: &str = "0191e5a0-0000-7000-8000-000000000002";

    #[test]
    fn counters_parse_the_gateway_layout_and_skip_strangers() {
        let key = contract::usage_key("p:", C, "2026-12-04");
        let fields = vec![
            (format!("{K} weather"), 7),
            (format!("{K} -"), 1),
            ("not-a-uuid x".to_owned(), 3),
            (format!("{K}"), 3),
            (format!("{K} neg"), -1),
        ];
        let (counters, skipped) = counters_of("p:", &key, fields);
        assert_eq!(skipped, 3);
        assert_eq!(counters.len(), 2);
        assert_eq!(counters[0].api, "weather");
        assert_eq!(counters[0].requests, 7);
        assert_eq!(counters[0].day.to_string(), "2026-12-04");
        let (none, skipped) = counters_of("p:", "p:usage:{x}:2026-12-04", [(format!("{K} a"), 1)]);
        assert!(none.is_empty());
        assert_eq!(skipped, 1);
    }

    #[test]
    fn a_day_closes_after_its_end_and_the_grace() {
        let day = NaiveDate::from_ymd_opt(2026, 12, 31).expect("day");
        assert!(!closed(day, at("2026-12-31T23:59:59Z")));
        assert!(!closed(day, at("2027-01-01T00:09:59Z")));
        assert!(closed(day, at("2027-01-01T00:10:00Z")));
        let [yesterday, today] = days_to_roll(at("2027-01-01T00:00:01Z"));
        assert_eq!(
            (yesterday.to_string(), today.to_string()),
            ("2026-12-31".into(), "2027-01-01".into())
        );
    }

    #[test]
    fn periods_are_utc_months() {
        let day = NaiveDate::from_ymd_opt(2026, 12, 31).expect("day");
        assert_eq!(period_of(day), "2026-12");
        let (first, next) = period_days("2026-12").expect("period");
        assert_eq!(
            (first.to_string(), next.to_string()),
            ("2026-12-01".into(), "2027-01-01".into())
        );
        assert_eq!(period_days("2026-13"), None);
        assert_eq!(period_days("x"), None);
    }

    #[test]
    fn thresholds_are_80_and_100_percent() {
        assert!(thresholds_reached(79, 100).is_empty());
        assert_eq!(thresholds_reached(80, 100), [80]);
        assert_eq!(thresholds_reached(99, 100), [80]);
        assert_eq!(thresholds_reached(100, 100), [80, 100]);
        assert_eq!(thresholds_reached(250, 100), [80, 100]);
        assert_eq!(thresholds_reached(4, 5), [80]);
        assert!(thresholds_reached(10, 0).is_empty());
        assert_eq!(thresholds_reached(i64::MAX, i64::MAX), [80, 100]);
    }

    #[test]
    fn threshold_event_carries_the_payload_and_type_name() {
        let e = threshold_event(
            customers::Customer {
                id: C.into(),
                ..Default::default()
            },
            80,
            "2026-12",
            80,
            100,
        );
        assert_eq!(e.r#type(), EventType::QuotaThresholdReached);
        assert_eq!(e.r#type().as_str_name(), "EventTypeQuotaThresholdReached");
        let p = e.quota_threshold_reached.expect("payload");
        assert_eq!(
            (p.percent, p.period.as_str(), p.requests, p.monthly_requests),
            (80, "2026-12", 80, 100)
        );
        assert_eq!(e.customer.map(|c| c.id).as_deref(), Some(C));
        assert!(threshold_note(100, "2026-12", 100, 100).contains("100%"));
    }
}
