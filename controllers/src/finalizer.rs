//! The finalizer flow shared by every kind: `m3o.com/cleanup` is added before any
//! external record is created, and removed only once cleanup has finished.

use std::future::Future;
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event};
use kube::{Api, Resource, ResourceExt};

use crate::context::Context;
use crate::error::{Error, Step};
use crate::status::HasStatus;

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
    finalizer::finalizer(&api, FINALIZER, obj, |event| async move {
        match event {
            Event::Apply(obj) => apply(obj).await,
            Event::Cleanup(obj) => cleanup(obj).await,
        }
    })
    .await
    .map_err(|err| {
        let own = match err {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => return e,
            // The finalizer patch tests the finalizers it read (a JSON-patch `test`): a
            // failed test (422 naming no object: the patch, not the object, was refused)
            // means the cached copy was older than the object, typically just after our
            // own patch. The next pass reads it anew. A 422 naming the object is a
            // validation failure, reported as such.
            finalizer::Error::AddFinalizer(kube::Error::Api(status))
            | finalizer::Error::RemoveFinalizer(kube::Error::Api(status))
                if status.code == 409 || (status.code == 422 && is_patch_refusal(&status)) =>
            {
                return Error::Transient(format!(
                    "the finalizers changed since they were read: {}",
                    status.message
                ));
            }
            finalizer::Error::AddFinalizer(e) => finalizer::Error::AddFinalizer(e),
            finalizer::Error::RemoveFinalizer(e) => finalizer::Error::RemoveFinalizer(e),
            finalizer::Error::UnnamedObject => finalizer::Error::UnnamedObject,
            finalizer::Error::InvalidFinalizer => finalizer::Error::InvalidFinalizer,
        };
        Error::Finalizer(own).at(Step::Finalizer)
    })
}

/// True for a 422 about the patch itself (a failed JSON-patch `test`), not about the
/// object: the API server names no kind, object or field.
fn is_patch_refusal(status: &kube::core::Status) -> bool {
    status
        .details
        .as_ref()
        .is_none_or(|d| d.kind.is_empty() && d.name.is_empty() && d.causes.is_empty())
}
