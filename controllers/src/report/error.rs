//! The reconcile error, shared by every kind: what went wrong (the variant, which
//! decides the metric label and the condition reason, both in this one file) and the
//! step of the pipeline it went wrong in ([`Step`], named in the message). The object
//! is named by the reconcile's tracing span and by the status the error is written to.

use std::convert::Infallible;
use std::fmt;

use kube::runtime::finalizer;

use crate::report::status::reasons;

/// The step of a reconcile an error comes from (see [`crate::pipeline`]). A plan never
/// fails with an error: what it cannot decide is a [`crate::report::blocker::Blocker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Reading what the plan decides on; names what was being read.
    Load(&'static str),
    /// The transaction writing the object's records and their outbox events.
    Database,
    /// Converging the etcd platform config on the records.
    ConfigStore,
    /// The ApiKey's Secret; names the action (reading, writing, deleting, detaching).
    Secret(&'static str),
    /// Writing the object's status.
    Status,
    /// Adding or removing the `m3o.com/cleanup` finalizer.
    Finalizer,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Load(what) => write!(f, "loading {what}"),
            Self::Database => f.write_str("writing the record"),
            Self::ConfigStore => f.write_str("converging the platform config"),
            Self::Secret(action) => write!(f, "{action} the Secret"),
            Self::Status => f.write_str("writing status"),
            Self::Finalizer => f.write_str("updating the finalizer"),
        }
    }
}

/// Why a reconcile failed. Outcomes an admin must act on (a conflict, an unknown
/// plan, an invalid spec) are not errors: they are [`crate::report::blocker::Blocker`]s written
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
    /// Adding or removing the finalizer failed (the reconcile's own errors are not
    /// wrapped in it: they come out as they are).
    #[error("finalizer: {0}")]
    Finalizer(#[source] finalizer::Error<Infallible>),
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
    /// Any of the above, with the step it happened in.
    #[error("{step}: {source}")]
    At {
        step: Step,
        #[source]
        source: Box<Error>,
    },
}

/// Names the step of a fallible call: `api.get_opt(name).await.at(Step::Load("the Customer"))?`.
pub trait AtStep<T> {
    fn at(self, step: Step) -> Result<T, Error>;
}

impl<T, E: Into<Error>> AtStep<T> for Result<T, E> {
    fn at(self, step: Step) -> Result<T, Error> {
        self.map_err(|err| err.into().at(step))
    }
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
    /// The error with the step it happened in; an error that names its step already
    /// keeps it (the innermost step is the most precise).
    pub fn at(self, step: Step) -> Self {
        match self {
            Self::At { .. } => self,
            other => Self::At {
                step,
                source: Box::new(other),
            },
        }
    }

    /// The step the error happened in, if known.
    pub fn step(&self) -> Option<Step> {
        match self {
            Self::At { step, .. } => Some(*step),
            _ => None,
        }
    }

    /// What went wrong, without the step.
    pub fn cause(&self) -> &Error {
        match self {
            Self::At { source, .. } => source.cause(),
            other => other,
        }
    }

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
        match self.cause() {
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
            Self::At { source, .. } => source.metric_label(),
        }
    }

    /// The `Ready` condition reason this error shows as.
    pub fn condition_reason(&self) -> &'static str {
        match self.cause() {
            Self::DatabaseUnavailable(_) => reasons::DATABASE_UNAVAILABLE,
            Self::Constraint { .. } => reasons::CONSTRAINT_VIOLATION,
            Self::Database(_) => reasons::DATABASE_ERROR,
            Self::ConfigStoreUnavailable(_) => reasons::CONFIG_STORE_UNAVAILABLE,
            Self::Kube(_) | Self::Finalizer(_) | Self::Fenced(_) => reasons::RECONCILE_FAILED,
            Self::Transient(_) => reasons::PROVISIONING,
            Self::Internal(_) | Self::Panicked(_) => reasons::INTERNAL_ERROR,
            Self::At { source, .. } => source.condition_reason(),
        }
    }

    /// True for a lost race: retried at once rather than with growing backoff, and not
    /// reported as a failure in status.
    pub fn is_transient(&self) -> bool {
        matches!(self.cause(), Self::Transient(_))
    }

    /// True when this process is not the schema's writer (nothing was written).
    pub fn is_fenced(&self) -> bool {
        matches!(self.cause(), Self::Fenced(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_listed_label_and_a_reason() {
        let errors = [
            Error::Finalizer(finalizer::Error::UnnamedObject),
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

    #[test]
    fn a_step_names_itself_and_keeps_the_label_and_reason_of_its_cause() {
        let cause = || Error::DatabaseUnavailable(sqlx::Error::PoolTimedOut);
        let at = cause().at(Step::Database);
        assert_eq!(at.metric_label(), cause().metric_label());
        assert_eq!(at.condition_reason(), cause().condition_reason());
        assert!(
            at.to_string()
                .starts_with("writing the record: database unavailable")
        );
        // The innermost step is kept.
        let again = at.at(Step::Status);
        assert_eq!(again.step(), Some(Step::Database));
        let transient: Result<(), Error> = Err(Error::Transient("x".into()));
        assert!(
            transient
                .at(Step::Load("the Customer"))
                .unwrap_err()
                .is_transient()
        );
        assert!(Error::Fenced("x".into()).at(Step::ConfigStore).is_fenced());
    }
}
