use proptest::prelude::*;

use super::*;

const KEY: &str = "m3o_testkey_abc";

fn index_with(status: &str, scopes: &[&str], extra: &str, customer_status: &str) -> Index {
    let mut index = Index::default();
    let hash = hex::encode(key_hash(KEY));
    let value = format!(
        r#"{{"keyId":"k1","customerId":"c1","scopes":{},"status":"{status}","expiresAt":null{extra}}}"#,
        serde_json::to_string(scopes).expect("json")
    );
    index.apply(
        &m3o_platform_contract::apikey_key(&hash),
        Some(value.as_bytes()),
    );
    let customer = format!(
        r#"{{"id":"c1","email":"a@b.c","name":"","status":"{customer_status}","plan":"pro"}}"#
    );
    index.apply(
        &m3o_platform_contract::customer_key("c1"),
        Some(customer.as_bytes()),
    );
    index.apply(
        &m3o_platform_contract::quota_key("c1"),
        Some(br#"{"plan":"pro","monthlyRequests":100,"requestsPerSecond":5}"#),
    );
    index
}

fn active(scopes: &[&str]) -> Index {
    index_with("active", scopes, "", "active")
}

fn status_of(v: &Verdict) -> u16 {
    v.as_ref().map_or_else(|d| d.status, |_| 200)
}

#[test]
fn an_active_key_in_scope_is_allowed_with_its_ids_and_quota() {
    let v = decide(&active(&["foo"]), Some(KEY), "/v1/foo/call", 0).expect("allowed");
    assert_eq!((v.key_id.as_str(), v.customer_id.as_str()), ("k1", "c1"));
    assert_eq!(v.api.as_deref(), Some("foo"));
    assert_eq!(v.quota.map(|q| q.requests_per_second), Some(5));
}

#[test]
fn unknown_missing_blocked_expired_are_401() {
    let index = active(&["*"]);
    assert_eq!(status_of(&decide(&index, None, "/v1/foo", 0)), 401);
    assert_eq!(
        status_of(&decide(&index, Some("m3o_other"), "/v1/foo", 0)),
        401
    );
    let blocked = index_with(
        "blocked",
        &["*"],
        r#","blockedMessage":"unpaid invoice""#,
        "active",
    );
    let d = decide(&blocked, Some(KEY), "/v1/foo", 0).expect_err("blocked");
    assert_eq!((d.status, d.message.as_str()), (401, "unpaid invoice"));
    let expired = index_with("expired", &["*"], "", "active");
    assert_eq!(status_of(&decide(&expired, Some(KEY), "/v1/foo", 0)), 401);
}

#[test]
fn expires_at_is_enforced_by_the_gateway_clock() {
    let mut index = Index::default();
    let hash = hex::encode(key_hash(KEY));
    let v = br#"{"keyId":"k","customerId":"c1","scopes":["*"],"status":"active","expiresAt":"2030-01-01T00:00:00Z"}"#;
    index.apply(&m3o_platform_contract::apikey_key(&hash), Some(v));
    index.apply(
        &m3o_platform_contract::customer_key("c1"),
        Some(br#"{"status":"active"}"#),
    );
    let at = 1_893_456_000;
    assert_eq!(status_of(&decide(&index, Some(KEY), "/", at - 1)), 200);
    let d = decide(&index, Some(KEY), "/", at).expect_err("expired");
    assert_eq!((d.status, d.reason), (401, "expired"));
}

#[test]
fn banned_customers_and_uncovered_paths_are_403() {
    let banned = index_with("active", &["*"], "", "banned");
    assert_eq!(status_of(&decide(&banned, Some(KEY), "/v1/foo", 0)), 403);
    // As the operator publishes it: the key `blocked` because the customer is banned.
    let published = index_with("blocked", &["*"], "", "banned");
    let denial = decide(&published, Some(KEY), "/v1/foo", 0).expect_err("refused");
    assert_eq!((denial.status, denial.reason), (403, "customer_banned"));
    let index = active(&["foo"]);
    assert_eq!(status_of(&decide(&index, Some(KEY), "/v1/bar/x", 0)), 403);
    assert_eq!(status_of(&decide(&index, Some(KEY), "/other", 0)), 403);
    assert_eq!(
        status_of(&decide(&index, Some(KEY), "/v1/foo/../bar", 0)),
        403
    );
    assert_eq!(
        status_of(&decide(&index, Some(KEY), "/v1/foo%2f..%2fbar", 0)),
        403
    );
    assert_eq!(
        status_of(&decide(&active(&["*"]), Some(KEY), "/anything/../x", 0)),
        200
    );
}

#[test]
fn a_key_whose_customer_is_gone_is_401() {
    let mut index = active(&["*"]);
    index.apply(&m3o_platform_contract::customer_key("c1"), None);
    assert_eq!(status_of(&decide(&index, Some(KEY), "/v1/foo", 0)), 401);
}

#[test]
fn keys_come_from_bearer_or_x_api_key() {
    assert_eq!(presented_key(Some("Bearer abc"), None), Some("abc"));
    assert_eq!(presented_key(Some("bearer  abc "), Some("x")), Some("abc"));
    assert_eq!(presented_key(Some("Basic abc"), Some("x")), Some("x"));
    assert_eq!(presented_key(None, Some(" ")), None);
    assert_eq!(presented_key(None, None), None);
}

#[test]
fn paths_follow_each_proxy_convention() {
    assert_eq!(
        original_path(Some("/v1/a?q=1"), Some("/x"), "/auth", ""),
        "/v1/a"
    );
    assert_eq!(original_path(None, Some("/v1/b#f"), "/auth", ""), "/v1/b");
    assert_eq!(original_path(None, None, "/ext/v1/c", "/ext"), "/v1/c");
    assert_eq!(original_path(None, None, "/ext/v1/c", "/ext/"), "/v1/c");
    assert_eq!(original_path(None, None, "/extra/v1", "/ext"), "/extra/v1");
    assert_eq!(original_path(None, None, "/v1/d", ""), "/v1/d");
}

#[test]
fn scopes_cover_their_api_only() {
    let s: Vec<Box<str>> = vec!["foo".into()];
    assert!(covers(&s, api_of("/v1/foo")));
    assert!(covers(&s, api_of("//v1//foo/bar?x")));
    assert!(!covers(&s, api_of("/v1/foobar/x")));
    assert!(!covers(&s, api_of("/v2/foo")));
    assert!(!covers(&s, api_of("/v1/%66oo")));
    assert!(covers(&["*".into()], None));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// No entry, path or header makes a check panic, and an allowed request is always
    /// an active key whose scopes cover the path.
    #[test]
    fn arbitrary_entries_paths_and_headers_never_panic(
        values in proptest::collection::vec((".{0,80}", proptest::option::of(any::<Vec<u8>>())), 0..16),
        json_status in "(active|blocked|expired|[a-z]{0,8})",
        scopes in proptest::collection::vec("(\\*|[a-z0-9-]{0,6}|.{0,4})", 0..4),
        authorization in proptest::option::of(".{0,40}"),
        api_key in proptest::option::of(".{0,40}"),
        original in proptest::option::of(".{0,60}"),
        forwarded in proptest::option::of(".{0,60}"),
        own in ".{0,60}",
        prefix in ".{0,10}",
        now in any::<i64>(),
    ) {
        let mut index = Index::default();
        for (k, v) in &values {
            index.apply(k, v.as_deref());
        }
        let key = presented_key(authorization.as_deref(), api_key.as_deref());
        if let Some(k) = key {
            let value = serde_json::json!({
                "keyId": "k", "customerId": "c", "scopes": scopes,
                "status": json_status, "expiresAt": null,
            });
            let bytes = serde_json::to_vec(&value).expect("json");
            index.apply(&m3o_platform_contract::apikey_key(&hex::encode(key_hash(k))), Some(&bytes));
            index.apply(&m3o_platform_contract::customer_key("c"), Some(br#"{"status":"active"}"#));
        }
        let path = original_path(original.as_deref(), forwarded.as_deref(), &own, &prefix);
        if let Ok(allowed) = decide(&index, key, path, now) {
            prop_assert!(json_status == "active");
            let boxed: Vec<Box<str>> = scopes.iter().map(|s| s.as_str().into()).collect();
            prop_assert!(covers(&boxed, api_of(path)));
            prop_assert_eq!(allowed.api.as_deref(), api_of(path));
        }
    }
}
