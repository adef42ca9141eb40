//! Per-object cost independent of the fleet: every per-object query is served by an
//! index on tables of 10k customers, subscriptions and (mostly revoked) keys.

use m3o_controllers::store::hot_queries::{self, Arg};

use crate::support::TestEnv;

/// Fills the test schema with `n` customers, one subscription each and three keys each
/// (two revoked, one live with an expiry), in the shape the operator writes.
async fn fleet(env: &TestEnv, n: i64) {
    let statements = [
        "INSERT INTO customers (id, email, status, k8s_namespace, k8s_name, k8s_uid, deleted_at) \
         SELECT md5('c' || i)::uuid, 'c' || i || '@example.com', 'active', 'ns-' || (i % 50), \
                'c' || i, 'uid-' || i, CASE WHEN i % 10 = 0 THEN now() END \
         FROM generate_series(1, $1) AS i",
        "INSERT INTO subscriptions (id, customer_id, plan, monthly_requests, requests_per_second, \
                status, k8s_namespace, k8s_name, k8s_uid, cancelled_at) \
         SELECT md5('s' || i)::uuid, md5('c' || i)::uuid, 'pro', 1000, 5, 'active', \
                'ns-' || (i % 50), 's' || i, 'uid-s' || i, CASE WHEN i % 10 = 0 THEN now() END \
         FROM generate_series(1, $1) AS i",
        "INSERT INTO api_keys (id, customer_id, key_hash, key_prefix, scopes, status, expires_at, \
                k8s_namespace, k8s_name, k8s_uid, revoked_at) \
         SELECT md5('k' || i || '-' || g)::uuid, md5('c' || i)::uuid, md5('h' || i || '-' || g) || md5('x' || i || g), \
                'm3o_abcd', ARRAY['*'], CASE WHEN g < 3 THEN 'revoked' ELSE 'active' END, \
                now() + (i || ' minutes')::interval, 'ns-' || (i % 50), 'k' || i, 'uid-k' || i, \
                CASE WHEN g < 3 THEN now() END \
         FROM generate_series(1, $1) AS i, generate_series(1, 3) AS g",
        "ANALYZE customers",
        "ANALYZE subscriptions",
        "ANALYZE api_keys",
    ];
    for sql in statements {
        let query = sqlx::query(sql);
        let query = if sql.contains("$1") {
            query.bind(n)
        } else {
            query
        };
        query
            .execute(&env.db)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

fn literal(arg: Arg) -> String {
    match arg {
        Arg::Namespace => "'ns-7'".into(),
        Arg::Name => "'c357'".into(),
        Arg::Id => "md5('c357')::uuid".into(),
        Arg::Hash => "md5('h357-3') || md5('x3573')".into(),
        Arg::Email => "'c357@example.com'".into(),
        Arg::Time => "now() + interval '5 minutes'".into(),
        Arg::Namespaces => {
            "(SELECT array_agg('ns-' || (i % 50)) FROM generate_series(300, 799) i)".into()
        }
        Arg::Names => "(SELECT array_agg('c' || i) FROM generate_series(300, 799) i)".into(),
    }
}

/// Every plan node type of an EXPLAIN (FORMAT JSON) plan, with the relation it reads.
fn nodes(plan: &serde_json::Value, out: &mut Vec<(String, String)>) {
    if let Some(kind) = plan["Node Type"].as_str() {
        let relation = plan["Relation Name"].as_str().unwrap_or_default();
        out.push((kind.to_owned(), relation.to_owned()));
    }
    for child in plan["Plans"].as_array().into_iter().flatten() {
        nodes(child, out);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_per_object_query_uses_an_index_at_10k_rows() {
    let env = TestEnv::new("explain").await;
    fleet(&env, 10_000).await;
    let mut seq_scans = Vec::new();
    let queries = hot_queries::all();
    assert!(
        queries.len() >= 10,
        "the registry lists the store's lookups"
    );
    for q in queries {
        let mut sql = q.sql.clone();
        // Highest first, so $1 does not match the start of $10.
        for (i, arg) in q.args.iter().enumerate().rev() {
            sql = sql.replace(&format!("${}", i + 1), &literal(*arg));
        }
        let plan: serde_json::Value = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {sql}"))
            .fetch_one(&env.db)
            .await
            .unwrap_or_else(|e| panic!("{}: {sql}: {e}", q.name));
        let mut found = Vec::new();
        nodes(&plan[0]["Plan"], &mut found);
        assert!(!found.is_empty(), "{}: no plan read", q.name);
        for (kind, relation) in found {
            if kind == "Seq Scan" {
                seq_scans.push(format!(
                    "{} scans {relation} sequentially:\n{plan:#}",
                    q.name
                ));
            }
        }
    }
    assert!(seq_scans.is_empty(), "{}", seq_scans.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_resync_works_past_the_4_mib_message_limit() {
    let env = TestEnv::new("big-prefix").await;
    // 3,000 keys nothing owns, 1.6 KB each: 4.8 MB, past gRPC's 4 MiB in one response.
    let value = "x".repeat(1600);
    let mut kv = env.etcd.kv_client();
    for i in 0..3_000 {
        kv.put(
            format!("{}/stray/{i:05}", env.etcd_prefix),
            value.as_str(),
            None,
        )
        .await
        .expect("put");
    }
    let _op = env.start_operator().await;
    let lou = env.ready_customer("lou").await;
    crate::support::eventually(
        "the resync to prune all 3,000 stray keys",
        std::time::Duration::from_secs(120),
        || async {
            let keys = env.etcd_keys().await;
            (keys.len() == 1).then_some(keys)
        },
    )
    .await;
    assert!(
        env.etcd_json(&m3o_platform_contract::customer_key(&lou))
            .await
            .is_some(),
        "the owned key stays"
    );
}
