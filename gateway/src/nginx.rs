//! nginx configuration for `auth_request` against m3o-gateway-auth: what
//! `m3o-gateway-auth nginx-config` prints, docs/gateway.md shows, and the end-to-end
//! test and the demo run.

/// Request headers a client could set that a check could read as the original URI:
/// the subrequest clears them all (an empty value drops the header), then sets
/// `X-Original-URI` itself. Authorization and X-Api-Key are the client's to send.
pub const CLEARED_HEADERS: &[&str] = &[
    "X-Forwarded-Uri",
    "X-Forwarded-Prefix",
    "X-Forwarded-Path",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Envoy-Original-Path",
];

/// The `http {}` body: a server on `listen` proxying to `upstream` (host:port), asking
/// the `auth` replicas (host:port each) about every request. auth_request passes a 401
/// or 403 on as is and turns any other non-2xx status into a 500, which is mapped back
/// to 400 (an unreadable URI), 429 (with Retry-After) or 503. Run the replicas with
/// `--uri-source=nginx` (the default).
pub fn site(listen: &str, auth: &[String], upstream: &str) -> String {
    let servers: String = auth.iter().map(|a| format!("    server {a};\n")).collect();
    let cleared: String = CLEARED_HEADERS
        .iter()
        .map(|h| format!("      proxy_set_header {h} \"\";\n"))
        .collect();
    format!(
        r#"
  upstream m3o_gateway_auth {{
{servers}    keepalive 16;
  }}
  upstream api {{
    server {upstream};
  }}
  server {{
    listen {listen};
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
      # The original URI, as the client sent it, from nginx and nowhere else.
      proxy_set_header X-Original-URI $request_uri;
{cleared}      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
    location @m3o_auth_error {{
      add_header Retry-After $m3o_retry_after always;
      add_header RateLimit-Limit $m3o_rl_limit always;
      add_header RateLimit-Remaining $m3o_rl_remaining always;
      add_header RateLimit-Reset $m3o_rl_reset always;
      if ($m3o_status = 400) {{
        return 400 "bad request\n";
      }}
      if ($m3o_status = 429) {{
        return 429 "too many requests\n";
      }}
      return 503 "authentication unavailable\n";
    }}
  }}
"#
    )
}

/// A whole nginx.conf for `nginx -p <dir> -c <dir>/nginx.conf` in the foreground, with
/// its pid, logs and temporary files under `dir`.
pub fn standalone(dir: &str, site: &str) -> String {
    format!(
        "daemon off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir}/tmp/body;\n  proxy_temp_path {dir}/tmp/proxy;\n  \
         fastcgi_temp_path {dir}/tmp/fastcgi;\n  uwsgi_temp_path {dir}/tmp/uwsgi;\n  scgi_temp_path {dir}/tmp/scgi;\n{site}}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_replica_is_an_upstream_server() {
        let site = site("127.0.0.1:8000", &["a:1".into(), "b:2".into()], "api:80");
        assert!(site.contains("server a:1;") && site.contains("server b:2;"));
        assert!(site.contains("listen 127.0.0.1:8000;") && site.contains("server api:80;"));
        assert!(standalone("/d", &site).contains("pid /d/nginx.pid;"));
    }

    #[test]
    fn the_check_gets_the_uri_from_nginx_only() {
        let site = site("127.0.0.1:8000", &["a:1".into()], "api:80");
        assert!(site.contains("proxy_set_header X-Original-URI $request_uri;"));
        // Traefik's header, which a client could otherwise send through nginx.
        assert!(site.contains("proxy_set_header X-Forwarded-Uri \"\";"));
        for h in CLEARED_HEADERS {
            assert!(site.contains(&format!("proxy_set_header {h} \"\";")), "{h}");
        }
        assert!(site.contains("if ($m3o_status = 400)"));
    }
}
