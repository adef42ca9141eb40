//! The Helm chart against the real API server: it lints, renders into objects the API
//! server accepts (under the restricted Pod Security Standard), installs every object,
//! leaves the CRDs on uninstall, and its RBAC is exactly what the operator needs: each
//! verb checked with `kubectl auth can-i --as`, and the real operator run under the
//! chart's ServiceAccount token through a Customer, Subscription and ApiKey lifecycle.
//!
//! The chart's Deployment never runs here (the test control plane has no kubelet); the
//! operator binary is run by the test instead, with the ServiceAccount's identity.

mod docs;
mod drain;
mod gateway;
mod identity;
mod install;
mod lifecycle;
mod rbac;
mod render;
mod rollback;
mod uninstall;
mod upgrade;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::support::cli::{ok, run};

pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .join("charts/m3o-operator")
}

/// `helm template` renders for this Kubernetes (the chart's kubeVersion is >= 1.25;
/// a helm built from source assumes 1.20 without it), the test API server's.
pub const KUBE_VERSION: [&str; 2] = ["--kube-version", "1.34.0"];

pub fn chart() -> String {
    chart_dir().to_str().expect("utf-8 path").to_owned()
}

pub async fn helm(args: &[&str]) -> String {
    ok("helm", args, None).await
}

pub async fn kubectl(args: &[&str]) -> String {
    ok("kubectl", args, None).await
}

/// A server-side dry run of `rendered`: accepted, with no warning (Pod Security included).
pub async fn assert_applies(case: &str, rendered: &str) {
    let out = crate::support::cli::run(
        "kubectl",
        &["apply", "--dry-run=server", "-f", "-"],
        Some(rendered),
    )
    .await;
    let output = crate::support::cli::text(&out);
    assert!(out.status.success(), "{case}: {output}");
    assert!(
        !output.contains("PodSecurity") && !output.contains("Warning"),
        "{case}: warnings: {output}"
    );
}

/// `helm template` of the chart with `--set` values.
pub async fn render(release: &str, namespace: &str, sets: &[&str]) -> String {
    let chart = chart();
    let mut args = vec!["template", release, &chart, "--namespace", namespace];
    args.extend(KUBE_VERSION);
    for set in sets {
        args.extend(["--set", set]);
    }
    helm(&args).await
}

/// The rendered documents, parsed.
pub fn documents(yaml: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

pub fn kind_name(doc: &serde_yaml::Value) -> (String, String) {
    (
        doc["kind"].as_str().unwrap_or_default().to_owned(),
        doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

pub async fn create_namespace(name: &str, labels: &[&str]) {
    kubectl(&["create", "namespace", name]).await;
    if !labels.is_empty() {
        let mut args = vec!["label", "namespace", name];
        args.extend(labels);
        kubectl(&args).await;
    }
}

/// Namespaces that reject (enforce) and warn about pods below the restricted level.
pub const RESTRICTED: [&str; 2] = [
    "pod-security.kubernetes.io/enforce=restricted",
    "pod-security.kubernetes.io/warn=restricted",
];

/// `helm install` of the chart; the CRDs are skipped because hack/env.sh installed them
/// already (server-side, before any test ran) and tests install releases in parallel:
/// without `--skip-crds` every install would try to create them again. Hooks are
/// skipped: the test control plane has no kubelet to run the migration Job (the tests
/// run the operator binary, which migrates at start; render.rs checks the Job).
pub async fn install(release: &str, namespace: &str, sets: &[&str]) {
    let chart = chart();
    let mut args = vec![
        "install",
        release,
        &chart,
        "--namespace",
        namespace,
        "--skip-crds",
        "--no-hooks",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    helm(&args).await;
}

pub async fn exists(args: &[&str]) -> bool {
    let mut full = vec!["get"];
    full.extend(args);
    full.extend(["-o", "name"]);
    let out = run("kubectl", &full, None).await;
    out.status.success() && !out.stdout.is_empty()
}
