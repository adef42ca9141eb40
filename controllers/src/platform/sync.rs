//! Writing a customer's keys, serialised per customer. Every etcd key is derived from
//! one customer's rows; two writers that each read Postgres and then write etcd could
//! otherwise finish in the wrong order and leave a stale value (a cancelled plan
//! overwriting the new one). Under a per-customer advisory lock, whoever writes last
//! read last, and every writer converges after committing its own change.

use std::collections::{BTreeMap, HashMap};

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
    let mut last_read = (HashMap::new(), 0);
    for attempt in 1..=ATTEMPTS {
        last_read = platform.read(&relatives).await?;
        let changes = diff::changes(&keys.entries, &last_read.0);
        if changes.is_empty() {
            break;
        }
        // Tests hang the process here: fenced transaction open, etcd write pending.
        crate::runtime::failpoint::stop_once("stop-before-etcd-write");
        let outcome = platform.write(&changes).await?;
        if !outcome.keys.is_empty() {
            // Tests abort here: written in etcd, the recording transaction rolled back.
            crate::runtime::failpoint::hit("abort-after-etcd-write");
        }
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
    let (current, read_at) = &last_read;
    let floors = revision_floors(&keys, current, *read_at, &written);
    record(&mut lock, &keys.retired, floors).await?;
    lock.commit().await?;
    Ok(written.len())
}

/// The revision each API key entry of a convergence is recorded at, by revision: its
/// write's; else the revision of the entry etcd holds; else, for a retired key whose
/// entry is absent, the revision etcd was read at (at or after the deletion). Recorded
/// even when nothing was written, so that an entry written by an earlier attempt whose
/// recording transaction rolled back (a timeout, a kill, a successor's fence) is still
/// covered by `GatewaySynced`. Only a write moves these, so recording them again costs
/// no row write.
fn revision_floors(
    keys: &desired::CustomerKeys,
    current: &HashMap<String, diff::Current>,
    read_at: i64,
    written: &[(String, i64)],
) -> BTreeMap<i64, Vec<String>> {
    let written: HashMap<&str, i64> = written.iter().map(|(k, r)| (k.as_str(), *r)).collect();
    let mut by_revision: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for (relative, _) in &keys.entries {
        let desired::KeyOwner::ApiKey(hash) = desired::classify(relative) else {
            continue;
        };
        let floor = match (written.get(relative.as_str()), current.get(relative)) {
            (Some(revision), _) => *revision,
            (None, Some(now)) => now.mod_revision,
            (None, None) if keys.retired.contains(&hash) && read_at > 0 => read_at,
            (None, None) => continue,
        };
        by_revision.entry(floor).or_default().push(hash);
    }
    by_revision
}

/// Records what a convergence did in Postgres: the revision floor of each key entry
/// (for `GatewaySynced`), and the retired keys whose entry is now absent for good.
async fn record(
    tx: &mut sqlx::PgConnection,
    retired: &[String],
    by_revision: BTreeMap<i64, Vec<String>>,
) -> Result<(), Error> {
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

    const H_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const H_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const H_C: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
    const H_D: &str = "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";

    fn keys(entries: &[(&str, bool)], retired: &[&str]) -> desired::CustomerKeys {
        desired::CustomerKeys {
            entries: entries
                .iter()
                .map(|(hash, present)| {
                    let entry = present.then(|| desired::DesiredEntry {
                        value: serde_json::json!({"status": "active"}),
                        owner: Default::default(),
                    });
                    (m3o_platform_contract::apikey_key(hash), entry)
                })
                .collect(),
            retired: retired.iter().map(|h| (*h).to_owned()).collect(),
        }
    }

    #[test]
    fn every_convergence_records_a_floor_even_without_writes() {
        let keys = keys(
            &[(H_A, true), (H_B, true), (H_C, false), (H_D, false)],
            &[H_C],
        );
        let current: HashMap<String, diff::Current> = [(
            m3o_platform_contract::apikey_key(H_A),
            diff::Current {
                value: b"{}".to_vec(),
                mod_revision: 7,
            },
        )]
        .into();
        let written = [(m3o_platform_contract::apikey_key(H_B), 12)];
        let floors = revision_floors(&keys, &current, 11, &written);
        assert_eq!(
            floors,
            BTreeMap::from([
                (7, vec![H_A.to_owned()]),
                (11, vec![H_C.to_owned()]),
                (12, vec![H_B.to_owned()]),
            ]),
            "entry held at 7 (written by a rolled-back attempt), written at 12, retired \
             and absent at the read (11); H_D is neither written nor retired"
        );
        assert!(
            revision_floors(&keys, &HashMap::new(), 0, &[]).is_empty(),
            "nothing read: no floor"
        );
    }

    #[test]
    fn lock_keys_spread_and_are_stable() {
        let a = Uuid::from_u128(1);
        assert_eq!(lock_key(a), lock_key(a));
        assert_ne!(lock_key(a), lock_key(Uuid::from_u128(2)));
    }
}
