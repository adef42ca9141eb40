//! `m3o-operator run` and `migrate`: start-up checks, then the long-running tasks,
//! only while this process is the writer (behind the writer fence, and on the leader
//! when `--leader-election` is on), supervised (any task that ends makes the process
//! exit non-zero) and stopped together on SIGTERM/SIGINT.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use m3o_controllers::platform::{PlatformConfig, divergence};
use m3o_controllers::report::metrics::Metrics;
use m3o_controllers::runtime::feed::CustomerFeed;
use m3o_controllers::runtime::lanes::CHANGES_CONCURRENCY;
use m3o_controllers::store::fence::Term;
use m3o_controllers::{
    Context, Settings, apikey, customer, plans, runtime::failpoint, store, subscription, usage,
};
use m3o_events::relay::{Relay, RelayConfig};
use tokio::net::TcpListener;
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::cli::{DatabaseArgs, RunArgs};
use crate::fence::WriterFence;
use crate::http::{self, BacklogReading, Health, HttpState, Role};
use crate::leader::{ElectionConfig, Elector, Ended, Timing};
use crate::parked_events;
use crate::startup::{self, StartupError};

/// Database connections of the operator process: one per reconcile that may run at
/// once (three kinds, each with `--concurrency` in its bulk lane and
/// [`CHANGES_CONCURRENCY`] in its lane of changes), plus the relay, the drift watcher,
/// the resync, usage, gateway-sync re-checks and scrapes. Not capped: a pool smaller
/// than the reconciles it serves reports false `DatabaseUnavailable` under load. The
/// connections are opened only as needed, but a server that cannot take them all is
/// said at start ([`pool_warning`]).
fn db_pool_size(concurrency: u16) -> u32 {
    KINDS * (u32::from(concurrency) + u32::from(CHANGES_CONCURRENCY)) + OTHER_TASKS
}
const KINDS: u32 = 3;
const OTHER_TASKS: u32 = 8;

/// Sessions outside the pool: the relay's LISTEN, the writer fence's heartbeat, and
/// the heartbeat's replacement while it reopens.
const OUTSIDE_THE_POOL: u32 = 3;

/// The warning for a `--concurrency` whose connections (`pool`, and the sessions
/// outside it) the server cannot take: `allowed` is what it leaves this role
/// (`max_connections` less its reserved slots, and the role's own `CONNECTION LIMIT`).
/// Said at start rather than found as false `DatabaseUnavailable` ("too many clients")
/// under the first bulk apply. Not a refusal: behind a connection pooler (PgBouncer)
/// the server's settings are not the limit.
fn pool_warning(concurrency: u16, pool: u32, allowed: i64) -> Option<String> {
    let needed = pool + OUTSIDE_THE_POOL;
    (i64::from(needed) > allowed).then(|| {
        format!(
            "--concurrency {concurrency}: the operator may open up to {needed} database connections \
             ({KINDS} kinds x (concurrency + {CHANGES_CONCURRENCY}) + {OTHER_TASKS} + {OUTSIDE_THE_POOL} \
             outside the pool), but the server allows this role {allowed} (max_connections less \
             reserved connections, and the role's connection limit): under load, reconciles will \
             fail with DatabaseUnavailable; lower --concurrency or raise max_connections (unless a \
             connection pooler is in between)"
        )
    })
}

/// The connections the server allows this role, by its settings.
async fn connections_allowed(db: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT least( \
           current_setting('max_connections')::bigint \
             - current_setting('superuser_reserved_connections')::bigint \
             - coalesce(nullif(current_setting('reserved_connections', true), ''), '0')::bigint, \
           coalesce((SELECT nullif(rolconnlimit, -1) FROM pg_roles WHERE rolname = current_user), \
             2147483647)::bigint)",
    )
    .fetch_one(db)
    .await
}

pub async fn migrate(args: DatabaseArgs) -> Result<(), StartupError> {
    let db = startup::database(args.database_url.as_deref(), &args.database_schema, 2).await?;
    store::migrate(&db)
        .await
        .map_err(|e| StartupError(format!("--database-url: {e}")))?;
    tracing::info!(schema = %args.database_schema, "migrations applied");
    Ok(())
}

/// What only the writer runs.
struct LeaderWork {
    ctx: Arc<Context>,
    relay: Relay,
    plans: plans::Plans,
    plans_file: Option<std::path::PathBuf>,
    usage: usage::rollup::Rollup,
}

/// A long-running task, by name (the name is what logs, `/healthz` and the
/// `task-end:<name>` / `task-panic:<name>` failpoints use).
type Task = (&'static str, JoinHandle<()>);

impl LeaderWork {
    fn spawn(self, stop: CancellationToken) -> Vec<Task> {
        let ctx = self.ctx;
        let mut relay = self
            .relay
            .fenced_by(ctx.term.name(), ctx.term.shared_epoch());
        let parked = relay.parked_events(64);
        // One Customer watch feeds all three controllers.
        let mut customers = CustomerFeed::new();
        let customer_watch = customers.run(ctx.clone());
        let mut tasks = vec![
            supervised("outbox-relay", relay.run(stop.clone())),
            supervised(
                "parked-event-reporter",
                parked_events::report(ctx.clone(), parked),
            ),
            supervised(
                "drift-watcher",
                m3o_controllers::runtime::drift::run(ctx.clone(), stop.clone()),
            ),
            supervised("customer-watch", until(stop.clone(), customer_watch)),
            supervised(
                "orphan-retirement",
                until(
                    stop.clone(),
                    m3o_controllers::runtime::orphans::run(ctx.clone()),
                ),
            ),
            supervised(
                "customer-controller",
                customer::run(
                    ctx.clone(),
                    customers.store,
                    customers.for_customers,
                    stop.clone().cancelled_owned(),
                ),
            ),
            supervised(
                "subscription-controller",
                subscription::run(
                    ctx.clone(),
                    customers.for_subscriptions,
                    stop.clone().cancelled_owned(),
                ),
            ),
            supervised(
                "apikey-controller",
                apikey::run(
                    ctx.clone(),
                    customers.for_apikeys,
                    stop.clone().cancelled_owned(),
                ),
            ),
        ];
        tasks.push(supervised("usage-rollup", self.usage.run(stop.clone())));
        if let Some(path) = self.plans_file {
            tasks.push(supervised(
                "plans-file-watch",
                plans::watch_file(self.plans, path, ctx.metrics.clone(), stop),
            ));
        }
        tasks
    }
}

/// `task`, ended when `stop` is cancelled (a task that only stops with its consumers).
async fn until(stop: CancellationToken, task: impl Future<Output = ()>) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = task => {}
    }
}

/// Spawns `task` as `name`. Tests end or panic it through the failpoints
/// `task-end:<name>` and `task-panic:<name>`.
fn supervised(name: &'static str, task: impl Future<Output = ()> + Send + 'static) -> Task {
    let handle = tokio::spawn(async move {
        if failpoint::is_enabled(&format!("task-end:{name}")) {
            tracing::warn!(task = name, "failpoint: ending the task");
            return;
        }
        if failpoint::is_enabled(&format!("task-panic:{name}")) {
            panic!("failpoint task-panic:{name}");
        }
        task.await
    });
    (name, handle)
}

/// The first task to end: its index, name and result.
async fn first_to_end(tasks: &mut [Task]) -> (usize, &'static str, Result<(), JoinError>) {
    let ends = tasks.iter_mut().map(|(name, handle)| {
        let name = *name;
        Box::pin(async move { (name, handle.await) })
    });
    let ((name, result), index, _) = futures::future::select_all(ends).await;
    (index, name, result)
}

pub async fn run(args: RunArgs) -> Result<(), StartupError> {
    let timing = fence_timing(&args)?;
    let election = election_config(&args, timing)?;
    let catalog = plans::load(args.plans_file.as_deref()).map_err(|e| {
        let path = args
            .plans_file
            .as_deref()
            .unwrap_or(std::path::Path::new(""));
        StartupError(format!("--plans-file {}: {e}", path.display()))
    })?;
    let namespace = watched_namespaces(&args.namespace)?;
    let schema = args.backends.database.database_schema.clone();

    let pool = db_pool_size(args.concurrency);
    let db = startup::database(
        args.backends.database.database_url.as_deref(),
        &schema,
        pool,
    )
    .await?;
    match connections_allowed(&db).await {
        Ok(allowed) => {
            if let Some(line) = pool_warning(args.concurrency, pool, allowed) {
                tracing::warn!("{line}");
            }
        }
        Err(err) => tracing::warn!(%err, "could not read max_connections"),
    }
    store::migrate(&db)
        .await
        .map_err(|e| StartupError(format!("--database-url: {e}")))?;
    let redis = startup::redis(&args.backends.redis).await?;
    let usage_redis = startup::usage_redis(&args.backends.redis, &args.usage).await?;
    let database_id = store::fence::database_id(&db)
        .await
        .map_err(|e| StartupError(format!("--database-url: reading the database id: {e}")))?;
    let platform = startup::etcd(&args.backends.etcd)
        .await?
        .of_database(database_id);
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
    let shard = match args.shard_selector.as_deref().map(str::trim) {
        Some(raw) if !raw.is_empty() => Some(
            m3o_controllers::runtime::shard::Shard::parse(raw)
                .map_err(|e| StartupError(format!("--shard-selector {raw:?}: {e}")))?,
        ),
        _ => None,
    };
    let settings = Settings {
        namespace: namespace.clone(),
        shard,
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
    let role = Arc::new(Role::new(timing.lease));
    let health = Arc::new(Health::default());
    let http_state = HttpState {
        role: role.clone(),
        health: health.clone(),
        watching: ctx.watching.clone(),
        divergence: ctx.platform.divergence(),
        metrics: metrics.clone(),
        relay: relay.stats(),
        backlog: Arc::new(BacklogReading::new(db.clone())),
    };
    let writer = Writer {
        client,
        election,
        db,
        identity: identity(),
        timing,
        term: ctx.term.clone(),
        role: role.clone(),
        health,
        metrics: metrics.clone(),
    };
    let usage = usage::rollup::Rollup::new(
        ctx.clone(),
        usage_redis,
        usage::rollup::RollupSettings {
            prefix: args.usage.usage_redis_prefix.clone(),
            interval: args.usage.usage_interval,
            page_rows: args.usage.usage_page_size as usize,
            scan_count: 1000,
            status_interval: args.usage.usage_status_interval,
        },
    );
    let work = LeaderWork {
        usage,
        ctx,
        relay,
        plans,
        plans_file: args.plans_file.clone(),
    };

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    // The server outlives the work (probes answer while it stops), so its end before
    // then is unexpected.
    let server_stop = CancellationToken::new();
    let mut server = tokio::spawn(http::serve(listener, http_state, server_stop.clone()));
    tracing::info!(
        namespace = namespace.as_deref().unwrap_or("<all>"),
        schema,
        identity = %writer.identity,
        "m3o-operator running"
    );

    let outcome = tokio::select! {
        outcome = writer.lead(work, &shutdown) => outcome,
        ended = &mut server => Err(StartupError(match ended {
            Ok(Ok(())) => "the HTTP server ended unexpectedly; exiting".into(),
            Ok(Err(err)) => format!("--metrics-addr: the HTTP server failed: {err}"),
            Err(err) => format!("the HTTP server task failed: {err}"),
        })),
    };
    metrics.leader.set(0);
    role.stopped();
    shutdown.cancel();
    server_stop.cancel();
    if !server.is_finished() {
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(%err, "HTTP server ended with an error"),
            Err(err) => tracing::warn!(%err, "HTTP server task failed"),
        }
    }
    tracing::info!("m3o-operator stopped");
    outcome
}

/// How this process becomes the writer and stays it.
struct Writer {
    client: kube::Client,
    election: Option<ElectionConfig>,
    db: sqlx::PgPool,
    identity: String,
    timing: Timing,
    term: Arc<Term>,
    role: Arc<Role>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// Why the work stopped.
enum Stop {
    Shutdown,
    LeaseLost,
    FenceLost,
    Task(&'static str, Result<(), JoinError>),
}

impl Writer {
    /// With leader election, stands by until elected; then waits for the writer fence
    /// (the previous writer has stopped or been cut off), and runs the work until
    /// shutdown, loss of the lease or the fence, or the end of any task. The process
    /// then exits non-zero (except on shutdown), so that its restart rejoins as a
    /// standby. On shutdown, and when a task ended, the work stops first and the fence
    /// and lease are released after, for an immediate hand-over.
    async fn lead(
        self,
        work: LeaderWork,
        shutdown: &CancellationToken,
    ) -> Result<(), StartupError> {
        let timing = self.timing;
        let margin = timing
            .lease
            .saturating_sub(timing.renew_deadline)
            .saturating_sub(timing.retry_period);
        let mut elector = None;
        if let Some(config) = self.election.clone() {
            self.role.standby();
            let mut candidate = Elector::new(self.client.clone(), config);
            if !candidate.acquire(shutdown).await {
                return Ok(());
            }
            self.role.elected();
            elector = Some(candidate);
        }
        let (stop, tasks, fence, divergence) = {
            let renewing = hold_lease(elector.as_mut(), shutdown);
            tokio::pin!(renewing);
            // Keep renewing the lease while waiting for the predecessor to let go.
            let acquired = tokio::select! {
                ended = &mut renewing => return lost_before_starting(ended),
                fence = WriterFence::acquire(&self.db, self.term.name(), &self.identity, timing, &self.role, shutdown) => fence,
            };
            let Some(mut fence) = acquired else {
                return Ok(());
            };
            self.term.begin(fence.epoch());
            if let Err(err) = start_term(&mut fence, &self.term, &work.ctx.platform).await {
                fence.release().await;
                return Err(err);
            }
            self.metrics.leader.set(1);
            self.role.leading();
            let leading = shutdown.child_token();
            let divergence = work.ctx.platform.divergence();
            let mut tasks = work.spawn(leading.clone());
            let stop = tokio::select! {
                ended = &mut renewing => match ended {
                    Ended::Shutdown => Stop::Shutdown,
                    Ended::Lost => Stop::LeaseLost,
                },
                ended = fence.hold(shutdown) => match ended {
                    Ended::Shutdown => Stop::Shutdown,
                    Ended::Lost => Stop::FenceLost,
                },
                _ = self.term.superseded().cancelled() => Stop::FenceLost,
                (index, name, result) = first_to_end(&mut tasks) => {
                    tasks.remove(index);
                    // Tasks end on shutdown too; only then is that expected.
                    if shutdown.is_cancelled() && result.is_ok() {
                        Stop::Shutdown
                    } else {
                        Stop::Task(name, result)
                    }
                }
            };
            leading.cancel();
            self.metrics.leader.set(0);
            (stop, tasks, fence, divergence)
        };
        match stop {
            Stop::Shutdown => {
                join(tasks, None).await;
                fence.release().await;
                release_lease(elector).await;
                Ok(())
            }
            Stop::LeaseLost => {
                join(tasks, Some(margin)).await;
                fence.release().await;
                Err(StartupError(
                    "lost the leader lease; exiting so that a restart rejoins as a standby".into(),
                ))
            }
            Stop::FenceLost => {
                join(tasks, Some(margin)).await;
                fence.release().await;
                // Stopped by etcd on a prefix of another database: that one line.
                Err(StartupError(divergence.stopped_by().unwrap_or_else(|| {
                    "lost the writer fence (another process writes this schema, or the heartbeat failed); exiting so that a restart rejoins as a standby".into()
                })))
            }
            Stop::Task(name, result) => {
                let what = match result {
                    Ok(()) => format!("task {name} ended unexpectedly"),
                    Err(err) if err.is_panic() => format!("task {name} panicked"),
                    Err(err) => format!("task {name} failed: {err}"),
                };
                self.health.task_down(what.clone());
                tracing::error!(task = name, "{what}; stopping the others");
                join(tasks, Some(margin)).await;
                fence.release().await;
                release_lease(elector).await;
                Err(StartupError(format!(
                    "{what}; exiting so that a restart brings it back"
                )))
            }
        }
    }
}

/// Records the term just won in etcd, first moving it above a newer epoch that etcd
/// records (Postgres restored from an older backup): one start heals that divergence,
/// where each restart would otherwise gain one epoch and exit again. Refuses, writing
/// nothing to etcd, a prefix that another database writes and a fence key that holds
/// no term: the error is then one line naming what to fix.
async fn start_term(
    fence: &mut WriterFence,
    term: &Term,
    platform: &PlatformConfig,
) -> Result<(), StartupError> {
    let etcd = |e: String| {
        StartupError(format!(
            "--etcd-endpoints: cannot record the writer term in etcd: {e}"
        ))
    };
    let won = fence.epoch();
    let mut raised = None;
    // A concurrent record (another shard's operator claiming the database id at the
    // same time) makes the compare-and-swap fail: read again and decide again.
    for _ in 0..3 {
        let state = platform
            .fence_state()
            .await
            .map_err(|e| etcd(e.to_string()))?;
        match divergence::on_start(fence.epoch(), &state.recorded, &state.owner) {
            divergence::Start::Foreign(other) => {
                return Err(StartupError(platform.foreign_line(&other)));
            }
            divergence::Start::Unreadable(value) => {
                return Err(StartupError(platform.unreadable_line(&value)));
            }
            divergence::Start::Record => {}
            divergence::Start::RaiseTo(to) => {
                match fence.raise_to(to).await {
                    Ok(true) => term.begin(to),
                    Ok(false) => {
                        return Err(etcd(
                            "the writer term moved while being raised above etcd's".into(),
                        ));
                    }
                    Err(err) => {
                        return Err(etcd(format!("raising the writer term above etcd's: {err}")));
                    }
                }
                raised = Some((state.recorded.epoch().unwrap_or_default(), to));
            }
        }
        if platform
            .record_term(&state)
            .await
            .map_err(|e| etcd(e.to_string()))?
        {
            if let Some((recorded, to)) = raised {
                platform.divergence().found(format!(
                    "etcd recorded writer term {recorded} while Postgres began {won} (Postgres restored from an older backup?); began term {to} above both"
                ));
            }
            return Ok(());
        }
    }
    Err(etcd(
        "the etcd fence kept changing while the term was being recorded (another writer?); exiting so that a restart looks again".into(),
    ))
}

/// Renews the lease until shutdown or loss; without leader election, waits for shutdown.
async fn hold_lease(elector: Option<&mut Elector>, shutdown: &CancellationToken) -> Ended {
    match elector {
        Some(elector) => elector.hold(shutdown).await,
        None => {
            shutdown.cancelled().await;
            Ended::Shutdown
        }
    }
}

async fn release_lease(elector: Option<Elector>) {
    if let Some(elector) = elector {
        elector.release().await;
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
async fn join(tasks: Vec<Task>, limit: Option<Duration>) {
    let (names, handles): (Vec<_>, Vec<_>) = tasks.into_iter().unzip();
    let aborts: Vec<_> = handles.iter().map(JoinHandle::abort_handle).collect();
    let all = futures::future::join_all(handles);
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
    for (name, result) in names.into_iter().zip(results) {
        if let Err(err) = result {
            tracing::error!(%err, task = name, "a task failed while stopping");
        }
    }
}

/// The heartbeat timing, checked whether or not leader election is on (the writer
/// fence uses it either way).
fn fence_timing(args: &RunArgs) -> Result<Timing, StartupError> {
    let flag = |f: &str, m: &str| StartupError(format!("{f}: {m}"));
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
    Ok(Timing {
        lease: args.leader_election_lease_duration,
        renew_deadline: args.leader_election_renew_deadline,
        retry_period: args.leader_election_retry_period,
    })
}

fn election_config(args: &RunArgs, timing: Timing) -> Result<Option<ElectionConfig>, StartupError> {
    if !args.leader_election {
        return Ok(None);
    }
    let namespace = args
        .leader_election_namespace
        .clone()
        .filter(|n| !n.is_empty());
    let namespace = namespace
        // The one watched namespace, if only one is (a list names no single home).
        .or_else(|| {
            Some(args.namespace.clone()).filter(|n| !n.is_empty() && !n.contains(','))
        })
        .ok_or_else(|| {
            StartupError(
                "--leader-election-namespace: required with --leader-election when --namespace is empty or a list (or set POD_NAMESPACE)"
                    .into(),
            )
        })?;
    Ok(Some(ElectionConfig {
        namespace,
        name: args.leader_election_name.clone(),
        identity: identity(),
        timing,
    }))
}

/// This replica's name: the pod name, or the host name with a random suffix.
fn identity() -> String {
    static IDENTITY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IDENTITY
        .get_or_init(|| {
            std::env::var("POD_NAME")
                .ok()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| {
                    format!(
                        "{}-{}",
                        hostname(),
                        &uuid::Uuid::new_v4().simple().to_string()[..8]
                    )
                })
        })
        .clone()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_serves_every_reconcile_of_both_lanes() {
        assert_eq!(db_pool_size(8), 3 * (8 + 2) + 8);
        // The largest --concurrency: no cap below its reconciles.
        assert!(db_pool_size(256) >= 3 * (256 + u32::from(CHANGES_CONCURRENCY)));
    }

    #[test]
    fn a_pool_the_server_cannot_take_is_said_naming_the_flag() {
        assert_eq!(pool_warning(8, db_pool_size(8), 97), None);
        assert_eq!(pool_warning(8, 38, 41), None);
        assert!(
            pool_warning(8, 38, 40).is_some(),
            "the sessions outside the pool count"
        );
        let line = pool_warning(256, db_pool_size(256), 97).expect("too many");
        assert!(line.starts_with("--concurrency 256: "), "{line}");
        assert!(line.contains("up to 785 database connections"), "{line}");
        assert!(line.contains("allows this role 97"), "{line}");
        assert!(!line.contains('\n'), "one line");
    }
}

/// The `--namespace` value: empty (all namespaces), one namespace, or several separated
/// by commas; each a DNS-1123 label, none twice.
fn watched_namespaces(value: &str) -> Result<Option<String>, StartupError> {
    let list = m3o_controllers::runtime::context::namespace_list(value);
    let mut seen = std::collections::BTreeSet::new();
    for ns in &list {
        let label = ns.len() <= 63
            && ns
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !ns.starts_with('-')
            && !ns.ends_with('-');
        if !label {
            return Err(StartupError(format!(
                "--namespace: {ns:?} is not a namespace name (a DNS-1123 label)"
            )));
        }
        if !seen.insert(*ns) {
            return Err(StartupError(format!("--namespace: {ns:?} is listed twice")));
        }
    }
    Ok(Some(list.join(",")).filter(|ns| !ns.is_empty()))
}

#[cfg(test)]
mod namespace_tests {
    use super::watched_namespaces;

    #[test]
    fn namespace_flag_takes_one_several_or_none() {
        assert_eq!(watched_namespaces("").unwrap(), None);
        assert_eq!(watched_namespaces(" a ").unwrap().as_deref(), Some("a"));
        assert_eq!(watched_namespaces("a, b").unwrap().as_deref(), Some("a,b"));
        let err = watched_namespaces("a,B_").unwrap_err().to_string();
        assert!(err.starts_with("--namespace:"), "{err}");
        assert!(watched_namespaces("a,a").is_err());
    }
}
