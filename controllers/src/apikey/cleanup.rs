//! Deleting an ApiKey: with `Delete`, revoke every key (DeleteKey), remove the gateway
//! entries and the Secret; with `Orphan`, leave them. Safe to repeat after a crash.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType as K8sEventType;
use kube::{Api, Resource, ResourceExt};
use m3o_crds::{ApiKey, DeletionPolicy};

use super::reconcile::revoke_all;
use super::secret::{self, SecretState};
use crate::context::Context;
use crate::error::Error;
use crate::status::{self, Cond, reasons, types};

pub async fn cleanup(key: Arc<ApiKey>, ctx: &Context) -> Result<Action, Error> {
    let ns = key.namespace().unwrap_or_default();
    let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &ns);
    let policy = key.spec.deletion_policy;
    let deleting = Cond::new(
        types::READY,
        false,
        reasons::DELETING,
        format!("cleaning up (deletionPolicy {policy:?})"),
    );
    status::apply_failure(&api, &key, deleting, &[]).await?;
    if policy == DeletionPolicy::Orphan {
        let note = "deletionPolicy Orphan: the key, its record, gateway entry and Secret are kept"
            .to_owned();
        ctx.event(
            &key.object_ref(&()),
            K8sEventType::Normal,
            "Orphaned",
            "Delete",
            note,
        )
        .await;
        return Ok(Action::await_change());
    }

    revoke_all(ctx, &key).await?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let name = secret::secret_name(&key);
    // Only a Secret this ApiKey owns is deleted, never one it was refused to overwrite.
    if let SecretState::Ours(_) = secret::inspect(secrets.get_opt(&name).await?.as_ref(), &key) {
        match secrets.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    tracing::info!(apikey = %key.name_any(), "api key revoked");
    Ok(Action::await_change())
}
