//! Writer terms that disagree between Postgres and etcd (DESIGN section 4, recovery
//! rule): etcd restored from a snapshot, the prefix wiped or `<prefix>.writer-epoch`
//! deleted (etcd behind), or Postgres restored from an older backup (Postgres behind).
//! Postgres holds the term; etcd is re-derived from it. The decisions are pure
//! ([`start_epoch`], [`on_refusal`]); [`Divergence`] is what the rest of the process
//! sees until the prefix has been converged again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

/// The epoch a term just won in Postgres must move to before it is recorded in etcd:
/// `None` when `won` is already above what etcd records, otherwise one above etcd's
/// (so a Postgres restored from an older backup costs one start, not one crash per
/// missing epoch).
pub fn start_epoch(won: i64, etcd: Option<i64>) -> Option<i64> {
    etcd.filter(|&recorded| recorded >= won)
        .map(|recorded| recorded + 1)
}

/// What to do when etcd refused a write of term `mine`.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Postgres says the term is ours and etcd records an older one, or none: write
    /// ours into etcd again and converge the whole prefix.
    Reestablish,
    /// Another task of this process re-established it meanwhile: just retry.
    Retry,
    /// The term is not ours (Postgres has a newer one), or etcd records a newer one
    /// than Postgres: stop writing (a restart begins a term above both).
    Stop,
}

/// The rule for an etcd refusal, from the epoch Postgres records now (`postgres`) and
/// the one etcd records (`etcd`, `None` when the key is missing or unreadable).
pub fn on_refusal(mine: i64, postgres: Option<i64>, etcd: Option<i64>) -> Refusal {
    if mine <= 0 || postgres != Some(mine) {
        return Refusal::Stop;
    }
    match etcd {
        Some(recorded) if recorded == mine => Refusal::Retry,
        Some(recorded) if recorded > mine => Refusal::Stop,
        _ => Refusal::Reestablish,
    }
}

/// A divergence found and not yet healed: shared by the etcd writers (which find it),
/// the drift watcher (which converges the prefix again) and `/readyz` (which fails
/// until then).
#[derive(Default)]
pub struct Divergence {
    /// The divergence being healed (its number and what was found); `None` when healed.
    pending: Mutex<Option<(u64, String)>>,
    found: AtomicU64,
    /// Wakes the drift watcher for a full convergence of the prefix.
    heal: Notify,
    /// `m3o_operator_fence_divergence_total` (unregistered outside the operator).
    counter: Counter,
}

impl Divergence {
    /// Counts into `counter` (the metric).
    pub fn counting(counter: Counter) -> Self {
        Self {
            counter,
            ..Self::default()
        }
    }

    /// Records a divergence (logged as a Warning) and asks for the prefix to be
    /// converged again.
    pub fn found(&self, what: String) {
        tracing::warn!(divergence = %what, "writer term diverged between Postgres and etcd; converging the whole etcd prefix from Postgres");
        self.counter.inc();
        let number = self.found.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(mut pending) = self.pending.lock() {
            *pending = Some((number, what));
        }
        self.heal.notify_one();
    }

    /// What is being healed, for `/readyz`; `None` when nothing is.
    pub fn unhealed(&self) -> Option<String> {
        self.pending
            .lock()
            .ok()
            .and_then(|p| p.as_ref().map(|(_, what)| what.clone()))
    }

    /// The number of the divergence a convergence starting now heals.
    pub fn pending_number(&self) -> Option<u64> {
        self.pending
            .lock()
            .ok()
            .and_then(|p| p.as_ref().map(|(n, _)| *n))
    }

    /// A convergence begun while `number` was pending has completed: healed, unless a
    /// newer divergence was found meanwhile.
    pub fn healed(&self, number: u64) {
        if let Ok(mut pending) = self.pending.lock()
            && pending.as_ref().is_some_and(|(n, _)| *n == number)
        {
            *pending = None;
            tracing::info!("the etcd prefix was converged from Postgres again: healed");
        }
    }

    /// Resolves when a divergence asks for the prefix to be converged again.
    pub async fn heal_requested(&self) {
        self.heal.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_starts_above_both_epochs() {
        assert_eq!(start_epoch(5, None), None, "etcd has none");
        assert_eq!(start_epoch(5, Some(4)), None, "etcd behind");
        assert_eq!(start_epoch(5, Some(5)), Some(6));
        assert_eq!(start_epoch(5, Some(9)), Some(10), "one step, not four");
    }

    #[test]
    fn refusals_heal_only_a_term_postgres_says_is_ours() {
        use Refusal::*;
        assert_eq!(on_refusal(5, Some(5), None), Reestablish, "key deleted");
        assert_eq!(
            on_refusal(5, Some(5), Some(3)),
            Reestablish,
            "etcd restored"
        );
        assert_eq!(on_refusal(5, Some(5), Some(5)), Retry, "healed by another");
        assert_eq!(on_refusal(5, Some(5), Some(7)), Stop, "Postgres behind");
        assert_eq!(on_refusal(5, Some(6), None), Stop, "superseded");
        assert_eq!(on_refusal(5, None, None), Stop);
        assert_eq!(on_refusal(0, Some(0), None), Stop, "not the writer");
    }

    #[test]
    fn healed_only_by_a_convergence_begun_after_the_last_divergence() {
        let d = Divergence::default();
        d.found("first".into());
        let first = d.pending_number().expect("pending");
        d.found("second".into());
        d.healed(first);
        assert_eq!(d.unhealed().as_deref(), Some("second"));
        d.healed(d.pending_number().expect("pending"));
        assert_eq!(d.unhealed(), None);
        assert_eq!(d.counter.get(), 2);
    }
}
