//! Size limits (docs/policy.md, "Limits"): the request's headers, all together and one by one,
//! → 431; its body → 413, by `Content-Length` before anything goes upstream and by counting the
//! body as it streams through (the adapter feeds [`BodyCounter`] each chunk; nothing is
//! buffered).

use serde::Deserialize;

use crate::error::{join, ConfigError};

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Every request header's name and value together, in bytes.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub max_request_header_bytes: Option<u64>,
    /// Any one header's name and value, in bytes.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub max_header_bytes: Option<u64>,
    /// The request body, in bytes.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
}

/// Header limits above Envoy's own ceiling (`max_request_headers_kb` is at most 8192) could
/// never apply.
pub const MAX_HEADER_LIMIT: u64 = 8192 * 1024;
/// 1 TiB: a larger body limit is no limit.
pub const MAX_BODY_LIMIT: u64 = 1 << 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsPolicy {
    pub max_request_header_bytes: Option<u64>,
    pub max_header_bytes: Option<u64>,
    pub max_body_bytes: Option<u64>,
}

/// Which limit a request went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitError {
    /// All headers together.
    HeadersTooLarge,
    /// One header.
    HeaderTooLarge,
    /// `Content-Length` announced more than the limit (or could not be read as a length).
    BodyAnnouncedTooLarge,
    /// The body streamed past the limit.
    BodyTooLarge,
}

impl LimitError {
    pub fn is_body(self) -> bool {
        matches!(
            self,
            LimitError::BodyAnnouncedTooLarge | LimitError::BodyTooLarge
        )
    }

    pub fn reason(self) -> &'static str {
        match self {
            LimitError::HeadersTooLarge => "request headers over max_request_header_bytes",
            LimitError::HeaderTooLarge => "a request header over max_header_bytes",
            LimitError::BodyAnnouncedTooLarge => "content-length over max_body_bytes",
            LimitError::BodyTooLarge => "body streamed past max_body_bytes",
        }
    }
}

impl LimitsPolicy {
    pub fn compile(cfg: &LimitsConfig, path: &str) -> Result<Self, ConfigError> {
        let check = |value: Option<u64>, field: &str, max: u64| match value {
            Some(0) => Err(ConfigError::new(join(path, field), "must be at least 1")),
            Some(v) if v > max => Err(ConfigError::new(
                join(path, field),
                format!("{v} is over the largest limit, {max}"),
            )),
            _ => Ok(value),
        };
        let total = check(
            cfg.max_request_header_bytes,
            "max_request_header_bytes",
            MAX_HEADER_LIMIT,
        )?;
        let one = check(cfg.max_header_bytes, "max_header_bytes", MAX_HEADER_LIMIT)?;
        let body = check(cfg.max_body_bytes, "max_body_bytes", MAX_BODY_LIMIT)?;
        if total.is_none() && one.is_none() && body.is_none() {
            return Err(ConfigError::new(
                path,
                "sets no limit: give max_request_header_bytes, max_header_bytes or max_body_bytes",
            ));
        }
        if let (Some(total), Some(one)) = (total, one) {
            if one > total {
                return Err(ConfigError::new(
                    join(path, "max_header_bytes"),
                    format!("{one} is more than max_request_header_bytes ({total}): it could never apply"),
                ));
            }
        }
        Ok(Self {
            max_request_header_bytes: total,
            max_header_bytes: one,
            max_body_bytes: body,
        })
    }

    /// Header sizes, as name length + value length of every header Envoy hands the filter
    /// (pseudo-headers such as `:path` included), then `Content-Length` against the body limit.
    pub fn check_headers(&self, headers: &[(String, String)]) -> Result<(), LimitError> {
        if self.max_request_header_bytes.is_some() || self.max_header_bytes.is_some() {
            let mut total: u64 = 0;
            for (name, value) in headers {
                let size = (name.len() as u64).saturating_add(value.len() as u64);
                if self.max_header_bytes.is_some_and(|max| size > max) {
                    return Err(LimitError::HeaderTooLarge);
                }
                total = total.saturating_add(size);
            }
            if self.max_request_header_bytes.is_some_and(|max| total > max) {
                return Err(LimitError::HeadersTooLarge);
            }
        }
        if let Some(max) = self.max_body_bytes {
            for (name, value) in headers {
                if name.eq_ignore_ascii_case("content-length") {
                    // Envoy refuses a malformed length before filters run; anything it let
                    // through that is not a plain length is not trusted to be small.
                    match value.trim().parse::<u64>() {
                        Ok(n) if n <= max => {}
                        _ => return Err(LimitError::BodyAnnouncedTooLarge),
                    }
                }
            }
        }
        Ok(())
    }
}

/// Counts a request body as it streams through the filter, chunk by chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyCounter {
    limit: u64,
    seen: u64,
}

impl BodyCounter {
    pub fn new(limit: u64) -> Self {
        Self { limit, seen: 0 }
    }

    /// Another chunk of `len` bytes arrived: refused as soon as the body goes over.
    pub fn add(&mut self, len: usize) -> Result<(), LimitError> {
        self.seen = self.seen.saturating_add(len as u64);
        if self.seen > self.limit {
            Err(LimitError::BodyTooLarge)
        } else {
            Ok(())
        }
    }

    pub fn seen(&self) -> u64 {
        self.seen
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn limits(total: Option<u64>, one: Option<u64>, body: Option<u64>) -> LimitsPolicy {
        LimitsPolicy::compile(
            &LimitsConfig {
                max_request_header_bytes: total,
                max_header_bytes: one,
                max_body_bytes: body,
            },
            "apis[0].limits",
        )
        .unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn header_bytes_count_names_and_values_at_the_exact_boundary() {
        // ":path" + "/a" = 7, "x-a" + "12345" = 8: 15 in all.
        let h = headers(&[(":path", "/a"), ("x-a", "12345")]);
        assert_eq!(limits(Some(15), None, None).check_headers(&h), Ok(()));
        assert_eq!(
            limits(Some(14), None, None).check_headers(&h),
            Err(LimitError::HeadersTooLarge)
        );
        assert_eq!(limits(None, Some(8), None).check_headers(&h), Ok(()));
        assert_eq!(
            limits(None, Some(7), None).check_headers(&h),
            Err(LimitError::HeaderTooLarge)
        );
    }

    #[test]
    fn many_small_headers_add_up() {
        let h: Vec<(String, String)> = (0..100)
            .map(|i| (format!("x-{i}"), "v".repeat(50)))
            .collect();
        assert_eq!(
            limits(Some(4096), Some(64), None).check_headers(&h),
            Err(LimitError::HeadersTooLarge)
        );
    }

    #[test]
    fn content_length_over_the_limit_is_refused_before_the_body() {
        let l = limits(None, None, Some(10));
        assert_eq!(
            l.check_headers(&headers(&[("content-length", "10")])),
            Ok(())
        );
        assert_eq!(l.check_headers(&headers(&[])), Ok(()));
        for bad in [
            "11",
            "18446744073709551616",
            "-1",
            "1e3",
            "",
            "0x10",
            "10, 11",
        ] {
            assert_eq!(
                l.check_headers(&headers(&[("content-length", bad)])),
                Err(LimitError::BodyAnnouncedTooLarge),
                "{bad:?}"
            );
        }
        assert_eq!(
            l.check_headers(&headers(&[
                ("Content-Length", "5"),
                ("content-length", "50")
            ])),
            Err(LimitError::BodyAnnouncedTooLarge)
        );
    }

    #[test]
    fn a_streamed_body_is_refused_at_the_chunk_that_crosses() {
        let mut c = BodyCounter::new(10);
        assert_eq!(c.add(4), Ok(()));
        assert_eq!(c.add(6), Ok(()));
        assert_eq!(c.add(0), Ok(()));
        assert_eq!(c.add(1), Err(LimitError::BodyTooLarge));
        let mut c = BodyCounter::new(10);
        assert_eq!(c.add(usize::MAX), Err(LimitError::BodyTooLarge));
        assert_eq!(c.add(usize::MAX), Err(LimitError::BodyTooLarge));
    }

    #[test]
    fn bad_limits_are_refused_with_their_field() {
        let err = LimitsPolicy::compile(&LimitsConfig::default(), "apis[0].limits").unwrap_err();
        assert_eq!(err.path, "apis[0].limits");
        let cfg = LimitsConfig {
            max_body_bytes: Some(0),
            ..LimitsConfig::default()
        };
        let err = LimitsPolicy::compile(&cfg, "apis[0].limits").unwrap_err();
        assert_eq!(err.path, "apis[0].limits.max_body_bytes");
        let cfg = LimitsConfig {
            max_request_header_bytes: Some(100),
            max_header_bytes: Some(200),
            ..LimitsConfig::default()
        };
        let err = LimitsPolicy::compile(&cfg, "apis[0].limits").unwrap_err();
        assert_eq!(err.path, "apis[0].limits.max_header_bytes");
        let cfg = LimitsConfig {
            max_request_header_bytes: Some(MAX_HEADER_LIMIT + 1),
            ..LimitsConfig::default()
        };
        let err = LimitsPolicy::compile(&cfg, "apis[0].limits").unwrap_err();
        assert_eq!(err.path, "apis[0].limits.max_request_header_bytes");
    }
}
