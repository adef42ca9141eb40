//! `examples/` with an operator running: `kubectl apply -k` (rendered into the test's
//! namespace), then `kubectl wait --for=condition=Ready` on every object, and the
//! fields the examples exercise have the effect their comments promise.

use std::path::Path;

use serde_json::Value;

use crate::support::TestEnv;

async fn ok(args: &[&str], stdin: Option<&str>) -> String {
    crate::support::cli::ok("kubectl", args, stdin).await
}

#[tokio::test]
async fn examples_become_ready() {
    let env = TestEnv::new("examples-ready").await;
    let _operator = env.start_operator().await;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let rendered = ok(&["kustomize", dir.to_str().expect("path")], None).await;
    // Every file of examples/ is listed in the kustomization.
    for entry in std::fs::read_dir(&dir).expect("examples dir") {
        let name = entry.expect("entry").file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            let kustomization =
                std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization");
            assert!(
                kustomization.contains(&format!("- {name}")),
                "{name} is not listed in examples/kustomization.yaml"
            );
        }
    }
    // The Namespace document is dropped: the test's namespace exists already.
    let yaml = rendered
        .split("\n---\n")
        .filter(|doc| !doc.contains("kind: Namespace"))
        .collect::<Vec<_>>()
        .join("\n---\n")
        .replace("m3o-demo", &env.ns);
    ok(&["apply", "--server-side", "-f", "-"], Some(&yaml)).await;

    let start = std::time::Instant::now();
    let waited = ok(
        &[
            "wait",
            "--for=condition=Ready",
            "customers,subscriptions,apikeys",
            "--all",
            "-n",
            &env.ns,
            "--timeout=90s",
        ],
        None,
    )
    .await;
    eprintln!(
        "examples Ready in {} ms:\n{waited}",
        start.elapsed().as_millis()
    );
    let list: Value = serde_json::from_str(
        &ok(
            &[
                "get",
                "customers,subscriptions,apikeys",
                "-n",
                &env.ns,
                "-o",
                "json",
            ],
            None,
        )
        .await,
    )
    .expect("json");
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 8, "3 customers, 2 subscriptions, 3 keys");
    let ready_reason = |name: &str, kind: &str| {
        let item = items
            .iter()
            .find(|i| i["kind"] == kind && i["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name}"));
        assert_eq!(
            item["status"]["observedGeneration"], item["metadata"]["generation"],
            "{kind} {name} is current"
        );
        let ready = item["status"]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .find(|c| c["type"] == "Ready")
            .expect("Ready");
        (
            ready["reason"].as_str().expect("reason").to_owned(),
            item["status"].clone(),
        )
    };
    let (reason, status) = ready_reason("mallory", "Customer");
    assert_eq!(
        (reason.as_str(), &status["state"]),
        ("Provisioned", &"banned".into())
    );
    let (reason, status) = ready_reason("mallory-key", "ApiKey");
    assert_eq!(
        (reason.as_str(), &status["state"]),
        ("Blocked", &"blocked".into())
    );
    let (_, status) = ready_reason("alice", "Subscription");
    assert_eq!(status["quota"]["requestsPerSecond"], 100, "quota override");
    let (_, status) = ready_reason("legacy", "Subscription");
    assert_eq!(status["plan"], "free");
    let (_, status) = ready_reason("alice-ci", "ApiKey");
    assert_eq!(status["secretName"], "alice-ci-credentials");
    assert_eq!(status["state"], "active");
    let key = env
        .secret_key("alice-ci-credentials")
        .await
        .expect("alice-ci's key in its custom Secret");
    let entry = env
        .gateway_entry(&key)
        .await
        .expect("alice-ci's gateway entry");
    assert_eq!(
        entry["scopes"],
        serde_json::json!(["helloworld", "weather"])
    );
    assert!(
        entry["expiresAt"]
            .as_str()
            .is_some_and(|e| e.starts_with("2099-12-31T23:59:59")),
        "{entry}"
    );
    let (_, status) = ready_reason("alice-all", "ApiKey");
    assert_eq!(status["secretName"], "alice-all-api-key");
}
