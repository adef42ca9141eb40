//! Property tests: for arbitrary schema-valid specs (and stored objects older than
//! today's schema bounds), arbitrary rows and clocks, every planner returns without
//! panicking. A panic in a planner would take a controller down for every object.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use m3o_crds::{
    ApiKey, ApiKeySpec, Customer, CustomerRef, CustomerSpec, CustomerState, DeletionPolicy,
    QuotaOverride, Subscription, SubscriptionSpec,
};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use sqlx::types::Json;
use uuid::Uuid;

use crate::apikey::secret::{FoundKey, IssuedKey};
use crate::apikey::{build as apikey_build, plan as apikey_plan};
use crate::customer::{build as customer_build, plan as customer_plan};
use crate::plans::Catalog;
use crate::platform::published as apikey_config;
use crate::report::blocker::Blocker;
use crate::report::status::reasons;
use crate::store::api_keys::ApiKeyRow;
use crate::store::customers::CustomerRow;
use crate::store::subscriptions::SubscriptionRow;
use crate::subscription::build as subscription_build;
use crate::subscription::plan::{self as subscription_plan, RecordHolder};

const CASES: u32 = 2_000;

/// Any instant chrono can represent, edges included.
fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
    prop_oneof![
        Just(DateTime::<Utc>::MIN_UTC),
        Just(DateTime::<Utc>::MAX_UTC),
        (-8_000_000_000_000i64..8_000_000_000_000).prop_map(|s| {
            DateTime::from_timestamp(s, 0).unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
        }),
    ]
}

/// A Kubernetes time (the API server's range: years 1 to 9999).
fn any_k8s_time() -> impl Strategy<Value = Time> {
    (-62_135_596_800i64..253_402_207_199)
        .prop_map(|s| Time(Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH)))
}

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!(".{{0,{max}}}")).expect("regex")
}

fn meta_of<K: kube::Resource>(obj: &mut K, name: String, generation: i64, created: Option<Time>) {
    let meta = obj.meta_mut();
    meta.name = Some(name);
    meta.namespace = Some("team".into());
    meta.uid = Some(Uuid::new_v4().to_string());
    meta.generation = Some(generation);
    meta.creation_timestamp = created;
}

fn customer_spec() -> impl Strategy<Value = CustomerSpec> {
    (
        "[a-z0-9.+_-]{1,60}@[a-z0-9-]{1,60}\\.[a-z]{2,10}",
        proptest::option::of(text(256)),
        prop_oneof![
            Just(CustomerState::Unverified),
            Just(CustomerState::Verified),
            Just(CustomerState::Active),
            Just(CustomerState::Banned)
        ],
        btree_map(".{1,63}", text(1024), 0..8),
        proptest::option::of(prop_oneof![
            any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string()),
            any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string().to_uppercase()),
        ]),
        any::<bool>(),
    )
        .prop_map(|(email, name, state, meta, id, orphan)| CustomerSpec {
            email,
            name,
            state,
            meta,
            id,
            deletion_policy: if orphan {
                DeletionPolicy::Orphan
            } else {
                DeletionPolicy::Delete
            },
        })
}

fn customer_row() -> impl Strategy<Value = CustomerRow> {
    (
        any::<u128>(),
        prop_oneof![
            Just("unverified"),
            Just("verified"),
            Just("active"),
            Just("banned"),
            Just("deleted"),
            Just("garbage")
        ],
        any_time(),
        proptest::option::of(any_time()),
        any::<i64>(),
    )
        .prop_map(|(id, status, t, deleted_at, generation)| CustomerRow {
            id: Uuid::from_u128(id),
            email: "a@example.com".into(),
            name: String::new(),
            status: status.into(),
            meta: Json(BTreeMap::new()),
            k8s_namespace: "team".into(),
            k8s_name: "alice".into(),
            k8s_uid: "uid".into(),
            generation,
            created_at: t,
            updated_at: t,
            deleted_at,
            plan_digest: None,
        })
}

/// Durations as the schema's pattern allows them (and longer: objects stored before
/// the 8760h bound existed).
fn go_duration() -> impl Strategy<Value = String> {
    vec("[0-9]{1,12}(\\.[0-9]{1,6})?(ns|us|µs|ms|s|m|h)", 1..3).prop_map(|parts| parts.concat())
}

fn apikey_spec() -> impl Strategy<Value = ApiKeySpec> {
    (
        text(512),
        vec(prop_oneof![Just("*".to_owned()), "[a-z0-9-]{1,63}"], 1..8),
        any::<bool>(),
        proptest::option::of(text(512)),
        proptest::option::of(any_k8s_time()),
        any::<i64>().prop_map(i64::abs),
        go_duration(),
    )
        .prop_map(
            |(description, scopes, blocked, blocked_message, expires_at, generation, grace)| {
                ApiKeySpec {
                    customer_ref: CustomerRef {
                        name: "alice".into(),
                    },
                    description,
                    scopes,
                    secret_name: None,
                    blocked,
                    blocked_message,
                    expires_at,
                    rotation_generation: generation,
                    rotation_grace_period: grace,
                    deletion_policy: DeletionPolicy::Delete,
                }
            },
        )
}

fn key_row(customer_id: Uuid) -> impl Strategy<Value = ApiKeyRow> {
    (
        any::<u128>(),
        prop_oneof![
            Just("active"),
            Just("blocked"),
            Just("expired"),
            Just("revoked"),
            Just("x")
        ],
        proptest::option::of(any_time()),
        proptest::option::of(any_time()),
        proptest::option::of(any_time()),
        any::<i64>(),
        any_time(),
    )
        .prop_map(
            move |(id, status, expires_at, grace_until, revoked_at, rotation, t)| ApiKeyRow {
                id: Uuid::from_u128(id),
                customer_id,
                key_hash: format!("{id:064x}"),
                key_prefix: "m3o_abcd".into(),
                scopes: vec!["*".into()],
                status: status.into(),
                description: String::new(),
                expires_at,
                k8s_namespace: "team".into(),
                k8s_name: "ci".into(),
                k8s_uid: "uid".into(),
                generation: 1,
                rotation_generation: rotation,
                grace_until,
                blocked_message: String::new(),
                created_at: t,
                updated_at: t,
                revoked_at,
                plan_digest: None,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn customer_planners_never_panic(
        spec in customer_spec(),
        generation in any::<i64>(),
        row in customer_row(),
        other in customer_spec(),
    ) {
        let mut c = Customer::new("alice", spec);
        meta_of(&mut c, "alice".into(), generation, None);
        let mut previous = Customer::new("alice", other);
        meta_of(&mut previous, "alice".into(), 1, None);
        if let (Ok(desired), Ok(old)) = (customer_plan::desired(&c), customer_plan::desired(&previous)) {
            let _ = customer_plan::plan_row::<CustomerRow>(None, &desired);
            let _ = customer_plan::plan_row(Some(&(Uuid::nil(), old.record)), &desired);
            let _ = customer_plan::plan_row(Some(&(Uuid::nil(), desired.record.clone())), &desired);
        }
        let _ = customer_build::event(&row, m3o_events::customers::EventType::Updated);
        let _ = customer_build::provisioned_status(&c, &row, "/m3o/customers/x");
        let _ = customer_build::blocked_status(&c, &Blocker::new(reasons::CONFLICT, "x"));
    }

    #[test]
    fn subscription_planners_never_panic(
        plan in "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?",
        monthly in proptest::option::of(0i64..=i64::MAX),
        rps in proptest::option::of(0i32..=i32::MAX),
        created in vec(proptest::option::of(any_k8s_time()), 1..5),
        deleting in vec(any::<bool>(), 1..5),
        holder in 0usize..5,
        row in customer_row(),
        ready in proptest::option::of(any::<bool>()),
    ) {
        let catalog = Catalog::builtin();
        let subs: Vec<Subscription> = created.iter().enumerate().map(|(i, t)| {
            let spec = SubscriptionSpec {
                customer_ref: CustomerRef { name: "alice".into() },
                plan: plan.clone(),
                quota: Some(QuotaOverride { monthly_requests: monthly, requests_per_second: rps }),
                deletion_policy: DeletionPolicy::Delete,
            };
            let mut s = Subscription::new(&format!("s{i}"), spec);
            meta_of(&mut s, format!("s{i}"), 1, t.clone());
            if deleting.get(i).copied().unwrap_or_default() {
                s.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
            }
            s
        }).collect();
        let this = &subs[0];
        let holders = [
            RecordHolder::Nobody,
            RecordHolder::This,
            RecordHolder::Live("s1".into()),
            RecordHolder::Deleting("s1".into()),
            RecordHolder::Gone,
        ];
        let _ = subscription_plan::slot_decision(this, &subs, &holders[holder]);
        let quota = subscription_plan::effective_quota(&catalog, &this.spec);
        let mut customer = Customer::new("alice", CustomerSpec {
            email: "a@example.com".into(), name: None, state: CustomerState::Active,
            meta: BTreeMap::new(), id: None, deletion_policy: DeletionPolicy::Delete,
        });
        meta_of(&mut customer, "alice".into(), 1, None);
        customer.status = ready.map(|ok| m3o_crds::CustomerStatus {
            conditions: crate::report::status::merge(&[], &[crate::report::status::Cond::new(
                crate::report::status::types::READY, ok, reasons::PROVISIONED, "x")], Some(1)),
            ..Default::default()
        });
        if let crate::pipeline::dependent::Gate::Refused(refusal) =
            subscription_plan::customer_use(None, Some(&customer), Some(&row))
        {
            let _ = subscription_plan::customer_refusal("alice", refusal);
        }
        if let Ok(quota) = quota {
            let desired = subscription_plan::desired_record(this, row.id, quota);
            let _ = subscription_plan::plan_row::<SubscriptionRow>(None, &desired);
            let _ = subscription_plan::plan_row(Some(&(Uuid::nil(), desired.clone())), &desired);
            let sub_row = SubscriptionRow {
                id: Uuid::new_v4(), customer_id: row.id, plan: plan.clone(),
                monthly_requests: quota.monthly_requests,
                requests_per_second: quota.requests_per_second,
                status: "active".into(), k8s_namespace: "team".into(), k8s_name: "s0".into(),
                k8s_uid: "u".into(), generation: 1, created_at: row.created_at,
                updated_at: row.updated_at, cancelled_at: None, plan_digest: None,
            };
            let _ = subscription_build::provisioned_status(this, &sub_row, "/m3o/quotas/x");
            let blocker = subscription_plan::conflict("alice", "s1", false);
            let _ = subscription_build::blocked_status(this, &blocker, Some(&sub_row));
            let _ = subscription_build::blocked_status(this, &blocker, None);
        }
    }

    #[test]
    fn apikey_planners_never_panic(
        spec in apikey_spec(),
        customer in customer_row(),
        now in any_time(),
        rows in vec(key_row(Uuid::from_u128(7)), 0..4),
        issued_id in any::<u128>(),
        issued_generation in any::<i64>(),
        well_formed in any::<bool>(),
        annotated in any::<bool>(),
    ) {
        let mut key = ApiKey::new("ci", spec);
        meta_of(&mut key, "ci".into(), 3, None);
        let issued = IssuedKey {
            key_id: if issued_id % 2 == 0 {
                rows.first().map_or(Uuid::from_u128(issued_id), |r| r.id)
            } else {
                Uuid::from_u128(issued_id)
            },
            hash: format!("{issued_id:064x}"),
            prefix: "m3o_abcd".into(),
            rotation_generation: issued_generation,
        };
        let found = FoundKey { issued: issued.clone(), well_formed, annotated };
        let _ = apikey_plan::reusable(&found, key.spec.rotation_generation, &rows);
        // Whatever the grace period parses to, or the bound it exceeds.
        let grace = apikey_plan::grace_period(&key.spec).unwrap_or(apikey_plan::MAX_GRACE);
        let observed = apikey_plan::Observed {
            now,
            key: &key,
            customer: &customer,
            issued: &issued,
            rows: &rows,
            grace,
        };
        let plan = apikey_plan::plan(&observed);
        for event in &plan.events {
            let _ = apikey_build::to_event(event, crate::pipeline::outbox_events::customer_payload(&customer));
        }
        let _ = apikey_plan::revoke_all(&rows, 3);
        for row in &rows {
            let _ = apikey_build::synced_status(&key, row, "ci-api-key");
            let _ = apikey_config::apikey_entry(row, Some(&customer), now);
        }
        let _ = apikey_build::waiting_status(&key, &Blocker::new(reasons::CUSTOMER_NOT_READY, "x"), None);
    }
}
