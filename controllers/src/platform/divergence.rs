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

/// The width of a term as etcd records it ([`epoch_value`]).
const EPOCH_DIGITS: usize = 20;

/// A term as etcd records it: zero-padded, so values compare in the order of terms.
pub fn epoch_value(epoch: i64) -> String {
    format!("{epoch:0EPOCH_DIGITS$}")
}

/// What etcd records in a fence key (`<prefix>.writer-epoch[.<shard>]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// No key (etcd wiped or restored from a snapshot before the term, or deleted).
    Missing,
    /// A term.
    Epoch(i64),
    /// A value that is not a term (a hand edit, a corruption, another tool's value):
    /// shown as read. It cannot be ordered against ours, so nothing overwrites it: etcd
    /// writes are refused until a human fixes or deletes it ([`Refusal::Unreadable`]).
    Unreadable(String),
}

impl Recorded {
    /// Reads a fence key's value.
    pub fn parse(value: Option<&[u8]>) -> Self {
        let Some(value) = value else {
            return Self::Missing;
        };
        let text = String::from_utf8_lossy(value);
        // Only the form the operator writes (20 digits, zero-padded): etcd writes compare
        // the bytes, so a term in any other form ("42" put back by hand) would refuse
        // every write while reading as ours.
        let canonical = value.len() == EPOCH_DIGITS && value.iter().all(u8::is_ascii_digit);
        match text.parse::<i64>() {
            Ok(epoch) if canonical => Self::Epoch(epoch),
            _ => Self::Unreadable(text.chars().take(64).collect()),
        }
    }

    /// The term recorded, if one is.
    pub fn epoch(&self) -> Option<i64> {
        match self {
            Self::Epoch(epoch) => Some(*epoch),
            Self::Missing | Self::Unreadable(_) => None,
        }
    }
}

/// Which database writes the prefix, by the id etcd records beside it
/// (`<prefix>.writer-epoch.database`) and ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// None recorded (etcd wiped, or written only by releases before the id): ours to
    /// record with the term.
    Unclaimed,
    /// Our database.
    Ours,
    /// Another database (its id, as read): a misconfiguration, each database needs its
    /// own `--etcd-prefix`. Never written over.
    Other(String),
}

/// The owner of a prefix from the id etcd records (`recorded`) and ours (`None`: this
/// process does not check, every prefix is ours).
pub fn owner(ours: Option<&str>, recorded: Option<&[u8]>) -> Owner {
    match (ours, recorded) {
        (None, _) => Owner::Ours,
        (Some(_), None) => Owner::Unclaimed,
        (Some(ours), Some(recorded)) if recorded == ours.as_bytes() => Owner::Ours,
        (Some(_), Some(recorded)) => {
            Owner::Other(String::from_utf8_lossy(recorded).chars().take(64).collect())
        }
    }
}

/// The one line that refuses a prefix written by another database.
pub fn foreign_line(prefix: &str, other: &str, ours: &str) -> String {
    format!(
        "etcd prefix {prefix} is written by another database (id {other}; this database is {ours}); each database needs its own --etcd-prefix"
    )
}

/// The line that refuses etcd writes while a fence key holds something else than a term.
pub fn unreadable_line(key: &str, value: &str) -> String {
    format!(
        "etcd key {key} holds {value:?}, which is not a writer term: every etcd write is refused until it is fixed; delete it (the operator then records its term again) or put back the term Postgres records (writer_fence.epoch) as 20 digits, zero-padded (e.g. {})",
        epoch_value(42)
    )
}

/// The epoch a term just won in Postgres must move to before it is recorded in etcd:
/// `None` when `won` is already above what etcd records, otherwise one above etcd's
/// (so a Postgres restored from an older backup costs one start, not one crash per
/// missing epoch).
pub fn start_epoch(won: i64, etcd: Option<i64>) -> Option<i64> {
    etcd.filter(|&recorded| recorded >= won)
        .map(|recorded| recorded + 1)
}

/// How a term just won in Postgres (`won`) is recorded in etcd.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// Record `won` as it is.
    Record,
    /// Raise the term to this epoch first (above the one etcd records), then record it.
    RaiseTo(i64),
    /// The prefix is another database's: refuse, write nothing (its id).
    Foreign(String),
    /// The fence key holds no term: refuse, write nothing (the value read).
    Unreadable(String),
}

/// The rule at the start of a term, from what etcd records.
pub fn on_start(won: i64, etcd: &Recorded, owner: &Owner) -> Start {
    if let Owner::Other(id) = owner {
        return Start::Foreign(id.clone());
    }
    match etcd {
        Recorded::Unreadable(value) => Start::Unreadable(value.clone()),
        recorded => start_epoch(won, recorded.epoch()).map_or(Start::Record, Start::RaiseTo),
    }
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
    /// Another database writes the prefix: stop, write nothing (its id).
    Foreign(String),
    /// The fence key holds no term: refuse this write and every other until a human
    /// fixes it, said once at warn; the process keeps running and heals by itself once
    /// the key is deleted or holds a term again.
    Unreadable(String),
}

/// The rule for an etcd refusal, from the epoch Postgres records now (`postgres`), what
/// etcd records (`etcd`) and the database etcd names (`owner`).
pub fn on_refusal(mine: i64, postgres: Option<i64>, etcd: &Recorded, owner: &Owner) -> Refusal {
    if mine <= 0 || postgres != Some(mine) {
        return Refusal::Stop;
    }
    if let Owner::Other(id) = owner {
        return Refusal::Foreign(id.clone());
    }
    match etcd {
        Recorded::Unreadable(value) => Refusal::Unreadable(value.clone()),
        Recorded::Epoch(recorded) if *recorded == mine && *owner == Owner::Ours => Refusal::Retry,
        Recorded::Epoch(recorded) if *recorded > mine => Refusal::Stop,
        // Missing, behind, or ours with the database id gone: record both again.
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
    /// The last refusal said ([`Self::refusing`]), so each is logged once.
    refused: Mutex<Option<String>>,
    /// Why etcd stopped this process, to be its exit message ([`Self::stop_with`]).
    stop: Mutex<Option<String>>,
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

    /// Records a divergence whose healing starts now (logged as a Warning, counted
    /// once: call it once per divergence, when the term is recorded in etcd again) and
    /// asks for the prefix to be converged again.
    pub fn found(&self, what: String) {
        tracing::warn!(divergence = %what, "writer term diverged between Postgres and etcd; converging the whole etcd prefix from Postgres");
        self.counter.inc();
        let number = self.found.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(mut pending) = self.pending.lock() {
            *pending = Some((number, what));
        }
        self.heal.notify_one();
    }

    /// Records a divergence that is not healed by this process (etcd refuses its writes
    /// and it stops or waits for a human): shown by `/readyz`, neither counted nor
    /// converged. True the first time `what` is recorded in a row, so the caller says it
    /// once instead of at every refused write.
    pub fn refusing(&self, what: String) -> bool {
        let first = self
            .refused
            .lock()
            .map(|mut said| {
                let first = said.as_deref() != Some(what.as_str());
                *said = Some(what.clone());
                first
            })
            .unwrap_or(true);
        let number = self.found.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(mut pending) = self.pending.lock() {
            *pending = Some((number, what));
        }
        first
    }

    /// Records `line` as the reason this process stops (its exit message, said once
    /// there rather than logged here), and shows it on `/readyz` meanwhile.
    pub fn stop_with(&self, line: String) {
        if let Ok(mut stop) = self.stop.lock()
            && stop.is_none()
        {
            *stop = Some(line.clone());
        }
        self.refusing(line);
    }

    /// The reason recorded by [`Self::stop_with`], if any.
    pub fn stopped_by(&self) -> Option<String> {
        self.stop.lock().ok().and_then(|s| s.clone())
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
            if let Ok(mut said) = self.refused.lock() {
                *said = None;
            }
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
        use Recorded::*;
        use Refusal::*;
        let ours = Owner::Ours;
        assert_eq!(
            on_refusal(5, Some(5), &Missing, &ours),
            Reestablish,
            "key deleted"
        );
        assert_eq!(
            on_refusal(5, Some(5), &Epoch(3), &ours),
            Reestablish,
            "etcd restored"
        );
        assert_eq!(
            on_refusal(5, Some(5), &Epoch(5), &ours),
            Retry,
            "healed by another"
        );
        assert_eq!(
            on_refusal(5, Some(5), &Epoch(7), &ours),
            Stop,
            "Postgres behind"
        );
        assert_eq!(on_refusal(5, Some(6), &Missing, &ours), Stop, "superseded");
        assert_eq!(on_refusal(5, None, &Missing, &ours), Stop);
        assert_eq!(
            on_refusal(0, Some(0), &Missing, &ours),
            Stop,
            "not the writer"
        );
    }

    #[test]
    fn a_prefix_of_another_database_is_never_healed() {
        use Recorded::*;
        let other = Owner::Other("b".into());
        for etcd in [
            Missing,
            Epoch(3),
            Epoch(5),
            Epoch(9),
            Unreadable("x".into()),
        ] {
            assert_eq!(
                on_refusal(5, Some(5), &etcd, &other),
                Refusal::Foreign("b".into()),
                "{etcd:?}"
            );
            assert_eq!(on_start(5, &etcd, &other), Start::Foreign("b".into()));
        }
        // A wiped etcd, or one written by releases before the id: ours to record.
        assert_eq!(
            on_refusal(5, Some(5), &Missing, &Owner::Unclaimed),
            Refusal::Reestablish
        );
        assert_eq!(
            on_refusal(5, Some(5), &Epoch(5), &Owner::Unclaimed),
            Refusal::Reestablish,
            "the id deleted: recorded again"
        );
        assert_eq!(on_start(5, &Missing, &Owner::Unclaimed), Start::Record);
        assert_eq!(on_start(5, &Epoch(7), &Owner::Ours), Start::RaiseTo(8));
    }

    #[test]
    fn owners_by_id() {
        assert_eq!(owner(Some("a"), None), Owner::Unclaimed);
        assert_eq!(owner(Some("a"), Some(b"a")), Owner::Ours);
        assert_eq!(owner(Some("a"), Some(b"b")), Owner::Other("b".into()));
        assert_eq!(owner(None, Some(b"b")), Owner::Ours, "unchecked");
        assert_eq!(owner(None, None), Owner::Ours, "unchecked");
        let line = foreign_line("/m3o", "b", "a");
        assert!(line.contains("/m3o") && line.contains("--etcd-prefix") && !line.contains('\n'));
    }

    #[test]
    fn a_fence_value_that_is_no_term_is_refused_not_overwritten() {
        use Recorded::*;
        assert_eq!(Recorded::parse(None), Missing);
        assert_eq!(Recorded::parse(Some(b"00000000000000000042")), Epoch(42));
        for junk in [
            &b"banana"[..],
            b"42",
            b" 7\n",
            b"0042",
            b"",
            b"-3",
            b"+3",
            b"4 2",
            b"\xff\xfe",
            b"99999999999999999999",
        ] {
            let parsed = Recorded::parse(Some(junk));
            assert!(matches!(parsed, Unreadable(_)), "{junk:?}: {parsed:?}");
            assert_eq!(
                on_refusal(5, Some(5), &parsed, &Owner::Ours),
                Refusal::Unreadable(String::from_utf8_lossy(junk).into_owned()),
            );
            assert!(matches!(
                on_start(5, &parsed, &Owner::Ours),
                Start::Unreadable(_)
            ));
        }
        let line = unreadable_line("/m3o.writer-epoch", "banana");
        assert!(
            line.contains("/m3o.writer-epoch") && line.contains("\"banana\""),
            "{line}"
        );
    }

    #[test]
    fn a_refusal_is_said_once_and_not_counted() {
        let d = Divergence::default();
        assert!(d.refusing("x".into()), "said the first time");
        assert!(!d.refusing("x".into()), "not again");
        assert!(d.refusing("y".into()), "a new one is said");
        assert_eq!(d.unhealed().as_deref(), Some("y"), "/readyz shows it");
        assert_eq!(d.counter.get(), 0, "counted only when healing starts");
        d.found("z".into());
        assert_eq!(d.counter.get(), 1);
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
