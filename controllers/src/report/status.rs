//! Status writing shared by every kind: conditions with stable transition times, and
//! one write per change (the whole status, by server-side apply) under the
//! `m3o-operator` field manager.

use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    Condition, FieldsV1, ManagedFieldsEntry, Time,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "m3o-operator";

/// Condition types.
pub mod types {
    /// True only when Postgres, etcd (and the Secret) match the current generation.
    pub const READY: &str = "Ready";
    /// The Postgres record matches the spec.
    pub const DATABASE_SYNCED: &str = "DatabaseSynced";
    /// The etcd platform config matches the record.
    pub const CONFIG_SYNCED: &str = "ConfigSynced";
    /// ApiKey: every live gateway replica has applied the key's latest entry write.
    pub const GATEWAY_SYNCED: &str = "GatewaySynced";
}

/// Condition reasons (CamelCase, specific).
pub mod reasons {
    pub const PROVISIONED: &str = "Provisioned";
    pub const PROVISIONING: &str = "Provisioning";
    pub const SYNCED: &str = "Synced";
    pub const CUSTOMER_NOT_FOUND: &str = "CustomerNotFound";
    pub const CUSTOMER_NOT_READY: &str = "CustomerNotReady";
    pub const CONFLICT: &str = "Conflict";
    pub const UNKNOWN_PLAN: &str = "UnknownPlan";
    pub const DATABASE_UNAVAILABLE: &str = "DatabaseUnavailable";
    pub const CONFIG_STORE_UNAVAILABLE: &str = "ConfigStoreUnavailable";
    pub const EXPIRED: &str = "Expired";
    pub const BLOCKED: &str = "Blocked";
    pub const DELETING: &str = "Deleting";
    pub const RECONCILE_FAILED: &str = "ReconcileFailed";
    /// The spec passed the schema but the controller cannot act on it (an object stored
    /// before a schema bound existed, a rule only the controller can check).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A database constraint was violated (named in the message).
    pub const CONSTRAINT_VIOLATION: &str = "ConstraintViolation";
    /// The database refused a statement.
    pub const DATABASE_ERROR: &str = "DatabaseError";
    /// A bug met while reconciling this object (a panic included): the others go on.
    pub const INTERNAL_ERROR: &str = "InternalError";
    /// A Subscription or ApiKey whose Customer another shard reconciles.
    pub const CUSTOMER_IN_OTHER_SHARD: &str = "CustomerInOtherShard";
}

/// A condition as a reconciler decides it; times and generation are filled in by [`merge`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    pub fn new(
        type_: &'static str,
        ok: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status: if ok { "True" } else { "False" },
            reason,
            message: message.into(),
        }
    }

    /// A condition that cannot be decided yet (status `Unknown`).
    pub fn unknown(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: "Unknown",
            reason,
            message: message.into(),
        }
    }
}

/// Applies `updates` to `existing`: a condition whose status did not change keeps its
/// lastTransitionTime, so re-deciding the same thing yields an identical status and no write.
pub fn merge(existing: &[Condition], updates: &[Cond], generation: Option<i64>) -> Vec<Condition> {
    let now = Time(Timestamp::now());
    let mut out: Vec<Condition> = existing.to_vec();
    for update in updates {
        let status = update.status;
        let previous = out.iter().position(|c| c.type_ == update.type_);
        let last_transition_time = previous
            .map(|i| &out[i])
            .filter(|c| c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        let condition = Condition {
            type_: update.type_.to_owned(),
            status: status.to_owned(),
            reason: update.reason.to_owned(),
            message: update.message.clone(),
            observed_generation: generation,
            last_transition_time,
        };
        match previous {
            Some(i) => out[i] = condition,
            None => out.push(condition),
        }
    }
    out
}

/// Conditions of an object whose record cannot be written as specified: `Ready` and
/// `DatabaseSynced` False with the same reason and message.
pub fn not_synced(
    existing: &[Condition],
    reason: &'static str,
    message: String,
    generation: Option<i64>,
) -> Vec<Condition> {
    merge(
        existing,
        &[
            Cond::new(types::DATABASE_SYNCED, false, reason, message.clone()),
            Cond::new(types::READY, false, reason, message),
        ],
        generation,
    )
}

/// The conditions of an object whose record and platform config both match its spec:
/// `DatabaseSynced` and `ConfigSynced` True with what each says, and `ready`.
pub fn synced(record: String, config: String, ready: Cond) -> [Cond; 3] {
    [
        Cond::new(types::DATABASE_SYNCED, true, reasons::SYNCED, record),
        Cond::new(types::CONFIG_SYNCED, true, reasons::SYNCED, config),
        ready,
    ]
}

/// The `Ready` condition of a list, if present.
pub fn ready(conditions: &[Condition]) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == types::READY)
}

/// A kind whose status carries conditions.
pub trait HasStatus:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Serialize
{
    type Status: Serialize + Clone + Default + PartialEq + Debug + Send + Sync;
    fn status(&self) -> Option<&Self::Status>;
    fn conditions(status: &Self::Status) -> &[Condition];
    fn set_conditions(status: &mut Self::Status, conditions: Vec<Condition>);

    /// The object's `Ready` condition, if its status has one.
    fn ready_condition(&self) -> Option<&Condition> {
        self.status().and_then(|s| ready(Self::conditions(s)))
    }

    /// True when the object's status says `Ready=True` (for any generation).
    fn is_ready(&self) -> bool {
        self.ready_condition().is_some_and(|c| c.status == "True")
    }
}

/// Implements [`HasStatus`] for a kind whose status is `Option<$status>` with a
/// `conditions` list, as every m3o kind's is.
macro_rules! has_status {
    ($kind:ty, $status:ty) => {
        impl $crate::report::status::HasStatus for $kind {
            type Status = $status;
            fn status(&self) -> Option<&$status> {
                self.status.as_ref()
            }
            fn conditions(
                status: &$status,
            ) -> &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition] {
                &status.conditions
            }
            fn set_conditions(
                status: &mut $status,
                conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
            ) {
                status.conditions = conditions;
            }
        }
    };
}
pub(crate) use has_status;

/// Writes `status` (every field of it) unless the object already has exactly it.
/// Returns true when a write happened.
pub async fn apply<K: HasStatus>(
    api: &Api<K>,
    obj: &K,
    status: &K::Status,
) -> Result<bool, kube::Error> {
    if obj.status() == Some(status) {
        return Ok(false);
    }
    let name = obj.name_any();
    let written = apply_status(api, &name, status).await?;
    // A status an earlier release wrote by update (a JSON patch, cdcc36c..71844fa) left
    // that manager's entry, which keeps every field it wrote even once this apply leaves
    // it out. Its fields move to the apply's entry once (as kubectl's upgrade from
    // client-side apply does), and the status applied again drops them.
    // Best effort: the status is written; a refusal other than a conflict (RBAC, an
    // admission policy) is logged, not a failure of the object.
    if let Some(fields) = upgraded_managed_fields(written.managed_fields()) {
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": written.resource_version(),
            "managedFields": fields,
        }});
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                apply_status(api, &name, status).await?;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => return Err(kube::Error::Api(e)),
            Err(err) => {
                tracing::warn!(%err, "could not move the status fields of an earlier release's writes to server-side apply");
            }
        }
    }
    Ok(true)
}

/// Server-side apply of the whole status under one field manager (the status contract: README, "The resources"):
/// the operator owns every status field it writes, and `kubectl get -o yaml
/// --show-managed-fields` names it.
async fn apply_status<K: HasStatus>(
    api: &Api<K>,
    name: &str,
    status: &K::Status,
) -> Result<K, kube::Error> {
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
}

/// `entries` with the status entry of [`FIELD_MANAGER`]'s updates merged into the one of
/// its applies; `None` when there is no such update entry (nothing to upgrade).
pub fn upgraded_managed_fields(entries: &[ManagedFieldsEntry]) -> Option<Vec<ManagedFieldsEntry>> {
    let ours = |e: &ManagedFieldsEntry, operation: &str| {
        e.manager.as_deref() == Some(FIELD_MANAGER)
            && e.operation.as_deref() == Some(operation)
            && e.subresource.as_deref() == Some("status")
    };
    let updates: Vec<&ManagedFieldsEntry> = entries.iter().filter(|e| ours(e, "Update")).collect();
    let first = *updates.first()?;
    let mut out: Vec<ManagedFieldsEntry> = entries
        .iter()
        .filter(|e| !ours(e, "Update"))
        .cloned()
        .collect();
    if !out.iter().any(|e| ours(e, "Apply")) {
        out.push(ManagedFieldsEntry {
            operation: Some("Apply".into()),
            fields_v1: None,
            ..first.clone()
        });
    }
    // Every update entry (one per apiVersion written) folds into the apply entry.
    if let Some(apply) = out.iter_mut().find(|e| ours(e, "Apply")) {
        let fields = apply
            .fields_v1
            .get_or_insert_with(|| FieldsV1(serde_json::json!({})));
        for update in updates {
            if let Some(FieldsV1(more)) = &update.fields_v1 {
                union(&mut fields.0, more);
            }
        }
    }
    Some(out)
}

/// Adds every field of the field set `more` to `into` (both `fieldsV1` trees).
fn union(into: &mut serde_json::Value, more: &serde_json::Value) {
    match (into, more) {
        (serde_json::Value::Object(into), serde_json::Value::Object(more)) => {
            for (key, value) in more {
                match into.get_mut(key) {
                    Some(existing) => union(existing, value),
                    None => {
                        into.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (into, more) if into.is_null() => *into = more.clone(),
        _ => {}
    }
}

/// Records a failed reconcile in `Ready` (and `extra`), keeping every other field.
pub async fn apply_failure<K: HasStatus>(
    api: &Api<K>,
    obj: &K,
    ready: Cond,
    extra: &[Cond],
) -> Result<bool, kube::Error> {
    let mut status = obj.status().cloned().unwrap_or_default();
    let mut updates = vec![ready];
    updates.extend_from_slice(extra);
    let conditions = merge(K::conditions(&status), &updates, obj.meta().generation);
    K::set_conditions(&mut status, conditions);
    apply(api, obj, &status).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        manager: &str,
        operation: &str,
        subresource: Option<&str>,
        fields: serde_json::Value,
    ) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            subresource: subresource.map(Into::into),
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        }
    }

    #[test]
    fn an_update_entry_of_ours_on_status_is_merged_into_our_apply_entry() {
        let spec = entry(
            "kubectl",
            "Apply",
            None,
            serde_json::json!({"f:spec": {"f:email": {}}}),
        );
        let applied = entry(
            FIELD_MANAGER,
            "Apply",
            Some("status"),
            serde_json::json!({"f:status": {"f:state": {}, "f:conditions": {}}}),
        );
        let updated = entry(
            FIELD_MANAGER,
            "Update",
            Some("status"),
            serde_json::json!({"f:status": {"f:state": {}, "f:expiresAt": {}}}),
        );
        assert_eq!(
            upgraded_managed_fields(&[spec.clone(), applied.clone()]),
            None
        );
        let upgraded =
            upgraded_managed_fields(&[spec.clone(), applied, updated.clone()]).expect("an upgrade");
        assert_eq!(upgraded.len(), 2);
        assert_eq!(upgraded[0], spec);
        assert_eq!(
            upgraded[1].fields_v1,
            Some(FieldsV1(serde_json::json!({"f:status": {
                "f:state": {}, "f:conditions": {}, "f:expiresAt": {}}})))
        );
        // Only update entries (one per apiVersion): they become the apply entry.
        let older = ManagedFieldsEntry {
            api_version: Some("m3o.com/v1alpha0".into()),
            ..entry(
                FIELD_MANAGER,
                "Update",
                Some("status"),
                serde_json::json!({"f:status": {"f:plan": {}}}),
            )
        };
        let alone = upgraded_managed_fields(&[updated, older]).expect("an upgrade");
        assert_eq!(alone.len(), 1);
        assert_eq!(alone[0].operation.as_deref(), Some("Apply"));
        assert_eq!(
            alone[0].fields_v1,
            Some(FieldsV1(serde_json::json!({"f:status": {
                "f:state": {}, "f:expiresAt": {}, "f:plan": {}}})))
        );
    }

    #[test]
    fn unchanged_condition_keeps_its_transition_time() {
        let first = merge(
            &[],
            &[Cond::new(
                types::READY,
                false,
                reasons::PROVISIONING,
                "wait",
            )],
            Some(1),
        );
        let mut old = first.clone();
        old[0].last_transition_time = Time(Timestamp::UNIX_EPOCH);
        let again = merge(
            &old,
            &[Cond::new(types::READY, false, reasons::CONFLICT, "dup")],
            Some(2),
        );
        assert_eq!(again[0].last_transition_time, Time(Timestamp::UNIX_EPOCH));
        assert_eq!(again[0].reason, reasons::CONFLICT);
        assert_eq!(again[0].observed_generation, Some(2));
        let flipped = merge(
            &old,
            &[Cond::new(types::READY, true, reasons::PROVISIONED, "ok")],
            Some(2),
        );
        assert_ne!(flipped[0].last_transition_time, Time(Timestamp::UNIX_EPOCH));
    }

    #[test]
    fn re_deciding_the_same_conditions_is_identical() {
        let decide = || {
            vec![
                Cond::new(types::READY, true, reasons::PROVISIONED, "ok"),
                Cond::new(types::CONFIG_SYNCED, true, reasons::SYNCED, "ok"),
            ]
        };
        let first = merge(&[], &decide(), Some(3));
        assert_eq!(merge(&first, &decide(), Some(3)), first);
    }

    #[test]
    fn other_conditions_are_kept() {
        let first = merge(
            &[],
            &[Cond::new(
                types::DATABASE_SYNCED,
                true,
                reasons::SYNCED,
                "ok",
            )],
            Some(1),
        );
        let next = merge(
            &first,
            &[Cond::new(
                types::READY,
                false,
                reasons::DATABASE_UNAVAILABLE,
                "down",
            )],
            Some(1),
        );
        assert_eq!(next.len(), 2);
        assert!(ready(&next).is_some_and(|c| c.status == "False"));
    }
}
