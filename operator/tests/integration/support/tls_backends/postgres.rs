//! PostgreSQL: TLS only (no plain host line), the operator's role with a client
//! certificate, owning only its schema.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use sqlx::PgPool;
use tokio::process::{Child, Command};

use super::{DATABASE, OPERATOR_ROLE, STARTUP, Servers, chmod, log_file};
use crate::support::eventually;

impl Servers {
    // --- PostgreSQL: TLS only (hostssl), the operator's role with a client certificate.

    pub(super) async fn start_postgres(&self) -> Child {
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
    pub(super) async fn setup_postgres(&self, schema: &str) -> PgPool {
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
