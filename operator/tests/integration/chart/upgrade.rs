//! Templated CRDs (`crds.enabled`, `crds.keep`): `helm install --skip-crds` creates them
//! as release objects, `helm upgrade` to a chart with a changed CRD field updates them
//! (Helm never upgrades crds/), `helm rollback` restores them, and `helm uninstall`
//! keeps them. The test runs on a copy of the chart whose CRDs are renamed into a group
//! of its own (no short names or categories), so the shared CRDs are never touched.

use std::path::{Path, PathBuf};

use super::*;
use crate::support::{required_env, suffix};

/// Copies the chart to `dir` with its CRDs in `group`, their schema described `note`.
fn chart_copy(dir: &Path, group: &str, note: &str) {
    std::fs::create_dir_all(dir).expect("chart copy dir");
    let status = std::process::Command::new("cp")
        .args(["-rT", &chart(), &dir.display().to_string()])
        .status()
        .expect("cp");
    assert!(status.success(), "copy the chart");
    let crds = dir.join("crds/crds.yaml");
    let docs: Vec<serde_yaml::Value> = documents(&std::fs::read_to_string(&crds).expect("crds"));
    let mut out = String::new();
    for mut crd in docs {
        let plural = crd["spec"]["names"]["plural"]
            .as_str()
            .expect("plural")
            .to_owned();
        crd["metadata"]["name"] = format!("{plural}.{group}").into();
        crd["spec"]["group"] = group.into();
        if let Some(names) = crd["spec"]["names"].as_mapping_mut() {
            names.remove("shortNames");
            names.remove("categories");
        }
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] = note.into();
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).expect("yaml"));
    }
    std::fs::write(&crds, out).expect("write crds");
}

async fn description(crd: &str) -> String {
    kubectl(&[
        "get",
        "crd",
        crd,
        "-o",
        "jsonpath={.spec.versions[0].schema.openAPIV3Schema.description}",
    ])
    .await
}

#[tokio::test]
async fn helm_upgrade_updates_the_templated_crds_rollback_restores_them_uninstall_keeps_them() {
    required_env("KUBECONFIG");
    let id = suffix();
    let ns = format!("chart-upgrade-{id}");
    create_namespace(&ns, &[]).await;
    let group = format!("u{id}.m3o.test");
    let crd = format!("customers.{group}");
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chart-upgrade-{id}"));
    let (v1, v2) = (base.join("v1"), base.join("v2"));
    chart_copy(&v1, &group, "first");
    chart_copy(&v2, &group, "changed in the upgrade");
    let sets = [
        "--set",
        "crds.enabled=true",
        "--set",
        &format!("watchNamespace={ns}"),
    ];
    let release = "m3o-operator";
    let helm_in = |verb: &'static str, chart: Option<PathBuf>| {
        let ns = ns.clone();
        async move {
            let chart = chart.map(|c| c.display().to_string());
            let mut args = vec![verb, release];
            if let Some(chart) = chart.as_deref() {
                args.push(chart);
            }
            args.extend(["-n", &ns, "--no-hooks"]);
            if verb != "rollback" {
                args.push("--skip-crds");
                args.extend(sets);
            } else {
                args.push("1");
            }
            helm(&args).await
        }
    };

    helm_in("install", Some(v1.clone())).await;
    assert_eq!(description(&crd).await, "first");
    let meta = kubectl(&["get", "crd", &crd, "-o", "jsonpath={.metadata.annotations}"]).await;
    assert!(
        meta.contains("\"helm.sh/resource-policy\":\"keep\""),
        "{meta}"
    );

    helm_in("upgrade", Some(v2.clone())).await;
    assert_eq!(
        description(&crd).await,
        "changed in the upgrade",
        "helm upgrade updated the CRD"
    );

    helm_in("rollback", None).await;
    assert_eq!(
        description(&crd).await,
        "first",
        "helm rollback restored it"
    );

    helm(&["uninstall", release, "-n", &ns, "--no-hooks"]).await;
    assert_eq!(description(&crd).await, "first", "kept on uninstall");
    for plural in ["customers", "subscriptions", "apikeys"] {
        kubectl(&["delete", "crd", &format!("{plural}.{group}")]).await;
    }
    let _ = std::fs::remove_dir_all(&base);
}
