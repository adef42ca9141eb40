//! The gateway while its backends are down: etcd stopped -> under `--stale-mode=serve`
//! checks answered from the last snapshot (and `/readyz` says how stale), under the
//! default `fail` refused with 503 once past `--max-staleness`; Redis stopped -> the fail
//! mode chosen by `--rate-limit-fail-open`.

use std::time::Duration;

use serde_json::json;

use super::issue;
use crate::support::gateway::check;
use crate::support::{Backends, PrivateEtcd, PrivateRedis, TestEnv, eventually, http_get};

pub(super) async fn metrics(gateway: &m3o_gateway::Gateway) -> String {
    http_get(&gateway.metrics_addr.to_string(), "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// The value of the first sample of `name` whose line contains `labels`.
pub(super) fn sample(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

#[tokio::test]
async fn checks_are_answered_from_the_snapshot_while_etcd_is_down() {
    let env = TestEnv::new("gateway-etcd").await;
    let mut etcd = PrivateEtcd::start().await;
    let _operator = env
        .start_operator_with(Backends {
            etcd_endpoints: Some(etcd.endpoint()),
            ..Backends::default()
        })
        .await;
    let (key, _) = issue(
        &env,
        "carol",
        "carol-key",
        &["*"],
        json!({"requestsPerSecond": 100}),
    )
    .await;
    let mut config = env.gateway_config();
    config.etcd_endpoints = etcd.endpoint();
    let strict = env.start_gateway(&config).await;
    config.extra_args = vec!["--stale-mode=serve".into()];
    let gateway = env.start_gateway(&config).await;
    assert_eq!(check(&gateway, &key, "/v1/x/y").await.status, 200);
    assert_eq!(check(&strict, &key, "/v1/x/y").await.status, 200);

    etcd.pause().await;
    // The default mode refuses once etcd has not vouched for it for 10 s.
    let strict_ops = strict.metrics_addr.to_string();
    let refused = eventually(
        "the default replica to refuse with index_stale",
        Duration::from_secs(30),
        || async {
            let r = check(&strict, &key, "/v1/x/y").await;
            (r.status != 200).then_some(r)
        },
    )
    .await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.body.contains("index_stale"), "{refused:?}");
    assert!(refused.header("Retry-After").is_some(), "{refused:?}");
    let (code, body) = http_get(&strict_ops, "/readyz").await.expect("/readyz");
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        sample(&metrics(&strict).await, "m3o_gateway_index_stale ", ""),
        Some(1.0)
    );
    let ops = gateway.metrics_addr.to_string();
    let readyz = eventually(
        "/readyz to report a stale snapshot",
        Duration::from_secs(30),
        || async {
            let (code, body) = http_get(&ops, "/readyz").await?;
            body.contains("serving a snapshot").then_some((code, body))
        },
    )
    .await;
    assert_eq!(readyz.0, 200, "a stale snapshot still serves: {readyz:?}");
    let stale = sample(
        &metrics(&gateway).await,
        "m3o_gateway_index_staleness_seconds",
        "",
    )
    .expect("staleness metric");
    assert!(stale >= 5.0, "staleness {stale}");
    // Answered, and answered correctly, with etcd gone.
    assert_eq!(check(&gateway, &key, "/v1/x/y").await.status, 200);
    assert_eq!(
        check(&gateway, "m3o_wrong_key", "/v1/x/y").await.status,
        401
    );

    etcd.resume().await;
    for ops in [&ops, &strict_ops] {
        eventually(
            "/readyz to be current again",
            Duration::from_secs(30),
            || async {
                let (code, body) = http_get(ops, "/readyz").await?;
                (code == 200 && body.contains("confirmed")).then_some(())
            },
        )
        .await;
    }
    assert_eq!(check(&strict, &key, "/v1/x/y").await.status, 200);
    gateway.stop().await;
    strict.stop().await;
}

#[tokio::test]
async fn a_redis_outage_follows_the_fail_mode() {
    let env = TestEnv::new("gateway-redis").await;
    let _operator = env.start_operator().await;
    let (key, _) = issue(
        &env,
        "dave",
        "dave-key",
        &["*"],
        json!({"requestsPerSecond": 100}),
    )
    .await;
    let mut redis = PrivateRedis::start().await;
    let mut config = env.gateway_config();
    config.redis_url = redis.url();
    let open = env.start_gateway(&config).await;
    config.extra_args = vec!["--rate-limit-fail-open=false".into()];
    let closed = env.start_gateway(&config).await;
    assert_eq!(check(&open, &key, "/v1/x").await.status, 200);
    assert_eq!(check(&closed, &key, "/v1/x").await.status, 200);

    redis.pause().await;
    let r = check(&open, &key, "/v1/x").await;
    assert_eq!(r.status, 200, "fail-open lets requests through: {r:?}");
    let r = check(&closed, &key, "/v1/x").await;
    assert_eq!(r.status, 503, "fail-closed refuses: {r:?}");
    assert_eq!(r.header("Retry-After"), Some("1"), "{r:?}");
    // Authentication never depends on Redis: a wrong key is still a 401.
    assert_eq!(check(&open, "m3o_wrong", "/v1/x").await.status, 401);
    let allowed = sample(
        &metrics(&open).await,
        "m3o_gateway_limiter_unavailable_total",
        "outcome=\"allowed\"",
    );
    assert!(allowed.is_some_and(|n| n >= 1.0), "{allowed:?}");
    let denied = sample(
        &metrics(&closed).await,
        "m3o_gateway_limiter_unavailable_total",
        "outcome=\"denied\"",
    );
    assert!(denied.is_some_and(|n| n >= 1.0), "{denied:?}");

    redis.resume().await;
    eventually(
        "fail-closed replica to allow again",
        Duration::from_secs(30),
        || async { (check(&closed, &key, "/v1/x").await.status == 200).then_some(()) },
    )
    .await;
    open.stop().await;
    closed.stop().await;
}
