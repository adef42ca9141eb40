//! The chart's RBAC is exactly what the operator needs: `kubectl auth can-i --as`
//! per verb, and the real operator run under the ServiceAccount's token.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;

use super::*;
use crate::support::cli::{run, text};
use crate::support::kubeconfig::service_account_kubeconfig;
use crate::support::{Backends, TestEnv, eventually, suffix};

/// `kubectl auth can-i VERB RESOURCE` as the ServiceAccount `sa` of namespace `sa_ns`.
async fn can_i(sa_ns: &str, sa: &str, verb: &str, resource: &str, namespace: &str) -> bool {
    let user = format!("system:serviceaccount:{sa_ns}:{sa}");
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (resource, None),
    };
    let sub = subresource.map(|s| format!("--subresource={s}"));
    let mut args = vec!["auth", "can-i", verb, resource, "--as", &user];
    if namespace.is_empty() {
        args.push("--all-namespaces");
    } else {
        args.extend(["-n", namespace]);
    }
    if let Some(sub) = &sub {
        args.push(sub);
    }
    let out = run("kubectl", &args, None).await;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl {}: {}",
        args.join(" "),
        text(&out)
    );
    answer == "yes"
}

/// Checks every (verb, resource, namespace) against `expected`, reporting all mismatches.
async fn check_access(
    sa_ns: &str,
    sa: &str,
    expected: bool,
    cases: &[(&str, &str, &str)],
    failures: &mut Vec<String>,
) {
    let answers = futures::future::join_all(
        cases
            .iter()
            .map(|(verb, resource, ns)| can_i(sa_ns, sa, verb, resource, ns)),
    )
    .await;
    for ((verb, resource, ns), answer) in cases.iter().zip(answers) {
        if answer != expected {
            let want = if expected { "allowed" } else { "denied" };
            failures.push(format!("{verb} {resource} in {ns:?} should be {want}"));
        }
    }
}

/// What the operator does in a namespace it watches.
fn needed(ns: &str) -> Vec<(&'static str, &'static str, &str)> {
    let mut cases = Vec::new();
    for kind in [
        "customers.m3o.com",
        "subscriptions.m3o.com",
        "apikeys.m3o.com",
    ] {
        for verb in ["get", "list", "watch", "patch"] {
            cases.push((verb, kind, ns));
        }
    }
    for status in [
        "customers.m3o.com/status",
        "subscriptions.m3o.com/status",
        "apikeys.m3o.com/status",
    ] {
        cases.push(("patch", status, ns));
    }
    for verb in ["get", "list", "watch", "create", "patch", "delete"] {
        cases.push((verb, "secrets", ns));
    }
    cases.push(("create", "events.events.k8s.io", ns));
    cases.push(("patch", "events.events.k8s.io", ns));
    cases
}

/// What it must never be able to do in a namespace it watches.
fn forbidden(ns: &str) -> Vec<(&'static str, &'static str, &str)> {
    let mut cases = vec![
        // It never deletes, creates or replaces m3o resources: it removes its finalizer.
        ("delete", "customers.m3o.com", ns),
        ("create", "customers.m3o.com", ns),
        ("update", "customers.m3o.com", ns),
        ("deletecollection", "customers.m3o.com", ns),
        ("delete", "apikeys.m3o.com", ns),
        ("delete", "subscriptions.m3o.com", ns),
        ("update", "apikeys.m3o.com/status", ns),
        ("update", "secrets", ns),
        ("deletecollection", "secrets", ns),
        ("get", "configmaps", ns),
        ("list", "pods", ns),
        ("create", "pods", ns),
        ("create", "pods/exec", ns),
        ("get", "serviceaccounts/token", ns),
        ("create", "serviceaccounts/token", ns),
        ("list", "events", ns),
        ("create", "events", ns),
        ("create", "roles.rbac.authorization.k8s.io", ns),
        ("create", "rolebindings.rbac.authorization.k8s.io", ns),
        ("delete", "leases.coordination.k8s.io", ns),
        ("list", "leases.coordination.k8s.io", ns),
        ("*", "*", ns),
    ];
    cases.extend([
        ("get", "nodes", ""),
        ("list", "namespaces", ""),
        ("delete", "namespaces", ""),
        ("get", "customresourcedefinitions.apiextensions.k8s.io", ""),
        (
            "create",
            "customresourcedefinitions.apiextensions.k8s.io",
            "",
        ),
        ("create", "clusterroles.rbac.authorization.k8s.io", ""),
        ("bind", "clusterroles.rbac.authorization.k8s.io", ""),
        ("escalate", "clusterroles.rbac.authorization.k8s.io", ""),
        ("impersonate", "users", ""),
        ("impersonate", "serviceaccounts", ""),
        (
            "create",
            "certificatesigningrequests.certificates.k8s.io",
            "",
        ),
    ]);
    cases
}

fn lease_verbs(ns: &str) -> Vec<(&'static str, &'static str, &str)> {
    vec![("create", "leases.coordination.k8s.io", ns)]
}

#[tokio::test]
async fn cluster_wide_rbac_allows_exactly_what_the_operator_does() {
    let env = TestEnv::new("chart-rbac").await;
    let release = format!("m3o-{}", suffix());
    let sa = format!("{release}-m3o-operator");
    install(&release, &env.ns, &[]).await;
    let other = format!("chart-rbac-other-{}", suffix());
    create_namespace(&other, &[]).await;
    let ns = env.ns.as_str();
    let mut failures = Vec::new();
    // Cluster-wide: every namespace, and list/watch across all of them.
    let mut yes = needed(ns);
    yes.extend(needed(&other));
    yes.extend([
        ("list", "customers.m3o.com", ""),
        ("watch", "apikeys.m3o.com", ""),
        ("list", "secrets", ""),
    ]);
    yes.extend(lease_verbs(ns));
    check_access(ns, &sa, true, &yes, &mut failures).await;
    let mut no = forbidden(ns);
    no.extend(forbidden(&other));
    // Leases only in the release namespace.
    no.extend(lease_verbs(&other));
    check_access(ns, &sa, false, &no, &mut failures).await;
    // The lease rule names the release's own Lease only (<fullname>-leader by default:
    // two releases in one namespace never share one), and only get/update it.
    let lease = format!("leases.coordination.k8s.io/{sa}-leader");
    let lease = lease.as_str();
    for (verb, typed, want) in [
        ("get", lease, true),
        ("update", lease, true),
        ("patch", lease, false),
        ("delete", lease, false),
        ("update", "leases.coordination.k8s.io/other", false),
        ("get", "leases.coordination.k8s.io/m3o-operator", false),
        ("get", "leases.coordination.k8s.io/other", false),
    ] {
        let got = can_i_named(ns, &sa, verb, typed, ns).await;
        if got != want {
            failures.push(format!("{verb} {typed}: {got} (want {want})"));
        }
    }
    helm(&["uninstall", &release, "-n", ns, "--no-hooks"]).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `kubectl auth can-i VERB TYPE/NAME` (resourceNames rules).
async fn can_i_named(sa_ns: &str, sa: &str, verb: &str, typed: &str, ns: &str) -> bool {
    let user = format!("system:serviceaccount:{sa_ns}:{sa}");
    let out = run(
        "kubectl",
        &["auth", "can-i", verb, typed, "-n", ns, "--as", &user],
        None,
    )
    .await;
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

/// Installs the chart into its own namespace watching the test's namespace, then runs
/// the real operator with the ServiceAccount's token through a full lifecycle: the
/// rules allow everything it does (nothing in its log is forbidden).
#[tokio::test]
async fn namespaced_rbac_runs_the_operator_under_its_service_account() {
    let env = TestEnv::new("chart-sa").await;
    let release_ns = format!("{}-sys", env.ns);
    create_namespace(&release_ns, &[]).await;
    let release = format!("m3o-{}", suffix());
    let sa = format!("{release}-m3o-operator");
    let lease_name = format!("{release}-leader");
    install(
        &release,
        &release_ns,
        &[
            &format!("watchNamespace={}", env.ns),
            &format!("leaderElection.leaseName={lease_name}"),
        ],
    )
    .await;
    let ns = env.ns.as_str();
    let other = format!("chart-sa-other-{}", suffix());
    create_namespace(&other, &[]).await;

    // can-i: the watched namespace only; leases in the release namespace only.
    let mut failures = Vec::new();
    let mut yes = needed(ns);
    yes.extend(lease_verbs(&release_ns));
    check_access(&release_ns, &sa, true, &yes, &mut failures).await;
    let mut no = forbidden(ns);
    no.extend(needed(&other));
    no.extend(needed(&release_ns));
    no.extend(lease_verbs(ns));
    no.extend([
        ("list", "customers.m3o.com", ""),
        ("list", "secrets", ""),
        ("watch", "secrets", ""),
    ]);
    check_access(&release_ns, &sa, false, &no, &mut failures).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // A kubeconfig with nothing but the ServiceAccount's token.
    let kubeconfig = service_account_kubeconfig(&sa, &release_ns, ns).await;
    let as_sa = |args: &[&str]| {
        let mut full = vec!["--kubeconfig", kubeconfig.to_str().expect("path")];
        full.extend(args);
        full.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    // The token authenticates as the ServiceAccount (and is refused elsewhere).
    let whoami_args = as_sa(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    let whoami_args: Vec<&str> = whoami_args.iter().map(String::as_str).collect();
    let whoami = run("kubectl", &whoami_args, None).await;
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout),
        format!("system:serviceaccount:{release_ns}:{sa}"),
        "{}",
        text(&whoami)
    );

    let operator = env
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

    // It holds its Lease in the release namespace (get, create, update allowed there).
    let holder = kubectl(&[
        "get",
        "lease",
        &lease_name,
        "-n",
        &release_ns,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])
    .await;
    assert_eq!(holder, format!("{sa}-test-pod"), "the operator leads");

    // Customer + Subscription + ApiKey to Ready, then deleted in GitOps order.
    env.customer_with_pro_subscription("alice").await;
    env.apply_apikey(
        "alice-key",
        json!({
            "customerRef": {"name": "alice"},
            "description": "chart RBAC test",
            "scopes": ["*"],
        }),
    )
    .await;
    env.wait_apikey("alice-key", "True", "Provisioned").await;
    let key = eventually("the key in its Secret", Duration::from_secs(30), || {
        env.secret_key("alice-key-api-key")
    })
    .await;
    assert!(!key.is_empty());

    let gone = DeleteParams::default();
    env.customers()
        .delete("alice", &gone)
        .await
        .expect("delete customer");
    env.subscriptions()
        .delete("alice", &gone)
        .await
        .expect("delete subscription");
    env.apikeys()
        .delete("alice-key", &gone)
        .await
        .expect("delete apikey");
    env.wait_gone(&env.apikeys(), "alice-key").await;
    env.wait_gone(&env.subscriptions(), "alice").await;
    env.wait_gone(&env.customers(), "alice").await;
    let secrets: Api<Secret> = Api::namespaced(env.kube.clone(), ns);
    eventually(
        "the key's Secret deleted",
        Duration::from_secs(30),
        || async {
            secrets
                .get_opt("alice-key-api-key")
                .await
                .expect("get secret")
                .is_none()
                .then_some(())
        },
    )
    .await;
    let events = kubectl(&[
        "get",
        "events.events.k8s.io",
        "-n",
        ns,
        "-o",
        "jsonpath={range .items[*]}{.reportingController}{\"\\n\"}{end}",
    ])
    .await;
    assert!(
        events.lines().any(|l| l == "m3o-operator"),
        "the operator published Events under its identity: {events:?}"
    );
    let log_path = operator.log_path.clone();
    operator.stop().await;

    let log = std::fs::read_to_string(&log_path).expect("operator log");
    let denied: Vec<&str> = log
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("forbidden") || l.contains(" 403") || l.contains("could not publish")
        })
        .collect();
    assert!(
        denied.is_empty(),
        "the ServiceAccount was refused something:\n{}",
        denied.join("\n")
    );
    helm(&["uninstall", &release, "-n", &release_ns, "--no-hooks"]).await;
}
