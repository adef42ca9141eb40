//! The row write of the kinds with one row per resource (Customer, Subscription):
//! decided purely from the row found and the desired record, then applied in the
//! reconcile's transaction together with the events the kind's plan attaches.

use m3o_events::customers::EventType;
use uuid::Uuid;

/// A row that records what the operator wrote ([`Recorded::record`]), for comparing it
/// with what the resource asks for now.
pub trait Recorded {
    type Record: PartialEq;
    fn id(&self) -> Uuid;
    /// The record as the operator last wrote it (bookkeeping columns left out).
    fn record(&self) -> Self::Record;
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

/// Keeps the row whose record matches `desired`, updates one that differs, or inserts
/// a row with `new_id` when there is none.
pub fn decide<'a, R: Recorded>(
    existing: Option<&'a R>,
    desired: &R::Record,
    new_id: Uuid,
) -> RowWrite<'a, R> {
    match existing {
        None => RowWrite::Insert(new_id),
        Some(row) if row.record() == *desired => RowWrite::Keep(row),
        Some(row) => RowWrite::Update(row),
    }
}

/// A row as plan tests state it: an id and a record.
#[cfg(test)]
impl<T: Clone + PartialEq> Recorded for (Uuid, T) {
    type Record = T;
    fn id(&self) -> Uuid {
        self.0
    }
    fn record(&self) -> T {
        self.1.clone()
    }
}
