//! Command line: `m3o-operator run | migrate | crds | inspect | audit | outbox | usage`. Every flag
//! has an environment fallback so the Helm chart can pass configuration through a Secret.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use m3o_connect::etcd::EtcdArgs;
use m3o_connect::redis::RedisArgs;

#[derive(Parser, Debug)]
#[command(
    name = "m3o-operator",
    version,
    about = "Kubernetes operator for the M3O platform's customer backend"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controllers, the outbox relay and the HTTP server.
    Run(Box<RunArgs>),
    /// Apply the database migrations and exit.
    Migrate(DatabaseArgs),
    /// Print the YAML of every CRD.
    Crds,
    /// Show one resource across Kubernetes, Postgres, etcd, its Secret and its events
    /// (read only).
    Inspect(Box<InspectArgs>),
    /// Compare every resource, etcd key and row; exit 1 when anything differs (read only).
    Audit(Box<AuditArgs>),
    /// Inspect and re-drive the event outbox (read-only except `redrive`).
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Exit 1 (one line) while objects still carry the finalizer m3o.com/cleanup: the
    /// chart's pre-delete hook (read only).
    UninstallCheck(UninstallCheckArgs),
    /// Billing export: a period's requests from usage_daily, by key, API or day (read only).
    Usage(Box<UsageArgs>),
}

#[derive(Args, Debug, Clone)]
pub struct UninstallCheckArgs {
    /// Path of a kubeconfig. Unset: $KUBECONFIG, ~/.kube/config, then the in-cluster service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,

    /// Namespace the release watches; empty: all.
    #[arg(long, env = "M3O_NAMESPACE", default_value = "")]
    pub namespace: String,
}

/// How `usage` groups a customer's requests.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageBy {
    Key,
    Api,
    Day,
}

/// Output of `usage`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageFormat {
    Text,
    Json,
    Csv,
}

#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("who").required(true).args(["customer", "name", "all"])))]
pub struct UsageArgs {
    /// Customer id.
    #[arg(long)]
    pub customer: Option<uuid::Uuid>,

    /// Namespace of the Customer NAME (default: the kubeconfig context's).
    #[arg(short = 'n', long = "namespace", requires = "name")]
    pub namespace: Option<String>,

    /// Name of the Customer resource.
    pub name: Option<String>,

    /// Every customer with usage in the period, in keyset pages.
    #[arg(long)]
    pub all: bool,

    /// Billing period, YYYY-MM (UTC).
    #[arg(long)]
    pub period: String,

    /// Group the period's requests by key, API or day.
    #[arg(long, value_enum, default_value_t = UsageBy::Key)]
    pub by: UsageBy,

    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = UsageFormat::Text)]
    pub output: UsageFormat,

    /// Customers per page of --all.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub page_size: i64,

    #[command(flatten)]
    pub database: DatabaseArgs,
}

/// The backends an admin command reads, with the same flags as `run`.
#[derive(Args, Debug, Clone)]
pub struct BackendArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Path of a kubeconfig. Unset: $KUBECONFIG, ~/.kube/config, then the in-cluster service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,

    /// Redis of the event streams: URL, TLS files.
    #[command(flatten)]
    pub redis: RedisArgs,

    /// Prefix of the Redis stream keys (`<prefix><topic>`).
    #[arg(long, env = "M3O_STREAM_PREFIX", default_value = m3o_events::DEFAULT_STREAM_PREFIX)]
    pub stream_prefix: String,

    /// etcd of the platform config: endpoints, prefix (the operator owns everything
    /// under it), TLS files, user.
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// Output of the admin commands.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// For people.
    Text,
    /// One JSON document, for scripts.
    Json,
}

/// The kinds `inspect` knows.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum InspectKind {
    Customer,
    Subscription,
    #[value(name = "apikey")]
    ApiKey,
}

#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// Kind of the resource.
    #[arg(value_enum)]
    pub kind: InspectKind,

    /// Name of the resource.
    pub name: String,

    /// Namespace of the resource (default: the kubeconfig context's).
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,

    /// Show at most this many of the latest events (from the stream and the outbox each).
    #[arg(long, default_value_t = 10)]
    pub events: usize,

    /// Read at most this many of the newest stream entries looking for its events.
    #[arg(long, default_value_t = 10_000)]
    pub stream_scan_limit: usize,

    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    #[command(flatten)]
    pub backends: BackendArgs,
}

#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    /// Audit one namespace's resources (rows and etcd keys are always all audited).
    #[arg(long, env = "M3O_NAMESPACE", default_value = "")]
    pub namespace: String,

    /// Objects, rows and etcd keys read per request.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub page_size: i64,

    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    #[command(flatten)]
    pub backends: BackendArgs,
}

/// What every `outbox` subcommand takes.
#[derive(Args, Debug, Clone)]
pub struct OutboxCommon {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Subcommand, Debug, Clone)]
pub enum OutboxCommand {
    /// Events that do not flow: parked, held behind a parked event of the same
    /// aggregate, retrying after a refusal, or waiting longer than --older-than.
    List {
        #[command(flatten)]
        common: OutboxCommon,
        /// Also list events unpublished for longer than this (Go duration).
        #[arg(long, default_value = "1m", value_parser = parse_duration)]
        older_than: Duration,
        /// At most this many rows.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
    },
    /// Per topic: events waiting to be published, the oldest one's age, parked events.
    Backlog {
        #[command(flatten)]
        common: OutboxCommon,
    },
    /// Un-park parked events so that the relay publishes them again (in seq order).
    Redrive {
        #[command(flatten)]
        common: OutboxCommon,
        /// Event id of a parked event (repeatable).
        #[arg(long = "id", required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<uuid::Uuid>,
        /// Every parked event.
        #[arg(long)]
        all: bool,
    },
    /// Re-publish retained events (published, not yet deleted by --outbox-retention)
    /// created at or after --since, in order and with their original ids, for consumers
    /// whose stream was lost (a flushed Redis). Consumers dedupe by id.
    Replay {
        #[command(flatten)]
        common: OutboxCommon,
        /// Events created at or after this RFC 3339 time.
        #[arg(long, value_parser = parse_time)]
        since: chrono::DateTime<chrono::Utc>,
        #[command(flatten)]
        target: ReplayTarget,
    },
}

impl OutboxCommand {
    pub fn common(&self) -> &OutboxCommon {
        match self {
            Self::List { common, .. }
            | Self::Backlog { common }
            | Self::Redrive { common, .. }
            | Self::Replay { common, .. } => common,
        }
    }
}

/// Where `outbox replay` re-publishes to: the streams' Redis and key prefix.
#[derive(Args, Debug, Clone)]
pub struct ReplayTarget {
    /// Redis of the event streams: URL, TLS files.
    #[command(flatten)]
    pub redis: RedisArgs,

    /// Prefix of the Redis stream keys (`<prefix><topic>`).
    #[arg(long, env = "M3O_STREAM_PREFIX", default_value = m3o_events::DEFAULT_STREAM_PREFIX)]
    pub stream_prefix: String,

    /// Approximate bound of each stream's length (XADD MAXLEN ~).
    #[arg(long, env = "M3O_STREAM_MAXLEN", default_value_t = 100_000)]
    pub stream_maxlen: usize,
}

/// An RFC 3339 time (`2026-01-02T03:04:05Z`).
fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("not an RFC 3339 time ({e}); e.g. 2026-01-02T03:04:05Z"))
}

#[derive(Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://user:pass@host:5432/db; TLS with libpq's
    /// parameters: ?sslmode=verify-full&sslrootcert=/ca.crt[&sslcert=..&sslkey=..].
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Schema holding the operator's tables.
    #[arg(long, env = "M3O_DATABASE_SCHEMA", default_value = "m3o")]
    pub database_schema: String,

    #[command(flatten)]
    pub logging: LogArgs,
}

#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "M3O_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub backends: BackendArgs,

    /// Approximate bound of each stream's length (XADD MAXLEN ~).
    #[arg(long, env = "M3O_STREAM_MAXLEN", default_value_t = 100_000)]
    pub stream_maxlen: usize,

    /// Namespace to watch; empty watches all namespaces.
    #[arg(long, env = "M3O_NAMESPACE", default_value = "")]
    pub namespace: String,

    /// Label selector of this operator's shard, applied to every watch (a fleet split
    /// across releases, e.g. `m3o.com/shard=a`); a customer's objects carry its label.
    #[arg(long, env = "M3O_SHARD_SELECTOR")]
    pub shard_selector: Option<String>,

    /// YAML plan catalog (plan name to default quota); built-in free/pro/business when unset.
    #[arg(long, env = "M3O_PLANS_FILE")]
    pub plans_file: Option<PathBuf>,

    /// Reconciles running at once, per kind.
    #[arg(long, env = "M3O_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,

    /// Reconcile every object at least this often (Go duration).
    #[arg(long, env = "M3O_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// Elect a leader on a Lease so only one replica reconciles.
    #[arg(long, env = "M3O_LEADER_ELECTION", default_value_t = false)]
    pub leader_election: bool,

    /// Namespace of the leader Lease (in a cluster: the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Name of the leader Lease.
    #[arg(long, env = "M3O_LEADER_ELECTION_NAME", default_value = "m3o-operator")]
    pub leader_election_name: String,

    /// How long a lease is valid without renewal; a standby takes over after it. Also
    /// the writer fence's heartbeat lease (with or without leader election).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub leader_election_lease_duration: Duration,

    /// The leader stops working if it could not renew (lease or writer-fence
    /// heartbeat) for this long (< lease duration).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub leader_election_renew_deadline: Duration,

    /// How often the leader renews and a standby retries.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub leader_election_retry_period: Duration,

    /// Refusals of an event by Redis (e.g. WRONGTYPE, NOPERM) before it is parked and
    /// later events flow past it; an unreachable Redis counts none.
    #[arg(long, env = "M3O_OUTBOX_MAX_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub outbox_max_attempts: u32,

    /// Published outbox rows older than this are deleted (Go duration).
    #[arg(long, env = "M3O_OUTBOX_RETENTION", default_value = "72h", value_parser = parse_duration)]
    pub outbox_retention: Duration,

    /// Payload bytes per XADD round trip of the relay, at most (a larger event goes alone).
    #[arg(long, env = "M3O_OUTBOX_BATCH_BYTES", default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub outbox_batch_bytes: u64,

    /// Address of the HTTP server (/metrics, /healthz, /readyz).
    #[arg(long, env = "M3O_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    #[command(flatten)]
    pub usage: UsageRunArgs,
}

/// The usage rollup's flags (README "Usage and quota").
#[derive(Args, Debug, Clone)]
pub struct UsageRunArgs {
    /// How often the gateways' usage counters are rolled up into usage_daily (Go duration).
    #[arg(long, env = "M3O_USAGE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub usage_interval: Duration,

    /// A Subscription's status.usage is written at most this often unless a threshold
    /// (50/80/100%) is crossed or the period changes (Go duration).
    #[arg(long, env = "M3O_USAGE_STATUS_INTERVAL", default_value = "15m", value_parser = parse_duration)]
    pub usage_status_interval: Duration,

    /// Redis the gateways count in (default: --redis-url; same TLS files).
    #[arg(long, env = "M3O_USAGE_REDIS_URL", hide_env_values = true)]
    pub usage_redis_url: Option<String>,

    /// The gateways' --redis-prefix.
    #[arg(long, env = "M3O_USAGE_REDIS_PREFIX", default_value = "m3o:gateway:")]
    pub usage_redis_prefix: String,

    /// Usage counters per Postgres transaction of the rollup.
    #[arg(long, env = "M3O_USAGE_PAGE_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub usage_page_size: u32,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = m3o_controllers::duration::parse(s)?;
    if d.is_zero() {
        Err("must be greater than zero".into())
    } else {
        Ok(d)
    }
}
