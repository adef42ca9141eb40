//! A Warning Kubernetes Event for each outbox event the relay parks, on the resource
//! the event is about (the Customer, or the ApiKey), so `kubectl describe` shows it.
//! The relay itself logs every parked event with its id, topic and error.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::runtime::events::EventType;
use m3o_controllers::Context;
use m3o_crds::{ApiKey, Customer};
use m3o_events::relay::ParkedEvent;
use sqlx::PgPool;
use tokio::sync::mpsc;

/// Reason of the Event.
pub const REASON: &str = "OutboxEventParked";

/// Longest Redis error quoted in an Event note (notes are limited to 1 KiB).
const MAX_ERROR: usize = 300;

/// Publishes an Event per parked row until the relay drops its sender.
pub async fn report(ctx: Arc<Context>, mut parked: mpsc::Receiver<ParkedEvent>) {
    while let Some(event) = parked.recv().await {
        match owner(&ctx.db, &event.aggregate_id).await {
            Ok(Some(object)) => {
                ctx.event(&object, EventType::Warning, REASON, "Publish", note(&event))
                    .await;
            }
            Ok(None) => tracing::debug!(
                event_id = %event.id,
                aggregate_id = event.aggregate_id,
                "parked outbox event: no resource to attach a Kubernetes Event to"
            ),
            Err(error) => tracing::warn!(
                event_id = %event.id, %error,
                "parked outbox event: finding its resource failed; no Kubernetes Event"
            ),
        }
    }
}

fn note(event: &ParkedEvent) -> String {
    let error: String = event.error.chars().take(MAX_ERROR).collect();
    format!(
        "event {} ({} on {}) was refused by Redis {} times and is parked; this resource's \
         later events wait behind it. Redis said: {}. Fix the cause, then run \
         `m3o-operator outbox redrive --id {}`",
        event.id, event.event_type, event.topic, event.attempts, error, event.id
    )
}

/// The Customer or ApiKey whose record has id `aggregate_id` (live or not).
async fn owner(db: &PgPool, aggregate_id: &str) -> Result<Option<ObjectReference>, sqlx::Error> {
    let Ok(id) = aggregate_id.parse::<uuid::Uuid>() else {
        return Ok(None);
    };
    let row: Option<(String, String, String, String)> = sqlx::query_as(
        "SELECT 'Customer', k8s_namespace, k8s_name, k8s_uid FROM customers WHERE id = $1 \
         UNION ALL \
         SELECT 'ApiKey', k8s_namespace, k8s_name, k8s_uid FROM api_keys WHERE id = $1 \
         LIMIT 1",
    )
    .bind(id)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(kind, namespace, name, uid)| {
        let api_version = match kind.as_str() {
            "Customer" => Customer::api_version(&()),
            _ => ApiKey::api_version(&()),
        };
        ObjectReference {
            api_version: Some(api_version.into_owned()),
            kind: Some(kind),
            namespace: Some(namespace),
            name: Some(name),
            uid: Some(uid),
            ..ObjectReference::default()
        }
    }))
}
