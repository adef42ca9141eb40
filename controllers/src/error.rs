//! The reconcile error, shared by every kind.

use crate::status::reasons;

/// Why a reconcile failed. Outcomes an admin must act on (a conflict, an unknown
/// plan) are not errors: they are written to status and requeued.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database unavailable: {0}")]
    DatabaseUnavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("platform config store (etcd) unavailable: {0}")]
    ConfigStoreUnavailable(#[source] etcd_client::Error),
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("invalid object: {0}")]
    Invalid(String),
    /// This process is not (or no longer) the schema's writer: nothing was written, and
    /// nothing about the object is reported (the writer reconciles it).
    #[error("not the writer of this schema: {0}")]
    Fenced(String),
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        if crate::store::fence::is_fenced(&err) {
            Self::Fenced(err.to_string())
        } else if crate::store::is_unavailable(&err) {
            Self::DatabaseUnavailable(err)
        } else {
            Self::Database(err)
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
        Self::Kube(err)
    }
}

impl Error {
    /// Every value of [`Error::metric_label`].
    pub const METRIC_LABELS: &[&str] = &[
        "database_unavailable",
        "database",
        "config_store_unavailable",
        "kube",
        "finalizer",
        "invalid",
        "fenced",
    ];

    /// Low-cardinality label for the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::DatabaseUnavailable(_) => "database_unavailable",
            Self::Database(_) => "database",
            Self::ConfigStoreUnavailable(_) => "config_store_unavailable",
            Self::Kube(_) => "kube",
            Self::Finalizer(_) => "finalizer",
            Self::Invalid(_) => "invalid",
            Self::Fenced(_) => "fenced",
        }
    }

    /// The `Ready` condition reason this error shows as.
    pub fn condition_reason(&self) -> &'static str {
        match self {
            Self::DatabaseUnavailable(_) | Self::Database(_) => reasons::DATABASE_UNAVAILABLE,
            Self::ConfigStoreUnavailable(_) => reasons::CONFIG_STORE_UNAVAILABLE,
            Self::Kube(_) | Self::Finalizer(_) | Self::Fenced(_) => reasons::RECONCILE_FAILED,
            Self::Invalid(_) => reasons::INVALID,
        }
    }
}
