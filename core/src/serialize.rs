//! Policies written by programs (the CLI's importers), behind the `serialize` feature: the raw
//! `*Config` types serialise to the document the compiler reads, in field order, leaving out
//! every field that holds what the compiler assumes when it is absent, so a generated policy
//! states only what its author chose. Defaults set by `#[serde(default = ...)]` are asked of the
//! type's own `Deserialize` (the smallest document it accepts), so each stays written once, at
//! its field. schemars reads `skip_serializing_if` too, and leaves the default of a skipped field
//! out of the JSON Schema: fields of plain types say `schemars(!skip_serializing_if)` to keep the
//! defaults policies/gateguard.schema.json has always shown.

use serde::Serialize;

use crate::client_cert::ClientCertConfig;
use crate::jwt::JwtConfig;

/// `skip_serializing_if` for a block whose absence means its `Default`.
pub(crate) fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

pub(crate) fn is_default_sources(sources: &[String]) -> bool {
    ClientCertConfig::pinning(Vec::new()).is_ok_and(|smallest| smallest.sources == sources)
}

pub(crate) fn is_default_warn_expiry_days(days: &u32) -> bool {
    ClientCertConfig::pinning(Vec::new()).is_ok_and(|smallest| smallest.warn_expiry_days == *days)
}

pub(crate) fn is_default_clock_skew(seconds: &u64) -> bool {
    JwtConfig::accepting(Vec::new(), Vec::new(), Vec::new())
        .is_ok_and(|smallest| smallest.clock_skew_seconds == *seconds)
}

impl JwtConfig {
    /// Accepts tokens from `issuers`, for `audiences`, signed with `algorithms`; every other
    /// field as a policy that leaves it out has it.
    pub fn accepting(
        issuers: Vec<String>,
        audiences: Vec<String>,
        algorithms: Vec<String>,
    ) -> serde_json::Result<Self> {
        #[derive(Serialize)]
        struct Smallest {
            issuers: Vec<String>,
            audiences: Vec<String>,
            algorithms: Vec<String>,
        }
        let smallest = Smallest {
            issuers,
            audiences,
            algorithms,
        };
        serde_json::from_value(serde_json::to_value(smallest)?)
    }
}

impl ClientCertConfig {
    /// Accepts exactly `thumbprints`; every other field as a policy that leaves it out has it.
    pub fn pinning(thumbprints: Vec<String>) -> serde_json::Result<Self> {
        #[derive(Serialize)]
        struct Smallest {
            thumbprints: Vec<String>,
        }
        serde_json::from_value(serde_json::to_value(Smallest { thumbprints })?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use crate::config::{parse_raw, PolicyConfig};

    fn round_trip(text: &str) -> String {
        let raw: PolicyConfig = parse_raw(text).unwrap();
        serde_json::to_string(&raw).unwrap()
    }

    #[test]
    fn a_policy_serialises_to_what_it_states() {
        let text = r#"{"$schema":"./s.json","apis":[{"name":"a","path_prefix":"/a","cors":{"allowed_origins":["https://a.example"],"allowed_methods":["GET"],"allowed_headers":[],"expose_headers":[],"allow_credentials":false},"client_certificate":{"thumbprints":["AB"],"check_validity":true},"subscription_key":{"header":"k","query":null,"keys_sha256":[]},"jwt":{"issuers":["i"],"audiences":["a"],"algorithms":["HS256"],"clock_skew_seconds":0,"hmac_secret":{"env":"S"}},"replay":{"mode":"with_ip"},"inject_headers":{"x":{"value":"v"}}}]}"#;
        assert_eq!(round_trip(text), text);
    }

    #[test]
    fn defaults_are_left_out() {
        let text = r#"{"apis":[{"name":"a","path_prefix":"/","client_certificate":{"thumbprints":[],"sources":["connection"],"warn_expiry_days":30},"jwt":{"issuers":[],"audiences":[],"algorithms":[],"clock_skew_seconds":60}}],"client_ip":{},"replay_cache":{},"token_cache":{}}"#;
        assert_eq!(
            round_trip(text),
            r#"{"apis":[{"name":"a","path_prefix":"/","client_certificate":{"thumbprints":[],"check_validity":true},"jwt":{"issuers":[],"audiences":[],"algorithms":[]}}]}"#
        );
        let other = r#"{"apis":[{"name":"a","path_prefix":"/","client_certificate":{"thumbprints":[],"sources":["xfcc"],"check_validity":true,"warn_expiry_days":7}}],"client_ip":{"trusted_proxy_hops":1,"trusted_proxies":["10.0.0.0/8"]},"token_cache":{"max_entries":0}}"#;
        assert_eq!(round_trip(other), other);
    }
}
