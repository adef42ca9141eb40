//! A container run by `runc run` in the foreground (its exit status is the container
//! process's), signalled with `runc kill` as the kubelet's runtime does, and removed
//! (`runc kill KILL`, `runc delete --force`) when dropped.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};

use crate::support::{http_get, suffix};

pub struct Container {
    pub id: String,
    /// runc's state directory (ours, not the machine's /run/runc).
    state: PathBuf,
    /// The bundle: config.json, the log, and the volumes' files (removed when dropped).
    dir: PathBuf,
    child: Child,
    pub log: PathBuf,
    exited: Option<ExitStatus>,
}

/// A directory for one container's bundle and volumes.
pub fn container_dir(name: &str) -> (String, PathBuf) {
    let id = format!("m3o-{name}-{}", suffix());
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("containers")
        .join(&id);
    std::fs::create_dir_all(&dir).expect("container dir");
    (id, dir)
}

fn state_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("runc-state")
}

impl Container {
    /// Writes `spec` as the bundle's config.json in `dir` and starts it.
    pub fn start(id: String, dir: PathBuf, spec: &Value) -> Self {
        assert!(
            is_root(),
            "the image tests run runc, which needs root (make test runs them as root in CI)"
        );
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(spec).expect("spec JSON"),
        )
        .expect("write config.json");
        let log = dir.join("container.log");
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let state = state_dir();
        std::fs::create_dir_all(&state).expect("runc state dir");
        let child = Command::new("runc")
            .arg("--root")
            .arg(&state)
            .args(["run", "--bundle"])
            .arg(&dir)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("runc: {e} (hack/install-deps.sh installs it)"));
        Self {
            id,
            state,
            dir,
            child,
            log,
            exited: None,
        }
    }

    /// What the container wrote (and runc's own errors).
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its exit status, when it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("wait runc");
        }
        self.exited
    }

    /// Waits (at most `timeout`) until `path` on 127.0.0.1:`port` answers 200; panics
    /// with the container's output if it exits first or never answers.
    pub async fn wait_http_ok(&mut self, port: u16, path: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                panic!(
                    "container {} exited ({status}) before {path} answered:\n{}",
                    self.id,
                    self.output()
                );
            }
            let answer = http_get(&format!("127.0.0.1:{port}"), path).await;
            if matches!(answer, Some((200, _))) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "container {}: {path} on port {port} not 200 after {timeout:?} (last: {answer:?}):\n{}",
                self.id,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `runc kill ID SIGNAL`.
    pub async fn kill(&self, signal: &str) {
        let out = Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(["kill", &self.id, signal])
            .output()
            .await
            .expect("runc kill");
        assert!(
            out.status.success(),
            "runc kill {signal}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGTERM, as on a Pod's deletion, and its exit status within `grace` (the Pod's
    /// terminationGracePeriodSeconds; after it the kubelet would SIGKILL).
    pub async fn terminate(&mut self, grace: Duration) -> ExitStatus {
        self.kill("TERM").await;
        let status = tokio::time::timeout(grace, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "container {} still running {grace:?} after SIGTERM:\n{}",
                    self.id,
                    self.output()
                )
            })
            .expect("wait runc");
        self.exited = Some(status);
        status
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let running = self.try_exit().is_none();
        let runc = |args: &[&str]| {
            let _ = std::process::Command::new("runc")
                .arg("--root")
                .arg(&self.state)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        if running {
            runc(&["kill", &self.id, "KILL"]);
        }
        runc(&["delete", "--force", &self.id]);
        // Tokens, keys and passwords of the volumes; config.json and the log stay.
        let _ = std::fs::remove_dir_all(self.dir.join("volumes"));
    }
}

fn is_root() -> bool {
    // The effective UID from /proc (no libc call in the tests).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
