//! Subscription in the orders GitOps applies and deletes things: before its Customer,
//! two for one customer, and deleted together with its Customer.

use std::time::Duration;

use kube::api::DeleteParams;
use serde_json::json;

use crate::subscription::{assert_in_force, assert_subscription_event};
use crate::support::TestEnv;

/// Well below the 30 s blocked retry: what follows must come from the watches.
const PROMPTLY: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_before_its_customer() {
    let env = TestEnv::new("sub-first").await;
    let _op = env.start_operator().await;
    env.apply_subscription(
        "erin",
        json!({"customerRef": {"name": "erin"}, "plan": "pro"}),
    )
    .await;
    let (s, message) = env
        .wait_subscription("erin", "False", "CustomerNotFound")
        .await;
    assert!(message.contains("Customer erin"), "{message}");
    let st = s.status.expect("status");
    assert_eq!(
        serde_json::to_value(st.state).expect("state"),
        json!("pending")
    );
    assert!(env.subscription_row("erin").await.is_none());

    env.apply_customer("erin", json!({"email": "erin@example.com"}))
        .await;
    env.wait_subscription_within("erin", "True", "Provisioned", PROMPTLY)
        .await;
    let cid = env
        .wait_ready("erin")
        .await
        .status
        .and_then(|s| s.customer_id)
        .expect("id");
    assert_in_force(&env, "erin", &cid, "pro", (1_000_000, 50)).await;
    let events = env.wait_events(2).await;
    assert_eq!(events[0].event_type, "EventTypeCreated");
    assert_subscription_event(&events, 1, "EventTypeSubscriptionChanged", &cid, "pro");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_subscription_conflicts_until_the_holder_is_deleted() {
    let env = TestEnv::new("sub-dup").await;
    let _op = env.start_operator().await;
    let cid = env.ready_customer("frank").await;
    env.apply_subscription(
        "first",
        json!({"customerRef": {"name": "frank"}, "plan": "free"}),
    )
    .await;
    assert_in_force(&env, "first", &cid, "free", (10_000, 5)).await;
    env.apply_subscription(
        "second",
        json!({"customerRef": {"name": "frank"}, "plan": "pro"}),
    )
    .await;
    let (_, message) = env.wait_subscription("second", "False", "Conflict").await;
    assert!(
        message.contains("Subscription first"),
        "names the holder: {message}"
    );
    assert!(env.subscription_row("second").await.is_none());
    assert_in_force(&env, "first", &cid, "free", (10_000, 5)).await;

    env.subscriptions()
        .delete("first", &DeleteParams::default())
        .await
        .expect("delete");
    env.wait_subscription_within("second", "True", "Provisioned", PROMPTLY)
        .await;
    assert_in_force(&env, "second", &cid, "pro", (1_000_000, 50)).await;
    let events = env.wait_events(4).await;
    assert_subscription_event(&events, 1, "EventTypeSubscriptionChanged", &cid, "free");
    assert_subscription_event(&events, 2, "EventTypeSubscriptionCancelled", &cid, "free");
    assert_subscription_event(&events, 3, "EventTypeSubscriptionChanged", &cid, "pro");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_record_is_adopted_by_the_next_subscription() {
    let env = TestEnv::new("sub-orphan").await;
    let _op = env.start_operator().await;
    let cid = env.ready_customer("gina").await;
    let spec = json!({"customerRef": {"name": "gina"}, "plan": "pro", "deletionPolicy": "Orphan"});
    env.apply_subscription("old-name", spec).await;
    let row = assert_in_force(&env, "old-name", &cid, "pro", (1_000_000, 50)).await;
    env.subscriptions()
        .delete("old-name", &DeleteParams::default())
        .await
        .expect("delete");
    env.wait_gone(&env.subscriptions(), "old-name").await;
    assert_eq!(
        env.subscription_row_by_id(&row.id.to_string()).await.status,
        "active"
    );
    let quota = json!({"plan": "pro", "monthlyRequests": 1_000_000, "requestsPerSecond": 50});
    env.wait_etcd(&m3o_platform_contract::quota_key(&cid), Some(quota))
        .await;

    env.apply_subscription(
        "new-name",
        json!({"customerRef": {"name": "gina"}, "plan": "pro"}),
    )
    .await;
    let adopted = assert_in_force(&env, "new-name", &cid, "pro", (1_000_000, 50)).await;
    assert_eq!(adopted.id, row.id, "the record is adopted, not duplicated");
    assert_eq!(env.outbox_count().await, 2, "same tier: no new event");
}

/// Deletes a Customer and its Subscription back to back in the given order; both must
/// go, the record be cancelled, and the customer's keys be removed.
async fn delete_together(env: &TestEnv, customer: &str, subscription_first: bool) {
    let cid = env.ready_customer(customer).await;
    let spec = json!({"customerRef": {"name": customer}, "plan": "free"});
    env.apply_subscription(customer, spec).await;
    let row = assert_in_force(env, customer, &cid, "free", (10_000, 5)).await;
    let (subs, customers) = (env.subscriptions(), env.customers());
    let params = DeleteParams::default();
    if subscription_first {
        subs.delete(customer, &params)
            .await
            .expect("delete subscription");
        customers
            .delete(customer, &params)
            .await
            .expect("delete customer");
    } else {
        customers
            .delete(customer, &params)
            .await
            .expect("delete customer");
        subs.delete(customer, &params)
            .await
            .expect("delete subscription");
    }
    env.wait_gone(&subs, customer).await;
    env.wait_gone(&customers, customer).await;
    let cancelled = env.subscription_row_by_id(&row.id.to_string()).await;
    assert_eq!(cancelled.status, "cancelled");
    env.wait_etcd(&m3o_platform_contract::quota_key(&cid), None)
        .await;
    env.wait_etcd(&m3o_platform_contract::customer_key(&cid), None)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_customer_and_subscription_together_finishes_in_either_order() {
    let env = TestEnv::new("sub-del").await;
    let _op = env.start_operator().await;
    delete_together(&env, "hank", true).await;
    delete_together(&env, "iris", false).await;
    let events = env.wait_events(8).await;
    let cancelled = events
        .iter()
        .filter(|e| e.event_type == "EventTypeSubscriptionCancelled")
        .count();
    assert_eq!(cancelled, 2, "{events:?}");
    assert!(
        env.etcd_keys().await.is_empty(),
        "nothing left under the prefix"
    );
}
