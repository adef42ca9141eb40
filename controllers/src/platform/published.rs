//! What each record publishes under the prefix: Postgres rows turned into the values of
//! the gateway contract ([`m3o_platform_contract`]). Pure. A key's entry is derived with
//! the contract's [`standing`], the same function the gateway decides with, so a banned
//! customer, an expiry or the end of a grace period is never served as `active`.

use chrono::{DateTime, SecondsFormat, Utc};
use m3o_crds::{ApiKey, ApiKeyState, Customer, CustomerStatusState, Subscription};
use m3o_platform_contract::{
    ApiKeyValue, CustomerValue, KeyFacts, Owner, QuotaValue, Standing, standing,
};

use super::entry::{DesiredEntry, owner_ref};
use crate::store::api_keys::ApiKeyRow;
use crate::store::customers::CustomerRow;
use crate::store::subscriptions::SubscriptionRow;

fn json(value: impl serde::Serialize) -> serde_json::Value {
    // The contract's values are plain structs of strings and numbers: serialising them
    // cannot fail.
    serde_json::to_value(value).unwrap_or_default()
}

/// `customers/<id>` of a live customer row whose subscription in force has `plan`.
pub fn customer_entry(row: &CustomerRow, plan: String) -> DesiredEntry {
    let value = CustomerValue {
        id: row.id.to_string(),
        email: row.email.clone(),
        name: row.name.clone(),
        status: row.status.clone(),
        plan,
    };
    DesiredEntry {
        value: json(value),
        owner: owner_ref::<Customer>(&row.k8s_namespace, &row.k8s_name, &row.k8s_uid),
    }
}

/// The `plan` field of a customer's value: its subscription's plan, empty without one.
pub fn customer_plan(row: Option<&SubscriptionRow>) -> String {
    row.map(|r| r.plan.clone()).unwrap_or_default()
}

/// `quotas/<customerId>` of a subscription in force.
pub fn quota_entry(row: &SubscriptionRow) -> DesiredEntry {
    let value = QuotaValue {
        plan: row.plan.clone(),
        monthly_requests: row.monthly_requests,
        requests_per_second: i64::from(row.requests_per_second),
    };
    DesiredEntry {
        value: json(value),
        owner: owner_ref::<Subscription>(&row.k8s_namespace, &row.k8s_name, &row.k8s_uid),
    }
}

/// What the key row says of the key, for [`standing`].
pub fn key_facts(row: &ApiKeyRow) -> KeyFacts<DateTime<Utc>> {
    let recorded = ApiKeyState::parse(&row.status);
    KeyFacts {
        revoked: row.revoked_at.is_some() || recorded == Some(ApiKeyState::Revoked),
        blocked: recorded == Some(ApiKeyState::Blocked),
        expired: recorded == Some(ApiKeyState::Expired),
        unknown: recorded.is_none(),
        expires_at: row.expires_at,
        grace_until: row.grace_until,
    }
}

/// The key's customer, for [`standing`]: gone unless its row is live.
pub fn owner(customer: Option<&CustomerRow>) -> Owner {
    match customer.filter(|c| c.deleted_at.is_none()) {
        None => Owner::Gone,
        Some(c) if is_banned(&c.status) => Owner::Banned,
        Some(_) => Owner::Live,
    }
}

/// True for a customer row's status `banned`.
pub fn is_banned(customer_status: &str) -> bool {
    CustomerStatusState::parse(customer_status) == Some(CustomerStatusState::Banned)
}

/// True when a key's entry is gone for good at `now` and can only come back if its row
/// is written again: revoked, or past the end of its rotation's grace period.
pub fn is_retired(row: &ApiKeyRow, now: DateTime<Utc>) -> bool {
    // Revocation comes first in the standing, whatever the customer.
    standing(&key_facts(row), Owner::Live, now) == Standing::Revoked
}

/// Why a blocked key is blocked, as the gateway entry and the BlockKey event say it:
/// the admin's message, else the cause.
pub fn blocked_message(recorded: &str, customer_status: &str) -> String {
    match recorded {
        "" if is_banned(customer_status) => "the customer is banned".to_owned(),
        "" => "the key is blocked".to_owned(),
        message => message.to_owned(),
    }
}

/// `apikeys/<hash>` of a key row, or `None` when the gateway must not know the key
/// (revoked, grace period over, customer gone).
pub fn apikey_entry(
    row: &ApiKeyRow,
    customer: Option<&CustomerRow>,
    now: DateTime<Utc>,
) -> Option<DesiredEntry> {
    let facts = key_facts(row);
    let standing = standing(&facts, owner(customer), now);
    let customer = customer.filter(|_| standing.has_entry())?;
    // A status this version does not know is passed on as recorded.
    let status = standing
        .published_status()
        .and_then(|s| s.as_str())
        .map_or_else(|| row.status.clone(), str::to_owned);
    let blocked = matches!(standing, Standing::Blocked | Standing::CustomerBanned);
    let value = ApiKeyValue {
        key_id: row.id.to_string(),
        customer_id: row.customer_id.to_string(),
        scopes: row.scopes.clone(),
        status,
        // A rotated-out key stops at the end of its grace period even if it would live longer.
        expires_at: facts
            .ends_at()
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
        blocked_message: blocked.then(|| blocked_message(&row.blocked_message, &customer.status)),
    };
    Some(DesiredEntry {
        value: json(value),
        owner: owner_ref::<ApiKey>(&row.k8s_namespace, &row.k8s_name, &row.k8s_uid),
    })
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;
    use crate::testkit::rows::{customer_row, key_row, subscription_row};

    fn status(row: &ApiKeyRow, customer: &CustomerRow) -> Option<String> {
        apikey_entry(row, Some(customer), Utc::now())
            .map(|e| e.value["status"].as_str().unwrap_or_default().to_owned())
    }

    #[test]
    fn a_banned_customer_blocks_its_keys() {
        let active = customer_row("active");
        assert_eq!(
            status(&key_row("active"), &active).as_deref(),
            Some("active")
        );
        let banned = customer_row("banned");
        let entry = apikey_entry(&key_row("active"), Some(&banned), Utc::now()).expect("entry");
        assert_eq!(entry.value["status"], "blocked");
        assert_eq!(entry.value["blockedMessage"], "the customer is banned");
    }

    #[test]
    fn expiry_and_grace_are_enforced_by_the_clock() {
        let active = customer_row("active");
        let mut r = key_row("active");
        r.expires_at = Some(Utc::now() - Duration::seconds(1));
        assert_eq!(status(&r, &active).as_deref(), Some("expired"));
        let mut r = key_row("active");
        r.grace_until = Some(Utc::now() + Duration::hours(1));
        let e = apikey_entry(&r, Some(&active), Utc::now()).expect("entry");
        assert!(
            e.value["expiresAt"].is_string(),
            "grace end is the expiry the gateway sees"
        );
        r.grace_until = Some(Utc::now() - Duration::seconds(1));
        assert_eq!(
            apikey_entry(&r, Some(&active), Utc::now()),
            None,
            "gone after grace"
        );
        assert!(is_retired(&r, Utc::now()));
    }

    #[test]
    fn revoked_keys_and_gone_customers_have_no_entry() {
        let active = customer_row("active");
        assert_eq!(
            apikey_entry(&key_row("revoked"), Some(&active), Utc::now()),
            None
        );
        assert_eq!(apikey_entry(&key_row("active"), None, Utc::now()), None);
        let mut deleted = customer_row("deleted");
        deleted.deleted_at = Some(Utc::now());
        assert_eq!(
            apikey_entry(&key_row("active"), Some(&deleted), Utc::now()),
            None
        );
    }

    #[test]
    fn a_status_this_version_does_not_know_is_passed_on() {
        let entry = apikey_entry(
            &key_row("suspended"),
            Some(&customer_row("active")),
            Utc::now(),
        );
        assert_eq!(entry.expect("entry").value["status"], "suspended");
    }

    #[test]
    fn values_have_the_contract_fields() {
        let e = apikey_entry(
            &key_row("active"),
            Some(&customer_row("active")),
            Utc::now(),
        )
        .expect("entry");
        let mut fields: Vec<_> = e
            .value
            .as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect();
        fields.sort();
        assert_eq!(
            fields,
            ["customerId", "expiresAt", "keyId", "scopes", "status"]
        );
        let row = subscription_row("pro");
        assert_eq!(
            quota_entry(&row).value,
            serde_json::json!({"plan": "pro", "monthlyRequests": 7, "requestsPerSecond": 3})
        );
        assert_eq!(
            quota_entry(&row).owner.kind.as_deref(),
            Some("Subscription")
        );
        assert_eq!(customer_plan(Some(&row)), "pro");
        assert_eq!(customer_plan(None), "");
    }
}
