//! The ApiKey controller: keys issued into Secrets, known elsewhere only by hash. Its
//! files follow the pipeline every kind shares, [`crate::pipeline`]: `plan.rs` decides
//! (orphan check, customer gate, Secret reuse, row writes and events), `build.rs`
//! builds (the Secret, event payloads, status), `reconcile.rs` loads and applies,
//! `cleanup.rs` deletes; `secret.rs` is key material and reading a Secret,
//! `config.rs` its gateway entry, `gateway_sync.rs` the `GatewaySynced` condition.

pub mod build;
pub mod cleanup;
pub mod config;
pub mod gateway_sync;
pub mod plan;
pub mod reconcile;
pub mod secret;

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use m3o_crds::{ApiKey, ApiKeyStatus, Customer};

use crate::context::Context;
use crate::error::Error;
use crate::finalizer::reconcile_with_finalizer;
use crate::runner;

pub const KIND: &str = "ApiKey";

crate::status::has_status!(ApiKey, ApiKeyStatus);

async fn reconcile(key: Arc<ApiKey>, ctx: Arc<Context>) -> Result<Action, Error> {
    reconcile_with_finalizer(
        &ctx,
        key,
        |k| reconcile::apply(k, &ctx),
        |k| cleanup::cleanup(k, &ctx),
    )
    .await
}

/// Runs the ApiKey controller until `shutdown` resolves. Besides ApiKeys it watches
/// the Secrets it wrote (a deleted or edited Secret is repaired) and Customers (a
/// ban, unban or deletion reaches the keys at once).
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let secrets: Api<Secret> = runner::scoped_api(&ctx);
    let customers: Api<Customer> = runner::scoped_api(&ctx);
    let managed = format!("{}={}", secret::MANAGED_BY.0, secret::MANAGED_BY.1);
    let watch_config = runner::watch_config(&ctx);
    let sync_ctx = ctx.clone();
    runner::run_with::<ApiKey, _, _>(ctx, KIND, shutdown, reconcile, move |controller| {
        let keys = controller.store();
        let report_changes = gateway_sync::report_changes(sync_ctx, keys.clone());
        controller
            .reconcile_on(report_changes)
            .owns(secrets, watcher::Config::default().labels(&managed))
            .watches_stream(
                runner::customer_changes(customers, watch_config),
                move |customer: Customer| {
                    let ns = customer.namespace();
                    let name = customer.name_any();
                    keys.state()
                        .into_iter()
                        .filter(|k| k.namespace() == ns && k.spec.customer_ref.name == name)
                        .map(|k| ObjectRef::from_obj(k.as_ref()))
                        .collect::<Vec<_>>()
                },
            )
    })
    .await;
}
