//! Reading what gateway replicas report under `<prefix>/gateways/` (each under its own
//! lease, so only live replicas are listed): the etcd revision each has applied.

use etcd_client::{GetOptions, WatchOptions, WatchStream};
use m3o_platform_contract::GatewayReport;
use m3o_platform_contract::keys::GATEWAY_REPORTS;

use super::PlatformConfig;

/// The applied revision in a report; an unreadable report counts as nothing applied.
pub fn applied_revision(value: &[u8]) -> i64 {
    serde_json::from_slice::<GatewayReport>(value).map_or(0, |r| r.applied_revision)
}

impl PlatformConfig {
    /// The applied revision of every live gateway replica.
    pub async fn gateway_reports(&self) -> Result<Vec<i64>, etcd_client::Error> {
        let resp = self
            .client()
            .kv_client()
            .get(
                self.key(GATEWAY_REPORTS),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| applied_revision(kv.value()))
            .collect())
    }

    /// The revision at which `key` was last written, if it exists.
    pub async fn mod_revision(&self, key: &str) -> Result<Option<i64>, etcd_client::Error> {
        let resp = self.client().kv_client().get(key, None).await?;
        Ok(resp.kvs().first().map(|kv| kv.mod_revision()))
    }

    /// A watch on the replicas' reports (registrations, updates, departures).
    pub async fn watch_gateway_reports(&self) -> Result<WatchStream, etcd_client::Error> {
        self.client()
            .watch(
                self.key(GATEWAY_REPORTS),
                Some(WatchOptions::new().with_prefix()),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_parse_and_unreadable_ones_count_as_nothing_applied() {
        assert_eq!(applied_revision(br#"{"appliedRevision":42}"#), 42);
        assert_eq!(applied_revision(b"junk"), 0);
    }
}
