//! Deleting an ApiKey: with `Delete`, revoke every key (DeleteKey), remove the gateway
//! entries and the Secret; with `Orphan`, leave them, and detach the Secret from the
//! ApiKey so a cluster's garbage collector does not delete it. Safe to repeat.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use m3o_crds::ApiKey;

use super::reconcile::revoke_all;
use super::secret::{self, SecretState};
use crate::report::error::{AtStep, Error, Step};
use crate::report::lifecycle;
use crate::runtime::context::Context;

pub async fn cleanup(key: Arc<ApiKey>, ctx: &Context) -> Result<Action, Error> {
    let ns = key.namespace().unwrap_or_default();
    let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &ns);
    let policy = key.spec.deletion_policy;
    if !lifecycle::begin_cleanup(
        ctx,
        &api,
        &key,
        policy,
        "the key, its record, gateway entry and Secret",
    )
    .await?
    {
        detach_secret(ctx, &key).await?;
        return Ok(Action::await_change());
    }

    revoke_all(ctx, &key).await?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let name = secret::secret_name(&key);
    // Only a Secret this ApiKey owns is deleted, never one it was refused to overwrite.
    let found = secrets.get_opt(&name).await.at(Step::Secret("reading"))?;
    if let SecretState::Ours { .. } = secret::inspect(found.as_ref(), &key) {
        match secrets.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(Error::from(e).at(Step::Secret("deleting"))),
        }
    }
    tracing::info!(apikey = %key.name_any(), "api key revoked");
    Ok(Action::await_change())
}

/// Removes the ApiKey's owner reference from its Secret, which outlives it (Orphan).
async fn detach_secret(ctx: &Context, key: &ApiKey) -> Result<(), Error> {
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &key.namespace().unwrap_or_default());
    let name = secret::secret_name(key);
    let Some(found) = secrets.get_opt(&name).await.at(Step::Secret("reading"))? else {
        return Ok(());
    };
    if !matches!(secret::inspect(Some(&found), key), SecretState::Ours { .. }) {
        return Ok(());
    }
    let uid = key.uid().unwrap_or_default();
    let kept: Vec<_> = found
        .owner_references()
        .iter()
        .filter(|o| o.uid != uid)
        .cloned()
        .collect();
    let patch = serde_json::json!({"metadata": {"ownerReferences": kept}});
    secrets
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .at(Step::Secret("detaching"))?;
    Ok(())
}
