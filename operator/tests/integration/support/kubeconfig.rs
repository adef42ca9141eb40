//! Kubeconfigs with nothing but a ServiceAccount's token, to run the operator or an
//! admin command with exactly the rights RBAC grants that account.

use std::path::PathBuf;

use super::cli::ok;

/// Writes a kubeconfig for ServiceAccount `sa` of namespace `sa_ns` (a token valid for
/// an hour), whose context's namespace is `namespace`; returns its path.
pub async fn service_account_kubeconfig(sa: &str, sa_ns: &str, namespace: &str) -> PathBuf {
    let view = |path: &'static str| async move {
        ok(
            "kubectl",
            &[
                "config",
                "view",
                "--raw",
                "--minify",
                "-o",
                &format!("jsonpath={path}"),
            ],
            None,
        )
        .await
    };
    let server = view("{.clusters[0].cluster.server}").await;
    let ca = view("{.clusters[0].cluster.certificate-authority-data}").await;
    let token = ok(
        "kubectl",
        &["create", "token", sa, "-n", sa_ns, "--duration", "1h"],
        None,
    )
    .await;
    let kubeconfig =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{sa_ns}-{sa}.kubeconfig"));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: sa\n  user:\n    token: {}\ncontexts:\n- name: sa\n  context: {{cluster: c, user: sa, namespace: {namespace}}}\ncurrent-context: sa\n",
            token.trim()
        ),
    )
    .expect("write kubeconfig");
    kubeconfig
}
