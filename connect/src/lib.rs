//! How an m3o process reaches the platform's etcd and Redis: the flags (TLS files,
//! credentials), checked and turned into client settings. Every binary that talks to
//! them (the operator, the gateway) flattens these into its command line, so they take
//! the same flags with the same meaning.
//! PostgreSQL needs nothing here: its URL carries libpq's `sslmode`, `sslrootcert`,
//! `sslcert` and `sslkey`.

pub mod etcd;
pub mod redis;

use std::path::{Path, PathBuf};

/// A bad setting, printed on one line as `<flag>: <what is wrong>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag}: {message}")]
pub struct SettingError {
    pub flag: &'static str,
    pub message: String,
}

impl SettingError {
    pub fn new(flag: &'static str, message: impl Into<String>) -> Self {
        Self {
            flag,
            message: message.into(),
        }
    }
}

/// The first flag of `flags` that is given (a TLS file given for a plain-text URL is
/// a mistake worth naming).
fn first_given(flags: [(&'static str, &Option<PathBuf>); 3]) -> Option<&'static str> {
    flags
        .into_iter()
        .find_map(|(flag, path)| path.is_some().then_some(flag))
}

/// The contents of the file a flag names.
fn read_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, SettingError> {
    std::fs::read(path)
        .map_err(|e| SettingError::new(flag, format!("cannot read {}: {e}", path.display())))
}

/// A client certificate and its key, PEM.
struct ClientPem {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// A client certificate and its key: both or neither.
fn client_pair(
    cert: Option<&Path>,
    key: Option<&Path>,
    cert_flag: &'static str,
    key_flag: &'static str,
) -> Result<Option<ClientPem>, SettingError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some(ClientPem {
            cert: read_file(cert_flag, cert)?,
            key: read_file(key_flag, key)?,
        })),
        (Some(_), None) => Err(SettingError::new(
            key_flag,
            format!("required with {cert_flag}"),
        )),
        (None, Some(_)) => Err(SettingError::new(
            cert_flag,
            format!("required with {key_flag}"),
        )),
    }
}
