//! Memory of the gateway's in-memory index per 10,000 keys (with a customer and a quota
//! per 10 keys), counted by the allocator. Prints figures; part of `make bench-gateway`.
//!
//! ```text
//! cargo run --release -p m3o-gateway --example index_memory -- 10000
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use m3o_gateway::decision::key_hash;
use m3o_gateway::index::Index;

/// Live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    // The values as the operator writes them, built before counting.
    let mut values = Vec::with_capacity(n * 2);
    for i in 0..n {
        let customer = uuid::Uuid::new_v4();
        let hash = hex::encode(key_hash(&format!("m3o_bench_{i}")));
        let key = serde_json::json!({
            "keyId": uuid::Uuid::new_v4().to_string(), "customerId": customer.to_string(),
            "scopes": ["helloworld", "weather"], "status": "active",
            "expiresAt": "2099-12-31T23:59:59Z",
        });
        values.push((m3o_platform_contract::apikey_key(&hash), key.to_string()));
        if i % 10 == 0 {
            let c = serde_json::json!({"id": customer.to_string(), "email": format!("c{i}@example.com"), "name": "", "status": "active", "plan": "pro"});
            values.push((m3o_platform_contract::customer_key(customer), c.to_string()));
            let q = serde_json::json!({"plan": "pro", "monthlyRequests": 1_000_000, "requestsPerSecond": 50});
            values.push((m3o_platform_contract::quota_key(customer), q.to_string()));
        }
    }
    let before = LIVE.load(Ordering::Relaxed);
    let mut index = Index::default();
    for (k, v) in &values {
        index.apply(k, Some(v.as_bytes()));
    }
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    let (keys, customers, quotas) = index.sizes();
    println!("index entries:           {keys} keys, {customers} customers, {quotas} quotas");
    println!(
        "index heap:              {:.2} MiB ({} bytes per key)",
        bytes as f64 / (1024.0 * 1024.0),
        bytes / keys.max(1) as isize
    );
    println!(
        "per 10,000 keys:         {:.2} MiB",
        bytes as f64 * 10_000.0 / keys.max(1) as f64 / (1024.0 * 1024.0)
    );
}
