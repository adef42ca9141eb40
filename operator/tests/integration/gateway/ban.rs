//! The ban decision of the gateway contract (docs/gateway.md, "Decisions"),
//! end to end: a customer banned with `kubectl` has its keys published `blocked` (never
//! `active`) by the real operator, and a request through nginx with such a key is
//! answered 403 (the checker's reason: `customer_banned`), not 401 `blocked`. Unbanning brings the key back.

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::{issue, through};
use crate::support::gateway::{check, start_upstream};
use crate::support::nginx::Nginx;
use crate::support::{TestEnv, eventually};

#[tokio::test]
async fn a_banned_customers_key_is_403_customer_banned_through_nginx() {
    let env = TestEnv::new("gateway-ban").await;
    let _operator = env.start_operator().await;
    let (key, _) = issue(
        &env,
        "bob",
        "bob-key",
        &["*"],
        json!({"requestsPerSecond": 1000, "monthlyRequests": 1_000_000}),
    )
    .await;
    let gateway = env.start_gateway(&env.gateway_config()).await;
    let nginx = Nginx::start(&[gateway.addr.port()], start_upstream().await).await;
    eventually("the key to pass", Duration::from_secs(30), || async {
        (through(&nginx, &key, "/v1/helloworld/Call").await.status == 200).then_some(())
    })
    .await;

    let ban = |state: &'static str| {
        let customers = env.customers();
        async move {
            customers
                .patch(
                    "bob",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"state": state}})),
                )
                .await
                .expect("patch the customer's state");
        }
    };
    ban("Banned").await;
    let refused = eventually(
        "403 for the banned customer",
        Duration::from_secs(30),
        || async {
            let r = through(&nginx, &key, "/v1/helloworld/Call").await;
            (r.status != 200).then_some(r)
        },
    )
    .await;
    assert_eq!(refused.status, 403, "{refused:?}");
    // nginx answers an auth_request 403 with its own page; the reason is the checker's.
    let direct = check(&gateway, &key, "/v1/helloworld/Call").await;
    let body: serde_json::Value = serde_json::from_str(&direct.body).expect("JSON body");
    assert_eq!(
        (direct.status, &body["error"]),
        (403, &json!("customer_banned")),
        "{direct:?}"
    );
    // What the operator published for the key: never `active` (contract, section 6).
    let entry = env
        .gateway_entry(&key)
        .await
        .expect("the banned customer's key entry");
    assert_eq!(entry["status"], "blocked", "{entry}");
    assert_eq!(entry["blockedMessage"], "the customer is banned", "{entry}");
    let k = env.wait_apikey("bob-key", "True", "Blocked").await;
    let message = k
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("banned"), "{message}");

    ban("Active").await;
    eventually("200 once unbanned", Duration::from_secs(30), || async {
        (through(&nginx, &key, "/v1/helloworld/Call").await.status == 200).then_some(())
    })
    .await;
    gateway.stop().await;
}
