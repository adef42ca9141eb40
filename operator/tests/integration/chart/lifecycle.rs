//! Upgrade-time objects of the chart: the migration hook Job (pre-install and
//! pre-upgrade, `m3o-operator migrate`, no API token), the pre-delete uninstall check, the configurable startupProbe,
//! the optional NetworkPolicies and extra volumes, all accepted by the API server under
//! the restricted Pod Security Standard.

use super::*;
use crate::support::{required_env, suffix};

#[tokio::test]
async fn the_migration_hook_network_policies_and_extra_volumes_render_and_apply() {
    required_env("KUBECONFIG");
    let ns = format!("chart-life-{}", suffix());
    create_namespace(&ns, &RESTRICTED).await;
    let sets = [
        "gateway.enabled=true",
        "networkPolicy.enabled=true",
        "probes.startup.failureThreshold=300",
        "extraVolumes[0].name=ca-bundle",
        "extraVolumes[0].configMap.name=corporate-ca",
        "extraVolumeMounts[0].name=ca-bundle",
        "extraVolumeMounts[0].mountPath=/etc/ssl/custom",
        "extraVolumeMounts[0].readOnly=true",
    ];
    let rendered = render("t", &ns, &sets).await;
    assert_applies("lifecycle values", &rendered).await;
    let docs = documents(&rendered);
    let job = docs
        .iter()
        .find(|d| d["kind"] == "Job" && d["metadata"]["name"] == "t-m3o-operator-migrate")
        .expect("migration Job");
    let check = docs
        .iter()
        .find(|d| d["kind"] == "Job" && d["metadata"]["name"] == "t-m3o-operator-uninstall-check")
        .expect("uninstall check Job");
    assert_eq!(
        check["metadata"]["annotations"]["helm.sh/hook"],
        "pre-delete"
    );
    let check_pod = &check["spec"]["template"]["spec"];
    assert_eq!(check_pod["serviceAccountName"], "t-m3o-operator");
    assert_eq!(check_pod["containers"][0]["args"][0], "uninstall-check");
    assert_eq!(
        job["metadata"]["annotations"]["helm.sh/hook"],
        "pre-install,pre-upgrade"
    );
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["containers"][0]["args"][0], "migrate");
    let operator = docs
        .iter()
        .find(|d| {
            d["kind"] == "Deployment"
                && d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
        })
        .expect("operator Deployment");
    let container = &operator["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["startupProbe"]["failureThreshold"], 300);
    assert!(
        container["volumeMounts"]
            .as_sequence()
            .expect("mounts")
            .iter()
            .any(|m| m["mountPath"] == "/etc/ssl/custom"),
        "extra mount"
    );
    let policies: Vec<_> = docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    assert_eq!(policies.len(), 2, "operator and gateway");

    // Off: no Job (for `--no-hooks`-less installs on clusters without Jobs).
    let off = render(
        "t",
        &ns,
        &[
            "migrations.hook=false",
            "uninstall.refuseWhileObjectsExist=false",
        ],
    )
    .await;
    assert!(!documents(&off).iter().any(|d| d["kind"] == "Job"));
}
