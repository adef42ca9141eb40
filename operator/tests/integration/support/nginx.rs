//! A real nginx (Debian's nginx-light) in front of an upstream, asking gateway
//! replicas with `auth_request`, configured as `m3o-gateway-auth nginx-config` prints.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{eventually, free_port};

const NGINX: &str = "/usr/sbin/nginx";

/// An nginx child process with its own prefix, config, pid and temp dirs.
pub struct Nginx {
    _child: Child,
    pub port: u16,
}

impl Nginx {
    /// nginx on a free loopback port, in front of `upstream`, asking the `auth` ports.
    pub async fn start(auth: &[u16], upstream: u16) -> Self {
        let port = free_port();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("nginx-{port}"));
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
        let auth: Vec<String> = auth.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let site = m3o_gateway::nginx::site(
            &format!("127.0.0.1:{port}"),
            &auth,
            &format!("127.0.0.1:{upstream}"),
        );
        let conf = dir.join("nginx.conf");
        let config = m3o_gateway::nginx::standalone(&dir.display().to_string(), &site);
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
