//! The Customer controller: a Customer becomes a row of `customers` and its key in
//! etcd. Its files follow the pipeline every kind shares, [`crate::pipeline`]:
//! `plan.rs` decides (record, row write and events, the adoption rules of `spec.id`,
//! email conflict), `build.rs` builds (event payloads, status), `reconcile.rs` loads
//! and applies, `cleanup.rs` deletes; `config.rs` is its etcd entry.

pub mod build;
pub mod cleanup;
pub mod plan;
pub mod reconcile;

use std::sync::Arc;

use kube::runtime::controller::Action;
use m3o_crds::{Customer, CustomerStatus};

use crate::report::error::Error;
use crate::runtime::context::Context;
use crate::runtime::finalizer::reconcile_with_finalizer;
use crate::runtime::runner;

pub const KIND: &str = m3o_crds::kinds::CUSTOMER;

crate::report::status::has_status!(Customer, CustomerStatus);

impl crate::runtime::resync::ResyncedKind for Customer {
    const RECORDS: crate::store::resync::RecordTable = crate::store::resync::CUSTOMERS;

    /// The record is read off the resource alone.
    fn planned_digest(
        &self,
        _catalog: &crate::plans::Catalog,
        _records: &crate::store::resync::LiveRecords,
    ) -> Option<String> {
        use crate::pipeline::row_plan::Digested;
        plan::desired(self).ok().map(|d| d.record.digest())
    }
}

async fn reconcile(customer: Arc<Customer>, ctx: Arc<Context>) -> Result<Action, Error> {
    reconcile_with_finalizer(
        &ctx,
        customer,
        |c| reconcile::apply(c, &ctx),
        |c| cleanup::cleanup(c, &ctx),
    )
    .await
}

/// Runs the Customer controller on the shared Customer watch ([`crate::runtime::feed`]) until
/// `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    customers: kube::runtime::reflector::Store<Customer>,
    changes: futures::channel::mpsc::Receiver<kube::runtime::watcher::Event<Customer>>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    use futures::StreamExt;
    let changes = changes.map(Ok);
    runner::run_on(ctx, KIND, shutdown, reconcile, changes, customers, |c| c).await;
}
