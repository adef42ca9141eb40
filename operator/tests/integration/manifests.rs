//! The CRDs at the real API server: examples apply, invalid manifests are rejected
//! with a message naming the field, `kubectl explain` is useful; and the binary's
//! start-up errors.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use tokio::process::Command;

use crate::support::cli::{operator_error_line, run, text};
use crate::support::{TestEnv, eventually, required_env};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_owned()
}

async fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    run("kubectl", args, stdin).await
}

#[tokio::test]
async fn every_example_applies() {
    let env = TestEnv::new("examples").await;
    // The examples name their own namespace; render them into this test's instead.
    let rendered = kubectl(
        &[
            "kustomize",
            repo_root().join("examples").to_str().expect("path"),
        ],
        None,
    )
    .await;
    assert!(
        rendered.status.success(),
        "kubectl kustomize examples/: {}",
        text(&rendered)
    );
    let yaml = String::from_utf8_lossy(&rendered.stdout).replace("m3o-demo", &env.ns);
    let out = kubectl(&["apply", "--server-side", "-f", "-"], Some(&yaml)).await;
    assert!(out.status.success(), "examples rejected: {}", text(&out));
    let listed = kubectl(&["get", "m3o", "-n", &env.ns, "-o", "name"], None).await;
    let names = String::from_utf8_lossy(&listed.stdout).lines().count();
    let files = std::fs::read_dir(repo_root().join("examples"))
        .expect("examples dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("customer"))
        })
        .count();
    assert!(
        names >= files && files >= 3,
        "`kubectl get m3o` lists the examples ({names} objects, {files} files)"
    );
}

#[tokio::test]
async fn invalid_manifests_are_rejected_naming_the_field() {
    let env = TestEnv::new("invalid").await;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("corpus")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 20,
        "the corpus has {} manifests",
        files.len()
    );
    let mut failures = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let body = std::fs::read_to_string(file).expect("read manifest");
        let expect = body
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .expect("# expect: header")
            .trim()
            .to_owned();
        let name = format!("bad-{i}");
        let body = body.replace("name: bad", &format!("name: {name}"));
        let docs: Vec<&str> = body.split("\n---\n").collect();
        let (last, setup) = docs.split_last().expect("a document");
        for doc in setup {
            let out = kubectl(&["apply", "-n", &env.ns, "-f", "-"], Some(doc)).await;
            assert!(
                out.status.success(),
                "{}: setup document rejected: {}",
                file.display(),
                text(&out)
            );
        }
        let out = kubectl(&["apply", "-n", &env.ns, "-f", "-"], Some(last)).await;
        let message = text(&out);
        if out.status.success() {
            failures.push(format!("{}: accepted", file.display()));
        } else if !message.contains(&expect) {
            failures.push(format!(
                "{}: message does not name {expect}: {message}",
                file.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn kubectl_explain_shows_field_descriptions() {
    required_env("KUBECONFIG");
    // The API server publishes CRD OpenAPI a moment after the CRD is established.
    let out = eventually(
        "kubectl explain customer.spec.email",
        Duration::from_secs(60),
        || async {
            let out = kubectl(&["explain", "customer.spec.email"], None).await;
            out.status.success().then(|| text(&out))
        },
    )
    .await;
    assert!(out.contains("Email address of the customer"), "{out}");
    let out = kubectl(&["explain", "apikey.spec.rotationGracePeriod"], None).await;
    assert!(
        text(&out).contains("previous key stays valid"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn unreachable_database_is_one_line_naming_the_flag() {
    let line = operator_error_line([
        "run",
        "--database-url",
        "postgres://m3o:hunter2@127.0.0.1:1/m3o",
        "--redis-url",
        "redis://127.0.0.1:1",
        "--etcd-endpoints",
        "http://127.0.0.1:1",
    ])
    .await;
    assert!(line.starts_with("m3o-operator: error: --database-url: cannot connect to postgres://m3o:***@127.0.0.1:1/m3o"), "{line}");
    assert!(!line.contains("hunter2"), "the password is not printed");
}

#[tokio::test]
async fn a_concurrency_the_database_cannot_serve_is_said_on_one_line_naming_the_flag() {
    // hack/env.sh runs PostgreSQL with max_connections 300: 256 needs up to 785. A
    // warning, not a refusal (behind a pooler the server's limit is not the one).
    let env = TestEnv::new("pool-budget").await;
    let op = env
        .start_operator_with(crate::support::Backends {
            extra_args: vec!["--concurrency".into(), "256".into()],
            ..Default::default()
        })
        .await;
    op.wait_log(
        "the warning naming --concurrency",
        "--concurrency 256: the operator may open up to 785 database connections",
    )
    .await;
    op.wait_log("the server's allowance", "allows this role 297")
        .await;
    env.apply_customer("alice", serde_json::json!({"email": "alice@example.com"}))
        .await;
    env.wait_ready("alice").await;
}

#[tokio::test]
async fn bad_configuration_names_the_flag() {
    let cases: [(&[&str], &str); 4] = [
        (&["run"], "--database-url: required"),
        (
            &[
                "run",
                "--database-url",
                "postgres://x@127.0.0.1:1/x",
                "--database-schema",
                "Bad-Schema",
            ],
            "--database-schema",
        ),
        (&["run", "--resync-interval", "soon"], "--resync-interval"),
        (&["run", "--concurrency", "0"], "--concurrency"),
    ];
    for (args, expect) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_m3o-operator"))
            .args(args)
            .env_remove("DATABASE_URL")
            .output()
            .await
            .expect("run binary");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn crds_subcommand_prints_the_committed_yaml() {
    let out = Command::new(env!("CARGO_BIN_EXE_m3o-operator"))
        .arg("crds")
        .output()
        .await
        .expect("run binary");
    assert!(out.status.success());
    let committed = std::fs::read_to_string(repo_root().join("charts/m3o-operator/crds/crds.yaml"))
        .expect("committed CRDs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        committed,
        "stale CRD YAML: run `make crds`"
    );
}
