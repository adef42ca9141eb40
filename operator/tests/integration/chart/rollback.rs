//! Rollback policy (README, "Upgrade and roll back"): after a newer release has
//! migrated the schema further (an extra applied migration this binary does not know,
//! and the additive change it made), this binary's `migrate` (the chart's hook Job)
//! succeeds and `run` starts and serves, as after `helm rollback` to the older image;
//! unless that release raised the schema's floor (`schema_compat`), when it refuses.

use crate::support::TestEnv;
use crate::support::cli::run;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_binary_migrates_and_serves_on_a_schema_a_newer_release_migrated() {
    let env = TestEnv::new("rollback").await;
    let op = env.start_operator().await;
    env.customer_ready("before", "Active").await;
    op.stop().await;

    // What a newer release leaves behind: an additive change and its version.
    let newer: i64 = 99_990_101_000_000;
    sqlx::query("ALTER TABLE customers ADD COLUMN IF NOT EXISTS newer_release_note text")
        .execute(&env.db)
        .await
        .expect("additive change");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, 'from a newer release', true, '\\x00'::bytea, 1)",
    )
    .bind(newer)
    .execute(&env.db)
    .await
    .expect("newer applied version");

    let (out, log) = migrate(&env).await;
    assert!(out.status.success(), "migrate on a newer schema: {log}");

    let op = env.start_operator().await;
    env.customer_ready("after", "Active").await;
    op.stop().await;

    // A newer release whose migration this binary cannot use raises the floor: the
    // older binary then refuses at once, with one line saying what to do.
    sqlx::query("UPDATE schema_compat SET oldest_binary_migration = $1")
        .bind(newer)
        .execute(&env.db)
        .await
        .expect("raise the floor");
    let (out, log) = migrate(&env).await;
    assert!(!out.status.success(), "migrate below the floor: {log}");
    assert!(
        log.contains(&format!("needs a binary that knows migration {newer}")),
        "{log}"
    );
}

/// `m3o-operator migrate` on the test's schema (the chart's hook Job): its exit and log.
async fn migrate(env: &TestEnv) -> (std::process::Output, String) {
    let out = run(
        env!("CARGO_BIN_EXE_m3o-operator"),
        &[
            "migrate",
            "--database-url",
            &env.database_url,
            "--database-schema",
            &env.schema,
        ],
        None,
    )
    .await;
    let log = crate::support::cli::text(&out);
    (out, log)
}
