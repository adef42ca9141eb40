//! Benchmark of a fleet: N Customers, N Subscriptions and N ApiKeys against the real
//! servers of `hack/env.sh`. Prints figures beside the raw rate of the same API-server
//! work; asserts nothing. `make bench` runs it in release mode (`BENCH_N=10000`).
//!
//! 1. Raw rate: the same objects created (server-side apply) plus one status write each,
//!    by the same client with the same requests in flight, no operator running. Then the
//!    contract floor: every API request the contract has the operator make per object (its
//!    finalizer, a key's Secret, status by server-side apply, one Event), with the
//!    operator's watches open, and still no operator: the best the operator could do.
//!    `BENCH_FLOOR_STATUS=operator` gives the floor's status the operator's further
//!    conditions too; `BENCH_FLOOR_ONLY=1` stops after the floor.
//!    Both print the API server's requests per object and each process's CPU.
//! 2. The operator (target/<profile>/m3o-operator) on a fresh namespace, schema and
//!    prefixes: apply -> all Ready, with a probe key blocked and unblocked meanwhile
//!    (block -> etcd entry changed, during the bulk apply).
//! 3. At rest: peak RSS, CPU and etcd writes / Postgres transactions over one resync
//!    interval (the second after all Ready; the first's CPU too), reconciles per object,
//!    and the block latency again.
//! 4. A restart over the provisioned fleet, nothing changed: time until quiet, its
//!    reconciles, API writes and requests, etcd revisions, Postgres transactions.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const KINDS: [&str; 3] = ["Customer", "Subscription", "ApiKey"];
/// The operator's resync interval here: the "at rest" window covers exactly one.
const RESYNC: Duration = Duration::from_secs(60);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn var(name: &str) -> Result<String> {
    std::env::var(name).map_err(|_| format!("{name} is not set: run inside hack/env.sh").into())
}

fn api(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk(kind)))
}

/// The spec of object `i` of `kind` (customer `c-i` owns subscription and key `c-i`).
fn spec(kind: &str, i: usize) -> Value {
    let name = format!("c-{i:05}");
    match kind {
        "Customer" => json!({"email": format!("{name}@bench.example.com")}),
        "Subscription" => json!({"customerRef": {"name": name}, "plan": "pro"}),
        _ => json!({"customerRef": {"name": name}, "description": "bench", "scopes": ["*"]}),
    }
}

async fn apply(
    api: &Api<DynamicObject>,
    kind: &str,
    name: &str,
    spec: Value,
) -> Result<DynamicObject> {
    let body = json!({"apiVersion": "m3o.com/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec});
    Ok(api
        .patch(
            name,
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&body),
        )
        .await?)
}

/// The API-server work done for one object.
#[derive(Clone, Copy)]
enum Work {
    /// Nothing past the apply (the operator does the rest).
    Apply,
    /// Create + one status write: the raw rate.
    Raw,
    /// Every request the operator's contract (README, "The resources") makes for an object, and no
    /// more: the finalizer, the key's Secret, status by server-side apply, one Event.
    Contract,
}

/// The requests the operator makes for `obj` of `kind`, once it is applied.
async fn contract_requests(
    client: &Client,
    api: &Api<DynamicObject>,
    kind: &str,
    obj: &DynamicObject,
) -> Result<()> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let finalizer = json!({"metadata": {"finalizers": ["m3o.com/cleanup"]}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&finalizer))
        .await?;
    if kind == "ApiKey" {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-api-key"), "ownerReferences": [{
                "apiVersion": "m3o.com/v1alpha1", "kind": kind, "name": name,
                "uid": obj.metadata.uid, "controller": true}]},
            "stringData": {"apiKey": "m3o_bench", "keyId": "00000000-0000-0000-0000-000000000000"},
        }))?;
        Api::<Secret>::namespaced(client.clone(), api.namespace().unwrap_or_default())
            .create(&PostParams::default(), &secret)
            .await?;
    }
    // A status the size of the operator's: its ids, state and a Ready message.
    let id = uuid::Uuid::new_v4().to_string();
    let ready = json!({"type": "Ready", "status": "True", "reason": "Provisioned",
        "message": format!("{kind} {name} provisioned ({id}), config at /m3o/customers/{id}"),
        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1});
    let mut conditions = vec![ready];
    // BENCH_FLOOR_STATUS=operator: also the further conditions the operator writes (README,
    // "The resources"), to tell what they cost the API server.
    if std::env::var("BENCH_FLOOR_STATUS").as_deref() == Ok("operator") {
        let condition = |type_: &str, status: &str, reason: &str, message: String| {
            json!({"type": type_, "status": status, "reason": reason, "message": message,
                "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1})
        };
        conditions.push(condition(
            "DatabaseSynced",
            "True",
            "Synced",
            format!("record {id} is up to date"),
        ));
        conditions.push(condition(
            "ConfigSynced",
            "True",
            "Synced",
            format!("/m3o/customers/{id} is up to date"),
        ));
        if kind == "ApiKey" {
            conditions.push(condition("GatewaySynced", "Unknown", "NoGatewayRegistered",
                "no gateway replica is registered under <prefix>/gateways/; nothing can confirm propagation".into()));
        }
    }
    let mut status = json!({"observedGeneration": 1, "customerId": id, "state": "active",
        "conditions": conditions});
    match kind {
        "Subscription" => {
            status["subscriptionId"] = json!(id);
            status["plan"] = json!("pro");
        }
        "ApiKey" => {
            status["keyId"] = json!(id);
            status["secretName"] = json!(format!("{name}-api-key"));
            status["keyPrefix"] = json!("m3o_abcd");
        }
        _ => {}
    }
    let status = json!({"apiVersion": "m3o.com/v1alpha1", "kind": kind, "status": status});
    api.patch_status(
        &name,
        &PatchParams::apply("bench").force(),
        &Patch::Apply(&status),
    )
    .await?;
    let reporter = Reporter {
        controller: "bench".into(),
        instance: None,
    };
    let event = Event {
        type_: EventType::Normal,
        reason: "Provisioned".into(),
        note: Some(format!("{kind} {name} provisioned, config in sync")),
        action: "Provision".into(),
        secondary: None,
    };
    Recorder::new(client.clone(), reporter)
        .publish(&event, &obj.object_ref(&ApiResource::from_gvk(&gvk(kind))))
        .await?;
    Ok(())
}

/// A phase begins (on stderr, with the time: a long run shows where it is).
fn progress(phase: &str) {
    eprintln!("bench: {} {phase}", chrono::Utc::now().format("%H:%M:%S"));
}

fn gvk(kind: &str) -> GroupVersionKind {
    GroupVersionKind::gvk("m3o.com", "v1alpha1", kind)
}

/// Applies N of each kind, customer i then its subscription and key, `inflight` at
/// once, each followed by the requests of `work`.
async fn apply_fleet(
    client: &Client,
    ns: &str,
    n: usize,
    inflight: usize,
    work: Work,
) -> Result<()> {
    let apis: Vec<_> = KINDS.iter().map(|k| (*k, api(client, ns, k))).collect();
    let errors = futures::stream::iter((0..n).flat_map(|i| apis.iter().map(move |a| (i, a))))
        .map(|(i, (kind, api))| async move {
            let name = format!("c-{i:05}");
            let obj = apply(api, kind, &name, spec(kind, i)).await?;
            match work {
                Work::Apply => {}
                Work::Raw => {
                    let patch = json!({"status": {"observedGeneration": 1, "conditions": [{
                        "type": "Ready", "status": "True", "reason": "Provisioned", "message": "raw",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
                    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await?;
                }
                Work::Contract => contract_requests(client, api, kind, &obj).await?,
            }
            Result::Ok(())
        })
        .buffer_unordered(inflight)
        .filter_map(|r| async move { r.err() })
        .collect::<Vec<_>>()
        .await;
    match errors.first() {
        Some(e) => Err(format!("{} apply errors, first: {e}", errors.len()).into()),
        None => Ok(()),
    }
}

/// Drains the watches the operator keeps on `ns` (each kind, and its Secrets as
/// metadata), so the contract floor pays their fan-out too; until dropped.
fn operator_watches(client: &Client, ns: &str) -> tokio::task::JoinHandle<()> {
    use kube::runtime::watcher;
    let kinds = KINDS.iter().map(|k| {
        watcher(api(client, ns, k), watcher::Config::default())
            .map(|_| ())
            .boxed()
    });
    let secrets = watcher(
        Api::<kube::core::PartialObjectMeta<Secret>>::namespaced(client.clone(), ns),
        watcher::Config::default(),
    )
    .map(|_| ())
    .boxed();
    let all = futures::stream::select_all(kinds.chain([secrets]));
    tokio::spawn(all.for_each(|_| async {}))
}

/// True when an object's Ready condition is True at its generation.
fn is_ready(o: &DynamicObject) -> bool {
    let s = &o.data["status"];
    s["conditions"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            c["type"] == "Ready"
                && c["status"] == "True"
                && c["observedGeneration"].as_i64() == o.metadata.generation
        })
    })
}

/// Counts the Ready objects of `apis` from one watch per kind (a poll listing the
/// whole fleet every second would load the API server the benchmark measures), and
/// returns once `want` are Ready.
async fn wait_ready(apis: &[Api<DynamicObject>], want: usize, timeout: Duration) -> Result<()> {
    use kube::runtime::{WatchStreamExt, watcher};
    let streams = apis.iter().enumerate().map(|(kind, api)| {
        watcher(api.clone(), watcher::Config::default())
            .touched_objects()
            .map(move |o| o.map(|o| (kind, o)))
            .boxed()
    });
    let mut events = futures::stream::select_all(streams);
    let mut ready = std::collections::HashSet::new();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    while ready.len() < want {
        let event = tokio::select! {
            _ = &mut deadline => return Err(format!("{} of {want} Ready after {timeout:?}", ready.len()).into()),
            event = events.next() => event,
        };
        let Some(event) = event else {
            return Err("the watches ended".into());
        };
        let Ok((kind, o)) = event else { continue };
        let key = (kind, o.metadata.name.clone().unwrap_or_default());
        if is_ready(&o) {
            ready.insert(key);
        } else {
            ready.remove(&key);
        }
    }
    Ok(())
}

fn proc_field(pid: u32, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// The servers of `hack/env.sh` this benchmark loads, named by their command line.
const SERVERS: [(&str, &str); 5] = [
    ("kube-apiserver", "kube-apiserver"),
    ("etcd (API server)", "--name etcd-cp"),
    ("etcd (platform)", "--name etcd-config"),
    ("postgres", "postgres"),
    ("redis", "redis-server"),
];

/// CPU seconds used so far by each of `SERVERS` (every such process on the machine:
/// run the benchmark alone), by this benchmark and by the operator (`pid`), so each
/// phase can say where the cores went; `None` for a process not found.
fn cpu_by_process(operator: Option<u32>) -> Vec<(&'static str, Option<f64>)> {
    let mut used: Vec<Option<f64>> = vec![None; SERVERS.len()];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let program = cmdline.split(' ').next().unwrap_or_default();
        let found = SERVERS.iter().position(|(_, needle)| {
            if needle.starts_with("--") {
                program.ends_with("/etcd") && cmdline.contains(needle)
            } else {
                program.ends_with(needle) || cmdline.starts_with(&format!("{needle}:"))
            }
        });
        if let (Some(i), Some(cpu)) = (found, cpu_seconds(pid)) {
            *used[i].get_or_insert(0.0) += cpu;
        }
    }
    let mut all: Vec<_> = SERVERS.iter().map(|(name, _)| *name).zip(used).collect();
    all.push(("benchmark client", cpu_seconds(std::process::id())));
    if let Some(pid) = operator {
        all.push(("operator", cpu_seconds(pid)));
    }
    all
}

/// The CPU each process used between two `cpu_by_process` samples, per object.
fn cpu_per_object(
    before: &[(&str, Option<f64>)],
    after: &[(&str, Option<f64>)],
    objects: usize,
) -> String {
    let mut total = 0.0;
    let mut parts: Vec<String> = after
        .iter()
        .zip(before)
        .map(|((name, b), (_, a))| match (a, b) {
            (Some(a), Some(b)) => {
                total += b - a;
                format!("{name} {:.2}", (b - a) * 1e3 / objects as f64)
            }
            _ => format!("{name} ? (not found)"),
        })
        .collect();
    parts.push(format!("total {:.2}", total * 1e3 / objects as f64));
    format!("{} (ms per object)", parts.join(", "))
}

/// The API server's requests so far (`apiserver_request_total`), by verb, resource
/// and subresource.
async fn api_requests(client: &Client) -> Result<std::collections::BTreeMap<String, f64>> {
    let request = axum::http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut out = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(&format!("{name}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
                .to_owned()
        };
        let subresource = label("subresource");
        let key = match subresource.as_str() {
            "" => format!("{} {}", label("verb"), label("resource")),
            sub => format!("{} {}/{sub}", label("verb"), label("resource")),
        };
        *out.entry(key).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

/// The requests made between two `api_requests` samples, per object (the main ones).
fn requests_per_object(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
    objects: usize,
) -> String {
    let mut per: Vec<(String, f64)> = after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (v - before.get(k).unwrap_or(&0.0)) / objects as f64,
            )
        })
        .filter(|(_, v)| *v >= 0.01)
        .collect();
    per.sort_by(|a, b| b.1.total_cmp(&a.1));
    // From +0.0: an empty sum of floats is -0.0, printed "-0.00".
    let total: f64 = per.iter().map(|(_, v)| v).fold(0.0, |a, b| a + b);
    let parts: Vec<String> = per.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
    format!("{total:.2} ({})", parts.join(", "))
}

async fn metrics(port: u16) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

/// Postgres statements by `pg_stat_statements`, when the server loads it (`hack/env.sh`
/// with `M3O_PG_STATEMENTS=1`, as `make bench` runs it); every figure is "?" otherwise.
struct Statements {
    available: bool,
}

impl Statements {
    /// Creates the extension and resets its counts: what follows is counted from now.
    async fn start(db: &sqlx::PgPool) -> Self {
        let created = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(db)
            .await;
        let reset = sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(db)
            .await;
        Self {
            available: created.is_ok() && reset.is_ok(),
        }
    }

    /// Every statement run in this database so far (BEGIN and COMMIT included).
    async fn calls(db: &sqlx::PgPool) -> Option<i64> {
        sqlx::query_scalar::<_, i64>(
            "SELECT sum(calls)::bigint FROM pg_stat_statements s \
             JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database()",
        )
        .fetch_one(db)
        .await
        .ok()
    }

    /// Statements per object since [`Statements::start`], and the most frequent ones
    /// with their calls and execution time per object: where Postgres spends its time.
    async fn top(&self, db: &sqlx::PgPool, objects: usize) -> String {
        self.top_per(db, objects as f64, "per object").await
    }

    /// Like [`Statements::top`], per `divisor` (named `per`).
    async fn top_per(&self, db: &sqlx::PgPool, divisor: f64, per_what: &str) -> String {
        if !self.available {
            return "? (pg_stat_statements not loaded: M3O_PG_STATEMENTS=1)".into();
        }
        let rows: std::result::Result<Vec<(String, i64, f64)>, _> = sqlx::query_as(
            "SELECT regexp_replace(left(query, 70), '\\s+', ' ', 'g'), calls::bigint, total_exec_time \
             FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
             WHERE d.datname = current_database() ORDER BY calls DESC",
        )
        .fetch_all(db)
        .await;
        let Ok(rows) = rows else {
            return "?".into();
        };
        let per = |v: f64| v / divisor;
        let calls: i64 = rows.iter().map(|r| r.1).sum();
        let time: f64 = rows.iter().map(|r| r.2).sum();
        let mut out = format!(
            "{:.2} statements {per_what}, {:.3} ms executing {per_what}",
            per(calls as f64),
            per(time)
        );
        for (query, calls, time) in rows.iter().take(14) {
            out.push_str(&format!(
                "\n    {:>5.2} calls {:>6.3} ms  {query}",
                per(*calls as f64),
                per(*time)
            ));
        }
        out
    }
}

fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// API-server writes (any verb but get, list and watch) between two samples, and what
/// they were.
fn api_writes(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
) -> (f64, String) {
    let writes: Vec<(String, f64)> = after
        .iter()
        .filter(|(k, _)| !["GET ", "LIST ", "WATCH "].iter().any(|v| k.starts_with(v)))
        .map(|(k, v)| (k.clone(), v - before.get(k).unwrap_or(&0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    // The API server's own: its identity Lease, renewed every 10 s, and the `kubernetes`
    // Service's endpoints. The operator runs here without leader election, so it writes
    // neither; they are listed apart, not counted.
    let own = |k: &str| k.ends_with(" leases") || k.ends_with(" endpoints");
    let list = |own_writes: bool| {
        writes
            .iter()
            .filter(|(k, _)| own(k) == own_writes)
            .map(|(k, v)| format!("{k} {v:.0}"))
            .collect::<Vec<_>>()
    };
    let listed = |writes: Vec<String>| match writes.is_empty() {
        true => "none".to_owned(),
        false => writes.join(", "),
    };
    let counted = writes
        .iter()
        .filter(|(k, _)| !own(k))
        .map(|(_, v)| v)
        .fold(0.0, |a, b| a + b);
    (
        counted,
        format!(
            "{} (the API server's own, not counted: {})",
            listed(list(false)),
            listed(list(true))
        ),
    )
}

/// Waits until a restarted operator (metrics on `port`, spawned at `started`) is
/// quiet: each kind compared in bulk at least once (after its first list) and no
/// reconcile for a second. Returns the time to quiet (without that second) and the
/// reconciles it ran.
async fn restart_quiet(port: u16, started: Instant) -> Result<(Duration, f64)> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last: Option<(f64, Instant)> = None;
    loop {
        if Instant::now() > deadline {
            return Err("the restarted operator was not quiet within 600 s".into());
        }
        let Ok(m) = metrics(port).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let compared = KINDS.iter().all(|k| {
            m.lines().any(|l| {
                l.starts_with(&format!(
                    "m3o_operator_object_resyncs_total{{kind=\"{k}\"}}"
                )) && !l.ends_with(" 0")
            })
        });
        let reconciles = metric_sum(&m, "m3o_operator_reconciles_total");
        match last {
            Some((r, since)) if compared && r == reconciles => {
                if since.elapsed() >= Duration::from_secs(1) {
                    return Ok((since - started, reconciles));
                }
            }
            _ => last = compared.then(|| (reconciles, Instant::now())),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One block (or unblock) of the probe key, timed until its etcd entry says so (read
/// from a watch on the entry, so the probe adds no load while it waits).
async fn block_latency(
    keys: &Api<DynamicObject>,
    etcd: &mut etcd_client::Client,
    entry_key: &str,
    blocked: bool,
) -> Result<Duration> {
    let want = if blocked { "blocked" } else { "active" };
    let status_of = |value: &[u8]| {
        serde_json::from_slice::<Value>(value)
            .ok()
            .and_then(|v| v["status"].as_str().map(str::to_owned))
    };
    let current = etcd.get(entry_key, None).await?;
    let revision = current.header().map_or(0, |h| h.revision());
    if current
        .kvs()
        .first()
        .and_then(|kv| status_of(kv.value()))
        .as_deref()
        == Some(want)
    {
        return Ok(Duration::ZERO);
    }
    let options = etcd_client::WatchOptions::new().with_start_revision(revision + 1);
    let mut stream = etcd.watch(entry_key, Some(options)).await?;
    let mut s = spec("ApiKey", 0);
    s["customerRef"]["name"] = json!("probe");
    s["blocked"] = json!(blocked);
    let started = Instant::now();
    apply(keys, "ApiKey", "probe", s).await?;
    let deadline = tokio::time::sleep(Duration::from_secs(120));
    tokio::pin!(deadline);
    loop {
        let message = tokio::select! {
            _ = &mut deadline => return Err("probe entry did not change within 120 s".into()),
            message = stream.message() => message?,
        };
        let Some(response) = message else {
            return Err("the etcd watch ended".into());
        };
        for event in response.events() {
            if event.kv().and_then(|kv| status_of(kv.value())).as_deref() == Some(want) {
                return Ok(started.elapsed());
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn latencies(mut all: Vec<Duration>) -> String {
    all.sort();
    format!(
        "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} changes",
        percentile(&all, 0.5).as_secs_f64() * 1e3,
        percentile(&all, 0.99).as_secs_f64() * 1e3,
        all.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        all.len()
    )
}

async fn new_namespace(client: &Client, ns: &str) -> Result<()> {
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = env_or("BENCH_N", 1000);
    let inflight: usize = env_or("BENCH_INFLIGHT", 32);
    // The operator's reconciles at once per kind (its `--concurrency`).
    let concurrency: u16 = env_or("BENCH_CONCURRENCY", 8);
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let client = Client::try_default().await?;
    let objects = 3 * n;

    // 1. The raw API-server rate of the same work.
    progress("raw rate");
    let raw_ns = format!("bench-raw-{id}");
    new_namespace(&client, &raw_ns).await?;
    let raw_cpu0 = cpu_by_process(None);
    let raw_requests0 = api_requests(&client).await?;
    let started = Instant::now();
    apply_fleet(&client, &raw_ns, n, inflight, Work::Raw).await?;
    let raw_rate = objects as f64 / started.elapsed().as_secs_f64();
    let raw_requests = requests_per_object(&raw_requests0, &api_requests(&client).await?, objects);
    let raw_cpu = cpu_per_object(&raw_cpu0, &cpu_by_process(None), objects);

    // 1b. The floor of the contract: every request the operator must make, no operator.
    progress("contract floor");
    let floor_ns = format!("bench-floor-{id}");
    new_namespace(&client, &floor_ns).await?;
    let watches = operator_watches(&client, &floor_ns);
    let floor_cpu0 = cpu_by_process(None);
    let floor_requests0 = api_requests(&client).await?;
    let started = Instant::now();
    apply_fleet(&client, &floor_ns, n, inflight, Work::Contract).await?;
    let floor_rate = objects as f64 / started.elapsed().as_secs_f64();
    let floor_requests =
        requests_per_object(&floor_requests0, &api_requests(&client).await?, objects);
    let floor_cpu = cpu_per_object(&floor_cpu0, &cpu_by_process(None), objects);
    watches.abort();
    // BENCH_FLOOR_ONLY=1: the raw rate and the floor, no operator.
    if std::env::var("BENCH_FLOOR_ONLY").as_deref() == Ok("1") {
        println!("raw API-server rate:           {raw_rate:.0} objects/s");
        println!("contract floor rate:           {floor_rate:.0} objects/s");
        println!("API requests per object, floor: {floor_requests}");
        println!("CPU, raw:                      {raw_cpu}");
        println!("CPU, contract floor:           {floor_cpu}");
        return Ok(());
    }

    // 2. The operator.
    progress("the operator: apply -> all Ready");
    let ns = format!("bench-{id}");
    new_namespace(&client, &ns).await?;
    let binary = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("m3o-operator"))
        .ok_or("no target dir")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let prefix = format!("/bench-{id}");
    let spawn_operator = || {
        tokio::process::Command::new(&binary)
            .args([
                "run",
                "--namespace",
                &ns,
                "--database-schema",
                &format!("bench_{id}"),
            ])
            .args([
                "--stream-prefix",
                &format!("bench-{id}:"),
                "--etcd-prefix",
                &prefix,
            ])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--resync-interval", &format!("{}s", RESYNC.as_secs())])
            .args(["--concurrency", &concurrency.to_string()])
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
    };
    let mut operator = spawn_operator()?;
    let pid = operator.id().ok_or("operator exited")?;
    let etcd_client =
        etcd_client::Client::connect(var("ETCD_ENDPOINTS")?.split(',').collect::<Vec<_>>(), None)
            .await?;
    let mut etcd = etcd_client.clone();

    // The probe: a customer and key of their own, Ready before the bulk apply.
    let (customers, keys) = (api(&client, &ns, "Customer"), api(&client, &ns, "ApiKey"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ok = apply(
            &customers,
            "Customer",
            "probe",
            json!({"email": "probe@bench.example.com"}),
        )
        .await;
        if ok.is_ok() || Instant::now() > deadline {
            ok?;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut probe_spec = spec("ApiKey", 0);
    probe_spec["customerRef"]["name"] = json!("probe");
    apply(&keys, "ApiKey", "probe", probe_spec).await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let key = loop {
        let secret = secrets.get_opt("probe-api-key").await?;
        if let Some(key) = secret.and_then(|s| s.data?.get("apiKey").map(|b| b.0.clone())) {
            break key;
        }
        if Instant::now() > deadline {
            return Err("the probe key was not issued within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let entry_key = format!(
        "{prefix}/{}",
        m3o_platform_contract::apikey_key(&hex::encode(Sha256::digest(&key)))
    );
    block_latency(&keys, &mut etcd, &entry_key, false).await?;

    let (stop, stopped) = watch::channel(false);
    let during_bulk = {
        let (keys, mut etcd, entry_key) = (keys.clone(), etcd.clone(), entry_key.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut blocked = true;
            while !*stopped.borrow() {
                match block_latency(&keys, &mut etcd, &entry_key, blocked).await {
                    Ok(d) => seen.push(d),
                    Err(e) => eprintln!("probe: {e}"),
                }
                blocked = !blocked;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            seen
        })
    };

    let db = sqlx::PgPool::connect(&var("DATABASE_URL")?).await?;
    let statements_kept = Statements::start(&db).await;
    let rss_before_bulk = proc_field(pid, "status", "VmRSS:");
    let bulk_cpu0 = cpu_seconds(pid);
    let bulk_all_cpu0 = cpu_by_process(Some(pid));
    let bulk_requests0 = api_requests(&client).await?;
    let started = Instant::now();
    apply_fleet(&client, &ns, n, inflight, Work::Apply).await?;
    let applied = started.elapsed();
    let apis: Vec<_> = KINDS.iter().map(|k| api(&client, &ns, k)).collect();
    // The probe's own customer and key are Ready too. Counted from the operator's
    // gauge (no load on the API server the benchmark measures), then confirmed from the
    // API server itself.
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let ready = metrics(port).await.map(|m| {
            m.lines()
                .filter(|l| {
                    l.starts_with("m3o_operator_resources{") && l.contains("ready=\"true\"")
                })
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum::<f64>()
        });
        if ready.is_ok_and(|r| r >= (objects + 2) as f64) {
            break;
        }
        if Instant::now() > deadline {
            return Err("not all Ready after an hour".into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_ready(&apis, objects + 2, Duration::from_secs(600)).await?;
    let all_ready = started.elapsed();
    let bulk_cpu = cpu_seconds(pid).zip(bulk_cpu0).map(|(b, a)| b - a);
    let bulk_all_cpu = cpu_per_object(&bulk_all_cpu0, &cpu_by_process(Some(pid)), objects);
    let bulk_requests =
        requests_per_object(&bulk_requests0, &api_requests(&client).await?, objects);
    let bulk_statements = statements_kept.top(&db, objects).await;
    let _ = stop.send(true);
    let bulk_latencies = during_bulk.await?;
    let rate = objects as f64 / all_ready.as_secs_f64();

    // 3. At rest, over one resync interval.
    progress("at rest");
    let at_rest_metrics = metrics(port).await?;
    let reconciles = metric_sum(&at_rest_metrics, "m3o_operator_reconciles_total");
    let xacts = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&db)
        .await
    };
    let revision = |etcd: etcd_client::Client| async move {
        let mut etcd = etcd;
        etcd.get("/", None)
            .await
            .map(|r| r.header().map(|h| h.revision()).unwrap_or_default())
    };
    // The first interval after all Ready compares in full every object that became
    // Ready since the last comparison; the next one is the fleet at rest. Both printed.
    let first_cpu0 = cpu_seconds(pid);
    tokio::time::sleep(RESYNC).await;
    let first_cpu = cpu_seconds(pid)
        .zip(first_cpu0)
        .map_or("?".into(), |(b, a)| {
            format!("{:.2} %", (b - a) / RESYNC.as_secs_f64() * 100.0)
        });
    let (cpu0, rev0, tx0) = (
        cpu_seconds(pid),
        revision(etcd.clone()).await?,
        xacts().await?,
    );
    let rest_kept = Statements::start(&db).await;
    tokio::time::sleep(RESYNC).await;
    let rest_statements = rest_kept.top_per(&db, 1.0, "in all").await;
    let (cpu1, rev1, tx1) = (
        cpu_seconds(pid),
        revision(etcd.clone()).await?,
        xacts().await?,
    );
    let mut rest_latencies = Vec::new();
    for i in 0..20 {
        rest_latencies.push(block_latency(&keys, &mut etcd, &entry_key, i % 2 == 0).await?);
    }
    let rss = proc_field(pid, "status", "VmHWM:");

    // 4. A restart over the provisioned fleet, nothing changed: SIGTERM, then a new
    // process, until quiet (every kind compared in bulk, no reconcile for a second).
    progress("restart");
    let _ = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    let _ = tokio::time::timeout(Duration::from_secs(30), operator.wait()).await;
    operator.kill().await.ok();
    let restart_requests0 = api_requests(&client).await?;
    let (restart_rev0, restart_tx0) = (revision(etcd.clone()).await?, xacts().await?);
    let restart_statements0 = Statements::calls(&db).await;
    let started = Instant::now();
    let mut operator = spawn_operator()?;
    let restart_pid = operator.id().ok_or("operator exited")?;
    let (quiet, restart_reconciles) = restart_quiet(port, started).await?;
    let restart_requests =
        requests_per_object(&restart_requests0, &api_requests(&client).await?, objects);
    let (restart_writes, restart_write_kinds) =
        api_writes(&restart_requests0, &api_requests(&client).await?);
    let (restart_rev1, restart_tx1) = (revision(etcd.clone()).await?, xacts().await?);
    let restart_statements = Statements::calls(&db)
        .await
        .zip(restart_statements0)
        .map_or("?".into(), |(b, a)| (b - a).to_string());
    let restart_rss = proc_field(restart_pid, "status", "VmHWM:");
    operator.kill().await?;

    let idle_cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) => format!("{:.2} %", (b - a) / RESYNC.as_secs_f64() * 100.0),
        _ => "?".into(),
    };
    println!(
        "objects:                       {objects} ({n} of each kind, {inflight} requests in flight, operator --concurrency {concurrency})"
    );
    println!("raw API-server rate:           {raw_rate:.0} objects/s (create + one status write)");
    println!(
        "apply -> all Ready:            {rate:.0} objects/s ({:.1} s; applied in {:.1} s)",
        all_ready.as_secs_f64(),
        applied.as_secs_f64()
    );
    println!(
        "operator CPU, apply -> Ready:  {}",
        bulk_cpu.map_or("?".into(), |c| format!(
            "{c:.1} s ({:.2} ms per object)",
            c * 1e3 / objects as f64
        ))
    );
    println!(
        "ratio to raw:                  {:.0} %",
        rate / raw_rate * 100.0
    );
    println!(
        "contract floor rate:           {floor_rate:.0} objects/s (the operator's requests, no operator: {:.0} % of raw)",
        floor_rate / raw_rate * 100.0
    );
    println!(
        "ratio to the contract floor:   {:.0} %",
        rate / floor_rate * 100.0
    );
    println!("API requests per object, raw:  {raw_requests}");
    println!("  contract floor:              {floor_requests}");
    println!("  apply -> all Ready:          {bulk_requests}");
    println!("CPU, raw:                      {raw_cpu}");
    println!("CPU, contract floor:           {floor_cpu}");
    println!("CPU, apply -> all Ready:       {bulk_all_cpu}");
    println!(
        "operator peak RSS:             {} ({} per object; {} per object above the RSS before the bulk apply)",
        rss.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
        rss.map_or("?".into(), |k| format!(
            "{:.1} KiB",
            k as f64 / objects as f64
        )),
        rss.zip(rss_before_bulk)
            .map_or("?".into(), |(k, b)| format!(
                "{:.1} KiB",
                k.saturating_sub(b) as f64 / objects as f64
            ))
    );
    println!("Postgres, apply -> all Ready:  {bulk_statements}");
    let by_kind = |name: &str| {
        KINDS
            .iter()
            .map(|k| {
                let n = metric_sum(&at_rest_metrics, &format!("{name}{{kind=\"{k}\""));
                format!("{k} {:.2}", n / (objects / KINDS.len() + 1) as f64)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "reconciles per object:         {:.2} ({}; errors: {})",
        reconciles / (objects + 2) as f64,
        by_kind("m3o_operator_reconciles_total"),
        by_kind("m3o_operator_reconcile_errors_total"),
    );
    println!(
        "idle CPU over {} s at rest:    {idle_cpu} (the {0} s before, the first after all Ready: {first_cpu})",
        RESYNC.as_secs()
    );
    println!(
        "etcd writes over {} s at rest: {}",
        RESYNC.as_secs(),
        rev1 - rev0
    );
    println!(
        "Postgres transactions, {} s:   {} (one resync interval; {n} customers)",
        RESYNC.as_secs(),
        tx1 - tx0
    );
    println!("  statements:                  {rest_statements}");
    println!(
        "restart over the fleet:        quiet after {:.2} s, {restart_reconciles:.0} reconciles, {restart_writes:.0} API writes, {} etcd revisions, {} Postgres transactions and {restart_statements} statements (all processes), peak RSS {}",
        quiet.as_secs_f64(),
        restart_rev1 - restart_rev0,
        restart_tx1 - restart_tx0,
        restart_rss.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
    );
    println!("  API writes:                  {restart_write_kinds}");
    println!("  API requests per object:     {restart_requests}");
    println!(
        "block -> etcd, during bulk:    {}",
        latencies(bulk_latencies)
    );
    println!(
        "block -> etcd, at rest:        {}",
        latencies(rest_latencies)
    );
    Ok(())
}
