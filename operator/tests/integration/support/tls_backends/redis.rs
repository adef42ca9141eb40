//! Redis: TLS only, client certificates required, the default user off, the
//! operator's and the gateway's ACL users (README: Secure connections).

use tokio::process::{Child, Command};

use super::{GATEWAY_COMMANDS, GATEWAY_USER, OPERATOR_USER, STARTUP, Servers, log_file};
use crate::support::wait_redis_answers;

impl Servers {
    // --- Redis: TLS only, client certificates required, default user off.

    pub(super) fn start_redis(&self, stream_prefix: &str) -> Child {
        let config = format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\n\
             tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {ca}\n\
             tls-auth-clients yes\nsave \"\"\nappendonly no\ndir {dir}\n\
             user default off\n\
             user admin on >{pw} ~* &* +@all\n\
             user {OPERATOR_USER} on >{pw} resetkeys ~{stream_prefix}* resetchannels -@all \
             +ping +xadd +multi +exec +xinfo|groups \
             ~{stream_prefix}gw:usage:* +scan +hgetall +expire\n\
             user {GATEWAY_USER} on >{pw} resetkeys ~{stream_prefix}gw:* resetchannels -@all \
             {GATEWAY_COMMANDS}\n",
            port = self.redis_port,
            cert = self.file("server.crt"),
            key = self.file("server.key"),
            ca = self.file("ca.crt"),
            dir = self.dir.display(),
            pw = self.password,
        );
        let path = self.dir.join("redis.conf");
        std::fs::write(&path, config).expect("redis.conf");
        Command::new("redis-server")
            .arg(&path)
            .stdout(log_file(&self.dir, "redis"))
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (install redis-server; `make test` does)")
    }

    pub(super) async fn wait_redis(&self) -> redis::Client {
        let client = self
            .redis_args("admin")
            .client()
            .expect("admin redis client");
        wait_redis_answers("private redis (TLS)", STARTUP, &client).await;
        client
    }
}
