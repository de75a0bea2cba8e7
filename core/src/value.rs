//! Values that may come from the policy itself or from the Envoy process environment.
//!
//! A `{"value": ...}` is usually a secret (an HMAC key, a function key), so this type reads
//! itself by hand: serde's derived errors quote what they found (``unknown variant `s3cret` ``
//! for `"hmac_secret": "s3cret"`), and those errors reach `gateguard validate` and Envoy's log.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::error::ConfigError;

/// `{ "value": "..." }` or `{ "env": "NAME" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[cfg_attr(
    any(feature = "schema", feature = "serialize"),
    serde(rename_all = "snake_case", deny_unknown_fields)
)]
pub enum ValueSource {
    Value(String),
    Env(String),
}

/// How the compiler reads environment variables: the filter passes the Wasm VM's environment,
/// tests pass a map, and `gateguard validate` passes its own environment or a placeholder.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl ValueSource {
    /// Resolves the value at compile time. A missing variable is a configuration error: a
    /// gateway that would inject an empty function key fails closed instead.
    pub fn resolve(&self, path: &str, env: EnvLookup<'_>) -> Result<String, ConfigError> {
        match self {
            ValueSource::Value(v) => Ok(v.clone()),
            ValueSource::Env(name) => {
                if name.is_empty() {
                    return Err(ConfigError::new(path, "environment variable name is empty"));
                }
                env(name).ok_or_else(|| {
                    ConfigError::new(
                        path,
                        format!(
                            "environment variable {name} is not set in the Wasm VM \
                             (list it in vm_config.environment_variables.host_env_keys)"
                        ),
                    )
                })
            }
        }
    }
}

const EXPECTED: &str = "{\"value\": \"...\"} or {\"env\": \"NAME\"}";

/// Says what was found without quoting it: it may be the secret itself.
fn found<E: de::Error>(what: &str) -> E {
    E::custom(format!(
        "expected {EXPECTED}, found {what} (not shown: it may be a secret)"
    ))
}

impl<'de> Deserialize<'de> for ValueSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SourceVisitor)
    }
}

struct SourceVisitor;

impl<'de> Visitor<'de> for SourceVisitor {
    type Value = ValueSource;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(EXPECTED)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(found("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(found("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(found("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(found("a number"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(found("a bare string"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(found("null"))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(found("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let Some(key) = map.next_key::<QuietKey>()? else {
            return Err(found("an empty object"));
        };
        let text = map.next_value::<QuietString>()?.0;
        let source = match key {
            QuietKey::Value => ValueSource::Value(text),
            QuietKey::Env => ValueSource::Env(text),
        };
        if map.next_key::<QuietKey>()?.is_some() {
            return Err(de::Error::custom(format!(
                "expected {EXPECTED}: exactly one of the two"
            )));
        }
        Ok(source)
    }
}

/// `value` or `env`; any other key is refused without quoting it (a secret pasted as a key
/// stays unprinted).
enum QuietKey {
    Value,
    Env,
}

impl<'de> Deserialize<'de> for QuietKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = QuietKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"value\" or \"env\"")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<QuietKey, E> {
                match key {
                    "value" => Ok(QuietKey::Value),
                    "env" => Ok(QuietKey::Env),
                    _ => Err(E::custom(format!(
                        "expected {EXPECTED}: unknown key (not shown: it may be a secret)"
                    ))),
                }
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// A string; anything else is refused by its kind only.
struct QuietString(String);

impl<'de> Deserialize<'de> for QuietString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StringVisitor;
        impl<'de> Visitor<'de> for StringVisitor {
            type Value = QuietString;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<QuietString, E> {
                Ok(QuietString(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<QuietString, E> {
                Ok(QuietString(v))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<QuietString, E> {
                Err(quiet_type("a boolean"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<QuietString, E> {
                Err(quiet_type("a number"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<QuietString, E> {
                Err(quiet_type("a number"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<QuietString, E> {
                Err(quiet_type("a number"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<QuietString, E> {
                Err(quiet_type("null"))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<QuietString, A::Error> {
                Err(quiet_type("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<QuietString, A::Error> {
                Err(quiet_type("an object"))
            }
        }
        deserializer.deserialize_any(StringVisitor)
    }
}

fn quiet_type<E: de::Error>(what: &str) -> E {
    E::custom(format!(
        "must be a string, found {what} (not shown: it may be a secret)"
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ValueSource, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_both_forms() {
        assert_eq!(
            parse(r#"{"value": "a\"b"}"#),
            Ok(ValueSource::Value("a\"b".into()))
        );
        assert_eq!(parse(r#"{"env": "K"}"#), Ok(ValueSource::Env("K".into())));
    }

    #[test]
    fn errors_never_quote_what_was_found() {
        for bad in [
            r#""s3cret-s3cret""#,
            r#"{"value": 731337}"#,
            r#"{"value": ["s3cret-s3cret"]}"#,
            r#"{"value": {"s3cret-s3cret": 1}}"#,
            r#"{"s3cret-s3cret": "x"}"#,
            r#"{"value": "s3cret-s3cret", "env": "X"}"#,
            r#"{"value": "s3cret-s3cret", "s3cret-s3cret": "X"}"#,
            "731337",
            "true",
            "null",
            "[]",
            "{}",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.contains("s3cret") && !e.contains("731337"), "{bad}: {e}");
            assert!(
                e.contains("expected") || e.contains("must be"),
                "{bad}: {e}"
            );
        }
    }

    /// Through the whole compiler, as `gateguard validate` and Envoy's log print it.
    #[test]
    fn policy_errors_never_quote_a_secret() {
        let api =
            |extra: &str| format!(r#"{{"apis": [{{"name": "a", "path_prefix": "/a", {extra}}}]}}"#);
        let jwt = |secret: &str| {
            api(&format!(
                r#""jwt": {{"issuers": ["i"], "audiences": ["a"], "algorithms": ["HS256"], "hmac_secret": {secret}}}"#
            ))
        };
        let log = |key: &str| {
            format!(
                r#"{{"apis": [{{"name": "a", "path_prefix": "/a"}}], "log": {{"client_ip": "hashed", "hash_key": {key}}}}}"#
            )
        };
        for text in [
            api(r#""inject_headers": "s3cret-s3cret""#),
            api(r#""inject_headers": {"x-k": "s3cret-s3cret"}"#),
            api(r#""inject_headers": {"x-k": {"value": 731337}}"#),
            api(r#""inject_headers": {"x-k": {"value": "s3cret-s3cret", "extra": 1}}"#),
            api(r#""inject_headers": {"x-k": {"value": "s3cret-s3cret\r\n"}}"#),
            api(r#""inject_headers": ["s3cret-s3cret"]"#),
            jwt(r#""s3cret-s3cret""#),
            jwt(r#"{"value": "s3cret-s3cret"}"#),
            jwt(r#"{"value": 731337}"#),
            jwt(r#"{"s3cret-s3cret": "x"}"#),
            log(r#""s3cret-s3cret""#),
            log(r#"{"value": "s3cret-s3cret"}"#),
            log(r#"{"value": 731337}"#),
            log(r#"{"s3cret-s3cret": "x"}"#),
            log(r#"{"env": "K", "s3cret-s3cret": "x"}"#),
        ] {
            let e = crate::parse_policy(text.as_bytes(), &|_| None).unwrap_err();
            let shown = e.to_string();
            assert!(
                !shown.contains("s3cret") && !shown.contains("731337"),
                "{text}: {shown}"
            );
        }
    }
}
