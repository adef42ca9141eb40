//! `m3o-operator run` and `migrate`: start-up checks, then the long-running tasks,
//! stopped together on SIGTERM/SIGINT.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use m3o_controllers::metrics::Metrics;
use m3o_controllers::{Context, Settings, apikey, customer, plans, platform, store, subscription};
use m3o_events::relay::{Relay, RelayConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::{DatabaseArgs, RunArgs};
use crate::http::{self, HttpState};
use crate::startup::{self, StartupError};

/// Database connections of the operator process (reconcilers, relay, drift, scrapes).
const DB_POOL_SIZE: u32 = 16;

pub async fn migrate(args: DatabaseArgs) -> Result<(), StartupError> {
    let db = startup::database(args.database_url.as_deref(), &args.database_schema, 2).await?;
    store::migrate(&db)
        .await
        .map_err(|e| StartupError(format!("--database-url: {e}")))?;
    tracing::info!(schema = %args.database_schema, "migrations applied");
    Ok(())
}

pub async fn run(args: RunArgs) -> Result<(), StartupError> {
    if args.leader_election {
        return Err(StartupError(
            "--leader-election: not supported by this version yet; run a single replica".into(),
        ));
    }
    let catalog = plans::load(args.plans_file.as_deref()).map_err(|e| {
        let path = args
            .plans_file
            .as_deref()
            .unwrap_or(std::path::Path::new(""));
        StartupError(format!("--plans-file {}: {e}", path.display()))
    })?;
    let namespace = Some(args.namespace.trim().to_owned()).filter(|ns| !ns.is_empty());
    let schema = args.database.database_schema.clone();

    let db =
        startup::database(args.database.database_url.as_deref(), &schema, DB_POOL_SIZE).await?;
    store::migrate(&db)
        .await
        .map_err(|e| StartupError(format!("--database-url: {e}")))?;
    let redis = startup::redis(args.redis_url.as_deref()).await?;
    let platform = startup::etcd(&args.etcd_endpoints, &args.etcd_prefix).await?;
    let client = startup::kube(args.kubeconfig.as_deref()).await?;
    startup::check_crds(&client, namespace.as_deref()).await?;
    let listener = TcpListener::bind(args.metrics_addr).await.map_err(|e| {
        StartupError(format!(
            "--metrics-addr: cannot listen on {}: {e}",
            args.metrics_addr
        ))
    })?;

    let relay_config = RelayConfig {
        stream_prefix: args.stream_prefix.clone(),
        maxlen: args.stream_maxlen,
        ..RelayConfig::new(schema.clone())
    };
    let relay = Relay::new(db.clone(), redis, relay_config)
        .map_err(|e| StartupError(format!("--stream-prefix: {e}")))?;
    let settings = Settings {
        namespace: namespace.clone(),
        concurrency: args.concurrency,
        resync_interval: args.resync_interval,
        ..Settings::default()
    };
    let metrics = Arc::new(Metrics::new());
    let plans = plans::Plans::new(catalog);
    let ctx = Arc::new(
        Context::new(client, db.clone(), platform, settings, metrics.clone())
            .with_plans(plans.clone()),
    );
    let ready = Arc::new(AtomicBool::new(false));
    let http_state = HttpState {
        ready: ready.clone(),
        metrics,
        relay: relay.stats(),
        db,
    };

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let mut tasks = vec![
        tokio::spawn(relay.run(shutdown.clone())),
        tokio::spawn(platform::drift::run(ctx.clone(), shutdown.clone())),
        tokio::spawn(customer::run(
            ctx.clone(),
            shutdown.clone().cancelled_owned(),
        )),
        tokio::spawn(subscription::run(
            ctx.clone(),
            shutdown.clone().cancelled_owned(),
        )),
        tokio::spawn(apikey::run(ctx.clone(), shutdown.clone().cancelled_owned())),
    ];
    if let Some(path) = args.plans_file.clone() {
        let watcher = plans::watch_file(plans, path, ctx.metrics.clone(), shutdown.clone());
        tasks.push(tokio::spawn(watcher));
    }
    let server = tokio::spawn(http::serve(listener, http_state, shutdown.clone()));
    ready.store(true, Ordering::Relaxed);
    tracing::info!(
        namespace = namespace.as_deref().unwrap_or("<all>"),
        schema,
        "m3o-operator running"
    );

    for task in tasks {
        if let Err(err) = task.await {
            tracing::error!(%err, "a controller task failed");
        }
    }
    ready.store(false, Ordering::Relaxed);
    shutdown.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(%err, "HTTP server ended with an error"),
        Err(err) => tracing::warn!(%err, "HTTP server task failed"),
    }
    tracing::info!("m3o-operator stopped");
    Ok(())
}

/// Cancels `shutdown` on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn stop_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}
