//! The row write of the kinds with one row per resource (Customer, Subscription):
//! decided purely from the row found and the desired record, then applied in the
//! reconcile's transaction together with the events the kind's plan attaches.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use m3o_events::customers::EventType;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// A row that records what the operator wrote ([`Recorded::record`]), for comparing it
/// with what the resource asks for now.
pub trait Recorded {
    type Record: PartialEq + Digested;
    fn id(&self) -> Uuid;
    /// The record as the operator last wrote it (bookkeeping columns left out).
    fn record(&self) -> Self::Record;
    /// The digest stored with the row by the operator's last write (`plan_digest`).
    fn plan_digest(&self) -> Option<String>;
}

/// Content whose digest is stored with its row (migration 0010).
pub trait Digested {
    /// The digest of the columns a plan decides.
    fn digest(&self) -> String;
}

/// The digest of a row's planned content, written with the row (`plan_digest`) and
/// compared with the same digest of its current columns by the bulk comparison.
///
/// Computed in Rust, from the values planned or the columns fetched, rather than by a
/// SQL expression: one encoding for both sides, with no dependence on how Postgres
/// prints a timestamp, a jsonb or an array. Each field is length-prefixed, so no two
/// contents share an encoding; times count in microseconds, the precision of
/// `timestamptz`, so a planned time and the same time read back agree.
#[derive(Default)]
pub struct RowDigest(Sha256);

impl RowDigest {
    pub fn text(mut self, value: &str) -> Self {
        self.0.update((value.len() as u64).to_be_bytes());
        self.0.update(value.as_bytes());
        self
    }
    pub fn int(mut self, value: i64) -> Self {
        self.0.update(value.to_be_bytes());
        self
    }
    pub fn uuid(mut self, value: Uuid) -> Self {
        self.0.update(value.as_bytes());
        self
    }
    pub fn time(self, value: Option<DateTime<Utc>>) -> Self {
        match value {
            None => self.int(0).int(0),
            Some(t) => self.int(1).int(t.timestamp_micros()),
        }
    }
    pub fn texts<'a>(self, values: impl ExactSizeIterator<Item = &'a String>) -> Self {
        let len = values.len() as i64;
        values.fold(self.int(len), |d, v| d.text(v))
    }
    pub fn map(self, values: &BTreeMap<String, String>) -> Self {
        let len = values.len() as i64;
        values
            .iter()
            .fold(self.int(len), |d, (k, v)| d.text(k).text(v))
    }
    /// 128 bits, hex: enough to tell contents apart, half the column of a full one.
    pub fn finish(self) -> String {
        hex::encode(&self.0.finalize()[..16])
    }
}

/// The row write a reconcile makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowWrite<'a, R> {
    /// The row already matches: nothing is written, no event.
    Keep(&'a R),
    /// A new row with this id.
    Insert(Uuid),
    /// This existing row is overwritten.
    Update(&'a R),
}

/// Row write plus the events it announces, written in the same transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowPlan<'a, R> {
    pub write: RowWrite<'a, R>,
    pub events: Vec<EventType>,
}

/// Keeps the row whose record matches `desired` and whose stored digest is the
/// digest of it, updates one that differs (or whose digest is stale: written before
/// digests, so the bulk comparison would find it differing at every pass), or inserts
/// a row with `new_id` when there is none.
pub fn decide<'a, R: Recorded>(
    existing: Option<&'a R>,
    desired: &R::Record,
    new_id: Uuid,
) -> RowWrite<'a, R> {
    match existing {
        None => RowWrite::Insert(new_id),
        Some(row) if row.record() == *desired && row.plan_digest() == Some(desired.digest()) => {
            RowWrite::Keep(row)
        }
        Some(row) => RowWrite::Update(row),
    }
}

/// A row as plan tests state it: an id and a record, written by the operator (its
/// stored digest is the record's).
#[cfg(test)]
impl<T: Clone + PartialEq + Digested> Recorded for (Uuid, T) {
    type Record = T;
    fn id(&self) -> Uuid {
        self.0
    }
    fn record(&self) -> T {
        self.1.clone()
    }
    fn plan_digest(&self) -> Option<String> {
        Some(self.1.digest())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Rec(String);
    impl Digested for Rec {
        fn digest(&self) -> String {
            RowDigest::default().text(&self.0).finish()
        }
    }
    /// A row whose stored digest is stated apart from its content.
    #[derive(Debug, PartialEq)]
    struct Row(Rec, Option<String>);
    impl Recorded for Row {
        type Record = Rec;
        fn id(&self) -> Uuid {
            Uuid::nil()
        }
        fn record(&self) -> Rec {
            self.0.clone()
        }
        fn plan_digest(&self) -> Option<String> {
            self.1.clone()
        }
    }

    #[test]
    fn a_row_is_kept_only_when_its_content_and_stored_digest_match_the_plan() {
        let plan = Rec("active".into());
        let kept = Row(plan.clone(), Some(plan.digest()));
        assert_eq!(
            decide(Some(&kept), &plan, Uuid::max()),
            RowWrite::Keep(&kept)
        );
        // Edited by hand: the content differs (the digest stored is the plan's).
        let edited = Row(Rec("blocked".into()), Some(plan.digest()));
        assert!(matches!(
            decide(Some(&edited), &plan, Uuid::max()),
            RowWrite::Update(_)
        ));
        // Written before digests: the row is rewritten once, to store it.
        let undigested = Row(plan.clone(), None);
        assert!(matches!(
            decide(Some(&undigested), &plan, Uuid::max()),
            RowWrite::Update(_)
        ));
        assert_eq!(
            decide::<Row>(None, &plan, Uuid::max()),
            RowWrite::Insert(Uuid::max())
        );
    }

    #[test]
    fn digests_tell_fields_apart_and_ignore_what_timestamptz_cannot_hold() {
        let d = |a: &str, b: &str| RowDigest::default().text(a).text(b).finish();
        assert_ne!(d("ab", "c"), d("a", "bc"), "fields are length-prefixed");
        assert_eq!(d("a", "b"), d("a", "b"));
        let t = DateTime::from_timestamp(1_700_000_000, 123_456_789).expect("a time");
        let read_back = DateTime::from_timestamp(1_700_000_000, 123_456_000).expect("a time");
        let time = |t| RowDigest::default().time(t).finish();
        assert_eq!(
            time(Some(t)),
            time(Some(read_back)),
            "microseconds, as stored"
        );
        assert_ne!(time(None), time(Some(DateTime::UNIX_EPOCH)));
        let texts = |v: &[&str]| {
            let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
            RowDigest::default().texts(v.iter()).finish()
        };
        assert_ne!(texts(&["a", "b"]), texts(&["ab"]));
    }
}
