//! A real nginx (Debian's nginx-light) in front of an upstream, asking gateway
//! replicas with `auth_request`: the configuration documented in docs/gateway.md.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{eventually, free_port};

const NGINX: &str = "/usr/sbin/nginx";

/// The `http {}` body shared with docs/gateway.md: `auth` lists the gateway replicas.
pub fn site_config(listen: u16, auth: &[u16], upstream: u16) -> String {
    let servers: String = auth
        .iter()
        .map(|p| format!("    server 127.0.0.1:{p};\n"))
        .collect();
    format!(
        r#"
  upstream m3o_gateway_auth {{
{servers}    keepalive 16;
  }}
  upstream api {{
    server 127.0.0.1:{upstream};
  }}
  server {{
    listen 127.0.0.1:{listen};
    location / {{
      auth_request /_m3o_auth;
      auth_request_set $m3o_customer $upstream_http_x_m3o_customer_id;
      auth_request_set $m3o_key $upstream_http_x_m3o_key_id;
      auth_request_set $m3o_status $upstream_status;
      auth_request_set $m3o_retry_after $upstream_http_retry_after;
      auth_request_set $m3o_rl_limit $upstream_http_ratelimit_limit;
      auth_request_set $m3o_rl_remaining $upstream_http_ratelimit_remaining;
      auth_request_set $m3o_rl_reset $upstream_http_ratelimit_reset;
      proxy_set_header X-M3O-Customer-Id $m3o_customer;
      proxy_set_header X-M3O-Key-Id $m3o_key;
      add_header RateLimit-Limit $m3o_rl_limit always;
      add_header RateLimit-Remaining $m3o_rl_remaining always;
      add_header RateLimit-Reset $m3o_rl_reset always;
      # auth_request passes 401 and 403 on; any other status is a 500, mapped below.
      error_page 500 = @m3o_auth_error;
      proxy_pass http://api;
    }}
    location = /_m3o_auth {{
      internal;
      proxy_pass http://m3o_gateway_auth;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI $request_uri;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
    location @m3o_auth_error {{
      add_header Retry-After $m3o_retry_after always;
      add_header RateLimit-Limit $m3o_rl_limit always;
      add_header RateLimit-Remaining $m3o_rl_remaining always;
      add_header RateLimit-Reset $m3o_rl_reset always;
      if ($m3o_status = 429) {{
        return 429 "too many requests\n";
      }}
      return 503 "authentication unavailable\n";
    }}
  }}
"#
    )
}

/// An nginx child process with its own prefix, config, pid and temp dirs.
pub struct Nginx {
    _child: Child,
    pub port: u16,
}

impl Nginx {
    pub async fn start(auth: &[u16], upstream: u16) -> Self {
        let port = free_port();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("nginx-{port}"));
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
        let d = dir.display();
        let config = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
             fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n{}}}\n",
            site_config(port, auth, upstream)
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).expect("nginx.conf");
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nginx at /usr/sbin/nginx (Debian nginx-light; `make test` installs it)");
        let addr = format!("127.0.0.1:{port}");
        let log = dir.join("error.log");
        eventually(
            &format!("nginx to listen (log: {})", log.display()),
            Duration::from_secs(20),
            || async { tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ()) },
        )
        .await;
        Self {
            _child: child,
            port,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}
