//! What planning decides for one record, shared by the kinds with one row per resource.

use m3o_events::customers::EventType;
use uuid::Uuid;

/// The row write a reconcile makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowWrite {
    /// The row already matches: nothing is written, no event.
    Keep,
    /// A new row with this id.
    Insert(Uuid),
    /// The existing row is overwritten.
    Update,
}

/// Row write plus the events it announces, written in the same transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowPlan {
    pub write: RowWrite,
    pub events: Vec<EventType>,
}
