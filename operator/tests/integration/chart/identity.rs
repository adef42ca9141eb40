//! The gateway's own Redis identity (README: Secure connections; chart value
//! `gateway.existingSecret`), over TLS with client certificates: with the operator's
//! user (the README's least-privilege ACL: stream keys and XADD) Redis refuses the
//! limiter's script, so the replica is not ready, says why on one line, and answers no
//! check 200 unlimited even with --rate-limit-fail-open; with its own ACL user it is
//! ready and enforces the quota.

use std::time::Duration;

use serde_json::json;

use crate::support::gateway::check;
use crate::support::operator::http_get;
use crate::support::tls_backends::{OPERATOR_USER, TlsBackends};
use crate::support::{TestEnv, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_operators_redis_user_the_gateway_is_not_ready_and_never_unlimited() {
    let mut env = TestEnv::new("gw-identity").await;
    let tls = TlsBackends::start(&env).await;
    env.etcd = tls.admin_etcd.clone();
    let quota = json!({"plan": "pro", "monthlyRequests": 1000, "requestsPerSecond": 1});
    let key = env.put_gateway_key(&["*"], Some(quota)).await;

    let mut config = tls.servers.gateway_config(&env);
    config.redis_url = tls.servers.redis_url_as(OPERATOR_USER);
    config.extra_args.push("--rate-limit-fail-open=true".into());
    let wrong = env.start_gateway_unready(&config).await;
    let ops = wrong.metrics_addr.to_string();
    let reason = eventually(
        "/readyz to refuse, naming the script's permission",
        Duration::from_secs(30),
        || async {
            let (code, body) = http_get(&ops, "/readyz").await?;
            (code == 503 && body.contains("may not run the limiter's script")).then_some(body)
        },
    )
    .await;
    assert_eq!(reason.trim().lines().count(), 1, "one line: {reason:?}");
    assert!(
        reason.contains("evalsha") && !reason.contains(&tls.servers.password()),
        "{reason}"
    );
    eventually("the index to load", Duration::from_secs(30), || async {
        wrong.index.loaded().then_some(())
    })
    .await;
    for _ in 0..5 {
        let r = check(&wrong, &key.key, "/v1/helloworld/call").await;
        assert_eq!(r.status, 503, "never 200 unlimited: {r:?}");
        assert!(r.body.contains("limiter_forbidden"), "{r:?}");
    }
    let (code, _) = http_get(&ops, "/readyz").await.expect("/readyz answers");
    assert_eq!(code, 503, "still not ready");
    wrong.stop().await;

    // Its own user: ready, and the quota (1 request per second, a burst of one
    // second's worth) refuses the third request in a row.
    let own = env.start_gateway(&tls.servers.gateway_config(&env)).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = check(&own, &key.key, "/v1/helloworld/call").await;
        statuses.push(r.status);
        if r.status == 200 {
            assert!(r.header("RateLimit-Limit").is_some(), "counted: {r:?}");
        }
    }
    assert_eq!(statuses[0], 200, "{statuses:?}");
    assert!(statuses.contains(&429), "limits enforced: {statuses:?}");
    own.stop().await;
}
