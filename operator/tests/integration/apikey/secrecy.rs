//! The plaintext key is in its Secret and nowhere else.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use m3o_controllers::apikey::secret::hash;
use serde_json::json;

use super::*;
use crate::support::TestEnv;

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
    assert!(
        m3o_controllers::apikey::secret::well_formed(plaintext.as_bytes()),
        "m3o_<base62>_<checksum>"
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
    // Every byte string of the reply, protobuf payloads included (their bytes are not
    // text, so the reply's debug text would hide them).
    let entries = byte_strings(&raw);
    assert!(
        entries.iter().any(|b| contains(b, id.as_bytes())),
        "the stream search reads the payloads (the key id is in GenerateKey)"
    );
    assert!(
        !entries.iter().any(|b| contains(b, secret_part.as_bytes())),
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

/// Every byte string in a Redis reply, however nested.
fn byte_strings(value: &redis::Value) -> Vec<Vec<u8>> {
    match value {
        redis::Value::BulkString(bytes) => vec![bytes.clone()],
        redis::Value::SimpleString(s) => vec![s.clone().into_bytes()],
        redis::Value::Array(items) | redis::Value::Set(items) => {
            items.iter().flat_map(byte_strings).collect()
        }
        redis::Value::Map(pairs) => pairs
            .iter()
            .flat_map(|(k, v)| byte_strings(k).into_iter().chain(byte_strings(v)))
            .collect(),
        _ => Vec::new(),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
