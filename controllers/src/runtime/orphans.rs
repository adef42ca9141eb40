//! Recovery rule (DESIGN section 4): the custom resources are the desired state. After a
//! restore from an older backup, a live record whose resource is gone (deleted after
//! the backup was taken) is retired as if deleted now: keys revoked (DeleteKey),
//! subscriptions cancelled, customers deleted, each with its event, and the etcd
//! entries re-derived. Records that deletionPolicy Orphan kept are marked
//! (`orphaned_at`) and left alone. Run once per term, once the caches have listed.

use std::collections::{BTreeSet, HashSet};

use kube::api::ListParams;
use kube::{Api, Resource};
use m3o_crds::{ApiKey, Customer, Subscription};
use serde::de::DeserializeOwned;

use crate::report::error::Error;
use crate::report::lifecycle;
use crate::runtime::context::Context;
use crate::store::orphans::{self, LiveRecord, PAGE, Table};

/// A resource by namespace and name.
type Named = (String, String);

/// The records of a page whose resource is not among `live` (pure). Records without a
/// resource name (written before resources named them) are never retired here.
pub fn retired<'a>(records: &'a [LiveRecord], live: &HashSet<Named>) -> Vec<&'a LiveRecord> {
    records
        .iter()
        .filter(|r| !r.k8s_name.is_empty())
        .filter(|r| !live.contains(&(r.k8s_namespace.clone(), r.k8s_name.clone())))
        .collect()
}

/// How often to look whether every controller has listed, and to retry after an error.
const POLL: std::time::Duration = std::time::Duration::from_millis(250);
const RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Once every controller is watching (their caches listed: the resources are known),
/// retires the records of resources that are gone, retrying on errors; then stays idle
/// for the rest of the term (a supervised task that ends stops the process).
pub async fn run(ctx: std::sync::Arc<Context>) {
    while !ctx.watching.all() {
        tokio::time::sleep(POLL).await;
    }
    loop {
        match retire_gone(&ctx).await {
            Ok(_) => break,
            Err(err) => {
                tracing::warn!(%err, "retiring the records of resources that are gone failed; retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
    std::future::pending::<()>().await;
}

/// Retires the records of resources that are gone; how many resources it retired.
/// Keys first, then subscriptions, then customers (a customer's retirement reads its
/// subscription); then the etcd entries of every customer touched.
pub async fn retire_gone(ctx: &Context) -> Result<usize, Error> {
    if ctx.settings.shard.is_some() {
        // A shard sees only its own resources: the others' records would look gone.
        tracing::info!(
            "sharded (--shard-selector): records of deleted resources are retired by their cleanup only"
        );
        return Ok(0);
    }
    let mut touched = BTreeSet::new();
    let mut count = 0;
    count += retire_table::<ApiKey>(ctx, Table::ApiKeys, &mut touched).await?;
    count += retire_table::<Subscription>(ctx, Table::Subscriptions, &mut touched).await?;
    count += retire_table::<Customer>(ctx, Table::Customers, &mut touched).await?;
    lifecycle::converge_customers(ctx, touched).await?;
    if count > 0 {
        tracing::warn!(
            resources = count,
            "retired records whose resource is gone (restored from an older backup?), as if deleted now"
        );
    }
    tracing::info!(
        retired = count,
        "compared the live records with the resources"
    );
    Ok(count)
}

async fn retire_table<K>(
    ctx: &Context,
    table: Table,
    touched: &mut BTreeSet<uuid::Uuid>,
) -> Result<usize, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let live = resource_names::<K>(ctx).await?;
    let namespace = ctx.settings.namespace.as_deref();
    let mut done: HashSet<Named> = HashSet::new();
    let mut after = None;
    loop {
        let page = orphans::live_page(&ctx.db, table, namespace, after).await?;
        after = page.last().map(|r| r.id);
        for record in retired(&page, &live) {
            let named = (record.k8s_namespace.clone(), record.k8s_name.clone());
            if done.contains(&named) {
                touched.insert(record.customer_id);
                continue;
            }
            // Created since the list? Its record exists only once the resource does, so
            // a read now tells.
            let api: Api<K> = Api::namespaced(ctx.client.clone(), &named.0);
            if api.get_metadata_opt(&named.1).await?.is_some() {
                continue;
            }
            retire(ctx, table, &named).await?;
            tracing::info!(kind = %K::kind(&()), namespace = %named.0, name = %named.1, "retired the record of a resource that is gone");
            touched.insert(record.customer_id);
            done.insert(named);
        }
        if (page.len() as i64) < PAGE {
            return Ok(done.len());
        }
    }
}

/// Does what the resource's cleanup under deletionPolicy Delete does to its records.
async fn retire(ctx: &Context, table: Table, (ns, name): &Named) -> Result<(), Error> {
    match table {
        Table::ApiKeys => crate::apikey::reconcile::revoke_rows(ctx, None, ns, name).await,
        Table::Subscriptions => crate::subscription::cleanup::cancel_own(ctx, ns, name)
            .await
            .map(|_| ()),
        Table::Customers => crate::customer::cleanup::mark_deleted(ctx, ns, name)
            .await
            .map(|_| ()),
    }
}

/// Every resource of `K` in scope, listed [`PAGE`] at a time (metadata only).
async fn resource_names<K>(ctx: &Context) -> Result<HashSet<Named>, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = crate::runtime::runner::scoped_api(ctx);
    let mut names = HashSet::new();
    let mut params = ListParams::default().limit(PAGE as u32);
    loop {
        let list = api.list_metadata(&params).await?;
        for item in &list.items {
            let meta = &item.metadata;
            if let (Some(ns), Some(name)) = (&meta.namespace, &meta.name) {
                names.insert((ns.clone(), name.clone()));
            }
        }
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(names),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ns: &str, name: &str) -> LiveRecord {
        LiveRecord {
            id: uuid::Uuid::new_v4(),
            customer_id: uuid::Uuid::new_v4(),
            k8s_namespace: ns.into(),
            k8s_name: name.into(),
        }
    }

    #[test]
    fn only_records_of_resources_that_are_gone_are_retired() {
        let records = [
            record("a", "live"),
            record("a", "gone"),
            record("b", "live"),
            record("a", ""),
        ];
        let live: HashSet<Named> = [("a".into(), "live".into()), ("b".into(), "other".into())]
            .into_iter()
            .collect();
        let names: Vec<_> = retired(&records, &live)
            .into_iter()
            .map(|r| format!("{}/{}", r.k8s_namespace, r.k8s_name))
            .collect();
        assert_eq!(
            names,
            ["a/gone", "b/live"],
            "same name in another namespace is gone"
        );
    }
}
