//! Customer against real servers: status, Postgres row, etcd value and decoded
//! stream entries after every step.

use std::collections::HashSet;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PatchParams};
use m3o_events::customers::EventType;
use serde_json::json;

use crate::support::{TestEnv, eventually};

/// Asserts status, row and etcd agree for a Ready customer; returns its id.
async fn assert_provisioned(
    env: &TestEnv,
    name: &str,
    email: &str,
    display: &str,
    status: &str,
) -> String {
    let c = env.wait_ready(name).await;
    let s = c.status.clone().expect("status");
    let id = s.customer_id.clone().expect("status.customerId");
    assert_eq!(serde_json::to_value(s.state).expect("state"), json!(status));
    let row = env.row(name).await.expect("live row");
    assert_eq!(row.id.to_string(), id);
    assert_eq!(
        (row.email.as_str(), row.name.as_str(), row.status.as_str()),
        (email, display, status)
    );
    assert_eq!(row.k8s_uid, c.uid().expect("uid"));
    assert_eq!(row.generation, c.metadata.generation.expect("generation"));
    let value = env
        .etcd_json(&m3o_platform_contract::customer_key(&id))
        .await
        .expect("etcd value");
    assert_eq!(
        value,
        json!({"id": id, "email": email, "name": display, "status": status, "plan": ""})
    );
    id
}

/// Asserts the `n`th event (0-based, deduplicated) has `t` and the customer fields.
fn assert_event(
    events: &[m3o_events::consumer::DecodedEvent],
    n: usize,
    t: EventType,
    id: &str,
    email: &str,
    status: &str,
) {
    let e = &events[n];
    assert_eq!(e.event_type, t.as_str_name(), "event {n}: {events:?}");
    assert_eq!(e.event.r#type(), t);
    let c = e.event.customer.as_ref().expect("customer field");
    assert_eq!(
        (c.id.as_str(), c.email.as_str(), c.status.as_str()),
        (id, email, status),
        "event {n}"
    );
    assert!(c.created > 0 && c.updated >= c.created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_update_verify_ban_unban_delete() {
    let env = TestEnv::new("cust-life").await;
    let _op = env.start_operator().await;

    env.apply_customer(
        "alice",
        json!({"email": "alice@example.com", "name": "Alice", "meta": {"team": "core"}}),
    )
    .await;
    let id = assert_provisioned(&env, "alice", "alice@example.com", "Alice", "active").await;
    let events = env.wait_events(1).await;
    assert_event(
        &events,
        0,
        EventType::Created,
        &id,
        "alice@example.com",
        "active",
    );
    assert!(events[0].event.created.is_some());
    assert_eq!(
        events[0]
            .event
            .customer
            .as_ref()
            .map(|c| c.meta.get("team").cloned()),
        Some(Some("core".into()))
    );

    env.apply_customer(
        "alice",
        json!({"email": "alice@example.com", "name": "Alice A.", "meta": {"team": "core"}}),
    )
    .await;
    assert_provisioned(&env, "alice", "alice@example.com", "Alice A.", "active").await;
    let events = env.wait_events(2).await;
    assert_event(
        &events,
        1,
        EventType::Updated,
        &id,
        "alice@example.com",
        "active",
    );
    assert_eq!(
        events[1].event.customer.as_ref().map(|c| c.name.as_str()),
        Some("Alice A.")
    );

    let steps = [
        ("Verified", "verified", EventType::Verified),
        ("Banned", "banned", EventType::Banned),
        ("Active", "active", EventType::Unbanned),
    ];
    for (n, (state, status, event)) in steps.into_iter().enumerate() {
        env.apply_customer("alice", json!({"email": "alice@example.com", "name": "Alice A.", "meta": {"team": "core"}, "state": state})).await;
        assert_provisioned(&env, "alice", "alice@example.com", "Alice A.", status).await;
        let events = env.wait_events(3 + n).await;
        assert_event(&events, 2 + n, event, &id, "alice@example.com", status);
    }

    env.customers()
        .delete("alice", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("alice to be gone", Duration::from_secs(30), || async {
        env.customers()
            .get_opt("alice")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let row = env.row_by_id(&id).await;
    assert!(row.deleted_at.is_some());
    assert_eq!(row.status, "deleted");
    assert_eq!(
        env.etcd_json(&m3o_platform_contract::customer_key(&id))
            .await,
        None,
        "etcd key removed"
    );
    let events = env.wait_events(6).await;
    assert_event(
        &events,
        5,
        EventType::Deleted,
        &id,
        "alice@example.com",
        "deleted",
    );
    assert!(events[5].event.deleted.is_some());
    let ids: HashSet<_> = env.stream_events().await.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 6, "six transitions, six distinct event ids");
    assert_eq!(
        env.outbox_count().await,
        6,
        "exactly one outbox row per transition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_keeps_the_record_and_delete_removes_it() {
    let env = TestEnv::new("cust-orphan").await;
    let _op = env.start_operator().await;
    env.apply_customer(
        "kept",
        json!({"email": "kept@example.com", "deletionPolicy": "Orphan"}),
    )
    .await;
    env.apply_customer("gone", json!({"email": "gone@example.com"}))
        .await;
    let kept = assert_provisioned(&env, "kept", "kept@example.com", "", "active").await;
    let gone = assert_provisioned(&env, "gone", "gone@example.com", "", "active").await;

    for name in ["kept", "gone"] {
        env.customers()
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    eventually("both deleted", Duration::from_secs(30), || async {
        let list = env.customers().list(&Default::default()).await.ok()?;
        list.items.is_empty().then_some(())
    })
    .await;

    let row = env.row_by_id(&kept).await;
    assert!(row.deleted_at.is_none(), "Orphan leaves the row live");
    assert_eq!(row.status, "active");
    assert!(
        env.etcd_json(&m3o_platform_contract::customer_key(&kept))
            .await
            .is_some(),
        "Orphan leaves the etcd key"
    );
    let row = env.row_by_id(&gone).await;
    assert!(row.deleted_at.is_some(), "Delete marks the row");
    assert_eq!(
        env.etcd_json(&m3o_platform_contract::customer_key(&gone))
            .await,
        None,
        "Delete removes the key"
    );

    let events = env.wait_events(3).await;
    let deleted: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "EventTypeDeleted")
        .collect();
    assert_eq!(
        deleted.len(),
        1,
        "only the Delete policy announces a deletion"
    );
    assert_eq!(
        deleted[0].event.customer.as_ref().map(|c| c.id.clone()),
        Some(gone)
    );

    // Re-applying the orphaned resource reconnects to its record instead of duplicating it.
    env.apply_customer("kept", json!({"email": "kept@example.com"}))
        .await;
    let again = assert_provisioned(&env, "kept", "kept@example.com", "", "active").await;
    assert_eq!(again, kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_email_is_a_conflict_until_fixed() {
    let env = TestEnv::new("cust-dup").await;
    let _op = env.start_operator().await;
    env.apply_customer("first", json!({"email": "same@example.com"}))
        .await;
    env.wait_ready("first").await;
    env.apply_customer("second", json!({"email": "SAME@example.com"}))
        .await;
    let c = env.wait_customer("second", "False", "Conflict").await;
    let ready = c
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .expect("Ready");
    assert!(
        ready.message.contains("Customer first"),
        "names the holder: {}",
        ready.message
    );
    assert!(
        env.row("second").await.is_none(),
        "no row while conflicting"
    );

    env.apply_customer("second", json!({"email": "other@example.com"}))
        .await;
    assert_provisioned(&env, "second", "other@example.com", "", "active").await;
    let events = env.wait_events(2).await;
    assert!(events.iter().all(|e| e.event_type == "EventTypeCreated"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_reconciles_write_nothing() {
    let env = TestEnv::new("cust-idem").await;
    let op = env.start_operator().await;
    env.apply_customer(
        "steady",
        json!({"email": "steady@example.com", "name": "S"}),
    )
    .await;
    let id = assert_provisioned(&env, "steady", "steady@example.com", "S", "active").await;
    env.wait_events(1).await;
    let before = env.customers().get("steady").await.expect("get");
    // Status is written by server-side apply under the operator's field manager.
    let status_manager = before.managed_fields().iter().find(|f| {
        f.manager.as_deref() == Some("m3o-operator") && f.subresource.as_deref() == Some("status")
    });
    assert_eq!(
        status_manager.and_then(|f| f.operation.as_deref()),
        Some("Apply"),
        "{:?}",
        before.managed_fields()
    );
    let row_before = env.row("steady").await.expect("row");
    let revision_before = env
        .etcd_mod_revision(&m3o_platform_contract::customer_key(&id))
        .await;

    // A label change wakes the controller without changing the spec (a restart no
    // longer does: the start-up comparison finds the Customer Ready at its generation
    // with its record as planned, see restart.rs)...
    let reconciles = |m: String| {
        m.lines()
            .find_map(|l| l.strip_prefix("m3o_operator_reconciles_total{kind=\"Customer\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_default()
    };
    let before_count = reconciles(op.metrics().await);
    let patch = json!({"metadata": {"labels": {"touched": "1"}}});
    env.customers()
        .patch("steady", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("label");
    // ...and the reconcile it runs writes nothing.
    eventually(
        "the operator to reconcile again",
        Duration::from_secs(30),
        || async { (reconciles(op.metrics().await) > before_count).then_some(()) },
    )
    .await;
    op.settle().await;

    let after = env.customers().get("steady").await.expect("get");
    assert_eq!(after.status, before.status, "no status write");
    assert_eq!(
        env.row("steady").await.expect("row"),
        row_before,
        "no row write"
    );
    assert_eq!(
        env.etcd_mod_revision(&m3o_platform_contract::customer_key(&id))
            .await,
        revision_before,
        "no etcd write"
    );
    assert_eq!(env.outbox_count().await, 1, "no extra event");
    assert_eq!(env.stream_events().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edits_in_etcd_are_corrected() {
    let env = TestEnv::new("cust-drift").await;
    let op = env.start_operator().await;
    env.apply_customer("watched", json!({"email": "watched@example.com"}))
        .await;
    let id = assert_provisioned(&env, "watched", "watched@example.com", "", "active").await;
    let key = format!(
        "{}/{}",
        env.etcd_prefix,
        m3o_platform_contract::customer_key(&id)
    );
    let expected = env
        .etcd_json(&m3o_platform_contract::customer_key(&id))
        .await
        .expect("value");
    let mut kv = env.etcd.kv_client();
    op.settle().await;

    kv.put(key.clone(), r#"{"id":"x","status":"active"}"#, None)
        .await
        .expect("hand edit");
    eventually("edited value restored", Duration::from_secs(20), || async {
        (env.etcd_json(&m3o_platform_contract::customer_key(&id))
            .await
            .as_ref()
            == Some(&expected))
        .then_some(())
    })
    .await;

    kv.delete(key.clone(), None).await.expect("hand delete");
    eventually("deleted key restored", Duration::from_secs(20), || async {
        (env.etcd_json(&m3o_platform_contract::customer_key(&id))
            .await
            .as_ref()
            == Some(&expected))
        .then_some(())
    })
    .await;

    let stray = format!(
        "{}/{}",
        env.etcd_prefix,
        m3o_platform_contract::customer_key(uuid::Uuid::new_v4())
    );
    kv.put(stray.clone(), "{}", None)
        .await
        .expect("unowned key");
    kv.put(format!("{}/stray", env.etcd_prefix), "x", None)
        .await
        .expect("unowned key");
    eventually("unowned keys removed", Duration::from_secs(20), || async {
        (env.etcd_keys().await == vec![key.clone()]).then_some(())
    })
    .await;

    let metrics = op.metrics().await;
    assert!(
        metrics.contains("m3o_operator_drift_corrections_total{kind=\"customers\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("m3o_operator_drift_corrections_total{kind=\"unowned\"} 2"),
        "{metrics}"
    );
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(env.kube.clone(), &env.ns);
    eventually(
        "a DriftCorrected Event on the customer",
        Duration::from_secs(10),
        || async {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("DriftCorrected"))
                .then_some(())
        },
    )
    .await;
}
