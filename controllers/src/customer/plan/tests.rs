use std::collections::BTreeMap;

use chrono::{TimeZone, Utc};
use m3o_crds::{CustomerSpec, CustomerState};
use sqlx::types::Json;

use super::*;
use crate::customer::build::*;
use crate::report::status::reasons;
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
        plan_digest: None,
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
    let ready = crate::report::status::ready(&s.conditions).expect("ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Provisioned")
    );
}

#[test]
fn conflict_message_names_the_holder() {
    let c = customer(CustomerState::Active, "a@example.com");
    let holder = crate::pipeline::k8s_ref::K8sRef {
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
    let ready = crate::report::status::ready(&s.conditions).expect("ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Conflict")
    );
}

/// A case of `customer_plan.yaml`.
#[derive(serde::Deserialize)]
struct PlanCase {
    case: String,
    customer: Customer,
    /// The spec the row was last written for, as a change of `customer`.
    written: Option<serde_json::Value>,
    expect: PlanExpect,
}

#[derive(serde::Deserialize)]
struct PlanExpect {
    write: Option<String>,
    id: Option<Uuid>,
    #[serde(default)]
    events: Vec<String>,
    email: Option<String>,
    status: Option<String>,
    blocked: Option<String>,
    message: Option<String>,
}

#[test]
fn plans_of_the_fixtures() {
    for c in crate::testkit::fixtures::cases::<PlanCase>("customer_plan.yaml") {
        let name = &c.case;
        let d = match desired(&c.customer) {
            Ok(d) => d,
            Err(blocker) => {
                let (reason, message) = (c.expect.blocked.as_deref(), c.expect.message.as_deref());
                crate::testkit::fixtures::assert_blocked(name, &blocker, reason, message);
                continue;
            }
        };
        assert_eq!(c.expect.blocked, None, "{name}: not blocked");
        let old = c.written.as_ref().map(|overlay| {
            let previous = crate::testkit::fixtures::merged(&c.customer, overlay);
            (
                Uuid::nil(),
                desired(&previous).expect("written spec").record,
            )
        });
        let p = plan_row(old.as_ref(), &d);
        let (write, id) = match p.write {
            RowWrite::Insert(id) => ("insert", Some(id)),
            RowWrite::Keep(_) => ("keep", None),
            RowWrite::Update(_) => ("update", None),
        };
        assert_eq!(Some(write), c.expect.write.as_deref(), "{name}");
        if let Some(expected) = c.expect.id {
            assert_eq!(id, Some(expected), "{name}");
        }
        let events: Vec<String> = p.events.iter().map(|e| format!("{e:?}")).collect();
        assert_eq!(events, c.expect.events, "{name}");
        if let Some(email) = &c.expect.email {
            assert_eq!(&d.record.email, email, "{name}");
        }
        if let Some(status) = &c.expect.status {
            assert_eq!(&d.record.status, status, "{name}");
        }
    }
}

/// A row of `customer_adoption.yaml`.
#[derive(serde::Deserialize)]
struct FixtureRow {
    id: Option<Uuid>,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    deleted: bool,
}

impl FixtureRow {
    fn row(&self, default_id: Uuid) -> CustomerRow {
        CustomerRow {
            id: self.id.unwrap_or(default_id),
            k8s_namespace: self.namespace.clone(),
            k8s_name: self.name.clone(),
            k8s_uid: format!("u-{}", self.name),
            deleted_at: self.deleted.then(Utc::now),
            ..row()
        }
    }
}

#[derive(serde::Deserialize)]
struct AdoptionCase {
    case: String,
    customer: Customer,
    own: Option<FixtureRow>,
    target: Option<FixtureRow>,
    expect: AdoptionExpect,
}

#[derive(serde::Deserialize, Debug)]
#[serde(untagged)]
enum AdoptionExpect {
    Outcome(String),
    Blocked { blocked: String, message: String },
}

#[test]
fn adoption_of_the_fixtures() {
    for c in crate::testkit::fixtures::cases::<AdoptionCase>("customer_adoption.yaml") {
        let name = &c.case;
        let d = desired(&c.customer).expect("desired");
        let adopt_id = d.adopt_id.expect("every case adopts");
        let own = c.own.as_ref().map(|r| r.row(Uuid::now_v7()));
        let outcome = match own_row_conflict(adopt_id, own.as_ref()) {
            Some(blocker) => Err(blocker),
            None => match &c.target {
                None => Ok("insert"),
                Some(target) => match adoption(adopt_id, &d.record.k8s, &target.row(adopt_id)) {
                    Adoption::Take => Ok("take"),
                    Adoption::AskHolder => Ok("ask-holder"),
                    Adoption::Blocked(blocker) => Err(blocker),
                },
            },
        };
        match (&c.expect, outcome) {
            (AdoptionExpect::Outcome(want), Ok(got)) => assert_eq!(want, got, "{name}"),
            (AdoptionExpect::Blocked { blocked, message }, Err(b)) => {
                crate::testkit::fixtures::assert_blocked(name, &b, Some(blocked), Some(message));
            }
            (want, got) => panic!("{name}: expected {want:?}, got {got:?}"),
        }
    }
}
