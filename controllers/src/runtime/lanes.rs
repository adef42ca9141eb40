//! Two lanes per kind: a change an admin makes to an object that is already
//! provisioned (a block, a ban, a revocation, a deletion) is reconciled by a controller
//! of its own, so it does not queue behind a bulk apply of new objects. One object is
//! never reconciled by both lanes at once ([`ObjectLocks`]).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use tokio::sync::{Mutex, MutexGuard};

use crate::report::status::HasStatus;

/// Reconciles at once in the lane of changes (per kind).
pub const CHANGES_CONCURRENCY: u16 = 2;

/// True for an object that was provisioned (Ready reported for some generation) and
/// has changed since (its spec, or its deletion began): the lane of changes takes it.
pub fn is_change_of_provisioned<K: HasStatus>(obj: &K) -> bool {
    let reported = obj.ready_condition().and_then(|c| c.observed_generation);
    reported.is_some() && reported != obj.meta().generation
}

/// Striped locks by object key: the two lanes of a kind take the object's lock around
/// a reconcile. Objects sharing a stripe wait for each other only briefly.
pub struct ObjectLocks {
    stripes: Vec<Mutex<()>>,
}

const STRIPES: usize = 1024;

impl Default for ObjectLocks {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl ObjectLocks {
    pub async fn lock(&self, key: &str) -> MutexGuard<'_, ()> {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        let stripe = (h.finish() % STRIPES as u64) as usize;
        self.stripes[stripe].lock().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use m3o_crds::ApiKey;

    fn key(generation: i64, ready_at: Option<i64>) -> ApiKey {
        let conditions = ready_at.map_or(serde_json::json!([]), |g| {
            serde_json::json!([{"type": "Ready", "status": "True", "reason": "Provisioned",
                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": g}])
        });
        serde_json::from_value(serde_json::json!({
            "apiVersion": "m3o.com/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "k", "namespace": "ns", "generation": generation},
            "spec": {"customerRef": {"name": "c"}, "description": "", "scopes": ["*"]},
            "status": {"conditions": conditions},
        }))
        .expect("a valid ApiKey")
    }

    #[test]
    fn only_changes_of_provisioned_objects_take_the_fast_lane() {
        assert!(!is_change_of_provisioned(&key(1, None)), "new: bulk lane");
        assert!(!is_change_of_provisioned(&key(2, Some(2))), "unchanged");
        assert!(is_change_of_provisioned(&key(3, Some(2))), "changed since");
    }
}
