//! etcd: endpoints, prefix, TLS and user credentials (etcdctl's names for the files).

use std::path::PathBuf;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use super::{SettingError, client_pair, first_given, read_file};

/// The flags of an etcd client. Environment fallbacks of the TLS and credential flags
/// start with `M3O_`: etcd itself reads `ETCD_CERT_FILE` and the like as its own
/// server flags.
#[derive(clap::Args, Debug, Clone, Default)]
#[group(skip)] // flattened into structs of any name (the gateway has its own RedisArgs)
pub struct EtcdArgs {
    /// etcd endpoints of the platform config, comma separated (https:// for TLS).
    #[arg(long, env = "ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// Prefix of the platform config's keys in etcd.
    #[arg(long, env = "M3O_ETCD_PREFIX", default_value = "/m3o")]
    pub etcd_prefix: String,

    /// CA bundle (PEM) that signs the etcd servers' certificates. Unset: the system roots.
    #[arg(long, env = "M3O_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,

    /// Client certificate (PEM), when etcd asks for one (--client-cert-auth).
    #[arg(long, env = "M3O_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,

    /// Key (PEM) of --etcd-cert-file.
    #[arg(long, env = "M3O_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,

    /// etcd user (etcd auth enabled).
    #[arg(long, env = "M3O_ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// Password of --etcd-username; prefer M3O_ETCD_PASSWORD or --etcd-password-file
    /// to keep it out of the process list.
    #[arg(long, env = "M3O_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,

    /// File holding the password of --etcd-username (a trailing newline is ignored).
    #[arg(long, env = "M3O_ETCD_PASSWORD_FILE", conflicts_with = "etcd_password")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// The endpoints, trimmed; at least one, each http:// or https://.
    pub fn endpoints(&self) -> Result<Vec<String>, SettingError> {
        let flag = "--etcd-endpoints";
        let endpoints: Vec<String> = self
            .etcd_endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(SettingError::new(flag, "required (or set ETCD_ENDPOINTS)"));
        }
        if let Some(bad) = endpoints
            .iter()
            .find(|e| !e.starts_with("http://") && !e.starts_with("https://"))
        {
            return Err(SettingError::new(
                flag,
                format!("{bad:?} must start with http:// or https://"),
            ));
        }
        Ok(endpoints)
    }

    /// The prefix, checked: it starts with `/` and names a directory.
    pub fn prefix(&self) -> Result<&str, SettingError> {
        let prefix = self.etcd_prefix.as_str();
        if !prefix.starts_with('/') || prefix.trim_end_matches('/').is_empty() {
            return Err(SettingError::new(
                "--etcd-prefix",
                format!("{prefix:?} must start with / and name a directory, e.g. /m3o"),
            ));
        }
        Ok(prefix)
    }

    /// `options` (the caller's timeouts and keepalives) with TLS when the endpoints
    /// are https://, and the user when one is given. Reads the files named by the flags.
    pub fn connect_options(
        &self,
        mut options: ConnectOptions,
    ) -> Result<ConnectOptions, SettingError> {
        let tls = self.endpoints()?.iter().any(|e| e.starts_with("https://"));
        let client = client_pair(
            self.etcd_cert_file.as_deref(),
            self.etcd_key_file.as_deref(),
            "--etcd-cert-file",
            "--etcd-key-file",
        )?;
        if tls {
            // A CA file is the only trust anchor; without one, the system's roots.
            let mut tls_options = match &self.etcd_ca_file {
                Some(path) => TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(read_file("--etcd-ca-file", path)?)),
                None => TlsOptions::new().with_enabled_roots(),
            };
            if let Some(pem) = client {
                tls_options = tls_options.identity(Identity::from_pem(pem.cert, pem.key));
            }
            options = options.with_tls(tls_options);
        } else if let Some(flag) = self.tls_flag_given() {
            return Err(SettingError::new(
                flag,
                "given, but --etcd-endpoints are http://: use https:// endpoints for TLS",
            ));
        }
        if let Some((user, password)) = self.credentials()? {
            // etcd's simple tokens expire (5 min by default): log in again when one has.
            options = options
                .with_user(user, password)
                .with_auto_token_refresh(true);
        }
        Ok(options)
    }

    fn tls_flag_given(&self) -> Option<&'static str> {
        first_given([
            ("--etcd-ca-file", &self.etcd_ca_file),
            ("--etcd-cert-file", &self.etcd_cert_file),
            ("--etcd-key-file", &self.etcd_key_file),
        ])
    }

    /// User and password: both or neither.
    fn credentials(&self) -> Result<Option<(String, String)>, SettingError> {
        let password = match (&self.etcd_password, &self.etcd_password_file) {
            (Some(password), _) => Some(password.clone()),
            (None, Some(path)) => {
                let bytes = read_file("--etcd-password-file", path)?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    SettingError::new("--etcd-password-file", "the password is not UTF-8")
                })?;
                Some(text.trim_end_matches(['\r', '\n']).to_owned())
            }
            (None, None) => None,
        };
        let user = self.etcd_username.as_deref().filter(|u| !u.is_empty());
        match (user, password) {
            (None, None) => Ok(None),
            (Some(user), Some(password)) => Ok(Some((user.to_owned(), password))),
            (Some(_), None) => Err(SettingError::new(
                "--etcd-username",
                "needs a password (M3O_ETCD_PASSWORD or --etcd-password-file)",
            )),
            (None, Some(_)) => Err(SettingError::new(
                "--etcd-username",
                "required with a password",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(endpoints: &[&str]) -> EtcdArgs {
        EtcdArgs {
            etcd_endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
            etcd_prefix: "/m3o".into(),
            ..EtcdArgs::default()
        }
    }

    fn flag_of(args: &EtcdArgs) -> &'static str {
        args.connect_options(ConnectOptions::new())
            .map(|_| "")
            .unwrap_or_else(|e| e.flag)
    }

    #[test]
    fn endpoints_are_required_and_need_a_scheme() {
        assert_eq!(
            args(&[" ", ""]).endpoints().unwrap_err().flag,
            "--etcd-endpoints"
        );
        assert_eq!(
            args(&["127.0.0.1:2379"]).endpoints().unwrap_err().flag,
            "--etcd-endpoints"
        );
        assert_eq!(
            args(&[" https://a:1 "]).endpoints().unwrap(),
            ["https://a:1"]
        );
    }

    #[test]
    fn tls_files_need_https_and_come_in_pairs() {
        let mut plain = args(&["http://a:1"]);
        plain.etcd_ca_file = Some("/ca.pem".into());
        assert_eq!(flag_of(&plain), "--etcd-ca-file");
        let mut half = args(&["https://a:1"]);
        half.etcd_cert_file = Some("/c.pem".into());
        assert_eq!(flag_of(&half), "--etcd-key-file");
        let mut missing = args(&["https://a:1"]);
        missing.etcd_ca_file = Some("/nonexistent/ca.pem".into());
        assert_eq!(flag_of(&missing), "--etcd-ca-file");
    }

    #[test]
    fn user_and_password_come_together() {
        let mut user = args(&["http://a:1"]);
        user.etcd_username = Some("m3o".into());
        assert_eq!(flag_of(&user), "--etcd-username");
        user.etcd_password = Some("pw".into());
        assert_eq!(
            user.credentials().unwrap(),
            Some(("m3o".into(), "pw".into()))
        );
        let dir = std::env::temp_dir().join(format!("etcd-pw-{}", std::process::id()));
        std::fs::write(&dir, "secret\n").unwrap();
        user.etcd_password = None;
        user.etcd_password_file = Some(dir.clone());
        assert_eq!(
            user.credentials().unwrap(),
            Some(("m3o".into(), "secret".into()))
        );
        std::fs::remove_file(dir).unwrap();
    }
}

/// The end of etcd's key range of everything that starts with `prefix` (the first key
/// after all of them), for paged range reads of a prefix.
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: to the end of the keyspace.
    vec![0]
}

#[cfg(test)]
mod prefix_range_tests {
    use super::prefix_range_end;

    #[test]
    fn the_range_ends_just_after_the_prefix() {
        assert_eq!(prefix_range_end(b"/m3o/"), b"/m3o0".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"\xff"), vec![0]);
    }
}
