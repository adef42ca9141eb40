//! The Helm chart against the real API server: it lints, renders into objects the API
//! server accepts (under the restricted Pod Security Standard), installs every object,
//! leaves the CRDs on uninstall, and its RBAC is exactly what the operator needs: each
//! verb checked with `kubectl auth can-i --as`, and the real operator run under the
//! chart's ServiceAccount token through a Customer, Subscription and ApiKey lifecycle.
//!
//! The chart's Deployment never runs here (the test control plane has no kubelet); the
//! operator binary is run by the test instead, with the ServiceAccount's identity.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::DeleteParams;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::support::{Backends, TestEnv, eventually, required_env, suffix};

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .join("charts/m3o-operator")
}

fn chart() -> String {
    chart_dir().to_str().expect("utf-8 path").to_owned()
}

/// Runs `program args` with `stdin`, returning its output (never panics on failure).
async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} on PATH (hack/env.sh puts it there): {e}"));
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .await
        .expect("write stdin");
    drop(input);
    child.wait_with_output().await.expect("wait")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs and asserts success; returns stdout.
async fn ok(program: &str, args: &[&str], stdin: Option<&str>) -> String {
    let out = run(program, args, stdin).await;
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn helm(args: &[&str]) -> String {
    ok("helm", args, None).await
}

async fn kubectl(args: &[&str]) -> String {
    ok("kubectl", args, None).await
}

/// `helm template` of the chart with `--set` values.
async fn render(release: &str, namespace: &str, sets: &[&str]) -> String {
    let chart = chart();
    let mut args = vec!["template", release, &chart, "--namespace", namespace];
    for set in sets {
        args.extend(["--set", set]);
    }
    helm(&args).await
}

/// The rendered documents, parsed.
fn documents(yaml: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind_name(doc: &serde_yaml::Value) -> (String, String) {
    (
        doc["kind"].as_str().unwrap_or_default().to_owned(),
        doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

async fn create_namespace(name: &str, labels: &[&str]) {
    kubectl(&["create", "namespace", name]).await;
    if !labels.is_empty() {
        let mut args = vec!["label", "namespace", name];
        args.extend(labels);
        kubectl(&args).await;
    }
}

/// Namespaces that reject (enforce) and warn about pods below the restricted level.
const RESTRICTED: [&str; 2] = [
    "pod-security.kubernetes.io/enforce=restricted",
    "pod-security.kubernetes.io/warn=restricted",
];

#[tokio::test]
async fn lint_is_clean_and_the_schema_catches_typos() {
    let chart = chart();
    for extra in [
        &[][..],
        &["--strict"],
        &["--strict", "--set", "watchNamespace=apps"],
    ] {
        let mut args = vec!["lint", chart.as_str()];
        args.extend(extra);
        let out = helm(&args).await;
        assert!(out.contains("0 chart(s) failed"), "{out}");
        assert!(!out.contains("[WARNING]"), "helm lint warns: {out}");
    }
    // values.schema.json: an unknown key or a bad value fails, naming it.
    for (set, expect) in [
        ("concurency=3", "concurency"),
        ("watchNamespace=Apps", "/watchNamespace"),
        ("logFormat=xml", "/logFormat"),
        ("resyncInterval=soon", "/resyncInterval"),
        ("plans.gold.monthlyRequests=-1", "/plans/gold"),
        ("backends.existingSecret=", "/backends/existingSecret"),
        ("metrics.serviceMonitor.intervall=1m", "intervall"),
    ] {
        let out = run("helm", &["template", "t", &chart, "--set", set], None).await;
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(text(&out).contains(expect), "--set {set}: {}", text(&out));
    }
    // More than one replica without a leader would have every replica reconcile.
    let out = run(
        "helm",
        &[
            "template",
            "t",
            &chart,
            "--set",
            "leaderElection.enabled=false",
        ],
        None,
    )
    .await;
    assert!(
        !out.status.success() && text(&out).contains("needs leaderElection.enabled"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn every_rbac_rule_is_commented_and_has_no_wildcard() {
    let template =
        std::fs::read_to_string(chart_dir().join("templates/rbac.yaml")).expect("rbac.yaml");
    let lines: Vec<&str> = template.lines().collect();
    let mut rules = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("- apiGroups:") {
            rules += 1;
            assert!(
                i > 0 && lines[i - 1].trim_start().starts_with('#'),
                "rbac.yaml line {}: rule without a comment saying why",
                i + 1
            );
        }
    }
    assert!(rules >= 6, "{rules} rules");
    for sets in [&[][..], &["watchNamespace=apps"]] {
        let rendered = render("t", "sys", sets).await;
        for doc in documents(&rendered) {
            let (kind, name) = kind_name(&doc);
            if !kind.ends_with("Role") {
                continue;
            }
            let rules = doc["rules"].as_sequence().expect("rules");
            for rule in rules {
                for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                    for v in rule[field].as_sequence().into_iter().flatten() {
                        let v = v.as_str().expect("string");
                        assert!(!v.contains('*'), "{kind} {name}: wildcard in {field}");
                    }
                }
                assert!(
                    rule["nonResourceURLs"].is_null(),
                    "{kind} {name}: nonResourceURLs"
                );
            }
        }
    }
}

#[tokio::test]
async fn rendered_chart_applies_server_side_under_restricted_pod_security() {
    required_env("KUBECONFIG");
    let id = suffix();
    let release_ns = format!("chart-dry-{id}");
    let watch_ns = format!("chart-dry-apps-{id}");
    create_namespace(&release_ns, &RESTRICTED).await;
    create_namespace(&watch_ns, &[]).await;
    let watch = format!("watchNamespace={watch_ns}");
    let cases: [(&str, Vec<&str>); 3] = [
        ("cluster-wide", vec![]),
        (
            "namespaced",
            vec![watch.as_str(), "podDisruptionBudget.enabled=true"],
        ),
        (
            "single replica, built-in plans, no service",
            vec![
                "replicaCount=1",
                "leaderElection.enabled=false",
                "plans=null",
                "metrics.service.enabled=false",
            ],
        ),
    ];
    for (case, sets) in cases {
        let rendered = render(&format!("dry-{id}"), &release_ns, &sets).await;
        let out = run(
            "kubectl",
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&rendered),
        )
        .await;
        let output = text(&out);
        assert!(out.status.success(), "{case}: {output}");
        assert!(
            !output.contains("PodSecurity") && !output.contains("Warning"),
            "{case}: warnings: {output}"
        );
        let docs = documents(&rendered);
        let kinds: Vec<(String, String)> = docs.iter().map(kind_name).collect();
        let has = |kind: &str| kinds.iter().any(|(k, _)| k == kind);
        assert!(
            has("Deployment") && has("ServiceAccount"),
            "{case}: {kinds:?}"
        );
        let deployment = docs
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .expect("Deployment");
        let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("string arg"))
            .collect();
        // The binary accepts every rendered flag: it gets past argument parsing and
        // stops at the first missing backend.
        let out = Command::new(env!("CARGO_BIN_EXE_m3o-operator"))
            .args(&args)
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL")
            .env_remove("ETCD_ENDPOINTS")
            .output()
            .await
            .expect("run m3o-operator");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("m3o-operator: error: --"),
            "{case}: {args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("unexpected argument")
                && !stderr.contains("invalid value")
                && !stderr.contains("Usage:"),
            "{case}: the binary rejects the chart's arguments {args:?}: {stderr}"
        );
        match case {
            "cluster-wide" => {
                assert!(has("ClusterRole") && has("ClusterRoleBinding") && has("Service"));
                assert!(has("ConfigMap"), "plan catalog ConfigMap");
                assert!(args.contains(&"--leader-election"), "{args:?}");
                assert!(
                    !args.iter().any(|a| a.starts_with("--namespace")),
                    "{args:?}"
                );
                assert!(
                    args.contains(&"--plans-file=/etc/m3o-operator/plans/plans.yaml"),
                    "{args:?}"
                );
                assert_eq!(deployment["spec"]["replicas"], 2);
            }
            "namespaced" => {
                assert!(
                    !has("ClusterRole") && !has("ClusterRoleBinding"),
                    "{kinds:?}"
                );
                assert!(has("PodDisruptionBudget"), "{kinds:?}");
                let roles: Vec<&serde_yaml::Value> =
                    docs.iter().filter(|d| d["kind"] == "Role").collect();
                let role_ns: Vec<&str> = roles
                    .iter()
                    .map(|r| r["metadata"]["namespace"].as_str().expect("namespace"))
                    .collect();
                assert!(
                    role_ns.contains(&watch_ns.as_str()) && role_ns.contains(&release_ns.as_str()),
                    "a Role in the watched namespace and the lease Role in the release namespace: {role_ns:?}"
                );
                assert!(
                    args.contains(&format!("--namespace={watch_ns}").as_str()),
                    "{args:?}"
                );
            }
            _ => {
                assert!(!has("ConfigMap") && !has("Service"), "{kinds:?}");
                assert!(!args.contains(&"--leader-election"), "{args:?}");
                assert!(
                    !args.iter().any(|a| a.starts_with("--plans-file")),
                    "{args:?}"
                );
                let lease_role = kinds
                    .iter()
                    .any(|(k, n)| k == "Role" && n.contains("leader"));
                assert!(!lease_role, "no lease Role without leader election");
            }
        }
    }
    // The ServiceMonitor is opt-in (its CRD is not on this API server: rendered only).
    let rendered = render("t", &release_ns, &["metrics.serviceMonitor.enabled=true"]).await;
    assert!(
        documents(&rendered).iter().any(
            |d| d["kind"] == "ServiceMonitor" && d["spec"]["endpoints"][0]["port"] == "metrics"
        ),
        "ServiceMonitor rendered"
    );
    let rendered = render("t", &release_ns, &[]).await;
    assert!(!rendered.contains("ServiceMonitor"), "off by default");
}

/// `helm install` of the chart; the CRDs are skipped because hack/env.sh installed them
/// already (server-side, before any test ran) and tests install releases in parallel:
/// without `--skip-crds` every install would try to create them again.
async fn install(release: &str, namespace: &str, sets: &[&str]) {
    let chart = chart();
    let mut args = vec![
        "install",
        release,
        &chart,
        "--namespace",
        namespace,
        "--skip-crds",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    helm(&args).await;
}

async fn exists(args: &[&str]) -> bool {
    let mut full = vec!["get"];
    full.extend(args);
    full.extend(["-o", "name"]);
    let out = run("kubectl", &full, None).await;
    out.status.success() && !out.stdout.is_empty()
}

#[tokio::test]
async fn install_creates_every_object_and_uninstall_keeps_the_crds() {
    let env = TestEnv::new("chart-install").await;
    let release = format!("m3o-{}", suffix());
    let fullname = format!("{release}-m3o-operator");
    install(&release, &env.ns, &["podDisruptionBudget.enabled=true"]).await;
    let ns = env.ns.as_str();
    let lease_role = format!("{fullname}-leader-election");
    let metrics = format!("{fullname}-metrics");
    let plans = format!("{fullname}-plans");
    let objects: [Vec<&str>; 9] = [
        vec!["deployment", &fullname, "-n", ns],
        vec!["serviceaccount", &fullname, "-n", ns],
        vec!["clusterrole", &fullname],
        vec!["clusterrolebinding", &fullname],
        vec!["role", &lease_role, "-n", ns],
        vec!["rolebinding", &lease_role, "-n", ns],
        vec!["service", &metrics, "-n", ns],
        vec!["configmap", &plans, "-n", ns],
        vec!["poddisruptionbudget", &fullname, "-n", ns],
    ];
    for object in &objects {
        assert!(exists(object).await, "helm install created {object:?}");
    }
    // The plan catalog the operator is given parses as the operator's own format.
    let catalog = kubectl(&[
        "get",
        "configmap",
        &plans,
        "-n",
        ns,
        "-o",
        "jsonpath={.data.plans\\.yaml}",
    ])
    .await;
    m3o_controllers::plans::Catalog::parse(&catalog).expect("the ConfigMap is a valid plans file");
    // The CRDs come from crds/, outside the release: Helm never deletes them.
    let manifest = helm(&["get", "manifest", &release, "-n", ns]).await;
    assert!(!manifest.contains("CustomResourceDefinition"), "{manifest}");
    let crds = helm(&["show", "crds", &chart()]).await;
    for crd in [
        "customers.m3o.com",
        "subscriptions.m3o.com",
        "apikeys.m3o.com",
    ] {
        assert!(crds.contains(&format!("name: {crd}")), "chart ships {crd}");
    }
    env.apply_customer("kept", json!({"email": "kept@example.com"}))
        .await;

    helm(&[
        "uninstall",
        &release,
        "-n",
        ns,
        "--wait",
        "--timeout",
        "60s",
    ])
    .await;
    for object in &objects {
        assert!(!exists(object).await, "helm uninstall deleted {object:?}");
    }
    for crd in [
        "customers.m3o.com",
        "subscriptions.m3o.com",
        "apikeys.m3o.com",
    ] {
        assert!(exists(&["crd", crd]).await, "{crd} kept on uninstall");
    }
    assert!(
        exists(&["customer", "kept", "-n", ns]).await,
        "custom resources survive an uninstall"
    );
}

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
    // The lease rule names the operator's Lease only, and only get/update it.
    let lease = "leases.coordination.k8s.io/m3o-operator";
    for (verb, typed, want) in [
        ("get", lease, true),
        ("update", lease, true),
        ("patch", lease, false),
        ("delete", lease, false),
        ("update", "leases.coordination.k8s.io/other", false),
        ("get", "leases.coordination.k8s.io/other", false),
    ] {
        let got = can_i_named(ns, &sa, verb, typed, ns).await;
        if got != want {
            failures.push(format!("{verb} {typed}: {got} (want {want})"));
        }
    }
    helm(&["uninstall", &release, "-n", ns]).await;
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
    let server = kubectl(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.server}",
    ])
    .await;
    let ca = kubectl(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ])
    .await;
    let token = kubectl(&[
        "create",
        "token",
        &sa,
        "-n",
        &release_ns,
        "--duration",
        "1h",
    ])
    .await;
    let kubeconfig = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{sa}.kubeconfig"));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: sa\n  user:\n    token: {}\ncontexts:\n- name: sa\n  context: {{cluster: c, user: sa, namespace: {ns}}}\ncurrent-context: sa\n",
            token.trim()
        ),
    )
    .expect("write kubeconfig");
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
    env.apply_customer(
        "alice",
        json!({"email": format!("alice-{}@example.com", suffix()), "name": "Alice"}),
    )
    .await;
    env.wait_ready("alice").await;
    env.apply_subscription(
        "alice",
        json!({"customerRef": {"name": "alice"}, "plan": "pro"}),
    )
    .await;
    env.wait_subscription("alice", "True", "Provisioned").await;
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
    helm(&["uninstall", &release, "-n", &release_ns]).await;
}
