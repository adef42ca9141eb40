//! What gateway replicas report under `<prefix>/gateways/`, each under its own lease:
//! the etcd revision each has applied and how long it may serve an unconfirmed snapshot
//! (`maxStalenessSeconds`, `staleMode`), followed into the
//! [`super::gateway_roster::Roster`] for `GatewaySynced` (`apikey/gateway_sync.rs`).

use std::time::Instant;

use etcd_client::{GetOptions, WatchOptions, WatchStream};
use m3o_platform_contract::keys::GATEWAY_REPORTS;

use super::PlatformConfig;
use super::gateway_roster::{RosterView, parse_report};

impl PlatformConfig {
    /// The roster of gateway replicas this process follows (`follow_gateway_reports`).
    pub fn gateway_roster(&self) -> RosterView {
        let mut roster = self.roster.lock().unwrap_or_else(|e| e.into_inner());
        roster.view(Instant::now())
    }

    /// Lists every report into the roster; returns the revision of the list.
    pub async fn list_gateway_reports(&self) -> Result<i64, etcd_client::Error> {
        let resp = self
            .client()
            .kv_client()
            .get(
                self.key(GATEWAY_REPORTS),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let reports = resp
            .kvs()
            .iter()
            .filter_map(|kv| Some((self.replica_of(kv.key())?, parse_report(kv.value()))))
            .collect();
        let mut roster = self.roster.lock().unwrap_or_else(|e| e.into_inner());
        roster.listed(reports, Instant::now());
        Ok(revision)
    }

    /// Applies one watch response to the roster; true when it changed anything.
    pub fn note_gateway_reports(&self, response: &etcd_client::WatchResponse) -> bool {
        let now = Instant::now();
        let mut roster = self.roster.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let Some(id) = self.replica_of(kv.key()) else {
                continue;
            };
            match event.event_type() {
                etcd_client::EventType::Put => roster.put(id, parse_report(kv.value())),
                etcd_client::EventType::Delete => roster.gone(&id, now),
            }
            changed = true;
        }
        changed
    }

    /// The replica id of a report key.
    fn replica_of(&self, key: &[u8]) -> Option<String> {
        let relative = std::str::from_utf8(key).ok()?.strip_prefix(&self.key(""))?;
        match m3o_platform_contract::classify(relative) {
            m3o_platform_contract::Slot::GatewayReport(id) => Some(id.to_owned()),
            _ => None,
        }
    }

    /// The revision at which `key` was last written, if it exists.
    pub async fn mod_revision(&self, key: &str) -> Result<Option<i64>, etcd_client::Error> {
        let resp = self.client().kv_client().get(key, None).await?;
        Ok(resp.kvs().first().map(|kv| kv.mod_revision()))
    }

    /// A watch on the replicas' reports (registrations, updates, departures) after
    /// `revision` (a list's), so nothing between the list and the watch is missed.
    pub async fn watch_gateway_reports(
        &self,
        revision: i64,
    ) -> Result<WatchStream, etcd_client::Error> {
        self.client()
            .watch(
                self.key(GATEWAY_REPORTS),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
    }
}
