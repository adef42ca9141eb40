//! Usage as durable, reconciled state: requests through nginx and two gateway replicas
//! are rolled up from Redis into `usage_daily` exactly (whatever crashes and restarts),
//! thresholds are announced once, and `m3o-operator usage` exports the totals.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use super::{issue, through, wait_gateway_synced};
use crate::apikey::key_spec;
use crate::support::gateway::{GatewayConfig, check, start_upstream};
use crate::support::nginx::Nginx;
use crate::support::operator::{Backends, Operator};
use crate::support::{TestEnv, eventually};

/// The operator flags that make it roll up this test's gateway counters, every second.
fn usage_flags(config: &GatewayConfig) -> Vec<String> {
    vec![
        "--usage-redis-prefix".into(),
        config.redis_prefix.clone(),
        "--usage-interval".into(),
        "1s".into(),
    ]
}

/// `usage_daily` of a customer summed by (key, API).
async fn totals(env: &TestEnv, customer: Uuid) -> BTreeMap<(String, String), i64> {
    let rows: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT key_id, api, sum(requests)::bigint FROM usage_daily WHERE customer_id = $1 \
         GROUP BY key_id, api",
    )
    .bind(customer)
    .fetch_all(&env.db)
    .await
    .expect("read usage_daily");
    rows.into_iter()
        .map(|(k, a, n)| ((k.to_string(), a), n))
        .collect()
}

/// Waits until `usage_daily` of `customer` holds exactly `expected`.
async fn wait_totals(env: &TestEnv, customer: Uuid, expected: &BTreeMap<(String, String), i64>) {
    eventually(
        "usage_daily to hold the exact totals",
        Duration::from_secs(60),
        || async { (totals(env, customer).await == *expected).then_some(()) },
    )
    .await;
}

/// How many rollups the operator has completed (its debug log line per rollup).
/// A connection to the gateways' Redis, and the key of `customer`'s usage hash of today.
async fn todays_usage_hash(
    config: &GatewayConfig,
    customer: &str,
) -> (redis::aio::MultiplexedConnection, String) {
    let client = redis::Client::open(config.redis_url.as_str()).expect("redis url");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let hash = m3o_platform_contract::usage::usage_key(&config.redis_prefix, customer, &day);
    (conn, hash)
}

fn rollups(op: &Operator) -> usize {
    std::fs::read_to_string(&op.log_path)
        .unwrap_or_default()
        .matches("usage rolled up")
        .count()
}

/// Waits until `n` more rollups than now have completed.
async fn wait_rollups(op: &Operator, n: usize) {
    let start = rollups(op);
    eventually(
        &format!("{n} more rollups"),
        Duration::from_secs(60),
        || async { (rollups(op) >= start + n).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn usage_totals_are_exact_through_nginx_and_a_restarted_replica_loses_no_count() {
    let env = TestEnv::new("usage-totals").await;
    let config = env.gateway_config();
    let op = env
        .start_operator_with(Backends {
            extra_args: usage_flags(&config),
            ..Backends::default()
        })
        .await;
    let quota = json!({"requestsPerSecond": 100_000, "monthlyRequests": 1_000_000});
    let apis = ["helloworld", "weather"];
    let (first, issued) = issue(&env, "carol", "carol-key-0", &apis, quota).await;
    let status = issued.status.expect("status");
    let customer: Uuid = status
        .customer_id
        .expect("customerId")
        .parse()
        .expect("uuid");
    let mut keys = vec![(first, status.key_id.expect("keyId"))];
    for i in 1..3 {
        let name = format!("carol-key-{i}");
        let mut spec = key_spec(json!({"scopes": apis}));
        spec["customerRef"]["name"] = json!("carol");
        env.apply_apikey(&name, spec).await;
        let k = env.wait_apikey(&name, "True", "Provisioned").await;
        let key = env
            .secret_key(&format!("{name}-api-key"))
            .await
            .expect("Secret");
        keys.push((key, k.status.and_then(|s| s.key_id).expect("keyId")));
    }
    let (a, b) = (
        env.start_gateway(&config).await,
        env.start_gateway(&config).await,
    );
    let a_addr = a.addr.to_string();
    let nginx = Nginx::start(&[a.addr.port(), b.addr.port()], start_upstream().await).await;
    for i in 0..3 {
        wait_gateway_synced(&env, &format!("carol-key-{i}"), |k, s, _| {
            let message = k
                .status
                .iter()
                .flat_map(|st| &st.conditions)
                .find(|c| c.type_ == "GatewaySynced")
                .map(|c| c.message.clone())
                .unwrap_or_default();
            s == "True" && message.starts_with("2/2 ")
        })
        .await;
    }

    // 1,000 requests over 3 keys and 2 APIs, 50 at a time; replica `a` restarts halfway.
    let mut expected: BTreeMap<(String, String), i64> = BTreeMap::new();
    let plan: Vec<(usize, &str)> = (0..1000).map(|n| (n % 3, apis[(n / 3) % 2])).collect();
    let mut a = Some(a);
    for (batch, chunk) in plan.chunks(50).enumerate() {
        if batch == 10 {
            a.take().expect("replica a").stop().await;
            a = Some(env.start_gateway_at(&config, &a_addr).await);
        }
        let replies = futures::future::join_all(chunk.iter().map(|(k, api)| {
            let (nginx, key, path) = (&nginx, &keys[*k].0, format!("/v1/{api}/Call"));
            async move { through(nginx, key, &path).await }
        }))
        .await;
        for (r, (k, api)) in replies.iter().zip(chunk) {
            assert_eq!(r.status, 200, "{r:?}");
            *expected
                .entry((keys[*k].1.clone(), (*api).to_owned()))
                .or_default() += 1;
        }
    }
    assert_eq!(expected.values().sum::<i64>(), 1000);
    assert_eq!(expected.len(), 6);

    wait_totals(&env, customer, &expected).await;
    // Further rollups of the same counters add nothing.
    wait_rollups(&op, 3).await;
    assert_eq!(totals(&env, customer).await, expected);

    // The billing export prints the same totals.
    let period = chrono::Utc::now().format("%Y-%m").to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_m3o-operator"))
        .args([
            "usage",
            "--customer",
            &customer.to_string(),
            "--period",
            &period,
        ])
        .args(["--by", "key", "-o", "csv"])
        .env("M3O_DATABASE_SCHEMA", &env.schema)
        .env("DATABASE_URL", &env.database_url)
        .output()
        .await
        .expect("run m3o-operator usage");
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{csv}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut by_key: Vec<String> = keys
        .iter()
        .map(|(_, id)| {
            let n: i64 = expected
                .iter()
                .filter(|((k, _), _)| k == id)
                .map(|(_, n)| n)
                .sum();
            format!("{customer},{id},{n}")
        })
        .collect();
    by_key.sort();
    let mut lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.remove(0), "customer_id,key_id,requests", "{csv}");
    assert_eq!(lines, by_key, "{csv}");

    // The kubectl plugin (the same binary as kubectl-m3o), by Customer name and by API.
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("plugin-{}", crate::support::suffix()));
    std::fs::create_dir_all(&dir).expect("plugin dir");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_m3o-operator"), dir.join("kubectl-m3o"))
        .expect("symlink");
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new("kubectl")
        .args(["m3o", "usage", "-n", &env.ns, "carol", "--period", &period])
        .args(["--by", "api", "-o", "csv", "--database-schema", &env.schema])
        .env("DATABASE_URL", &env.database_url)
        .env("PATH", path)
        .output()
        .await
        .expect("kubectl");
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{csv}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_api: Vec<String> = apis
        .iter()
        .map(|api| {
            let n: i64 = expected
                .iter()
                .filter(|((_, a), _)| a == api)
                .map(|(_, n)| n)
                .sum();
            format!("{customer},{api},{n}")
        })
        .collect();
    let mut lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.remove(0), "customer_id,api,requests", "{csv}");
    assert_eq!(lines, by_api, "{csv}");

    if let Some(a) = a {
        a.stop().await;
    }
    b.stop().await;
}

#[tokio::test]
async fn a_rollup_killed_midway_and_rerun_leaves_the_same_totals() {
    let env = TestEnv::new("usage-crash").await;
    let config = env.gateway_config();
    let quota = json!({"plan": "pro", "monthlyRequests": 1_000_000, "requestsPerSecond": 100_000});
    let customers = [
        env.put_gateway_key(&["alpha", "beta"], Some(quota.clone()))
            .await,
        env.put_gateway_key(&["alpha", "beta"], Some(quota.clone()))
            .await,
        env.put_gateway_key(&["alpha", "beta"], Some(quota)).await,
    ];
    let (a, b) = (
        env.start_gateway(&config).await,
        env.start_gateway(&config).await,
    );
    // 3 customers x 2 APIs: 6 counters, 3 pages of 2.
    for (i, key) in customers.iter().enumerate() {
        for (j, api) in ["alpha", "beta"].iter().enumerate() {
            for n in 0..(i + 1) * 10 + j {
                let replica = if n % 2 == 0 { &a } else { &b };
                let r = check(replica, &key.key, &format!("/v1/{api}/x")).await;
                assert_eq!(r.status, 200, "{r:?}");
            }
        }
    }
    let all_rows = || async {
        let rows: Vec<(Uuid, String, i64)> =
            sqlx::query_as("SELECT customer_id, api, requests FROM usage_daily ORDER BY 1, 2")
                .fetch_all(&env.db)
                .await
                .expect("usage_daily");
        rows
    };
    let expected: Vec<(Uuid, String, i64)> = {
        let mut e: Vec<_> = customers
            .iter()
            .enumerate()
            .flat_map(|(i, key)| {
                ["alpha", "beta"].iter().enumerate().map(move |(j, api)| {
                    (
                        key.customer_id.parse().expect("uuid"),
                        (*api).to_owned(),
                        ((i + 1) * 10 + j) as i64,
                    )
                })
            })
            .collect();
        e.sort();
        e
    };

    // The first page commits, then the process dies (a SIGKILL-like abort).
    let mut flags = usage_flags(&config);
    flags.extend(["--usage-page-size".into(), "2".into()]);
    let crashing = env.spawn_operator_with(Backends {
        extra_args: flags.clone(),
        extra_env: vec![(
            "M3O_FAILPOINTS".into(),
            "usage-rollup-page-committed".into(),
        )],
        ..Backends::default()
    });
    let status = tokio::time::timeout(Duration::from_secs(90), crashing.wait())
        .await
        .expect("the operator to abort at the failpoint");
    assert!(!status.success(), "{status:?}");
    let partial = all_rows().await;
    assert_eq!(
        partial.len(),
        2,
        "one page of 2 counters committed: {partial:?}"
    );

    // Rerun (twice over): the same totals, exactly. Its clock is the test's (no file
    // yet: the wall clock).
    let clock = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("usage-clock-{}", crate::support::suffix()));
    let op = env
        .start_operator_with(Backends {
            extra_args: flags,
            extra_env: vec![("M3O_TEST_CLOCK_FILE".into(), clock.display().to_string())],
            ..Backends::default()
        })
        .await;
    eventually(
        "all counters rolled up",
        Duration::from_secs(60),
        || async { (all_rows().await.len() == 6).then_some(()) },
    )
    .await;
    wait_rollups(&op, 3).await;
    assert_eq!(all_rows().await, expected);

    // A counter that grows adds only its growth. (The operator removed the keys this
    // test wrote into its etcd prefix, so the gateway's own script is mimicked.)
    let (mut conn, hash) = todays_usage_hash(&config, &customers[0].customer_id).await;
    let field = m3o_platform_contract::usage::usage_field(&customers[0].key_id, "alpha");
    let _: i64 = redis::cmd("HINCRBY")
        .arg(&hash)
        .arg(&field)
        .arg(1)
        .query_async(&mut conn)
        .await
        .expect("HINCRBY");
    let mut grown = expected.clone();
    let first: Uuid = customers[0].customer_id.parse().expect("uuid");
    if let Some(row) = grown
        .iter_mut()
        .find(|(c, api, _)| *c == first && api == "alpha")
    {
        row.2 += 1;
    }
    eventually(
        "the grown counter rolled up",
        Duration::from_secs(60),
        || async { (all_rows().await == grown).then_some(()) },
    )
    .await;
    wait_rollups(&op, 2).await;
    assert_eq!(all_rows().await, grown);

    // A flush (the hash lost, as FLUSHALL would in a Redis of its own): the counts
    // made since then are added to the durable total, not compared with it, even when
    // they outgrow the lost counter before the next rollup (the re-created hash has
    // another epoch, as the gateway's script writes it).
    let lost: i64 = redis::cmd("HGET")
        .arg(&hash)
        .arg(&field)
        .query_async(&mut conn)
        .await
        .expect("HGET");
    let _: i64 = redis::cmd("DEL")
        .arg(&hash)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let after_flush = lost + 3;
    let _: i64 = redis::cmd("HINCRBY")
        .arg(&hash)
        .arg(&field)
        .arg(after_flush)
        .query_async(&mut conn)
        .await
        .expect("HINCRBY");
    let _: i64 = redis::cmd("HINCRBY")
        .arg(&hash)
        .arg(m3o_platform_contract::usage::EPOCH_FIELD)
        .arg(chrono::Utc::now().timestamp_micros())
        .query_async(&mut conn)
        .await
        .expect("HINCRBY epoch");
    // As the gateway's script does for a new hash.
    let _: i64 = redis::cmd("EXPIRE")
        .arg(&hash)
        .arg(m3o_platform_contract::usage::UNCONFIRMED_RETENTION_SECS)
        .query_async(&mut conn)
        .await
        .expect("EXPIRE");
    if let Some(row) = grown
        .iter_mut()
        .find(|(c, api, _)| *c == first && api == "alpha")
    {
        row.2 += after_flush;
    }
    eventually(
        "the counts after a flush added",
        Duration::from_secs(60),
        || async { (all_rows().await == grown).then_some(()) },
    )
    .await;
    wait_rollups(&op, 2).await;
    assert_eq!(all_rows().await, grown);

    // Retention: today's hash keeps the gateway's TTL while the day is open; once the
    // operator's clock is past the day's end and grace, the committed day is confirmed
    // and its TTL lowered.
    let ttl = |conn: redis::aio::MultiplexedConnection| {
        let hash = hash.clone();
        async move {
            let mut conn = conn;
            redis::cmd("TTL")
                .arg(&hash)
                .query_async::<i64>(&mut conn)
                .await
                .expect("TTL")
        }
    };
    let open_ttl = ttl(conn.clone()).await;
    assert!(
        open_ttl > m3o_platform_contract::usage::CONFIRMED_RETENTION_SECS,
        "{open_ttl}"
    );
    let tomorrow = chrono::Utc::now().date_naive() + chrono::Days::new(1);
    let after_grace = tomorrow.and_hms_opt(0, 15, 0).expect("time").and_utc();
    std::fs::write(&clock, after_grace.to_rfc3339()).expect("write the clock");
    eventually(
        "the closed day confirmed",
        Duration::from_secs(60),
        || async {
            let left = ttl(conn.clone()).await;
            (0 < left && left <= m3o_platform_contract::usage::CONFIRMED_RETENTION_SECS)
                .then_some(())
        },
    )
    .await;
    // Confirming changed no total.
    assert_eq!(all_rows().await, grown);

    // The fleet export, one customer per keyset page: every customer, once, in order.
    let period = chrono::Utc::now().format("%Y-%m").to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_m3o-operator"))
        .args([
            "usage", "--all", "--period", &period, "--by", "api", "-o", "csv",
        ])
        .args(["--page-size", "1"])
        .env("M3O_DATABASE_SCHEMA", &env.schema)
        .env("DATABASE_URL", &env.database_url)
        .output()
        .await
        .expect("run m3o-operator usage --all");
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{csv}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Vec<String> = grown
        .iter()
        .map(|(c, api, n)| format!("{c},{api},{n}"))
        .collect();
    let mut lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.remove(0), "customer_id,api,requests", "{csv}");
    assert_eq!(lines, want, "{csv}");

    // An outage of days: the operator's clock jumps 4 days on; a day in between that no
    // rollup saw (counted while it was away) is rolled up from the last confirmed day on.
    let watermark: chrono::NaiveDate =
        sqlx::query_scalar("SELECT confirmed_through FROM usage_watermark")
            .fetch_one(&env.db)
            .await
            .expect("watermark");
    assert_eq!(watermark, chrono::Utc::now().date_naive());
    let skipped = watermark + chrono::Days::new(2);
    let skipped_hash = m3o_platform_contract::usage::usage_key(
        &config.redis_prefix,
        &customers[1].customer_id,
        &skipped.format("%Y-%m-%d").to_string(),
    );
    let field = m3o_platform_contract::usage::usage_field(&customers[1].key_id, "beta");
    let _: () = redis::cmd("HSET")
        .arg(&skipped_hash)
        .arg(&field)
        .arg(5)
        .query_async(&mut conn)
        .await
        .expect("HSET");
    let later = (watermark + chrono::Days::new(4))
        .and_hms_opt(12, 0, 0)
        .expect("time");
    std::fs::write(&clock, later.and_utc().to_rfc3339()).expect("write the clock");
    let second: Uuid = customers[1].customer_id.parse().expect("uuid");
    eventually(
        "the skipped day rolled up",
        Duration::from_secs(60),
        || async {
            let n: Option<i64> = sqlx::query_scalar(
                "SELECT requests FROM usage_daily WHERE customer_id = $1 AND day = $2",
            )
            .bind(second)
            .bind(skipped)
            .fetch_optional(&env.db)
            .await
            .expect("usage_daily");
            (n == Some(5)).then_some(())
        },
    )
    .await;
    a.stop().await;
    b.stop().await;
}

/// The Subscription's usage status and QuotaAvailable condition (status, reason).
fn quota_state(s: &m3o_crds::Subscription) -> Option<(m3o_crds::UsageStatus, String, String)> {
    let status = s.status.as_ref()?;
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == "QuotaAvailable")?;
    Some((status.usage.clone()?, c.status.clone(), c.reason.clone()))
}

/// Waits until the Subscription's status shows `accept`.
async fn wait_quota(
    env: &TestEnv,
    name: &str,
    what: &str,
    accept: impl Fn(&m3o_crds::UsageStatus, &str, &str) -> bool,
) -> (m3o_crds::UsageStatus, String, String) {
    eventually(what, Duration::from_secs(60), || async {
        let s = env.subscriptions().get_opt(name).await.ok()??;
        let (usage, status, reason) = quota_state(&s)?;
        accept(&usage, &status, &reason).then_some((usage, status, reason))
    })
    .await
}

/// The decoded QuotaThresholdReached events on the stream: (percent, period, requests, limit).
async fn threshold_events(env: &TestEnv) -> Vec<(u32, String, u64, u64)> {
    crate::support::dedupe(env.stream_events().await)
        .into_iter()
        .filter(|e| e.event_type == "EventTypeQuotaThresholdReached")
        .filter_map(|e| e.event.quota_threshold_reached)
        .map(|p| (p.percent, p.period, p.requests, p.monthly_requests))
        .collect()
}

#[tokio::test]
async fn quota_thresholds_reach_status_events_once_and_a_new_period_resets_status() {
    let env = TestEnv::new("usage-quota").await;
    let config = env.gateway_config();
    let clock = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("usage-clock-{}", crate::support::suffix()));
    let mut flags = usage_flags(&config);
    // Only a crossing or a new period writes status within the test.
    flags.extend(["--usage-status-interval".into(), "1h".into()]);
    let op = env
        .start_operator_with(Backends {
            extra_args: flags,
            extra_env: vec![("M3O_TEST_CLOCK_FILE".into(), clock.display().to_string())],
            ..Backends::default()
        })
        .await;
    let quota = json!({"requestsPerSecond": 100_000, "monthlyRequests": 100});
    let (key, _) = issue(&env, "dave", "dave-key", &["helloworld"], quota).await;
    let (a, b) = (
        env.start_gateway(&config).await,
        env.start_gateway(&config).await,
    );
    let nginx = Nginx::start(&[a.addr.port(), b.addr.port()], start_upstream().await).await;
    wait_gateway_synced(&env, "dave-key", |k, s, _| {
        s == "True"
            && k.status
                .iter()
                .flat_map(|st| &st.conditions)
                .any(|c| c.type_ == "GatewaySynced" && c.message.starts_with("2/2 "))
    })
    .await;
    let send = |n: usize| {
        let (nginx, key) = (&nginx, &key);
        async move {
            for chunk in (0..n).collect::<Vec<_>>().chunks(10) {
                let replies = futures::future::join_all(
                    chunk
                        .iter()
                        .map(|_| through(nginx, key, "/v1/helloworld/Call")),
                )
                .await;
                for r in replies {
                    assert_eq!(r.status, 200, "{r:?}");
                }
            }
        }
    };
    let period = chrono::Utc::now().format("%Y-%m").to_string();

    // 50%: a crossing, written although the status interval is an hour.
    send(50).await;
    wait_quota(&env, "dave", "status at 50 requests", |u, s, r| {
        u.requests == 50 && u.period == period && s == "True" && r == "QuotaRemaining"
    })
    .await;
    // 60: within the band, so status keeps 50 for the interval (several rollups).
    send(10).await;
    wait_rollups(&op, 3).await;
    let s = env.subscriptions().get("dave").await.expect("subscription");
    let (usage, _, _) = quota_state(&s).expect("quota state");
    assert_eq!(usage.requests, 50, "{usage:?}");

    // 100: exhausted in status, and the gateway refuses the 101st.
    send(40).await;
    let (usage, _, _) = wait_quota(&env, "dave", "QuotaExhausted", |u, s, r| {
        u.requests == 100 && s == "False" && r == "QuotaExhausted"
    })
    .await;
    assert_eq!(usage.used.as_deref(), Some("100%"));
    assert_eq!(usage.monthly_requests, 100);
    let refused = through(&nginx, &key, "/v1/helloworld/Call").await;
    assert_eq!(refused.status, 429, "{refused:?}");
    let s = env.subscriptions().get("dave").await.expect("subscription");
    let ready = s
        .status
        .iter()
        .flat_map(|st| &st.conditions)
        .find(|c| c.type_ == "Ready");
    assert_eq!(
        ready.map(|c| c.status.as_str()),
        Some("True"),
        "Ready does not depend on usage"
    );

    // Exactly one event for 80 and one for 100, however many rollups run.
    let events = eventually("both threshold events", Duration::from_secs(60), || async {
        let mut e = threshold_events(&env).await;
        e.sort();
        (e.len() >= 2).then_some(e)
    })
    .await;
    assert!(
        events.iter().all(|(p, _, _, _)| *p == 80 || *p == 100) && events.len() == 2,
        "{events:?}"
    );
    wait_rollups(&op, 3).await;
    let mut events = threshold_events(&env).await;
    events.sort();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events.iter().map(|e| e.0).collect::<Vec<_>>(), [80, 100]);
    // The 80% event carries the requests of the rollup that first saw 80% or more.
    let (_, ref p80, r80, m80) = events[0];
    assert!(
        (80..=100).contains(&r80) && *p80 == period && m80 == 100,
        "{events:?}"
    );
    assert_eq!(events[1], (100, period.clone(), 100, 100));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_thresholds")
        .fetch_one(&env.db)
        .await
        .expect("usage_thresholds");
    assert_eq!(rows, 2);
    let kube_events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(env.kube.clone(), &env.ns);
    eventually(
        "QuotaThresholdReached Events on the Subscription",
        Duration::from_secs(30),
        || async {
            let list = kube_events.list(&Default::default()).await.ok()?;
            let n = list
                .items
                .iter()
                .filter(|e| e.reason.as_deref() == Some("QuotaThresholdReached"))
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("dave"))
                .count();
            (n == 2).then_some(())
        },
    )
    .await;

    // The operator's clock crosses into the next period: status resets, quota available.
    let now = chrono::Utc::now().date_naive();
    let next = next_month_start(now);
    std::fs::write(&clock, format!("{next}T00:20:00Z")).expect("write the clock");
    let next_period = next.format("%Y-%m").to_string();
    let (usage, _, _) = wait_quota(&env, "dave", "status in the new period", |u, s, r| {
        u.period == next_period && s == "True" && r == "QuotaRemaining"
    })
    .await;
    assert_eq!((usage.requests, usage.used.as_deref()), (0, Some("0%")));
    a.stop().await;
    b.stop().await;
}

/// The first day of the month after `day`'s.
fn next_month_start(day: chrono::NaiveDate) -> chrono::NaiveDate {
    use chrono::Datelike;
    let (y, m) = if day.month() == 12 {
        (day.year() + 1, 1)
    } else {
        (day.year(), day.month() + 1)
    };
    chrono::NaiveDate::from_ymd_opt(y, m, 1).expect("first of the month")
}

/// Measurement, not a test (`make bench-usage`): one rollup of 10,000 customers with
/// usage (2 counters each) by the operator, beside the raw cost of the same Redis and
/// Postgres work done directly.
#[cfg(feature = "bench")]
#[tokio::test]
async fn bench_usage_rollup_of_10000_customers() {
    const CUSTOMERS: usize = 10_000;
    let env = TestEnv::new("usage-scale").await;
    let config = env.gateway_config();
    let client = redis::Client::open(config.redis_url.as_str()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    for chunk in (0..CUSTOMERS).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for _ in chunk {
            let hash = m3o_platform_contract::usage::usage_key(
                &config.redis_prefix,
                &Uuid::new_v4().to_string(),
                &day,
            );
            let key = Uuid::new_v4().to_string();
            for (api, n) in [("alpha", 7), ("beta", 3)] {
                pipe.hset(
                    &hash,
                    m3o_platform_contract::usage::usage_field(&key, api),
                    n,
                )
                .ignore();
            }
        }
        pipe.query_async::<()>(&mut conn).await.expect("seed");
    }

    // The raw work: paged SCAN + pipelined HGETALL, and the same rows upserted in pages
    // of 1,000 into a copy of the table.
    let started = std::time::Instant::now();
    let pattern = m3o_platform_contract::usage::usage_day_pattern(&config.redis_prefix, &day);
    let (mut cursor, mut rows) = (0u64, Vec::new());
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("SCAN");
        let mut pipe = redis::pipe();
        keys.iter().for_each(|k| {
            pipe.hgetall(k);
        });
        let hashes: Vec<BTreeMap<String, i64>> =
            pipe.query_async(&mut conn).await.expect("HGETALL");
        for (k, h) in keys.iter().zip(hashes) {
            for (f, n) in h {
                rows.push((k.clone(), f, n));
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let redis_took = started.elapsed();
    let pg_started = std::time::Instant::now();
    sqlx::query("CREATE TABLE usage_raw (LIKE usage_daily INCLUDING ALL)")
        .execute(&env.db)
        .await
        .expect("scratch table");
    for page in rows.chunks(1000) {
        let n = page.len();
        sqlx::query(
            "INSERT INTO usage_raw (customer_id, key_id, api, day, requests, counter) \
             SELECT gen_random_uuid(), gen_random_uuid(), 'a', current_date, n, n \
             FROM UNNEST($1::bigint[]) AS t(n)",
        )
        .bind(page.iter().map(|r| r.2).collect::<Vec<i64>>())
        .execute(&env.db)
        .await
        .expect("insert");
        assert_eq!(n, page.len());
    }
    let pg_took = pg_started.elapsed();
    eprintln!(
        "raw: {} hashes, {} counters: SCAN+HGETALL {redis_took:?}, INSERT in pages of 1000 {pg_took:?}",
        CUSTOMERS,
        rows.len()
    );

    let mut flags = usage_flags(&config);
    flags[3] = "15s".into();
    let op = env
        .start_operator_with(Backends {
            extra_args: flags,
            ..Backends::default()
        })
        .await;
    wait_rollups(&op, 2).await;
    let log = std::fs::read_to_string(&op.log_path).unwrap_or_default();
    for line in log.lines().filter(|l| l.contains("usage rolled up")) {
        eprintln!("operator: {line}");
    }
    let total: i64 = sqlx::query_scalar("SELECT sum(requests)::bigint FROM usage_daily")
        .fetch_one(&env.db)
        .await
        .expect("sum");
    assert_eq!(total, (CUSTOMERS * 10) as i64);
}

#[tokio::test]
async fn a_new_field_in_a_confirmed_days_hash_keeps_its_lowered_ttl() {
    let env = TestEnv::new("usage-ttl-nx").await;
    let config = env.gateway_config();
    let quota = json!({"plan": "pro", "monthlyRequests": 1_000_000, "requestsPerSecond": 100_000});
    let key = env.put_gateway_key(&["alpha", "beta"], Some(quota)).await;
    let gw = env.start_gateway(&config).await;
    let r = check(&gw, &key.key, "/v1/alpha/x").await;
    assert_eq!(r.status, 200, "{r:?}");
    let (mut conn, hash) = todays_usage_hash(&config, &key.customer_id).await;
    let ttl = |mut conn: redis::aio::MultiplexedConnection| {
        let hash = hash.clone();
        async move {
            redis::cmd("TTL")
                .arg(&hash)
                .query_async::<i64>(&mut conn)
                .await
                .expect("TTL")
        }
    };
    assert!(
        ttl(conn.clone()).await > m3o_platform_contract::usage::CONFIRMED_RETENTION_SECS,
        "a new day's hash gets the unconfirmed retention"
    );
    // As the operator confirms a day (`EXPIRE .. LT`), then a request adds a new field
    // (another API): its script must not lengthen the TTL again.
    let confirmed = m3o_platform_contract::usage::CONFIRMED_RETENTION_SECS;
    let _: i64 = redis::cmd("EXPIRE")
        .arg(&hash)
        .arg(confirmed)
        .arg("LT")
        .query_async(&mut conn)
        .await
        .expect("EXPIRE LT");
    let r = check(&gw, &key.key, "/v1/beta/x").await;
    assert_eq!(r.status, 200, "{r:?}");
    let fields: BTreeMap<String, i64> = redis::cmd("HGETALL")
        .arg(&hash)
        .query_async(&mut conn)
        .await
        .expect("HGETALL");
    let beta = m3o_platform_contract::usage::usage_field(&key.key_id, "beta");
    assert_eq!(fields.get(&beta), Some(&1), "{fields:?}");
    let left = ttl(conn.clone()).await;
    assert!(0 < left && left <= confirmed, "TTL lengthened to {left}");
    gw.stop().await;
}
