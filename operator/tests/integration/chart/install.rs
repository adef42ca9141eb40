//! `helm install` creates every object; `helm uninstall` keeps the CRDs.

use serde_json::json;

use super::*;
use crate::support::{TestEnv, suffix};

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
        // No kubelet here to run the pre-delete hook Job (chart/uninstall.rs checks its
        // command under the hook's ServiceAccount).
        "--no-hooks",
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
