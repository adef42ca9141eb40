//! Writing a customer's keys, serialised per customer. Every etcd key is derived from
//! one customer's rows; two writers that each read Postgres and then write etcd could
//! otherwise finish in the wrong order and leave a stale value (a cancelled plan
//! overwriting the new one). Under a per-customer advisory lock, whoever writes last
//! read last, and every writer converges after committing its own change.

use std::collections::BTreeMap;

use uuid::Uuid;

use sqlx::{Postgres, Transaction};

use super::{PlatformConfig, desired, diff};
use crate::report::error::Error;
use crate::store::api_keys;

/// Advisory lock class of etcd convergence ("m3oc").
const LOCK_CLASS: i32 = 0x6d33_6f63;

/// The customer's lock key within the class.
fn lock_key(customer_id: Uuid) -> i32 {
    let v = customer_id.as_u128();
    (v as u32 ^ (v >> 32) as u32 ^ (v >> 64) as u32 ^ (v >> 96) as u32) as i32
}

/// Attempts at reading and writing when keys change between the two (a hand edit);
/// after that the reconcile is retried as a lost race.
const ATTEMPTS: usize = 3;

/// Makes every key derived from `customer_id` match Postgres; returns how many keys
/// were written. Reads the customer's rows and its current entries once, and writes only
/// the difference in one etcd transaction. `lock` is a transaction that has passed the
/// writer fence (`Context::begin_write`), so the etcd write happens only while this
/// process is the schema's writer (a replaced writer cannot write etcd after its
/// successor has begun: the successor's term waits for, or terminates, this
/// transaction); it is committed here.
pub async fn converge_customer(
    mut lock: Transaction<'static, Postgres>,
    platform: &PlatformConfig,
    customer_id: Uuid,
) -> Result<usize, Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(lock_key(customer_id))
        .execute(&mut *lock)
        .await?;
    // Read after the lock is held, on the same connection (one connection per
    // converge: waiters cannot starve the pool of the one they wait for).
    let keys = desired::customer_keys(&mut lock, customer_id, chrono::Utc::now()).await?;
    let relatives: Vec<&str> = keys.entries.iter().map(|(k, _)| k.as_str()).collect();
    let mut written = Vec::new();
    for attempt in 1..=ATTEMPTS {
        let current = platform.read(&relatives).await?;
        let changes = diff::changes(&keys.entries, &current);
        if changes.is_empty() {
            break;
        }
        // Tests hang the process here: fenced transaction open, etcd write pending.
        crate::runtime::failpoint::stop_once("stop-before-etcd-write");
        let outcome = platform.write(&changes).await?;
        written.extend(outcome.keys);
        if !outcome.conflict {
            break;
        }
        if attempt == ATTEMPTS {
            return Err(Error::Transient(format!(
                "the etcd keys of customer {customer_id} kept changing while being converged"
            )));
        }
    }
    record(&mut lock, &keys.retired, &written).await?;
    lock.commit().await?;
    Ok(written.len())
}

/// Records what a convergence did in Postgres: the revision of each key entry written
/// (for `GatewaySynced`), and the retired keys whose entry is now absent for good.
async fn record(
    tx: &mut sqlx::PgConnection,
    retired: &[String],
    written: &[(String, i64)],
) -> Result<(), Error> {
    let mut by_revision: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for (relative, revision) in written {
        if let desired::KeyOwner::ApiKey(hash) = desired::classify(relative) {
            by_revision.entry(*revision).or_default().push(hash);
        }
    }
    for (revision, hashes) in by_revision {
        api_keys::record_config_revision(&mut *tx, &hashes, revision).await?;
    }
    if !retired.is_empty() {
        api_keys::mark_config_gone(tx, retired).await?;
    }
    Ok(())
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
