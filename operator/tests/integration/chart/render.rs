//! The chart renders: lint and schema, commented least-privilege rules, and a
//! server-side dry run under the restricted Pod Security Standard.

use tokio::process::Command;

use super::*;
use crate::support::cli::{run, text};
use crate::support::{required_env, suffix};

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
        let out = run(
            "helm",
            &[
                "template",
                "t",
                &chart,
                KUBE_VERSION[0],
                KUBE_VERSION[1],
                "--set",
                set,
            ],
            None,
        )
        .await;
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
            KUBE_VERSION[0],
            KUBE_VERSION[1],
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
    let cases: [(&str, Vec<&str>); 4] = [
        ("cluster-wide", vec![]),
        (
            "namespaced",
            vec![
                watch.as_str(),
                "podDisruptionBudget.enabled=true",
                "shardSelector=m3o.com/shard",
            ],
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
        (
            "TLS files and the etcd password from Secrets",
            vec![
                "tls.postgres.existingSecret=pg-tls",
                "tls.redis.existingSecret=redis-tls",
                "tls.redis.clientCertificate=true",
                "tls.etcd.existingSecret=etcd-tls",
                "tls.etcd.clientCertificate=true",
                "etcdAuth.username=m3o-operator",
                "etcdAuth.passwordSecret=etcd-auth",
            ],
        ),
    ];
    for (case, sets) in cases {
        let rendered = render(&format!("dry-{id}"), &release_ns, &sets).await;
        assert_applies(case, &rendered).await;
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
                assert!(args.contains(&"--shard-selector=m3o.com/shard"), "{args:?}");
            }
            "TLS files and the etcd password from Secrets" => {
                for flag in [
                    "--redis-ca-file=/etc/m3o-operator/tls/redis/ca.crt",
                    "--redis-key-file=/etc/m3o-operator/tls/redis/tls.key",
                    "--etcd-ca-file=/etc/m3o-operator/tls/etcd/ca.crt",
                    "--etcd-cert-file=/etc/m3o-operator/tls/etcd/tls.crt",
                    "--etcd-password-file=/etc/m3o-operator/etcd-auth/password",
                ] {
                    assert!(args.contains(&flag), "{case}: {flag} in {args:?}");
                }
                let mounts =
                    deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                        .as_sequence()
                        .expect("volumeMounts");
                let secrets: Vec<_> = mounts
                    .iter()
                    .filter(|m| {
                        m["mountPath"].as_str().is_some_and(|p| {
                            p.starts_with("/etc/m3o-operator/tls/") || p.ends_with("etcd-auth")
                        })
                    })
                    .collect();
                assert_eq!(secrets.len(), 4, "{case}: {mounts:?}");
                assert!(
                    secrets
                        .iter()
                        .all(|m| m["readOnly"].as_bool() == Some(true)),
                    "{case}: read-only: {secrets:?}"
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
