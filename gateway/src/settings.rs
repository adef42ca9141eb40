//! Command line of `m3o-gateway-auth` (docs/gateway.md), with the same
//! environment fallbacks as the operator's.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "m3o-gateway-auth",
    version,
    about = "Forward-auth for the M3O API gateway (Envoy ext_authz HTTP, nginx auth_request, Traefik ForwardAuth)",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve forward-auth checks (the default).
    Run(Box<RunArgs>),
    /// Print a customer's metered requests per day, key and API.
    Usage(UsageArgs),
    /// Print an nginx configuration that asks these replicas about every request.
    NginxConfig(NginxArgs),
}

#[derive(Args, Debug, Clone)]
pub struct NginxArgs {
    /// Where nginx listens (host:port).
    #[arg(long, default_value = "0.0.0.0:8000")]
    pub listen: String,
    /// A gateway replica's forward-auth address (host:port); repeat for each replica.
    #[arg(long = "auth", required = true)]
    pub auth: Vec<String>,
    /// The API behind nginx (host:port).
    #[arg(long)]
    pub upstream: String,
    /// Print a whole nginx.conf (pid, logs, temp files under this directory) rather
    /// than the body of an `http {}` block.
    #[arg(long)]
    pub standalone_dir: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct RedisArgs {
    /// Redis of the limits and usage counters: URL (rediss:// for TLS, ACL user in it),
    /// TLS files; the same flags as the operator's.
    #[command(flatten)]
    pub connection: m3o_connect::redis::RedisArgs,

    /// Prefix of the gateway's Redis keys.
    #[arg(long, env = "M3O_GATEWAY_REDIS_PREFIX", default_value = "m3o:gateway:")]
    pub redis_prefix: String,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// etcd of the platform config: endpoints, prefix, TLS files, user; the same flags
    /// as the operator's.
    #[command(flatten)]
    pub etcd: m3o_connect::etcd::EtcdArgs,

    #[command(flatten)]
    pub redis: RedisArgs,

    /// Address of the forward-auth service (every path is a check).
    #[arg(long, env = "M3O_GATEWAY_LISTEN", default_value = "0.0.0.0:8081")]
    pub listen: SocketAddr,

    /// Address serving /metrics, /healthz and /readyz.
    #[arg(long, env = "M3O_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Where the original request's URI comes from, one source per deployment:
    /// X-Original-URI (nginx), X-Forwarded-Uri (traefik), or the check's own path less
    /// --path-prefix (envoy). No other header is ever read for it.
    #[arg(long, env = "M3O_GATEWAY_URI_SOURCE", value_enum, default_value_t = UriSource::Nginx)]
    pub uri_source: UriSource,

    /// Stripped from a check's own path to get the original path (Envoy ext_authz HTTP
    /// mode's path_prefix); only with --uri-source=envoy.
    #[arg(long, env = "M3O_GATEWAY_PATH_PREFIX", default_value = "")]
    pub path_prefix: String,

    /// APIs usage is metered under besides those named in a scope of a key of the
    /// customer (comma separated); any other path counts under `-`.
    #[arg(long, env = "M3O_GATEWAY_USAGE_APIS", value_delimiter = ',')]
    pub usage_apis: Vec<String>,

    /// When Redis does not answer: let requests through (true) or refuse them with 503 (false).
    #[arg(long, env = "M3O_GATEWAY_RATE_LIMIT_FAIL_OPEN", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub rate_limit_fail_open: bool,

    /// Consecutive Redis failures (timeouts or errors) after which checks stop asking
    /// Redis for --redis-breaker-cooldown and the fail mode decides at once.
    #[arg(long, env = "M3O_GATEWAY_REDIS_BREAKER_FAILURES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub redis_breaker_failures: u32,

    /// How long checks skip Redis once the breaker has opened (a background probe then
    /// closes it when Redis answers again).
    #[arg(long, env = "M3O_GATEWAY_REDIS_BREAKER_COOLDOWN", default_value = "5s", value_parser = parse_duration)]
    pub redis_breaker_cooldown: Duration,

    /// Authenticate only: no quotas and no usage metering (Redis is not used).
    #[arg(long, env = "M3O_GATEWAY_NO_LIMITS")]
    pub no_limits: bool,

    /// How long a check waits for Redis before the fail mode decides.
    #[arg(long, env = "M3O_GATEWAY_REDIS_TIMEOUT", default_value = "250ms", value_parser = parse_duration)]
    pub redis_timeout: Duration,

    /// How long the index may go unconfirmed by etcd (a watch progress answer from a
    /// member with a leader, and this replica's report lease renewed) before the
    /// --stale-mode applies. Reported, so the operator's GatewaySynced accounts for it.
    #[arg(long, env = "M3O_GATEWAY_MAX_STALENESS", default_value = "10s", value_parser = parse_positive_duration)]
    pub max_staleness: Duration,

    /// Past --max-staleness: `fail` answers 503 (index_stale, with Retry-After) and
    /// fails /readyz; `serve` keeps answering from the snapshot, says so in its report,
    /// and so voids GatewaySynced.
    #[arg(long, env = "M3O_GATEWAY_STALE_MODE", value_enum, default_value_t = StaleMode::Fail)]
    pub stale_mode: StaleMode,

    /// This replica's name under <prefix>/gateways/ (default: $HOSTNAME, else random).
    #[arg(long, env = "M3O_GATEWAY_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// On SIGTERM: fail /readyz at once and keep answering checks this long (until
    /// Services and proxies have stopped sending new connections), then close
    /// gracefully. SIGINT stops at once.
    #[arg(long, env = "M3O_GATEWAY_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// Log format.
    #[arg(long, env = "M3O_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Args, Debug, Clone)]
pub struct UsageArgs {
    /// Customer id (status.customerId of the Customer).
    #[arg(long)]
    pub customer: String,

    #[command(flatten)]
    pub redis: RedisArgs,
}

/// The one header (or path) a deployment's proxy puts the original URI in.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriSource {
    /// `X-Original-URI` (nginx `auth_request`, set to `$request_uri`).
    Nginx,
    /// `X-Forwarded-Uri` (Traefik ForwardAuth).
    Traefik,
    /// The check's own path less `--path-prefix` (Envoy ext_authz, HTTP service).
    Envoy,
}

/// What a replica does with a snapshot etcd has not confirmed for --max-staleness.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleMode {
    /// Refuse checks with 503 and fail /readyz.
    Fail,
    /// Keep serving the snapshot (voids GatewaySynced).
    Serve,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// `250ms`, `2s`, `1m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration {s:?}: use ms, s or m")),
    }
}

/// A duration above zero (a zero bound would refuse every check).
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?} must be above zero")),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_defaults() {
        let cli = Cli::parse_from(["m3o-gateway-auth", "--etcd-endpoints", "a,b"]);
        assert!(cli.command.is_none());
        assert_eq!(cli.run.etcd.etcd_endpoints, ["a", "b"]);
        assert!(cli.run.rate_limit_fail_open);
        assert_eq!(cli.run.redis_timeout, Duration::from_millis(250));
        assert_eq!(cli.run.shutdown_delay, Duration::from_secs(5));
        let cli = Cli::parse_from(["m3o-gateway-auth", "--rate-limit-fail-open=false"]);
        assert!(!cli.run.rate_limit_fail_open);
        let cli = Cli::parse_from(["m3o-gateway-auth", "usage", "--customer", "c"]);
        assert!(matches!(cli.command, Some(Command::Usage(u)) if u.customer == "c"));
        assert!(parse_duration("5x").is_err());
        assert_eq!(cli.run.uri_source, UriSource::Nginx);
        let cli = Cli::parse_from([
            "m3o-gateway-auth",
            "--uri-source=envoy",
            "--usage-apis=a,b",
            "--redis-breaker-failures=2",
        ]);
        assert_eq!(cli.run.uri_source, UriSource::Envoy);
        assert_eq!(cli.run.usage_apis, ["a", "b"]);
        assert_eq!(cli.run.redis_breaker_failures, 2);
        assert!(Cli::try_parse_from(["m3o-gateway-auth", "--uri-source=header"]).is_err());
        assert!(Cli::try_parse_from(["m3o-gateway-auth", "--redis-breaker-failures=0"]).is_err());
        assert_eq!(cli.run.max_staleness, Duration::from_secs(10));
        assert_eq!(cli.run.stale_mode, StaleMode::Fail);
        let cli = Cli::parse_from([
            "m3o-gateway-auth",
            "--max-staleness=1500ms",
            "--stale-mode=serve",
        ]);
        assert_eq!(cli.run.max_staleness, Duration::from_millis(1500));
        assert_eq!(cli.run.stale_mode, StaleMode::Serve);
        assert!(Cli::try_parse_from(["m3o-gateway-auth", "--max-staleness=0s"]).is_err());
        assert!(Cli::try_parse_from(["m3o-gateway-auth", "--stale-mode=maybe"]).is_err());
    }
}
