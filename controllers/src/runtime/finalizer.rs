//! The finalizer flow shared by every kind: `m3o.com/cleanup` is added before any
//! external record is created, and removed only once cleanup has finished.

use std::future::Future;
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event};
use kube::{Api, Resource, ResourceExt};

use crate::report::error::{Error, Step};
use crate::report::status::HasStatus;
use crate::runtime::context::Context;

/// The finalizer of every m3o resource.
pub const FINALIZER: &str = "m3o.com/cleanup";

/// Runs `apply` for a live object or `cleanup` for one being deleted.
pub async fn reconcile_with_finalizer<K, A, AF, C, CF>(
    ctx: &Context,
    obj: Arc<K>,
    apply: A,
    cleanup: C,
) -> Result<Action, Error>
where
    K: HasStatus + Resource<Scope = NamespaceResourceScope>,
    A: FnOnce(Arc<K>) -> AF,
    AF: Future<Output = Result<Action, Error>>,
    C: FnOnce(Arc<K>) -> CF,
    CF: Future<Output = Result<Action, Error>>,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let (name, read) = (obj.name_any(), obj.finalizers().to_vec());
    let result = finalizer::finalizer(&api, FINALIZER, obj, |event| async move {
        match event {
            Event::Apply(obj) => apply(obj).await,
            Event::Cleanup(obj) => cleanup(obj).await,
        }
    })
    .await;
    let own = match result {
        Ok(action) => return Ok(action),
        Err(finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e)) => {
            return Err(e);
        }
        Err(finalizer::Error::AddFinalizer(e)) => finalizer::Error::AddFinalizer(e),
        Err(finalizer::Error::RemoveFinalizer(e)) => finalizer::Error::RemoveFinalizer(e),
        Err(finalizer::Error::UnnamedObject) => finalizer::Error::UnnamedObject,
        Err(finalizer::Error::InvalidFinalizer) => finalizer::Error::InvalidFinalizer,
    };
    // The finalizer patch tests the finalizers it read (a JSON-patch `test`): refused (a
    // 422 naming no object: the patch, not the object) or in conflict, when the copy
    // read was older than the object, typically just after our own patch. That is a
    // lost race only if the API server's finalizers really differ from the copy (or the
    // object is gone); otherwise it is reported like any failure, with backoff, so a
    // refusal for another reason cannot loop.
    if let Some(message) = patch_refused(&own) {
        let stale = match api.get_opt(&name).await {
            Ok(Some(now)) => now.finalizers() != read.as_slice(),
            Ok(None) => true,
            Err(_) => false,
        };
        if stale {
            return Err(Error::Transient(format!(
                "the finalizers changed since they were read: {message}"
            )));
        }
    }
    Err(Error::Finalizer(own).at(Step::Finalizer))
}

/// True for a 422 about the patch itself (a failed JSON-patch `test`), not about the
/// object: the API server names no kind, object or field.
fn is_patch_refusal(status: &kube::core::Status) -> bool {
    status
        .details
        .as_ref()
        .is_none_or(|d| d.kind.is_empty() && d.name.is_empty() && d.causes.is_empty())
}

/// The API server's message when a finalizer patch was refused as a possible lost race
/// (409, or a 422 about the patch itself); `None` for any other error.
fn patch_refused(err: &finalizer::Error<std::convert::Infallible>) -> Option<String> {
    match err {
        finalizer::Error::AddFinalizer(kube::Error::Api(status))
        | finalizer::Error::RemoveFinalizer(kube::Error::Api(status))
            if status.code == 409 || (status.code == 422 && is_patch_refusal(status)) =>
        {
            Some(status.message.clone())
        }
        _ => None,
    }
}
