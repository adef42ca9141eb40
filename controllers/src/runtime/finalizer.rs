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

/// Runs `apply` for a live object or `cleanup` for one being deleted. A live object
/// without the finalizer gets it first and is applied in the same pass (kube's helper
/// would end the pass there and wait for the watch to bring the object back: one more
/// reconcile per object for nothing; our own finalizer patch triggers none, see
/// `runner::reconcile_fingerprint`).
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
    let mut obj = obj;
    let adding = obj.meta().deletion_timestamp.is_none() && !read.iter().any(|f| f == FINALIZER);
    if adding {
        // Without the finalizer and not deleting, kube's helper only adds it.
        let added = finalizer::finalizer(&api, FINALIZER, obj.clone(), |_| async {
            Ok::<_, Error>(Action::await_change())
        })
        .await;
        match added {
            Ok(_) => {
                let mut with_finalizer = K::clone(&obj);
                let finalizers = with_finalizer.meta_mut().finalizers.get_or_insert_default();
                finalizers.push(FINALIZER.to_owned());
                obj = Arc::new(with_finalizer);
            }
            Err(err) => return Err(finalizer_failed(&api, &name, &read, err).await),
        }
    }
    let result = finalizer::finalizer(&api, FINALIZER, obj, |event| async move {
        match event {
            Event::Apply(obj) => apply(obj).await,
            Event::Cleanup(obj) => cleanup(obj).await,
        }
    })
    .await;
    match result {
        Ok(action) => Ok(action),
        Err(err) => Err(finalizer_failed(&api, &name, &read, err).await),
    }
}

/// The error of a failed pass: the kind's own, or the finalizer patch's.
async fn finalizer_failed<K>(
    api: &Api<K>,
    name: &str,
    read: &[String],
    err: finalizer::Error<Error>,
) -> Error
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let own: finalizer::Error<std::convert::Infallible> = match err {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => return e,
        finalizer::Error::AddFinalizer(e) => finalizer::Error::AddFinalizer(e),
        finalizer::Error::RemoveFinalizer(e) => finalizer::Error::RemoveFinalizer(e),
        finalizer::Error::UnnamedObject => finalizer::Error::UnnamedObject,
        finalizer::Error::InvalidFinalizer => finalizer::Error::InvalidFinalizer,
    };
    // The finalizer patch tests the finalizers it read (a JSON-patch `test`): refused (a
    // 422 naming no object: the patch, not the object) or in conflict, when the copy
    // read was older than the object, typically just after our own patch. That is a
    // lost race only if the API server's finalizers really differ from the copy (or the
    // object is gone); otherwise it is reported like any failure, with backoff, so a
    // refusal for another reason cannot loop.
    if let Some(message) = patch_refused(&own) {
        let stale = match api.get_opt(name).await {
            Ok(Some(now)) => now.finalizers() != read,
            Ok(None) => true,
            Err(_) => false,
        };
        if stale {
            return Error::Transient(format!(
                "the finalizers changed since they were read: {message}"
            ));
        }
    }
    Error::Finalizer(own).at(Step::Finalizer)
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
