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
            "127.0.0.1:0".into(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--replica-id".into(),
            format!("test-{}", super::suffix()),
        ];
        args.extend(config.extra_args.iter().cloned());
        let cli = Cli::try_parse_from(args).expect("gateway flags");
        let gateway = m3o_gateway::start(cli.run).await.expect("start gateway");
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let mut head = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send request");
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
