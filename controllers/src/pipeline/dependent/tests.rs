use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::report::status::{self, reasons};
use crate::testkit::rows::customer_row;

/// Customer `c` (uid `u`, the row's), Ready as given (`None`: no condition yet).
fn customer(ready: Option<bool>) -> Customer {
    let spec = serde_json::from_value(serde_json::json!({"email": "a@b.co"}));
    let mut c = Customer::new("c", spec.expect("spec"));
    c.metadata.namespace = Some("ns".into());
    c.metadata.uid = Some("u".into());
    c.metadata.labels = Some([("m3o.com/shard".to_owned(), "a".to_owned())].into());
    c.status = ready.map(|ok| m3o_crds::CustomerStatus {
        conditions: status::merge(
            &[],
            &[status::Cond::new(
                status::types::READY,
                ok,
                reasons::PROVISIONED,
                "why",
            )],
            Some(1),
        ),
        ..Default::default()
    });
    c
}

/// The gate; refusals by their Debug form, blockers by their reason.
fn gate_of<'a>(
    requires: Requires,
    shard: Option<&Shard>,
    customer: Option<&Customer>,
    row: Option<&'a CustomerRow>,
) -> Result<Option<&'a CustomerRow>, String> {
    match gate(requires, shard, customer, row) {
        Gate::Use(row) => Ok(Some(row)),
        Gate::Wait => Ok(None),
        Gate::Refused(r) => Err(format!("{r:?}")),
        Gate::Blocked(b) => Err(b.reason.to_owned()),
    }
}

#[test]
fn both_kinds_wait_for_a_customer_being_provisioned_unless_in_another_shard() {
    let row = customer_row("active");
    let provisioning = customer(None);
    let here = Shard::parse("m3o.com/shard=a").expect("shard");
    let there = Shard::parse("m3o.com/shard=b").expect("shard");
    for requires in [Requires::LiveRecord, Requires::ReadyCustomer] {
        for shard in [None, Some(&here)] {
            let gate = gate_of(requires, shard, Some(&provisioning), Some(&row));
            assert_eq!(gate, Ok(None), "{requires:?}");
        }
        let ready = customer(Some(true));
        for c in [&provisioning, &ready] {
            let gate = gate_of(requires, Some(&there), Some(c), Some(&row));
            assert_eq!(
                gate,
                Err(reasons::CUSTOMER_IN_OTHER_SHARD.into()),
                "{requires:?}"
            );
        }
        // A Customer being deleted without a Ready condition is not being provisioned.
        let mut deleting = provisioning.clone();
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        assert!(!being_provisioned(&deleting));
        assert_ne!(gate_of(requires, None, Some(&deleting), None), Ok(None));
    }
}

#[test]
fn a_live_record_is_enough_for_a_key() {
    let row = customer_row("active");
    let gate = |c: Option<&Customer>, r| gate_of(Requires::LiveRecord, None, c, r);
    assert_eq!(gate(None, None), Err("NotFound".into()));
    assert_eq!(gate(None, Some(&row)), Ok(Some(&row)));
    let failing = customer(Some(false));
    assert_eq!(gate(Some(&failing), None), Err("NoRecord".into()));
    assert_eq!(gate(Some(&failing), Some(&row)), Ok(Some(&row)));
    let mut other_incarnation = row.clone();
    other_incarnation.k8s_uid = "previous".into();
    assert_eq!(
        gate(Some(&customer(Some(true))), Some(&other_incarnation)),
        Ok(Some(&other_incarnation))
    );
}

#[test]
fn a_subscription_needs_a_ready_customer_and_its_own_record() {
    let row = customer_row("active");
    let gate = |c: Option<&Customer>, r| gate_of(Requires::ReadyCustomer, None, c, r);
    assert_eq!(gate(None, Some(&row)), Err("NotFound".into()));
    let failing = customer(Some(false));
    assert_eq!(
        gate(Some(&failing), Some(&row)),
        Err(r#"NotReady { reason: "Provisioned", message: "why" }"#.into())
    );
    let ready = customer(Some(true));
    assert_eq!(gate(Some(&ready), None), Err("NoRecord".into()));
    assert_eq!(gate(Some(&ready), Some(&row)), Ok(Some(&row)));
    let mut other_incarnation = row.clone();
    other_incarnation.k8s_uid = "previous".into();
    assert_eq!(
        gate(Some(&ready), Some(&other_incarnation)),
        Err("NoRecord".into())
    );
    let mut deleting = ready.clone();
    deleting.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    assert_eq!(gate(Some(&deleting), Some(&row)), Err("Deleting".into()));
    // Not reached through the gate's wait, but decided all the same.
    assert_eq!(
        required(Requires::ReadyCustomer, Some(&customer(None)), Some(&row)),
        Err(Refusal::NotProvisioned)
    );
}
