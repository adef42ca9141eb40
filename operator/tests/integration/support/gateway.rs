//! Gateway replicas (m3o-gateway-auth, run in the test process so a test always runs
//! the code it was built with), a tiny upstream API, and a raw HTTP client that can
//! send the headers forward-auth needs.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;
use m3o_gateway::Gateway;
use m3o_gateway::settings::Cli;

use super::{TestEnv, eventually, http_get};

/// Backends and flags of one gateway replica.
pub struct GatewayConfig {
    pub etcd_endpoints: String,
    pub redis_url: String,
    pub redis_prefix: String,
    pub extra_args: Vec<String>,
}

impl TestEnv {
    /// A gateway config on this test's prefix and the shared servers; its Redis keys
    /// are under a prefix of this test's own.
    pub fn gateway_config(&self) -> GatewayConfig {
        GatewayConfig {
            etcd_endpoints: self.etcd_endpoints.clone(),
            redis_url: self.redis_url.clone(),
            redis_prefix: format!("{}gw:", self.stream_prefix),
            extra_args: Vec::new(),
        }
    }

    /// Starts a gateway replica and waits until it has loaded the platform config.
    pub async fn start_gateway(&self, config: &GatewayConfig) -> Gateway {
        self.start_gateway_at(config, "127.0.0.1:0").await
    }

    /// [`Self::start_gateway`] listening on `addr` (a replica restarted on its port).
    pub async fn start_gateway_at(&self, config: &GatewayConfig, addr: &str) -> Gateway {
        let gateway = self.start_gateway_unready_at(config, addr).await;
        let ops = gateway.metrics_addr.to_string();
        eventually("gateway /readyz", Duration::from_secs(30), || async {
            http_get(&ops, "/readyz")
                .await
                .filter(|(code, _)| *code == 200)
                .map(|_| ())
        })
        .await;
        gateway
    }

    /// Starts a gateway replica without waiting for anything.
    pub async fn start_gateway_unready(&self, config: &GatewayConfig) -> Gateway {
        self.start_gateway_unready_at(config, "127.0.0.1:0").await
    }

    async fn start_gateway_unready_at(&self, config: &GatewayConfig, addr: &str) -> Gateway {
        let mut args = vec![
            "m3o-gateway-auth".to_owned(),
            "--etcd-endpoints".into(),
            config.etcd_endpoints.clone(),
            "--etcd-prefix".into(),
            self.etcd_prefix.clone(),
            "--redis-url".into(),
            config.redis_url.clone(),
            "--redis-prefix".into(),
            config.redis_prefix.clone(),
            "--listen".into(),
            addr.to_owned(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--replica-id".into(),
            format!("test-{}", super::suffix()),
        ];
        args.extend(config.extra_args.iter().cloned());
        let cli = Cli::try_parse_from(args).expect("gateway flags");
        m3o_gateway::start(cli.run).await.expect("start gateway")
    }

    /// Writes a customer (with `quota` when given) and a key with `scopes` straight into
    /// this test's prefix, as the operator would; returns the key. `entry` edits the
    /// key's value before it is written.
    pub async fn put_gateway_key(
        &self,
        scopes: &[&str],
        quota: Option<serde_json::Value>,
    ) -> TestKey {
        self.put_gateway_key_with(scopes, quota, |_| {}).await
    }

    pub async fn put_gateway_key_with(
        &self,
        scopes: &[&str],
        quota: Option<serde_json::Value>,
        entry: impl FnOnce(&mut serde_json::Value),
    ) -> TestKey {
        let customer_id = uuid::Uuid::new_v4().to_string();
        let key = TestKey {
            key: new_key(),
            key_id: uuid::Uuid::new_v4().to_string(),
            customer_id: customer_id.clone(),
        };
        let mut kv = self.etcd.kv_client();
        let p = &self.etcd_prefix;
        let c = serde_json::json!({"id": customer_id, "email": "e@example.com", "name": "", "status": "active", "plan": "pro"});
        kv.put(format!("{p}/customers/{customer_id}"), c.to_string(), None)
            .await
            .expect("put customer");
        if let Some(q) = quota {
            kv.put(format!("{p}/quotas/{customer_id}"), q.to_string(), None)
                .await
                .expect("put quota");
        }
        self.put_key_entry(&key, scopes, entry).await;
        key
    }

    /// (Re)writes a key's entry; returns the etcd revision of the write.
    pub async fn put_key_entry(
        &self,
        key: &TestKey,
        scopes: &[&str],
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> i64 {
        let mut value = serde_json::json!({
            "keyId": key.key_id, "customerId": key.customer_id, "scopes": scopes,
            "status": "active", "expiresAt": null,
        });
        edit(&mut value);
        let resp = self
            .etcd
            .kv_client()
            .put(
                format!("{}/apikeys/{}", self.etcd_prefix, key.hash()),
                value.to_string(),
                None,
            )
            .await
            .expect("put key entry");
        resp.header().map_or(0, |h| h.revision())
    }
}

/// A key written straight into etcd (see [`TestEnv::put_gateway_key`]).
#[derive(Debug, Clone)]
pub struct TestKey {
    pub key: String,
    pub key_id: String,
    pub customer_id: String,
}

impl TestKey {
    pub fn hash(&self) -> String {
        hex::encode(m3o_gateway::decision::key_hash(&self.key))
    }
}

/// A fresh well-formed key: `m3o_<43 base62>_<checksum>`, as the operator issues them.
pub fn new_key() -> String {
    let random = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        &uuid::Uuid::new_v4().simple().to_string()[..11]
    );
    let body = format!("m3o_{random}");
    let sum = m3o_gateway::decision::key_checksum(&body);
    format!("{body}_{sum}")
}

/// Waits until the replica has applied etcd revision `revision`.
pub async fn wait_applied(gateway: &Gateway, revision: i64) {
    eventually(
        &format!("the gateway to apply revision {revision}"),
        Duration::from_secs(30),
        || async { (gateway.index.revision() >= revision).then_some(()) },
    )
    .await;
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Lowercase names.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// GET `path` on `addr` with `headers` (HTTP/1.0, connection closed after).
pub async fn request(addr: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let headers: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    request_bytes(addr, path.as_bytes(), &headers).await
}

/// GET with raw bytes in the request line and header values (what an attacker sends).
pub async fn request_bytes(addr: &str, path: &[u8], headers: &[(&str, &[u8])]) -> Reply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let mut head = b"GET ".to_vec();
    head.extend_from_slice(path);
    head.extend_from_slice(format!(" HTTP/1.0\r\nHost: {addr}\r\n").as_bytes());
    for (k, v) in headers {
        head.extend_from_slice(k.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    stream.write_all(&head).await.expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read response");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// A forward-auth check sent straight to a gateway, as nginx sends it.
pub async fn check(gateway: &Gateway, key: &str, path: &str) -> Reply {
    let auth = format!("Bearer {key}");
    request(
        &gateway.addr.to_string(),
        "/auth",
        &[("Authorization", &auth), ("X-Original-URI", path)],
    )
    .await
}

/// A tiny upstream API that answers every path with the identity headers it received,
/// as JSON; returns its port.
pub async fn start_upstream() -> u16 {
    use axum::http::HeaderMap;
    let app = axum::Router::new().fallback(|headers: HeaderMap| async move {
        let get = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        serde_json::json!({
            "customerId": get("x-m3o-customer-id"),
            "keyId": get("x-m3o-key-id"),
        })
        .to_string()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let port = listener.local_addr().expect("upstream addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

/// Request lines (raw bytes, as received) an upstream has seen.
pub type Seen = std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// An upstream that records the raw request line of everything it receives, whatever
/// bytes it holds (an HTTP library would refuse a raw byte with its own 400, which a
/// test could not tell from the gateway's), and answers 200.
pub async fn start_recording_upstream() -> (u16, Seen) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let seen = Seen::default();
    let record = seen.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let port = listener.local_addr().expect("upstream addr").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
                record
                    .lock()
                    .expect("seen")
                    .push(line.strip_suffix(b"\r").unwrap_or(line).to_vec());
                let body = "{}";
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    (port, seen)
}

/// A redis-server of a test's own that it can hang (SIGSTOP) and resume (SIGCONT): a
/// Redis that accepts connections and answers nothing, as a hung one does.
pub struct StoppableRedis {
    child: tokio::process::Child,
    pub port: u16,
}

impl StoppableRedis {
    pub async fn start() -> Self {
        let port = super::free_port();
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("redis-stop-{port}"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (install redis-server; `make test` does)");
        let redis = Self { child, port };
        let client = redis::Client::open(redis.url()).expect("redis url");
        super::wait_redis_answers(
            "stoppable redis to answer",
            Duration::from_secs(10),
            &client,
        )
        .await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("redis-server is running");
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// SIGSTOP: connections stay open, nothing is answered.
    pub fn hang(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        let client = redis::Client::open(self.url()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("GET")
    }
}

impl Drop for StoppableRedis {
    fn drop(&mut self) {
        // A stopped process ignores SIGKILL until continued on some systems: continue first.
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }
}

/// A TCP proxy that can hold what clients send (and let it through later), counting
/// the bytes it received: a test knows a request has been sent, and it waits.
pub struct HoldProxy {
    pub port: u16,
    held: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl HoldProxy {
    pub async fn start(upstream: String) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let held = std::sync::Arc::new(tokio::sync::watch::Sender::new(false));
        let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (hold, count) = (held.clone(), received.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
                let (mut hold, count) = (hold.subscribe(), count.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        count.fetch_add(n as u64, Ordering::SeqCst);
                        if hold.wait_for(|held| !held).await.is_err() {
                            return;
                        }
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            port,
            held,
            received,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    pub fn release(&self) {
        self.held.send_replace(false);
    }

    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A keep-alive connection sending raw forward-auth checks, each for the next key of a
/// fixed pseudo-random walk over `keys` (from `seed`), for load tests and benches.
pub struct CheckLoop {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    keys: std::sync::Arc<Vec<String>>,
    step: usize,
}

impl CheckLoop {
    pub async fn connect(addr: &str, keys: std::sync::Arc<Vec<String>>, seed: usize) -> Self {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect gateway");
        Self {
            stream,
            buf: vec![0u8; 4096],
            keys,
            step: seed,
        }
    }

    /// Sends one check of `/v1/helloworld/Call` and reads its whole response (headers,
    /// then Content-Length bytes of body); returns its status.
    pub async fn next(&mut self) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.step = self
            .step
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let key = &self.keys[(self.step >> 33) % self.keys.len()];
        let request = format!(
            "GET /auth HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nX-Original-URI: /v1/helloworld/Call\r\n\r\n"
        );
        self.stream
            .write_all(request.as_bytes())
            .await
            .expect("send");
        let mut have = 0;
        let (status, total) = loop {
            let n = self.stream.read(&mut self.buf[have..]).await.expect("read");
            assert!(n > 0, "gateway closed the connection");
            have += n;
            let text = String::from_utf8_lossy(&self.buf[..have]);
            if let Some(end) = text.find("\r\n\r\n") {
                let status: u16 = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                break (status, end + 4 + length);
            }
        };
        while have < total {
            have += self
                .stream
                .read(&mut self.buf[have..])
                .await
                .expect("read body");
        }
        status
    }
}
