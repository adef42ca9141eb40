use std::collections::BTreeMap;

use chrono::Duration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use m3o_crds::{ApiKeySpec, CustomerRef};
use sqlx::types::Json;

use super::*;
use crate::apikey::build::*;
use crate::apikey::secret::hash;
use crate::pipeline::row_plan::Digested;

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).expect("time")
}

fn key(blocked: bool, expires_at: Option<DateTime<Utc>>) -> ApiKey {
    let mut k = ApiKey::new(
        "ci",
        ApiKeySpec {
            customer_ref: CustomerRef {
                name: "alice".into(),
            },
            description: "CI".into(),
            scopes: vec!["helloworld".into()],
            secret_name: None,
            blocked,
            blocked_message: None,
            expires_at: expires_at.map(|t| {
                Time(k8s_openapi::jiff::Timestamp::from_second(t.timestamp()).expect("ts"))
            }),
            rotation_generation: 0,
            rotation_grace_period: "1h".into(),
            deletion_policy: Default::default(),
        },
    );
    k.metadata.namespace = Some("team".into());
    k.metadata.uid = Some("uid-k".into());
    k.metadata.generation = Some(1);
    k
}

fn customer(status: &str) -> CustomerRow {
    CustomerRow {
        id: Uuid::from_u128(7),
        email: "alice@example.com".into(),
        name: "Alice".into(),
        status: status.into(),
        meta: Json(BTreeMap::new()),
        k8s_namespace: "team".into(),
        k8s_name: "alice".into(),
        k8s_uid: "uid-c".into(),
        generation: 1,
        created_at: now(),
        updated_at: now(),
        deleted_at: None,
        plan_digest: None,
    }
}

fn issued(id: u128, generation: i64) -> IssuedKey {
    IssuedKey {
        key_id: Uuid::from_u128(id),
        hash: format!("{id:064x}"),
        prefix: "m3o_abcd".into(),
        rotation_generation: generation,
    }
}

fn row_of(new: &NewApiKey) -> ApiKeyRow {
    ApiKeyRow {
        id: new.id,
        customer_id: new.fields.customer_id,
        key_hash: new.fields.key_hash.clone(),
        key_prefix: new.key_prefix.clone(),
        scopes: new.fields.scopes.clone(),
        status: new.fields.status.clone(),
        description: new.fields.description.clone(),
        expires_at: new.fields.expires_at,
        k8s_namespace: new.k8s.namespace.clone(),
        k8s_name: new.k8s.name.clone(),
        k8s_uid: new.k8s.uid.clone(),
        generation: new.fields.generation,
        rotation_generation: new.fields.rotation_generation,
        grace_until: new.fields.grace_until,
        blocked_message: new.fields.blocked_message.clone(),
        created_at: now(),
        updated_at: now(),
        revoked_at: None,
        // As the operator wrote it.
        plan_digest: Some(new.fields.digest()),
    }
}

fn plan_for(
    k: &ApiKey,
    c: &CustomerRow,
    i: &IssuedKey,
    rows: &[ApiKeyRow],
    at: DateTime<Utc>,
) -> KeyPlan {
    plan(&Observed {
        now: at,
        key: k,
        customer: c,
        issued: i,
        rows,
        grace: Duration::hours(1),
    })
}

fn kinds(p: &KeyPlan) -> Vec<EventType> {
    p.events.iter().map(|e| e.kind).collect()
}

#[test]
fn a_new_key_is_recorded_by_hash_with_generate_key() {
    let p = plan_for(
        &key(false, None),
        &customer("active"),
        &issued(1, 0),
        &[],
        now(),
    );
    let new = p.insert.clone().expect("insert");
    assert_eq!(
        (
            new.id,
            new.fields.key_hash.as_str(),
            new.fields.status.as_str()
        ),
        (Uuid::from_u128(1), format!("{:064x}", 1).as_str(), "active")
    );
    assert_eq!(kinds(&p), vec![EventType::GenerateKey]);
    assert_eq!(p.events[0].scopes, vec!["helloworld".to_owned()]);
}

#[test]
fn repeating_a_plan_changes_nothing() {
    let (k, c, i) = (key(false, None), customer("active"), issued(1, 0));
    let first = plan_for(&k, &c, &i, &[], now());
    let rows = vec![row_of(&first.insert.expect("insert"))];
    assert_eq!(plan_for(&k, &c, &i, &rows, now()), KeyPlan::default());
}

#[test]
fn block_and_unblock_are_announced_once() {
    let (c, i) = (customer("active"), issued(1, 0));
    let rows = vec![row_of(
        &plan_for(&key(false, None), &c, &i, &[], now())
            .insert
            .expect("insert"),
    )];
    let blocked = plan_for(&key(true, None), &c, &i, &rows, now());
    assert_eq!(kinds(&blocked), vec![EventType::BlockKey]);
    let mut rows = rows;
    rows[0].status = "blocked".into();
    assert_eq!(
        kinds(&plan_for(&key(false, None), &c, &i, &rows, now())),
        vec![EventType::UnblockKey]
    );
}

#[test]
fn a_banned_customer_blocks_and_unban_restores() {
    let i = issued(1, 0);
    let rows = vec![row_of(
        &plan_for(&key(false, None), &customer("active"), &i, &[], now())
            .insert
            .expect("insert"),
    )];
    let p = plan_for(&key(false, None), &customer("banned"), &i, &rows, now());
    assert_eq!(kinds(&p), vec![EventType::BlockKey]);
    assert_eq!(p.updates[0].1.status, "blocked");
}

#[test]
fn expiry_is_scheduled_then_applied() {
    let (c, i) = (customer("active"), issued(1, 0));
    let at = now() + Duration::minutes(5);
    let first = plan_for(&key(false, Some(at)), &c, &i, &[], now());
    assert_eq!(first.wake_at, Some(at), "requeued for the expiry");
    let rows = vec![row_of(&first.insert.expect("insert"))];
    let later = plan_for(
        &key(false, Some(at)),
        &c,
        &i,
        &rows,
        at + Duration::seconds(1),
    );
    assert_eq!(kinds(&later), vec![EventType::KeyExpired]);
    assert_eq!(later.updates[0].1.status, "expired");
}

#[test]
fn rotation_keeps_the_previous_key_for_the_grace_period() {
    let c = customer("active");
    let old = issued(1, 0);
    let rows = vec![row_of(
        &plan_for(&key(false, None), &c, &old, &[], now())
            .insert
            .expect("insert"),
    )];
    let mut k = key(false, None);
    k.spec.rotation_generation = 1;
    let new = issued(2, 1);
    let p = plan_for(&k, &c, &new, &rows, now());
    assert_eq!(
        kinds(&p),
        vec![EventType::GenerateKey, EventType::KeyRotated]
    );
    assert_eq!(p.events[1].previous_id, Some(old.key_id));
    let (id, fields) = &p.updates[0];
    assert_eq!(
        (*id, fields.status.as_str(), fields.grace_until),
        (old.key_id, "active", Some(now() + Duration::hours(1)))
    );
    assert_eq!(p.wake_at, Some(now() + Duration::hours(1)));

    let mut rows = vec![rows[0].clone(), row_of(p.insert.as_ref().expect("insert"))];
    rows[0].grace_until = Some(now() + Duration::hours(1));
    assert_eq!(
        plan_for(&k, &c, &new, &rows, now() + Duration::minutes(30)).events,
        vec![],
        "still in grace"
    );
    let after = plan_for(&k, &c, &new, &rows, now() + Duration::hours(2));
    assert_eq!(kinds(&after), vec![EventType::DeleteKey]);
    assert_eq!(after.updates[0].1.status, "revoked");
}

#[test]
fn revoking_all_announces_each_key() {
    let c = customer("active");
    let rows = vec![row_of(
        &plan_for(&key(false, None), &c, &issued(1, 0), &[], now())
            .insert
            .expect("insert"),
    )];
    let p = revoke_all(&rows, 2);
    assert_eq!(kinds(&p), vec![EventType::DeleteKey]);
    assert_eq!(p.updates[0].1.status, "revoked");
}

#[test]
fn events_carry_ids_never_keys() {
    let e = KeyEvent {
        kind: EventType::GenerateKey,
        key_id: Uuid::from_u128(1),
        scopes: vec!["*".into()],
        previous_id: None,
        message: String::new(),
    };
    let event = to_event(
        &e,
        crate::pipeline::outbox_events::customer_payload(&customer("active")),
    );
    assert_eq!(
        event.generate_key.as_ref().map(|g| g.id.clone()),
        Some(Uuid::from_u128(1).to_string())
    );
    assert_eq!(
        event.customer.as_ref().map(|c| c.email.as_str()),
        Some("alice@example.com")
    );
}

#[test]
fn status_reasons_follow_the_state() {
    let c = customer("active");
    let k = key(false, None);
    let mut row = row_of(
        &plan_for(&k, &c, &issued(1, 0), &[], now())
            .insert
            .expect("insert"),
    );
    let s = synced_status(&k, &row, "ci-api-key");
    assert_eq!(s.key_prefix.as_deref(), Some("m3o_abcd"));
    let ready = crate::report::status::ready(&s.conditions).expect("ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Provisioned")
    );
    row.status = "expired".into();
    let s = synced_status(&k, &row, "ci-api-key");
    let ready = crate::report::status::ready(&s.conditions).expect("ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str(), s.state),
        ("False", "Expired", Some(ApiKeyState::Expired))
    );
}

#[test]
fn a_key_replaced_in_its_own_generation_gets_no_grace() {
    let c = customer("active");
    let rows = vec![row_of(
        &plan_for(&key(false, None), &c, &issued(1, 0), &[], now())
            .insert
            .expect("insert"),
    )];
    let p = plan_for(&key(false, None), &c, &issued(2, 0), &rows, now());
    assert_eq!(
        p.updates[0].1.grace_until,
        Some(now()),
        "the unheld key stops at once"
    );
    assert_eq!(p.wake_at, Some(now()));
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretCase {
    case: String,
    apikey: ApiKey,
    secret: String,
    generation: Option<i64>,
    customer_ready: bool,
    expect: Expected,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct Expected {
    action: Option<String>,
    secret_name: Option<String>,
    blocked: Option<String>,
    message: Option<String>,
    gate: Option<String>,
    orphaned: bool,
}

impl Expected {
    fn blocker(&self, name: &str, blocker: &Blocker) {
        let (reason, message) = (self.blocked.as_deref(), self.message.as_deref());
        crate::testkit::fixtures::assert_blocked(name, blocker, reason, message);
    }
}

/// The Secret of a case as the API server returns it.
fn found_secret(c: &SecretCase) -> Option<k8s_openapi::api::core::v1::Secret> {
    let generation = c.generation.unwrap_or(c.apikey.spec.rotation_generation);
    let built = || {
        let plaintext = super::super::secret::Plaintext::generate().expect("key");
        let (mut s, _) = secret(&c.apikey, plaintext, Uuid::now_v7(), generation);
        s.metadata.resource_version = Some("7".into());
        s
    };
    match c.secret.as_str() {
        "missing" => None,
        "ours" => Some(built()),
        "foreign" => {
            let mut s = built();
            s.metadata.owner_references = None;
            Some(s)
        }
        "edited" => {
            let mut s = built();
            let other = built().data.expect("data")["apiKey"].clone();
            s.data
                .as_mut()
                .expect("data")
                .insert("apiKey".into(), other);
            Some(s)
        }
        other => panic!("unknown secret {other:?}"),
    }
}

#[test]
fn secret_actions_of_the_fixtures() {
    for c in crate::testkit::fixtures::cases::<SecretCase>("apikey_secret.yaml") {
        let name = &c.case;
        let found = found_secret(&c);
        let state = super::super::secret::inspect(found.as_ref(), &c.apikey);
        let customer = alice_ready(c.customer_ready);
        let action = secret_action(&c.apikey, state, &[], Some(&customer));
        match action {
            Err(blocker) => c.expect.blocker(name, &blocker),
            Ok(action) => {
                let got = match action {
                    SecretAction::Reuse(issued) => {
                        let data = found.as_ref().and_then(|s| s.data.as_ref()).expect("data");
                        assert_eq!(issued.hash, hash(&data["apiKey"].0), "{name}");
                        "reuse"
                    }
                    SecretAction::Issue { read_at: None } => "create",
                    SecretAction::Issue { read_at: Some(rv) } => {
                        assert_eq!(rv, "7", "{name}: replaced at the version read");
                        "replace"
                    }
                };
                assert_eq!(Some(got), c.expect.action.as_deref(), "{name}");
                assert_eq!(c.expect.blocked, None, "{name}: not blocked");
            }
        }
        if let Some(want) = &c.expect.secret_name {
            assert_eq!(&secret_name(&c.apikey), want, "{name}");
        }
    }
}

#[test]
fn the_secret_manifest_carries_the_key_and_what_identifies_it() {
    let k = key(false, None);
    let plaintext = super::super::secret::Plaintext::generate().expect("key");
    let key_id = Uuid::from_u128(42);
    let (s, issued) = secret(&k, plaintext, key_id, 3);
    assert_eq!(s.metadata.name.as_deref(), Some("ci-api-key"));
    assert_eq!(s.metadata.namespace.as_deref(), Some("team"));
    assert_eq!(s.type_.as_deref(), Some("Opaque"));
    let labels = s.metadata.labels.clone().expect("labels");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "m3o-operator");
    assert_eq!(labels["m3o.com/apikey"], "ci");
    let annotations = s.metadata.annotations.clone().expect("annotations");
    assert_eq!(annotations["m3o.com/rotation-generation"], "3");
    let data = s.data.clone().expect("data");
    assert_eq!(annotations["m3o.com/key-sha256"], hash(&data["apiKey"].0));
    assert_eq!(data["keyId"].0, key_id.to_string().into_bytes());
    let owner = &s.metadata.owner_references.clone().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("ApiKey", "uid-k")
    );
    assert_eq!(owner.controller, Some(true));
    // Read back, it is ours, well formed, annotated, and what was recorded of it.
    match super::super::secret::inspect(Some(&s), &k) {
        SecretState::Ours {
            found: Some(found), ..
        } => {
            assert!(found.well_formed && found.annotated);
            assert_eq!(found.issued, issued);
        }
        _ => panic!("the built Secret reads back as ours"),
    }
    // The replacement body is a server-side apply of a v1 Secret at the version read.
    let body = secret_replacement(s, "7".into()).expect("body");
    assert_eq!(
        (body["apiVersion"].as_str(), body["kind"].as_str()),
        (Some("v1"), Some("Secret"))
    );
    assert_eq!(body["metadata"]["resourceVersion"], "7");
}

#[derive(serde::Deserialize)]
struct CustomerCase {
    case: String,
    customer: bool,
    record: Option<Uuid>,
    #[serde(default)]
    keys: Vec<Uuid>,
    expect: Expected,
}

#[test]
fn customer_gates_of_the_fixtures() {
    let k = key(false, None);
    for c in crate::testkit::fixtures::cases::<CustomerCase>("apikey_customer.yaml") {
        let name = &c.case;
        let record = c.record.map(|id| CustomerRow {
            id,
            ..customer("active")
        });
        let rows: Vec<ApiKeyRow> = (c.keys.iter())
            .map(|id| ApiKeyRow {
                customer_id: *id,
                ..row_of(
                    &(plan_for(&k, &customer("active"), &issued(1, 0), &[], now()).insert)
                        .expect("insert"),
                )
            })
            .collect();
        assert_eq!(
            orphaned(&rows, record.as_ref()),
            c.expect.orphaned,
            "{name}"
        );
        // Through the whole admission, for a Customer past provisioning.
        let object = c.customer.then(|| alice_ready(true));
        match admit(&k, None, object.as_ref(), record.as_ref(), &rows) {
            Admission::Orphaned => assert!(c.expect.orphaned, "{name}"),
            Admission::Go { customer, .. } => {
                assert_eq!(c.expect.gate.as_deref(), Some("open"), "{name}");
                assert_eq!(Some(customer.id), c.record, "{name}");
            }
            Admission::Blocked(blocker) => c.expect.blocker(name, &blocker),
            Admission::Wait => panic!("{name}: waits"),
        }
    }
}

/// The Customer `alice` as a key sees it.
fn alice() -> m3o_crds::Customer {
    let spec = serde_json::from_value(
        serde_json::json!({"email": "alice@example.com", "state": "Active"}),
    );
    m3o_crds::Customer::new("alice", spec.expect("spec"))
}

/// `alice` with a Ready condition of `ready`.
fn alice_ready(ready: bool) -> m3o_crds::Customer {
    let mut customer = alice();
    let cond = crate::report::status::Cond::new(
        crate::report::status::types::READY,
        ready,
        reasons::PROVISIONED,
        "",
    );
    customer.status = Some(m3o_crds::CustomerStatus {
        conditions: crate::report::status::merge(&[], &[cond], Some(1)),
        ..Default::default()
    });
    customer
}

#[test]
fn admission_waits_blocks_revokes_or_goes_in_order() {
    let k = key(false, None);
    let row = customer("active");
    let reason = |a: Admission| match a {
        Admission::Blocked(b) => b.reason,
        other => panic!("not blocked: {other:?}"),
    };
    // Being provisioned (no Ready condition yet): a quiet wait, whatever the records.
    let provisioning = alice();
    assert_eq!(
        admit(&k, None, Some(&provisioning), None, &[]),
        Admission::Wait
    );
    // In another shard: blocked, even while being provisioned.
    let shard = crate::runtime::shard::Shard::parse("m3o.com/shard=a").expect("shard");
    assert_eq!(
        reason(admit(&k, Some(&shard), Some(&provisioning), None, &[])),
        reasons::CUSTOMER_IN_OTHER_SHARD
    );
    // Keys recorded for a customer that is gone are revoked.
    let recorded = ApiKeyRow {
        customer_id: Uuid::from_u128(99),
        ..row_of(&(plan_for(&k, &row, &issued(1, 0), &[], now()).insert).expect("insert"))
    };
    let ready = alice_ready(true);
    assert_eq!(
        admit(
            &k,
            None,
            Some(&ready),
            Some(&row),
            std::slice::from_ref(&recorded)
        ),
        Admission::Orphaned
    );
    assert_eq!(
        admit(&k, None, None, None, &[recorded]),
        Admission::Orphaned
    );
    // The customer gate: no Customer, no record.
    assert_eq!(
        reason(admit(&k, None, None, None, &[])),
        reasons::CUSTOMER_NOT_FOUND
    );
    assert_eq!(
        reason(admit(&k, None, Some(&ready), None, &[])),
        reasons::CUSTOMER_NOT_READY
    );
    // A live record lets keys through, even while its Customer is not Ready (the Secret
    // step issues a key only for a Ready one).
    let failing = alice_ready(false);
    let go = Admission::Go {
        customer: Box::new(row.clone()),
        grace: Duration::hours(1),
    };
    assert_eq!(admit(&k, None, Some(&failing), Some(&row), &[]), go);
    assert_eq!(admit(&k, None, Some(&ready), Some(&row), &[]), go);
    // An unusable grace period blocks before the Secret is touched.
    let mut invalid = k.clone();
    invalid.spec.rotation_grace_period = "forever".into();
    assert_eq!(
        reason(admit(&invalid, None, Some(&ready), Some(&row), &[])),
        reasons::INVALID_SPEC
    );
}
