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
use kube::{Api, ResourceExt};
use m3o_crds::{Condition, Customer, CustomerStatus};

use crate::context::Context;
use crate::error::Error;
use crate::finalizer::reconcile_with_finalizer;
use crate::runner;
use crate::status::HasStatus;

pub const KIND: &str = "Customer";

impl HasStatus for Customer {
    type Status = CustomerStatus;
    fn status(&self) -> Option<&CustomerStatus> {
        self.status.as_ref()
    }
    fn conditions(status: &CustomerStatus) -> &[Condition] {
        &status.conditions
    }
    fn set_conditions(status: &mut CustomerStatus, conditions: Vec<Condition>) {
        status.conditions = conditions;
    }
}

async fn reconcile(customer: Arc<Customer>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<Customer> = Api::namespaced(
        ctx.client.clone(),
        &customer.namespace().unwrap_or_default(),
    );
    reconcile_with_finalizer(
        &api,
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
