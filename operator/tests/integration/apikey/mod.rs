//! ApiKey against real servers: the key lives only in its Secret; Postgres and etcd
//! hold its hash; block, expire, rotate, revoke and the customer's fate reach the
//! gateway entry.

mod customer;
mod lifecycle;
mod secrecy;
mod tamper;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use m3o_controllers::apikey::secret::hash;
use m3o_crds::ApiKey;
use serde_json::{Value, json};

use crate::support::{TestEnv, eventually};

impl TestEnv {
    pub fn apikeys(&self) -> Api<ApiKey> {
        Api::namespaced(self.kube.clone(), &self.ns)
    }

    pub async fn apply_apikey(&self, name: &str, spec: Value) -> ApiKey {
        let body = json!({
            "apiVersion": "m3o.com/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": name, "namespace": self.ns}, "spec": spec,
        });
        self.apikeys()
            .patch(
                name,
                &PatchParams::apply("integration-test").force(),
                &Patch::Apply(&body),
            )
            .await
            .unwrap_or_else(|e| panic!("apply apikey {name}: {e}"))
    }

    /// Waits for Ready=`status` with `reason` at the current generation.
    pub async fn wait_apikey(&self, name: &str, status: &str, reason: &str) -> ApiKey {
        self.wait_apikey_where(name, status, reason, "", |_| true)
            .await
    }

    /// [`Self::wait_apikey`], and `also` holds of the key. For changes that leave the
    /// generation alone (a Secret edited, a customer banned), where the status from
    /// before the change would otherwise already satisfy the wait.
    pub async fn wait_apikey_where(
        &self,
        name: &str,
        status: &str,
        reason: &str,
        also_what: &str,
        also: impl Fn(&ApiKey) -> bool,
    ) -> ApiKey {
        let api = &self.apikeys();
        let also = &also;
        eventually(
            &format!("apikey {name} Ready={status} ({reason}) {also_what}"),
            Duration::from_secs(60),
            || async move {
                let k = api.get_opt(name).await.ok()??;
                let s = k.status.as_ref()?;
                let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?;
                (s.observed_generation == k.metadata.generation
                    && ready.status == status
                    && ready.reason == reason
                    && also(&k))
                .then_some(k)
            },
        )
        .await
    }

    /// The plaintext key in a Secret.
    pub async fn secret_key(&self, secret: &str) -> Option<String> {
        let s = Api::<Secret>::namespaced(self.kube.clone(), &self.ns)
            .get_opt(secret)
            .await
            .expect("get secret")?;
        let bytes = s.data?.get("apiKey")?.0.clone();
        Some(String::from_utf8(bytes).expect("utf-8 key"))
    }

    /// The gateway's entry of a key.
    pub async fn gateway_entry(&self, key: &str) -> Option<Value> {
        self.etcd_json(&m3o_platform_contract::apikey_key(&hash(key.as_bytes())))
            .await
    }

    pub async fn key_row_status(&self, id: &str) -> String {
        sqlx::query_scalar("SELECT status FROM api_keys WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&self.db)
            .await
            .expect("key row")
    }

    /// Event type names on the stream about key `id` (deduplicated, in order).
    pub async fn key_events(&self, id: &str) -> Vec<String> {
        crate::support::dedupe(self.stream_events().await)
            .into_iter()
            .filter(|e| {
                let ev = &e.event;
                [
                    ev.generate_key.as_ref().map(|k| &k.id),
                    ev.delete_key.as_ref().map(|k| &k.id),
                    ev.block_key.as_ref().map(|k| &k.id),
                    ev.unblock_key.as_ref().map(|k| &k.id),
                    ev.key_expired.as_ref().map(|k| &k.id),
                    ev.key_rotated.as_ref().map(|k| &k.previous_id),
                ]
                .into_iter()
                .flatten()
                .any(|k| k == id)
            })
            .map(|e| e.event_type)
            .collect()
    }

    pub async fn wait_key_events(&self, id: &str, expected: &[&str]) {
        eventually(
            &format!("events {expected:?} for key {id}"),
            Duration::from_secs(30),
            || async {
                let got = self.key_events(id).await;
                (got == expected).then_some(())
            },
        )
        .await;
    }

    pub async fn customer_ready(&self, name: &str, state: &str) {
        self.apply_customer(
            name,
            json!({"email": format!("{name}@example.com"), "state": state}),
        )
        .await;
        self.wait_ready(name).await;
    }
}

pub fn key_spec(extra: Value) -> Value {
    let mut spec = json!({"customerRef": {"name": "alice"}, "description": "CI key", "scopes": ["helloworld", "*"]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    spec
}

pub fn ready_condition(k: &ApiKey) -> m3o_crds::Condition {
    k.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .cloned()
        .expect("Ready condition")
}

pub fn key_id(k: &ApiKey) -> String {
    k.status
        .as_ref()
        .and_then(|s| s.key_id.clone())
        .expect("status.keyId")
}
