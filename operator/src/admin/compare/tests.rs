use std::collections::BTreeMap;

use chrono::Utc;
use k8s_openapi::ByteString;
use m3o_events::customers::{self, Customer, EventType};
use serde_json::json;
use uuid::Uuid;

use super::*;

#[test]
fn verdicts_cover_every_combination() {
    let want = json!({"id": "1", "status": "active"});
    let same = br#"{"status":"active", "id":"1"}"#;
    assert_eq!(
        entry_verdict(Some(&want), Some(same)),
        EntryVerdict::Matches
    );
    assert_eq!(
        entry_verdict(Some(&want), Some(br#"{"id":"1","status":"banned"}"#)),
        EntryVerdict::Differs
    );
    assert_eq!(
        entry_verdict(Some(&want), Some(b"garbage")),
        EntryVerdict::Differs
    );
    assert_eq!(entry_verdict(Some(&want), None), EntryVerdict::Missing);
    assert_eq!(entry_verdict(None, Some(same)), EntryVerdict::Unowned);
    assert_eq!(entry_verdict(None, None), EntryVerdict::Absent);
    let drift: Vec<_> = [
        EntryVerdict::Matches,
        EntryVerdict::Differs,
        EntryVerdict::Missing,
        EntryVerdict::Unowned,
        EntryVerdict::Absent,
    ]
    .into_iter()
    .filter(|v| v.is_drift())
    .collect();
    assert_eq!(
        drift,
        [
            EntryVerdict::Differs,
            EntryVerdict::Missing,
            EntryVerdict::Unowned
        ]
    );
}

#[test]
fn an_entry_check_names_its_owner_and_keeps_unparsable_values_as_text() {
    let entry = DesiredEntry {
        value: json!({"plan": "pro"}),
        owner: ObjectReference {
            kind: Some("Subscription".into()),
            namespace: Some("ns".into()),
            name: Some("alice".into()),
            ..Default::default()
        },
    };
    let check = check_entry("/m3o/quotas/x".into(), Some(&entry), Some(b"not json"));
    assert_eq!(check.verdict, EntryVerdict::Differs);
    assert_eq!(check.owner.as_deref(), Some("Subscription ns/alice"));
    assert_eq!(check.actual, Some(json!("not json")));
    let unowned = check_entry("/m3o/stray".into(), None, Some(b"{}"));
    assert_eq!(
        (unowned.verdict, unowned.owner),
        (EntryVerdict::Unowned, None)
    );
}

fn key_row(key: &str, revoked: bool) -> ApiKeyRow {
    ApiKeyRow {
        id: Uuid::new_v4(),
        customer_id: Uuid::nil(),
        key_hash: secret::hash(key.as_bytes()),
        key_prefix: key[..8].to_owned(),
        scopes: vec!["*".into()],
        status: if revoked { "revoked" } else { "active" }.into(),
        description: String::new(),
        expires_at: None,
        k8s_namespace: "ns".into(),
        k8s_name: "k".into(),
        k8s_uid: "u".into(),
        generation: 1,
        rotation_generation: 0,
        grace_until: None,
        created_at: Utc::now(),
        updated_at: Utc::now(),
        revoked_at: revoked.then(Utc::now),
        blocked_message: String::new(),
        plan_digest: None,
    }
}

fn secret_with(key: Option<&str>, key_id: Option<String>) -> Secret {
    let mut data = BTreeMap::new();
    if let Some(key) = key {
        data.insert(DATA_API_KEY.to_owned(), ByteString(key.as_bytes().to_vec()));
    }
    if let Some(id) = key_id {
        data.insert(DATA_KEY_ID.to_owned(), ByteString(id.into_bytes()));
    }
    Secret {
        data: Some(data),
        ..Default::default()
    }
}

#[test]
fn secret_keys_are_checked_against_recorded_hashes() {
    let current = key_row("m3o_current_key", false);
    let old = key_row("m3o_old_key_1", true);
    let rows = [old.clone(), current.clone()];
    let check = |s: Option<&Secret>| check_secret("k-api-key", s, &rows);

    let good = secret_with(Some("m3o_current_key"), Some(current.id.to_string()));
    let c = check(Some(&good));
    assert_eq!(c.verdict, SecretVerdict::Matches);
    assert_eq!(c.recorded_key_id, Some(current.id.to_string()));
    assert_eq!(c.recorded_prefix.as_deref(), Some("m3o_curr"));

    let edited = secret_with(Some("m3o_edited_key"), Some(current.id.to_string()));
    assert_eq!(check(Some(&edited)).verdict, SecretVerdict::Differs);
    let wrong_id = secret_with(Some("m3o_current_key"), Some(old.id.to_string()));
    assert_eq!(check(Some(&wrong_id)).verdict, SecretVerdict::Differs);
    let revoked = secret_with(Some("m3o_old_key_1"), Some(old.id.to_string()));
    assert_eq!(check(Some(&revoked)).verdict, SecretVerdict::Revoked);
    let empty = secret_with(None, Some(current.id.to_string()));
    assert_eq!(check(Some(&empty)).verdict, SecretVerdict::NoKey);
    assert_eq!(check(None).verdict, SecretVerdict::Missing);
    assert!(
        !format!("{:?}", check(Some(&good))).contains("m3o_current_key"),
        "the key itself is never part of the check"
    );
}

fn event(ty: EventType, customer: &str) -> Event {
    Event {
        r#type: ty as i32,
        customer: Some(Customer {
            id: customer.into(),
            status: "active".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn subjects_select_their_events() {
    let created = event(EventType::Created, "c1");
    let other = event(EventType::Created, "c2");
    let mut tier = event(EventType::SubscriptionChanged, "c1");
    tier.subscription_changed = Some(customers::SubscriptionChanged { tier: "pro".into() });
    let mut generated = event(EventType::GenerateKey, "c1");
    generated.generate_key = Some(customers::GenerateKey {
        scopes: vec![],
        id: "k1".into(),
    });
    let mut rotated = event(EventType::KeyRotated, "c1");
    rotated.key_rotated = Some(customers::KeyRotated {
        id: "k2".into(),
        previous_id: "k1".into(),
    });

    let customer = Subject::Customer { id: "c1".into() };
    assert!(customer.concerns(&created) && customer.concerns(&tier));
    assert!(customer.concerns(&generated) && !customer.concerns(&other));

    let subscription = Subject::Subscription {
        customer_id: "c1".into(),
    };
    assert!(subscription.concerns(&tier));
    assert!(!subscription.concerns(&created) && !subscription.concerns(&generated));

    let key = Subject::ApiKey {
        key_ids: vec!["k1".into()],
    };
    assert!(key.concerns(&generated) && key.concerns(&rotated));
    assert!(!key.concerns(&created) && !key.concerns(&tier));

    assert_eq!(event_detail(&tier), "customer=c1 status=active tier=pro");
    assert_eq!(event_detail(&rotated), "customer=c1 status=active key=k2");
}
