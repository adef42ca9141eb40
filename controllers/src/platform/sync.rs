//! Writing a customer's keys, serialised per customer. Every etcd key is derived from
//! one customer's rows; two writers that each read Postgres and then write etcd could
//! otherwise finish in the wrong order and leave a stale value (a cancelled plan
//! overwriting the new one). Under a per-customer advisory lock, whoever writes last
//! read last, and every writer converges after committing its own change.

use uuid::Uuid;

use super::desired;
use crate::context::Context;
use crate::error::Error;
use crate::store::api_keys;

/// Advisory lock class of etcd convergence ("m3oc").
const LOCK_CLASS: i32 = 0x6d33_6f63;

/// The customer's lock key within the class.
fn lock_key(customer_id: Uuid) -> i32 {
    let v = customer_id.as_u128();
    (v as u32 ^ (v >> 32) as u32 ^ (v >> 64) as u32 ^ (v >> 96) as u32) as i32
}

/// Makes every key derived from `customer_id` match Postgres; true if anything changed.
/// The transaction passes the writer fence first, so the etcd writes happen only while
/// this process is the schema's writer (a replaced writer cannot write etcd after its
/// successor has begun: the successor's term waits for, or terminates, this transaction).
pub async fn converge_customer(ctx: &Context, customer_id: Uuid) -> Result<bool, Error> {
    let mut lock = ctx.begin_write().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(lock_key(customer_id))
        .execute(&mut *lock)
        .await?;
    // Read after the lock is held, on the same connection (one connection per
    // converge: waiters cannot starve the pool of the one they wait for).
    let entries = desired::customer_keys(&mut lock, customer_id).await?;
    // Tests hang the process here: fenced transaction open, etcd write pending.
    crate::failpoint::stop_once("stop-before-etcd-write");
    let changed = ctx.platform.converge(&entries).await?;
    // The revision of the last write to each key entry, for `GatewaySynced`.
    for (relative, revision) in &changed {
        if let desired::KeyOwner::ApiKey(hash) = desired::classify(relative) {
            api_keys::record_config_revision(&mut lock, &hash, *revision).await?;
        }
    }
    lock.commit().await?;
    Ok(!changed.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_spread_and_are_stable() {
        let a = Uuid::from_u128(1);
        assert_eq!(lock_key(a), lock_key(a));
        assert_ne!(lock_key(a), lock_key(Uuid::from_u128(2)));
    }
}
