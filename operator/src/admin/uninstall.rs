//! `m3o-operator uninstall-check`: the chart's pre-delete hook. Refuses (exit 1, one
//! line) while Customers, Subscriptions or ApiKeys still carry the finalizer
//! `m3o.com/cleanup`: only a running operator removes it, so uninstalling first would
//! leave them (and any namespace or Argo CD app holding them) Terminating for good.

use kube::api::ListParams;
use kube::{Api, Client, Resource, ResourceExt};
use m3o_crds::{ApiKey, Customer, Subscription};

use crate::cli::UninstallCheckArgs;
use crate::startup::{self, StartupError};

/// The finalizer the operator adds to every object it reconciles.
const FINALIZER: &str = "m3o.com/cleanup";

/// `kind namespace/name` of an object that still carries the finalizer.
pub type Blocking = String;

/// The refusal for `blocking` (in listing order), or `None` when nothing blocks.
pub fn refusal(blocking: &[Blocking]) -> Option<String> {
    let first = blocking.first()?;
    Some(format!(
        "refusing to uninstall: {} object(s) still carry the finalizer {FINALIZER} (e.g. {first}); delete them while the operator runs (README, \"Uninstall\"), or set uninstall.refuseWhileObjectsExist=false",
        blocking.len()
    ))
}

async fn blocking_of<K>(
    client: &Client,
    namespace: Option<&str>,
) -> Result<Vec<Blocking>, StartupError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let kind = K::kind(&()).to_lowercase();
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| StartupError(format!("--kubeconfig: cannot list {kind}s: {e}")))?;
    Ok(list
        .items
        .iter()
        .filter(|o| o.finalizers().iter().any(|f| f == FINALIZER))
        .map(|o| {
            format!(
                "{kind} {}/{}",
                o.namespace().unwrap_or_default(),
                o.name_any()
            )
        })
        .collect())
}

pub async fn run(args: UninstallCheckArgs) -> Result<(), StartupError> {
    let client = startup::kube(args.kubeconfig.as_deref()).await?;
    let namespace = Some(args.namespace.trim()).filter(|n| !n.is_empty());
    let mut blocking = blocking_of::<Customer>(&client, namespace).await?;
    blocking.extend(blocking_of::<Subscription>(&client, namespace).await?);
    blocking.extend(blocking_of::<ApiKey>(&client, namespace).await?);
    match refusal(&blocking) {
        Some(line) => Err(StartupError(line)),
        None => {
            println!("no object carries the finalizer {FINALIZER}: uninstall may proceed");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_only_while_something_carries_the_finalizer() {
        assert_eq!(refusal(&[]), None);
        let line = refusal(&["customer a/alice".into(), "apikey a/ci".into()]).expect("refusal");
        assert!(
            line.contains("2 object(s)") && line.contains("customer a/alice"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }
}
