//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it: only the
//! holder reconciles and relays events. A candidate judges expiry by when it last saw
//! the lease change on its own clock (immune to clock skew); the holder gives up
//! after `renew_deadline` without a successful renewal, which is shorter than the
//! lease duration, so it stops writing before anyone else may start. The lease says
//! who should lead; the writer fence (`crate::fence`) makes sure that only one
//! process writes, whatever the lease says.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct ElectionConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub timing: Timing,
}

/// Lease timing, shared by the Lease and the writer fence's heartbeat.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Another replica takes over once the holder has not renewed for this long.
    pub lease: Duration,
    /// The holder stops working when it could not renew for this long (< lease).
    pub renew_deadline: Duration,
    /// Renewal (and retry) period.
    pub retry_period: Duration,
}

impl Renew for Elector {
    const WHAT: &'static str = "the leader lease";

    async fn renew(&mut self) -> Result<bool, String> {
        self.try_acquire_or_renew().await.map_err(|e| e.to_string())
    }
}

/// How holding the lease ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown was requested; the lease was released for a standby to take at once.
    Shutdown,
    /// Renewal failed for longer than the renew deadline, or another holder took over.
    Lost,
}

/// Something held by renewing it: the lease, the writer fence's heartbeat.
pub trait Renew {
    /// What is renewed, for logs.
    const WHAT: &'static str;
    /// One attempt: `Ok(true)` renewed, `Ok(false)` someone else holds it now.
    async fn renew(&mut self) -> Result<bool, String>;
}

/// Renews `held` every `period` until shutdown or loss. Loss is declared when another
/// holder is found, or no later than `deadline` after the last successful renewal:
/// waits and attempts are cut to the time left.
pub async fn hold<R: Renew>(
    held: &mut R,
    deadline: Duration,
    period: Duration,
    shutdown: &CancellationToken,
) -> Ended {
    let mut last_renewed = Instant::now();
    loop {
        let left = deadline.saturating_sub(last_renewed.elapsed());
        if left.is_zero() {
            tracing::error!(what = R::WHAT, "could not renew in time");
            return Ended::Lost;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ended::Shutdown,
            _ = tokio::time::sleep(period.min(left)) => {}
        }
        let left = deadline.saturating_sub(last_renewed.elapsed());
        match tokio::time::timeout(period.min(left), held.renew()).await {
            Ok(Ok(true)) => last_renewed = Instant::now(),
            Ok(Ok(false)) => {
                tracing::error!(what = R::WHAT, "another replica holds it now");
                return Ended::Lost;
            }
            Ok(Err(err)) => tracing::warn!(%err, what = R::WHAT, "renewal failed"),
            Err(_) => tracing::warn!(what = R::WHAT, "renewal timed out"),
        }
    }
}

pub struct Elector {
    api: Api<Lease>,
    config: ElectionConfig,
    /// The lease record last seen (holder, renew time) and when, on our clock.
    observed: Option<(String, Option<MicroTime>, Instant)>,
}

impl Elector {
    pub fn new(client: kube::Client, config: ElectionConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    /// Campaigns until this process holds the lease; false if shutdown came first.
    pub async fn acquire(&mut self, shutdown: &CancellationToken) -> bool {
        let mut logged = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(lease = %self.config.name, identity = %self.config.identity, "became the leader");
                    return true;
                }
                Ok(false) if !logged => {
                    let holder = self
                        .observed
                        .as_ref()
                        .map(|o| o.0.clone())
                        .unwrap_or_default();
                    tracing::info!(lease = %self.config.name, %holder, "standing by: another replica is the leader");
                    logged = true;
                }
                Ok(false) => {}
                Err(err) => tracing::warn!(%err, "leader election: cannot read or write the lease"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(self.config.timing.retry_period) => {}
            }
        }
    }

    /// Renews the lease every retry period until shutdown or loss (see [`hold`]). On
    /// shutdown the lease is kept: the caller stops its work first and then calls
    /// [`Elector::release`].
    pub async fn hold(&mut self, shutdown: &CancellationToken) -> Ended {
        let (deadline, period) = (
            self.config.timing.renew_deadline,
            self.config.timing.retry_period,
        );
        hold(self, deadline, period, shutdown).await
    }

    /// One attempt: create, take over an expired lease, or renew our own. True when we hold it.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let duration_secs = i32::try_from(self.config.timing.lease.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let mut lease = Lease::default();
            lease.metadata.name = Some(self.config.name.clone());
            lease.spec = Some(LeaseSpec {
                holder_identity: Some(self.config.identity.clone()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            });
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let record = (holder.clone(), spec.renew_time.clone());
        if self
            .observed
            .as_ref()
            .is_none_or(|(h, r, _)| (h, r) != (&record.0, &record.1))
        {
            self.observed = Some((record.0, record.1, Instant::now()));
        }
        let theirs = !holder.is_empty() && holder != self.config.identity;
        let their_duration = spec
            .lease_duration_seconds
            .map_or(self.config.timing.lease, |s| {
                Duration::from_secs(s.max(1) as u64)
            });
        let expired = self
            .observed
            .as_ref()
            .is_some_and(|(_, _, seen)| seen.elapsed() > their_duration);
        if theirs && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(duration_secs),
            acquire_time: if holder == self.config.identity {
                spec.acquire_time
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if holder == self.config.identity {
                transitions
            } else {
                transitions + 1
            }),
            ..spec
        });
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up so a standby takes over without waiting for expiry. Call it
    /// only after this replica has stopped writing.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.config.name, "released the lease"),
            Err(err) => {
                tracing::warn!(%err, "could not release the lease; a standby takes over when it expires")
            }
        }
    }
}
