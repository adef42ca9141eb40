//! The etcd-backed platform config the API gateway reads (the gateway contract: crate `platform-contract`).
//!
//! Postgres is the system of record; every value here is derived from it
//! ([`desired`], from the values in [`published`]), written only when it differs, and
//! kept in place by the drift watcher ([`crate::runtime::drift`]). This layer takes
//! what it needs (a connection, a [`PlatformConfig`]); it imports no kind and no
//! context.

pub mod desired;
pub mod diff;
pub mod divergence;
pub mod entry;
pub mod gateway_roster;
pub mod gateways;
pub mod published;
pub mod scan;
pub mod sync;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse,
};

use crate::report::error::Error;
use crate::store::fence::{self, Term};
use diff::{Change, Current, Write};
use divergence::{Divergence, Owner, Recorded, Refusal};

/// How many of our own write revisions are remembered to tell them from hand edits.
const OWN_REVISIONS: usize = 16_384;

/// A handle on the platform config under one prefix.
///
/// Every write is fenced in etcd itself: it is a transaction that compares the key
/// `<prefix>.writer-epoch` (beside the prefix, so neither gateways nor the drift
/// watcher see it) with this process's writer term, which [`PlatformConfig::record_term`]
/// writes at the start of the term, and `<prefix>.writer-epoch.database` with this
/// database's id (one database per prefix). A replaced writer that wakes up with an etcd write
/// already on its way (after its Postgres transaction was terminated) is refused by
/// etcd. Writes also run inside a fenced Postgres transaction (`sync`), so a new term
/// cannot begin while one is in flight unless its writer is terminated.
#[derive(Clone)]
pub struct PlatformConfig {
    client: Client,
    prefix: String,
    own_revisions: Arc<Mutex<RecentRevisions>>,
    /// The writer term (0: not the writer, every write is refused).
    epoch: Arc<AtomicI64>,
    /// The writer fence's name (`""` unsharded; one per shard).
    fence: String,
    /// Where an etcd refusal re-checks the term (none: every refusal stands).
    term: Option<TermCheck>,
    /// A divergence of the etcd fence from Postgres's, until healed.
    divergence: Arc<Divergence>,
    /// This database's id ([`crate::store::fence::database_id`]), compared with
    /// `<prefix>.writer-epoch.database` by every write (`None`: not compared).
    database: Option<String>,
    /// Gateway replicas seen reporting, and departed ones still within their bound.
    roster: Arc<Mutex<gateway_roster::Roster>>,
}

/// What an etcd refusal re-checks: the Postgres term, and who to stop when it is not
/// ours.
#[derive(Clone)]
struct TermCheck {
    db: sqlx::PgPool,
    superseded: tokio_util::sync::CancellationToken,
}

/// The key holding the (unsharded) writer term of `prefix`: beside it, not under it
/// ([`m3o_platform_contract::keys::writer_epoch_key`]). An etcd user of the operator
/// needs read-write on the prefixes `<prefix>/` and `<prefix>.writer-epoch`, nothing else.
fn fence_key_of(prefix: &str) -> String {
    m3o_platform_contract::keys::writer_epoch_key(prefix, "")
}

/// The epoch as etcd stores it: fixed width, so byte order is numeric order.
use divergence::epoch_value;

impl PlatformConfig {
    /// The operator's etcd timeouts and keepalives (TLS and the user come on top).
    pub fn connect_timeouts() -> ConnectOptions {
        ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
    }

    /// Connects to etcd with `options` (see `m3o_connect::etcd::EtcdArgs`);
    /// `prefix` is normalised to have no trailing slash.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        options: ConnectOptions,
    ) -> Result<Self, etcd_client::Error> {
        let prefix = prefix.trim_end_matches('/').to_owned();
        let mut client = Client::connect(endpoints, Some(options)).await?;
        // Connecting is lazy; a cheap read proves the endpoint answers and that the
        // user may read the fence key (all it may read outside the prefix).
        client
            .get(
                fence_key_of(&prefix),
                Some(GetOptions::new().with_count_only()),
            )
            .await?;
        Ok(Self {
            client,
            prefix,
            own_revisions: Arc::default(),
            epoch: Arc::default(),
            fence: String::new(),
            term: None,
            divergence: Arc::default(),
            database: None,
            roster: Arc::default(),
        })
    }

    /// Writes only during `term`, which `db` records; an etcd refusal re-checks it
    /// there, and `divergence` says what it found.
    pub fn fenced_by(mut self, term: &Term, db: sqlx::PgPool, divergence: Divergence) -> Self {
        self.fence = term.name().to_owned();
        self.epoch = term.shared_epoch();
        self.term = Some(TermCheck {
            db,
            superseded: term.superseded().clone(),
        });
        self.divergence = Arc::new(divergence);
        self
    }

    /// Writes only while etcd names database `id` as the prefix's writer (or names none:
    /// then the term is recorded with it), so two databases never take turns on one
    /// prefix.
    pub fn of_database(mut self, id: uuid::Uuid) -> Self {
        self.database = Some(id.to_string());
        self
    }

    /// The divergence of the etcd fence from Postgres's being healed, if any.
    pub fn divergence(&self) -> Arc<Divergence> {
        self.divergence.clone()
    }

    /// The key holding the current writer term (one per fence, beside the prefix).
    fn fence_key(&self) -> String {
        m3o_platform_contract::keys::writer_epoch_key(&self.prefix, &self.fence)
    }

    /// The key naming the database that writes the prefix (beside it).
    fn database_key(&self) -> String {
        m3o_platform_contract::keys::writer_database_key(&self.prefix)
    }

    /// What etcd records about the writer of the prefix, read at one revision.
    pub async fn fence_state(&self) -> Result<FenceState, Error> {
        let txn = Txn::new().and_then([
            TxnOp::get(self.fence_key(), None),
            TxnOp::get(self.database_key(), None),
        ]);
        let resp = self.client.kv_client().txn(txn).await?;
        let mut values = resp.op_responses().into_iter().map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        let (epoch, database) = (values.next().flatten(), values.next().flatten());
        Ok(FenceState {
            recorded: Recorded::parse(epoch.as_deref()),
            owner: divergence::owner(self.database.as_deref(), database.as_deref()),
            epoch_value: epoch,
            database_value: database,
        })
    }

    /// True when etcd records this process's term and names its database (or none is
    /// checked): what a convergence must see before it calls a divergence healed.
    pub async fn term_recorded(&self) -> Result<bool, Error> {
        let state = self.fence_state().await?;
        let mine = self.epoch.load(Ordering::SeqCst);
        Ok(state.recorded == Recorded::Epoch(mine) && state.owner == Owner::Ours)
    }

    /// This process's database id, for messages.
    pub fn database_id(&self) -> &str {
        self.database.as_deref().unwrap_or("unknown")
    }

    /// The line refusing a prefix that database `other` writes.
    pub fn foreign_line(&self, other: &str) -> String {
        divergence::foreign_line(&self.prefix, other, self.database_id())
    }

    /// The line refusing writes while the fence key holds `value`, which is no term.
    pub fn unreadable_line(&self, value: &str) -> String {
        divergence::unreadable_line(&self.fence_key(), value)
    }

    /// Records this process's term in etcd, and this database as the prefix's writer,
    /// if etcd still records what `seen` says (a compare-and-swap over both keys: of
    /// tasks that saw one divergence, one records the term; nothing read as another
    /// database's or as no term is ever written over). False when etcd moved since.
    /// The decision whether to record at all is the caller's ([`divergence::on_start`],
    /// [`divergence::on_refusal`]).
    pub async fn record_term(&self, seen: &FenceState) -> Result<bool, Error> {
        let as_seen = |key: String, value: &Option<Vec<u8>>| match value {
            Some(value) => Compare::value(key, CompareOp::Equal, value.clone()),
            None => Compare::version(key, CompareOp::Equal, 0),
        };
        let mine = epoch_value(self.epoch.load(Ordering::SeqCst));
        let mut when = vec![as_seen(self.fence_key(), &seen.epoch_value)];
        let mut then = vec![TxnOp::put(self.fence_key(), mine, None)];
        if let Some(database) = &self.database {
            when.push(as_seen(self.database_key(), &seen.database_value));
            if seen.database_value.is_none() {
                then.push(TxnOp::put(self.database_key(), database.clone(), None));
            }
        }
        let resp = self
            .client
            .kv_client()
            .txn(Txn::new().when(when).and_then(then))
            .await?;
        Ok(resp.succeeded())
    }

    /// Records the term again after a refusal found etcd behind it (`seen`, what was
    /// read), and starts healing the divergence: of the writes refused at once, the one
    /// whose record lands ([`Self::record_term`]) counts it and asks for the prefix to
    /// be converged (true); the others find the term recorded and just retry (false).
    pub async fn reestablish(&self, seen: &FenceState) -> Result<bool, Error> {
        if !self.record_term(seen).await? {
            return Ok(false);
        }
        self.divergence.found(format!(
            "etcd recorded writer term {} while Postgres records {} (etcd restored, wiped or its fence key deleted); re-established it",
            seen.recorded
                .epoch()
                .map_or_else(|| "none".to_owned(), |e| e.to_string()),
            self.epoch.load(Ordering::SeqCst)
        ));
        Ok(true)
    }

    /// Runs `op` if this process's term is the one etcd records (and its database the
    /// one etcd names); the response of `op`. A refusal re-checks the term in Postgres
    /// ([`divergence::on_refusal`]): when it is ours and etcd is behind, the term is
    /// written into etcd again, the whole prefix is to be converged ([`Divergence`]),
    /// and `op` is tried once more. A prefix of another database stops the process, and
    /// a fence key holding no term refuses every write until a human fixes it; each is
    /// said once.
    async fn fenced(&self, op: TxnOp) -> Result<(TxnOpResponse, Option<i64>), Error> {
        if let Some(done) = self.try_fenced(op.clone()).await? {
            return Ok(done);
        }
        let mine = self.epoch.load(Ordering::SeqCst);
        let refused =
            || Error::Fenced("etcd refused a write: another process holds the writer term".into());
        let Some(check) = &self.term else {
            return Err(refused());
        };
        let postgres = fence::current_epoch(&check.db, &self.fence).await?;
        let state = self.fence_state().await?;
        match divergence::on_refusal(mine, postgres, &state.recorded, &state.owner) {
            Refusal::Stop => {
                // As the Postgres check does: only a process that began a term stops.
                if mine > 0 {
                    check.superseded.cancel();
                }
                if let (true, Some(etcd)) =
                    (mine > 0 && postgres == Some(mine), state.recorded.epoch())
                {
                    let what = format!(
                        "etcd records writer term {etcd}, newer than this process's {mine} which Postgres records"
                    );
                    if self.divergence.refusing(what) {
                        tracing::error!(
                            mine,
                            etcd,
                            "etcd records a newer writer term than Postgres (Postgres restored from an older backup?); stopping so that a restart begins a term above both"
                        );
                    }
                }
                return Err(refused());
            }
            Refusal::Foreign(other) => {
                // Said once, as the process's exit message.
                self.divergence.stop_with(self.foreign_line(&other));
                check.superseded.cancel();
                return Err(Error::Fenced(
                    "etcd refused a write: the prefix is another database's (the process stops, saying so)".into(),
                ));
            }
            Refusal::Unreadable(value) => {
                let line = self.unreadable_line(&value);
                if self.divergence.refusing(line.clone()) {
                    tracing::warn!("{line}");
                }
                return Err(Error::Fenced(
                    "etcd refused a write: its writer-term key holds no term (said above)".into(),
                ));
            }
            Refusal::Retry => {}
            Refusal::Reestablish => {
                self.reestablish(&state).await?;
            }
        }
        self.try_fenced(op).await?.ok_or_else(refused)
    }

    /// One attempt of [`Self::fenced`]: `None` when etcd refused it.
    async fn try_fenced(&self, op: TxnOp) -> Result<Option<(TxnOpResponse, Option<i64>)>, Error> {
        let mine = epoch_value(self.epoch.load(Ordering::SeqCst));
        let mut when = vec![Compare::value(self.fence_key(), CompareOp::Equal, mine)];
        if let Some(database) = &self.database {
            when.push(Compare::value(
                self.database_key(),
                CompareOp::Equal,
                database.clone(),
            ));
        }
        let txn = Txn::new().when(when).and_then([op]);
        let resp = self.client.kv_client().txn(txn).await?;
        let revision = resp.header().map(|h| h.revision());
        Ok(match resp.op_responses().into_iter().next() {
            Some(op) if resp.succeeded() => Some((op, revision)),
            _ => None,
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

    /// Deletes `key`; the revision of the deletion, `None` when there was nothing to
    /// delete. Fenced like every write.
    pub async fn remove(&self, key: &str) -> Result<Option<i64>, Error> {
        let (resp, revision) = self.fenced(TxnOp::delete(key, None)).await?;
        if !matches!(resp, TxnOpResponse::Delete(d) if d.deleted() > 0) {
            return Ok(None);
        }
        self.remember(revision);
        Ok(Some(revision.unwrap_or_default()))
    }

    /// The current values of `relatives` (keys relative to the prefix) that exist, read
    /// in one request per [`MAX_TXN_OPS`] keys (a transaction of gets, so all of one
    /// request are read at one revision), and the latest revision read at (0 when none was read; every
    /// change to these keys before the call is at or below it).
    pub async fn read(&self, relatives: &[&str]) -> Result<(HashMap<String, Current>, i64), Error> {
        let mut found = HashMap::new();
        let mut read_at = 0;
        for chunk in relatives.chunks(MAX_TXN_OPS) {
            let gets = chunk.iter().map(|r| TxnOp::get(self.key(r), None));
            let resp = self
                .client
                .kv_client()
                .txn(Txn::new().and_then(gets.collect::<Vec<_>>()))
                .await?;
            read_at = read_at.max(resp.header().map_or(0, |h| h.revision()));
            for (relative, op) in chunk.iter().zip(resp.op_responses()) {
                if let TxnOpResponse::Get(get) = op
                    && let Some(kv) = get.kvs().first()
                {
                    let current = Current {
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    };
                    found.insert((*relative).to_owned(), current);
                }
            }
        }
        Ok((found, read_at))
    }

    /// Writes `changes` in fenced transactions of up to [`MAX_TXN_OPS`] keys (one for
    /// any customer with fewer changed keys), each write conditioned on its key's
    /// revision being the one read. The keys written, with their revision; stops at a
    /// transaction whose keys changed since they were read ([`Written::conflict`]):
    /// nothing of that one is written, and the caller reads again.
    pub async fn write(&self, changes: &[Change]) -> Result<Written, Error> {
        let mut written = Written::default();
        for chunk in changes.chunks(MAX_TXN_OPS) {
            let unchanged = chunk.iter().map(|c| {
                Compare::mod_revision(self.key(&c.relative), CompareOp::Equal, c.read_revision)
            });
            let writes = chunk.iter().map(|c| match &c.write {
                Write::Put(bytes) => TxnOp::put(self.key(&c.relative), bytes.clone(), None),
                Write::Delete => TxnOp::delete(self.key(&c.relative), None),
            });
            let txn = Txn::new()
                .when(unchanged.collect::<Vec<_>>())
                .and_then(writes.collect::<Vec<_>>());
            let (resp, revision) = self.fenced(TxnOp::txn(txn)).await?;
            let TxnOpResponse::Txn(inner) = resp else {
                return Err(Error::Internal(
                    "etcd answered a transaction with another response".into(),
                ));
            };
            if !inner.succeeded() {
                written.conflict = true;
                return Ok(written);
            }
            self.remember(revision);
            let revision = revision.unwrap_or_default();
            written
                .keys
                .extend(chunk.iter().map(|c| (c.relative.clone(), revision)));
        }
        Ok(written)
    }

    /// The current value of `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, etcd_client::Error> {
        let resp = self.client.kv_client().get(key, None).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Up to `limit` keys and values under the prefix from the raw key `from` (from the
    /// start when `None`), in key order, at the current revision. Pass the page's `next`
    /// back for the next page.
    pub async fn page(
        &self,
        from: Option<&[u8]>,
        limit: i64,
    ) -> Result<KeyPage, etcd_client::Error> {
        let prefix = format!("{}/", self.prefix);
        let start = from.map_or_else(|| prefix.clone().into_bytes(), <[u8]>::to_vec);
        let options = GetOptions::new()
            .with_range(m3o_connect::etcd::prefix_range_end(prefix.as_bytes()))
            .with_limit(limit);
        let resp = self.client.kv_client().get(start, Some(options)).await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
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

/// What etcd records about the writer of a prefix: see [`PlatformConfig::fence_state`].
#[derive(Clone, Debug)]
pub struct FenceState {
    /// The term recorded.
    pub recorded: Recorded,
    /// Which database writes the prefix.
    pub owner: Owner,
    /// The raw values read (`None`: no key), which [`PlatformConfig::record_term`]
    /// compares.
    epoch_value: Option<Vec<u8>>,
    database_value: Option<Vec<u8>>,
}

/// What [`PlatformConfig::write`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Keys written (relative), each with the revision of its write.
    pub keys: Vec<(String, i64)>,
    /// True when it stopped at keys that changed since they were read.
    pub conflict: bool,
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

/// Operations per etcd transaction: etcd's default `--max-txn-ops` (128), less the
/// fence's own.
pub const MAX_TXN_OPS: usize = 127;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_order_as_bytes() {
        assert!(epoch_value(9) < epoch_value(10));
        assert!(epoch_value(99) < epoch_value(100_000));
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
