//! Two shards on one API server split a fleet by label: each reconciles its own
//! objects, neither touches the other's, and a dependent whose Customer is in the other
//! shard says so.

use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::support::{Backends, Operator, TestEnv};

/// Applies an m3o object of `kind` with a shard label.
async fn apply(env: &TestEnv, kind: &str, name: &str, shard: &str, spec: Value) {
    let gvk = GroupVersionKind::gvk("m3o.com", "v1alpha1", kind);
    let api: Api<DynamicObject> =
        Api::namespaced_with(env.kube.clone(), &env.ns, &ApiResource::from_gvk(&gvk));
    let body = json!({
        "apiVersion": "m3o.com/v1alpha1", "kind": kind,
        "metadata": {"name": name, "namespace": env.ns, "labels": {"m3o.com/shard": shard}},
        "spec": spec,
    });
    api.patch(
        name,
        &PatchParams::apply("integration-test").force(),
        &Patch::Apply(&body),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {kind} {name}: {e}"));
}

async fn shard(env: &TestEnv, selector: &str) -> Operator {
    env.start_operator_with(Backends {
        extra_args: vec!["--shard-selector".into(), selector.into()],
        ..Default::default()
    })
    .await
}

/// The names of the objects whose reconcile this operator logged.
fn reconciled(op: &Operator) -> Vec<String> {
    let log = std::fs::read_to_string(&op.log_path).expect("operator log");
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        // kube-runtime's span of the reconcile, among the spans the line is in (the
        // operator's own `reconcile` span is inside it).
        .filter_map(|l| {
            let spans = l["spans"].as_array()?;
            let object = spans.iter().find_map(|s| s["object.ref"].as_str());
            object.map(str::to_owned)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_split_a_fleet_and_leave_each_other_alone() {
    let env = TestEnv::new("shards").await;
    let a = shard(&env, "m3o.com/shard=a").await;
    let b = shard(&env, "m3o.com/shard=b").await;
    for (s, i) in ["a", "b"].iter().flat_map(|s| (0..4).map(move |i| (*s, i))) {
        let name = format!("{s}{i}");
        apply(
            &env,
            "Customer",
            &name,
            s,
            json!({"email": format!("{name}@example.com")}),
        )
        .await;
        let sub = json!({"customerRef": {"name": name}, "plan": "pro"});
        apply(&env, "Subscription", &name, s, sub).await;
        let key = json!({"customerRef": {"name": name}, "description": "k", "scopes": ["*"]});
        apply(&env, "ApiKey", &name, s, key).await;
    }
    // Labelled for shard a, but its Customer is in shard b.
    let stray = json!({"customerRef": {"name": "b0"}, "description": "k", "scopes": ["*"]});
    apply(&env, "ApiKey", "stray", "a", stray).await;

    for name in ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"] {
        env.wait_ready(name).await;
        env.wait_subscription(name, "True", "Provisioned").await;
        env.wait_apikey(name, "True", "Provisioned").await;
    }
    let k = env
        .wait_apikey("stray", "False", "CustomerInOtherShard")
        .await;
    let ready = crate::apikey::ready_condition(&k);
    assert!(
        ready.message.contains("m3o.com/shard=a"),
        "{}",
        ready.message
    );
    a.settle().await;
    b.settle().await;

    // A line a reconcile logs names its object, in the operator's `reconcile` span.
    let log = std::fs::read_to_string(&a.log_path).expect("operator log");
    let written = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "customer record written" && l["span"]["object"] == "a0")
        .expect("the record written for a0 is logged in its reconcile span");
    assert_eq!(
        (&written["span"]["name"], &written["span"]["kind"]),
        (&json!("reconcile"), &json!("Customer"))
    );
    assert_eq!(written["span"]["namespace"], json!(env.ns), "{written}");
    assert!(
        written["span"]["generation"].as_i64().is_some(),
        "{written}"
    );

    let (by_a, by_b) = (reconciled(&a), reconciled(&b));
    assert!(!by_a.is_empty() && !by_b.is_empty(), "both shards worked");
    let names = |refs: &[String], shard: char| {
        refs.iter().any(|r| {
            r.rsplit_once('/')
                .is_some_and(|(_, name_ns)| name_ns.starts_with(shard))
        })
    };
    assert!(
        !names(&by_a, 'b'),
        "shard a reconciled a b object: {by_a:?}"
    );
    assert!(
        !names(&by_b, 'a'),
        "shard b reconciled an a object: {by_b:?}"
    );
    assert!(
        !by_b.iter().any(|r| r.contains("/stray.")),
        "shard b never saw stray"
    );
    assert_eq!(
        env.secret_key("stray-api-key").await,
        None,
        "no key issued for stray"
    );
}
