//! README "Uninstall", run as written (in the test's namespace instead of `-A`): with
//! the operator running, deleting the objects first leaves nothing behind, and nothing
//! Terminating; then `helm uninstall`. The other order is what the section warns about:
//! with no operator, a deleted object stays Terminating on its finalizer until the
//! documented patch removes it. The chart's pre-delete hook command refuses, under the
//! hook's ServiceAccount, while objects exist, and passes once they are gone.

use std::time::Duration;

use serde_json::json;

use super::*;
use crate::apikey::key_spec;
use crate::support::kubeconfig::service_account_kubeconfig;
use crate::support::{TestEnv, eventually};

/// The README's Uninstall commands, `-A` narrowed to `namespace`, release names kept.
fn documented_steps(namespace: &str) -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("repo root")
            .join("README.md"),
    )
    .expect("README");
    let section = readme
        .split("### Uninstall")
        .nth(1)
        .expect("README has an Uninstall section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("its commands");
    block
        .lines()
        .map(|l| l.split(" #").next().unwrap_or(l).trim())
        .filter(|l| !l.is_empty() && !l.starts_with("kubectl delete crd"))
        .map(|l| {
            l.split_whitespace()
                .flat_map(|w| match w {
                    "-A" => vec!["-n".to_owned(), namespace.to_owned()],
                    "m3o-system" => vec![namespace.to_owned()],
                    w => vec![w.to_owned()],
                })
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_uninstall_leaves_nothing_terminating() {
    let env = TestEnv::new("chart-uninstall").await;
    install(
        "m3o-operator",
        &env.ns,
        &[&format!("watchNamespace={}", env.ns)],
    )
    .await;
    let op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    env.apply_apikey("ci", key_spec(json!({}))).await;
    env.wait_apikey("ci", "True", "Provisioned").await;

    let steps = documented_steps(&env.ns);
    assert_eq!(steps.len(), 3, "delete, check, helm uninstall: {steps:?}");
    // The chart's pre-delete hook, as its Job runs it: the operator's ServiceAccount.
    let kubeconfig = service_account_kubeconfig("m3o-operator", &env.ns, &env.ns).await;
    let hook = || {
        let (kubeconfig, ns) = (kubeconfig.display().to_string(), env.ns.clone());
        async move {
            crate::support::cli::run(
                env!("CARGO_BIN_EXE_m3o-operator"),
                &[
                    "uninstall-check",
                    "--kubeconfig",
                    &kubeconfig,
                    "--namespace",
                    &ns,
                ],
                None,
            )
            .await
        }
    };
    let refused = hook().await;
    let line = crate::support::cli::text(&refused);
    assert!(!refused.status.success(), "objects exist: {line}");
    assert!(
        line.trim().lines().count() == 1
            && line.contains("refusing to uninstall")
            && line.contains("m3o.com/cleanup"),
        "{line}"
    );
    for (i, step) in steps.iter().enumerate() {
        let mut args: Vec<&str> = step[1..].iter().map(String::as_str).collect();
        if i == 2 {
            let passed = hook().await;
            assert!(
                passed.status.success(),
                "{}",
                crate::support::cli::text(&passed)
            );
            args.push("--no-hooks"); // no kubelet to run the hook Job: run above
        }
        let out = crate::support::cli::ok(&step[0], &args, None).await;
        if step.get(1).map(String::as_str) == Some("get") {
            assert!(
                out.trim().is_empty() || out.contains("No resources found"),
                "left behind: {out}"
            );
        }
    }
    let left = crate::support::cli::text(
        &crate::support::cli::run(
            "kubectl",
            &["get", "m3o", "-n", &env.ns, "-o", "name"],
            None,
        )
        .await,
    );
    assert!(
        left.trim().is_empty() || left.contains("No resources"),
        "{left}"
    );

    // The wrong order: the operator gone, a deleted object hangs on its finalizer
    // until the documented patch removes it.
    env.customer_ready("bob", "Active").await;
    op.stop().await;
    kubectl(&["delete", "customer", "bob", "-n", &env.ns, "--wait=false"]).await;
    let get = |field: &'static str| {
        let ns = env.ns.clone();
        async move {
            let jsonpath = format!("jsonpath={{.metadata.{field}}}");
            let out = crate::support::cli::run(
                "kubectl",
                &["get", "customer", "bob", "-n", &ns, "-o", &jsonpath],
                None,
            )
            .await;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    let stuck = get("finalizers").await.expect("bob still exists");
    assert!(stuck.contains("m3o.com/cleanup"), "{stuck}");
    assert!(
        !get("deletionTimestamp")
            .await
            .unwrap_or_default()
            .is_empty(),
        "bob is Terminating"
    );
    let patch = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("repo root")
            .join("README.md"),
    )
    .expect("README")
    .lines()
    .find_map(|l| {
        l.split('`')
            .find(|c| c.starts_with("kubectl patch customer NAME"))
            .map(str::to_owned)
    })
    .expect("README's finalizer patch");
    let patch = patch.replace("NAME", "bob").replace("NS", &env.ns);
    let words: Vec<String> = shell_words(&patch);
    let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
    kubectl(&args).await;
    eventually("bob gone", Duration::from_secs(10), || async {
        get("uid").await.is_none().then_some(())
    })
    .await;
}

/// Splits a one-line shell command on spaces, keeping '...' quoted words whole.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        if let Some(quoted) = rest.strip_prefix('\'') {
            let end = quoted.find('\'').expect("closing quote");
            words.push(quoted[..end].to_owned());
            rest = quoted[end + 1..].trim_start();
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            words.push(rest[..end].to_owned());
            rest = rest[end..].trim_start();
        }
    }
    words
}
