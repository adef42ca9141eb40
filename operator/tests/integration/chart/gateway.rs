//! The chart's optional gateway: off by default; when enabled, a Deployment and Service
//! the API server accepts under the restricted Pod Security Standard, whose arguments
//! m3o-gateway-auth accepts.

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
        "gateway.pathPrefix=/ext-authz",
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
    assert_eq!(cli.run.path_prefix, "/ext-authz");
    assert_eq!(cli.run.listen.port(), 8081);
}
