//! The operator under test: a real `m3o-operator run` process per test, on the
//! test's slice of the environment, with optional backend overrides.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{TestEnv, eventually};

/// Backends an operator uses instead of the shared ones.
#[derive(Default)]
pub struct Backends {
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    pub etcd_endpoints: Option<String>,
    /// More `run` flags (e.g. `--plans-file`).
    pub extra_args: Vec<String>,
    /// More environment variables (e.g. `M3O_FAILPOINTS`).
    pub extra_env: Vec<(String, String)>,
}

impl TestEnv {
    /// Starts an operator process watching this test's namespace.
    pub async fn start_operator(&self) -> Operator {
        self.start_operator_with(Backends::default()).await
    }

    /// Starts an operator process with some backends replaced (for outage tests).
    pub async fn start_operator_with(&self, backends: Backends) -> Operator {
        let (child, log_path, log_start) = self.spawn_operator(backends);
        let port = bound_port(&log_path, log_start).await;
        let op = Operator {
            child,
            port,
            log_path,
        };
        op.wait_ready().await;
        op
    }

    /// Starts an operator process without waiting for it to serve (it may exit
    /// first): for tests of how it exits. Its `port` is 0.
    pub fn spawn_operator_with(&self, backends: Backends) -> Operator {
        let (child, log_path, _) = self.spawn_operator(backends);
        Operator {
            child,
            port: 0,
            log_path,
        }
    }

    fn spawn_operator(&self, backends: Backends) -> (Child, PathBuf, u64) {
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("operator-logs");
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let log_path = log_dir.join(format!("{}-{}.log", self.ns, super::suffix()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log file");
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(env!("CARGO_BIN_EXE_m3o-operator"))
            .args([
                "run",
                "--namespace",
                &self.ns,
                "--database-schema",
                &self.schema,
            ])
            .args([
                "--stream-prefix",
                &self.stream_prefix,
                "--etcd-prefix",
                &self.etcd_prefix,
            ])
            .args(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
            .args(
                (!backends.extra_args.iter().any(|a| a == "--resync-interval"))
                    .then_some(["--resync-interval", "30s"])
                    .into_iter()
                    .flatten(),
            )
            .args(&backends.extra_args)
            .envs(backends.extra_env.iter().map(|(k, v)| (k, v)))
            .env(
                "DATABASE_URL",
                backends.database_url.as_ref().unwrap_or(&self.database_url),
            )
            .env(
                "REDIS_URL",
                backends.redis_url.as_ref().unwrap_or(&self.redis_url),
            )
            .env(
                "ETCD_ENDPOINTS",
                backends
                    .etcd_endpoints
                    .as_ref()
                    .unwrap_or(&self.etcd_endpoints),
            )
            .env("RUST_LOG", "info,m3o_controllers=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn m3o-operator");
        (child, log_path, log_start)
    }
}

/// The port an operator started at `log_start` in `log_path` bound (it binds port 0).
async fn bound_port(log_path: &std::path::Path, log_start: u64) -> u16 {
    let what = format!("the operator's HTTP address in {}", log_path.display());
    eventually(&what, Duration::from_secs(60), || async {
        let log = std::fs::read(log_path).ok()?;
        let new = String::from_utf8_lossy(log.get(log_start as usize..)?).into_owned();
        assert!(
            !new.contains("m3o-operator: error:"),
            "the operator failed to start:\n{new}"
        );
        let line = new.lines().find(|l| l.contains("HTTP server listening"))?;
        let addr = serde_json::from_str::<serde_json::Value>(line).ok()?["addr"]
            .as_str()?
            .to_owned();
        addr.rsplit_once(':')?.1.parse().ok()
    })
    .await
}

/// A running `m3o-operator run` process; killed when dropped.
pub struct Operator {
    child: Child,
    pub port: u16,
    pub log_path: PathBuf,
}

impl Operator {
    /// Waits (30 s at most) until the operator's log has a line containing `text`.
    pub async fn wait_log(&self, what: &str, text: &str) {
        let log = self.log_path.clone();
        eventually(what, Duration::from_secs(30), || async {
            let logged = std::fs::read_to_string(&log).ok()?;
            logged.contains(text).then_some(())
        })
        .await;
    }

    pub async fn wait_ready(&self) {
        let url = format!("127.0.0.1:{}", self.port);
        let log = self.log_path.clone();
        eventually(
            &format!("operator /readyz (log: {})", log.display()),
            Duration::from_secs(60),
            || async {
                http_get(&url, "/readyz")
                    .await
                    .filter(|(code, _)| *code == 200)
                    .map(|_| ())
            },
        )
        .await;
    }

    /// The `/metrics` text. Panics unless the endpoint answers 200 with the
    /// operator's metrics, so that a missing series means "not counted", never
    /// "could not ask".
    pub async fn metrics(&self) -> String {
        let answer = http_get(&format!("127.0.0.1:{}", self.port), "/metrics").await;
        match answer {
            Some((200, body)) if body.contains("# TYPE m3o_operator_leader ") => body,
            other => panic!(
                "the operator's /metrics did not answer (log: {}): {other:?}",
                self.log_path.display()
            ),
        }
    }

    /// Waits until no reconcile has run for a second (trailing reconciles of earlier
    /// changes would otherwise race a test's next step). Only for an operator that
    /// reconciles: its per-kind counters must be there.
    pub async fn settle(&self) {
        let total = |m: String| -> f64 {
            let counts: Vec<f64> = m
                .lines()
                .filter(|l| l.starts_with("m3o_operator_reconciles_total{"))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .collect();
            assert!(
                !counts.is_empty(),
                "settle(): the operator exposes no reconcile counters (not leading?):\n{m}"
            );
            counts.iter().sum()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut last = total(self.metrics().await);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = total(self.metrics().await);
            if now == last {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the operator did not settle in 30s"
            );
            last = now;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running operator")
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) with kill(1).
    pub async fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -{signal}");
    }

    /// True while the process is stopped (SIGSTOP), from /proc.
    pub fn is_stopped(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .ok()
            .and_then(|stat| {
                let state = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .next()?
                    .to_owned();
                Some(state == "T")
            })
            .unwrap_or(false)
    }

    /// True until the process has exited (a restart would be a new process).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit on its own.
    pub async fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().await.expect("wait operator")
    }

    /// SIGKILL: no chance to clean up, as in a node failure.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill operator");
    }

    /// SIGTERM and wait: the graceful path.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running operator").to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("send SIGTERM");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("operator stops within 30s of SIGTERM")
            .expect("wait operator")
    }
}

/// Waits (at most a minute) for `op` to exit on its own; its status and whole log.
pub async fn exit_log(op: Operator, what: &str) -> (std::process::ExitStatus, String) {
    let log_path = op.log_path.clone();
    let status = tokio::time::timeout(Duration::from_secs(60), op.wait())
        .await
        .unwrap_or_else(|_| panic!("{what} (log: {})", log_path.display()));
    (status, std::fs::read_to_string(log_path).expect("read log"))
}

/// A minimal HTTP/1.0 GET, enough for the operator's own endpoints.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}
