//! Private PostgreSQL, Redis and etcd that speak only TLS (with client certificates)
//! and let the operator in as least-privilege users with the README's grants, for one
//! test; the shared environment stays plain. Admin clients read what the operator wrote.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use etcd_client::Permission;
use m3o_connect::etcd::EtcdArgs;
use m3o_connect::redis::RedisArgs;
use sqlx::PgPool;
use tokio::process::{Child, Command};

use super::gateway::GatewayConfig;
use super::operator::Backends;
use super::private_etcd::etcd_command;
use super::{TestEnv, eventually, free_port, suffix, wait_redis_answers};

/// The operator's user name in Redis and etcd (and its client certificate's CN).
pub const OPERATOR_USER: &str = "m3o-operator";
/// The gateway's etcd user.
pub const GATEWAY_USER: &str = "m3o-gateway";
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
    pub admin_redis: redis::Client,
}

impl TlsBackends {
    /// Starts the servers and grants the operator's users exactly what the README says,
    /// for `env`'s schema, etcd prefix and stream prefix.
    pub async fn start(env: &TestEnv) -> Self {
        let dir = std::env::temp_dir().join(format!("m3o-tls-{}", suffix()));
        std::fs::create_dir_all(&dir).expect("tls test dir");
        make_pki(&dir);
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

    /// A gateway replica's config: etcd as its own user (it reads `<prefix>/` and
    /// writes its report under `<prefix>/gateways/`), Redis as the admin, both over
    /// TLS with the client certificate.
    pub fn gateway_config(&self, env: &TestEnv) -> GatewayConfig {
        let password_file = self.dir.join("gateway-etcd-password");
        std::fs::write(&password_file, &self.password).expect("password file");
        GatewayConfig {
            etcd_endpoints: format!("https://127.0.0.1:{}", self.etcd_port),
            redis_url: format!(
                "rediss://admin:{}@127.0.0.1:{}",
                self.password, self.redis_port
            ),
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

    /// A Redis client logged in as the operator's user.
    pub fn operator_redis(&self) -> redis::Client {
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

    // --- PostgreSQL: TLS only (hostssl), the operator's role with a client certificate.

    async fn start_postgres(&self) -> Child {
        let pg_bin = pg_bin();
        let data = self.dir.join("pg");
        let pwfile = self.dir.join("pg-admin-password");
        std::fs::write(&pwfile, &self.password).expect("pwfile");
        // The server key must belong to the server's user and be private to it.
        let key = self.dir.join("pg-server.key");
        std::fs::copy(self.dir.join("server.key"), &key).expect("copy key");
        chmod(&key, 0o600);
        if is_root() {
            chmod(&self.dir, 0o755);
            chmod(&pwfile, 0o644);
            chown_postgres(&key);
            std::fs::create_dir_all(&data).expect("pg dir");
            chown_postgres(&data);
        }
        let init = as_postgres(&pg_bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "admin",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .args(["--no-sync", "--no-locale", "-E", "UTF8"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .await
            .expect("run initdb");
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        // No plain host line: a connection without TLS is refused.
        let hba = format!(
            "local all all trust\n\
             hostssl all {OPERATOR_ROLE} 127.0.0.0/8 scram-sha-256 clientcert=verify-ca\n\
             hostssl all admin 127.0.0.0/8 scram-sha-256\n"
        );
        std::fs::write(data.join("pg_hba.conf"), hba).expect("pg_hba.conf");
        as_postgres(&pg_bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.pg_port.to_string(), "-k"])
            .arg(&data)
            // 127.0.0.2 too: the certificate does not name it (the verify-full test).
            .args([
                "-c",
                "listen_addresses=127.0.0.1,127.0.0.2",
                "-c",
                "fsync=off",
            ])
            .args(["-c", "ssl=on"])
            .arg("-c")
            .arg(format!("ssl_cert_file={}", self.file("server.crt")))
            .arg("-c")
            .arg(format!("ssl_key_file={}", key.display()))
            .arg("-c")
            .arg(format!("ssl_ca_file={}", self.file("ca.crt")))
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir, "postgres"))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn postgres")
    }

    /// Creates the database, the operator's role and its schema (README: PostgreSQL
    /// grants), and returns a superuser pool on that schema.
    async fn setup_postgres(&self, schema: &str) -> PgPool {
        let admin_url = |db: &str| {
            format!(
                "postgres://admin:{}@127.0.0.1:{}/{db}?sslmode=verify-full&sslrootcert={}",
                self.password,
                self.pg_port,
                self.file("ca.crt")
            )
        };
        let postgres = eventually("private postgres (TLS)", STARTUP, || async {
            PgPool::connect(&admin_url("postgres")).await.ok()
        })
        .await;
        sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
            .execute(&postgres)
            .await
            .expect("create database");
        postgres.close().await;
        let db = PgPool::connect(&admin_url(DATABASE))
            .await
            .expect("admin pool");
        for statement in [
            format!(
                "CREATE ROLE {OPERATOR_ROLE} LOGIN PASSWORD '{}'",
                self.password
            ),
            format!("REVOKE ALL ON DATABASE {DATABASE} FROM PUBLIC"),
            format!("GRANT CONNECT ON DATABASE {DATABASE} TO {OPERATOR_ROLE}"),
            format!("CREATE SCHEMA {schema} AUTHORIZATION {OPERATOR_ROLE}"),
        ] {
            sqlx::query(&statement)
                .execute(&db)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
        db.close().await;
        m3o_controllers::store::connect(&admin_url(DATABASE), schema, 2)
            .await
            .expect("admin pool on the schema")
    }

    // --- Redis: TLS only, client certificates required, default user off.

    fn start_redis(&self, stream_prefix: &str) -> Child {
        let config = format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\n\
             tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {ca}\n\
             tls-auth-clients yes\nsave \"\"\nappendonly no\ndir {dir}\n\
             user default off\n\
             user admin on >{pw} ~* &* +@all\n\
             user {OPERATOR_USER} on >{pw} resetkeys ~{stream_prefix}* resetchannels -@all \
             +ping +xadd +multi +exec +xinfo|groups\n",
            port = self.redis_port,
            cert = self.file("server.crt"),
            key = self.file("server.key"),
            ca = self.file("ca.crt"),
            dir = self.dir.display(),
            pw = self.password,
        );
        let path = self.dir.join("redis.conf");
        std::fs::write(&path, config).expect("redis.conf");
        Command::new("redis-server")
            .arg(&path)
            .stdout(log_file(&self.dir, "redis"))
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (install redis-server; `make test` does)")
    }

    async fn wait_redis(&self) -> redis::Client {
        let client = self
            .redis_args("admin")
            .client()
            .expect("admin redis client");
        wait_redis_answers("private redis (TLS)", STARTUP, &client).await;
        client
    }

    // --- etcd: https with client certificates, auth enabled, a role per prefix.

    fn start_etcd(&self) -> Child {
        let client = format!("https://127.0.0.1:{}", self.etcd_port);
        let peer = format!("http://127.0.0.1:{}", free_port());
        etcd_command(&self.dir.join("etcd"), &client, &peer)
            .args(["--cert-file", &self.file("server.crt")])
            .args(["--key-file", &self.file("server.key")])
            .args([
                "--trusted-ca-file",
                &self.file("ca.crt"),
                "--client-cert-auth",
            ])
            .stderr(log_file(&self.dir, "etcd"))
            .kill_on_drop(true)
            .spawn()
            .expect("etcd (on PATH inside hack/env.sh)")
    }

    /// Root, and the operator's role: read-write on the prefixes `<prefix>/` and
    /// `<prefix>.writer-epoch` (the writer-fence keys, one per shard) (README: etcd
    /// grants); then auth on.
    async fn setup_etcd(&self, prefix: &str) -> etcd_client::Client {
        let mut anonymous = self.etcd_args(prefix, "");
        anonymous.etcd_password = None;
        let mut etcd = eventually("private etcd (TLS)", STARTUP, || async {
            let mut client = connect_etcd(&anonymous).await.ok()?;
            client.status().await.ok().map(|_| client)
        })
        .await;
        etcd.user_add("root", self.password.clone(), None)
            .await
            .expect("root");
        etcd.user_grant_role("root", "root")
            .await
            .expect("root role");
        etcd.role_add(OPERATOR_USER).await.expect("role");
        for permission in [
            Permission::read_write(format!("{prefix}/")).with_prefix(),
            Permission::read_write(format!("{prefix}.writer-epoch")).with_prefix(),
        ] {
            etcd.role_grant_permission(OPERATOR_USER, permission)
                .await
                .expect("grant");
        }
        etcd.user_add(OPERATOR_USER, self.password.clone(), None)
            .await
            .expect("user");
        etcd.user_grant_role(OPERATOR_USER, OPERATOR_USER)
            .await
            .expect("user role");
        etcd.role_add(GATEWAY_USER).await.expect("gateway role");
        for permission in [
            Permission::read(format!("{prefix}/")).with_prefix(),
            Permission::read_write(format!("{prefix}/gateways/")).with_prefix(),
        ] {
            etcd.role_grant_permission(GATEWAY_USER, permission)
                .await
                .expect("gateway grant");
        }
        etcd.user_add(GATEWAY_USER, self.password.clone(), None)
            .await
            .expect("gateway user");
        etcd.user_grant_role(GATEWAY_USER, GATEWAY_USER)
            .await
            .expect("gateway user role");
        etcd.auth_enable().await.expect("auth enable");
        connect_etcd(&self.etcd_args(prefix, "root"))
            .await
            .expect("etcd as root")
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

/// CA, server certificate for 127.0.0.1 only, client certificate (CN m3o-operator),
/// and a second, unrelated CA for the wrong-CA tests. ECDSA P-256: quick to make.
fn make_pki(dir: &Path) {
    let openssl = |args: Vec<String>| {
        let out = std::process::Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .output()
            .expect("openssl (install-deps installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    for ca in ["ca", "other-ca"] {
        let mut args = words(&format!(
            "req -x509 {ec} -keyout {ca}.key -out {ca}.crt -days 2 \
             -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign,cRLSign -subj"
        ));
        args.push(format!("/CN={ca}"));
        openssl(args);
    }
    for (leaf, cn, san) in [
        ("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1\n"),
        ("client", OPERATOR_USER, ""),
    ] {
        openssl(words(&format!(
            "req -new {ec} -keyout {leaf}.key -out {leaf}.csr -subj /CN={cn}"
        )));
        let ext = format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth,clientAuth\n{san}"
        );
        std::fs::write(dir.join(format!("{leaf}.ext")), ext).expect("ext file");
        openssl(words(&format!(
            "x509 -req -in {leaf}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
             -extfile {leaf}.ext -out {leaf}.crt"
        )));
    }
    // The servers (postgres as its own user) read these.
    for name in [
        "ca.crt",
        "other-ca.crt",
        "server.crt",
        "server.key",
        "client.crt",
        "client.key",
    ] {
        chmod(&dir.join(name), 0o644);
    }
}

fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("postgres").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().expect(
        "PostgreSQL server under /usr/lib/postgresql (run hack/install-deps.sh, or set PG_BIN)",
    )
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// PostgreSQL refuses to run as root: as the postgres user then.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn chown_postgres(path: &Path) {
    let status = std::process::Command::new("chown")
        .arg("postgres:")
        .arg(path)
        .status()
        .expect("chown");
    assert!(status.success(), "chown postgres {}", path.display());
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file")
}
