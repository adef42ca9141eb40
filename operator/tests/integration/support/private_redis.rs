//! A private redis-server, for tests that take Redis down without touching the
//! shared one.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{free_port, wait_redis_answers};

/// A private redis-server on a free port, for tests that take Redis down.
pub struct PrivateRedis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let port = free_port();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut redis = Self {
            child: None,
            port,
            dir,
        };
        redis.resume().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port.
    pub async fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (install redis-server; `make test` does)");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("private redis URL");
        wait_redis_answers("private redis to answer", Duration::from_secs(10), &client).await;
    }

    /// Kills the server (its data is gone: it keeps nothing on disk).
    pub async fn pause(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill redis");
        }
    }
}
