//! PostgreSQL, the system of record: connection, migrations, and one module per table.
//!
//! One executor style: a function that locks or writes takes `&mut PgConnection` (it
//! belongs in the caller's transaction); a plain read takes any executor
//! (`E: sqlx::PgExecutor`: the pool, or `&mut *tx` inside a transaction); only what
//! opens a transaction (`fence::begin_write`) or scans outside one takes the pool. Statuses are
//! written with the M3O strings of the `m3o_crds` state enums, never spelled here.

pub mod api_keys;
pub mod customers;
pub mod fence;
pub mod hot_queries;
pub mod orphans;
pub mod resync;
pub mod subscriptions;

use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// The migrations under `migrations/` at the repository root, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Errors of connecting to and preparing the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreSetupError {
    #[error("invalid database URL: {0}")]
    Url(#[source] sqlx::Error),
    #[error("invalid schema name {0:?}: use lowercase letters, digits and _ (at most 63)")]
    Schema(String),
    #[error("cannot connect: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot create schema: {0}")]
    CreateSchema(#[source] sqlx::Error),
    #[error("schema {0:?} has no operator tables (wrong --database-schema, or never migrated)")]
    NotMigrated(String),
    #[error("migration failed: {0}")]
    Migrate(#[source] MigrateError),
    #[error("{0}")]
    Rollback(String),
}

/// A schema name is spliced into SQL as an identifier, so it is checked strictly.
pub fn valid_schema_name(schema: &str) -> bool {
    let mut chars = schema.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && schema.len() <= 63
}

/// Server-side settings of every connection. The keepalives let Postgres notice a
/// client host that vanished (no FIN/RST) in about a minute instead of hours; the
/// timeouts bound a statement, or a transaction left open by a hung client, so that
/// none can hold locks forever (the writer fence also terminates a replaced writer's
/// sessions at once, see [`fence`]).
const SESSION_SETTINGS: [(&str, &str); 5] = [
    ("tcp_keepalives_idle", "30"),
    ("tcp_keepalives_interval", "10"),
    ("tcp_keepalives_count", "3"),
    ("statement_timeout", "60s"),
    ("idle_in_transaction_session_timeout", "120s"),
];

/// Opens a pool whose connections resolve unqualified table names in `schema`. Its
/// connections share an application_name unique to this pool
/// (`m3o-operator:<random>`), by which the writer fence finds them.
pub async fn connect(
    url: &str,
    schema: &str,
    max_connections: u32,
) -> Result<PgPool, StoreSetupError> {
    let pool = open_pool(url, schema, max_connections, &[]).await?;
    // CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema
    // exists, so it is only run when it does not: a role that owns just its schema
    // (created by an admin) needs no database privilege.
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&pool)
            .await
            .map_err(StoreSetupError::Connect)?;
    if !exists {
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .execute(&pool)
            .await
            .map_err(StoreSetupError::CreateSchema)?;
    }
    Ok(pool)
}

/// Opens a pool for readers such as `inspect` and `audit`: every transaction is read
/// only (the server refuses any write), nothing is created and no migration runs, so
/// credentials with SELECT alone suffice. Fails when `schema` has no operator tables.
pub async fn connect_read_only(
    url: &str,
    schema: &str,
    max_connections: u32,
) -> Result<PgPool, StoreSetupError> {
    let read_only = [("default_transaction_read_only", "on")];
    let pool = open_pool(url, schema, max_connections, &read_only).await?;
    let migrated: bool = sqlx::query_scalar("SELECT to_regclass('customers') IS NOT NULL")
        .fetch_one(&pool)
        .await
        .map_err(StoreSetupError::Connect)?;
    if !migrated {
        return Err(StoreSetupError::NotMigrated(schema.to_owned()));
    }
    Ok(pool)
}

/// A pool with the session settings and an application_name unique to it.
async fn open_pool(
    url: &str,
    schema: &str,
    max_connections: u32,
    settings: &[(&str, &str)],
) -> Result<PgPool, StoreSetupError> {
    if !valid_schema_name(schema) {
        return Err(StoreSetupError::Schema(schema.to_owned()));
    }
    let options: PgConnectOptions = url.parse().map_err(StoreSetupError::Url)?;
    let app = format!(
        "m3o-operator:{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let options = options
        .options(
            [("search_path", schema)]
                .iter()
                .chain(&SESSION_SETTINGS)
                .chain(settings)
                .copied(),
        )
        .application_name(&app);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(StoreSetupError::Connect)
}

/// Rollback policy (README, "Upgrade and roll back"): a release's migrations are
/// backward compatible with the previous minor release's binary (additive only: new
/// tables, nullable or defaulted columns, indexes; a drop or rename waits two releases).
/// So a binary may run on a schema whose extra applied versions are all newer than the
/// newest it knows (a rollback after an upgrade). An unknown version older than that is
/// a schema from another branch: refused.
/// `known`: this binary's versions; `applied`: the database's. Returns the newer ones.
pub fn newer_applied(known: &[i64], applied: &[i64]) -> Result<Vec<i64>, String> {
    let newest = known.iter().copied().max().unwrap_or(0);
    let unknown: Vec<i64> = applied
        .iter()
        .copied()
        .filter(|v| !known.contains(v))
        .collect();
    match unknown.iter().find(|v| **v < newest) {
        Some(v) => Err(format!(
            "the schema has migration {v}, which this binary does not know and is older than its newest ({newest}): it comes from another build; refusing to run on it"
        )),
        None => Ok(unknown),
    }
}

/// Applies pending migrations; safe to run concurrently (sqlx takes an advisory lock).
/// Per [`newer_applied`], runs on a schema a newer release has migrated further.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreSetupError> {
    let has_table: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .map_err(StoreSetupError::Connect)?;
    let applied: Vec<i64> = if has_table {
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
            .map_err(StoreSetupError::Connect)?
    } else {
        Vec::new()
    };
    let known: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    let newer = newer_applied(&known, &applied).map_err(StoreSetupError::Rollback)?;
    if newer.is_empty() {
        return MIGRATOR.run(pool).await.map_err(StoreSetupError::Migrate);
    }
    tracing::warn!(
        ?newer,
        "the schema has migrations newer than this binary (a rollback): running on it, as the rollback policy allows"
    );
    let mut migrator = sqlx::migrate!("../migrations");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await.map_err(StoreSetupError::Migrate)
}

/// True for a deadlock or serialization failure (40P01, 40001): two transactions met,
/// one was rolled back, and a retry goes through.
pub fn is_serialization_failure(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "40P01" || code == "40001")
}

/// True when the error means the database could not be reached (as opposed to a
/// statement the database refused), so status says `DatabaseUnavailable`.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    // Protocol: the peer hung up or did not speak PostgreSQL. A proxy or load balancer
    // that accepts and then closes shows as one: with TLS support built in, the first
    // exchange is the SSLRequest, whose empty answer reads as "unexpected response 0x00".
    matches!(
        err,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
    ) || err
        .as_database_error()
        .and_then(|e| e.code())
        // class 08: connection exception; 57P: operator intervention (shutdown, restart)
        .is_some_and(|code| code.starts_with("08") || code.starts_with("57P"))
}

/// Name of the violated unique index, if the error is a unique violation.
pub fn unique_violation(err: &sqlx::Error) -> Option<String> {
    let db = err.as_database_error()?;
    (db.code().as_deref() == Some("23505")).then(|| db.constraint().unwrap_or_default().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener that accepts and hangs up at once (a proxy whose backend is gone):
    /// unavailable, with TLS tried first (`prefer`, the default) or not.
    #[tokio::test]
    async fn a_peer_that_hangs_up_is_unavailable() {
        use sqlx::Connection;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                // Reads the first message (the SSLRequest, or the startup), then hangs up.
                let mut first = [0u8; 8];
                let _ = tokio::io::AsyncReadExt::read_exact(&mut socket, &mut first).await;
                drop(socket);
            }
        });
        for mode in ["prefer", "require", "disable"] {
            let url = format!("postgres://u@127.0.0.1:{port}/db?sslmode={mode}");
            let err = sqlx::PgConnection::connect(&url).await.unwrap_err();
            assert!(is_unavailable(&err), "{mode}: {err:?}");
        }
    }

    #[test]
    fn a_schema_migrated_further_by_a_newer_release_is_accepted_and_a_foreign_one_is_not() {
        let known = [1, 2, 3];
        assert_eq!(newer_applied(&known, &[]), Ok(vec![]));
        assert_eq!(newer_applied(&known, &[1, 2]), Ok(vec![]));
        assert_eq!(newer_applied(&known, &[1, 2, 3, 4, 5]), Ok(vec![4, 5]));
        assert_eq!(newer_applied(&known, &[1, 2, 4]), Ok(vec![4]));
        let foreign = newer_applied(&[1, 2, 5], &[1, 2, 3, 5]).unwrap_err();
        assert!(foreign.contains("migration 3"), "{foreign}");
    }

    #[test]
    fn schema_names_are_checked() {
        for ok in ["m3o", "_t1", "test_abc_123"] {
            assert!(valid_schema_name(ok), "{ok}");
        }
        for bad in ["", "1abc", "M3O", "a-b", "a\"b", "a;drop", &"x".repeat(64)] {
            assert!(!valid_schema_name(bad), "{bad}");
        }
    }
}
