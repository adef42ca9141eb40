//! Batches of Customers for crash and failover tests, and the "nothing lost, nothing
//! duplicated" check on all four sides.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use super::{TestEnv, dedupe, eventually};

impl TestEnv {
    /// Applies `n` Customers named `<prefix>-NNN`, 16 requests in flight.
    pub async fn apply_customer_batch(&self, prefix: &str, n: usize) {
        futures::stream::iter(0..n)
            .for_each_concurrent(16, |i| async move {
                let name = format!("{prefix}-{i:03}");
                self.apply_customer(&name, json!({"email": format!("{name}@example.com")}))
                    .await;
            })
            .await;
    }

    /// Waits until `n` Customers of this test are Ready.
    pub async fn wait_customers_ready(&self, n: usize, timeout: Duration) {
        eventually(&format!("{n} customers Ready"), timeout, || async {
            let list = self.customers().list(&Default::default()).await.ok()?;
            let ready = list.items.iter().filter(|c| {
                c.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            });
            (ready.count() == n).then_some(())
        })
        .await;
    }

    /// `n` live rows, exactly one Created event per customer (by distinct event id, in
    /// the outbox and on the stream), and `n` etcd keys.
    pub async fn assert_each_customer_created_once(&self, n: usize) {
        let count = |sql: &'static str| async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&self.db)
                .await
                .expect("count")
        };
        assert_eq!(
            count("SELECT count(*) FROM customers WHERE deleted_at IS NULL").await,
            n as i64,
            "rows"
        );
        let created =
            count("SELECT count(*) FROM outbox WHERE event_type = 'EventTypeCreated'").await;
        assert_eq!(
            created, n as i64,
            "one Created event per customer in the outbox"
        );
        let events = eventually("all events published", Duration::from_secs(60), || async {
            let events = dedupe(self.stream_events().await);
            (events.len() >= n).then_some(events)
        })
        .await;
        assert_eq!(events.len(), n, "{n} distinct event ids on the stream");
        let mut per_customer: HashMap<String, usize> = HashMap::new();
        for e in &events {
            assert_eq!(e.event_type, "EventTypeCreated");
            let id = e
                .event
                .customer
                .as_ref()
                .map(|c| c.id.clone())
                .unwrap_or_default();
            *per_customer.entry(id).or_default() += 1;
        }
        assert_eq!(per_customer.len(), n);
        assert!(
            per_customer.values().all(|c| *c == 1),
            "no customer announced twice"
        );
        assert_eq!(self.etcd_keys().await.len(), n, "{n} etcd keys");
    }
}
