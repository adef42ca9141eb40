//! The whole prefix against every key Postgres implies, merged in key order a page at
//! a time: the drift watcher's full resync and `m3o-operator audit` both walk it. Only
//! the current pages are held, so a fleet of any size is compared in bounded memory.

use std::cmp::Ordering;
use std::collections::VecDeque;

use sqlx::PgPool;

use super::PlatformConfig;
use super::desired::{self, DesiredEntry, FAMILIES, Family, PageCursor};
use crate::report::error::Error;

/// One key of a merge: its desired value and its stored value, either possibly absent.
pub type Merged<D> = (String, Option<D>, Option<Vec<u8>>);

/// Why a scan stopped.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("reading Postgres: {0}")]
    Database(#[source] sqlx::Error),
    #[error("reading etcd: {0}")]
    ConfigStore(#[source] etcd_client::Error),
}

impl From<ScanError> for Error {
    fn from(err: ScanError) -> Self {
        match err {
            ScanError::Database(e) => e.into(),
            ScanError::ConfigStore(e) => e.into(),
        }
    }
}

/// Walks both sides of the prefix: etcd's keys (range pages, gateway reports left out)
/// and the desired keys (pages of each [`desired::Family`] in turn, which together come
/// in etcd's key order).
pub struct FleetScan<'a> {
    db: &'a PgPool,
    platform: &'a PlatformConfig,
    page: i64,
    merge: SortedMerge<DesiredEntry>,
    families: std::slice::Iter<'static, Family>,
    family: Option<Family>,
    cursor: PageCursor,
    from: Option<Vec<u8>>,
    revision: Option<i64>,
}

impl<'a> FleetScan<'a> {
    /// A scan reading `page` keys at a time from each side.
    pub fn new(db: &'a PgPool, platform: &'a PlatformConfig, page: i64) -> Self {
        let mut families = FAMILIES.iter();
        let family = families.next().copied();
        Self {
            db,
            platform,
            page,
            merge: SortedMerge::default(),
            families,
            family,
            cursor: PageCursor::default(),
            from: None,
            revision: None,
        }
    }

    /// The etcd revision of the first page (known once a page was read): every change
    /// after it is either in a later page or for a watch started from it to see (as
    /// long as etcd has not compacted it away; then the watch fails and the drift
    /// watcher scans again).
    pub fn revision(&self) -> Option<i64> {
        self.revision
    }

    /// The next keys (relative to the prefix) in key order, with what Postgres wants
    /// and what etcd holds; `None` once both sides are exhausted.
    pub async fn next_keys(&mut self) -> Result<Option<Vec<Merged<DesiredEntry>>>, ScanError> {
        while !self.merge.finished() {
            if self.merge.needs_desired() {
                self.read_desired().await?;
            }
            if self.merge.needs_actual() {
                self.read_actual().await?;
            }
            let keys = self.merge.take();
            if !keys.is_empty() {
                return Ok(Some(keys));
            }
        }
        Ok(None)
    }

    async fn read_desired(&mut self) -> Result<(), ScanError> {
        let Some(family) = self.family else {
            self.merge.push_desired(Vec::new(), true);
            return Ok(());
        };
        let (entries, next) = desired::desired_page(self.db, family, &self.cursor, self.page)
            .await
            .map_err(ScanError::Database)?;
        match next {
            Some(next) => self.cursor = next,
            None => {
                self.family = self.families.next().copied();
                self.cursor = PageCursor::default();
            }
        }
        self.merge.push_desired(entries, self.family.is_none());
        Ok(())
    }

    async fn read_actual(&mut self) -> Result<(), ScanError> {
        // Each page at the current revision, not pinned to the first one: a scan that
        // repairs as it goes may outlast etcd's compaction of that revision. A change
        // after the first page's revision is for the watch started from it to see.
        let page = self
            .platform
            .page(self.from.as_deref(), self.page)
            .await
            .map_err(ScanError::ConfigStore)?;
        self.revision.get_or_insert(page.revision);
        let last = page.next.is_none();
        self.from = page.next;
        let prefix = format!("{}/", self.platform.prefix());
        // Gateway replicas' reports are theirs, not derived from any record.
        let relative = page
            .kvs
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_owned(), v)))
            .filter(|(relative, _)| !desired::is_gateway_report(relative))
            .collect();
        self.merge.push_actual(relative, last);
        Ok(())
    }
}

/// Merges two scans that each yield keys in ascending byte order, a page at a time:
/// the desired keys (from Postgres) and the stored ones (from etcd).
#[derive(Debug)]
pub struct SortedMerge<D> {
    desired: VecDeque<(String, D)>,
    actual: VecDeque<(String, Vec<u8>)>,
    desired_done: bool,
    actual_done: bool,
}

impl<D> Default for SortedMerge<D> {
    fn default() -> Self {
        Self {
            desired: VecDeque::new(),
            actual: VecDeque::new(),
            desired_done: false,
            actual_done: false,
        }
    }
}

impl<D> SortedMerge<D> {
    /// Adds the next page of desired keys; `last` when the scan is over.
    pub fn push_desired(&mut self, page: Vec<(String, D)>, last: bool) {
        self.desired.extend(page);
        self.desired_done = last;
    }

    /// Adds the next page of stored keys; `last` when the scan is over.
    pub fn push_actual(&mut self, page: Vec<(String, Vec<u8>)>, last: bool) {
        self.actual.extend(page);
        self.actual_done = last;
    }

    /// Whether the merge waits for another page of desired keys.
    pub fn needs_desired(&self) -> bool {
        self.desired.is_empty() && !self.desired_done
    }

    /// Whether the merge waits for another page of stored keys.
    pub fn needs_actual(&self) -> bool {
        self.actual.is_empty() && !self.actual_done
    }

    /// True once both scans are over and every key was taken.
    pub fn finished(&self) -> bool {
        self.desired_done && self.actual_done && self.desired.is_empty() && self.actual.is_empty()
    }

    /// Takes every key that can be decided with the pages at hand, in key order.
    pub fn take(&mut self) -> Vec<Merged<D>> {
        let mut out = Vec::new();
        loop {
            let order = match (self.desired.front(), self.actual.front()) {
                (Some(d), Some(a)) => d.0.cmp(&a.0),
                (Some(_), None) if self.actual_done => Ordering::Less,
                (None, Some(_)) if self.desired_done => Ordering::Greater,
                _ => return out,
            };
            let (desired, actual) = match order {
                Ordering::Less => (self.desired.pop_front(), None),
                Ordering::Greater => (None, self.actual.pop_front()),
                Ordering::Equal => (self.desired.pop_front(), self.actual.pop_front()),
            };
            let key = desired
                .as_ref()
                .map(|d| d.0.clone())
                .or_else(|| actual.as_ref().map(|a| a.0.clone()))
                .unwrap_or_default();
            out.push((key, desired.map(|d| d.1), actual.map(|a| a.1)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(keys: &[&str]) -> Vec<(String, u8)> {
        keys.iter().map(|k| ((*k).to_owned(), 0)).collect()
    }

    fn page(keys: &[&str]) -> Vec<(String, Vec<u8>)> {
        keys.iter().map(|k| ((*k).to_owned(), Vec::new())).collect()
    }

    /// (key, desired?, stored?) of merged keys.
    fn shape(merged: Vec<Merged<u8>>) -> Vec<(String, bool, bool)> {
        merged
            .into_iter()
            .map(|(k, d, a)| (k, d.is_some(), a.is_some()))
            .collect()
    }

    #[test]
    fn merge_pairs_keys_across_pages_and_waits_for_the_slower_scan() {
        let mut merge = SortedMerge::default();
        assert!(merge.needs_desired() && merge.needs_actual());
        merge.push_desired(desired(&["a/x", "c/1"]), false);
        merge.push_actual(page(&["a/x", "a/y"]), false);
        // "c/1" waits: the next stored page could still hold it.
        assert_eq!(
            shape(merge.take()),
            [("a/x".into(), true, true), ("a/y".into(), false, true),]
        );
        assert!(merge.needs_actual() && !merge.needs_desired());
        merge.push_actual(page(&["c/1", "stray"]), true);
        assert_eq!(shape(merge.take()), [("c/1".into(), true, true)]);
        assert!(merge.needs_desired());
        merge.push_desired(desired(&["q/1"]), true);
        assert_eq!(
            shape(merge.take()),
            [("q/1".into(), true, false), ("stray".into(), false, true)]
        );
        assert!(merge.finished());
    }

    #[test]
    fn merge_of_empty_scans_finishes() {
        let mut merge: SortedMerge<u8> = SortedMerge::default();
        merge.push_desired(vec![], true);
        merge.push_actual(vec![], true);
        assert!(merge.take().is_empty() && merge.finished());
    }
}
