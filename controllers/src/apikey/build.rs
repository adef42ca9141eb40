//! Pure builders of what an ApiKey reconcile writes besides its rows: the Secret with
//! the key, the M3O events, the status and the Kubernetes Event of a state change. The
//! pipeline: [`crate::pipeline`].

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType as K8sEventType;
use kube::{Resource, ResourceExt};
use m3o_crds::{ApiKey, ApiKeyState, ApiKeyStatus};
use m3o_events::customers::{self, EventType};
use uuid::Uuid;

use super::plan::{KeyEvent, expiry};
use super::secret::{
    APIKEY_LABEL, DATA_API_KEY, DATA_KEY_ID, HASH_ANNOTATION, IssuedKey, MANAGED_BY, Plaintext,
    ROTATION_ANNOTATION, secret_name,
};
use crate::report::blocker::Blocker;
use crate::report::status::{self, Cond, merge, reasons, types};
use crate::store::api_keys::ApiKeyRow;

/// The Secret carrying a fresh key for `owner`, and what is recorded of it.
pub fn secret(
    owner: &ApiKey,
    plaintext: Plaintext,
    key_id: Uuid,
    rotation_generation: i64,
) -> (Secret, IssuedKey) {
    let issued = IssuedKey {
        key_id,
        hash: plaintext.hash(),
        prefix: plaintext.display_prefix(),
        rotation_generation,
    };
    let mut secret = Secret {
        data: Some(BTreeMap::from([
            (DATA_API_KEY.to_owned(), ByteString(plaintext.into_bytes())),
            (
                DATA_KEY_ID.to_owned(),
                ByteString(key_id.to_string().into_bytes()),
            ),
        ])),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    secret.metadata.name = Some(secret_name(owner));
    secret.metadata.namespace = owner.namespace();
    secret.metadata.labels = Some(BTreeMap::from([
        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
        (APIKEY_LABEL.to_owned(), owner.name_any()),
    ]));
    secret.metadata.annotations = Some(BTreeMap::from([
        (
            ROTATION_ANNOTATION.to_owned(),
            rotation_generation.to_string(),
        ),
        (HASH_ANNOTATION.to_owned(), issued.hash.clone()),
    ]));
    secret.metadata.owner_references = owner.controller_owner_ref(&()).map(|o| vec![o]);
    (secret, issued)
}

/// The server-side apply body replacing our Secret with `secret`, at the
/// resourceVersion it was read at (a 409 if it changed since).
pub fn secret_replacement(
    mut secret: Secret,
    resource_version: String,
) -> Result<serde_json::Value, serde_json::Error> {
    secret.metadata.resource_version = Some(resource_version);
    let mut body = serde_json::to_value(&secret)?;
    body["apiVersion"] = "v1".into();
    body["kind"] = "Secret".into();
    Ok(body)
}

/// The Kubernetes Event of a change of state an admin cares about (type and reason).
pub fn state_event(
    was: Option<ApiKeyState>,
    now: Option<ApiKeyState>,
) -> Option<(K8sEventType, &'static str)> {
    if was == now {
        return None;
    }
    match now? {
        ApiKeyState::Active => Some((K8sEventType::Normal, reasons::PROVISIONED)),
        ApiKeyState::Blocked => Some((K8sEventType::Normal, reasons::BLOCKED)),
        ApiKeyState::Expired => Some((K8sEventType::Warning, reasons::EXPIRED)),
        ApiKeyState::Revoked => None,
    }
}

/// The M3O event for a key event, with the customer filled in.
pub fn to_event(e: &KeyEvent, customer: customers::Customer) -> customers::Event {
    let id = e.key_id.to_string();
    let mut event = customers::Event {
        customer: Some(customer),
        ..Default::default()
    };
    event.set_type(e.kind);
    match e.kind {
        EventType::GenerateKey => {
            event.generate_key = Some(customers::GenerateKey {
                scopes: e.scopes.clone(),
                id,
            })
        }
        EventType::DeleteKey => event.delete_key = Some(customers::DeleteKey { id }),
        EventType::BlockKey => {
            event.block_key = Some(customers::BlockKey {
                id,
                message: e.message.clone(),
            })
        }
        EventType::UnblockKey => event.unblock_key = Some(customers::UnblockKey { id }),
        EventType::KeyExpired => event.key_expired = Some(customers::KeyExpired { id }),
        EventType::KeyRotated => {
            let previous_id = e.previous_id.map(|p| p.to_string()).unwrap_or_default();
            event.key_rotated = Some(customers::KeyRotated { id, previous_id });
        }
        _ => {}
    }
    event
}

/// Status once the Secret, Postgres and etcd match: Ready is True for a key in the
/// state its spec asks for (active or deliberately blocked), False once expired.
pub fn synced_status(key: &ApiKey, current: &ApiKeyRow, secret_name: &str) -> ApiKeyStatus {
    let state = ApiKeyState::parse(&current.status).unwrap_or(ApiKeyState::Active);
    let (ok, reason, message) = match state {
        ApiKeyState::Active => (
            true,
            reasons::PROVISIONED,
            format!("key {} ({}) is active", current.id, current.key_prefix),
        ),
        ApiKeyState::Blocked if key.spec.blocked => (
            true,
            reasons::BLOCKED,
            match key.spec.blocked_message.as_deref() {
                Some(m) if !m.is_empty() => {
                    format!("key {} is blocked by spec.blocked: {m}", current.id)
                }
                _ => format!("key {} is blocked by spec.blocked", current.id),
            },
        ),
        ApiKeyState::Blocked => (
            true,
            reasons::BLOCKED,
            format!(
                "key {} is blocked because its customer is banned",
                current.id
            ),
        ),
        ApiKeyState::Expired => (
            false,
            reasons::EXPIRED,
            format!(
                "key {} expired; extend spec.expiresAt or bump spec.rotationGeneration",
                current.id
            ),
        ),
        ApiKeyState::Revoked => (
            false,
            reasons::CUSTOMER_NOT_FOUND,
            format!("key {} is revoked", current.id),
        ),
    };
    let conditions = merge(
        key.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default(),
        &status::synced(
            format!("key {} is recorded (hash only)", current.id),
            "gateway entry is up to date".to_owned(),
            Cond::new(types::READY, ok, reason, message),
        ),
        key.metadata.generation,
    );
    ApiKeyStatus {
        observed_generation: key.metadata.generation,
        conditions,
        key_id: Some(current.id.to_string()),
        customer_id: Some(current.customer_id.to_string()),
        secret_name: Some(secret_name.to_owned()),
        key_prefix: Some(current.key_prefix.clone()),
        state: Some(state),
        expires_at: expiry(key)
            .and_then(|t| k8s_openapi::jiff::Timestamp::from_second(t.timestamp()).ok())
            .map(Time),
        last_rotated_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(current.created_at.timestamp())
                .unwrap_or_default(),
        )),
    }
}

/// Status of a key that cannot be issued or used yet (Ready=False, `reason`).
pub fn waiting_status(key: &ApiKey, blocker: &Blocker, state: Option<ApiKeyState>) -> ApiKeyStatus {
    let previous = key.status.clone().unwrap_or_default();
    let ready = Cond::new(types::READY, false, blocker.reason, blocker.message.clone());
    let conditions = merge(&previous.conditions, &[ready], key.metadata.generation);
    ApiKeyStatus {
        observed_generation: key.metadata.generation,
        conditions,
        state: state.or(previous.state),
        ..previous
    }
}
