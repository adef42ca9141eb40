//! `m3o-operator audit`: clean on a healthy fleet; names the object after a hand edit
//! and the key after an unowned one is added. Pages of 2 make every scan paginate.

use serde_json::{Value, json};

use super::inspect::read_only_url;
use super::{AdminBackends, text};
use crate::apikey::key_spec;
use crate::support::TestEnv;
use crate::support::cli::ok;
use crate::support::kubeconfig::service_account_kubeconfig;

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
    let quota = m3o_platform_contract::quota_key(&bob);
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
    env.etcd_put(&m3o_platform_contract::customer_key("not-a-customer"), "{}")
        .await;
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

/// A ServiceAccount that may only get and list the three kinds and get Secrets in the
/// test's namespace; a kubeconfig with its token.
async fn reader_kubeconfig(env: &TestEnv) -> std::path::PathBuf {
    let manifest = format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: m3o-reader, namespace: {ns}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: m3o-reader, namespace: {ns}}}
rules:
  - apiGroups: [m3o.com]
    resources: [customers, subscriptions, apikeys]
    verbs: [get, list]
  - apiGroups: [""]
    resources: [secrets]
    verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: m3o-reader, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: m3o-reader}}
subjects: [{{kind: ServiceAccount, name: m3o-reader, namespace: {ns}}}]
"#,
        ns = env.ns
    );
    ok("kubectl", &["apply", "-f", "-"], Some(&manifest)).await;
    service_account_kubeconfig("m3o-reader", &env.ns, &env.ns).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_and_audit_run_with_read_only_credentials() {
    let env = TestEnv::new("audit-ro").await;
    let op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    env.apply_apikey("alice-ci", key_spec(json!({}))).await;
    env.wait_apikey("alice-ci", "True", "Provisioned").await;
    op.settle().await;
    let kubeconfig = reader_kubeconfig(&env).await;
    let kubeconfig = kubeconfig.to_str().expect("path");
    let database_url = read_only_url(&env).await;
    let backends = AdminBackends {
        database_url: Some(&database_url),
        ..Default::default()
    };

    // The context's namespace is the default of `inspect`.
    let out = env
        .admin(
            &["inspect", "apikey", "alice-ci", "--kubeconfig", kubeconfig],
            &backends,
        )
        .await;
    assert!(out.status.success(), "{}", text(&out));
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains("secret:\n  matches  alice-ci-api-key"),
        "{human}"
    );
    assert!(human.trim_end().ends_with("verdict: in sync"), "{human}");

    let args = ["audit", "--namespace", &env.ns, "--kubeconfig", kubeconfig];
    let out = env.admin(&args, &backends).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("audit: clean"), "{}", text(&out));

    // The reader cannot list cluster-wide: a one-line error, exit 2.
    let out = env
        .admin(&["audit", "--kubeconfig", kubeconfig], &backends)
        .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("m3o-operator: error: --kubeconfig: cannot list customers"),
        "{stderr}"
    );
}
