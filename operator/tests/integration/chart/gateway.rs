//! The chart's optional gateway: off by default; when enabled, a Deployment, Service,
//! PodDisruptionBudget (and HPA) the API server accepts under the restricted Pod
//! Security Standard, whose arguments m3o-gateway-auth accepts, with its own identity
//! (Secret, TLS files, etcd user: none of the operator's), a drain delay below its grace
//! period, and scheduling values of its own.

use clap::Parser;

use super::*;
use crate::support::{required_env, suffix};

#[tokio::test]
async fn the_optional_gateway_renders_and_its_flags_parse() {
    required_env("KUBECONFIG");
    let release_ns = format!("chart-gw-{}", suffix());
    create_namespace(&release_ns, &RESTRICTED).await;
    let off = render("t", &release_ns, &[]).await;
    assert!(!off.contains("m3o-gateway-auth"), "the gateway is opt-in");

    let sets = [
        "gateway.enabled=true",
        "gateway.replicas=3",
        "gateway.rateLimitFailOpen=false",
        "gateway.maxStaleness=30s",
        "gateway.staleMode=serve",
        "gateway.uriSource=envoy",
        "gateway.pathPrefix=/ext-authz",
        // The operator's client certificate and Secret must not reach the gateway.
        "tls.etcd.existingSecret=operator-etcd-tls",
        "tls.etcd.clientCertificate=true",
        "gateway.existingSecret=gateway-backends",
        "gateway.tls.redis.existingSecret=redis-tls",
        "gateway.tls.etcd.existingSecret=etcd-tls",
        "gateway.tls.etcd.clientCertificate=true",
        "gateway.nodeSelector.pool=edge",
        "gateway.etcdAuth.username=m3o-gateway",
        "gateway.etcdAuth.passwordSecret=gateway-etcd-auth",
    ];
    let rendered = render("t", &release_ns, &sets).await;
    assert_applies("gateway enabled", &rendered).await;

    let docs = documents(&rendered);
    let component = |d: &&serde_yaml::Value| {
        d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
    };
    let deployment = docs
        .iter()
        .filter(component)
        .find(|d| d["kind"] == "Deployment")
        .expect("gateway Deployment");
    let service = docs
        .iter()
        .filter(component)
        .find(|d| d["kind"] == "Service")
        .expect("gateway Service");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_owned())
        .collect();
    let cli = m3o_gateway::settings::Cli::try_parse_from(
        std::iter::once("m3o-gateway-auth".to_owned()).chain(args.iter().cloned()),
    )
    .unwrap_or_else(|e| panic!("m3o-gateway-auth rejects the chart's arguments {args:?}: {e}"));
    assert!(!cli.run.rate_limit_fail_open);
    assert_eq!(cli.run.uri_source, m3o_gateway::settings::UriSource::Envoy);
    assert_eq!(cli.run.path_prefix, "/ext-authz");
    assert_eq!(cli.run.max_staleness, std::time::Duration::from_secs(30));
    assert_eq!(cli.run.stale_mode, m3o_gateway::settings::StaleMode::Serve);
    assert_eq!(cli.run.listen.port(), 8081);
    // The same TLS flags as the operator's, its own etcd user, the files mounted read-only.
    let etcd = &cli.run.etcd;
    assert_eq!(
        etcd.etcd_ca_file.as_deref(),
        Some(std::path::Path::new("/etc/m3o-operator/tls/etcd/ca.crt"))
    );
    assert!(etcd.etcd_key_file.is_some());
    assert_eq!(etcd.etcd_username.as_deref(), Some("m3o-gateway"));
    assert!(etcd.etcd_password_file.is_some());
    assert!(cli.run.redis.connection.redis_ca_file.is_some());
    let mounts = container["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts");
    assert_eq!(mounts.len(), 3, "redis, etcd, etcd-auth: {mounts:?}");
    assert!(mounts.iter().all(|m| m["readOnly"].as_bool() == Some(true)));
    let pod = &deployment["spec"]["template"]["spec"];
    let secrets: Vec<&str> = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    assert_eq!(secrets, ["redis-tls", "etcd-tls", "gateway-etcd-auth"]);
    for var in container["env"].as_sequence().expect("env") {
        if let Some(name) = var["valueFrom"]["secretKeyRef"]["name"].as_str() {
            assert_eq!(name, "gateway-backends", "its own Secret: {var:?}");
        }
    }
    assert_eq!(pod["nodeSelector"]["pool"], "edge", "its own scheduling");

    // Drain: not ready from SIGTERM on, answering for the delay, within the grace.
    assert_eq!(cli.run.shutdown_delay, std::time::Duration::from_secs(10));
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    let pdb = docs
        .iter()
        .filter(component)
        .find(|d| d["kind"] == "PodDisruptionBudget")
        .expect("gateway PodDisruptionBudget");
    assert_eq!(pdb["spec"]["selector"], deployment["spec"]["selector"]);
    let too_short = crate::support::cli::run(
        "helm",
        &[
            "template",
            "t",
            &chart(),
            KUBE_VERSION[0],
            KUBE_VERSION[1],
            "--set",
            "gateway.enabled=true",
            "--set",
            "gateway.shutdownDelaySeconds=30",
        ],
        None,
    )
    .await;
    assert!(
        !too_short.status.success(),
        "a drain as long as the grace period renders"
    );

    let scaled = render(
        "t",
        &release_ns,
        &["gateway.enabled=true", "gateway.autoscaling.enabled=true"],
    )
    .await;
    assert_applies("gateway autoscaled", &scaled).await;
    let docs = documents(&scaled);
    let hpa = docs
        .iter()
        .find(|d| d["kind"] == "HorizontalPodAutoscaler")
        .expect("HPA");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");
    let deployment = docs
        .iter()
        .filter(component)
        .find(|d| d["kind"] == "Deployment")
        .expect("gateway Deployment");
    assert!(
        deployment["spec"]["replicas"].is_null(),
        "the HPA owns replicas"
    );
}
