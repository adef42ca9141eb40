//! Start-up checks: every backend is connected once before anything runs, and a
//! failure is one line that names the flag to fix.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, Resource};
use m3o_connect::SettingError;
use m3o_connect::etcd::EtcdArgs;
use m3o_connect::redis::RedisArgs;
use m3o_controllers::platform::PlatformConfig;
use m3o_crds::{ApiKey, Customer, Subscription};
use sqlx::PgPool;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A configuration or connection problem, printed as one line.
#[derive(Debug)]
pub struct StartupError(pub String);

impl fmt::Display for StartupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail(flag: &str, what: impl fmt::Display) -> StartupError {
    StartupError(format!("{flag}: {what}"))
}

/// An error with its sources, on one line (a TLS failure is often only in a source:
/// "transport error: ... invalid peer certificate: UnknownIssuer"). A source whose
/// text its parent already shows is skipped.
fn one_line(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
        source = cause.source();
    }
    line.replace(['\n', '\r'], " ")
}

async fn bounded<T, E: std::error::Error>(
    flag: &str,
    target: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, StartupError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(err)) => Err(fail(
            flag,
            format!("cannot connect to {target}: {}", one_line(&err)),
        )),
        Err(_) => Err(fail(
            flag,
            format!(
                "cannot connect to {target}: no answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// A URL with its password replaced, safe to print.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn required<'a>(value: Option<&'a str>, flag: &str, env: &str) -> Result<&'a str, StartupError> {
    value
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| fail(flag, format!("required (or set {env})")))
}

/// Connects to PostgreSQL and makes sure the schema exists.
pub async fn database(
    url: Option<&str>,
    schema: &str,
    max_connections: u32,
) -> Result<PgPool, StartupError> {
    database_with(url, schema, |url| {
        m3o_controllers::store::connect(url, schema, max_connections)
    })
    .await
}

/// Connects to PostgreSQL read only (admin commands): creates nothing, migrates nothing.
pub async fn database_read_only(
    url: Option<&str>,
    schema: &str,
    max_connections: u32,
) -> Result<PgPool, StartupError> {
    database_with(url, schema, |url| {
        m3o_controllers::store::connect_read_only(url, schema, max_connections)
    })
    .await
}

/// Checks the flags, then connects with `connect` within the start-up time bound.
async fn database_with<'a, F, Fut>(
    url: Option<&'a str>,
    schema: &str,
    connect: F,
) -> Result<PgPool, StartupError>
where
    F: FnOnce(&'a str) -> Fut,
    Fut: Future<Output = Result<PgPool, m3o_controllers::store::StoreSetupError>>,
{
    let url = required(url, "--database-url", "DATABASE_URL")?;
    if !m3o_controllers::store::valid_schema_name(schema) {
        return Err(fail(
            "--database-schema",
            format!("{schema:?} is not a valid schema name (lowercase letters, digits, _)"),
        ));
    }
    bounded("--database-url", &redact(url), connect(url)).await
}

/// Opens a Redis client and proves the server answers (TLS and ACL user included).
pub async fn redis(args: &RedisArgs) -> Result<redis::Client, StartupError> {
    let client = args.client().map_err(setting)?;
    let target = redact(args.url().map_err(setting)?);
    bounded("--redis-url", &target, async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    })
    .await?;
    Ok(client)
}

/// The Redis of the gateways' usage counters (`--usage-redis-url`, default
/// `--redis-url`, with the same TLS files), checked with a PING.
pub async fn usage_redis(
    args: &RedisArgs,
    usage: &crate::cli::UsageRunArgs,
) -> Result<redis::aio::ConnectionManager, StartupError> {
    let mut args = args.clone();
    let flag = match usage
        .usage_redis_url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
    {
        Some(url) => {
            args.redis_url = Some(url.to_owned());
            "--usage-redis-url"
        }
        None => "--redis-url",
    };
    let client = args
        .client()
        .map_err(|e| StartupError(format!("{flag}: {e}")))?;
    let target = redact(args.url().map_err(setting)?);
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    bounded(flag, &target, async {
        let mut conn = redis::aio::ConnectionManager::new_with_config(client, config).await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok::<_, redis::RedisError>(conn)
    })
    .await
}

/// Connects to the platform-config etcd (TLS and user included).
pub async fn etcd(args: &EtcdArgs) -> Result<PlatformConfig, StartupError> {
    let endpoints = args.endpoints().map_err(setting)?;
    let prefix = args.prefix().map_err(setting)?;
    let options = args
        .connect_options(PlatformConfig::connect_timeouts())
        .map_err(setting)?;
    bounded(
        "--etcd-endpoints",
        &endpoints.join(","),
        PlatformConfig::connect(&endpoints, prefix, options),
    )
    .await
}

fn setting(err: SettingError) -> StartupError {
    StartupError(err.to_string())
}

/// Builds the Kubernetes client and checks the API server and the CRDs.
pub async fn kube(kubeconfig: Option<&Path>) -> Result<Client, StartupError> {
    let flag = "--kubeconfig";
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| fail(flag, format!("cannot read {}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| fail(flag, format!("invalid kubeconfig {}: {e}", path.display())))?
        }
        None => Config::infer()
            .await
            .map_err(|e| fail(flag, format!("no kubeconfig and not in a cluster: {e}")))?,
    };
    let target = config.cluster_url.to_string();
    let client = Client::try_from(config)
        .map_err(|e| fail(flag, format!("invalid client configuration: {e}")))?;
    bounded(flag, &target, client.apiserver_version()).await?;
    Ok(client)
}

/// Fails unless every CRD is installed and listable.
pub async fn check_crds(client: &Client, namespace: Option<&str>) -> Result<(), StartupError> {
    check_crd::<Customer>(client, namespace).await?;
    check_crd::<Subscription>(client, namespace).await?;
    check_crd::<ApiKey>(client, namespace).await
}

async fn check_crd<K>(client: &Client, namespace: Option<&str>) -> Result<(), StartupError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + fmt::Debug
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(StartupError(format!(
            "CRD {}.{} is not installed: run `m3o-operator crds | kubectl apply --server-side -f -`",
            K::plural(&()),
            K::group(&())
        ))),
        Err(err) => Err(fail(
            "--kubeconfig",
            format!("cannot list {}: {err}", K::plural(&())),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://m3o:secret@db:5432/m3o"),
            "postgres://m3o:***@db:5432/m3o"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("redis://:pw@host:1"), "redis://:***@host:1");
    }
}
