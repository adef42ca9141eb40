//! The Customer controller.

pub mod cleanup;
pub mod config;
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

/// Runs the Customer controller on the shared Customer watch ([`crate::feed`]) until
/// `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    customers: kube::runtime::reflector::Store<Customer>,
    changes: futures::channel::mpsc::Receiver<Customer>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    use futures::StreamExt;
    let changes = changes.map(Ok);
    runner::run_on(ctx, KIND, shutdown, reconcile, changes, customers, |c| c).await;
}
