//! `m3o-operator run` and `migrate`: start-up checks, then the long-running tasks
//! (only on the leader when `--leader-election` is on), stopped together on
//! SIGTERM/SIGINT.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use m3o_controllers::metrics::Metrics;
use m3o_controllers::{Context, Settings, apikey, customer, plans, platform, store, subscription};
use m3o_events::relay::{Relay, RelayConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::{DatabaseArgs, RunArgs};
use crate::http::{self, HttpState};
use crate::leader::{ElectionConfig, Elector, Ended, Fence};
use crate::parked_events;
use crate::startup::{self, StartupError};

/// Database connections of the operator process: one per reconcile that may run at
/// once (three kinds), plus the relay, the drift watcher, the fence and scrapes.
fn db_pool_size(concurrency: u16) -> u32 {
    (3 * u32::from(concurrency) + 8).min(128)
}

pub async fn migrate(args: DatabaseArgs) -> Result<(), StartupError> {
    let db = startup::database(args.database_url.as_deref(), &args.database_schema, 2).await?;
    store::migrate(&db)
        .await
        .map_err(|e| StartupError(format!("--database-url: {e}")))?;
    tracing::info!(schema = %args.database_schema, "migrations applied");
    Ok(())
}

/// What only the leader runs.
struct LeaderWork {
    ctx: Arc<Context>,
    relay: Relay,
    plans: plans::Plans,
    plans_file: Option<std::path::PathBuf>,
}

impl LeaderWork {
    fn spawn(self, stop: CancellationToken) -> Vec<JoinHandle<()>> {
        let ctx = self.ctx;
        let mut relay = self.relay;
        let parked = relay.parked_events(64);
        let mut tasks = vec![
            tokio::spawn(relay.run(stop.clone())),
            tokio::spawn(parked_events::report(ctx.clone(), parked)),
            tokio::spawn(platform::drift::run(ctx.clone(), stop.clone())),
            tokio::spawn(customer::run(ctx.clone(), stop.clone().cancelled_owned())),
            tokio::spawn(subscription::run(
                ctx.clone(),
                stop.clone().cancelled_owned(),
            )),
            tokio::spawn(apikey::run(ctx.clone(), stop.clone().cancelled_owned())),
        ];
        if let Some(path) = self.plans_file {
            tasks.push(tokio::spawn(plans::watch_file(
                self.plans,
                path,
                ctx.metrics.clone(),
                stop,
            )));
        }
        tasks
    }
}

pub async fn run(args: RunArgs) -> Result<(), StartupError> {
    let election = election_config(&args)?;
    let catalog = plans::load(args.plans_file.as_deref()).map_err(|e| {
        let path = args
            .plans_file
            .as_deref()
            .unwrap_or(std::path::Path::new(""));
        StartupError(format!("--plans-file {}: {e}", path.display()))
    })?;
    let namespace = Some(args.namespace.trim().to_owned()).filter(|ns| !ns.is_empty());
    let schema = args.backends.database.database_schema.clone();

    let db = startup::database(
        args.backends.database.database_url.as_deref(),
        &schema,
        db_pool_size(args.concurrency),
    )
    .await?;
    store::migrate(&db)
        .await
        .map_err(|e| StartupError(format!("--database-url: {e}")))?;
    let redis = startup::redis(args.backends.redis_url.as_deref()).await?;
    let platform = startup::etcd(&args.backends.etcd_endpoints, &args.backends.etcd_prefix).await?;
    let client = startup::kube(args.backends.kubeconfig.as_deref()).await?;
    startup::check_crds(&client, namespace.as_deref()).await?;
    let listener = TcpListener::bind(args.metrics_addr).await.map_err(|e| {
        StartupError(format!(
            "--metrics-addr: cannot listen on {}: {e}",
            args.metrics_addr
        ))
    })?;
    // Logged with the real port, so `--metrics-addr 127.0.0.1:0` is usable (tests do).
    let http_addr = listener
        .local_addr()
        .map_or_else(|_| args.metrics_addr.to_string(), |a| a.to_string());
    tracing::info!(addr = %http_addr, "HTTP server listening");

    let relay_config = RelayConfig {
        stream_prefix: args.backends.stream_prefix.clone(),
        maxlen: args.stream_maxlen,
        max_attempts: args.outbox_max_attempts,
        retention: args.outbox_retention,
        batch_max_bytes: args.outbox_batch_bytes,
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
        Context::new(
            client.clone(),
            db.clone(),
            platform,
            settings,
            metrics.clone(),
        )
        .with_plans(plans.clone()),
    );
    let ready = Arc::new(AtomicBool::new(false));
    let fencing = (db.clone(), schema.clone());
    let http_state = HttpState {
        watching: ctx.watching.clone(),
        ready: ready.clone(),
        metrics: metrics.clone(),
        relay: relay.stats(),
        db,
    };
    let work = LeaderWork {
        ctx,
        relay,
        plans,
        plans_file: args.plans_file.clone(),
    };

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let server = tokio::spawn(http::serve(listener, http_state, shutdown.clone()));
    // Ready means connected and able to work: a standby is ready to take over.
    ready.store(true, Ordering::Relaxed);
    tracing::info!(
        namespace = namespace.as_deref().unwrap_or("<all>"),
        schema,
        "m3o-operator running"
    );

    let outcome = match election {
        None => {
            metrics.leader.set(1);
            join(work.spawn(shutdown.clone()), None).await;
            Ok(())
        }
        Some(config) => {
            lead_while_elected(client, config, fencing, work, &metrics, &shutdown).await
        }
    };
    metrics.leader.set(0);
    ready.store(false, Ordering::Relaxed);
    shutdown.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(%err, "HTTP server ended with an error"),
        Err(err) => tracing::warn!(%err, "HTTP server task failed"),
    }
    tracing::info!("m3o-operator stopped");
    outcome
}

/// Stands by until elected, then runs the leader's work until shutdown or loss of the
/// lease. The work starts only once the Postgres fence is held (the previous leader has
/// stopped), and after a loss it is stopped before the lease can expire for others; the
/// process then exits so that its restart rejoins as a standby. On shutdown the work
/// stops first and the lease is released after, for an immediate hand-over.
async fn lead_while_elected(
    client: kube::Client,
    config: ElectionConfig,
    fencing: (sqlx::PgPool, String),
    work: LeaderWork,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<(), StartupError> {
    let margin = config
        .lease_duration
        .saturating_sub(config.renew_deadline)
        .saturating_sub(config.retry_period);
    let mut elector = Elector::new(client, config);
    if !elector.acquire(shutdown).await {
        return Ok(());
    }
    let (ended, tasks, fence) = {
        let hold = elector.hold(shutdown);
        tokio::pin!(hold);
        // Keep renewing while waiting for the predecessor to let go of the fence.
        let fence = tokio::select! {
            ended = &mut hold => return lost_before_starting(ended),
            fence = Fence::acquire(&fencing.0, &fencing.1, shutdown) => fence,
        };
        let fence = match fence {
            Ok(Some(fence)) => fence,
            Ok(None) => return Ok(()),
            Err(err) => {
                return Err(StartupError(format!(
                    "--database-url: cannot take the leader fence: {err}"
                )));
            }
        };
        metrics.leader.set(1);
        let leading = shutdown.child_token();
        let tasks = work.spawn(leading.clone());
        let ended = hold.await;
        leading.cancel();
        (ended, tasks, fence)
    };
    match ended {
        Ended::Shutdown => {
            join(tasks, None).await;
            fence.release().await;
            elector.release().await;
            Ok(())
        }
        Ended::Lost => {
            join(tasks, Some(margin)).await;
            fence.release().await;
            Err(StartupError(
                "lost the leader lease; exiting so that a restart rejoins as a standby".into(),
            ))
        }
    }
}

fn lost_before_starting(ended: Ended) -> Result<(), StartupError> {
    match ended {
        Ended::Shutdown => Ok(()),
        Ended::Lost => Err(StartupError(
            "lost the leader lease before starting; exiting to rejoin as a standby".into(),
        )),
    }
}

/// Waits for `tasks`, at most `limit`; tasks still running after it are aborted.
async fn join(tasks: Vec<JoinHandle<()>>, limit: Option<Duration>) {
    let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
    let all = futures::future::join_all(tasks);
    let results = match limit {
        Some(limit) => match tokio::time::timeout(limit, all).await {
            Ok(results) => results,
            Err(_) => {
                tracing::warn!("tasks did not stop in time; aborting them");
                aborts.iter().for_each(|a| a.abort());
                return;
            }
        },
        None => all.await,
    };
    for err in results.into_iter().filter_map(Result::err) {
        tracing::error!(%err, "a controller task failed");
    }
}

fn election_config(args: &RunArgs) -> Result<Option<ElectionConfig>, StartupError> {
    if !args.leader_election {
        return Ok(None);
    }
    let flag = |f: &str, m: &str| StartupError(format!("{f}: {m}"));
    let namespace = args
        .leader_election_namespace
        .clone()
        .filter(|n| !n.is_empty());
    let namespace = namespace
        .or_else(|| Some(args.namespace.clone()).filter(|n| !n.is_empty()))
        .ok_or_else(|| {
            flag(
                "--leader-election-namespace",
                "required with --leader-election (or set POD_NAMESPACE)",
            )
        })?;
    if args.leader_election_renew_deadline >= args.leader_election_lease_duration {
        return Err(flag(
            "--leader-election-renew-deadline",
            "must be shorter than --leader-election-lease-duration",
        ));
    }
    if args.leader_election_retry_period >= args.leader_election_renew_deadline {
        return Err(flag(
            "--leader-election-retry-period",
            "must be shorter than --leader-election-renew-deadline",
        ));
    }
    let identity = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| {
            format!(
                "{}-{}",
                hostname(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        });
    Ok(Some(ElectionConfig {
        namespace,
        name: args.leader_election_name.clone(),
        identity,
        lease_duration: args.leader_election_lease_duration,
        renew_deadline: args.leader_election_renew_deadline,
        retry_period: args.leader_election_retry_period,
    }))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "m3o-operator".into())
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
