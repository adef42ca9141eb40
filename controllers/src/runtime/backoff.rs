//! Per-object exponential backoff for failed reconciles, shared by every kind.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;

/// Failure counts per object key; a success resets the object.
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
    base: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            failures: Mutex::default(),
            base,
            cap,
        }
    }

    /// Records a failure of `key` and returns how long to wait before retrying:
    /// base * 2^(n-1), capped, with up to 10% jitter so objects failing together spread out.
    pub fn next_delay(&self, key: &str) -> Duration {
        let n = self
            .failures
            .lock()
            .map(|mut f| {
                let n = f.entry(key.to_owned()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            })
            .unwrap_or(1);
        let delay = delay_for(self.base, self.cap, n);
        let jitter = rand::rng().random_range(0.0..0.1);
        delay.mul_f64(1.0 + jitter).min(self.cap)
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn reset(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }
}

/// The un-jittered delay after `n` consecutive failures.
pub fn delay_for(base: Duration, cap: Duration, n: u32) -> Duration {
    let factor = 2u32.saturating_pow(n.saturating_sub(1).min(30));
    base.saturating_mul(factor).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_doubles_up_to_the_cap() {
        let (base, cap) = (Duration::from_millis(500), Duration::from_secs(60));
        assert_eq!(delay_for(base, cap, 1), Duration::from_millis(500));
        assert_eq!(delay_for(base, cap, 2), Duration::from_secs(1));
        assert_eq!(delay_for(base, cap, 4), Duration::from_secs(4));
        assert_eq!(delay_for(base, cap, 100), cap);
    }

    #[test]
    fn success_resets_an_object() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        b.next_delay("a");
        b.next_delay("a");
        assert!(b.next_delay("a") >= Duration::from_secs(4));
        b.reset("a");
        assert!(b.next_delay("a") < Duration::from_secs(2));
        assert!(
            b.next_delay("b") < Duration::from_secs(2),
            "objects are independent"
        );
    }
}
