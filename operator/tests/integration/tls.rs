//! Every backend on TLS with least-privilege users (README: Secure connections): private
//! TLS-only PostgreSQL, Redis and etcd with client certificates, the operator's
//! PostgreSQL role owning only its schema, its etcd role limited to its prefix, its
//! Redis ACL user limited to the stream keys and the relay's commands.

use std::time::Duration;

use m3o_events::consumer::read_all;
use serde_json::json;

use crate::apikey::{key_id, key_spec};
use crate::support::gateway::check;
use crate::support::tls_backends::{Backend, OPERATOR_ROLE, OPERATOR_USER, TlsBackends};
use crate::support::{TestEnv, dedupe, eventually, exit_log};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_and_a_key_reach_every_backend_over_tls_as_least_privileged_users() {
    let mut env = TestEnv::new("tls").await;
    let tls = TlsBackends::start(&env).await;
    let can_create: bool =
        sqlx::query_scalar("SELECT has_database_privilege($1, current_database(), 'CREATE')")
            .bind(OPERATOR_ROLE)
            .fetch_one(&tls.admin_db)
            .await
            .expect("privilege check");
    assert!(
        !can_create,
        "the operator's role has no CREATE on the database"
    );
    // The helpers read the private servers from here on.
    env.db = tls.admin_db.clone();
    env.etcd = tls.admin_etcd.clone();

    // It also rolls up the gateway's usage counters (README: the usage grant).
    let mut backends = tls.servers.operator_backends(None);
    let gateway_config = tls.servers.gateway_config(&env);
    backends.extra_args.extend([
        "--usage-redis-prefix".to_owned(),
        gateway_config.redis_prefix.clone(),
        "--usage-interval".to_owned(),
        "1s".to_owned(),
    ]);
    let _op = env.start_operator_with(backends).await;
    env.customer_ready("alice", "Active").await;
    let customer = env.row("alice").await.expect("row in the private database");
    let entry = env
        .etcd_json(&m3o_platform_contract::customer_key(customer.id))
        .await
        .expect("customer entry in the private etcd");
    assert_eq!(entry["status"], json!("active"));

    env.apply_apikey("ci", key_spec(json!({}))).await;
    let id = key_id(&env.wait_apikey("ci", "True", "Provisioned").await);
    let key = env
        .secret_key("ci-api-key")
        .await
        .expect("key in the Secret");
    let entry = env
        .gateway_entry(&key)
        .await
        .expect("key entry in the private etcd");
    assert_eq!(entry["keyId"], json!(id));
    assert_eq!(entry["status"], json!("active"));

    let stream = m3o_events::stream_key(&env.stream_prefix, m3o_events::customers::TOPIC);
    let types = eventually(
        "Created and GenerateKey on the private stream",
        Duration::from_secs(30),
        || async {
            let mut conn = tls
                .admin_redis
                .get_multiplexed_async_connection()
                .await
                .ok()?;
            let events = dedupe(read_all(&mut conn, &stream).await.ok()?);
            let types: Vec<String> = events.into_iter().map(|e| e.event_type).collect();
            (types.len() >= 2).then_some(types)
        },
    )
    .await;
    assert_eq!(types, ["EventTypeCreated", "EventTypeGenerateKey"]);

    // The gateway reads the same etcd over TLS as its own read-mostly user, and keeps
    // its counters in the same Redis over TLS.
    let gateway = env.start_gateway(&gateway_config).await;
    let reply = check(&gateway, &key, "/v1/helloworld/call").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("X-M3O-Key-Id"), Some(id.as_str()));
    eventually(
        "the request rolled up by the least-privileged operator user",
        Duration::from_secs(30),
        || async {
            let n: Option<i64> = sqlx::query_scalar(
                "SELECT sum(requests)::bigint FROM usage_daily WHERE customer_id = $1",
            )
            .bind(customer.id)
            .fetch_one(&env.db)
            .await
            .ok()?;
            (n == Some(1)).then_some(())
        },
    )
    .await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_that_does_not_verify_is_a_one_line_error_naming_the_flag() {
    let env = TestEnv::new("tls-ca").await;
    let tls = TlsBackends::start(&env).await;
    let postgres_by_other_name = crate::support::Backends {
        database_url: Some(tls.servers.database_url_via("127.0.0.2")),
        ..tls.servers.operator_backends(None)
    };
    for (case, backends, flag, reason) in [
        (
            "PostgreSQL, another CA",
            tls.servers.operator_backends(Some(Backend::Postgres)),
            "--database-url",
            "UnknownIssuer",
        ),
        (
            "PostgreSQL, verify-full, another name",
            postgres_by_other_name,
            "--database-url",
            "not valid for name \"127.0.0.2\"",
        ),
        (
            "Redis, another CA",
            tls.servers.operator_backends(Some(Backend::Redis)),
            "--redis-url",
            "UnknownIssuer",
        ),
        (
            "etcd, another CA",
            tls.servers.operator_backends(Some(Backend::Etcd)),
            "--etcd-endpoints",
            "UnknownIssuer",
        ),
    ] {
        let op = env.spawn_operator_with(backends);
        let (status, log) = exit_log(op, case).await;
        assert!(!status.success(), "{case}: exits non-zero");
        let errors: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("m3o-operator: error:"))
            .collect();
        let [line] = errors[..] else {
            panic!("{case}: one error line:\n{log}");
        };
        assert!(
            line.starts_with(&format!("m3o-operator: error: {flag}: cannot connect")),
            "{case}: names {flag}: {line}"
        );
        assert!(line.contains(reason), "{case}: says why ({reason}): {line}");
        assert!(
            !line.contains(&tls.servers.password()),
            "{case}: no password: {line}"
        );
        eprintln!("{case}: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_operator_user_is_refused_outside_its_grants() {
    let env = TestEnv::new("tls-grants").await;
    let tls = TlsBackends::start(&env).await;

    // etcd: its prefix and the fence key, nothing else.
    let mut etcd = tls.servers.operator_etcd(&env.etcd_prefix).await;
    etcd.put(format!("{}/probe", env.etcd_prefix), "x", None)
        .await
        .expect("write inside the prefix");
    for fence in ["writer-epoch", "writer-epoch.shard-a"] {
        etcd.put(format!("{}.{fence}", env.etcd_prefix), "0", None)
            .await
            .expect("write a fence key");
    }
    for outside in [
        "/elsewhere".to_owned(),
        format!("{}-other/x", env.etcd_prefix),
        format!("{}x", env.etcd_prefix),
        format!("{}.other", env.etcd_prefix),
    ] {
        let err = etcd
            .put(outside.as_str(), "x", None)
            .await
            .expect_err("a write outside the prefix is refused");
        assert!(
            err.to_string().contains("permission denied"),
            "{outside}: {err}"
        );
    }

    // A token etcd no longer accepts is renewed: changing a user's password drops its
    // tokens (as their expiry does, 5 min idle by default).
    let mut stale = tls
        .servers
        .operator_etcd_without_token_refresh(&env.etcd_prefix)
        .await;
    let mut admin = tls.admin_etcd.clone();
    admin
        .user_change_password(OPERATOR_USER, tls.servers.password())
        .await
        .expect("same password again");
    let err = stale
        .put(format!("{}/probe", env.etcd_prefix), "y", None)
        .await
        .expect_err("the dropped token is refused");
    assert!(err.to_string().contains("invalid auth token"), "{err}");
    etcd.put(format!("{}/probe", env.etcd_prefix), "z", None)
        .await
        .expect("the operator's client logs in again");

    // Redis: XADD on the stream keys only, and no other command.
    let redis = tls.servers.operator_redis();
    let mut conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis as the operator's user");
    let stream = format!("{}customers", env.stream_prefix);
    redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("f")
        .arg("v")
        .query_async::<String>(&mut conn)
        .await
        .expect("XADD on a stream key");
    for refused in [
        redis::cmd("XADD")
            .arg("other:customers")
            .arg("*")
            .arg("f")
            .arg("v")
            .clone(),
        redis::cmd("SET").arg(&stream).arg("x").clone(),
        redis::cmd("XRANGE").arg(&stream).arg("-").arg("+").clone(),
        redis::cmd("FLUSHALL").clone(),
    ] {
        let err = refused
            .query_async::<redis::Value>(&mut conn)
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Some("NOPERM"), "{err}");
    }

    // PostgreSQL: its schema, but no new schema in the database.
    let operator_db = sqlx::PgPool::connect(
        &tls.servers
            .operator_backends(None)
            .database_url
            .expect("url"),
    )
    .await
    .expect("postgres as the operator's role");
    let err = sqlx::query("CREATE SCHEMA elsewhere")
        .execute(&operator_db)
        .await
        .expect_err("no CREATE on the database");
    assert!(err.to_string().contains("permission denied"), "{err}");
    sqlx::query(&format!("CREATE TABLE {}.probe (id int)", env.schema))
        .execute(&operator_db)
        .await
        .expect("a table in its own schema");
}
