use proptest::prelude::*;

use super::*;

/// A well-formed key (`m3o_<43 base62>_<checksum>`) made from `seed`.
pub fn make_key(seed: &str) -> String {
    let random: String = seed
        .bytes()
        .filter(u8::is_ascii_alphanumeric)
        .map(char::from)
        .chain(std::iter::repeat('x'))
        .take(43)
        .collect();
    let body = format!("m3o_{random}");
    let sum = key_checksum(&body);
    format!("{body}_{sum}")
}

fn key() -> String {
    make_key("testkey")
}

fn index_with(status: &str, scopes: &[&str], extra: &str, customer_status: &str) -> Index {
    let mut index = Index::default();
    let hash = hex::encode(key_hash(&key()));
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

/// (status, reason) of a verdict; 200 "ok" when allowed.
fn outcome(v: &Decision) -> (u16, &'static str) {
    v.as_ref()
        .map_or_else(|d| (d.status, d.reason), |_| (200, "ok"))
}

#[test]
fn an_active_key_in_scope_is_allowed_with_its_ids_and_quota() {
    let v = decide(&active(&["foo"]), Some(&key()), "/v1/foo/call", 0).expect("allowed");
    assert_eq!((v.key_id.as_str(), v.customer_id.as_str()), ("k1", "c1"));
    assert_eq!(v.api.as_deref(), Some("foo"));
    assert!(v.known_api);
    assert!(!v.quota_unreadable);
    assert_eq!(v.quota.map(|q| q.requests_per_second), Some(5));
}

#[test]
fn unknown_missing_malformed_blocked_expired_are_401_with_their_reason() {
    let index = active(&["*"]);
    let k = key();
    assert_eq!(
        outcome(&decide(&index, None, "/v1/foo", 0)),
        (401, "missing_key")
    );
    let other = make_key("other");
    assert_eq!(
        outcome(&decide(&index, Some(&other), "/v1/foo", 0)),
        (401, "unknown_key")
    );
    assert_eq!(
        outcome(&decide(&index, Some("m3o_notarealkey_0000"), "/v1/foo", 0)),
        (401, "malformed_key")
    );
    let blocked = index_with(
        "blocked",
        &["*"],
        r#","blockedMessage":"unpaid invoice""#,
        "active",
    );
    let d = decide(&blocked, Some(&k), "/v1/foo", 0).expect_err("blocked");
    assert_eq!(
        (d.status, d.reason, d.message.as_str()),
        (401, "blocked", "unpaid invoice")
    );
    let expired = index_with("expired", &["*"], "", "active");
    assert_eq!(
        outcome(&decide(&expired, Some(&k), "/v1/foo", 0)),
        (401, "expired")
    );
    let other_state = index_with("suspended", &["*"], "", "active");
    assert_eq!(
        outcome(&decide(&other_state, Some(&k), "/v1/foo", 0)),
        (401, "inactive")
    );
}

#[test]
fn expires_at_is_enforced_by_the_gateway_clock() {
    let mut index = Index::default();
    let k = key();
    let hash = hex::encode(key_hash(&k));
    let v = br#"{"keyId":"k","customerId":"c1","scopes":["*"],"status":"active","expiresAt":"2030-01-01T00:00:00Z"}"#;
    index.apply(&m3o_platform_contract::apikey_key(&hash), Some(v));
    index.apply(
        &m3o_platform_contract::customer_key("c1"),
        Some(br#"{"status":"active"}"#),
    );
    let at = 1_893_456_000;
    assert_eq!(outcome(&decide(&index, Some(&k), "/", at - 1)), (200, "ok"));
    assert_eq!(
        outcome(&decide(&index, Some(&k), "/", at)),
        (401, "expired")
    );
}

#[test]
fn banned_customers_and_uncovered_paths_are_403() {
    let k = key();
    let banned = index_with("active", &["*"], "", "banned");
    assert_eq!(
        outcome(&decide(&banned, Some(&k), "/v1/foo", 0)),
        (403, "customer_banned")
    );
    // As the operator publishes it: the key `blocked` because the customer is banned.
    let published = index_with("blocked", &["*"], "", "banned");
    let denial = decide(&published, Some(&k), "/v1/foo", 0).expect_err("refused");
    assert_eq!((denial.status, denial.reason), (403, "customer_banned"));
    let index = active(&["foo"]);
    for path in [
        "/v1/bar/x",
        "/other",
        "/v1/foo/../bar",
        "/v1/foo%2f..%2fbar",
        "/v1/foo/..;/bar/Read",
        "/v1/foo/%252e%252e/bar",
        "/v1/foo;x/Read",
        "/v1/foo#/../bar",
        "/v1//foo",
        "/v1/foo/",
        "/v1/./foo",
        "/v1/foo\\..\\bar",
        "/V1/foo",
        "/v1/FOO",
        "/v1/%66oo",
    ] {
        assert_eq!(
            outcome(&decide(&index, Some(&k), path, 0)),
            (403, "scope"),
            "{path}"
        );
    }
    // A `*` scope covers any path, canonical or not (no other API can be tricked in).
    for path in ["/anything/../x", "/v1/foo/..;/bar", "/v1/%ff"] {
        let v = decide(&active(&["*"]), Some(&k), path, 0).expect("allowed by *");
        assert_eq!(v.api, None, "{path}: metered under `-`");
    }
}

#[test]
fn a_key_whose_customer_is_gone_is_401() {
    let mut index = active(&["*"]);
    index.apply(&m3o_platform_contract::customer_key("c1"), None);
    assert_eq!(
        outcome(&decide(&index, Some(&key()), "/v1/foo", 0)),
        (401, "unknown_customer")
    );
}

#[test]
fn keys_come_from_bearer_or_x_api_key() {
    assert_eq!(presented_key(Some("Bearer abc"), None), Some("abc"));
    assert_eq!(presented_key(Some("bearer  abc "), Some("x")), Some("abc"));
    assert_eq!(presented_key(Some("Basic abc"), Some("x")), Some("x"));
    assert_eq!(presented_key(Some("Bearer "), None), None);
    assert_eq!(presented_key(None, Some(" ")), None);
    assert_eq!(presented_key(None, None), None);
}

#[test]
fn keys_are_checked_for_form_length_and_checksum_before_hashing() {
    let k = key();
    assert!(well_formed_key(&k));
    // One character changed: the checksum catches it.
    let mut typo = k.clone().into_bytes();
    typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
    assert!(!well_formed_key(&String::from_utf8(typo).expect("ascii")));
    // Keys issued before the checksum format: m3o_ + 43 base64url.
    assert!(well_formed_key(&format!(
        "m3o_{}",
        "aZ0-_".repeat(9)[..43].to_owned()
    )));
    assert!(!well_formed_key(&format!("m3o_{}", "a".repeat(42))));
    assert!(!well_formed_key(&format!("m3o_{}", "a".repeat(20_000))));
    assert!(!well_formed_key(&format!("xyz_{}", &k[4..])));
    assert!(!well_formed_key(""));
    let index = active(&["*"]);
    let long = "m3o_".to_owned() + &"a".repeat(20_000);
    assert_eq!(
        outcome(&decide(&index, Some(&long), "/", 0)),
        (401, "malformed_key")
    );
}

#[test]
fn the_uri_comes_from_the_one_source_of_the_deployment() {
    use UriSource::{Envoy, Nginx, Traefik};
    fn ok<'a>(
        source: UriSource,
        header: Option<&'a [u8]>,
        own: &'a str,
        prefix: &str,
    ) -> Result<&'a str, (u16, &'static str)> {
        original_path(source, header, own, prefix).map_err(|d| (d.status, d.reason))
    }
    assert_eq!(ok(Nginx, Some(b"/v1/a?q=1"), "/auth", ""), Ok("/v1/a"));
    assert_eq!(ok(Traefik, Some(b"/v1/b?x#f"), "/auth", ""), Ok("/v1/b"));
    // Absent or unreadable: 400, never another header or the check's own path.
    assert_eq!(ok(Nginx, None, "/v1/own", ""), Err((400, "no_uri")));
    assert_eq!(ok(Traefik, None, "/v1/own", ""), Err((400, "no_uri")));
    assert_eq!(
        ok(Nginx, Some(b"/v1/db/Read?x=\xff"), "/auth", ""),
        Err((400, "bad_uri"))
    );
    assert_eq!(
        ok(Nginx, Some(b"/v1/a b"), "/auth", ""),
        Err((400, "bad_uri"))
    );
    assert_eq!(
        ok(Nginx, Some(b"/v1/a\tb"), "/auth", ""),
        Err((400, "bad_uri"))
    );
    assert_eq!(ok(Nginx, Some(b"v1/a"), "/auth", ""), Err((400, "bad_uri")));
    assert_eq!(ok(Nginx, Some(b""), "/auth", ""), Err((400, "bad_uri")));
    // A `#` is part of the raw path, not a fragment to cut (then only `*` covers it).
    assert_eq!(
        ok(Nginx, Some(b"/v1/a#/../b"), "/auth", ""),
        Ok("/v1/a#/../b")
    );
    // Envoy: the check's own path less the prefix; outside the prefix is a 400.
    assert_eq!(ok(Envoy, None, "/ext/v1/c", "/ext"), Ok("/v1/c"));
    assert_eq!(ok(Envoy, None, "/ext/v1/c", "/ext/"), Ok("/v1/c"));
    assert_eq!(ok(Envoy, None, "/ext", "/ext"), Ok("/"));
    assert_eq!(ok(Envoy, None, "/extra/v1", "/ext"), Err((400, "bad_uri")));
    assert_eq!(ok(Envoy, None, "/v1/d", ""), Ok("/v1/d"));
    // Envoy ignores the headers a client could send.
    assert_eq!(ok(Envoy, Some(b"/v1/x"), "/v1/d", ""), Ok("/v1/d"));
    assert_eq!(uri_header(Nginx), Some("x-original-uri"));
    assert_eq!(uri_header(Traefik), Some("x-forwarded-uri"));
    assert_eq!(uri_header(Envoy), None);
}

#[test]
fn only_canonical_paths_name_an_api() {
    assert_eq!(api_of("/v1/foo"), Some("foo"));
    assert_eq!(api_of("/v1/foo/Bar.Call~x-y_z"), Some("foo"));
    assert_eq!(api_of("/v1/foo/...x/.a"), Some("foo"));
    for path in [
        "/v1",
        "/v1/",
        "/v2/foo",
        "v1/foo",
        "//v1/foo",
        "/v1//foo",
        "/v1/foo/",
        "/v1/foo//x",
        "/v1/./foo",
        "/v1/foo/..",
        "/v1/foo/.",
        "/v1/%66oo",
        "/v1/foo;a",
        "/v1/foo/..;",
        "/v1/foo#x",
        "/v1/foo\\x",
        "/v1/foo/%2e%2e",
        "/v1/fo o",
        "/v1/fóo",
        "/v1/foo:x",
        "/v1/foo@x",
        "/v1/foo!x",
        "/v1/foo+x",
        "/v1/foo,x",
        "/v1/foo=x",
        "/v1/foo'x",
    ] {
        assert_eq!(api_of(path), None, "{path}");
    }
    let s: Vec<Box<str>> = vec!["foo".into()];
    assert!(covers(&s, Some("foo")));
    assert!(!covers(&s, Some("foobar")));
    assert!(!covers(&s, None));
    assert!(covers(&["*".into()], None));
}

#[test]
fn apis_are_known_from_any_scope_of_the_customer_and_quota_state_is_kept() {
    let mut index = active(&["*"]);
    let k = key();
    let v = decide(&index, Some(&k), "/v1/weather/Now", 0).expect("allowed");
    assert_eq!(v.api.as_deref(), Some("weather"));
    assert!(!v.known_api, "no key of the customer names weather");
    // Another key of the same customer scoped to weather makes it known.
    let other = hex::encode(key_hash(&make_key("other")));
    let entry = br#"{"keyId":"k2","customerId":"c1","scopes":["weather"],"status":"active","expiresAt":null}"#;
    index.apply(&format!("apikeys/{other}"), Some(entry));
    assert!(
        decide(&index, Some(&k), "/v1/weather/Now", 0)
            .expect("allowed")
            .known_api
    );
    // Re-scoped, then deleted: unknown again.
    let entry =
        br#"{"keyId":"k2","customerId":"c1","scopes":["news"],"status":"active","expiresAt":null}"#;
    index.apply(&format!("apikeys/{other}"), Some(entry));
    assert!(
        !decide(&index, Some(&k), "/v1/weather/Now", 0)
            .expect("allowed")
            .known_api
    );
    assert!(
        decide(&index, Some(&k), "/v1/news/x", 0)
            .expect("allowed")
            .known_api
    );
    index.apply(&format!("apikeys/{other}"), None);
    assert!(
        !decide(&index, Some(&k), "/v1/news/x", 0)
            .expect("allowed")
            .known_api
    );
    // An unreadable quota is kept as such (the limiter refuses it), not as no quota.
    index.apply("quotas/c1", Some(b"{\"monthlyRequests\":\"lots\"}"));
    let v = decide(&index, Some(&k), "/v1/news/x", 0).expect("allowed by the index");
    assert!(v.quota_unreadable && v.quota.is_none());
    index.apply("quotas/c1", None);
    let v = decide(&index, Some(&k), "/v1/news/x", 0).expect("allowed");
    assert!(!v.quota_unreadable && v.quota.is_none());
}

// ---- The property test's oracle: how lenient backends could read a path. Written
// from RFC 3986 and the servers' documented behaviour, not from `api_of`.

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// One round of percent-decoding (invalid escapes stay as they are).
fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%'
            && i + 2 < s.len()
            && let (Some(h), Some(l)) = (hex_value(s[i + 1]), hex_value(s[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// The segments a backend routes on, for each combination of leniencies: up to two
/// rounds of percent-decoding (`%252e`), `;` path parameters dropped (Tomcat, Spring),
/// `#` taken as the end, `\` as `/`, dot segments resolved and empty ones skipped
/// (RFC 3986 5.2.4 and slash-merging servers), case folded.
fn backend_views(path: &str) -> Vec<Vec<String>> {
    let mut views = Vec::new();
    for rounds in 0..=2 {
        for params in [false, true] {
            for fragment in [false, true] {
                let mut p = path.as_bytes().to_vec();
                if fragment && let Some(i) = p.iter().position(|b| *b == b'#') {
                    p.truncate(i);
                }
                for _ in 0..rounds {
                    p = percent_decode(&p);
                }
                let p = String::from_utf8_lossy(&p).replace('\\', "/");
                let mut out: Vec<String> = Vec::new();
                for segment in p.split('/') {
                    let segment = if params {
                        segment.split(';').next().unwrap_or_default()
                    } else {
                        segment
                    };
                    match segment {
                        "" | "." => {}
                        ".." => {
                            out.pop();
                        }
                        s => out.push(s.to_lowercase()),
                    }
                }
                views.push(out);
            }
        }
    }
    views
}

/// True when every backend reading routes `path` to `/v1/<one of scopes>`.
fn every_backend_reads_a_scope(path: &str, scopes: &[&str]) -> bool {
    backend_views(path)
        .iter()
        .all(|v| v.len() >= 2 && v[0] == "v1" && scopes.iter().any(|s| v[1] == s.to_lowercase()))
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "v1", "foo", "bar", "..", ".", "", "%2e", "%2E%2e", "%2f", "%2F", "%5c", "%252e",
            "%252f", "..;", "foo;x", ";", "%00", "\\..", "#", "FOO", "%66oo", "~x", "a-b_c.d",
            "foo%00", "..%00", "%c0%ae", ".%2e", "%u002e", "fo\u{f3}",
        ])
        .prop_map(str::to_owned),
        3 => "[a-zA-Z0-9._~%;#\\\\/-]{0,6}",
    ]
}

/// Mostly `/v1/<api>/...` with tricks in any place, sometimes anything at all.
fn raw_path() -> impl Strategy<Value = String> {
    let version = prop_oneof![8 => Just("v1".to_owned()), 2 => segment()];
    let api = prop_oneof![6 => Just("foo".to_owned()), 1 => Just("bar".to_owned()), 3 => segment()];
    let rest = prop::collection::vec(segment(), 0..6);
    prop_oneof![
        4 => (version, api, rest).prop_map(|(v, a, rest)| {
            let mut s = vec![v, a];
            s.extend(rest);
            format!("/{}", s.join("/"))
        }),
        1 => prop::collection::vec(segment(), 0..7).prop_map(|s| format!("/{}", s.join("/"))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// A key scoped to named APIs is allowed only where every lenient backend reading
    /// routes the path to one of them.
    #[test]
    fn a_scoped_key_reaches_its_apis_only(path in raw_path(), two in any::<bool>()) {
        let scopes: &[&str] = if two { &["foo", "bar"] } else { &["foo"] };
        let index = active(scopes);
        if decide(&index, Some(&key()), &path, 0).is_ok() {
            prop_assert!(every_backend_reads_a_scope(&path, scopes), "{path} allowed");
        }
    }

    /// ... and is allowed on every canonical path of its API.
    #[test]
    fn a_scoped_key_reaches_every_canonical_path_of_its_api(
        rest in prop::collection::vec("[A-Za-z0-9._~-]{1,8}", 0..5),
    ) {
        let rest: Vec<_> = rest.into_iter().filter(|s| s != "." && s != "..").collect();
        let path = format!("/v1/foo{}", rest.iter().map(|s| format!("/{s}")).collect::<String>());
        prop_assert!(decide(&active(&["foo"]), Some(&key()), &path, 0).is_ok(), "{path}");
    }

    /// No entry, path or header makes a check panic; an allowed request is an active
    /// key with a `*` scope, or whose named scopes every backend reading agrees on.
    #[test]
    fn arbitrary_entries_paths_and_headers_never_panic(
        values in proptest::collection::vec((".{0,80}", proptest::option::of(any::<Vec<u8>>())), 0..16),
        json_status in "(active|blocked|expired|[a-z]{0,8})",
        scopes in proptest::collection::vec("(\\*|[a-z0-9-]{0,6}|.{0,4})", 0..4),
        seed in "[a-zA-Z0-9]{0,50}",
        authorization in proptest::option::of(".{0,40}"),
        header in proptest::option::of(any::<Vec<u8>>()),
        raw in raw_path(),
        own in ".{0,60}",
        prefix in ".{0,10}",
        source in prop::sample::select(vec![UriSource::Nginx, UriSource::Traefik, UriSource::Envoy]),
        now in any::<i64>(),
    ) {
        let mut index = Index::default();
        for (k, v) in &values {
            index.apply(k, v.as_deref());
        }
        let generated = make_key(&seed);
        let key = presented_key(authorization.as_deref(), Some(&generated));
        if let Some(k) = key {
            let value = serde_json::json!({
                "keyId": "k", "customerId": "c", "scopes": scopes,
                "status": json_status, "expiresAt": null,
            });
            let bytes = serde_json::to_vec(&value).expect("json");
            index.apply(&m3o_platform_contract::apikey_key(&hex::encode(key_hash(k))), Some(&bytes));
            index.apply(&m3o_platform_contract::customer_key("c"), Some(br#"{"status":"active"}"#));
        }
        let header = header.unwrap_or_else(|| raw.clone().into_bytes());
        let Ok(path) = original_path(source, Some(&header), &own, &prefix) else {
            return Ok(());
        };
        if let Ok(allowed) = decide(&index, key, path, now) {
            prop_assert!(json_status == "active");
            let named: Vec<&str> = scopes.iter().map(String::as_str).collect();
            prop_assert!(
                named.contains(&"*") || every_backend_reads_a_scope(path, &named),
                "{path} allowed for {named:?}"
            );
            if let Some(api) = &allowed.api {
                prop_assert!(backend_views(path).iter().all(|v| v.get(1) == Some(&api.to_lowercase())));
            }
        }
    }
}
