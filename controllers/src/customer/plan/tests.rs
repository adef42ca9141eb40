use std::collections::BTreeMap;

use chrono::{TimeZone, Utc};
use m3o_crds::{CustomerSpec, CustomerState};
use sqlx::types::Json;

use super::*;
use crate::customer::build::*;
use crate::status::reasons;
use m3o_crds::CustomerStatusState;

fn customer(state: CustomerState, email: &str) -> Customer {
    let mut c = Customer::new(
        "alice",
        CustomerSpec {
            email: email.into(),
            name: Some("Alice".into()),
            state,
            meta: BTreeMap::new(),
            id: None,
            deletion_policy: Default::default(),
        },
    );
    c.metadata.namespace = Some("team".into());
    c.metadata.uid = Some("uid-1".into());
    c.metadata.generation = Some(1);
    c
}

fn record(state: CustomerState) -> CustomerRecord {
    desired(&customer(state, "a@example.com"))
        .map(|d| d.record)
        .expect("desired")
}

/// A row as plans see it: an id and the record written.
type Row = (Uuid, CustomerRecord);

fn written(state: CustomerState) -> Row {
    (Uuid::nil(), record(state))
}

/// The events of a change of state.
fn events(old: CustomerState, new: CustomerState) -> Vec<EventType> {
    let d = desired(&customer(new, "a@example.com")).expect("desired");
    plan_row(Some(&written(old)), &d).events
}

#[test]
fn a_new_customer_is_inserted_with_one_created_event() {
    let d = desired(&customer(CustomerState::Active, "a@example.com")).expect("desired");
    let p = plan_row::<Row>(None, &d);
    assert!(matches!(p.write, RowWrite::Insert(_)));
    assert_eq!(p.events, vec![EventType::Created]);
}

#[test]
fn adopting_keeps_the_given_id() {
    let mut c = customer(CustomerState::Active, "a@example.com");
    let id = Uuid::new_v4();
    c.spec.id = Some(id.to_string());
    let p = plan_row::<Row>(None, &desired(&c).expect("desired"));
    assert_eq!(p.write, RowWrite::Insert(id));
}

#[test]
fn a_bad_id_is_reported() {
    let mut c = customer(CustomerState::Active, "a@example.com");
    c.spec.id = Some("nope".into());
    let blocker = desired(&c).unwrap_err();
    assert!(blocker.message.contains("spec.id"));
    assert_eq!(blocker.reason, reasons::INVALID_SPEC);
}

#[test]
fn a_repeat_writes_nothing_and_emits_nothing() {
    let old = written(CustomerState::Active);
    let d = desired(&customer(CustomerState::Active, "a@example.com")).expect("desired");
    assert_eq!(
        plan_row(Some(&old), &d),
        RowPlan {
            write: RowWrite::Keep(&old),
            events: vec![]
        }
    );
}

#[test]
fn state_transitions_map_to_m3o_events() {
    use CustomerState::*;
    assert_eq!(events(Active, Verified), vec![EventType::Verified]);
    assert_eq!(events(Unverified, Verified), vec![EventType::Verified]);
    assert_eq!(events(Active, Banned), vec![EventType::Banned]);
    assert_eq!(events(Banned, Active), vec![EventType::Unbanned]);
    assert_eq!(events(Banned, Verified), vec![EventType::Unbanned]);
    assert_eq!(events(Verified, Active), vec![EventType::Updated]);
}

#[test]
fn field_changes_are_one_updated_event() {
    let d = desired(&customer(CustomerState::Active, "b@example.com")).expect("desired");
    let old = written(CustomerState::Active);
    let p = plan_row(Some(&old), &d);
    assert_eq!(
        p,
        RowPlan {
            write: RowWrite::Update(&old),
            events: vec![EventType::Updated]
        }
    );
    // A state change and a field change are two transitions, two events.
    let d = desired(&customer(CustomerState::Banned, "b@example.com")).expect("desired");
    assert_eq!(
        plan_row(Some(&old), &d).events,
        vec![EventType::Banned, EventType::Updated]
    );
}

#[test]
fn bookkeeping_changes_update_without_events() {
    let mut c = customer(CustomerState::Active, "a@example.com");
    c.metadata.generation = Some(7);
    let old = written(CustomerState::Active);
    let p = plan_row(Some(&old), &desired(&c).expect("desired"));
    assert_eq!(
        p,
        RowPlan {
            write: RowWrite::Update(&old),
            events: vec![]
        }
    );
}

fn row() -> CustomerRow {
    let rec = record(CustomerState::Banned);
    CustomerRow {
        id: Uuid::nil(),
        email: rec.email,
        name: rec.name,
        status: rec.status,
        meta: Json(BTreeMap::from([("plan".into(), "pro".into())])),
        k8s_namespace: rec.k8s.namespace,
        k8s_name: rec.k8s.name,
        k8s_uid: rec.k8s.uid,
        generation: 1,
        created_at: Utc.timestamp_opt(1_700_000_000, 0).single().expect("time"),
        updated_at: Utc.timestamp_opt(1_700_000_100, 0).single().expect("time"),
        deleted_at: None,
    }
}

#[test]
fn events_carry_the_m3o_customer_payload() {
    let (aggregate_id, e) = event(&row(), EventType::Banned);
    assert_eq!(aggregate_id, Uuid::nil().to_string());
    assert_eq!(e.r#type(), EventType::Banned);
    assert!(e.banned.is_some());
    let c = e.customer.expect("customer");
    assert_eq!(
        (c.id.as_str(), c.status.as_str(), c.email.as_str()),
        (
            "00000000-0000-0000-0000-000000000000",
            "banned",
            "a@example.com"
        )
    );
    assert_eq!((c.created, c.updated), (1_700_000_000, 1_700_000_100));
    assert_eq!(c.meta.get("plan").map(String::as_str), Some("pro"));
}

#[test]
fn status_is_ready_with_id_and_lowercase_state() {
    let c = customer(CustomerState::Banned, "a@example.com");
    let s = provisioned_status(&c, &row(), "/m3o/customers/x");
    assert_eq!(s.state, Some(CustomerStatusState::Banned));
    assert_eq!(s.observed_generation, Some(1));
    let ready = crate::status::ready(&s.conditions).expect("ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Provisioned")
    );
}

#[test]
fn conflict_message_names_the_holder() {
    let c = customer(CustomerState::Active, "a@example.com");
    let holder = crate::k8s_ref::K8sRef {
        namespace: "team".into(),
        name: "bob".into(),
        uid: "u2".into(),
    };
    let blocker = email_conflict("a@example.com", &holder, &c);
    assert!(
        blocker.message.contains("Customer bob"),
        "{}",
        blocker.message
    );
    let s = blocked_status(&c, &blocker);
    let ready = crate::status::ready(&s.conditions).expect("ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Conflict")
    );
}
