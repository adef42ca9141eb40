//! The Customer controller: a Customer becomes a row of `customers` and its key in
//! etcd. Its files follow the pipeline every kind shares, [`crate::pipeline`]:
//! `plan.rs` decides (record, row write and events, the adoption rules of `spec.id`,
//! email conflict), `build.rs` builds (event payloads, status), `reconcile.rs` loads
//! and applies, `cleanup.rs` deletes.

pub mod build;
pub mod cleanup;
pub mod plan;
pub mod reconcile;

use std::sync::Arc;

use kube::runtime::controller::Action;
use m3o_crds::{Customer, CustomerStatus};

use crate::context::Context;
use crate::error::Error;
use crate::finalizer::reconcile_with_finalizer;
use crate::runner;

pub const KIND: &str = "Customer";

crate::status::has_status!(Customer, CustomerStatus);

async fn reconcile(customer: Arc<Customer>, ctx: Arc<Context>) -> Result<Action, Error> {
    reconcile_with_finalizer(
        &ctx,
        customer,
        |c| reconcile::apply(c, &ctx),
        |c| cleanup::cleanup(c, &ctx),
    )
    .await
}

/// Runs the Customer controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    runner::run::<Customer, _, _>(ctx, KIND, shutdown, reconcile).await;
}
