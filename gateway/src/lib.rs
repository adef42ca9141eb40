//! m3o-gateway-auth: the gateway side of the M3O platform config (docs/gateway.md).
//! Forward-auth checks answered from an in-memory index of the operator's etcd prefix,
//! quotas and usage shared by all replicas through Redis, and each replica's applied
//! revision reported back for the operator's `GatewaySynced` condition.

pub mod decision;
pub mod entries;
pub mod follow;
pub mod http;
pub mod index;
pub mod limits;
pub mod metrics;
pub mod nginx;
pub mod readiness;
pub mod report;
pub mod settings;
pub mod usage;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::follow::IndexState;
use crate::http::Checker;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::settings::RunArgs;

/// A start-up failure: one line naming the flag to fix.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {message}")]
pub struct StartError {
    pub flag: &'static str,
    pub message: String,
}

fn start_error(flag: &'static str, message: impl ToString) -> StartError {
    StartError {
        flag,
        message: message.to_string(),
    }
}

/// Connects to etcd until it answers (or `shutdown`: `None`), backing off to 10 s.
async fn connect_retrying(
    endpoints: &[String],
    options: etcd_client::ConnectOptions,
    shutdown: &CancellationToken,
) -> Option<etcd_client::Client> {
    let mut delay = std::time::Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        match etcd_client::Client::connect(endpoints, Some(options.clone())).await {
            Ok(client) => {
                tracing::info!("connected to etcd");
                return Some(client);
            }
            Err(err) => tracing::warn!(%err, "cannot connect to etcd yet; retrying"),
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(10));
    }
}

/// A running gateway: its bound addresses and tasks.
pub struct Gateway {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub index: Arc<IndexState>,
    pub readiness: Arc<readiness::Gate>,
    shutdown: CancellationToken,
    /// Cancelled once the servers have stopped: the report then says so.
    withdraw: CancellationToken,
    /// The forward-auth and ops servers.
    servers: JoinSet<()>,
    /// Following etcd and reporting.
    tasks: JoinSet<()>,
}

impl Gateway {
    /// Stops serving, then withdraws this replica's report, saying it has stopped (in
    /// that order: the operator stops counting it only once no check is answered).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.servers.join_next().await.is_some() {}
        self.withdraw.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// The SIGTERM path: fails `/readyz` at once, keeps answering checks for `delay`
    /// (the time a Service, kube-proxy or an ingress takes to stop sending new
    /// connections here), then closes gracefully: in-flight checks are answered.
    pub async fn drain(self, delay: std::time::Duration) {
        self.readiness.start_draining();
        tracing::info!(
            ?delay,
            "draining: /readyz fails, checks are still answered until the delay ends"
        );
        tokio::time::sleep(delay).await;
        self.stop().await;
    }

    /// Resolves when any task ends (a server failed) or `stop` was called elsewhere.
    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.servers.join_next() => {}
            _ = self.tasks.join_next() => {}
        }
    }
}

/// Validates the configuration, binds both addresses and starts following etcd. Returns
/// at once: checks answer 503 until the first list has loaded. etcd and Redis may be
/// down at start (the index loads when etcd answers; limits follow the fail mode).
pub async fn start(args: RunArgs) -> Result<Gateway, StartError> {
    let setting = |e: m3o_connect::SettingError| start_error(e.flag, e.message);
    let endpoints = args.etcd.endpoints().map_err(setting)?;
    let prefix = args
        .etcd
        .prefix()
        .map_err(setting)?
        .trim_end_matches('/')
        .to_owned();
    if !args.path_prefix.is_empty() && args.uri_source != settings::UriSource::Envoy {
        return Err(start_error(
            "--path-prefix",
            "only read with --uri-source=envoy (nginx and Traefik send the URI in a header)",
        ));
    }
    let limiter = if args.no_limits {
        None
    } else {
        if args.redis.connection.url().is_err() {
            return Err(start_error(
                "--redis-url",
                "required (or REDIS_URL; --no-limits to run without)",
            ));
        }
        let redis = args.redis.connection.client().map_err(setting)?;
        let breaker =
            limits::Breaker::new(args.redis_breaker_failures, args.redis_breaker_cooldown);
        let limiter = Limiter::new(
            redis,
            &args.redis.redis_prefix,
            args.redis_timeout,
            &args.usage_apis,
            breaker,
        )
        .map_err(|e| start_error("--redis-url", e))?;
        Some(limiter)
    };
    // A member cut off from its cluster must not keep the index looking fresh: every
    // request (the watch's progress answers included) needs a leader.
    let options = etcd_client::ConnectOptions::new()
        .with_require_leader(true)
        .with_connect_timeout(std::time::Duration::from_secs(3))
        .with_keep_alive(
            std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(2),
        );
    let options = args.etcd.connect_options(options).map_err(setting)?;
    // With an etcd user, connecting authenticates, which fails while etcd is down: only
    // a malformed endpoint is a start-up error; otherwise the gateway keeps trying in
    // the background and is not ready until its first list.
    let etcd = match etcd_client::Client::connect(&endpoints, Some(options.clone())).await {
        Ok(client) => Some(client),
        Err(e @ (etcd_client::Error::InvalidUri(_) | etcd_client::Error::InvalidArgs(_))) => {
            return Err(start_error("--etcd-endpoints", e));
        }
        Err(err) => {
            tracing::warn!(%err, "cannot connect to etcd yet; retrying (not ready until the platform config is listed)");
            None
        }
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| start_error("--listen", format!("cannot bind {}: {e}", args.listen)))?;
    let ops = TcpListener::bind(args.metrics_addr).await.map_err(|e| {
        start_error(
            "--metrics-addr",
            format!("cannot bind {}: {e}", args.metrics_addr),
        )
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| start_error("--listen", e))?;
    let metrics_addr = ops
        .local_addr()
        .map_err(|e| start_error("--metrics-addr", e))?;

    let replica = args
        .replica_id
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let index = Arc::new(IndexState::default());
    let bound = report::Bound {
        max_staleness: args.max_staleness,
        mode: args.stale_mode,
    };
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let withdraw = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut servers = JoinSet::new();
    {
        let (prefix, index, metrics, stop, withdraw) = (
            prefix.clone(),
            index.clone(),
            metrics.clone(),
            shutdown.clone(),
            withdraw.clone(),
        );
        let report_key = report::report_key(&prefix, &replica);
        tasks.spawn(async move {
            let etcd = match etcd {
                Some(client) => client,
                None => match connect_retrying(&endpoints, options, &stop).await {
                    Some(client) => client,
                    None => return,
                },
            };
            tokio::join!(
                follow::run(etcd.clone(), prefix, index.clone(), metrics, stop.clone()),
                report::run(etcd, report_key, index, bound, withdraw),
            );
        });
    }
    let readiness = Arc::new(readiness::Gate::new(limiter.clone()));
    if let Some(limiter) = limiter.clone() {
        // Detached: `tasks` are the servers, whose end `wait` reports.
        tokio::spawn(async move {
            // Once at start, so a wrong Redis user is one line in the log at once (and
            // /readyz keeps saying it on every probe).
            if let Err(err @ limits::Unavailable::Forbidden(_)) = limiter.verify().await {
                tracing::error!(
                    "--redis-url: {err}: not ready, and checks answer 503 whatever --rate-limit-fail-open says"
                );
            }
        });
    }
    let checker = Arc::new(Checker {
        index: index.clone(),
        limiter,
        metrics: metrics.clone(),
        uri_source: args.uri_source,
        path_prefix: args.path_prefix.clone(),
        fail_open: args.rate_limit_fail_open,
        limiter_log: limits::RareLog::default(),
        bound,
    });
    let stop = shutdown.clone();
    servers.spawn(async move {
        let served = axum::serve(listener, http::check_router(checker))
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(err) = served {
            tracing::error!(%err, "forward-auth server failed");
        }
    });
    let stop = shutdown.clone();
    let ops_app = http::ops_router(index.clone(), metrics, bound).layer(
        axum::middleware::from_fn_with_state(readiness.clone(), readiness::gate),
    );
    servers.spawn(async move {
        let served = axum::serve(ops, ops_app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(err) = served {
            tracing::error!(%err, "metrics server failed");
        }
    });
    tracing::info!(%addr, %metrics_addr, replica, prefix, max_staleness = ?bound.max_staleness, stale_mode = ?bound.mode, "m3o-gateway-auth listening");
    if bound.mode == settings::StaleMode::Serve {
        tracing::warn!(
            "--stale-mode=serve: a replica cut off from etcd keeps serving its snapshot, so GatewaySynced cannot confirm revocations"
        );
    }
    Ok(Gateway {
        addr,
        metrics_addr,
        index,
        readiness,
        shutdown,
        withdraw,
        servers,
        tasks,
    })
}
