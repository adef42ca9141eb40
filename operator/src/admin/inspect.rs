//! `m3o-operator inspect customer|subscription|apikey NAME -n NS`: one resource's whole
//! story: spec and conditions, its Postgres rows, the etcd entries derived from them
//! (each with a verdict), its Secret, and its latest events on the stream and in the
//! outbox.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Resource, ResourceExt};
use m3o_controllers::apikey::secret as key_secret;
use m3o_controllers::platform::desired::{self, DesiredEntry};
use m3o_controllers::store::{api_keys, customers, subscriptions};
use m3o_crds::{ApiKey, Customer, Subscription};
use m3o_platform_contract::{apikey_key, customer_key, quota_key};
use serde::Serialize;
use uuid::Uuid;

use super::compare::{EntryCheck, SecretCheck, Subject, check_entry, check_secret};
use super::events::{Delivery, OutboxEvent, StreamEvent, from_outbox, from_stream};
use super::{Backends, Section, print_json, redis};

mod render;
use crate::cli::{InspectArgs, InspectKind, OutputFormat};
use crate::startup::StartupError;
pub use render::render;

/// Everything `inspect` found.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub spec: serde_json::Value,
    pub status: serde_json::Value,
    /// The rows of the resource, as stored (key hashes only).
    pub postgres: Section<Vec<serde_json::Value>>,
    pub etcd: Section<Vec<EntryCheck>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<Section<SecretCheck>>,
    pub stream: Section<Vec<StreamEvent>>,
    pub outbox: Section<Vec<OutboxEvent>>,
    /// What is not as it should be, one line each; empty when all is in sync.
    pub problems: Vec<String>,
}

/// What a kind contributes to the report once its rows are read.
struct Found {
    rows: Vec<serde_json::Value>,
    /// Relative etcd keys and their desired entries.
    desired: Vec<(String, Option<DesiredEntry>)>,
    subject: Option<Subject>,
    outbox_ids: Vec<String>,
    secret: Option<SecretCheck>,
}

pub async fn run(args: InspectArgs) -> Result<(), StartupError> {
    let backends = Backends::connect(&args.backends).await?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| backends.kube.default_namespace().to_owned());
    let report = match args.kind {
        InspectKind::Customer => inspect::<Customer>(&backends, &args, &namespace).await?,
        InspectKind::Subscription => inspect::<Subscription>(&backends, &args, &namespace).await?,
        InspectKind::ApiKey => inspect::<ApiKey>(&backends, &args, &namespace).await?,
    };
    match args.output {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Text => {
            print!("{}", render(&report));
            Ok(())
        }
    }
}

/// How a kind finds its rows, derived keys and events.
trait Inspected:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Serialize
{
    async fn find(backends: &Backends, object: &Self) -> Result<Found, FindError>;
}

/// Why a kind's rows or Secret could not be read.
#[derive(Debug, thiserror::Error)]
enum FindError {
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
}

async fn inspect<K: Inspected>(
    backends: &Backends,
    args: &InspectArgs,
    namespace: &str,
) -> Result<Report, StartupError> {
    let kind = K::kind(&()).into_owned();
    let api: Api<K> = Api::namespaced(backends.kube.clone(), namespace);
    let object = api
        .get_opt(&args.name)
        .await
        .map_err(|e| StartupError(format!("cannot read {kind} {namespace}/{}: {e}", args.name)))?
        .ok_or_else(|| StartupError(format!("{kind} {namespace}/{} not found", args.name)))?;
    let json = serde_json::to_value(&object).unwrap_or_default();
    let found = K::find(backends, &object).await;
    let (postgres, etcd, secret, subject, outbox_ids) = match found {
        Ok(found) => (
            Section::Read(found.rows),
            Section::from_result(etcd_checks(backends, &found.desired).await),
            found.secret.map(Section::Read),
            found.subject,
            found.outbox_ids,
        ),
        Err(e) => (
            Section::Unavailable {
                error: e.to_string(),
            },
            Section::Unavailable {
                error: e.to_string(),
            },
            None,
            None,
            Vec::new(),
        ),
    };
    let (stream, outbox) = match subject {
        Some(subject) => (
            Section::from_result(stream_events(backends, args, &subject).await),
            Section::from_result(
                from_outbox(&backends.db, &outbox_ids, &subject, args.events)
                    .await
                    .map_err(|e| format!("postgres: {e}")),
            ),
        ),
        None => (Section::Read(Vec::new()), Section::Read(Vec::new())),
    };
    let mut report = Report {
        kind,
        namespace: namespace.to_owned(),
        name: args.name.clone(),
        generation: object.meta().generation,
        spec: json["spec"].clone(),
        status: json["status"].clone(),
        postgres,
        etcd,
        secret,
        stream,
        outbox,
        problems: Vec::new(),
    };
    report.problems = problems(&report);
    Ok(report)
}

async fn etcd_checks(
    backends: &Backends,
    desired: &[(String, Option<DesiredEntry>)],
) -> Result<Vec<EntryCheck>, String> {
    let platform = backends.platform.as_ref().map_err(Clone::clone)?;
    let mut out = Vec::new();
    for (relative, entry) in desired {
        let key = platform.key(relative);
        let actual = platform.get(&key).await.map_err(|e| format!("etcd: {e}"))?;
        out.push(check_entry(key, entry.as_ref(), actual.as_deref()));
    }
    Ok(out)
}

async fn stream_events(
    backends: &Backends,
    args: &InspectArgs,
    subject: &Subject,
) -> Result<Vec<StreamEvent>, String> {
    let mut conn = redis(&args.backends.redis).await?;
    let key = m3o_events::stream_key(&backends.stream_prefix, m3o_events::customers::TOPIC);
    from_stream(
        &mut conn,
        &key,
        subject,
        args.events,
        args.stream_scan_limit,
    )
    .await
    .map_err(|e| format!("redis XREVRANGE {key}: {e}"))
}

fn to_json(row: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(row).unwrap_or_default()
}

impl Inspected for Customer {
    async fn find(backends: &Backends, object: &Self) -> Result<Found, FindError> {
        let (ns, name) = (object.namespace().unwrap_or_default(), object.name_any());
        let row = match customers::live_by_k8s_ref(&backends.db, &ns, &name).await? {
            Some(row) => Some(row),
            None => customers::latest_by_k8s_ref(&backends.db, &ns, &name).await?,
        };
        let Some(row) = row.clone().filter(|r| r.deleted_at.is_none()) else {
            return Ok(Found {
                rows: row.iter().map(to_json).collect(),
                desired: Vec::new(),
                subject: None,
                outbox_ids: Vec::new(),
                secret: None,
            });
        };
        let mut conn = backends.db.acquire().await?;
        let desired = desired::customer_keys(&mut conn, row.id, chrono::Utc::now())
            .await?
            .entries;
        let keys = api_keys::all_for_customer(&mut *conn, row.id).await?;
        let mut outbox_ids = vec![row.id.to_string()];
        outbox_ids.extend(keys.iter().map(|k| k.id.to_string()));
        Ok(Found {
            rows: vec![to_json(&row)],
            desired,
            subject: Some(Subject::Customer {
                id: row.id.to_string(),
            }),
            outbox_ids,
            secret: None,
        })
    }
}

impl Inspected for Subscription {
    async fn find(backends: &Backends, object: &Self) -> Result<Found, FindError> {
        let (ns, name) = (object.namespace().unwrap_or_default(), object.name_any());
        let row = subscriptions::live_by_k8s_ref(&backends.db, &ns, &name).await?;
        let customer_id = row.as_ref().map(|r| r.customer_id).or_else(|| {
            let status = object.status.as_ref()?;
            Uuid::parse_str(status.customer_id.as_deref()?).ok()
        });
        let Some(customer_id) = customer_id else {
            return Ok(Found {
                rows: Vec::new(),
                desired: Vec::new(),
                subject: None,
                outbox_ids: Vec::new(),
                secret: None,
            });
        };
        let mut conn = backends.db.acquire().await?;
        let mut desired = Vec::new();
        for key in [quota_key(customer_id), customer_key(customer_id)] {
            let entry = desired::desired_for(&mut conn, &key).await?;
            desired.push((key, entry));
        }
        Ok(Found {
            rows: row.iter().map(to_json).collect(),
            desired,
            subject: Some(Subject::Subscription {
                customer_id: customer_id.to_string(),
            }),
            outbox_ids: vec![customer_id.to_string()],
            secret: None,
        })
    }
}

impl Inspected for ApiKey {
    async fn find(backends: &Backends, object: &Self) -> Result<Found, FindError> {
        let (ns, name) = (object.namespace().unwrap_or_default(), object.name_any());
        let rows = api_keys::all_for_resource(&backends.db, &ns, &name).await?;
        let mut conn = backends.db.acquire().await?;
        let mut desired = Vec::new();
        for row in &rows {
            let key = apikey_key(&row.key_hash);
            let entry = desired::desired_for(&mut conn, &key).await?;
            desired.push((key, entry));
        }
        let secret_name = key_secret::secret_name(object);
        let secrets: Api<Secret> = Api::namespaced(backends.kube.clone(), &ns);
        let secret = secrets.get_opt(&secret_name).await?;
        let secret = check_secret(&secret_name, secret.as_ref(), &rows);
        let key_ids: Vec<String> = rows.iter().map(|r| r.id.to_string()).collect();
        Ok(Found {
            rows: rows.iter().map(to_json).collect(),
            desired,
            subject: Some(Subject::ApiKey {
                key_ids: key_ids.clone(),
            }),
            outbox_ids: key_ids,
            secret: Some(secret),
        })
    }
}

/// One line per thing that is not as it should be.
fn problems(report: &Report) -> Vec<String> {
    let mut out = Vec::new();
    let ready = conditions(&report.status)
        .into_iter()
        .find(|c| c.0 == "Ready");
    if let Some((_, status, reason, _)) = &ready
        && status != "True"
    {
        out.push(format!("not Ready: {reason}"));
    }
    if let Section::Read(rows) = &report.postgres
        && rows.is_empty()
        && ready.as_ref().is_some_and(|r| r.1 == "True")
    {
        out.push("Ready but no Postgres row".to_owned());
    }
    if let Section::Read(entries) = &report.etcd {
        for e in entries.iter().filter(|e| e.verdict.is_drift()) {
            out.push(format!("etcd {} {}", e.key, e.verdict.as_str()));
        }
    }
    if let Some(Section::Read(secret)) = &report.secret
        && secret.verdict.is_drift()
    {
        out.push(format!(
            "Secret {} {}",
            secret.name,
            secret.verdict.as_str()
        ));
    }
    if let Section::Read(events) = &report.outbox {
        for e in events.iter().filter(|e| e.delivery == Delivery::Parked) {
            out.push(format!("outbox event {} ({}) parked", e.id, e.event_type));
        }
    }
    for (what, section) in [
        ("etcd", error_of(&report.etcd)),
        ("stream", error_of(&report.stream)),
        ("postgres", error_of(&report.postgres)),
    ] {
        if let Some(error) = section {
            out.push(format!("{what} unavailable: {error}"));
        }
    }
    out
}

fn error_of<T>(section: &Section<T>) -> Option<&str> {
    match section {
        Section::Read(_) => None,
        Section::Unavailable { error } => Some(error),
    }
}

/// (type, status, reason, message) of each condition in a status.
pub(super) fn conditions(status: &serde_json::Value) -> Vec<(String, String, String, String)> {
    let field = |c: &serde_json::Value, name: &str| c[name].as_str().unwrap_or("").to_owned();
    status["conditions"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|c| {
                    (
                        field(c, "type"),
                        field(c, "status"),
                        field(c, "reason"),
                        field(c, "message"),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
