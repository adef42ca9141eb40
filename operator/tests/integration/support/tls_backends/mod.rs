//! Private PostgreSQL, Redis and etcd that speak only TLS (with client certificates)
//! and let the operator in as least-privilege users with the README's grants, for one
//! test; the shared environment stays plain. Admin clients read what the operator wrote.

mod etcd;
mod pki;
mod postgres;
mod redis;

use std::path::{Path, PathBuf};
use std::time::Duration;

use m3o_connect::etcd::EtcdArgs;
use m3o_connect::redis::RedisArgs;
use sqlx::PgPool;
use tokio::process::Child;

use super::gateway::GatewayConfig;
use super::operator::Backends;
use super::{TestEnv, free_port, suffix};

/// The operator's user name in Redis and etcd (and its client certificate's CN).
pub const OPERATOR_USER: &str = "m3o-operator";
/// The gateway's etcd and Redis user.
pub const GATEWAY_USER: &str = "m3o-gateway";
/// The gateway's Redis commands, as the README grants them (its keys: its prefix).
pub const GATEWAY_COMMANDS: &str =
    "+ping +evalsha +script|load +time +get +set +incr +expire +hincrby";
/// The operator's PostgreSQL role.
pub const OPERATOR_ROLE: &str = "m3o_operator";
const DATABASE: &str = "m3o";
const STARTUP: Duration = Duration::from_secs(90);

/// Which backend a test points at the wrong CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Redis,
    Etcd,
}

/// The three servers with their PKI and admin clients.
pub struct TlsBackends {
    pub servers: Servers,
    /// Superuser pool on the test's schema.
    pub admin_db: PgPool,
    /// etcd as root.
    pub admin_etcd: etcd_client::Client,
    /// Redis as an unrestricted user.
    pub admin_redis: ::redis::Client,
}

impl TlsBackends {
    /// Starts the servers and grants the operator's users exactly what the README says,
    /// for `env`'s schema, etcd prefix and stream prefix.
    pub async fn start(env: &TestEnv) -> Self {
        let dir = std::env::temp_dir().join(format!("m3o-tls-{}", suffix()));
        std::fs::create_dir_all(&dir).expect("tls test dir");
        pki::make_pki(&dir);
        let mut servers = Servers {
            pg_port: free_port(),
            redis_port: free_port(),
            etcd_port: free_port(),
            password: suffix(),
            children: Vec::new(),
            dir,
        };
        let postgres = servers.start_postgres().await;
        let redis = servers.start_redis(&env.stream_prefix);
        let etcd = servers.start_etcd();
        servers.children = vec![postgres, redis, etcd];
        let (admin_db, admin_redis, admin_etcd) = tokio::join!(
            servers.setup_postgres(&env.schema),
            servers.wait_redis(),
            servers.setup_etcd(&env.etcd_prefix),
        );
        Self {
            servers,
            admin_db,
            admin_etcd,
            admin_redis,
        }
    }
}

/// The server processes, stopped (and their directory removed) on drop.
pub struct Servers {
    dir: PathBuf,
    children: Vec<Child>,
    pg_port: u16,
    redis_port: u16,
    etcd_port: u16,
    password: String,
}

impl Servers {
    /// The password of every user here (to check that no error shows it).
    pub fn password(&self) -> String {
        self.password.clone()
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The operator's backends and flags: every connection verifies the server
    /// against the test CA (or `wrong_ca`'s backend against another CA) and presents
    /// the operator's client certificate.
    pub fn operator_backends(&self, wrong_ca: Option<Backend>) -> Backends {
        let ca = |b| {
            if wrong_ca == Some(b) {
                self.file("other-ca.crt")
            } else {
                self.file("ca.crt")
            }
        };
        let password_file = self.dir.join("etcd-password");
        std::fs::write(&password_file, format!("{}\n", self.password)).expect("password file");
        Backends {
            database_url: Some(format!(
                "postgres://{OPERATOR_ROLE}:{pw}@127.0.0.1:{port}/{DATABASE}?sslmode=verify-full\
                 &sslrootcert={ca}&sslcert={cert}&sslkey={key}",
                pw = self.password,
                port = self.pg_port,
                ca = ca(Backend::Postgres),
                cert = self.file("client.crt"),
                key = self.file("client.key"),
            )),
            redis_url: Some(format!(
                "rediss://{OPERATOR_USER}:{}@127.0.0.1:{}",
                self.password, self.redis_port
            )),
            etcd_endpoints: Some(format!("https://127.0.0.1:{}", self.etcd_port)),
            extra_args: [
                ("--redis-ca-file", ca(Backend::Redis)),
                ("--redis-cert-file", self.file("client.crt")),
                ("--redis-key-file", self.file("client.key")),
                ("--etcd-ca-file", ca(Backend::Etcd)),
                ("--etcd-cert-file", self.file("client.crt")),
                ("--etcd-key-file", self.file("client.key")),
                ("--etcd-username", OPERATOR_USER.to_owned()),
                ("--etcd-password-file", password_file.display().to_string()),
            ]
            .into_iter()
            .flat_map(|(flag, value)| [flag.to_owned(), value])
            .collect(),
            extra_env: Vec::new(),
        }
    }

    /// A `rediss://` URL of this Redis as `user` (same password for every user).
    pub fn redis_url_as(&self, user: &str) -> String {
        format!(
            "rediss://{user}:{}@127.0.0.1:{}",
            self.password, self.redis_port
        )
    }

    /// A gateway replica's config: etcd as its own user (it reads `<prefix>/` and
    /// writes its report under `<prefix>/gateways/`), Redis as its own ACL user (its
    /// keys and script only), both over TLS with the client certificate.
    pub fn gateway_config(&self, env: &TestEnv) -> GatewayConfig {
        let password_file = self.dir.join("gateway-etcd-password");
        std::fs::write(&password_file, &self.password).expect("password file");
        GatewayConfig {
            etcd_endpoints: format!("https://127.0.0.1:{}", self.etcd_port),
            redis_url: self.redis_url_as(GATEWAY_USER),
            redis_prefix: format!("{}gw:", env.stream_prefix),
            extra_args: [
                ("--etcd-ca-file", self.file("ca.crt")),
                ("--etcd-cert-file", self.file("client.crt")),
                ("--etcd-key-file", self.file("client.key")),
                ("--etcd-username", GATEWAY_USER.to_owned()),
                ("--etcd-password-file", password_file.display().to_string()),
                ("--redis-ca-file", self.file("ca.crt")),
                ("--redis-cert-file", self.file("client.crt")),
                ("--redis-key-file", self.file("client.key")),
            ]
            .into_iter()
            .flat_map(|(flag, value)| [flag.to_owned(), value])
            .collect(),
        }
    }

    /// The operator's PostgreSQL URL, but verifying the server's name as `host`.
    pub fn database_url_via(&self, host: &str) -> String {
        format!(
            "postgres://{OPERATOR_ROLE}:{}@{host}:{}/{DATABASE}?sslmode=verify-full&sslrootcert={}",
            self.password,
            self.pg_port,
            self.file("ca.crt")
        )
    }

    /// An etcd client logged in as the operator's user.
    pub async fn operator_etcd(&self, prefix: &str) -> etcd_client::Client {
        let args = self.etcd_args(prefix, OPERATOR_USER);
        connect_etcd(&args)
            .await
            .expect("etcd as the operator's user")
    }

    /// The same, but keeping its first token when etcd drops it (what every client
    /// did before `m3o_connect` turned the refresh on).
    pub async fn operator_etcd_without_token_refresh(&self, prefix: &str) -> etcd_client::Client {
        let args = self.etcd_args(prefix, OPERATOR_USER);
        let options = args
            .connect_options(etcd_client::ConnectOptions::new())
            .expect("etcd options")
            .with_auto_token_refresh(false);
        etcd_client::Client::connect(args.endpoints().expect("endpoints"), Some(options))
            .await
            .expect("etcd as the operator's user")
    }

    /// A Redis client logged in as the operator's user.
    pub fn operator_redis(&self) -> ::redis::Client {
        self.redis_args(OPERATOR_USER)
            .client()
            .expect("redis client")
    }

    fn etcd_args(&self, prefix: &str, user: &str) -> EtcdArgs {
        EtcdArgs {
            etcd_endpoints: vec![format!("https://127.0.0.1:{}", self.etcd_port)],
            etcd_prefix: prefix.to_owned(),
            etcd_ca_file: Some(self.file("ca.crt").into()),
            etcd_cert_file: Some(self.file("client.crt").into()),
            etcd_key_file: Some(self.file("client.key").into()),
            etcd_username: Some(user.to_owned()),
            etcd_password: Some(self.password.clone()),
            etcd_password_file: None,
        }
    }

    fn redis_args(&self, user: &str) -> RedisArgs {
        RedisArgs {
            redis_url: Some(format!(
                "rediss://{user}:{}@127.0.0.1:{}",
                self.password, self.redis_port
            )),
            redis_ca_file: Some(self.file("ca.crt").into()),
            redis_cert_file: Some(self.file("client.crt").into()),
            redis_key_file: Some(self.file("client.key").into()),
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn connect_etcd(args: &EtcdArgs) -> Result<etcd_client::Client, etcd_client::Error> {
    let options = args
        .connect_options(etcd_client::ConnectOptions::new())
        .expect("etcd options");
    etcd_client::Client::connect(args.endpoints().expect("endpoints"), Some(options)).await
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file")
}
