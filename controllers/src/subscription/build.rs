//! Pure builders of what a Subscription reconcile writes besides its row: the M3O
//! event payloads and the status. The pipeline: [`crate::pipeline`].

use m3o_crds::{Quota, Subscription, SubscriptionState, SubscriptionStatus};
use m3o_events::customers::{self, EventType};
use uuid::Uuid;

use crate::pipeline::outbox_events::customer_payload as payload;
use crate::report::blocker::Blocker;
use crate::report::status::{self, Cond, merge, not_synced, reasons, types};
use crate::store::customers::CustomerRow;
use crate::store::subscriptions::SubscriptionRow;

/// The customer payload of an event: from its row, or just the id when the row is gone.
pub fn customer_payload(customer_id: Uuid, row: Option<&CustomerRow>) -> customers::Customer {
    row.map(payload).unwrap_or_else(|| customers::Customer {
        id: customer_id.to_string(),
        ..Default::default()
    })
}

/// The event of type `t` (`SubscriptionChanged` or `SubscriptionCancelled`) for `tier`.
pub fn event(customer: customers::Customer, t: EventType, tier: &str) -> customers::Event {
    let mut event = customers::Event {
        customer: Some(customer),
        ..Default::default()
    };
    event.set_type(t);
    let tier = tier.to_owned();
    match t {
        EventType::SubscriptionChanged => {
            event.subscription_changed = Some(customers::SubscriptionChanged { tier });
        }
        EventType::SubscriptionCancelled => {
            event.subscription_cancelled = Some(customers::SubscriptionCancelled { tier });
        }
        _ => {}
    }
    event
}

/// The status fields describing the row in force (or none: pending).
fn in_force(previous: SubscriptionStatus, row: Option<&SubscriptionRow>) -> SubscriptionStatus {
    let Some(row) = row else {
        // In force before and not now: cancelled under it (its Customer was deleted).
        let state = match previous.state {
            Some(SubscriptionState::Active | SubscriptionState::Cancelled) => {
                SubscriptionState::Cancelled
            }
            _ => SubscriptionState::Pending,
        };
        return SubscriptionStatus {
            subscription_id: None,
            plan: None,
            quota: None,
            state: Some(state),
            ..previous
        };
    };
    SubscriptionStatus {
        subscription_id: Some(row.id.to_string()),
        customer_id: Some(row.customer_id.to_string()),
        plan: Some(row.plan.clone()),
        quota: Some(Quota {
            monthly_requests: row.monthly_requests,
            requests_per_second: row.requests_per_second,
        }),
        state: Some(SubscriptionState::Active),
        ..previous
    }
}

/// The note of the Kubernetes Event of a Subscription's first coming into force.
pub fn provisioned_note(row: &SubscriptionRow, quota_key: &str) -> String {
    format!(
        "subscription {} on plan {} in force, quota at {quota_key}",
        row.id, row.plan
    )
}

/// Status once Postgres and etcd both match.
pub fn provisioned_status(
    sub: &Subscription,
    row: &SubscriptionRow,
    quota_key: &str,
) -> SubscriptionStatus {
    let generation = sub.metadata.generation;
    let previous = sub.status.clone().unwrap_or_default();
    let ready = Cond::new(
        types::READY,
        true,
        reasons::PROVISIONED,
        format!(
            "plan {} in force: {} requests a month, {} per second",
            row.plan, row.monthly_requests, row.requests_per_second
        ),
    );
    let conditions = merge(
        &previous.conditions,
        &status::synced(
            format!("record {} is up to date", row.id),
            format!("{quota_key} is up to date"),
            ready,
        ),
        generation,
    );
    SubscriptionStatus {
        observed_generation: generation,
        conditions,
        ..in_force(previous, Some(row))
    }
}

/// Status of a Subscription that cannot be put in force as specified; `row` is what
/// stays in force meanwhile (if anything), so status never claims more than etcd holds.
pub fn blocked_status(
    sub: &Subscription,
    blocker: &Blocker,
    row: Option<&SubscriptionRow>,
) -> SubscriptionStatus {
    let generation = sub.metadata.generation;
    let previous = sub.status.clone().unwrap_or_default();
    let (reason, message) = (blocker.reason, blocker.message.clone());
    let conditions = not_synced(&previous.conditions, reason, message, generation);
    SubscriptionStatus {
        observed_generation: generation,
        conditions,
        ..in_force(previous, row)
    }
}
