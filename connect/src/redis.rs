//! Redis: the URL (`rediss://` for TLS, ACL user and password in its userinfo) and
//! the TLS files a URL cannot carry.

use std::path::PathBuf;

use redis::{ClientTlsConfig, TlsCertificates};

use super::{SettingError, client_pair, first_given, read_file};

/// The flags of a Redis client.
#[derive(clap::Args, Debug, Clone, Default)]
#[group(skip)] // flattened into structs of any name (the gateway has its own RedisArgs)
pub struct RedisArgs {
    /// Redis URL: redis://[user:password@]host:port[/db], or rediss:// for TLS.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// CA bundle (PEM) that signs the Redis server's certificate (rediss://). Unset: the
    /// system roots.
    #[arg(long, env = "M3O_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Client certificate (PEM), when Redis asks for one (tls-auth-clients).
    #[arg(long, env = "M3O_REDIS_CERT_FILE")]
    pub redis_cert_file: Option<PathBuf>,

    /// Key (PEM) of --redis-cert-file.
    #[arg(long, env = "M3O_REDIS_KEY_FILE")]
    pub redis_key_file: Option<PathBuf>,
}

impl RedisArgs {
    /// The URL, required.
    pub fn url(&self) -> Result<&str, SettingError> {
        self.redis_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .ok_or_else(|| SettingError::new("--redis-url", "required (or set REDIS_URL)"))
    }

    /// A client (it connects lazily). Reads the files named by the flags; the error
    /// never repeats the URL, which may hold a password.
    pub fn client(&self) -> Result<redis::Client, SettingError> {
        let url = self.url()?;
        let invalid =
            |e: redis::RedisError| SettingError::new("--redis-url", format!("invalid URL: {e}"));
        if !url.starts_with("rediss://") {
            if let Some(flag) = self.tls_flag_given() {
                return Err(SettingError::new(
                    flag,
                    "given, but --redis-url is not rediss://: use rediss:// for TLS",
                ));
            }
            return redis::Client::open(url).map_err(invalid);
        }
        let root_cert = match &self.redis_ca_file {
            Some(path) => Some(read_file("--redis-ca-file", path)?),
            None => None,
        };
        let client_tls = client_pair(
            self.redis_cert_file.as_deref(),
            self.redis_key_file.as_deref(),
            "--redis-cert-file",
            "--redis-key-file",
        )?
        .map(|pem| ClientTlsConfig {
            client_cert: pem.cert,
            client_key: pem.key,
        });
        redis::Client::build_with_tls(
            url,
            TlsCertificates {
                client_tls,
                root_cert,
            },
        )
        .map_err(invalid)
    }

    fn tls_flag_given(&self) -> Option<&'static str> {
        first_given([
            ("--redis-ca-file", &self.redis_ca_file),
            ("--redis-cert-file", &self.redis_cert_file),
            ("--redis-key-file", &self.redis_key_file),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str) -> RedisArgs {
        RedisArgs {
            redis_url: Some(url.into()),
            ..RedisArgs::default()
        }
    }

    fn flag_of(args: &RedisArgs) -> &'static str {
        args.client().map(|_| "").unwrap_or_else(|e| e.flag)
    }

    #[test]
    fn tls_files_need_rediss_and_come_in_pairs() {
        assert_eq!(flag_of(&args(" ")), "--redis-url");
        assert_eq!(flag_of(&args("redis://user:pw@127.0.0.1:1/0")), "");
        let mut plain = args("redis://127.0.0.1:1");
        plain.redis_ca_file = Some("/ca.pem".into());
        assert_eq!(flag_of(&plain), "--redis-ca-file");
        let mut missing = args("rediss://127.0.0.1:1");
        missing.redis_ca_file = Some("/nonexistent/ca.pem".into());
        assert_eq!(flag_of(&missing), "--redis-ca-file");
        let mut half = args("rediss://127.0.0.1:1");
        half.redis_key_file = Some("/k.pem".into());
        assert_eq!(flag_of(&half), "--redis-cert-file");
    }

    #[test]
    fn an_invalid_url_is_not_echoed() {
        let err = args("redis://user:hunter2@[::1").client().unwrap_err();
        assert_eq!(err.flag, "--redis-url");
        assert!(!err.message.contains("hunter2"), "{err}");
    }
}
