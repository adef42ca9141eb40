//! etcd: https with client certificates, auth enabled, a role per user.

use etcd_client::Permission;
use tokio::process::Child;

use super::{GATEWAY_USER, OPERATOR_USER, STARTUP, Servers, connect_etcd, log_file};
use crate::support::private_etcd::etcd_command;
use crate::support::{eventually, free_port};

impl Servers {
    // --- etcd: https with client certificates, auth enabled, a role per prefix.

    pub(super) fn start_etcd(&self) -> Child {
        let client = format!("https://127.0.0.1:{}", self.etcd_port);
        let peer = format!("http://127.0.0.1:{}", free_port());
        etcd_command(&self.dir.join("etcd"), &client, &peer)
            .args(["--cert-file", &self.file("server.crt")])
            .args(["--key-file", &self.file("server.key")])
            .args([
                "--trusted-ca-file",
                &self.file("ca.crt"),
                "--client-cert-auth",
            ])
            .stderr(log_file(&self.dir, "etcd"))
            .kill_on_drop(true)
            .spawn()
            .expect("etcd (on PATH inside hack/env.sh)")
    }

    /// Root, and the operator's role: read-write on the prefixes `<prefix>/` and
    /// `<prefix>.writer-epoch` (the writer-fence keys, one per shard) (README: etcd
    /// grants); then auth on.
    pub(super) async fn setup_etcd(&self, prefix: &str) -> etcd_client::Client {
        let mut anonymous = self.etcd_args(prefix, "");
        anonymous.etcd_password = None;
        let mut etcd = eventually("private etcd (TLS)", STARTUP, || async {
            let mut client = connect_etcd(&anonymous).await.ok()?;
            client.status().await.ok().map(|_| client)
        })
        .await;
        etcd.user_add("root", self.password.clone(), None)
            .await
            .expect("root");
        etcd.user_grant_role("root", "root")
            .await
            .expect("root role");
        let operator = [
            Permission::read_write(format!("{prefix}/")).with_prefix(),
            Permission::read_write(m3o_platform_contract::keys::writer_epoch_key(prefix, ""))
                .with_prefix(),
        ];
        add_user(&mut etcd, OPERATOR_USER, &self.password, operator).await;
        let gateway = [
            Permission::read(format!("{prefix}/")).with_prefix(),
            Permission::read_write(format!(
                "{prefix}/{}",
                m3o_platform_contract::keys::GATEWAY_REPORTS
            ))
            .with_prefix(),
        ];
        add_user(&mut etcd, GATEWAY_USER, &self.password, gateway).await;
        etcd.auth_enable().await.expect("auth enable");
        connect_etcd(&self.etcd_args(prefix, "root"))
            .await
            .expect("etcd as root")
    }
}

/// A user with a role of the same name holding `permissions`.
async fn add_user(
    etcd: &mut etcd_client::Client,
    name: &str,
    password: &str,
    permissions: impl IntoIterator<Item = Permission>,
) {
    etcd.role_add(name).await.expect("role");
    for permission in permissions {
        etcd.role_grant_permission(name, permission)
            .await
            .expect("grant");
    }
    etcd.user_add(name, password, None).await.expect("user");
    etcd.user_grant_role(name, name).await.expect("user role");
}
