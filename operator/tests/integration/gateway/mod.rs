//! The gateway side end to end: keys issued by the real operator, checked by
//! m3o-gateway-auth replicas behind a real nginx (`auth_request`) in front of an
//! upstream; limits shared through Redis; propagation confirmed in `GatewaySynced`.

// Benchmarks, not tests: built only with `--features bench` (`make bench-gateway`).
mod ban;
#[cfg(feature = "bench")]
mod bench;
mod edges;
mod limiter;
mod outages;
mod partition;
mod relist;
mod usage;

use std::time::Duration;

use kube::api::{DeleteParams, Patch, PatchParams};
use m3o_crds::ApiKey;
use serde_json::json;

use crate::apikey::key_spec;
use crate::support::gateway::{Reply, check, request, start_upstream};
use crate::support::nginx::Nginx;
use crate::support::{TestEnv, eventually};

/// A GET through nginx with `key` as a bearer token.
async fn through(nginx: &Nginx, key: &str, path: &str) -> Reply {
    request(
        &nginx.addr(),
        path,
        &[("Authorization", &format!("Bearer {key}"))],
    )
    .await
}

/// The key's `GatewaySynced` condition (status, reason, message) once the status
/// describes the current generation and `accept` holds for it.
pub(crate) async fn wait_gateway_synced(
    env: &TestEnv,
    name: &str,
    accept: impl Fn(&ApiKey, &str, &str) -> bool,
) -> (String, String, String) {
    let api = env.apikeys();
    eventually(
        &format!("apikey {name} GatewaySynced"),
        Duration::from_secs(60),
        || async {
            let k = api.get_opt(name).await.ok()??;
            let s = k.status.as_ref()?;
            let c = s.conditions.iter().find(|c| c.type_ == "GatewaySynced")?;
            let current = s.observed_generation == k.metadata.generation
                && c.observed_generation == k.metadata.generation;
            (current && accept(&k, &c.status, &c.reason))
                .then(|| (c.status.clone(), c.reason.clone(), c.message.clone()))
        },
    )
    .await
}

/// Issues a Ready key `name` for a new Ready customer `customer` whose Subscription has
/// `quota`; returns the plaintext key and the ApiKey.
pub(crate) async fn issue(
    env: &TestEnv,
    customer: &str,
    name: &str,
    scopes: &[&str],
    quota: serde_json::Value,
) -> (String, ApiKey) {
    env.customer_ready(customer, "Active").await;
    env.apply_subscription(
        customer,
        json!({"customerRef": {"name": customer}, "plan": "pro", "quota": quota}),
    )
    .await;
    env.wait_subscription(customer, "True", "Provisioned").await;
    let mut spec = key_spec(json!({"scopes": scopes}));
    spec["customerRef"]["name"] = json!(customer);
    env.apply_apikey(name, spec).await;
    let k = env.wait_apikey(name, "True", "Provisioned").await;
    let key = env
        .secret_key(&format!("{name}-api-key"))
        .await
        .expect("the key's Secret");
    (key, k)
}

#[tokio::test]
async fn keys_are_checked_through_nginx_and_revocation_is_confirmed() {
    let env = TestEnv::new("gateway").await;
    let _operator = env.start_operator().await;
    let (key, issued) = issue(
        &env,
        "alice",
        "alice-key",
        &["helloworld"],
        json!({"requestsPerSecond": 5, "monthlyRequests": 1_000_000}),
    )
    .await;
    let status = issued.status.expect("status");
    let (customer_id, key_id) = (
        status.customer_id.expect("customerId"),
        status.key_id.expect("keyId"),
    );

    // Without any replica nothing can confirm propagation.
    let (_, reason, message) =
        wait_gateway_synced(&env, "alice-key", |_, s, _| s == "Unknown").await;
    assert_eq!(reason, "NoGatewayRegistered", "{message}");

    let config = env.gateway_config();
    let (a, b) = (
        env.start_gateway(&config).await,
        env.start_gateway(&config).await,
    );
    let nginx = Nginx::start(&[a.addr.port(), b.addr.port()], start_upstream().await).await;

    // Two registered replicas confirm the key's entry (the report watch re-checks it).
    // Wait for both: the first replica's report alone already makes it True (1/1).
    let (_, _, message) = wait_gateway_synced(&env, "alice-key", |k, s, _| {
        let message = k
            .status
            .iter()
            .flat_map(|st| &st.conditions)
            .find(|c| c.type_ == "GatewaySynced");
        s == "True" && message.is_some_and(|c| c.message.starts_with("2/2 "))
    })
    .await;
    assert!(message.starts_with("2/2 "), "{message}");

    // The Secret's key: 200, and the upstream sees who is calling.
    let ok = through(&nginx, &key, "/v1/helloworld/Call?name=x").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let seen: serde_json::Value = serde_json::from_str(&ok.body).expect("upstream JSON");
    assert_eq!(seen["customerId"], customer_id.as_str());
    assert_eq!(seen["keyId"], key_id.as_str());
    assert_eq!(ok.header("RateLimit-Limit"), Some("5"), "{ok:?}");

    // A wrong key and a missing key: 401. An API outside the key's scopes: 403.
    let wrong = through(&nginx, "m3o_notarealkey_0000", "/v1/helloworld/Call").await;
    assert_eq!(wrong.status, 401, "{wrong:?}");
    let none = request(&nginx.addr(), "/v1/helloworld/Call", &[]).await;
    assert_eq!(none.status, 401, "{none:?}");
    let outside = through(&nginx, &key, "/v1/weather/Now").await;
    assert_eq!(outside.status, 403, "{outside:?}");
    let sneaky = through(&nginx, &key, "/v1/helloworld/../weather/Now").await;
    assert_eq!(sneaky.status, 403, "{sneaky:?}");

    // Over requestsPerSecond: 429 with Retry-After (the burst is one second's worth:
    // 5 at once, plus 5 per second of the burst's own duration, less the one above).
    let started = std::time::Instant::now();
    let burst =
        futures::future::join_all((0..30).map(|_| through(&nginx, &key, "/v1/helloworld/Call")))
            .await;
    let took = started.elapsed().as_secs_f64();
    let ok = burst.iter().filter(|r| r.status == 200).count();
    let limited: Vec<_> = burst.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok + limited.len(), 30, "only 200 or 429: {burst:?}");
    let most = 5 + (took * 5.0).ceil() as usize;
    assert!(
        (4..=most).contains(&ok),
        "{ok} of 30 requests at once in {took:.3}s got through a 5/s limit: {burst:?}"
    );
    for r in &limited {
        let retry: u64 = r
            .header("Retry-After")
            .and_then(|v| v.parse().ok())
            .expect("Retry-After");
        assert!(retry >= 1, "{r:?}");
        assert_eq!(r.header("RateLimit-Remaining"), Some("0"), "{r:?}");
    }

    // blocked: true -> once GatewaySynced is True for that generation, no replica
    // accepts the key: the very next request is refused, with the blockedMessage.
    env.apikeys()
        .patch(
            "alice-key",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"blocked": true, "blockedMessage": "unpaid invoice"}})),
        )
        .await
        .expect("block the key");
    let blocked = |k: &ApiKey, s: &str, _: &str| {
        s == "True"
            && k.status
                .as_ref()
                .and_then(|s| s.state)
                .map(|s| format!("{s:?}"))
                == Some("Blocked".into())
    };
    let (_, _, message) = wait_gateway_synced(&env, "alice-key", blocked).await;
    assert!(message.starts_with("2/2 "), "{message}");
    // The entry carries the blockedMessage (contract); nginx passes it on in the challenge.
    let entry = env.gateway_entry(&key).await.expect("blocked key's entry");
    let said = entry["blockedMessage"]
        .as_str()
        .unwrap_or("this API key is blocked")
        .to_owned();
    for _ in 0..4 {
        let r = through(&nginx, &key, "/v1/helloworld/Call").await;
        assert_eq!(
            r.status, 401,
            "GatewaySynced True but a replica still accepts: {r:?}"
        );
        let challenge = r.header("WWW-Authenticate").unwrap_or_default();
        assert!(challenge.contains(&said), "{r:?}");
    }

    // Deleting the Customer revokes its keys everywhere.
    env.apikeys()
        .patch(
            "alice-key",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"blocked": false}})),
        )
        .await
        .expect("unblock the key");
    eventually(
        "the unblocked key to work again",
        Duration::from_secs(30),
        || async {
            (through(&nginx, &key, "/v1/helloworld/Call").await.status != 401).then_some(())
        },
    )
    .await;
    env.customers()
        .delete("alice", &DeleteParams::default())
        .await
        .expect("delete customer");
    eventually(
        "401 after the Customer is deleted",
        Duration::from_secs(30),
        || async {
            let r = through(&nginx, &key, "/v1/helloworld/Call").await;
            (r.status == 401).then_some(())
        },
    )
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn replicas_share_one_quota_and_meter_usage() {
    let env = TestEnv::new("gateway-quota").await;
    let _operator = env.start_operator().await;
    let (key, issued) = issue(
        &env,
        "bob",
        "bob-key",
        &["*"],
        json!({"requestsPerSecond": 1000, "monthlyRequests": 6}),
    )
    .await;
    // A `*` key: its APIs are metered under their names only when listed.
    let mut config = env.gateway_config();
    config.extra_args = vec!["--usage-apis=weather".into()];
    let (a, b) = (
        env.start_gateway(&config).await,
        env.start_gateway(&config).await,
    );

    // Alternating between the replicas, the month allows exactly 6 requests in all.
    let mut statuses = Vec::new();
    for i in 0..10 {
        let replica = if i % 2 == 0 { &a } else { &b };
        let r = check(replica, &key, "/v1/weather/Now").await;
        if r.status == 429 {
            assert!(r.header("Retry-After").is_some(), "{r:?}");
            assert_eq!(r.header("RateLimit-Limit"), Some("6"), "{r:?}");
        }
        statuses.push(r.status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 429, 429, 429, 429]);

    // Usage per customer, key, API and day, as `m3o-gateway-auth usage` prints it.
    let customer = issued
        .status
        .as_ref()
        .and_then(|s| s.customer_id.clone())
        .expect("customerId");
    let key_id = issued
        .status
        .as_ref()
        .and_then(|s| s.key_id.clone())
        .expect("keyId");
    let client = redis::Client::open(config.redis_url.as_str()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let rows = m3o_gateway::usage::read(&mut conn, &config.redis_prefix, &customer)
        .await
        .expect("usage");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (
            rows[0].key_id.as_str(),
            rows[0].api.as_str(),
            rows[0].requests
        ),
        (key_id.as_str(), "weather", 6)
    );
    a.stop().await;
    b.stop().await;
}
