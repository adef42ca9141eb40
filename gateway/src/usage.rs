//! `m3o-gateway-auth usage --customer ID`: a customer's metered requests per day, key
//! and API, read from the counters the checks write (see [`crate::limits`]).
//!
//! Retention: a day's counters stay in Redis until the operator has confirmed them in
//! Postgres, and a little longer; the layout and the TTLs are the contract crate's
//! ([`m3o_platform_contract::usage`]): the script gives a new day
//! `UNCONFIRMED_RETENTION_SECS`, the operator's rollup lowers it to
//! `CONFIRMED_RETENTION_SECS` once the closed day is committed.

use std::collections::BTreeMap;

use redis::AsyncCommands;

use crate::limits;

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct UsageRow {
    pub day: String,
    pub key_id: String,
    pub api: String,
    pub requests: u64,
}

/// Every usage row of `customer`, oldest day first.
pub async fn read(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    customer: &str,
) -> redis::RedisResult<Vec<UsageRow>> {
    let pattern = limits::usage_pattern(prefix, customer);
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter = conn.scan_match::<_, String>(&pattern).await?;
        while let Some(k) = futures::StreamExt::next(&mut iter).await {
            keys.push(k?);
        }
    }
    let mut rows = Vec::new();
    for key in keys {
        let day = key.rsplit(':').next().unwrap_or_default().to_owned();
        let fields: BTreeMap<String, u64> = conn.hgetall(&key).await?;
        for (field, requests) in fields {
            if field == m3o_platform_contract::usage::EPOCH_FIELD {
                continue;
            }
            let (key_id, api) = field.split_once(' ').unwrap_or((&field, "-"));
            rows.push(UsageRow {
                day: day.clone(),
                key_id: key_id.to_owned(),
                api: api.to_owned(),
                requests,
            });
        }
    }
    rows.sort();
    Ok(rows)
}

/// The report as printed: a header and one aligned line per row.
pub fn render(rows: &[UsageRow]) -> String {
    let mut out = format!(
        "{:<10}  {:<36}  {:<20}  {:>10}\n",
        "DAY", "KEY", "API", "REQUESTS"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<10}  {:<36}  {:<20}  {:>10}\n",
            r.day, r.key_id, r.api, r.requests
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_are_aligned() {
        let rows = [UsageRow {
            day: "2026-11-27".into(),
            key_id: "k".into(),
            api: "foo".into(),
            requests: 3,
        }];
        let text = render(&rows);
        assert!(text.starts_with("DAY "));
        assert!(
            text.lines()
                .nth(1)
                .is_some_and(|l| l.starts_with("2026-11-27") && l.ends_with(" 3"))
        );
    }
}
