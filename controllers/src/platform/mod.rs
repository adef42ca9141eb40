//! The etcd-backed platform config the API gateway reads (DESIGN.md section 6).
//!
//! Postgres is the system of record; every value here is derived from it
//! ([`desired`]), written only when it differs, and kept in place by the drift
//! watcher ([`drift`]).

pub mod desired;
pub mod drift;
pub mod sync;

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};

/// How many of our own write revisions are remembered to tell them from hand edits.
const OWN_REVISIONS: usize = 16_384;

/// A handle on the platform config under one prefix.
#[derive(Clone)]
pub struct PlatformConfig {
    client: Client,
    prefix: String,
    own_revisions: Arc<Mutex<RecentRevisions>>,
}

impl PlatformConfig {
    /// Connects to etcd; `prefix` is normalised to have no trailing slash.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, etcd_client::Error> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let mut client = Client::connect(endpoints, Some(options)).await?;
        // Connecting is lazy; a cheap read proves the endpoint answers.
        client
            .get("health-probe", Some(GetOptions::new().with_count_only()))
            .await?;
        Ok(Self {
            client,
            prefix: prefix.trim_end_matches('/').to_owned(),
            own_revisions: Arc::default(),
        })
    }

    /// The configured prefix, without trailing slash.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Absolute key of a path relative to the prefix (`customers/<id>`).
    pub fn key(&self, relative: &str) -> String {
        format!("{}/{}", self.prefix, relative)
    }

    /// Writes `value` at `key` unless it already holds exactly that; true when written.
    /// One compare-and-put transaction, so a repeat costs no write.
    pub async fn ensure(
        &self,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<bool, etcd_client::Error> {
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        let txn = Txn::new()
            .when([Compare::value(key, CompareOp::Equal, bytes.clone())])
            .or_else([TxnOp::put(key, bytes, None)]);
        let resp = self.client.kv_client().txn(txn).await?;
        if resp.succeeded() {
            return Ok(false);
        }
        self.remember(resp.header().map(|h| h.revision()));
        Ok(true)
    }

    /// Deletes `key`; true when something was deleted.
    pub async fn remove(&self, key: &str) -> Result<bool, etcd_client::Error> {
        let resp = self.client.kv_client().delete(key, None).await?;
        let deleted = resp.deleted() > 0;
        if deleted {
            self.remember(resp.header().map(|h| h.revision()));
        }
        Ok(deleted)
    }

    /// Makes each relative key hold its desired entry, or removes it; true if anything changed.
    pub async fn converge(
        &self,
        entries: &[(String, Option<desired::DesiredEntry>)],
    ) -> Result<bool, etcd_client::Error> {
        let mut changed = false;
        for (relative, entry) in entries {
            let key = self.key(relative);
            changed |= match entry {
                Some(entry) => self.ensure(&key, &entry.value).await?,
                None => self.remove(&key).await?,
            };
        }
        Ok(changed)
    }

    /// The current value of `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, etcd_client::Error> {
        let resp = self.client.kv_client().get(key, None).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Every key and value under the prefix, with the store revision they were read at.
    /// Read in pages at one revision (a consistent snapshot), so a prefix of any size
    /// stays under the gRPC message limit (4 MiB, some 15-20k entries in one response).
    pub async fn list(&self) -> Result<(Vec<(String, Vec<u8>)>, i64), etcd_client::Error> {
        let mut kvs = Vec::new();
        let mut from = None;
        let mut revision = None;
        loop {
            let page = self.page(from.as_deref(), LIST_PAGE, revision).await?;
            kvs.extend(page.kvs);
            revision = Some(page.revision);
            match page.next {
                Some(next) => from = Some(next),
                None => return Ok((kvs, page.revision)),
            }
        }
    }

    /// Up to `limit` keys and values under the prefix from the raw key `from` (from the
    /// start when `None`), in key order, read at `revision` (the current one when
    /// `None`). Pass the page's `next` and `revision` back for the next page, so that a
    /// scan of any size sees one consistent snapshot.
    pub async fn page(
        &self,
        from: Option<&[u8]>,
        limit: i64,
        revision: Option<i64>,
    ) -> Result<KeyPage, etcd_client::Error> {
        let prefix = format!("{}/", self.prefix);
        let start = from.map_or_else(|| prefix.clone().into_bytes(), <[u8]>::to_vec);
        let mut options = GetOptions::new()
            .with_range(prefix_end(prefix.as_bytes()))
            .with_limit(limit);
        if let Some(revision) = revision {
            options = options.with_revision(revision);
        }
        let resp = self.client.kv_client().get(start, Some(options)).await?;
        let revision = revision
            .or_else(|| resp.header().map(|h| h.revision()))
            .unwrap_or_default();
        let page = resp.kvs();
        // The next page starts just after the last key read.
        let next = page.last().filter(|_| resp.more()).map(|last| {
            let mut key = last.key().to_vec();
            key.push(0);
            key
        });
        let kvs = page
            .iter()
            .filter_map(|kv| Some((kv.key_str().ok()?.to_owned(), kv.value().to_vec())))
            .collect();
        Ok(KeyPage {
            kvs,
            next,
            revision,
        })
    }

    /// True when the change at `revision` was written by this process.
    pub fn is_own_write(&self, revision: i64) -> bool {
        self.own_revisions
            .lock()
            .map(|r| r.contains(revision))
            .unwrap_or(false)
    }

    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    fn remember(&self, revision: Option<i64>) {
        if let (Some(rev), Ok(mut own)) = (revision, self.own_revisions.lock()) {
            own.insert(rev);
        }
    }
}

/// A page of keys under the prefix: see [`PlatformConfig::page`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPage {
    /// Absolute keys and raw values, in key order.
    pub kvs: Vec<(String, Vec<u8>)>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Vec<u8>>,
    /// The revision the page was read at.
    pub revision: i64,
}

/// A bounded set of recent revisions, oldest evicted first.
#[derive(Default)]
struct RecentRevisions {
    order: VecDeque<i64>,
    set: HashSet<i64>,
}

impl RecentRevisions {
    fn insert(&mut self, rev: i64) {
        if self.set.insert(rev) {
            self.order.push_back(rev);
            if self.order.len() > OWN_REVISIONS
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }

    fn contains(&self, rev: i64) -> bool {
        self.set.contains(&rev)
    }
}

/// Keys per page of [`PlatformConfig::list`].
const LIST_PAGE: i64 = 500;

/// The first key after every key that starts with `prefix` (etcd's range end of a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: to the end of the keyspace.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/m3o/"), b"/m3o0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn recent_revisions_are_bounded() {
        let mut r = RecentRevisions::default();
        for rev in 0..(OWN_REVISIONS as i64 + 10) {
            r.insert(rev);
        }
        assert!(!r.contains(0));
        assert!(r.contains(OWN_REVISIONS as i64 + 9));
        assert_eq!(r.set.len(), OWN_REVISIONS);
    }
}
