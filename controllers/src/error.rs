//! The reconcile error, shared by every kind.

use crate::status::reasons;

/// Why a reconcile failed. Outcomes an admin must act on (a conflict, an unknown
/// plan, an invalid spec) are not errors: they are [`crate::blocker::Blocker`]s written
/// to status and requeued.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database unavailable: {0}")]
    DatabaseUnavailable(#[source] sqlx::Error),
    /// A constraint the planner should have respected was violated: a bug or a writer
    /// outside the operator. Named, so the message says which.
    #[error("database constraint {constraint} violated: {source}")]
    Constraint {
        constraint: String,
        #[source]
        source: sqlx::Error,
    },
    /// The database refused a statement for another reason.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("platform config store (etcd) unavailable: {0}")]
    ConfigStoreUnavailable(#[source] etcd_client::Error),
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// Lost a race with another writer (a concurrent insert, an object that appeared or
    /// changed in between): nothing is wrong, the next pass sees the new state.
    #[error("{0}; retrying")]
    Transient(String),
    /// A state the operator should never reach, met while reconciling this object.
    #[error("internal error: {0}")]
    Internal(String),
    /// The reconcile of this object panicked (a bug): contained to this object.
    #[error("internal error: the reconcile panicked: {0}")]
    Panicked(String),
    /// This process is not (or no longer) the schema's writer: nothing was written, and
    /// nothing about the object is reported (the writer reconciles it).
    #[error("not the writer of this schema: {0}")]
    Fenced(String),
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        if crate::store::fence::is_unchecked_write(&err) {
            // A write path without the fence check: a bug, said loudly.
            return Self::Internal(err.to_string());
        }
        if crate::store::fence::is_fenced(&err) {
            return Self::Fenced(err.to_string());
        }
        if crate::store::is_serialization_failure(&err) {
            return Self::Transient(format!("database: {err}"));
        }
        if crate::store::is_unavailable(&err) {
            return Self::DatabaseUnavailable(err);
        }
        let constraint = err.as_database_error().and_then(|db| {
            // class 23: integrity constraint violation
            let is_constraint = db.code().is_some_and(|code| code.starts_with("23"));
            is_constraint.then(|| db.constraint().unwrap_or("(unnamed)").to_owned())
        });
        match constraint {
            Some(constraint) => Self::Constraint {
                constraint,
                source: err,
            },
            None => Self::Database(err),
        }
    }
}

impl From<etcd_client::Error> for Error {
    fn from(err: etcd_client::Error) -> Self {
        Self::ConfigStoreUnavailable(err)
    }
}

impl From<kube::Error> for Error {
    fn from(err: kube::Error) -> Self {
        match &err {
            // 409: the object changed or appeared since it was read.
            kube::Error::Api(status) if status.code == 409 => {
                Self::Transient(format!("Kubernetes API conflict: {}", status.message))
            }
            _ => Self::Kube(err),
        }
    }
}

impl Error {
    /// Every value of [`Error::metric_label`].
    pub const METRIC_LABELS: &[&str] = &[
        "database_unavailable",
        "constraint",
        "database",
        "config_store_unavailable",
        "kube",
        "finalizer",
        "transient",
        "internal",
        "panic",
        "fenced",
    ];

    /// Low-cardinality label for the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::DatabaseUnavailable(_) => "database_unavailable",
            Self::Constraint { .. } => "constraint",
            Self::Database(_) => "database",
            Self::ConfigStoreUnavailable(_) => "config_store_unavailable",
            Self::Kube(_) => "kube",
            Self::Finalizer(_) => "finalizer",
            Self::Transient(_) => "transient",
            Self::Internal(_) => "internal",
            Self::Panicked(_) => "panic",
            Self::Fenced(_) => "fenced",
        }
    }

    /// The `Ready` condition reason this error shows as.
    pub fn condition_reason(&self) -> &'static str {
        match self {
            Self::DatabaseUnavailable(_) => reasons::DATABASE_UNAVAILABLE,
            Self::Constraint { .. } => reasons::CONSTRAINT_VIOLATION,
            Self::Database(_) => reasons::DATABASE_ERROR,
            Self::ConfigStoreUnavailable(_) => reasons::CONFIG_STORE_UNAVAILABLE,
            Self::Kube(_) | Self::Finalizer(_) | Self::Fenced(_) => reasons::RECONCILE_FAILED,
            Self::Transient(_) => reasons::PROVISIONING,
            Self::Internal(_) | Self::Panicked(_) => reasons::INTERNAL_ERROR,
        }
    }

    /// True for a lost race: retried at once rather than with growing backoff, and not
    /// reported as a failure in status.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_listed_label_and_a_reason() {
        let errors = [
            Error::Finalizer("x".into()),
            Error::Transient("x".into()),
            Error::Internal("x".into()),
            Error::Panicked("x".into()),
            Error::Database(sqlx::Error::RowNotFound),
            Error::DatabaseUnavailable(sqlx::Error::PoolTimedOut),
        ];
        for e in errors {
            assert!(Error::METRIC_LABELS.contains(&e.metric_label()), "{e}");
            assert!(!e.condition_reason().is_empty());
        }
    }
}
