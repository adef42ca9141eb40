//! `m3o-operator audit`: clean on a healthy fleet; names the object after a hand edit
//! and the key after an unowned one is added. Pages of 2 make every scan paginate.

use serde_json::{Value, json};

use super::{AdminBackends, text};
use crate::apikey::key_spec;
use crate::support::TestEnv;

async fn audit(env: &TestEnv, json_output: bool) -> (i32, String) {
    let mut args = vec!["audit", "--namespace", env.ns.as_str(), "--page-size", "2"];
    if json_output {
        args.extend(["-o", "json"]);
    }
    let out = env.admin(&args, &AdminBackends::default()).await;
    (out.status.code().unwrap_or(-1), text(&out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_is_clean_then_names_a_hand_edit_and_an_unowned_key() {
    let env = TestEnv::new("audit").await;
    let op = env.start_operator().await;
    for name in ["alice", "bob", "carol", "dave", "erin"] {
        env.apply_customer(name, json!({"email": format!("{name}@example.com")}))
            .await;
    }
    for name in ["alice", "bob", "carol"] {
        env.apply_subscription(name, json!({"customerRef": {"name": name}, "plan": "free"}))
            .await;
    }
    env.apply_apikey("alice-ci", key_spec(json!({}))).await;
    env.apply_apikey("alice-ops", key_spec(json!({"scopes": ["weather"]})))
        .await;
    env.apply_apikey("alice-web", key_spec(json!({"scopes": ["helloworld"]})))
        .await;
    for name in ["alice", "bob", "carol", "dave", "erin"] {
        env.wait_ready(name).await;
    }
    for name in ["alice", "bob", "carol"] {
        env.wait_subscription(name, "True", "Provisioned").await;
    }
    for name in ["alice-ci", "alice-ops", "alice-web"] {
        env.wait_apikey(name, "True", "Provisioned").await;
    }
    op.settle().await;

    let (code, out) = audit(&env, false).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("audit: clean"), "{out}");
    assert!(
        out.contains("Customer              5          0        5         0"),
        "{out}"
    );
    assert!(out.contains("etcd keys: 11 compared: 11 matches"), "{out}");

    // A hand edit of bob's quota, made while no operator restores it.
    op.stop().await;
    let bob = env
        .wait_ready("bob")
        .await
        .status
        .and_then(|s| s.customer_id)
        .expect("id");
    let quota = format!("quotas/{bob}");
    env.etcd_put(
        &quota,
        r#"{"plan":"business","monthlyRequests":1,"requestsPerSecond":1}"#,
    )
    .await;
    let (code, out) = audit(&env, false).await;
    assert_eq!(code, 1, "{out}");
    let key = format!("{}/{quota}", env.etcd_prefix);
    assert!(
        out.contains(&format!("Subscription {}/bob: etcd {key} differs", env.ns)),
        "{out}"
    );
    assert!(out.contains("audit: 1 finding(s)"), "{out}");

    // A key nothing owns.
    env.etcd_put("customers/not-a-customer", "{}").await;
    let (code, out) = audit(&env, true).await;
    assert_eq!(code, 1, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["clean"], false);
    assert_eq!(
        report["findings"],
        json!([ // in key order
            {"what": format!("etcd {}/customers/not-a-customer is owned by no record", env.etcd_prefix)},
            {"object": format!("Subscription {}/bob", env.ns), "what": format!("etcd {key} differs")},
        ])
    );
    assert_eq!(report["kinds"]["Subscription"]["findings"], 1);
    assert_eq!(
        report["etcd"]["verdicts"],
        json!({"matches": 10, "differs": 1, "unowned": 1})
    );
}
