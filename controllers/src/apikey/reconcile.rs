//! Applying an ApiKey: Secret first (the key exists before anything can accept it),
//! then one Postgres transaction (rows + outbox), then etcd, then status. A crash
//! between any two steps is repaired by the next pass: the Secret's key is reused,
//! never re-issued for the same rotation generation, and only its hash is recorded.

use std::sync::Arc;

use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType as K8sEventType;
use kube::{Api, Resource, ResourceExt};
use m3o_crds::{ApiKey, ApiKeyState, Customer};
use m3o_events::outbox::{self, OutboxMessage};

use super::gateway_sync;
use super::plan::{self, KeyPlan, Observed};
use super::secret::{self, IssuedKey, SecretState};
use crate::context::Context;
use crate::customer::plan::payload;
use crate::error::{AtStep, Error, Step};
use crate::lifecycle;
use crate::platform::sync;
use crate::status::{self, reasons};
use crate::store::api_keys::{self, ApiKeyRow};
use crate::store::customers::{self, CustomerRow};
use crate::{failpoint, shard};

pub async fn apply(key: Arc<ApiKey>, ctx: &Context) -> Result<Action, Error> {
    let ns = key.namespace().unwrap_or_default();
    let api: Api<ApiKey> = Api::namespaced(ctx.client.clone(), &ns);
    let customer_name = &key.spec.customer_ref.name;
    let customer_obj = Api::<Customer>::namespaced(ctx.client.clone(), &ns)
        .get_opt(customer_name)
        .await
        .at(Step::Load("the Customer"))?;
    if let Some(customer) = &customer_obj
        && let Err(b) = shard::customer_gate(ctx.settings.shard.as_ref(), customer)
    {
        return wait(&api, &key, ctx, b.reason, b.message).await;
    }
    let customer = customers::live_by_k8s_ref(&ctx.db, &ns, customer_name)
        .await
        .at(Step::Load("the customer record"))?;
    let rows = api_keys::all_for_resource(&ctx.db, &ns, &key.name_any())
        .await
        .at(Step::Load("the key records"))?;

    // Keys of a customer that is gone are revoked for good.
    let orphaned = rows
        .iter()
        .any(|r| r.revoked_at.is_none() && customer.as_ref().is_none_or(|c| c.id != r.customer_id));
    if orphaned {
        return revoke_orphaned(&api, &key, ctx).await;
    }
    let Some(customer) = customer else {
        let (reason, message) = match customer_obj {
            None => (
                reasons::CUSTOMER_NOT_FOUND,
                format!("Customer {customer_name} does not exist in namespace {ns}; create it"),
            ),
            Some(_) => (
                reasons::CUSTOMER_NOT_READY,
                format!("Customer {customer_name} has no record yet; waiting for it to be Ready"),
            ),
        };
        return wait(&api, &key, ctx, reason, message).await;
    };

    // Validated before the Secret is touched: an unusable spec issues no key.
    let grace = match plan::grace_period(&key.spec) {
        Ok(grace) => grace,
        Err(b) => return wait(&api, &key, ctx, b.reason, b.message).await,
    };
    let issued = match current_key(ctx, &key, customer_obj.as_ref(), &rows).await? {
        Ok(issued) => issued,
        Err((reason, message)) => return wait(&api, &key, ctx, reason, message).await,
    };

    let key_plan = record(ctx, &key, &customer, &issued, grace)
        .await
        .at(Step::Database)?;

    let rows = api_keys::all_for_resource(&ctx.db, &ns, &key.name_any())
        .await
        .at(Step::Load("the key records"))?;
    converge_config(ctx, &rows).await.at(Step::ConfigStore)?;

    let current = rows.iter().find(|r| r.id == issued.key_id).ok_or_else(|| {
        Error::Transient(format!(
            "key {} was revoked concurrently after it was recorded",
            issued.key_id
        ))
    })?;
    let mut status = plan::synced_status(&key, current, &secret::secret_name(&key));
    let gateway = gateway_sync::condition(ctx, &key, Some(&current.key_hash))
        .await
        .at(Step::Load("the gateway reports"))?;
    let wake_at = gateway_sync::wake_at(gateway.as_ref(), key_plan.wake_at);
    gateway_sync::set(&mut status, gateway, key.metadata.generation);
    let was = key.status.as_ref().and_then(|s| s.state);
    status::apply(&api, &key, &status).await.at(Step::Status)?;
    announce(ctx, &key, was, status.state, current).await;
    Ok(requeue_at(ctx, wake_at))
}

/// The key in the Secret for the current rotation generation, issuing one if there is
/// none yet (`Err` with a reason when it must not be issued now).
async fn current_key(
    ctx: &Context,
    key: &ApiKey,
    customer_obj: Option<&Customer>,
    rows: &[ApiKeyRow],
) -> Result<Result<IssuedKey, (&'static str, String)>, Error> {
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &key.namespace().unwrap_or_default());
    let name = secret::secret_name(key);
    let found = secrets.get_opt(&name).await.at(Step::Secret("reading"))?;
    let read_at = match secret::inspect(found.as_ref(), key) {
        SecretState::Foreign => {
            return Ok(Err((
                reasons::CONFLICT,
                format!(
                    "Secret {name} exists and is not owned by this ApiKey; delete it or set spec.secretName"
                ),
            )));
        }
        SecretState::Ours {
            found: Some(found), ..
        } if plan::reusable(&found, key.spec.rotation_generation, rows) => {
            return Ok(Ok(found.issued));
        }
        SecretState::Ours {
            resource_version, ..
        } => resource_version,
        SecretState::Missing => None,
    };
    // A new key is issued only for a Customer that is Ready now.
    let ready = customer_obj
        .and_then(|c| c.status.as_ref())
        .and_then(|s| status::ready(&s.conditions))
        .is_some_and(|c| c.status == "True");
    if !ready {
        let message = format!(
            "Customer {} is not Ready; the key is issued once it is",
            key.spec.customer_ref.name
        );
        return Ok(Err((reasons::CUSTOMER_NOT_READY, message)));
    }
    let issued = secret::issue(&secrets, key, key.spec.rotation_generation, read_at)
        .await
        .at(Step::Secret("writing"))?;
    tracing::info!(apikey = %key.name_any(), key_id = %issued.key_id, prefix = %issued.prefix, "key issued into Secret {name}");
    failpoint::hit("apikey-secret-written");
    Ok(Ok(issued))
}

/// The database step: rows and their events in one transaction.
async fn record(
    ctx: &Context,
    key: &ApiKey,
    customer: &CustomerRow,
    issued: &IssuedKey,
    grace: chrono::Duration,
) -> Result<KeyPlan, Error> {
    let mut tx = ctx.begin_write().await?;
    // The customer stays live until this commits (its deletion waits for it), or no key
    // is recorded: the next pass finds it gone and revokes.
    if customers::lock_live_shared(&mut tx, customer.id)
        .await?
        .is_none()
    {
        return Err(Error::Transient(format!(
            "customer {} was deleted meanwhile",
            customer.id
        )));
    }
    let rows = api_keys::lock_live_for_resource(
        &mut tx,
        &key.namespace().unwrap_or_default(),
        &key.name_any(),
    )
    .await?;
    let observed = Observed {
        now: Utc::now(),
        key,
        customer,
        issued,
        rows: &rows,
        grace,
    };
    let key_plan = plan::plan(&observed);
    write(&mut tx, &key_plan, customer).await?;
    tx.commit().await?;
    Ok(key_plan)
}

/// Writes a plan's rows and outbox events into `tx`.
async fn write(
    tx: &mut sqlx::PgConnection,
    key_plan: &KeyPlan,
    customer: &CustomerRow,
) -> Result<(), Error> {
    if let Some(new) = &key_plan.insert {
        api_keys::insert(tx, new).await?;
    }
    for (id, fields) in &key_plan.updates {
        api_keys::update(tx, *id, fields).await?;
    }
    for event in &key_plan.events {
        let message = OutboxMessage::from_event(
            event.key_id.to_string(),
            &plan::to_event(event, payload(customer)),
        );
        outbox::enqueue(tx, &message).await?;
    }
    if !key_plan.events.is_empty() {
        tracing::info!(events = ?key_plan.events.iter().map(|e| e.kind).collect::<Vec<_>>(), "api key records written");
    }
    Ok(())
}

/// Makes the gateway entries of `rows` match Postgres (removing revoked ones), through
/// each owning customer's serialised convergence.
pub async fn converge_config(ctx: &Context, rows: &[ApiKeyRow]) -> Result<(), Error> {
    let customers: std::collections::BTreeSet<_> = rows.iter().map(|r| r.customer_id).collect();
    for customer_id in customers {
        sync::converge_customer(ctx, customer_id).await?;
    }
    Ok(())
}

/// Revokes the keys of a resource whose customer was deleted.
async fn revoke_orphaned(api: &Api<ApiKey>, key: &ApiKey, ctx: &Context) -> Result<Action, Error> {
    revoke_all(ctx, key).await?;
    let message = format!(
        "Customer {} was deleted; its keys are revoked",
        key.spec.customer_ref.name
    );
    let reason = reasons::CUSTOMER_NOT_FOUND;
    let mut status = plan::waiting_status(key, reason, message.clone(), Some(ApiKeyState::Revoked));
    let gateway = gateway_sync::condition(ctx, key, None)
        .await
        .at(Step::Load("the gateway reports"))?;
    gateway_sync::set(&mut status, gateway, key.metadata.generation);
    lifecycle::report_blocked(ctx, api, key, &status, reason, message).await
}

/// Revokes every unrevoked key of the resource (events included) and removes their entries.
pub async fn revoke_all(ctx: &Context, key: &ApiKey) -> Result<(), Error> {
    let (ns, name) = (key.namespace().unwrap_or_default(), key.name_any());
    revoke_rows(ctx, key, &ns, &name)
        .await
        .at(Step::Database)?;
    let rows = api_keys::all_for_resource(&ctx.db, &ns, &name)
        .await
        .at(Step::Load("the key records"))?;
    converge_config(ctx, &rows).await.at(Step::ConfigStore)
}

/// Revokes the unrevoked rows of the resource, with their events, in one transaction.
async fn revoke_rows(ctx: &Context, key: &ApiKey, ns: &str, name: &str) -> Result<(), Error> {
    let mut tx = ctx.begin_write().await?;
    let rows = api_keys::lock_live_for_resource(&mut tx, ns, name).await?;
    let generation = key.metadata.generation.unwrap_or_default();
    for row in &rows {
        let Some(customer) = customers::by_id(&mut *tx, row.customer_id).await? else {
            continue;
        };
        let single = plan::revoke_all(std::slice::from_ref(row), generation);
        write(&mut tx, &single, &customer).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn wait(
    api: &Api<ApiKey>,
    key: &ApiKey,
    ctx: &Context,
    reason: &'static str,
    message: String,
) -> Result<Action, Error> {
    let status = plan::waiting_status(key, reason, message.clone(), None);
    lifecycle::report_blocked(ctx, api, key, &status, reason, message).await
}

/// Kubernetes Events for state changes an admin cares about.
async fn announce(
    ctx: &Context,
    key: &ApiKey,
    was: Option<ApiKeyState>,
    now: Option<ApiKeyState>,
    current: &ApiKeyRow,
) {
    if was == now {
        return;
    }
    let (type_, reason) = match now {
        Some(ApiKeyState::Active) => (K8sEventType::Normal, reasons::PROVISIONED),
        Some(ApiKeyState::Blocked) => (K8sEventType::Normal, reasons::BLOCKED),
        Some(ApiKeyState::Expired) => (K8sEventType::Warning, reasons::EXPIRED),
        _ => return,
    };
    let note = format!(
        "key {} ({}) is {}",
        current.id, current.key_prefix, current.status
    );
    ctx.event(&key.object_ref(&()), type_, reason, "Reconcile", note)
        .await;
}

/// Requeue at the next clock-driven change, or the resync interval, whichever is first.
fn requeue_at(ctx: &Context, wake_at: Option<chrono::DateTime<Utc>>) -> Action {
    let resync = ctx.settings.resync_interval;
    let until = wake_at
        .and_then(|t| (t - Utc::now()).to_std().ok())
        .map(|d| d + std::time::Duration::from_millis(50));
    Action::requeue(until.map_or(resync, |d| d.min(resync)))
}
