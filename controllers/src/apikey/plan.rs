//! Every decision about an ApiKey, pure and unit-tested: the admission of a pass (its
//! Customer, the orphan check, the grace period), whether the key in the Secret is
//! reused or a new one issued, and from the resource, its customer, the key and its
//! rows to the row writes, the events they announce and when to look again (expiry,
//! end of a rotation's grace period). The pipeline: [`crate::pipeline`].

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use m3o_crds::{ApiKey, ApiKeySpec, ApiKeyState, Customer};
use m3o_events::customers::EventType;
use m3o_platform_contract::{KeyFacts, Owner, Standing, standing};
use uuid::Uuid;

use super::secret::{FoundKey, IssuedKey, SecretState, secret_name};
use crate::duration;
use crate::pipeline::dependent::{self, Gate, Refusal, Requires};
use crate::pipeline::k8s_ref::K8sRef;
use crate::pipeline::row_plan::Digested;
use crate::platform::published;
pub use crate::platform::published::blocked_message;
use crate::report::blocker::Blocker;
use crate::report::status::{self, reasons};
use crate::runtime::shard::Shard;
use crate::store::api_keys::{ApiKeyFields, ApiKeyRow, NewApiKey};
use crate::store::customers::CustomerRow;

/// Keys of a customer that is gone are revoked for good: true when a key is recorded
/// unrevoked for another customer than the live one (or none is live).
pub fn orphaned(rows: &[ApiKeyRow], customer: Option<&CustomerRow>) -> bool {
    rows.iter()
        .any(|r| r.revoked_at.is_none() && customer.is_none_or(|c| c.id != r.customer_id))
}

/// How an ApiKey words a refusal of its Customer. Under [`Requires::LiveRecord`] only
/// a missing Customer or a missing record can come out.
pub fn customer_refusal(key: &ApiKey, refusal: Refusal) -> Blocker {
    let name = &key.spec.customer_ref.name;
    match refusal {
        Refusal::NotFound => Blocker::new(
            reasons::CUSTOMER_NOT_FOUND,
            format!(
                "Customer {name} does not exist in namespace {}; create it",
                key.namespace().unwrap_or_default()
            ),
        ),
        Refusal::NoRecord
        | Refusal::Deleting
        | Refusal::NotReady { .. }
        | Refusal::NotProvisioned => Blocker::new(
            reasons::CUSTOMER_NOT_READY,
            format!("Customer {name} has no record yet; waiting for it to be Ready"),
        ),
    }
}

/// What a pass does, decided from what `load` read (the Customer object, its live row,
/// the resource's key rows), before anything is written.
#[derive(Clone, Debug, PartialEq)]
pub enum Admission {
    /// The Customer is being provisioned: retry quietly, no status written.
    Wait,
    /// The customer the keys were recorded for is gone: revoke them.
    Orphaned,
    /// Nothing can be written now; say why in status.
    Blocked(Blocker),
    /// Go on to the Secret, then the rows, for this customer row and grace period.
    Go {
        customer: Box<CustomerRow>,
        grace: chrono::Duration,
    },
}

/// The first decision of a pass. May the key use its Customer ([`dependent::gate`]): a
/// live record is enough ([`Requires::LiveRecord`]: a key follows its spec and its
/// customer while the Customer is not Ready; [`secret_action`] asks for Ready before it
/// issues one). A Customer in another shard blocks and one being provisioned is waited
/// for, before anything else; then keys of a customer that is gone are revoked; then a
/// refusal blocks; then the grace period, validated before the Secret is touched (an
/// unusable spec issues no key).
pub fn admit(
    key: &ApiKey,
    shard: Option<&Shard>,
    customer_obj: Option<&Customer>,
    customer_row: Option<&CustomerRow>,
    rows: &[ApiKeyRow],
) -> Admission {
    let customer = match dependent::gate(Requires::LiveRecord, shard, customer_obj, customer_row) {
        Gate::Wait => return Admission::Wait,
        Gate::Blocked(blocker) => return Admission::Blocked(blocker),
        _ if orphaned(rows, customer_row) => return Admission::Orphaned,
        Gate::Refused(refusal) => return Admission::Blocked(customer_refusal(key, refusal)),
        Gate::Use(customer) => customer,
    };
    match grace_period(&key.spec) {
        Ok(grace) => Admission::Go {
            customer: Box::new(customer.clone()),
            grace,
        },
        Err(blocker) => Admission::Blocked(blocker),
    }
}

/// What to do about the key in the ApiKey's Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretAction {
    /// Keep the key it holds.
    Reuse(IssuedKey),
    /// Write a fresh key: create the Secret (`read_at` none) or replace ours at the
    /// resourceVersion it was read at.
    Issue { read_at: Option<String> },
}

/// Reuse the key in the Secret when [`reusable`], else issue one, but only into a
/// Secret this ApiKey owns and only for a Customer that is Ready now.
pub fn secret_action(
    key: &ApiKey,
    secret: SecretState,
    rows: &[ApiKeyRow],
    customer_obj: Option<&Customer>,
) -> Result<SecretAction, Blocker> {
    let read_at = match secret {
        SecretState::Foreign => {
            let message = format!(
                "Secret {} exists and is not owned by this ApiKey; delete it or set spec.secretName",
                secret_name(key)
            );
            return Err(Blocker::new(reasons::CONFLICT, message));
        }
        SecretState::Ours {
            found: Some(found), ..
        } if reusable(&found, key.spec.rotation_generation, rows) => {
            return Ok(SecretAction::Reuse(found.issued));
        }
        SecretState::Ours {
            resource_version, ..
        } => resource_version,
        SecretState::Missing => None,
    };
    let ready = customer_obj
        .and_then(|c| c.status.as_ref())
        .and_then(|s| status::ready(&s.conditions))
        .is_some_and(|c| c.status == "True");
    if !ready {
        let message = format!(
            "Customer {} is not Ready; the key is issued once it is",
            key.spec.customer_ref.name
        );
        return Err(Blocker::new(reasons::CUSTOMER_NOT_READY, message));
    }
    Ok(SecretAction::Issue { read_at })
}

/// Longest rotation grace period: the schema's bound (`8760h`), checked again here for
/// objects stored before the schema had it.
pub const MAX_GRACE: chrono::Duration = chrono::Duration::hours(8760);

/// `spec.rotationGracePeriod` as a duration, or why it cannot be used. Checked before
/// anything is written (the Secret included).
pub fn grace_period(spec: &ApiKeySpec) -> Result<chrono::Duration, Blocker> {
    let invalid = |why: &str| {
        let message = format!(
            "spec.rotationGracePeriod {:?} {why}; use a Go duration of at most 8760h, such as 1h",
            spec.rotation_grace_period
        );
        Blocker::new(reasons::INVALID_SPEC, message)
    };
    let parsed = duration::parse(&spec.rotation_grace_period)
        .map_err(|_| invalid("is not a Go duration"))?;
    chrono::Duration::from_std(parsed)
        .ok()
        .filter(|grace| *grace <= MAX_GRACE)
        .ok_or_else(|| invalid("is longer than one year"))
}

/// Whether the key found in the Secret is kept (else a fresh one is issued). The tamper
/// check: a recorded key is kept only while it hashes to its record, whatever its
/// format (keys issued before the checksum format keep working); a key not recorded
/// yet (a crash after the Secret was written) only if it is well formed and carries
/// the operator's hash annotation. A revoked key, or one of an older rotation
/// generation, is never reused.
pub fn reusable(found: &FoundKey, rotation_generation: i64, rows: &[ApiKeyRow]) -> bool {
    let record = rows.iter().find(|r| r.id == found.issued.key_id);
    let trusted = match record {
        Some(row) => row.key_hash == found.issued.hash && row.revoked_at.is_none(),
        None => found.well_formed && found.annotated,
    };
    trusted && found.issued.rotation_generation >= rotation_generation
}

/// The state a key is recorded with: the contract's [`standing`] of a key blocked or not
/// by its spec, of a customer banned or not, at `now` (the gateway decides with the same).
pub fn effective_state(
    blocked: bool,
    customer_status: &str,
    expires_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> ApiKeyState {
    let facts = KeyFacts {
        blocked,
        expires_at,
        ..KeyFacts::default()
    };
    let owner = if published::is_banned(customer_status) {
        Owner::Banned
    } else {
        Owner::Live
    };
    match standing(&facts, owner, now) {
        Standing::Expired => ApiKeyState::Expired,
        Standing::Blocked | Standing::CustomerBanned => ApiKeyState::Blocked,
        // Not revoked, customer not gone, state known: the rest cannot come out.
        Standing::Accepted | Standing::Inactive | Standing::Revoked | Standing::CustomerGone => {
            ApiKeyState::Active
        }
    }
}

/// `spec.expiresAt` in whole seconds, as Kubernetes serialises times (and so Postgres,
/// etcd and status compare equal on every pass).
pub fn expiry(key: &ApiKey) -> Option<DateTime<Utc>> {
    key.spec
        .expires_at
        .as_ref()
        .and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0))
}

/// The event announcing a key's move from one state to another, if any. Becoming
/// usable again (from blocked or expired) is announced as UnblockKey.
pub fn transition_event(from: &str, to: &str) -> Option<EventType> {
    if from == to {
        return None;
    }
    match ApiKeyState::parse(to)? {
        ApiKeyState::Revoked => Some(EventType::DeleteKey),
        ApiKeyState::Expired => Some(EventType::KeyExpired),
        ApiKeyState::Blocked => Some(EventType::BlockKey),
        ApiKeyState::Active => Some(EventType::UnblockKey),
    }
}

/// An event about one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEvent {
    pub kind: EventType,
    pub key_id: Uuid,
    pub scopes: Vec<String>,
    pub previous_id: Option<Uuid>,
    /// Why the key is blocked (BlockKey only).
    pub message: String,
}

/// What the row records of `spec.blockedMessage`: the message while the spec blocks the
/// key, nothing otherwise.
pub fn recorded_blocked_message(spec: &ApiKeySpec) -> String {
    if spec.blocked {
        spec.blocked_message.clone().unwrap_or_default()
    } else {
        String::new()
    }
}

/// Row writes and events of one reconcile, committed together.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyPlan {
    pub insert: Option<NewApiKey>,
    pub updates: Vec<(Uuid, ApiKeyFields)>,
    pub events: Vec<KeyEvent>,
    /// When something changes by the clock alone (expiry, end of grace).
    pub wake_at: Option<DateTime<Utc>>,
}

/// What the reconcile observed.
pub struct Observed<'a> {
    pub now: DateTime<Utc>,
    pub key: &'a ApiKey,
    pub customer: &'a CustomerRow,
    pub issued: &'a IssuedKey,
    /// Unrevoked rows of this resource.
    pub rows: &'a [ApiKeyRow],
    pub grace: chrono::Duration,
}

fn event(kind: EventType, row_id: Uuid, scopes: &[String]) -> KeyEvent {
    KeyEvent {
        kind,
        key_id: row_id,
        scopes: scopes.to_vec(),
        previous_id: None,
        message: String::new(),
    }
}

/// The event of a key's move from `from` to `to`, if any, with the block message on
/// a BlockKey.
fn transition(
    o: &Observed,
    from: &str,
    to: &str,
    row_id: Uuid,
    scopes: &[String],
) -> Option<KeyEvent> {
    let mut e = event(transition_event(from, to)?, row_id, scopes);
    if e.kind == EventType::BlockKey {
        let recorded = recorded_blocked_message(&o.key.spec);
        e.message = blocked_message(&recorded, &o.customer.status);
    }
    Some(e)
}

/// Plans the current key (the one in the Secret) and the previous ones.
pub fn plan(o: &Observed) -> KeyPlan {
    let spec = &o.key.spec;
    let expires_at = expiry(o.key);
    let status = effective_state(spec.blocked, &o.customer.status, expires_at, o.now).as_str();
    let fields = ApiKeyFields {
        customer_id: o.customer.id,
        key_hash: o.issued.hash.clone(),
        rotation_generation: o.issued.rotation_generation,
        scopes: spec.scopes.clone(),
        status: status.to_owned(),
        description: spec.description.clone(),
        expires_at,
        grace_until: None,
        blocked_message: recorded_blocked_message(spec),
        generation: o.key.metadata.generation.unwrap_or_default(),
    };
    let mut plan = KeyPlan::default();
    match o.rows.iter().find(|r| r.id == o.issued.key_id) {
        None => {
            plan.insert = Some(NewApiKey {
                id: o.issued.key_id,
                key_prefix: o.issued.prefix.clone(),
                fields: fields.clone(),
                k8s: K8sRef::of(&o.key.metadata),
            });
            plan.events.push(event(
                EventType::GenerateKey,
                o.issued.key_id,
                &fields.scopes,
            ));
            plan.events.extend(transition(
                o,
                ApiKeyState::Active.as_str(),
                status,
                o.issued.key_id,
                &fields.scopes,
            ));
        }
        Some(row) => {
            // A stale stored digest alone (a row edited back by hand, or written before
            // digests) is rewritten too: the bulk comparison would otherwise find the
            // row differing from its plan at every pass.
            if row.fields() != fields || row.plan_digest.as_deref() != Some(&fields.digest()) {
                plan.events
                    .extend(transition(o, &row.status, status, row.id, &fields.scopes));
                plan.updates.push((row.id, fields.clone()));
            }
        }
    }
    if let Some(t) = expires_at.filter(|t| *t > o.now) {
        plan.wake_at = Some(t);
    }
    for previous in o.rows.iter().filter(|r| r.id != o.issued.key_id) {
        plan_previous(o, previous, &mut plan);
    }
    plan
}

/// A key replaced by a rotation: valid for the grace period (following spec.blocked and
/// the customer like the current key), then revoked.
fn plan_previous(o: &Observed, row: &ApiKeyRow, plan: &mut KeyPlan) {
    let mut fields = row.fields();
    // Its owner is the resource's customer; its hash and rotation generation have no
    // other record (the digest still shows a hand edit of them, which is kept).
    fields.customer_id = o.customer.id;
    let grace_until = match row.grace_until {
        Some(until) if until <= o.now => {
            fields.status = ApiKeyState::Revoked.as_str().into();
            plan.events
                .push(event(EventType::DeleteKey, row.id, &row.scopes));
            plan.updates.push((row.id, fields));
            return;
        }
        Some(until) => until,
        None => {
            // A key replaced within its own rotation generation (its Secret was deleted
            // or edited) is held by nobody: no grace period.
            let grace = if row.rotation_generation >= o.issued.rotation_generation {
                chrono::Duration::zero()
            } else {
                o.grace
            };
            // Saturating: the grace period is bounded, but a clock at the end of time
            // must not panic the controller.
            let until = o
                .now
                .checked_add_signed(grace)
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            fields.grace_until = Some(until);
            plan.events.push(KeyEvent {
                previous_id: Some(row.id),
                ..event(EventType::KeyRotated, o.issued.key_id, &o.key.spec.scopes)
            });
            until
        }
    };
    plan.wake_at = Some(plan.wake_at.map_or(grace_until, |w| w.min(grace_until)));
    let status = effective_state(
        o.key.spec.blocked,
        &o.customer.status,
        row.expires_at,
        o.now,
    )
    .as_str();
    if status != row.status {
        plan.events
            .extend(transition(o, &row.status, status, row.id, &row.scopes));
        fields.status = status.to_owned();
    }
    fields.blocked_message = recorded_blocked_message(&o.key.spec);
    if fields != row.fields() || row.plan_digest.as_deref() != Some(&fields.digest()) {
        plan.updates.push((row.id, fields));
    }
}

/// Revokes every row (deletion, or the customer is gone).
pub fn revoke_all(rows: &[ApiKeyRow], generation: i64) -> KeyPlan {
    let mut plan = KeyPlan::default();
    let revoked = ApiKeyState::Revoked.as_str();
    for row in rows.iter().filter(|r| r.status != revoked) {
        let fields = ApiKeyFields {
            status: revoked.into(),
            generation,
            ..row.fields()
        };
        plan.events
            .push(event(EventType::DeleteKey, row.id, &row.scopes));
        plan.updates.push((row.id, fields));
    }
    plan
}

#[cfg(test)]
mod tests;
