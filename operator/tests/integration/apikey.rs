//! ApiKey against real servers: the key lives only in its Secret; Postgres and etcd
//! hold its hash; block, expire, rotate, revoke and the customer's fate reach the
//! gateway entry.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use m3o_controllers::apikey::secret::hash;
use m3o_crds::ApiKey;
use serde_json::{Value, json};

use crate::support::{Backends, TestEnv, eventually};

impl TestEnv {
    pub fn apikeys(&self) -> Api<ApiKey> {
        Api::namespaced(self.kube.clone(), &self.ns)
    }

    pub async fn apply_apikey(&self, name: &str, spec: Value) -> ApiKey {
        let body = json!({
            "apiVersion": "m3o.com/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": name, "namespace": self.ns}, "spec": spec,
        });
        self.apikeys()
            .patch(
                name,
                &PatchParams::apply("integration-test").force(),
                &Patch::Apply(&body),
            )
            .await
            .unwrap_or_else(|e| panic!("apply apikey {name}: {e}"))
    }

    /// Waits for Ready=`status` with `reason` at the current generation.
    pub async fn wait_apikey(&self, name: &str, status: &str, reason: &str) -> ApiKey {
        let api = self.apikeys();
        eventually(
            &format!("apikey {name} Ready={status} ({reason})"),
            Duration::from_secs(60),
            || async {
                let k = api.get_opt(name).await.ok()??;
                let s = k.status.as_ref()?;
                let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?;
                (s.observed_generation == k.metadata.generation
                    && ready.status == status
                    && ready.reason == reason)
                    .then_some(k)
            },
        )
        .await
    }

    /// The plaintext key in a Secret.
    pub async fn secret_key(&self, secret: &str) -> Option<String> {
        let s = Api::<Secret>::namespaced(self.kube.clone(), &self.ns)
            .get_opt(secret)
            .await
            .expect("get secret")?;
        let bytes = s.data?.get("apiKey")?.0.clone();
        Some(String::from_utf8(bytes).expect("utf-8 key"))
    }

    /// The gateway's entry of a key.
    pub async fn gateway_entry(&self, key: &str) -> Option<Value> {
        self.etcd_json(&format!("apikeys/{}", hash(key.as_bytes())))
            .await
    }

    pub async fn key_row_status(&self, id: &str) -> String {
        sqlx::query_scalar("SELECT status FROM api_keys WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&self.db)
            .await
            .expect("key row")
    }

    /// Event type names on the stream about key `id` (deduplicated, in order).
    pub async fn key_events(&self, id: &str) -> Vec<String> {
        crate::support::dedupe(self.stream_events().await)
            .into_iter()
            .filter(|e| {
                let ev = &e.event;
                [
                    ev.generate_key.as_ref().map(|k| &k.id),
                    ev.delete_key.as_ref().map(|k| &k.id),
                    ev.block_key.as_ref().map(|k| &k.id),
                    ev.unblock_key.as_ref().map(|k| &k.id),
                    ev.key_expired.as_ref().map(|k| &k.id),
                    ev.key_rotated.as_ref().map(|k| &k.previous_id),
                ]
                .into_iter()
                .flatten()
                .any(|k| k == id)
            })
            .map(|e| e.event_type)
            .collect()
    }

    pub async fn wait_key_events(&self, id: &str, expected: &[&str]) {
        eventually(
            &format!("events {expected:?} for key {id}"),
            Duration::from_secs(30),
            || async {
                let got = self.key_events(id).await;
                (got == expected).then_some(())
            },
        )
        .await;
    }

    async fn customer_ready(&self, name: &str, state: &str) {
        self.apply_customer(
            name,
            json!({"email": format!("{name}@example.com"), "state": state}),
        )
        .await;
        self.wait_ready(name).await;
    }
}

fn key_spec(extra: Value) -> Value {
    let mut spec = json!({"customerRef": {"name": "alice"}, "description": "CI key", "scopes": ["helloworld", "*"]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    spec
}

fn key_id(k: &ApiKey) -> String {
    k.status
        .as_ref()
        .and_then(|s| s.key_id.clone())
        .expect("status.keyId")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_key_lives_only_in_its_secret() {
    let env = TestEnv::new("key-issue").await;
    let op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    env.apply_apikey("ci", key_spec(json!({}))).await;
    let k = env.wait_apikey("ci", "True", "Provisioned").await;
    let status = k.status.clone().expect("status");
    let plaintext = env
        .secret_key("ci-api-key")
        .await
        .expect("Secret ci-api-key holds the key");
    assert!(
        plaintext.starts_with("m3o_") && plaintext.len() >= 4 + 43,
        "256-bit key with a readable prefix"
    );
    let digest = hash(plaintext.as_bytes());
    let id = key_id(&k);

    let entry = env
        .gateway_entry(&plaintext)
        .await
        .expect("etcd entry at sha256(key)");
    let customer_id = status.customer_id.clone().expect("customerId");
    assert_eq!(
        entry,
        json!({"keyId": id, "customerId": customer_id, "scopes": ["helloworld", "*"], "status": "active", "expiresAt": null})
    );
    let row_hash: String = sqlx::query_scalar("SELECT key_hash FROM api_keys")
        .fetch_one(&env.db)
        .await
        .expect("one row");
    assert_eq!(row_hash, digest);
    assert_eq!(status.key_prefix.as_deref(), Some(&plaintext[..8]));
    assert_eq!(status.secret_name.as_deref(), Some("ci-api-key"));
    let secret = Api::<Secret>::namespaced(env.kube.clone(), &env.ns)
        .get("ci-api-key")
        .await
        .expect("secret");
    assert_eq!(
        secret
            .data
            .as_ref()
            .and_then(|d| d.get("keyId"))
            .map(|b| b.0.clone()),
        Some(id.clone().into_bytes())
    );
    env.wait_key_events(&id, &["EventTypeGenerateKey"]).await;
    let generate = env
        .stream_events()
        .await
        .into_iter()
        .find(|e| e.event_type == "EventTypeGenerateKey")
        .expect("event");
    assert_eq!(
        generate
            .event
            .generate_key
            .as_ref()
            .map(|g| g.scopes.clone()),
        Some(vec!["helloworld".into(), "*".into()])
    );
    assert_eq!(
        generate.event.customer.as_ref().map(|c| c.id.clone()),
        Some(customer_id)
    );

    // Now look everywhere else for the plaintext.
    let secret_part = &plaintext[4..];
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1",
    )
    .bind(&env.schema)
    .fetch_all(&env.db)
    .await
    .expect("tables");
    for table in tables {
        let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT t::text FROM \"{table}\" t"))
            .fetch_all(&env.db)
            .await
            .expect("dump");
        assert!(
            !rows.iter().any(|r| r.contains(secret_part)),
            "plaintext in table {table}"
        );
    }
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar("SELECT payload FROM outbox")
        .fetch_all(&env.db)
        .await
        .expect("payloads");
    assert!(
        !payloads.iter().any(|p| contains(p, secret_part.as_bytes())),
        "plaintext in an outbox payload"
    );
    let options = etcd_client::GetOptions::new().with_prefix();
    let all = env
        .etcd
        .kv_client()
        .get(format!("{}/", env.etcd_prefix), Some(options))
        .await
        .expect("etcd list");
    assert!(
        all.kvs()
            .iter()
            .all(|kv| !contains(kv.value(), secret_part.as_bytes())
                && !contains(kv.key(), secret_part.as_bytes()))
    );
    let client = redis::Client::open(env.redis_url.as_str()).expect("redis");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let raw: redis::Value = redis::cmd("XRANGE")
        .arg(m3o_events::stream_key(&env.stream_prefix, "customers"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("xrange");
    assert!(
        !contains(format!("{raw:?}").as_bytes(), secret_part.as_bytes()),
        "plaintext on the stream"
    );
    let object =
        serde_json::to_string(&env.apikeys().get("ci").await.expect("apikey")).expect("json");
    assert!(
        !object.contains(secret_part),
        "plaintext in the ApiKey object"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.kube.clone(), &env.ns);
    let events = serde_json::to_string(&events.list(&Default::default()).await.expect("events"))
        .expect("json");
    assert!(
        !events.contains(secret_part),
        "plaintext in Kubernetes Events"
    );
    let log = std::fs::read_to_string(&op.log_path).expect("operator log");
    assert!(log.contains("key issued"), "the log is being read");
    assert!(!log.contains(secret_part), "plaintext in the operator log");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_unblock_and_expire() {
    let env = TestEnv::new("key-block").await;
    let _op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    env.apply_apikey("ci", key_spec(json!({}))).await;
    let id = key_id(&env.wait_apikey("ci", "True", "Provisioned").await);
    let key = env.secret_key("ci-api-key").await.expect("key");

    env.apply_apikey(
        "ci",
        key_spec(json!({"blocked": true, "blockedMessage": "abuse"})),
    )
    .await;
    let k = env.wait_apikey("ci", "True", "Blocked").await;
    assert_eq!(
        serde_json::to_value(k.status.and_then(|s| s.state)).expect("state"),
        json!("blocked")
    );
    assert_eq!(
        env.gateway_entry(&key).await.map(|e| e["status"].clone()),
        Some(json!("blocked"))
    );
    assert_eq!(env.key_row_status(&id).await, "blocked");
    env.wait_key_events(&id, &["EventTypeGenerateKey", "EventTypeBlockKey"])
        .await;

    env.apply_apikey("ci", key_spec(json!({"blocked": false})))
        .await;
    env.wait_apikey("ci", "True", "Provisioned").await;
    assert_eq!(
        env.gateway_entry(&key).await.map(|e| e["status"].clone()),
        Some(json!("active"))
    );
    assert_eq!(env.key_row_status(&id).await, "active");
    env.wait_key_events(
        &id,
        &[
            "EventTypeGenerateKey",
            "EventTypeBlockKey",
            "EventTypeUnblockKey",
        ],
    )
    .await;

    // Expiry a few seconds out: nothing else changes, the gateway entry still stops being active.
    let at = chrono::Utc::now() + chrono::Duration::seconds(4);
    let at = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    env.apply_apikey("ci", key_spec(json!({"expiresAt": at})))
        .await;
    env.wait_apikey("ci", "True", "Provisioned").await;
    assert_eq!(
        env.gateway_entry(&key)
            .await
            .map(|e| e["expiresAt"].clone()),
        Some(json!(at))
    );
    let k = env.wait_apikey("ci", "False", "Expired").await;
    assert_eq!(
        serde_json::to_value(k.status.and_then(|s| s.state)).expect("state"),
        json!("expired")
    );
    assert_eq!(
        env.gateway_entry(&key).await.map(|e| e["status"].clone()),
        Some(json!("expired"))
    );
    assert_eq!(env.key_row_status(&id).await, "expired");
    env.wait_key_events(
        &id,
        &[
            "EventTypeGenerateKey",
            "EventTypeBlockKey",
            "EventTypeUnblockKey",
            "EventTypeKeyExpired",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_old_key_for_the_grace_period_and_delete_revokes() {
    let env = TestEnv::new("key-rotate").await;
    let _op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    env.apply_apikey("ci", key_spec(json!({"rotationGracePeriod": "4s"})))
        .await;
    let old_id = key_id(&env.wait_apikey("ci", "True", "Provisioned").await);
    let old = env.secret_key("ci-api-key").await.expect("key");

    env.apply_apikey(
        "ci",
        key_spec(json!({"rotationGracePeriod": "4s", "rotationGeneration": 1})),
    )
    .await;
    let k = env.wait_apikey("ci", "True", "Provisioned").await;
    let new_id = key_id(&k);
    assert_ne!(new_id, old_id);
    let new = env.secret_key("ci-api-key").await.expect("key");
    assert_ne!(new, old, "a new key in the Secret");
    assert_eq!(
        env.gateway_entry(&new).await.map(|e| e["status"].clone()),
        Some(json!("active"))
    );
    let during = env
        .gateway_entry(&old)
        .await
        .expect("old key still known during grace");
    assert_eq!(during["status"], json!("active"));
    assert!(
        during["expiresAt"].is_string(),
        "the gateway sees when the grace ends"
    );
    env.wait_key_events(&old_id, &["EventTypeGenerateKey", "EventTypeKeyRotated"])
        .await;

    eventually(
        "old key gone after grace",
        Duration::from_secs(20),
        || async { env.gateway_entry(&old).await.is_none().then_some(()) },
    )
    .await;
    env.wait_key_events(
        &old_id,
        &[
            "EventTypeGenerateKey",
            "EventTypeKeyRotated",
            "EventTypeDeleteKey",
        ],
    )
    .await;
    assert_eq!(env.key_row_status(&old_id).await, "revoked");
    assert!(env.gateway_entry(&new).await.is_some());

    env.apikeys()
        .delete("ci", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("ApiKey gone", Duration::from_secs(30), || async {
        env.apikeys()
            .get_opt("ci")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(env.key_row_status(&new_id).await, "revoked");
    assert_eq!(env.gateway_entry(&new).await, None);
    assert_eq!(env.secret_key("ci-api-key").await, None, "Secret deleted");
    env.wait_key_events(&new_id, &["EventTypeGenerateKey", "EventTypeDeleteKey"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_customer_decides_whether_its_keys_work() {
    let env = TestEnv::new("key-cust").await;
    let _op = env.start_operator().await;
    // A key before its customer waits, then works once the customer is Ready.
    env.apply_apikey("ci", key_spec(json!({}))).await;
    env.wait_apikey("ci", "False", "CustomerNotFound").await;
    assert_eq!(env.etcd_keys().await.len(), 0);
    env.customer_ready("alice", "Active").await;
    let id = key_id(&env.wait_apikey("ci", "True", "Provisioned").await);
    let key = env.secret_key("ci-api-key").await.expect("key");

    env.customer_ready("alice", "Banned").await;
    eventually(
        "banned customer's key blocked",
        Duration::from_secs(20),
        || async { (env.gateway_entry(&key).await?["status"] == json!("blocked")).then_some(()) },
    )
    .await;
    env.wait_apikey("ci", "True", "Blocked").await;
    assert_eq!(env.key_row_status(&id).await, "blocked");

    env.customer_ready("alice", "Active").await;
    eventually(
        "unbanned customer's key active",
        Duration::from_secs(20),
        || async { (env.gateway_entry(&key).await?["status"] == json!("active")).then_some(()) },
    )
    .await;
    env.wait_apikey("ci", "True", "Provisioned").await;

    env.customers()
        .delete("alice", &DeleteParams::default())
        .await
        .expect("delete customer");
    eventually(
        "deleted customer's key revoked",
        Duration::from_secs(30),
        || async { env.gateway_entry(&key).await.is_none().then_some(()) },
    )
    .await;
    let k = env.wait_apikey("ci", "False", "CustomerNotFound").await;
    assert_eq!(
        serde_json::to_value(k.status.and_then(|s| s.state)).expect("state"),
        json!("revoked")
    );
    eventually("row revoked", Duration::from_secs(20), || async {
        (env.key_row_status(&id).await == "revoked").then_some(())
    })
    .await;
    env.wait_key_events(
        &id,
        &[
            "EventTypeGenerateKey",
            "EventTypeBlockKey",
            "EventTypeUnblockKey",
            "EventTypeDeleteKey",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_secret_and_database_keeps_one_key() {
    let env = TestEnv::new("key-crash").await;
    let op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    op.stop().await;

    let crashing = Backends {
        extra_env: vec![("M3O_FAILPOINTS".into(), "apikey-secret-written".into())],
        ..Default::default()
    };
    let op = env.start_operator_with(crashing).await;
    env.apply_apikey("ci", key_spec(json!({}))).await;
    let key = eventually(
        "the key written to the Secret",
        Duration::from_secs(30),
        || env.secret_key("ci-api-key"),
    )
    .await;
    let exited = tokio::time::timeout(Duration::from_secs(10), op.wait())
        .await
        .expect("operator aborted at the failpoint");
    assert!(!exited.success());
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&env.db)
        .await
        .expect("count");
    assert_eq!(rows, 0, "crashed before Postgres");

    let _op = env.start_operator().await;
    let k = env.wait_apikey("ci", "True", "Provisioned").await;
    assert_eq!(
        env.secret_key("ci-api-key").await.as_deref(),
        Some(key.as_str()),
        "the Secret's key was reused"
    );
    let hashes: Vec<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys")
        .fetch_all(&env.db)
        .await
        .expect("rows");
    assert_eq!(
        hashes,
        vec![hash(key.as_bytes())],
        "one key, the one in the Secret"
    );
    let keys = env.etcd_keys().await;
    let apikeys: Vec<_> = keys.iter().filter(|k| k.contains("/apikeys/")).collect();
    assert_eq!(apikeys.len(), 1, "no orphan hashes: {keys:?}");
    assert_eq!(
        env.gateway_entry(&key).await.map(|e| e["status"].clone()),
        Some(json!("active"))
    );
    assert_eq!(
        env.key_events(&key_id(&k)).await,
        vec!["EventTypeGenerateKey"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_keeps_the_key_working_and_detaches_its_secret() {
    let env = TestEnv::new("key-orphan").await;
    let _op = env.start_operator().await;
    env.customer_ready("alice", "Active").await;
    env.apply_apikey(
        "legacy",
        key_spec(json!({"deletionPolicy": "Orphan", "secretName": "legacy-key"})),
    )
    .await;
    let id = key_id(&env.wait_apikey("legacy", "True", "Provisioned").await);
    let key = env.secret_key("legacy-key").await.expect("key");

    env.apikeys()
        .delete("legacy", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("ApiKey gone", Duration::from_secs(30), || async {
        env.apikeys()
            .get_opt("legacy")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(
        env.key_row_status(&id).await,
        "active",
        "the record is kept"
    );
    assert_eq!(
        env.gateway_entry(&key).await.map(|e| e["status"].clone()),
        Some(json!("active")),
        "the key still works"
    );
    let secret = Api::<Secret>::namespaced(env.kube.clone(), &env.ns)
        .get("legacy-key")
        .await
        .expect("Secret kept");
    assert!(
        secret
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty(),
        "no owner left for a garbage collector to follow"
    );
    assert_eq!(
        env.key_events(&id).await,
        vec!["EventTypeGenerateKey"],
        "nothing announced"
    );
}
