//! Subscription against real servers: status, Postgres row, etcd values (the quota and
//! the customer's plan) and decoded stream entries after every step.

use std::time::Duration;

use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use m3o_controllers::store::subscriptions::{self, SubscriptionRow};
use m3o_crds::Subscription;
use m3o_events::consumer::DecodedEvent;
use serde_json::{Value, json};

use crate::support::{TestEnv, eventually};

impl TestEnv {
    pub fn subscriptions(&self) -> Api<Subscription> {
        Api::namespaced(self.kube.clone(), &self.ns)
    }

    /// A Ready Customer `name` (a unique email) whose `pro` Subscription is Provisioned.
    pub async fn customer_with_pro_subscription(&self, name: &str) {
        let email = format!("{name}-{}@example.com", crate::support::suffix());
        self.apply_customer(name, json!({"email": email, "name": name}))
            .await;
        self.wait_ready(name).await;
        let spec = json!({"customerRef": {"name": name}, "plan": "pro"});
        self.apply_subscription(name, spec).await;
        self.wait_subscription(name, "True", "Provisioned").await;
    }

    pub async fn apply_subscription(&self, name: &str, spec: Value) -> Subscription {
        let body = json!({
            "apiVersion": "m3o.com/v1alpha1", "kind": "Subscription",
            "metadata": {"name": name, "namespace": self.ns}, "spec": spec,
        });
        self.subscriptions()
            .patch(
                name,
                &PatchParams::apply("integration-test").force(),
                &Patch::Apply(&body),
            )
            .await
            .unwrap_or_else(|e| panic!("apply subscription {name}: {e}"))
    }

    /// Waits (up to `timeout`) until the Subscription's Ready condition has `status` and
    /// `reason` for its current generation; returns it with that condition's message.
    pub async fn wait_subscription_within(
        &self,
        name: &str,
        status: &str,
        reason: &str,
        timeout: Duration,
    ) -> (Subscription, String) {
        let api = self.subscriptions();
        let what = format!("subscription {name} Ready={status} ({reason})");
        eventually(&what, timeout, || async {
            let s = api.get_opt(name).await.ok()??;
            let st = s.status.as_ref()?;
            let ready = st.conditions.iter().find(|c| c.type_ == "Ready")?;
            let current = st.observed_generation == s.metadata.generation;
            let message = ready.message.clone();
            (current && ready.status == status && ready.reason == reason).then_some((s, message))
        })
        .await
    }

    pub async fn wait_subscription(
        &self,
        name: &str,
        status: &str,
        reason: &str,
    ) -> (Subscription, String) {
        self.wait_subscription_within(name, status, reason, Duration::from_secs(60))
            .await
    }

    /// The live row of a Subscription.
    pub async fn subscription_row(&self, name: &str) -> Option<SubscriptionRow> {
        subscriptions::live_by_k8s_ref(&self.db, &self.ns, name)
            .await
            .expect("query subscriptions")
    }

    pub async fn subscription_row_by_id(&self, id: &str) -> SubscriptionRow {
        sqlx::query_as("SELECT * FROM subscriptions WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&self.db)
            .await
            .expect("subscription row")
    }

    /// A Ready Customer `name`; returns its id.
    pub async fn ready_customer(&self, name: &str) -> String {
        let email = format!("{name}@example.com");
        self.apply_customer(name, json!({"email": email})).await;
        let c = self.wait_ready(name).await;
        c.status.and_then(|s| s.customer_id).expect("customerId")
    }

    /// Waits until `<prefix>/<relative>` holds `expected` (`None`: absent).
    pub async fn wait_etcd(&self, relative: &str, expected: Option<Value>) {
        let what = format!("etcd {relative} = {expected:?}");
        eventually(&what, Duration::from_secs(30), || async {
            (self.etcd_json(relative).await == expected).then_some(())
        })
        .await;
    }

    /// Waits until the object is gone (its finalizer finished).
    pub async fn wait_gone<K>(&self, api: &Api<K>, name: &str)
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        eventually(
            &format!("{name} to be gone"),
            Duration::from_secs(60),
            || async { api.get_opt(name).await.ok()?.is_none().then_some(()) },
        )
        .await;
    }
}

/// Waits until a Subscription is Ready with `plan` and `quota` in status, then asserts
/// its row and etcd (quota and the customer's plan) agree; returns the row.
pub async fn assert_in_force(
    env: &TestEnv,
    name: &str,
    customer_id: &str,
    plan: &str,
    quota: (i64, i32),
) -> SubscriptionRow {
    let api = env.subscriptions();
    let what = format!("subscription {name} Ready on {plan} {quota:?}");
    let s = eventually(&what, Duration::from_secs(60), || async {
        let s = api.get_opt(name).await.ok()??;
        let st = s.status.as_ref()?;
        let ready = st.conditions.iter().find(|c| c.type_ == "Ready")?;
        let q = st.quota?;
        let done = st.observed_generation == s.metadata.generation
            && (ready.status.as_str(), ready.reason.as_str()) == ("True", "Provisioned")
            && st.plan.as_deref() == Some(plan)
            && (q.monthly_requests, q.requests_per_second) == quota;
        done.then_some(s)
    })
    .await;
    let st = s.status.clone().expect("status");
    let row = env.subscription_row(name).await.expect("live row");
    assert_eq!(st.subscription_id, Some(row.id.to_string()));
    assert_eq!(st.customer_id.as_deref(), Some(customer_id));
    assert_eq!(st.plan.as_deref(), Some(plan));
    assert_eq!(
        serde_json::to_value(st.state).expect("state"),
        json!("active")
    );
    let q = st.quota.expect("status.quota");
    assert_eq!((q.monthly_requests, q.requests_per_second), quota);
    assert_eq!(row.customer_id.to_string(), customer_id);
    assert_eq!((row.plan.as_str(), row.status.as_str()), (plan, "active"));
    assert_eq!((row.monthly_requests, row.requests_per_second), quota);
    assert_eq!(row.generation, s.metadata.generation.expect("generation"));
    let value = json!({"plan": plan, "monthlyRequests": quota.0, "requestsPerSecond": quota.1});
    env.wait_etcd(&m3o_platform_contract::quota_key(customer_id), Some(value))
        .await;
    let customer = env
        .etcd_json(&m3o_platform_contract::customer_key(customer_id))
        .await
        .expect("customer key");
    assert_eq!(customer["plan"], json!(plan), "{customer}");
    row
}

/// Asserts event `n` is a subscription event of type `t` with `tier` about `customer_id`.
pub fn assert_subscription_event(
    events: &[DecodedEvent],
    n: usize,
    t: &str,
    customer_id: &str,
    tier: &str,
) {
    let e = &events[n];
    assert_eq!(e.event_type, t, "event {n}: {events:?}");
    let got = match t {
        "EventTypeSubscriptionChanged" => e
            .event
            .subscription_changed
            .as_ref()
            .map(|c| c.tier.as_str()),
        _ => e
            .event
            .subscription_cancelled
            .as_ref()
            .map(|c| c.tier.as_str()),
    };
    assert_eq!(got, Some(tier), "event {n}");
    let c = e.event.customer.as_ref().expect("customer field");
    assert_eq!(c.id, customer_id, "event {n}");
}

const CHANGED: &str = "EventTypeSubscriptionChanged";
const CANCELLED: &str = "EventTypeSubscriptionCancelled";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_change_plan_override_quota_delete() {
    let env = TestEnv::new("sub-life").await;
    let _op = env.start_operator().await;
    let cid = env.ready_customer("alice").await;

    env.apply_subscription(
        "alice",
        json!({"customerRef": {"name": "alice"}, "plan": "free"}),
    )
    .await;
    let row = assert_in_force(&env, "alice", &cid, "free", (10_000, 5)).await;
    let events = env.wait_events(2).await;
    assert_eq!(events[0].event_type, "EventTypeCreated");
    assert_subscription_event(&events, 1, CHANGED, &cid, "free");
    assert_eq!(
        events[1].event.customer.as_ref().map(|c| c.email.as_str()),
        Some("alice@example.com")
    );

    env.apply_subscription(
        "alice",
        json!({"customerRef": {"name": "alice"}, "plan": "pro"}),
    )
    .await;
    let changed = assert_in_force(&env, "alice", &cid, "pro", (1_000_000, 50)).await;
    assert_eq!(changed.id, row.id, "a plan change keeps the record");
    assert_subscription_event(&env.wait_events(3).await, 2, CHANGED, &cid, "pro");

    let spec = json!({"customerRef": {"name": "alice"}, "plan": "pro",
        "quota": {"requestsPerSecond": 77}});
    env.apply_subscription("alice", spec).await;
    assert_in_force(&env, "alice", &cid, "pro", (1_000_000, 77)).await;
    // The outbox row commits before etcd is written: by now any event would be there.
    assert_eq!(
        env.outbox_count().await,
        3,
        "a quota-only change announces nothing"
    );

    // A hand edit of the quota key is drift: the operator restores it.
    let key = format!(
        "{}/{}",
        env.etcd_prefix,
        m3o_platform_contract::quota_key(&cid)
    );
    let mut kv = env.etcd.kv_client();
    kv.put(key, r#"{"plan":"business"}"#, None)
        .await
        .expect("hand edit");
    let restored = json!({"plan": "pro", "monthlyRequests": 1_000_000, "requestsPerSecond": 77});
    env.wait_etcd(&m3o_platform_contract::quota_key(&cid), Some(restored))
        .await;

    env.subscriptions()
        .delete("alice", &DeleteParams::default())
        .await
        .expect("delete");
    env.wait_gone(&env.subscriptions(), "alice").await;
    let cancelled = env.subscription_row_by_id(&row.id.to_string()).await;
    assert_eq!(cancelled.status, "cancelled");
    assert!(cancelled.cancelled_at.is_some());
    env.wait_etcd(&m3o_platform_contract::quota_key(&cid), None)
        .await;
    let customer = env
        .etcd_json(&m3o_platform_contract::customer_key(&cid))
        .await
        .expect("customer key");
    assert_eq!(customer["plan"], json!(""), "no subscription, no plan");
    let events = env.wait_events(4).await;
    assert_subscription_event(&events, 3, CANCELLED, &cid, "pro");
    assert_eq!(env.outbox_count().await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_plan_then_fixed() {
    let env = TestEnv::new("sub-plan").await;
    let _op = env.start_operator().await;
    let cid = env.ready_customer("bob").await;
    env.apply_subscription(
        "bob",
        json!({"customerRef": {"name": "bob"}, "plan": "gold"}),
    )
    .await;
    let (s, message) = env.wait_subscription("bob", "False", "UnknownPlan").await;
    assert!(
        message.contains("\"gold\"") && message.contains("business, free, pro"),
        "{message}"
    );
    let st = s.status.expect("status");
    assert_eq!(
        serde_json::to_value(st.state).expect("state"),
        json!("pending")
    );
    assert!(
        env.subscription_row("bob").await.is_none(),
        "no row for an unknown plan"
    );
    assert_eq!(
        env.etcd_json(&m3o_platform_contract::quota_key(&cid)).await,
        None
    );

    env.apply_subscription(
        "bob",
        json!({"customerRef": {"name": "bob"}, "plan": "business"}),
    )
    .await;
    assert_in_force(&env, "bob", &cid, "business", (10_000_000, 500)).await;
    assert_subscription_event(&env.wait_events(2).await, 1, CHANGED, &cid, "business");
}
