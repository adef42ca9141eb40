//! The rate limiter against a Redis that hangs (SIGSTOP) or holds its answer: the
//! circuit breaker bounds what a hang costs, a request Redis did not answer in time is
//! not counted, and a key blocked while Redis answered gets no 200.

use std::time::{Duration, Instant};

use serde_json::json;

use super::outages::{metrics, sample};
use crate::support::gateway::{HoldProxy, Reply, StoppableRedis, check, request, wait_applied};
use crate::support::proxy::host_port;
use crate::support::{TestEnv, eventually};

const TIMEOUT: Duration = Duration::from_millis(300);
const FAILURES: usize = 3;

/// Answered by the limiter (not by the fail mode): it carries the RateLimit headers.
fn limited(r: &Reply) -> bool {
    r.header("RateLimit-Limit").is_some()
}

/// Sends `n` checks one after the other; returns how many waited about the Redis
/// timeout and their total time, asserting each status.
async fn run_checks(
    gateway: &m3o_gateway::Gateway,
    key: &str,
    n: usize,
    status: u16,
) -> (usize, Duration, Duration) {
    let (mut waited, mut waited_for) = (0, Duration::ZERO);
    let started = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let r = check(gateway, key, "/v1/x/y").await;
        let took = t.elapsed();
        assert_eq!(r.status, status, "{r:?}");
        assert!(!limited(&r), "Redis is hung: {r:?}");
        if took >= TIMEOUT * 2 / 3 {
            waited += 1;
            waited_for += took;
        }
    }
    (waited, waited_for, started.elapsed())
}

#[tokio::test]
async fn a_hung_redis_costs_at_most_n_timeouts_and_refused_checks_are_not_counted() {
    let env = TestEnv::new("gw-breaker").await;
    let key = env
        .put_gateway_key(
            &["*"],
            Some(
                json!({"plan": "pro", "monthlyRequests": 1_000_000, "requestsPerSecond": 100_000}),
            ),
        )
        .await;
    let redis = StoppableRedis::start().await;
    let mut config = env.gateway_config();
    config.redis_url = redis.url();
    let flags = [
        format!("--redis-timeout={}ms", TIMEOUT.as_millis()),
        format!("--redis-breaker-failures={FAILURES}"),
        "--redis-breaker-cooldown=1s".to_owned(),
    ];
    config.extra_args = flags.to_vec();
    let open = env.start_gateway(&config).await;
    config
        .extra_args
        .push("--rate-limit-fail-open=false".into());
    let closed = env.start_gateway(&config).await;
    config.extra_args = vec!["--no-limits".into()];
    let unlimited = env.start_gateway(&config).await;

    // Redis answers: every check is counted (and the replicas learn Redis's clock).
    let mut counted = 0;
    for gateway in [&open, &closed] {
        for _ in 0..3 {
            let r = check(gateway, &key.key, "/v1/x/y").await;
            assert!(r.status == 200 && limited(&r), "{r:?}");
            counted += 1;
        }
    }

    redis.hang();
    for (gateway, status, outcome) in [(&open, 200, "allowed"), (&closed, 503, "denied")] {
        let (waited, waited_for, took) = run_checks(gateway, &key.key, 40, status).await;
        eprintln!(
            "hung Redis, fail {outcome}: 40 checks in {took:?}; {waited} waited for Redis, {waited_for:?} in all"
        );
        assert!(waited <= FAILURES, "{waited} checks waited on a hung Redis");
        assert!(waited_for <= TIMEOUT * FAILURES as u32 + Duration::from_millis(300));
        let m = metrics(gateway).await;
        let n = sample(
            &m,
            "m3o_gateway_limiter_unavailable_total",
            &format!("outcome=\"{outcome}\""),
        );
        assert_eq!(n, Some(40.0), "{m}");
    }
    // The breaker open, checks cost what they cost without limits (interleaved, so
    // both see the same machine).
    let (mut with_breaker, mut without) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..300 {
        for (gateway, total) in [(&open, &mut with_breaker), (&unlimited, &mut without)] {
            let t = Instant::now();
            let r = check(gateway, &key.key, "/v1/x/y").await;
            *total += t.elapsed();
            assert!(r.status == 200 && !limited(&r), "{r:?}");
        }
    }
    eprintln!(
        "breaker open: 300 checks in {with_breaker:?} ({:.0}/s); --no-limits: {without:?} ({:.0}/s)",
        300.0 / with_breaker.as_secs_f64(),
        300.0 / without.as_secs_f64()
    );
    assert!(with_breaker < without * 2 + Duration::from_millis(300));

    // Redis back: the probe closes the breaker and checks are limited again. The scripts
    // the hung Redis received (one per timed-out check) ran when it resumed, past their
    // deadline: they counted nothing.
    redis.resume();
    for gateway in [&open, &closed] {
        eventually(
            "the limiter to answer again",
            Duration::from_secs(10),
            || async { limited(&check(gateway, &key.key, "/v1/x/y").await).then_some(()) },
        )
        .await;
        counted += 1;
    }
    let month =
        m3o_gateway::limits::month_key(&config.redis_prefix, &key.customer_id, chrono::Utc::now());
    let used: u64 = redis
        .get(&month)
        .await
        .and_then(|v| v.parse().ok())
        .expect("month count");
    assert_eq!(
        used, counted,
        "requests the limiter did not answer were counted"
    );
    for g in [open, closed, unlimited] {
        g.stop().await;
    }
}

#[tokio::test]
async fn a_key_blocked_while_the_limiter_answers_gets_no_200() {
    let env = TestEnv::new("gw-recheck").await;
    let key = env
        .put_gateway_key(
            &["*"],
            Some(json!({"plan": "pro", "monthlyRequests": 1_000_000, "requestsPerSecond": 1000})),
        )
        .await;
    let proxy = HoldProxy::start(host_port(&env.redis_url)).await;
    let mut config = env.gateway_config();
    config.redis_url = proxy.url();
    config.extra_args = vec!["--redis-timeout=20s".into()];
    let gateway = env.start_gateway(&config).await;
    let r = check(&gateway, &key.key, "/v1/x").await;
    assert!(r.status == 200 && limited(&r), "{r:?}");

    // A check waits for Redis, having passed the index...
    proxy.hold();
    let sent = proxy.received();
    let addr = gateway.addr.to_string();
    let bearer = format!("Bearer {}", key.key);
    let pending = tokio::spawn(async move {
        request(
            &addr,
            "/auth",
            &[("Authorization", &bearer), ("X-Original-URI", "/v1/x")],
        )
        .await
    });
    eventually(
        "the check's script to reach Redis",
        Duration::from_secs(10),
        || async { (proxy.received() > sent).then_some(()) },
    )
    .await;
    // ... the key is blocked meanwhile, and the replica has applied it ...
    let revision = env
        .put_key_entry(&key, &["*"], |v| {
            v["status"] = json!("blocked");
            v["blockedMessage"] = json!("fraud");
        })
        .await;
    wait_applied(&gateway, revision).await;
    // ... then Redis allows it: the check still answers 401.
    proxy.release();
    let r = pending.await.expect("check");
    assert_eq!(r.status, 401, "{r:?}");
    assert!(r.body.contains("fraud"), "{r:?}");
    gateway.stop().await;
}
