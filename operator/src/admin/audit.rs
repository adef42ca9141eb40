//! `m3o-operator audit`: the comparison of `inspect` for the whole fleet, streamed so
//! that it works on tens of thousands of objects:
//!
//! 1. every Customer, Subscription and ApiKey, listed a page at a time (limit +
//!    continue); an ApiKey's Secret is checked against its recorded key hashes;
//! 2. every live row, read a page at a time (keyset pagination), must belong to an
//!    object, and every Ready object must have one;
//! 3. every etcd key under the prefix (range pages at one revision) is merged, in key
//!    order, with every key Postgres implies (pages of `desired::desired_page`).
//!
//! Only the identities of the objects (kind, namespace, name) are held for step 2;
//! everything else is held a page at a time.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::{Api, Resource, ResourceExt};
use m3o_controllers::apikey::secret as key_secret;
use m3o_controllers::platform::desired;
use m3o_controllers::platform::scan::{FleetScan, ScanError};
use m3o_controllers::store::api_keys;
use m3o_crds::{ApiKey, Customer, Subscription};
use serde::Serialize;
use sqlx::PgPool;

use super::compare::{EntryVerdict, check_entry, check_secret};
use super::{Backends, print_json};
use crate::cli::{AuditArgs, OutputFormat};
use crate::startup::StartupError;

/// Secrets read at once while checking a page of ApiKeys.
const SECRET_READS: usize = 16;

/// Counts of one kind.
#[derive(Serialize, Debug, Default, Clone)]
#[serde(rename_all = "camelCase")]
pub struct KindSummary {
    pub objects: u64,
    pub not_ready: u64,
    pub rows: u64,
    pub findings: u64,
}

/// Counts of the etcd comparison, by verdict.
#[derive(Serialize, Debug, Default, Clone)]
pub struct KeySummary {
    pub scanned: u64,
    pub verdicts: BTreeMap<EntryVerdict, u64>,
}

/// Something that is not as it should be.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `Kind namespace/name` of the object concerned, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// What is wrong.
    pub what: String,
}

#[derive(Serialize, Debug, Default)]
pub struct Report {
    pub kinds: BTreeMap<String, KindSummary>,
    pub etcd: KeySummary,
    pub findings: Vec<Finding>,
    pub clean: bool,
}

/// Identity of an object, and what was seen of it.
#[derive(Hash, PartialEq, Eq, Clone, Debug)]
struct ObjectKey {
    kind: &'static str,
    namespace: String,
    name: String,
}

#[derive(Default, Clone, Copy)]
struct Seen {
    ready: bool,
    has_row: bool,
}

struct Audit<'a> {
    backends: &'a Backends,
    namespace: Option<String>,
    page: i64,
    objects: HashMap<ObjectKey, Seen>,
    report: Report,
}

/// Runs the audit; `Ok(true)` when everything is in sync.
pub async fn run(args: AuditArgs) -> Result<bool, StartupError> {
    let backends = Backends::connect(&args.backends).await?;
    let mut audit = Audit {
        backends: &backends,
        namespace: Some(args.namespace.clone()).filter(|n| !n.is_empty()),
        page: args.page_size,
        objects: HashMap::new(),
        report: Report::default(),
    };
    audit.objects::<Customer>().await?;
    audit.objects::<Subscription>().await?;
    audit.objects::<ApiKey>().await?;
    for table in TABLES {
        audit.rows(table).await?;
    }
    audit.objects_without_rows();
    audit.etcd().await?;
    let mut report = audit.report;
    report.clean = report.findings.is_empty();
    match args.output {
        OutputFormat::Json => print_json(&report)?,
        OutputFormat::Text => print!("{}", render(&report)),
    }
    Ok(report.clean)
}

fn db_error(e: sqlx::Error) -> StartupError {
    StartupError(format!("--database-url: {e}"))
}

fn scan_error(e: ScanError) -> StartupError {
    match e {
        ScanError::Database(e) => db_error(e),
        ScanError::ConfigStore(e) => StartupError(format!("--etcd-endpoints: {e}")),
    }
}

fn kube_error(what: &str) -> impl FnOnce(kube::Error) -> StartupError + '_ {
    move |e| StartupError(format!("--kubeconfig: cannot {what}: {e}"))
}

/// Whether an object's Ready condition is True for its current generation.
fn is_ready(object: &impl Serialize, generation: Option<i64>) -> bool {
    let json = serde_json::to_value(object).unwrap_or_default();
    let status = &json["status"];
    let current = status["observedGeneration"].as_i64() == generation;
    let ready = status["conditions"].as_array().is_some_and(|list| {
        list.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    });
    current && ready
}

/// A table whose live rows each belong to an object of `kind`.
struct Table {
    name: &'static str,
    kind: &'static str,
    live: &'static str,
}

const TABLES: [Table; 3] = [
    Table {
        name: "customers",
        kind: "Customer",
        live: "deleted_at IS NULL",
    },
    Table {
        name: "subscriptions",
        kind: "Subscription",
        live: "cancelled_at IS NULL",
    },
    Table {
        name: "api_keys",
        kind: "ApiKey",
        live: "revoked_at IS NULL",
    },
];

impl Audit<'_> {
    fn find(&mut self, object: Option<String>, what: String) {
        if let Some(kind) = object.as_deref().and_then(|o| o.split(' ').next())
            && let Some(summary) = self.report.kinds.get_mut(kind)
        {
            summary.findings += 1;
        }
        self.report.findings.push(Finding { object, what });
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.backends.kube.clone(), ns),
            None => Api::all(self.backends.kube.clone()),
        }
    }

    /// Step 1: lists a kind a page at a time.
    async fn objects<K: Audited>(&mut self) -> Result<(), StartupError> {
        let kind = K::KIND;
        self.report.kinds.entry(kind.to_owned()).or_default();
        let api = self.api::<K>();
        let what = format!("list {}", K::plural(&()));
        let mut params = ListParams::default().limit(u32::try_from(self.page).unwrap_or(500));
        loop {
            let list = api.list(&params).await.map_err(kube_error(&what))?;
            for object in &list.items {
                let ready = is_ready(object, object.meta().generation);
                let summary = self.report.kinds.entry(kind.to_owned()).or_default();
                summary.objects += 1;
                summary.not_ready += u64::from(!ready);
                let key = ObjectKey {
                    kind,
                    namespace: object.namespace().unwrap_or_default(),
                    name: object.name_any(),
                };
                self.objects.insert(
                    key,
                    Seen {
                        ready,
                        has_row: false,
                    },
                );
            }
            self.secrets(K::api_keys(&list.items)).await?;
            match list.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(()),
            }
        }
    }

    /// The Secrets of a page of ApiKeys that were issued a key.
    async fn secrets(&mut self, page: &[ApiKey]) -> Result<(), StartupError> {
        if page.is_empty() {
            return Ok(());
        }
        let namespaces: Vec<String> = page
            .iter()
            .map(|k| k.namespace().unwrap_or_default())
            .collect();
        let names: Vec<String> = page.iter().map(ResourceExt::name_any).collect();
        let rows = api_keys::all_for_resources(&self.backends.db, &namespaces, &names)
            .await
            .map_err(db_error)?;
        let kube = self.backends.kube.clone();
        let checks: Vec<_> = futures::stream::iter(page)
            .map(|key| {
                let kube = kube.clone();
                let ns = key.namespace().unwrap_or_default();
                let rows: Vec<_> = rows
                    .iter()
                    .filter(|r| r.k8s_namespace == ns && r.k8s_name == key.name_any())
                    .cloned()
                    .collect();
                async move {
                    if rows.iter().all(|r| r.revoked_at.is_some()) {
                        return Ok(None);
                    }
                    let name = key_secret::secret_name(key);
                    let secret = Api::<Secret>::namespaced(kube, &ns).get_opt(&name).await?;
                    let check = check_secret(&name, secret.as_ref(), &rows);
                    Ok::<_, kube::Error>(Some((format!("ApiKey {ns}/{}", key.name_any()), check)))
                }
            })
            .buffered(SECRET_READS)
            .try_collect()
            .await
            .map_err(kube_error("read Secrets"))?;
        for (object, check) in checks.into_iter().flatten() {
            if check.verdict.is_drift() {
                let what = format!("Secret {} {}", check.name, check.verdict.as_str());
                self.find(Some(object), what);
            }
        }
        Ok(())
    }

    /// Step 2: every live row of a table, a page at a time.
    async fn rows(&mut self, table: Table) -> Result<(), StartupError> {
        let mut after: Option<(String, String, String)> = None;
        loop {
            let page = row_page(
                &self.backends.db,
                &table,
                self.namespace.as_deref(),
                after.as_ref(),
                self.page,
            )
            .await
            .map_err(db_error)?;
            let full = i64::try_from(page.len()).unwrap_or(i64::MAX) >= self.page;
            for (namespace, name, id) in &page {
                let key = ObjectKey {
                    kind: table.kind,
                    namespace: namespace.clone(),
                    name: name.clone(),
                };
                if let Some(summary) = self.report.kinds.get_mut(table.kind) {
                    summary.rows += 1;
                }
                match self.objects.get_mut(&key) {
                    Some(seen) => seen.has_row = true,
                    None => self.find(
                        None,
                        format!(
                            "{} row {id} belongs to {} {namespace}/{name}, which does not exist \
                             (deleted with deletionPolicy Orphan, or by hand)",
                            table.name, table.kind
                        ),
                    ),
                }
            }
            match page.into_iter().last() {
                Some(last) if full => after = Some(last),
                _ => return Ok(()),
            }
        }
    }

    fn objects_without_rows(&mut self) {
        let mut missing: Vec<String> = self
            .objects
            .iter()
            .filter(|(_, seen)| seen.ready && !seen.has_row)
            .map(|(k, _)| format!("{} {}/{}", k.kind, k.namespace, k.name))
            .collect();
        missing.sort();
        for object in missing {
            self.find(
                Some(object),
                "Ready but has no live Postgres row".to_owned(),
            );
        }
    }

    /// Step 3: etcd against Postgres, merged in key order.
    async fn etcd(&mut self) -> Result<(), StartupError> {
        let platform = self.backends.platform()?;
        let mut scan = FleetScan::new(&self.backends.db, platform, self.page);
        let mut suspects = Vec::new();
        while let Some(keys) = scan.next_keys().await.map_err(scan_error)? {
            for (relative, entry, actual) in keys {
                let check = check_entry(platform.key(&relative), entry.as_ref(), actual.as_deref());
                self.report.etcd.scanned += 1;
                if check.verdict.is_drift() {
                    suspects.push(relative);
                } else {
                    *self.report.etcd.verdicts.entry(check.verdict).or_default() += 1;
                }
            }
        }
        self.recheck(suspects).await
    }

    /// Compares each differing key again, alone: Postgres and etcd are read apart, so a
    /// change committed between the two scans (a running operator's) looks like drift
    /// once; what differs again is reported.
    async fn recheck(&mut self, suspects: Vec<String>) -> Result<(), StartupError> {
        let platform = self.backends.platform()?;
        let mut conn = self.backends.db.acquire().await.map_err(db_error)?;
        for relative in suspects {
            let entry = desired::desired_for(&mut conn, &relative)
                .await
                .map_err(db_error)?;
            let key = platform.key(&relative);
            let actual = platform
                .get(&key)
                .await
                .map_err(|e| StartupError(format!("--etcd-endpoints: {e}")))?;
            let check = check_entry(key, entry.as_ref(), actual.as_deref());
            *self.report.etcd.verdicts.entry(check.verdict).or_default() += 1;
            let elsewhere = entry
                .as_ref()
                .is_some_and(|e| self.namespace.is_some() && e.owner.namespace != self.namespace);
            if check.verdict.is_drift() && !elsewhere {
                let what = match check.verdict {
                    EntryVerdict::Unowned => format!("etcd {} is owned by no record", check.key),
                    v => format!("etcd {} {}", check.key, v.as_str()),
                };
                self.find(check.owner, what);
            }
        }
        Ok(())
    }
}

/// A kind the audit lists.
trait Audited:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Serialize
{
    const KIND: &'static str;

    /// The ApiKeys of a page, whose Secrets are checked.
    fn api_keys(_page: &[Self]) -> &[ApiKey] {
        &[]
    }
}

impl Audited for Customer {
    const KIND: &'static str = "Customer";
}

impl Audited for Subscription {
    const KIND: &'static str = "Subscription";
}

impl Audited for ApiKey {
    const KIND: &'static str = "ApiKey";

    fn api_keys(page: &[Self]) -> &[ApiKey] {
        page
    }
}

/// A page of a table's live rows' (namespace, name, id), in that order after `after`.
async fn row_page(
    db: &PgPool,
    table: &Table,
    namespace: Option<&str>,
    after: Option<&(String, String, String)>,
    limit: i64,
) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    let (ns, name, id) = after.cloned().unwrap_or_default();
    sqlx::query_as(&format!(
        "SELECT k8s_namespace, k8s_name, id::text FROM {} WHERE {} \
         AND ($1::text IS NULL OR k8s_namespace = $1) \
         AND (k8s_namespace, k8s_name, id::text) > ($2, $3, $4) \
         ORDER BY k8s_namespace, k8s_name, id::text LIMIT $5",
        table.name, table.live
    ))
    .bind(namespace)
    .bind(ns)
    .bind(name)
    .bind(id)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The human output: a summary table, then each finding.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "{:<14} {:>8} {:>10} {:>8} {:>9}",
        "KIND", "OBJECTS", "NOT READY", "ROWS", "FINDINGS"
    );
    for (kind, s) in &report.kinds {
        let _ = writeln!(
            w,
            "{kind:<14} {:>8} {:>10} {:>8} {:>9}",
            s.objects, s.not_ready, s.rows, s.findings
        );
    }
    let verdicts: Vec<String> = report
        .etcd
        .verdicts
        .iter()
        .map(|(v, n)| format!("{n} {}", v.as_str()))
        .collect();
    let _ = writeln!(
        w,
        "etcd keys: {} compared: {}",
        report.etcd.scanned,
        verdicts.join(", ")
    );
    if report.findings.is_empty() {
        let _ = writeln!(w, "audit: clean");
    } else {
        let _ = writeln!(w, "audit: {} finding(s):", report.findings.len());
        for f in &report.findings {
            match &f.object {
                Some(object) => writeln!(w, "  {object}: {}", f.what),
                None => writeln!(w, "  {}", f.what),
            }
            .unwrap_or_default();
        }
    }
    out
}
