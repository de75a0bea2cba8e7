//! IP filter (SPEC §2) and the client address it judges.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::error::{index, join, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct IpFilterConfig {
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    #[serde(default)]
    pub deny: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ClientIpConfig {
    #[serde(default)]
    pub trusted_proxy_hops: u8,
}

#[derive(Debug, Clone)]
pub struct IpFilterPolicy {
    allow: Option<Vec<IpNet>>,
    deny: Vec<IpNet>,
}

impl IpFilterPolicy {
    pub fn compile(cfg: &IpFilterConfig, path: &str) -> Result<Self, ConfigError> {
        if cfg.allow.is_none() && cfg.deny.is_none() {
            return Err(ConfigError::new(
                path,
                "needs an allow list, a deny list, or both",
            ));
        }
        let allow = match &cfg.allow {
            Some(list) if list.is_empty() => {
                return Err(ConfigError::new(
                    join(path, "allow"),
                    "an empty allow list would refuse every client; remove it or list networks",
                ))
            }
            Some(list) => Some(parse_networks(list, &join(path, "allow"))?),
            None => None,
        };
        let deny = match &cfg.deny {
            Some(list) if list.is_empty() => {
                return Err(ConfigError::new(
                    join(path, "deny"),
                    "an empty deny list is meaningless; remove it or list networks",
                ))
            }
            Some(list) => parse_networks(list, &join(path, "deny"))?,
            None => Vec::new(),
        };
        Ok(Self { allow, deny })
    }

    /// Deny wins over allow; a present allow list admits only its members.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        match &self.allow {
            Some(allow) => allow.iter().any(|n| n.contains(&ip)),
            None => true,
        }
    }
}

fn parse_networks(list: &[String], path: &str) -> Result<Vec<IpNet>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| parse_network(s).map_err(|reason| ConfigError::new(index(path, i), reason)))
        .collect()
}

/// A CIDR (`203.0.113.0/24`, `2001:db8::/32`) or a single address. Host bits set in a CIDR are
/// refused: `203.0.113.7/24` is almost always a typo for a /32 or for `.0/24`.
fn parse_network(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(IpNet::from(ip.to_canonical()));
    }
    let net: IpNet = t
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    if net.network() != net.addr() {
        return Err(format!(
            "{s:?} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    // IPv4-mapped IPv6 networks are compared as IPv4, like the addresses they hold.
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return Ok(IpNet::V4(n));
                }
            }
        }
    }
    Ok(net)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientIpError {
    /// No peer address from Envoy (should not happen on a TCP listener).
    NoPeer,
    /// X-Forwarded-For missing, too short for the configured hops, or not addresses.
    BadForwardedFor,
}

impl ClientIpError {
    pub fn reason(self) -> &'static str {
        match self {
            ClientIpError::NoPeer => "no peer address",
            ClientIpError::BadForwardedFor => "X-Forwarded-For missing or malformed",
        }
    }
}

/// The client IP: the connection's peer address, or with `trusted_proxy_hops = n > 0`, the
/// address `n` entries from the right of `X-Forwarded-For` (all occurrences joined in order).
/// Every trusted entry must be an address: garbage is refused, not skipped.
pub fn client_ip(
    cfg: &ClientIpConfig,
    peer: Option<&str>,
    forwarded_for: &[&str],
) -> Result<IpAddr, ClientIpError> {
    if cfg.trusted_proxy_hops == 0 {
        return peer
            .and_then(parse_address)
            .map(|ip| ip.to_canonical())
            .ok_or(ClientIpError::NoPeer);
    }
    let hops = usize::from(cfg.trusted_proxy_hops);
    let entries: Vec<&str> = forwarded_for
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    if entries.len() < hops || entries.len() > 64 {
        return Err(ClientIpError::BadForwardedFor);
    }
    let trusted = &entries[entries.len() - hops..];
    let mut parsed = trusted.iter().map(|e| parse_address(e));
    let first = parsed
        .next()
        .flatten()
        .ok_or(ClientIpError::BadForwardedFor)?;
    if parsed.any(|p| p.is_none()) {
        return Err(ClientIpError::BadForwardedFor);
    }
    Ok(first.to_canonical())
}

/// `1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]`, `[::1]:5678` (Envoy's `source.address` and
/// Azure's X-Forwarded-For both carry ports).
pub fn parse_address(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        if !(after.is_empty() || port_ok(after.strip_prefix(':')?)) {
            return None;
        }
        return addr.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (addr, port) = s.rsplit_once(':')?;
    if !port_ok(port) {
        return None;
    }
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

fn port_ok(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn policy(allow: Option<&[&str]>, deny: Option<&[&str]>) -> IpFilterPolicy {
        IpFilterPolicy::compile(
            &IpFilterConfig {
                allow: allow.map(|a| a.iter().map(|s| s.to_string()).collect()),
                deny: deny.map(|a| a.iter().map(|s| s.to_string()).collect()),
            },
            "apis[0].ip_filter",
        )
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_wins_over_allow_and_allow_list_is_exclusive() {
        let p = policy(
            Some(&["203.0.113.0/24", "2001:db8::/32"]),
            Some(&["203.0.113.7/32"]),
        );
        assert!(p.admits(ip("203.0.113.1")));
        assert!(!p.admits(ip("203.0.113.7")));
        assert!(!p.admits(ip("198.51.100.1")));
        assert!(p.admits(ip("2001:db8::1")));
        assert!(!p.admits(ip("2001:db9::1")));
        // IPv4-mapped IPv6 is the IPv4 address.
        assert!(p.admits(ip("::ffff:203.0.113.1")));
        assert!(!p.admits(ip("::ffff:203.0.113.7")));
    }

    #[test]
    fn deny_only_admits_everyone_else() {
        let p = policy(None, Some(&["10.0.0.0/8", "::1"]));
        assert!(!p.admits(ip("10.1.2.3")));
        assert!(!p.admits(ip("::1")));
        assert!(p.admits(ip("192.0.2.1")));
    }

    #[test]
    fn bad_networks_name_the_entry() {
        for (bad, reason) in [
            ("300.1.1.1/24", "not an IP"),
            ("10.0.0.0/33", "not an IP"),
            ("203.0.113.7/24", "host bits"),
            ("", "not an IP"),
        ] {
            let err = IpFilterPolicy::compile(
                &IpFilterConfig {
                    allow: Some(vec!["10.0.0.0/8".into(), bad.into()]),
                    deny: None,
                },
                "apis[0].ip_filter",
            )
            .unwrap_err();
            assert_eq!(err.path, "apis[0].ip_filter.allow[1]");
            assert!(err.reason.contains(reason), "{bad}: {}", err.reason);
        }
        let err = IpFilterPolicy::compile(
            &IpFilterConfig {
                allow: Some(vec![]),
                deny: None,
            },
            "apis[0].ip_filter",
        )
        .unwrap_err();
        assert_eq!(err.path, "apis[0].ip_filter.allow");
    }

    #[test]
    fn client_ip_from_peer_strips_port() {
        let cfg = ClientIpConfig::default();
        assert_eq!(
            client_ip(&cfg, Some("127.0.0.1:5555"), &[]),
            Ok(ip("127.0.0.1"))
        );
        assert_eq!(client_ip(&cfg, Some("[::1]:5555"), &[]), Ok(ip("::1")));
        assert_eq!(
            client_ip(&cfg, Some("[::ffff:10.0.0.1]:1"), &[]),
            Ok(ip("10.0.0.1"))
        );
        // Without trusted hops, X-Forwarded-For is ignored entirely.
        assert_eq!(
            client_ip(&cfg, Some("127.0.0.1:1"), &["203.0.113.9"]),
            Ok(ip("127.0.0.1"))
        );
        assert_eq!(client_ip(&cfg, None, &[]), Err(ClientIpError::NoPeer));
    }

    #[test]
    fn client_ip_from_forwarded_for_counts_hops_from_the_right() {
        let one = ClientIpConfig {
            trusted_proxy_hops: 1,
        };
        let two = ClientIpConfig {
            trusted_proxy_hops: 2,
        };
        let xff = ["198.51.100.1, 203.0.113.5", "192.0.2.9:443"];
        assert_eq!(
            client_ip(&one, Some("127.0.0.1:1"), &xff),
            Ok(ip("192.0.2.9"))
        );
        assert_eq!(
            client_ip(&two, Some("127.0.0.1:1"), &xff),
            Ok(ip("203.0.113.5"))
        );
        assert_eq!(
            client_ip(&two, None, &["1.1.1.1"]),
            Err(ClientIpError::BadForwardedFor)
        );
        assert_eq!(
            client_ip(&one, None, &[]),
            Err(ClientIpError::BadForwardedFor)
        );
        // Garbage in a trusted position is refused, not skipped.
        assert_eq!(
            client_ip(&two, None, &["1.1.1.1, evil, 2.2.2.2"]),
            Err(ClientIpError::BadForwardedFor)
        );
        assert_eq!(
            client_ip(&one, None, &["1.1.1.1, "]),
            Err(ClientIpError::BadForwardedFor)
        );
        // Untrusted entries further left may be anything.
        assert_eq!(
            client_ip(&one, None, &["unknown, 2.2.2.2"]),
            Ok(ip("2.2.2.2"))
        );
        assert_eq!(
            client_ip(&one, None, &["[2001:db8::1]:443"]),
            Ok(ip("2001:db8::1"))
        );
    }
}
