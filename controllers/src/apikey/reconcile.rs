//! Applying an ApiKey: load its Customer, rows and Secret, plan, then the Secret first
//! (the key exists before anything can accept it), one Postgres transaction (rows +
//! outbox), etcd, then status. A crash between any two steps is repaired by the next
//! pass: the Secret's key is reused, never re-issued for the same rotation generation,
//! and only its hash is recorded. The pipeline: [`crate::pipeline`].

use std::sync::Arc;

use chrono::Utc;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use m3o_crds::{ApiKey, ApiKeyState, Customer};
use uuid::Uuid;

use super::plan::{self, Admission, KeyPlan, Observed, SecretAction};
use super::secret::{self, IssuedKey, Plaintext};
use super::{build, gateway_sync};
use crate::pipeline::{dependent, outbox_events};
use crate::report::blocker::Blocker;
use crate::report::error::{AtStep, Error, Step};
use crate::report::lifecycle;
use crate::report::status::{self, FIELD_MANAGER, reasons};
use crate::runtime::context::Context;
use crate::runtime::failpoint;
use crate::store::api_keys::{self, ApiKeyRow};
use crate::store::customers::{self, CustomerRow};

/// Converges the Secret, Postgres, etcd and status on the ApiKey's spec, in the order of
/// [`crate::pipeline`]: load, plan, apply (Secret, transaction, etcd), report.
pub async fn apply(key: Arc<ApiKey>, ctx: &Context) -> Result<Action, Error> {
    let api: Api<ApiKey> =
        Api::namespaced(ctx.client.clone(), &key.namespace().unwrap_or_default());
    // Waiting: written to status and retried later.
    let waiting = |b: &Blocker| build::waiting_status(&key, b, None);

    // Load.
    let customers_listed = ctx.watching.has(m3o_crds::kinds::CUSTOMER);
    let loaded = load(ctx, &key).await?;

    // Plan.
    let shard = ctx.settings.shard.as_ref();
    let customer_obj = loaded.customer.as_ref();
    let customer_row = loaded.customer_row.as_ref();
    let (customer, grace) = match plan::admit(&key, shard, customer_obj, customer_row, &loaded.rows)
    {
        Admission::Go { customer, grace } => (customer, grace),
        Admission::Wait => {
            return Ok(dependent::wait(
                customers_listed,
                ctx.settings.blocked_retry,
            ));
        }
        Admission::Orphaned => return revoke_orphaned(&api, &key, ctx).await,
        Admission::Blocked(blocker) => {
            return lifecycle::report_blocked(ctx, &api, &key, blocker, waiting).await;
        }
    };

    // Apply: the Secret first (the key exists before anything records or accepts it),
    // then the rows and their events in one transaction, then etcd.
    let issued = match sync_secret(ctx, &key, &loaded.rows, customer_obj).await? {
        Ok(issued) => issued,
        Err(blocker) => return lifecycle::report_blocked(ctx, &api, &key, blocker, waiting).await,
    };
    let key_plan = record(ctx, &key, &customer, &issued, grace)
        .await
        .at(Step::Database)?;
    let rows = converge(ctx, &key).await?;

    // Report.
    report_synced(ctx, &api, &key, &issued, &rows, key_plan.wake_at).await
}

/// What a pass reads before it decides.
struct Loaded {
    /// The Customer object (from the shared cache).
    customer: Option<Customer>,
    /// Its live row.
    customer_row: Option<CustomerRow>,
    /// Every row of this resource, revoked ones included.
    rows: Vec<ApiKeyRow>,
}

/// Load: the Customer, its live row and the resource's key rows. The Secret is read by
/// [`sync_secret`], only by a pass that goes on to it and only when a key was recorded
/// (every other pass makes no request for it).
async fn load(ctx: &Context, key: &ApiKey) -> Result<Loaded, Error> {
    let ns = key.namespace().unwrap_or_default();
    let customer_name = &key.spec.customer_ref.name;
    let customer = ctx
        .customer(&ns, customer_name)
        .await
        .at(Step::Load("the Customer"))?;
    // A pass that waits for its Customer, or is blocked by its shard, is decided by the
    // Customer alone ([`plan::admit`] checks that first): it reads no record.
    let shard = ctx.settings.shard.as_ref();
    if dependent::before_records(shard, customer.as_ref()).is_some() {
        return Ok(Loaded {
            customer,
            customer_row: None,
            rows: Vec::new(),
        });
    }
    let customer_row = customers::live_by_k8s_ref(&ctx.db, &ns, customer_name)
        .await
        .at(Step::Load("the customer record"))?;
    let rows = api_keys::all_for_resource(&ctx.db, &ns, &key.name_any())
        .await
        .at(Step::Load("the key records"))?;
    Ok(Loaded {
        customer,
        customer_row,
        rows,
    })
}

/// The Secret step: the key in the Secret, reused or freshly written there
/// ([`plan::secret_action`] decides). A key never recorded has no Secret yet, short of
/// a crash just after writing it or a foreign Secret of that name: its Secret is
/// created without a read first, and read (then planned again) only when the create
/// finds one there.
async fn sync_secret(
    ctx: &Context,
    key: &ApiKey,
    rows: &[ApiKeyRow],
    customer_obj: Option<&Customer>,
) -> Result<Result<IssuedKey, Blocker>, Error> {
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &key.namespace().unwrap_or_default());
    let mut read = !rows.is_empty();
    let mut found = match read {
        true => read_secret(&secrets, key).await?,
        false => None,
    };
    loop {
        let state = secret::inspect(found.as_ref(), key);
        let read_at = match plan::secret_action(key, state, rows, customer_obj) {
            Ok(SecretAction::Reuse(issued)) => return Ok(Ok(issued)),
            Ok(SecretAction::Issue { read_at }) => read_at,
            Err(blocker) => return Ok(Err(blocker)),
        };
        match issue(&secrets, key, read_at)
            .await
            .at(Step::Secret("writing"))?
        {
            Some(issued) => return Ok(Ok(issued)),
            None if !read => {
                found = read_secret(&secrets, key).await?;
                read = true;
            }
            None => {
                return Err(Error::Transient(format!(
                    "Secret {} appeared while it was being created",
                    secret::secret_name(key)
                )));
            }
        }
    }
}

/// The ApiKey's Secret, if there is one.
async fn read_secret(secrets: &Api<Secret>, key: &ApiKey) -> Result<Option<Secret>, Error> {
    secrets
        .get_opt(&secret::secret_name(key))
        .await
        .at(Step::Secret("reading"))
}

/// The etcd step: the gateway entries of every customer the resource's rows belong to,
/// through each customer's serialised convergence. The rows are read back as committed:
/// a customer whose rows an earlier pass revoked before a crash is converged too, and
/// the status shows what is in force.
async fn converge(ctx: &Context, key: &ApiKey) -> Result<Vec<ApiKeyRow>, Error> {
    let ns = key.namespace().unwrap_or_default();
    let rows = api_keys::all_for_resource(&ctx.db, &ns, &key.name_any())
        .await
        .at(Step::Load("the key records"))?;
    lifecycle::converge_customers(ctx, rows.iter().map(|r| r.customer_id)).await?;
    Ok(rows)
}

/// The report step of a synced key: status (with the `GatewaySynced` condition),
/// Kubernetes Events for state changes, and when to look again.
async fn report_synced(
    ctx: &Context,
    api: &Api<ApiKey>,
    key: &ApiKey,
    issued: &IssuedKey,
    rows: &[ApiKeyRow],
    wake_at: Option<chrono::DateTime<Utc>>,
) -> Result<Action, Error> {
    let current = rows.iter().find(|r| r.id == issued.key_id).ok_or_else(|| {
        Error::Transient(format!(
            "key {} was revoked concurrently after it was recorded",
            issued.key_id
        ))
    })?;
    let mut status = build::synced_status(key, current, &secret::secret_name(key));
    let gateway = gateway_sync::condition(ctx, key, Some(&current.key_hash))
        .await
        .at(Step::Load("the gateway reports"))?;
    let wake_at = gateway_sync::wake_at(gateway.as_ref(), wake_at);
    gateway_sync::set(&mut status, gateway, key.metadata.generation);
    let was = key.status.as_ref().and_then(|s| s.state);
    status::apply(api, key, &status).await.at(Step::Status)?;
    announce(ctx, key, was, status.state, current).await;
    Ok(requeue_at(wake_at))
}

fn created_by_us() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    }
}

/// Writes a fresh key into the ApiKey's Secret and returns what to record; the
/// plaintext is dropped on return. A missing Secret is created, never applied over an
/// object that is there after all: that is `None`, for the caller to read it. One of
/// ours is replaced only at the resourceVersion it was read at (else a 409, retried
/// as [`Error::Transient`]).
async fn issue(
    secrets: &Api<Secret>,
    key: &ApiKey,
    read_at: Option<String>,
) -> Result<Option<IssuedKey>, Error> {
    let plaintext = Plaintext::generate()
        .map_err(|e| Error::Internal(format!("OS random number generator failed: {e}")))?;
    let generation = key.spec.rotation_generation;
    let (manifest, issued) = build::secret(key, plaintext, Uuid::now_v7(), generation);
    match read_at {
        // Under the operator's field manager: a Secret whose data another manager
        // wrote was edited by someone else (`data_written_by_others` at start-up).
        None => match secrets.create(&created_by_us(), &manifest).await {
            Err(kube::Error::Api(status)) if status.reason == "AlreadyExists" => return Ok(None),
            created => {
                created?;
            }
        },
        Some(resource_version) => {
            let body = build::secret_replacement(manifest, resource_version)
                .map_err(|e| Error::Internal(format!("encoding Secret: {e}")))?;
            let params = PatchParams::apply(FIELD_MANAGER).force();
            let name = secret::secret_name(key);
            secrets.patch(&name, &params, &Patch::Apply(&body)).await?;
        }
    }
    tracing::info!(key_id = %issued.key_id, prefix = %issued.prefix, "key issued into Secret {}", secret::secret_name(key));
    failpoint::hit("apikey-secret-written");
    Ok(Some(issued))
}

/// The database step, in one transaction: the customer locked live (its deletion waits
/// for the commit), the resource's unrevoked rows locked and planned from as locked
/// ([`plan::plan`], pure: no concurrent pass changes them meanwhile), then the row
/// writes and their events.
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
    let events: Vec<_> = (key_plan.events.iter())
        .map(|e| {
            (
                e.key_id.to_string(),
                build::to_event(e, outbox_events::customer_payload(customer)),
            )
        })
        .collect();
    outbox_events::enqueue(tx, events).await?;
    if !key_plan.events.is_empty() {
        tracing::info!(events = ?key_plan.events.iter().map(|e| e.kind).collect::<Vec<_>>(), "api key records written");
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
    let blocker = Blocker::new(reasons::CUSTOMER_NOT_FOUND, message);
    let mut status = build::waiting_status(key, &blocker, Some(ApiKeyState::Revoked));
    let gateway = gateway_sync::condition(ctx, key, None)
        .await
        .at(Step::Load("the gateway reports"))?;
    gateway_sync::set(&mut status, gateway, key.metadata.generation);
    lifecycle::report_blocked(ctx, api, key, blocker, |_| status).await
}

/// Revokes every unrevoked key of the resource (events included) and removes their entries.
pub async fn revoke_all(ctx: &Context, key: &ApiKey) -> Result<(), Error> {
    let (ns, name) = (key.namespace().unwrap_or_default(), key.name_any());
    let generation = key.metadata.generation.unwrap_or_default();
    revoke_rows(ctx, Some(generation), &ns, &name)
        .await
        .at(Step::Database)?;
    let rows = api_keys::all_for_resource(&ctx.db, &ns, &name)
        .await
        .at(Step::Load("the key records"))?;
    // The gateway entries follow Postgres (revoked ones are removed), through each
    // owning customer's serialised convergence.
    lifecycle::converge_customers(ctx, rows.iter().map(|r| r.customer_id)).await
}

/// Revokes the unrevoked rows of the resource, with their events, in one transaction,
/// recording `generation` (`None`: each row's own, for a resource that is gone).
pub(crate) async fn revoke_rows(
    ctx: &Context,
    generation: Option<i64>,
    ns: &str,
    name: &str,
) -> Result<(), Error> {
    let mut tx = ctx.begin_write().await?;
    let rows = api_keys::lock_live_for_resource(&mut tx, ns, name).await?;
    for row in &rows {
        let Some(customer) = customers::by_id(&mut *tx, row.customer_id).await? else {
            continue;
        };
        let generation = generation.unwrap_or(row.generation);
        let single = plan::revoke_all(std::slice::from_ref(row), generation);
        write(&mut tx, &single, &customer).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Kubernetes Events for state changes an admin cares about.
async fn announce(
    ctx: &Context,
    key: &ApiKey,
    was: Option<ApiKeyState>,
    now: Option<ApiKeyState>,
    current: &ApiKeyRow,
) {
    let Some((type_, reason)) = build::state_event(was, now) else {
        return;
    };
    let note = format!(
        "key {} ({}) is {}",
        current.id, current.key_prefix, current.status
    );
    ctx.event(&key.object_ref(&()), type_, reason, "Reconcile", note)
        .await;
}

/// Requeue at the next clock-driven change (an expiry, the end of a grace period, a
/// gateway recheck); one already past (a key replaced with no grace, an expiry during
/// this reconcile) at once. Otherwise only on a change, or when the bulk resync finds
/// the key due.
fn requeue_at(wake_at: Option<chrono::DateTime<Utc>>) -> Action {
    wake_at.map_or_else(Action::await_change, |t| {
        let until = (t - Utc::now()).to_std().unwrap_or_default();
        // Capped: a timer years ahead is beyond what the scheduler holds.
        Action::requeue((until + std::time::Duration::from_millis(50)).min(LONGEST_WAIT))
    })
}

/// The longest a key's reconcile waits for its clock (it looks again after this).
const LONGEST_WAIT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
