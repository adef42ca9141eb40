//! The authentication and authorisation decision (docs/gateway.md): which key,
//! which path, and whether the index lets it through. Pure: no I/O, no clock.

use sha2::{Digest, Sha256};

use m3o_platform_contract::{KeyFacts, Owner, Standing, standing};

use crate::entries::Quota;
use crate::index::Index;

/// Why a request was refused; `reason` is also a metric label (low cardinality).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// 401 or 403.
    pub status: u16,
    pub reason: &'static str,
    /// Said to the client: never the key, never another customer's data.
    pub message: String,
}

/// A request the index lets through, before limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub key_id: String,
    pub customer_id: String,
    /// The API the path addresses (`/v1/<api>/...`), for usage metering.
    pub api: Option<String>,
    /// The customer's quota; `None` when it has no subscription in force.
    pub quota: Option<Quota>,
}

pub type Verdict = Result<Allowed, Denial>;

/// The key presented: `Authorization: Bearer <key>`, else `X-Api-Key`.
pub fn presented_key<'a>(
    authorization: Option<&'a str>,
    api_key: Option<&'a str>,
) -> Option<&'a str> {
    let bearer = authorization.and_then(|v| {
        let (scheme, rest) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    bearer.or(api_key.map(str::trim)).filter(|k| !k.is_empty())
}

/// The original request's path: `X-Original-URI` (nginx), else `X-Forwarded-Uri`
/// (Traefik), else the check's own path less `path_prefix` (Envoy HTTP mode). The
/// query string is dropped.
pub fn original_path<'a>(
    original_uri: Option<&'a str>,
    forwarded_uri: Option<&'a str>,
    own_path: &'a str,
    path_prefix: &str,
) -> &'a str {
    let uri = original_uri.or(forwarded_uri).unwrap_or_else(|| {
        let prefix = path_prefix.trim_end_matches('/');
        match own_path.strip_prefix(prefix) {
            Some(rest) if !prefix.is_empty() && (rest.is_empty() || rest.starts_with('/')) => rest,
            _ => own_path,
        }
    });
    uri.split(['?', '#']).next().unwrap_or_default()
}

/// The API a path addresses: `Some("foo")` for `/v1/foo/...`. `None` for any other path,
/// and for a path a backend might read differently from us (dot segments, encoded
/// slashes or dots, backslashes): those only a `*` scope covers.
pub fn api_of(path: &str) -> Option<&str> {
    let lower = path.to_ascii_lowercase();
    if path.contains('\\') || ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e)) {
        return None;
    }
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    if path.split('/').any(|s| s == "." || s == "..") {
        return None;
    }
    match (segments.next(), segments.next()) {
        (Some("v1"), Some(api)) if !api.contains('%') => Some(api),
        _ => None,
    }
}

/// True when `scopes` cover `api` (M3O convention: `foo` covers `/v1/foo/...`, `*` all).
pub fn covers(scopes: &[Box<str>], api: Option<&str>) -> bool {
    scopes
        .iter()
        .any(|s| &**s == "*" || api.is_some_and(|a| a == &**s))
}

/// SHA-256 of a presented key: how the operator names its entry.
pub fn key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn unauthorized(reason: &'static str, message: impl Into<String>) -> Denial {
    Denial {
        status: 401,
        reason,
        message: message.into(),
    }
}

fn forbidden(reason: &'static str, message: impl Into<String>) -> Denial {
    Denial {
        status: 403,
        reason,
        message: message.into(),
    }
}

/// Decides a request from the index at `now` (unix seconds).
pub fn decide(index: &Index, key: Option<&str>, path: &str, now: i64) -> Verdict {
    let key = key.ok_or_else(|| {
        unauthorized(
            "missing_key",
            "no API key: send Authorization: Bearer <key> or X-Api-Key",
        )
    })?;
    let entry = index
        .key(&key_hash(key))
        .ok_or_else(|| unauthorized("unknown_key", "unknown or revoked API key"))?;
    let owner = match index.customer(&entry.customer_id) {
        None => Owner::Gone,
        Some(c) if c.banned => Owner::Banned,
        Some(_) => Owner::Live,
    };
    // The operator derived the published status with the same function.
    let facts = KeyFacts::published(entry.status, entry.expires_at);
    match standing(&facts, owner, now) {
        Standing::Accepted => {}
        Standing::Revoked => return Err(unauthorized("unknown_key", "unknown or revoked API key")),
        Standing::CustomerGone => {
            return Err(unauthorized(
                "unknown_customer",
                "the key's customer does not exist",
            ));
        }
        Standing::Expired => return Err(unauthorized("expired", "this API key has expired")),
        Standing::CustomerBanned => {
            return Err(forbidden("customer_banned", "the customer is banned"));
        }
        Standing::Blocked => {
            let message = entry
                .blocked_message
                .as_deref()
                .unwrap_or("this API key is blocked");
            return Err(unauthorized("blocked", message));
        }
        Standing::Inactive => {
            return Err(unauthorized("inactive", "this API key is not active"));
        }
    }
    let api = api_of(path);
    if !covers(&entry.scopes, api) {
        let message = match api {
            Some(api) => format!("the key's scopes do not cover API {api}"),
            None => "the key's scopes do not cover this path".to_owned(),
        };
        return Err(forbidden("scope", message));
    }
    Ok(Allowed {
        key_id: entry.key_id.to_string(),
        customer_id: entry.customer_id.to_string(),
        api: api.map(str::to_owned),
        quota: index.quota(&entry.customer_id),
    })
}

#[cfg(test)]
mod tests;
