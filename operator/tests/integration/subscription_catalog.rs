//! The plan catalog from `--plans-file`: start-up errors, and edits picked up by a
//! running operator (the quota in etcd follows) without a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::subscription::assert_in_force;
use crate::support::cli::operator_error_line;
use crate::support::{Backends, TestEnv, eventually};

/// Writes `yaml` to `path` the way a ConfigMap update lands: a new file renamed over it.
fn write_plans(path: &Path, yaml: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).expect("write plans");
    std::fs::rename(&tmp, path).expect("swap plans");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_change_is_picked_up_without_restart() {
    let env = TestEnv::new("sub-catalog").await;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(&env.ns);
    std::fs::create_dir_all(&dir).expect("plans dir");
    let path = dir.join("plans.yaml");
    write_plans(
        &path,
        "plans:\n  starter: {monthlyRequests: 100, requestsPerSecond: 1}\n",
    );
    let op = env
        .start_operator_with(Backends {
            extra_args: vec!["--plans-file".into(), path.display().to_string()],
            ..Default::default()
        })
        .await;
    let cid = env.ready_customer("carol").await;
    env.apply_subscription(
        "carol",
        json!({"customerRef": {"name": "carol"}, "plan": "starter"}),
    )
    .await;
    assert_in_force(&env, "carol", &cid, "starter", (100, 1)).await;

    write_plans(
        &path,
        "plans:\n  starter: {monthlyRequests: 250, requestsPerSecond: 3}\n",
    );
    assert_in_force(&env, "carol", &cid, "starter", (250, 3)).await;
    assert_eq!(
        env.outbox_count().await,
        2,
        "a catalog edit changes no tier"
    );

    // A bad edit keeps the catalog in force (and is counted).
    write_plans(&path, "plans:\n  starter: {monthlyRequests: lots}\n");
    eventually(
        "the bad catalog to be counted",
        Duration::from_secs(30),
        || async {
            let metrics = op.metrics().await;
            metrics
                .contains("m3o_operator_plan_catalog_errors_total 1")
                .then_some(())
        },
    )
    .await;
    assert_in_force(&env, "carol", &cid, "starter", (250, 3)).await;

    // A plan that was unknown becomes known: the waiting Subscription follows.
    let did = env.ready_customer("dave").await;
    env.apply_subscription(
        "dave",
        json!({"customerRef": {"name": "dave"}, "plan": "team"}),
    )
    .await;
    env.wait_subscription("dave", "False", "UnknownPlan").await;
    write_plans(
        &path,
        "plans:\n  starter: {monthlyRequests: 250, requestsPerSecond: 3}\n  team: {monthlyRequests: 9, requestsPerSecond: 2}\n",
    );
    assert_in_force(&env, "dave", &did, "team", (9, 2)).await;
}

#[tokio::test]
async fn a_malformed_plans_file_is_one_line_naming_the_flag() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plans-malformed");
    std::fs::create_dir_all(&dir).expect("plans dir");
    let path = dir.join("plans.yaml");
    write_plans(&path, "plans:\n  free: {monthlyRequests: 1}\n");
    let cases = [
        (path.clone(), "missing field `requestsPerSecond`"),
        (dir.join("absent.yaml"), "cannot read"),
    ];
    for (file, expect) in cases {
        let line = operator_error_line([
            std::ffi::OsStr::new("run"),
            "--plans-file".as_ref(),
            file.as_os_str(),
        ])
        .await;
        let prefix = format!("m3o-operator: error: --plans-file {}: ", file.display());
        assert!(line.starts_with(&prefix), "{line}");
        assert!(line.contains(expect), "{line}");
    }
}
