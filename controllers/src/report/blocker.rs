//! Why an object cannot be provisioned now, for every kind: a `Ready=False` reason and
//! a message that says what to do. Not an error: the reconcile succeeds, writes it to
//! status and looks again later.

/// A reason and a message for `Ready=False`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocker {
    pub reason: &'static str,
    pub message: String,
}

impl Blocker {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}
