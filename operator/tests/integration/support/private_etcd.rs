//! A private etcd, for tests that take the platform config store down without
//! touching the shared one. `etcd` comes from PATH (hack/env.sh puts the tools there).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{eventually, free_port};

/// `etcd` as a one-member cluster on `client` and `peer` URLs, data in `data_dir`.
pub fn etcd_command(data_dir: &Path, client: &str, peer: &str) -> Command {
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", "private", "--data-dir"])
        .arg(data_dir)
        .args([
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
        ])
        .args([
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
        ])
        .args(["--initial-cluster", &format!("private={peer}")])
        .args(["--unsafe-no-fsync", "--log-level", "warn"])
        // Its own ETCD_* variables are its flags; the tests' ETCD_ENDPOINTS is not one.
        .env_remove("ETCD_ENDPOINTS");
    cmd
}

pub struct PrivateEtcd {
    child: Option<Child>,
    pub port: u16,
    peer_port: u16,
    dir: PathBuf,
}

impl PrivateEtcd {
    pub async fn start() -> Self {
        let (port, peer_port) = (free_port(), free_port());
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("etcd-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd dir");
        let mut etcd = Self {
            child: None,
            port,
            peer_port,
            dir,
        };
        etcd.resume().await;
        etcd
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same ports and data.
    pub async fn resume(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.join("etcd.log")).expect("etcd log");
        let child = etcd_command(&self.dir.join("data"), &client, &peer)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("etcd on PATH (run inside hack/env.sh, which puts it there)");
        self.child = Some(child);
        let url = format!("127.0.0.1:{}", self.port);
        eventually(
            "private etcd to answer",
            Duration::from_secs(20),
            || async {
                super::http_get(&url, "/health")
                    .await
                    .filter(|(code, _)| *code == 200)
                    .map(|_| ())
            },
        )
        .await;
    }

    /// Kills the server (its data stays for `resume`).
    pub async fn pause(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill etcd");
        }
    }
}
