//! Key material: generation from the OS CSPRNG, hashing, and reading the Secret that is
//! the only place a key's plaintext ever lives (its manifest is built in
//! [`super::build::secret`]). Pure: no I/O.

use std::fmt;

use k8s_openapi::api::core::v1::Secret;
use kube::{Resource, ResourceExt};
use m3o_crds::ApiKey;
use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Recognisable prefix of every key, so a leaked key is easy to spot and scan for.
pub const KEY_PREFIX: &str = "m3o_";
/// Base62 characters of randomness in a key: 43 * log2(62) = 256.03 bits.
const RANDOM_CHARS: usize = 43;
/// Base62 characters of the CRC-32 checksum (62^6 > 2^32).
const CHECKSUM_CHARS: usize = 6;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Data keys of the Secret.
pub const DATA_API_KEY: &str = "apiKey";
pub const DATA_KEY_ID: &str = "keyId";
/// Annotation: the rotationGeneration the Secret's key was issued for.
pub const ROTATION_ANNOTATION: &str = "m3o.com/rotation-generation";
/// Annotation: the SHA-256 of the key as issued, so an edited key is noticed.
pub const HASH_ANNOTATION: &str = "m3o.com/key-sha256";
/// Label on every Secret the operator writes (the controller watches only these).
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "m3o-operator");
pub const APIKEY_LABEL: &str = "m3o.com/apikey";

/// A key's plaintext: `m3o_<43 base62 random>_<6 base62 CRC-32 of what precedes>`.
/// The checksum lets secret scanners and the tamper check recognise a real key
/// without a lookup. Its Debug and Display never show the key.
pub struct Plaintext(String);

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Plaintext(<redacted>)")
    }
}

impl Plaintext {
    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Result<Self, rand::rand_core::OsError> {
        let mut body = String::with_capacity(KEY_PREFIX.len() + RANDOM_CHARS + 1 + CHECKSUM_CHARS);
        body.push_str(KEY_PREFIX);
        let mut random = 0;
        let mut bytes = [0u8; 64];
        while random < RANDOM_CHARS {
            OsRng.try_fill_bytes(&mut bytes)?;
            // Rejection sampling keeps every character uniform: 248 = 4 * 62.
            for b in bytes
                .iter()
                .filter(|b| **b < 248)
                .take(RANDOM_CHARS - random)
            {
                body.push(char::from(BASE62[usize::from(*b % 62)]));
                random += 1;
            }
        }
        let checksum = checksum(&body);
        Ok(Self(format!("{body}_{checksum}")))
    }

    /// Hex SHA-256, the only form of the key outside the Secret.
    pub fn hash(&self) -> String {
        hash(self.0.as_bytes())
    }

    /// The first 8 characters: the prefix and 4 random ones, shown to identify a key.
    pub fn display_prefix(&self) -> String {
        display_prefix(self.0.as_bytes())
    }

    /// The key's bytes, for the Secret's data (and nothing else).
    pub(super) fn into_bytes(self) -> Vec<u8> {
        self.0.into_bytes()
    }
}

/// CRC-32 of `body` in fixed-width base62.
fn checksum(body: &str) -> String {
    let mut n = crc32fast::hash(body.as_bytes());
    let mut out = [b'0'; CHECKSUM_CHARS];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True when `key` has the format of a key this operator issues, checksum included.
pub fn well_formed(key: &[u8]) -> bool {
    let Ok(key) = std::str::from_utf8(key) else {
        return false;
    };
    let Some((body, sum)) = key.rsplit_once('_') else {
        return false;
    };
    let random = body.strip_prefix(KEY_PREFIX).unwrap_or_default();
    random.len() == RANDOM_CHARS
        && random.bytes().all(|b| b.is_ascii_alphanumeric())
        && sum.len() == CHECKSUM_CHARS
        && checksum(body) == sum
}

/// Hex SHA-256 of key bytes.
pub fn hash(key: &[u8]) -> String {
    hex::encode(Sha256::digest(key))
}

fn display_prefix(key: &[u8]) -> String {
    String::from_utf8_lossy(&key[..key.len().min(8)]).into_owned()
}

/// What the operator knows of the key in a Secret: everything but the plaintext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedKey {
    pub key_id: Uuid,
    pub hash: String,
    pub prefix: String,
    pub rotation_generation: i64,
}

/// A key read from one of our Secrets, with what the tamper check needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundKey {
    pub issued: IssuedKey,
    /// The key has this operator's format and a valid checksum.
    pub well_formed: bool,
    /// The hash annotation matches the key (the operator wrote both, or someone edited both).
    pub annotated: bool,
}

/// The Secret name of an ApiKey (`spec.secretName`, default `<name>-api-key`).
pub fn secret_name(key: &ApiKey) -> String {
    key.spec
        .secret_name
        .clone()
        .unwrap_or_else(|| format!("{}-api-key", key.name_any()))
}

/// What a Secret of that name holds, from this operator's point of view.
pub enum SecretState {
    Missing,
    /// Exists but was not made for this ApiKey: never overwritten.
    Foreign,
    /// Ours: the key in it (`None` when unreadable) and the resourceVersion it was read
    /// at, the precondition for replacing it.
    Ours {
        found: Option<FoundKey>,
        resource_version: Option<String>,
    },
}

/// Reads the Secret and identifies its key without keeping the plaintext.
pub fn inspect(secret: Option<&Secret>, owner: &ApiKey) -> SecretState {
    let Some(secret) = secret else {
        return SecretState::Missing;
    };
    let owned = secret
        .owner_references()
        .iter()
        .any(|o| Some(&o.uid) == owner.meta().uid.as_ref());
    if !owned {
        return SecretState::Foreign;
    }
    let data = secret.data.as_ref();
    let key = data
        .and_then(|d| d.get(DATA_API_KEY))
        .map(|b| b.0.as_slice())
        .filter(|k| k.starts_with(KEY_PREFIX.as_bytes()));
    let key_id = data
        .and_then(|d| d.get(DATA_KEY_ID))
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .and_then(|s| Uuid::parse_str(s).ok());
    let generation = secret
        .annotations()
        .get(ROTATION_ANNOTATION)
        .and_then(|g| g.parse().ok());
    let found = match (key, key_id, generation) {
        (Some(key), Some(key_id), Some(rotation_generation)) => {
            let hash = hash(key);
            Some(FoundKey {
                well_formed: well_formed(key),
                annotated: secret.annotations().get(HASH_ANNOTATION) == Some(&hash),
                issued: IssuedKey {
                    key_id,
                    hash,
                    prefix: display_prefix(key),
                    rotation_generation,
                },
            })
        }
        _ => None,
    };
    SecretState::Ours {
        found,
        resource_version: secret.resource_version(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_prefixed_and_checksummed() {
        let a = Plaintext::generate().expect("key");
        let b = Plaintext::generate().expect("key");
        assert!(a.0.starts_with(KEY_PREFIX));
        assert_eq!(
            a.0.len(),
            KEY_PREFIX.len() + RANDOM_CHARS + 1 + CHECKSUM_CHARS
        );
        assert!(well_formed(a.0.as_bytes()), "{}", a.0.len());
        assert_ne!(a.0, b.0);
        assert_eq!(a.hash().len(), 64);
        assert_eq!(a.display_prefix().len(), 8);
        assert!(
            !format!("{a:?}").contains(&a.0[4..]),
            "Debug never shows the key"
        );
    }

    #[test]
    fn the_checksum_catches_edits_and_short_keys() {
        let key = Plaintext::generate().expect("key").0;
        let mut edited = key.clone().into_bytes();
        edited[10] = if edited[10] == b'a' { b'b' } else { b'a' };
        assert!(!well_formed(&edited), "one character changed");
        for bad in [
            "m3o_x",
            "m3o_",
            "",
            "m3o_chosen-by-hand-not-by-the-operator-000000",
            &key[..key.len() - 1],
            &format!("{key}0"),
        ] {
            assert!(!well_formed(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn a_legacy_base64_key_is_not_well_formed() {
        // Keys issued before the checksum format: recognised by their recorded hash only.
        assert!(!well_formed(
            b"m3o_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        ));
    }

    #[test]
    fn hash_is_hex_sha256() {
        assert_eq!(
            hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
