//! The client IP as the audit trail shows it (docs/policy.md, "Audit log"): refusal lines,
//! `replay_unchecked` warnings and the access log's `wasm.gateguard_client_ip`. In full (the
//! default), masked to its network (IPv4 /24, IPv6 /48), or as a keyed hash (HMAC-SHA256 with
//! a key from Envoy's environment): a stable pseudonym that nobody without the key can link
//! back to an address. Checks always judge the real address; only what is written changes.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ring::hmac;
use serde::Deserialize;

use crate::error::{join, ConfigError};
use crate::hex;
use crate::value::{EnvLookup, ValueSource};

/// Shorter keys are refused: the key is all that stands between a hashed IPv4 address and a
/// search of the 2^32 addresses.
pub const MIN_HASH_KEY_BYTES: usize = 16;

/// Bytes of the HMAC kept in a hashed client IP (128 bits: 32 hex digits).
const HASH_BYTES: usize = 16;

/// The top-level `log` block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// How log lines and the access log show the client IP.
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default")
    )]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub client_ip: ClientIpForm,
    /// The HMAC key of `hashed`: `{"env": NAME}`, at least 16 bytes, from Envoy's environment.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub hash_key: Option<ValueSource>,
}

/// `log.client_ip`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(rename_all = "lowercase")]
pub enum ClientIpForm {
    /// The address as the checks saw it.
    #[default]
    Full,
    /// IPv4 to its /24 (`203.0.113.0`), IPv6 to its /48 (`2001:db8:1::`).
    Masked,
    /// `h:` and 32 hex digits of HMAC-SHA256(key, address).
    Hashed,
}

/// The compiled `log` block.
#[derive(Debug, Clone, Default)]
pub struct LogPolicy {
    form: Form,
    every_request: bool,
}

#[derive(Clone, Default)]
enum Form {
    #[default]
    Full,
    Masked,
    Hashed(hmac::Key),
}

/// Never prints the key.
impl fmt::Debug for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Form::Full => "Full",
            Form::Masked => "Masked",
            Form::Hashed(_) => "Hashed(key not shown)",
        })
    }
}

impl LogPolicy {
    /// `None`: the policy has no `log` block. The key is read from the environment here, once:
    /// a missing or short key refuses the policy rather than logging addresses in the clear.
    pub fn compile(
        cfg: Option<&LogConfig>,
        path: &str,
        env: EnvLookup<'_>,
    ) -> Result<Self, ConfigError> {
        let Some(cfg) = cfg else {
            return Ok(Self::default());
        };
        let key_path = join(path, "hash_key");
        let form = match (cfg.client_ip, &cfg.hash_key) {
            (ClientIpForm::Hashed, None) => {
                return Err(ConfigError::new(
                    key_path,
                    "required when client_ip is \"hashed\": {\"env\": NAME}, a variable of \
                     Envoy's environment holding at least 16 bytes",
                ))
            }
            (ClientIpForm::Hashed, Some(ValueSource::Value(_))) => {
                return Err(ConfigError::new(
                    key_path,
                    "must be {\"env\": NAME}: a key written in the policy would sit in version \
                     control and in Envoy's configuration dump",
                ))
            }
            (ClientIpForm::Hashed, Some(source)) => {
                let key = source.resolve(&key_path, env)?;
                if key.len() < MIN_HASH_KEY_BYTES {
                    return Err(ConfigError::new(
                        key_path,
                        format!(
                            "the key is shorter than {MIN_HASH_KEY_BYTES} bytes (generate one, \
                             e.g. `openssl rand -hex 32`)"
                        ),
                    ));
                }
                Form::Hashed(hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes()))
            }
            (_, Some(_)) => {
                return Err(ConfigError::new(
                    key_path,
                    "only client_ip \"hashed\" uses a key: remove it, or set client_ip to \
                     \"hashed\"",
                ))
            }
            (ClientIpForm::Full, None) => Form::Full,
            (ClientIpForm::Masked, None) => Form::Masked,
        };
        Ok(Self {
            form,
            every_request: true,
        })
    }

    /// Whether the policy has a `log` block: an operator who asked for an audit trail, so
    /// allowed requests record their client IP for the access log too (refusals always do).
    pub fn every_request(&self) -> bool {
        self.every_request
    }

    /// The client IP as logs show it.
    pub fn client_ip(&self, ip: IpAddr) -> String {
        match &self.form {
            Form::Full => ip.to_canonical().to_string(),
            Form::Masked => masked(ip).to_string(),
            Form::Hashed(key) => hashed(key, ip),
        }
    }
}

/// The network of `ip`: IPv4 (and IPv4-mapped IPv6) to its /24, IPv6 to its /48.
pub fn masked(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::V4(Ipv4Addr::new(a, b, c, 0))
        }
        IpAddr::V6(v6) => {
            let [a, b, c, ..] = v6.segments();
            IpAddr::V6(Ipv6Addr::new(a, b, c, 0, 0, 0, 0, 0))
        }
    }
}

/// `h:` and the first 16 bytes, in hex, of HMAC-SHA256(key, the address's canonical text)
/// (`203.0.113.7`, `2001:db8::1`; IPv4-mapped IPv6 as IPv4), so an operator holding the key can
/// compute the token of a given address to find its lines.
pub fn hashed(key: &hmac::Key, ip: IpAddr) -> String {
    let tag = hmac::sign(key, ip.to_canonical().to_string().as_bytes());
    format!(
        "h:{}",
        hex::encode(tag.as_ref().get(..HASH_BYTES).unwrap_or_default())
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef-audit-key";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy(json: &str) -> Result<LogPolicy, ConfigError> {
        let cfg: LogConfig = serde_json::from_str(json).unwrap();
        let env = |name: &str| match name {
            "KEY" => Some(KEY.to_string()),
            "SHORT" => Some("fifteen-bytes!!".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        LogPolicy::compile(Some(&cfg), "log", &env)
    }

    fn shown(json: &str, addr: &str) -> String {
        policy(json).unwrap().client_ip(ip(addr))
    }

    #[test]
    fn ipv4_is_masked_to_its_24() {
        assert_eq!(masked(ip("203.0.113.7")), ip("203.0.113.0"));
        // The /24's boundaries stay in it.
        assert_eq!(masked(ip("203.0.113.0")), ip("203.0.113.0"));
        assert_eq!(masked(ip("203.0.113.255")), ip("203.0.113.0"));
        assert_eq!(masked(ip("203.0.114.0")), ip("203.0.114.0"));
        assert_eq!(masked(ip("127.0.0.1")), ip("127.0.0.0"));
        assert_eq!(masked(ip("0.0.0.0")), ip("0.0.0.0"));
        assert_eq!(masked(ip("255.255.255.255")), ip("255.255.255.0"));
    }

    #[test]
    fn ipv6_is_masked_to_its_48() {
        assert_eq!(masked(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1::"));
        assert_eq!(masked(ip("2001:db8:1::")), ip("2001:db8:1::"));
        assert_eq!(
            masked(ip("2001:db8:1:ffff:ffff:ffff:ffff:ffff")),
            ip("2001:db8:1::")
        );
        assert_eq!(masked(ip("2001:db8:2::")), ip("2001:db8:2::"));
        assert_eq!(masked(ip("::1")), ip("::"));
        assert_eq!(masked(ip("::")), ip("::"));
        assert_eq!(masked(ip("fe80::1")), ip("fe80::"));
        assert_eq!(masked(ip("2001:db8:1::")).to_string(), "2001:db8:1::");
    }

    #[test]
    fn ipv4_mapped_ipv6_is_ipv4() {
        assert_eq!(masked(ip("::ffff:203.0.113.7")), ip("203.0.113.0"));
        assert_eq!(
            shown(r#"{"client_ip": "full"}"#, "::ffff:203.0.113.7"),
            "203.0.113.7"
        );
        let hashed = r#"{"client_ip": "hashed", "hash_key": {"env": "KEY"}}"#;
        assert_eq!(
            shown(hashed, "::ffff:203.0.113.7"),
            shown(hashed, "203.0.113.7")
        );
        // IPv4-compatible (deprecated, `::a.b.c.d`) is not mapped: it stays IPv6.
        assert_eq!(masked(ip("::203.0.113.7")), ip("::"));
    }

    #[test]
    fn forms_show_what_they_say() {
        assert_eq!(shown(r#"{}"#, "203.0.113.7"), "203.0.113.7");
        assert_eq!(
            shown(r#"{"client_ip": "masked"}"#, "203.0.113.7"),
            "203.0.113.0"
        );
        assert_eq!(
            shown(r#"{"client_ip": "masked"}"#, "2001:db8:1:2::9"),
            "2001:db8:1::"
        );
        let token = shown(
            r#"{"client_ip": "hashed", "hash_key": {"env": "KEY"}}"#,
            "203.0.113.7",
        );
        assert!(token.starts_with("h:") && token.len() == 2 + 32, "{token}");
        assert!(token[2..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!token.contains("203.0.113"));
    }

    #[test]
    fn hash_is_hmac_sha256_of_the_text_stable_and_keyed() {
        let hashed_policy = r#"{"client_ip": "hashed", "hash_key": {"env": "KEY"}}"#;
        let key = hmac::Key::new(hmac::HMAC_SHA256, KEY.as_bytes());
        let expected = hex::encode(&hmac::sign(&key, b"203.0.113.7").as_ref()[..16]);
        assert_eq!(shown(hashed_policy, "203.0.113.7"), format!("h:{expected}"));
        // Stable across compilations, different per address and per key.
        assert_eq!(
            shown(hashed_policy, "203.0.113.7"),
            shown(hashed_policy, "203.0.113.7")
        );
        assert_ne!(
            shown(hashed_policy, "203.0.113.7"),
            shown(hashed_policy, "203.0.113.8")
        );
        let other = hmac::Key::new(hmac::HMAC_SHA256, b"another-key-of-16+bytes");
        assert_ne!(
            hashed(&other, ip("203.0.113.7")),
            shown(hashed_policy, "203.0.113.7")
        );
        // IPv6 in its canonical text: the same address written otherwise hashes the same.
        assert_eq!(
            shown(hashed_policy, "2001:0db8:0000::0001"),
            shown(hashed_policy, "2001:db8::1")
        );
        let v6 = hex::encode(&hmac::sign(&key, b"::1").as_ref()[..16]);
        assert_eq!(shown(hashed_policy, "::1"), format!("h:{v6}"));
    }

    #[test]
    fn no_block_is_full_and_records_refusals_only() {
        let p = LogPolicy::compile(None, "log", &|_| None).unwrap();
        assert!(!p.every_request());
        assert_eq!(p.client_ip(ip("203.0.113.7")), "203.0.113.7");
        assert!(policy("{}").unwrap().every_request());
        assert!(policy(r#"{"client_ip": "full"}"#).unwrap().every_request());
    }

    #[test]
    fn bad_keys_are_refused_by_field_without_the_key() {
        let err = |json: &str| policy(json).unwrap_err();
        let e = err(r#"{"client_ip": "hashed"}"#);
        assert_eq!(e.path, "log.hash_key");
        assert!(e.reason.contains("required"), "{}", e.reason);
        let e = err(r#"{"client_ip": "hashed", "hash_key": {"env": "UNSET"}}"#);
        assert_eq!(e.path, "log.hash_key");
        assert!(e.reason.contains("UNSET"), "{}", e.reason);
        for short in ["SHORT", "EMPTY"] {
            let e = err(&format!(
                r#"{{"client_ip": "hashed", "hash_key": {{"env": "{short}"}}}}"#
            ));
            assert_eq!(e.path, "log.hash_key");
            assert!(e.reason.contains("16 bytes"), "{}", e.reason);
            assert!(!e.reason.contains("fifteen"), "{}", e.reason);
        }
        let e = err(r#"{"client_ip": "hashed", "hash_key": {"value": "s3cret-s3cret-s3cret"}}"#);
        assert_eq!(e.path, "log.hash_key");
        assert!(!e.reason.contains("s3cret"), "{}", e.reason);
        for form in ["full", "masked"] {
            let e = err(&format!(
                r#"{{"client_ip": "{form}", "hash_key": {{"env": "KEY"}}}}"#
            ));
            assert_eq!(e.path, "log.hash_key");
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let p = policy(r#"{"client_ip": "hashed", "hash_key": {"env": "KEY"}}"#).unwrap();
        let shown = format!("{p:?}");
        assert!(
            !shown.contains(KEY) && !shown.contains("0123456789"),
            "{shown}"
        );
    }
}
