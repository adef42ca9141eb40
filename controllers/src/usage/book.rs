//! What the rollup learnt about each customer's usage this period, shared with the
//! Subscription controller: the value its status should show (`shown`, chosen by
//! [`plan::status_write_due`]) and the trigger that makes it reconcile the
//! Subscription. Status is written by that controller's one SSA field manager, never
//! by the rollup (a second partial apply under the same manager would drop fields).

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use futures::channel::mpsc::UnboundedSender;
use kube::runtime::reflector::ObjectRef;
use m3o_crds::Subscription;
use uuid::Uuid;

use super::plan::{self, UsageView};

/// What status shows for one customer: the view, when it was chosen, its Subscription.
type Shown = (UsageView, DateTime<Utc>, ObjectRef<Subscription>);

#[derive(Default)]
pub struct UsageBook {
    shown: Mutex<HashMap<Uuid, Shown>>,
    trigger: Mutex<Option<UnboundedSender<ObjectRef<Subscription>>>>,
}

impl UsageBook {
    /// The Subscription controller of the current term listens on this sender.
    pub fn set_trigger(&self, sender: UnboundedSender<ObjectRef<Subscription>>) {
        if let Ok(mut t) = self.trigger.lock() {
            *t = Some(sender);
        }
    }

    /// What status should show for `customer`.
    pub fn shown(&self, customer: Uuid) -> Option<UsageView> {
        let shown = self.shown.lock().ok()?;
        shown.get(&customer).map(|(v, _, _)| v.clone())
    }

    /// Records `current`; when status should show it now ([`plan::status_write`],
    /// taking from `budget` unless a band or the period changed), makes it the shown
    /// value and triggers a reconcile of `subscription`. True if triggered.
    pub fn observe(
        &self,
        customer: Uuid,
        current: UsageView,
        subscription: ObjectRef<Subscription>,
        now: DateTime<Utc>,
        interval: std::time::Duration,
        budget: &mut u64,
    ) -> bool {
        let Ok(mut shown) = self.shown.lock() else {
            return false;
        };
        let before = shown.get(&customer).map(|(v, at, _)| (v, *at));
        match plan::status_write(before, &current, now, interval) {
            plan::StatusWrite::No => return false,
            plan::StatusWrite::Budgeted if *budget == 0 => return false,
            plan::StatusWrite::Budgeted => *budget -= 1,
            plan::StatusWrite::Now => {}
        }
        shown.insert(customer, (current, now, subscription.clone()));
        drop(shown);
        self.send(subscription);
        true
    }

    /// Moves customers shown in an older period to `period` with no requests yet (a
    /// customer without usage in the new period has no counters to say so), as
    /// [`plan::status_write`] allows: the rest move at a later rollup.
    pub fn new_period(
        &self,
        period: &str,
        now: DateTime<Utc>,
        interval: std::time::Duration,
        budget: &mut u64,
    ) -> usize {
        let Ok(mut shown) = self.shown.lock() else {
            return 0;
        };
        let mut moved = Vec::new();
        for (view, at, subscription) in shown.values_mut() {
            if view.period == period {
                continue;
            }
            let reset = UsageView {
                period: period.to_owned(),
                requests: 0,
                monthly: view.monthly,
            };
            match plan::status_write(Some((view, *at)), &reset, now, interval) {
                plan::StatusWrite::No => continue,
                plan::StatusWrite::Budgeted if *budget == 0 => continue,
                plan::StatusWrite::Budgeted => *budget -= 1,
                plan::StatusWrite::Now => {}
            }
            *view = reset;
            *at = now;
            moved.push(subscription.clone());
        }
        drop(shown);
        let n = moved.len();
        moved.into_iter().for_each(|s| self.send(s));
        n
    }

    fn send(&self, subscription: ObjectRef<Subscription>) {
        if let Ok(t) = self.trigger.lock()
            && let Some(sender) = t.as_ref()
        {
            let _ = sender.unbounded_send(subscription);
        }
    }
}
