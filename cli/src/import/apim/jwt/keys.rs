//! Where a `<validate-jwt>`'s keys come from: `<openid-config>` (fetched through
//! `--jwks-cluster`), RSA `<key n= e=>` (an inline JWKS) or a symmetric `<key>` (an HMAC secret
//! in Envoy's environment, never in the policy).

use base64::alphabet::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use gateguard_core::jwt::JwksConfig;
use roxmltree::Node;
use serde::Serialize;

use super::super::report::{plural, El};
use super::super::xml::{child, elements, literal, text_of};
use super::super::Cx;
use super::HMAC_VAR;

/// gateguard's rule for `jwt.hmac_secret` (RFC 7518 §3.2).
const MIN_HMAC_BYTES: usize = 32;

/// The keys a `<validate-jwt>` accepts, as gateguard takes them.
pub(super) struct Keys {
    pub jwks: Option<JwksConfig>,
    pub algorithms: Vec<String>,
    /// The symmetric key, set in Envoy's environment as `HMAC_VAR`.
    pub hmac: bool,
    /// The `<openid-config>` URL, from which the issuer may be derived.
    pub discovery: Option<String>,
}

/// An RSA public key as a JWK.
#[derive(Serialize)]
struct RsaJwk {
    kty: &'static str,
    #[serde(rename = "use")]
    use_: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    n: String,
    e: String,
}

/// An inline JWKS: `{"keys": [...]}`.
#[derive(Serialize)]
struct Jwks {
    keys: Vec<RsaJwk>,
}

enum SigningKey {
    Rsa(RsaJwk),
    Hmac,
}

impl Cx<'_, '_> {
    /// The keys, with their part of the summary; an error when there is none gateguard can use.
    pub(super) fn keys(
        &mut self,
        node: Node,
        e: &El,
        summary: &mut Vec<String>,
    ) -> Result<Keys, String> {
        let mut keys = Keys {
            jwks: None,
            algorithms: Vec::new(),
            hmac: false,
            discovery: None,
        };
        if let Some(url) = self.openid_config(node) {
            let cluster = &self.args.jwks_cluster;
            summary.push(format!("keys from {url} via cluster {cluster:?}"));
            keys.jwks = Some(JwksConfig {
                inline: None,
                cluster: Some(cluster.clone()),
                uri: Some(url.clone()),
                refresh_seconds: None,
            });
            keys.algorithms.push("RS256".into());
            keys.discovery = Some(url);
        }
        let (rsa_keys, hmac) = self.signing_keys(node);
        if !rsa_keys.is_empty() {
            self.inline_keys(rsa_keys, e, &mut keys, summary)?;
        }
        if hmac {
            keys.hmac = true;
            keys.algorithms.push("HS256".into());
            summary.push(format!("HS256 secret from ${HMAC_VAR}"));
        }
        if keys.jwks.is_none() && !keys.hmac {
            return Err(
                "no key gateguard can use (<openid-config>, <key n= e=> or a symmetric <key>)"
                    .into(),
            );
        }
        Ok(keys)
    }

    /// The one `<openid-config>` URL gateguard fetches; the others are reported.
    fn openid_config(&mut self, node: Node) -> Option<String> {
        let mut discovery: Option<String> = None;
        let configs = elements(node).filter(|n| n.tag_name().name() == "openid-config");
        for (i, c) in configs.enumerate() {
            let ce = self.el(c);
            let url = match literal(c.attribute("url").unwrap_or("")) {
                Ok(u) if u.starts_with("https://") || u.starts_with("http://") => u,
                Ok(u) => {
                    self.report
                        .skip(&ce, format!("url {u:?} is not an http(s) URL"));
                    continue;
                }
                Err(r) => {
                    self.report.skip(&ce, format!("url {r}"));
                    continue;
                }
            };
            if i > 0 || discovery.is_some() {
                self.report.skip(
                    &ce,
                    "another <openid-config>: gateguard fetches one key set per API",
                );
                continue;
            }
            discovery = Some(url);
        }
        discovery
    }

    /// RSA keys become an inline JWKS, unless `<openid-config>` gives the key set already.
    fn inline_keys(
        &mut self,
        rsa_keys: Vec<RsaJwk>,
        e: &El,
        keys: &mut Keys,
        summary: &mut Vec<String>,
    ) -> Result<(), String> {
        let n = rsa_keys.len();
        if keys.jwks.is_some() {
            self.report.skip(
                e,
                format!(
                    "{n} <key n= e=> next to <openid-config>: APIM accepts both, gateguard \
                     takes the key set from one place"
                ),
            );
            return Ok(());
        }
        summary.push(format!("{n} inline RSA key{}", plural(n)));
        let jwks = serde_json::to_value(Jwks { keys: rsa_keys })
            .map_err(|e| format!("cannot write the inline keys: {e}"))?;
        keys.jwks = Some(JwksConfig {
            inline: Some(jwks),
            cluster: None,
            uri: None,
            refresh_seconds: None,
        });
        keys.algorithms.push("RS256".into());
        Ok(())
    }

    /// The RSA keys of `<issuer-signing-keys>`, and whether it holds a usable symmetric key.
    fn signing_keys(&mut self, node: Node) -> (Vec<RsaJwk>, bool) {
        let mut rsa_keys = Vec::new();
        let mut hmac = false;
        if let Some(keys) = child(node, "issuer-signing-keys") {
            for k in elements(keys).filter(|n| n.tag_name().name() == "key") {
                let ke = self.el(k);
                match self.signing_key(k, &ke, hmac) {
                    Ok(SigningKey::Rsa(jwk)) => rsa_keys.push(jwk),
                    Ok(SigningKey::Hmac) => hmac = true,
                    Err(reason) => self.report.skip(&ke, reason),
                }
            }
        }
        (rsa_keys, hmac)
    }

    /// One `<issuer-signing-keys><key>`: an RSA key as a JWK, or the symmetric key, which
    /// goes to Envoy's environment (never to the policy or a message).
    fn signing_key(&mut self, k: Node, ke: &El, have_hmac: bool) -> Result<SigningKey, String> {
        if k.attribute("certificate-id").is_some() {
            return Err(
                "certificate-id refers to a certificate uploaded to APIM: export its \
                        public key and add it as an inline JWKS (jwt.jwks.inline)"
                    .into(),
            );
        }
        if let (Some(n), Some(x)) = (k.attribute("n"), k.attribute("e")) {
            let (Some(n), Some(x)) = (base64url(n), base64url(x)) else {
                return Err("n or e is not base64 (policy expressions are not evaluated)".into());
            };
            let kid = k
                .attribute("id")
                .map(|id| literal(id).map_err(|r| format!("id {r}")))
                .transpose()?;
            return Ok(SigningKey::Rsa(RsaJwk {
                kty: "RSA",
                use_: "sig",
                kid,
                n,
                e: x,
            }));
        }
        let secret = text_of(k);
        if secret.is_empty() {
            return Err("an empty <key>".into());
        }
        if have_hmac {
            return Err(format!(
                "another symmetric key: gateguard takes one HMAC secret ({HMAC_VAR})"
            ));
        }
        literal(&secret).map_err(|r| format!("the key {r}"))?;
        let bytes = hmac_key(&secret)?;
        self.report.env(
            ke,
            format!(
                "{HMAC_VAR}: the HMAC signing key of this <key>, base64-decoded ({} bytes of \
                 text); it is not written to the policy",
                bytes.len()
            ),
        );
        Ok(SigningKey::Hmac)
    }
}

/// APIM's symmetric key is base64; gateguard's secret is the text whose bytes are the key.
fn hmac_key(secret: &str) -> Result<Vec<u8>, String> {
    let bytes = base64_decode(secret).ok_or("the key is not base64")?;
    if bytes.len() < MIN_HMAC_BYTES {
        return Err(format!(
            "the key has {} bytes; gateguard requires at least {MIN_HMAC_BYTES} for HMAC",
            bytes.len()
        ));
    }
    if std::str::from_utf8(&bytes).is_err() || bytes.contains(&0) {
        return Err(
            "the decoded key is binary, not text: gateguard's hmac_secret (and an \
             environment variable) holds text, so tokens signed with this key cannot be \
             verified; sign with a text key of 32+ bytes"
                .into(),
        );
    }
    Ok(bytes)
}

/// Decodes standard or URL-safe base64, padded or not; bits past the last byte are ignored.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    const LIBERAL: GeneralPurpose = GeneralPurpose::new(
        &STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::RequireNone)
            .with_decode_allow_trailing_bits(true),
    );
    let digits = text
        .trim()
        .trim_end_matches('=')
        .replace('-', "+")
        .replace('_', "/");
    if digits.is_empty() {
        return None;
    }
    LIBERAL.decode(digits).ok()
}

/// The same bytes as unpadded base64url (what a JWK's `n` and `e` need), written as APIM had
/// them: only the alphabet changes.
fn base64url(text: &str) -> Option<String> {
    let t = text.trim();
    if t.starts_with('@') || base64_decode(t).is_none() {
        return None;
    }
    Some(t.trim_end_matches('=').replace('+', "-").replace('/', "_"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn base64_helpers() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert!(base64_decode("a").is_none());
        assert!(base64_decode("a*b=").is_none());
        assert_eq!(base64url("ab+/cd==").unwrap(), "ab-_cd");
    }
}
