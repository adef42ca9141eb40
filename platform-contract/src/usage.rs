//! The gateways' usage counters in Redis, which the operator rolls up into Postgres
//! (README "Usage and quota"): one hash per customer and UTC day,
//! `<prefix>usage:{<customerId>}:<YYYY-MM-DD>`, one field `<keyId> <api>` per key and
//! API, holding the day's absolute count of allowed requests.
//!
//! Retention ("until confirmed, and a little longer"): a gateway gives a new day's hash
//! [`UNCONFIRMED_RETENTION_SECS`] (`EXPIRE .. NX`: a new field of a hash keeps its TTL);
//! once the day is over ([`CLOSE_GRACE_SECS`] past its
//! end) and the operator has committed it to Postgres, the operator lowers the hash's
//! TTL to [`CONFIRMED_RETENTION_SECS`] (`EXPIRE .. LT`, so it never lengthens one). A
//! day the operator never confirmed outlives an operator outage of a month.

/// TTL a gateway gives a day's hash when it creates it.
pub const UNCONFIRMED_RETENTION_SECS: i64 = 35 * 24 * 3600;
/// TTL the operator sets once it has committed a closed day.
pub const CONFIRMED_RETENTION_SECS: i64 = 2 * 24 * 3600;
/// How long after a day's end (UTC) the operator still treats it as open: gateway
/// replicas' clocks may lag, and a request checked at 23:59:59.9 may land after.
pub const CLOSE_GRACE_SECS: i64 = 10 * 60;

/// The hash of `customer`'s usage on `day` (`YYYY-MM-DD`). The `{customer}` hash tag
/// keeps a customer's keys in one cluster slot, as the gateway's script needs.
pub fn usage_key(prefix: &str, customer: &str, day: &str) -> String {
    format!("{prefix}usage:{{{customer}}}:{day}")
}

/// The `SCAN MATCH` pattern of every customer's hash of `day`.
pub fn usage_day_pattern(prefix: &str, day: &str) -> String {
    format!("{}usage:{{*}}:{}", glob_escape(prefix), glob_escape(day))
}

/// The `SCAN MATCH` pattern of every hash of `customer`.
pub fn usage_customer_pattern(prefix: &str, customer: &str) -> String {
    format!(
        "{}usage:{{{}}}:*",
        glob_escape(prefix),
        glob_escape(customer)
    )
}

/// `(customer, day)` of a usage hash under `prefix`.
pub fn parse_usage_key<'a>(prefix: &str, key: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = key.strip_prefix(prefix)?.strip_prefix("usage:{")?;
    let (customer, day) = rest.rsplit_once("}:")?;
    Some((customer, day))
}

/// The field of a day's hash that holds when a gateway created the hash (Redis time, µs;
/// written by the first increment). A hash whose epoch differs from the one the operator
/// last rolled up is a new hash: Redis lost the old one (a flush), so its counters are
/// counted whole, not as growth. Not a `<keyId> <api>` field.
pub const EPOCH_FIELD: &str = "~epoch";

/// The hash field of a key and API.
pub fn usage_field(key_id: &str, api: &str) -> String {
    format!("{key_id} {api}")
}

/// `(key_id, api)` of a hash field.
pub fn parse_usage_field(field: &str) -> Option<(&str, &str)> {
    field.split_once(' ')
}

/// `s` with Redis glob metacharacters escaped.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_fields_round_trip() {
        let key = usage_key("m3o:gateway:", "c1", "2026-12-04");
        assert_eq!(key, "m3o:gateway:usage:{c1}:2026-12-04");
        assert_eq!(
            parse_usage_key("m3o:gateway:", &key),
            Some(("c1", "2026-12-04"))
        );
        assert_eq!(parse_usage_key("other:", &key), None);
        assert_eq!(parse_usage_field(&usage_field("k", "-")), Some(("k", "-")));
        assert_eq!(parse_usage_field("nospace"), None);
    }

    #[test]
    fn patterns_escape_the_prefix() {
        assert_eq!(
            usage_day_pattern("p*[x]:", "2026-12-04"),
            "p\\*\\[x\\]:usage:{*}:2026-12-04"
        );
        assert_eq!(usage_customer_pattern("p:", "c"), "p:usage:{c}:*");
    }

    #[test]
    fn confirmed_retention_is_shorter_than_unconfirmed() {
        const { assert!(CONFIRMED_RETENTION_SECS < UNCONFIRMED_RETENTION_SECS) };
        const { assert!(CLOSE_GRACE_SECS < CONFIRMED_RETENTION_SECS) };
    }
}
