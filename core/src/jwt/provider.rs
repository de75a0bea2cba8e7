//! Identity providers of an API (docs/policy.md, "JWT", "Several identity providers" and
//! "Entra ID"): who issues the tokens, for which audiences, with which algorithms and keys. An
//! API trusts one (the fields at `jwt` level) or several (`jwt.providers`); a token's `iss`
//! picks the one that checks it, before any signature work.

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{envoy, fetch, verify, JwksConfig, JwksSource, KeyFamily, KeySet, VerifyWith};
use crate::error::{index, join, ConfigError};
use crate::value::{EnvLookup, ValueSource};

/// One entry of `jwt.providers`: the same fields as a single provider at `jwt` level.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Vec::is_empty"))]
    #[serde(default)]
    pub issuers: Vec<String>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Vec::is_empty"))]
    #[serde(default)]
    pub audiences: Vec<String>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Vec::is_empty"))]
    #[serde(default)]
    pub algorithms: Vec<String>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub jwks: Option<JwksConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub hmac_secret: Option<ValueSource>,
    /// Microsoft Entra ID: issuers and keys of a tenant, worked out from its id or domain.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub entra: Option<EntraConfig>,
}

/// `entra`: tokens of a Microsoft Entra ID tenant (or, with `organizations`/`common`, of the
/// tenants listed in `tenants`).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct EntraConfig {
    /// Tenant id (a GUID) or domain; `organizations` or `common` for a multi-tenant app.
    pub tenant: String,
    /// Token versions accepted (default both): v1 tokens are issued by
    /// `https://sts.windows.net/<tenant>/`, v2 by `https://login.microsoftonline.com/<tenant>/v2.0`.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub versions: Option<Vec<EntraVersion>>,
    /// With `organizations` or `common`: the tenant ids (`tid`) accepted.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Vec::is_empty"))]
    #[serde(default)]
    pub tenants: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(rename_all = "lowercase")]
pub enum EntraVersion {
    V1,
    V2,
}

/// The cluster `gateguard render` defines for Entra ID's keys.
pub const ENTRA_CLUSTER: &str = "entra_id";
const ENTRA_V1: (&str, &str) = ("https://sts.windows.net/", "/");
const ENTRA_V2: (&str, &str) = ("https://login.microsoftonline.com/", "/v2.0");

impl EntraVersion {
    fn affixes(self) -> (&'static str, &'static str) {
        match self {
            EntraVersion::V1 => ENTRA_V1,
            EntraVersion::V2 => ENTRA_V2,
        }
    }

    fn issuer(self, tenant: &str) -> String {
        let (prefix, suffix) = self.affixes();
        format!("{prefix}{tenant}{suffix}")
    }

    fn name(self) -> &'static str {
        match self {
            EntraVersion::V1 => "v1",
            EntraVersion::V2 => "v2",
        }
    }

    /// The Entra version and tenant an issuer names, if it is an Entra ID issuer.
    fn of_issuer(iss: &str) -> Option<(EntraVersion, &str)> {
        [EntraVersion::V1, EntraVersion::V2]
            .into_iter()
            .find_map(|v| {
                let (prefix, suffix) = v.affixes();
                let tenant = iss.strip_prefix(prefix)?.strip_suffix(suffix)?;
                is_tenant_segment(tenant).then_some((v, tenant))
            })
    }

    fn other(self) -> EntraVersion {
        match self {
            EntraVersion::V1 => EntraVersion::V2,
            EntraVersion::V2 => EntraVersion::V1,
        }
    }
}

fn is_tenant_segment(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 253
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A multi-tenant issuer template: `prefix + tid + suffix`, for a `tid` in the allow-list that is
/// also the token's `tid` claim.
#[derive(Debug, Clone)]
struct TenantIssuer {
    version: EntraVersion,
    tenants: Vec<String>,
}

/// One identity provider, compiled.
#[derive(Debug, Clone)]
pub struct Provider {
    issuers: Vec<String>,
    tenant_issuers: Vec<TenantIssuer>,
    pub(super) audiences: Vec<String>,
    pub(super) algorithms: Vec<Algorithm>,
    pub jwks: JwksSource,
    pub(super) hmac: Option<verify::VerifyingKey>,
    /// SHA-256 of the resolved HMAC secret (zeros without one): verified-token cache entries are
    /// bound to it, since a secret read from the environment is not in the policy text.
    hmac_fingerprint: [u8; 32],
    /// With `verify_with: "envoy"`: the `jwt_authn` provider whose payload this provider reads.
    pub(super) envoy_provider: Option<String>,
    /// The host's key slot of this provider's key set, unique in the policy.
    slot: usize,
    /// Where the provider is in the policy (`apis[0].jwt` or `apis[0].jwt.providers[1]`).
    pub(super) path: String,
}

pub(super) fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

const SUPPORTED: &str =
    "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384, HS512";
const DEFAULT_REFRESH_SECONDS: u64 = 3600;
const MULTI_TENANT: [&str; 2] = ["organizations", "common"];

impl Provider {
    /// The host's key slot of this provider (see `Host::jwt_keys`).
    pub fn slot(&self) -> usize {
        self.slot
    }

    pub(crate) fn set_slot(&mut self, slot: usize) {
        self.slot = slot;
    }

    pub fn hmac_fingerprint(&self) -> [u8; 32] {
        self.hmac_fingerprint
    }

    /// With `verify_with: "envoy"`: the `jwt_authn` provider (and metadata field) it reads.
    pub fn envoy_provider(&self) -> Option<&str> {
        self.envoy_provider.as_deref()
    }

    /// Whether a token from `iss` (with `tid` its `tid` claim) is this provider's.
    pub fn accepts_issuer(&self, iss: &str, tid: Option<&str>) -> bool {
        if self.issuers.iter().any(|i| i == iss) {
            return true;
        }
        let Some(tid) = tid else { return false };
        self.tenant_issuers.iter().any(|t| {
            t.tenants
                .iter()
                .any(|listed| listed.eq_ignore_ascii_case(tid))
                && is_tenant_segment(tid)
                && t.version.issuer(tid) == iss
        })
    }

    /// Every issuer this provider accepts, templates expanded for their listed tenants.
    fn concrete_issuers(&self) -> Vec<String> {
        let mut out = self.issuers.clone();
        for t in &self.tenant_issuers {
            out.extend(t.tenants.iter().map(|tid| t.version.issuer(tid)));
        }
        out
    }

    pub(super) fn compile(
        cfg: &ProviderConfig,
        verify_with: VerifyWith,
        path: &str,
        env: EnvLookup<'_>,
    ) -> Result<Self, ConfigError> {
        let mut issuers: Vec<String> = Vec::new();
        let mut tenant_issuers = Vec::new();
        let mut algorithm_names = cfg.algorithms.clone();
        let mut jwks_cfg = cfg.jwks.clone();
        if let Some(entra) = &cfg.entra {
            let entra_path = join(path, "entra");
            // Entra ID writes tenant ids in lower case in `iss`.
            let tenant = entra.tenant.trim().to_ascii_lowercase();
            let tenant = tenant.as_str();
            if !is_tenant_segment(tenant) {
                return Err(ConfigError::new(
                    join(&entra_path, "tenant"),
                    "must be a tenant id or domain (letters, digits, '-' and '.')",
                ));
            }
            let versions = entra
                .versions
                .clone()
                .unwrap_or(vec![EntraVersion::V1, EntraVersion::V2]);
            if versions.is_empty() {
                return Err(ConfigError::new(
                    join(&entra_path, "versions"),
                    "must list \"v1\", \"v2\" or both (leave it out for both)",
                ));
            }
            let multi = MULTI_TENANT.iter().any(|m| m.eq_ignore_ascii_case(tenant));
            let tenants_path = join(&entra_path, "tenants");
            match (multi, entra.tenants.is_empty()) {
                (true, true) => {
                    return Err(ConfigError::new(
                        tenants_path,
                        format!(
                            "required with tenant {tenant:?}: list the tenant ids (tid) whose \
                             tokens are accepted"
                        ),
                    ))
                }
                (false, false) => {
                    return Err(ConfigError::new(
                        tenants_path,
                        "only with tenant \"organizations\" or \"common\" (a multi-tenant app)",
                    ))
                }
                _ => {}
            }
            if let Some(i) = entra.tenants.iter().position(|t| !is_tenant_segment(t)) {
                return Err(ConfigError::new(
                    index(&tenants_path, i),
                    "must be a tenant id (tid)",
                ));
            }
            for v in versions.iter().copied() {
                if multi {
                    if !tenant_issuers.iter().any(|t: &TenantIssuer| t.version == v) {
                        tenant_issuers.push(TenantIssuer {
                            version: v,
                            tenants: entra.tenants.clone(),
                        });
                    }
                } else {
                    let iss = v.issuer(tenant);
                    if !issuers.contains(&iss) {
                        issuers.push(iss);
                    }
                }
            }
            if algorithm_names.is_empty() {
                algorithm_names.push("RS256".into());
            }
            if jwks_cfg.is_none() {
                jwks_cfg = Some(JwksConfig {
                    inline: None,
                    cluster: Some(ENTRA_CLUSTER.into()),
                    uri: Some(format!(
                        "https://login.microsoftonline.com/{tenant}/discovery/v2.0/keys"
                    )),
                    refresh_seconds: None,
                });
            }
        }
        let non_empty = |list: &Vec<String>, field: &str| {
            if let Some(i) = list.iter().position(|s| s.trim().is_empty()) {
                return Err(ConfigError::new(
                    index(&join(path, field), i),
                    "must not be empty",
                ));
            }
            Ok(())
        };
        non_empty(&cfg.issuers, "issuers")?;
        for iss in &cfg.issuers {
            if !issuers.contains(iss) {
                issuers.push(iss.clone());
            }
        }
        if issuers.is_empty() && tenant_issuers.is_empty() {
            return Err(ConfigError::new(
                join(path, "issuers"),
                "must list at least one value (or give \"entra\")",
            ));
        }
        non_empty(&cfg.audiences, "audiences")?;
        if cfg.audiences.is_empty() {
            return Err(ConfigError::new(
                join(path, "audiences"),
                "must list at least one value",
            ));
        }
        non_empty(&algorithm_names, "algorithms")?;
        if algorithm_names.is_empty() {
            return Err(ConfigError::new(
                join(path, "algorithms"),
                "must list at least one value",
            ));
        }

        let mut algorithms = Vec::new();
        for (i, name) in algorithm_names.iter().enumerate() {
            let alg = name.parse::<Algorithm>().map_err(|_| {
                ConfigError::new(
                    index(&join(path, "algorithms"), i),
                    format!("unsupported algorithm {name:?} (supported: {SUPPORTED})"),
                )
            })?;
            if !algorithms.contains(&alg) {
                algorithms.push(alg);
            }
        }

        let wants_hmac = algorithms.iter().any(|a| is_hmac(*a));
        let mut hmac_fingerprint = [0u8; 32];
        let hmac =
            match (&cfg.hmac_secret, wants_hmac) {
                (Some(source), true) => {
                    let field = join(path, "hmac_secret");
                    let secret = source.resolve(&field, env)?;
                    // RFC 7518 §3.2: the key must be at least as long as the hash output.
                    if secret.len() < 32 {
                        return Err(ConfigError::new(
                            field,
                            "an HMAC secret needs at least 32 bytes",
                        ));
                    }
                    hmac_fingerprint = Sha256::digest(secret.as_bytes()).into();
                    Some(verify::VerifyingKey::hmac(secret.as_bytes()))
                }
                (None, true) => return Err(ConfigError::new(
                    join(path, "algorithms"),
                    "HS256/HS384/HS512 need \"hmac_secret\" (a shared secret, never a public key)",
                )),
                (Some(_), false) => {
                    return Err(ConfigError::new(
                        join(path, "hmac_secret"),
                        "set, but no HS256/HS384/HS512 algorithm is allowed",
                    ))
                }
                (None, false) => None,
            };

        let jwks_path = join(path, "jwks");
        let asymmetric = algorithms.iter().any(|a| !is_hmac(*a));
        let jwks = match &jwks_cfg {
            None if asymmetric => {
                return Err(ConfigError::new(
                    jwks_path,
                    "required: RS/PS/ES/EdDSA tokens are verified with the identity provider's keys",
                ))
            }
            None => JwksSource::None,
            Some(_) if !asymmetric => {
                return Err(ConfigError::new(
                    jwks_path,
                    "not used when only HS256/HS384/HS512 are allowed (the hmac_secret is the key); remove it",
                ))
            }
            Some(JwksConfig {
                inline: Some(inline),
                cluster: None,
                uri: None,
                refresh_seconds: None,
            }) => {
                let set = KeySet::from_jwks_value(inline).map_err(|e| {
                    ConfigError::new(join(&jwks_path, "inline"), e.reason())
                })?;
                JwksSource::Inline(set)
            }
            Some(JwksConfig {
                inline: None,
                cluster: Some(cluster),
                uri: Some(uri),
                refresh_seconds,
            }) => {
                let refresh_seconds = &refresh_seconds.unwrap_or(DEFAULT_REFRESH_SECONDS);
                if cluster.trim().is_empty() {
                    return Err(ConfigError::new(join(&jwks_path, "cluster"), "must name an Envoy cluster"));
                }
                if fetch::split_uri(uri).is_none() {
                    return Err(ConfigError::new(
                        join(&jwks_path, "uri"),
                        format!("{uri:?} is not an https:// or http:// URL"),
                    ));
                }
                if *refresh_seconds == 0 || *refresh_seconds > 7 * 86_400 {
                    return Err(ConfigError::new(
                        join(&jwks_path, "refresh_seconds"),
                        "must be between 1 and 604800",
                    ));
                }
                JwksSource::Remote {
                    cluster: cluster.clone(),
                    uri: uri.clone(),
                    refresh_seconds: *refresh_seconds,
                }
            }
            _ => {
                return Err(ConfigError::new(
                    jwks_path,
                    "needs either \"inline\" (a JWKS) or \"cluster\" and \"uri\" (fetched through Envoy), not both",
                ))
            }
        };
        if let (JwksSource::Inline(set), true) = (&jwks, asymmetric) {
            if !algorithms
                .iter()
                .filter(|a| !is_hmac(**a))
                .any(|a| set.has_family(KeyFamily::for_algorithm(*a)))
            {
                return Err(ConfigError::new(
                    join(&jwks_path, "inline"),
                    "no key in the set fits any allowed algorithm",
                ));
            }
        }

        let envoy_provider = match (verify_with, &jwks_cfg) {
            (VerifyWith::Gateguard, _) => None,
            (VerifyWith::Envoy, _) if wants_hmac => return Err(ConfigError::new(
                join(path, "verify_with"),
                "\"envoy\" verifies with the identity provider's keys (jwks); HS256/HS384/HS512 \
                     tokens are verified by \"gateguard\"",
            )),
            (VerifyWith::Envoy, Some(jwks))
                if jwks.uri.as_deref().is_some_and(fetch::is_discovery_uri) =>
            {
                return Err(ConfigError::new(
                    join(&jwks_path, "uri"),
                    "with verify_with \"envoy\", Envoy's jwt_authn fetches this URL as the key set \
                     and cannot follow OpenID discovery: give the discovery document's jwks_uri",
                ))
            }
            (VerifyWith::Envoy, Some(jwks)) => Some(envoy::provider_name(jwks)),
            // Refused above: an asymmetric algorithm without keys.
            (VerifyWith::Envoy, None) => None,
        };

        Ok(Self {
            issuers,
            tenant_issuers,
            audiences: cfg.audiences.clone(),
            algorithms,
            jwks,
            hmac,
            hmac_fingerprint,
            envoy_provider,
            slot: 0,
            path: path.to_string(),
        })
    }

    /// Whether the token's audience is one of this provider's.
    pub(super) fn accepts_audience(&self, claims: &Map<String, Value>) -> bool {
        match claims.get("aud") {
            Some(Value::String(a)) => self.audiences.contains(a),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|a| self.audiences.iter().any(|x| x == a)),
            _ => false,
        }
    }
}

/// Two providers of one API never accept the same issuer: the token's `iss` must name one.
pub(super) fn check_distinct_issuers(providers: &[Provider]) -> Result<(), ConfigError> {
    for (j, later) in providers.iter().enumerate() {
        for iss in later.concrete_issuers() {
            if let Some(earlier) = providers
                .iter()
                .take(j)
                .find(|p| p.concrete_issuers().contains(&iss))
            {
                return Err(ConfigError::new(
                    &later.path,
                    format!(
                        "issuer {iss:?} is also accepted by {}: a token's iss must pick one \
                         provider",
                        earlier.path
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The token's `iss` is no provider's. If it is the other Entra ID version of a tenant a
/// provider accepts, a reason that says what to add (the issuer is the only token content in it,
/// and only when it names an accepted tenant); otherwise `None`.
pub(super) fn entra_hint(providers: &[Provider], iss: &str) -> Option<String> {
    let (version, tenant) = EntraVersion::of_issuer(iss)?;
    let other = version.other().issuer(tenant);
    // Refused for its `tid`, not its version: nothing to add.
    let accepted = |iss: &str| {
        providers
            .iter()
            .any(|p| p.accepts_issuer(iss, Some(tenant)))
    };
    (!accepted(iss) && accepted(&other)).then(|| {
        format!(
            "issuer {iss} is Entra ID {} of an accepted tenant: add it to issuers, or use \
                 entra.versions [\"v1\",\"v2\"]",
            version.name()
        )
    })
}
