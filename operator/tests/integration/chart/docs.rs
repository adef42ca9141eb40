//! The docs' examples against what the chart renders: every gateway Service host in
//! docs/gateway.md (nginx, Envoy, Traefik) is the Service the chart creates for the
//! README's release in its namespace, the README's `rollout status` names the rendered
//! Deployment, and every `helm install|upgrade|uninstall` in the docs names a
//! namespace (`-n`).

use std::path::Path;

use super::*;
use crate::support::required_env;

fn read(rel: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root");
    std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// `(service, namespace, port)` of every `<svc>.<ns>.svc:<port>` in `text`, except the
/// API server's and the example upstream's.
fn service_hosts(text: &str) -> Vec<(String, String, u16)> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices(".svc:") {
        let start = text[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
            .map_or(0, |i| i + 1);
        let host = &text[start..at];
        let port: String = text[at + 5..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let (Some((svc, ns)), Ok(port)) = (host.split_once('.'), port.parse())
            && svc != "kubernetes"
            && svc != "api"
        {
            out.push((svc.to_owned(), ns.to_owned(), port));
        }
    }
    out
}

#[tokio::test]
async fn doc_examples_use_the_names_the_chart_renders() {
    required_env("KUBECONFIG");
    let readme = read("README.md");
    // The README's install block: its release and namespace.
    let install = readme
        .lines()
        .find(|l| l.starts_with("helm install ") && l.contains("charts/m3o-operator"))
        .expect("README installs the chart");
    let words: Vec<&str> = install.split_whitespace().collect();
    let release = words[2];
    let namespace = words[words.iter().position(|w| *w == "-n").expect("-n") + 1];
    let rendered = render(release, namespace, &["gateway.enabled=true"]).await;
    let docs = documents(&rendered);
    let has = |kind: &str, name: &str| {
        docs.iter().any(|d| {
            d["kind"] == kind
                && d["metadata"]["name"] == name
                && d["metadata"]["namespace"] == namespace
        })
    };

    let gateway_md = read("docs/gateway.md");
    let hosts = service_hosts(&gateway_md);
    assert!(
        hosts.len() >= 3,
        "nginx, Envoy and Traefik examples: {hosts:?}"
    );
    for (svc, ns, port) in &hosts {
        assert_eq!(ns, namespace, "{svc}.{ns}: the README's namespace");
        assert!(
            has("Service", svc),
            "docs/gateway.md names Service {svc}, not rendered"
        );
        assert_eq!(*port, 8081, "the gateway Service's port");
    }
    let rollout = readme
        .lines()
        .find(|l| l.contains("rollout status deployment/"))
        .expect("README waits for the rollout");
    let deployment = rollout
        .split("deployment/")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("deployment name");
    assert!(rollout.contains(&format!("-n {namespace}")), "{rollout}");
    assert!(
        has("Deployment", deployment),
        "README waits for {deployment}, not rendered"
    );

    for doc in [
        "README.md",
        "charts/m3o-operator/README.md",
        "docs/gateway.md",
        "docs/gitops.md",
    ] {
        for line in read(doc).lines() {
            let line = line.trim_start();
            let helm = [
                "helm install ",
                "helm upgrade ",
                "helm uninstall ",
                "helm rollback ",
            ];
            if helm.iter().any(|h| line.starts_with(h)) {
                assert!(line.contains(" -n "), "{doc}: no namespace in `{line}`");
            }
        }
    }
}

#[test]
fn service_hosts_are_parsed() {
    assert_eq!(
        service_hosts("server a-b.ns.svc:8081; uri: http://kubernetes.default.svc:443"),
        [("a-b".to_owned(), "ns".to_owned(), 8081)]
    );
}
