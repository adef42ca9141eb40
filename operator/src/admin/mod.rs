//! Admin commands: `inspect` (one resource across every system) and `audit` (the whole
//! fleet). Both only read: Postgres through read-only transactions, etcd ranges, Redis
//! `XREVRANGE`, Kubernetes gets and lists.

pub mod audit;
pub mod compare;
mod events;
pub mod inspect;
pub mod uninstall;
pub mod usage;

use std::time::Duration;

use m3o_connect::redis::RedisArgs;
use m3o_controllers::platform::PlatformConfig;
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use sqlx::PgPool;

use crate::cli::BackendArgs;
use crate::startup::{self, StartupError};

const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// A part of a report that could not be read (its backend down) says why instead.
#[derive(Serialize, Debug)]
#[serde(untagged)]
pub enum Section<T> {
    Read(T),
    Unavailable { error: String },
}

impl<T> Section<T> {
    fn from_result<E: std::fmt::Display>(result: Result<T, E>) -> Self {
        match result {
            Ok(v) => Self::Read(v),
            Err(e) => Self::Unavailable {
                error: e.to_string(),
            },
        }
    }
}

/// The read-only connections of an admin command.
pub struct Backends {
    pub kube: kube::Client,
    pub db: PgPool,
    pub stream_prefix: String,
    /// etcd; an unreachable one is reported in the output rather than failing `inspect`.
    pub platform: Result<PlatformConfig, String>,
}

impl Backends {
    pub async fn connect(args: &BackendArgs) -> Result<Self, StartupError> {
        let db = startup::database_read_only(
            args.database.database_url.as_deref(),
            &args.database.database_schema,
            4,
        )
        .await?;
        let kube = startup::kube(args.kubeconfig.as_deref()).await?;
        let platform = startup::etcd(&args.etcd).await.map_err(|e| e.to_string());
        Ok(Self {
            kube,
            db,
            stream_prefix: args.stream_prefix.clone(),
            platform,
        })
    }

    /// etcd, or the one-line error of connecting to it.
    pub fn platform(&self) -> Result<&PlatformConfig, StartupError> {
        self.platform.as_ref().map_err(|e| StartupError(e.clone()))
    }
}

/// A Redis connection for reading streams, or why there is none (Redis being down is
/// part of what `inspect` reports, not a reason to fail).
async fn redis(args: &RedisArgs) -> Result<MultiplexedConnection, String> {
    let target = startup::redact(args.url().map_err(|e| e.to_string())?);
    let client = args.client().map_err(|e| e.to_string())?;
    let connect = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok::<_, redis::RedisError>(conn)
    };
    match tokio::time::timeout(REDIS_TIMEOUT, connect).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(format!("--redis-url: cannot connect to {target}: {e}")),
        Err(_) => Err(format!(
            "--redis-url: cannot connect to {target}: no answer within {}s",
            REDIS_TIMEOUT.as_secs()
        )),
    }
}

/// Prints a report as pretty JSON.
fn print_json(report: &impl Serialize) -> Result<(), StartupError> {
    let text = serde_json::to_string_pretty(report)
        .map_err(|e| StartupError(format!("cannot encode the report: {e}")))?;
    println!("{text}");
    Ok(())
}
