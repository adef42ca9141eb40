use std::collections::BTreeMap;

use chrono::DateTime;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use m3o_crds::{CustomerRef, CustomerSpec, CustomerStatus, QuotaOverride, SubscriptionSpec};

use super::*;
use crate::pipeline::row_plan::Digested;
use crate::subscription::build::*;
use m3o_crds::SubscriptionState;

fn subscription(name: &str, plan: &str, created: i64) -> Subscription {
    let mut s = Subscription::new(
        name,
        SubscriptionSpec {
            customer_ref: CustomerRef {
                name: "alice".into(),
            },
            plan: plan.into(),
            quota: None,
            deletion_policy: Default::default(),
        },
    );
    s.metadata.namespace = Some("team".into());
    s.metadata.uid = Some(format!("uid-{name}"));
    s.metadata.generation = Some(1);
    s.metadata.creation_timestamp = Timestamp::from_second(created).ok().map(Time);
    s
}

fn customer(ready: Option<bool>) -> Customer {
    let mut c = Customer::new(
        "alice",
        CustomerSpec {
            email: "a@example.com".into(),
            name: None,
            state: Default::default(),
            meta: BTreeMap::new(),
            id: None,
            deletion_policy: Default::default(),
        },
    );
    c.metadata.uid = Some("cust-uid".into());
    if let Some(ok) = ready {
        let reason = if ok { "Provisioned" } else { "Conflict" };
        c.status = Some(CustomerStatus {
            conditions: crate::testkit::rows::ready_conditions(ok, reason, 1),
            ..Default::default()
        });
    }
    c
}

fn customer_row() -> CustomerRow {
    CustomerRow {
        id: Uuid::now_v7(),
        email: "a@example.com".into(),
        k8s_namespace: "team".into(),
        k8s_name: "alice".into(),
        k8s_uid: "cust-uid".into(),
        ..crate::testkit::rows::customer_row("active")
    }
}

fn sub_row(record: &SubscriptionRecord) -> SubscriptionRow {
    SubscriptionRow {
        id: Uuid::now_v7(),
        customer_id: record.customer_id,
        plan: record.plan.clone(),
        monthly_requests: record.monthly_requests,
        requests_per_second: record.requests_per_second,
        status: "active".into(),
        k8s_namespace: record.k8s.namespace.clone(),
        k8s_name: record.k8s.name.clone(),
        k8s_uid: record.k8s.uid.clone(),
        generation: record.generation,
        created_at: DateTime::UNIX_EPOCH,
        updated_at: DateTime::UNIX_EPOCH,
        cancelled_at: None,
        plan_digest: Some(record.digest()),
    }
}

fn record_for(sub: &Subscription, customer_id: Uuid) -> SubscriptionRecord {
    let quota = effective_quota(&Catalog::builtin(), &sub.spec).expect("known plan");
    desired_record(sub, customer_id, quota)
}

#[test]
fn quota_is_plan_defaults_overridden_field_by_field() {
    let mut s = subscription("s", "pro", 1);
    let pro = Catalog::builtin().get("pro").expect("pro");
    assert_eq!(effective_quota(&Catalog::builtin(), &s.spec), Ok(pro));
    s.spec.quota = Some(QuotaOverride {
        monthly_requests: None,
        requests_per_second: Some(7),
    });
    let q = effective_quota(&Catalog::builtin(), &s.spec).expect("quota");
    assert_eq!(q.monthly_requests, pro.monthly_requests);
    assert_eq!(q.requests_per_second, 7);
}

#[test]
fn an_unknown_plan_lists_the_valid_ones() {
    let s = subscription("s", "gold", 1);
    let b = effective_quota(&Catalog::builtin(), &s.spec).expect_err("unknown");
    assert_eq!(b.reason, reasons::UNKNOWN_PLAN);
    assert!(b.message.contains("\"gold\""), "{}", b.message);
    assert!(b.message.contains("business, free, pro"), "{}", b.message);
}

#[test]
fn the_customer_must_exist_be_ready_and_have_its_row() {
    let row = customer_row();
    fn gate<'a>(
        c: Option<&Customer>,
        r: Option<&'a CustomerRow>,
    ) -> Result<&'a CustomerRow, &'static str> {
        match customer_use(None, c, r) {
            Gate::Use(row) => Ok(row),
            Gate::Wait => Err("wait"),
            Gate::Blocked(b) => Err(b.reason),
            Gate::Refused(refusal) => Err(customer_refusal("alice", refusal).reason),
        }
    }
    assert_eq!(gate(None, None), Err(reasons::CUSTOMER_NOT_FOUND));
    // Being provisioned: a quiet wait, no status.
    let not_provisioned = customer(None);
    assert_eq!(gate(Some(&not_provisioned), Some(&row)), Err("wait"));
    let failing = customer(Some(false));
    assert_eq!(
        gate(Some(&failing), Some(&row)),
        Err(reasons::CUSTOMER_NOT_READY)
    );
    let ready = customer(Some(true));
    assert_eq!(gate(Some(&ready), None), Err(reasons::CUSTOMER_NOT_READY));
    assert_eq!(gate(Some(&ready), Some(&row)), Ok(&row));
    let mut stale = row.clone();
    stale.k8s_uid = "previous-incarnation".into();
    assert_eq!(
        gate(Some(&ready), Some(&stale)),
        Err(reasons::CUSTOMER_NOT_READY)
    );
    let mut deleting = ready.clone();
    deleting.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    assert_eq!(
        gate(Some(&deleting), Some(&row)),
        Err(reasons::CUSTOMER_NOT_READY)
    );
}

#[test]
fn refusals_of_the_customer_are_worded_as_before() {
    let message = |r: Refusal| {
        let b = customer_refusal("alice", r);
        format!("{}: {}", b.reason, b.message)
    };
    assert_eq!(
        message(Refusal::NotFound),
        "CustomerNotFound: Customer alice does not exist in this namespace; create it and this Subscription follows"
    );
    let not_ready = [
        (Refusal::Deleting, "is being deleted"),
        (
            Refusal::NotReady {
                reason: "Conflict".into(),
                message: "msg".into(),
            },
            "is not Ready (Conflict: msg)",
        ),
        (Refusal::NotProvisioned, "is not provisioned yet"),
        (Refusal::NoRecord, "has no customer record yet"),
    ];
    for (refusal, why) in not_ready {
        assert_eq!(
            message(refusal),
            format!(
                "CustomerNotReady: Customer alice {why}; this Subscription follows once it is Ready"
            )
        );
    }
}

#[test]
fn the_oldest_subscription_holds_the_slot() {
    let old = subscription("zeta", "free", 10);
    let young = subscription("alpha", "pro", 20);
    let tie = subscription("beta", "pro", 10);
    let all = vec![old.clone(), young.clone(), tie.clone()];
    let holder = |s: &Subscription, all: &[Subscription]| slot_holder(s, all).map(|h| h.name_any());
    assert_eq!(holder(&tie, &all), None, "same second: the name decides");
    assert_eq!(holder(&old, &all).as_deref(), Some("beta"));
    assert_eq!(holder(&young, &all).as_deref(), Some("beta"));

    let mut deleting = all.clone();
    deleting[2].metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    assert_eq!(
        holder(&old, &deleting),
        None,
        "a holder being deleted yields"
    );
    assert_eq!(holder(&young, &deleting).as_deref(), Some("zeta"));

    let mut other_customer = tie.clone();
    other_customer.spec.customer_ref.name = "bob".into();
    assert!(slot_holder(&young, &[young.clone(), other_customer]).is_none());
}

#[test]
fn conflict_names_the_holder() {
    let b = conflict("alice", "alice-free", false);
    assert_eq!(b.reason, reasons::CONFLICT);
    assert!(
        b.message.contains("Subscription alice-free"),
        "{}",
        b.message
    );
    assert!(
        conflict("alice", "x", true)
            .message
            .contains("being deleted")
    );
}

#[test]
fn a_new_subscription_announces_its_tier() {
    let s = subscription("s", "pro", 1);
    let p = plan_row::<SubscriptionRow>(None, &record_for(&s, Uuid::now_v7()));
    assert!(matches!(p.write, RowWrite::Insert(_)));
    assert_eq!(p.events, vec![EventType::SubscriptionChanged]);
}

#[test]
fn a_repeat_writes_nothing_and_a_plan_change_announces_it() {
    let customer_id = Uuid::now_v7();
    let s = subscription("s", "pro", 1);
    let old = (Uuid::nil(), record_for(&s, customer_id));
    assert_eq!(
        plan_row(Some(&old), &old.1),
        RowPlan {
            write: RowWrite::Keep(&old),
            events: vec![]
        }
    );
    let business = record_for(&subscription("s", "business", 1), customer_id);
    let p = plan_row(Some(&old), &business);
    assert_eq!(p.write, RowWrite::Update(&old));
    assert_eq!(p.events, vec![EventType::SubscriptionChanged]);
}

#[test]
fn quota_only_changes_are_silent_updates() {
    let customer_id = Uuid::now_v7();
    let mut s = subscription("s", "pro", 1);
    let old = (Uuid::nil(), record_for(&s, customer_id));
    s.spec.quota = Some(QuotaOverride {
        monthly_requests: Some(5),
        requests_per_second: None,
    });
    s.metadata.generation = Some(2);
    let p = plan_row(Some(&old), &record_for(&s, customer_id));
    assert_eq!(p.write, RowWrite::Update(&old));
    assert!(p.events.is_empty());
}

#[test]
fn events_carry_the_tier_and_the_customer() {
    let row = customer_row();
    let payload = customer_payload(row.id, Some(&row));
    let e = event(payload, EventType::SubscriptionChanged, "pro");
    assert_eq!(e.r#type(), EventType::SubscriptionChanged);
    assert_eq!(
        e.subscription_changed.as_ref().map(|c| c.tier.as_str()),
        Some("pro")
    );
    assert_eq!(
        e.customer.as_ref().map(|c| c.email.as_str()),
        Some("a@example.com")
    );

    let gone = customer_payload(row.id, None);
    let e = event(gone, EventType::SubscriptionCancelled, "pro");
    assert_eq!(
        e.subscription_cancelled.as_ref().map(|c| c.tier.as_str()),
        Some("pro")
    );
    assert_eq!(e.customer.map(|c| c.id), Some(row.id.to_string()));
}

#[test]
fn status_reports_what_is_in_force() {
    let s = subscription("s", "pro", 1);
    let row = sub_row(&record_for(&s, Uuid::now_v7()));
    let st = provisioned_status(&s, &row, "/m3o/quotas/x");
    assert_eq!(st.state, Some(SubscriptionState::Active));
    assert_eq!(st.subscription_id, Some(row.id.to_string()));
    assert_eq!(st.plan.as_deref(), Some("pro"));
    assert_eq!(
        st.quota.map(|q| q.requests_per_second),
        Some(row.requests_per_second)
    );
    assert!(crate::report::status::ready(&st.conditions).is_some_and(|c| c.status == "True"));
    assert_eq!(st.conditions.len(), 3);

    let mut provisioned = s.clone();
    provisioned.status = Some(st);
    let blocker = Blocker::new(reasons::UNKNOWN_PLAN, "no");
    let still = blocked_status(&provisioned, &blocker, Some(&row));
    assert_eq!(
        still.state,
        Some(SubscriptionState::Active),
        "the old plan stays in force"
    );
    assert_eq!(still.plan.as_deref(), Some("pro"));
    let ready = crate::report::status::ready(&still.conditions).expect("ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "UnknownPlan")
    );

    let pending = blocked_status(&s, &blocker, None);
    assert_eq!(pending.state, Some(SubscriptionState::Pending));
    assert_eq!((pending.subscription_id, pending.quota), (None, None));
}

#[derive(serde::Deserialize)]
struct FixtureCase {
    case: String,
    subscription: Subscription,
    holder: Option<String>,
    #[serde(default)]
    siblings: Vec<Subscription>,
    expect: FixtureExpect,
}

#[derive(serde::Deserialize)]
struct FixtureExpect {
    quota: Option<Quota>,
    slot: Option<String>,
    blocked: Option<String>,
    message: Option<String>,
}

fn fixture_holder(holder: &str) -> RecordHolder {
    match holder.split_once(' ') {
        Some(("live", name)) => RecordHolder::Live(name.into()),
        Some(("deleting", name)) => RecordHolder::Deleting(name.into()),
        _ => match holder {
            "nobody" => RecordHolder::Nobody,
            "this" => RecordHolder::This,
            "gone" => RecordHolder::Gone,
            other => panic!("unknown holder {other:?}"),
        },
    }
}

#[test]
fn decisions_of_the_fixtures() {
    let catalog = Catalog::builtin();
    for c in crate::testkit::fixtures::cases::<FixtureCase>("subscription_plan.yaml") {
        let name = &c.case;
        let decided = match &c.holder {
            Some(holder) => {
                slot_decision(&c.subscription, &c.siblings, &fixture_holder(holder)).map(|()| None)
            }
            None => effective_quota(&catalog, &c.subscription.spec).map(Some),
        };
        match decided {
            Ok(quota) => {
                assert_eq!(c.expect.blocked, None, "{name}: not blocked");
                assert_eq!(quota, c.expect.quota, "{name}");
                if c.holder.is_some() {
                    assert_eq!(c.expect.slot.as_deref(), Some("write"), "{name}");
                }
            }
            Err(blocker) => {
                let (reason, message) = (c.expect.blocked.as_deref(), c.expect.message.as_deref());
                crate::testkit::fixtures::assert_blocked(name, &blocker, reason, message);
            }
        }
    }
}
