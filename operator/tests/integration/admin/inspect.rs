//! `m3o-operator inspect`: a healthy customer, a hand-edited etcd entry, an ApiKey
//! whose Secret is gone, and events waiting in the outbox while Redis is down.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::DeleteParams;
use m3o_controllers::apikey::secret::hash;
use serde_json::{Value, json};

use super::{AdminBackends, etcd_entry, text};
use crate::apikey::{key_id, key_spec};
use crate::support::{Backends, PrivateRedis, TestEnv, eventually, suffix};

/// A role that may only read the test's schema (trust authentication: no password).
pub async fn read_only_url(env: &TestEnv) -> String {
    let role = format!("ro_{}", suffix());
    for statement in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT USAGE ON SCHEMA {} TO {role}", env.schema),
        format!(
            "GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {role}",
            env.schema
        ),
    ] {
        sqlx::query(&statement)
            .execute(&env.db)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    let (_, rest) = env
        .database_url
        .split_once('@')
        .expect("user@host in DATABASE_URL");
    format!("postgres://{role}@{rest}")
}

fn event_types(events: &Value) -> Vec<String> {
    events
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["eventType"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_customer_is_in_sync_everywhere_read_with_read_only_credentials() {
    let env = TestEnv::new("inspect-ok").await;
    let op = env.start_operator().await;
    env.apply_customer(
        "alice",
        json!({"email": "alice@example.com", "name": "Alice"}),
    )
    .await;
    let customer = env.wait_ready("alice").await;
    env.apply_subscription(
        "alice",
        json!({"customerRef": {"name": "alice"}, "plan": "pro"}),
    )
    .await;
    env.wait_subscription("alice", "True", "Provisioned").await;
    env.apply_apikey("alice-ci", key_spec(json!({}))).await;
    let key = env.wait_apikey("alice-ci", "True", "Provisioned").await;
    env.wait_events(3).await; // Created, SubscriptionChanged, GenerateKey
    op.settle().await;
    let id = customer
        .status
        .and_then(|s| s.customer_id)
        .expect("customerId");
    let plaintext = env.secret_key("alice-ci-api-key").await.expect("key");

    let read_only = read_only_url(&env).await;
    let backends = AdminBackends {
        database_url: Some(&read_only),
        ..Default::default()
    };
    let report = env.inspect_json("customer", "alice", &backends).await;
    assert_eq!(report["kind"], "Customer");
    assert_eq!(report["spec"]["email"], "alice@example.com");
    assert_eq!(report["postgres"][0]["id"], id.as_str());
    assert_eq!(report["postgres"][0]["status"], "active");
    let prefix = &env.etcd_prefix;
    for key in [
        format!("{prefix}/{}", m3o_platform_contract::customer_key(&id)),
        format!("{prefix}/{}", m3o_platform_contract::quota_key(&id)),
        format!(
            "{prefix}/{}",
            m3o_platform_contract::apikey_key(&hash(plaintext.as_bytes()))
        ),
    ] {
        let entry = etcd_entry(&report, &key);
        assert_eq!(entry["verdict"], "matches", "{entry:#}");
        assert_eq!(entry["desired"], entry["actual"]);
    }
    assert_eq!(
        etcd_entry(
            &report,
            &format!("{prefix}/{}", m3o_platform_contract::customer_key(&id))
        )["actual"]["plan"],
        "pro"
    );
    let newest_first = [
        "EventTypeGenerateKey",
        "EventTypeSubscriptionChanged",
        "EventTypeCreated",
    ];
    assert_eq!(event_types(&report["stream"]), newest_first);
    assert_eq!(event_types(&report["outbox"]), newest_first);
    for e in report["outbox"].as_array().expect("outbox") {
        assert_eq!(e["delivery"], "published", "{e:#}");
    }
    assert_eq!(report["stream"][0]["id"], report["outbox"][0]["id"]);
    assert_eq!(report["problems"], json!([]), "{report:#}");
    let everything = report.to_string();
    assert!(!everything.contains(&plaintext), "the key is never printed");

    // The key's own view: its Secret hashes to the recorded hash.
    let report = env.inspect_json("apikey", "alice-ci", &backends).await;
    assert_eq!(report["secret"]["verdict"], "matches", "{report:#}");
    assert_eq!(report["secret"]["recordedKeyId"], key_id(&key).as_str());
    assert_eq!(event_types(&report["stream"]), ["EventTypeGenerateKey"]);
    assert!(!report.to_string().contains(&plaintext));
    let report = env.inspect_json("subscription", "alice", &backends).await;
    assert_eq!(report["postgres"][0]["plan"], "pro");
    assert_eq!(
        event_types(&report["stream"]),
        ["EventTypeSubscriptionChanged"]
    );
    assert_eq!(report["problems"], json!([]), "{report:#}");

    // The human output says the same.
    let human = env.inspect_text("customer", "alice").await;
    assert!(
        human.starts_with(&format!("Customer {}/alice", env.ns)),
        "{human}"
    );
    assert!(
        human.contains(&format!("matches  {prefix}/customers/{id}")),
        "{human}"
    );
    assert!(human.contains("EventTypeCreated"), "{human}");
    assert!(human.trim_end().ends_with("verdict: in sync"), "{human}");

    // Read only means no migrations either: an empty schema is refused, not created.
    let empty = format!("{}_none", env.schema);
    let out = env
        .admin(
            &[
                "inspect",
                "customer",
                "alice",
                "-n",
                &env.ns,
                "--database-schema",
                &empty,
            ],
            &backends,
        )
        .await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("has no operator tables"),
        "{}",
        text(&out)
    );
    let created: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&empty)
            .fetch_one(&env.db)
            .await
            .expect("query");
    assert!(!created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_runs_it_as_a_plugin() {
    let env = TestEnv::new("inspect-plugin").await;
    let _op = env.start_operator().await;
    env.apply_customer("bob", json!({"email": "bob@example.com"}))
        .await;
    env.wait_ready("bob").await;
    let dir =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("plugin-{}", suffix()));
    std::fs::create_dir_all(&dir).expect("plugin dir");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_m3o-operator"), dir.join("kubectl-m3o"))
        .expect("symlink");
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new("kubectl")
        .args(["m3o", "inspect", "customer", "bob", "-n", &env.ns])
        .args([
            "--database-schema",
            &env.schema,
            "--etcd-prefix",
            &env.etcd_prefix,
        ])
        .args(["--stream-prefix", &env.stream_prefix])
        .env("PATH", path)
        .output()
        .await
        .expect("kubectl");
    assert!(out.status.success(), "{}", text(&out));
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.starts_with(&format!("Customer {}/bob", env.ns)),
        "{human}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edited_etcd_entry_differs() {
    let env = TestEnv::new("inspect-edit").await;
    let op = env.start_operator().await;
    env.apply_customer("carol", json!({"email": "carol@example.com"}))
        .await;
    let id = env
        .wait_ready("carol")
        .await
        .status
        .and_then(|s| s.customer_id)
        .expect("id");
    op.settle().await;
    // The drift watcher would restore the edit at once: edit while no operator runs.
    op.stop().await;
    let relative = m3o_platform_contract::customer_key(&id);
    let mut edited = env.etcd_json(&relative).await.expect("entry");
    edited["status"] = "banned".into();
    env.etcd_put(&relative, &edited.to_string()).await;

    let report = env
        .inspect_json("customer", "carol", &AdminBackends::default())
        .await;
    let key = format!("{}/{relative}", env.etcd_prefix);
    let entry = etcd_entry(&report, &key);
    assert_eq!(entry["verdict"], "differs");
    assert_eq!(entry["desired"]["status"], "active");
    assert_eq!(entry["actual"]["status"], "banned");
    assert_eq!(entry["owner"], format!("Customer {}/carol", env.ns));
    assert_eq!(report["problems"], json!([format!("etcd {key} differs")]));
    let human = env.inspect_text("customer", "carol").await;
    assert!(human.contains(&format!("differs  {key}")), "{human}");
    assert!(
        human.contains(r#"actual:  {"email":"carol@example.com","#),
        "{human}"
    );
    assert!(human.contains("verdict: 1 problem(s)"), "{human}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apikey_whose_secret_was_deleted() {
    let env = TestEnv::new("inspect-secret").await;
    let op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    env.apply_apikey("deploy", key_spec(json!({}))).await;
    let key = env.wait_apikey("deploy", "True", "Provisioned").await;
    op.settle().await;
    let report = env
        .inspect_json("apikey", "deploy", &AdminBackends::default())
        .await;
    assert_eq!(report["secret"]["verdict"], "matches", "{report:#}");

    // The operator would issue a new key at once: delete while none runs.
    op.stop().await;
    Api::<Secret>::namespaced(env.kube.clone(), &env.ns)
        .delete("deploy-api-key", &DeleteParams::default())
        .await
        .expect("delete Secret");
    let report = env
        .inspect_json("apikey", "deploy", &AdminBackends::default())
        .await;
    assert_eq!(report["secret"]["name"], "deploy-api-key");
    assert_eq!(report["secret"]["verdict"], "missing", "{report:#}");
    assert_eq!(report["problems"], json!(["Secret deploy-api-key missing"]));
    // Postgres and etcd still hold the key: the gateway would accept it.
    assert_eq!(report["postgres"][0]["id"], key_id(&key).as_str());
    let entries = report["etcd"].as_array().expect("etcd");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["verdict"], "matches");
    let human = env.inspect_text("apikey", "deploy").await;
    assert!(
        human.contains("secret:\n  missing  deploy-api-key"),
        "{human}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_waiting_in_the_outbox_while_redis_is_down() {
    let env = TestEnv::new("inspect-outbox").await;
    let mut redis = PrivateRedis::start().await;
    let url = redis.url();
    let _op = env
        .start_operator_with(Backends {
            redis_url: Some(url.clone()),
            ..Default::default()
        })
        .await;
    redis.pause().await;
    env.apply_customer("dave", json!({"email": "dave@example.com"}))
        .await;
    env.wait_ready("dave").await;
    let backends = AdminBackends {
        redis_url: Some(&url),
        ..Default::default()
    };

    let report = env.inspect_json("customer", "dave", &backends).await;
    let error = report["stream"]["error"]
        .as_str()
        .expect("stream unavailable");
    assert!(
        error.starts_with("--redis-url: cannot connect to"),
        "{error}"
    );
    let outbox = &report["outbox"][0];
    assert_eq!(outbox["eventType"], "EventTypeCreated");
    assert_eq!(outbox["delivery"], "pending");
    assert!(outbox["publishedAt"].is_null());
    assert!(
        report["problems"][0]
            .as_str()
            .is_some_and(|p| p.starts_with("stream unavailable"))
    );
    let human = String::from_utf8_lossy(
        &env.admin(&["inspect", "customer", "dave", "-n", &env.ns], &backends)
            .await
            .stdout,
    )
    .into_owned();
    assert!(
        human.contains("events on the stream (newest first):\n  unavailable: --redis-url"),
        "{human}"
    );
    assert!(
        human.contains("EventTypeCreated                 pending (attempts"),
        "{human}"
    );

    // Redis returns: the same event is published, and inspect sees it on both sides.
    redis.resume().await;
    let report = eventually("the event published", Duration::from_secs(30), || async {
        let report = env.inspect_json("customer", "dave", &backends).await;
        (report["outbox"][0]["delivery"] == "published" && report["stream"][0].is_object())
            .then_some(report)
    })
    .await;
    assert_eq!(report["stream"][0]["id"], outbox["id"]);
    assert_eq!(report["problems"], json!([]), "{report:#}");
}
