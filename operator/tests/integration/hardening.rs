//! No single object or message stops the operator: a panicking reconcile stays with its
//! object, same-second Subscription ties resolve to exactly one holder, a Customer's
//! deletion ends its subscription, and keys under the prefix that only look owned
//! are pruned.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::DeleteParams;
use m3o_crds::Subscription;
use serde_json::json;

use crate::apikey::key_spec;
use crate::support::{Backends, Operator, TestEnv, eventually, http_get};

/// One series from the operator's `/metrics`; panics when the endpoint does not answer
/// (an unreachable endpoint must not read as zero).
async fn metric(op: &Operator, series: &str) -> f64 {
    let (code, body) = http_get(&format!("127.0.0.1:{}", op.port), "/metrics")
        .await
        .expect("the operator's /metrics answers");
    assert_eq!(code, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_reconcile_stays_with_its_object() {
    let env = TestEnv::new("panic").await;
    let point = format!("reconcile-panic=ApiKey/{}/doomed", env.ns);
    let op = env
        .start_operator_with(Backends {
            extra_env: vec![("M3O_FAILPOINTS".into(), point)],
            ..Default::default()
        })
        .await;
    env.customer_ready("alice", "Active").await;
    env.apply_apikey("doomed", key_spec(json!({}))).await;
    env.apply_apikey("fine", key_spec(json!({}))).await;

    // A failure leaves status.observedGeneration at the last success (none here); the
    // condition carries the generation it describes.
    let api = env.apikeys();
    let ready = eventually(
        "doomed Ready=False (InternalError)",
        Duration::from_secs(60),
        || async {
            let k = api.get_opt("doomed").await.ok()??;
            let ready = k
                .status
                .as_ref()?
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")?
                .clone();
            (ready.status == "False"
                && ready.reason == "InternalError"
                && ready.observed_generation == k.metadata.generation)
                .then_some(ready)
        },
    )
    .await;
    assert!(ready.message.contains("panicked"), "{}", ready.message);
    env.wait_apikey("fine", "True", "Provisioned").await;

    // The controller goes on: a block on another key still reaches the gateway.
    let key = env.secret_key("fine-api-key").await.expect("key");
    env.apply_apikey("fine", key_spec(json!({"blocked": true})))
        .await;
    env.wait_apikey("fine", "True", "Blocked").await;
    assert_eq!(
        env.gateway_entry(&key).await.map(|e| e["status"].clone()),
        Some(json!("blocked"))
    );

    let panics = "m3o_operator_reconcile_errors_total{kind=\"ApiKey\",reason=\"panic\"}";
    assert!(metric(&op, panics).await >= 1.0, "the panic is counted");
    let healthz = http_get(&format!("127.0.0.1:{}", op.port), "/healthz").await;
    assert_eq!(
        healthz.map(|(code, _)| code),
        Some(200),
        "one object's bug is not the process's"
    );
    let events: Api<Event> = Api::namespaced(env.kube.clone(), &env.ns);
    eventually(
        "a Warning Event on the panicking key",
        Duration::from_secs(20),
        || async {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("InternalError")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("doomed")
                })
                .then_some(())
        },
    )
    .await;
}

/// Ready Subscriptions, their Conflict siblings, and the plan in force in etcd, per
/// customer; once every customer shows exactly one Ready and one Conflict.
async fn one_holder_each(
    env: &TestEnv,
    customers: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let api: Api<Subscription> = env.subscriptions();
    eventually(
        "exactly one Ready Subscription per customer",
        Duration::from_secs(90),
        || async {
            let subs = api.list(&Default::default()).await.ok()?.items;
            let mut holders = BTreeMap::new();
            for (customer, id) in customers {
                let mine: Vec<&Subscription> = subs
                    .iter()
                    .filter(|s| &s.spec.customer_ref.name == customer)
                    .collect();
                let reason = |s: &Subscription| {
                    let st = s.status.as_ref()?;
                    let ready = st.conditions.iter().find(|c| c.type_ == "Ready")?;
                    (st.observed_generation == s.metadata.generation)
                        .then(|| (ready.status.clone(), ready.reason.clone()))
                };
                let ready: Vec<&&Subscription> = mine
                    .iter()
                    .filter(|s| reason(s) == Some(("True".into(), "Provisioned".into())))
                    .collect();
                let conflicts = mine
                    .iter()
                    .filter(|s| reason(s) == Some(("False".into(), "Conflict".into())))
                    .count();
                let [holder] = ready.as_slice() else {
                    return None;
                };
                if conflicts != mine.len() - 1 {
                    return None;
                }
                // The plan in force in etcd is the holder's.
                let quota = env.etcd_json(&m3o_platform_contract::quota_key(id)).await?;
                if quota["plan"].as_str() != Some(holder.spec.plan.as_str()) {
                    return None;
                }
                holders.insert(customer.clone(), holder.metadata.name.clone()?);
            }
            Some(holders)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_same_second_ties_leave_exactly_one_subscription_ready() {
    let env = TestEnv::new("sub-tie").await;
    let op = env.start_operator().await;
    let mut customers = BTreeMap::new();
    for i in 0..20 {
        let name = format!("tie{i}");
        customers.insert(name.clone(), env.ready_customer(&name).await);
    }
    // The z- name first, the a- name right after (same second, so the name decides the
    // age order against the order of arrival): two plans, so etcd tells who holds it.
    for customer in customers.keys() {
        let spec = |plan| json!({"customerRef": {"name": customer}, "plan": plan});
        env.apply_subscription(&format!("z-{customer}"), spec("pro"))
            .await;
        env.apply_subscription(&format!("a-{customer}"), spec("business"))
            .await;
    }
    let holders = one_holder_each(&env, &customers).await;
    // And it stays that way: nothing flips once the operator has nothing left to do.
    op.settle().await;
    assert_eq!(one_holder_each(&env, &customers).await, holders);
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM subscriptions WHERE cancelled_at IS NULL")
            .fetch_one(&env.db)
            .await
            .expect("count");
    assert_eq!(rows, 20, "one record in force per customer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_customer_cancels_its_subscription() {
    let env = TestEnv::new("cust-cancel").await;
    let _op = env.start_operator().await;
    let cid = env.ready_customer("kim").await;
    env.apply_subscription(
        "kim",
        json!({"customerRef": {"name": "kim"}, "plan": "pro"}),
    )
    .await;
    let row = crate::subscription::assert_in_force(&env, "kim", &cid, "pro", (1_000_000, 50)).await;

    env.customers()
        .delete("kim", &DeleteParams::default())
        .await
        .expect("delete customer");
    env.wait_gone(&env.customers(), "kim").await;

    env.wait_etcd(&m3o_platform_contract::quota_key(&cid), None)
        .await;
    let cancelled = env.subscription_row_by_id(&row.id.to_string()).await;
    assert_eq!(cancelled.status, "cancelled");
    assert!(cancelled.cancelled_at.is_some());
    let events = env.wait_events(4).await;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "EventTypeCreated",
            "EventTypeSubscriptionChanged",
            "EventTypeSubscriptionCancelled",
            "EventTypeDeleted"
        ]
    );
    // The Subscription stays, saying what happened.
    let api = env.subscriptions();
    eventually(
        "the Subscription reports its cancellation",
        Duration::from_secs(30),
        || async {
            let s = api.get_opt("kim").await.ok()??;
            let st = s.status?;
            let ready = st.conditions.iter().find(|c| c.type_ == "Ready")?;
            (ready.reason == "CustomerNotFound"
                && serde_json::to_value(st.state).ok()? == json!("cancelled"))
            .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_only_look_owned_are_pruned() {
    let env = TestEnv::new("prune-case").await;
    let _op = env.start_operator().await;
    let id = env.ready_customer("lou").await;
    // The same id in other spellings: not what the operator writes, so nothing owns them.
    let upper = m3o_platform_contract::customer_key(id.to_uppercase());
    let simple = m3o_platform_contract::quota_key(id.replace('-', ""));
    let mut kv = env.etcd.kv_client();
    for relative in [&upper, &simple] {
        kv.put(format!("{}/{relative}", env.etcd_prefix), "{}", None)
            .await
            .expect("hand put");
    }
    env.wait_etcd(&upper, None).await;
    env.wait_etcd(&simple, None).await;
    assert!(
        env.etcd_json(&m3o_platform_contract::customer_key(&id))
            .await
            .is_some(),
        "the real key stays"
    );
}
