//! What one convergence writes: the difference between the entries a customer's rows
//! imply and what etcd holds (read once), each write conditioned on its key being as
//! it was read, so an edit in between is never overwritten blind. Pure.

use std::collections::HashMap;

use super::entry::{DesiredEntry, same_value};

/// A key as etcd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Current {
    pub value: Vec<u8>,
    /// The revision of its last write.
    pub mod_revision: i64,
}

/// What to do to one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Put(Vec<u8>),
    Delete,
}

/// One key to write, and the revision it had when read (0: it did not exist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Relative to the prefix.
    pub relative: String,
    pub write: Write,
    pub read_revision: i64,
}

/// The writes that make `current` (keyed by relative key) hold `desired`: a key whose
/// value is already equal as JSON, or that should not exist and does not, costs nothing.
pub fn changes(
    desired: &[(String, Option<DesiredEntry>)],
    current: &HashMap<String, Current>,
) -> Vec<Change> {
    desired
        .iter()
        .filter_map(|(relative, entry)| {
            let now = current.get(relative);
            let write = match (entry, now) {
                (Some(entry), Some(now)) if same_value(&now.value, &entry.value) => return None,
                (Some(entry), _) => Write::Put(entry.bytes()),
                (None, Some(_)) => Write::Delete,
                (None, None) => return None,
            };
            Some(Change {
                relative: relative.clone(),
                write,
                read_revision: now.map_or(0, |c| c.mod_revision),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use serde_json::json;

    fn entry(value: serde_json::Value) -> Option<DesiredEntry> {
        Some(DesiredEntry {
            value,
            owner: ObjectReference::default(),
        })
    }

    fn current(value: &str, mod_revision: i64) -> Current {
        Current {
            value: value.as_bytes().to_vec(),
            mod_revision,
        }
    }

    #[test]
    fn only_differences_are_written_each_against_the_revision_read() {
        let desired = vec![
            ("same".to_owned(), entry(json!({"a": 1}))),
            ("changed".to_owned(), entry(json!({"a": 2}))),
            ("missing".to_owned(), entry(json!({"a": 3}))),
            ("stale".to_owned(), None),
            ("absent".to_owned(), None),
        ];
        let current: HashMap<_, _> = [
            ("same".to_owned(), current(r#"{ "a" : 1 }"#, 5)),
            ("changed".to_owned(), current(r#"{"a":1}"#, 6)),
            ("stale".to_owned(), current(r#"{"a":4}"#, 7)),
            ("unrelated".to_owned(), current(r#"{"a":5}"#, 8)),
        ]
        .into();
        let changes = changes(&desired, &current);
        let summary: Vec<_> = changes
            .iter()
            .map(|c| (c.relative.as_str(), c.read_revision, &c.write))
            .collect();
        assert_eq!(
            summary,
            [
                ("changed", 6, &Write::Put(br#"{"a":2}"#.to_vec())),
                ("missing", 0, &Write::Put(br#"{"a":3}"#.to_vec())),
                ("stale", 7, &Write::Delete),
            ]
        );
    }

    #[test]
    fn a_converged_customer_costs_no_write() {
        let desired = vec![
            ("k".to_owned(), entry(json!({"a": 1}))),
            ("gone".to_owned(), None),
        ];
        let current: HashMap<_, _> = [("k".to_owned(), current(r#"{"a":1}"#, 1))].into();
        assert!(changes(&desired, &current).is_empty());
    }
}
