//! The method allow-list (docs/policy.md, "Methods"): a request whose method, or any method an
//! override header or `_method` asks a backend to treat it as, is not listed gets 405 with
//! `Allow`. CORS preflights are answered before this check.

use crate::error::{index, ConfigError};
use crate::headers::is_token;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodsPolicy {
    /// Upper-case, each once, in the policy's order.
    allowed: Vec<String>,
    /// The `Allow` header of a 405.
    allow: String,
}

/// Longest method name accepted in a policy (the longest registered one is 17 bytes).
const MAX_METHOD_LEN: usize = 32;

impl MethodsPolicy {
    pub fn compile(methods: &[String], path: &str) -> Result<Self, ConfigError> {
        if methods.is_empty() {
            return Err(ConfigError::new(
                path,
                "must list at least one method (an empty allow-list would refuse every request)",
            ));
        }
        let mut allowed: Vec<String> = Vec::with_capacity(methods.len());
        for (i, m) in methods.iter().enumerate() {
            if !is_token(m) || m.len() > MAX_METHOD_LEN {
                return Err(ConfigError::new(
                    index(path, i),
                    format!("{m:?} is not an HTTP method name"),
                ));
            }
            let upper = m.to_ascii_uppercase();
            if allowed.contains(&upper) {
                return Err(ConfigError::new(
                    index(path, i),
                    format!("{upper} is listed twice (methods compare case-insensitively)"),
                ));
            }
            allowed.push(upper);
        }
        let allow = allowed.join(", ");
        Ok(Self { allowed, allow })
    }

    /// Whether every method the request may be served as is listed. `effective` is the
    /// request's method first, then what overrides name
    /// ([`crate::pipeline::Request::effective_methods`]); compared case-insensitively, as
    /// frameworks that honour overrides upper-case them.
    pub fn admits(&self, effective: &[String]) -> Result<(), MethodError> {
        let listed = |m: &String| self.allowed.iter().any(|a| a.eq_ignore_ascii_case(m));
        match effective.split_first() {
            Some((method, _)) if !listed(method) => Err(MethodError::NotAllowed),
            Some((_, overrides)) if !overrides.iter().all(listed) => Err(MethodError::Override),
            _ => Ok(()),
        }
    }

    /// `Allow`: the listed methods.
    pub fn allow_header(&self) -> &str {
        &self.allow
    }

    pub fn allowed(&self) -> &[String] {
        &self.allowed
    }
}

/// Why a method was refused (for logs; the client gets one message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodError {
    NotAllowed,
    /// The request's own method is listed, an override header or `_method` names one that is
    /// not.
    Override,
}

impl MethodError {
    pub fn reason(self) -> &'static str {
        match self {
            MethodError::NotAllowed => "method not in the API's allow-list",
            MethodError::Override => "method override names a method not in the allow-list",
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn policy(methods: &[&str]) -> MethodsPolicy {
        let methods: Vec<String> = methods.iter().map(|m| m.to_string()).collect();
        MethodsPolicy::compile(&methods, "apis[0].methods").unwrap()
    }

    fn effective(methods: &[&str]) -> Vec<String> {
        methods.iter().map(|m| m.to_string()).collect()
    }

    #[test]
    fn listed_methods_pass_in_any_case_and_others_are_refused() {
        let p = policy(&["GET", "post"]);
        assert_eq!(p.allow_header(), "GET, POST");
        assert_eq!(p.admits(&effective(&["GET"])), Ok(()));
        assert_eq!(p.admits(&effective(&["POST"])), Ok(()));
        assert_eq!(p.admits(&effective(&["get"])), Ok(()));
        for m in [
            "DELETE", "PUT", "PATCH", "OPTIONS", "TRACE", "CONNECT", "GETX", "",
        ] {
            assert_eq!(
                p.admits(&effective(&[m])),
                Err(MethodError::NotAllowed),
                "{m}"
            );
        }
    }

    #[test]
    fn head_is_its_own_method() {
        // The request's effective methods for HEAD are HEAD then GET.
        let p = policy(&["GET"]);
        assert_eq!(
            p.admits(&effective(&["HEAD", "GET"])),
            Err(MethodError::NotAllowed)
        );
        let p = policy(&["GET", "HEAD"]);
        assert_eq!(p.admits(&effective(&["HEAD", "GET"])), Ok(()));
    }

    #[test]
    fn an_override_to_an_unlisted_method_is_refused() {
        let p = policy(&["GET", "POST"]);
        assert_eq!(
            p.admits(&effective(&["POST", "DELETE"])),
            Err(MethodError::Override)
        );
        assert_eq!(
            p.admits(&effective(&["POST", "get", "delete"])),
            Err(MethodError::Override)
        );
        assert_eq!(p.admits(&effective(&["POST", "get"])), Ok(()));
    }

    #[test]
    fn bad_lists_are_refused_with_their_field() {
        let err = MethodsPolicy::compile(&[], "apis[0].methods").unwrap_err();
        assert_eq!(err.path, "apis[0].methods");
        for bad in ["GET POST", "", "GET\r\n", "(GET)"] {
            let err =
                MethodsPolicy::compile(&["GET".into(), bad.into()], "apis[0].methods").unwrap_err();
            assert_eq!(err.path, "apis[0].methods[1]", "{bad:?}");
        }
        let err =
            MethodsPolicy::compile(&["GET".into(), "get".into()], "apis[0].methods").unwrap_err();
        assert!(err.reason.contains("twice"), "{}", err.reason);
    }
}
