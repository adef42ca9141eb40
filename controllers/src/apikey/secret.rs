//! Key material: generation from the OS CSPRNG, hashing, and the Secret that is the
//! only place a key's plaintext ever lives.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use m3o_crds::ApiKey;
use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::status::FIELD_MANAGER;

/// Recognisable prefix of every key, so a leaked key is easy to spot and scan for.
pub const KEY_PREFIX: &str = "m3o_";
/// Bytes of randomness in a key (256 bits).
const KEY_BYTES: usize = 32;
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

/// A key's plaintext. Its Debug and Display never show the key.
pub struct Plaintext(String);

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Plaintext(<redacted>)")
    }
}

impl Plaintext {
    /// A fresh key: the prefix and 256 bits from the OS CSPRNG, base64url.
    pub fn generate() -> Result<Self, rand::rand_core::OsError> {
        let mut bytes = [0u8; KEY_BYTES];
        OsRng.try_fill_bytes(&mut bytes)?;
        Ok(Self(format!(
            "{KEY_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(bytes)
        )))
    }

    /// Hex SHA-256, the only form of the key outside the Secret.
    pub fn hash(&self) -> String {
        hash(self.0.as_bytes())
    }

    /// The first 8 characters: the prefix and 4 random ones, shown to identify a key.
    pub fn display_prefix(&self) -> String {
        self.0.chars().take(8).collect()
    }
}

/// Hex SHA-256 of key bytes.
pub fn hash(key: &[u8]) -> String {
    hex::encode(Sha256::digest(key))
}

/// What the operator knows of the key in a Secret: everything but the plaintext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedKey {
    pub key_id: Uuid,
    pub hash: String,
    pub prefix: String,
    pub rotation_generation: i64,
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
    /// Ours, holding this key (or no readable key, as `None`).
    Ours(Option<IssuedKey>),
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
    // A key that is not the one issued (edited by hand) counts as no key: re-issued.
    let key = key.filter(|k| secret.annotations().get(HASH_ANNOTATION) == Some(&hash(k)));
    let issued = match (key, key_id, generation) {
        (Some(key), Some(key_id), Some(rotation_generation)) => Some(IssuedKey {
            key_id,
            hash: hash(key),
            prefix: String::from_utf8_lossy(&key[..key.len().min(8)]).into_owned(),
            rotation_generation,
        }),
        _ => None,
    };
    SecretState::Ours(issued)
}

/// Writes a new key into the ApiKey's Secret (creating it if needed) and returns
/// what to record. The plaintext is dropped on return.
pub async fn issue(
    api: &Api<Secret>,
    owner: &ApiKey,
    rotation_generation: i64,
) -> Result<IssuedKey, crate::Error> {
    let plaintext = Plaintext::generate()
        .map_err(|e| crate::Error::Invalid(format!("OS random number generator failed: {e}")))?;
    let key_id = Uuid::now_v7();
    let issued = IssuedKey {
        key_id,
        hash: plaintext.hash(),
        prefix: plaintext.display_prefix(),
        rotation_generation,
    };
    let name = secret_name(owner);
    let mut secret = Secret {
        data: Some(BTreeMap::from([
            (
                DATA_API_KEY.to_owned(),
                ByteString(plaintext.0.into_bytes()),
            ),
            (
                DATA_KEY_ID.to_owned(),
                ByteString(key_id.to_string().into_bytes()),
            ),
        ])),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    secret.metadata.name = Some(name.clone());
    secret.metadata.namespace = owner.namespace();
    secret.metadata.labels = Some(BTreeMap::from([
        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
        (APIKEY_LABEL.to_owned(), owner.name_any()),
    ]));
    secret.metadata.annotations = Some(BTreeMap::from([
        (
            ROTATION_ANNOTATION.to_owned(),
            rotation_generation.to_string(),
        ),
        (HASH_ANNOTATION.to_owned(), issued.hash.clone()),
    ]));
    secret.metadata.owner_references = owner.controller_owner_ref(&()).map(|o| vec![o]);
    let mut body = serde_json::to_value(&secret)
        .map_err(|e| crate::Error::Invalid(format!("encoding Secret: {e}")))?;
    body["apiVersion"] = "v1".into();
    body["kind"] = "Secret".into();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(issued)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_prefixed() {
        let a = Plaintext::generate().expect("key");
        let b = Plaintext::generate().expect("key");
        assert!(a.0.starts_with(KEY_PREFIX));
        assert_eq!(a.0.len(), KEY_PREFIX.len() + 43, "256 bits in base64url");
        assert_ne!(a.0, b.0);
        assert_eq!(a.hash().len(), 64);
        assert_eq!(a.display_prefix().len(), 8);
        assert!(
            !format!("{a:?}").contains(&a.0[4..]),
            "Debug never shows the key"
        );
    }

    #[test]
    fn hash_is_hex_sha256() {
        assert_eq!(
            hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
