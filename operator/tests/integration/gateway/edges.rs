//! The gateway's edges, tried as an attacker would: through the nginx configuration
//! `m3o-gateway-auth nginx-config` prints and straight at a replica. Keys are written
//! into etcd as the operator writes them (no operator needed for these).

use std::time::{Duration, Instant};

use serde_json::json;

use super::outages::{metrics, sample};
use crate::support::gateway::{
    Reply, TestKey, check, new_key, request, request_bytes, start_recording_upstream, wait_applied,
};
use crate::support::nginx::Nginx;
use crate::support::{TestEnv, eventually, http_get};

/// The `error` of a JSON body.
fn reason(r: &Reply) -> String {
    serde_json::from_str::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// What an attack tries, its request target, its extra headers, and the status it must get.
type Case<'a> = (&'a str, &'a [u8], Vec<(&'a str, &'a [u8])>, u16);

#[tokio::test]
async fn attacks_through_nginx_are_refused_and_never_reach_the_upstream() {
    let env = TestEnv::new("gw-attacks").await;
    let hello = env.put_gateway_key(&["helloworld"], None).await;
    let star = env.put_gateway_key(&["*"], None).await;
    let gateway = env.start_gateway(&env.gateway_config()).await;
    let (upstream, seen) = start_recording_upstream().await;
    let nginx = Nginx::start(&[gateway.addr.port()], upstream).await;
    let addr = nginx.addr();
    let bearer = format!("Bearer {}", hello.key);

    // The key's own API goes through, and the upstream sees it as sent.
    let ok = request(
        &addr,
        "/v1/helloworld/Call?name=x",
        &[("Authorization", &bearer)],
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");

    let forwarded: &[u8] = b"/v1/helloworld/Call";
    let cases: Vec<Case> = vec![
        // One raw byte makes X-Original-URI unreadable: a 400, not a fallback to the
        // client's own X-Forwarded-Uri.
        (
            "raw byte in the query",
            b"/v1/db/Read?x=\xff",
            vec![("X-Forwarded-Uri", forwarded)],
            400,
        ),
        (
            "raw overlong UTF-8",
            b"/v1/helloworld/\xc0\xae\xc0\xae/db/Read",
            vec![],
            400,
        ),
        (
            "..; (Tomcat, Spring)",
            b"/v1/helloworld/..;/db/Read",
            vec![],
            403,
        ),
        (
            "path parameter",
            b"/v1/helloworld;x/../db/Read",
            vec![],
            403,
        ),
        (
            "double encoding",
            b"/v1/helloworld/%252e%252e/db/Read",
            vec![],
            403,
        ),
        (
            "encoded overlong",
            b"/v1/helloworld/%c0%ae%c0%ae/db/Read",
            vec![],
            403,
        ),
        (
            "encoded #",
            b"/v1/helloworld/Call%23/../../db/Read",
            vec![],
            403,
        ),
        ("dot segments", b"/v1/helloworld/../db/Read", vec![], 403),
        (
            "encoded dots",
            b"/v1/helloworld/%2e%2e/db/Read",
            vec![],
            403,
        ),
        (
            "encoded slashes",
            b"/v1/helloworld%2f..%2fdb/Read",
            vec![],
            403,
        ),
        ("case", b"/V1/helloworld/Call", vec![], 403),
        ("double slash", b"//v1/helloworld/Call", vec![], 403),
        (
            "scope in the query",
            b"/v1/db/Read?x=/v1/helloworld/Call",
            vec![],
            403,
        ),
        (
            "the client's own X-Original-URI",
            b"/v1/db/Read",
            vec![("X-Original-URI", forwarded)],
            403,
        ),
        (
            "the client's own X-Forwarded-Uri",
            b"/v1/db/Read",
            vec![("X-Forwarded-Uri", forwarded)],
            403,
        ),
    ];
    for (what, path, extra, status) in &cases {
        let mut headers: Vec<(&str, &[u8])> = vec![("Authorization", bearer.as_bytes())];
        headers.extend(extra.iter().copied());
        let r = request_bytes(&addr, path, &headers).await;
        assert_eq!(r.status, *status, "{what}: {r:?}");
        if *status == 400 {
            // The check's 400, as the printed config maps it (not nginx's own, nor the
            // upstream's).
            assert_eq!(r.body, "bad request\n", "{what}: {r:?}");
        }
    }
    // Two keys: the bearer one decides (the `*` key in X-Api-Key does not widen it).
    let r = request(
        &addr,
        "/v1/db/Read",
        &[("Authorization", &bearer), ("X-Api-Key", &star.key)],
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    let empty = request(
        &addr,
        "/v1/helloworld/Call",
        &[("Authorization", "Bearer ")],
    )
    .await;
    assert_eq!(empty.status, 401, "{empty:?}");
    let huge = format!("Bearer m3o_{}", "a".repeat(20_000));
    let r = request(&addr, "/v1/helloworld/Call", &[("Authorization", &huge)]).await;
    // nginx refuses a header that large itself (431 semantics, as its 400).
    assert_eq!(r.status, 400, "{r:?}");

    // The upstream saw the allowed request and nothing else.
    let seen: Vec<String> = seen
        .lock()
        .expect("seen")
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    assert_eq!(
        seen,
        ["GET /v1/helloworld/Call?name=x HTTP/1.0"],
        "the upstream saw more"
    );

    // Straight at the replica, with the reasons.
    let direct = gateway.addr.to_string();
    let r = request_bytes(
        &direct,
        b"/auth",
        &[
            ("Authorization", bearer.as_bytes()),
            ("X-Original-URI", b"/v1/db/Read?x=\xff"),
            ("X-Forwarded-Uri", forwarded),
        ],
    )
    .await;
    assert_eq!((r.status, reason(&r).as_str()), (400, "bad_uri"), "{r:?}");
    let r = request(
        &direct,
        "/auth",
        &[
            ("Authorization", &bearer),
            ("X-Forwarded-Uri", "/v1/helloworld/Call"),
        ],
    )
    .await;
    assert_eq!((r.status, reason(&r).as_str()), (400, "no_uri"), "{r:?}");
    let r = request(
        &direct,
        "/auth",
        &[
            ("Authorization", &bearer),
            ("X-Original-URI", "/v1/helloworld/Call"),
            ("X-Original-URI", "/v1/db/Read"),
        ],
    )
    .await;
    assert_eq!((r.status, reason(&r).as_str()), (400, "bad_uri"), "{r:?}");
    let r = check(&gateway, &hello.key, "/v1/helloworld/..;/db/Read").await;
    assert_eq!((r.status, reason(&r).as_str()), (403, "scope"), "{r:?}");
    let r = check(&gateway, &huge["Bearer ".len()..], "/v1/helloworld/Call").await;
    assert_eq!(
        (r.status, reason(&r).as_str()),
        (401, "malformed_key"),
        "{r:?}"
    );
    // An unreadable Authorization is a 400, not a fall back to X-Api-Key.
    let r = request_bytes(
        &direct,
        b"/auth",
        &[
            ("Authorization", b"Bearer \xff"),
            ("X-Api-Key", star.key.as_bytes()),
            ("X-Original-URI", b"/v1/db/Read"),
        ],
    )
    .await;
    assert_eq!(
        (r.status, reason(&r).as_str()),
        (400, "bad_header"),
        "{r:?}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn each_deployment_reads_its_one_uri_source() {
    let env = TestEnv::new("gw-uri-source").await;
    let hello = env.put_gateway_key(&["helloworld"], None).await;
    let bearer = format!("Bearer {}", hello.key);
    let mut config = env.gateway_config();
    config.extra_args = vec!["--uri-source=traefik".into(), "--no-limits".into()];
    let traefik = env.start_gateway(&config).await;
    config.extra_args = vec![
        "--uri-source=envoy".into(),
        "--path-prefix=/ext-authz".into(),
        "--no-limits".into(),
    ];
    let envoy = env.start_gateway(&config).await;

    let t = traefik.addr.to_string();
    let r = request(
        &t,
        "/",
        &[
            ("Authorization", &bearer),
            ("X-Forwarded-Uri", "/v1/helloworld/Call"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = request(
        &t,
        "/",
        &[
            ("Authorization", &bearer),
            ("X-Forwarded-Uri", "/v1/db/Read"),
            ("X-Original-URI", "/v1/helloworld/Call"),
        ],
    )
    .await;
    assert_eq!((r.status, reason(&r).as_str()), (403, "scope"), "{r:?}");
    let r = request(
        &t,
        "/",
        &[
            ("Authorization", &bearer),
            ("X-Original-URI", "/v1/helloworld/Call"),
        ],
    )
    .await;
    assert_eq!((r.status, reason(&r).as_str()), (400, "no_uri"), "{r:?}");
    let r = request_bytes(
        &t,
        b"/",
        &[
            ("Authorization", bearer.as_bytes()),
            ("X-Forwarded-Uri", b"/v1/helloworld/\xff"),
        ],
    )
    .await;
    assert_eq!((r.status, reason(&r).as_str()), (400, "bad_uri"), "{r:?}");

    let e = envoy.addr.to_string();
    let r = request(
        &e,
        "/ext-authz/v1/helloworld/Call?x=1",
        &[("Authorization", &bearer)],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = request(
        &e,
        "/ext-authz/v1/db/Read",
        &[
            ("Authorization", &bearer),
            ("X-Original-URI", "/v1/helloworld/Call"),
            ("X-Forwarded-Uri", "/v1/helloworld/Call"),
        ],
    )
    .await;
    assert_eq!((r.status, reason(&r).as_str()), (403, "scope"), "{r:?}");
    let r = request(
        &e,
        "/elsewhere/v1/helloworld/Call",
        &[("Authorization", &bearer)],
    )
    .await;
    assert_eq!((r.status, reason(&r).as_str()), (400, "bad_uri"), "{r:?}");

    // --path-prefix means nothing to nginx or Traefik: a start-up error, not ignored.
    let cli = <m3o_gateway::settings::Cli as clap::Parser>::try_parse_from([
        "m3o-gateway-auth",
        "--etcd-endpoints",
        &env.etcd_endpoints,
        "--no-limits",
        "--path-prefix=/ext-authz",
    ])
    .expect("flags");
    let err = m3o_gateway::start(cli.run)
        .await
        .err()
        .expect("--path-prefix without --uri-source=envoy");
    assert_eq!(err.flag, "--path-prefix", "{err}");
    traefik.stop().await;
    envoy.stop().await;
}

#[tokio::test]
async fn a_200_always_carries_both_identity_headers() {
    let env = TestEnv::new("gw-identity").await;
    let odd = env
        .put_gateway_key_with(&["*"], None, |v| v["keyId"] = json!("k\u{1}1"))
        .await;
    let mut config = env.gateway_config();
    config.extra_args = vec!["--no-limits".into()];
    let gateway = env.start_gateway(&config).await;
    let r = check(&gateway, &odd.key, "/v1/x/y").await;
    assert_eq!(
        (r.status, reason(&r).as_str()),
        (503, "bad_identity"),
        "{r:?}"
    );
    let good = env.put_gateway_key(&["*"], None).await;
    let revision = env.put_key_entry(&good, &["*"], |_| {}).await;
    wait_applied(&gateway, revision).await;
    let r = check(&gateway, &good.key, "/v1/x/y").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("X-M3O-Key-Id"), Some(good.key_id.as_str()));
    assert_eq!(
        r.header("X-M3O-Customer-Id"),
        Some(good.customer_id.as_str())
    );
    gateway.stop().await;
}

#[tokio::test]
async fn usage_is_metered_under_known_apis_only() {
    let env = TestEnv::new("gw-usage").await;
    let star = env.put_gateway_key(&["*"], None).await;
    // Another key of the same customer names `weather`: a known API.
    let weather = TestKey {
        key: new_key(),
        key_id: uuid::Uuid::new_v4().to_string(),
        customer_id: star.customer_id.clone(),
    };
    env.put_key_entry(&weather, &["weather"], |_| {}).await;
    let long = "l".repeat(65);
    let mut config = env.gateway_config();
    config.extra_args = vec![format!("--usage-apis=news,{long}")];
    let gateway = env.start_gateway(&config).await;

    // 10,000 made-up APIs: one field (`-`), not 10,000.
    let addr = gateway.addr.to_string();
    let bearer = format!("Bearer {}", star.key);
    let statuses: Vec<u16> = futures::StreamExt::collect(futures::StreamExt::buffer_unordered(
        futures::stream::iter((0..10_000).map(|i| {
            let (addr, bearer) = (addr.clone(), bearer.clone());
            async move {
                let path = format!("/v1/{}{i}/Call", uuid::Uuid::new_v4().simple());
                request(
                    &addr,
                    "/auth",
                    &[("Authorization", &bearer), ("X-Original-URI", &path)],
                )
                .await
                .status
            }
        })),
        16,
    ))
    .await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{:?}",
        statuses.iter().find(|s| **s != 200)
    );
    for path in ["/v1/weather/Now", "/v1/news/Top", &format!("/v1/{long}/x")] {
        assert_eq!(check(&gateway, &star.key, path).await.status, 200, "{path}");
    }
    let client = redis::Client::open(config.redis_url.as_str()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let rows = m3o_gateway::usage::read(&mut conn, &config.redis_prefix, &star.customer_id)
        .await
        .expect("usage");
    assert!(rows.len() <= 3, "{} usage fields", rows.len());
    let fields: Vec<(&str, u64)> = rows.iter().map(|r| (r.api.as_str(), r.requests)).collect();
    // Sorted by API: `-` (made-up APIs and the over-long one), then the known ones.
    assert_eq!(
        fields,
        [("-", 10_001), ("news", 1), ("weather", 1)],
        "{rows:?}"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn a_gateway_with_an_etcd_user_starts_while_etcd_is_down() {
    let env = TestEnv::new("gw-etcd-user").await;
    let mut config = env.gateway_config();
    config.etcd_endpoints = format!("http://127.0.0.1:{}", crate::support::free_port());
    config.extra_args = vec![
        "--etcd-username=m3o-gateway".into(),
        "--etcd-password=not-checked-while-down".into(),
        "--no-limits".into(),
    ];
    // Before: `start` failed (connecting with a user authenticates at once).
    let gateway = env.start_gateway_unready(&config).await;
    let (code, body) = http_get(&gateway.metrics_addr.to_string(), "/readyz")
        .await
        .expect("/readyz");
    assert_eq!(code, 503, "{body}");
    let r = check(&gateway, &new_key(), "/v1/x").await;
    assert_eq!((r.status, reason(&r).as_str()), (503, "not_ready"), "{r:?}");
    gateway.stop().await;
}

#[tokio::test]
async fn each_replica_reports_its_applied_revision_under_a_lease() {
    let env = TestEnv::new("gw-report").await;
    let key = env.put_gateway_key(&["*"], None).await;
    let mut config = env.gateway_config();
    config.extra_args = vec!["--no-limits".into()];
    let gateway = env.start_gateway(&config).await;
    let dir = format!("{}/gateways/", env.etcd_prefix);
    let reports = || async {
        let resp = env
            .etcd
            .kv_client()
            .get(
                dir.clone(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .expect("etcd get");
        resp.kvs()
            .iter()
            .map(|kv| {
                let v: serde_json::Value = serde_json::from_slice(kv.value()).expect("JSON");
                (
                    v["appliedRevision"].as_i64().expect("appliedRevision"),
                    kv.lease(),
                )
            })
            .collect::<Vec<_>>()
    };
    let revision = env
        .put_key_entry(&key, &["*"], |v| v["status"] = json!("blocked"))
        .await;
    let (applied, lease) = eventually(
        &format!("a report of revision {revision}"),
        Duration::from_secs(10),
        || async {
            let r = reports().await;
            (r.len() == 1 && r[0].0 >= revision).then(|| r[0])
        },
    )
    .await;
    assert!(applied >= revision);
    assert_ne!(lease, 0, "a report lives under a lease");
    let ttl = env
        .etcd
        .lease_client()
        .time_to_live(lease, None)
        .await
        .expect("lease ttl")
        .ttl();
    assert!((1..=10).contains(&ttl), "ttl {ttl}");
    // A stopped replica withdraws its report at once (well before the lease's 10 s).
    let stopped = Instant::now();
    gateway.stop().await;
    eventually(
        "the report to be withdrawn",
        Duration::from_secs(5),
        || async { reports().await.is_empty().then_some(()) },
    )
    .await;
    assert!(stopped.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn an_unreadable_quota_fails_closed() {
    let env = TestEnv::new("gw-bad-quota").await;
    let key = env
        .put_gateway_key(&["*"], Some(json!({"monthlyRequests": "lots"})))
        .await;
    let config = env.gateway_config();
    let gateway = env.start_gateway(&config).await;
    let r = check(&gateway, &key.key, "/v1/x").await;
    assert_eq!(
        (r.status, reason(&r).as_str()),
        (503, "quota_unreadable"),
        "{r:?}"
    );
    assert_eq!(r.header("Retry-After"), Some("1"), "{r:?}");
    let m = metrics(&gateway).await;
    assert_eq!(
        sample(
            &m,
            "m3o_gateway_checks_total",
            "reason=\"quota_unreadable\""
        ),
        Some(1.0),
        "{m}"
    );
    assert!(sample(&m, "m3o_gateway_index_invalid_values_total", "").is_some_and(|n| n >= 1.0));
    // A readable quota again: allowed, and limited.
    let resp = env
        .etcd
        .kv_client()
        .put(
            format!("{}/quotas/{}", env.etcd_prefix, key.customer_id),
            json!({"plan": "pro", "monthlyRequests": 100, "requestsPerSecond": 10}).to_string(),
            None,
        )
        .await
        .expect("put quota");
    wait_applied(&gateway, resp.header().map_or(0, |h| h.revision())).await;
    let r = check(&gateway, &key.key, "/v1/x").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("RateLimit-Limit"), Some("10"), "{r:?}");
    gateway.stop().await;
}
