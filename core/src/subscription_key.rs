//! Subscription keys (docs/policy.md, "Subscription key"): APIM's `Ocp-Apim-Subscription-Key`,
//! stored as SHA-256 hashes in the policy and compared in constant time.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{index, join, ConfigError};
use crate::headers::is_token;
use crate::hex;
use crate::query::query_values;

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct SubscriptionKeyConfig {
    #[serde(default = "default_header")]
    pub header: String,
    #[serde(default = "default_query")]
    pub query: Option<String>,
    pub keys_sha256: Vec<String>,
}

fn default_header() -> String {
    "Ocp-Apim-Subscription-Key".into()
}

fn default_query() -> Option<String> {
    Some("subscription-key".into())
}

#[derive(Debug, Clone)]
pub struct SubscriptionKeyPolicy {
    /// Lower-case, as Envoy presents header names.
    header: String,
    query: Option<String>,
    hashes: Vec<[u8; 32]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    Missing,
    Invalid,
}

impl KeyError {
    pub fn reason(self) -> &'static str {
        match self {
            KeyError::Missing => "subscription key missing",
            KeyError::Invalid => "subscription key not recognised",
        }
    }
}

impl SubscriptionKeyPolicy {
    pub fn compile(cfg: &SubscriptionKeyConfig, path: &str) -> Result<Self, ConfigError> {
        if !is_token(&cfg.header) {
            return Err(ConfigError::new(
                join(path, "header"),
                format!("{:?} is not a header name", cfg.header),
            ));
        }
        if let Some(q) = &cfg.query {
            if q.is_empty() || q.contains(['&', '=', '#', '?', ' ']) {
                return Err(ConfigError::new(
                    join(path, "query"),
                    format!("{q:?} is not a query parameter name"),
                ));
            }
        }
        let keys_path = join(path, "keys_sha256");
        if cfg.keys_sha256.is_empty() {
            return Err(ConfigError::new(
                keys_path,
                "must list at least one key hash",
            ));
        }
        let mut hashes = Vec::with_capacity(cfg.keys_sha256.len());
        for (i, h) in cfg.keys_sha256.iter().enumerate() {
            let bytes = hex::decode(h.trim())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    ConfigError::new(
                        index(&keys_path, i),
                        "not a SHA-256 hash (64 hex digits); `gateguard hash-key` computes one",
                    )
                })?;
            hashes.push(bytes);
        }
        Ok(Self {
            header: cfg.header.to_ascii_lowercase(),
            query: cfg.query.clone(),
            hashes,
        })
    }

    pub fn header_name(&self) -> &str {
        &self.header
    }

    pub fn query_name(&self) -> Option<&str> {
        self.query.as_deref()
    }

    /// `header_values`: every value of the key header; `query`: the raw query string.
    /// The header wins over the query parameter; two different values of either are refused
    /// as invalid (a backend might read the other one).
    pub fn check(&self, header_values: &[&str], query: Option<&str>) -> Result<(), KeyError> {
        self.accept(header_values, query).map(|_| ())
    }

    /// As [`Self::check`], with the accepted key's SHA-256 (what limits count a key by).
    pub fn accept(
        &self,
        header_values: &[&str],
        query: Option<&str>,
    ) -> Result<[u8; 32], KeyError> {
        let presented: Vec<u8> = match header_values {
            [one] if !one.trim().is_empty() => one.trim().as_bytes().to_vec(),
            [] | [_] => {
                let values = match (&self.query, query) {
                    (Some(name), Some(query)) => query_values(query, name),
                    _ => Vec::new(),
                };
                match values.split_first() {
                    Some((first, rest)) if rest.iter().any(|v| v != first) => {
                        return Err(KeyError::Invalid)
                    }
                    Some((first, _)) if !first.is_empty() => first.clone(),
                    _ => return Err(KeyError::Missing),
                }
            }
            _ => return Err(KeyError::Invalid),
        };
        let digest: [u8; 32] = Sha256::digest(&presented).into();
        // Compare against every hash without early exit so timing says nothing about which.
        let mut matched = subtle::Choice::from(0);
        for h in &self.hashes {
            matched |= h.ct_eq(&digest);
        }
        if bool::from(matched) {
            Ok(digest)
        } else {
            Err(KeyError::Invalid)
        }
    }
}

/// SHA-256 of a key, as the policy stores it.
pub fn hash_key(key: &str) -> String {
    hex::encode(&Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn policy() -> SubscriptionKeyPolicy {
        SubscriptionKeyPolicy::compile(
            &SubscriptionKeyConfig {
                header: default_header(),
                query: default_query(),
                keys_sha256: vec![hash_key("key-one"), hash_key("key-two").to_uppercase()],
            },
            "apis[0].subscription_key",
        )
        .unwrap()
    }

    #[test]
    fn header_key_is_checked_against_hashes() {
        let p = policy();
        assert_eq!(p.header_name(), "ocp-apim-subscription-key");
        assert_eq!(p.check(&["key-one"], None), Ok(()));
        assert_eq!(p.check(&["key-two"], None), Ok(()));
        assert_eq!(p.check(&["key-three"], None), Err(KeyError::Invalid));
        assert_eq!(p.check(&[], None), Err(KeyError::Missing));
        assert_eq!(p.check(&[""], None), Err(KeyError::Missing));
        assert_eq!(
            p.check(&["key-one", "key-one"], None),
            Err(KeyError::Invalid)
        );
    }

    #[test]
    fn query_key_is_a_fallback_and_percent_decoded() {
        let p = policy();
        assert_eq!(p.check(&[], Some("a=1&subscription-key=key-one")), Ok(()));
        assert_eq!(p.check(&[], Some("subscription-key=key%2Done")), Ok(()));
        assert_eq!(
            p.check(&[], Some("subscription-key=nope")),
            Err(KeyError::Invalid)
        );
        assert_eq!(
            p.check(&[], Some("subscription-key=")),
            Err(KeyError::Missing)
        );
        // Every spelling a backend may read as the key parameter is the key parameter.
        assert_eq!(p.check(&[], Some("Subscription-Key=key-one")), Ok(()));
        assert_eq!(p.check(&[], Some("subscription%2Dkey=key-one")), Ok(()));
        assert_eq!(p.check(&[], Some("a=1;subscription-key=key-one")), Ok(()));
        assert_eq!(
            p.check(
                &[],
                Some("subscription-key=key-one&SUBSCRIPTION-KEY=key-one")
            ),
            Ok(())
        );
        // Two different keys: a backend could read the other one.
        assert_eq!(
            p.check(&[], Some("subscription-key=key-one&Subscription-Key=nope")),
            Err(KeyError::Invalid)
        );
        // The header decides when both are present.
        assert_eq!(
            p.check(&["wrong"], Some("subscription-key=key-one")),
            Err(KeyError::Invalid)
        );
    }

    #[test]
    fn bad_hashes_name_the_entry() {
        let err = SubscriptionKeyPolicy::compile(
            &SubscriptionKeyConfig {
                header: default_header(),
                query: None,
                keys_sha256: vec![hash_key("a"), "abc".into()],
            },
            "apis[0].subscription_key",
        )
        .unwrap_err();
        assert_eq!(err.path, "apis[0].subscription_key.keys_sha256[1]");
        let err = SubscriptionKeyPolicy::compile(
            &SubscriptionKeyConfig {
                header: default_header(),
                query: None,
                keys_sha256: vec![],
            },
            "apis[0].subscription_key",
        )
        .unwrap_err();
        assert_eq!(err.path, "apis[0].subscription_key.keys_sha256");
    }
}
