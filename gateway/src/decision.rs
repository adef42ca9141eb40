//! The authentication and authorisation decision (docs/gateway.md): which key,
//! which path, and whether the index lets it through. Pure: no I/O, no clock.

use sha2::{Digest, Sha256};

use m3o_platform_contract::{KeyFacts, Owner, Standing, standing};

use crate::entries::Quota;
use crate::index::Index;
use crate::settings::UriSource;

/// Why a request was refused; `reason` is also a metric label (low cardinality).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// 400, 401 or 403.
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
    /// The API the path addresses (`/v1/<api>/...` in canonical form, see [`api_of`]).
    pub api: Option<String>,
    /// True when a scope of some key of the customer names `api`: usage is metered
    /// under known APIs only (see [`crate::limits::usage_api`]).
    pub known_api: bool,
    /// The customer's quota; `None` when it has no subscription in force.
    pub quota: Option<Quota>,
    /// The customer's quota entry is present but unreadable: limits refuse it.
    pub quota_unreadable: bool,
}

pub type Decision = Result<Allowed, Denial>;

/// Longest key accepted: a key is 54 characters (47 for the keys issued before the
/// checksum format); anything longer is refused before it is hashed.
pub const MAX_KEY_LEN: usize = 128;
const KEY_PREFIX: &str = "m3o_";
const RANDOM_CHARS: usize = 43;
const CHECKSUM_CHARS: usize = 6;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

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

/// The base62 CRC-32 the operator appends to a key's body (`m3o_<43 base62>`).
pub fn key_checksum(body: &str) -> String {
    let mut n = crc32fast::hash(body.as_bytes());
    let mut out = [b'0'; CHECKSUM_CHARS];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True when `key` has the form of a key the operator issues: `m3o_<43 base62>_<6
/// base62 CRC-32 of what precedes>`, or `m3o_<43 base64url>` (issued before the
/// checksum format). Checked before the key is hashed, so a typo or a stray token
/// costs no hash and no lookup.
pub fn well_formed_key(key: &str) -> bool {
    if key.len() > MAX_KEY_LEN {
        return false;
    }
    let Some(rest) = key.strip_prefix(KEY_PREFIX) else {
        return false;
    };
    if rest.len() == RANDOM_CHARS {
        return rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    }
    match rest.split_once('_') {
        Some((random, sum)) => {
            random.len() == RANDOM_CHARS
                && random.bytes().all(|b| b.is_ascii_alphanumeric())
                && sum.len() == CHECKSUM_CHARS
                && key_checksum(&key[..KEY_PREFIX.len() + RANDOM_CHARS]) == sum
        }
        None => false,
    }
}

/// Why the original URI could not be read: always a 400, never a fallback.
fn bad_request(reason: &'static str, message: impl Into<String>) -> Denial {
    Denial {
        status: 400,
        reason,
        message: message.into(),
    }
}

/// The header a URI source reads (`None`: the check's own path).
pub fn uri_header(source: UriSource) -> Option<&'static str> {
    match source {
        UriSource::Nginx => Some("x-original-uri"),
        UriSource::Traefik => Some("x-forwarded-uri"),
        UriSource::Envoy => None,
    }
}

/// The original request's path from the deployment's one URI source: the raw bytes of
/// its header (nginx, Traefik; `header` is that header's value, `None` when absent),
/// or the check's own path less `path_prefix` (Envoy). The query is dropped. A source
/// that is absent, not visible ASCII, not a path, or (Envoy) outside the prefix is a
/// 400: no other header is consulted.
pub fn original_path<'a>(
    source: UriSource,
    header: Option<&'a [u8]>,
    own_path: &'a str,
    path_prefix: &str,
) -> Result<&'a str, Denial> {
    let uri = match uri_header(source) {
        Some(name) => {
            let raw = header
                .ok_or_else(|| bad_request("no_uri", format!("the proxy sent no {name} header")))?;
            if !raw.iter().all(|b| (0x21..=0x7e).contains(b)) {
                return Err(bad_request(
                    "bad_uri",
                    format!("the {name} header is not a readable URI"),
                ));
            }
            // Visible ASCII is UTF-8.
            std::str::from_utf8(raw).map_err(|_| {
                bad_request(
                    "bad_uri",
                    format!("the {name} header is not a readable URI"),
                )
            })?
        }
        None => {
            let prefix = path_prefix.trim_end_matches('/');
            match own_path.strip_prefix(prefix) {
                Some("") => "/",
                Some(rest) if rest.starts_with('/') => rest,
                _ => {
                    return Err(bad_request(
                        "bad_uri",
                        "the check's path is outside --path-prefix",
                    ));
                }
            }
        }
    };
    let path = uri.split('?').next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(bad_request("bad_uri", "the original URI is not a path"));
    }
    Ok(path)
}

/// RFC 3986 unreserved characters: the only ones a path covered by a named scope may hold.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The API a path addresses: `Some("foo")` for `/v1/foo` and `/v1/foo/...`, by
/// allow-list: only a path made of unreserved characters and `/`, without empty
/// segments (`//`, a trailing `/`) or dot segments (`.`, `..`), has an API. Anything
/// else (`%`, `;`, `#`, `\`, non-ASCII, ...), which a backend might read as another
/// path, has none and is covered by a `*` scope only.
pub fn api_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    if !rest.bytes().all(|b| b == b'/' || unreserved(b)) {
        return None;
    }
    let mut segments = rest.split('/');
    if rest
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return None;
    }
    match (segments.next(), segments.next()) {
        (Some("v1"), Some(api)) => Some(api),
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
pub fn decide(index: &Index, key: Option<&str>, path: &str, now: i64) -> Decision {
    let key = key.ok_or_else(|| {
        unauthorized(
            "missing_key",
            "no API key: send Authorization: Bearer <key> or X-Api-Key",
        )
    })?;
    if !well_formed_key(key) {
        return Err(unauthorized("malformed_key", "malformed API key"));
    }
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
            None => "the key's scopes do not cover this path (only a `*` scope covers a path that is not /v1/<api>/... of unreserved characters)".to_owned(),
        };
        return Err(forbidden("scope", message));
    }
    Ok(Allowed {
        key_id: entry.key_id.to_string(),
        customer_id: entry.customer_id.to_string(),
        api: api.map(str::to_owned),
        known_api: api.is_some_and(|a| index.knows_api(&entry.customer_id, a)),
        quota: index.quota(&entry.customer_id),
        quota_unreadable: index.quota_unreadable(&entry.customer_id),
    })
}

#[cfg(test)]
mod tests;
