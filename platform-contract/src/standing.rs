//! What a gateway must do with a key: the one derivation of a key's standing from the
//! key and its customer. The operator uses it to publish the key's entry and its state
//! (from the Postgres rows), the gateway to decide a request (from the entries it
//! read), so the two always agree.
//!
//! Precedence, first match wins: revoked (or past its rotation's grace) -> customer gone
//! -> expired -> customer banned -> blocked -> a state this version does not know ->
//! accepted. A banned customer's keys are published `blocked` (never `active`, for any
//! reader that only looks at the key), and a gateway that also reads the customer
//! answers 403 `customer_banned` for them, as docs/gateway.md says.

use crate::values::KeyStatus;

/// What is known of a key. `T` is a point in time (the operator's timestamps, the
/// gateway's unix seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyFacts<T> {
    /// Revoked for good (deleted, rotated out with no grace left, revoked by hand).
    pub revoked: bool,
    /// Blocked by the key's own spec or record (`blocked: true`, or a published `blocked`).
    pub blocked: bool,
    /// Recorded or published as expired.
    pub expired: bool,
    /// Its state is one this version does not know: never accepted.
    pub unknown: bool,
    pub expires_at: Option<T>,
    /// The end of a rotated-out key's grace period.
    pub grace_until: Option<T>,
}

impl<T> Default for KeyFacts<T> {
    fn default() -> Self {
        Self {
            revoked: false,
            blocked: false,
            expired: false,
            unknown: false,
            expires_at: None,
            grace_until: None,
        }
    }
}

impl<T: Ord + Copy> KeyFacts<T> {
    /// The facts of a published status (what a gateway reads).
    pub fn published(status: KeyStatus, expires_at: Option<T>) -> Self {
        Self {
            blocked: status == KeyStatus::Blocked,
            expired: status == KeyStatus::Expired,
            unknown: status == KeyStatus::Other,
            expires_at,
            ..Self::default()
        }
    }

    /// When the key stops working by the clock: its expiry, or its grace end if sooner.
    pub fn ends_at(&self) -> Option<T> {
        match (self.expires_at, self.grace_until) {
            (Some(e), Some(g)) => Some(e.min(g)),
            (e, g) => e.or(g),
        }
    }
}

/// The key's customer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// Deleted, or unknown to the reader.
    Gone,
    Live,
    Banned,
}

/// What a gateway must do with a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Authenticates requests (scopes and limits still apply).
    Accepted,
    /// 401: past its expiry (or its grace end).
    Expired,
    /// 403 `customer_banned`: the customer is banned.
    CustomerBanned,
    /// 401: blocked.
    Blocked,
    /// 401: a state this version does not know.
    Inactive,
    /// No entry at all: revoked, or rotated out past its grace.
    Revoked,
    /// No entry at all: its customer is gone.
    CustomerGone,
}

impl Standing {
    /// The status its entry is published with; `None` when it has no entry, or when
    /// the recorded state is unknown (passed on as recorded).
    pub fn published_status(self) -> Option<KeyStatus> {
        match self {
            Self::Accepted => Some(KeyStatus::Active),
            Self::Expired => Some(KeyStatus::Expired),
            Self::CustomerBanned | Self::Blocked => Some(KeyStatus::Blocked),
            Self::Inactive => Some(KeyStatus::Other),
            Self::Revoked | Self::CustomerGone => None,
        }
    }

    /// True when the key has an entry under the prefix.
    pub fn has_entry(self) -> bool {
        !matches!(self, Self::Revoked | Self::CustomerGone)
    }
}

/// The standing of `key`, whose customer is `owner`, at `now`.
pub fn standing<T: Ord + Copy>(key: &KeyFacts<T>, owner: Owner, now: T) -> Standing {
    if key.revoked || key.grace_until.is_some_and(|g| g <= now) {
        Standing::Revoked
    } else if owner == Owner::Gone {
        Standing::CustomerGone
    } else if key.expired || key.ends_at().is_some_and(|t| t <= now) {
        Standing::Expired
    } else if owner == Owner::Banned {
        Standing::CustomerBanned
    } else if key.blocked {
        Standing::Blocked
    } else if key.unknown {
        Standing::Inactive
    } else {
        Standing::Accepted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> KeyFacts<i64> {
        KeyFacts::default()
    }

    #[test]
    fn precedence() {
        let now = 100;
        assert_eq!(standing(&facts(), Owner::Live, now), Standing::Accepted);
        let revoked = KeyFacts {
            revoked: true,
            ..facts()
        };
        assert_eq!(standing(&revoked, Owner::Banned, now), Standing::Revoked);
        let grace_over = KeyFacts {
            grace_until: Some(now),
            ..facts()
        };
        assert_eq!(standing(&grace_over, Owner::Live, now), Standing::Revoked);
        assert_eq!(standing(&facts(), Owner::Gone, now), Standing::CustomerGone);
        let expired = KeyFacts {
            expires_at: Some(now),
            blocked: true,
            ..facts()
        };
        assert_eq!(standing(&expired, Owner::Banned, now), Standing::Expired);
        let blocked = KeyFacts {
            blocked: true,
            ..facts()
        };
        assert_eq!(
            standing(&blocked, Owner::Banned, now),
            Standing::CustomerBanned
        );
        assert_eq!(standing(&blocked, Owner::Live, now), Standing::Blocked);
        let unknown = KeyFacts {
            unknown: true,
            ..facts()
        };
        assert_eq!(standing(&unknown, Owner::Live, now), Standing::Inactive);
    }

    #[test]
    fn a_grace_end_before_the_expiry_is_when_the_key_stops() {
        let key = KeyFacts {
            expires_at: Some(500),
            grace_until: Some(200),
            ..facts()
        };
        assert_eq!(key.ends_at(), Some(200));
        assert_eq!(standing(&key, Owner::Live, 150), Standing::Accepted);
        assert_eq!(standing(&key, Owner::Live, 200), Standing::Revoked);
    }

    #[test]
    fn a_banned_customers_key_is_published_blocked_and_refused_as_banned() {
        // What the operator publishes for an active key of a banned customer...
        let published = standing(&facts(), Owner::Banned, 0).published_status();
        assert_eq!(published, Some(KeyStatus::Blocked));
        // ...is, read back by a gateway that sees the customer banned, a ban (403).
        let read = KeyFacts::published(KeyStatus::Blocked, None);
        assert_eq!(standing(&read, Owner::Banned, 0), Standing::CustomerBanned);
    }

    #[test]
    fn what_the_operator_publishes_a_gateway_reads_back_alike() {
        // Property over every combination: publish from record facts, read the
        // published facts back, and the gateway's standing equals the operator's.
        for bits in 0..64u32 {
            let record = KeyFacts {
                revoked: bits & 1 != 0,
                blocked: bits & 2 != 0,
                expired: bits & 4 != 0,
                unknown: bits & 8 != 0,
                expires_at: (bits & 16 != 0).then_some(10),
                grace_until: (bits & 32 != 0).then_some(20),
            };
            for owner in [Owner::Gone, Owner::Live, Owner::Banned] {
                for now in [5, 15, 25] {
                    let at_operator = standing(&record, owner, now);
                    let Some(status) = at_operator.published_status() else {
                        continue;
                    };
                    let read = KeyFacts::published(status, record.ends_at());
                    assert_eq!(
                        standing(&read, owner, now),
                        at_operator,
                        "{record:?} {owner:?} {now}"
                    );
                }
            }
        }
    }
}
