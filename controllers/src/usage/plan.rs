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
    /// The epoch of the hash it was read from ([`contract::EPOCH_FIELD`]; 0 without one).
    pub epoch: i64,
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
    let (mut counted, mut epoch): (Vec<(String, i64)>, i64) = (Vec::new(), 0);
    for (field, value) in fields {
        if field == contract::EPOCH_FIELD {
            epoch = value.max(0);
        } else {
            counted.push((field, value));
        }
    }
    let mut out = Vec::new();
    let mut skipped = 0;
    for (field, requests) in counted {
        let counter = parsed.and_then(|(customer_id, day)| {
            let (key_id, api) = contract::parse_usage_field(&field)?;
            (requests >= 0).then_some(())?;
            Some(Counter {
                customer_id,
                key_id: Uuid::parse_str(key_id).ok()?,
                api: api.to_owned(),
                day,
                requests,
                epoch,
            })
        });
        match counter {
            Some(c) => out.push(c),
            None => skipped += 1,
        }
    }
    (out, skipped)
}

/// The days a rollup at `now` reads: every day after the last one confirmed
/// (`confirmed_through`) up to today, so days an operator outage skipped are rolled up
/// once it is back, but none older than the gateways keep unconfirmed counters; without
/// a confirmed day, yesterday and today.
pub fn days_to_roll(now: DateTime<Utc>, confirmed_through: Option<NaiveDate>) -> Vec<NaiveDate> {
    let today = now.date_naive();
    let oldest_kept = today - Duration::seconds(contract::UNCONFIRMED_RETENTION_SECS);
    let yesterday = today.pred_opt().unwrap_or(today);
    let first = confirmed_through
        .and_then(|d| d.succ_opt())
        .map_or(yesterday, |d| d.max(oldest_kept))
        .min(today);
    first.iter_days().take_while(|d| *d <= today).collect()
}

/// The newest of `days` that is closed at `now`: once they are all committed, it is
/// confirmed (see [`days_to_roll`]).
pub fn newest_closed(days: &[NaiveDate], now: DateTime<Utc>) -> Option<NaiveDate> {
    days.iter().copied().filter(|d| closed(*d, now)).max()
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

/// Condition type of a Subscription's quota (Ready does not depend on it).
pub const QUOTA_AVAILABLE: &str = "QuotaAvailable";
/// Reason of `QuotaAvailable=False`: the period's requests reached `monthlyRequests`.
pub const QUOTA_EXHAUSTED: &str = "QuotaExhausted";
/// Reason of `QuotaAvailable=True`.
pub const QUOTA_REMAINING: &str = "QuotaRemaining";

/// A customer's usage in a period, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageView {
    pub period: String,
    pub requests: i64,
    pub monthly: i64,
}

/// The highest status band (0, 50, 80, 100 percent of the quota) `requests` reached:
/// crossing into another band writes status at once.
pub fn band(requests: i64, monthly: i64) -> u8 {
    if monthly <= 0 {
        return 100;
    }
    [100, 80, 50]
        .into_iter()
        .find(|p| i128::from(requests) * 100 >= i128::from(monthly) * i128::from(*p))
        .unwrap_or(0)
}

/// Status writes per second from usage outside crossings and new periods, at most
/// (the API-server budget; the target is under 15).
pub const STATUS_WRITES_PER_SECOND: u64 = 10;

/// Whether the status should show `current` now, given what it shows (`shown`, written
/// at `shown_at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusWrite {
    /// Nothing to show, or not yet.
    No,
    /// Another band (50/80/100%), or a new period while status shows 80% or more: at once.
    Now,
    /// A changed value after `--usage-status-interval`, a new period under 80%, or a
    /// first sighting (an operator start: status may already show it): within the
    /// rollup's budget.
    Budgeted,
}

/// See [`StatusWrite`]. This bounds the API-server writes from usage.
pub fn status_write(
    shown: Option<(&UsageView, DateTime<Utc>)>,
    current: &UsageView,
    now: DateTime<Utc>,
    interval: std::time::Duration,
) -> StatusWrite {
    let Some((shown, at)) = shown else {
        return StatusWrite::Budgeted;
    };
    if shown == current {
        return StatusWrite::No;
    }
    if shown.period != current.period {
        // What matters at once is a status that says the quota is (nearly) used up;
        // the rest of the fleet's month-start writes go within the budget.
        return if band(shown.requests, shown.monthly) >= 80 {
            StatusWrite::Now
        } else {
            StatusWrite::Budgeted
        };
    }
    if band(shown.requests, shown.monthly) != band(current.requests, current.monthly) {
        return StatusWrite::Now;
    }
    let interval = Duration::from_std(interval).unwrap_or(Duration::MAX);
    if now.signed_duration_since(at) >= interval {
        StatusWrite::Budgeted
    } else {
        StatusWrite::No
    }
}

/// The budgeted writes one rollup may ask for.
pub fn status_budget(rollup_interval: std::time::Duration) -> u64 {
    (STATUS_WRITES_PER_SECOND * rollup_interval.as_secs()).max(1)
}

/// `used` of the status: the percentage, rounded down (`-` without a quota).
pub fn used_percent(requests: i64, monthly: i64) -> String {
    if monthly <= 0 {
        return "-".into();
    }
    let pct = i128::from(requests.max(0)) * 100 / i128::from(monthly);
    format!("{pct}%")
}

/// The status usage and the `QuotaAvailable` condition for `view`.
pub fn usage_status(view: &UsageView) -> (m3o_crds::UsageStatus, crate::report::status::Cond) {
    let exhausted = view.requests >= view.monthly;
    let message = format!(
        "{} of {} monthly requests used in {}",
        view.requests, view.monthly, view.period
    );
    let cond = crate::report::status::Cond::new(
        QUOTA_AVAILABLE,
        !exhausted,
        if exhausted {
            QUOTA_EXHAUSTED
        } else {
            QUOTA_REMAINING
        },
        if exhausted {
            format!(
                "{message}: the gateways refuse further requests (429) until the next period or a higher quota"
            )
        } else {
            message
        },
    );
    let usage = m3o_crds::UsageStatus {
        period: view.period.clone(),
        requests: view.requests,
        monthly_requests: view.monthly,
        used: Some(used_percent(view.requests, view.monthly)),
    };
    (usage, cond)
}

/// What status must show when the rollup has nothing for a customer (after a restart
/// the book is empty, and a customer with no requests today never enters it): a status
/// of an older period, or of another quota, would otherwise stay as it was (an
/// exhausted quota shown for ever after a month with no traffic).
pub enum Fallback {
    /// The status shows `period` at this quota: keep it.
    Keep,
    /// Read the period's requests from `usage_daily` and show them at `monthly`.
    Read { period: String, monthly: i64 },
}

/// [`Fallback`] for a status that shows `shown` (none: nothing shown yet, which the
/// first rollup with usage fills in) in `period` under a quota of `monthly`.
pub fn fallback(shown: Option<&m3o_crds::UsageStatus>, period: &str, monthly: i64) -> Fallback {
    match shown {
        Some(s) if s.period != period || s.monthly_requests != monthly => Fallback::Read {
            period: period.to_owned(),
            monthly,
        },
        _ => Fallback::Keep,
    }
}

/// `status` with `view`'s usage and condition (unchanged without a view: the status
/// keeps what it showed).
pub fn with_usage(
    mut status: m3o_crds::SubscriptionStatus,
    view: Option<&UsageView>,
    generation: Option<i64>,
) -> m3o_crds::SubscriptionStatus {
    let Some(view) = view else {
        return status;
    };
    let (usage, cond) = usage_status(view);
    status.usage = Some(usage);
    status.conditions = crate::report::status::merge(&status.conditions, &[cond], generation);
    status
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
            (K.to_string(), 3),
            (format!("{K} neg"), -1),
        ];
        let (counters, skipped) = counters_of("p:", &key, fields);
        assert_eq!(skipped, 3);
        assert_eq!(counters.len(), 2);
        assert_eq!(counters[0].api, "weather");
        assert_eq!(counters[0].requests, 7);
        assert_eq!(counters[0].day.to_string(), "2026-12-04");
        assert!(
            counters.iter().all(|c| c.epoch == 0),
            "a hash without an epoch"
        );
        let (with_epoch, skipped_here) = counters_of(
            "p:",
            &key,
            [
                (format!("{K} a"), 2),
                (contract::EPOCH_FIELD.to_owned(), 1_733_000_000),
            ],
        );
        assert_eq!(skipped_here, 0, "the epoch is not a counter");
        assert_eq!(with_epoch.len(), 1);
        assert_eq!(with_epoch[0].epoch, 1_733_000_000);
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
        let days = days_to_roll(at("2027-01-01T00:00:01Z"), None);
        let [yesterday, today] = days.as_slice() else {
            panic!("{days:?}")
        };
        assert_eq!(
            (yesterday.to_string(), today.to_string()),
            ("2026-12-31".into(), "2027-01-01".into())
        );
    }

    #[test]
    fn days_after_the_last_confirmed_are_rolled_up_within_the_retention() {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("day");
        let now = at("2026-12-04T12:00:00Z");
        let names = |days: Vec<NaiveDate>| days.iter().map(|d| d.to_string()).collect::<Vec<_>>();
        assert_eq!(
            names(days_to_roll(now, Some(d("2026-12-03")))),
            ["2026-12-04"]
        );
        // An outage: every day since the last confirmed one.
        assert_eq!(
            names(days_to_roll(now, Some(d("2026-11-30")))),
            ["2026-12-01", "2026-12-02", "2026-12-03", "2026-12-04"]
        );
        // Never older than the gateways keep counters.
        assert_eq!(days_to_roll(now, Some(d("2025-01-01"))).len(), 36);
        // A clock that went back: today still.
        assert_eq!(
            names(days_to_roll(now, Some(d("2026-12-10")))),
            ["2026-12-04"]
        );
        let rolled = days_to_roll(at("2026-12-05T00:11:00Z"), Some(d("2026-12-03")));
        assert_eq!(
            newest_closed(&rolled, at("2026-12-05T00:11:00Z")),
            Some(d("2026-12-04"))
        );
        assert_eq!(newest_closed(&rolled, at("2026-12-05T00:09:00Z")), None);
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

    fn view(period: &str, requests: i64) -> UsageView {
        UsageView {
            period: period.into(),
            requests,
            monthly: 100,
        }
    }

    #[test]
    fn bands_are_50_80_100() {
        assert_eq!(band(49, 100), 0);
        assert_eq!(band(50, 100), 50);
        assert_eq!(band(80, 100), 80);
        assert_eq!(band(100, 100), 100);
        assert_eq!(band(0, 0), 100);
    }

    #[test]
    fn status_is_written_on_crossings_and_periods_else_at_most_every_interval() {
        use StatusWrite::*;
        let t0 = at("2026-12-10T00:00:00Z");
        let i = std::time::Duration::from_secs(900);
        assert_eq!(status_write(None, &view("2026-12", 1), t0, i), Budgeted);
        let shown = view("2026-12", 10);
        let seen = Some((&shown, t0));
        // Same value: never.
        assert_eq!(status_write(seen, &shown, t0 + Duration::days(3), i), No);
        // Changed within a band: only after the interval, within the budget.
        let changed = view("2026-12", 20);
        assert_eq!(
            status_write(seen, &changed, t0 + Duration::minutes(14), i),
            No
        );
        assert_eq!(
            status_write(seen, &changed, t0 + Duration::minutes(15), i),
            Budgeted
        );
        // A crossing (50, 80, 100) or a new period: at once.
        for crossed in [50, 80, 100] {
            assert_eq!(status_write(seen, &view("2026-12", crossed), t0, i), Now);
        }
        // A new period: at once when status showed 80% or more, else budgeted.
        assert_eq!(status_write(seen, &view("2027-01", 0), t0, i), Budgeted);
        let high = view("2026-12", 85);
        assert_eq!(
            status_write(Some((&high, t0)), &view("2027-01", 0), t0, i),
            Now
        );
        assert_eq!(status_budget(std::time::Duration::from_secs(60)), 600);
    }

    #[test]
    fn a_status_of_another_period_or_quota_is_read_again_without_the_rollup() {
        let shown = |period: &str, monthly| m3o_crds::UsageStatus {
            period: period.into(),
            requests: 100,
            monthly_requests: monthly,
            used: Some("100%".into()),
        };
        assert!(matches!(fallback(None, "2026-12", 100), Fallback::Keep));
        assert!(matches!(
            fallback(Some(&shown("2026-12", 100)), "2026-12", 100),
            Fallback::Keep
        ));
        assert!(matches!(
            fallback(Some(&shown("2026-11", 100)), "2026-12", 100),
            Fallback::Read { period, monthly: 100 } if period == "2026-12"
        ));
        assert!(matches!(
            fallback(Some(&shown("2026-12", 100)), "2026-12", 1000),
            Fallback::Read { monthly: 1000, .. }
        ));
    }

    #[test]
    fn usage_status_says_exhausted_at_100_percent() {
        let (usage, cond) = usage_status(&view("2026-12", 100));
        assert_eq!(
            (cond.type_, cond.status, cond.reason),
            (QUOTA_AVAILABLE, "False", QUOTA_EXHAUSTED)
        );
        assert_eq!(usage.used.as_deref(), Some("100%"));
        assert_eq!(
            (
                usage.period.as_str(),
                usage.requests,
                usage.monthly_requests
            ),
            ("2026-12", 100, 100)
        );
        let (usage, cond) = usage_status(&view("2026-12", 99));
        assert_eq!((cond.status, cond.reason), ("True", QUOTA_REMAINING));
        assert_eq!(usage.used.as_deref(), Some("99%"));
        assert_eq!(used_percent(5, 0), "-");
    }

    #[test]
    fn with_usage_keeps_other_conditions_and_status_without_a_view() {
        let status = m3o_crds::SubscriptionStatus {
            plan: Some("pro".into()),
            ..Default::default()
        };
        assert_eq!(with_usage(status.clone(), None, Some(1)), status);
        let s = with_usage(status, Some(&view("2026-12", 100)), Some(1));
        assert_eq!(s.plan.as_deref(), Some("pro"));
        assert_eq!(s.usage.map(|u| u.requests), Some(100));
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == QUOTA_AVAILABLE)
            .expect("condition");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", QUOTA_EXHAUSTED)
        );
        assert!(s.conditions.iter().all(|c| c.type_ != "Ready"));
    }

    /// The API-server write rate from usage at 10,000 active Subscriptions, computed
    /// with the write decision and the rollup's budget: every value changes at every
    /// 60 s rollup (the worst case), over a day that starts with an operator start and
    /// has a new period at midday; each subscription also crosses 50/80/100% during
    /// it, at its own pace.
    #[test]
    fn write_rate_at_10000_subscriptions_is_bounded() {
        const SUBS: usize = 10_000;
        const TICKS: i64 = 24 * 60;
        let interval = std::time::Duration::from_secs(15 * 60);
        let t0 = at("2026-12-10T00:00:00Z");
        let mut shown: Vec<Option<(UsageView, DateTime<Utc>)>> = vec![None; SUBS];
        let (mut writes, mut peak) = (0u64, 0u64);
        let budget_per_rollup = status_budget(std::time::Duration::from_secs(60));
        for tick in 1..=TICKS {
            let now = t0 + Duration::minutes(tick);
            let (mut this_tick, mut budget) = (0, budget_per_rollup);
            for (i, s) in shown.iter_mut().enumerate() {
                // Reaches 60% to 160% of a quota of 1,000 by the end of the day.
                let pace = 600 + (i as i64 % 101) * 10;
                // At midday a new period begins: usage starts again from 0.
                let (period, elapsed) = if tick <= TICKS / 2 {
                    ("2026-12", tick)
                } else {
                    ("2027-01", tick - TICKS / 2)
                };
                let current = UsageView {
                    period: period.into(),
                    requests: elapsed * pace / TICKS,
                    monthly: 1000,
                };
                let before = s.as_ref().map(|(v, t)| (v, *t));
                let write = match status_write(before, &current, now, interval) {
                    StatusWrite::Now => true,
                    StatusWrite::Budgeted if budget > 0 => {
                        budget -= 1;
                        true
                    }
                    _ => false,
                };
                if write {
                    *s = Some((current, now));
                    this_tick += 1;
                }
            }
            writes += this_tick;
            peak = peak.max(this_tick);
        }
        let per_second = writes as f64 / (TICKS * 60) as f64;
        let peak_per_second = peak as f64 / 60.0;
        eprintln!(
            "{SUBS} subscriptions, a value change at every 60s rollup, 15m status interval: \
             {writes} status writes in a day, {per_second:.2}/s on average, at most {peak} in \
             one rollup ({peak_per_second:.1}/s over its minute)"
        );
        assert!(per_second < 15.0, "{per_second}");
        assert!(peak_per_second < 15.0, "{peak_per_second}");
    }
}
